//! `linear` with f32, f16, int8 or int4 weights on AVX-512 for calls of 16 rows or more.
//!
//! The dot-product tiles of `tiled` read a vector of `x` and a vector of weights for every
//! multiply-add pair they issue, and sum each accumulator's lanes at the end. Here the rows of `x`
//! are first transposed in blocks of one to four vectors of 16 rows, so that one vector holds 16
//! rows' values at one column. Each weight is then broadcast from memory into one multiply-add
//! per vector of rows, and a tile of weight rows keeps 16 to 24 accumulators in registers, with
//! no lane sums at the end. Blocks of fewer vectors take tiles of more weight rows, so that the
//! accumulators still outnumber the loads. While a tile runs, it fetches the next tile's weights
//! into the L1 cache, because a model's weights rarely fit in the L2 cache and come from memory.
//!
//! F16, int8 and int4 weights are converted to f32 (int8 times its row's scale, int4 with its
//! group's scale and minimum) a tile at a time, and the tile's converted rows serve every block
//! of the span. The conversion pays for itself from 16 rows on (64 on Zen 4, 32 for int4), so
//! these weights take this kernel from there. The tiles store their sums to a transposed output
//! block, which is transposed back into `y` in registers with the bias added. Each output is one
//! chain of multiply-adds in ascending `k`, then the bias.

use core::arch::x86_64::*;
use std::sync::OnceLock;

use super::generic::{F16Rows, F32Rows, I8Rows, WeightRows};
use super::tiled::{I4Aligned, LinearArgs, Simd, VecRows};
use super::x86_64::Avx512;

/// Minimum rows the kernel takes with f32 weights: one vector of 16.
const MIN_ROWS_F32: usize = 16;

/// Minimum rows the kernel takes with f16 and int8 weights, which it converts a tile at a time,
/// on cores that split 512-bit operations in two (AMD Zen 4): four vectors of 16. Measured there
/// on MiniLM's layers, 16 rows of int8 weights ran about 10 % slower here than in the dot-product
/// tiles, and 32 rows about as fast.
const MIN_ROWS_CONVERTED_ZEN4: usize = 64;

/// Minimum rows the kernel takes with f16 and int8 weights on other cores: one vector of 16.
/// Measured on Zen 5 with all-MiniLM-L6-v2 (`edgefold bench`, one thread), the model took 20 %
/// (int8) and 33 % (f16) less time at 16 tokens than with the dot-product tiles, and 34 to 41 %
/// less at 32 and 48.
/// NOTE: Intel cores with AVX-512 take this value without a measurement of their own.
const MIN_ROWS_CONVERTED: usize = 16;

/// Minimum rows the kernel takes with int4 weights, whose other kernel decodes blocks of 256
/// columns. Measured on Zen 4 with SmolLM2-135M's int4 layers, passes of 32 prompt tokens ran
/// about 20 % faster here than in that kernel.
const MIN_ROWS_INT4: usize = 32;

/// Maximum row length of the kernel.
pub(crate) const MAX_K: usize = 8192;

/// Outputs per pass over a span: a block's transposed sums take at most 192 KiB.
const OUTPUTS: usize = 768;

/// Bytes of transposed inputs and outputs kept at once, meant to stay in a 2 MiB L2 cache. Every
/// block of a span runs each tile of weights in turn, so the weights are read from memory once
/// per span.
const SPAN_BYTES: usize = 1 << 20;

/// Maximum number of blocks in a span.
const SPAN_BLOCKS: usize = 16;

/// Blocks of `block_rows` rows per span for rows of `k` values and `n` outputs: at least one.
fn span_blocks(block_rows: usize, k: usize, n: usize) -> usize {
    let per_block = 4 * block_rows * (k + n.min(OUTPUTS));
    (SPAN_BYTES / per_block.max(1)).clamp(1, SPAN_BLOCKS)
}

/// Values of a transposed block, 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

std::thread_local! {
    /// Each thread's scratch space, kept between calls. A tile of `T` converted weight rows
    /// comes first (`T * k` values, rounded up to a line), then the transposed input blocks of
    /// `B = 16 * V` rows, with column `p` of row `r` of block `b` at `(b * k + p) * B + r`. The
    /// sums follow, with output `j` of row `r` of block `b` at `(b * outputs + j) * B + r`, where
    /// `outputs` is `min(n, OUTPUTS)`. The space grows to the largest call seen.
    static TRANSPOSED: core::cell::RefCell<std::vec::Vec<Line>> =
        const { core::cell::RefCell::new(std::vec::Vec::new()) };
}

