//! `linear` with int4 weights on AVX-512 for calls of fewer than 8 rows, as in generation token
//! by token.
//!
//! The dot-product tiles of `tiled` decode each vector of 16 weights alone: a load of 8 bytes,
//! a shift per lane, and the group's scale and minimum widened from f16 for that vector. Here a
//! block of 32 weights (16 bytes) is decoded at once. Its low nibbles are the 16 values of the
//! even columns and its high nibbles those of the odd columns. Each row of `x` is therefore first
//! split, block by block, into its even and odd columns, which the two nibble vectors then
//! multiply directly. The scales and minimums of a tile of weight rows are widened to f32 once
//! per row of `x`, 16 at a time for groups of 32.
//!
//! Every weight is dequantized as `u × scale + offset`, where `u = q + 8` is the unsigned nibble
//! and the offset is the group's minimum, or `-8 × scale` without minimums (then the product is
//! exactly `q × scale`, as in `tiled`). Each row of `x` runs alone, and each output is one chain
//! of multiply-adds in a fixed order, so a row's result does not depend on the other rows.

use core::arch::x86_64::*;
use core::cell::RefCell;
use std::vec::Vec;

use super::generic::I4Rows;
use super::tiled::LinearArgs;

/// Values per block: the 32 nibbles of one 16-byte load.
const BLOCK: usize = 32;

/// Weight rows per tile: four accumulators share each block of `x`.
const TILE: usize = 4;

/// Maximum row length the kernel takes.
const MAX_K: usize = 1 << 16;

/// Each thread's buffers, kept between calls.
struct Buffers {
    /// A row of `x`, each block as its 16 even columns, then its 16 odd columns.
    x: Vec<f32>,
    /// Scale of each block of the tile's weight rows, row after row.
    scales: Vec<f32>,
    /// Offset of each block of the tile's weight rows: the minimum, or `-8 × scale`.
    offsets: Vec<f32>,
}

std::thread_local! {
    static BUFFERS: RefCell<Buffers> = const {
        RefCell::new(Buffers { x: Vec::new(), scales: Vec::new(), offsets: Vec::new() })
    };
}

/// Returns whether [`linear`] takes a call with weights `w`: groups of a multiple of 32 values,
/// and rows of at most [`MAX_K`] values.
pub(crate) fn applies(w: &I4Rows<'_>) -> bool {
    w.group > 0 && w.group.is_multiple_of(BLOCK) && w.k > 0 && w.k <= MAX_K
}

/// Computes `y = x · wᵀ + bias`.
///
/// # Safety
///
/// The CPU must support AVX-512F, AVX2, FMA and F16C, `args` and `w` must satisfy
/// `tiled::linear`'s contract, and [`applies`] must hold for `w`.
///
/// # Panics
///
/// Panics if called while the thread's locals are being destroyed. If a buffer cannot grow, the
/// failed allocation aborts the process.
pub(crate) unsafe fn linear(args: &LinearArgs<'_>, w: &I4Rows<'_>) {
    BUFFERS.with(|cell| {
        // The kernel does not call itself, so the buffers are never borrowed twice; a second
        // borrow would panic rather than alias.
        let mut buffers = cell.borrow_mut();
        let b = &mut *buffers;
        let blocks = args.k / BLOCK;
        if b.x.len() < args.k {
            b.x.resize(args.k, 0.0);
        }
        if b.scales.len() < TILE * blocks {
            b.scales.resize(TILE * blocks, 0.0);
            b.offsets.resize(TILE * blocks, 0.0);
        }
        // SAFETY: forwarded from the caller; the buffers have room for a row of `x` and for the
        // scales and offsets of a tile.
        unsafe { rows(args, w, &mut b.x, &mut b.scales, &mut b.offsets) }
    })
}

/// [`linear`] with its buffers.
///
/// # Safety
///
/// As for [`linear`], with `x` at least `k` long, and `scales` and `offsets` at least
/// `TILE * k / BLOCK` long.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows(
    args: &LinearArgs<'_>,
    w: &I4Rows<'_>,
    x: &mut [f32],
    scales: &mut [f32],
    offsets: &mut [f32],
) {
    let (k, n) = (args.k, args.n);
    let blocks = k / BLOCK;
    for m in 0..args.rows {
        // SAFETY: row `m` of `x` exists by the caller's contract, and `split` writes `k` values.
        unsafe { split(args.x.add(m * k), k, x.as_mut_ptr()) };
        let mut j = 0;
        while j < n {
            let count = (n - j).min(TILE);
            // SAFETY: weight rows `j..j + count` exist and the buffers have room for a tile.
            unsafe { widen(w, j, count, scales, offsets) };
            // SAFETY: weight rows `j..j + count` exist, the buffers hold their scales and offsets
            // and the split row, and output `j + count - 1` of row `m` is inside `y`.
            unsafe {
                let (x, s, o) = (x.as_ptr(), scales.as_ptr(), offsets.as_ptr());
                let mut sums = [0f32; TILE];
                match count {
                    4 => tile::<4>(w, j, x, s, o, blocks, &mut sums),
                    3 => tile::<3>(w, j, x, s, o, blocks, &mut sums),
                    2 => tile::<2>(w, j, x, s, o, blocks, &mut sums),
                    _ => tile::<1>(w, j, x, s, o, blocks, &mut sums),
                }
                for (c, &sum) in sums.iter().enumerate().take(count) {
                    let bias = args.bias.map_or(0.0, |b| b[j + c]);
                    *args.y.add(m * n + j + c) = sum + bias;
                }
            }
            j += count;
        }
    }
}

