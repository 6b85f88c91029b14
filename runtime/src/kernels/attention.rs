//! Scaled dot-product attention with its softmax fused in: `y = softmax(scale · q k + mask) v`
//! for one head, without storing the `queries x keys` scores.
//!
//! Keys are taken in blocks of [`KEYS`] with a running softmax (Milakov and Gimelshein, "Online
//! normalizer calculation for softmax", 2018; FlashAttention, Dao et al., 2022, uses the same).
//! Each query row keeps its largest score so far and the sum of exponentials relative to it. When
//! a block raises the largest score, the row's sum and output are rescaled. The scores of
//! one block live on the stack ([`ROWS`] x [`KEYS`] values, 1 KiB), so the kernel needs no
//! scratch memory of its own whatever the sequence length.
//!
//! Exponentials are [`exp_approx`](super::generic::exp_approx) (with fused multiply-adds where
//! the CPU has them), as in the unfused softmax. Results differ from the unfused ops by rounding
//! only: the sums run in another order, and each output is scaled by the reciprocal of the
//! softmax sum at the end instead of each probability.

use super::generic::{exp_approx, max_lanes, mul_add, sum_lanes, vectorized};

/// Query rows that share one pass over the keys.
pub const ROWS: usize = 4;
/// Keys per block.
pub const KEYS: usize = 64;

/// Extents of one head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadDims {
    /// Query rows `S`.
    pub queries: usize,
    /// Length `D` of a query and a key.
    pub depth: usize,
    /// Keys `T`.
    pub keys: usize,
    /// Length `E` of a value row.
    pub width: usize,
}

/// View of the additive mask of one head: the mask value for query row `i` and key `t` is
/// `values[i * row_stride + t * key_stride]`. A stride is 0 along an axis that the mask
/// broadcasts over.
#[derive(Clone, Copy, Debug)]
pub struct Mask<'a> {
    /// The values, starting at query row 0 and key 0 of this head.
    pub values: &'a [f32],
    /// Step between query rows.
    pub row_stride: usize,
    /// Step between keys: 0 or 1.
    pub key_stride: usize,
}

impl Mask<'_> {
    /// Returns whether every value that `dims` reaches lies inside `values`.
    fn covers(&self, dims: HeadDims) -> bool {
        if dims.queries == 0 || dims.keys == 0 {
            return true;
        }
        let last = (dims.queries - 1).checked_mul(self.row_stride).and_then(|r| {
            (dims.keys - 1).checked_mul(self.key_stride).and_then(|k| r.checked_add(k))
        });
        self.key_stride <= 1 && last.is_some_and(|l| l < self.values.len())
    }
}

/// Computes one head: `out[S, E] = softmax(scale · q[S, D] × k[D, T] + mask[S, T]) × v[T, E]`,
/// the softmax along each row of `T` scores. `k` contains the keys as columns (the second operand
/// of the scores' matrix product). A row whose scores are all negative infinity gives NaN, as the
/// unfused softmax does.
///
/// Runs the AVX-512 version where the CPU has it, else [`portable`].
/// NOTE: on aarch64 and on CPUs with AVX2 but not AVX-512, the portable version replaced two
/// calls of their SIMD `matmul`. It was not timed there, so it may be slower.
///
/// # Panics
///
/// If a slice is shorter than `dims` implies, or the mask reaches past its values.
pub fn attention_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<Mask<'_>>,
    scale: f32,
    dims: HeadDims,
    out: &mut [f32],
) {
    let HeadDims { queries, depth, keys, width } = dims;
    assert!(q.len() >= queries * depth);
    assert!(k.len() >= depth * keys);
    assert!(v.len() >= keys * width);
    assert!(out.len() >= queries * width);
    assert!(mask.is_none_or(|m| m.covers(dims)));
    if keys == 0 {
        // With no keys the output is the product with zero value rows: 0.
        out[..queries * width].fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::Isa::best() == super::Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 (`best` returns only supported sets), and the slice lengths
        // and the mask's reach were checked above.
        unsafe { avx512::head(q, k, v, mask, scale, dims, out) };
        return;
    }
    portable(q, k, v, mask, scale, dims, out);
}

