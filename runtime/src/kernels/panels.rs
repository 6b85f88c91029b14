//! `linear` with int8 weights and int8 activations on AVX-512 VNNI for calls of many rows.
//!
//! The weights are first repacked into panels of 16 outputs. For each group of four columns, 64
//! bytes contain those four weights of each of the 16 outputs: the order in which `vpdpbusd`
//! multiplies four bytes of one operand with the 16 lanes of the other. Four bytes of an input row
//! are then broadcast to all lanes, so that one instruction adds four products to each of 16
//! outputs, and a tile of 6 rows by 4 panels keeps 24 accumulators in registers. The results are
//! those of the dot-product kernel in `vnni`, which quantizes each row the same way: the integer
//! sums are exact, and they are scaled with the same single rounding.
//!
//! Packing reads every weight once per call, which costs about as much as one row of products:
//! it pays from [`MIN_ROWS`] rows on.

use core::arch::x86_64::*;
use core::cell::RefCell;
use std::vec::Vec;

use super::generic::I8Rows;
use super::vnni::quantize_row;
use super::LinearCall;

/// Rows from which [`linear`] packs the weights.
const MIN_ROWS: usize = 32;

/// Largest weight matrix, in bytes, that [`linear`] packs: each thread keeps a copy of that size.
const MAX_WEIGHT_BYTES: usize = 16 << 20;

/// Outputs per panel.
const PANEL: usize = 16;

/// Bytes ahead of the weights being packed that [`pack_panel`] fetches into the L1 cache.
const PREFETCH_AHEAD: usize = 256;

/// Rows of `x` per tile.
const TILE_ROWS: usize = 6;

/// Panels per tile.
const TILE_PANELS: usize = 4;

/// 64 bytes, 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Per-thread buffers, kept between calls.
struct Buffers {
    /// Packed weights: panel `p`, columns `4g..4g + 4` at line `p * groups + g`.
    weights: Vec<Line>,
    /// `128 Σ w` of each output, padded to whole panels.
    offsets: Vec<i32>,
    /// Quantized rows of `x`, `padded` bytes each (see [`quantize_row`]).
    rows: Vec<Line>,
    /// Scale of each quantized row.
    scales: Vec<f32>,
}

std::thread_local! {
    static BUFFERS: RefCell<Buffers> = const {
        RefCell::new(Buffers {
            weights: Vec::new(),
            offsets: Vec::new(),
            rows: Vec::new(),
            scales: Vec::new(),
        })
    };
}

/// Returns whether [`linear`] takes a call of `rows` rows, `k` columns and `n` outputs.
pub(crate) fn applies(rows: usize, k: usize, n: usize) -> bool {
    rows >= MIN_ROWS && k > 0 && k <= super::vnni::MAX_K && n.saturating_mul(k) <= MAX_WEIGHT_BYTES
}

/// Runs the call.
///
/// # Safety
///
/// The CPU must support `vnni::supported`'s features, the call's weights must be `w`, and
/// [`applies`] must hold for its shape.
///
/// # Panics
///
/// Panics if called while the thread's locals are being destroyed. If a buffer cannot grow, the
/// failed allocation aborts the process.
pub(crate) unsafe fn linear(call: &mut LinearCall<'_>, w: &I8Rows<'_>) {
    BUFFERS.with(|cell| {
        // The kernel does not call itself, so the buffers are never borrowed twice; a second
        // borrow would panic rather than alias.
        let mut buffers = cell.borrow_mut();
        let (rows, k, n) = (call.rows, call.k, call.n);
        let groups = k.div_ceil(4);
        let panels = n.div_ceil(PANEL);
        let padded = k.next_multiple_of(64);
        let b = &mut *buffers;
        grow(&mut b.weights, panels * groups, Line([0; 64]));
        grow(&mut b.offsets, panels * PANEL, 0);
        grow(&mut b.rows, rows * padded / 64, Line([0; 64]));
        grow(&mut b.scales, rows, 0.0);
        // SAFETY: forwarded from the caller; every buffer was grown to the size its use below
        // needs.
        unsafe { run(call, w, b) };
    })
}

