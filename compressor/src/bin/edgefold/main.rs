//! The `edgefold` command line: compress models, inspect and run packed files, evaluate quality.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde_json::json;

mod analyze;
mod bench;
mod compress;
mod eval;
mod inspect;
mod kind;
mod llm;
mod marian;
mod output;
mod report;
mod run;
mod translate;

use analyze::{cmd_analyze, AnalyzeArgs};
use bench::{cmd_bench, BenchArgs};
use compress::{cmd_compress, CompressArgs};
use eval::{cmd_eval, EvalArgs};
use inspect::{cmd_inspect, cmd_verify};
use report::print_json;
use run::{cmd_embed, cmd_run};

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
