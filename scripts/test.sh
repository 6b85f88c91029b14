#!/usr/bin/env bash
# Runs Edgefold's test suite: fetches the default model if missing, then the workspace tests, the
# no_std build of the runtime for a Cortex-M4F target, and the cross-compiled runs under QEMU:
# the runtime's tests and the runner on aarch64 Linux, and the firmware on two Cortex-M boards.
#
# Tests that need ../shared/data (evaluation data next to the repository) skip with a printed
# reason when it is absent; with EDGEFOLD_REQUIRE_DATA=1 they fail instead. The cross-compiled
# runs need gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user and qemu-system-arm (Debian
# packages); without them they are skipped, unless EDGEFOLD_REQUIRE_TARGETS=1.
#
# Last, the runtime's tests under Miri (scripts/miri.sh, on x86_64 and big-endian s390x) and each
# fuzz target for 60 s (scripts/fuzz.sh). They need a nightly toolchain with the miri and rust-src
# components, and cargo-fuzz; without them they are skipped, unless EDGEFOLD_REQUIRE_TARGETS=1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "== models"
bash scripts/fetch-models.sh

echo "== rust targets"
for target in thumbv7em-none-eabihf thumbv7m-none-eabi aarch64-unknown-linux-gnu \
    aarch64-unknown-linux-musl; do
    if ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target"
    fi
done

echo "== ONNX backend node tests"
# Writes target/onnx-node once, with the onnx package from PyPI. compressor/tests/onnx_node.rs runs
# them in the workspace tests and fails on any wrong result for an op the importer supports.
if ! bash scripts/onnx-node-tests.sh; then
    [ "${EDGEFOLD_REQUIRE_DATA:-0}" = 1 ] && exit 1
    echo "warning: the ONNX node tests could not be written, so their test will skip"
fi

echo "== workspace tests"
cargo test --workspace --all-targets

echo "== runtime without std, for thumbv7em-none-eabihf"
cargo build -p edgefold-runtime --no-default-features --target thumbv7em-none-eabihf

echo "== translator without std, for thumbv7em-none-eabihf"
cargo build -p edgefold-runtime --no-default-features --features translator \
    --target thumbv7em-none-eabihf

echo "== runtime tests without int4 weights, as firmware builds it"
cargo test -p edgefold-runtime --no-default-features --features alloc,all-ops --test open_and_run

missing=""
for tool in aarch64-linux-gnu-gcc qemu-aarch64 qemu-system-arm python3; do
    command -v "$tool" > /dev/null || missing="$missing $tool"
done
[ -d ../shared/data/mlperf-tiny ] || missing="$missing ../shared/data/mlperf-tiny"
if [ -n "$missing" ]; then
    if [ "${EDGEFOLD_REQUIRE_TARGETS:-0}" = 1 ]; then
        echo "error: the cross-compiled runs need:$missing" >&2
        exit 1
    fi
    echo "skipping the cross-compiled runs: missing$missing"
else
    echo "== runtime tests on aarch64-unknown-linux-gnu under qemu-aarch64"
    cargo test -p edgefold-runtime --target aarch64-unknown-linux-gnu
    echo "== runner on aarch64 against the host"
    bash targets/aarch64-linux/check.sh
    echo "== firmware on Cortex-M boards under QEMU"
    bash targets/cortex-m/generate.sh
    bash targets/cortex-m/run.sh
fi

# Skips a step with REASON, or fails when EDGEFOLD_REQUIRE_TARGETS=1 makes it mandatory.
skip_or_fail() {
    if [ "${EDGEFOLD_REQUIRE_TARGETS:-0}" = 1 ]; then
        echo "error: $1" >&2
        exit 1
    fi
    echo "skipping: $1"
}

has_nightly_miri() {
    cargo +nightly miri --version > /dev/null 2>&1 || return 1
    rustup component list --toolchain nightly --installed 2> /dev/null \
        | grep '^rust-src' > /dev/null
}

if has_nightly_miri; then
    bash scripts/miri.sh
else
    skip_or_fail "the Miri runs need a nightly toolchain with miri and rust-src \
(rustup toolchain install nightly --profile minimal --component miri,rust-src)"
fi
if cargo +nightly fuzz --version > /dev/null 2>&1; then
    bash scripts/fuzz.sh 60
else
    skip_or_fail "the fuzz runs need a nightly toolchain and cargo-fuzz \
(cargo install cargo-fuzz --locked)"
fi
echo "all tests passed"
