//! `linear` with int4 or int8 weights and int8 activations on x86_64 with AVX-512 VNNI.
//!
//! Each row of `x` is quantized to int8 in groups of 32 values with one f32 scale per group, so
//! that the largest magnitude maps to 127. The products of weight nibbles and activation bytes
//! are then summed in 32-bit integers with `vpdpbusd`, 64 per instruction. A group's integer sum is then
//! scaled by the weight's and the activation's scales. llama.cpp multiplies Q4_1 weights by
//! activations quantized the same way (its Q8_1 blocks).
//!
//! Weight nibbles are read as unsigned values `t = nibble ^ 8` in 0..=15, so that a stored
//! signed `q` is `t - 8`. For a group with weight scale `d`, minimum `m` (with minimums) and
//! activation scale `s`:
//! - with minimums, `Σ w x = d s Σ t xq + m Σ x`, with the exact `Σ x` of the f32 inputs;
//! - without, `Σ w x = d s Σ t xq - 8 d s Σ xq`.
//!
//! The second term is a dot product over groups, of a per-row vector (`m` or `d`) with a
//! per-input one.
//!
//! Int8 weights (one scale per row) take the inputs in their own order, each stored plus 128
//! as an unsigned byte; see [`dot_rows_i8`].

use core::arch::x86_64::*;

use super::generic::{I4Rows, I8Rows};
use super::LinearCall;
use super::Weights;

/// Values per activation group; the weights' group must be the same.
const GROUP: usize = 32;

/// Maximum row length of the kernel. The quantized input lives on the stack, 10 KiB per row of
/// `x` at this length.
pub(crate) const MAX_K: usize = 8192;

/// Rows of `x` that share each unpacked weight group.
const ROWS: usize = 4;

/// Returns whether the CPU runs this kernel: AVX-512F, BW, VL and VNNI, with AVX2, FMA and F16C.
pub(crate) fn supported() -> bool {
    #[cfg(feature = "std")]
    {
        super::x86_64::has_avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(feature = "std"))]
    {
        super::x86_64::has_avx512()
            && cfg!(all(
                target_feature = "avx512bw",
                target_feature = "avx512vl",
                target_feature = "avx512vnni"
            ))
    }
}

/// One row of `x` quantized for [`dot_rows`].
///
/// The bytes of each pair of groups (A, B) are laid out as A's even-indexed values, B's even,
/// A's odd, B's odd, 16 each: the order in which [`dot_rows`] unpacks the low and high nibbles of
/// 32 weight bytes.
#[repr(C, align(64))]
struct Quantized {
    q: [i8; MAX_K],
    /// Scale of each group.
    scale: [f32; MAX_K / GROUP],
    /// Per group, `Σ x` (weights with minimums) or `-8 s Σ xq` (without).
    offset: [f32; MAX_K / GROUP],
}

/// Runs the call with int8 activations when this kernel applies: `k <= MAX_K` a multiple of 64,
/// int4 weights in groups of 32 or int8 weights, and a CPU with VNNI. Returns false, having done
/// nothing, otherwise.
pub(crate) fn linear(call: &mut LinearCall<'_>) -> bool {
    let k = call.k;
    let fits = match call.w {
        Weights::I4(w) => w.group == GROUP,
        Weights::I8(_) => true,
        _ => false,
    };
    if !fits || k > MAX_K || !k.is_multiple_of(2 * GROUP) || !supported() {
        return false;
    }
    let empty =
        || Quantized { q: [0; MAX_K], scale: [0.0; MAX_K / GROUP], offset: [0.0; MAX_K / GROUP] };
    // One quantized row costs 10 KiB of stack to clear, so a single row gets one.
    match call.rows {
        1 => run(call, &mut [empty()]),
        _ => run(call, &mut [empty(), empty(), empty(), empty()]),
    }
    true
}