/// Returns the fewest rows [`linear`] takes with weights `w`, or `None` for weights it does not
/// take.
pub(crate) fn min_rows(w: &super::Weights<'_>) -> Option<usize> {
    match w {
        super::Weights::F32(_) => Some(MIN_ROWS_F32),
        super::Weights::F16(_) | super::Weights::I8(_) => match is_amd_family_19h() {
            true => Some(MIN_ROWS_CONVERTED_ZEN4),
            false => Some(MIN_ROWS_CONVERTED),
        },
        super::Weights::I4(w) if w.group % 16 == 0 => Some(MIN_ROWS_INT4),
        super::Weights::I4(_) => None,
    }
}

/// Returns whether the CPU is an AMD processor of family 19h. Callers reach it only with
/// AVX-512, which in that family means Zen 4, whose cores run each 512-bit operation as two
/// 256-bit halves. The result is read once, because `cpuid` can trap to the hypervisor in a
/// virtual machine.
/// NOTE: AMD family 1Ah parts with 256-bit AVX-512 datapaths, if any, are not distinguished.
fn is_amd_family_19h() -> bool {
    static FAMILY_19H: OnceLock<bool> = OnceLock::new();
    *FAMILY_19H.get_or_init(|| {
        // SAFETY: every x86_64 CPU has `cpuid` with leaves 0 and 1. Rust 1.94 made the
        // intrinsic safe to call, and the crate still builds with older compilers.
        #[allow(unused_unsafe)]
        let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1).eax) };
        // Leaf 0 spells the vendor "AuthenticAMD" in EBX, EDX and ECX.
        let amd = (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6E65, 0x444D_4163);
        amd && family(signature) == 0x19
    })
}

/// Returns the family of an x86 processor signature (`cpuid` leaf 1, EAX): the base family
/// (bits 8 to 11), plus the extended family (bits 20 to 27) when the base family is 0xF.
fn family(signature: u32) -> u32 {
    let base = (signature >> 8) & 0xF;
    if base == 0xF {
        base + ((signature >> 20) & 0xFF)
    } else {
        base
    }
}

/// Returns whether [`linear`] takes a call of `rows` rows of `k` values with weights `w`.
pub(crate) fn applies(w: &super::Weights<'_>, rows: usize, k: usize) -> bool {
    min_rows(w).is_some_and(|min| rows >= min) && k > 0 && k <= MAX_K
}

/// Weight rows the tiles read as f32.
pub(crate) trait TileWeights {
    /// Returns weight rows `j..j + count` as `count * k` f32 values: the weights themselves, or
    /// their conversion written to `buffer`.
    ///
    /// # Safety
    ///
    /// The rows must exist, and `buffer` must be valid for `count * k` values.
    unsafe fn rows(&self, j: usize, count: usize, k: usize, buffer: *mut f32) -> *const f32;

    /// Returns the stored bytes of weight rows `j..j + count`, which are contiguous, for
    /// prefetching only: the range may end past the weights.
    fn bytes(&self, j: usize, count: usize, k: usize) -> core::ops::Range<*const u8>;
}

/// Returns the bytes of rows `j..j + count` of `k` values each in `values`, for prefetching
/// only: the range may end past `values`.
#[inline(always)]
fn row_bytes<T>(values: &[T], j: usize, count: usize, k: usize) -> core::ops::Range<*const u8> {
    let start = values.as_ptr().wrapping_add(j * k);
    start.cast()..start.wrapping_add(count * k).cast()
}

impl TileWeights for F32Rows<'_> {
    #[inline(always)]
    unsafe fn rows(&self, j: usize, _count: usize, k: usize, _buffer: *mut f32) -> *const f32 {
        // SAFETY: row `j` exists by the caller's contract.
        unsafe { self.w.as_ptr().add(j * k) }
    }

    #[inline(always)]
    fn bytes(&self, j: usize, count: usize, k: usize) -> core::ops::Range<*const u8> {
        row_bytes(self.w, j, count, k)
    }
}

impl TileWeights for I8Rows<'_> {
    #[inline(always)]
    unsafe fn rows(&self, j: usize, count: usize, k: usize, buffer: *mut f32) -> *const f32 {
        // SAFETY: `buffer` is valid for `count * k` values by the caller's contract, and nothing
        // else refers to it while the slice lives.
        let out = unsafe { core::slice::from_raw_parts_mut(buffer, count * k) };
        for (c, row) in out.chunks_exact_mut(k).enumerate() {
            self.fill(j + c, 0, row);
        }
        buffer
    }

    #[inline(always)]
    fn bytes(&self, j: usize, count: usize, k: usize) -> core::ops::Range<*const u8> {
        row_bytes(self.q, j, count, k)
    }
}

