//! The `generate` command and `eval --task ppl`: language models read from GGUF files and run in
//! f32 on the host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use edgefold_compressor::gguf::GgufFile;
use edgefold_compressor::llm::sample::{Sampler, SamplerConfig};
use edgefold_compressor::llm::tokenizer::{GgufTokenizer, TextStream};
use edgefold_compressor::llm::{perplexity, Llama, WeightKind};

/// Options of `edgefold generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model: a GGUF file of the Llama architecture.
    model: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as one user message.
    #[arg(long)]
    chat: bool,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token each step (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: sample from the most likely tokens whose probabilities sum to this.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler's random generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Context length: prompt plus generated tokens (default: the model's, at most 2048).
    #[arg(long)]
    max_seq: Option<usize>,
    /// Threads for the matrix products.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Weight storage: f32, int8 (per row) or int4 (groups of 32, rounded to nearest). The
    /// embedding is stored as int8 with the latter two.
    #[arg(long, default_value = "f32", value_parser = parse_weight_kind)]
    weights: WeightKind,
    /// Print one JSON object on stdout instead of streaming the text.
    #[arg(long)]
    json: bool,
}

/// Parses a `--weights` value.
pub fn parse_weight_kind(value: &str) -> Result<WeightKind, String> {
    match value {
        "f32" => Ok(WeightKind::F32),
        "int8" => Ok(WeightKind::Int8),
        "int4" => Ok(WeightKind::Int4),
        other => Err(format!("`{other}` is not a weight storage; use f32, int8 or int4")),
    }
}

/// Opens a GGUF model and its tokenizer, rejecting packed files with a clear error, and stores
/// the model's weights as `weights`.
fn open_gguf(
    path: &Path,
    threads: usize,
    weights: WeightKind,
) -> Result<(Llama, GgufTokenizer, u64)> {
    let mut head = [0u8; 4];
    let read = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if read == 4 && &head != b"GGUF" && path.extension().is_some_and(|e| e == "fold") {
        bail!(
            "{} is a packed file; language models run from GGUF files so far, because the \
             runtime has no decoder operators yet",
            path.display()
        );
    }
    let file = GgufFile::open(path)?;
    let tokenizer = GgufTokenizer::from_gguf(&file)?;
    let mut model = Llama::from_gguf(&file)?;
    model.set_threads(threads);
    if weights != WeightKind::F32 {
        model.quantize(weights, None)?;
    }
    Ok((model, tokenizer, file.file_len()))
}