/// Runs an applicable call (see [`linear`]) in blocks of up to `quantized.len()` rows, at most
/// [`ROWS`].
fn run(call: &mut LinearCall<'_>, quantized: &mut [Quantized]) {
    let (k, n, rows) = (call.k, call.n, call.rows);
    let mut row = 0;
    while row < rows {
        let block = (rows - row).min(quantized.len()).min(ROWS);
        let x = &call.x[row * k..(row + block) * k];
        let y = &mut call.y[row * n..(row + block) * n];
        let quantized = &mut quantized[..block];
        // SAFETY: `linear` checked the CPU features and that `k <= MAX_K` is a multiple of 64;
        // `LinearCall::new` checked that `w` contains `n` rows of `k` values (int4: with `k / 32`
        // scales, and minimums, each; int8: with a scale each), and `x` and `y` were cut to
        // `block` rows of `k` and `n` values above.
        unsafe {
            match call.w {
                Weights::I4(w) => {
                    for (values, q) in x.chunks_exact(k).zip(quantized.iter_mut()) {
                        quantize(values, w.mins.is_some(), q);
                    }
                    match (w.mins.is_some(), block) {
                        (true, 4) => block_rows::<true, 4>(quantized, &w, k, y),
                        (true, 3) => block_rows::<true, 3>(quantized, &w, k, y),
                        (true, 2) => block_rows::<true, 2>(quantized, &w, k, y),
                        (true, _) => block_rows::<true, 1>(quantized, &w, k, y),
                        (false, 4) => block_rows::<false, 4>(quantized, &w, k, y),
                        (false, 3) => block_rows::<false, 3>(quantized, &w, k, y),
                        (false, 2) => block_rows::<false, 2>(quantized, &w, k, y),
                        (false, _) => block_rows::<false, 1>(quantized, &w, k, y),
                    }
                }
                Weights::I8(w) => {
                    for (values, q) in x.chunks_exact(k).zip(quantized.iter_mut()) {
                        quantize_biased(values, q);
                    }
                    match block {
                        4 => block_rows_i8::<4>(quantized, &w, k, y),
                        3 => block_rows_i8::<3>(quantized, &w, k, y),
                        2 => block_rows_i8::<2>(quantized, &w, k, y),
                        _ => block_rows_i8::<1>(quantized, &w, k, y),
                    }
                }
                // `linear` lets only int4 and int8 weights through.
                _ => {}
            }
        }
        if let Some(b) = call.bias {
            for y_row in y.chunks_exact_mut(n) {
                for (o, &b) in y_row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
        row += block;
    }
}

/// Quantizes `x` for int8 weights: groups of 32 as in [`quantize`], in their own order, each value
/// stored plus 128 as an unsigned byte (the operand `vpdpbusd` takes unsigned).
///
/// # Safety
///
/// As for [`quantize`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn quantize_biased(x: &[f32], out: &mut Quantized) {
    for (g, values) in x.chunks_exact(GROUP).enumerate() {
        // SAFETY: `values` has 32 elements; `g < MAX_K / 32` and the stores write 32 bytes at
        // `32 * g`, inside `out.q`.
        unsafe {
            let lo = _mm512_loadu_ps(values.as_ptr());
            let hi = _mm512_loadu_ps(values.as_ptr().add(16));
            let largest = _mm512_reduce_max_ps(_mm512_max_ps(abs(lo), abs(hi)));
            let unordered = nan_lanes(lo) | nan_lanes(hi);
            let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
            let inverse = _mm512_set1_ps(inverse);
            let bias = _mm_set1_epi8(0x80u8 as i8);
            let lo = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse)));
            let hi = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse)));
            let q = out.q.as_mut_ptr().add(GROUP * g);
            _mm_storeu_si128(q.cast(), _mm_xor_si128(lo, bias));
            _mm_storeu_si128(q.add(16).cast(), _mm_xor_si128(hi, bias));
            out.scale[g] = int8_scale(largest, unordered);
        }
    }
}

