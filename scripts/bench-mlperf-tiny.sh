#!/usr/bin/env bash
# Runs the planner on the MLPerf Tiny wake word model and anomaly detection autoencoder with half
# the size of their int8 TFLite files as the budget, then scores the results with `edgefold eval`.
#
# Usage: bash scripts/bench-mlperf-tiny.sh [DATA_DIR] [OUT_DIR]
# (defaults: ../shared/data/mlperf-tiny and target/mlperf-tiny)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data="${1:-../shared/data/mlperf-tiny}"
out="${2:-target/mlperf-tiny}"
for f in str_ww_ref_model.onnx str_ww_ref_model.tflite str_ww_calibration_samples.npz \
    ad01_fp32.onnx ad01_int8.tflite ad01_fp32.npz; do
    if [ ! -f "$data/$f" ]; then
        echo "error: $data/$f is missing; pass the MLPerf Tiny data directory as argument 1" >&2
        exit 1
    fi
done
mkdir -p "$out"
cargo build --release --quiet -p edgefold-compressor --bin edgefold
edgefold="${CARGO_TARGET_DIR:-target}/release/edgefold"
python3 scripts/mlperf-tiny-data.py "$data" "$out"

half() { echo $(($(stat -c %s "$1") / 2)); }

echo "== streaming wake word: budget $(half "$data/str_ww_ref_model.tflite") bytes"
$edgefold compress "$data/str_ww_ref_model.onnx" -o "$out/str_ww.fold" \
    --target-size "$(half "$data/str_ww_ref_model.tflite")" --task accuracy \
    --calibration "$data/str_ww_calibration_samples.npz" \
    --eval-data "$data/str_ww_calibration_samples.npz" --report "$out/str_ww-report"
$edgefold eval "$data/str_ww_ref_model.onnx" "$out/str_ww.fold" --task accuracy \
    --data "$data/str_ww_calibration_samples.npz"

echo "== anomaly detection autoencoder: budget $(half "$data/ad01_int8.tflite") bytes"
$edgefold compress "$data/ad01_fp32.onnx" -o "$out/ad01.fold" \
    --target-size "$(half "$data/ad01_int8.tflite")" --task anomaly \
    --calibration "$out/ad01_calibration.npz" --eval-data "$out/ad01_eval.npz" \
    --report "$out/ad01-report"
$edgefold eval "$data/ad01_fp32.onnx" "$out/ad01.fold" --task anomaly --data "$out/ad01_eval.npz"
ls -l "$out/str_ww.fold" "$out/ad01.fold" "$data/str_ww_ref_model.tflite" "$data/ad01_int8.tflite"
