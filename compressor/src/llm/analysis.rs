//! Redundancy measures of a decoder model: each block's differential contribution to the residual
//! stream, and which blocks can be removed at the smallest cost in perplexity.

use super::{perplexity, ForwardError, Llama, Observation};
use crate::text::cosine;

/// Block Influence of every block (Men et al. 2024, "ShortGPT"): the mean over tokens of
/// `1 - cos(h_in, h_out)`, where `h_in` and `h_out` are the residual stream before and after
/// the block. A block that barely turns the stream scores near 0.
pub fn block_influence(
    model: &Llama,
    tokens: &[u32],
    window: usize,
) -> Result<Vec<f64>, ForwardError> {
    let dim = model.config().dim;
    let blocks = model.config().layers;
    let mut sums = vec![0.0f64; blocks];
    let mut count = 0usize;
    let mut cache = model.new_cache(window.max(1));
    for chunk in tokens.chunks(window.max(1)) {
        cache.clear();
        let mut previous: Option<Vec<f32>> = None;
        model.forward_observed(chunk, &mut cache, false, &mut |o| {
            if let Observation::BlockInput { block, hidden } = o {
                if let (Some(prev), true) = (&previous, block > 0) {
                    for (a, b) in prev.chunks_exact(dim).zip(hidden.chunks_exact(dim)) {
                        sums[block - 1] += 1.0 - cosine(a, b);
                    }
                }
                previous = Some(hidden.to_vec());
            }
        })?;
        count += chunk.len();
    }
    Ok(sums.into_iter().map(|s| s / count.max(1) as f64).collect())
}

/// How much each block changes the residual stream, and how alike the blocks' outputs are.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSimilarity {
    /// Block Influence of each block, as [`block_influence`] computes it.
    pub influence: Vec<f64>,
    /// Mean angular distance `arccos(cos(h_in, h_out)) / π` of each block.
    pub angular: Vec<f64>,
    /// `cosine[i][j]`: mean over tokens of the cosine between the outputs of blocks `i` and `j`.
    pub cosine: Vec<Vec<f64>>,
}

/// Measures [`BlockSimilarity`] over `tokens`, run in windows of `window` from an empty cache.
pub fn block_similarity(
    model: &Llama,
    tokens: &[u32],
    window: usize,
) -> Result<BlockSimilarity, ForwardError> {
    let dim = model.config().dim;
    let blocks = model.config().layers;
    let mut influence = vec![0.0f64; blocks];
    let mut angular = vec![0.0f64; blocks];
    let mut cosine_sums = vec![vec![0.0f64; blocks]; blocks];
    let mut count = 0usize;
    let mut cache = model.new_cache(window.max(1));
    for chunk in tokens.chunks(window.max(1)) {
        cache.clear();
        // The residual stream at every block boundary, `[blocks + 1][tokens × dim]`.
        let mut boundaries: Vec<Vec<f32>> = Vec::with_capacity(blocks + 1);
        model.forward_observed(chunk, &mut cache, false, &mut |o| {
            if let Observation::BlockInput { hidden, .. } = o {
                boundaries.push(hidden.to_vec());
            }
        })?;
        for token in 0..chunk.len() {
            let at = |b: usize| &boundaries[b][token * dim..(token + 1) * dim];
            for block in 0..blocks {
                let c = cosine(at(block), at(block + 1)).clamp(-1.0, 1.0);
                influence[block] += 1.0 - c;
                angular[block] += c.acos() / std::f64::consts::PI;
            }
            for (i, row) in cosine_sums.iter_mut().enumerate() {
                for (j, sum) in row.iter_mut().enumerate().skip(i) {
                    *sum += if i == j { 1.0 } else { cosine(at(i + 1), at(j + 1)) };
                }
            }
        }
        count += chunk.len();
    }
    let n = count.max(1) as f64;
    // The sums fill the upper triangle; the matrix is symmetric.
    let cosine = (0..blocks)
        .map(|i| (0..blocks).map(|j| cosine_sums[i.min(j)][i.max(j)] / n).collect::<Vec<f64>>())
        .collect();
    Ok(BlockSimilarity {
        influence: influence.into_iter().map(|v| v / n).collect(),
        angular: angular.into_iter().map(|v| v / n).collect(),
        cosine,
    })
}

/// One step of [`sleb`]: the block removed and the calibration perplexity after removing it.
#[derive(Debug, Clone, PartialEq)]
pub struct Removal {
    /// Index of the block in the original model.
    pub block: usize,
    /// Calibration perplexity with this and every earlier block removed.
    pub perplexity: f64,
}

/// Removes `count` blocks greedily, each step the block whose removal leaves the lowest
/// perplexity on `tokens` (SLEB, Song et al. 2024). Every candidate is verified by running the
/// model without it. `progress` is called with the candidates tried so far.
pub fn sleb(
    model: &Llama,
    tokens: &[u32],
    window: usize,
    count: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Removal>, ForwardError> {
    let mut current = model.clone();
    let mut removed = Vec::new();
    let mut tried = 0;
    for _ in 0..count.min(model.config().layers.saturating_sub(1)) {
        let mut best: Option<Removal> = None;
        for &block in current.block_ids() {
            let mut candidate = current.clone();
            candidate.remove_blocks(&[block]);
            let mut ppl = perplexity(&candidate, tokens, window, |_| {})?.perplexity;
            tried += 1;
            progress(tried);
            // A NaN perplexity counts as the worst.
            if ppl.is_nan() {
                ppl = f64::INFINITY;
            }
            if best.as_ref().is_none_or(|b| ppl < b.perplexity) {
                best = Some(Removal { block, perplexity: ppl });
            }
        }
        let Some(best) = best else { break };
        current.remove_blocks(&[best.block]);
        removed.push(best);
    }
    Ok(removed)
}

/// Returns the `count` blocks of lowest influence, lowest first.
pub fn lowest_influence(influence: &[f64], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..influence.len()).collect();
    order.sort_by(|&a, &b| influence[a].total_cmp(&influence[b]));
    order.truncate(count);
    order
}