/// [`block_rows`] for int8 weights with one scale per row, from [`quantize_biased`] inputs.
///
/// # Safety
///
/// As for [`block_rows`], with `w` holding `y.len() / R` rows of `k` values and a scale each.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn block_rows_i8<const R: usize>(q: &[Quantized], w: &I8Rows<'_>, k: usize, y: &mut [f32]) {
    let n = y.len() / R;
    for j in 0..n {
        // SAFETY: row `j` is inside `w` (see above).
        let sums = unsafe { dot_rows_i8::<R>(q, w.q.as_ptr().add(j * k), k / GROUP) };
        let scale = w.scales[j];
        for (r, sum) in sums.into_iter().enumerate() {
            y[r * n + j] = sum * scale;
        }
    }
}

/// Computes the dot products of one int8 weight row, `groups` groups long (an even number),
/// with the first `R` inputs of `q`, before the row's scale.
///
/// Each input byte is its value plus 128, so `Σ w xq = Σ w (xq + 128) - 128 Σ w`, and the second
/// term comes from one more `vpdpbusd` of the weights with bytes of 128.
///
/// # Safety
///
/// As for [`block_rows_i8`], with `row` pointing at a row of `groups * 32` weights.
#[inline(always)]
unsafe fn dot_rows_i8<const R: usize>(q: &[Quantized], row: *const i8, groups: usize) -> [f32; R] {
    // With the length known, the indexing below needs no bounds checks.
    let q = &q[..R];
    // SAFETY: every pointer below stays inside the row and the `groups` groups of each `q`. The
    // masked loads read only the lanes of groups that exist.
    unsafe {
        let bias = _mm512_set1_epi8(0x80u8 as i8);
        // Lanes 0-7 of a pair's sums belong to its first group, 8-15 to its second.
        let first_pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let next_pair = _mm512_set1_epi32(2);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut scales = [_mm512_setzero_ps(); R];
        let mut g = 0;
        while g < groups {
            let count = (groups - g).min(16);
            let mask: __mmask16 = if count == 16 { u16::MAX } else { (1u16 << count) - 1 };
            for r in 0..R {
                scales[r] = _mm512_maskz_loadu_ps(mask, q[r].scale.as_ptr().add(g));
            }
            let mut index = first_pair;
            for pair in (g / 2)..(g + count) / 2 {
                let weights = _mm512_loadu_si512(row.add(64 * pair).cast());
                let offset = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, weights);
                for r in 0..R {
                    let x = _mm512_load_si512(q[r].q.as_ptr().add(64 * pair).cast());
                    let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, weights);
                    let sums = _mm512_sub_epi32(sums, offset);
                    let scale = _mm512_permutexvar_ps(index, scales[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
                }
                index = _mm512_add_epi32(index, next_pair);
            }
            g += count;
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]);
        }
        out
    }
}

/// Quantizes `x` (a multiple of 64 values, at most `MAX_K`) into `out`.
///
/// # Safety
///
/// The CPU must support [`supported`]'s features, and `x.len()` must be a multiple of 64 and at
/// most `MAX_K`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn quantize(x: &[f32], with_mins: bool, out: &mut Quantized) {
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (g, values) in x.chunks_exact(GROUP).enumerate() {
        // SAFETY: `values` has 32 elements; `g < MAX_K / 32` and the stores write 16 bytes each
        // at `64 * (g / 2) + 16 * (g % 2)` and 32 bytes after it, inside `out.q`.
        unsafe {
            let lo = _mm512_loadu_ps(values.as_ptr());
            let hi = _mm512_loadu_ps(values.as_ptr().add(16));
            let largest = _mm512_reduce_max_ps(_mm512_max_ps(abs(lo), abs(hi)));
            let scale = int8_scale(largest, nan_lanes(lo) | nan_lanes(hi));
            let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
            let inverse = _mm512_set1_ps(inverse);
            let ev = _mm512_mul_ps(_mm512_permutex2var_ps(lo, even, hi), inverse);
            let od = _mm512_mul_ps(_mm512_permutex2var_ps(lo, odd, hi), inverse);
            // Round to nearest (even on ties), then narrow with saturation; the products are
            // within ±127 except for a NaN, whose conversion gives i32::MIN and saturates.
            let ev = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(ev));
            let od = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(od));
            let at = 64 * (g / 2) + 16 * (g % 2);
            let q = out.q.as_mut_ptr().add(at);
            _mm_storeu_si128(q.cast(), ev);
            _mm_storeu_si128(q.add(32).cast(), od);
            out.scale[g] = scale;
            out.offset[g] = if with_mins {
                _mm512_reduce_add_ps(_mm512_add_ps(lo, hi))
            } else {
                let sum = _mm512_add_epi32(_mm512_cvtepi8_epi32(ev), _mm512_cvtepi8_epi32(od));
                -8.0 * scale * _mm512_reduce_add_epi32(sum) as f32
            };
        }
    }
}

