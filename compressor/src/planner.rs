//! The quality-driven planner. It measures which blocks can go (SLEB-style greedy verification),
//! builds candidate models from combinations of block removal, whitened low-rank and weight
//! precision, evaluates them against the original, and picks the smallest that meets a quality
//! floor or the best that fits a size budget. The search is deterministic.

use edgefold_runtime::format::Dim;
use edgefold_runtime::ops::Op;

use crate::blocks::{drop_block, find_blocks};
use crate::calibrate::{Calibration, InputStats};
use crate::embed::{choose_output, finish, input_for, EmbedError, OutputChoice};
use crate::exec::{ExecError, PackedGraph};
use crate::gptq::quantize_linear_gptq;
use crate::ir::{Graph, Node, Storage, Value};
use crate::metrics::{error_correlation, reconstruction_errors, top1_accuracy};
use crate::quantize::{quantize, quantize_conv_int4, quantize_i4, Quantize, INT4_GROUP};
use crate::spectrum::{break_even_rank, energy_rank, SpectrumError};
use crate::tensor::HostTensor;
use crate::text::{cosine, spearman, StsPair, TextEncoder};
use crate::whiten::{WhitenedSvd, Whitening};

/// Error from a planning run.
#[derive(Debug)]
#[non_exhaustive]
pub enum PlanError {
    /// Running a candidate failed.
    Exec(ExecError),
    /// A factorization or quantization step failed.
    Spectrum(SpectrumError),
    /// Text set-up failed.
    Embed(EmbedError),
    /// No candidate meets the goal.
    NoCandidate(String),
    /// The evaluation data does not suit the task.
    Data(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Exec(e) => write!(f, "{e}"),
            PlanError::Spectrum(e) => write!(f, "{e}"),
            PlanError::Embed(e) => write!(f, "{e}"),
            PlanError::NoCandidate(m) | PlanError::Data(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for PlanError {}

impl From<ExecError> for PlanError {
    fn from(e: ExecError) -> Self {
        PlanError::Exec(e)
    }
}

impl From<SpectrumError> for PlanError {
    fn from(e: SpectrumError) -> Self {
        PlanError::Spectrum(e)
    }
}

/// Target of a planning run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// The smallest model whose quality, as a fraction of the original's, is at least this.
    MinQuality(f64),
    /// The best quality among models of at most this many bytes.
    TargetSize(u64),
}

/// Metric that scores candidates.
#[allow(clippy::large_enum_variant)] // one value per planning run; boxing buys nothing
pub enum Task {
    /// Spearman correlation of embedding cosine similarities with gold scores.
    Sts {
        /// Tokenizer.
        encoder: TextEncoder,
        /// Held-apart pairs.
        pairs: Vec<StsPair>,
        /// Embedding output choice; `None` picks by the usual rule.
        output: Option<String>,
    },
    /// Mean cosine similarity between each output and the original model's on the same inputs.
    Raw {
        /// Held-apart inputs.
        samples: Vec<Vec<HostTensor>>,
    },
    /// Top-1 accuracy of the first output against labels.
    Accuracy {
        /// Held-apart inputs.
        samples: Vec<Vec<HostTensor>>,
        /// One class index per sample.
        labels: Vec<i64>,
    },
    /// Correlation of the autoencoder's reconstruction errors with the original's.
    Anomaly {
        /// Held-apart inputs.
        samples: Vec<Vec<HostTensor>>,
    },
}

impl Task {
    /// The task's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Sts { .. } => "sts",
            Task::Raw { .. } => "raw",
            Task::Accuracy { .. } => "accuracy",
            Task::Anomaly { .. } => "anomaly",
        }
    }
}

/// One point of the search space.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scheme {
    /// Blocks removed, in the verified order.
    pub drops: usize,
    /// Energy kept by whitened low-rank factorization, or `None` for no factorization.
    pub low_rank: Option<f64>,
    /// Precision of linear weights (int4 uses error feedback from calibration).
    pub linear: Quantize,
    /// Precision of embedding tables.
    pub tables: Quantize,
}

