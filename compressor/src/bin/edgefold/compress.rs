//! `edgefold compress`: compression with fixed settings, the planner's search (--min-quality,
//! --target-size), block fusion (--fuse-blocks), the embedded self-test, and the hand-off of GGUF
//! and Marian models to their own modules.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use edgefold_compressor::npy::read_npy;
use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::{compress, load_graph, CompressOptions};
use edgefold_compressor::quantize::{LowRank, Quantize};
use edgefold_compressor::selftest::{self, SelfTestError};
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::text::TextEncoder;
use edgefold_compressor::writer::check_output_is_not_input;

use crate::output::{write_output, write_packed};
use crate::report::{
    counted, human_bytes, json_float, parse_at_least_one, print_json, show_stage, spinner,
};
use crate::{llm, marian, translate};

#[derive(clap::Args)]
pub(crate) struct CompressArgs {
    /// The model: ONNX, GGUF for a language model of the Llama architecture, or a Marian
    /// translation model (its folder or its .bin file).
    model: PathBuf,
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
    /// Weight storage: f32, f16, int8 (per output channel) or int4 (groups of 32).
    #[arg(long, default_value = "int8")]
    quantize: Quantize,
    /// Low-rank factorization of linear weights: off, elbow or energy:F.
    #[arg(long, default_value = "off")]
    low_rank: LowRank,
    /// Largest sequence length (every variable axis but the batch); sizes the arena. For a GGUF
    /// language model: the context length, whose key-value cache the arena holds. Default 128,
    /// or 2048 for GGUF models.
    #[arg(long, value_parser = parse_at_least_one)]
    max_seq: Option<u32>,
    /// Largest batch size; sizes the arena.
    #[arg(long, default_value_t = 1, value_parser = parse_at_least_one)]
    max_batch: u32,
    /// Tokenizer to embed (default: tokenizer.json beside the model, if present).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Let the planner pick the smallest model keeping this fraction of the original's quality.
    #[arg(long, conflicts_with = "target_size")]
    min_quality: Option<f64>,
    /// Let the planner pick the best model of at most this size: bytes (suffixes K, M, G) or a
    /// percentage of the input file such as 20%.
    #[arg(long)]
    target_size: Option<String>,
    /// Planner metric: sts (Spearman of embedding similarities), raw (cosine of outputs),
    /// accuracy (top-1 against the `labels` of an .npz) or anomaly (correlation of autoencoder
    /// reconstruction errors with the original's).
    #[arg(long, default_value = "sts")]
    task: String,
    /// Calibration data for the planner: .csv (STS pairs), .txt (sentences) or .npz (inputs).
    /// For GGUF models a text file, whose first 4,096 tokens score the candidates.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Evaluation data for the planner (default: the last fifth of the calibration data).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Calibration samples used (default 256; for a translation model 3,000 sentences, of which
    /// the last third confirms the search's result).
    #[arg(long)]
    samples: Option<usize>,
    /// Reference translations for a translation model's --min-quality search: one line per
    /// line of --calibration.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Evaluation pairs or samples that screen candidates; a candidate that passes is confirmed
    /// on all of the evaluation data.
    #[arg(long, default_value_t = 300)]
    eval_samples: usize,
    /// Write the planner's report (report.json and a size-against-quality plot) into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Remove N blocks by fusing the adjacent pairs whose outputs are most similar on the
    /// --calibration data (LaCo-style parameter merge; the first block of each run keeps its layer
    /// norms), before low-rank and quantization.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["min_quality", "target_size"])]
    fuse_blocks: usize,
    /// Let the planner fuse adjacent blocks first where fusion measures better than dropping them.
    #[arg(long)]
    fuse: bool,
    /// Embed a self-test: a sample input and the outputs this host computes for it, which
    /// `edgefold verify` (or the firmware) checks on the device. The sample is generated unless
    /// --self-test-input gives it.
    #[arg(long)]
    self_test: bool,
    /// The self-test's sample input: one .npy file per graph input, in order (implies
    /// --self-test).
    #[arg(long = "self-test-input")]
    self_test_input: Vec<PathBuf>,
    /// Threads for the matrix products of the planner on GGUF models.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

impl CompressArgs {
    /// Returns the number of calibration samples of a model other than a translation model.
    fn samples(&self) -> usize {
        self.samples.unwrap_or(256)
    }