/// Returns the int8 scale of values whose largest magnitude is `largest`: `largest / 127`, or NaN
/// when one of them is NaN (a lane of `unordered` set) or infinite. Every product with the
/// quantized values is then NaN, where saturated bytes would give a finite or wrongly signed sum.
#[inline(always)]
fn int8_scale(largest: f32, unordered: __mmask16) -> f32 {
    if unordered != 0 || largest == f32::INFINITY {
        f32::NAN
    } else {
        largest / 127.0
    }
}

/// Returns the lanes of `v` that are NaN.
#[inline(always)]
unsafe fn nan_lanes(v: __m512) -> __mmask16 {
    // SAFETY: AVX-512F per the caller.
    unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) }
}

/// Lane-wise absolute value.
#[inline(always)]
unsafe fn abs(v: __m512) -> __m512 {
    // SAFETY: AVX-512F per the caller.
    unsafe {
        _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MAX)))
    }
}

/// `y[r, j] = Σ w[j] · x[r]` for every row `j` of `w` and the first `R` quantized rows of `x`,
/// with `y` holding `R` rows of `n` values.
///
/// # Safety
///
/// As for [`quantize`]; `w` must hold `y.len() / R` rows of `k` values (checked by `LinearCall`),
/// with minimums exactly when `MIN`, and the first `R` entries of `q` must be rows of `x`
/// quantized with minimums when `MIN`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn block_rows<const MIN: bool, const R: usize>(
    q: &[Quantized],
    w: &I4Rows<'_>,
    k: usize,
    y: &mut [f32],
) {
    let groups = k / GROUP;
    let n = y.len() / R;
    for j in 0..n {
        // SAFETY: row `j` is inside `w` (see above).
        let sums = unsafe { dot_rows::<MIN, R>(q, w, j, groups) };
        for (r, sum) in sums.into_iter().enumerate() {
            y[r * n + j] = sum;
        }
    }
}

