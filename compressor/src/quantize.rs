//! Weight compression of a graph: low-rank factorization of linear weights, and quantization of
//! linear weights and embedding tables to f16, int8 per row or int4 groups.

use edgefold_runtime::format::{DType, Dim};
use edgefold_runtime::ops::Op;

use crate::ir::{Graph, Node, Storage, Value, ValueId};
use crate::spectrum::{
    break_even_rank, elbow_rank, energy_rank, low_rank_factors, singular_values, SpectrumError,
};

/// Element type of stored weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    /// Keep f32.
    F32,
    /// IEEE half precision.
    F16,
    /// Symmetric int8 with one scale per output channel (per row of embedding tables).
    Int8,
    /// Symmetric int4 in groups of 32 along each row, one f16 scale per group.
    Int4,
}

impl std::str::FromStr for Quantize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Quantize::F32),
            "f16" => Ok(Quantize::F16),
            "int8" => Ok(Quantize::Int8),
            "int4" => Ok(Quantize::Int4),
            other => {
                Err(format!("unknown quantization {other:?}; expected f32, f16, int8 or int4"))
            }
        }
    }
}

impl std::fmt::Display for Quantize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantize::F32 => "f32",
            Quantize::F16 => "f16",
            Quantize::Int8 => "int8",
            Quantize::Int4 => "int4",
        })
    }
}

/// How the rank of a low-rank factorization is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LowRank {
    /// No factorization.
    Off,
    /// The elbow of the singular spectrum (Kneedle).
    Elbow,
    /// The smallest rank keeping this fraction of the squared singular values.
    Energy(f64),
}

impl std::str::FromStr for LowRank {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(LowRank::Off),
            "elbow" => Ok(LowRank::Elbow),
            other => match other.strip_prefix("energy:").map(str::parse::<f64>) {
                Some(Ok(f)) if f > 0.0 && f <= 1.0 => Ok(LowRank::Energy(f)),
                _ => Err(format!(
                    "unknown low-rank mode {other:?}; expected off, elbow or energy:F with F in (0, 1]"
                )),
            },
        }
    }
}

impl std::fmt::Display for LowRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LowRank::Off => f.write_str("off"),
            LowRank::Elbow => f.write_str("elbow"),
            LowRank::Energy(e) => write!(f, "energy:{e}"),
        }
    }
}

/// Group length of int4 quantization.
pub const INT4_GROUP: usize = 32;

/// Int4 group length for rows of `cols` values: [`INT4_GROUP`] where it divides the row, else the
/// largest even divisor from 8 up (so scales cost at most 2 bits per weight), else `None`.
pub fn int4_group(cols: usize) -> Option<usize> {
    if cols.is_multiple_of(INT4_GROUP) {
        return Some(INT4_GROUP);
    }
    (4..INT4_GROUP / 2).rev().map(|half| 2 * half).find(|&g| cols.is_multiple_of(g))
}

/// One factorized weight, for reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Factorized {
    /// Name of the linear op.
    pub node: String,
    /// Rows (outputs) and columns (inputs) of the weight.
    pub shape: (usize, usize),
    /// Rank kept.
    pub rank: usize,
}

/// Constant f32 matrix data of a linear op's weight: (rows, cols, values).
fn linear_weight(graph: &Graph, node: &Node) -> Option<(ValueId, usize, usize)> {
    if !matches!(node.op, Op::Linear { .. }) {
        return None;
    }
    let w = node.inputs.get(1).copied().flatten()?;
    let v = &graph.values[w];
    match (&v.data, v.shape.as_slice()) {
        (Some(Storage::F32(_)), [n, k]) => Some((w, n.factor as usize, k.factor as usize)),
        _ => None,
    }
}