impl Scheme {
    /// Returns whether `self` removes no more blocks, keeps no less energy and uses no fewer bits than
    /// `other` in every part.
    pub fn at_least_as_precise_as(&self, other: &Scheme) -> bool {
        let energy = |s: &Scheme| s.low_rank.unwrap_or(1.0);
        let bits = |q: Quantize| match q {
            Quantize::Int4 => 4,
            Quantize::Int8 => 8,
            Quantize::F16 => 16,
            Quantize::F32 => 32,
        };
        self.drops <= other.drops
            && energy(self) >= energy(other)
            && bits(self.linear) >= bits(other.linear)
            && bits(self.tables) >= bits(other.tables)
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "drop {}, linear {}, tables {}", self.drops, self.linear, self.tables)?;
        match self.low_rank {
            Some(e) => write!(f, ", low-rank {e}"),
            None => Ok(()),
        }
    }
}

/// A candidate the planner looked at.
#[derive(Clone, Debug)]
pub struct Tried {
    /// Its settings.
    pub scheme: Scheme,
    /// Packed size in bytes (without metadata).
    pub bytes: u64,
    /// Quality as a fraction of the original's on the screening data, when evaluated.
    pub quality: Option<f64>,
    /// Quality on all of the evaluation data, for candidates that passed the screen.
    pub confirmed: Option<f64>,
}

/// The planner's decision and the evidence for it.
pub struct PlanOutcome {
    /// The chosen model.
    pub graph: Graph,
    /// Its settings.
    pub scheme: Scheme,
    /// Its quality as a fraction of the original's.
    pub quality: f64,
    /// The original's metric on the evaluation data.
    pub baseline: f64,
    /// Blocks in removal order with the quality after each removal (f32 weights).
    pub drop_order: Vec<(usize, f64)>,
    /// Every candidate considered.
    pub tried: Vec<Tried>,
}

/// Scores graphs on the evaluation data.
pub struct Evaluator {
    task: Task,
    choice: Option<OutputChoice>,
    inputs: Vec<String>,
    reference: Vec<HostTensor>,
    errors: Vec<f64>,
    screen: usize,
    screen_baseline: f64,
    baseline: f64,
}

impl Evaluator {
    /// Prepares the task and scores the original graph on all of the evaluation data.
    ///
    /// # Errors
    /// When the graph cannot run or has no usable output.
    pub fn new(original: &Graph, task: Task) -> Result<Self, PlanError> {
        Self::with_screening(original, task, usize::MAX)
    }

    /// Like [`Evaluator::new`], but [`Evaluator::quality`] scores only the first `screen` pairs or
    /// samples, a quick screen, while [`Evaluator::confirmed_quality`] scores all of them.
    ///
    /// # Errors
    /// When the graph cannot run or has no usable output.
    pub fn with_screening(original: &Graph, task: Task, screen: usize) -> Result<Self, PlanError> {
        let inputs = original.inputs.iter().map(|&v| original.values[v].name.clone()).collect();
        let choice = match &task {
            Task::Sts { output, .. } => {
                let described: Vec<(String, bool, usize)> = original
                    .outputs
                    .iter()
                    .map(|&v| {
                        let value = &original.values[v];
                        (
                            value.name.clone(),
                            value.dtype == edgefold_runtime::DType::F32,
                            value.shape.len(),
                        )
                    })
                    .collect();
                Some(choose_output(&described, output.as_deref()).map_err(PlanError::Embed)?)
            }
            Task::Raw { .. } | Task::Accuracy { .. } | Task::Anomaly { .. } => None,
        };
        let mut evaluator = Evaluator {
            task,
            choice,
            inputs,
            reference: Vec::new(),
            errors: Vec::new(),
            screen: screen.max(1),
            screen_baseline: 1.0,
            baseline: 1.0,
        };
        let mut packed = PackedGraph::new(original)?;
        match &evaluator.task {
            Task::Raw { samples } => {
                let mut reference = Vec::new();
                for s in samples {
                    reference.extend(packed.run(s)?);
                }
                evaluator.reference = reference;
            }
            Task::Anomaly { samples } => {
                if samples.len() < 2 {
                    return Err(PlanError::Data(
                        "the anomaly task correlates errors over samples; give at least 2".into(),
                    ));
                }
                evaluator.errors = reconstruction_errors_of(&mut packed, samples)?;
            }
            Task::Sts { .. } | Task::Accuracy { .. } => {}
        }
        evaluator.baseline = evaluator.metric(&mut packed, usize::MAX)?;
        evaluator.screen_baseline = match evaluator.screens() {
            true => evaluator.metric(&mut packed, evaluator.screen)?,
            false => evaluator.baseline,
        };
        log::info!(
            "original scores {:.4} on the evaluation data ({:.4} on the screening part)",
            evaluator.baseline,
            evaluator.screen_baseline
        );
        Ok(evaluator)
    }