/// Computes the dot products of weight row `row` with the first `R` quantized rows of `x`. Each
/// group of weights is unpacked once for all `R`.
///
/// # Safety
///
/// As for [`block_rows`], with `row` one of `w`'s rows and `groups` its even number of groups.
#[inline(always)]
unsafe fn dot_rows<const MIN: bool, const R: usize>(
    q: &[Quantized],
    w: &I4Rows<'_>,
    row: usize,
    groups: usize,
) -> [f32; R] {
    // With the length known, the indexing below needs no bounds checks.
    let q = &q[..R];
    // SAFETY: every pointer below stays inside row `row` of the packed weights (16 bytes per
    // group), its scales and minimums (one per group), and the `groups` groups of each `q`. The
    // masked loads read only the lanes of groups that exist.
    unsafe {
        let packed = w.packed.as_ptr().add(row * groups * (GROUP / 2));
        let scales = w.scales.as_ptr().add(row * groups);
        let mins = w.mins.map_or(core::ptr::null(), |m| m.as_ptr().add(row * groups));
        let low = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(0x88u8 as i8);
        // Lanes 0-3 and 8-11 of a pair's sums belong to its first group, 4-7 and 12-15 to its
        // second: this index picks each lane's scale from 16 groups' scales.
        let first_pair = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
        let next_pair = _mm512_set1_epi32(2);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut offsets = [_mm512_setzero_ps(); R];
        let mut combined = [_mm512_setzero_ps(); R];
        let mut g = 0;
        while g < groups {
            let count = (groups - g).min(16);
            let mask: __mmask16 = if count == 16 { u16::MAX } else { (1u16 << count) - 1 };
            let d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scales.add(g).cast()));
            let per_row = match MIN {
                true => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mins.add(g).cast())),
                false => d,
            };
            for r in 0..R {
                let per_input = _mm512_maskz_loadu_ps(mask, q[r].offset.as_ptr().add(g));
                offsets[r] = _mm512_fmadd_ps(per_row, per_input, offsets[r]);
                let s = _mm512_maskz_loadu_ps(mask, q[r].scale.as_ptr().add(g));
                combined[r] = _mm512_mul_ps(d, s);
            }
            let mut index = first_pair;
            for pair in (g / 2)..(g + count) / 2 {
                let bytes = _mm256_loadu_si256(packed.add(32 * pair).cast());
                let bytes = _mm256_xor_si256(bytes, flip);
                let lo = _mm256_and_si256(bytes, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low);
                let weights = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                for r in 0..R {
                    let x = _mm512_load_si512(q[r].q.as_ptr().add(64 * pair).cast());
                    let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights, x);
                    let scale = _mm512_permutexvar_ps(index, combined[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
                }
                index = _mm512_add_epi32(index, next_pair);
            }
            g += count;
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(offsets[r]);
        }
        out
    }
}

/// Rows of `x` that [`linear_rows`] quantizes at once. Each tile of weight rows is read from
/// memory once per block and then stays in the L1 cache for the other rows of the block.
const ROW_BLOCK: usize = 16;

/// Weight rows whose offsets (see [`weight_offset`]) [`linear_rows`] computes at once. Wider
/// layers are done in parts of this many outputs, each quantizing the input again.
const COLUMN_CHUNK: usize = 2048;

/// The quantized rows of one block of [`linear_rows`], each padded to a multiple of 64 bytes.
#[repr(C, align(64))]
struct RowBlock {
    /// Each value plus 128, as an unsigned byte.
    q: [u8; ROW_BLOCK * MAX_K],
    /// Scale of each row.
    scale: [f32; ROW_BLOCK],
}

/// Runs the call with each row of `x` quantized to int8 with one scale for the whole row, when
/// the weights are int8, `0 < k <= MAX_K`, and the CPU has VNNI. Returns false, having done
/// nothing, otherwise.
///
/// With one scale per row, the integer sums run along the whole row and are converted to f32
/// once per output, so that the inner loop is nothing but `vpdpbusd`.
pub(crate) fn linear_rows(call: &mut LinearCall<'_>) -> bool {
    let Weights::I8(w) = call.w else {
        return false;
    };
    if !rows_apply(&call.w, call.k) {
        return false;
    }
    #[cfg(feature = "std")]
    if super::panels::applies(call.rows, call.k, call.n) {
        // SAFETY: as below; `applies` checked the shape.
        unsafe { super::panels::linear(call, &w) };
        return true;
    }
    let mut block = core::mem::MaybeUninit::<RowBlock>::uninit();
    // SAFETY: the CPU features were checked above, and `LinearCall::new` checked that `x`
    // contains `rows` rows of `k` values, `y` `rows` rows of `n`, `w` `n` rows of `k` values
    // with a scale each, and the bias (if any) `n` values. `rows_i8` writes every byte of the
    // block that it reads.
    unsafe { rows_i8(call, &w, block.as_mut_ptr()) };
    true
}