/// Replaces each linear weight W (n x k) whose chosen rank r is below the break-even rank by two
/// linear ops with weights V (r x k) and U·S (n x r).
///
/// # Errors
/// Propagates SVD failures (non-finite weights).
pub fn factorize(graph: &mut Graph, mode: LowRank) -> Result<Vec<Factorized>, SpectrumError> {
    let mut done = Vec::new();
    if mode == LowRank::Off {
        return Ok(done);
    }
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    for node in std::mem::take(&mut graph.nodes) {
        let Some((w, n, k)) = linear_weight(graph, &node) else {
            nodes.push(node);
            continue;
        };
        let data = graph.values[w].data.as_ref().and_then(Storage::as_f32).unwrap_or(&[]).to_vec();
        let sv = singular_values(&data, n, k)?;
        let rank = match mode {
            LowRank::Elbow => elbow_rank(&sv),
            LowRank::Energy(f) => energy_rank(&sv, f),
            LowRank::Off => unreachable!("handled above"),
        };
        let limit = break_even_rank(n, k);
        if rank == 0 || rank > limit {
            log::debug!(
                "{}: rank {rank} is above the break-even rank {limit}; kept dense",
                node.name
            );
            nodes.push(node);
            continue;
        }
        log::debug!("{}: {n}x{k} factorized at rank {rank} (break-even {limit})", node.name);
        let (left, right) = low_rank_factors(&data, n, k, rank)?;
        let x = node.inputs[0].expect("linear has an input");
        let name = graph.values[w].name.clone();
        let a = graph.add_const(format!("{name}.right"), vec![rank, k], Storage::F32(right));
        let b = graph.add_const(format!("{name}.left"), vec![n, rank], Storage::F32(left));
        let mut mid_shape = graph.values[x].shape.clone();
        *mid_shape.last_mut().expect("linear input has rank >= 1") = Dim::constant(rank as u32);
        let mid = graph.add_value(Value {
            name: format!("{}.low_rank", node.name),
            dtype: DType::F32,
            shape: mid_shape,
            data: None,
        });
        nodes.push(Node {
            name: format!("{}.right", node.name),
            op: Op::Linear { activation: None },
            inputs: vec![Some(x), Some(a)],
            outputs: vec![mid],
        });
        let mut inputs = vec![Some(mid), Some(b)];
        inputs.extend(node.inputs.get(2).copied());
        done.push(Factorized { node: node.name.clone(), shape: (n, k), rank });
        nodes.push(Node {
            name: format!("{}.left", node.name),
            // The activation, if any, applies to the product of both factors.
            op: node.op,
            inputs,
            outputs: node.outputs,
        });
    }
    graph.nodes = nodes;
    graph.prune();
    Ok(done)
}

/// Rounds a row to symmetric int8 with one scale.
pub fn quantize_row_i8(row: &[f32]) -> (Vec<i8>, f32) {
    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let q = row.iter().map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8).collect();
    (q, scale)
}

/// Quantizes a row-major matrix to int4 groups along rows: packed values and f16 scale bits.
pub fn quantize_i4(data: &[f32], rows: usize, cols: usize, group: usize) -> (Vec<u8>, Vec<u16>) {
    let row_bytes = cols.div_ceil(2);
    let mut packed = vec![0u8; rows * row_bytes];
    let mut scales = Vec::with_capacity(rows * cols / group);
    for r in 0..rows {
        for g in 0..cols / group {
            let chunk = &data[r * cols + g * group..r * cols + (g + 1) * group];
            let scale = group_scale(chunk);
            let s = scale.to_f32();
            scales.push(scale.to_bits());
            for (i, &v) in chunk.iter().enumerate() {
                let q = (v / s).round().clamp(-8.0, 7.0) as i8;
                let c = g * group + i;
                let nibble = (q as u8) & 0x0F;
                packed[r * row_bytes + c / 2] |=
                    if c.is_multiple_of(2) { nibble } else { nibble << 4 };
            }
        }
    }
    (packed, scales)
}

