//! Language models: `compress` of a GGUF file, `generate`, and `eval --task ppl`. A GGUF model
//! runs on the host with its weights dequantized (or stored as `--weights` selects); a packed file
//! runs through the runtime's decoder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use edgefold_compressor::exec::alloc_arena;
use edgefold_compressor::gguf::GgufFile;
use edgefold_compressor::llm::packed::{pack, tokenizer_of, PackedLm};
use edgefold_compressor::llm::sample::{Sampler, SamplerConfig};
use edgefold_compressor::llm::tokenizer::{GgufTokenizer, TextStream, TokenizerSpec};
use edgefold_compressor::llm::{perplexity_of, CausalLm, HostLm, Llama, WeightKind};
use edgefold_compressor::pipeline::source_metadata;
use edgefold_runtime::decoder::Decoder;
use edgefold_runtime::{MappedFile, Model};

use crate::kind::{check_packed_kind, PackedKind};
use crate::output::{write_output, write_packed};
use crate::report::{json_float, json_float_rows, json_floats};

/// Options of `edgefold generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model: a packed file written by `edgefold compress`, or a GGUF file of the Llama
    /// architecture.
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
    /// Context length of a GGUF model: prompt plus generated tokens (default: the model's, at
    /// most 2048). A packed file's context length was fixed by `compress --max-seq`.
    #[arg(long)]
    max_seq: Option<usize>,
    /// Threads for the matrix products.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Quantize the inputs of the int4 and int8 matrix products to int8 in groups of 32 and
    /// multiply in integers, as llama.cpp does: about twice the generation speed, for a small
    /// loss (SmolLM2: 0.67 % more perplexity). Needs an x86_64 CPU with AVX-512 VNNI; elsewhere
    /// the products stay in f32 (with a warning). Packed files only.
    #[arg(long)]
    int8_activations: bool,
    /// Weight storage of a GGUF model: f32, int8 (per row), int4 (groups of 32 with a scale and
    /// a minimum, as Q4_1) or int4-sym (groups of 32 with a scale). The embedding is stored as
    /// int8 with the quantized kinds. A packed file keeps the storage it was written with.
    #[arg(long, default_value = "f32", value_parser = parse_weight_kind)]
    weights: WeightKind,
    /// Print one JSON object on stdout instead of streaming the text.
    #[arg(long)]
    pub json: bool,
}

/// Parses a `--weights` value.
pub fn parse_weight_kind(value: &str) -> Result<WeightKind, String> {
    match value {
        "f32" => Ok(WeightKind::F32),
        "int8" => Ok(WeightKind::Int8),
        "int4" => Ok(WeightKind::Int4Min),
        "int4-sym" => Ok(WeightKind::Int4),
        other => Err(format!("`{other}` is not a weight storage; use f32, int8, int4 or int4-sym")),
    }
}

/// Returns whether `path` starts with the GGUF magic bytes.
pub fn is_gguf(path: &Path) -> Result<bool> {
    let mut head = [0u8; 4];
    let read = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(read == 4 && &head == b"GGUF")
}

/// Opens a GGUF model and its tokenizer and stores the model's weights as `weights`.
fn open_gguf(
    path: &Path,
    threads: usize,
    weights: WeightKind,
) -> Result<(Llama, GgufTokenizer, GgufFile)> {
    let file = GgufFile::open(path)?;
    let tokenizer = GgufTokenizer::from_gguf(&file)?;
    let mut model = Llama::from_gguf(&file)?;
    model.set_threads(threads);
    if weights != WeightKind::F32 {
        model.quantize(weights, None)?;
    }
    Ok((model, tokenizer, file))
}

/// Settings of the matrix products that [`with_model`] and `run` compute.
#[derive(Clone, Copy)]
pub struct Products {
    /// Threads.
    pub threads: usize,
    /// Whether inputs may be quantized to int8 (for language models: packed files only).
    pub int8_activations: bool,
}

/// Description of the model that [`with_model`] opened, for reports.
struct ModelInfo {
    /// Bytes of the weights as stored.
    weight_bytes: u64,
    /// Storage, as named in reports.
    storage: String,
}

