#!/usr/bin/env bash
# Packs the firmware's models in int8 with the compressor and records the host runtime's output
# for each reference input, in src/generated/MODEL/ (kept out of git):
#   model.fold    the packed model
#   input.bin     the reference input, dequantized to f32, little-endian
#   expected.bin  the host runtime's output for that input, f32 little-endian
#   expected-int8.bin
#                 the same with int8 activations (Session::set_int8_activations). The runner
#                 computes it only on a host with AVX-512 VNNI or the aarch64 dot-product
#                 extension; elsewhere the file is left out (an error when
#                 EDGEFOLD_REQUIRE_TARGETS=1), and the int8-activations images cannot be built.
#   input.npy     the reference input as an .npy file, which the packed model also carries as
#                 its self-test input (with the compressor's output for it)
# Needs ../shared/data/mlperf-tiny beside the repository and python3 with numpy. The host
# runtime is the runner in targets/aarch64-linux/runner, built for this machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
data="$root/../shared/data/mlperf-tiny"
if [ ! -d "$data" ]; then
    echo "error: $data is missing; the MLPerf Tiny models are read from there" >&2
    exit 1
fi

# Cargo commands run from the repository root: this folder's .cargo/config.toml would make them
# build for the microcontroller.
cd "$root"
edgefold() { cargo run --quiet --manifest-path "$root/Cargo.toml" -p edgefold-compressor --bin edgefold -- "$@"; }
runner() { cargo run --quiet --release --manifest-path "$root/targets/aarch64-linux/runner/Cargo.toml" -- "$@"; }

# generate NAME ONNX NPZ SCALE ZERO_POINT: the int8 reference input `in0` of NPZ is dequantized
# with the TFLite original's input quantization, (q - ZERO_POINT) * SCALE.
generate() {
    local name="$1" onnx="$2" npz="$3" scale="$4" zero="$5"
    local out="$here/src/generated/$name"
    mkdir -p "$out"
    python3 - "$data/$npz" "$scale" "$zero" "$out/input.bin" "$out/input.npy" <<'PY'
import sys
import numpy as np
npz, scale, zero, out, out_npy = sys.argv[1:6]
q = np.load(npz)["in0"].astype(np.int32)
x = ((q - int(zero)).astype(np.float32) * np.float32(scale)).astype("<f4")
x.tofile(out)
np.save(out_npy, x)
PY
    edgefold compress "$data/$onnx" -o "$out/model.fold" --quantize int8 \
        --self-test-input "$out/input.npy"
    runner "$out/model.fold" "$out/input.bin" --save "$out/expected.bin"
    rm -f "$out/expected-int8.bin"
    if ! runner "$out/model.fold" "$out/input.bin" --int8-activations \
        --save "$out/expected-int8.bin"; then
        if [ "${EDGEFOLD_REQUIRE_TARGETS:-0}" = 1 ]; then
            echo "error: no reference with int8 activations for $name" >&2
            exit 1
        fi
        echo "warning: no reference with int8 activations for $name on this host, so the" \
            "firmware's int8-activations feature cannot be checked here" >&2
    fi
}

generate kws kws_ref_model.onnx kws_ref_model.npz 0.5847029089927673 83
generate wake_word str_ww_ref_model.onnx str_ww_ref_model.npz 0.003701042616739869 -128
