#!/usr/bin/env bash
# Runs Edgefold's test suite: fetches the default model if missing, then the workspace tests and
# the no_std build of the runtime for a Cortex-M4F target.
#
# Tests that need ../shared/data (evaluation data next to the repository) skip with a printed
# reason when it is absent; with EDGEFOLD_REQUIRE_DATA=1 they fail instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "== models"
bash scripts/fetch-models.sh

echo "== rust targets"
if ! rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
    rustup target add thumbv7em-none-eabihf
fi

echo "== workspace tests"
cargo test --workspace --all-targets

echo "== runtime without std, for thumbv7em-none-eabihf"
cargo build -p edgefold-runtime --no-default-features --target thumbv7em-none-eabihf
echo "all tests passed"