    /// Returns the files that `compress` reads: the model (for a Marian model directory, the
    /// files in it that it uses), the tokenizer and the data files.
    fn input_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.model.clone()];
        if self.model.is_dir() || marian::is_marian(&self.model) {
            // A model that is not found fails later with its own message.
            if let Ok(found) = translate::find_model_files(&self.model, true) {
                files.extend([found.model, found.tokenizer]);
                files.extend(found.shortlist);
            }
        }
        let beside = self.model.parent().unwrap_or(Path::new("")).join("tokenizer.json");
        files.push(self.tokenizer.clone().unwrap_or(beside));
        files
            .extend(self.calibration.iter().chain(&self.eval_data).chain(&self.reference).cloned());
        files.extend(self.self_test_input.iter().cloned());
        files
    }

    /// Returns the largest sequence length of an ONNX model.
    fn max_seq(&self) -> u32 {
        self.max_seq.unwrap_or(128)
    }
}

/// Rejects an `-o` path that names a directory, which `compress` cannot write a file to.
fn check_output_is_file_path(path: &Path) -> Result<()> {
    let problem = if path.is_dir() {
        "is a directory"
    } else if path.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR) {
        "ends with a path separator, so it names a directory"
    } else {
        return Ok(());
    };
    bail!(
        "-o {} {problem}; -o takes the path of the file to write, such as {}",
        path.display(),
        path.join("model.fold").display()
    )
}

pub(crate) fn cmd_compress(args: CompressArgs) -> Result<()> {
    check_output_is_file_path(&args.output)?;
    let inputs = args.input_files();
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    check_output_is_not_input(&args.output, &inputs)?;
    if args.model.is_dir() || (!llm::is_gguf(&args.model)? && marian::is_marian(&args.model)) {
        return compress_marian(args);
    }
    if llm::is_gguf(&args.model)? {
        return compress_gguf(args);
    }
    if args.min_quality.is_some() || args.target_size.is_some() {
        return cmd_plan(args);
    }
    if args.fuse {
        bail!("--fuse applies to the planner; add --min-quality or --target-size");
    }
    if args.fuse_blocks > 0 {
        return cmd_compress_fused(args);
    }
    if let Some(t) = &args.tokenizer {
        // The tokenizer error names the file.
        TextEncoder::from_file(t, args.max_seq() as usize)
            .context("--tokenizer is not a usable tokenizer.json")?;
    }
    let options = CompressOptions {
        quantize: args.quantize,
        low_rank: args.low_rank,
        import: ImportOptions { max_batch: args.max_batch, max_seq: args.max_seq() },
        tokenizer: args.tokenizer.clone(),
    };
    let started = Instant::now();
    let bar = spinner(&format!("compressing {}", args.model.display()));
    let result = compress(&args.model, &options);
    bar.finish_and_clear();
    let (bytes, mut report) = result?;
    let bytes = with_self_test(&args, bytes)?;
    report.output_bytes = bytes.len() as u64;
    write_packed(&args.output, &bytes)?;
    let seconds = started.elapsed().as_secs_f64();
    let ratio = report.output_bytes as f64 / report.source_bytes.max(1) as f64;
    if args.json {
        print_json(&json!({
            "model": args.model,
            "output": args.output,
            "source_bytes": report.source_bytes,
            "output_bytes": report.output_bytes,
            "ratio": ratio,
            "weight_bytes_before": report.weight_bytes_before,
            "weight_bytes_after": report.weight_bytes_after,
            "arena_bytes": report.arena_bytes,
            "ops": report.ops,
            "quantize": args.quantize.to_string(),
            "low_rank": args.low_rank.to_string(),
            "factorized": report.factorized.iter().map(|f| json!({
                "node": f.node, "rows": f.shape.0, "cols": f.shape.1, "rank": f.rank
            })).collect::<Vec<_>>(),
            "fused": {
                "gelu": report.fused.gelu,
                "layer_norm": report.fused.layer_norm,
                "bias": report.fused.bias,
                "attention": report.fused.attention,
                "activation": report.fused.activation,
            },
            "tokenizer": report.tokenizer,
            "seconds": seconds,
        }));
    } else {
        eprintln!(
            "{} -> {}: {} -> {} ({:.1} % of the original), arena {}, {}, {:.1} s",
            args.model.display(),
            args.output.display(),
            human_bytes(report.source_bytes),
            human_bytes(report.output_bytes),
            100.0 * ratio,
            human_bytes(report.arena_bytes),
            counted(report.ops as u64, "op"),
            seconds
        );
        if args.low_rank != LowRank::Off {
            eprintln!(
                "low-rank ({}): {} matrices factorized",
                args.low_rank,
                report.factorized.len()
            );
        }
    }
    Ok(())
}

