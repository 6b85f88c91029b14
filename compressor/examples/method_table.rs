//! Measures each compression method alone on a sentence encoder: STS-B dev Spearman retained
//! (compressed / original, both run by the runtime in this process) and packed file size as a
//! percentage of the ONNX file. Prints a Markdown table on stdout and progress on stderr.
//!
//! ```sh
//! cargo run --release -p edgefold-compressor --example method_table -- \
//!     --model ../shared/data/models/all-MiniLM-L6-v2-fp32.onnx \
//!     --tokenizer models/paraphrase-MiniLM-L3-v2/tokenizer.json \
//!     --train ../shared/data/stsb/sts-train.csv --dev ../shared/data/stsb/sts-dev.csv
//! ```
//!
//! Calibration uses the first 256 distinct STS-B train sentences, as the planner does. Choices
//! that need a measurement (which blocks to drop, which runs to fuse, whether layer norms are
//! merged) are made on the last 300 train pairs, held apart from calibration, and every row is then
//! scored on all dev pairs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use edgefold_runtime::format::Dim;
use edgefold_runtime::ops::Op;
use edgefold_runtime::DType;

use edgefold_compressor::calibrate::{calibrate, Calibration};
use edgefold_compressor::datasets::{sentences, text_samples, Dataset};
use edgefold_compressor::fusion::{
    fuse_run, fuse_runs, similar_runs, FuseOptions, FusionChoice, Run,
};
use edgefold_compressor::gptq::quantize_linear_gptq;
use edgefold_compressor::ir::{Graph, Node, Storage, Value};
use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::{load_graph, pack_graph, CompressOptions};
use edgefold_compressor::planner::{drop_blocks, verified_drop_order, Evaluator, Task};
use edgefold_compressor::quantize::{quantize, quantize_i4_min, LowRank, Quantize};
use edgefold_compressor::spectrum::low_rank_factors;
use edgefold_compressor::text::{read_sts, TextEncoder};
use edgefold_compressor::whiten::Whitening;

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// The ONNX sentence encoder.
    #[arg(long)]
    model: PathBuf,
    /// Its tokenizer.json.
    #[arg(long)]
    tokenizer: PathBuf,
    /// STS-B train pairs: calibration sentences and the selection pairs.
    #[arg(long)]
    train: PathBuf,
    /// STS-B dev pairs, every one of which scores each row.
    #[arg(long)]
    dev: PathBuf,
    /// Measure only the storage precisions (f16, int8 and the int4 variants).
    #[arg(long)]
    precision_only: bool,
    /// Calibration sentences (distinct, from the start of the train file).
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// Selection pairs (from the end of the train file).
    #[arg(long, default_value_t = 300)]
    selection_pairs: usize,
    /// Score rows on only the first N dev pairs (for a quick trial run).
    #[arg(long)]
    dev_limit: Option<usize>,
}

/// One measured row of the table.
struct Row {
    method: String,
    detail: String,
    bytes: usize,
    linear_bytes: usize,
    quality: f64,
    build_seconds: f64,
    eval_seconds: f64,
}

/// Everything the rows share.
struct Bench<'a> {
    model: &'a Path,
    original: &'a Graph,
    options: CompressOptions,
    dev: &'a Evaluator,
    onnx_bytes: u64,
    rows: Vec<Row>,
}

impl Bench<'_> {
    /// Packs `graph` as `edgefold compress` would (tokenizer included), scores it, and records it.
    fn measure(&mut self, method: &str, detail: &str, graph: &Graph, build: f64) -> Result<f64> {
        let bytes = pack_graph(self.model, graph, &self.options, method)?.len();
        let started = Instant::now();
        let quality = self.dev.quality(graph)?;
        let eval_seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "{method} ({detail}): {:.2} % retained, {:.1} % of the ONNX file, \
             built in {build:.1} s, scored in {eval_seconds:.1} s",
            100.0 * quality,
            100.0 * bytes as f64 / self.onnx_bytes as f64
        );
        self.rows.push(Row {
            method: method.to_owned(),
            detail: detail.to_owned(),
            bytes,
            linear_bytes: linear_weight_bytes(graph),
            quality,
            build_seconds: build,
            eval_seconds,
        });
        Ok(quality)
    }
}

/// Bytes of every constant read as a linear weight.
fn linear_weight_bytes(graph: &Graph) -> usize {
    let mut weights: Vec<usize> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Linear { .. }))
        .filter_map(|n| n.inputs.get(1).copied().flatten())
        .filter(|&w| graph.is_const(w))
        .collect();
    weights.sort_unstable();
    weights.dedup();
    weights.iter().filter_map(|&w| graph.values[w].data.as_ref()).map(Storage::byte_len).sum()
}

