//! Graph rewrites after import: fusing the element-wise patterns exporters emit for GELU and layer
//! normalization into single ops, and folding bias additions into the preceding linear op.

use edgefold_runtime::ops::{BinaryKind, Op, ReduceKind, UnaryKind};

use crate::ir::{Graph, Storage, ValueId};

/// Runs every fusion and removes what they leave unused. Returns how many of each were fused.
pub fn fuse(graph: &mut Graph) -> FuseCounts {
    let counts = FuseCounts {
        gelu: fuse_gelu(graph),
        layer_norm: fuse_layer_norm(graph),
        bias: fuse_bias(graph),
    };
    graph.prune();
    log::debug!(
        "fused {} GELU, {} layer norm, {} bias additions",
        counts.gelu,
        counts.layer_norm,
        counts.bias
    );
    counts
}

/// Numbers of patterns fused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuseCounts {
    /// GELU patterns.
    pub gelu: usize,
    /// Layer normalization patterns.
    pub layer_norm: usize,
    /// Bias additions folded into linear ops.
    pub bias: usize,
}

/// The single f32 value of a constant with one element.
fn scalar(graph: &Graph, id: ValueId) -> Option<f32> {
    match graph.values[id].data.as_ref()? {
        Storage::F32(v) if v.len() == 1 => Some(v[0]),
        _ => None,
    }
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-3 * b.abs().max(1.0)
}

struct View<'g> {
    graph: &'g Graph,
    producers: Vec<Option<usize>>,
    consumers: Vec<Vec<usize>>,
}

impl<'g> View<'g> {
    fn new(graph: &'g Graph) -> Self {
        View { graph, producers: graph.producers(), consumers: graph.consumers() }
    }

    /// Returns the node producing `v`, if any.
    fn producer(&self, v: ValueId) -> Option<usize> {
        self.producers[v]
    }

    /// The only consumer of `v`, when `v` is read exactly once and is not a graph output.
    fn sole_consumer(&self, v: ValueId) -> Option<usize> {
        match self.consumers[v].as_slice() {
            [n] if !self.graph.outputs.contains(&v) => Some(*n),
            _ => None,
        }
    }

    /// For a binary node with one constant scalar operand: (other operand, scalar, constant first).
    fn binary_scalar(&self, n: usize, kind: BinaryKind) -> Option<(ValueId, f32, bool)> {
        let node = &self.graph.nodes[n];
        if node.op != Op::Binary(kind) {
            return None;
        }
        let (a, b) = (node.inputs[0]?, node.inputs[1]?);
        if let Some(s) = scalar(self.graph, b) {
            return Some((a, s, false));
        }
        scalar(self.graph, a).map(|s| (b, s, true))
    }

    /// For a binary node: the operand that is not `v`.
    fn other(&self, n: usize, v: ValueId) -> Option<ValueId> {
        let node = &self.graph.nodes[n];
        match (node.inputs[0]?, node.inputs[1]?) {
            (a, b) if a == v => Some(b),
            (a, b) if b == v => Some(a),
            _ => None,
        }
    }
}

fn fuse_gelu(graph: &mut Graph) -> usize {
    let mut rewrites = Vec::new();
    {
        let g = View::new(graph);
        for (e, node) in graph.nodes.iter().enumerate() {
            if !matches!(node.op, Op::Unary { kind: UnaryKind::Erf, .. }) {
                continue;
            }
            if let Some(r) = match_gelu(&g, e) {
                rewrites.push(r);
            }
        }
    }
    let count = rewrites.len();
    for (x, last) in rewrites {
        let node = &mut graph.nodes[last];
        node.op = Op::Unary { kind: UnaryKind::Gelu, alpha: 0.0, beta: 0.0 };
        node.inputs = vec![Some(x)];
    }
    count
}

/// Matches `0.5 · x · (1 + erf(x / √2))` around the Erf node `e`; returns (x, last node).
fn match_gelu(g: &View<'_>, e: usize) -> Option<(ValueId, usize)> {
    let graph = g.graph;
    let d = graph.nodes[e].inputs[0]?;
    let dn = g.producer(d)?;
    let x = match g.binary_scalar(dn, BinaryKind::Div) {
        Some((x, s, false)) if close(s, std::f32::consts::SQRT_2) => x,
        _ => match g.binary_scalar(dn, BinaryKind::Mul) {
            Some((x, s, _)) if close(s, std::f32::consts::FRAC_1_SQRT_2) => x,
            _ => return None,
        },
    };
    g.sole_consumer(d)?;
    let erf_out = graph.nodes[e].outputs[0];
    let add = g.sole_consumer(erf_out)?;
    match g.binary_scalar(add, BinaryKind::Add) {
        Some((v, s, _)) if v == erf_out && close(s, 1.0) => {}
        _ => return None,
    }
    let add_out = graph.nodes[add].outputs[0];
    let mul = g.sole_consumer(add_out)?;
    if graph.nodes[mul].op != Op::Binary(BinaryKind::Mul) {
        return None;
    }
    let p = g.other(mul, add_out)?;
    if p == x {
        let mul_out = graph.nodes[mul].outputs[0];
        let last = g.sole_consumer(mul_out)?;
        match g.binary_scalar(last, BinaryKind::Mul) {
            Some((v, s, _)) if v == mul_out && close(s, 0.5) => Some((x, last)),
            _ => None,
        }
    } else {
        let half = g.producer(p)?;
        match g.binary_scalar(half, BinaryKind::Mul) {
            Some((v, s, _)) if v == x && close(s, 0.5) && g.sole_consumer(p) == Some(mul) => {
                Some((x, mul))
            }
            _ => None,
        }
    }
}