/// Quantizes `data` (`rows × cols`) to int4 groups of `group` values with an f16 scale and an
/// f16 minimum each, on the unsigned grid `value = u × scale + min`, `u` in 0..=15 (llama.cpp's
/// Q4_1). The nibbles store `u - 8`, so they read as the signed values the runtime expects.
/// Returns the packed nibbles, the scales and the minimums as f16 bits.
///
/// Values already on such a grid (dequantized Q4_1 weights) come back unchanged: the minimum is
/// the group's smallest value and the scale a fifteenth of its range, both rounded to f16 first.
pub fn quantize_i4_min(
    data: &[f32],
    rows: usize,
    cols: usize,
    group: usize,
) -> (Vec<u8>, Vec<u16>, Vec<u16>) {
    let row_bytes = cols.div_ceil(2);
    let mut packed = vec![0u8; rows * row_bytes];
    let groups = cols / group;
    let mut scales = Vec::with_capacity(rows * groups);
    let mut mins = Vec::with_capacity(rows * groups);
    for r in 0..rows {
        for g in 0..groups {
            let chunk = &data[r * cols + g * group..r * cols + (g + 1) * group];
            let lo = chunk.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let min = half::f16::from_f32(lo);
            let scale = half::f16::from_f32((hi - min.to_f32()) / 15.0);
            let (m, s) = (min.to_f32(), scale.to_f32());
            scales.push(scale.to_bits());
            mins.push(min.to_bits());
            for (i, &v) in chunk.iter().enumerate() {
                let u = if s > 0.0 { ((v - m) / s).round().clamp(0.0, 15.0) as u8 } else { 0 };
                let nibble = u ^ 0x08;
                let c = g * group + i;
                packed[r * row_bytes + c / 2] |=
                    if c.is_multiple_of(2) { nibble } else { nibble << 4 };
            }
        }
    }
    (packed, scales, mins)
}

/// The f16 scale of one int4 group: the clipping of the largest magnitude (from none down to 80 %)
/// whose rounding leaves the smallest squared error.
pub(crate) fn group_scale(chunk: &[f32]) -> half::f16 {
    let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 || !max.is_finite() {
        return half::f16::from_f32(1.0);
    }
    let error = |s: f32| -> f32 {
        chunk.iter().map(|&v| (v - (v / s).round().clamp(-8.0, 7.0) * s).powi(2)).sum()
    };
    let mut best = half::f16::from_f32(max / 7.0);
    let mut best_error = error(best.to_f32());
    for clip in [0.95f32, 0.9, 0.85, 0.8] {
        let candidate = half::f16::from_f32(max * clip / 7.0);
        let e = error(candidate.to_f32());
        if e < best_error {
            (best, best_error) = (candidate, e);
        }
    }
    best
}

/// Whether every use of `v` reads it as a linear or convolution weight or an axis-0 gather table.
fn quantizable_uses(graph: &Graph, v: ValueId) -> bool {
    let mut used = false;
    for node in &graph.nodes {
        for (i, input) in node.inputs.iter().enumerate() {
            if *input != Some(v) {
                continue;
            }
            used = true;
            let ok = matches!(
                (node.op, i),
                (Op::Linear { .. }, 1) | (Op::Gather { axis: 0 }, 0) | (Op::Conv2d { .. }, 1)
            );
            if !ok {
                return false;
            }
        }
    }
    used
}

