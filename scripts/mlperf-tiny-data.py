#!/usr/bin/env python3
"""Writes calibration and evaluation sets for the MLPerf Tiny anomaly detection autoencoder.

The benchmark ships one reference input and its output (ad01_fp32.npz: `in0` [1, 640], a
unit-spread vector far from what the autoencoder reconstructs well, and `out0`, its
reconstruction). The perturbed copies here move the reference part of the way towards its own
reconstruction, x = (1 - t) * in0 + t * out0, plus a little Gaussian noise (10 % of the
reference's spread). At t = 0 the error is the reference's; as t grows the input looks more and
more like what the model considers normal and the error falls, so the copies span the whole range
of anomaly scores.

  ad01_calibration.npz  `inputs` [64, 640]: the reference and 63 copies, t uniform in [0, 1] (seed 1)
  ad01_eval.npz         `inputs` [21, 640]: the reference and 20 copies, t evenly from 0.05 to 1 (seed 2)

Usage: python3 scripts/mlperf-tiny-data.py [DATA_DIR] [OUT_DIR]
(defaults: ../shared/data/mlperf-tiny and target/mlperf-tiny)
"""
import os
import sys

import numpy as np


def perturbed(reference, reconstruction, steps, seed):
    """The reference followed by one copy per step t, moved towards the reconstruction."""
    rng = np.random.default_rng(seed)
    spread = float(reference.std())
    rows = [reference]
    for t in steps:
        moved = (1.0 - t) * reference + t * reconstruction
        rows.append(moved + rng.normal(0.0, 0.1 * spread, reference.shape))
    return np.stack(rows).astype(np.float32)


def main():
    data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mlperf-tiny"
    out = sys.argv[2] if len(sys.argv) > 2 else "target/mlperf-tiny"
    source = os.path.join(data, "ad01_fp32.npz")
    if not os.path.exists(source):
        sys.exit(f"error: {source} is missing; pass the MLPerf Tiny data directory as argument 1")
    arrays = np.load(source)
    reference = arrays["in0"].reshape(-1).astype(np.float64)
    reconstruction = arrays["out0"].reshape(-1).astype(np.float64)
    sets = [
        ("ad01_calibration", np.random.default_rng(1).uniform(0.0, 1.0, 63), 1),
        ("ad01_eval", np.linspace(0.05, 1.0, 20), 2),
    ]
    os.makedirs(out, exist_ok=True)
    for name, steps, seed in sets:
        path = os.path.join(out, name + ".npz")
        tmp = path + ".partial.npz"
        np.savez(tmp, inputs=perturbed(reference, reconstruction, steps, seed))
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
