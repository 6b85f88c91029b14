//! `linear` with int8 weights and int8 activations on aarch64 with the dot-product extension
//! (`sdot`, Armv8.2-A and later: the cores of most phones since 2017).
//!
//! Each row of `x` is quantized to int8 with one scale, as on x86_64 (`vnni::linear_rows`), and
//! `sdot` adds four products of signed bytes into each of four 32-bit lanes, 16 products per
//! instruction. Tiles of 4 rows by 4 weight rows keep 16 accumulators in registers. Each is summed
//! across its lanes once, at the end of the row, and then scaled by the two scales.
//!
//! The stable compiler has no intrinsic for `sdot` yet, so it is written as inline assembly.

use core::arch::aarch64::*;
use core::arch::asm;

use super::generic::I8Rows;
use super::{LinearCall, Weights};

/// Maximum row length of the kernel.
const MAX_K: usize = 8192;

/// Rows of `x` quantized at once; they live on the stack, 64 KiB at the maximum length.
const ROW_BLOCK: usize = 8;

/// Weight rows and input rows per tile.
const TILE: usize = 4;

/// The quantized rows of one block, each padded with zeros to a multiple of 16 bytes.
#[repr(C, align(16))]
struct RowBlock {
    q: [i8; ROW_BLOCK * MAX_K],
    scale: [f32; ROW_BLOCK],
}

/// Returns whether the CPU has the dot-product instructions.
pub(crate) fn supported() -> bool {
    #[cfg(feature = "std")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(target_feature = "dotprod")
    }
}

/// Runs the call with each row of `x` quantized to int8 with one scale, when the weights are
/// int8, `0 < k <= MAX_K` and the CPU has the dot-product instructions. Returns false, having
/// done nothing, otherwise.
pub(crate) fn linear_rows(call: &mut LinearCall<'_>) -> bool {
    let Weights::I8(w) = call.w else {
        return false;
    };
    if call.k == 0 || call.k > MAX_K || !supported() {
        return false;
    }
    let mut block = core::mem::MaybeUninit::<RowBlock>::uninit();
    // SAFETY: the CPU feature was checked above, and `LinearCall::new` checked that `x`
    // contains `rows` rows of `k` values, `y` `rows` rows of `n`, `w` `n` rows of `k` values
    // with a scale each, and the bias (if any) `n` values. `rows_i8` writes every byte of the
    // block that it reads.
    unsafe { rows_i8(call, &w, block.as_mut_ptr()) };
    true
}

/// See [`linear_rows`].
///
/// # Safety
///
/// As described at the call in [`linear_rows`].
#[target_feature(enable = "neon,dotprod")]
unsafe fn rows_i8(call: &mut LinearCall<'_>, w: &I8Rows<'_>, block: *mut RowBlock) {
    let (k, n, rows) = (call.k, call.n, call.rows);
    let padded = k.next_multiple_of(16);
    // SAFETY (whole block): `block` is valid for writes; row `r` of the block takes bytes
    // `r * padded..(r + 1) * padded` of `q`, inside it since `padded <= MAX_K`. Rows of `x`
    // and `y` and the weight rows are inside the checked slices.
    unsafe {
        let q = core::ptr::addr_of_mut!((*block).q).cast::<i8>();
        let scales = core::ptr::addr_of_mut!((*block).scale).cast::<f32>();
        let mut m0 = 0;
        while m0 < rows {
            let count = (rows - m0).min(ROW_BLOCK);
            for r in 0..count {
                let row = &call.x[(m0 + r) * k..(m0 + r + 1) * k];
                *scales.add(r) = quantize_row(row, padded, q.add(r * padded));
            }
            let mut j = 0;
            while j < n {
                let width = (n - j).min(TILE);
                let mut r = 0;
                while r < count {
                    let height = (count - r).min(TILE);
                    let sums = tile(q.add(r * padded), padded, height, w, j, width);
                    for (i, row) in sums.iter().enumerate().take(height) {
                        let scale = *scales.add(r + i);
                        let y = &mut call.y[(m0 + r + i) * n + j..][..width];
                        for (c, (o, &sum)) in y.iter_mut().zip(row).enumerate() {
                            let bias = call.bias.map_or(0.0, |b| b[j + c]);
                            *o = sum as f32 * (scale * w.scales[j + c]) + bias;
                        }
                    }
                    r += height;
                }
                j += width;
            }
            m0 += count;
        }
    }
}

