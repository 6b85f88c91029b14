#!/usr/bin/env python3
"""Writes small seed files for the fuzz targets that read GGUF and Marian files.

Usage:
  fuzz_seeds.py gguf OUT_DIR FILE.gguf...
  fuzz_seeds.py marian OUT_DIR [MODEL.bin...]
  fuzz_seeds.py shortlist OUT_DIR [LEX.s2t.bin...]

`gguf` copies each file and writes a copy with no tensors, whose header and metadata end the
file, so that the fuzzer reaches the tokenizer without dequantizing weights first.

`marian` writes tiny.bin, a synthetic model of one encoder and one decoder layer that
`MarianModel::from_file` builds. For each real model it also writes a shrunk copy with the same
tensor names, types and embedded YAML, but with the width, feed-forward width and vocabulary cut
to a few values, so that it still builds.

`shortlist` writes tiny.s2t.bin, a synthetic shortlist of 16 source ids. For each real shortlist
it also writes a copy cut to the lists of its first 32 source ids.

Only the standard library is used. Layouts follow compressor/src/gguf/mod.rs,
compressor/src/marian/file.rs and compressor/src/marian/shortlist.rs.
"""

import os
import random
import re
import struct
import sys

# Marian type codes.
FLOAT32, INT8, INTGEMM8 = 0x404, 0x101, 0x4101

# Sizes of the synthetic model: width, attention heads, feed-forward width and vocabulary. The
# shrunk models take the last two as well.
DIM, HEADS, FFN_DIM, VOCAB = 8, 2, 16, 8

SHORTLIST_MAGIC = 0xF11A48D5013417F5
SHORTLIST_SOURCES = 32

rng = random.Random(5)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    print(f"{path}: {len(data)} bytes")


def out_name(out_dir, source, suffix):
    stem = os.path.basename(source).rsplit(".", 1)[0]
    return os.path.join(out_dir, f"{stem}{suffix}")


