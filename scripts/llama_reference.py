#!/usr/bin/env python3
"""Float64 NumPy forward pass of a Llama-architecture GGUF model, the reference that the Rust
implementation's tests compare logits against.

Weights are dequantized by gguf-py (llama.cpp's Python package) and the prompt is tokenized by
the `tokenizers` package with the byte-level BPE stored in the file, so neither shares code with
the Rust side. Prints the token ids as JSON and writes the logits of every position, as float32
[tokens, vocab], to OUT.npy.

Usage: llama_reference.py MODEL.gguf PROMPT OUT.npy   (needs numpy, gguf and tokenizers)
"""

import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def build_tokenizer(reader):
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    types = field(reader, "tokenizer.ggml.token_type")
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    if field(reader, "tokenizer.ggml.pre") == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == 3])
    return tokenizer


def weights(reader):
    out = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        out[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
    return out


def forward(reader, w, ids):
    arch = field(reader, "general.architecture")
    layers = field(reader, f"{arch}.block_count")
    heads = field(reader, f"{arch}.attention.head_count")
    kv_heads = field(reader, f"{arch}.attention.head_count_kv")
    eps = field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    base = field(reader, f"{arch}.rope.freq_base")
    dim = w["token_embd.weight"].shape[1]
    head_dim = dim // heads
    n = len(ids)

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

    angles = np.outer(np.arange(n), base ** (-np.arange(0, head_dim, 2) / head_dim))
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rotate(x):
        # Pairs of neighbouring values are rotated (llama.cpp's normal rotary mode).
        pairs = x.reshape(n, -1, head_dim // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)

    causal = np.where(np.tril(np.ones((n, n), dtype=bool)), 0.0, -np.inf)
    x = w["token_embd.weight"][ids]
    for layer in range(layers):
        p = f"blk.{layer}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rotate((h @ w[p + "attn_q.weight"].T).reshape(n, heads, head_dim))
        k = rotate((h @ w[p + "attn_k.weight"].T).reshape(n, kv_heads, head_dim))
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, kv_heads, head_dim)
        group = heads // kv_heads
        mixed = np.empty((n, heads, head_dim))
        for head in range(heads):
            scores = q[:, head] @ k[:, head // group].T / np.sqrt(head_dim) + causal
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
            mixed[:, head] = scores @ v[:, head // group]
        x = x + mixed.reshape(n, dim) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    out = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ out.T


def main():
    model, prompt, out = sys.argv[1:4]
    reader = GGUFReader(model)
    ids = build_tokenizer(reader).encode(prompt).ids
    logits = forward(reader, weights(reader), ids)
    np.save(out, logits.astype(np.float32))
    print(json.dumps(ids))


if __name__ == "__main__":
    main()
