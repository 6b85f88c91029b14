//! Layer fusion in the form of LaCo (Yang, Cao and Zhao 2024, "LaCo: Large Language Model Pruning
//! via Layer Collapse", arXiv:2402.11187): a run of adjacent blocks i..=i+m collapses into block i,
//! whose every parameter becomes θ_i + Σ_{k=i+1..=i+m} (θ_k − θ_i), and blocks i+1..=i+m are
//! removed.
//!
//! Parameters correspond by position: input `s` of the `p`-th node of one block matches input `s`
//! of the `p`-th node of every other block. Fusion therefore needs blocks that are structurally
//! identical (same ops, wiring, constant shapes and non-parameter constants) and rejects others
//! with [`FusionError::Mismatch`].
//!
//! For a pair (m = 1) the formula returns block i+1's parameters, so fusing a pair with layer norms
//! merged computes exactly what dropping block i computes. Fusion differs from dropping only for
//! longer runs, or for pairs when the first block keeps its own layer norms.

use std::collections::HashMap;

use edgefold_runtime::ops::Op;

use crate::blocks::{find_blocks, reroute, Block};
use crate::calibrate::BlockStats;
use crate::ir::{Graph, Storage, ValueId};
use crate::planner::{drop_blocks, verified_drop_order, Evaluator, PlanError};

/// Settings of a fusion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuseOptions {
    /// Whether layer-norm scales and shifts are merged like every other parameter. When false, the
    /// first block of a run keeps its own.
    pub layer_norm: bool,
}

impl Default for FuseOptions {
    /// Keeps the first block's layer norms. On all-MiniLM-L6-v2 (STS-B, docs/method-table.md) that
    /// scored higher than merging them for every run of three blocks and for the pairs chosen by
    /// output cosine, though for only 2 of the 5 single pairs.
    fn default() -> Self {
        FuseOptions { layer_norm: false }
    }
}

/// A run of adjacent blocks: the block with layer index `first` and the `merged` blocks after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Layer index of the block that remains.
    pub first: usize,
    /// Number of following blocks merged into it and removed.
    pub merged: usize,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blocks {}..={}", self.first, self.first + self.merged)
    }
}

/// Record of one fusion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fused {
    /// Layer index of the block that holds the merged parameters.
    pub kept: usize,
    /// Layer indices of the removed blocks.
    pub removed: Vec<usize>,
    /// Parameter tensors whose values changed.
    pub changed: usize,
    /// Layer-norm parameters left as the first block's (with [`FuseOptions::layer_norm`] false).
    pub kept_layer_norm: usize,
}

/// Structural difference between two blocks. A `position` is a node's index in its block's node
/// list.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Difference {
    /// The blocks have different numbers of nodes.
    NodeCount {
        /// Nodes of the first block of the run.
        first: usize,
        /// Nodes of the other block.
        other: usize,
    },
    /// The nodes at `position` run different ops or op parameters.
    Op {
        /// Node position.
        position: usize,
        /// The first block's op.
        first: String,
        /// The other block's op.
        other: String,
    },
    /// Input `slot` of the node at `position` comes from a different place (another node, the
    /// block input, a value outside the block, a constant, or no input).
    Wiring {
        /// Node position.
        position: usize,
        /// Input slot.
        slot: usize,
    },
    /// A constant input has a different shape or element type.
    ConstantShape {
        /// Node position.
        position: usize,
        /// Input slot.
        slot: usize,
        /// The first block's constant shape.
        first: Vec<usize>,
        /// The other block's constant shape.
        other: Vec<usize>,
    },
    /// An integer or boolean constant (a shape, an axis list) has different values.
    ConstantData {
        /// Node position.
        position: usize,
        /// Input slot.
        slot: usize,
    },
    /// The outputs of the node at `position` differ in number, element type or shape.
    Outputs {
        /// Node position.
        position: usize,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::NodeCount { first, other } => {
                write!(f, "{first} nodes against {other}")
            }
            Difference::Op { position, first, other } => {
                write!(f, "node {position} runs {first} against {other}")
            }
            Difference::Wiring { position, slot } => {
                write!(f, "input {slot} of node {position} comes from a different place")
            }
            Difference::ConstantShape { position, slot, first, other } => write!(
                f,
                "constant input {slot} of node {position} has shape {first:?} against {other:?}"
            ),
            Difference::ConstantData { position, slot } => {
                write!(f, "integer constant input {slot} of node {position} has different values")
            }
            Difference::Outputs { position } => {
                write!(f, "outputs of node {position} differ in number, type or shape")
            }
        }
    }
}

