//! `linear` with f32 weights on AVX-512 for calls of many rows.
//!
//! The dot-product tiles of `tiled` read a vector of `x` and a vector of weights for every
//! multiply-add pair they issue, and sum each accumulator's lanes at the end. Here the rows of `x`
//! are first transposed in blocks of [`BLOCK_ROWS`], so that one vector holds 16 rows' values at
//! one column. Each weight is then broadcast from memory into four multiply-adds, one per vector
//! of rows, and a tile of [`TILE`] weight rows keeps 24 accumulators in registers, with no lane
//! sums at the end. Each output is one chain of multiply-adds in ascending `k`.

use core::arch::x86_64::*;

use super::generic::F32Rows;
use super::tiled::LinearArgs;

/// Rows of `x` per block: four vectors of 16.
pub(crate) const BLOCK_ROWS: usize = 64;

/// Vectors of 16 rows in a block.
const VECTORS: usize = BLOCK_ROWS / 16;

/// Weight rows per tile: with four vectors of rows, 24 of the 32 vector registers accumulate.
const TILE: usize = 6;

/// Maximum row length of the kernel: the transposed block takes 2 MiB at this length.
pub(crate) const MAX_K: usize = 8192;

/// Values of a transposed block, 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

std::thread_local! {
    /// Each thread's transposed block (column `p` of row `r` at `p * BLOCK_ROWS + r`), kept
    /// between calls. It grows to the longest row seen, at most `BLOCK_ROWS * MAX_K` values.
    static TRANSPOSED: core::cell::RefCell<std::vec::Vec<Line>> =
        const { core::cell::RefCell::new(std::vec::Vec::new()) };
}

/// Returns whether [`linear_f32`] takes a call of `rows` rows of `k` values.
pub(crate) fn applies(rows: usize, k: usize) -> bool {
    rows >= BLOCK_ROWS && k > 0 && k <= MAX_K
}

/// Computes `y = x · wᵀ + bias`.
///
/// # Safety
///
/// The CPU must support AVX-512F, AVX2, FMA and F16C, `args` and `w` must satisfy
/// `tiled::linear`'s contract, and [`applies`] must hold for `args.rows` and `args.k`.
///
/// # Panics
///
/// Panics if the thread's block cannot grow (out of memory).
pub(crate) unsafe fn linear_f32(args: &LinearArgs<'_>, w: &F32Rows<'_>) {
    TRANSPOSED.with(|cell| {
        // The kernel does not call itself, so the block is never borrowed twice; a second
        // borrow would panic rather than alias.
        let mut lines = cell.borrow_mut();
        let needed = BLOCK_ROWS * args.k / 16;
        if lines.len() < needed {
            lines.resize(needed, Line([0.0; 16]));
        }
        // SAFETY: forwarded from the caller; `lines` has room for `BLOCK_ROWS * k` values.
        unsafe { linear_blocks(args, w, lines.as_mut_ptr().cast()) }
    })
}

/// [`linear_f32`] with the transposed block at `xt`.
///
/// # Safety
///
/// As for [`linear_f32`], with `xt` 64-byte aligned and valid for `BLOCK_ROWS * k` values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn linear_blocks(args: &LinearArgs<'_>, w: &F32Rows<'_>, xt: *mut f32) {
    let (k, n, rows) = (args.k, args.n, args.rows);
    let mut m0 = 0;
    // SAFETY (whole block): the transposed block has room for `BLOCK_ROWS * k` values, and
    // every one of them is written before the tiles read it. Rows `m0..m0 + count` of `x` and
    // `y` and the `n` weight rows exist by the caller's contract.
    unsafe {
        while m0 < rows {
            let count = (rows - m0).min(BLOCK_ROWS);
            transpose(args.x.add(m0 * k), k, count, xt);
            let block = Block { xt, k, m0, count };
            let mut j = 0;
            while j + TILE <= n {
                tile::<TILE>(args, &block, w.w.as_ptr().add(j * k), j);
                j += TILE;
            }
            while j < n {
                tile::<1>(args, &block, w.w.as_ptr().add(j * k), j);
                j += 1;
            }
            m0 += count;
        }
    }
}

