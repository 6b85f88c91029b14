"""Write the ONNX backend node test cases to disk.

The `onnx` package defines its node tests in Python, in onnx/backend/test/case/node. Each case is
a model with one node, or with the node's function body expanded into several nodes. It comes with
one set of inputs and the expected outputs of the package's NumPy reference. This script runs
those definitions and writes every case in the layout the ONNX test runners read:

    OUT/<test name>/model.onnx
    OUT/<test name>/test_data_set_0/input_<i>.pb, output_<i>.pb

Tensors are written as TensorProto, sequences as SequenceProto, optionals as OptionalProto. The
script writes into a temporary directory beside OUT and renames it at the end, so OUT is either
absent or complete. OUT/MANIFEST lists the onnx version and the number of cases.

Usage: python3 onnx_node_tests.py OUT
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.test.loader import load_node_model_tests

# The case definitions draw their inputs from np.random, so a fixed seed makes the written data the
# same on every run with the same onnx and NumPy versions.
SEED = 0


def serialize(value, type_proto: onnx.TypeProto, name: str) -> bytes:
    """Serialize one input or output value according to its declared ONNX type."""
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        return numpy_helper.from_list(list(value), name).SerializeToString()
    if kind == "optional_type":
        return numpy_helper.from_optional(value, name).SerializeToString()
    if kind == "map_type":
        return numpy_helper.from_dict(value, name).SerializeToString()
    if isinstance(value, onnx.TensorProto):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = name
        return tensor.SerializeToString()
    return numpy_helper.from_array(np.asarray(value), name).SerializeToString()


def write_case(case, directory: str) -> None:
    """Write the model and its first data set into `directory`."""
    os.makedirs(directory)
    with open(os.path.join(directory, "model.onnx"), "wb") as f:
        f.write(case.model.SerializeToString())
    graph = case.model.graph
    inputs, outputs = case.data_sets[0]
    data_dir = os.path.join(directory, "test_data_set_0")
    os.makedirs(data_dir)
    for kind, values, infos in (("input", inputs, graph.input), ("output", outputs, graph.output)):
        if len(values) != len(infos):
            raise ValueError(f"{len(values)} {kind} values for {len(infos)} graph {kind}s")
        for i, (value, info) in enumerate(zip(values, infos)):
            path = os.path.join(data_dir, f"{kind}_{i}.pb")
            with open(path, "wb") as f:
                f.write(serialize(value, info.type, info.name))


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = os.path.abspath(sys.argv[1])
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)

    np.random.seed(SEED)
    cases = load_node_model_tests()
    staging = tempfile.mkdtemp(prefix=".onnx-node.", dir=parent)
    failed = []
    try:
        for case in cases:
            try:
                write_case(case, os.path.join(staging, case.name))
            except (ValueError, TypeError) as error:
                failed.append(case.name)
                print(f"cannot write {case.name}: {error}", file=sys.stderr)
                shutil.rmtree(os.path.join(staging, case.name), ignore_errors=True)
        written = len(cases) - len(failed)
        with open(os.path.join(staging, "MANIFEST"), "w") as f:
            f.write(f"onnx {onnx.__version__}\nnumpy {np.__version__}\nseed {SEED}\n")
            f.write(f"cases {len(cases)}\nwritten {written}\n")
            for name in failed:
                f.write(f"not written {name}\n")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {written} of {len(cases)} node tests (onnx {onnx.__version__}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