/// Converts 16 values per instruction with `vcvtph2ps`, where `WeightRows::fill` converts one at a
/// time.
impl TileWeights for F16Rows<'_> {
    #[inline(always)]
    unsafe fn rows(&self, j: usize, count: usize, k: usize, buffer: *mut f32) -> *const f32 {
        // SAFETY: rows `j..j + count` exist and `buffer` has room for `count * k` values, by the
        // caller's contract, and the CPU has F16C and AVX-512F, as `linear` requires. Each
        // vector load reads 16 values inside a row.
        unsafe {
            for c in 0..count {
                let bits = self.w.as_ptr().add((j + c) * k);
                let out = buffer.add(c * k);
                let mut p = 0;
                while p + 16 <= k {
                    let half = _mm256_loadu_si256(bits.add(p).cast());
                    _mm512_storeu_ps(out.add(p), _mm512_cvtph_ps(half));
                    p += 16;
                }
                while p < k {
                    *out.add(p) = half::f16::from_bits(*bits.add(p)).to_f32();
                    p += 1;
                }
            }
        }
        buffer
    }

    #[inline(always)]
    fn bytes(&self, j: usize, count: usize, k: usize) -> core::ops::Range<*const u8> {
        row_bytes(self.w, j, count, k)
    }
}

/// Converts 16 values per load, each vector within one group of the row, so with one scale (and
/// one minimum).
impl<const MIN: bool> TileWeights for I4Aligned<'_, MIN> {
    #[inline(always)]
    unsafe fn rows(&self, j: usize, count: usize, k: usize, buffer: *mut f32) -> *const f32 {
        // SAFETY: rows `j..j + count` exist and `buffer` has room for `count * k` values, by the
        // caller's contract, and the CPU has AVX-512F, as `linear` requires. The group length
        // is a multiple of 16 (`min_rows`) and divides `k`, so every vector lies inside a row.
        unsafe {
            for c in 0..count {
                let out = buffer.add(c * k);
                for p in (0..k).step_by(16) {
                    let values = <Self as VecRows<Avx512>>::load(self, j + c, p);
                    Avx512::store(out.add(p), values);
                }
            }
        }
        buffer
    }

    #[inline(always)]
    fn bytes(&self, j: usize, count: usize, k: usize) -> core::ops::Range<*const u8> {
        let (start, end) = (j * k.div_ceil(2), (j + count) * k.div_ceil(2));
        let packed = self.packed();
        packed.as_ptr().wrapping_add(start)..packed.as_ptr().wrapping_add(end)
    }
}

/// Computes `y = x · wᵀ + bias`.
///
/// # Safety
///
/// The CPU must support AVX-512F, AVX2, FMA and F16C, `args` and `w` must satisfy
/// `tiled::linear`'s contract, `args.rows` must be at least 1, and `args.k` at most [`MAX_K`].
/// Int4 weights must come in groups of a multiple of 16 values, as [`min_rows`] requires.
///
/// # Panics
///
/// Panics if called while the thread's locals are being destroyed. If the thread's scratch space
/// cannot grow, the failed allocation aborts the process.
pub(crate) unsafe fn linear<W: TileWeights>(args: &LinearArgs<'_>, w: &W) {
    // Fewer rows than four vectors take blocks of as many vectors as they need, with more weight
    // rows per tile, so that each broadcast weight still feeds enough accumulators. With one
    // vector the broadcast is an operand of the multiply-add, so 24 accumulators fit. With two
    // or three, the compiler keeps a tile's broadcasts in registers, and tiles of 10 or 7 rows
    // ran 40 % slower from spilled accumulators (measured on MiniLM at 32 and 48 rows).
    // SAFETY: forwarded from the caller.
    unsafe {
        match args.rows.div_ceil(16) {
            1 => linear_vectors::<W, 1, 24>(args, w),
            2 => linear_vectors::<W, 2, 8>(args, w),
            3 => linear_vectors::<W, 3, 6>(args, w),
            _ => linear_vectors::<W, 4, 6>(args, w),
        }
    }
}