/// Opens `path`, a packed file or a GGUF model, and runs `f` on it with a cache of `capacity`
/// positions (a packed file's own context length when `None`, or for a GGUF model the model's,
/// at most 2048). `weights` applies to GGUF models only. `capacity_option` is the option that
/// sets `capacity`, which an allocation failure names.
fn with_model<T>(
    path: &Path,
    products: Products,
    weights: WeightKind,
    capacity: Option<usize>,
    capacity_option: &str,
    f: impl FnOnce(&mut dyn CausalLm, &GgufTokenizer, ModelInfo) -> Result<T>,
) -> Result<T> {
    let Products { threads, int8_activations } = products;
    if is_gguf(path)? {
        if int8_activations {
            bail!(
                "--int8-activations applies to packed files, and {} is a GGUF file; pack it \
                 with `edgefold compress` first",
                path.display()
            );
        }
        let (model, tokenizer, _) = open_gguf(path, threads, weights)?;
        let info = ModelInfo {
            weight_bytes: model.weight_bytes() as u64,
            storage: format!("{weights:?} on the host"),
        };
        let capacity = capacity.unwrap_or(model.config().context.min(2048));
        let mut lm = HostLm::try_new(model, capacity)
            .map_err(|e| anyhow!("cannot run {}: {e}; lower {capacity_option}", path.display()))?;
        return f(&mut lm, &tokenizer, info);
    }
    check_packed_kind(path, &[PackedKind::LanguageModel], "a language model")?;
    let map = MappedFile::open(path)
        .with_context(|| format!("cannot open {} as a packed file", path.display()))?;
    let model = Model::open(map.bytes()).with_context(|| {
        format!("{} is neither a GGUF file nor a valid packed file", path.display())
    })?;
    let tokenizer = tokenizer_of(&model)
        .with_context(|| format!("{} contains no usable tokenizer", path.display()))?;
    let mut arena = alloc_arena(path, model.arena_bytes_unaligned())?;
    let decoder = Decoder::new(&model, &mut arena)
        .with_context(|| format!("{} contains no runnable language model", path.display()))?;
    let max_seq = decoder.config().max_seq as usize;
    if let Some(needed) = capacity.filter(|&c| c > max_seq) {
        bail!(
            "{} has a context of {max_seq} positions, fewer than the {needed} needed; compress \
             it again with --max-seq {needed}",
            path.display()
        );
    }
    let mut lm = PackedLm::new(decoder);
    lm.set_threads(threads);
    lm.set_int8_activations(int8_activations);
    if int8_activations && !edgefold_runtime::kernels::int8_products_supported() {
        log::warn!(
            "--int8-activations: this CPU has no integer kernel (it needs x86_64 with AVX-512 \
             VNNI), so the products stay in f32"
        );
    }
    let info = ModelInfo { weight_bytes: model.weights_len() as u64, storage: "packed".into() };
    f(&mut lm, &tokenizer, info)
}

/// Runs `edgefold generate`.
pub fn cmd_generate(args: GenerateArgs) -> Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature {} is invalid; use a finite value of 0 or more", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p {} is invalid; use a value above 0 and at most 1", args.top_p);
    }
    let load_start = Instant::now();
    let model_path = args.model.clone();
    let products =
        Products { threads: args.threads.into(), int8_activations: args.int8_activations };
    with_model(
        &model_path,
        products,
        args.weights,
        args.max_seq,
        "--max-seq",
        |lm, tokenizer, info| {
            generate(lm, tokenizer, &args, &info.storage, load_start.elapsed().as_secs_f64())
        },
    )
}

fn generate(
    lm: &mut dyn CausalLm,
    tokenizer: &GgufTokenizer,
    args: &GenerateArgs,
    storage: &str,
    load_seconds: f64,
) -> Result<()> {
    let text = if args.chat { tokenizer.chat_prompt(&args.prompt)? } else { args.prompt.clone() };
    let prompt = tokenizer.encode(&text)?;
    if prompt.is_empty() {
        bail!("the prompt is empty; give some text with --prompt");
    }
    let context = lm.capacity();
    if prompt.len() >= context {
        let fix = match is_gguf(&args.model)? {
            true => "shorten it or raise --max-seq".to_string(),
            false => format!(
                "shorten it, or compress the model again with a larger --max-seq (this file \
                 was packed with {context})"
            ),
        };
        bail!(
            "the prompt has {} tokens but the context has {context} positions; {fix}",
            prompt.len()
        );
    }
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });

    let prompt_start = Instant::now();
    let mut logits = lm.forward(&prompt, false)?;
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
        let piece = stream.push(tokenizer, next);
        if !args.json {
            stdout.write_all(piece.as_bytes())?;
            stdout.flush()?;
        }
        out.push_str(&piece);
        if lm.len() == lm.capacity() {
            stop = "context full";
            break;
        }
        logits = lm.forward(&[next], false)?;
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
            "int8_activations": args.int8_activations,
            "weights": storage,
            "memory_kib": memory_kib(),
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

