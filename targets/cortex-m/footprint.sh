#!/usr/bin/env bash
# Reports the keyword spotting firmware's footprint on both boards as a Markdown table:
#   - flash and RAM by section (llvm-size, or arm-none-eabi-size);
#   - the runtime's code and read-only data: the image minus the `footprint-baseline` image, which
#     is the same application without the runtime, so the difference is what the runtime and its
#     kernels add (the packed model is in both);
#   - from the logs that run.sh writes, the stack high-water mark, the arena bytes the run wrote
#     and the instructions per run, with f32 and with int8 activations. Without a log, the
#     firmware runs here under QEMU.
# Needs the files generate.sh writes. With cargo-bloat installed, also prints the code per crate.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
target_dir="${CARGO_TARGET_DIR:-$here/target}"
logs="$target_dir/runs"
mkdir -p "$logs"

if command -v llvm-size > /dev/null; then
    size_tool=llvm-size
elif command -v arm-none-eabi-size > /dev/null; then
    size_tool=arm-none-eabi-size
else
    echo "error: footprint.sh needs llvm-size or arm-none-eabi-size" >&2
    exit 1
fi

# section ELF NAME: the size of section NAME in bytes (0 when absent).
section() {
    "$size_tool" -A "$1" | awk -v name="$2" '$1 == name { size = $2 } END { print size + 0 }'
}

# field LOG PATTERN N: the Nth word of the first line of LOG that matches PATTERN.
field() {
    awk -v pattern="$2" -v n="$3" '$0 ~ pattern { print $n; exit }' "$1" | tr -d ','
}

boards=(mps2-an386 lm3s6965evb)
declare -A target=([mps2-an386]=thumbv7em-none-eabihf [lm3s6965evb]=thumbv7m-none-eabi)
declare -A core=([mps2-an386]="Cortex-M4F" [lm3s6965evb]="Cortex-M3")
# Flash and RAM of each board as memory/BOARD.x gives them.
declare -A flash_size=([mps2-an386]="4 MiB" [lm3s6965evb]="256 KiB")
declare -A ram_size=([mps2-an386]="4 MiB" [lm3s6965evb]="64 KiB")
declare -A row
model_bytes=$(wc -c < src/generated/kws/model.fold)

for board in "${boards[@]}"; do
    t="${target[$board]}"
    elf="$target_dir/$t/release/edgefold-firmware"
    cargo build --quiet --release --target "$t" --features footprint-baseline
    cp "$elf" "$target_dir/$t/release/edgefold-firmware-baseline"
    base="$target_dir/$t/release/edgefold-firmware-baseline"
    cargo build --quiet --release --target "$t" --no-default-features --features kws
    no_self_test_text=$(section "$elf" .text)
    int8_text=""
    if [ -f src/generated/kws/expected-int8.bin ]; then
        cargo build --quiet --release --target "$t" --features int8-activations
        int8_text=$(section "$elf" .text)
    fi
    cargo build --quiet --release --target "$t"
    # Read before the runs below: a run with int8 activations links another image at $elf.
    vectors=$(section "$elf" .vector_table)
    text=$(section "$elf" .text)
    rodata=$(section "$elf" .rodata)
    data=$(section "$elf" .data)
    bss=$(section "$elf" .bss)
    uninit=$(section "$elf" .uninit)

    log="$logs/kws-$board.log"
    if [ ! -s "$log" ]; then
        cargo run --quiet --release --target "$t" > "$log"
    fi
    int8_log="$logs/kws-int8-$board.log"
    if [ -n "$int8_text" ] && [ ! -s "$int8_log" ]; then
        cargo run --quiet --release --target "$t" --features int8-activations > "$int8_log"
    fi

    base_text=$(section "$base" .text)
    base_rodata=$(section "$base" .rodata)
    base_data=$(section "$base" .data)
    flash=$((vectors + text + rodata + data))
    statics=$((data + bss + uninit))
    stack=$(field "$log" "^stack:" 3)
    arena=$(field "$log" "^edgefold: model" 10)
    written=$(field "$log" "^arena:" 2)
    instructions=$(field "$log" "instructions per run" 7)
    int8_instructions="not measured (no int8 reference on this host)"
    if [ -n "$int8_text" ]; then
        int8_instructions=$(field "$int8_log" "^int8 activations: about" 4)
    fi
    runtime_code=$((text - base_text))
    runtime_data=$((rodata - base_rodata + data - base_data))

    row[flash]+=" | $flash of ${flash_size[$board]}"
    row[model]+=" | $model_bytes"
    row[runtime_code]+=" | $runtime_code ($(awk -v b="$runtime_code" 'BEGIN { printf "%.1f", b / 1024 }') KiB)"
    plain_code=$((no_self_test_text - base_text))
    row[plain_code]+=" | $plain_code ($(awk -v b="$plain_code" 'BEGIN { printf "%.1f", b / 1024 }') KiB)"
    row[runtime_data]+=" | $runtime_data"
    row[app]+=" | $((vectors + base_text + base_rodata + base_data - model_bytes))"
    row[statics]+=" | $statics"
    row[arena]+=" | $arena"
    row[written]+=" | $written"
    row[stack]+=" | $stack"
    row[ram]+=" | $((statics + stack)) of ${ram_size[$board]}"
    row[instructions]+=" | $instructions"
    row[int8_instructions]+=" | $int8_instructions"
    if [ -n "$int8_text" ]; then
        int8_code=$((int8_text - text))
        row[int8_code]+=" | $int8_code ($(awk -v b="$int8_code" 'BEGIN { printf "%.1f", b / 1024 }') KiB)"
    else
        row[int8_code]+=" | not measured"
    fi
done

echo
echo "| keyword spotting, int8 | mps2-an386 (${core[mps2-an386]}) | lm3s6965evb (${core[lm3s6965evb]}) |"
echo "|---|---:|---:|"
echo "| flash used: vector table, .text, .rodata, .data (bytes)${row[flash]} |"
echo "| of which the packed model${row[model]} |"
echo "| runtime and kernels: code (.text over the baseline image)${row[runtime_code]} |"
echo "| runtime and kernels: code without the self-test (built without the self-test feature)${row[plain_code]} |"
echo "| runtime and kernels: read-only data (.rodata and .data over the baseline)${row[runtime_data]} |"
echo "| application, startup and formatting (baseline image without the model)${row[app]} |"
echo "| statics in RAM: .data, .bss (arena included), .uninit${row[statics]} |"
echo "| arena stated by the model's header${row[arena]} |"
echo "| arena bytes the run wrote (highest byte changed)${row[written]} |"
echo "| stack high-water mark (painted)${row[stack]} |"
echo "| RAM used: statics and stack high-water${row[ram]} |"
echo "| instructions per run (QEMU -icount shift=0)${row[instructions]} |"
echo "| instructions per run with int8 activations (feature int8-activations)${row[int8_instructions]} |"
echo "| code that the feature int8-activations adds${row[int8_code]} |"

if command -v cargo-bloat > /dev/null; then
    echo
    echo "== code per crate on mps2-an386 (cargo bloat; inlined code counts for its caller)"
    cargo bloat --release --crates -n 12 2>/dev/null | sed -n '/^File/,$p'
fi