    /// Returns the original's metric on all of the evaluation data.
    pub fn baseline(&self) -> f64 {
        self.baseline
    }

    /// Pairs or samples of the evaluation data.
    fn len(&self) -> usize {
        match &self.task {
            Task::Sts { pairs, .. } => pairs.len(),
            Task::Raw { samples } | Task::Accuracy { samples, .. } | Task::Anomaly { samples } => {
                samples.len()
            }
        }
    }

    /// Whether screening uses less than all of the evaluation data.
    fn screens(&self) -> bool {
        self.screen < self.len()
    }

    /// The metric on the first `limit` pairs or samples.
    fn metric(&self, packed: &mut PackedGraph, limit: usize) -> Result<f64, PlanError> {
        let n = limit.min(self.len());
        match &self.task {
            Task::Sts { pairs, .. } => {
                let pairs = &pairs[..n];
                let workers = std::thread::available_parallelism()
                    .map_or(1, |w| w.get())
                    .clamp(1, pairs.len().div_ceil(16).max(1));
                let chunk = pairs.len().div_ceil(workers).max(1);
                let mut parts = pairs.chunks(chunk);
                let first = parts.next().unwrap_or(&[]);
                let bytes = packed.bytes().to_vec();
                let mut sims = Vec::with_capacity(pairs.len());
                // Pairs are scored independently, so splitting them among threads (each with
                // its own arena) gives the same similarities in the same order.
                std::thread::scope(|scope| -> Result<(), PlanError> {
                    let handles: Vec<_> = parts
                        .map(|part| {
                            let bytes = &bytes;
                            scope.spawn(move || -> Result<Vec<f64>, PlanError> {
                                let mut own = PackedGraph::from_bytes(bytes)?;
                                self.similarities(&mut own, part)
                            })
                        })
                        .collect();
                    sims.extend(self.similarities(packed, first)?);
                    for h in handles {
                        let part = h
                            .join()
                            .map_err(|_| PlanError::Data("an evaluation thread panicked".into()))?;
                        sims.extend(part?);
                    }
                    Ok(())
                })?;
                let gold: Vec<f64> = pairs.iter().map(|p| p.score).collect();
                Ok(spearman(&sims, &gold))
            }
            Task::Raw { samples } => {
                let mut total = 0.0;
                let mut count = 0usize;
                let mut r = self.reference.iter();
                for s in &samples[..n] {
                    for out in packed.run(s)? {
                        let reference = r.next().and_then(HostTensor::as_f32);
                        if let (Some(a), Some(b)) = (out.as_f32(), reference) {
                            total += cosine(a, b);
                            count += 1;
                        }
                    }
                }
                Ok(total / count.max(1) as f64)
            }
            Task::Accuracy { samples, labels } => {
                let mut outputs = Vec::with_capacity(n);
                for s in &samples[..n] {
                    outputs.push(packed.run(s)?);
                }
                let scores: Vec<&[f32]> = outputs
                    .iter()
                    .map(|o| o.first().and_then(HostTensor::as_f32).unwrap_or(&[]))
                    .collect();
                Ok(top1_accuracy(&scores, &labels[..n]))
            }
            Task::Anomaly { samples } => {
                let errors = reconstruction_errors_of(packed, &samples[..n.max(2)])?;
                Ok(error_correlation(&self.errors[..errors.len()], &errors))
            }
        }
    }

    /// Cosine similarity of the two sentence embeddings of each pair.
    fn similarities(
        &self,
        packed: &mut PackedGraph,
        pairs: &[StsPair],
    ) -> Result<Vec<f64>, PlanError> {
        let Task::Sts { encoder, .. } = &self.task else {
            return Err(PlanError::Data("sentence pairs need the sts task".into()));
        };
        let Some(choice) = self.choice else {
            return Err(PlanError::Data("no embedding output was chosen".into()));
        };
        let mut embed = |s: &str| -> Result<Vec<f32>, PlanError> {
            let e = encoder.encode(s).map_err(|e| PlanError::Embed(EmbedError::Text(e)))?;
            let n = e.ids.len();
            let inputs: Vec<HostTensor> = self
                .inputs
                .iter()
                .map(|name| input_for(name, &e).map(|v| HostTensor::i64(vec![1, n], v.to_vec())))
                .collect::<Result<_, _>>()
                .map_err(PlanError::Embed)?;
            let out = packed.run(&inputs)?;
            let t = &out[choice.index];
            let dim = *t.shape.last().unwrap_or(&1);
            Ok(finish(t.as_f32().unwrap_or(&[]), dim, choice.pooled, &e.attention_mask))
        };
        pairs.iter().map(|p| Ok(cosine(&embed(&p.sentence1)?, &embed(&p.sentence2)?))).collect()
    }