/// Writes each column `p` of the `count` rows at `x` (rows of `k` values) to
/// `xt[p * BLOCK_ROWS..]`, as `BLOCK_ROWS` values with zeros for the rows past `count`. Each 16
/// rows by 16 columns are loaded as 16 vectors and transposed in registers.
///
/// # Safety
///
/// As for [`linear_f32`], with `count <= BLOCK_ROWS` rows at `x` and room for `BLOCK_ROWS * k`
/// values at `xt`.
#[inline(always)]
unsafe fn transpose(x: *const f32, k: usize, count: usize, xt: *mut f32) {
    // SAFETY: AVX-512F per the caller. The masked loads read columns below `k` of the rows
    // below `count` only, and the stores write 16 values at `p * BLOCK_ROWS + 16 v` for columns
    // `p < k`, inside the block.
    unsafe {
        for v in 0..VECTORS {
            let rows = count.saturating_sub(16 * v).min(16);
            let mut p0 = 0;
            while p0 < k {
                let columns = (k - p0).min(16);
                let mask: __mmask16 = if columns == 16 { u16::MAX } else { (1u16 << columns) - 1 };
                let mut block = [_mm512_setzero_si512(); 16];
                for (i, row) in block.iter_mut().enumerate().take(rows) {
                    let values = _mm512_maskz_loadu_ps(mask, x.add((16 * v + i) * k + p0));
                    *row = _mm512_castps_si512(values);
                }
                let lines = super::panels::transpose16(&block);
                for (g, &line) in lines.iter().enumerate().take(columns) {
                    let at = xt.add((p0 + g) * BLOCK_ROWS + 16 * v);
                    _mm512_store_ps(at, _mm512_castsi512_ps(line));
                }
                p0 += 16;
            }
        }
    }
}

/// One transposed block of rows.
struct Block {
    xt: *const f32,
    k: usize,
    /// First row of `x` in the block.
    m0: usize,
    /// Rows of `x` in the block; the others are zeros.
    count: usize,
}

/// Computes outputs `j..j + C` of the block's rows from the `C` weight rows at `w`.
///
/// # Safety
///
/// As for [`linear_f32`], with `w` pointing at weight row `j` and `j + C <= n`.
#[inline(always)]
unsafe fn tile<const C: usize>(args: &LinearArgs<'_>, block: &Block, w: *const f32, j: usize) {
    let k = block.k;
    // SAFETY (whole block): the loads read columns `0..k` of the transposed block and of the
    // `C` weight rows. The stores write outputs `j..j + C` of the block's rows.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; C];
        // Two columns per iteration halve the loop's own instructions.
        let pairs = k / 2;
        for pair in 0..pairs {
            for p in [2 * pair, 2 * pair + 1] {
                step::<C>(&mut acc, block.xt.add(p * BLOCK_ROWS), w.add(p), k);
            }
        }
        if k % 2 == 1 {
            step::<C>(&mut acc, block.xt.add((k - 1) * BLOCK_ROWS), w.add(k - 1), k);
        }
        let mut sums = [[0f32; BLOCK_ROWS]; C];
        for (s, a) in sums.iter_mut().zip(&acc) {
            for (v, &a) in a.iter().enumerate() {
                _mm512_storeu_ps(s.as_mut_ptr().add(16 * v), a);
            }
        }
        for r in 0..block.count {
            let y = args.y.add((block.m0 + r) * args.n + j);
            for (c, s) in sums.iter().enumerate() {
                let bias = args.bias.map_or(0.0, |b| *b.get_unchecked(j + c));
                *y.add(c) = bias + s[r];
            }
        }
    }
}

/// Adds one column's products to the accumulators: the column of the transposed block at
/// `column` times the `C` weights at `w`, `k` values apart.
///
/// # Safety
///
/// As for [`tile`], with `column` a column of the transposed block and `w` the same column of
/// weight row `j`.
#[inline(always)]
unsafe fn step<const C: usize>(
    acc: &mut [[__m512; VECTORS]; C],
    column: *const f32,
    w: *const f32,
    k: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut x = [_mm512_setzero_ps(); VECTORS];
        for (v, x) in x.iter_mut().enumerate() {
            *x = _mm512_load_ps(column.add(16 * v));
        }
        for (c, acc) in acc.iter_mut().enumerate() {
            let weight = _mm512_set1_ps(*w.add(c * k));
            for (a, &x) in acc.iter_mut().zip(&x) {
                *a = _mm512_fmadd_ps(x, weight, *a);
            }
        }
    }
}
