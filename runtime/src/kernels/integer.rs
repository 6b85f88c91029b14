//! Portable integer products of int8 weights with inputs quantized to int8, for targets without
//! SIMD kernels of their own: microcontrollers, where an integer multiply-add costs far less than
//! a floating-point one (and a Cortex-M3 has no floating-point unit at all).
//!
//! Each dot product quantizes its input window with one scale, as [`super::linear_int8_rows`]
//! does on x86_64 and aarch64: each value is multiplied by `127 / largest magnitude` in f32 and
//! rounded to the nearest integer, ties to even. The integer sum is exact, then scaled once by
//! the window's scale and the weight row's. A window is a row of `x` for `linear`, and for a
//! convolution the input values under the kernel at one output position, padding included as
//! zeros. A depthwise convolution with one output per input channel quantizes each input plane
//! with one scale instead.
//!
//! NOTE: when the largest magnitude is below about 3.7e-37, `127 / largest` overflows to
//! infinity and every nonzero value of the window becomes ±127, as in the SIMD kernels.
//!
//! On Armv7E-M (Cortex-M4, M7) the sums use the DSP extension: `SXTB16` widens the even and the
//! odd bytes of four weights into two pairs of halfwords, and each `SMLAD` adds two products. The
//! window is stored as halfwords in the order that pairs with them, so each input pair loads as
//! one word.

use super::conv::{clamp, tap_offset, Bias, Geometry};
use super::generic::I8Rows;

/// Maximum number of values in one window. Longer windows keep f32 inputs. A window takes twice
/// this many bytes of stack.
pub const MAX_WINDOW: usize = 512;

/// One input window quantized to int8, with its scale.
struct Window {
    /// The values in pairs, each a word with the first value's bits in the low halfword. A block
    /// of four values `v0..v3` is the pairs `(v0, v2)` and `(v1, v3)`, because `SXTB16` splits a
    /// word of four weights that way. Zero past `len` up to a multiple of 4.
    #[cfg(edgefold_dsp)]
    words: [u32; MAX_WINDOW / 2],
    /// The values in order, each in 16 bits, for products that compilers vectorize.
    #[cfg(not(edgefold_dsp))]
    values: [i16; MAX_WINDOW],
    /// Values in the window.
    len: usize,
    /// The scale: `value = q * scale`. NaN when a value is NaN or infinite.
    scale: f32,
}

/// Two values as one word, `lo` in the low halfword.
#[cfg(edgefold_dsp)]
#[inline(always)]
fn pack(lo: i32, hi: i32) -> u32 {
    lo as u16 as u32 | (hi as u16 as u32) << 16
}

/// Rounds to the nearest integer, ties to even, for `|v| < 2^22`.
#[inline(always)]
fn round_even(v: f32) -> i32 {
    // Adding 1.5 * 2^23 leaves no fraction bits, so the addition rounds as the FPU does.
    const SHIFT: f32 = 12_582_912.0;
    ((v + SHIFT) - SHIFT) as i32
}

/// The int8 scale of a set of values.
#[derive(Clone, Copy)]
struct Scale {
    /// `value = q * scale`: the largest magnitude over 127, or NaN when a value is NaN or
    /// infinite.
    scale: f32,
    /// `127 / largest`, or 0 when every value is 0.
    inverse: f32,
}

impl Scale {
    /// Finds the largest magnitude of `values`.
    fn of(values: impl Iterator<Item = f32>) -> Self {
        // The bits of magnitudes order as their values do, with infinity above every finite
        // value and NaN above infinity. So integer comparisons find the largest and any NaN,
        // without a floating-point comparison per value (a library call without an FPU).
        const INFINITY: u32 = 0x7F80_0000;
        let mut largest_bits = 0u32;
        for v in values {
            largest_bits = largest_bits.max(v.to_bits() & !(1 << 31));
        }
        let largest = f32::from_bits(largest_bits.min(INFINITY));
        let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
        let scale = if largest_bits >= INFINITY { f32::NAN } else { largest / 127.0 };
        Scale { scale, inverse }
    }

    /// Rounds `v / scale` to the nearest integer, ties to even.
    #[inline(always)]
    fn quantize(&self, v: f32) -> i32 {
        // `v * inverse` lies within ±127 (a NaN converts to 0, and the scale is then NaN).
        round_even(v * self.inverse).clamp(-127, 127)
    }
}

impl Window {
    fn new() -> Self {
        Window {
            #[cfg(edgefold_dsp)]
            words: [0; MAX_WINDOW / 2],
            #[cfg(not(edgefold_dsp))]
            values: [0; MAX_WINDOW],
            len: 0,
            scale: 0.0,
        }
    }