/// Runs `edgefold generate`.
pub fn cmd_generate(args: GenerateArgs) -> Result<()> {
    let valid_temperature = args.temperature.is_finite() && args.temperature >= 0.0;
    let valid_top_p = args.top_p > 0.0 && args.top_p <= 1.0;
    if !valid_temperature || !valid_top_p {
        bail!(
            "--temperature {} and --top-p {} are invalid; use a finite temperature of 0 or \
             more and a top-p above 0 and at most 1",
            args.temperature,
            args.top_p
        );
    }
    let load_start = Instant::now();
    let (model, tokenizer, _) = open_gguf(&args.model, args.threads.into(), args.weights)?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let text = if args.chat { tokenizer.chat_prompt(&args.prompt)? } else { args.prompt.clone() };
    let prompt = tokenizer.encode(&text)?;
    if prompt.is_empty() {
        bail!("the prompt is empty; give some text with --prompt");
    }
    let context = args.max_seq.unwrap_or(model.config().context.min(2048));
    if prompt.len() >= context {
        bail!(
            "the prompt has {} tokens but the context holds {context}; shorten it or raise \
             --max-seq",
            prompt.len()
        );
    }
    let mut cache = model.new_cache(context.min(prompt.len() + args.max_tokens));
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });

    let prompt_start = Instant::now();
    let mut logits = model.forward(&prompt, &mut cache, false)?;
    let prompt_seconds = prompt_start.elapsed().as_secs_f64();

    let mut stream = TextStream::default();
    let mut out = String::new();
    let mut generated = Vec::new();
    let mut stdout = std::io::stdout().lock();
    let generate_start = Instant::now();
    let mut stop = "length";
    while generated.len() < args.max_tokens {
        let next = sampler.sample(&logits);
        if Some(next) == tokenizer.eos() || (args.chat && tokenizer.is_control(next)) {
            stop = "end of sequence";
            break;
        }
        generated.push(next);
        let piece = stream.push(&tokenizer, next);
        if !args.json {
            stdout.write_all(piece.as_bytes())?;
            stdout.flush()?;
        }
        out.push_str(&piece);
        if cache.len() == cache.capacity() {
            stop = "context full";
            break;
        }
        logits = model.forward(&[next], &mut cache, false)?;
    }
    let rest = stream.finish();
    out.push_str(&rest);
    let generate_seconds = generate_start.elapsed().as_secs_f64();
    let prompt_rate = prompt.len() as f64 / prompt_seconds.max(1e-9);
    let generate_rate = generated.len() as f64 / generate_seconds.max(1e-9);
    if args.json {
        let report = json!({
            "model": args.model,
            "prompt_tokens": prompt.len(),
            "generated_tokens": generated.len(),
            "text": out,
            "stop": stop,
            "load_seconds": load_seconds,
            "prompt_tokens_per_second": prompt_rate,
            "generate_tokens_per_second": generate_rate,
            "threads": args.threads,
            "weights": format!("{:?}", args.weights),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        writeln!(stdout, "{rest}")?;
        eprintln!(
            "prompt: {} tokens at {prompt_rate:.1} tokens/s; generated: {} tokens at \
             {generate_rate:.1} tokens/s (stop: {stop}); load {load_seconds:.2} s",
            prompt.len(),
            generated.len()
        );
    }
    Ok(())
}

/// Settings of `edgefold eval --task ppl`.
pub struct PerplexityOptions {
    /// Tokens scored (default 8192).
    pub limit: Option<usize>,
    /// Tokens per window.
    pub window: usize,
    /// Threads for the matrix products.
    pub threads: usize,
    /// Weight storage of the second model.
    pub weights: WeightKind,
    /// Print one JSON object on stdout.
    pub json: bool,
}

/// Runs `edgefold eval --task ppl`: perplexity of the original and of `file` on `data`.
pub fn eval_perplexity(
    original: &Path,
    file: &Path,
    data: &Path,
    options: PerplexityOptions,
) -> Result<()> {
    let PerplexityOptions { limit, window, threads, weights, json } = options;
    if window < 2 {
        bail!("--window {window} is too small; a window needs at least 2 tokens");
    }
    let text = std::fs::read_to_string(data)
        .with_context(|| format!("cannot read the text file {}", data.display()))?;
    let mut results = Vec::new();
    let mut same = false;
    for (i, path) in [original, file].into_iter().enumerate() {
        if i == 1 && weights == WeightKind::F32 && same_file(original, path) {
            same = true;
            break;
        }
        // The original always runs in f32; `weights` applies to the second file.
        let kind = if i == 0 { WeightKind::F32 } else { weights };
        let (model, tokenizer, _) = open_gguf(path, threads, kind)?;
        let bytes = model.weight_bytes() as u64;
        let mut tokens = tokenizer.encode(&text)?;
        tokens.truncate(limit.unwrap_or(8192));
        if tokens.len() < 2 {
            bail!("{} contains fewer than 2 tokens; perplexity needs more text", data.display());
        }
        let windows = tokens.len().div_ceil(window);
        let bar = ProgressBar::new(windows as u64).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows {eta}")
                .expect("valid template"),
        );
        bar.set_message(format!("ppl {}", path.display()));
        let start = Instant::now();
        let result = perplexity(&model, &tokens, window, |done| bar.set_position(done as u64))?;
        bar.finish_and_clear();
        results.push((path.to_path_buf(), bytes, tokens.len(), result, start.elapsed()));
    }
    if json {
        let entries: Vec<_> = results
            .iter()
            .map(|(path, bytes, tokens, r, time)| {
                json!({
                    "file": path,
                    "weight_bytes": bytes,
                    "tokens": tokens,
                    "scored": r.scored,
                    "windows": r.windows,
                    "perplexity": r.perplexity,
                    "mean_nll": r.mean_nll,
                    "seconds": time.as_secs_f64(),
                })
            })
            .collect();
        let ratio = (results.len() == 2).then(|| results[1].3.perplexity / results[0].3.perplexity);
        let report = json!({ "task": "ppl", "window": window, "results": entries,
            "perplexity_ratio": ratio });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for (path, bytes, tokens, r, time) in &results {
        println!(
            "{}: perplexity {:.4} ({} tokens scored of {tokens}, {} windows of {window}), \
             weights of {} bytes, {:.1} s",
            path.display(),
            r.perplexity,
            r.scored,
            r.windows,
            bytes,
            time.as_secs_f64()
        );
    }
    if same {
        println!("(the second file is the original, so it was not run twice)");
    } else if results.len() == 2 {
        println!("perplexity ratio: {:.4}", results[1].3.perplexity / results[0].3.perplexity);
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