    /// Quality of `graph` as a fraction of the original's, on the screening part of the data.
    ///
    /// # Errors
    /// When the graph cannot run.
    pub fn quality(&self, graph: &Graph) -> Result<f64, PlanError> {
        let mut packed = PackedGraph::new(graph)?;
        Ok(self.metric(&mut packed, self.screen)? / self.screen_baseline)
    }

    /// Quality of `graph` as a fraction of the original's on all of the evaluation data;
    /// `screened` is its [`Evaluator::quality`], reused when screening covers all the data.
    ///
    /// # Errors
    /// When the graph cannot run.
    pub fn confirmed_quality(&self, graph: &Graph, screened: f64) -> Result<f64, PlanError> {
        if !self.screens() {
            return Ok(screened);
        }
        let mut packed = PackedGraph::new(graph)?;
        Ok(self.metric(&mut packed, usize::MAX)? / self.baseline)
    }
}

/// Reconstruction error of every sample.
fn reconstruction_errors_of(
    packed: &mut PackedGraph,
    samples: &[Vec<HostTensor>],
) -> Result<Vec<f64>, PlanError> {
    let mut outputs = Vec::with_capacity(samples.len());
    for s in samples {
        outputs.push(packed.run(s)?);
    }
    reconstruction_errors(samples, &outputs).map_err(PlanError::Data)
}

/// Removes the blocks with these layer indices.
pub fn drop_blocks(graph: &mut Graph, indices: &[usize]) {
    for &index in indices {
        if let Some(block) = find_blocks(graph).into_iter().find(|b| b.index == index) {
            drop_block(graph, &block);
        }
    }
}

/// SLEB-style greedy removal: at each step, removes the block whose removal keeps the most quality,
/// verified on the evaluation data, until `max_drops` blocks are gone or quality falls under
/// `stop_below`.
///
/// # Errors
/// When a candidate cannot run.
pub fn verified_drop_order(
    base: &Graph,
    evaluator: &Evaluator,
    max_drops: usize,
    stop_below: f64,
    mut progress: impl FnMut(&str),
) -> Result<Vec<(usize, f64)>, PlanError> {
    let mut order: Vec<(usize, f64)> = Vec::new();
    let mut current = base.clone();
    for _ in 0..max_drops {
        let remaining: Vec<usize> = find_blocks(&current).iter().map(|b| b.index).collect();
        if remaining.len() <= 1 {
            break;
        }
        let mut best: Option<(usize, f64)> = None;
        for &index in &remaining {
            let mut g = current.clone();
            drop_blocks(&mut g, &[index]);
            let q = evaluator.quality(&g)?;
            progress(&format!("drop block {index}: quality {q:.4}"));
            if best.is_none_or(|(_, b)| q > b) {
                best = Some((index, q));
            }
        }
        let Some((index, q)) = best else { break };
        log::debug!("verified removal {}: block {index} keeps {q:.4}", order.len() + 1);
        order.push((index, q));
        if q < stop_below {
            break;
        }
        drop_blocks(&mut current, &[index]);
    }
    Ok(order)
}

/// Replaces linear weights by whitened low-rank pairs where the rank keeping `energy` of the
/// whitened spectrum is below the break-even rank. The Gram of each new intermediate value
/// (R G Rᵀ) is added to `calibration` so the left factor can be quantized with error feedback.
///
/// # Errors
/// Decomposition failures.
pub fn factorize_whitened(
    graph: &mut Graph,
    calibration: &mut Calibration,
    energy: f64,
) -> Result<usize, SpectrumError> {
    factorize_whitened_with(graph, calibration, energy, &mut WhiteningCache::default())
}

/// Decompositions that [`factorize_whitened_with`] reuses, because they depend neither on the
/// kept energy nor on which blocks were removed. It keeps the whitening of each linear input (by
/// name) and each weight's whitened SVD (by weight and input name, checked against the values).
#[derive(Default)]
pub struct WhiteningCache {
    whitenings: std::collections::HashMap<String, Whitening>,
    svds: std::collections::HashMap<(String, String), (u64, WhitenedSvd)>,
}