    /// Quantizes the `len` values that `values()` yields (each call yields the same ones).
    /// Returns false, leaving the window unusable, when `len` exceeds [`MAX_WINDOW`].
    fn fill<I: Iterator<Item = f32>>(&mut self, len: usize, values: impl Fn() -> I) -> bool {
        if len > MAX_WINDOW {
            return false;
        }
        let scale = Scale::of(values().take(len));
        let mut q = values().take(len).map(|v| scale.quantize(v));
        #[cfg(edgefold_dsp)]
        for block in self.words[..len.div_ceil(4) * 2].chunks_exact_mut(2) {
            let mut v = [0; 4];
            for (v, q) in v.iter_mut().zip(&mut q) {
                *v = q;
            }
            block[0] = pack(v[0], v[2]);
            block[1] = pack(v[1], v[3]);
        }
        #[cfg(not(edgefold_dsp))]
        for (slot, q) in self.values.iter_mut().zip(&mut q) {
            *slot = q as i16;
        }
        self.len = len;
        self.scale = scale.scale;
        true
    }

    /// Value `i` as stored.
    #[cfg(test)]
    fn get(&self, i: usize) -> i32 {
        #[cfg(edgefold_dsp)]
        {
            // Within a block of four, values 1 and 2 trade places.
            let slot = (i & !3) | [0, 2, 1, 3][i & 3];
            (self.words[slot / 2] >> (16 * (slot % 2))) as u16 as i16 as i32
        }
        #[cfg(not(edgefold_dsp))]
        {
            self.values[i] as i32
        }
    }

    /// Returns the integer sums of the window with weight rows `a` and `b` of `rows`.
    #[inline(always)]
    fn dot2(&self, rows: &Rows<'_>, a: usize, b: usize) -> [i32; 2] {
        let len = self.len;
        #[cfg(edgefold_dsp)]
        {
            let pairs = self.words.chunks_exact(2).map(|p| (p[0], p[1]));
            if let Some(words) = rows.words {
                // Rows of whole words: no tail.
                let per = len / 4;
                let (wa, wb) = (&words[a * per..(a + 1) * per], &words[b * per..(b + 1) * per]);
                return dsp::dot2(wa.iter().copied(), wb.iter().copied(), pairs);
            }
            let (ra, rb) = (rows.row(a), rows.row(b));
            let whole = len & !3;
            let (wa, wb) = (ra[..whole].chunks_exact(4), rb[..whole].chunks_exact(4));
            let mut sums = dsp::dot2(wa.map(word4), wb.map(word4), pairs);
            if whole < len {
                let (even, odd) = (self.words[whole / 2], self.words[whole / 2 + 1]);
                sums[0] = dsp::dot4(word(&ra[whole..]), even, odd, sums[0]);
                sums[1] = dsp::dot4(word(&rb[whole..]), even, odd, sums[1]);
            }
            sums
        }
        #[cfg(not(edgefold_dsp))]
        {
            let (ra, rb) = (rows.row(a), rows.row(b));
            let mut sums = [0i32; 2];
            for ((&x, &wa), &wb) in self.values[..len].iter().zip(ra).zip(rb) {
                sums[0] += x as i32 * wa as i32;
                sums[1] += x as i32 * wb as i32;
            }
            sums
        }
    }

    /// Returns the integer sum of the window with weight row `a` of `rows`.
    #[inline]
    fn dot(&self, rows: &Rows<'_>, a: usize) -> i32 {
        let len = self.len;
        #[cfg(edgefold_dsp)]
        {
            let pairs = self.words.chunks_exact(2).map(|p| (p[0], p[1]));
            if let Some(words) = rows.words {
                let per = len / 4;
                return dsp::dot1(words[a * per..(a + 1) * per].iter().copied(), pairs);
            }
            let ra = rows.row(a);
            let whole = len & !3;
            let mut sum = dsp::dot1(ra[..whole].chunks_exact(4).map(word4), pairs);
            if whole < len {
                let (even, odd) = (self.words[whole / 2], self.words[whole / 2 + 1]);
                sum = dsp::dot4(word(&ra[whole..]), even, odd, sum);
            }
            sum
        }
        #[cfg(not(edgefold_dsp))]
        {
            let values = self.values[..len].iter();
            values.zip(rows.row(a)).map(|(&x, &w)| x as i32 * w as i32).sum()
        }
    }
}

/// Int8 weight rows of `len` values, row-major.
#[derive(Clone, Copy)]
struct Rows<'a> {
    /// The values.
    q: &'a [i8],
    /// Values per row.
    len: usize,
    /// The same values as words of four, when every row starts at a multiple of 4 bytes, so
    /// that each word loads with one instruction.
    #[cfg(edgefold_dsp)]
    words: Option<&'a [u32]>,
}