/// Writes the `k` values at `x` to `out` block by block: the 16 even columns of each block of 32,
/// then its 16 odd columns.
///
/// # Safety
///
/// AVX-512F; `x` and `out` valid for `k` values, `k` a multiple of [`BLOCK`].
#[inline(always)]
unsafe fn split(x: *const f32, k: usize, out: *mut f32) {
    // SAFETY: each block reads and writes 32 values below `k`; AVX-512F per the caller.
    unsafe {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for b in 0..k / BLOCK {
            let first = _mm512_loadu_ps(x.add(b * BLOCK));
            let second = _mm512_loadu_ps(x.add(b * BLOCK + 16));
            _mm512_storeu_ps(out.add(b * BLOCK), _mm512_permutex2var_ps(first, even, second));
            _mm512_storeu_ps(out.add(b * BLOCK + 16), _mm512_permutex2var_ps(first, odd, second));
        }
    }
}

/// Writes the scale and the offset of every block of weight rows `j..j + count` to `scales` and
/// `offsets`, `k / BLOCK` values per row. Groups of one block are widened 16 at a time.
///
/// # Safety
///
/// AVX-512F and F16C; weight rows `j..j + count` exist, and `scales` and `offsets` hold
/// `count * k / BLOCK` values each.
#[inline(always)]
unsafe fn widen(w: &I4Rows<'_>, j: usize, count: usize, scales: &mut [f32], offsets: &mut [f32]) {
    let blocks = w.k / BLOCK;
    let groups = w.k / w.group;
    let per_group = w.group / BLOCK;
    let to_f32 = |bits: u16| -> f32 {
        // SAFETY: F16C per the caller.
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    };
    for c in 0..count {
        let row = (j + c) * groups;
        let (s, o) = (&mut scales[c * blocks..][..blocks], &mut offsets[c * blocks..][..blocks]);
        let mut b = 0;
        if per_group == 1 {
            // SAFETY: each step reads 16 scales (and minimums) of row `j + c` and writes 16
            // values of `s` and `o`, all below `blocks`; AVX-512F and F16C per the caller.
            unsafe {
                while b + 16 <= blocks {
                    let bits = _mm256_loadu_si256(w.scales.as_ptr().add(row + b).cast());
                    let scale = _mm512_cvtph_ps(bits);
                    let offset = match w.mins {
                        Some(mins) => {
                            _mm512_cvtph_ps(_mm256_loadu_si256(mins.as_ptr().add(row + b).cast()))
                        }
                        None => _mm512_mul_ps(scale, _mm512_set1_ps(-8.0)),
                    };
                    _mm512_storeu_ps(s.as_mut_ptr().add(b), scale);
                    _mm512_storeu_ps(o.as_mut_ptr().add(b), offset);
                    b += 16;
                }
            }
        }
        for b in b..blocks {
            let g = row + b / per_group;
            s[b] = to_f32(w.scales[g]);
            o[b] = match w.mins {
                Some(mins) => to_f32(mins[g]),
                None => -8.0 * s[b],
            };
        }
    }
}

/// Writes the dot products of the split row at `x` with weight rows `j..j + C`, whose block
/// scales and offsets are at `scales` and `offsets` (`blocks` per row), to `sums[..C]`.
///
/// # Safety
///
/// AVX-512F, AVX2 and FMA; weight rows `j..j + C` exist, `x` contains `blocks * BLOCK` values,
/// and `scales` and `offsets` contain `C * blocks` values each.
#[inline(always)]
unsafe fn tile<const C: usize>(
    w: &I4Rows<'_>,
    j: usize,
    x: *const f32,
    scales: *const f32,
    offsets: *const f32,
    blocks: usize,
    sums: &mut [f32; TILE],
) {
    let row_bytes = w.k / 2;
    // SAFETY (whole block): block `b` of row `j + c` is 16 bytes at `(j + c) * row_bytes + 16 b`,
    // inside the packed values, and the other reads stay inside the buffers as the caller
    // guarantees. AVX-512F, AVX2 and FMA per the caller.
    unsafe {
        let packed = w.packed.as_ptr();
        let low_nibbles = _mm_set1_epi8(0x0F);
        // Flipping bit 3 of a two's-complement nibble adds 8: q in -8..=7 becomes u in 0..=15.
        let flip = _mm_set1_epi8(0x88u8 as i8);
        let mut acc = [_mm512_setzero_ps(); C];
        for b in 0..blocks {
            let even = _mm512_loadu_ps(x.add(b * BLOCK));
            let odd = _mm512_loadu_ps(x.add(b * BLOCK + 16));
            for (c, acc) in acc.iter_mut().enumerate() {
                let bytes = _mm_loadu_si128(packed.add((j + c) * row_bytes + b * 16).cast());
                let bytes = _mm_xor_si128(bytes, flip);
                let low = _mm_and_si128(bytes, low_nibbles);
                let high = _mm_and_si128(_mm_srli_epi16::<4>(bytes), low_nibbles);
                let scale = _mm512_set1_ps(*scales.add(c * blocks + b));
                let offset = _mm512_set1_ps(*offsets.add(c * blocks + b));
                let low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low));
                let high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high));
                *acc = _mm512_fmadd_ps(_mm512_fmadd_ps(low, scale, offset), even, *acc);
                *acc = _mm512_fmadd_ps(_mm512_fmadd_ps(high, scale, offset), odd, *acc);
            }
        }
        for (sum, acc) in sums.iter_mut().zip(acc) {
            *sum = _mm512_reduce_add_ps(acc);
        }
    }
}
