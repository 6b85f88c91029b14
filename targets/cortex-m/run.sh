#!/usr/bin/env bash
# Builds and runs the firmware under QEMU with the files generate.sh wrote:
#   - keyword spotting (int8) on mps2-an386, Cortex-M4F with an FPU;
#   - the wake word model (int8) on lm3s6965evb, Cortex-M3 without an FPU;
#   - and checks that keyword spotting does not link for lm3s6965evb, whose 64 KiB of RAM cannot
#     hold the model's 65,984-byte arena.
# Each run must end with exit status 0, which the firmware returns only when its scores match the
# host runtime's within 1e-5. QEMU runs under `timeout` (see .cargo/config.toml).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
target_dir="${CARGO_TARGET_DIR:-$here/target}"

echo "== keyword spotting on mps2-an386 (thumbv7em-none-eabihf)"
cargo run --quiet --release
echo "== wake word on lm3s6965evb (thumbv7m-none-eabi)"
cargo run --quiet --release --target thumbv7m-none-eabi --no-default-features --features wake-word

echo "== keyword spotting must not link for lm3s6965evb"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if cargo build --quiet --release --target thumbv7m-none-eabi > "$log" 2>&1; then
    echo "error: keyword spotting linked for a board whose RAM cannot hold its arena" >&2
    exit 1
fi
if ! grep -q "will not fit in region 'RAM'" "$log"; then
    cat "$log" >&2
    echo "error: the build failed for another reason than the RAM size" >&2
    exit 1
fi
grep -m1 "will not fit in region 'RAM'" "$log"

echo "== footprint (text includes the model in .rodata; bss is the arena and statics)"
if command -v llvm-size > /dev/null; then
    llvm-size "$target_dir/thumbv7em-none-eabihf/release/edgefold-firmware" \
        "$target_dir/thumbv7m-none-eabi/release/edgefold-firmware"
fi