impl<'a> Rows<'a> {
    fn new(q: &'a [i8], len: usize) -> Self {
        #[cfg(edgefold_dsp)]
        let words = match len % 4 {
            0 => crate::cast::cast::<u32>(crate::cast::as_bytes(q)),
            _ => None,
        };
        Rows {
            q,
            len,
            #[cfg(edgefold_dsp)]
            words,
        }
    }

    /// Row `r`.
    #[inline(always)]
    fn row(&self, r: usize) -> &'a [i8] {
        &self.q[r * self.len..(r + 1) * self.len]
    }
}

/// Four weights as one little-endian word.
#[cfg(edgefold_dsp)]
#[inline(always)]
fn word4(w: &[i8]) -> u32 {
    u32::from_le_bytes([w[0] as u8, w[1] as u8, w[2] as u8, w[3] as u8])
}

/// Up to four weights as one little-endian word, zeros past the end of `w`.
#[cfg(edgefold_dsp)]
#[inline(always)]
fn word(w: &[i8]) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, &w) in bytes.iter_mut().zip(w) {
        *b = w as u8;
    }
    u32::from_le_bytes(bytes)
}

/// The Armv7E-M DSP instructions.
#[cfg(edgefold_dsp)]
mod dsp {
    use core::arch::asm;

    /// `sum` plus the products of the four bytes of `w` with the halfwords of `even` (bytes 0
    /// and 2) and `odd` (bytes 1 and 3).
    #[inline(always)]
    pub(super) fn dot4(w: u32, even: u32, odd: u32, sum: i32) -> i32 {
        let out: i32;
        // SAFETY: the instructions read and write only the named registers. `SMLAD` sets the Q
        // flag only on overflow, which sums of int8 products stay far from, and nothing reads it.
        unsafe {
            asm!(
                "sxtb16 {t}, {w}",
                "smlad {s}, {t}, {e}, {s}",
                "sxtb16 {t}, {w}, ror #8",
                "smlad {s}, {t}, {o}, {s}",
                t = out(reg) _,
                w = in(reg) w,
                e = in(reg) even,
                o = in(reg) odd,
                s = inout(reg) sum => out,
                options(pure, nomem, nostack),
            );
        }
        out
    }

    /// `sum` plus the products of the low halfwords of `a` and `b` and of their high halfwords.
    #[inline(always)]
    pub(super) fn smlad(a: u32, b: u32, sum: i32) -> i32 {
        let out: i32;
        // SAFETY: as in `dot4`: registers only, and the Q flag is never read.
        unsafe {
            asm!(
                "smlad {s}, {a}, {b}, {s}",
                a = in(reg) a,
                b = in(reg) b,
                s = inout(reg) sum => out,
                options(pure, nomem, nostack),
            );
        }
        out
    }

    /// Returns the sums of whole blocks of window values, given as their pairs, with two rows of
    /// weights, a word of four weights per block.
    #[inline(always)]
    pub(super) fn dot2(
        a: impl Iterator<Item = u32>,
        b: impl Iterator<Item = u32>,
        blocks: impl Iterator<Item = (u32, u32)>,
    ) -> [i32; 2] {
        let mut sums = [0i32; 2];
        for ((wa, wb), (even, odd)) in a.zip(b).zip(blocks) {
            sums[0] = dot4(wa, even, odd, sums[0]);
            sums[1] = dot4(wb, even, odd, sums[1]);
        }
        sums
    }

    /// Returns the sum of whole blocks of window values with one row of weights.
    #[inline(always)]
    pub(super) fn dot1(
        a: impl Iterator<Item = u32>,
        blocks: impl Iterator<Item = (u32, u32)>,
    ) -> i32 {
        let mut sum = 0;
        for (wa, (even, odd)) in a.zip(blocks) {
            sum = dot4(wa, even, odd, sum);
        }
        sum
    }
}

/// Returns the output of one integer sum before its clamp: `sum * scale * weight_scale + bias`.
#[inline(always)]
fn output(sum: i32, scale: f32, weight_scale: f32, bias: f32) -> f32 {
    sum as f32 * (scale * weight_scale) + bias
}

