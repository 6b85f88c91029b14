//! `edgefold eval`: a packed file's quality against the original model's. The sts, raw, accuracy
//! and anomaly tasks are scored here, and the `llm` and `translate` modules score ppl and bleu.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use edgefold_compressor::datasets::{self, Dataset};
use edgefold_compressor::embed::{PackedEmbedder, ReferenceEmbedder};
use edgefold_compressor::exec::{ExecError, PackedGraph};
use edgefold_compressor::pipeline::{sha256_file, SOURCE_SHA256_KEY};
use edgefold_compressor::reference::ReferenceModel;
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::text::{cosine, read_sts, spearman};
use edgefold_runtime::{MappedFile, Model};

use crate::kind::{check_packed_kind, PackedKind};
use crate::report::{json_float, print_json, print_size};
use crate::{llm, translate};

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    /// The original model (ONNX, GGUF for ppl, a Marian model directory for bleu).
    original: PathBuf,
    /// The packed file (for bleu: a second Marian model directory, or the original again to
    /// run it once).
    file: PathBuf,
    /// Metric: sts (Spearman correlation of cosine similarities with gold scores), raw (cosine
    /// and largest difference of every output against the original's), accuracy (top-1 of the
    /// first output against `labels`), anomaly (correlation of reconstruction errors with the
    /// original's), ppl (perplexity of a language model: a GGUF original and a packed file or
    /// GGUF file) or bleu
    /// (BLEU and chrF of greedy translations with the shortlist against --reference, with
    /// sentences per second and median latency).
    #[arg(long)]
    task: String,
    /// Evaluation data: an STS Benchmark .csv file for sts, a text file for ppl, source
    /// sentences one per line for bleu, an .npz with `inputs` (batch first, and `labels` for
    /// accuracy) for the others.
    #[arg(long)]
    data: PathBuf,
    /// For bleu: reference translations, one per line of --data.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Evaluate only the first N pairs, samples or sentences (for ppl: tokens, default 8192).
    #[arg(long)]
    limit: Option<usize>,
    /// Tokens per perplexity window; windows do not overlap.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Threads for the matrix products of ppl.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// For sts, ppl and bleu: quantize the inputs of the second model's matrix products to int8
    /// where the runtime has an integer kernel, as `run`, `bench`, `generate` and `translate`
    /// do with --int8-activations (for ppl: packed files only).
    #[arg(long)]
    int8_activations: bool,
    /// For ppl: weight storage of a GGUF second model (f32, int8, int4 or int4-sym); bytes are
    /// then those of the stored weights. A packed file keeps the storage it was written with.
    #[arg(long, default_value = "f32", value_parser = llm::parse_weight_kind)]
    weights: edgefold_compressor::llm::WeightKind,
    /// Tokenizer to use instead of the one embedded in the file.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Output to use as the embedding.
    #[arg(long)]
    output: Option<String>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Compares the sha256 of `original` with the `source.sha256` that `compress` stored in the packed
/// `file`, and warns on stderr when they differ. A Marian model directory is read as the model
/// file in it, on either side. Returns `None` when there is nothing to compare: `file` is no
/// packed file with that key (a GGUF file, a Marian model, or one that fails to open, whose error
/// the evaluation reports), or `original` cannot be read.
fn check_source_matches(original: &Path, file: &Path) -> Option<bool> {
    let original = translate::model_file_of(original)?;
    let file = translate::model_file_of(file)?;
    let (original, file) = (original.as_path(), file.as_path());
    // NOTE: costs a full read of both files (sha256 of `original`, weight checksum of `file`).
    let map = MappedFile::open(file).ok()?;
    let model = Model::open(map.bytes()).ok()?;
    let stored = std::str::from_utf8(model.metadata(SOURCE_SHA256_KEY)?).ok()?.trim().to_owned();
    let (actual, _) = sha256_file(original).ok()?;
    let matches = stored.eq_ignore_ascii_case(&actual);
    if !matches {
        log::warn!(
            "{} was not compressed from {}: it stores the source sha256 {stored}, but {} has \
             sha256 {actual}; pass the model that {} was compressed from, or the scores compare \
             two different models",
            file.display(),
            original.display(),
            original.display(),
            file.display()
        );
    }
    Some(matches)
}

