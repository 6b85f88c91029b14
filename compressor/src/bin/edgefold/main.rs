//! The `edgefold` command line: compress models, inspect and run packed files, evaluate quality.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value as Json};

use edgefold_compressor::datasets::{self, Dataset};
use edgefold_compressor::embed::{PackedEmbedder, ReferenceEmbedder};
use edgefold_compressor::exec::{alloc_arena, PackedGraph};
use edgefold_compressor::npy::{read_npy, write_npy};
use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::{compress, load_graph, CompressOptions};
use edgefold_compressor::quantize::{LowRank, Quantize};
use edgefold_compressor::reference::ReferenceModel;
use edgefold_compressor::selftest;
use edgefold_compressor::spectrum::summarize;
use edgefold_compressor::tensor::{HostTensor, TensorData};
use edgefold_compressor::text::{cosine, read_sts, spearman, TextEncoder};
use edgefold_compressor::writer::check_output_is_not_input;
use edgefold_runtime::format::{Header, Quant, SectionKind, TensorKind};
use edgefold_runtime::{DType, MappedFile, Model, Session};

mod llm;
mod marian;
mod output;
mod translate;

use output::{write_output, write_packed};

/// Compress trained neural networks and run them on devices.
#[derive(Parser)]
#[command(name = "edgefold", version, about)]
struct Cli {
    /// Log more (-v: info, -vv: debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compress a model (ONNX, GGUF or a Marian translation model) into a packed .fold file.
    Compress(CompressArgs),
    /// Show what a packed file contains.
    Inspect {
        /// The packed file.
        file: PathBuf,
        /// List every tensor.
        #[arg(long)]
        tensors: bool,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Measure the redundancy of a model's weight matrices (singular spectra).
    Analyze(AnalyzeArgs),
    /// Run a packed file on inputs read from .npy files.
    Run {
        /// The packed file.
        file: PathBuf,
        /// Input .npy file, one per graph input in order, or NAME=FILE.
        #[arg(long = "input", required = true)]
        inputs: Vec<String>,
        /// Write an output to this .npy file.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Index of the output written by --output.
        #[arg(long, default_value_t = 0)]
        output_index: usize,
        /// Threads for the matrix products.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        threads: u16,
        /// Quantize the inputs of matrix products with int8 weights to int8, one scale per row,
        /// where the CPU has an integer kernel (x86_64 with AVX-512 VNNI, aarch64 with the
        /// dot-product extension).
        #[arg(long)]
        int8_activations: bool,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Embed sentences with a packed sentence encoder and print their similarities.
    Embed {
        /// The packed file.
        file: PathBuf,
        /// Sentences to embed.
        #[arg(required = true)]
        sentences: Vec<String>,
        /// Tokenizer to use instead of the one embedded in the file.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Output to use as the embedding (default: the first [batch, dim] float output).
        #[arg(long)]
        output: Option<String>,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Compare a packed file's quality with the original model's.
    Eval(EvalArgs),
    /// Time loading and inference of a packed text encoder (or of the original ONNX with tract).
    Bench(BenchArgs),
    /// Generate text with a language model (a packed file or a GGUF file), streaming tokens as
    /// they come.
    Generate(llm::GenerateArgs),
    /// Translate sentences read from stdin, one per line, with a Marian model, printing each
    /// translation as soon as it is done.
    Translate(translate::TranslateArgs),
    /// Run the self-test a packed file carries and report whether its outputs match.
    Verify {
        /// The packed file.
        file: PathBuf,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The packed file, or with --engine tract the ONNX model.
    file: PathBuf,
    /// Engine that runs the model: edgefold (the packed file) or tract (an ONNX file).
    #[arg(long, default_value = "edgefold")]
    engine: String,
    /// Sequence length of the synthetic token input.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed runs after the first one.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Threads for the matrix products (edgefold engine only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Quantize the inputs of matrix products with int8 weights to int8, one scale per row,
    /// where the CPU has an integer kernel (edgefold engine only).
    #[arg(long)]
    int8_activations: bool,
    /// Time every op during the timed runs and print the time per kind of op and the slowest ops
    /// (edgefold engine only).
    #[arg(long)]
    profile: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct CompressArgs {
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
    json: bool,
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

#[derive(clap::Args)]
struct AnalyzeArgs {
    /// The model: ONNX, or GGUF for a language model.
    model: PathBuf,
    /// Calibration data (.csv STS pairs, .txt sentences, .npz inputs): adds whitened spectra,
    /// block influence and block similarity. For GGUF models a text file (required), whose
    /// first 16 × --samples tokens are run in windows of 512.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Tokenizer for text calibration data (default: tokenizer.json beside the model).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Calibration samples used.
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// Largest sequence length of the calibration inputs.
    #[arg(long, default_value_t = 128, value_parser = parse_at_least_one)]
    max_seq: u32,
    /// Write report.json and plots (PNG and SVG) into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct EvalArgs {
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
    json: bool,
}

fn main() {
    // Rust ignores SIGPIPE, which turns a closed pipe (`edgefold inspect F | head`) into a panic on
    // the next print; the default action ends the process quietly, as other Unix tools do.
    #[cfg(unix)]
    // SAFETY: `signal` with SIG_DFL installs no handler; it runs before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => exit_with_usage_error(e),
    };
    let as_json = cli.command.prints_json();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
    let result = match cli.command {
        Command::Compress(args) => cmd_compress(args),
        Command::Inspect { file, tensors, json } => cmd_inspect(&file, tensors, json),
        Command::Analyze(args) => cmd_analyze(args),
        Command::Run { file, inputs, output, output_index, threads, int8_activations, json } => {
            let products = llm::Products { threads: threads.into(), int8_activations };
            cmd_run(&file, &inputs, output.as_deref(), output_index, products, json)
        }
        Command::Embed { file, sentences, tokenizer, output, json } => {
            cmd_embed(&file, &sentences, tokenizer.as_deref(), output.as_deref(), json)
        }
        Command::Eval(args) => cmd_eval(args),
        Command::Bench(args) => cmd_bench(args),
        Command::Verify { file, json } => cmd_verify(&file, json),
        Command::Generate(args) => llm::cmd_generate(args),
        Command::Translate(args) => translate::cmd_translate(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        if as_json && e.downcast_ref::<ReportedInJson>().is_none() {
            print_json(&json!({ "error": format!("{e:#}") }));
        }
        std::process::exit(1);
    }
}

/// Prints a command-line parsing error as clap does and exits with clap's status (2 for invalid
/// arguments). When `--json` is among the arguments, stdout also gets `{"error": MESSAGE}`, as
/// for errors that the subcommands return.
fn exit_with_usage_error(error: clap::Error) -> ! {
    use clap::error::ErrorKind;

    let is_help = matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !is_help && std::env::args_os().any(|arg| arg == "--json") {
        let rendered = error.render().to_string();
        // The first paragraph is the message; the rest points to --help.
        let message = rendered.split("\n\n").next().unwrap_or_default();
        print_json(&json!({ "error": message.trim().trim_start_matches("error: ") }));
    }
    error.exit()
}

/// An error whose message the subcommand has already put into the JSON object it printed, so
/// `main` prints no second object.
#[derive(Debug)]
struct ReportedInJson(String);

impl std::fmt::Display for ReportedInJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReportedInJson {}

impl Command {
    /// Returns whether the subcommand was given `--json`, so that its errors go to stdout as JSON
    /// too.
    fn prints_json(&self) -> bool {
        match self {
            Command::Compress(args) => args.json,
            Command::Inspect { json, .. }
            | Command::Run { json, .. }
            | Command::Embed { json, .. }
            | Command::Verify { json, .. } => *json,
            Command::Analyze(args) => args.json,
            Command::Eval(args) => args.json,
            Command::Bench(args) => args.json,
            Command::Generate(args) => args.json,
            Command::Translate(args) => args.json,
        }
    }
}

/// Converts a float for JSON output. serde_json writes a non-finite float as `null`, so infinity
/// and NaN are written as the strings "inf", "-inf" and "nan", which the text output prints too.
fn json_float(value: f64) -> Json {
    if value.is_finite() {
        json!(value)
    } else if value.is_nan() {
        json!("nan")
    } else if value > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

fn print_json(value: &Json) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values always serialize"));
}

/// Prints the original and packed sizes with their ratio, as `eval` reports them.
fn print_size(original_bytes: u64, packed_bytes: u64) {
    println!(
        "size: {} -> {} ({:.1} %)",
        human_bytes(original_bytes),
        human_bytes(packed_bytes),
        100.0 * packed_bytes as f64 / original_bytes.max(1) as f64
    );
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Parses a count such as --max-seq that must be at least 1. clap's error names the option and
/// the value before this message.
fn parse_at_least_one(text: &str) -> std::result::Result<u32, String> {
    let value: u32 =
        text.parse().map_err(|_| format!("expected a whole number from 1 to {}", u32::MAX))?;
    if value == 0 {
        return Err("must be at least 1, because it sizes a dimension of the arena".into());
    }
    Ok(value)
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

/// Shows a stage of long work as the spinner's or bar's message. When stderr is not a terminal,
/// indicatif draws nothing, so the stage is printed as a line on stderr instead, for logs and
/// scripts that read stderr.
fn show_stage(bar: &ProgressBar, message: &str) {
    bar.set_message(message.to_owned());
    if bar.is_hidden() {
        eprintln!("{message}");
    }
}

fn cmd_compress(args: CompressArgs) -> Result<()> {
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
            "{} -> {}: {} -> {} ({:.1} % of the original), arena {}, {} ops, {:.1} s",
            args.model.display(),
            args.output.display(),
            human_bytes(report.source_bytes),
            human_bytes(report.output_bytes),
            100.0 * ratio,
            human_bytes(report.arena_bytes),
            report.ops,
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
    check_arena_fits(&args.output, &bytes)?;
    let (bytes, embedded) = selftest::embed(&bytes, inputs)
        .with_context(|| format!("cannot embed a self-test in {}", args.output.display()))?;
    log::info!(
        "embedded a self-test of {} bytes (inputs {:?}, tolerance {:e})",
        embedded.record_bytes,
        embedded.input_shapes,
        embedded.tolerance
    );
    Ok(bytes)
}

/// Checks that the arena of the packed file `bytes` (to be written to or read from `path`) can be
/// allocated. The self-test allocates it with `vec!`, which aborts the process when the memory
/// is not available. The check writes no byte of the memory it allocates and frees it at once.
fn check_arena_fits(path: &Path, bytes: &[u8]) -> Result<()> {
    let Ok(header) = Header::parse(bytes) else { return Ok(()) };
    let bytes = usize::try_from(header.arena_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(edgefold_runtime::format::SECTION_ALIGN - 1);
    alloc_arena(path, bytes)?;
    Ok(())
}

fn cmd_verify(path: &Path, as_json: bool) -> Result<()> {
    // The map gives the same message as the other subcommands when `path` is a directory.
    let map = open_mapped(path)?;
    let bytes = map.bytes();
    check_arena_fits(path, bytes)?;
    let outcome = selftest::verify(bytes)
        .with_context(|| format!("cannot run the self-test of {}", path.display()))?;
    let passed = outcome.passed();
    let failure = format!("the self-test of {} failed", path.display());
    if as_json {
        let mut report = json!({
            "file": path,
            "passed": passed,
            "max_abs_error": json_float(outcome.max_abs_error.into()),
            "tolerance": outcome.tolerance,
            "outputs": outcome.outputs,
            "elements": outcome.elements,
        });
        if passed {
            print_json(&report);
            return Ok(());
        }
        report["error"] = json!(failure);
        print_json(&report);
        return Err(ReportedInJson(failure).into());
    } else {
        println!(
            "{}: self-test {}: max abs error {:e} over {} elements of {} output{} (tolerance {:e})",
            path.display(),
            if passed { "passed" } else { "FAILED" },
            outcome.max_abs_error,
            outcome.elements,
            outcome.outputs,
            if outcome.outputs == 1 { "" } else { "s" },
            outcome.tolerance
        );
    }
    if !passed {
        bail!(failure);
    }
    Ok(())
}

fn open_mapped(path: &Path) -> Result<MappedFile> {
    MappedFile::open(path).with_context(|| format!("cannot read {}", path.display()))
}

fn dims_string(model: &Model<'_>, dims: &[edgefold_runtime::format::Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d.as_constant() {
            Some(c) => c.to_string(),
            None => {
                let mut s = if d.factor == 1 { String::new() } else { format!("{}*", d.factor) };
                let names: Vec<String> = d
                    .exponents
                    .iter()
                    .enumerate()
                    .filter(|(_, &e)| e > 0)
                    .map(|(i, &e)| {
                        let name = model.symbol(i).map_or("?", |s| s.0);
                        if e == 1 {
                            name.to_owned()
                        } else {
                            format!("{name}^{e}")
                        }
                    })
                    .collect();
                s.push_str(&names.join("*"));
                s
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn storage_name(dtype: DType, quant: Quant) -> String {
    match quant {
        Quant::None => format!("{dtype:?}").to_lowercase(),
        Quant::PerRow => "int8 per row".into(),
        Quant::Grouped => "int4 groups".into(),
        Quant::GroupedMin => "int4 groups with minimums".into(),
    }
}

fn cmd_inspect(path: &Path, list_tensors: bool, as_json: bool) -> Result<()> {
    let map = open_mapped(path)?;
    let model = Model::open(map.bytes())
        .with_context(|| format!("{} is not a valid packed file", path.display()))?;
    let header = model.header();
    let io =
        |count: usize, get: &dyn Fn(usize) -> edgefold_runtime::Result<u32>| -> Result<Vec<Json>> {
            (0..count)
                .map(|i| {
                    let t = model.tensor(get(i)?)?;
                    Ok(json!({
                        "name": model.string(t.name)?,
                        "dtype": format!("{:?}", t.dtype).to_lowercase(),
                        "shape": dims_string(&model, t.shape()),
                    }))
                })
                .collect()
        };
    let inputs = io(model.input_count(), &|i| model.input_tensor(i))?;
    let outputs = io(model.output_count(), &|i| model.output_tensor(i))?;
    let mut storage: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    let mut tensors = Vec::new();
    for i in 0..model.tensor_count() {
        let t = model.tensor(i)?;
        if t.kind == TensorKind::Const {
            let e = storage.entry(storage_name(t.dtype, t.quant)).or_default();
            e.0 += 1;
            e.1 += t.byte_len;
        }
        if list_tensors {
            tensors.push(json!({
                "index": i,
                "name": model.string(t.name)?,
                "kind": if t.kind == TensorKind::Const { "const" } else { "activation" },
                "storage": storage_name(t.dtype, t.quant),
                "shape": dims_string(&model, t.shape()),
                "offset": t.offset,
                "bytes": t.byte_len,
            }));
        }
    }
    let mut op_counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for item in model.ops() {
        let (record, _) = item?;
        *op_counts.entry(record.op.name()).or_default() += 1;
    }
    let symbols: Vec<Json> = (0..model.symbol_count())
        .filter_map(|i| model.symbol(i))
        .map(|(name, max)| json!({"name": name, "max": max}))
        .collect();
    let metadata: serde_json::Map<String, Json> = model
        .metadata_entries()
        .map(|(k, v)| {
            let value = match std::str::from_utf8(v) {
                Ok(s) if v.len() <= 256 => json!(s),
                _ => json!(format!("<{} bytes>", v.len())),
            };
            (k.to_owned(), value)
        })
        .collect();
    let _ = SectionKind::ALL;
    let summary = json!({
        "file": path,
        "version": format!("{}.{}", header.version_major, header.version_minor),
        "file_bytes": header.file_len,
        "weight_bytes": model.weights_len(),
        "arena_bytes": header.arena_bytes,
        "tensors": model.tensor_count(),
        "ops": model.op_count(),
        "symbols": symbols,
        "inputs": inputs,
        "outputs": outputs,
        "storage": storage.iter().map(|(k, (n, b))| json!({"storage": k, "tensors": n, "bytes": b})).collect::<Vec<_>>(),
        "op_counts": op_counts,
        "metadata": metadata,
        "tensor_list": tensors,
    });
    if as_json {
        print_json(&summary);
        return Ok(());
    }
    println!("{} (format {}.{})", path.display(), header.version_major, header.version_minor);
    println!(
        "  file {}  weights {}  arena {}",
        human_bytes(header.file_len),
        human_bytes(model.weights_len() as u64),
        human_bytes(header.arena_bytes)
    );
    for (name, max) in (0..model.symbol_count()).filter_map(|i| model.symbol(i)) {
        println!("  symbol {name} <= {max}");
    }
    for (label, list) in [("input", &summary["inputs"]), ("output", &summary["outputs"])] {
        for v in list.as_array().into_iter().flatten() {
            println!(
                "  {label} {} {} {}",
                v["name"].as_str().unwrap_or(""),
                v["dtype"].as_str().unwrap_or(""),
                v["shape"].as_str().unwrap_or("")
            );
        }
    }
    println!("  constants:");
    for (k, (n, b)) in &storage {
        println!("    {k:<14} {n:>5} tensors {:>12}", human_bytes(*b));
    }
    let ops: Vec<String> = op_counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  ops ({}): {}", model.op_count(), ops.join(", "));
    for (k, v) in &metadata {
        println!("  {k}: {}", v.as_str().unwrap_or(""));
    }
    for t in &tensors {
        println!(
            "  #{:<4} {:<10} {:<14} {:<22} {:>10}  {}",
            t["index"],
            t["kind"].as_str().unwrap_or(""),
            t["storage"].as_str().unwrap_or(""),
            t["shape"].as_str().unwrap_or(""),
            t["bytes"],
            t["name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn cmd_analyze(args: AnalyzeArgs) -> Result<()> {
    if llm::is_gguf(&args.model)? {
        let Some(calibration) = &args.calibration else {
            bail!("analyzing a GGUF model needs --calibration TEXT, a text file to run it on");
        };
        let options = llm::AnalyzeOptions {
            calibration: calibration.clone(),
            tokens: args.samples.max(1) * 16,
            report: args.report.clone(),
            json: args.json,
        };
        return llm::cmd_analyze_gguf(&args.model, options);
    }
    use edgefold_compressor::calibrate::calibrate;
    use edgefold_compressor::datasets::{self, Dataset};
    use edgefold_compressor::spectrum::{elbow_rank, energy_rank};
    use edgefold_compressor::whiten::Whitening;

    let import = ImportOptions { max_batch: 1, max_seq: args.max_seq };
    let (graph, _) = load_graph(&args.model, &import)?;
    let calibration = match &args.calibration {
        None => None,
        Some(path) => {
            let data = datasets::load(path)?;
            let names: Vec<String> =
                graph.inputs.iter().map(|&v| graph.values[v].name.clone()).collect();
            let samples: Vec<Vec<HostTensor>> = match &data {
                Dataset::Tensors { inputs, .. } => {
                    inputs.iter().take(args.samples).map(|t| vec![t.clone()]).collect()
                }
                text => {
                    let tok = args
                        .tokenizer
                        .clone()
                        .or_else(|| {
                            args.model
                                .parent()
                                .map(|d| d.join("tokenizer.json"))
                                .filter(|p| p.exists())
                        })
                        .context("text calibration data needs --tokenizer")?;
                    let encoder = TextEncoder::from_file(&tok, args.max_seq as usize)?;
                    let mut sentences = datasets::sentences(text);
                    sentences.dedup();
                    sentences.truncate(args.samples);
                    datasets::text_samples(&encoder, &names, &sentences)
                        .map_err(anyhow::Error::msg)?
                }
            };
            let bar = ProgressBar::new(samples.len() as u64).with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {eta}")
                    .expect("valid template"),
            );
            bar.set_message("calibrating");
            let c = calibrate(&graph, &samples, |i| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            Some(c)
        }
    };
    let weights: Vec<(String, String, usize, usize, Vec<f32>)> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, edgefold_runtime::ops::Op::Linear { .. }))
        .filter_map(|n| {
            let v = &graph.values[n.inputs[1]?];
            let data = v.data.as_ref()?.as_f32()?.to_vec();
            let input = graph.values[n.inputs[0]?].name.clone();
            Some((
                v.name.clone(),
                input,
                v.shape[0].factor as usize,
                v.shape[1].factor as usize,
                data,
            ))
        })
        .collect();
    let bar = ProgressBar::new(weights.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}").expect("valid template"),
    );
    bar.set_message("singular spectra");
    let mut matrices = Vec::new();
    for (name, input, n, k, data) in &weights {
        let s = summarize(data, *n, *k).with_context(|| format!("spectrum of {name}"))?;
        let whitened = match calibration.as_ref().and_then(|c| c.inputs.get(input)) {
            Some(stats) if stats.k == *k => {
                Some(Whitening::new(&stats.gram, *k)?.singular_values(data, *n)?)
            }
            _ => None,
        };
        matrices.push((name.clone(), s, whitened));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let matrix_json: Vec<Json> = matrices
        .iter()
        .map(|(name, s, w)| {
            let mut j = json!({
                "name": name, "rows": s.rows, "cols": s.cols, "elbow": s.elbow,
                "energy_90": s.energy_90, "energy_99": s.energy_99, "break_even": s.break_even,
                "singular_values": s.singular_values,
            });
            if let Some(w) = w {
                j["whitened"] = json!({
                    "elbow": elbow_rank(w), "energy_90": energy_rank(w, 0.9), "energy_99": energy_rank(w, 0.99),
                    "singular_values": w,
                });
            }
            j
        })
        .collect();
    let blocks_json = calibration.as_ref().and_then(|c| c.blocks.as_ref()).map(|b| {
        json!({
            "blocks": b.blocks.iter().map(|x| x.index).collect::<Vec<_>>(),
            "influence": b.influence, "angular_distance": b.angular,
            "cosine": b.cosine, "cka": b.cka,
        })
    });
    let report = json!({
        "model": args.model,
        "calibration_samples": calibration.as_ref().map(|c| c.samples),
        "matrices": matrix_json,
        "blocks": blocks_json,
    });
    if let Some(dir) = &args.report {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("report.json");
        write_output(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        write_analysis_plots(dir, &matrices, calibration.as_ref())?;
        eprintln!("report written to {}", dir.display());
    }
    if args.json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "{:<48} {:>11} {:>6} {:>6} {:>6} {:>10} {:>8} {:>8}",
        "linear weight", "shape", "elbow", "90%", "99%", "break-even", "w.elbow", "w.99%"
    );
    for (name, s, w) in &matrices {
        let (we, w99) = match w {
            Some(w) => (elbow_rank(w).to_string(), energy_rank(w, 0.99).to_string()),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<48} {:>11} {:>6} {:>6} {:>6} {:>10} {:>8} {:>8}",
            name,
            format!("{}x{}", s.rows, s.cols),
            s.elbow,
            s.energy_90,
            s.energy_99,
            s.break_even,
            we,
            w99
        );
    }
    let below = matrices.iter().filter(|(_, s, _)| s.energy_99 < s.break_even).count();
    println!(
        "{} matrices; {below} keep 99 % of their energy below the break-even rank",
        matrices.len()
    );
    if let Some(b) = calibration.as_ref().and_then(|c| c.blocks.as_ref()) {
        println!("block  influence (1 - cos)  angular distance");
        for (i, blk) in b.blocks.iter().enumerate() {
            println!("{:>5}  {:>19.5}  {:>16.5}", blk.index, b.influence[i], b.angular[i]);
        }
    } else if calibration.is_some() {
        println!("no repeated blocks found; block-level measurements skipped");
    }
    Ok(())
}

/// Writes the analysis plots (PNG and SVG): spectra, block influence and block similarity.
fn write_analysis_plots(
    dir: &Path,
    matrices: &[(String, edgefold_compressor::spectrum::SpectrumSummary, Option<Vec<f64>>)],
    calibration: Option<&edgefold_compressor::calibrate::Calibration>,
) -> Result<()> {
    use edgefold_compressor::plots::{
        plot_block_influence, plot_similarity, plot_spectra, SpectrumPlot,
    };
    // One plot per distinct weight shape, with up to six matrices each, keeps lines readable.
    let mut shapes: Vec<(usize, usize)> =
        matrices.iter().map(|(_, s, _)| (s.rows, s.cols)).collect();
    shapes.sort_unstable();
    shapes.dedup();
    for (rows, cols) in shapes {
        let spectra: Vec<SpectrumPlot> = matrices
            .iter()
            .filter(|(_, s, _)| (s.rows, s.cols) == (rows, cols))
            .take(6)
            .map(|(name, s, w)| SpectrumPlot {
                name,
                singular_values: &s.singular_values,
                whitened: w.as_deref(),
                elbow: s.elbow,
                energy_90: s.energy_90,
                energy_99: s.energy_99,
                break_even: s.break_even,
            })
            .collect();
        let title =
            format!("Singular spectra of {rows}x{cols} weights (solid raw, dashed whitened)");
        plot_spectra(dir, &format!("spectra_{rows}x{cols}"), &title, &spectra)?;
    }
    if let Some(b) = calibration.and_then(|c| c.blocks.as_ref()) {
        plot_block_influence(
            dir,
            "block_influence",
            "Block influence: 1 - cos(h_in, h_out) per block",
            &b.influence,
            &b.angular,
        )?;
        plot_similarity(
            dir,
            "similarity_cosine",
            "Mean token cosine similarity between block outputs",
            &b.cosine,
        )?;
        plot_similarity(dir, "similarity_cka", "Linear CKA between block outputs", &b.cka)?;
    }
    Ok(())
}

fn to_input<'a>(
    t: &'a HostTensor,
    want: DType,
    name: &str,
) -> Result<std::borrow::Cow<'a, HostTensor>> {
    use std::borrow::Cow;
    Ok(match (&t.data, want) {
        (TensorData::F32(_), DType::F32)
        | (TensorData::I64(_), DType::I64)
        | (TensorData::I32(_), DType::I32) => Cow::Borrowed(t),
        (TensorData::I32(v), DType::I64) => {
            Cow::Owned(HostTensor::i64(t.shape.clone(), v.iter().map(|&x| x as i64).collect()))
        }
        (TensorData::I64(v), DType::I32) => Cow::Owned(HostTensor {
            shape: t.shape.clone(),
            data: TensorData::I32(v.iter().map(|&x| x as i32).collect()),
        }),
        (data, want) => bail!(
            "input {name} expects {want:?} elements, but the .npy file contains {}",
            match data {
                TensorData::F32(_) => "f32",
                TensorData::I64(_) => "i64",
                TensorData::I32(_) => "i32",
                TensorData::Bool(_) => "bool",
            }
        ),
    })
}

fn cmd_run(
    path: &Path,
    inputs: &[String],
    output: Option<&Path>,
    output_index: usize,
    products: llm::Products,
    as_json: bool,
) -> Result<()> {
    let map = open_mapped(path)?;
    let model = Model::open(map.bytes())
        .with_context(|| format!("{} is not a valid packed file", path.display()))?;
    if inputs.len() != model.input_count() {
        bail!(
            "{} has {} inputs; {} --input files were given",
            path.display(),
            model.input_count(),
            inputs.len()
        );
    }
    let mut arena = alloc_arena(path, model.arena_bytes_unaligned())?;
    let mut session = Session::new(&model, &mut arena)?;
    session.set_threads(products.threads);
    session.set_int8_activations(products.int8_activations);
    for (position, spec) in inputs.iter().enumerate() {
        let (index, file) = match spec.split_once('=') {
            Some((name, file)) => (
                model
                    .input_index(name)
                    .with_context(|| format!("the model has no input named {name:?}"))?,
                file,
            ),
            None => (position, spec.as_str()),
        };
        let entry = model.tensor(model.input_tensor(index)?)?;
        let name = model.tensor_name(model.input_tensor(index)?);
        // The .npy error names the file.
        let tensor =
            read_npy(Path::new(file)).with_context(|| format!("cannot read input {name}"))?;
        let t = to_input(&tensor, entry.dtype, name)?;
        let result = match &t.data {
            TensorData::F32(v) => session.set_input::<f32>(index, &t.shape, v),
            TensorData::I64(v) => session.set_input::<i64>(index, &t.shape, v),
            TensorData::I32(v) => session.set_input::<i32>(index, &t.shape, v),
            TensorData::Bool(_) => bail!("boolean inputs are not supported"),
        };
        result.with_context(|| format!("input {name} from {file}"))?;
    }
    let started = Instant::now();
    session.run().map_err(|e| describe_run_error(&model, inputs, e))?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut outs = Vec::new();
    for i in 0..model.output_count() {
        let name = model.tensor_name(model.output_tensor(i)?);
        let (shape, preview, tensor) = match session.output_dtype(i)? {
            DType::F32 => {
                let (s, v) = session.output::<f32>(i)?;
                (
                    s,
                    v.iter().take(8).map(|x| json!(x)).collect::<Vec<_>>(),
                    HostTensor::f32(s.as_slice().to_vec(), v.to_vec()),
                )
            }
            DType::I64 => {
                let (s, v) = session.output::<i64>(i)?;
                (
                    s,
                    v.iter().take(8).map(|x| json!(x)).collect(),
                    HostTensor::i64(s.as_slice().to_vec(), v.to_vec()),
                )
            }
            other => bail!("output {name} has element type {other:?}, which run cannot print"),
        };
        if let Some(p) = output.filter(|_| i == output_index) {
            // The .npy error names the file.
            write_npy(p, &tensor).context("cannot write --output")?;
        }
        outs.push(json!({"name": name, "shape": shape.as_slice(), "first_values": preview}));
    }
    if output.is_some() && output_index >= model.output_count() {
        bail!(
            "--output-index {output_index} is out of range: the model has {} outputs",
            model.output_count()
        );
    }
    if as_json {
        print_json(&json!({"file": path, "seconds": elapsed, "outputs": outs}));
    } else {
        for o in &outs {
            println!("{} {} {}", o["name"].as_str().unwrap_or(""), o["shape"], o["first_values"]);
        }
        eprintln!("ran in {:.2} ms", elapsed * 1e3);
    }
    Ok(())
}

/// Adds to a runtime error of `run` what the runtime cannot name without allocating: for a
/// symbolic dimension bound to two values, the symbol's name and the input files that bind it.
/// `inputs` are the `--input` arguments, as `cmd_run` matched them to the model's inputs.
fn describe_run_error(
    model: &Model<'_>,
    inputs: &[String],
    error: edgefold_runtime::Error,
) -> anyhow::Error {
    let edgefold_runtime::Error::SymbolConflict { symbol, first, second } = error else {
        return error.into();
    };
    let symbol = symbol as usize;
    let name = model.symbol(symbol).map_or("?", |(name, _)| name);
    let mut binders = Vec::new();
    for (position, spec) in inputs.iter().enumerate() {
        let (index, file) = match spec.split_once('=') {
            Some((input_name, file)) => (model.input_index(input_name), file),
            None => (Some(position), spec.as_str()),
        };
        let Some(tensor_index) = index.and_then(|i| model.input_tensor(i).ok()) else {
            continue;
        };
        let Ok(tensor) = model.tensor(tensor_index) else { continue };
        if tensor.shape().iter().any(|d| d.as_symbol() == Some(symbol)) {
            binders.push(format!("{} from {file}", model.tensor_name(tensor_index)));
        }
    }
    anyhow::anyhow!(
        "symbolic dimension {name:?} (symbol {symbol}) is bound to {first} by one input and \
         {second} by another; the inputs with that dimension are {}. Pass arrays whose extents \
         agree on it",
        binders.join(", ")
    )
}

fn cmd_embed(
    path: &Path,
    sentences: &[String],
    tokenizer: Option<&Path>,
    output: Option<&str>,
    as_json: bool,
) -> Result<()> {
    let mut embedder = PackedEmbedder::open(path, tokenizer, output)?;
    let mut vectors = Vec::new();
    for s in sentences {
        vectors.push(embedder.embed(s).with_context(|| format!("embedding {s:?}"))?);
    }
    let mut pairs = Vec::new();
    for i in 0..vectors.len() {
        for j in i + 1..vectors.len() {
            pairs.push((i, j, cosine(&vectors[i], &vectors[j])));
        }
    }
    if as_json {
        print_json(&json!({
            "file": path,
            "embeddings": sentences.iter().zip(&vectors).map(|(s, v)| json!({"sentence": s, "dim": v.len(), "vector": v})).collect::<Vec<_>>(),
            "cosine": pairs.iter().map(|(i, j, c)| json!({"a": i, "b": j, "cosine": c})).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    for (s, v) in sentences.iter().zip(&vectors) {
        let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.4}")).collect();
        println!("[{}, ...] ({} dims)  {s}", head.join(", "), v.len());
    }
    for (i, j, c) in pairs {
        println!("cosine({i}, {j}) = {c:.4}");
    }
    Ok(())
}

/// Compares the sha256 of `original` with the `source.sha256` that `compress` stored in the packed
/// `file`, and warns on stderr when they differ. Returns `None` when there is nothing to compare:
/// `file` is no packed file with that key (a GGUF file, a Marian directory, or one that fails to
/// open, whose error the evaluation reports), or `original` cannot be read.
fn check_source_matches(original: &Path, file: &Path) -> Option<bool> {
    let map = MappedFile::open(file).ok()?;
    let model = Model::open(map.bytes()).ok()?;
    let stored = std::str::from_utf8(model.metadata("source.sha256")?).ok()?.trim().to_owned();
    let actual = sha256_hex(original).ok()?;
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

/// Returns the sha256 of the file at `path` in lowercase hex, as `compress` stores it.
fn sha256_hex(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};

    let mut hasher = Sha256::new();
    let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn cmd_eval(args: EvalArgs) -> Result<()> {
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
            };
            return translate::eval_bleu(&args.original, &args.file, options);
        }
        other => {
            bail!("--task {other} is not known; use sts, raw, accuracy, anomaly, ppl or bleu")
        }
    }
    let mut pairs = read_sts(&args.data)?;
    if let Some(limit) = args.limit {
        pairs.truncate(limit);
    }
    if pairs.len() < 2 {
        bail!(
            "{} has fewer than 2 pairs; Spearman correlation needs at least 2",
            args.data.display()
        );
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
    let min_agreement = agreement.iter().copied().fold(f64::INFINITY, f64::min);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (original_bytes, packed_bytes) = (size(&args.original), size(&args.file));
    if args.json {
        print_json(&json!({
            "task": "sts",
            "source_matches": source_matches,
            "pairs": pairs.len(),
            "original": original,
            "compressed": compressed,
            "retained": json_float(retained),
            "embedding_cosine_mean": mean_agreement,
            "embedding_cosine_min": min_agreement,
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
    let reference = ReferenceModel::load(&args.original)
        .with_context(|| format!("cannot load {}", args.original.display()))?;
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut packed = PackedGraph::from_bytes(&bytes)
        .with_context(|| format!("{} is not a valid packed file", args.file.display()))?;
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
                cos_min = cos_min.min(c);
                count += 1;
                for (p, q) in x.iter().zip(y) {
                    max_abs = max_abs.max((p - q).abs() as f64);
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
            "original": original,
            "compressed": compressed,
            "retained": json_float(retained),
            "output_cosine_mean": cos_mean,
            "output_cosine_min": json_float(cos_min),
            "output_max_abs_diff": max_abs,
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

/// Synthetic text-encoder input of `seq` tokens for an input named like a BERT input.
fn token_input(name: &str, seq: usize) -> Result<Vec<i64>> {
    Ok(match name {
        "input_ids" => (0..seq)
            .map(|i| match i {
                0 => 101,
                i if i + 1 == seq => 102,
                i => 1000 + (i as i64 * 7919) % 20000,
            })
            .collect(),
        "attention_mask" => vec![1; seq],
        "token_type_ids" => vec![0; seq],
        other => bail!("bench feeds token inputs only; the model has an input named {other:?}"),
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn cmd_bench(args: BenchArgs) -> Result<()> {
    if args.seq == 0 {
        bail!("--seq must be at least 1");
    }
    let started = Instant::now();
    let mut times = Vec::with_capacity(args.runs);
    let mut profile = args.profile.then(OpProfile::default);
    let first;
    let opened;
    match args.engine.as_str() {
        "edgefold" => {
            let map = open_mapped(&args.file)?;
            let model = Model::open(map.bytes())
                .with_context(|| format!("{} is not a valid packed file", args.file.display()))?;
            let mut arena = alloc_arena(&args.file, model.arena_bytes_unaligned())?;
            let mut session = Session::new(&model, &mut arena)?;
            session.set_threads(args.threads.into());
            session.set_int8_activations(args.int8_activations);
            opened = started.elapsed().as_secs_f64();
            for i in 0..model.input_count() {
                let name = model.tensor_name(model.input_tensor(i)?);
                let values = token_input(name, args.seq)?;
                session.set_input::<i64>(i, &[1, args.seq], &values).with_context(|| {
                    format!(
                        "--seq {} does not fit {}: pass a shorter --seq, or compress the model \
                         again with a larger --max-seq",
                        args.seq,
                        args.file.display()
                    )
                })?;
            }
            session.run()?;
            first = started.elapsed().as_secs_f64();
            for _ in 0..args.runs {
                let t = Instant::now();
                if let Some(p) = profile.as_mut() {
                    let mut last = t;
                    session.run_with(|index, record| {
                        let now = Instant::now();
                        p.add(index, record.op.name(), || model.op_name(record), now - last);
                        last = now;
                    })?;
                } else {
                    session.run()?;
                }
                times.push(t.elapsed().as_secs_f64());
            }
        }
        "tract" => {
            if args.profile {
                bail!("--profile is for the edgefold engine");
            }
            if args.threads != 1 {
                bail!(
                    "--threads {} is for the edgefold engine; tract runs on one thread here",
                    args.threads
                );
            }
            if args.int8_activations {
                bail!("--int8-activations is for the edgefold engine; tract runs in f32 here");
            }
            let model = edgefold_compressor::reference::ReferenceModel::load(&args.file)?;
            opened = started.elapsed().as_secs_f64();
            let inputs: Vec<HostTensor> = model
                .input_names()
                .iter()
                .map(|n| token_input(n, args.seq).map(|v| HostTensor::i64(vec![1, args.seq], v)))
                .collect::<Result<_>>()?;
            model.run(&inputs)?;
            first = started.elapsed().as_secs_f64();
            for _ in 0..args.runs {
                let t = Instant::now();
                model.run(&inputs)?;
                times.push(t.elapsed().as_secs_f64());
            }
        }
        other => bail!("--engine {other} is not known; use edgefold or tract"),
    }
    let med = median(&mut times);
    let runs = args.runs.max(1) as f64;
    if args.json {
        let mut out = json!({
            "file": args.file, "engine": args.engine, "seq": args.seq, "runs": args.runs,
            "threads": args.threads, "int8_activations": args.int8_activations,
            "open_ms": opened * 1e3, "load_to_first_output_ms": first * 1e3,
            "latency_ms_median": med * 1e3,
            "latency_ms_min": times.first().map(|t| t * 1e3),
        });
        if let Some(p) = &profile {
            let kinds: Vec<_> = p
                .by_kind()
                .iter()
                .map(|(kind, count, total)| {
                    json!({"op": kind, "count": count, "ms_per_run": total * 1e3 / runs})
                })
                .collect();
            let ops: Vec<_> = p
                .slowest(PROFILE_TOP)
                .iter()
                .map(|(index, kind, name, total)| {
                    json!({"index": index, "op": kind, "name": name, "ms_per_run": total * 1e3 / runs})
                })
                .collect();
            out["profile"] = json!({"by_kind": kinds, "slowest": ops});
        }
        print_json(&out);
    } else {
        println!(
            "{} ({}), sequence {}: open {:.2} ms, load to first output {:.2} ms, median latency {:.2} ms over {} runs",
            args.file.display(), args.engine, args.seq, opened * 1e3, first * 1e3, med * 1e3, args.runs
        );
        if let Some(p) = &profile {
            let all: f64 = p.ops.iter().map(|o| o.total).sum::<f64>().max(f64::MIN_POSITIVE);
            println!("\n{:<14} {:>6} {:>12} {:>7}", "op", "count", "ms per run", "share");
            for (kind, count, total) in p.by_kind() {
                let share = 100.0 * total / all;
                println!("{kind:<14} {count:>6} {:>12.3} {share:>6.1}%", total * 1e3 / runs);
            }
            println!("\n{:>5} {:<14} {:>12}  name", "index", "op", "ms per run");
            for (index, kind, name, total) in p.slowest(PROFILE_TOP) {
                println!("{index:>5} {kind:<14} {:>12.3}  {name}", total * 1e3 / runs);
            }
        }
    }
    Ok(())
}

/// Number of ops that `bench --profile` lists one by one.
const PROFILE_TOP: usize = 12;

/// Time spent in each op over the timed runs of `bench --profile`.
#[derive(Default)]
struct OpProfile {
    ops: Vec<OpTime>,
}

struct OpTime {
    kind: &'static str,
    name: String,
    /// Seconds over all timed runs.
    total: f64,
}

impl OpProfile {
    fn add<'n>(
        &mut self,
        index: u32,
        kind: &'static str,
        name: impl FnOnce() -> &'n str,
        spent: Duration,
    ) {
        let i = index as usize;
        if self.ops.len() <= i {
            self.ops.resize_with(i + 1, || OpTime { kind: "", name: String::new(), total: 0.0 });
        }
        let op = &mut self.ops[i];
        if op.kind.is_empty() {
            op.kind = kind;
            op.name = name().to_string();
        }
        op.total += spent.as_secs_f64();
    }

    /// Returns (kind, number of ops, seconds) for each kind of op, slowest first.
    fn by_kind(&self) -> Vec<(&'static str, usize, f64)> {
        let mut kinds: Vec<(&'static str, usize, f64)> = Vec::new();
        for op in &self.ops {
            match kinds.iter_mut().find(|k| k.0 == op.kind) {
                Some(k) => {
                    k.1 += 1;
                    k.2 += op.total;
                }
                None => kinds.push((op.kind, 1, op.total)),
            }
        }
        kinds.sort_by(|a, b| b.2.total_cmp(&a.2));
        kinds
    }

    /// Returns (index, kind, name, seconds) of the `top` slowest ops, slowest first.
    fn slowest(&self, top: usize) -> Vec<(usize, &'static str, &str, f64)> {
        let mut ops: Vec<_> = self
            .ops
            .iter()
            .enumerate()
            .map(|(i, o)| (i, o.kind, o.name.as_str(), o.total))
            .collect();
        ops.sort_by(|a, b| b.3.total_cmp(&a.3));
        ops.truncate(top);
        ops
    }
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
        "quality": outcome.quality,
        "baseline_metric": outcome.baseline,
        "drop_order": outcome.drop_order.iter().map(|(b, q)| json!({"block": b, "quality": q})).collect::<Vec<_>>(),
        "candidates": outcome.tried.iter().map(|t| json!({"scheme": format!("{}", t.scheme), "bytes": t.bytes, "quality": t.quality, "confirmed": t.confirmed})).collect::<Vec<_>>(),
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

/// `compress --fuse-blocks N`: calibrates, fuses the most similar adjacent pairs, then factorizes,
/// quantizes and packs with the fixed settings.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_float_non_finite_as_strings() {
        assert_eq!(json_float(0.25), json!(0.25));
        assert_eq!(json_float(f64::INFINITY), json!("inf"));
        assert_eq!(json_float(f64::NEG_INFINITY), json!("-inf"));
        assert_eq!(json_float(f64::NAN), json!("nan"));
        assert_eq!(json_float(f32::INFINITY.into()), json!("inf"));
    }

    #[test]
    fn at_least_one_parser() {
        assert_eq!(parse_at_least_one("1"), Ok(1));
        assert_eq!(parse_at_least_one("4000000000"), Ok(4_000_000_000));
        assert!(parse_at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(parse_at_least_one("-1").unwrap_err().contains("whole number"));
    }
}