/// `y[r, j] = Σ_k x[r, k] · w[j, k] + bias[j]` with each row of `x` quantized to int8, for int8
/// weights with `k` at most [`MAX_WINDOW`]. Returns false, computing nothing, for other weights
/// or longer rows.
///
/// # Panics
///
/// Panics if a slice is shorter than `x: [rows, k]`, `w: [n, k]`, `y: [rows, n]` imply.
pub fn linear_rows(
    x: &[f32],
    rows: usize,
    w: &I8Rows<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> bool {
    let k = w.k;
    if k > MAX_WINDOW {
        return false;
    }
    let weights = Rows::new(&w.q[..n * k], k);
    let mut window = Window::new();
    for (r, out) in y.chunks_exact_mut(n.max(1)).take(rows).enumerate() {
        let row = &x[r * k..(r + 1) * k];
        window.fill(k, || row.iter().copied());
        let bias_at = |j: usize| bias.map_or(0.0, |b| b[j]);
        let mut j = 0;
        while j + 2 <= n {
            let sums = window.dot2(&weights, j, j + 1);
            for (c, &sum) in sums.iter().enumerate() {
                out[j + c] = output(sum, window.scale, w.scales[j + c], bias_at(j + c));
            }
            j += 2;
        }
        if j < n {
            out[j] = output(window.dot(&weights, j), window.scale, w.scales[j], bias_at(j));
        }
    }
    true
}

/// Int8 convolution weights: row-major `[O, C / groups * kh * kw]` with one scale per row.
#[derive(Clone, Copy, Debug)]
pub struct ConvI8<'a> {
    /// Quantized values.
    pub q: &'a [i8],
    /// One scale per output channel.
    pub scales: &'a [f32],
}

/// The weights of one convolution call, its bias and its clamp.
struct ConvCall<'a> {
    rows: Rows<'a>,
    scales: &'a [f32],
    bias: Option<Bias<'a>>,
    activation: [f32; 2],
}

impl ConvCall<'_> {
    /// Computes the outputs of channels `channels` at one output position from `window`, and
    /// writes channel `o`'s to `y[at + o * stride]`.
    #[inline]
    fn outputs(
        &self,
        window: &Window,
        channels: core::ops::Range<usize>,
        y: &mut [f32],
        at: usize,
        stride: usize,
    ) {
        let mut o = channels.start;
        while o + 2 <= channels.end {
            let [s0, s1] = window.dot2(&self.rows, o, o + 1);
            y[at + o * stride] = self.value(o, s0, window.scale);
            y[at + (o + 1) * stride] = self.value(o + 1, s1, window.scale);
            o += 2;
        }
        if o < channels.end {
            y[at + o * stride] = self.value(o, window.dot(&self.rows, o), window.scale);
        }
    }

    /// Returns output channel `o`'s value for the integer sum `sum` of a window of scale `scale`.
    #[inline(always)]
    fn value(&self, o: usize, sum: i32, scale: f32) -> f32 {
        let b = match self.bias {
            Some(bias) => bias.at(o),
            None => 0.0,
        };
        clamp(output(sum, scale, self.scales[o], b), self.activation)
    }
}

/// Computes the convolution of [`super::conv::conv2d_nchw_f32`] with integer sums, the input
/// under the kernel at each output position quantized to int8 with one scale. A depthwise convolution
/// with one output per input channel (`groups == C == O`) quantizes each input plane with one
/// scale instead. Returns false, computing nothing, when a window (for a depthwise convolution,
/// a plane with its padding) has more than [`MAX_WINDOW`] values, or when pads, strides and
/// dilations reach input positions beyond `i32::MAX`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_nchw_int8(
    x: &[f32],
    geometry: &Geometry,
    groups: usize,
    weights: ConvI8<'_>,
    bias: Option<Bias<'_>>,
    activation: [f32; 2],
    y: &mut [f32],
) -> bool {
    let g = geometry;
    let w = &g.window;
    let ([ih, iw], [oh, ow]) = (g.in_size, g.out_size);
    let (in_plane, out_plane) = (ih * iw, oh * ow);
    let (kh, kw) = (w.kernel[0] as usize, w.kernel[1] as usize);
    let channels_per_group = g.in_channels / groups;
    let outputs_per_group = g.out_channels / groups;
    let len = channels_per_group * kh * kw;
    if !fits_isize(g) {
        return false;
    }
    if is_depthwise(g, groups) {
        let call = Depthwise { geometry: g, weights, bias, activation };
        return call.run(x, y);
    }
    if len > MAX_WINDOW {
        return false;
    }

    let rows = Rows::new(&weights.q[..g.out_channels * len], len);
    let call = ConvCall { rows, scales: weights.scales, bias, activation };
    let mut window = Window::new();
    for n in 0..g.batch {
        for group in 0..groups {
            let first = (n * g.in_channels + group * channels_per_group) * in_plane;
            let inputs = &x[first..first + channels_per_group * in_plane];
            let outputs = group * outputs_per_group..(group + 1) * outputs_per_group;
            for oy in 0..oh {
                for ox in 0..ow {
                    // The input value of each tap, or zero where the tap falls in the padding.
                    let at = |ky: usize, kx: usize| -> Option<usize> {
                        let iy = oy as i64 * w.strides[0] as i64 + tap_offset(w, 0, ky);
                        let ix = ox as i64 * w.strides[1] as i64 + tap_offset(w, 1, kx);
                        let inside = (0..ih as i64).contains(&iy) && (0..iw as i64).contains(&ix);
                        inside.then(|| iy as usize * iw + ix as usize)
                    };
                    window.fill(len, || {
                        inputs.chunks_exact(in_plane).flat_map(move |plane| {
                            (0..kh * kw).map(move |t| at(t / kw, t % kw).map_or(0.0, |i| plane[i]))
                        })
                    });
                    let base = n * g.out_channels * out_plane + oy * ow + ox;
                    call.outputs(&window, outputs.clone(), y, base, out_plane);
                }
            }
        }
    }
    true
}

