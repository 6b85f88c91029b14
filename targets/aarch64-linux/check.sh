#!/usr/bin/env bash
# Cross-compiles the runner into a static aarch64 binary and runs it under qemu-aarch64 on the
# MLPerf Tiny keyword spotting model (f32 and int8) and the anomaly detection autoencoder (f32)
# with their reference inputs. Every output must match the same runner built for this machine
# within 1e-5 for keyword spotting and 1e-4 for the autoencoder, relative to the value's
# magnitude above 1. The outputs are not bit-identical, because linear layers run SIMD kernels
# chosen per CPU (AVX2 or AVX-512 here, NEON on aarch64) that round fused multiply-adds and order
# sums differently. The autoencoder's ten layers of dot products up to 640 long add these
# differences up to about 1e-5 of its outputs. Needs the packages and Rust targets listed in the repository's .cargo/config.toml,
# python3 with numpy, and ../shared/data/mlperf-tiny beside the repository.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
data="$root/../shared/data/mlperf-tiny"
if [ ! -d "$data" ]; then
    echo "error: $data is missing; the MLPerf Tiny models are read from there" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== runner for aarch64-unknown-linux-musl (static)"
(cd "$here/runner" && cargo build --quiet --release --target aarch64-unknown-linux-musl)
(cd "$here/runner" && cargo build --quiet --release)
target_dir="${CARGO_TARGET_DIR:-$here/runner/target}"
host="$target_dir/release/edgefold-runner"
arm="$target_dir/aarch64-unknown-linux-musl/release/edgefold-runner"
file "$arm" 2>/dev/null || true
ls -l "$arm"

python3 - "$data" "$work" <<'PY'
import sys
import numpy as np
data, work = sys.argv[1], sys.argv[2]
# The keyword spotting input is int8; the float model takes it dequantized with the TFLite
# original's input quantization.
q = np.load(f"{data}/kws_ref_model.npz")["in0"].astype(np.int32)
((q - 83).astype(np.float32) * np.float32(0.5847029089927673)).astype("<f4").tofile(f"{work}/kws.bin")
np.load(f"{data}/ad01_fp32.npz")["in0"].astype("<f4").tofile(f"{work}/ad01.bin")
PY

check() {
    local name="$1" onnx="$2" quantize="$3" input="$4" tolerance="$5"
    echo "== $name"
    (cd "$root" && cargo run --quiet -p edgefold-compressor --bin edgefold -- \
        compress "$data/$onnx" -o "$work/$name.fold" --quantize "$quantize")
    "$host" "$work/$name.fold" "$work/$input" --save "$work/$name.expected" > /dev/null
    qemu-aarch64 "$arm" "$work/$name.fold" "$work/$input" \
        --expect "$work/$name.expected" --tolerance "$tolerance" | tail -n 3
}

check kws_f32 kws_ref_model.onnx f32 kws.bin 1e-5
check kws_int8 kws_ref_model.onnx int8 kws.bin 1e-5
check ad01_f32 ad01_fp32.onnx f32 ad01.bin 1e-4
echo "aarch64 outputs match the host's"
