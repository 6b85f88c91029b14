#!/usr/bin/env python3
"""Prints one Markdown row of scripts/bench-llm.sh from a JSON report on standard input: the
report of `edgefold generate --json` or bench_llamacpp.py, or with --llama-bench the JSON array
of llama.cpp's llama-bench (one entry for the prompt test, one for generation).

Usage: llm_row.py [--llama-bench] ENGINE WEIGHTS THREADS < report.json
"""

import json
import sys

args = sys.argv[1:]
llama_bench = args[0] == "--llama-bench"
if llama_bench:
    args = args[1:]
engine, weights, threads = args[:3]
report = json.load(sys.stdin)
if llama_bench:
    prompt_test = next(r for r in report if r["n_prompt"] > 0 and r["n_gen"] == 0)
    generate_test = next(r for r in report if r["n_gen"] > 0 and r["n_prompt"] == 0)
    tokens = prompt_test["n_prompt"]
    prompt = prompt_test["avg_ts"]
    generate = generate_test["avg_ts"]
else:
    tokens = report["prompt_tokens"]
    prompt = report["prompt_tokens_per_second"]
    generate = report["generate_tokens_per_second"]
print(f"| {engine} | {weights} | {threads} | {tokens} | {prompt:.1f} | {generate:.1f} |")
