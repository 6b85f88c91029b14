//! Measures a Llama-architecture GGUF model's perplexity after each weight storage kind and after
//! removing blocks, chosen by Block Influence alone or by SLEB verification. Prints Markdown
//! tables on stdout and progress on stderr.
//!
//! ```sh
//! cargo run --release -p edgefold-compressor --example llm_table -- \
//!     --model models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --text ../shared/data/lm/wikitext2_valid.txt --threads 2
//! ```
//!
//! Perplexity is scored on the text's first `--eval-tokens` tokens in non-overlapping windows of
//! 512. Calibration (Block Influence, SLEB's choices and GPTQ statistics) uses the
//! `--calibration-tokens` tokens that follow them, so no choice is made on the evaluation tokens.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use edgefold_compressor::gguf::GgufFile;
use edgefold_compressor::llm::analysis::{block_influence, lowest_influence, sleb};
use edgefold_compressor::llm::tokenizer::GgufTokenizer;
use edgefold_compressor::llm::{perplexity, Llama, WeightKind};

#[derive(Parser)]
struct Args {
    /// GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// Text file for evaluation and calibration.
    #[arg(long)]
    text: PathBuf,
    /// Tokens scored for perplexity.
    #[arg(long, default_value_t = 8192)]
    eval_tokens: usize,
    /// Tokens for calibration, taken after the evaluation tokens.
    #[arg(long, default_value_t = 512)]
    calibration_tokens: usize,
    /// Block counts to remove.
    #[arg(long, value_delimiter = ',', default_value = "2,4,6,8")]
    remove: Vec<usize>,
    /// Threads for the matrix products.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Measure only the weight storage kinds, not block removal.
    #[arg(long)]
    no_pruning: bool,
}

const WINDOW: usize = 512;

fn main() -> Result<()> {
    let args = Args::parse();
    let file = GgufFile::open(&args.model)?;
    let tokenizer = GgufTokenizer::from_gguf(&file)?;
    let mut model = Llama::from_gguf(&file)?;
    model.set_threads(args.threads);
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read {}", args.text.display()))?;
    let tokens = tokenizer.encode(&text)?;
    let needed = args.eval_tokens + args.calibration_tokens;
    if tokens.len() < needed {
        bail!("{} has {} tokens; {needed} are needed", args.text.display(), tokens.len());
    }
    let eval = &tokens[..args.eval_tokens];
    let calibration = &tokens[args.eval_tokens..needed];
    let ppl = |m: &Llama| -> Result<f64> {
        let start = Instant::now();
        let p = perplexity(m, eval, WINDOW, |_| {})?.perplexity;
        eprintln!("  perplexity {p:.4} in {:.1} s", start.elapsed().as_secs_f64());
        Ok(p)
    };

    eprintln!("original");
    let base = ppl(&model)?;
    let f32_bytes = model.weight_bytes();
    println!("| weights | bytes | % of f32 | perplexity | ratio |");
    println!("|---|---:|---:|---:|---:|");
    println!("| f32 (dequantized source) | {f32_bytes} | 100.0 | {base:.3} | 1.000 |");
    println!(
        "| source GGUF file (Q4_1, Q8_0 embedding) | {} | {:.1} | | |",
        file.file_len(),
        100.0 * file.file_len() as f64 / f32_bytes as f64
    );

    eprintln!("calibration statistics");
    let stats = model.calibrate(calibration, WINDOW, |_| {})?;
    for (kind, label) in [
        (WeightKind::Int8, "int8 per row"),
        (WeightKind::Int4, "int4 groups of 32, rounded"),
        (WeightKind::Int4Gptq, "int4 groups of 32, GPTQ"),
    ] {
        eprintln!("{label}");
        let mut quantized = model.clone();
        let start = Instant::now();
        quantized.quantize(kind, Some(&stats))?;
        eprintln!("  quantized in {:.1} s", start.elapsed().as_secs_f64());
        let p = ppl(&quantized)?;
        let bytes = quantized.weight_bytes();
        println!(
            "| {label} (embedding int8) | {bytes} | {:.1} | {p:.3} | {:.3} |",
            100.0 * bytes as f64 / f32_bytes as f64,
            p / base
        );
    }

    if args.no_pruning {
        return Ok(());
    }
    eprintln!("block influence");
    let influence = block_influence(&model, calibration, WINDOW)?;
    let max_removed = args.remove.iter().copied().max().unwrap_or(0);
    eprintln!("SLEB, {max_removed} removals");
    let start = Instant::now();
    let verified = sleb(&model, calibration, WINDOW, max_removed, |n| {
        if n % 10 == 0 {
            eprintln!("  {n} candidates in {:.0} s", start.elapsed().as_secs_f64());
        }
    })?;
    println!();
    println!("Block Influence (1 - cos) per block:");
    println!();
    let cells: Vec<String> =
        influence.iter().enumerate().map(|(i, v)| format!("{i}: {v:.4}")).collect();
    println!("{}", cells.join(", "));
    println!();
    println!("| blocks removed | by influence | perplexity | by SLEB | perplexity |");
    println!("|---:|---|---:|---|---:|");
    for &count in &args.remove {
        let by_influence = lowest_influence(&influence, count);
        let by_sleb: Vec<usize> = verified.iter().take(count).map(|r| r.block).collect();
        let mut a = model.clone();
        a.remove_blocks(&by_influence);
        eprintln!("{count} removed by influence: {by_influence:?}");
        let pa = ppl(&a)?;
        let mut b = model.clone();
        b.remove_blocks(&by_sleb);
        eprintln!("{count} removed by SLEB: {by_sleb:?}");
        let pb = ppl(&b)?;
        println!("| {count} | {by_influence:?} | {pa:.3} | {by_sleb:?} | {pb:.3} |");
    }
    Ok(())
}
