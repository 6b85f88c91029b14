#!/usr/bin/env bash
# The main job end to end: fetch the default model (paraphrase-MiniLM-L3-v2), compress it to int8,
# embed two sentences with the packed file, and print the sizes before and after.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/fetch-models.sh paraphrase-MiniLM-L3-v2
cargo build --release -p edgefold-compressor
edgefold="${CARGO_TARGET_DIR:-$root/target}/release/edgefold"
model="models/paraphrase-MiniLM-L3-v2/model.onnx"
out="models/paraphrase-MiniLM-L3-v2.int8.fold"

"$edgefold" compress "$model" -o "$out" --quantize int8
"$edgefold" embed "$out" "A man is playing a guitar." "Someone is playing an instrument."
printf 'size before: %s bytes (%s)\nsize after:  %s bytes (%s)\n' \
    "$(stat -c %s "$model")" "$model" "$(stat -c %s "$out")" "$out"