/// Checks that the packed files among `args.original` and `args.file` contain the kind of model
/// that `args.task` scores, before anything else reads them.
fn check_eval_kinds(args: &EvalArgs) -> Result<()> {
    let graphs = [PackedKind::Graph, PackedKind::SentenceEncoder];
    let (accepted, expected): (&[PackedKind], &str) = match args.task.as_str() {
        "sts" => (&graphs, "a sentence encoder"),
        "raw" | "accuracy" | "anomaly" => (&graphs, "a graph"),
        "ppl" => (&[PackedKind::LanguageModel], "a language model"),
        "bleu" => (&[PackedKind::Translator], "a translation model"),
        _ => return Ok(()),
    };
    let original = translate::model_file_of(&args.original).unwrap_or(args.original.clone());
    let file = translate::model_file_of(&args.file).unwrap_or(args.file.clone());
    if accepted == graphs.as_slice() {
        // tract runs the original of a graph, so it cannot be a packed file.
        if edgefold_compressor::onnx::is_packed_file(&original) {
            bail!(
                "{} is a packed file, but --task {} runs the original ONNX model with tract; \
                 give the ONNX model first and the packed file second",
                original.display(),
                args.task
            );
        }
    } else {
        check_packed_kind(&original, accepted, expected)?;
    }
    check_packed_kind(&file, accepted, expected)
}

