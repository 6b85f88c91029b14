//! Calibration: runs the original graph (f32, through the runtime) on sample inputs and streams the
//! statistics compression needs: for each linear op's input the Gram matrix XᵀX (f64) and mean
//! |x|, and at block boundaries each block's contribution to the residual stream and the
//! similarity between blocks' outputs.
//!
//! Memory stays bounded: one sample runs at a time, Grams are accumulated in place, and at most
//! [`MAX_KEPT_TOKENS`] hidden-state rows per boundary are kept for the similarity map.

use std::collections::BTreeMap;

use edgefold_runtime::ops::Op;
use faer::{Accum, Mat, Par};

use crate::blocks::{find_blocks, Block};
use crate::exec::{ExecError, PackedGraph};
use crate::ir::{Graph, ValueId};
use crate::tensor::HostTensor;

/// Hidden-state rows kept per block boundary for the CKA similarity map.
pub const MAX_KEPT_TOKENS: usize = 512;

/// Input statistics of one linear op input.
#[derive(Clone, Debug)]
pub struct InputStats {
    /// Width of the input (columns of X).
    pub k: usize,
    /// XᵀX, row-major k × k.
    pub gram: Vec<f64>,
    /// Σ|x| per column.
    pub abs_sum: Vec<f64>,
    /// Rows (tokens) seen.
    pub rows: usize,
}

impl InputStats {
    /// Mean |x| per input column.
    pub fn abs_mean(&self) -> Vec<f64> {
        self.abs_sum.iter().map(|s| s / self.rows.max(1) as f64).collect()
    }
}

/// Residual-stream statistics of the blocks.
#[derive(Clone, Debug, Default)]
pub struct BlockStats {
    /// The blocks, in order.
    pub blocks: Vec<Block>,
    /// Block Influence: mean over tokens of 1 - cos(h_in, h_out), one per block.
    pub influence: Vec<f64>,
    /// Mean angular distance arccos(cos(h_in, h_out)) / π, one per block.
    pub angular: Vec<f64>,
    /// Mean token cosine similarity between block outputs, blocks × blocks.
    pub cosine: Vec<Vec<f64>>,
    /// Linear CKA between block outputs over the kept tokens, blocks × blocks.
    pub cka: Vec<Vec<f64>>,
}

/// Everything calibration measures.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// Statistics keyed by the name of the linear input value (several linear ops may share one
    /// input). Names survive graph rewrites that renumber values.
    pub inputs: BTreeMap<String, InputStats>,
    /// Block statistics, when blocks were found.
    pub blocks: Option<BlockStats>,
    /// Samples run.
    pub samples: usize,
}

/// The activation inputs of linear ops whose weights are constant f32 matrices.
pub fn linear_inputs(graph: &Graph) -> Vec<ValueId> {
    let mut ids: Vec<ValueId> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Linear { .. }))
        .filter_map(|n| n.inputs[0])
        .filter(|&v| !graph.is_const(v))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    (ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0)
}