/// Computes the convolution of [`super::conv::conv2d_nchw_f32_in_place`] with integer sums, for
/// two cases. A 1x1 kernel without padding quantizes the channels of each group at each pixel with
/// one scale. A depthwise convolution with one output per input channel, of any kernel,
/// quantizes each plane with one scale. The quantized copy of a pixel's or a plane's inputs is
/// all the scratch it needs, so the outputs overwrite the inputs at once. Returns false,
/// computing nothing, for other convolutions, when a group has more than [`MAX_WINDOW`] channels
/// or a depthwise plane with its padding more than [`MAX_WINDOW`] values, or for positions
/// beyond `i32::MAX`.
///
/// `xy` contains the input on entry and the output on return.
pub fn conv2d_nchw_int8_in_place(
    xy: &mut [f32],
    geometry: &Geometry,
    groups: usize,
    weights: ConvI8<'_>,
    bias: Option<Bias<'_>>,
    activation: [f32; 2],
) -> bool {
    let g = geometry;
    let channels = g.in_channels;
    let per_group = channels / groups.max(1);
    let pointwise = g.window.kernel == [1, 1] && g.window.pads == [0; 4];
    let same = g.window.strides == [1, 1] && g.in_size == g.out_size && g.out_channels == channels;
    if same && is_depthwise(g, groups) && fits_isize(g) {
        let call = Depthwise { geometry: g, weights, bias, activation };
        return call.run_in_place(xy);
    }
    if !pointwise || !same || per_group > MAX_WINDOW {
        return false;
    }
    let plane = g.in_size[0] * g.in_size[1];
    let rows = Rows::new(&weights.q[..channels * per_group], per_group);
    let call = ConvCall { rows, scales: weights.scales, bias, activation };
    let mut window = Window::new();
    for sample in xy.chunks_exact_mut(channels * plane).take(g.batch) {
        for p in 0..plane {
            for group in 0..groups {
                let first = group * per_group;
                // The group's outputs replace its own inputs only, once they are in the window.
                let column = &sample[first * plane + p..];
                window.fill(per_group, || column.iter().step_by(plane).copied());
                call.outputs(&window, first..first + per_group, sample, p, plane);
            }
        }
    }
    true
}

/// Returns whether every input position that a window reaches, padding included, fits in an
/// `isize` on 32-bit targets too, so the kernels' position arithmetic cannot overflow. A file
/// may state pads, strides and dilations up to `u32::MAX`; those convolutions keep f32 inputs.
fn fits_isize(g: &Geometry) -> bool {
    let w = &g.window;
    (0..2).all(|axis| {
        let reach = |out: usize| -> Option<u64> {
            let last = (out.max(1) as u64 - 1).checked_mul(w.strides[axis] as u64)?;
            let span = (w.kernel[axis].max(1) as u64 - 1).checked_mul(w.dilations[axis] as u64)?;
            let pads = w.pads[axis] as u64 + w.pads[axis + 2] as u64;
            last.checked_add(span)?.checked_add(pads)?.checked_add(g.in_size[axis] as u64)
        };
        reach(g.out_size[axis]).is_some_and(|r| r <= i32::MAX as u64)
    })
}

/// Returns whether the convolution is depthwise with one output channel per input channel.
fn is_depthwise(g: &Geometry, groups: usize) -> bool {
    groups == g.in_channels && g.out_channels == g.in_channels
}

/// A depthwise convolution with one output channel per input channel. Each input plane is
/// quantized with one scale, since a window of a few taps would cost more to quantize than to
/// multiply. The quantized plane is a copy of the input, so the outputs may overwrite it.
struct Depthwise<'a> {
    geometry: &'a Geometry,
    weights: ConvI8<'a>,
    bias: Option<Bias<'a>>,
    activation: [f32; 2],
}