/// Stores linear and convolution weights and embedding tables in `mode`. Returns the number of
/// tensors converted. With `Int4`, convolution weights (see [`quantize_conv_int4`] for the
/// measured alternative), rows that no group length fits (see [`int4_group`]) and embedding
/// tables are stored as int8: plain int4 rounding of the MLPerf Tiny keyword spotting model's
/// pointwise convolutions changes its top class on the reference input.
pub fn quantize(graph: &mut Graph, mode: Quantize) -> usize {
    if mode == Quantize::F32 {
        return 0;
    }
    let mut count = 0;
    for v in 0..graph.values.len() {
        let value = &graph.values[v];
        let (Some(Storage::F32(data)), [rows, cols]) = (&value.data, value.shape.as_slice()) else {
            continue;
        };
        let (rows, cols) = (rows.factor as usize, cols.factor as usize);
        if !quantizable_uses(graph, v) {
            continue;
        }
        let is_table =
            graph.nodes.iter().any(|n| matches!(n.op, Op::Gather { .. }) && n.inputs[0] == Some(v));
        let is_conv_weight = graph
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::Conv2d { .. }) && n.inputs.get(1) == Some(&Some(v)));
        let storage = match mode {
            Quantize::F16 => {
                Storage::F16(data.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect())
            }
            Quantize::Int4 if !is_table && !is_conv_weight && int4_group(cols).is_some() => {
                let group = int4_group(cols).unwrap_or(INT4_GROUP);
                let (packed, scales) = quantize_i4(data, rows, cols, group);
                Storage::I4Grouped { packed, scales, group }
            }
            Quantize::Int8 | Quantize::Int4 => {
                let mut q = Vec::with_capacity(data.len());
                let mut scales = Vec::with_capacity(rows);
                for row in data.chunks_exact(cols) {
                    let (qr, s) = quantize_row_i8(row);
                    q.extend(qr);
                    scales.push(s);
                }
                Storage::I8PerRow { q, scales }
            }
            Quantize::F32 => unreachable!("returned above"),
        };
        let value = &mut graph.values[v];
        value.dtype = storage.dtype();
        value.data = Some(storage);
        count += 1;
    }
    if matches!(mode, Quantize::F16 | Quantize::Int4) {
        count += conv_biases_to_f16(graph);
    }
    count
}

/// Stores f32 convolution weights as int4 groups (see [`int4_group`]), except the first layer's,
/// which sees the raw input. The planner uses this where it measures the result; returns the
/// number of weights converted.
pub fn quantize_conv_int4(graph: &mut Graph) -> usize {
    let weights: Vec<ValueId> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv2d { .. }))
        .filter_map(|n| n.inputs.get(1).copied().flatten())
        .collect();
    let first_layer = graph
        .nodes
        .iter()
        .find(|n| matches!(n.op, Op::Linear { .. } | Op::Conv2d { .. }))
        .and_then(|n| n.inputs.get(1).copied().flatten());
    let mut count = 0;
    for v in weights {
        if Some(v) == first_layer || !quantizable_uses(graph, v) {
            continue;
        }
        let value = &graph.values[v];
        let (Some(Storage::F32(data)), [rows, cols]) = (&value.data, value.shape.as_slice()) else {
            continue;
        };
        let (rows, cols) = (rows.factor as usize, cols.factor as usize);
        let Some(group) = int4_group(cols) else { continue };
        let (packed, scales) = quantize_i4(data, rows, cols, group);
        let value = &mut graph.values[v];
        value.data = Some(Storage::I4Grouped { packed, scales, group });
        value.dtype = DType::I4;
        count += 1;
    }
    count
}

/// Stores convolution biases as f16, where nothing else reads them. Returns how many changed.
fn conv_biases_to_f16(graph: &mut Graph) -> usize {
    let mut count = 0;
    for v in 0..graph.values.len() {
        let Some(Storage::F32(data)) = &graph.values[v].data else { continue };
        let mut uses = graph.nodes.iter().flat_map(|n| {
            n.inputs.iter().enumerate().filter(|(_, i)| **i == Some(v)).map(move |(i, _)| (n.op, i))
        });
        let only_bias = uses.all(|(op, i)| matches!(op, Op::Conv2d { .. }) && i == 2);
        let used = graph.nodes.iter().any(|n| n.inputs.contains(&Some(v)));
        if !(only_bias && used) || graph.outputs.contains(&v) {
            continue;
        }
        let bits = data.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
        let value = &mut graph.values[v];
        value.data = Some(Storage::F16(bits));
        value.dtype = edgefold_runtime::DType::F16;
        count += 1;
    }
    count
}
