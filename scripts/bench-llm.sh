#!/usr/bin/env bash
# Compares language model speed side by side: `edgefold generate` on the host (f32, int8 and int4
# weights) and on the packed int4 file that `edgefold compress` writes (with f32 and with int8
# activations), and llama.cpp on the same GGUF file, with 1 and 2 threads. The prompt is the first 128 tokens of the text; 64 tokens are
# generated greedily.
#
# llama.cpp runs through llama-cpp-python, or through its own llama-bench when LLAMA_BENCH names
# that binary (built from llama.cpp's source with cmake); llama-bench times a prompt of 128
# tokens and 64 generated tokens, each from an empty context.
#
# Usage: [LLAMA_BENCH=path/to/llama-bench] scripts/bench-llm.sh [MODEL.gguf] [TEXT]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${1:-$root/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
text="${2:-$root/../shared/data/lm/wikitext2_valid.txt}"
edgefold="${CARGO_TARGET_DIR:-$root/target}/release/edgefold"
if [ ! -x "$edgefold" ]; then
    echo "error: $edgefold is missing; run cargo build --release -p edgefold-compressor" >&2
    exit 1
fi

# The first 128 tokens of the text, as edgefold's tokenizer splits it.
prompt="$(python3 - "$model" "$text" <<'PY'
import sys
from gguf import GGUFReader
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
r = GGUFReader(sys.argv[1])
f = r.fields
tokens = f["tokenizer.ggml.tokens"].contents()
merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
t = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges))
t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)])
t.decoder = decoders.ByteLevel()
ids = t.encode(open(sys.argv[2], encoding="utf-8").read()[:4000]).ids[:128]
print(t.decode(ids), end="")
PY
)"

packed="$(mktemp -d)/model-int4.fold"
trap 'rm -rf "$(dirname "$packed")"' EXIT
"$edgefold" compress "$model" -o "$packed" --quantize int4 --max-seq 512 > /dev/null

echo "| engine | weights | threads | prompt tokens | prompt tokens/s | generation tokens/s |"
echo "|---|---|---:|---:|---:|---:|"
for threads in 1 2; do
    for weights in f32 int8 int4; do
        "$edgefold" generate "$model" --prompt "$prompt" --max-tokens 64 --weights "$weights" \
            --threads "$threads" --json \
            | python3 "$root/scripts/llm_row.py" "edgefold (host)" "$weights" "$threads"
    done
    "$edgefold" generate "$packed" --prompt "$prompt" --max-tokens 64 --threads "$threads" --json \
        | python3 "$root/scripts/llm_row.py" "edgefold (packed)" "int4" "$threads"
    "$edgefold" generate "$packed" --prompt "$prompt" --max-tokens 64 --threads "$threads" \
        --int8-activations --json \
        | python3 "$root/scripts/llm_row.py" "edgefold (packed)" "int4, int8 activations" "$threads"
    if [ -n "${LLAMA_BENCH:-}" ]; then
        "$LLAMA_BENCH" -m "$model" -p 128 -n 64 -t "$threads" -r 3 -o json \
            | python3 "$root/scripts/llm_row.py" --llama-bench "llama.cpp" "Q4_1 (file)" "$threads"
    else
        python3 "$root/scripts/bench_llamacpp.py" "$model" "$text" --threads "$threads" --no-ppl \
            | python3 "$root/scripts/llm_row.py" "llama.cpp" "Q4_1 (file)" "$threads"
    fi
done
