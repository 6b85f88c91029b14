#!/usr/bin/env bash
# Builds and runs the firmware under QEMU with the files generate.sh wrote:
#   - checks that the link fails when the statics leave less RAM than the stack reserve;
#   - keyword spotting (int8) on mps2-an386 (Cortex-M4F with an FPU) and on lm3s6965evb
#     (Cortex-M3 without an FPU, 256 KiB of flash and 64 KiB of RAM);
#   - the wake word model (int8) on lm3s6965evb;
#   - all three again with the feature int8-activations, which also runs each model with int8
#     activations and compares those scores with the host runtime's. They are skipped, with a
#     warning, when generate.sh could not record that reference on this host (an error when
#     EDGEFOLD_REQUIRE_TARGETS=1).
# Each run must end with exit status 0, which the firmware returns only when its scores match the
# host runtime's within 1e-5 and the top class is the same. QEMU runs under `timeout` (see
# .cargo/config.toml). The logs go to target/runs/, and footprint.sh then reports flash, RAM,
# stack and instruction counts from them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
target_dir="${CARGO_TARGET_DIR:-$here/target}"
logs="$target_dir/runs"
mkdir -p "$logs"

# run NAME CARGO_ARGS...: runs the firmware, keeping its output in $logs/NAME.log.
run() {
    local name="$1"
    shift
    echo "== $name"
    cargo run --quiet --release "$@" | tee "$logs/$name.log"
}

echo "== the link fails when the statics leave too little RAM for the stack (lm3s6965evb)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Every byte of RAM as the stack reserve: no image can leave that much.
if EDGEFOLD_STACK_RESERVE=65536 cargo build --quiet --release --target thumbv7m-none-eabi \
    > "$log" 2>&1; then
    echo "error: the firmware linked with a stack reserve of all of the RAM" >&2
    exit 1
fi
if ! grep -q "the statics leave less RAM than the stack reserve" "$log"; then
    cat "$log" >&2
    echo "error: the build failed for another reason than the stack reserve" >&2
    exit 1
fi
grep -m1 "the statics leave less RAM than the stack reserve" "$log"

run kws-mps2-an386
run kws-lm3s6965evb --target thumbv7m-none-eabi
run wake-word-lm3s6965evb --target thumbv7m-none-eabi --no-default-features --features wake-word,self-test
if [ -f src/generated/kws/expected-int8.bin ] && [ -f src/generated/wake_word/expected-int8.bin ]
then
    run kws-int8-mps2-an386 --features int8-activations
    run kws-int8-lm3s6965evb --target thumbv7m-none-eabi --features int8-activations
    run wake-word-int8-lm3s6965evb --target thumbv7m-none-eabi --no-default-features \
        --features wake-word,self-test,int8-activations
elif [ "${EDGEFOLD_REQUIRE_TARGETS:-0}" = 1 ]; then
    echo "error: src/generated/*/expected-int8.bin is missing; run generate.sh on a host with" \
        "AVX-512 VNNI or the aarch64 dot-product extension" >&2
    exit 1
else
    echo "warning: skipping the int8-activations images: generate.sh recorded no reference" \
        "with int8 activations on this host" >&2
fi

echo "== footprint"
bash footprint.sh