# GGUF: the byte size of each fixed-size metadata value type.
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def skip_gguf_value(data, pos, kind):
    """Returns the offset just past a metadata value of type `kind` that starts at `pos`."""
    if kind in GGUF_SCALAR_BYTES:
        return pos + GGUF_SCALAR_BYTES[kind]
    if kind == 8:
        (length,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + length
    if kind == 9:
        item_kind, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(count):
            pos = skip_gguf_value(data, pos, item_kind)
        return pos
    raise ValueError(f"unknown GGUF metadata value type {kind} at byte {pos}")


def gguf_seeds(out_dir, files):
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        write(out_name(out_dir, path, ".gguf"), data)

        magic, _version, _tensors, kv_count = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        pos = 24
        for _ in range(kv_count):
            (key_len,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + key_len
            (kind,) = struct.unpack_from("<I", data, pos)
            pos = skip_gguf_value(data, pos + 4, kind)
        # The tensor count (bytes 8 to 16) becomes zero, and the tensor table and data are dropped.
        metadata_only = data[:8] + struct.pack("<Q", 0) + data[16:pos]
        write(out_name(out_dir, path, "-metadata.gguf"), metadata_only)


def marian_bytes(tensors):
    """Lays out (name, type code, shape, data) tensors as Marian writes them."""
    out = bytearray(struct.pack("<QQ", 1, len(tensors)))
    for name, code, shape, data in tensors:
        out += struct.pack("<QQQQ", len(name) + 1, code, len(shape), len(data))
    for name, _, _, _ in tensors:
        out += name.encode() + b"\0"
    for _, _, shape, _ in tensors:
        out += struct.pack(f"<{len(shape)}i", *shape)
    # Marian pads so that the data starts at a multiple of 256 bytes.
    padding = -(len(out) + 8) % 256
    out += struct.pack("<Q", padding) + bytes(padding)
    for _, _, _, data in tensors:
        out += data
    return bytes(out)


def tensor_data(code, shape, name):
    elements = 1
    for d in shape:
        elements *= d
    if code == FLOAT32:
        # Layer normalization scales near 1, everything else near 0.
        center = 1.0 if name.endswith("_ln_scale") else 0.0
        values = [center + rng.uniform(-0.5, 0.5) for _ in range(elements)]
        return struct.pack(f"<{elements}f", *values)
    if code == INTGEMM8:
        values = [rng.randint(-127, 127) for _ in range(elements)]
        return struct.pack(f"<{elements}b", *values) + struct.pack("<f", 64.0)
    # Other types: any bytes of the element size that the type code's low byte gives.
    return bytes(rng.randrange(256) for _ in range(elements * (code & 0xFF)))


def yaml_tensor(text):
    data = text.encode() + b"\0"
    return ("special:model.yml", INT8, [len(data)], data)


def synthetic_model():
    config = "\n".join(
        [
            "type: transformer",
            "dim-emb: %d" % DIM,
            "dim-vocabs:",
            "  - %d" % VOCAB,
            "  - %d" % VOCAB,
            "enc-depth: 1",
            "dec-depth: 1",
            "dec-cell: ssru",
            "tied-embeddings-all: true",
            "transformer-decoder-autoreg: rnn",
            "transformer-dim-ffn: %d" % FFN_DIM,
            "transformer-ffn-activation: relu",
            "transformer-ffn-depth: 2",
            "transformer-heads: %d" % HEADS,
            "transformer-postprocess: dan",
            "transformer-postprocess-emb: d",
            'transformer-preprocess: ""',
            "transformer-train-position-embeddings: false",
            "",
        ]
    )
    layout = [("Wemb", INTGEMM8, [VOCAB, DIM]), ("decoder_ff_logit_out_b", FLOAT32, [1, VOCAB])]

    def linear(prefix, weight, bias, inputs, outputs):
        layout.append((f"{prefix}_{weight}", INTGEMM8, [inputs, outputs]))
        if bias:
            layout.append((f"{prefix}_{bias}", FLOAT32, [1, outputs]))

    def norm(prefix):
        layout.append((f"{prefix}_ln_scale", FLOAT32, [1, DIM]))
        layout.append((f"{prefix}_ln_bias", FLOAT32, [1, DIM]))

    def attention(prefix):
        for w in "qkvo":
            linear(prefix, f"W{w}", f"b{w}", DIM, DIM)
        norm(f"{prefix}_Wo")

    def ffn(prefix):
        linear(prefix, "W1", "b1", DIM, FFN_DIM)
        linear(prefix, "W2", "b2", FFN_DIM, DIM)
        norm(f"{prefix}_ffn")

    attention("encoder_l1_self")
    ffn("encoder_l1_ffn")
    linear("decoder_l1_rnn", "W", None, DIM, DIM)
    linear("decoder_l1_rnn", "Wf", "bf", DIM, DIM)
    norm("decoder_l1_rnn_ffn")
    attention("decoder_l1_context")
    ffn("decoder_l1_ffn")

    tensors = [(n, c, s, tensor_data(c, s, n)) for n, c, s in layout]
    return marian_bytes(tensors + [yaml_tensor(config)])


def read_marian(data):
    """Returns the (name, type code, shape, data) tensors of a Marian model file."""
    version, count = struct.unpack_from("<QQ", data, 0)
    if version != 1:
        raise ValueError(f"format version {version} is not 1")
    pos = 16
    headers = []
    for _ in range(count):
        headers.append(struct.unpack_from("<QQQQ", data, pos))
        pos += 32
    names = []
    for name_len, _, _, _ in headers:
        names.append(data[pos : pos + name_len].split(b"\0")[0].decode())
        pos += name_len
    shapes = []
    for _, _, rank, _ in headers:
        shapes.append(list(struct.unpack_from(f"<{rank}i", data, pos)))
        pos += 4 * rank
    (padding,) = struct.unpack_from("<Q", data, pos)
    pos += 8 + padding
    tensors = []
    for (_, code, _, data_len), name, shape in zip(headers, names, shapes):
        tensors.append((name, code, shape, data[pos : pos + data_len]))
        pos += data_len
    return tensors


def yaml_number(text, key):
    match = re.search(rf"^{re.escape(key)}: *(\d+) *$", text, re.MULTILINE)
    if not match:
        raise ValueError(f"the configuration has no number for `{key}`")
    return int(match.group(1))


def shrunk_model(data):
    tensors = read_marian(data)
    config = next(t for t in tensors if t[0] == "special:model.yml")
    text = config[3].split(b"\0")[0].decode()
    dim = yaml_number(text, "dim-emb")
    ffn_dim = yaml_number(text, "transformer-dim-ffn")
    heads = yaml_number(text, "transformer-heads")
    vocab = next(t for t in tensors if t[0] == "Wemb")[2][0]
    if len({dim, ffn_dim, vocab}) != 3:
        raise ValueError(f"width {dim}, feed-forward width {ffn_dim} and vocabulary {vocab} "
                         "must differ to be told apart in shapes")
    # The real head count is kept, so the shrunk width is a multiple of it: two values per head.
    small_dim = heads * 2
    sizes = {dim: small_dim, ffn_dim: FFN_DIM, vocab: VOCAB}
    text = re.sub(r"^dim-emb: *\d+", f"dim-emb: {small_dim}", text, flags=re.MULTILINE)
    text = re.sub(r"^transformer-dim-ffn: *\d+", f"transformer-dim-ffn: {FFN_DIM}", text,
                  flags=re.MULTILINE)
    text = re.sub(rf"^( +- *){vocab} *$", rf"\g<1>{VOCAB}", text, flags=re.MULTILINE)

    out = []
    for name, code, shape, _ in tensors:
        if name == "special:model.yml":
            out.append(yaml_tensor(text))
            continue
        small = [sizes.get(d, d) for d in shape]
        out.append((name, code, small, tensor_data(code, small, name)))
    return marian_bytes(out)


def marian_seeds(out_dir, files):
    write(os.path.join(out_dir, "tiny.bin"), synthetic_model())
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        write(out_name(out_dir, path, "-shrunk.bin"), shrunk_model(data))


def shortlist_bytes(first, best, offsets, entries):
    header = struct.pack("<6Q", SHORTLIST_MAGIC, 0, first, best, len(offsets), len(entries))
    return header + struct.pack(f"<{len(offsets)}Q", *offsets) + struct.pack(
        f"<{len(entries)}I", *entries
    )


def synthetic_shortlist():
    offsets, entries = [0], []
    for source in range(16):
        entries += sorted(rng.sample(range(64), source % 4))
        offsets.append(len(entries))
    return shortlist_bytes(4, 3, offsets, entries)


def cut_shortlist(data):
    magic, _checksum, first, best, offset_count, _ = struct.unpack_from("<6Q", data, 0)
    if magic != SHORTLIST_MAGIC:
        raise ValueError(f"magic {magic:#x} is not {SHORTLIST_MAGIC:#x}")
    sources = min(SHORTLIST_SOURCES, offset_count - 1)
    offsets = list(struct.unpack_from(f"<{sources + 1}Q", data, 48))
    entries_at = 48 + 8 * offset_count
    entries = list(struct.unpack_from(f"<{offsets[-1]}I", data, entries_at))
    return shortlist_bytes(first, best, offsets, entries)


def shortlist_seeds(out_dir, files):
    write(os.path.join(out_dir, "tiny.s2t.bin"), synthetic_shortlist())
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        write(out_name(out_dir, path, "-cut.bin"), cut_shortlist(data))


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("gguf", "marian", "shortlist"):
        sys.exit(__doc__)
    kind, out_dir, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(out_dir, exist_ok=True)
    {"gguf": gguf_seeds, "marian": marian_seeds, "shortlist": shortlist_seeds}[kind](
        out_dir, files
    )


if __name__ == "__main__":
    main()