/// Adds a self-test record to the packed `bytes` when `--self-test` or `--self-test-input` requests
/// one.
fn with_self_test(args: &CompressArgs, bytes: Vec<u8>) -> Result<Vec<u8>> {
    if !args.self_test && args.self_test_input.is_empty() {
        return Ok(bytes);
    }
    let given = args
        .self_test_input
        .iter()
        // The .npy error names the file.
        .map(|p| read_npy(p).context("cannot read --self-test-input"))
        .collect::<Result<Vec<_>>>()?;
    let inputs = (!given.is_empty()).then_some(given.as_slice());
    let (bytes, embedded) = match selftest::embed(&bytes, &args.output, inputs) {
        Ok(embedded) => embedded,
        // The allocation error names the file already.
        Err(SelfTestError::Arena(e)) => return Err(e.into()),
        Err(e) => {
            let context = format!("cannot embed a self-test in {}", args.output.display());
            return Err(anyhow::Error::new(e).context(context));
        }
    };
    log::info!(
        "embedded a self-test of {} bytes (inputs {:?}, tolerance {:e})",
        embedded.record_bytes,
        embedded.input_shapes,
        embedded.tolerance
    );
    Ok(bytes)
}

/// Parses a size: plain bytes, with a K/M/G suffix (powers of 1000), or a percentage of `reference`.
fn parse_size(text: &str, reference: u64) -> Result<u64> {
    let t = text.trim();
    let invalid = || {
        anyhow::anyhow!("invalid --target-size {text:?}; use bytes (e.g. 20000000 or 20M) or a percentage (e.g. 25%)")
    };
    if let Some(p) = t.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| invalid())?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(invalid());
        }
        return Ok((reference as f64 * p / 100.0) as u64);
    }
    let (number, scale) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1e3),
        Some('M' | 'm') => (&t[..t.len() - 1], 1e6),
        Some('G' | 'g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = number.trim().parse().map_err(|_| invalid())?;
    if v <= 0.0 {
        return Err(invalid());
    }
    Ok((v * scale) as u64)
}

