#!/usr/bin/env bash
# Runs the runtime's unit, integration and doc tests under Miri, which reports undefined behaviour
# in unsafe code (out-of-bounds or misaligned accesses, aliasing violations), on two targets:
#
# - the host (x86_64, little-endian), where the tests open and run hand-built files;
# - s390x-unknown-linux-gnu (big-endian), where opening a file must fail with
#   Error::BigEndianHost. Miri interprets the code, so no s390x machine or emulator is needed.
#
# Needs a nightly toolchain with the miri and rust-src components:
#   rustup toolchain install nightly --profile minimal --component miri,rust-src
# Under Miri (cfg(miri)) the larger kernel tests run fewer sizes, because Miri interprets every
# operation. The SIMD kernels are not run, because Miri reports no AVX2 or NEON support and the
# portable kernels are chosen.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

for target in host s390x-unknown-linux-gnu; do
    args=()
    filter=()
    if [ "$target" != host ]; then
        args=(--target "$target")
        # The kernels never run on a big-endian host, because opening a file fails there first.
        # They take most of Miri's time, and the host run covers them.
        filter=(-- --skip kernels::)
    fi
    echo "== Miri: edgefold-runtime tests on $target"
    start=$SECONDS
    cargo +nightly miri test -p edgefold-runtime "${args[@]}" "${filter[@]}"
    echo "Miri on $target took $((SECONDS - start)) s"
done