pub(crate) fn cmd_eval(args: EvalArgs) -> Result<()> {
    check_eval_kinds(&args)?;
    let source_matches = check_source_matches(&args.original, &args.file);
    match args.task.as_str() {
        "sts" => {}
        "raw" | "accuracy" | "anomaly" => return eval_tensors(&args, source_matches),
        "ppl" => {
            let options = llm::PerplexityOptions {
                limit: args.limit,
                window: args.window,
                products: llm::Products {
                    threads: args.threads.into(),
                    int8_activations: args.int8_activations,
                },
                weights: args.weights,
                json: args.json,
                source_matches,
            };
            return llm::eval_perplexity(&args.original, &args.file, &args.data, options);
        }
        "bleu" => {
            let options = translate::BleuOptions {
                data: &args.data,
                reference: args.reference.as_deref(),
                limit: args.limit,
                int8_activations: args.int8_activations,
                json: args.json,
                source_matches,
            };
            return translate::eval_bleu(&args.original, &args.file, options);
        }
        other => {
            bail!("--task {other} is not known; use sts, raw, accuracy, anomaly, ppl or bleu")
        }
    }
    let mut pairs = read_sts(&args.data)?;
    let pairs_in_file = pairs.len();
    if let Some(limit) = args.limit {
        pairs.truncate(limit);
    }
    if pairs.len() < 2 {
        match args.limit.filter(|&limit| limit < pairs_in_file) {
            Some(limit) => bail!(
                "--limit {limit} leaves fewer than 2 pairs of {}; Spearman correlation needs at \
                 least 2",
                args.data.display()
            ),
            None => bail!(
                "{} has fewer than 2 pairs; Spearman correlation needs at least 2",
                args.data.display()
            ),
        }
    }
    let mut packed =
        PackedEmbedder::open(&args.file, args.tokenizer.as_deref(), args.output.as_deref())?;
    packed.set_int8_activations(args.int8_activations);
    let reference =
        ReferenceEmbedder::load(&args.original, args.output.as_deref(), packed.encoder())?;
    let bar = ProgressBar::new(pairs.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {eta}").expect("valid template"),
    );
    bar.set_message("sts");
    let (mut gold, mut ours, mut theirs, mut agreement) = (vec![], vec![], vec![], vec![]);
    let (mut t_ours, mut t_theirs) = (0f64, 0f64);
    for pair in &pairs {
        let mut e_ours = Vec::new();
        let mut e_theirs = Vec::new();
        for s in [&pair.sentence1, &pair.sentence2] {
            let t = Instant::now();
            e_ours.push(packed.embed(s)?);
            t_ours += t.elapsed().as_secs_f64();
            let encoded = packed.encoder().encode(s)?;
            let t = Instant::now();
            e_theirs.push(reference.embed(&encoded)?);
            t_theirs += t.elapsed().as_secs_f64();
        }
        gold.push(pair.score);
        ours.push(cosine(&e_ours[0], &e_ours[1]));
        theirs.push(cosine(&e_theirs[0], &e_theirs[1]));
        agreement.push(cosine(&e_ours[0], &e_theirs[0]));
        agreement.push(cosine(&e_ours[1], &e_theirs[1]));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let original = spearman(&theirs, &gold);
    let compressed = spearman(&ours, &gold);
    let retained = compressed / original;
    let mean_agreement = agreement.iter().sum::<f64>() / agreement.len() as f64;
    let min_agreement = agreement.iter().copied().fold(f64::INFINITY, min_or_nan);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (original_bytes, packed_bytes) = (size(&args.original), size(&args.file));
    if args.json {
        print_json(&json!({
            "task": "sts",
            "source_matches": source_matches,
            "pairs": pairs.len(),
            "original": json_float(original),
            "compressed": json_float(compressed),
            "retained": json_float(retained),
            "embedding_cosine_mean": json_float(mean_agreement),
            "embedding_cosine_min": json_float(min_agreement),
            "original_bytes": original_bytes,
            "compressed_bytes": packed_bytes,
            "size_ratio": packed_bytes as f64 / original_bytes.max(1) as f64,
            "seconds_original": t_theirs,
            "seconds_compressed": t_ours,
        }));
    } else {
        println!("STS Spearman over {} pairs: original {original:.4}, compressed {compressed:.4}, retained {:.2} %", pairs.len(), 100.0 * retained);
        println!(
            "embedding cosine to the original: mean {mean_agreement:.5}, min {min_agreement:.5}"
        );
        print_size(original_bytes, packed_bytes);
    }
    Ok(())
}

/// Returns the smaller of `a` and `b`, or NaN when either is NaN (`f64::min` ignores NaN).
fn min_or_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

/// Returns the larger of `a` and `b`, or NaN when either is NaN (`f64::max` ignores NaN).
fn max_or_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Checks that every label in `labels`, read from `data`, is a class index below `classes`.
fn check_labels(data: &Path, labels: &[i64], classes: usize) -> Result<()> {
    if classes == 0 {
        bail!("the original model's first output is empty, so it has no classes to score");
    }
    let outside =
        |&(_, &label): &(usize, &i64)| usize::try_from(label).map_or(true, |l| l >= classes);
    if let Some((sample, label)) = labels.iter().enumerate().find(outside) {
        bail!(
            "{} has the label {label} for sample {sample}, outside the class range 0 to {} of \
             the model's first output",
            data.display(),
            classes - 1
        );
    }
    Ok(())
}

/// `edgefold eval` for the tasks scored on tensor outputs: the original ONNX model runs through
/// tract, the packed file through the runtime, on the same samples.
fn eval_tensors(args: &EvalArgs, source_matches: Option<bool>) -> Result<()> {
    use edgefold_compressor::metrics::{error_correlation, reconstruction_errors, top1_accuracy};

    let Dataset::Tensors { mut inputs, labels } = datasets::load(&args.data)? else {
        bail!("--task {} needs an .npz file with an `inputs` array as --data", args.task);
    };
    if let Some(limit) = args.limit {
        inputs.truncate(limit);
    }
    if inputs.is_empty() {
        bail!("{} has no samples", args.data.display());
    }
    let samples: Vec<Vec<HostTensor>> = inputs.into_iter().map(|t| vec![t]).collect();
    // The error names the file already.
    let reference = ReferenceModel::load(&args.original)?;
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut packed = match PackedGraph::load(&bytes, &args.file) {
        Ok(packed) => packed,
        // The allocation error names the file already.
        Err(ExecError::Arena(e)) => return Err(e.into()),
        Err(e) => {
            let context = format!("{} is not a valid packed file", args.file.display());
            return Err(anyhow::Error::new(e).context(context));
        }
    };
    let bar = ProgressBar::new(samples.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {eta}").expect("valid template"),
    );
    bar.set_message(args.task.clone());
    let (mut theirs, mut ours) = (Vec::new(), Vec::new());
    let (mut t_ours, mut t_theirs) = (0f64, 0f64);
    for (i, s) in samples.iter().enumerate() {
        let t = Instant::now();
        theirs.push(reference.run(s).with_context(|| format!("tract fails on sample {i}"))?);
        t_theirs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        ours.push(packed.run(s).with_context(|| format!("the runtime fails on sample {i}"))?);
        t_ours += t.elapsed().as_secs_f64();
        bar.inc(1);
    }
    bar.finish_and_clear();

    let (mut cos_sum, mut cos_min, mut max_abs, mut count) = (0f64, f64::INFINITY, 0f64, 0usize);
    for (a, b) in ours.iter().zip(&theirs) {
        for (x, y) in a.iter().zip(b) {
            if let (Some(x), Some(y)) = (x.as_f32(), y.as_f32()) {
                let c = cosine(x, y);
                cos_sum += c;
                cos_min = min_or_nan(cos_min, c);
                count += 1;
                for (p, q) in x.iter().zip(y) {
                    max_abs = max_or_nan(max_abs, (p - q).abs() as f64);
                }
            }
        }
    }
    let cos_mean = cos_sum / count.max(1) as f64;
    let first = |outs: &[Vec<HostTensor>]| -> Vec<Vec<f32>> {
        outs.iter()
            .map(|o| o.first().and_then(HostTensor::as_f32).unwrap_or(&[]).to_vec())
            .collect()
    };
    let (original, compressed, unit) = match args.task.as_str() {
        "accuracy" => {
            let labels = labels.with_context(|| {
                format!("{} has no `labels` array for --task accuracy", args.data.display())
            })?;
            let labels = &labels[..samples.len()];
            let (a, b) = (first(&theirs), first(&ours));
            let classes = a.first().map_or(0, Vec::len);
            check_labels(&args.data, labels, classes)?;
            let score = |v: &[Vec<f32>]| {
                top1_accuracy(&v.iter().map(Vec::as_slice).collect::<Vec<_>>(), labels)
            };
            (score(&a), score(&b), "top-1 accuracy")
        }
        "anomaly" => {
            if samples.len() < 2 {
                bail!("--task anomaly correlates errors over samples; give at least 2");
            }
            let e_theirs = reconstruction_errors(&samples, &theirs).map_err(anyhow::Error::msg)?;
            let e_ours = reconstruction_errors(&samples, &ours).map_err(anyhow::Error::msg)?;
            log::debug!("reconstruction errors: original {e_theirs:?}, compressed {e_ours:?}");
            (1.0, error_correlation(&e_theirs, &e_ours), "reconstruction error correlation")
        }
        _ => (1.0, cos_mean, "mean output cosine"),
    };
    let retained = if original != 0.0 { compressed / original } else { f64::NAN };
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (original_bytes, packed_bytes) = (size(&args.original), size(&args.file));
    if args.json {
        print_json(&json!({
            "task": args.task,
            "source_matches": source_matches,
            "samples": samples.len(),
            "original": json_float(original),
            "compressed": json_float(compressed),
            "retained": json_float(retained),
            "output_cosine_mean": json_float(cos_mean),
            "output_cosine_min": json_float(cos_min),
            "output_max_abs_diff": json_float(max_abs),
            "original_bytes": original_bytes,
            "compressed_bytes": packed_bytes,
            "size_ratio": packed_bytes as f64 / original_bytes.max(1) as f64,
            "seconds_original": t_theirs,
            "seconds_compressed": t_ours,
        }));
    } else {
        println!(
            "{unit} over {} samples: original {original:.4}, compressed {compressed:.4}, \
             retained {:.2} %",
            samples.len(),
            100.0 * retained
        );
        println!(
            "outputs against the original: cosine mean {cos_mean:.5}, min {cos_min:.5}, \
             largest difference {max_abs:.3e}"
        );
        print_size(original_bytes, packed_bytes);
    }
    Ok(())
}
