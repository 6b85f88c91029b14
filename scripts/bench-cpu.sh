#!/usr/bin/env bash
# Runs Edgefold, tract and onnxruntime side by side on one sentence encoder, in one go on this
# machine, and prints Markdown for BENCHMARKS.md. First comes the machine's roofline. Then, for
# sequence lengths 16, 128 and 512 at batch 1 on 1 and 2 threads, each engine's median latency,
# load to first output and peak RSS, with speed-ups against onnxruntime f32 and tract.
#
# Engines: Edgefold on the model packed as f32 and as int8 (the latter also with
# --int8-activations: integer products on CPUs with AVX-512 VNNI), and on PLANNED.fold if given
# (for example the planner's output at --min-quality 0.99, compressed with --max-seq 512).
# tract-onnx runs the ONNX file on one thread, because its thread pool is not built into
# Edgefold's binary.
# onnxruntime from PyPI runs the ONNX file in f32 and with its dynamic int8 quantization.
#
# Usage: scripts/bench-cpu.sh MODEL.onnx TOKENIZER.json [PLANNED.fold]
# Needs: cargo build --release -p edgefold-compressor, and `pip install onnxruntime numpy onnx`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$1"
tokenizer="$2"
planned="${3:-}"
runs="${RUNS:-20}"
edgefold="${CARGO_TARGET_DIR:-$root/target}/release/edgefold"
[ -x "$edgefold" ] || { echo "error: build first: cargo build --release -p edgefold-compressor" >&2; exit 1; }
python3 -c "import onnxruntime, onnx, numpy" 2> /dev/null \
    || { echo "error: onnxruntime, onnx and numpy are needed: pip install onnxruntime onnx numpy" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
echo "versions: $("$edgefold" --version), tract-onnx $(grep -A1 'name = "tract-onnx"' "$root/Cargo.lock" \
    | awk -F'"' '/version/ {print $2}'), onnxruntime $(python3 -c 'import onnxruntime; print(onnxruntime.__version__)')"
echo
echo "== roofline"
cargo run --quiet --release --manifest-path "$root/Cargo.toml" -p edgefold-runtime --example roofline \
    -- --json > "$work/roofline.json"
python3 - "$work/roofline.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"peak f32 FMA: {r['peak_gflops_one_core']:.1f} GFLOP/s on one core, "
      f"{r['peak_gflops_all_cores']:.1f} on {r['cores']}; memory read {r['read_gbytes_per_s_one_core']:.1f} "
      f"GB/s on one core, {r['read_gbytes_per_s_all_cores']:.1f} on {r['cores']}")
print(f"f32 GEMM 384x1536 by 1536x128: {r['gemm_gflops']:.1f} GFLOP/s = "
      f"{100 * r['gemm_fraction_of_peak']:.0f} % of the one-core peak")
PY

echo
echo "== packing"
"$edgefold" compress "$model" -o "$work/f32.fold" --quantize f32 --max-seq 512 \
    --tokenizer "$tokenizer" > /dev/null
"$edgefold" compress "$model" -o "$work/int8.fold" --quantize int8 --max-seq 512 \
    --tokenizer "$tokenizer" > /dev/null

# Runs one measurement under /usr/bin/time -v; appends a JSON line with the peak RSS added.
measure() {
    local label="$1"
    shift
    /usr/bin/time -v "$@" > "$work/one.json" 2> "$work/time.txt" || {
        cat "$work/time.txt" >&2
        exit 1
    }
    python3 - "$work/one.json" "$work/time.txt" "$label" >> "$work/all.jsonl" <<'PY'
import json, re, sys
b = json.load(open(sys.argv[1]))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(sys.argv[2]).read()).group(1))
b.update(label=sys.argv[3], peak_rss_mib=rss / 1024)
print(json.dumps(b))
PY
}

: > "$work/all.jsonl"
for seq in 16 128 512; do
    for threads in 1 2; do
        echo "sequence $seq, $threads thread(s)" >&2
        common=(--seq "$seq" --runs "$runs" --json)
        measure "Edgefold f32" "$edgefold" bench "$work/f32.fold" --threads "$threads" "${common[@]}"
        measure "Edgefold int8" "$edgefold" bench "$work/int8.fold" --threads "$threads" "${common[@]}"
        measure "Edgefold int8, int8 activations" "$edgefold" bench "$work/int8.fold" \
            --threads "$threads" --int8-activations "${common[@]}"
        if [ -n "$planned" ]; then
            measure "Edgefold planner" "$edgefold" bench "$planned" --threads "$threads" "${common[@]}"
        fi
        if [ "$threads" = 1 ]; then
            measure "tract f32" "$edgefold" bench "$model" --engine tract "${common[@]}"
        fi
        measure "onnxruntime f32" python3 "$root/scripts/bench_ort.py" "$model" \
            --threads "$threads" --seq "$seq" --runs "$runs"
        measure "onnxruntime dynamic int8" python3 "$root/scripts/bench_ort.py" "$model" \
            --threads "$threads" --seq "$seq" --runs "$runs" --dynamic-int8
    done
done

python3 - "$work/all.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print()
print("| seq | threads | engine | median latency (ms) | vs onnxruntime f32 | vs tract | "
      "load to first output (ms) | peak RSS (MiB) |")
print("|---:|---:|---|---:|---:|---:|---:|---:|")
for r in rows:
    same = [o for o in rows if o["seq"] == r["seq"] and o.get("threads", 1) == r.get("threads", 1)]
    ort = next(o for o in same if o["label"] == "onnxruntime f32")
    tract = next(o for o in rows if o["seq"] == r["seq"] and o["label"] == "tract f32")
    speed_ort = ort["latency_ms_median"] / r["latency_ms_median"]
    speed_tract = tract["latency_ms_median"] / r["latency_ms_median"]
    print(f"| {r['seq']} | {r.get('threads', 1)} | {r['label']} | {r['latency_ms_median']:.2f} | "
          f"{speed_ort:.2f}x | {speed_tract:.2f}x | {r['load_to_first_output_ms']:.1f} | "
          f"{r['peak_rss_mib']:.1f} |")
print()
print("Ratios are speed-ups (the other engine's median latency over this one's); tract's column")
print("compares with tract on one thread at the same sequence length.")
PY