/// Runs `graph` on every sample and gathers statistics. `progress` is called after each sample.
///
/// # Errors
/// Runtime failures while running a sample.
pub fn calibrate(
    graph: &Graph,
    samples: &[Vec<HostTensor>],
    mut progress: impl FnMut(usize),
) -> Result<Calibration, ExecError> {
    let inputs = linear_inputs(graph);
    let blocks = find_blocks(graph);
    let mut boundaries: Vec<ValueId> = Vec::new();
    if let Some(first) = blocks.first() {
        boundaries.push(first.input);
        boundaries.extend(blocks.iter().map(|b| b.output));
    }
    let mut capture = graph.clone();
    let base_outputs = capture.outputs.len();
    capture.outputs.extend(inputs.iter().copied());
    capture.outputs.extend(boundaries.iter().copied());
    let mut packed = PackedGraph::new(&capture)?;

    let mut stats: BTreeMap<ValueId, (usize, Mat<f64>, Vec<f64>, usize)> = BTreeMap::new();
    let nb = boundaries.len();
    let mut influence = vec![0f64; nb.saturating_sub(1)];
    let mut angular = vec![0f64; nb.saturating_sub(1)];
    let mut cosine = vec![vec![0f64; nb.saturating_sub(1)]; nb.saturating_sub(1)];
    let mut kept: Vec<Vec<Vec<f32>>> = vec![Vec::new(); nb];
    let mut tokens = 0usize;

    for (index, sample) in samples.iter().enumerate() {
        let outputs = packed.run(sample)?;
        for (slot, &v) in inputs.iter().enumerate() {
            let t = &outputs[base_outputs + slot];
            let values = t.as_f32().unwrap_or(&[]);
            let k = *t.shape.last().unwrap_or(&1);
            let rows = values.len() / k.max(1);
            let entry = stats.entry(v).or_insert_with(|| (k, Mat::zeros(k, k), vec![0.0; k], 0));
            let x = Mat::<f64>::from_fn(rows, k, |i, j| values[i * k + j] as f64);
            faer::linalg::matmul::matmul(
                entry.1.as_mut(),
                Accum::Add,
                x.transpose(),
                x.as_ref(),
                1.0,
                Par::Seq,
            );
            for (j, s) in entry.2.iter_mut().enumerate() {
                *s += (0..rows).map(|i| values[i * k + j].abs() as f64).sum::<f64>();
            }
            entry.3 += rows;
        }
        if nb >= 2 {
            let states: Vec<&HostTensor> =
                (0..nb).map(|b| &outputs[base_outputs + inputs.len() + b]).collect();
            let d = *states[0].shape.last().unwrap_or(&1);
            let rows = states[0].len() / d.max(1);
            let row = |b: usize, t: usize| &states[b].as_f32().unwrap_or(&[])[t * d..(t + 1) * d];
            for t in 0..rows {
                for (b, sims) in cosine.iter_mut().enumerate() {
                    let c = cos(row(b, t), row(b + 1, t));
                    influence[b] += 1.0 - c;
                    angular[b] += c.acos() / std::f64::consts::PI;
                    for (j, sim) in sims.iter_mut().enumerate().skip(b) {
                        *sim += cos(row(b + 1, t), row(j + 1, t));
                    }
                }
                for (b, keep) in kept.iter_mut().enumerate() {
                    if keep.len() < MAX_KEPT_TOKENS {
                        keep.push(row(b, t).to_vec());
                    }
                }
            }
            tokens += rows;
        }
        progress(index + 1);
    }

    let inputs = stats
        .into_iter()
        .map(|(v, (k, g, abs_sum, rows))| {
            let gram = (0..k * k).map(|i| g[(i / k, i % k)]).collect();
            (graph.values[v].name.clone(), InputStats { k, gram, abs_sum, rows })
        })
        .collect();
    let blocks = (nb >= 2).then(|| {
        let n = tokens.max(1) as f64;
        let m = nb - 1;
        // Only the upper triangle was accumulated: scale it and mirror it below the diagonal.
        cosine.iter_mut().flatten().for_each(|v| *v /= n);
        for b in 1..m {
            let (upper, lower) = cosine.split_at_mut(b);
            for (j, row) in upper.iter().enumerate() {
                lower[0][j] = row[b];
            }
        }
        let outs: Vec<&Vec<Vec<f32>>> = kept.iter().skip(1).collect();
        BlockStats {
            blocks: blocks.clone(),
            influence: influence.iter().map(|v| v / n).collect(),
            angular: angular.iter().map(|v| v / n).collect(),
            cosine,
            cka: cka_matrix(&outs),
        }
    });
    Ok(Calibration { inputs, blocks, samples: samples.len() })
}

/// Linear CKA between every pair of token-feature matrices (Kornblith et al. 2019), computed from
/// centered token Gram matrices.
pub fn cka_matrix(states: &[&Vec<Vec<f32>>]) -> Vec<Vec<f64>> {
    let grams: Vec<Mat<f64>> = states.iter().map(|rows| centered_gram(rows)).collect();
    let dot = |a: &Mat<f64>, b: &Mat<f64>| {
        let mut s = 0.0;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                s += a[(i, j)] * b[(i, j)];
            }
        }
        s
    };
    let norms: Vec<f64> = grams.iter().map(|g| dot(g, g).sqrt()).collect();
    let n = grams.len();
    let mut out = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in i..n {
            let v = if norms[i] > 0.0 && norms[j] > 0.0 {
                dot(&grams[i], &grams[j]) / (norms[i] * norms[j])
            } else {
                0.0
            };
            out[i][j] = v;
            out[j][i] = v;
        }
    }
    out
}

/// H K H for K = X Xᵀ over the rows of `x` (H centers rows and columns).
fn centered_gram(rows: &[Vec<f32>]) -> Mat<f64> {
    let n = rows.len();
    let d = rows.first().map_or(0, Vec::len);
    let mean: Vec<f64> =
        (0..d).map(|j| rows.iter().map(|r| r[j] as f64).sum::<f64>() / n.max(1) as f64).collect();
    let x = Mat::<f64>::from_fn(n, d, |i, j| rows[i][j] as f64 - mean[j]);
    let mut k = Mat::<f64>::zeros(n, n);
    faer::linalg::matmul::matmul(
        k.as_mut(),
        Accum::Replace,
        x.as_ref(),
        x.transpose(),
        1.0,
        Par::Seq,
    );
    k
}