fn last_axis_mean(graph: &Graph, n: usize) -> Option<ValueId> {
    let node = &graph.nodes[n];
    let x = node.inputs[0]?;
    let rank = graph.values[x].shape.len();
    match node.op {
        Op::Reduce { kind: ReduceKind::Mean, axes, keep_dims: true }
            if rank > 0 && axes == 1 << (rank - 1) =>
        {
            Some(x)
        }
        _ => None,
    }
}

fn fuse_layer_norm(graph: &mut Graph) -> usize {
    let mut rewrites = Vec::new();
    {
        let g = View::new(graph);
        for n in 0..graph.nodes.len() {
            if let Some(r) = match_layer_norm(&g, n) {
                rewrites.push(r);
            }
        }
    }
    let count = rewrites.len();
    for (x, gamma, beta, eps, last) in rewrites {
        let node = &mut graph.nodes[last];
        node.op = Op::LayerNorm { epsilon: eps };
        node.inputs = vec![Some(x), Some(gamma), beta];
    }
    count
}

type LayerNormMatch = (ValueId, ValueId, Option<ValueId>, f32, usize);

/// Matches `(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps) · γ + β` ending at `Sub` node `sub`.
fn match_layer_norm(g: &View<'_>, sub: usize) -> Option<LayerNormMatch> {
    let graph = g.graph;
    let node = &graph.nodes[sub];
    if node.op != Op::Binary(BinaryKind::Sub) {
        return None;
    }
    let (x, mean) = (node.inputs[0]?, node.inputs[1]?);
    if last_axis_mean(graph, g.producer(mean)?)? != x {
        return None;
    }
    let d = node.outputs[0];
    let uses = &g.consumers[d];
    if uses.len() != 2 {
        return None;
    }
    let (mut sq, mut div) = (None, None);
    for &u in uses {
        match graph.nodes[u].op {
            Op::Binary(BinaryKind::Pow)
                if g.binary_scalar(u, BinaryKind::Pow).map(|s| s.1) == Some(2.0) =>
            {
                sq = Some(u)
            }
            Op::Binary(BinaryKind::Mul) if graph.nodes[u].inputs == [Some(d), Some(d)] => {
                sq = Some(u)
            }
            Op::Binary(BinaryKind::Div) if graph.nodes[u].inputs[0] == Some(d) => div = Some(u),
            _ => {}
        }
    }
    let (sq, div) = (sq?, div?);
    let var_node = g.sole_consumer(graph.nodes[sq].outputs[0])?;
    last_axis_mean(graph, var_node)?;
    let add_eps = g.sole_consumer(graph.nodes[var_node].outputs[0])?;
    let (_, eps, _) = g.binary_scalar(add_eps, BinaryKind::Add)?;
    let sqrt = g.sole_consumer(graph.nodes[add_eps].outputs[0])?;
    if !matches!(graph.nodes[sqrt].op, Op::Unary { kind: UnaryKind::Sqrt, .. }) {
        return None;
    }
    if graph.nodes[div].inputs[1] != Some(graph.nodes[sqrt].outputs[0]) {
        return None;
    }
    let normed = graph.nodes[div].outputs[0];
    let scale = g.sole_consumer(normed)?;
    let width = *graph.values[x].shape.last()?;
    let per_channel =
        |v: ValueId| graph.values[v].data.is_some() && graph.values[v].shape == [width];
    let gamma = g
        .other(scale, normed)
        .filter(|&v| graph.nodes[scale].op == Op::Binary(BinaryKind::Mul) && per_channel(v))?;
    let scaled = graph.nodes[scale].outputs[0];
    let (beta, last) = match g.sole_consumer(scaled) {
        Some(add) if graph.nodes[add].op == Op::Binary(BinaryKind::Add) => {
            match g.other(add, scaled) {
                Some(b) if per_channel(b) => (Some(b), add),
                _ => (None, scale),
            }
        }
        _ => (None, scale),
    };
    Some((x, gamma, beta, eps, last))
}

fn fuse_bias(graph: &mut Graph) -> usize {
    let mut rewrites = Vec::new();
    {
        let g = View::new(graph);
        for (n, node) in graph.nodes.iter().enumerate() {
            if node.op != Op::Linear || node.inputs.get(2).copied().flatten().is_some() {
                continue;
            }
            let out = node.outputs[0];
            let Some(add) = g.sole_consumer(out) else { continue };
            if graph.nodes[add].op != Op::Binary(BinaryKind::Add) {
                continue;
            }
            let Some(b) = g.other(add, out) else { continue };
            let n_out = graph.values[out].shape.last().copied();
            let bias = &graph.values[b];
            let is_vector = bias.shape.len() == 1 && bias.shape.last().copied() == n_out;
            if bias.data.as_ref().and_then(Storage::as_f32).is_some() && is_vector {
                rewrites.push((n, add, b));
            }
        }
    }
    let count = rewrites.len();
    let mut removed = vec![false; graph.nodes.len()];
    for (n, add, b) in rewrites {
        let add_out = graph.nodes[add].outputs[0];
        let node = &mut graph.nodes[n];
        node.inputs.truncate(2);
        node.inputs.push(Some(b));
        node.outputs = vec![add_out];
        removed[add] = true;
    }
    let mut i = 0;
    graph.nodes.retain(|_| {
        i += 1;
        !removed[i - 1]
    });
    count
}