/// Quantizes `x` into `padded` bytes at `q` (zeros after the row's end) and returns the scale:
/// the largest magnitude maps to 127, and values round to the nearest integer, ties to even.
///
/// # Safety
///
/// NEON per the caller; `q` must be valid for `padded` writes, `padded` being `x.len()` rounded
/// up to a multiple of 16.
#[inline(always)]
unsafe fn quantize_row(x: &[f32], padded: usize, q: *mut i8) -> f32 {
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    let mut last = [0f32; 16];
    last[..tail.len()].copy_from_slice(tail);
    // SAFETY: NEON per the caller. Each load reads 4 values inside a chunk of 16 or `last`, and
    // each store writes 16 bytes at a multiple of 16 below `padded`.
    unsafe {
        let mut largest = vdupq_n_f32(0.0);
        for chunk in chunks.clone().chain([&last[..]]) {
            for i in 0..4 {
                largest = vmaxq_f32(largest, vabsq_f32(vld1q_f32(chunk.as_ptr().add(4 * i))));
            }
        }
        let largest = vmaxvq_f32(largest);
        let inverse = vdupq_n_f32(if largest > 0.0 { 127.0 / largest } else { 0.0 });
        let mut at = 0;
        for chunk in chunks.chain([&last[..]]) {
            if at >= padded {
                break;
            }
            let mut words = [vdupq_n_s32(0); 4];
            for (i, word) in words.iter_mut().enumerate() {
                let scaled = vmulq_f32(vld1q_f32(chunk.as_ptr().add(4 * i)), inverse);
                *word = vcvtnq_s32_f32(scaled);
            }
            let low = vcombine_s16(vqmovn_s32(words[0]), vqmovn_s32(words[1]));
            let high = vcombine_s16(vqmovn_s32(words[2]), vqmovn_s32(words[3]));
            vst1q_s8(q.add(at), vcombine_s8(vqmovn_s16(low), vqmovn_s16(high)));
            at += 16;
        }
        largest / 127.0
    }
}

/// Adds the dot products of the four signed bytes of each lane of `a` and `b` to `acc`.
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: the caller's function enables `dotprod`; the instruction touches only registers.
    unsafe {
        asm!(
            ".arch_extension dotprod",
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Integer sums of up to 4 quantized rows at `q` (`padded` bytes apart, `height` of them) with
/// up to 4 weight rows `j..j + width`, over the whole row.
///
/// # Safety
///
/// As for [`rows_i8`], with `height` quantized rows at `q` and `j + width <= n`.
#[inline(always)]
unsafe fn tile(
    q: *const i8,
    padded: usize,
    height: usize,
    w: &I8Rows<'_>,
    j: usize,
    width: usize,
) -> [[i32; TILE]; TILE] {
    let k = w.k;
    let whole = k - k % 16;
    // The last, partial step of each weight row, padded with zeros.
    let mut tails = [[0i8; 16]; TILE];
    for (c, tail) in tails.iter_mut().enumerate().take(width) {
        let row = &w.q[(j + c) * k..(j + c + 1) * k];
        tail[..k - whole].copy_from_slice(&row[whole..]);
    }
    // SAFETY (whole block): the loads read bytes below `whole` of each weight row, the padded
    // tails, and bytes below `padded` of each quantized row. Rows and weight rows past
    // `height` and `width` repeat the last one, and their sums are not used.
    unsafe {
        let weight_row = |c: usize| w.q.as_ptr().add((j + c.min(width - 1)) * k);
        let input_row = |r: usize| q.add(r.min(height - 1) * padded);
        let (w0, w1, w2, w3) = (weight_row(0), weight_row(1), weight_row(2), weight_row(3));
        let inputs = [input_row(0), input_row(1), input_row(2), input_row(3)];
        let mut acc = [[vdupq_n_s32(0); TILE]; TILE];
        let mut at = 0;
        while at < whole {
            let wv = [
                vld1q_s8(w0.add(at)),
                vld1q_s8(w1.add(at)),
                vld1q_s8(w2.add(at)),
                vld1q_s8(w3.add(at)),
            ];
            for (acc, &input) in acc.iter_mut().zip(&inputs) {
                let xv = vld1q_s8(input.add(at));
                for (a, &wv) in acc.iter_mut().zip(&wv) {
                    *a = sdot(*a, xv, wv);
                }
            }
            at += 16;
        }
        if whole < k {
            let last = |c: usize| vld1q_s8(tails[c.min(width - 1)].as_ptr());
            let wv = [last(0), last(1), last(2), last(3)];
            for (acc, &input) in acc.iter_mut().zip(&inputs) {
                let xv = vld1q_s8(input.add(whole));
                for (a, &wv) in acc.iter_mut().zip(&wv) {
                    *a = sdot(*a, xv, wv);
                }
            }
        }
        let mut sums = [[0i32; TILE]; TILE];
        for (s, a) in sums.iter_mut().zip(&acc) {
            for (s, &a) in s.iter_mut().zip(a) {
                *s = vaddvq_s32(a);
            }
        }
        sums
    }
}