/// Returns the largest rank whose two factors have at most `fraction` of the parameters of an
/// `n × k` weight.
fn rank_for_fraction(n: usize, k: usize, fraction: f64) -> usize {
    ((fraction * (n * k) as f64) / (n + k) as f64).floor() as usize
}

/// Replaces every f32 linear weight W (n × k) by factors of the rank that keeps `fraction` of its
/// parameters: plain truncated SVD, or whitened by the input Gram when `calibration` is given.
fn factorize_fraction(
    graph: &mut Graph,
    fraction: f64,
    calibration: Option<&Calibration>,
) -> Result<usize> {
    let mut whitenings: HashMap<String, Whitening> = HashMap::new();
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    let mut count = 0;
    for node in std::mem::take(&mut graph.nodes) {
        let (Some(x), Some(w)) =
            (node.inputs.first().copied().flatten(), node.inputs.get(1).copied().flatten())
        else {
            nodes.push(node);
            continue;
        };
        let (Op::Linear { .. }, Some(Storage::F32(data)), [n, k]) =
            (node.op, &graph.values[w].data, graph.values[w].shape.as_slice())
        else {
            nodes.push(node);
            continue;
        };
        let (n, k) = (n.factor as usize, k.factor as usize);
        let rank = rank_for_fraction(n, k, fraction);
        let (left, right) = match calibration {
            None => low_rank_factors(data, n, k, rank)?,
            Some(c) => {
                let input = graph.values[x].name.clone();
                let stats = c.inputs.get(&input).with_context(|| {
                    format!("no calibration statistics for {input}, the input of {}", node.name)
                })?;
                if !whitenings.contains_key(&input) {
                    whitenings.insert(input.clone(), Whitening::new(&stats.gram, k)?);
                }
                whitenings[&input].factors(data, n, rank)?
            }
        };
        let name = graph.values[w].name.clone();
        let right = graph.add_const(format!("{name}.right"), vec![rank, k], Storage::F32(right));
        let left = graph.add_const(format!("{name}.left"), vec![n, rank], Storage::F32(left));
        let mut shape = graph.values[x].shape.clone();
        *shape.last_mut().context("linear input of rank 0")? = Dim::constant(rank as u32);
        let mid = graph.add_value(Value {
            name: format!("{}.low_rank", node.name),
            dtype: DType::F32,
            shape,
            data: None,
        });
        nodes.push(Node {
            name: format!("{}.right", node.name),
            op: Op::Linear { activation: None },
            inputs: vec![Some(x), Some(right)],
            outputs: vec![mid],
        });
        let mut inputs = vec![Some(mid), Some(left)];
        inputs.extend(node.inputs.get(2).copied());
        nodes.push(Node {
            name: format!("{}.left", node.name),
            // The activation, if any, applies to the product of both factors.
            op: node.op,
            inputs,
            outputs: node.outputs,
        });
        count += 1;
    }
    graph.nodes = nodes;
    graph.prune();
    Ok(count)
}

