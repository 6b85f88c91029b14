#!/usr/bin/env bash
# Writes the ONNX backend node tests (about 1,900 small models with inputs and expected outputs)
# into target/onnx-node, for the conformance test compressor/tests/onnx_node.rs.
#
# The cases come from the `onnx` package, version 1.23.x. When python3 already imports such a
# version it is used as is. Otherwise the script installs onnx 1.23.2 from PyPI into a virtual
# environment under target/onnx-venv, or with `pip install --user` when python3 cannot create
# virtual environments. An existing complete target/onnx-node is left alone unless --force is
# given.
#
# Usage: scripts/onnx-node-tests.sh [--force] [OUT]   (default OUT: target/onnx-node)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
onnx_spec="onnx==1.23.2"

die() {
    echo "onnx-node-tests: error: $*" >&2
    exit 1
}

info() {
    echo "onnx-node-tests: $*" >&2
}

# Succeeds when PYTHON imports an onnx 1.23.x.
has_onnx() {
    "$1" -c 'import sys, onnx; sys.exit(0 if onnx.__version__.startswith("1.23.") else 1)' \
        > /dev/null 2>&1
}

# Prints the path of a python3 that imports onnx 1.23.x, installing the package when needed.
find_python() {
    local venv="$root/target/onnx-venv"
    if has_onnx python3; then
        command -v python3
        return
    fi
    if has_onnx "$venv/bin/python3"; then
        echo "$venv/bin/python3"
        return
    fi
    if python3 -m venv "$venv" > /dev/null 2>&1; then
        info "installing $onnx_spec into $venv"
        "$venv/bin/python3" -m pip install --quiet "$onnx_spec" >&2 \
            || die "pip install $onnx_spec into $venv failed; check the connection to PyPI"
        echo "$venv/bin/python3"
        return
    fi
    rm -rf "$venv"
    python3 -m pip --version > /dev/null 2>&1 \
        || die "python3 has neither venv nor pip; install python3-venv or python3-pip"
    info "installing $onnx_spec with pip install --user"
    python3 -m pip install --quiet --user "$onnx_spec" >&2 \
        || die "pip install --user $onnx_spec failed; check the connection to PyPI"
    has_onnx python3 || die "python3 does not import $onnx_spec after installing it"
    command -v python3
}

main() {
    local force=0
    if [[ ${1-} == -h || ${1-} == --help ]]; then
        sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        return
    fi
    if [[ ${1-} == --force ]]; then
        force=1
        shift
    fi
    local out="${1:-$root/target/onnx-node}"
    command -v python3 > /dev/null || die "python3 not found, and the onnx package needs it"

    if [[ $force == 0 && -f $out/MANIFEST ]]; then
        info "$out is present ($(grep -m1 '^onnx ' "$out/MANIFEST"))"
        return
    fi
    local python
    python="$(find_python)"
    local version
    version="$("$python" -c 'import onnx; print(onnx.__version__)')"
    info "writing the node tests with onnx $version"
    "$python" -W ignore "$root/scripts/onnx_node_tests.py" "$out"
}

main "$@"