/// Returns whether [`linear_rows`] takes a call with weights `w` and rows of `k` values: int8
/// weights, `0 < k <= MAX_K`, and a CPU with VNNI. Each row's results then depend on that row
/// alone, whatever the number of rows.
pub(crate) fn rows_apply(w: &Weights<'_>, k: usize) -> bool {
    matches!(w, Weights::I8(_)) && k > 0 && k <= MAX_K && supported()
}

/// See [`linear_rows`].
///
/// # Safety
///
/// As described at the call in [`linear_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_i8(call: &mut LinearCall<'_>, w: &I8Rows<'_>, block: *mut RowBlock) {
    let (k, n, rows) = (call.k, call.n, call.rows);
    let padded = k.next_multiple_of(64);
    let tail: u64 = match k % 64 {
        0 => u64::MAX,
        r => (1u64 << r) - 1,
    };
    let dims = TileDims { k, padded, steps: padded / 64, tail };
    let mut offsets = [0i32; COLUMN_CHUNK];
    // SAFETY (whole block): `block` is valid for writes; row `r` of the block takes bytes
    // `r * padded..(r + 1) * padded` of `q`, inside it since `padded <= MAX_K`. Weight row `j`
    // is read at bytes `j * k..j * k + k` (the last step through the mask), and rows of `x` and
    // `y` are inside the checked slices.
    unsafe {
        let q = core::ptr::addr_of_mut!((*block).q).cast::<u8>();
        let scales = core::ptr::addr_of_mut!((*block).scale).cast::<f32>();
        let x = call.x.as_ptr();
        let y = call.y.as_mut_ptr();
        let wq = w.q.as_ptr();
        let mut c0 = 0;
        while c0 < n {
            let c1 = n.min(c0 + COLUMN_CHUNK);
            for (j, offset) in (c0..c1).zip(offsets.iter_mut()) {
                *offset = weight_offset(&dims, wq.add(j * k));
            }
            let mut m0 = 0;
            while m0 < rows {
                let count = (rows - m0).min(ROW_BLOCK);
                for r in 0..count {
                    let row = x.add((m0 + r) * k);
                    *scales.add(r) = quantize_row(row, k, padded, q.add(r * padded));
                }
                let out = Out { y: y.add(m0 * n), n, scales, w, bias: call.bias };
                let mut j = c0;
                while j + 4 <= c1 {
                    tiles::<4>(&dims, q, count, wq.add(j * k), j, &out, &offsets[j - c0..]);
                    j += 4;
                }
                while j < c1 {
                    tiles::<1>(&dims, q, count, wq.add(j * k), j, &out, &offsets[j - c0..]);
                    j += 1;
                }
                m0 += count;
            }
            c0 = c1;
        }
    }
}

/// Lengths shared by the tiles of one call of [`rows_i8`].
struct TileDims {
    /// Row length of `x` and of the weights.
    k: usize,
    /// Row length of the quantized block, `k` rounded up to 64.
    padded: usize,
    /// `padded / 64`.
    steps: usize,
    /// Bytes of the last step that are inside the row.
    tail: u64,
}

/// Output of [`tiles`]: `y` at the block's first row, and the scales of the integer sums.
struct Out<'a> {
    y: *mut f32,
    n: usize,
    scales: *const f32,
    w: &'a I8Rows<'a>,
    bias: Option<&'a [f32]>,
}