/// Grows `v` to at least `len` values.
fn grow<T: Copy>(v: &mut Vec<T>, len: usize, value: T) {
    if v.len() < len {
        v.resize(len, value);
    }
}

/// [`linear`] with its buffers.
///
/// # Safety
///
/// As for [`linear`], with the buffers grown for the call's shape.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn run(call: &mut LinearCall<'_>, w: &I8Rows<'_>, b: &mut Buffers) {
    let (rows, k, n) = (call.rows, call.k, call.n);
    let groups = k.div_ceil(4);
    let padded = k.next_multiple_of(64);
    let panels = n.div_ceil(PANEL);
    let packed = b.weights.as_mut_ptr().cast::<u8>();
    let quantized = b.rows.as_mut_ptr().cast::<u8>();
    // SAFETY (whole block): the buffers have room for `panels * groups` lines, `panels * 16`
    // offsets, `rows * padded` bytes and `rows` scales. Rows of `x` and `y`, the weights, their
    // scales and the bias are inside the slices `LinearCall::new` checked.
    unsafe {
        for r in 0..rows {
            let row = call.x.as_ptr().add(r * k);
            b.scales[r] = quantize_row(row, k, padded, quantized.add(r * padded));
        }
        let out = Out {
            y: call.y.as_mut_ptr(),
            n,
            scales: b.scales.as_ptr(),
            w_scales: w.scales.as_ptr(),
            bias: call.bias.map(|b| b.as_ptr()),
            offsets: b.offsets.as_ptr(),
        };
        let dims = Dims { groups, padded };
        let full_tiles = (rows / TILE_ROWS).max(1);
        let mut p0 = 0;
        while p0 < panels {
            let count = (panels - p0).min(TILE_PANELS);
            for p in p0..p0 + count {
                let offset = pack_panel(w, k, n, p, packed.add(p * groups * 64));
                _mm512_storeu_si512(b.offsets.as_mut_ptr().add(p * PANEL).cast(), offset);
            }
            // While the tiles of full rows run, each fetches its share of the next panels'
            // weights (whole rows, so one contiguous range) into the L2 cache, for `pack_panel`
            // to find there.
            let next_end = ((p0 + count + TILE_PANELS) * PANEL).min(n) * k;
            let next = ((p0 + count) * PANEL * k).min(next_end)..next_end;
            let share = next.len().div_ceil(64).div_ceil(full_tiles) * 64;
            let fetch = |tile: usize| {
                let start = (next.start + tile * share).min(next.end);
                let end = (start + share).min(next.end);
                w.q.as_ptr().wrapping_add(start).cast::<u8>()..w.q.as_ptr().wrapping_add(end).cast()
            };
            let none = || core::ptr::null::<u8>()..core::ptr::null();
            let weights = packed.add(p0 * groups * 64);
            let mut r = 0;
            while r + TILE_ROWS <= rows {
                let x = quantized.add(r * padded);
                match count {
                    4 => tile::<TILE_ROWS, 4>(&dims, x, weights, fetch(r / TILE_ROWS), &out, r, p0),
                    _ => {
                        for v in 0..count {
                            let weights = weights.add(v * groups * 64);
                            tile::<TILE_ROWS, 1>(&dims, x, weights, none(), &out, r, p0 + v);
                        }
                    }
                }
                r += TILE_ROWS;
            }
            while r < rows {
                let x = quantized.add(r * padded);
                match count {
                    4 => tile::<1, 4>(&dims, x, weights, none(), &out, r, p0),
                    _ => {
                        for v in 0..count {
                            let weights = weights.add(v * groups * 64);
                            tile::<1, 1>(&dims, x, weights, none(), &out, r, p0 + v);
                        }
                    }
                }
                r += 1;
            }
            p0 += count;
        }
    }
}