/// Hashes a weight's values, so that a cached decomposition is used only for the same values.
fn fingerprint(values: &[f32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    values.len().hash(&mut h);
    for v in values {
        v.to_bits().hash(&mut h);
    }
    h.finish()
}

/// [`factorize_whitened`] with decompositions kept in `cache` across calls on graphs derived
/// from the same model and calibration (the planner factorizes at several energies).
///
/// # Errors
/// Decomposition failures.
pub fn factorize_whitened_with(
    graph: &mut Graph,
    calibration: &mut Calibration,
    energy: f64,
    cache: &mut WhiteningCache,
) -> Result<usize, SpectrumError> {
    let mut count = 0;
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    for node in std::mem::take(&mut graph.nodes) {
        let (Some(x), Some(w)) =
            (node.inputs.first().copied().flatten(), node.inputs.get(1).copied().flatten())
        else {
            nodes.push(node);
            continue;
        };
        let value = &graph.values[w];
        let x_name = graph.values[x].name.clone();
        let stats = calibration.inputs.get(&x_name);
        let (Op::Linear { .. }, Some(Storage::F32(data)), [n, k], Some(stats)) =
            (node.op, &value.data, value.shape.as_slice(), stats)
        else {
            nodes.push(node);
            continue;
        };
        let (n, k) = (n.factor as usize, k.factor as usize);
        if stats.k != k {
            nodes.push(node);
            continue;
        }
        let name = graph.values[w].name.clone();
        let print = fingerprint(data);
        let key = (name.clone(), x_name.clone());
        if cache.svds.get(&key).is_none_or(|(p, _)| *p != print) {
            if !cache.whitenings.contains_key(&x_name) {
                cache.whitenings.insert(x_name.clone(), Whitening::new(&stats.gram, k)?);
            }
            let svd = cache.whitenings[&x_name].decompose(data, n)?;
            cache.svds.insert(key.clone(), (print, svd));
        }
        let svd = &cache.svds[&key].1;
        let rank = energy_rank(svd.singular_values(), energy);
        if rank == 0 || rank > break_even_rank(n, k) {
            nodes.push(node);
            continue;
        }
        let (left, right) = svd.factors(rank)?;
        let gram_mid = project_gram(&stats.gram, &right, rank, k);
        let a = graph.add_const(format!("{name}.right"), vec![rank, k], Storage::F32(right));
        let b = graph.add_const(format!("{name}.left"), vec![n, rank], Storage::F32(left));
        let mut mid_shape = graph.values[x].shape.clone();
        if let Some(last) = mid_shape.last_mut() {
            *last = Dim::constant(rank as u32);
        }
        let mid_name = format!("{}.low_rank", node.name);
        let mid = graph.add_value(Value {
            name: mid_name.clone(),
            dtype: edgefold_runtime::DType::F32,
            shape: mid_shape,
            data: None,
        });
        calibration.inputs.insert(
            mid_name,
            InputStats { k: rank, gram: gram_mid, abs_sum: vec![0.0; rank], rows: stats.rows },
        );
        nodes.push(Node {
            name: format!("{}.right", node.name),
            op: Op::Linear { activation: None },
            inputs: vec![Some(x), Some(a)],
            outputs: vec![mid],
        });
        let mut inputs = vec![Some(mid), Some(b)];
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

/// R G Rᵀ for a row-major `rank × k` R and `k × k` G.
fn project_gram(gram: &[f64], r: &[f32], rank: usize, k: usize) -> Vec<f64> {
    use faer::{Accum, Mat, Par};
    let rm = Mat::<f64>::from_fn(rank, k, |i, j| r[i * k + j] as f64);
    let g = Mat::<f64>::from_fn(k, k, |i, j| gram[i * k + j]);
    let mut rg = Mat::<f64>::zeros(rank, k);
    faer::linalg::matmul::matmul(
        rg.as_mut(),
        Accum::Replace,
        rm.as_ref(),
        g.as_ref(),
        1.0,
        Par::Seq,
    );
    let mut out = Mat::<f64>::zeros(rank, rank);
    let rt = rm.transpose();
    faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, rg.as_ref(), rt, 1.0, Par::Seq);
    (0..rank * rank).map(|i| out[(i / rank, i % rank)]).collect()
}

/// Stores embedding tables (constant rank-2 gather data) as int4 groups.
pub fn quantize_tables_int4(graph: &mut Graph) -> usize {
    let tables: Vec<usize> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Gather { axis: 0 }))
        .filter_map(|n| n.inputs[0])
        .collect();
    let mut count = 0;
    for t in tables {
        let only_gathered = graph.nodes.iter().all(|n| {
            n.inputs
                .iter()
                .enumerate()
                .all(|(i, v)| *v != Some(t) || (matches!(n.op, Op::Gather { axis: 0 }) && i == 0))
        });
        let value = &graph.values[t];
        let (Some(Storage::F32(data)), [rows, cols]) = (&value.data, value.shape.as_slice()) else {
            continue;
        };
        let (rows, cols) = (rows.factor as usize, cols.factor as usize);
        if !only_gathered || cols % INT4_GROUP != 0 {
            continue;
        }
        let (packed, scales) = quantize_i4(data, rows, cols, INT4_GROUP);
        let value = &mut graph.values[t];
        value.data = Some(Storage::I4Grouped { packed, scales, group: INT4_GROUP });
        value.dtype = edgefold_runtime::DType::I4;
        count += 1;
    }
    count
}

