//! Graph rewrites after import: fusing the element-wise patterns exporters emit for GELU and layer
//! normalization into single ops, folding bias additions and activations into the preceding
//! linear op, and fusing scaled dot-product attention (matrix product, scale, mask, softmax,
//! matrix product) into one op.

use edgefold_runtime::format::Dim;
use edgefold_runtime::ops::{Activation, BinaryKind, Op, ReduceKind, UnaryKind};
use edgefold_runtime::shape::expands_to;

use crate::ir::{Graph, Storage, ValueId};

/// Runs every fusion and removes what they leave unused. Returns how many of each were fused.
pub fn fuse(graph: &mut Graph) -> FuseCounts {
    let mut counts = FuseCounts {
        gelu: fuse_gelu(graph),
        layer_norm: fuse_layer_norm(graph),
        bias: fuse_bias(graph),
        attention: fuse_attention(graph),
        activation: 0,
    };
    // The nodes the GELU rewrite leaves unused still read the product it starts from.
    graph.prune();
    counts.activation = fuse_activation(graph);
    graph.prune();
    log::debug!(
        "fused {} GELU, {} layer norm, {} bias additions, {} attention, {} activations",
        counts.gelu,
        counts.layer_norm,
        counts.bias,
        counts.attention,
        counts.activation
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
    /// Attention patterns (one per layer of heads).
    pub attention: usize,
    /// Element-wise functions folded into the linear op before them.
    pub activation: usize,
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
            if !matches!(node.op, Op::Linear { .. })
                || node.inputs.get(2).copied().flatten().is_some()
            {
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
    remove_nodes(graph, &removed);
    count
}

/// Removes the nodes whose entry in `removed` is set, keeping the order of the others.
fn remove_nodes(graph: &mut Graph, removed: &[bool]) {
    let mut i = 0;
    graph.nodes.retain(|_| {
        i += 1;
        !removed[i - 1]
    });
}

/// Folds a Unary node into the Linear node before it when the Unary is the only reader of the
/// product: the Linear then writes the Unary's output. Runs after [`fuse_bias`], so a bias
/// addition between the two is already part of the Linear.
fn fuse_activation(graph: &mut Graph) -> usize {
    let mut rewrites = Vec::new();
    {
        let g = View::new(graph);
        for (n, node) in graph.nodes.iter().enumerate() {
            if node.op != (Op::Linear { activation: None }) {
                continue;
            }
            let Some(u) = g.sole_consumer(node.outputs[0]) else { continue };
            if let Op::Unary { kind, alpha, beta } = graph.nodes[u].op {
                rewrites.push((n, u, Activation { kind, alpha, beta }));
            }
        }
    }
    let count = rewrites.len();
    let mut removed = vec![false; graph.nodes.len()];
    for (n, u, activation) in rewrites {
        let out = graph.nodes[u].outputs[0];
        let node = &mut graph.nodes[n];
        node.op = Op::Linear { activation: Some(activation) };
        node.outputs = vec![out];
        removed[u] = true;
    }
    remove_nodes(graph, &removed);
    count
}

/// A matched attention pattern: the nodes it replaces (the last one becomes the fused op) and
/// the fused op's inputs.
struct AttentionMatch {
    nodes: Vec<usize>,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    mask: Option<ValueId>,
    scale: f32,
}

fn fuse_attention(graph: &mut Graph) -> usize {
    let mut rewrites = Vec::new();
    {
        let g = View::new(graph);
        // A matrix product can end one pattern and start the next; the first match keeps it.
        let mut claimed = vec![false; graph.nodes.len()];
        for (n, node) in graph.nodes.iter().enumerate() {
            if node.op != Op::MatMul {
                continue;
            }
            let Some(m) = match_attention(&g, n) else { continue };
            if m.nodes.iter().any(|&i| claimed[i]) {
                continue;
            }
            for &i in &m.nodes {
                claimed[i] = true;
            }
            rewrites.push(m);
        }
    }
    let count = rewrites.len();
    let mut removed = vec![false; graph.nodes.len()];
    for m in rewrites {
        let (last, earlier) = m.nodes.split_last().expect("a match has nodes");
        for &n in earlier {
            removed[n] = true;
        }
        let node = &mut graph.nodes[*last];
        node.op = Op::Attention { scale: m.scale };
        node.inputs = vec![Some(m.q), Some(m.k), Some(m.v)];
        if let Some(mask) = m.mask {
            node.inputs.push(Some(mask));
        }
    }
    remove_nodes(graph, &removed);
    count
}

/// Matches `softmax(scale · (q × k) + mask) × v` starting at the first matrix product `mm`.
///
/// The pattern is an optional multiplication or division by a scalar constant, an optional
/// addition of a mask, a softmax over the last axis and a second matrix product. Each value in
/// the chain is read only by the next node.
fn match_attention(g: &View<'_>, mm: usize) -> Option<AttentionMatch> {
    let graph = g.graph;
    let node = &graph.nodes[mm];
    let (q, k) = (node.inputs[0]?, node.inputs[1]?);
    let mut nodes = vec![mm];
    let mut cur = node.outputs[0];
    let mut next = g.sole_consumer(cur)?;

    let scaled = if let Some((_, c, _)) = g.binary_scalar(next, BinaryKind::Mul) {
        Some(c)
    } else if let Some((_, c, constant_first)) = g.binary_scalar(next, BinaryKind::Div) {
        // scores / c scales the scores; c / scores does not.
        if constant_first {
            return None;
        }
        Some(1.0 / c)
    } else {
        None
    };
    let mut scale = 1.0f32;
    if let Some(c) = scaled {
        scale = c;
        nodes.push(next);
        cur = graph.nodes[next].outputs[0];
        next = g.sole_consumer(cur)?;
    }

    let mut mask = None;
    if graph.nodes[next].op == Op::Binary(BinaryKind::Add) {
        mask = Some(g.other(next, cur).filter(|&m| m != cur)?);
        nodes.push(next);
        cur = graph.nodes[next].outputs[0];
        next = g.sole_consumer(cur)?;
    }

    let rank = graph.values[cur].shape.len();
    if graph.nodes[next].op != (Op::Softmax { axis: rank.checked_sub(1)? as u32 }) {
        return None;
    }
    nodes.push(next);
    cur = graph.nodes[next].outputs[0];
    let last = g.sole_consumer(cur)?;
    let last_node = &graph.nodes[last];
    if last_node.op != Op::MatMul || last_node.inputs[0]? != cur {
        return None;
    }
    let v = last_node.inputs[1]?;
    nodes.push(last);
    if !scale.is_finite() {
        return None;
    }

    // The fused op broadcasts q, k, v and the mask to the output's batch axes; a pattern whose
    // shapes it cannot take stays unfused.
    let shape = |id: ValueId| graph.values[id].shape.as_slice();
    let out = shape(last_node.outputs[0]);
    let ok_rank = [q, k, v].iter().all(|&id| shape(id).len() >= 2) && out.len() >= 2;
    let f32s = [Some(q), Some(k), Some(v), mask]
        .into_iter()
        .flatten()
        .all(|id| graph.values[id].dtype == edgefold_runtime::DType::F32);
    if !ok_rank || !f32s {
        return None;
    }
    let batch = |s: &[Dim]| s[..s.len() - 2].to_vec();
    let bo = batch(out);
    if ![q, k, v].iter().all(|&id| expands_to(&batch(shape(id)), &bo)) {
        return None;
    }
    if let Some(mask) = mask {
        let mut scores = bo.clone();
        scores.extend_from_slice(&shape(cur)[rank - 2..]);
        if !expands_to(shape(mask), &scores) {
            return None;
        }
    }
    Some(AttentionMatch { nodes, q, k, v, mask, scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::PackedGraph;
    use crate::ir::{Node, Value};
    use crate::tensor::HostTensor;

    /// Scaling step between the scores and the softmax of a test graph.
    #[derive(Clone, Copy, PartialEq)]
    enum Scale {
        None,
        /// scores / 2
        DivBy2,
        /// 0.25 * scores
        QuarterTimes,
        /// 2 / scores, which is not a scale.
        TwoOver,
    }

    /// q `[2, 3, 5, 4]`, keys as columns `[2, 3, 4, 7]`, v `[2, 3, 7, 6]` and a mask `[2, 1, 1, 7]`
    /// as graph inputs, through matmul, `scale`, the mask (if `masked`), a softmax along `axis`
    /// and a second matmul. With `leak`, the softmax output is a graph output too.
    fn graph(scale: Scale, masked: bool, axis: u32, leak: bool) -> Graph {
        let mut g = Graph::default();
        let value = |g: &mut Graph, name: &str, dims: &[u32]| {
            let shape = dims.iter().map(|&d| Dim::constant(d)).collect();
            let data = None;
            g.add_value(Value {
                name: name.into(),
                dtype: edgefold_runtime::DType::F32,
                shape,
                data,
            })
        };

        let q = value(&mut g, "q", &[2, 3, 5, 4]);
        let k = value(&mut g, "k", &[2, 3, 4, 7]);
        let v = value(&mut g, "v", &[2, 3, 7, 6]);
        let mask = value(&mut g, "mask", &[2, 1, 1, 7]);
        g.inputs = vec![q, k, v, mask];
        let node = |g: &mut Graph, op: Op, inputs: Vec<ValueId>, dims: &[u32]| {
            let out = value(g, &format!("t{}", g.nodes.len()), dims);
            let inputs = inputs.into_iter().map(Some).collect();
            g.nodes.push(Node {
                name: format!("n{}", g.nodes.len()),
                op,
                inputs,
                outputs: vec![out],
            });
            out
        };

        let scores = [2, 3, 5, 7];
        let mut x = node(&mut g, Op::MatMul, vec![q, k], &scores);
        let two = g.add_const("two".into(), vec![], Storage::F32(vec![2.0]));
        let quarter = g.add_const("quarter".into(), vec![1], Storage::F32(vec![0.25]));
        x = match scale {
            Scale::None => x,
            Scale::DivBy2 => node(&mut g, Op::Binary(BinaryKind::Div), vec![x, two], &scores),
            Scale::QuarterTimes => {
                node(&mut g, Op::Binary(BinaryKind::Mul), vec![quarter, x], &scores)
            }
            Scale::TwoOver => node(&mut g, Op::Binary(BinaryKind::Div), vec![two, x], &scores),
        };
        if masked {
            x = node(&mut g, Op::Binary(BinaryKind::Add), vec![x, mask], &scores);
        }
        let p = node(&mut g, Op::Softmax { axis }, vec![x], &scores);
        let y = node(&mut g, Op::MatMul, vec![p, v], &[2, 3, 5, 6]);
        g.outputs = if leak { vec![y, p] } else { vec![y] };
        g
    }

    fn inputs() -> Vec<HostTensor> {
        let values = |n: usize, seed: usize| {
            (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 250.0 - 2.0).collect()
        };
        let mut mask: Vec<f32> = values(14, 4);
        mask[3] = f32::NEG_INFINITY;
        mask[7 + 6] = -1e4;
        vec![
            HostTensor::f32(vec![2, 3, 5, 4], values(120, 1)),
            HostTensor::f32(vec![2, 3, 4, 7], values(168, 2)),
            HostTensor::f32(vec![2, 3, 7, 6], values(252, 3)),
            HostTensor::f32(vec![2, 1, 1, 7], mask),
        ]
    }

    fn run(g: &Graph) -> Vec<f32> {
        let mut packed = PackedGraph::new(g).expect("graph packs");
        let outputs = packed.run(&inputs()).expect("graph runs");
        outputs[0].as_f32().expect("f32 output").to_vec()
    }

    #[test]
    fn attention_variants_fuse_and_match() {
        let cases = [
            (Scale::DivBy2, true, 0.5),
            (Scale::QuarterTimes, true, 0.25),
            (Scale::None, false, 1.0),
            (Scale::DivBy2, false, 0.5),
        ];
        for (scale, masked, factor) in cases {
            let unfused = graph(scale, masked, 3, false);
            let mut fused = unfused.clone();
            assert_eq!(fuse_attention(&mut fused), 1);
            fused.prune();
            assert_eq!(fused.nodes.len(), 1, "only the fused op is left");
            assert_eq!(fused.nodes[0].op, Op::Attention { scale: factor });
            assert_eq!(fused.nodes[0].inputs.len(), 3 + masked as usize);

            let (want, got) = (run(&unfused), run(&fused));
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "output {i}: {b} against {a}");
            }
        }
    }

    #[test]
    fn attention_lookalikes_stay_unfused() {
        for g in [
            graph(Scale::TwoOver, true, 3, false),
            graph(Scale::DivBy2, true, 2, false),
            graph(Scale::DivBy2, true, 3, true),
        ] {
            let mut fused = g.clone();
            assert_eq!(fuse_attention(&mut fused), 0);
            assert_eq!(fused, g);
        }
    }

    /// The readers of the product in an activation test graph, besides the Unary.
    #[derive(Clone, Copy, PartialEq)]
    enum Reader {
        /// Only the Unary reads it.
        Unary,
        /// It is also a graph output.
        Output,
        /// An Add reads it too.
        Add,
        /// A second Unary follows the first.
        TwoUnary,
    }

    /// Builds a graph of x `[3, 5]` through a Linear with a `[4, 5]` weight and a bias, then
    /// `act`, with the product read by `reader` too.
    fn linear_graph(act: Op, reader: Reader) -> Graph {
        let mut g = Graph::default();
        let shape = vec![Dim::constant(3), Dim::constant(4)];
        let value = |g: &mut Graph, name: &str, shape: Vec<Dim>| {
            g.add_value(Value {
                name: name.into(),
                dtype: edgefold_runtime::DType::F32,
                shape,
                data: None,
            })
        };

        let x = value(&mut g, "x", vec![Dim::constant(3), Dim::constant(5)]);
        g.inputs = vec![x];
        let w: Vec<f32> = (0..20).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let w = g.add_const("w".into(), vec![4, 5], Storage::F32(w));
        let b = g.add_const("b".into(), vec![4], Storage::F32(vec![0.5, -1.0, 0.0, 2.0]));
        let product = value(&mut g, "product", shape.clone());
        let y = value(&mut g, "y", shape.clone());
        let node = |name: &str, op: Op, inputs: Vec<ValueId>, out: ValueId| Node {
            name: name.into(),
            op,
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![out],
        };

        let linear = Op::Linear { activation: None };
        g.nodes.push(node("fc", linear, vec![x, w, b], product));
        g.nodes.push(node("act", act, vec![product], y));
        g.outputs = vec![y];

        match reader {
            Reader::Unary => {}
            Reader::Output => g.outputs.push(product),
            Reader::Add => {
                let z = value(&mut g, "z", shape);
                g.nodes.push(node("add", Op::Binary(BinaryKind::Add), vec![product, y], z));
                g.outputs = vec![z];
            }
            Reader::TwoUnary => {
                let z = value(&mut g, "z", shape);
                g.nodes.push(node(
                    "neg",
                    Op::Unary { kind: UnaryKind::Neg, alpha: 0.0, beta: 0.0 },
                    vec![y],
                    z,
                ));
                g.outputs = vec![z];
            }
        }
        g
    }

    #[test]
    fn activations_fold_into_linear() {
        let x = || {
            let values = (0..15).map(|i| (i as f32 - 7.0) / 3.0).collect();
            vec![HostTensor::f32(vec![3, 5], values)]
        };
        let run = |g: &Graph| {
            let outputs = PackedGraph::new(g).expect("graph packs").run(&x()).expect("graph runs");
            outputs[0].as_f32().expect("f32 output").to_vec()
        };
        let acts = [
            Activation { kind: UnaryKind::Relu, alpha: 0.0, beta: 0.0 },
            Activation { kind: UnaryKind::Gelu, alpha: 0.0, beta: 0.0 },
            Activation { kind: UnaryKind::Clip, alpha: -0.5, beta: 1.5 },
            Activation { kind: UnaryKind::Silu, alpha: 0.0, beta: 0.0 },
        ];
        for a in acts {
            let unary = Op::Unary { kind: a.kind, alpha: a.alpha, beta: a.beta };
            for reader in [Reader::Unary, Reader::TwoUnary] {
                let unfused = linear_graph(unary, reader);
                let mut fused = unfused.clone();
                assert_eq!(fuse_activation(&mut fused), 1);
                fused.prune();
                assert_eq!(fused.nodes.len(), unfused.nodes.len() - 1);
                assert_eq!(fused.nodes[0].op, Op::Linear { activation: Some(a) });
                // One more activation is not folded into a Linear that has one.
                assert_eq!(fuse_activation(&mut fused), 0);
                let (want, got) = (run(&unfused), run(&fused));
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&want), bits(&got), "{:?}", a.kind);
                assert!(want.iter().any(|&v| v != 0.0));
            }
            for reader in [Reader::Output, Reader::Add] {
                let g = linear_graph(unary, reader);
                let mut fused = g.clone();
                assert_eq!(fuse_activation(&mut fused), 0);
                assert_eq!(fused, g);
            }
        }
    }
}