/// Maximum number of values in a padded plane of [`Depthwise`], padding included. Larger planes
/// keep f32 inputs. The plane takes twice this many bytes of stack, as a window does.
const MAX_PADDED_PLANE: usize = MAX_WINDOW;

/// One quantized input plane inside a border of zeros as wide as the padding, each value in 16
/// bits. Every tap of every output then reads inside the plane, so the outputs need no bounds of
/// their own, and the zeros add nothing to the exact integer sums.
struct Padded {
    values: [i16; MAX_PADDED_PLANE],
    /// Values per row: the input's width, the left padding, and as much right padding as the
    /// outputs reach.
    width: usize,
    /// Rows, counted likewise.
    height: usize,
    scale: f32,
}

impl Padded {
    /// Returns a plane of zeros for the geometry, or `None` when it exceeds
    /// [`MAX_PADDED_PLANE`]. The callers check `fits_isize` first.
    fn new(g: &Geometry) -> Option<Padded> {
        let w = &g.window;
        // The input starts after the leading padding, and the last output's last tap reads
        // `(out - 1) * stride + (kernel - 1) * dilation` in padded coordinates.
        let extent = |axis: usize| {
            let reach = g.out_size[axis].saturating_sub(1) * w.strides[axis] as usize
                + (w.kernel[axis] as usize).saturating_sub(1) * w.dilations[axis] as usize
                + 1;
            reach.max(w.pads[axis] as usize + g.in_size[axis])
        };
        let (height, width) = (extent(0), extent(1));
        if height.checked_mul(width)? > MAX_PADDED_PLANE {
            return None;
        }
        Some(Padded { values: [0; MAX_PADDED_PLANE], width, height, scale: 0.0 })
    }
}