fn sts_evaluator(
    graph: &Graph,
    encoder: TextEncoder,
    pairs: Vec<edgefold_compressor::text::StsPair>,
) -> Result<Evaluator> {
    Ok(Evaluator::new(graph, Task::Sts { encoder, pairs, output: None })?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let started = Instant::now();
    let onnx_bytes = std::fs::metadata(&args.model)
        .with_context(|| format!("cannot read {}", args.model.display()))?
        .len();
    let import = ImportOptions { max_batch: 1, max_seq: 128 };
    let (original, _) = load_graph(&args.model, &import)?;
    let encoder = TextEncoder::from_file(&args.tokenizer, 128)?;
    let input_names: Vec<String> =
        original.inputs.iter().map(|&v| original.values[v].name.clone()).collect();

    // Calibration and selection data, both from the train file.
    let train = read_sts(&args.train)?;
    // Calibration takes about two sentences per pair from the start, so one pair per sentence
    // leaves a margin.
    let needed = args.selection_pairs + args.samples;
    if train.len() < needed {
        bail!(
            "{} has {} pairs, but holding {} selection pairs apart from {} calibration \
             sentences needs {}",
            args.train.display(),
            train.len(),
            args.selection_pairs,
            args.samples,
            needed
        );
    }
    let mut calibration_sentences = sentences(&Dataset::Pairs(train.clone()));
    calibration_sentences.dedup();
    calibration_sentences.truncate(args.samples);
    let samples =
        text_samples(&encoder, &input_names, &calibration_sentences).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let calibration = calibrate(&original, &samples, |_| {})?;
    eprintln!("calibrated on {} sentences in {:.1} s", samples.len(), t.elapsed().as_secs_f64());
    let selection_pairs = train[train.len() - args.selection_pairs..].to_vec();
    let selection_encoder = TextEncoder::from_file(&args.tokenizer, 128)?;
    let selection = sts_evaluator(&original, selection_encoder, selection_pairs)?;

    let mut dev_pairs = read_sts(&args.dev)?;
    if let Some(limit) = args.dev_limit {
        dev_pairs.truncate(limit);
    }
    let dev_count = dev_pairs.len();
    let t = Instant::now();
    let dev = sts_evaluator(&original, encoder, dev_pairs)?;
    eprintln!(
        "original: Spearman {:.4} on {dev_count} dev pairs ({:.1} s), {:.4} on the selection pairs",
        dev.baseline(),
        t.elapsed().as_secs_f64(),
        selection.baseline()
    );

    let options = CompressOptions {
        quantize: Quantize::F32,
        low_rank: LowRank::Off,
        import,
        tokenizer: Some(args.tokenizer.clone()),
    };
    let mut bench = Bench {
        model: &args.model,
        original: &original,
        options,
        dev: &dev,
        onnx_bytes,
        rows: Vec::new(),
    };
    bench.measure("none (f32)", "packed as is", &original, 0.0)?;

    let selections = match args.precision_only {
        true => String::new(),
        false => {
            let selections = measure_removals(&mut bench, &selection, &calibration)?;
            measure_low_rank(&mut bench, &calibration)?;
            selections
        }
    };
    measure_precision(&mut bench, &calibration)?;

    println!("{}", render(&bench, dev_count));
    println!("{selections}");
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Measures block drop and fusion, with their choices made on the selection pairs. Returns a
/// Markdown table of the selection scores.
fn measure_removals(
    bench: &mut Bench,
    selection: &Evaluator,
    calibration: &Calibration,
) -> Result<String> {
    let original = bench.original;
    let t = Instant::now();
    let order =
        verified_drop_order(original, selection, 2, f64::NEG_INFINITY, |m| eprintln!("  {m}"))?;
    let order_seconds = t.elapsed().as_secs_f64();
    let mut table = String::from(
        "| candidate | layer norms | quality on the selection pairs |\n|---|---|---:|\n",
    );
    for (removed, &(block, quality)) in order.iter().enumerate() {
        table.push_str(&format!(
            "| drop {} (verified order, step {}) | - | {quality:.4} |\n",
            block,
            removed + 1
        ));
    }
    for removed in 1..=2 {
        let blocks: Vec<usize> = order.iter().take(removed).map(|&(b, _)| b).collect();
        let mut g = original.clone();
        drop_blocks(&mut g, &blocks);
        bench.measure(
            &format!("drop {removed} block{}", if removed > 1 { "s" } else { "" }),
            &format!("blocks {blocks:?}, verified order"),
            &g,
            order_seconds,
        )?;
    }

    let stats = calibration.blocks.as_ref().context("no blocks found in the model")?;
    for removed in 1..=2 {
        // Every run of `removed + 1` blocks, with and without merged layer norms.
        let t = Instant::now();
        let mut scored: Vec<(FuseOptions, Vec<(Run, f64)>)> = Vec::new();
        for layer_norm in [true, false] {
            let options = FuseOptions { layer_norm };
            let mut runs = Vec::new();
            for start in stats.blocks.iter().take(stats.blocks.len() - removed) {
                let run = Run { first: start.index, merged: removed };
                let mut g = original.clone();
                fuse_run(&mut g, run, options)?;
                let q = selection.quality(&g)?;
                eprintln!("  fuse {run}, layer norms merged {layer_norm}: {q:.4}");
                let label = if layer_norm { "merged" } else { "first block's" };
                table.push_str(&format!("| fuse {run} | {label} | {q:.4} |\n"));
                runs.push((run, q));
            }
            scored.push((options, runs));
        }
        let search_seconds = t.elapsed().as_secs_f64();
        let (options, runs) = scored
            .into_iter()
            .max_by(|a, b| best(&a.1).total_cmp(&best(&b.1)))
            .expect("two option sets");
        let choice = FusionChoice { runs, drop_order: order.clone() };
        let (run, q) = choice.best_run().context("no fusable run")?;
        let verdict = match choice.winner() {
            Some(_) => "beats",
            None => "does not beat",
        };
        let norms =
            if options.layer_norm { "layer norms merged" } else { "first block's layer norms" };
        let mut g = original.clone();
        fuse_run(&mut g, run, options)?;
        bench.measure(
            &format!("fusion, {removed} removed, verified best"),
            &format!(
                "{run}, {norms}; selection {q:.4} {verdict} drop {:.4}",
                choice.drop_quality(removed).unwrap_or(f64::NAN)
            ),
            &g,
            search_seconds,
        )?;

        for layer_norm in [true, false] {
            let t = Instant::now();
            let runs = similar_runs(stats, removed);
            let mut g = original.clone();
            fuse_runs(&mut g, &runs, FuseOptions { layer_norm })?;
            let names: Vec<String> = runs.iter().map(Run::to_string).collect();
            let norms = if layer_norm { "layer norms merged" } else { "first block's layer norms" };
            bench.measure(
                &format!("fusion, {removed} removed, cosine choice"),
                &format!("{}, {norms}", names.join(" and ")),
                &g,
                t.elapsed().as_secs_f64(),
            )?;
        }
    }
    Ok(table)
}

fn best(runs: &[(Run, f64)]) -> f64 {
    runs.iter().map(|r| r.1).fold(f64::NEG_INFINITY, f64::max)
}

/// Measures plain and whitened low-rank factorization at 90 % and 70 % of the linear weights'
/// parameters.
fn measure_low_rank(bench: &mut Bench, calibration: &Calibration) -> Result<()> {
    for (method, whitened) in [("plain low-rank", false), ("whitened low-rank", true)] {
        for fraction in [0.9, 0.7] {
            let t = Instant::now();
            let mut g = bench.original.clone();
            let count = factorize_fraction(&mut g, fraction, whitened.then_some(calibration))?;
            let detail =
                format!("{:.0} % of the parameters of {count} linear weights", 100.0 * fraction);
            bench.measure(method, &detail, &g, t.elapsed().as_secs_f64())?;
        }
    }
    Ok(())
}

/// Measures storage precision alone: f16, int8 per row, int4 groups with plain rounding and with
/// GPTQ.
fn measure_precision(bench: &mut Bench, calibration: &Calibration) -> Result<()> {
    for (method, mode, detail) in [
        ("f16", Quantize::F16, "linear weights and the embedding tables"),
        ("int8", Quantize::Int8, "per output channel; embedding tables per row"),
        ("int4", Quantize::Int4, "groups of 32, plain rounding; embedding tables int8"),
    ] {
        let t = Instant::now();
        let mut g = bench.original.clone();
        quantize(&mut g, mode);
        bench.measure(method, detail, &g, t.elapsed().as_secs_f64())?;
    }
    // The same tensors as plain int4, each with an f16 minimum per group as well.
    let t = Instant::now();
    let mut g = bench.original.clone();
    quantize(&mut g, Quantize::Int4);
    for (value, original) in g.values.iter_mut().zip(&bench.original.values) {
        let (Some(Storage::I4Grouped { group, .. }), Some(Storage::F32(data))) =
            (&value.data, &original.data)
        else {
            continue;
        };
        let group = *group;
        let [rows, cols] = value.const_shape()[..] else { continue };
        let (packed, scales, mins) = quantize_i4_min(data, rows, cols, group);
        value.data = Some(Storage::I4GroupedMin { packed, scales, mins, group });
    }
    bench.measure(
        "int4 with minimums",
        "groups of 32, f16 scale and minimum, plain rounding; embedding tables int8",
        &g,
        t.elapsed().as_secs_f64(),
    )?;

    let t = Instant::now();
    let mut g = bench.original.clone();
    quantize_linear_gptq(&mut g, calibration)?;
    quantize(&mut g, Quantize::Int4);
    bench.measure(
        "int4, GPTQ",
        "groups of 32, error feedback; embedding tables int8",
        &g,
        t.elapsed().as_secs_f64(),
    )?;
    Ok(())
}

/// Renders the rows as a Markdown table.
fn render(bench: &Bench, dev_count: usize) -> String {
    let linear_f32 = linear_weight_bytes(bench.original) as f64;
    let mut out = format!(
        "Original: STS-B dev Spearman {:.4} over {dev_count} pairs; ONNX file {} bytes.\n\n\
         | method | setting | bytes | % of ONNX | linear-weight bytes, % of f32 | Spearman \
         | retained | build (s) | score (s) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        bench.dev.baseline(),
        bench.onnx_bytes
    );
    for r in &bench.rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.4} | {:.2} % | {:.1} | {:.1} |\n",
            r.method,
            r.detail,
            r.bytes,
            100.0 * r.bytes as f64 / bench.onnx_bytes as f64,
            100.0 * r.linear_bytes as f64 / linear_f32,
            r.quality * bench.dev.baseline(),
            100.0 * r.quality,
            r.build_seconds,
            r.eval_seconds
        ));
    }
    out
}
