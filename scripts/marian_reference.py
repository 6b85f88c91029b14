#!/usr/bin/env python3
"""Float64 NumPy greedy decoder for Marian transformer models with an SSRU decoder, the
reference that the Rust implementation's tests compare token ids and logits against.

It reads Marian's binary model format on its own: header, names, shapes, float32 tensors and
intgemm8 tensors, which are stored transposed except the embedding Wemb. It tokenizes with the
`tokenizers` package from the model's tokenizer.json, so it shares no code with the Rust side. Positions, layer normalization and the SSRU cell follow Marian 1.9
(marian-nmt/marian-dev: src/models/transformer.h, src/graph/node_initializers.cpp).

Prints one JSON object: the source ids ("sources", each ending with </s>), the greedy target ids
without </s> ("targets") and the number of logit rows written per sentence ("logit_steps").
With --logits OUT.npy, writes the logits of the first --steps decoding steps of every sentence,
as float32 [sum of logit_steps, vocab].

Usage: marian_reference.py MODEL.bin TOKENIZER.json [--logits OUT.npy] [--steps K] SENTENCE...
(needs numpy and tokenizers)
"""

import argparse
import json
import math
import struct

import numpy as np
from tokenizers import Tokenizer

FLOAT32 = 0x404
INTGEMM8 = 0x4101
LAYER_NORM_EPS = 1e-6
MAX_LENGTH_FACTOR = 2.5


def read_model(path):
    """Return {name: float64 array} for the float32 and intgemm8 tensors, and the YAML text."""
    data = open(path, "rb").read()
    version, count = struct.unpack_from("<QQ", data, 0)
    if version != 1:
        raise SystemExit(f"{path}: format version {version} is not 1")
    at = 16
    headers = []
    for _ in range(count):
        headers.append(struct.unpack_from("<QQQQ", data, at))
        at += 32
    names = []
    for name_len, _, _, _ in headers:
        names.append(data[at : at + name_len].split(b"\0")[0].decode())
        at += name_len
    shapes = []
    for _, _, rank, _ in headers:
        shapes.append(struct.unpack_from(f"<{rank}i", data, at))
        at += 4 * rank
    (padding,) = struct.unpack_from("<Q", data, at)
    at += 8 + padding

    tensors, yaml = {}, ""
    for (_, kind, _, length), name, shape in zip(headers, names, shapes):
        raw = data[at : at + length]
        at += length
        elements = int(np.prod(shape))
        if kind == FLOAT32:
            tensors[name] = np.frombuffer(raw, "<f4", elements).astype(np.float64).reshape(shape)
        elif kind == INTGEMM8:
            rows, cols = shape if len(shape) == 2 else (1, shape[0])
            values = np.frombuffer(raw, np.int8, elements).astype(np.float64)
            (multiplier,) = struct.unpack_from("<f", raw, elements)
            # Matrices are stored as the right-hand operand of an int8 product (column-major).
            # The output layer uses Wemb transposed, so Wemb itself is stored row-major.
            matrix = values.reshape(rows, cols) if name == "Wemb" else values.reshape(cols, rows).T
            tensors[name] = matrix / multiplier
        elif name == "special:model.yml":
            yaml = raw.split(b"\0")[0].decode()
    return tensors, yaml


def config_value(yaml, key):
    for line in yaml.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"configuration key {key} is missing")


def positions(count, dim, start):
    half = dim // 2
    timescales = np.exp(-np.arange(half) * math.log(10000.0) / (half - 1))
    angles = np.arange(start, start + count)[:, None] * timescales[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def layer_norm(x, w, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * w[prefix + "_ln_scale"] + w[prefix + "_ln_bias"]


def project(w, prefix, name, x):
    return x @ w[f"{prefix}_W{name}"] + w[f"{prefix}_b{name}"]


def attention(w, prefix, queries, memory, heads):
    q = project(w, prefix, "q", queries)
    k = project(w, prefix, "k", memory)
    v = project(w, prefix, "v", memory)
    head_dim = q.shape[-1] // heads
    out = np.empty_like(q)
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, cols] = (scores / scores.sum(-1, keepdims=True)) @ v[:, cols]
    return layer_norm(queries + project(w, prefix, "o", out), w, prefix + "_Wo")


def feed_forward(w, prefix, x):
    hidden = np.maximum(x @ w[prefix + "_W1"] + w[prefix + "_b1"], 0.0)
    return layer_norm(x + hidden @ w[prefix + "_W2"] + w[prefix + "_b2"], w, prefix + "_ffn")


def translate(w, yaml, source, eos, steps):
    heads = int(config_value(yaml, "transformer-heads"))
    enc_depth = int(config_value(yaml, "enc-depth"))
    dec_depth = int(config_value(yaml, "dec-depth"))
    emb = w["Wemb"]
    dim = emb.shape[1]

    x = emb[source] * math.sqrt(dim) + positions(len(source), dim, 0)
    for l in range(1, enc_depth + 1):
        x = attention(w, f"encoder_l{l}_self", x, x, heads)
        x = feed_forward(w, f"encoder_l{l}_ffn", x)

    cells = [np.zeros(dim) for _ in range(dec_depth)]
    previous, target, logit_rows = None, [], []
    max_len = math.ceil(len(source) * MAX_LENGTH_FACTOR)
    while len(target) < max_len:
        y = np.zeros((1, dim)) if previous is None else emb[[previous]] * math.sqrt(dim)
        y = y + positions(1, dim, len(target))
        for l in range(1, dec_depth + 1):
            p = f"decoder_l{l}_rnn"
            forget = 1.0 / (1.0 + np.exp(-(y @ w[p + "_Wf"] + w[p + "_bf"])))
            cells[l - 1] = forget * cells[l - 1] + (1.0 - forget) * (y @ w[p + "_W"])
            y = layer_norm(y + np.maximum(cells[l - 1], 0.0), w, p + "_ffn")
            y = attention(w, f"decoder_l{l}_context", y, x, heads)
            y = feed_forward(w, f"decoder_l{l}_ffn", y)
        logits = (y @ emb.T + w["decoder_ff_logit_out_b"])[0]
        if len(logit_rows) < steps:
            logit_rows.append(logits)
        token = int(np.argmax(logits))
        if token == eos:
            break
        target.append(token)
        previous = token
    return target, logit_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("tokenizer")
    parser.add_argument("sentences", nargs="+")
    parser.add_argument("--logits", help="write the first steps' logits to this .npy file")
    parser.add_argument("--steps", type=int, default=3, help="decoding steps per sentence to write")
    args = parser.parse_args()

    weights, yaml = read_model(args.model)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    eos = tokenizer.token_to_id("</s>")
    result = {"sources": [], "targets": [], "logit_steps": []}
    all_rows = []
    for sentence in args.sentences:
        source = tokenizer.encode(sentence, add_special_tokens=False).ids + [eos]
        target, rows = translate(weights, yaml, source, eos, args.steps)
        result["sources"].append(source)
        result["targets"].append(target)
        result["logit_steps"].append(len(rows))
        all_rows.extend(rows)
    if args.logits:
        np.save(args.logits, np.array(all_rows, dtype=np.float32))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