/// Keys, and value columns, per register tile of the portable version.
const TILE: usize = 16;

/// Whether the portable version uses fused multiply-adds: on aarch64, where every CPU has them
/// and `f32::mul_add` (which needs `std`) compiles to one instruction.
const FUSED: bool = cfg!(all(target_arch = "aarch64", feature = "std"));

vectorized! {
    /// The portable version of [`attention_head`], for every target. Scores and output rows are
    /// computed in tiles of [`ROWS`] x 16 values, which the compiler keeps in vector registers.
    ///
    /// # Panics
    ///
    /// If a slice is shorter than `dims` implies, or the mask reaches past its values.
    pub fn portable(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<Mask<'_>>,
        scale: f32,
        dims: HeadDims,
        out: &mut [f32],
    ) {
        let HeadDims { queries, keys, width, .. } = dims;
        let out = &mut out[..queries * width];
        out.fill(0.0);
        if keys == 0 {
            return;
        }
        let mut first = 0;
        while first < queries {
            let rows = (queries - first).min(ROWS);
            match rows {
                4 => portable_rows::<4>(q, k, v, mask, scale, dims, out, first),
                3 => portable_rows::<3>(q, k, v, mask, scale, dims, out, first),
                2 => portable_rows::<2>(q, k, v, mask, scale, dims, out, first),
                _ => portable_rows::<1>(q, k, v, mask, scale, dims, out, first),
            }
            first += rows;
        }
    }
}

/// Query rows `first..first + R` of one head, for [`portable`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn portable_rows<const R: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<Mask<'_>>,
    scale: f32,
    dims: HeadDims,
    out: &mut [f32],
    first: usize,
) {
    let HeadDims { depth, keys, width, .. } = dims;
    let fma = mul_add::<FUSED>;
    let qrows: [&[f32]; R] = core::array::from_fn(|r| &q[(first + r) * depth..][..depth]);
    let mut scores = [[0f32; KEYS]; R];
    let mut largest = [f32::NEG_INFINITY; R];
    let mut sums = [0f32; R];
    for start in (0..keys).step_by(KEYS) {
        let n = (keys - start).min(KEYS);

        // Scores, 16 keys at a time; a full tile has a fixed length so that it stays in registers.
        for sub in (0..n).step_by(TILE) {
            let m = (n - sub).min(TILE);
            let mut acc = [[0f32; TILE]; R];
            for d in 0..depth {
                let krow = &k[d * keys + start + sub..];
                // The full tile's loop has a fixed length, so the compiler unrolls it and keeps
                // `acc` in vector registers; factoring both branches into one helper ran 8x slower.
                if m == TILE {
                    let kv = &krow[..TILE];
                    for r in 0..R {
                        let qv = qrows[r][d];
                        for c in 0..TILE {
                            acc[r][c] = fma(qv, kv[c], acc[r][c]);
                        }
                    }
                } else {
                    let kv = &krow[..m];
                    for r in 0..R {
                        let qv = qrows[r][d];
                        for c in 0..m {
                            acc[r][c] = fma(qv, kv[c], acc[r][c]);
                        }
                    }
                }
            }
            for r in 0..R {
                scores[r][sub..sub + m].copy_from_slice(&acc[r][..m]);
            }
        }

        // Scale, mask and the running softmax.
        let mut rescale = [1f32; R];
        for r in 0..R {
            let row = &mut scores[r][..n];
            match mask {
                Some(m) => {
                    let base = (first + r) * m.row_stride + start * m.key_stride;
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = fma(*s, scale, m.values[base + j * m.key_stride]);
                    }
                }
                None => row.iter_mut().for_each(|s| *s *= scale),
            }
            let block_max = max_lanes(row);
            let top = if block_max > largest[r] { block_max } else { largest[r] };
            // While every score so far is negative infinity, shifting by 0 keeps the
            // exponentials at 0 instead of NaN, so that a later finite score still counts.
            let shift = if top == f32::NEG_INFINITY { 0.0 } else { top };
            rescale[r] = exp_approx(largest[r] - shift);
            largest[r] = top;
            row.iter_mut().for_each(|s| *s = exp_approx(*s - shift));
            sums[r] = sums[r] * rescale[r] + sum_lanes(row, |s| s);
        }

        // Output rows += probabilities x value rows, 16 columns at a time.
        for col in (0..width).step_by(TILE) {
            let w = (width - col).min(TILE);
            let mut o = [[0f32; TILE]; R];
            for r in 0..R {
                let orow = &out[(first + r) * width + col..][..w];
                for c in 0..w {
                    o[r][c] = orow[c] * rescale[r];
                }
            }
            for j in 0..n {
                let vrow = &v[(start + j) * width + col..];
                if w == TILE {
                    let vv = &vrow[..TILE];
                    for r in 0..R {
                        let p = scores[r][j];
                        for c in 0..TILE {
                            o[r][c] = fma(p, vv[c], o[r][c]);
                        }
                    }
                } else {
                    let vv = &vrow[..w];
                    for r in 0..R {
                        let p = scores[r][j];
                        for c in 0..w {
                            o[r][c] = fma(p, vv[c], o[r][c]);
                        }
                    }
                }
            }
            for r in 0..R {
                out[(first + r) * width + col..][..w].copy_from_slice(&o[r][..w]);
            }
        }
    }
    for r in 0..R {
        let inv = 1.0 / sums[r];
        out[(first + r) * width..][..width].iter_mut().for_each(|o| *o *= inv);
    }
}