/// Reads the process's resident memory from `/proc/self/status` (Linux and Android): the peak
/// (`VmHWM`), and now the anonymous pages (`RssAnon`: heap, arena and stacks) apart from the
/// file pages (`RssFile`: the mapped model and the binary), in KiB. `None` elsewhere.
fn memory_kib() -> Option<serde_json::Value> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()
    };
    Some(json!({
        "peak_rss": field("VmHWM:")?,
        "rss_anon": field("RssAnon:")?,
        "rss_file": field("RssFile:")?,
    }))
}

/// Settings of `edgefold eval --task ppl`.
pub struct PerplexityOptions {
    /// Tokens scored (default 8192).
    pub limit: Option<usize>,
    /// Tokens per window.
    pub window: usize,
    /// Threads and activation precision of the matrix products.
    pub products: Products,
    /// Weight storage of the second model.
    pub weights: WeightKind,
    /// Print one JSON object on stdout.
    pub json: bool,
    /// Whether the original is the model that the packed file was compressed from, as `eval`
    /// reports it. `None` when the file stores no source sha256 to compare.
    pub source_matches: Option<bool>,
}

/// Runs `edgefold eval --task ppl`: perplexity of the original and of `file` on `data`.
pub fn eval_perplexity(
    original: &Path,
    file: &Path,
    data: &Path,
    options: PerplexityOptions,
) -> Result<()> {
    let PerplexityOptions { limit, window, products, weights, json, source_matches } = options;
    if window < 2 {
        bail!("--window {window} is too small; a window needs at least 2 tokens");
    }
    if limit.is_some_and(|l| l < 2) {
        bail!("--limit {} is too small; perplexity needs at least 2 tokens", limit.unwrap_or(0));
    }
    let text = std::fs::read_to_string(data)
        .with_context(|| format!("cannot read the text file {}", data.display()))?;
    let mut results = Vec::new();
    let mut same = false;
    for (i, path) in [original, file].into_iter().enumerate() {
        let second_differs = weights != WeightKind::F32 || products.int8_activations;
        if i == 1 && !second_differs && same_file(original, path) {
            same = true;
            break;
        }
        // The original always runs in f32; `weights` and int8 activations apply to the second
        // file.
        let (kind, run) = match i {
            0 => (WeightKind::F32, Products { int8_activations: false, ..products }),
            _ => (weights, products),
        };
        let (bytes, n_tokens, result, time) =
            with_model(path, run, kind, Some(window), "--window", |lm, tokenizer, info| {
                let mut tokens = tokenizer.encode(&text)?;
                tokens.truncate(limit.unwrap_or(8192));
                if tokens.len() < 2 {
                    bail!(
                        "{} contains fewer than 2 tokens; perplexity needs more text",
                        data.display()
                    );
                }
                let windows = tokens.len().div_ceil(window);
                let bar = ProgressBar::new(windows as u64).with_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows {eta}")
                        .expect("valid template"),
                );
                bar.set_message(format!("ppl {} ({})", path.display(), info.storage));
                let start = Instant::now();
                let result =
                    perplexity_of(lm, &tokens, window, |done| bar.set_position(done as u64))?;
                bar.finish_and_clear();
                Ok((info.weight_bytes, tokens.len(), result, start.elapsed()))
            })?;
        results.push((path.to_path_buf(), bytes, n_tokens, result, time, run.int8_activations));
    }
    if json {
        let entries: Vec<_> = results
            .iter()
            .map(|(path, bytes, tokens, r, time, int8)| {
                json!({
                    "file": path,
                    "int8_activations": int8,
                    "weight_bytes": bytes,
                    "tokens": tokens,
                    "scored": r.scored,
                    "windows": r.windows,
                    "perplexity": json_float(r.perplexity),
                    "mean_nll": json_float(r.mean_nll),
                    "seconds": time.as_secs_f64(),
                })
            })
            .collect();
        let ratio = (results.len() == 2).then(|| results[1].3.perplexity / results[0].3.perplexity);
        let report = json!({
            "task": "ppl",
            "source_matches": source_matches,
            "window": window,
            "results": entries,
            "perplexity_ratio": ratio.map(json_float),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for (path, bytes, tokens, r, time, int8) in &results {
        println!(
            "{}: perplexity {:.4} ({} of {tokens} tokens scored in {} {} of {window}){}, \
             weights of {} bytes, {:.1} s",
            path.display(),
            r.perplexity,
            r.scored,
            r.windows,
            if r.windows == 1 { "window" } else { "windows" },
            if *int8 { ", int8 activations" } else { "" },
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

/// Settings of `edgefold compress` for a GGUF language model.
pub struct GgufCompressOptions {
    /// Block storage: f32, int8 or int4 (groups with minimums).
    pub weights: WeightKind,
    /// Positions of the key-value cache.
    pub max_seq: usize,
    /// Smallest quality (original perplexity over the candidate's) the planner accepts.
    pub min_quality: Option<f64>,
    /// Text whose first tokens the planner scores candidates on.
    pub calibration: Option<PathBuf>,
    /// Tokens of the calibration text the planner scores.
    pub calibration_tokens: usize,
    /// Threads for the matrix products.
    pub threads: usize,
    /// Print one JSON object on stdout.
    pub json: bool,
}

/// One model the planner measured.
struct Candidate {
    weights: WeightKind,
    removed: Vec<usize>,
    bytes: usize,
    perplexity: f64,
    quality: f64,
}

/// Runs `edgefold compress` on a GGUF model: stores its blocks as asked, or lets the planner
/// choose the smallest storage and block removals that keep `min_quality`, and packs the result
/// with its tokenizer.
pub fn cmd_compress_gguf(model_path: &Path, output: &Path, o: GgufCompressOptions) -> Result<()> {
    if o.max_seq == 0 {
        bail!("--max-seq must be at least 1");
    }
    let started = Instant::now();
    let file = GgufFile::open(model_path)?;
    let spec = TokenizerSpec::from_gguf(&file)?;
    let mut original = Llama::from_gguf(&file)?;
    original.set_threads(o.threads);
    let f32_bytes = original.weight_bytes();
    let layers = original.config().layers;
    let (model, plan) = match o.min_quality {
        None => {
            let mut model = original;
            if o.weights != WeightKind::F32 {
                model.quantize(o.weights, None)?;
            }
            (model, None)
        }
        Some(min_quality) => {
            let Some(calibration) = &o.calibration else {
                bail!("--min-quality needs --calibration TEXT, a text file to score models on");
            };
            let (model, candidates) = plan_gguf(original, &spec, calibration, min_quality, &o)?;
            (model, Some(candidates))
        }
    };
    let mut metadata = source_metadata(model_path)?;
    metadata.push(("source".to_owned(), model_path.display().to_string().into_bytes()));
    let bytes = pack(&model, &spec, o.max_seq, &metadata)?;
    write_packed(output, &bytes)?;
    let kept = model.block_ids().to_vec();
    let report = json!({
        "model": model_path,
        "output": output,
        "file_bytes": bytes.len(),
        "source_bytes": file.file_len(),
        "f32_weight_bytes": f32_bytes,
        "weight_bytes": model.weight_bytes(),
        "fraction_of_f32": model.weight_bytes() as f64 / f32_bytes as f64,
        "blocks": kept.len(),
        "source_blocks": layers,
        "max_seq": o.max_seq,
        "seconds": started.elapsed().as_secs_f64(),
        "planner": plan.as_ref().map(|c: &Vec<Candidate>| c.iter().map(|c| json!({
            "weights": format!("{:?}", c.weights),
            "removed_blocks": c.removed,
            "weight_bytes": c.bytes,
            "perplexity": json_float(c.perplexity),
            "quality": json_float(c.quality),
        })).collect::<Vec<_>>()),
    });
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {} ({} bytes): {} of {} blocks, weights {:.1} % of f32, context {} positions",
            output.display(),
            bytes.len(),
            kept.len(),
            layers,
            100.0 * model.weight_bytes() as f64 / f32_bytes as f64,
            o.max_seq
        );
    }
    Ok(())
}

/// Picks the smallest storage whose perplexity ratio on the calibration text keeps
/// `min_quality`, then removes blocks in order of increasing Block Influence while it still
/// does, verifying each removal by perplexity (as SLEB does).
fn plan_gguf(
    original: Llama,
    spec: &TokenizerSpec,
    calibration: &Path,
    min_quality: f64,
    o: &GgufCompressOptions,
) -> Result<(Llama, Vec<Candidate>)> {
    if !(min_quality > 0.0 && min_quality <= 1.0) {
        bail!("--min-quality {min_quality} is invalid; give a fraction above 0 and at most 1");
    }
    const WINDOW: usize = 512;
    let text = std::fs::read_to_string(calibration)
        .with_context(|| format!("cannot read the calibration text {}", calibration.display()))?;
    let tokenizer = GgufTokenizer::from_spec(spec.clone())?;
    let mut tokens = tokenizer.encode(&text)?;
    tokens.truncate(o.calibration_tokens);
    if tokens.len() < 2 * WINDOW {
        bail!(
            "{} contains {} tokens; the planner needs at least {} to score models",
            calibration.display(),
            tokens.len(),
            2 * WINDOW
        );
    }
    let score = |model: &Llama| -> Result<f64> {
        let mut lm = HostLm::new(model.clone(), WINDOW);
        Ok(perplexity_of(&mut lm, &tokens, WINDOW, |_| {})?.perplexity)
    };
    let bar = ProgressBar::new_spinner();
    bar.set_message("planner: perplexity of the original");
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let base = score(&original)?;
    let mut candidates = Vec::new();
    let mut chosen: Option<Llama> = None;
    for kind in [WeightKind::Int4Min, WeightKind::Int8, WeightKind::F32] {
        bar.set_message(format!("planner: {kind:?} storage"));
        let mut model = original.clone();
        if kind != WeightKind::F32 {
            model.quantize(kind, None)?;
        }
        let perplexity = score(&model)?;
        let quality = base / perplexity;
        log::info!("{kind:?}: perplexity {perplexity:.4}, quality {quality:.4}");
        candidates.push(Candidate {
            weights: kind,
            removed: Vec::new(),
            bytes: model.weight_bytes(),
            perplexity,
            quality,
        });
        if quality >= min_quality {
            chosen = Some(model);
            break;
        }
    }
    let Some(mut model) = chosen else {
        bar.finish_and_clear();
        bail!(
            "no storage keeps --min-quality {min_quality} on {}: even f32 scores {:.4}",
            calibration.display(),
            candidates.last().map_or(0.0, |c| c.quality)
        );
    };
    let kind = candidates.last().map_or(WeightKind::F32, |c| c.weights);
    bar.set_message("planner: Block Influence");
    let influence =
        edgefold_compressor::llm::analysis::block_influence(&original, &tokens, WINDOW)?;
    let order = edgefold_compressor::llm::analysis::lowest_influence(&influence, influence.len());
    let mut removed = Vec::new();
    // The first and last blocks carry the most; removals stop at the first that fails.
    for &block in order.iter().take(8) {
        bar.set_message(format!("planner: removing block {block}"));
        let mut trial = model.clone();
        trial.remove_blocks(&[block]);
        let perplexity = score(&trial)?;
        let quality = base / perplexity;
        let mut ids = removed.clone();
        ids.push(block);
        candidates.push(Candidate {
            weights: kind,
            removed: ids.clone(),
            bytes: trial.weight_bytes(),
            perplexity,
            quality,
        });
        if quality < min_quality {
            break;
        }
        removed = ids;
        model = trial;
    }
    bar.finish_and_clear();
    Ok((model, candidates))
}

/// Settings of `edgefold analyze` for a GGUF language model.
pub struct AnalyzeOptions {
    /// Text the model runs on.
    pub calibration: PathBuf,
    /// Tokens of the text used.
    pub tokens: usize,
    /// Directory for report.json and the plots.
    pub report: Option<PathBuf>,
    /// Print one JSON object on stdout.
    pub json: bool,
}

/// Runs `edgefold analyze` on a GGUF model: Block Influence, angular distance and the
/// block-by-block cosine similarity of outputs on the calibration text, and the singular spectra
/// of the MLP matrices, raw and whitened by the Gram of their inputs.
pub fn cmd_analyze_gguf(model_path: &Path, o: AnalyzeOptions) -> Result<()> {
    use edgefold_compressor::llm::analysis::block_similarity;
    use edgefold_compressor::plots::{
        plot_block_influence, plot_similarity, plot_spectra, SpectrumPlot,
    };
    use edgefold_compressor::spectrum::{elbow_rank, energy_rank, summarize};
    use edgefold_compressor::whiten::Whitening;

    const WINDOW: usize = 512;
    let (model, tokenizer, _) = open_gguf(model_path, 1, WeightKind::F32)?;
    let text = std::fs::read_to_string(&o.calibration)
        .with_context(|| format!("cannot read the calibration text {}", o.calibration.display()))?;
    let mut tokens = tokenizer.encode(&text)?;
    tokens.truncate(o.tokens);
    if tokens.len() < 2 {
        bail!("{} contains fewer than 2 tokens", o.calibration.display());
    }
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar.set_message(format!("block similarity over {} tokens", tokens.len()));
    let similarity = block_similarity(&model, &tokens, WINDOW)?;
    bar.set_message("input Grams of the linear layers");
    let stats = model.calibrate(&tokens, WINDOW, |_| {})?;
    let layers = model.config().layers;
    let mut spectra = Vec::new();
    for block in 0..layers {
        for name in ["ffn_gate", "ffn_up", "ffn_down"] {
            bar.set_message(format!("spectra of block {block} {name}"));
            let Some(matrix) = model.block_matrix(block, name) else { continue };
            let (rows, cols) = (matrix.rows(), matrix.cols());
            let values = matrix.to_f32();
            let summary = summarize(&values, rows, cols)?;
            let whitened = match stats.gram(block, name) {
                Some(gram) => Some(Whitening::new(gram, cols)?.singular_values(&values, rows)?),
                None => None,
            };
            spectra.push((format!("blk.{block}.{name}"), summary, whitened));
        }
    }
    bar.finish_and_clear();

    let matrices: Vec<_> = spectra
        .iter()
        .map(|(name, s, w)| {
            json!({
                "name": name, "rows": s.rows, "cols": s.cols, "elbow": s.elbow,
                "energy_90": s.energy_90, "energy_99": s.energy_99, "break_even": s.break_even,
                "whitened_elbow": w.as_deref().map(elbow_rank),
                "whitened_energy_99": w.as_deref().map(|w| energy_rank(w, 0.99)),
                "singular_values": json_floats(&s.singular_values),
                "whitened_singular_values": w.as_deref().map(json_floats),
            })
        })
        .collect();
    let report = json!({
        "model": model_path,
        "calibration": o.calibration,
        "tokens": tokens.len(),
        "window": WINDOW,
        "blocks": {
            "influence": json_floats(&similarity.influence),
            "angular_distance": json_floats(&similarity.angular),
            "cosine": json_float_rows(&similarity.cosine),
        },
        "matrices": matrices,
    });
    if let Some(dir) = &o.report {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_output(&dir.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
        plot_block_influence(
            dir,
            "block_influence",
            "Block influence: 1 - cos(h_in, h_out) per block",
            &similarity.influence,
            &similarity.angular,
        )?;
        plot_similarity(
            dir,
            "block_similarity",
            "Cosine similarity of block outputs",
            &similarity.cosine,
        )?;
        for name in ["ffn_gate", "ffn_up", "ffn_down"] {
            // Six blocks spread over the depth keep the lines readable.
            let picked: Vec<SpectrumPlot> = spectra
                .iter()
                .filter(|(n, _, _)| n.ends_with(name))
                .step_by(layers.div_ceil(6).max(1))
                .map(|(n, s, w)| SpectrumPlot {
                    name: n,
                    singular_values: &s.singular_values,
                    whitened: w.as_deref(),
                    elbow: s.elbow,
                    energy_90: s.energy_90,
                    energy_99: s.energy_99,
                    break_even: s.break_even,
                })
                .collect();
            let title = format!("Singular spectra of {name} (solid raw, dashed whitened)");
            plot_spectra(dir, &format!("spectra_{name}"), &title, &picked)?;
        }
        eprintln!("report written to {}", dir.display());
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("block  influence (1 - cos)  angular distance  cosine with the next block's output");
    for b in 0..layers {
        let next = similarity.cosine[b].get(b + 1).map_or("-".into(), |c| format!("{c:.4}"));
        println!(
            "{b:>5}  {:>20.4}  {:>16.4}  {next:>10}",
            similarity.influence[b], similarity.angular[b]
        );
    }
    println!(
        "{:<20} {:>11} {:>6} {:>6} {:>10} {:>8} {:>8}",
        "matrix", "shape", "elbow", "99%", "break-even", "w.elbow", "w.99%"
    );
    for (name, s, w) in &spectra {
        let (we, w99) = match w {
            Some(w) => (elbow_rank(w).to_string(), energy_rank(w, 0.99).to_string()),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<20} {:>11} {:>6} {:>6} {:>10} {we:>8} {w99:>8}",
            format!("{}x{}", s.rows, s.cols),
            s.elbow,
            s.energy_99,
            s.break_even
        );
    }
    Ok(())
}