/// Graphs after block removal and factorization, shared by the candidates that differ only in
/// precision (factorization is the expensive step).
#[derive(Default)]
pub struct Stage {
    cache: Vec<((usize, Option<u64>), Graph, Calibration)>,
    whitening: WhiteningCache,
}

impl Stage {
    fn prepared(
        &mut self,
        base: &Graph,
        calibration: &Calibration,
        order: &[(usize, f64)],
        scheme: &Scheme,
    ) -> Result<(&Graph, &Calibration), PlanError> {
        let key = (scheme.drops, scheme.low_rank.map(f64::to_bits));
        if let Some(i) = self.cache.iter().position(|(k, ..)| *k == key) {
            let (_, g, c) = &self.cache[i];
            return Ok((g, c));
        }
        let mut g = base.clone();
        let drops: Vec<usize> = order.iter().take(scheme.drops).map(|&(i, _)| i).collect();
        drop_blocks(&mut g, &drops);
        let mut calib = calibration.clone();
        if let Some(energy) = scheme.low_rank {
            factorize_whitened_with(&mut g, &mut calib, energy, &mut self.whitening)?;
        }
        self.cache.push((key, g, calib));
        let (_, g, c) = self.cache.last().expect("just pushed");
        Ok((g, c))
    }

    /// Builds the candidate graph for `scheme`; with `error_feedback` false, int4 linear weights
    /// are rounded plainly (same size, for sizing only).
    ///
    /// # Errors
    /// Factorization or quantization failures.
    pub fn build(
        &mut self,
        base: &Graph,
        calibration: &Calibration,
        order: &[(usize, f64)],
        scheme: &Scheme,
        error_feedback: bool,
    ) -> Result<Graph, PlanError> {
        let (g, calib) = self.prepared(base, calibration, order, scheme)?;
        let mut g = g.clone();
        if scheme.tables == Quantize::Int4 {
            quantize_tables_int4(&mut g);
        }
        if scheme.linear == Quantize::Int4 {
            if error_feedback {
                quantize_linear_gptq(&mut g, calib)?;
            }
            quantize_conv_int4(&mut g);
        }
        quantize(&mut g, scheme.linear);
        Ok(g)
    }
}

fn packed_size(g: &Graph) -> Result<u64, PlanError> {
    let plan = crate::plan::plan_arena(g);
    let bytes =
        crate::writer::pack(g, &plan, &[]).map_err(|e| PlanError::Exec(ExecError::Pack(e)))?;
    Ok(bytes.len() as u64)
}