/// Error from fusing blocks or from verifying a fusion.
#[derive(Debug)]
#[non_exhaustive]
pub enum FusionError {
    /// The run is empty or extends past the last block.
    InvalidRun {
        /// Position of the run's first block in the block list.
        first: usize,
        /// Blocks to merge into it.
        merged: usize,
        /// Blocks in the list.
        blocks: usize,
    },
    /// No block has this layer index.
    UnknownBlock {
        /// The requested layer index.
        index: usize,
        /// Layer indices of the graph's blocks.
        available: Vec<usize>,
    },
    /// Two runs given together share a block.
    OverlappingRuns(Run, Run),
    /// Block `other` differs in structure from block `first`, the run's first block.
    Mismatch {
        /// Layer index of the run's first block.
        first: usize,
        /// Layer index of the differing block.
        other: usize,
        /// The first difference found.
        difference: Difference,
    },
    /// A parameter is not stored as f32; fusion has to run before quantization.
    NotF32 {
        /// Layer index of the block.
        block: usize,
        /// Name of the constant.
        name: String,
    },
    /// Evaluating a candidate failed.
    Evaluate(PlanError),
}

impl std::fmt::Display for FusionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FusionError::InvalidRun { first, merged, blocks } => write!(
                f,
                "cannot merge {merged} blocks into block position {first}: the graph has {blocks} \
                 blocks and a run needs at least 2"
            ),
            FusionError::UnknownBlock { index, available } => {
                write!(f, "no block has layer index {index}; the blocks are {available:?}")
            }
            FusionError::OverlappingRuns(a, b) => write!(f, "runs {a} and {b} overlap"),
            FusionError::Mismatch { first, other, difference } => write!(
                f,
                "blocks {first} and {other} are not structurally identical ({difference}), so \
                 their parameters cannot be matched"
            ),
            FusionError::NotF32 { block, name } => write!(
                f,
                "parameter {name} of block {block} is not stored as f32; fuse before quantizing"
            ),
            FusionError::Evaluate(e) => write!(f, "evaluating a fusion candidate failed: {e}"),
        }
    }
}

impl std::error::Error for FusionError {}

impl From<PlanError> for FusionError {
    fn from(e: PlanError) -> Self {
        FusionError::Evaluate(e)
    }
}

/// Origin of a node input, relative to the node's block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Absent,
    BlockInput,
    Internal { position: usize, output: usize },
    Outside(ValueId),
    Constant(ValueId),
}

/// Finds the source of every input of every node of `block`, by node position.
fn sources(graph: &Graph, block: &Block, producers: &[Option<usize>]) -> Vec<Vec<Source>> {
    let position: HashMap<usize, usize> =
        block.nodes.iter().enumerate().map(|(p, &n)| (n, p)).collect();
    let source = |input: &Option<ValueId>| {
        let Some(v) = *input else { return Source::Absent };
        if graph.is_const(v) {
            return Source::Constant(v);
        }
        if v == block.input {
            return Source::BlockInput;
        }
        let inside = producers[v].and_then(|n| position.get(&n).map(|&p| (n, p)));
        match inside {
            Some((n, p)) => {
                let output = graph.nodes[n].outputs.iter().position(|&o| o == v).unwrap_or(0);
                Source::Internal { position: p, output }
            }
            None => Source::Outside(v),
        }
    };
    block.nodes.iter().map(|&n| graph.nodes[n].inputs.iter().map(source).collect()).collect()
}

