#!/usr/bin/env python3
"""Prints one Markdown row of scripts/bench-llm.sh from a JSON report on standard input.

Usage: llm_row.py ENGINE WEIGHTS THREADS < report.json
"""

import json
import sys

engine, weights, threads = sys.argv[1:4]
report = json.load(sys.stdin)
prompt = report["prompt_tokens_per_second"]
generate = report["generate_tokens_per_second"]
print(f"| {engine} | {weights} | {threads} | {report['prompt_tokens']} | {prompt:.1f} | {generate:.1f} |")