/// Quantizes the `k` values at `x` into `padded` bytes at `q` (zeros, stored as 128, after the
/// row's end) and returns the scale, NaN if a value is NaN or infinite.
///
/// # Safety
///
/// The CPU must support [`supported`]'s features. `x` must be valid for `k` reads and `q` for
/// `padded` writes, where `padded` is `k` rounded up to a multiple of 64.
#[inline(always)]
pub(crate) unsafe fn quantize_row(x: *const f32, k: usize, padded: usize, q: *mut u8) -> f32 {
    // SAFETY: the masked loads read only the first `k` values; the stores write 16 bytes at
    // each multiple of 16 below `padded`.
    unsafe {
        let mask = |i: usize| -> __mmask16 {
            match k.saturating_sub(i) {
                left if left >= 16 => u16::MAX,
                left => (1u16 << left) - 1,
            }
        };
        let mut largest = _mm512_setzero_ps();
        let mut unordered = 0;
        let mut i = 0;
        while i < k {
            let v = _mm512_maskz_loadu_ps(mask(i), x.add(i));
            largest = _mm512_max_ps(largest, abs(v));
            unordered |= nan_lanes(v);
            i += 16;
        }
        let largest = _mm512_reduce_max_ps(largest);
        let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
        let inverse = _mm512_set1_ps(inverse);
        let bias = _mm_set1_epi8(0x80u8 as i8);
        let mut i = 0;
        while i < padded {
            // Past `k` the mask is empty and the pointer may be past `x`, so it is formed with
            // `wrapping_add` and nothing is read through it.
            let v = _mm512_maskz_loadu_ps(mask(i), x.wrapping_add(i));
            // Round to nearest (even on ties), then narrow with saturation, as in `quantize`.
            let v = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverse)));
            _mm_storeu_si128(q.add(i).cast(), _mm_xor_si128(v, bias));
            i += 16;
        }
        int8_scale(largest, unordered)
    }
}

/// Returns `128 Σ w` over the weight row at `w`: the part of each integer sum that comes from
/// storing the inputs plus 128.
///
/// # Safety
///
/// As for [`rows_i8`], with `w` pointing at a weight row.
#[inline(always)]
unsafe fn weight_offset(dims: &TileDims, w: *const i8) -> i32 {
    // SAFETY: the row is read at bytes `0..k`, the last step through the mask.
    unsafe {
        let bias = _mm512_set1_epi8(0x80u8 as i8);
        let mut acc = _mm512_setzero_si512();
        for s in 0..dims.steps {
            let mask = if s + 1 == dims.steps { dims.tail } else { u64::MAX };
            let v = _mm512_maskz_loadu_epi8(mask, w.add(64 * s).cast());
            acc = _mm512_dpbusd_epi32(acc, bias, v);
        }
        _mm512_reduce_add_epi32(acc)
    }
}

/// Computes outputs `j..j + C` of every row of the block, four rows at a time, and writes them
/// to `out`. `offsets` starts with those of weight rows `j..j + C`.
///
/// # Safety
///
/// As for [`rows_i8`], with `w` pointing at weight row `j`, `j + C <= n`, `C` 1 or 4, and the
/// first `count` rows of the block quantized.
#[inline(always)]
unsafe fn tiles<const C: usize>(
    dims: &TileDims,
    q: *const u8,
    count: usize,
    w: *const i8,
    j: usize,
    out: &Out<'_>,
    offsets: &[i32],
) {
    // SAFETY (whole block): forwarded from the caller.
    unsafe {
        let mut r = 0;
        while r + 4 <= count {
            let acc = tile::<4, C>(dims, q.add(r * dims.padded), w);
            finish::<4, C>(out, r, j, &acc, offsets);
            r += 4;
        }
        while r < count {
            let acc = tile::<1, C>(dims, q.add(r * dims.padded), w);
            finish::<1, C>(out, r, j, &acc, offsets);
            r += 1;
        }
    }
}

