#!/usr/bin/env bash
# Measures one sentence encoder end to end and prints Markdown tables for BENCHMARKS.md:
# file size and STS-B dev Spearman for each storage mode, then load-to-first-output time, peak RSS
# and latency of the runtime against tract, all in one run on one machine.
#
# Usage: scripts/bench-slice.sh MODEL.onnx TOKENIZER.json STS.csv [SEQ]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$1"
tokenizer="$2"
sts="$3"
seq="${4:-128}"
edgefold="${CARGO_TARGET_DIR:-$root/target}/release/edgefold"
[ -x "$edgefold" ] || { echo "error: build first: cargo build --release -p edgefold-compressor" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

echo "| storage | low-rank | bytes | % of ONNX | STS-B dev Spearman (original -> packed) | retained |"
echo "|---|---|---:|---:|---|---:|"
onnx_bytes=$(stat -c %s "$model")
echo "| ONNX f32 (original) | - | $onnx_bytes | 100.0 | - | - |"
for mode in "f32 off" "f16 off" "int8 off" "int8 elbow" "int8 energy:0.9" "int8 energy:0.99"; do
    set -- $mode
    name="$1-${2//:/_}"
    "$edgefold" compress "$model" -o "$work/$name.fold" --quantize "$1" --low-rank "$2" \
        --tokenizer "$tokenizer" --json > "$work/$name.compress.json"
    "$edgefold" eval "$model" "$work/$name.fold" --task sts --data "$sts" --json > "$work/$name.eval.json"
    bytes=$(field "$work/$name.compress.json" output_bytes)
    python3 - "$work/$name.eval.json" "$1" "$2" "$bytes" "$onnx_bytes" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
q, lr, b, onnx = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
print(f"| {q} | {lr} | {b} | {100*b/onnx:.1f} | {e['original']:.4f} -> {e['compressed']:.4f} | {100*e['retained']:.2f} % |")
PY
done

echo
echo "| engine | file | open (ms) | load to first output (ms) | median latency, seq $seq (ms) | peak RSS (MiB) |"
echo "|---|---|---:|---:|---:|---:|"
run_bench() {
    local engine="$1" file="$2" label="$3"
    /usr/bin/time -v "$edgefold" bench "$file" --engine "$engine" --seq "$seq" --runs 20 --json \
        > "$work/bench.json" 2> "$work/time.txt"
    local rss
    rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$work/time.txt")
    python3 - "$work/bench.json" "$label" "$rss" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
print(f"| {b['engine']} | {sys.argv[2]} | {b['open_ms']:.1f} | {b['load_to_first_output_ms']:.1f} | {b['latency_ms_median']:.1f} | {int(sys.argv[3])/1024:.1f} |")
PY
}
run_bench tract "$model" "ONNX f32"
run_bench edgefold "$work/f32-off.fold" "packed f32"
run_bench edgefold "$work/int8-off.fold" "packed int8"