fn cmd_plan(args: CompressArgs) -> Result<()> {
    use edgefold_compressor::calibrate::calibrate;
    use edgefold_compressor::datasets::{self, Dataset};
    use edgefold_compressor::planner::{plan, Evaluator, Goal, Task};

    let started = Instant::now();
    let source_bytes = std::fs::metadata(&args.model)
        .with_context(|| format!("cannot read {}", args.model.display()))?
        .len();
    let goal = match (args.min_quality, &args.target_size) {
        (Some(q), _) if q > 0.0 && q <= 1.0 => Goal::MinQuality(q),
        (Some(q), _) => {
            bail!("--min-quality {q} must be in (0, 1]: it is a fraction of the original's quality")
        }
        (None, Some(t)) => Goal::TargetSize(parse_size(t, source_bytes)?),
        (None, None) => unreachable!("checked by the caller"),
    };
    let calibration_path = args.calibration.as_ref().context(
        "the planner needs --calibration DATA (.csv STS pairs, .txt sentences or .npz inputs)",
    )?;
    let import = ImportOptions { max_batch: args.max_batch, max_seq: args.max_seq() };
    let loading = spinner("");
    show_stage(&loading, &format!("loading {}", args.model.display()));
    let (graph, _) = load_graph(&args.model, &import)?;
    loading.finish_and_clear();
    let input_names: Vec<String> =
        graph.inputs.iter().map(|&v| graph.values[v].name.clone()).collect();
    let tokenizer_path = args
        .tokenizer
        .clone()
        .or_else(|| args.model.parent().map(|d| d.join("tokenizer.json")).filter(|p| p.exists()));

    let calibration_data = datasets::load(calibration_path)?;
    let (calibration_part, held_apart) = match (&calibration_data, &args.eval_data) {
        (_, Some(p)) => (calibration_data.clone(), datasets::load(p)?),
        (Dataset::Pairs(pairs), None) => {
            let cut = pairs.len() * 4 / 5;
            (Dataset::Pairs(pairs[..cut].to_vec()), Dataset::Pairs(pairs[cut..].to_vec()))
        }
        (Dataset::Tensors { inputs, labels }, None) => {
            let cut = inputs.len() * 4 / 5;
            (
                Dataset::Tensors {
                    inputs: inputs[..cut].to_vec(),
                    labels: labels.as_ref().map(|l| l[..cut].to_vec()),
                },
                Dataset::Tensors {
                    inputs: inputs[cut..].to_vec(),
                    labels: labels.as_ref().map(|l| l[cut..].to_vec()),
                },
            )
        }
        (Dataset::Lines(_), None) => {
            bail!("with .txt calibration data, give --eval-data for the planner's evaluation")
        }
    };

    let mut encoder = match &tokenizer_path {
        Some(p) => Some(TextEncoder::from_file(p, args.max_seq() as usize)?),
        None => None,
    };
    let samples: Vec<Vec<HostTensor>> = match &calibration_part {
        Dataset::Tensors { inputs, .. } => {
            inputs.iter().take(args.samples()).map(|t| vec![t.clone()]).collect()
        }
        text => {
            let encoder = encoder
                .as_ref()
                .context("text calibration data needs a tokenizer: pass --tokenizer")?;
            let mut sentences = datasets::sentences(text);
            sentences.dedup();
            sentences.truncate(args.samples());
            datasets::text_samples(encoder, &input_names, &sentences).map_err(anyhow::Error::msg)?
        }
    };
    let bar = ProgressBar::new(samples.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {eta}").expect("valid template"),
    );
    show_stage(&bar, &format!("calibrating on {} samples", samples.len()));
    let calibration = calibrate(&graph, &samples, |i| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    log::info!(
        "calibrated on {} samples, {} linear inputs",
        calibration.samples,
        calibration.inputs.len()
    );

    let task = match (args.task.as_str(), held_apart) {
        ("sts", Dataset::Pairs(pairs)) => {
            let encoder =
                encoder.take().context("--task sts needs a tokenizer: pass --tokenizer")?;
            Task::Sts { encoder, pairs, output: None }
        }
        ("sts", _) => bail!("--task sts needs STS pairs (.csv) as evaluation data"),
        ("raw", Dataset::Tensors { inputs, .. }) => {
            Task::Raw { samples: inputs.into_iter().map(|t| vec![t]).collect() }
        }
        ("raw", text) => {
            let encoder = encoder.as_ref().context("text evaluation data needs a tokenizer")?;
            let sentences = datasets::sentences(&text);
            Task::Raw {
                samples: datasets::text_samples(encoder, &input_names, &sentences)
                    .map_err(anyhow::Error::msg)?,
            }
        }
        ("accuracy", Dataset::Tensors { inputs, labels: Some(labels) }) => {
            Task::Accuracy { samples: inputs.into_iter().map(|t| vec![t]).collect(), labels }
        }
        ("accuracy", _) => {
            bail!("--task accuracy needs an .npz with `inputs` and `labels` as evaluation data")
        }
        ("anomaly", Dataset::Tensors { inputs, .. }) => {
            Task::Anomaly { samples: inputs.into_iter().map(|t| vec![t]).collect() }
        }
        ("anomaly", _) => bail!("--task anomaly needs an .npz with `inputs` as evaluation data"),
        (other, _) => bail!(
            "--task {other} is not supported by the planner; use sts, raw, accuracy or anomaly"
        ),
    };
    let spinner = spinner("");
    show_stage(&spinner, "evaluating the original");
    let evaluator = Evaluator::with_screening(&graph, task, args.eval_samples)?;
    let floor = match goal {
        Goal::MinQuality(q) => q,
        Goal::TargetSize(_) => 0.0,
    };
    let fusion =
        if args.fuse { verified_fusion(&graph, &evaluator, floor, &spinner)? } else { None };
    let (graph, fused) = match fusion {
        Some((fused_graph, run)) => (fused_graph, Some(run)),
        None => (graph, None),
    };
    // Pack the chosen graph with the same metadata as a fixed-settings compression.
    let options = CompressOptions {
        quantize: Quantize::Int8,
        low_rank: LowRank::Off,
        import,
        tokenizer: tokenizer_path.clone(),
    };
    // Metadata (tokenizer, provenance, settings) costs the same in every candidate; it is
    // measured once with the longest settings text so that no candidate's size is understated.
    let longest = "drop 99, linear int4, tables int4, low-rank 0.99";
    let with_metadata =
        edgefold_compressor::pipeline::pack_graph(&args.model, &graph, &options, longest)?.len();
    let arena = edgefold_compressor::plan::plan_arena(&graph);
    let bare = edgefold_compressor::writer::pack(&graph, &arena, &[])?.len();
    let metadata_bytes = with_metadata.saturating_sub(bare) as u64;
    let outcome = plan(&graph, &calibration, &evaluator, goal, metadata_bytes, |m| {
        show_stage(&spinner, m);
        log::debug!("{m}");
    })?;
    spinner.finish_and_clear();

    let bytes = edgefold_compressor::pipeline::pack_graph(
        &args.model,
        &outcome.graph,
        &options,
        &match &fused {
            Some(run) => format!("fuse {run}, {}", outcome.scheme),
            None => format!("{}", outcome.scheme),
        },
    )?;
    let bytes = with_self_test(&args, bytes)?;
    write_packed(&args.output, &bytes)?;
    let seconds = started.elapsed().as_secs_f64();
    let ratio = bytes.len() as f64 / source_bytes.max(1) as f64;
    let summary = json!({
        "model": args.model,
        "output": args.output,
        "source_bytes": source_bytes,
        "output_bytes": bytes.len(),
        "ratio": ratio,
        "scheme": format!("{}", outcome.scheme),
        "fused": fused.map(|run| run.to_string()),
        "quality": json_float(outcome.quality),
        "baseline_metric": json_float(outcome.baseline),
        "drop_order": outcome.drop_order.iter().map(|(b, q)| json!({
            "block": b,
            "quality": json_float(*q),
        })).collect::<Vec<_>>(),
        // A quality that was not measured is null, and a measured NaN is "nan".
        "candidates": outcome.tried.iter().map(|t| json!({
            "scheme": format!("{}", t.scheme),
            "bytes": t.bytes,
            "quality": t.quality.map(json_float),
            "confirmed": t.confirmed.map(json_float),
        })).collect::<Vec<_>>(),
        "seconds": seconds,
    });
    if let Some(dir) = &args.report {
        use edgefold_compressor::plots::{plot_size_quality, Candidate};
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_output(&dir.join("report.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
        let labels: Vec<String> = outcome.tried.iter().map(|t| format!("{}", t.scheme)).collect();
        let points: Vec<Candidate> = outcome
            .tried
            .iter()
            .zip(&labels)
            .filter_map(|(t, label)| {
                t.quality.map(|q| Candidate {
                    label,
                    bytes: t.bytes,
                    quality: q,
                    chosen: t.scheme == outcome.scheme,
                })
            })
            .collect();
        let floor = match goal {
            Goal::MinQuality(q) => Some(q),
            Goal::TargetSize(_) => None,
        };
        plot_size_quality(
            dir,
            "size_quality",
            "Candidates tried: size against retained quality",
            &points,
            floor,
        )?;
        eprintln!("report written to {}", dir.display());
    }
    if args.json {
        print_json(&summary);
    } else {
        eprintln!(
            "{} -> {}: {} -> {} ({:.1} %), quality {:.4} of the original, chosen: {} ({:.0} s)",
            args.model.display(),
            args.output.display(),
            human_bytes(source_bytes),
            human_bytes(bytes.len() as u64),
            100.0 * ratio,
            outcome.quality,
            outcome.scheme,
            seconds
        );
        if !outcome.drop_order.is_empty() {
            eprintln!("verified block removals, greedy order (quality after each, f32 weights):");
        }
        for (b, q) in &outcome.drop_order {
            eprintln!("  block {b}: {q:.4}");
        }
    }
    Ok(())
}

/// Fuses a run of adjacent blocks when fusion beats dropping as many blocks on the planner's
/// evaluation data and keeps at least `floor`. Of several such runs, the one that removes the most
/// blocks wins. The planner then searches from the fused graph.
fn verified_fusion(
    graph: &edgefold_compressor::ir::Graph,
    evaluator: &edgefold_compressor::planner::Evaluator,
    floor: f64,
    spinner: &ProgressBar,
) -> Result<Option<(edgefold_compressor::ir::Graph, edgefold_compressor::fusion::Run)>> {
    use edgefold_compressor::blocks::find_blocks;
    use edgefold_compressor::fusion::{choose_fusion, fuse_run, FuseOptions};

    // The planner removes at most a third of the blocks; fusion gets the same limit.
    let max_merged = (find_blocks(graph).len() / 3).max(1);
    let mut chosen = None;
    for merged in 1..=max_merged {
        let choice = choose_fusion(graph, evaluator, merged, FuseOptions::default(), |m| {
            show_stage(spinner, m);
            log::debug!("{m}");
        })?;
        match choice.winner() {
            Some((run, quality)) if quality >= floor => chosen = Some(run),
            Some((run, quality)) => log::info!("fusing {run} keeps {quality:.4}, under the floor"),
            None => log::info!("fusing {merged} blocks does not beat dropping {merged}"),
        }
    }
    let Some(run) = chosen else { return Ok(None) };
    let mut fused = graph.clone();
    fuse_run(&mut fused, run, FuseOptions::default())?;
    log::info!("fused {run} before the search");
    Ok(Some((fused, run)))
}

/// `compress` on a Marian translation model.
fn compress_marian(args: CompressArgs) -> Result<()> {
    let storage = match args.quantize {
        Quantize::Int8 => marian::MarianStorage::AsStored,
        Quantize::Int4 => marian::MarianStorage::Int4,
        other => bail!(
            "--quantize {other} is not available for translation models; use int8 (the \
             stored int8 matrices) or int4"
        ),
    };
    let unsupported = [
        (args.low_rank != LowRank::Off, "--low-rank"),
        (args.target_size.is_some(), "--target-size"),
        (args.fuse_blocks > 0 || args.fuse, "--fuse-blocks and --fuse"),
        (args.self_test || !args.self_test_input.is_empty(), "--self-test"),
        (args.tokenizer.is_some(), "--tokenizer (the model's tokenizer.json is used)"),
        (args.eval_data.is_some(), "--eval-data (the search scores --calibration)"),
        (args.report.is_some(), "--report"),
    ];
    if let Some((_, option)) = unsupported.iter().find(|(set, _)| *set) {
        bail!("{option} is not available for translation models yet");
    }
    if args.min_quality.is_some() && args.task != "bleu" && args.task != "sts" {
        bail!("--task {} does not apply to translation models; use --task bleu", args.task);
    }
    let options = marian::MarianCompressOptions {
        storage,
        min_quality: args.min_quality,
        calibration: args.calibration.clone(),
        reference: args.reference.clone(),
        samples: args.samples.unwrap_or(3000),
        json: args.json,
    };
    marian::cmd_compress_marian(&args.model, &args.output, options)
}

/// `compress` on a GGUF language model.
fn compress_gguf(args: CompressArgs) -> Result<()> {
    let weights = match args.quantize {
        Quantize::F32 => edgefold_compressor::llm::WeightKind::F32,
        Quantize::Int8 => edgefold_compressor::llm::WeightKind::Int8,
        Quantize::Int4 => edgefold_compressor::llm::WeightKind::Int4Min,
        Quantize::F16 => {
            bail!("--quantize f16 is not available for GGUF models; use f32, int8 or int4")
        }
    };
    let unsupported = [
        (args.low_rank != LowRank::Off, "--low-rank"),
        (args.target_size.is_some(), "--target-size"),
        (args.fuse_blocks > 0 || args.fuse, "--fuse-blocks and --fuse"),
        (args.self_test || !args.self_test_input.is_empty(), "--self-test"),
        (args.tokenizer.is_some(), "--tokenizer (the GGUF file has its own)"),
    ];
    if let Some((_, option)) = unsupported.iter().find(|(set, _)| *set) {
        bail!("{option} is not available for GGUF language models yet");
    }
    let options = llm::GgufCompressOptions {
        weights,
        max_seq: args.max_seq.unwrap_or(2048) as usize,
        min_quality: args.min_quality,
        calibration: args.calibration.clone(),
        calibration_tokens: 4096,
        threads: args.threads.into(),
        json: args.json,
    };
    llm::cmd_compress_gguf(&args.model, &args.output, options)
}

/// `compress --fuse-blocks N`: calibrates, fuses the most similar adjacent pairs, then factorizes,
/// quantizes and packs with the fixed settings.
fn cmd_compress_fused(args: CompressArgs) -> Result<()> {
    use edgefold_compressor::calibrate::calibrate;
    use edgefold_compressor::datasets::{self, Dataset};
    use edgefold_compressor::fusion::{fuse_runs, similar_runs, FuseOptions};
    use edgefold_compressor::pipeline::pack_graph;
    use edgefold_compressor::quantize::{factorize, quantize};

    let started = Instant::now();
    let calibration_path = args.calibration.as_ref().context(
        "--fuse-blocks needs --calibration DATA (.csv STS pairs, .txt sentences or .npz inputs)",
    )?;
    let import = ImportOptions { max_batch: args.max_batch, max_seq: args.max_seq() };
    let (mut graph, _) = load_graph(&args.model, &import)?;
    let tokenizer = args
        .tokenizer
        .clone()
        .or_else(|| args.model.parent().map(|d| d.join("tokenizer.json")).filter(|p| p.exists()));
    let samples: Vec<Vec<HostTensor>> = match datasets::load(calibration_path)? {
        Dataset::Tensors { inputs, .. } => {
            inputs.into_iter().take(args.samples()).map(|t| vec![t]).collect()
        }
        text => {
            let path = tokenizer.as_ref().context("text calibration data needs --tokenizer")?;
            let encoder = TextEncoder::from_file(path, args.max_seq() as usize)?;
            let names: Vec<String> =
                graph.inputs.iter().map(|&v| graph.values[v].name.clone()).collect();
            let mut sentences = datasets::sentences(&text);
            sentences.dedup();
            sentences.truncate(args.samples());
            datasets::text_samples(&encoder, &names, &sentences).map_err(anyhow::Error::msg)?
        }
    };
    let bar = spinner("calibrating");
    let calibration = calibrate(&graph, &samples, |_| {})?;
    bar.finish_and_clear();
    let stats = calibration
        .blocks
        .as_ref()
        .context("no repeated blocks found in the model, so there is nothing to fuse")?;
    if args.fuse_blocks >= stats.blocks.len() {
        bail!(
            "--fuse-blocks {} would leave no block: the model has {} blocks, so use at most {}",
            args.fuse_blocks,
            stats.blocks.len(),
            stats.blocks.len() - 1
        );
    }
    let runs = similar_runs(stats, args.fuse_blocks);
    let fused = fuse_runs(&mut graph, &runs, FuseOptions::default())?;
    let factorized = factorize(&mut graph, args.low_rank)?;
    quantize(&mut graph, args.quantize);

    let names: Vec<String> = runs.iter().map(ToString::to_string).collect();
    let settings = format!(
        "fuse {}, linear {}, low-rank {}",
        names.join(" and "),
        args.quantize,
        args.low_rank
    );
    let options = CompressOptions {
        quantize: args.quantize,
        low_rank: args.low_rank,
        import,
        tokenizer: tokenizer.clone(),
    };
    let bytes = pack_graph(&args.model, &graph, &options, &settings)?;
    let bytes = with_self_test(&args, bytes)?;
    write_packed(&args.output, &bytes)?;
    let source_bytes = std::fs::metadata(&args.model).map_or(0, |m| m.len());
    let ratio = bytes.len() as f64 / source_bytes.max(1) as f64;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        print_json(&json!({
            "model": args.model,
            "output": args.output,
            "source_bytes": source_bytes,
            "output_bytes": bytes.len(),
            "ratio": ratio,
            "fused": fused
                .iter()
                .map(|f| json!({"kept": f.kept, "removed": f.removed}))
                .collect::<Vec<_>>(),
            "quantize": args.quantize.to_string(),
            "low_rank": args.low_rank.to_string(),
            "factorized": factorized.len(),
            "seconds": seconds,
        }));
    } else {
        eprintln!(
            "{} -> {}: {} -> {} ({:.1} % of the original), fused {}, {:.1} s",
            args.model.display(),
            args.output.display(),
            human_bytes(source_bytes),
            human_bytes(bytes.len() as u64),
            100.0 * ratio,
            names.join(" and "),
            seconds
        );
    }
    Ok(())
}
