#!/usr/bin/env python3
"""Measures a GGUF model with llama.cpp through llama-cpp-python: prompt and generation speed,
and perplexity over non-overlapping windows, as `edgefold generate` and `eval --task ppl` do.

Usage: bench_llamacpp.py MODEL.gguf TEXT [--tokens 8192] [--window 512] [--threads 1]
                         [--prompt-tokens 128] [--no-ppl]

The prompt is the text's first --prompt-tokens tokens; 64 tokens are then generated greedily.
Needs llama-cpp-python, which builds llama.cpp from source (pip install llama-cpp-python).
"""

import argparse
import json
import math
import time

import numpy as np
from llama_cpp import Llama


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("text")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--no-ppl", action="store_true", help="measure only the speed")
    args = parser.parse_args()

    llm = Llama(args.model, n_ctx=args.window, n_threads=args.threads, n_threads_batch=args.threads,
                logits_all=True, verbose=False)
    with open(args.text, encoding="utf-8") as f:
        tokens = llm.tokenize(f.read().encode(), add_bos=False, special=False)[: args.tokens]

    nll, scored = 0.0, 0
    start = time.perf_counter()
    for at in range(0, 0 if args.no_ppl else len(tokens), args.window):
        window = tokens[at : at + args.window]
        if len(window) < 2:
            continue
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
        for row, target in zip(logits[:-1], window[1:]):
            top = row.max()
            nll += top + math.log(np.exp(row - top).sum()) - row[target]
            scored += 1
    ppl_seconds = time.perf_counter() - start

    # Speed is measured without logits for every position, which only perplexity needs.
    llm = Llama(args.model, n_ctx=args.window, n_threads=args.threads, n_threads_batch=args.threads,
                logits_all=False, verbose=False)
    prompt = tokens[: args.prompt_tokens]
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_seconds = time.perf_counter() - start
    generated = 0
    start = time.perf_counter()
    for _ in range(64):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
        generated += 1
    generate_seconds = time.perf_counter() - start

    print(json.dumps({
        "model": args.model,
        "threads": args.threads,
        "tokens": len(tokens),
        "scored": scored,
        "perplexity": math.exp(nll / scored) if scored else None,
        "perplexity_seconds": ppl_seconds,
        "prompt_tokens": len(prompt),
        "prompt_tokens_per_second": len(prompt) / prompt_seconds,
        "generate_tokens_per_second": generated / generate_seconds,
    }, indent=2))


if __name__ == "__main__":
    main()
