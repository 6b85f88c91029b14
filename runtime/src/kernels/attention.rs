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

use super::generic::exp_approx;

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
/// Runs the AVX-512 version where the CPU has it.
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

/// The portable version of [`attention_head`], for every target.
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
    let HeadDims { queries, depth, keys, width } = dims;
    let out = &mut out[..queries * width];
    out.fill(0.0);
    if keys == 0 {
        return;
    }
    let mut scores = [[0f32; KEYS]; ROWS];
    for first in (0..queries).step_by(ROWS) {
        let rows = (queries - first).min(ROWS);
        let mut largest = [f32::NEG_INFINITY; ROWS];
        let mut sums = [0f32; ROWS];
        for start in (0..keys).step_by(KEYS) {
            let n = (keys - start).min(KEYS);
            for (r, row) in scores.iter_mut().enumerate().take(rows) {
                let row = &mut row[..n];
                row.fill(0.0);
                let qrow = &q[(first + r) * depth..][..depth];
                for (d, &qv) in qrow.iter().enumerate() {
                    for (s, &kv) in row.iter_mut().zip(&k[d * keys + start..][..n]) {
                        *s += qv * kv;
                    }
                }
                match mask {
                    Some(m) => {
                        let base = (first + r) * m.row_stride + start * m.key_stride;
                        for (j, s) in row.iter_mut().enumerate() {
                            *s = *s * scale + m.values[base + j * m.key_stride];
                        }
                    }
                    None => row.iter_mut().for_each(|s| *s *= scale),
                }
                let block_max =
                    row.iter().fold(f32::NEG_INFINITY, |a, &s| if s > a { s } else { a });
                let top = if block_max > largest[r] { block_max } else { largest[r] };
                // While every score so far is negative infinity, shifting by 0 keeps the
                // exponentials at 0 instead of NaN, so that a later finite score still counts.
                let shift = if top == f32::NEG_INFINITY { 0.0 } else { top };
                let rescale = exp_approx(largest[r] - shift);
                let mut sum = 0.0;
                for s in row.iter_mut() {
                    *s = exp_approx(*s - shift);
                    sum += *s;
                }
                sums[r] = sums[r] * rescale + sum;
                largest[r] = top;
                let orow = &mut out[(first + r) * width..][..width];
                if rescale != 1.0 {
                    orow.iter_mut().for_each(|o| *o *= rescale);
                }
                for (j, &p) in row.iter().enumerate() {
                    for (o, &x) in orow.iter_mut().zip(&v[(start + j) * width..][..width]) {
                        *o += p * x;
                    }
                }
            }
        }
        for (r, &sum) in sums.iter().enumerate().take(rows) {
            let inv = 1.0 / sum;
            out[(first + r) * width..][..width].iter_mut().for_each(|o| *o *= inv);
        }
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

    /// [`super::attention_head`] with AVX-512: [`ROWS`] query rows at a time, their scores for a
    /// block of keys in 16 registers, and the value rows in chunks of up to 64 columns with the
    /// output rows in registers.
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
        let mut first = 0;
        while first < dims.queries {
            let rows = (dims.queries - first).min(ROWS);
            // SAFETY: rows `first..first + rows` exist; the caller's guarantees cover the rest.
            unsafe {
                match rows {
                    4 => block::<4>(q, k, v, mask, scale, dims, out, first),
                    3 => block::<3>(q, k, v, mask, scale, dims, out, first),
                    2 => block::<2>(q, k, v, mask, scale, dims, out, first),
                    _ => block::<1>(q, k, v, mask, scale, dims, out, first),
                }
            }
            first += rows;
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

    /// Query rows `first..first + R` of one head.
    ///
    /// # Safety
    ///
    /// As [`head`], and `first + R <= dims.queries`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn block<const R: usize>(
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
        let mut probs = [[0f32; KEYS]; ROWS];
        let mut largest = [f32::NEG_INFINITY; R];
        let mut sums = [0f32; R];
        // SAFETY (whole block): every pointer that is read or written through stays inside its
        // slice: rows `first..first + R` of `q` and `out`, rows `0..depth` of `k` and keys
        // `0..keys` of `v` and the mask, whose reach the caller checked. Lanes past the end of a
        // block or a row are masked off, and their addresses are formed with `wrapping_add`.
        unsafe {
            let (qp, kp, vp) = (q.as_ptr().add(first * depth), k.as_ptr(), v.as_ptr());
            let op = out.as_mut_ptr().add(first * width);
            for r in 0..R {
                core::ptr::write_bytes(op.add(r * width), 0, width);
            }
            let scale_v = _mm512_set1_ps(scale);
            let minus_inf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut start = 0;
            while start < keys {
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
                let mut rescale = [1f32; R];
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
                    let block_max = _mm512_reduce_max_ps(top_v);
                    let top = if block_max > largest[r] { block_max } else { largest[r] };
                    let shift = if top == f32::NEG_INFINITY { 0.0 } else { top };
                    rescale[r] = super::exp_approx(largest[r] - shift);
                    largest[r] = top;
                    let shift_v = _mm512_set1_ps(shift);
                    let mut sum_v = _mm512_setzero_ps();
                    for c in 0..VECS {
                        let p = exp(_mm512_sub_ps(acc[r][c], shift_v));
                        sum_v = _mm512_add_ps(sum_v, p);
                        _mm512_storeu_ps(probs[r].as_mut_ptr().add(16 * c), p);
                    }
                    sums[r] = sums[r] * rescale[r] + _mm512_reduce_add_ps(sum_v);
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
                start += n;
            }
            for r in 0..R {
                let inv = _mm512_set1_ps(1.0 / sums[r]);
                let mut col = 0;
                while col < width {
                    let m = lanes(width - col);
                    let at = op.add(r * width + col);
                    _mm512_mask_storeu_ps(at, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, at), inv));
                    col += 16;
                }
            }
        }
    }

    /// [`exp_approx`](super::exp_approx) on 16 lanes, with the same constants and fused steps, so
    /// each lane matches the scalar function compiled with FMA.
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        // SAFETY: the caller runs on a CPU with AVX-512F.
        unsafe {
            let clamped =
                _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33)), _mm512_set1_ps(88.37));
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
            let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000)),
                _mm512_set1_epi32(127),
            ));
            let value = _mm512_mul_ps(e, _mm512_castsi512_ps(bits));
            let value = _mm512_mask_blend_ps(
                _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(88.37)),
                value,
                _mm512_set1_ps(f32::INFINITY),
            );
            let value = _mm512_mask_blend_ps(
                _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-87.33)),
                value,
                _mm512_setzero_ps(),
            );
            // NaN lanes keep x.
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), value, x)
        }
    }
}