/// Packs panel `p` (outputs `16p..16p + 16`, zeros past `n`) into `k.div_ceil(4)` lines at
/// `out`, with zeros past column `k`, and returns `128 Σ w` of each of its outputs.
///
/// The panel is read 64 columns at a time, one vector per output, and each such block of 16 by
/// 16 groups of four bytes is transposed in registers.
///
/// # Safety
///
/// As for [`run`], with room for `k.div_ceil(4)` lines at `out`.
#[inline(always)]
unsafe fn pack_panel(w: &I8Rows<'_>, k: usize, n: usize, p: usize, out: *mut u8) -> __m512i {
    let first = p * PANEL;
    let outputs = (n - first).min(PANEL);
    let groups = k.div_ceil(4);
    // SAFETY (whole block): the masked loads read columns below `k` of the panel's rows below
    // `n`; the stores write lines below `groups` at `out`.
    unsafe {
        let bias = _mm512_set1_epi8(0x80u8 as i8);
        let mut sums = _mm512_setzero_si512();
        let mut c0 = 0;
        while c0 < k {
            let left = k - c0;
            let mask: __mmask64 = if left >= 64 { u64::MAX } else { (1u64 << left) - 1 };
            let mut rows = [_mm512_setzero_si512(); PANEL];
            for (i, row) in rows.iter_mut().enumerate().take(outputs) {
                let at = w.q.as_ptr().add((first + i) * k + c0);
                // Weights come from memory: fetch each row's line four lines ahead. Past the
                // row's end it is the next row's, and past the matrix a fetch that goes unused.
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_AHEAD).cast());
                *row = _mm512_maskz_loadu_epi8(mask, at.cast());
            }
            let lines = transpose16(&rows);
            let g0 = c0 / 4;
            for (g, &line) in lines.iter().enumerate().take(groups - g0) {
                _mm512_store_si512(out.add(64 * (g0 + g)).cast(), line);
                sums = _mm512_dpbusd_epi32(sums, bias, line);
            }
            c0 += 64;
        }
        sums
    }
}

/// Transposes 16 vectors of 16 four-byte values: lane `i` of result `g` is lane `g` of `rows[i]`.
///
/// # Safety
///
/// The CPU must support AVX-512F.
#[inline(always)]
pub(crate) unsafe fn transpose16(rows: &[__m512i; 16]) -> [__m512i; 16] {
    // SAFETY: AVX-512F per the caller.
    unsafe {
        // Pairs of rows interleaved: in each 128-bit lane, rows 2i and 2i + 1 at two columns.
        let mut pairs = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            let (a, b) = (rows[2 * i], rows[2 * i + 1]);
            pairs[2 * i] = _mm512_unpacklo_epi32(a, b);
            pairs[2 * i + 1] = _mm512_unpackhi_epi32(a, b);
        }
        // Quads: `quads[4b + c]` holds, in 128-bit lane L, rows 4b..4b + 4 at column 4L + c.
        let mut quads = [_mm512_setzero_si512(); 16];
        for b in 0..4 {
            let (lo0, hi0, lo1, hi1) =
                (pairs[4 * b], pairs[4 * b + 1], pairs[4 * b + 2], pairs[4 * b + 3]);
            quads[4 * b] = _mm512_unpacklo_epi64(lo0, lo1);
            quads[4 * b + 1] = _mm512_unpackhi_epi64(lo0, lo1);
            quads[4 * b + 2] = _mm512_unpacklo_epi64(hi0, hi1);
            quads[4 * b + 3] = _mm512_unpackhi_epi64(hi0, hi1);
        }
        // Column 4L + c gathers lane L of the four quads with that `c`.
        let mut out = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            let (a, b, cc, d) = (quads[c], quads[4 + c], quads[8 + c], quads[12 + c]);
            let ab_low = _mm512_shuffle_i32x4::<0x44>(a, b);
            let ab_high = _mm512_shuffle_i32x4::<0xEE>(a, b);
            let cd_low = _mm512_shuffle_i32x4::<0x44>(cc, d);
            let cd_high = _mm512_shuffle_i32x4::<0xEE>(cc, d);
            out[c] = _mm512_shuffle_i32x4::<0x88>(ab_low, cd_low);
            out[4 + c] = _mm512_shuffle_i32x4::<0xDD>(ab_low, cd_low);
            out[8 + c] = _mm512_shuffle_i32x4::<0x88>(ab_high, cd_high);
            out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(ab_high, cd_high);
        }
        out
    }
}