/// Integer sums of `R` quantized rows at `q` with `C` weight rows at `w`, over the whole row, as
/// 16 partial sums each.
///
/// # Safety
///
/// As for [`tiles`], with `R` quantized rows at `q`.
#[inline(always)]
unsafe fn tile<const R: usize, const C: usize>(
    dims: &TileDims,
    q: *const u8,
    w: *const i8,
) -> [[__m512i; C]; R] {
    // SAFETY (whole block): the steps before the last read whole 64-byte parts of each row,
    // which end at or before `k`. The last reads the weights through the mask and the quantized
    // rows up to `padded`.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        let last = dims.steps - 1;
        for s in 0..last {
            let mut wv = [_mm512_setzero_si512(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(w.add(c * dims.k + 64 * s).cast());
            }
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let xv = _mm512_load_si512(q.add(r * dims.padded + 64 * s).cast());
                for (a, &v) in acc_row.iter_mut().zip(&wv) {
                    *a = _mm512_dpbusd_epi32(*a, xv, v);
                }
            }
        }
        let mut wv = [_mm512_setzero_si512(); C];
        for (c, v) in wv.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_epi8(dims.tail, w.add(c * dims.k + 64 * last).cast());
        }
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let xv = _mm512_load_si512(q.add(r * dims.padded + 64 * last).cast());
            for (a, &v) in acc_row.iter_mut().zip(&wv) {
                *a = _mm512_dpbusd_epi32(*a, xv, v);
            }
        }
        acc
    }
}

/// Writes `y[r + i, j + c] = (Σ acc[i][c] - offsets[c]) · scale of row r + i · scale of
/// weight row j + c + bias[j + c]`. With four weight rows the four lane sums of a row are found
/// by transposing the accumulators in registers, and the row's outputs are computed as one
/// vector.
///
/// # Safety
///
/// As for [`tiles`], with rows `r..r + R` in the block.
#[inline(always)]
unsafe fn finish<const R: usize, const C: usize>(
    out: &Out<'_>,
    r: usize,
    j: usize,
    acc: &[[__m512i; C]; R],
    offsets: &[i32],
) {
    // SAFETY: rows `r..r + R` of the block and outputs `j..j + C` are inside `y`, the scales
    // and the bias, and `offsets` has at least `C` values.
    unsafe {
        if C == 4 {
            let offset = _mm_loadu_si128(offsets.as_ptr().cast());
            let w_scale = _mm_loadu_ps(out.w.scales.as_ptr().add(j));
            let bias = out.bias.map_or(_mm_setzero_ps(), |b| _mm_loadu_ps(b.as_ptr().add(j)));
            for (i, a) in acc.iter().enumerate() {
                // In each 128-bit lane: pairs of partial sums of outputs 0 and 1, then of 2
                // and 3, then one partial sum of each of the four outputs.
                let [a, b, c, d] = [a[0], a[1], a[2], a[3]];
                let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
                let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
                let abcd =
                    _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
                let half = _mm256_add_epi32(
                    _mm512_castsi512_si256(abcd),
                    _mm512_extracti64x4_epi64::<1>(abcd),
                );
                let sums = _mm_add_epi32(
                    _mm256_castsi256_si128(half),
                    _mm256_extracti128_si256::<1>(half),
                );
                let sums = _mm_cvtepi32_ps(_mm_sub_epi32(sums, offset));
                let scale = _mm_mul_ps(w_scale, _mm_set1_ps(*out.scales.add(r + i)));
                let y = out.y.add((r + i) * out.n + j);
                _mm_storeu_ps(y, _mm_fmadd_ps(sums, scale, bias));
            }
        } else {
            for (i, a) in acc.iter().enumerate() {
                let scale = *out.scales.add(r + i);
                let y = out.y.add((r + i) * out.n + j);
                for (c, &a) in a.iter().enumerate() {
                    let sum = _mm512_reduce_add_epi32(a).wrapping_sub(*offsets.get_unchecked(c));
                    let b = out.bias.map_or(0.0, |b| *b.get_unchecked(j + c));
                    let w_scale = *out.w.scales.get_unchecked(j + c);
                    // One rounding for the product and the sum, as in the four-output path and
                    // in `panels`, so that a row's result does not depend on the kernel.
                    let v = _mm_fmadd_ss(
                        _mm_set_ss(sum as f32),
                        _mm_set_ss(scale * w_scale),
                        _mm_set_ss(b),
                    );
                    *y.add(c) = _mm_cvtss_f32(v);
                }
            }
        }
    }
}