// The register tiles are indexed by row and vector together, which reads more plainly as index
// loops than as zipped iterators.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use super::{HeadDims, Mask, KEYS, ROWS};

    /// Vectors of 16 lanes per key block.
    const VECS: usize = KEYS / 16;

    /// Query rows that take turns on one block of keys while its keys and values stay in the L1
    /// cache: four tiles of [`ROWS`].
    const GROUP: usize = 4 * ROWS;

    /// Running softmax of one tile of query rows.
    #[derive(Clone, Copy)]
    struct Running {
        /// Largest score so far per row.
        largest: [f32; ROWS],
        /// Per row, 16 partial sums of the exponentials relative to `largest`.
        sums: [__m512; ROWS],
    }

    /// [`super::attention_head`] with AVX-512. Groups of [`GROUP`] query rows go through the keys
    /// block by block, so each block of keys and values is read once per group and stays in the
    /// L1 cache while the group's tiles of [`ROWS`] rows use it. A tile keeps its scores for a
    /// block in 16 registers. Its output rows stay in registers while the block's value rows
    /// are added, in chunks of up to 64 columns.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F; the slices must be as long as `dims` implies, and the mask
    /// must stay inside its values (see [`super::attention_head`]).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn head(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<Mask<'_>>,
        scale: f32,
        dims: HeadDims,
        out: &mut [f32],
    ) {
        let HeadDims { queries, keys, width, .. } = dims;
        let start_state =
            Running { largest: [f32::NEG_INFINITY; ROWS], sums: [_mm512_setzero_ps(); ROWS] };
        let mut first = 0;
        while first < queries {
            let group = (queries - first).min(GROUP);
            out[first * width..(first + group) * width].fill(0.0);
            let mut states = [start_state; GROUP / ROWS];
            let mut start = 0;
            while start < keys {
                let mut row = 0;
                for state in states.iter_mut() {
                    let rows = (group - row).min(ROWS);
                    let at = first + row;
                    // SAFETY: rows `at..at + rows` exist; the caller's guarantees cover the
                    // rest.
                    unsafe {
                        match rows {
                            0 => break,
                            4 => tile::<4>(q, k, v, mask, scale, dims, out, at, start, state),
                            3 => tile::<3>(q, k, v, mask, scale, dims, out, at, start, state),
                            2 => tile::<2>(q, k, v, mask, scale, dims, out, at, start, state),
                            _ => tile::<1>(q, k, v, mask, scale, dims, out, at, start, state),
                        }
                    }
                    row += rows;
                }
                start += KEYS;
            }
            for (i, orow) in out[first * width..(first + group) * width]
                .chunks_exact_mut(width.max(1))
                .enumerate()
            {
                let inv = 1.0 / _mm512_reduce_add_ps(states[i / ROWS].sums[i % ROWS]);
                orow.iter_mut().for_each(|o| *o *= inv);
            }
            first += group;
        }
    }

    /// Lanes `0..n` set, for `n` up to 16.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Adds the keys `start..start + KEYS` (fewer at the end) to query rows `first..first + R`:
    /// their scores, the running softmax in `state`, and the weighted value rows in `out`.
    ///
    /// # Safety
    ///
    /// As [`head`], `first + R <= dims.queries` and `start < dims.keys`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<Mask<'_>>,
        scale: f32,
        dims: HeadDims,
        out: &mut [f32],
        first: usize,
        start: usize,
        state: &mut Running,
    ) {
        let HeadDims { depth, keys, width, .. } = dims;
        let mut probs = [[0f32; KEYS]; R];
        // SAFETY (whole block): every pointer that is read or written through stays inside its
        // slice: rows `first..first + R` of `q` and `out`, rows `0..depth` of `k` and keys
        // `start..start + n` of `k`, `v` and the mask, whose reach the caller checked. Lanes
        // past the end of a block or a row are masked off, and their addresses are formed with
        // `wrapping_add`.
        unsafe {
            let (qp, kp, vp) = (q.as_ptr().add(first * depth), k.as_ptr(), v.as_ptr());
            let op = out.as_mut_ptr().add(first * width);
            let n = (keys - start).min(KEYS);
            let masks: [__mmask16; VECS] =
                core::array::from_fn(|c| lanes(n.saturating_sub(16 * c)));

            // Scores: acc[r][c] contains keys start + 16c .. start + 16c + 16 of row r.
            let mut acc = [[_mm512_setzero_ps(); VECS]; R];
            for d in 0..depth {
                let krow = kp.add(d * keys + start);
                let kv: [__m512; VECS] = core::array::from_fn(|c| {
                    _mm512_maskz_loadu_ps(masks[c], krow.wrapping_add(16 * c))
                });
                for r in 0..R {
                    let qv = _mm512_set1_ps(*qp.add(r * depth + d));
                    for c in 0..VECS {
                        acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
                    }
                }
            }

            // Scale, mask and block maxima. Each stage runs over all rows before the next, so
            // that the rows' chains of reductions and exponentials overlap.
            let scale_v = _mm512_set1_ps(scale);
            let minus_inf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut block_max = [0f32; R];
            for r in 0..R {
                for c in 0..VECS {
                    let s = match mask {
                        Some(m) => {
                            let base = m.values.as_ptr().add((first + r) * m.row_stride);
                            let mv = if m.key_stride == 0 {
                                _mm512_set1_ps(*base)
                            } else {
                                let at = base.wrapping_add(start + 16 * c);
                                _mm512_maskz_loadu_ps(masks[c], at)
                            };
                            _mm512_fmadd_ps(acc[r][c], scale_v, mv)
                        }
                        None => _mm512_mul_ps(acc[r][c], scale_v),
                    };
                    acc[r][c] = _mm512_mask_blend_ps(masks[c], minus_inf, s);
                }
                let top_v = _mm512_max_ps(
                    _mm512_max_ps(acc[r][0], acc[r][1]),
                    _mm512_max_ps(acc[r][2], acc[r][3]),
                );
                block_max[r] = _mm512_reduce_max_ps(top_v);
            }

            // The rescale factors exp(old largest - new shift) of all rows in one vector.
            let mut shifts = [0f32; 16];
            let mut moved = [0f32; 16];
            for r in 0..R {
                let old = state.largest[r];
                let top = if block_max[r] > old { block_max[r] } else { old };
                // While every score so far is negative infinity, shifting by 0 keeps the
                // exponentials at 0 instead of NaN, so that a later finite score still counts.
                shifts[r] = if top == f32::NEG_INFINITY { 0.0 } else { top };
                moved[r] = old - shifts[r];
                state.largest[r] = top;
            }
            let mut rescale = [0f32; 16];
            _mm512_storeu_ps(rescale.as_mut_ptr(), exp(_mm512_loadu_ps(moved.as_ptr())));
            for r in 0..R {
                let shift_v = _mm512_set1_ps(shifts[r]);
                let mut sum = _mm512_mul_ps(state.sums[r], _mm512_set1_ps(rescale[r]));
                for c in 0..VECS {
                    let p = exp(_mm512_sub_ps(acc[r][c], shift_v));
                    sum = _mm512_add_ps(sum, p);
                    _mm512_storeu_ps(probs[r].as_mut_ptr().add(16 * c), p);
                }
                state.sums[r] = sum;
            }

            // Output rows += probabilities x value rows, in chunks of up to 64 columns.
            let mut col = 0;
            while col < width {
                let w = (width - col).min(16 * VECS);
                let wm: [__mmask16; VECS] =
                    core::array::from_fn(|c| lanes(w.saturating_sub(16 * c)));
                let chunks = w.div_ceil(16);
                let mut o = [[_mm512_setzero_ps(); VECS]; R];
                for r in 0..R {
                    let f = _mm512_set1_ps(rescale[r]);
                    for c in 0..chunks {
                        let at = op.add(r * width + col + 16 * c);
                        o[r][c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(wm[c], at), f);
                    }
                }
                for j in 0..n {
                    let vrow = vp.add((start + j) * width + col);
                    let mut vv = [_mm512_setzero_ps(); VECS];
                    for c in 0..chunks {
                        vv[c] = _mm512_maskz_loadu_ps(wm[c], vrow.add(16 * c));
                    }
                    for r in 0..R {
                        let p = _mm512_set1_ps(probs[r][j]);
                        for c in 0..chunks {
                            o[r][c] = _mm512_fmadd_ps(p, vv[c], o[r][c]);
                        }
                    }
                }
                for r in 0..R {
                    for c in 0..chunks {
                        let at = op.add(r * width + col + 16 * c);
                        _mm512_mask_storeu_ps(at, wm[c], o[r][c]);
                    }
                }
                col += w;
            }
        }
    }

    /// [`exp_approx`](super::exp_approx) on 16 lanes for the arguments of a softmax, which are at
    /// most 0 (scores minus their maximum), negative infinity or NaN. The constants and fused
    /// steps are the scalar function's, but `vscalefps` applies the power of two, and the upper
    /// clamp is left out.
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        // SAFETY: the caller runs on a CPU with AVX-512F.
        unsafe {
            // With x second, a NaN lane stays NaN through the max and every later step.
            let clamped = _mm512_max_ps(_mm512_set1_ps(-87.33), x);
            let round = _mm512_set1_ps(12_582_912.0);
            let t = _mm512_fmadd_ps(clamped, _mm512_set1_ps(core::f32::consts::LOG2_E), round);
            let n = _mm512_sub_ps(t, round);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), clamped);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
            // Lanes below the clamp (negative infinity among them) give 0; NaN lanes pass.
            let in_range = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-87.33));
            _mm512_maskz_scalef_ps(in_range, e, n)
        }
    }
}
