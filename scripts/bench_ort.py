#!/usr/bin/env python3
"""Times an ONNX sentence encoder in onnxruntime the way `edgefold bench` times a packed file.

Feeds the same synthetic token input as `edgefold bench`, batch 1: ids 101, then
1000 + 7919 i mod 20000, then 102, with a mask of ones and token types of zeros. Prints one JSON
object with the time to create the session ("open"), the time from the start to the first output,
and the median and minimum of the timed runs after the first.

With --dynamic-int8 the model is first quantized with onnxruntime's dynamic int8 quantization
(weights int8 per tensor, activations quantized at run time) into a temporary file. That step is
not timed.

Usage: bench_ort.py MODEL.onnx --seq 128 --threads 1 [--runs 20] [--dynamic-int8]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def token_inputs(session, seq):
    ids = [1000 + (i * 7919) % 20000 for i in range(seq)]
    ids[0] = 101
    ids[-1] = 102
    values = {"input_ids": ids, "attention_mask": [1] * seq, "token_type_ids": [0] * seq}
    import numpy as np

    feeds = {}
    for arg in session.get_inputs():
        if arg.name not in values:
            sys.exit(f"error: the model has an input named {arg.name!r}; only token inputs are fed")
        feeds[arg.name] = np.array([values[arg.name]], dtype=np.int64)
    return feeds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--dynamic-int8", action="store_true")
    args = parser.parse_args()
    if args.seq < 2 or args.threads < 1 or args.runs < 1:
        sys.exit("error: --seq must be at least 2, --threads and --runs at least 1")

    import onnxruntime as ort

    model = args.model
    with tempfile.TemporaryDirectory() as work:
        if args.dynamic_int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            model = os.path.join(work, "dynamic-int8.onnx")
            quantize_dynamic(args.model, model, weight_type=QuantType.QInt8)

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        start = time.perf_counter()
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        opened = time.perf_counter() - start
        feeds = token_inputs(session, args.seq)
        session.run(None, feeds)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t)

    print(
        json.dumps(
            {
                "file": args.model,
                "engine": "onnxruntime-dynamic-int8" if args.dynamic_int8 else "onnxruntime",
                "version": ort.__version__,
                "seq": args.seq,
                "threads": args.threads,
                "runs": args.runs,
                "open_ms": opened * 1e3,
                "load_to_first_output_ms": first * 1e3,
                "latency_ms_median": statistics.median(times) * 1e3,
                "latency_ms_min": min(times) * 1e3,
            }
        )
    )


if __name__ == "__main__":
    main()