/// [`linear`] in blocks of `V` vectors of 16 rows, with tiles of `T` weight rows.
///
/// # Safety
///
/// As for [`linear`].
unsafe fn linear_vectors<W: TileWeights, const V: usize, const T: usize>(
    args: &LinearArgs<'_>,
    w: &W,
) {
    TRANSPOSED.with(|cell| {
        // The kernel does not call itself, so the space is never borrowed twice; a second
        // borrow would panic rather than alias.
        let mut lines = cell.borrow_mut();
        let block_rows = 16 * V;
        let span = span_blocks(block_rows, args.k, args.n);
        let blocks = span.min(args.rows.div_ceil(block_rows));
        let converted = (T * args.k).div_ceil(16);
        let needed = converted + blocks * block_rows * (args.k + args.n.min(OUTPUTS)) / 16;
        if lines.len() < needed {
            lines.resize(needed, Line([0.0; 16]));
        }
        let scratch = lines.as_mut_ptr();
        // SAFETY: forwarded from the caller. `lines` has room for a tile of converted weights,
        // then, from a line boundary, a span's blocks.
        unsafe { linear_blocks::<W, V, T>(args, w, scratch.cast(), scratch.add(converted).cast()) }
    })
}

/// [`linear_vectors`] with room for a tile of converted weights at `converted` and the blocks at
/// `scratch`.
///
/// # Safety
///
/// As for [`linear`], with `converted` valid for `T * k` values, and `scratch` 64-byte aligned
/// and valid for `blocks * 16 * V * (k + min(n, OUTPUTS))` values, where `blocks` is the smaller
/// of [`span_blocks`] and the number of blocks of rows.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn linear_blocks<W: TileWeights, const V: usize, const T: usize>(
    args: &LinearArgs<'_>,
    w: &W,
    converted: *mut f32,
    scratch: *mut f32,
) {
    let block = 16 * V;
    let (k, n, rows) = (args.k, args.n, args.rows);
    let span = span_blocks(block, k, n);
    let outputs = n.min(OUTPUTS);
    let mut m0 = 0;
    // SAFETY (whole block): a span of `used` blocks takes `used * block * k` values of
    // `scratch` for its inputs and `used * block * outputs` for its outputs, inside it by the
    // contract. Every input value is written before the tiles read it, and the tiles write every
    // output value of a pass before `untranspose` reads it. Rows `m0..m0 + count` of `x` and `y`
    // and the `n` weight rows exist by the caller's contract.
    unsafe {
        while m0 < rows {
            let count = (rows - m0).min(span * block);
            let used = count.div_ceil(block);
            let xt = scratch;
            let yt = scratch.add(used * block * k);
            let block_rows = |b: usize| (count - b * block).min(block);
            for b in 0..used {
                let first = m0 + b * block;
                transpose::<V>(args.x.add(first * k), k, block_rows(b), xt.add(b * block * k));
            }
            let empty = || core::ptr::null::<u8>()..core::ptr::null();
            let mut j0 = 0;
            while j0 < n {
                let j1 = (j0 + outputs).min(n);
                // Each tile's weights serve every block of the span in turn, so f16, int8 and
                // int4 weights are converted once per span. The first block's tile fetches the
                // next tile's weights.
                let mut j = j0;
                while j + T <= j1 {
                    let weights = w.rows(j, T, k, converted);
                    let next = w.bytes(j + T, (n - j - T).min(T), k);
                    for b in 0..used {
                        let block_xt = xt.add(b * k * block);
                        let at = yt.add((b * outputs + j - j0) * block);
                        let next = if b == 0 { next.clone() } else { empty() };
                        tile::<V, T>(block_xt, k, weights, next, at);
                    }
                    j += T;
                }
                while j < j1 {
                    let weights = w.rows(j, 1, k, converted);
                    for b in 0..used {
                        let block_xt = xt.add(b * k * block);
                        let at = yt.add((b * outputs + j - j0) * block);
                        tile::<V, 1>(block_xt, k, weights, empty(), at);
                    }
                    j += 1;
                }
                for b in 0..used {
                    let block_yt = yt.add(b * outputs * block);
                    untranspose::<V>(args, block_yt, m0 + b * block, block_rows(b), j0..j1);
                }
                j0 = j1;
            }
            m0 += count;
        }
    }
}

/// Writes each column `p` of the `count` rows at `x` (rows of `k` values) to `xt[p * 16 * V..]`,
/// as `16 * V` values with zeros for the rows past `count`. Each 16 rows by 16 columns are
/// loaded as 16 vectors and transposed in registers.
///
/// # Safety
///
/// As for [`linear`], with `count <= 16 * V` rows at `x` and room for `16 * V * k` values at
/// `xt`.
#[inline(always)]
unsafe fn transpose<const V: usize>(x: *const f32, k: usize, count: usize, xt: *mut f32) {
    // SAFETY: AVX-512F per the caller. The masked loads read columns below `k` of the rows
    // below `count` only, and the stores write 16 values at `p * 16 * V + 16 v` for columns
    // `p < k`, inside the block and 64-byte aligned because `xt` is.
    unsafe {
        for v in 0..V {
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
                    let at = xt.add((p0 + g) * 16 * V + 16 * v);
                    _mm512_store_ps(at, _mm512_castsi512_ps(line));
                }
                p0 += 16;
            }
        }
    }
}