/// Searches the candidates and returns the chosen model.
///
/// `extra_bytes` is added to every candidate's size (metadata such as an embedded tokenizer).
///
/// # Errors
/// When no candidate meets the goal, or a candidate fails to build or run.
pub fn plan(
    base: &Graph,
    calibration: &Calibration,
    evaluator: &Evaluator,
    goal: Goal,
    extra_bytes: u64,
    mut progress: impl FnMut(&str),
) -> Result<PlanOutcome, PlanError> {
    let blocks = find_blocks(base).len();
    let floor = match goal {
        Goal::MinQuality(q) => q,
        Goal::TargetSize(_) => 0.0,
    };
    let max_drops = if blocks >= 2 { (blocks / 3).max(1) } else { 0 };
    let drop_order = verified_drop_order(base, evaluator, max_drops, floor, &mut progress)?;
    let usable_drops = drop_order.iter().take_while(|(_, q)| *q >= floor).count();
    let mut schemes = Vec::new();
    for drops in 0..=usable_drops {
        for low_rank in [None, Some(0.99), Some(0.95), Some(0.9)] {
            for (linear, tables) in [
                (Quantize::Int8, Quantize::Int8),
                (Quantize::Int8, Quantize::Int4),
                (Quantize::Int4, Quantize::Int8),
                (Quantize::Int4, Quantize::Int4),
            ] {
                schemes.push(Scheme { drops, low_rank, linear, tables });
            }
        }
    }
    // Sizes do not depend on rounding, so plain int4 rounding replaces error feedback here.
    let mut stage = Stage::default();
    let mut sized: Vec<Tried> = Vec::new();
    for scheme in &schemes {
        let g = stage.build(base, calibration, &drop_order, scheme, false)?;
        let bytes = packed_size(&g)? + extra_bytes;
        progress(&format!("sized {scheme}: {bytes} bytes"));
        sized.push(Tried { scheme: *scheme, bytes, quality: None, confirmed: None });
    }
    sized.sort_by(|a, b| {
        a.bytes.cmp(&b.bytes).then_with(|| format!("{}", a.scheme).cmp(&format!("{}", b.scheme)))
    });

    let mut chosen: Option<(usize, Graph, f64)> = None;
    match goal {
        Goal::MinQuality(q) => {
            // Quality falls with more removed blocks, less kept energy and fewer bits, so a
            // candidate that is nowhere more precise than one that already fell short is skipped.
            let mut failed: Vec<Scheme> = Vec::new();
            for (i, tried) in sized.iter_mut().enumerate() {
                if failed.iter().any(|f| f.at_least_as_precise_as(&tried.scheme)) {
                    progress(&format!(
                        "{}: skipped, a more precise candidate fell short",
                        tried.scheme
                    ));
                    continue;
                }
                let g = stage.build(base, calibration, &drop_order, &tried.scheme, true)?;
                let quality = evaluator.quality(&g)?;
                tried.quality = Some(quality);
                progress(&format!("{}: {} bytes, quality {quality:.4}", tried.scheme, tried.bytes));
                if quality >= q {
                    // Passed the screen: confirm on all of the evaluation data.
                    let confirmed = evaluator.confirmed_quality(&g, quality)?;
                    tried.confirmed = Some(confirmed);
                    progress(&format!("{}: confirmed quality {confirmed:.4}", tried.scheme));
                    if confirmed >= q {
                        chosen = Some((i, g, confirmed));
                        break;
                    }
                    log::info!(
                        "{} passed the screen ({quality:.4}) but not the full evaluation \
                         ({confirmed:.4})",
                        tried.scheme
                    );
                }
                failed.push(tried.scheme);
            }
        }
        Goal::TargetSize(limit) => {
            for (i, tried) in sized.iter_mut().enumerate() {
                if tried.bytes > limit {
                    break;
                }
                let g = stage.build(base, calibration, &drop_order, &tried.scheme, true)?;
                let quality = evaluator.quality(&g)?;
                tried.quality = Some(quality);
                progress(&format!("{}: {} bytes, quality {quality:.4}", tried.scheme, tried.bytes));
                if chosen.as_ref().is_none_or(|c| quality > c.2) {
                    chosen = Some((i, g, quality));
                }
            }
        }
    }
    if let (Goal::TargetSize(_), Some((i, g, quality))) = (goal, chosen.as_mut()) {
        let confirmed = evaluator.confirmed_quality(g, *quality)?;
        sized[*i].confirmed = Some(confirmed);
        *quality = confirmed;
    }
    let Some((i, graph, quality)) = chosen else {
        return Err(PlanError::NoCandidate(match goal {
            Goal::MinQuality(q) => {
                format!("no candidate keeps {q} of the original's quality; lower --min-quality")
            }
            Goal::TargetSize(b) => format!(
                "no candidate fits in {b} bytes (the smallest is {} bytes); raise --target-size",
                sized.first().map_or(0, |t| t.bytes)
            ),
        }));
    };
    Ok(PlanOutcome {
        graph,
        scheme: sized[i].scheme,
        quality,
        baseline: evaluator.baseline(),
        drop_order,
        tried: sized,
    })
}
