//! Quality of compressed sentence encoders against their originals on STS Benchmark dev pairs.

use std::path::{Path, PathBuf};

use edgefold_compressor::embed::{PackedEmbedder, ReferenceEmbedder};
use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::{compress, CompressOptions};
use edgefold_compressor::quantize::{LowRank, Quantize};
use edgefold_compressor::testdata::skip;
use edgefold_compressor::text::{cosine, read_sts, spearman};
use edgefold_compressor::writer::write_atomic;

const PAIRS: usize = 200;

fn existing(path: PathBuf, how: &str) -> Option<PathBuf> {
    if path.exists() {
        Some(path)
    } else {
        skip(&format!("{} is absent ({how})", path.display()));
        None
    }
}

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Returns (original Spearman, compressed Spearman, size ratio) over the first pairs of sts-dev.
fn measure(model: &Path, quantize: Quantize, tokenizer: &Path, sts: &Path) -> (f64, f64, f64) {
    let (original, compressed, ratio, _) = measure_with(model, quantize, tokenizer, sts, false);
    (original, compressed, ratio)
}

/// [`measure`], the packed file run with or without int8 activations, also returning the
/// smallest cosine similarity between a packed embedding and the original's.
fn measure_with(
    model: &Path,
    quantize: Quantize,
    tokenizer: &Path,
    sts: &Path,
    int8_activations: bool,
) -> (f64, f64, f64, f64) {
    let options = CompressOptions {
        quantize,
        low_rank: LowRank::Off,
        import: ImportOptions { max_batch: 1, max_seq: 128 },
        tokenizer: Some(tokenizer.to_owned()),
    };
    let (bytes, report) = compress(model, &options).unwrap();
    let dir = std::env::temp_dir().join(format!("edgefold-quality-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{quantize}-{int8_activations}.fold"));
    write_atomic(&out, &bytes).unwrap();

    let mut packed = PackedEmbedder::open(&out, None, None).unwrap();
    packed.set_int8_activations(int8_activations);
    let reference = ReferenceEmbedder::load(model, None, packed.encoder()).unwrap();
    let pairs = read_sts(sts).unwrap();
    let (mut gold, mut ours, mut theirs) = (vec![], vec![], vec![]);
    let mut agreement = f64::INFINITY;
    for pair in pairs.iter().take(PAIRS) {
        let a = packed.embed(&pair.sentence1).unwrap();
        let b = packed.embed(&pair.sentence2).unwrap();
        let ea = packed.encoder().encode(&pair.sentence1).unwrap();
        let eb = packed.encoder().encode(&pair.sentence2).unwrap();
        let (ra, rb) = (reference.embed(&ea).unwrap(), reference.embed(&eb).unwrap());
        gold.push(pair.score);
        ours.push(cosine(&a, &b));
        theirs.push(cosine(&ra, &rb));
        agreement = agreement.min(cosine(&a, &ra)).min(cosine(&b, &rb));
    }
    std::fs::remove_dir_all(&dir).ok();
    let ratio = report.output_bytes as f64 / report.source_bytes as f64;
    (spearman(&theirs, &gold), spearman(&ours, &gold), ratio, agreement)
}

/// The default model, its tokenizer and the STS-B dev file, or `None` (after reporting the skip).
fn default_model_files() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let fetch = "run scripts/fetch-models.sh";
    let model = existing(root().join("models/paraphrase-MiniLM-L3-v2/model.onnx"), fetch)?;
    let tokenizer = existing(root().join("models/paraphrase-MiniLM-L3-v2/tokenizer.json"), fetch)?;
    let sts = existing(root().join("../shared/data/stsb/sts-dev.csv"), "evaluation data")?;
    Some((model, tokenizer, sts))
}

#[test]
fn default_model_int8_keeps_quality() {
    let Some((model, tokenizer, sts)) = default_model_files() else {
        return;
    };
    let (original, compressed, ratio) = measure(&model, Quantize::Int8, &tokenizer, &sts);
    eprintln!("int8: original {original:.4}, compressed {compressed:.4}, size {ratio:.3}");
    assert!(original > 0.7, "the original's Spearman {original} is implausibly low");
    assert!(ratio <= 0.30, "int8 file is {:.1} % of the ONNX file", 100.0 * ratio);
    assert!(
        compressed / original >= 0.99,
        "int8 keeps {:.4} of the Spearman",
        compressed / original
    );
}

/// Int8 weights with int8 activations (integer products where the CPU has them): the Spearman
/// correlation within 1 % of the original's, and every embedding close to the original's.
#[test]
fn default_model_int8_activations_keep_quality() {
    let Some((model, tokenizer, sts)) = default_model_files() else {
        return;
    };
    let (original, compressed, _, agreement) =
        measure_with(&model, Quantize::Int8, &tokenizer, &sts, true);
    eprintln!(
        "int8 activations: original {original:.4}, compressed {compressed:.4}, smallest cosine \
         with the original {agreement:.4}"
    );
    assert!(
        compressed / original >= 0.99,
        "int8 activations keep {:.4} of the Spearman",
        compressed / original
    );
    assert!(agreement >= 0.98, "an embedding has cosine {agreement} with the original's");
}

#[test]
fn default_model_f16_keeps_quality() {
    let Some((model, tokenizer, sts)) = default_model_files() else {
        return;
    };
    let (original, compressed, ratio) = measure(&model, Quantize::F16, &tokenizer, &sts);
    eprintln!("f16: original {original:.4}, compressed {compressed:.4}, size {ratio:.3}");
    assert!(ratio <= 0.52, "f16 file is {:.1} % of the ONNX file", 100.0 * ratio);
    assert!(
        (compressed - original).abs() < 1e-3,
        "f16 moved the Spearman from {original} to {compressed}"
    );
}

#[test]
fn planner_sts_screening_agrees_with_full() {
    use edgefold_compressor::planner::{Evaluator, Task};
    use edgefold_compressor::quantize::quantize;
    use edgefold_compressor::text::TextEncoder;

    let Some((model, tokenizer, sts)) = default_model_files() else {
        return;
    };
    let import = ImportOptions { max_batch: 1, max_seq: 128 };
    let (graph, _) = edgefold_compressor::pipeline::load_graph(&model, &import).unwrap();
    let pairs: Vec<_> = read_sts(&sts).unwrap().into_iter().take(96).collect();
    let task = |pairs: Vec<_>| Task::Sts {
        encoder: TextEncoder::from_file(&tokenizer, 128).unwrap(),
        pairs,
        output: None,
    };
    let screened = Evaluator::with_screening(&graph, task(pairs.clone()), 32).unwrap();
    let full = Evaluator::new(&graph, task(pairs)).unwrap();
    assert_eq!(screened.baseline(), full.baseline(), "both report the full baseline");
    assert!(
        full.baseline() > 0.7,
        "the original's Spearman {} is implausibly low",
        full.baseline()
    );
    // The original scores exactly itself, however the pairs are split among threads.
    assert_eq!(full.quality(&graph).unwrap(), 1.0);
    assert_eq!(screened.quality(&graph).unwrap(), 1.0);

    let mut int8 = graph.clone();
    quantize(&mut int8, Quantize::Int8);
    let on_screen = screened.quality(&int8).unwrap();
    let confirmed = screened.confirmed_quality(&int8, on_screen).unwrap();
    assert_eq!(confirmed, full.quality(&int8).unwrap(), "confirmation scores all pairs");
    assert!((0.98..1.02).contains(&confirmed), "int8 keeps {confirmed}");
}