/// Shape of the packed weights and quantized rows.
struct Dims {
    /// Groups of four columns.
    groups: usize,
    /// Bytes per quantized row.
    padded: usize,
}

/// Output of the tiles and what scales their integer sums.
struct Out {
    y: *mut f32,
    n: usize,
    /// Scale of each quantized row.
    scales: *const f32,
    /// Scale of each weight row.
    w_scales: *const f32,
    bias: Option<*const f32>,
    /// `128 Σ w` of each output.
    offsets: *const i32,
}

/// Computes outputs `16 p0..16 (p0 + V)` of rows `r0..r0 + R`, from the quantized rows at `x` and
/// the `V` packed panels at `weights`. Fetches the lines of `fetch` into the L2 cache on the way,
/// one per group of four columns, as far as the columns go.
///
/// # Safety
///
/// As for [`run`], with the rows and panels inside the buffers.
#[inline(always)]
unsafe fn tile<const R: usize, const V: usize>(
    dims: &Dims,
    x: *const u8,
    weights: *const u8,
    fetch: core::ops::Range<*const u8>,
    out: &Out,
    r0: usize,
    p0: usize,
) {
    // SAFETY (whole block): the loads read group `g < groups` of each panel and four bytes at
    // `4g < padded` of each row. The stores write outputs below `n` (masked) of rows
    // `r0..r0 + R`.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); V]; R];
        let panel = dims.groups * 64;
        let mut at = fetch.start;
        for g in 0..dims.groups {
            if at < fetch.end {
                _mm_prefetch::<_MM_HINT_T1>(at.cast());
                at = at.wrapping_add(64);
            }
            let mut wv = [_mm512_setzero_si512(); V];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_load_si512(weights.add(v * panel + 64 * g).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let four = x.add(r * dims.padded + 4 * g).cast::<i32>().read_unaligned();
                let xv = _mm512_set1_epi32(four);
                for (a, &wv) in acc.iter_mut().zip(&wv) {
                    *a = _mm512_dpbusd_epi32(*a, xv, wv);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = r0 + r;
            let x_scale = _mm512_set1_ps(*out.scales.add(row));
            for (v, &a) in acc.iter().enumerate() {
                let first = (p0 + v) * PANEL;
                let outputs = out.n.saturating_sub(first).min(PANEL);
                let mask: __mmask16 =
                    if outputs == PANEL { u16::MAX } else { (1u16 << outputs) - 1 };
                let offset = _mm512_loadu_si512(out.offsets.add(first).cast());
                let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, offset));
                let w_scale = _mm512_maskz_loadu_ps(mask, out.w_scales.add(first));
                let bias = match out.bias {
                    Some(b) => _mm512_maskz_loadu_ps(mask, b.add(first)),
                    None => _mm512_setzero_ps(),
                };
                // The same rounding as the dot-product kernel: the row's scale times the
                // weight row's, then one fused multiply-add.
                let scale = _mm512_mul_ps(x_scale, w_scale);
                let y = _mm512_fmadd_ps(sums, scale, bias);
                _mm512_mask_storeu_ps(out.y.add(row * out.n + first), mask, y);
            }
        }
    }
}