/// Computes the sums of `C` outputs for a block's `16 * V` rows from the `C` weight rows at `w`
/// and stores them, transposed, at `yt` (`C` lines of `16 * V` values). Fetches the lines of
/// `fetch` into the L1 cache on the way, one per eight weight rows every two columns, as far as
/// the columns go.
///
/// # Safety
///
/// As for [`linear`], with `xt` a transposed block of rows of `k` values, `w` a weight row
/// followed by `C - 1` more, and `yt` 64-byte aligned and valid for `C * 16 * V` values.
#[inline(always)]
unsafe fn tile<const V: usize, const C: usize>(
    xt: *const f32,
    k: usize,
    w: *const f32,
    fetch: core::ops::Range<*const u8>,
    yt: *mut f32,
) {
    // SAFETY (whole block): the loads read columns `0..k` of the transposed block and of the
    // `C` weight rows, and the stores write the sums at `yt`. Prefetches never fault.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; C];
        // Two columns per iteration halve the loop's own instructions. The next tile of `C` f32
        // weight rows has `C / 8` cache lines per two columns, so each iteration fetches that
        // many.
        let mut at = fetch.start;
        for pair in 0..k / 2 {
            for _ in 0..C.div_ceil(8) {
                if at < fetch.end {
                    _mm_prefetch::<_MM_HINT_T0>(at.cast());
                    at = at.wrapping_add(64);
                }
            }
            for p in [2 * pair, 2 * pair + 1] {
                step::<V, C>(&mut acc, xt.add(p * 16 * V), w.add(p), k);
            }
        }
        if k % 2 == 1 {
            step::<V, C>(&mut acc, xt.add((k - 1) * 16 * V), w.add(k - 1), k);
        }
        for (c, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                _mm512_store_ps(yt.add((c * V + v) * 16), acc);
            }
        }
    }
}

/// Writes outputs `outputs` of the `count` rows from `first` of `y`, plus the bias, from a
/// block's transposed sums at `yt` (output `outputs.start + j` of row `r` at `j * 16 * V + r`),
/// 16 outputs of 16 rows per register transpose.
///
/// # Safety
///
/// As for [`linear`], with the sums of every output in `outputs` written for `count <= 16 * V`
/// rows at `yt`, and rows `first..first + count` inside `y`.
#[inline(always)]
unsafe fn untranspose<const V: usize>(
    args: &LinearArgs<'_>,
    yt: *const f32,
    first: usize,
    count: usize,
    outputs: core::ops::Range<usize>,
) {
    // SAFETY (whole block): the loads read sums of outputs inside `outputs` and bias values
    // below `n`, and the masked stores write outputs below `outputs.end <= n` of rows below
    // `first + count`.
    unsafe {
        for v in 0..count.div_ceil(16) {
            let rows = (count - 16 * v).min(16);
            let mut j0 = outputs.start;
            while j0 < outputs.end {
                let columns = (outputs.end - j0).min(16);
                let mask: __mmask16 = if columns == 16 { u16::MAX } else { (1u16 << columns) - 1 };
                let mut block = [_mm512_setzero_si512(); 16];
                for (i, line) in block.iter_mut().enumerate().take(columns) {
                    let at = yt.add((j0 - outputs.start + i) * 16 * V + 16 * v);
                    *line = _mm512_castps_si512(_mm512_load_ps(at));
                }
                let bias = match args.bias {
                    Some(bias) => _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(j0)),
                    None => _mm512_setzero_ps(),
                };
                let lines = super::panels::transpose16(&block);
                for (r, &line) in lines.iter().enumerate().take(rows) {
                    let sums = _mm512_add_ps(_mm512_castsi512_ps(line), bias);
                    let y = args.y.add((first + 16 * v + r) * args.n + j0);
                    _mm512_mask_storeu_ps(y, mask, sums);
                }
                j0 += columns;
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
unsafe fn step<const V: usize, const C: usize>(
    acc: &mut [[__m512; V]; C],
    column: *const f32,
    w: *const f32,
    k: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut x = [_mm512_setzero_ps(); V];
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

#[cfg(test)]
mod tests {
    use super::family;

    #[test]
    fn family_from_signature() {
        // Zen 4 (EPYC 9004), Zen 5 (EPYC 9005) and an Intel Core of family 6.
        assert_eq!(family(0x00A1_0F11), 0x19);
        assert_eq!(family(0x00B0_0F21), 0x1A);
        assert_eq!(family(0x0009_06EA), 6);
    }
}