/// Returns whether a constant contains already quantized parameters, which fusion cannot merge.
fn is_quantized(storage: &Storage) -> bool {
    matches!(
        storage,
        Storage::F16(_)
            | Storage::I8PerRow { .. }
            | Storage::I4Grouped { .. }
            | Storage::I4GroupedMin { .. }
    )
}

/// Checks that `other` matches `first` node by node.
fn compare(
    graph: &Graph,
    first: (&Block, &[Vec<Source>]),
    other: (&Block, &[Vec<Source>]),
) -> Result<(), FusionError> {
    let ((a, sources_a), (b, sources_b)) = (first, other);
    let mismatch =
        |difference| FusionError::Mismatch { first: a.index, other: b.index, difference };
    if a.nodes.len() != b.nodes.len() {
        return Err(mismatch(Difference::NodeCount { first: a.nodes.len(), other: b.nodes.len() }));
    }
    for (position, (&na, &nb)) in a.nodes.iter().zip(&b.nodes).enumerate() {
        let (node_a, node_b) = (&graph.nodes[na], &graph.nodes[nb]);
        if node_a.op != node_b.op {
            let (first, other) = (format!("{:?}", node_a.op), format!("{:?}", node_b.op));
            return Err(mismatch(Difference::Op { position, first, other }));
        }
        let described = |o: &ValueId| (graph.values[*o].dtype, &graph.values[*o].shape);
        let outputs_a: Vec<_> = node_a.outputs.iter().map(described).collect();
        let outputs_b: Vec<_> = node_b.outputs.iter().map(described).collect();
        if outputs_a != outputs_b {
            return Err(mismatch(Difference::Outputs { position }));
        }
        let (inputs_a, inputs_b) = (&sources_a[position], &sources_b[position]);
        if inputs_a.len() != inputs_b.len() {
            let slot = inputs_a.len().min(inputs_b.len());
            return Err(mismatch(Difference::Wiring { position, slot }));
        }
        for (slot, (&sa, &sb)) in inputs_a.iter().zip(inputs_b).enumerate() {
            match (sa, sb) {
                (Source::Constant(ca), Source::Constant(cb)) => {
                    match compare_constants(graph, (a.index, ca), (b.index, cb)) {
                        Ok(()) => {}
                        Err(ConstantIssue::Quantized { block, name }) => {
                            return Err(FusionError::NotF32 { block, name })
                        }
                        Err(ConstantIssue::Shape { first, other }) => {
                            let d = Difference::ConstantShape { position, slot, first, other };
                            return Err(mismatch(d));
                        }
                        Err(ConstantIssue::Data) => {
                            return Err(mismatch(Difference::ConstantData { position, slot }))
                        }
                    }
                }
                _ if sa != sb => return Err(mismatch(Difference::Wiring { position, slot })),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Mismatch between two constants read at the same place.
enum ConstantIssue {
    Quantized { block: usize, name: String },
    Shape { first: Vec<usize>, other: Vec<usize> },
    Data,
}

/// Compares two constants read at the same place: equal element type and shape, quantized
/// neither, and equal values unless they are f32 parameters.
fn compare_constants(
    graph: &Graph,
    (block_a, a): (usize, ValueId),
    (block_b, b): (usize, ValueId),
) -> Result<(), ConstantIssue> {
    let (va, vb) = (&graph.values[a], &graph.values[b]);
    let (Some(da), Some(db)) = (&va.data, &vb.data) else {
        unreachable!("sources marked constant have data")
    };
    for (block, value, data) in [(block_a, va, da), (block_b, vb, db)] {
        if is_quantized(data) {
            return Err(ConstantIssue::Quantized { block, name: value.name.clone() });
        }
    }
    if va.dtype != vb.dtype || va.shape != vb.shape {
        return Err(ConstantIssue::Shape { first: va.const_shape(), other: vb.const_shape() });
    }
    let structural = !matches!(da, Storage::F32(_));
    if structural && da != db {
        return Err(ConstantIssue::Data);
    }
    Ok(())
}

/// Computes the merged values θ_first + Σ (θ_k − θ_first) in f64 as Σ θ_k − (m − 1) θ_first: the
/// same sum, but exact for m = 1 (block k's values) and for equal values (θ_first).
fn merge_values(first: &[f32], others: &[&[f32]]) -> Vec<f32> {
    let extra = others.len() as f64 - 1.0;
    (0..first.len())
        .map(|i| {
            let sum: f64 = others.iter().map(|o| o[i] as f64).sum();
            (sum - extra * first[i] as f64) as f32
        })
        .collect()
}

/// Derives a constant name from `name` that no value of the graph has yet.
fn unique_name(graph: &Graph, name: &str) -> String {
    let taken = |candidate: &str| graph.values.iter().any(|v| v.name == candidate);
    let mut candidate = format!("{name}.fused");
    let mut suffix = 1;
    while taken(&candidate) {
        suffix += 1;
        candidate = format!("{name}.fused{suffix}");
    }
    candidate
}

/// Fuses blocks `first..=first + merged` (positions in `blocks`, which must be the result of
/// [`find_blocks`] on `graph`) into block `first` and removes the others. Value ids change, so find
/// the blocks again before another fusion.
///
/// Every f32 constant input of the first block becomes θ_first + Σ (θ_k − θ_first) over the merged
/// blocks, except layer-norm scale and shift when `options.layer_norm` is false. A constant read
/// anywhere else too is copied, not changed in place.
///
/// # Errors
/// [`FusionError::InvalidRun`] when the run does not fit in `blocks`,
/// [`FusionError::Mismatch`] when a block of the run differs in structure from the first, and
/// [`FusionError::NotF32`] when a parameter is already quantized. The graph is unchanged on error.
pub fn fuse_blocks(
    graph: &mut Graph,
    blocks: &[Block],
    first: usize,
    merged: usize,
    options: FuseOptions,
) -> Result<Fused, FusionError> {
    if merged == 0 || first + merged >= blocks.len() {
        return Err(FusionError::InvalidRun { first, merged, blocks: blocks.len() });
    }
    let run = &blocks[first..=first + merged];
    let run_sources = check_run(graph, run)?;
    let (changed, kept_layer_norm) = merge_parameters(graph, run, &run_sources, options);
    let last = &run[run.len() - 1];
    reroute(graph, last.output, run[0].output);
    log::debug!(
        "fused blocks {}..={} into block {}: {changed} parameters changed",
        run[0].index,
        last.index,
        run[0].index
    );
    Ok(Fused {
        kept: run[0].index,
        removed: run[1..].iter().map(|b| b.index).collect(),
        changed,
        kept_layer_norm,
    })
}

/// Checks that every block of `run` matches the first in structure, and returns each block's input
/// sources.
fn check_run(graph: &Graph, run: &[Block]) -> Result<Vec<Vec<Vec<Source>>>, FusionError> {
    let producers = graph.producers();
    let run_sources: Vec<Vec<Vec<Source>>> =
        run.iter().map(|b| sources(graph, b, &producers)).collect();
    for (block, block_sources) in run.iter().zip(&run_sources).skip(1) {
        compare(graph, (&run[0], &run_sources[0]), (block, block_sources))?;
    }
    Ok(run_sources)
}

/// Writes the merged parameters into the first block of `run` and returns how many tensors changed
/// and how many layer-norm parameters were left as they were.
fn merge_parameters(
    graph: &mut Graph,
    run: &[Block],
    run_sources: &[Vec<Vec<Source>>],
    options: FuseOptions,
) -> (usize, usize) {
    let consumers = graph.consumers();
    let mut changed = 0;
    let mut kept_layer_norm = 0;
    for (position, inputs) in run_sources[0].iter().enumerate() {
        let node = run[0].nodes[position];
        for (slot, &source) in inputs.iter().enumerate() {
            let Source::Constant(id) = source else { continue };
            // Integer and boolean constants passed the comparison, so every block has the same.
            let Some(Storage::F32(values)) = &graph.values[id].data else { continue };
            if !options.layer_norm && matches!(graph.nodes[node].op, Op::LayerNorm { .. }) {
                kept_layer_norm += 1;
                continue;
            }
            let others: Vec<&[f32]> = run_sources[1..]
                .iter()
                .filter_map(|s| match s[position][slot] {
                    Source::Constant(v) => graph.values[v].data.as_ref()?.as_f32(),
                    _ => None,
                })
                .collect();
            let merged_values = merge_values(values, &others);
            let same_bits =
                merged_values.iter().zip(values).all(|(a, b)| a.to_bits() == b.to_bits());
            if same_bits {
                continue;
            }
            changed += 1;

            // A constant read anywhere else too gets a merged copy instead of changing in place.
            let reads = graph.nodes[node].inputs.iter().filter(|&&i| i == Some(id)).count();
            if consumers[id] == [node] && reads == 1 {
                graph.values[id].data = Some(Storage::F32(merged_values));
            } else {
                let name = unique_name(graph, &graph.values[id].name);
                let shape = graph.values[id].const_shape();
                let copy = graph.add_const(name, shape, Storage::F32(merged_values));
                graph.nodes[node].inputs[slot] = Some(copy);
            }
        }
    }
    (changed, kept_layer_norm)
}

/// Fuses one run named by layer indices.
///
/// # Errors
/// [`FusionError::UnknownBlock`] when no block has layer index `run.first`, and the errors of
/// [`fuse_blocks`].
pub fn fuse_run(graph: &mut Graph, run: Run, options: FuseOptions) -> Result<Fused, FusionError> {
    let blocks = find_blocks(graph);
    let Some(position) = blocks.iter().position(|b| b.index == run.first) else {
        let available = blocks.iter().map(|b| b.index).collect();
        return Err(FusionError::UnknownBlock { index: run.first, available });
    };
    fuse_blocks(graph, &blocks, position, run.merged, options)
}

/// Fuses several runs, last run first so that earlier blocks keep their positions.
///
/// # Errors
/// [`FusionError::OverlappingRuns`] when two runs share a block, and the errors of [`fuse_run`].
/// Runs fused before an error stay fused.
pub fn fuse_runs(
    graph: &mut Graph,
    runs: &[Run],
    options: FuseOptions,
) -> Result<Vec<Fused>, FusionError> {
    let mut sorted = runs.to_vec();
    sorted.sort_by_key(|r| r.first);
    for pair in sorted.windows(2) {
        if pair[0].first + pair[0].merged >= pair[1].first {
            return Err(FusionError::OverlappingRuns(pair[0], pair[1]));
        }
    }
    sorted.iter().rev().map(|&run| fuse_run(graph, run, options)).collect()
}

/// Chooses `removed` adjacent pairs with the highest mean token cosine between their outputs (the
/// pair whose second block changes the residual stream least) and joins chained pairs into runs.
/// Returns the runs in block order; fewer blocks are removed when the graph has fewer pairs.
pub fn similar_runs(stats: &BlockStats, removed: usize) -> Vec<Run> {
    let pairs = stats.blocks.len().saturating_sub(1);
    let mut order: Vec<usize> = (0..pairs).collect();
    // Highest cosine first; ties go to the earlier pair so the choice is deterministic.
    order.sort_by(|&a, &b| stats.cosine[b][b + 1].total_cmp(&stats.cosine[a][a + 1]));
    let mut chosen = vec![false; pairs];
    for &p in order.iter().take(removed) {
        chosen[p] = true;
    }
    let mut runs = Vec::new();
    let mut p = 0;
    while p < pairs {
        if !chosen[p] {
            p += 1;
            continue;
        }
        let start = p;
        while p < pairs && chosen[p] {
            p += 1;
        }
        runs.push(Run { first: stats.blocks[start].index, merged: p - start });
    }
    runs
}

/// A run fused and compared with dropping blocks of the same run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunTrial {
    /// The run.
    pub run: Run,
    /// Quality of the fused graph, as a fraction of the original's.
    pub fused: f64,
    /// Layer indices of the best `run.merged` blocks of the run to drop instead.
    pub dropped: Vec<usize>,
    /// Quality after dropping them.
    pub dropped_quality: f64,
}

impl RunTrial {
    /// Returns whether fusion scored strictly higher than dropping.
    pub fn fusion_pays(&self) -> bool {
        self.fused > self.dropped_quality
    }
}

/// Fuses `run` in a copy of `base` and compares its quality with dropping all blocks of the run
/// but one, for each choice of the block kept.
///
/// # Errors
/// The errors of [`fuse_run`], and [`FusionError::Evaluate`] when a candidate cannot run.
pub fn verify_run(
    base: &Graph,
    evaluator: &Evaluator,
    run: Run,
    options: FuseOptions,
) -> Result<RunTrial, FusionError> {
    let mut fused = base.clone();
    fuse_run(&mut fused, run, options)?;
    let fused = evaluator.quality(&fused)?;
    let members: Vec<usize> = (run.first..=run.first + run.merged).collect();
    let mut best: Option<(Vec<usize>, f64)> = None;
    for keep in &members {
        let dropped: Vec<usize> = members.iter().copied().filter(|b| b != keep).collect();
        let mut g = base.clone();
        drop_blocks(&mut g, &dropped);
        let q = evaluator.quality(&g)?;
        if best.as_ref().is_none_or(|(_, b)| q > *b) {
            best = Some((dropped, q));
        }
    }
    let (dropped, dropped_quality) = best.expect("a run has at least two members");
    Ok(RunTrial { run, fused, dropped, dropped_quality })
}

/// Every fusion of a given size scored, against the verified (SLEB-style) drop of as many blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct FusionChoice {
    /// Each structurally fusable run with its quality, in block order.
    pub runs: Vec<(Run, f64)>,
    /// Greedy verified removal order with the quality after each removal.
    pub drop_order: Vec<(usize, f64)>,
}

impl FusionChoice {
    /// Returns the run with the highest quality.
    pub fn best_run(&self) -> Option<(Run, f64)> {
        self.runs.iter().copied().reduce(|a, b| if b.1 > a.1 { b } else { a })
    }

    /// Returns the quality after `removed` verified drops, or `None` when fewer blocks could be
    /// dropped.
    pub fn drop_quality(&self, removed: usize) -> Option<f64> {
        (self.drop_order.len() >= removed).then(|| self.drop_order[removed - 1].1)
    }

    /// Returns the best run when it scores strictly higher than dropping as many blocks.
    pub fn winner(&self) -> Option<(Run, f64)> {
        let (run, quality) = self.best_run()?;
        match self.drop_quality(run.merged) {
            Some(dropped) if dropped >= quality => None,
            _ => Some((run, quality)),
        }
    }
}

/// Scores the fusion of every run of `merged + 1` adjacent blocks and the verified drop of `merged`
/// blocks, so that fusion is kept only where it beats dropping. Runs whose blocks differ in
/// structure are left out.
///
/// # Errors
/// [`FusionError::Evaluate`] when a candidate cannot run, or [`FusionError::NotF32`].
pub fn choose_fusion(
    base: &Graph,
    evaluator: &Evaluator,
    merged: usize,
    options: FuseOptions,
    mut progress: impl FnMut(&str),
) -> Result<FusionChoice, FusionError> {
    let blocks = find_blocks(base);
    let mut runs = Vec::new();
    for start in 0..blocks.len().saturating_sub(merged) {
        let run = Run { first: blocks[start].index, merged };
        let mut g = base.clone();
        match fuse_blocks(&mut g, &blocks, start, merged, options) {
            Ok(_) => {}
            Err(FusionError::Mismatch { difference, .. }) => {
                log::debug!("{run} cannot be fused: {difference}");
                continue;
            }
            Err(e) => return Err(e),
        }
        let quality = evaluator.quality(&g)?;
        progress(&format!("fuse {run}: quality {quality:.4}"));
        runs.push((run, quality));
    }
    let drop_order = verified_drop_order(base, evaluator, merged, f64::NEG_INFINITY, progress)?;
    Ok(FusionChoice { runs, drop_order })
}