impl Depthwise<'_> {
    /// Computes `y` from `x`. Returns false, computing nothing, for an empty input plane or one
    /// of more than [`MAX_PADDED_PLANE`] values with its padding.
    #[inline(never)]
    fn run(&self, x: &[f32], y: &mut [f32]) -> bool {
        let g = self.geometry;
        let (in_plane, out_plane) = (g.in_size[0] * g.in_size[1], g.out_size[0] * g.out_size[1]);
        if in_plane == 0 {
            return false;
        }
        if out_plane == 0 {
            return true;
        }
        let Some(mut plane) = Padded::new(g) else { return false };
        let planes = x.chunks_exact(in_plane).zip(y.chunks_exact_mut(out_plane));
        for (p, (input, output)) in planes.take(g.batch * g.in_channels).enumerate() {
            self.quantize(input, &mut plane);
            self.plane(&plane, p % g.in_channels, output);
        }
        true
    }

    /// Computes the convolution in the input's memory, which keeps its extents (strides 1).
    /// Returns false, computing nothing, as [`run`](Self::run) does.
    #[inline(never)]
    fn run_in_place(&self, xy: &mut [f32]) -> bool {
        let g = self.geometry;
        let size = g.in_size[0] * g.in_size[1];
        if size == 0 {
            return true;
        }
        let Some(mut plane) = Padded::new(g) else { return false };
        for (p, data) in xy.chunks_exact_mut(size).take(g.batch * g.in_channels).enumerate() {
            self.quantize(data, &mut plane);
            self.plane(&plane, p % g.in_channels, data);
        }
        true
    }

    /// Quantizes one input plane with one scale into the inside of `plane`'s border, which stays
    /// zero from [`Padded::new`].
    fn quantize(&self, input: &[f32], plane: &mut Padded) {
        let g = self.geometry;
        let (top, left) = (g.window.pads[0] as usize, g.window.pads[1] as usize);
        let scale = Scale::of(input.iter().copied());
        let rows = plane.values[top * plane.width..].chunks_exact_mut(plane.width);
        for (row, values) in rows.zip(input.chunks_exact(g.in_size[1])) {
            for (q, &v) in row[left..].iter_mut().zip(values) {
                *q = scale.quantize(v) as i16;
            }
        }
        plane.scale = scale.scale;
    }

    /// Computes the output plane of channel `c` from its quantized, padded input plane.
    fn plane(&self, plane: &Padded, c: usize, output: &mut [f32]) {
        let g = self.geometry;
        let w = &g.window;
        let ow = g.out_size[1];
        let (kh, kw) = (w.kernel[0] as usize, w.kernel[1] as usize);
        let taps = &self.weights.q[c * kh * kw..(c + 1) * kh * kw];
        let scale = plane.scale * self.weights.scales[c];
        let b = self.bias.map_or(0.0, |b| b.at(c));
        let (sy, sx) = (w.strides[0] as usize, w.strides[1] as usize);
        let (dy, dx) = (w.dilations[0] as usize, w.dilations[1] as usize);
        let width = plane.width;
        let values = &plane.values[..plane.height * width];
        // A 3x3 kernel at stride 1 along rows, the most common, keeps its taps in registers
        // and reads three rows side by side.
        if let (Ok(t), true) = (<&[i8; 9]>::try_from(taps), kw == 3 && dx == 1 && sx == 1) {
            let t = t.map(i32::from);
            // With the DSP extension the first two taps of each kernel row make one word, and
            // `SMLAD` multiplies them with two neighbouring values at once.
            #[cfg(edgefold_dsp)]
            let pairs = [pack(t[0], t[1]), pack(t[3], t[4]), pack(t[6], t[7])];
            for (oy, outputs) in output.chunks_exact_mut(ow).enumerate() {
                let first = oy * sy * width;
                let line = |ky: usize| &values[first + ky * dy * width..][..ow + 2];
                let (r0, r1, r2) = (line(0), line(1), line(2));
                for (x, out) in outputs.iter_mut().enumerate() {
                    #[cfg(edgefold_dsp)]
                    let row = |r: &[i16], pair: u32, last: i32| {
                        let values = pack(r[x] as i32, r[x + 1] as i32);
                        dsp::smlad(values, pair, r[x + 2] as i32 * last)
                    };
                    #[cfg(edgefold_dsp)]
                    let sum =
                        row(r0, pairs[0], t[2]) + row(r1, pairs[1], t[5]) + row(r2, pairs[2], t[8]);
                    #[cfg(not(edgefold_dsp))]
                    let row = |r: &[i16], t0: i32, t1: i32, t2: i32| {
                        r[x] as i32 * t0 + r[x + 1] as i32 * t1 + r[x + 2] as i32 * t2
                    };
                    #[cfg(not(edgefold_dsp))]
                    let sum = row(r0, t[0], t[1], t[2])
                        + row(r1, t[3], t[4], t[5])
                        + row(r2, t[6], t[7], t[8]);
                    *out = clamp(sum as f32 * scale + b, self.activation);
                }
            }
            return;
        }
        for (oy, outputs) in output.chunks_exact_mut(ow).enumerate() {
            for (ox, out) in outputs.iter_mut().enumerate() {
                let first = oy * sy * width + ox * sx;
                let mut sum = 0i32;
                for (ky, row) in taps.chunks_exact(kw).enumerate() {
                    let line = &values[first + ky * dy * width..];
                    for (&tap, &v) in row.iter().zip(line.iter().step_by(dx)) {
                        sum += v as i32 * tap as i32;
                    }
                }
                *out = clamp(sum as f32 * scale + b, self.activation);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    /// Returns a deterministic pseudo-random sequence in `[-1, 1)`.
    fn random(n: usize, seed: u64) -> std::vec::Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `values` quantized as a window is, with the scale.
    fn quantized(values: &[f32]) -> (std::vec::Vec<i32>, f32) {
        let largest = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
        let q = values.iter().map(|v| (v * inverse).round_ties_even() as i32).collect();
        (q, largest / 127.0)
    }

    #[test]
    fn window_rounds_ties_to_even() {
        // Largest 127 makes the inverse 1, so the values round as they are.
        let values = [0.5, 1.5, 2.5, -0.5, -1.5, 127.0, -126.5, 3.49, -127.0];
        let mut window = Window::new();
        assert!(window.fill(values.len(), || values.iter().copied()));
        let got: std::vec::Vec<i32> = (0..values.len()).map(|i| window.get(i)).collect();
        assert_eq!(got, [0, 2, 2, 0, -2, 127, -126, 3, -127]);
        assert_eq!(window.scale, 1.0);
    }

    #[test]
    fn window_scale_is_nan_for_non_finite_values() {
        let mut window = Window::new();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let values = [1.0, bad, -2.0];
            assert!(window.fill(3, || values.iter().copied()));
            assert!(window.scale.is_nan(), "{bad}");
        }
        let zeros = [0.0f32; 5];
        assert!(window.fill(5, || zeros.iter().copied()));
        assert_eq!((window.scale, window.dot(&Rows::new(&[1; 5], 5), 0)), (0.0, 0));
        assert!(!window.fill(MAX_WINDOW + 1, || core::iter::repeat(1.0)));
    }

    /// Checks `linear_rows` against exact integer sums of each quantized row, on every row length
    /// up to 70 and the longest, both parities of `n`, with and without a bias. Where
    /// `linear_int8_rows` has a kernel of its own, which quantizes the same way, it checks that too.
    #[test]
    fn linear_rows_match_reference() {
        // Miri interprets every operation, so it runs the lengths around a block of four.
        let lengths: std::vec::Vec<usize> = match cfg!(miri) {
            true => std::vec![1, 2, 3, 4, 5, 8, 9, 67],
            false => (1..=70).chain([MAX_WINDOW]).collect(),
        };
        for k in lengths {
            for (n, rows) in [(1, 1), (2, 3), (7, 2), (16, 5)] {
                let x = random(rows * k, (k * 31 + n) as u64);
                let q: std::vec::Vec<i8> =
                    random(n * k, k as u64 + 99).iter().map(|v| (v * 128.0) as i8).collect();
                let scales: std::vec::Vec<f32> = (0..n).map(|j| 0.003 * (j + 1) as f32).collect();
                let w = I8Rows { q: &q, scales: &scales, k };
                let bias = random(n, 5);
                for bias in [None, Some(&bias[..])] {
                    let mut y = std::vec![f32::NAN; rows * n];
                    assert!(linear_rows(&x, rows, &w, n, bias, &mut y));
                    for r in 0..rows {
                        let (qx, scale) = quantized(&x[r * k..(r + 1) * k]);
                        for j in 0..n {
                            let row = &q[j * k..(j + 1) * k];
                            let sum: i32 = qx.iter().zip(row).map(|(&a, &b)| a * b as i32).sum();
                            let b = bias.map_or(0.0, |b| b[j]) as f64;
                            let exact = sum as f64 * scale as f64 * scales[j] as f64 + b;
                            let got = y[r * n + j] as f64;
                            assert!(
                                (got - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                                "k {k}, n {n}, row {r}, output {j}: {got} against {exact}"
                            );
                        }
                    }
                    if crate::kernels::int8_row_products_supported() {
                        let mut simd = std::vec![f32::NAN; rows * n];
                        let weights = crate::kernels::Weights::I8(w);
                        crate::kernels::linear_int8_rows(&x, rows, k, weights, n, bias, &mut simd);
                        for (i, (&a, &b)) in y.iter().zip(&simd).enumerate() {
                            let limit = 1e-6 * b.abs().max(1.0);
                            assert!((a - b).abs() <= limit, "k {k}, n {n}: output {i}: {a}, {b}");
                        }
                    }
                }
            }
        }
        let q = std::vec![0i8; MAX_WINDOW + 1];
        let w = I8Rows { q: &q, scales: &[1.0], k: MAX_WINDOW + 1 };
        let x = std::vec![1.0; MAX_WINDOW + 1];
        let mut y = [f32::NAN];
        assert!(!linear_rows(&x, 1, &w, 1, None, &mut y));
        assert!(y[0].is_nan(), "a refused call wrote its output");
    }

    /// Every length from 1 to 70 and the longest window, against exact integer sums.
    #[test]
    fn dot_products_are_exact() {
        let mut window = Window::new();
        let lengths: std::vec::Vec<usize> = match cfg!(miri) {
            true => std::vec![1, 2, 3, 4, 5, 7, 8, 9, 66, MAX_WINDOW],
            false => (1..=70).chain([MAX_WINDOW - 1, MAX_WINDOW]).collect(),
        };
        for len in lengths {
            let x = random(len, len as u64);
            let (q, scale) = quantized(&x);
            assert!(window.fill(len, || x.iter().copied()));
            assert_eq!(window.scale, scale);
            // Extreme weights, including -128, check the sign extension of every byte.
            let a: std::vec::Vec<i8> = (0..len).map(|i| [-128, 127, -1, 1, 0, 93][i % 6]).collect();
            let b: std::vec::Vec<i8> =
                random(len, 7 + len as u64).iter().map(|v| (v * 127.5) as i8).collect();
            let exact = |w: &[i8]| q.iter().zip(w).map(|(&q, &w)| q * w as i32).sum::<i32>();
            // The rows once from the start of a buffer and once a byte further, where they do
            // not start at a multiple of 4 bytes.
            let mut buffer = std::vec![0i8; 1 + 2 * len];
            for offset in [0, 1] {
                buffer[offset..offset + len].copy_from_slice(&a);
                buffer[offset + len..offset + 2 * len].copy_from_slice(&b);
                let rows = Rows::new(&buffer[offset..offset + 2 * len], len);
                let what = format!("length {len}, offset {offset}");
                assert_eq!(window.dot2(&rows, 0, 1), [exact(&a), exact(&b)], "{what}");
                assert_eq!(window.dot2(&rows, 1, 0), [exact(&b), exact(&a)], "{what}");
                assert_eq!(window.dot(&rows, 1), exact(&b), "{what}");
            }
        }
    }
}
