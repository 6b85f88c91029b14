//! `edgefold bench`: load time and latency of a packed text encoder on a synthetic token input, or
//! of the original ONNX model with tract, and with --profile the time spent in each op.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use edgefold_compressor::exec::alloc_arena;
use edgefold_compressor::reference::ReferenceModel;
use edgefold_compressor::tensor::HostTensor;
use edgefold_runtime::{Model, Session};

use crate::inspect::open_mapped;
use crate::kind::{check_model_kind, PackedKind};
use crate::report::{counted, json_float, median, print_json};

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// The packed file, or with --engine tract the ONNX model.
    file: PathBuf,
    /// Engine that runs the model: edgefold (the packed file) or tract (an ONNX file).
    #[arg(long, default_value = "edgefold")]
    engine: String,
    /// Sequence length of the synthetic token input.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed runs after the first one (at least 1).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
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
    pub(crate) json: bool,
}

/// Synthetic text-encoder input of `seq` tokens for an input named like a BERT input.
fn token_input(name: &str, seq: usize) -> Result<Vec<i64>> {
    let token = |i: usize| -> i64 {
        match name {
            "input_ids" if i == 0 => 101,
            "input_ids" if i + 1 == seq => 102,
            "input_ids" => 1000 + (i as i64 * 7919) % 20000,
            "attention_mask" => 1,
            _ => 0,
        }
    };
    if !matches!(name, "input_ids" | "attention_mask" | "token_type_ids") {
        bail!("bench feeds token inputs only; the model has an input named {name:?}");
    }
    let mut values = Vec::new();
    if values.try_reserve_exact(seq).is_err() {
        bail!("failed to allocate an input of {seq} tokens; pass a shorter --seq");
    }
    values.extend((0..seq).map(token));
    Ok(values)
}

pub(crate) fn cmd_bench(args: BenchArgs) -> Result<()> {
    if args.seq == 0 {
        bail!("--seq must be at least 1");
    }
    let started = Instant::now();
    let mut times = Vec::with_capacity(args.runs as usize);
    let mut profile = args.profile.then(OpProfile::default);
    let first;
    let opened;
    match args.engine.as_str() {
        "edgefold" => {
            let map = open_mapped(&args.file)?;
            let model = Model::open(map.bytes())
                .with_context(|| format!("{} is not a valid packed file", args.file.display()))?;
            let graphs = [PackedKind::Graph, PackedKind::SentenceEncoder];
            check_model_kind(&args.file, &model, &graphs, "a text encoder graph")?;
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
            if edgefold_compressor::onnx::is_packed_file(&args.file) {
                bail!(
                    "{} is a packed .fold file, not ONNX; bench it with --engine edgefold",
                    args.file.display()
                );
            }
            let model = ReferenceModel::load(&args.file)?;
            opened = started.elapsed().as_secs_f64();
            let inputs: Vec<HostTensor> = model
                .input_names()
                .iter()
                .map(|n| token_input(n, args.seq).map(|v| HostTensor::i64(vec![1, args.seq], v)))
                .collect::<Result<_>>()?;
            run_tract(&model, &inputs, &args)?;
            first = started.elapsed().as_secs_f64();
            for _ in 0..args.runs {
                let t = Instant::now();
                run_tract(&model, &inputs, &args)?;
                times.push(t.elapsed().as_secs_f64());
            }
        }
        other => bail!("--engine {other} is not known; use edgefold or tract"),
    }
    let med = median(&mut times);
    let runs = f64::from(args.runs);
    if args.json {
        let mut out = json!({
            "file": args.file, "engine": args.engine, "seq": args.seq, "runs": args.runs,
            "threads": args.threads, "int8_activations": args.int8_activations,
            "open_ms": opened * 1e3, "load_to_first_output_ms": first * 1e3,
            "latency_ms_median": json_float(med * 1e3),
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
            "{} ({}), sequence {}: open {:.2} ms, load to first output {:.2} ms, median latency {:.2} ms over {}",
            args.file.display(), args.engine, args.seq, opened * 1e3, first * 1e3, med * 1e3, counted(args.runs, "run")
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

/// Runs `model` with tract. A panic inside tract, as on an allocation that fails for a large
/// --seq, becomes an error that names the file and the sequence length.
fn run_tract(model: &ReferenceModel, inputs: &[HostTensor], args: &BenchArgs) -> Result<()> {
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| model.run(inputs)));
    std::panic::set_hook(previous_hook);
    match outcome {
        Ok(result) => result.map(drop).map_err(Into::into),
        Err(payload) => {
            let detail = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            bail!(
                "tract panicked running {} with --seq {}: {detail}; pass a shorter --seq",
                args.file.display(),
                args.seq
            )
        }
    }
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
