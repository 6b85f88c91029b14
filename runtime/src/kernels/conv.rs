//! Portable convolution and pooling kernels over NCHW f32 tensors.
//!
//! Both walk the output one channel plane at a time. A convolution is computed weight by weight:
//! each tap adds `weight * input` to the output positions whose window covers an input position,
//! so the inner loop is a contiguous multiply-add along an output row whenever the stride is 1.
//! Positions in the padding contribute nothing, so no padded copy of the input is made.

use crate::ops::{PoolKind, Window2d};

/// Extents of a window op's NCHW input and output, and its window.
///
/// Callers pass slices of exactly `batch * in_channels * in_size[0] * in_size[1]` input and
/// `batch * out_channels * out_size[0] * out_size[1]` output elements, with `out_size` the
/// extents that [`Window2d::output_extent`] gives for `in_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Batch extent `N`.
    pub batch: usize,
    /// Input channels `C`.
    pub in_channels: usize,
    /// Input spatial extents `[H, W]`.
    pub in_size: [usize; 2],
    /// Output channels (`O` of a convolution, `C` of a pooling).
    pub out_channels: usize,
    /// Output spatial extents `[OH, OW]`.
    pub out_size: [usize; 2],
    /// Kernel, strides, padding and dilations.
    pub window: Window2d,
}

/// Convolution weights as stored: row-major `[O, C / groups * kh * kw]`, a row per output
/// channel, taps of one input channel in `(ky, kx)` order.
#[derive(Clone, Copy, Debug)]
pub enum ConvWeights<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE binary16 bits, widened to f32 exactly.
    F16(&'a [u16]),
    /// Int8 values with one f32 scale per output channel: `w = q * scale[o]`.
    I8 {
        /// Quantized values.
        q: &'a [i8],
        /// One scale per row.
        scales: &'a [f32],
    },
    /// Int4 values in groups along each row with one f16 scale per group. Without the
    /// `weights-int4` feature the kernels panic on these weights.
    I4(super::generic::I4Rows<'a>),
}

/// Convolution bias, one value per output channel.
#[derive(Clone, Copy, Debug)]
pub enum Bias<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// IEEE binary16 bits, widened to f32 exactly.
    F16(&'a [u16]),
}

impl Bias<'_> {
    /// The bias of output channel `o`.
    #[inline]
    pub(super) fn at(&self, o: usize) -> f32 {
        match self {
            Bias::F32(b) => b[o],
            Bias::F16(b) => half::f16::from_bits(b[o]).to_f32(),
        }
    }
}

impl ConvWeights<'_> {
    /// Weight `index` of row `row`, where rows are `row_len` long, as f32.
    ///
    /// The kernels turn each weight into f32 once per tap, outside their inner loops, so one code
    /// path serves every storage type at little cost (and a third of the code size).
    #[inline]
    fn tap(&self, row: usize, index: usize, row_len: usize) -> f32 {
        let at = row * row_len + index;
        match *self {
            ConvWeights::F32(w) => w[at],
            ConvWeights::F16(w) => half::f16::from_bits(w[at]).to_f32(),
            ConvWeights::I8 { q, scales } => q[at] as f32 * scales[row],
            #[cfg(feature = "weights-int4")]
            ConvWeights::I4(w) => i4_at(&w, row, index),
            #[cfg(not(feature = "weights-int4"))]
            ConvWeights::I4(_) => super::int4_not_built(),
        }
    }

    /// Writes weights `start..start + out.len()` of row `row` as f32, with the values of
    /// [`tap`](Self::tap) but one dispatch on the storage for all of them.
    fn fill(&self, row: usize, start: usize, row_len: usize, out: &mut [f32]) {
        let at = row * row_len + start;
        let end = at + out.len();
        match *self {
            ConvWeights::F32(w) => out.copy_from_slice(&w[at..end]),
            ConvWeights::F16(w) => {
                for (o, &bits) in out.iter_mut().zip(&w[at..end]) {
                    *o = half::f16::from_bits(bits).to_f32();
                }
            }
            ConvWeights::I8 { q, scales } => {
                let scale = scales[row];
                for (o, &v) in out.iter_mut().zip(&q[at..end]) {
                    *o = v as f32 * scale;
                }
            }
            #[cfg(feature = "weights-int4")]
            ConvWeights::I4(w) => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = i4_at(&w, row, start + i);
                }
            }
            #[cfg(not(feature = "weights-int4"))]
            ConvWeights::I4(_) => super::int4_not_built(),
        }
    }
}

/// Weight `index` of row `row` of int4 rows.
#[cfg(feature = "weights-int4")]
#[inline]
fn i4_at(w: &super::generic::I4Rows<'_>, row: usize, index: usize) -> f32 {
    let mut value = [0f32];
    super::generic::WeightRows::fill(w, row, index, &mut value);
    value[0]
}

/// Weights that the kernels in place turn into f32 at once, in a buffer on the stack.
const TAP_CHUNK: usize = 64;

/// 2-D convolution: `y[n, o] = clamp(bias[o] + Σ w[o, ci, ky, kx] * x[n, g * C/groups + ci, ..])`
/// over the taps that fall inside the input, with `g` the group of output channel `o`.
///
/// `activation` is `[min, max]` of the fused clamp; a NaN sum stays NaN.
pub fn conv2d_nchw_f32(
    x: &[f32],
    geometry: &Geometry,
    groups: usize,
    weights: ConvWeights<'_>,
    bias: Option<Bias<'_>>,
    activation: [f32; 2],
    y: &mut [f32],
) {
    let (g, taps) = (geometry, &weights);
    let w = &g.window;
    let ([ih, iw], [oh, ow]) = (g.in_size, g.out_size);
    let (in_plane, out_plane) = (ih * iw, oh * ow);
    let (kh, kw) = (w.kernel[0] as usize, w.kernel[1] as usize);
    let channels_per_group = g.in_channels / groups;
    let outputs_per_group = g.out_channels / groups;
    let row_len = channels_per_group * kh * kw;
    let pointwise = kh == 1 && kw == 1 && w.strides == [1, 1] && w.pads == [0; 4];
    debug_assert_eq!(x.len(), g.batch * g.in_channels * in_plane);
    debug_assert_eq!(y.len(), g.batch * g.out_channels * out_plane);

    for n in 0..g.batch {
        for o in 0..g.out_channels {
            let first_channel = n * g.in_channels + (o / outputs_per_group) * channels_per_group;
            let dst = &mut y[(n * g.out_channels + o) * out_plane..][..out_plane];
            dst.fill(0.0);
            for ci in 0..channels_per_group {
                let src = &x[(first_channel + ci) * in_plane..][..in_plane];
                if pointwise {
                    axpy(dst, taps.tap(o, ci, row_len), src);
                    continue;
                }
                for ky in 0..kh {
                    let offset_y = tap_offset(w, 0, ky);
                    let (y0, y1) = covered(oh, ih, w.strides[0] as usize, offset_y);
                    for kx in 0..kw {
                        let offset_x = tap_offset(w, 1, kx);
                        let (x0, x1) = covered(ow, iw, w.strides[1] as usize, offset_x);
                        if y0 == y1 || x0 == x1 {
                            continue;
                        }
                        let weight = taps.tap(o, (ci * kh + ky) * kw + kx, row_len);
                        for oy in y0..y1 {
                            let iy = (oy as i64 * w.strides[0] as i64 + offset_y) as usize;
                            let ix0 = (x0 as i64 * w.strides[1] as i64 + offset_x) as usize;
                            let in_row = &src[iy * iw..(iy + 1) * iw];
                            let out_row = &mut dst[oy * ow + x0..oy * ow + x1];
                            add_row(out_row, weight, in_row, ix0, w.strides[1] as usize);
                        }
                    }
                }
            }
            let b = bias.map_or(0.0, |b| b.at(o));
            for v in dst.iter_mut() {
                *v = clamp(*v + b, activation);
            }
        }
    }
}

/// Scratch elements that [`conv2d_nchw_f32_in_place`] needs for an input of `channels` planes
/// of `[H, W]`: `C` for a 1x1 kernel (one input pixel), otherwise `(min(pad_top, H) + 1) * W`
/// (the input rows that later output rows still read after their own output row was written,
/// and one output row). Returns `None` on overflow.
pub fn in_place_scratch_len(window: &Window2d, channels: usize, size: [usize; 2]) -> Option<usize> {
    if window.kernel == [1, 1] {
        Some(channels)
    } else {
        kept_rows(window, size[0]).checked_add(1)?.checked_mul(size[1])
    }
}

/// Input rows that an in-place depthwise convolution keeps: output row `oy` reads input rows
/// from `oy - pad_top` on, and rows above the input do not exist.
fn kept_rows(window: &Window2d, height: usize) -> usize {
    (window.pads[0] as usize).min(height)
}

/// The convolution of [`conv2d_nchw_f32`] computed in the input's memory: `xy` holds the input
/// on entry and the output on return. Results are bit-identical to [`conv2d_nchw_f32`].
///
/// Two cases are supported, both with `O == C`, equal input and output extents and strides 1:
/// - a 1x1 kernel without padding, any `groups`. Blocks of `scratch.len() / C` pixels are copied
///   to `scratch` and their outputs written over them;
/// - a depthwise convolution (`groups == C`) of any kernel, padding and dilation. Each output
///   row is computed in `scratch`, and the input rows that later output rows still read (up to
///   `pad_top` rows above the current one) are kept in `scratch` too.
///
/// `scratch` must hold at least [`in_place_scratch_len`] elements; the caller checks the rest.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_nchw_f32_in_place(
    xy: &mut [f32],
    geometry: &Geometry,
    groups: usize,
    weights: ConvWeights<'_>,
    bias: Option<Bias<'_>>,
    activation: [f32; 2],
    scratch: &mut [f32],
) {
    let call = InPlace { geometry, groups, bias, activation };
    call.run(xy, &weights, scratch);
}

/// Parameters of one in-place convolution.
struct InPlace<'a> {
    geometry: &'a Geometry,
    groups: usize,
    bias: Option<Bias<'a>>,
    activation: [f32; 2],
}

impl InPlace<'_> {
    fn run(&self, xy: &mut [f32], taps: &ConvWeights<'_>, scratch: &mut [f32]) {
        let g = self.geometry;
        debug_assert_eq!(g.in_size, g.out_size);
        debug_assert_eq!(g.in_channels, g.out_channels);
        debug_assert_eq!(g.window.strides, [1, 1]);
        if g.window.kernel == [1, 1] {
            self.pointwise(xy, taps, scratch);
        } else {
            self.depthwise(xy, taps, scratch);
        }
    }

    /// Adds the bias and clamps.
    #[inline]
    fn finish(&self, o: usize, values: &mut [f32]) {
        let b = self.bias.map_or(0.0, |b| b.at(o));
        for v in values.iter_mut() {
            *v = clamp(*v + b, self.activation);
        }
    }

    fn pointwise(&self, xy: &mut [f32], taps: &ConvWeights<'_>, scratch: &mut [f32]) {
        let g = self.geometry;
        let channels = g.in_channels;
        let plane = g.in_size[0] * g.in_size[1];
        let per_group = channels / self.groups;
        let block = (scratch.len() / channels).min(plane).max(1);
        for sample in xy.chunks_exact_mut(channels * plane).take(g.batch) {
            let mut start = 0;
            while start < plane {
                let len = block.min(plane - start);
                // Every output pixel of the block reads only the input pixel at its own place, so
                // once the block's inputs are copied out its outputs can overwrite them.
                for c in 0..channels {
                    let from = &sample[c * plane + start..][..len];
                    scratch[c * len..(c + 1) * len].copy_from_slice(from);
                }
                let mut weights = [0f32; TAP_CHUNK];
                for o in 0..channels {
                    let first = (o / per_group) * per_group;
                    let dst = &mut sample[o * plane + start..][..len];
                    dst.fill(0.0);
                    let inputs = &scratch[first * len..(first + per_group) * len];
                    for (chunk, sources) in inputs.chunks(TAP_CHUNK * len).enumerate() {
                        let weights = &mut weights[..sources.len() / len];
                        taps.fill(o, chunk * TAP_CHUNK, per_group, weights);
                        accumulate(dst, weights, sources);
                    }
                    self.finish(o, dst);
                }
                start += len;
            }
        }
    }

    fn depthwise(&self, xy: &mut [f32], taps: &ConvWeights<'_>, scratch: &mut [f32]) {
        let g = self.geometry;
        let w = &g.window;
        let [height, width] = g.in_size;
        let (kh, kw) = (w.kernel[0] as usize, w.kernel[1] as usize);
        // Output row `oy` reads input rows from `oy - pad_top` on, so the `keep` rows above it are
        // kept in a ring before their output rows overwrite them.
        let keep = kept_rows(w, height);
        let (ring, row) = scratch.split_at_mut(keep * width);
        let row = &mut row[..width];
        let planes = g.batch * g.in_channels;
        // A plane's taps are turned into f32 once when they fit the stack buffer.
        let kernel_taps = kh * kw;
        let mut cache = [0f32; TAP_CHUNK];
        let cached = kernel_taps <= TAP_CHUNK;
        // So are the output columns `[x0, x1)` that each kernel column covers, with the input
        // column of `x0`: with stride 1 they need no division, and they are the same on every
        // row.
        let columns = |kx: usize| {
            let offset = tap_offset(w, 1, kx);
            let x0 = (-offset).clamp(0, width as i64);
            let x1 = (width as i64 - offset).clamp(x0, width as i64);
            (x0 as usize, x1 as usize, (x0 + offset) as usize)
        };
        let mut column_cache = [(0usize, 0usize, 0usize); TAP_CHUNK];
        let columns_cached = kw <= TAP_CHUNK;
        if columns_cached {
            for (kx, c) in column_cache[..kw].iter_mut().enumerate() {
                *c = columns(kx);
            }
        }
        for (p, data) in xy.chunks_exact_mut(height * width).take(planes).enumerate() {
            let o = p % g.in_channels;
            if cached {
                taps.fill(o, 0, kernel_taps, &mut cache[..kernel_taps]);
            }
            for oy in 0..height {
                row.fill(0.0);
                for ky in 0..kh {
                    let iy = oy as i64 + tap_offset(w, 0, ky);
                    if iy < 0 || iy >= height as i64 {
                        continue;
                    }
                    let iy = iy as usize;
                    let in_row = if iy < oy {
                        &ring[(iy % keep) * width..][..width]
                    } else {
                        &data[iy * width..][..width]
                    };
                    for kx in 0..kw {
                        let (x0, x1, ix0) = match column_cache.get(kx) {
                            Some(&cached) if columns_cached => cached,
                            _ => columns(kx),
                        };
                        if x0 == x1 {
                            continue;
                        }
                        let tap = ky * kw + kx;
                        let weight =
                            if cached { cache[tap] } else { taps.tap(o, tap, kernel_taps) };
                        axpy(&mut row[x0..x1], weight, &in_row[ix0..ix0 + (x1 - x0)]);
                    }
                }
                let current = &mut data[oy * width..][..width];
                if keep > 0 {
                    ring[(oy % keep) * width..][..width].copy_from_slice(current);
                }
                current.copy_from_slice(row);
                self.finish(o, current);
            }
        }
    }
}

/// `dst[p] += weights[c] * sources[c * len + p]` for each `c` in order, `len = dst.len()`.
///
/// Four input channels share each pass over `dst`, and each element still adds their products
/// one at a time in channel order, so the sums round exactly as with one [`axpy`] per channel.
fn accumulate(dst: &mut [f32], weights: &[f32], sources: &[f32]) {
    let len = dst.len();
    let mut weights = weights.chunks_exact(4);
    let mut sources = sources.chunks_exact(4 * len);
    for (w, s) in (&mut weights).zip(&mut sources) {
        let (s0, rest) = s.split_at(len);
        let (s1, rest) = rest.split_at(len);
        let (s2, s3) = rest.split_at(len);
        for (((d, &a), (&b, &c)), &e) in dst.iter_mut().zip(s0).zip(s1.iter().zip(s2)).zip(s3) {
            let mut sum = *d;
            sum += w[0] * a;
            sum += w[1] * b;
            sum += w[2] * c;
            sum += w[3] * e;
            *d = sum;
        }
    }
    for (&w, s) in weights.remainder().iter().zip(sources.remainder().chunks_exact(len)) {
        axpy(dst, w, s);
    }
}

/// Input offset of tap `tap` along `axis`: output position `o` reads `o * stride + offset`.
pub(super) fn tap_offset(w: &Window2d, axis: usize, tap: usize) -> i64 {
    tap as i64 * w.dilations[axis] as i64 - w.pads[axis] as i64
}

/// Output positions `[first, end)` of an axis of extent `out` whose input position
/// `o * stride + offset` lies in `0..input`.
fn covered(out: usize, input: usize, stride: usize, offset: i64) -> (usize, usize) {
    let (input, stride) = (input as i64, stride as i64);
    let first = if offset >= 0 { 0 } else { (stride - 1 - offset) / stride };
    let end = if input <= offset { 0 } else { (input - offset + stride - 1) / stride };
    let end = end.min(out as i64);
    let first = first.min(end);
    (first as usize, end as usize)
}

/// `dst[i] += weight * src[start + i * stride]`.
#[inline]
fn add_row(dst: &mut [f32], weight: f32, src: &[f32], start: usize, stride: usize) {
    if stride == 1 {
        axpy(dst, weight, &src[start..start + dst.len()]);
    } else {
        for (i, d) in dst.iter_mut().enumerate() {
            *d += weight * src[start + i * stride];
        }
    }
}

/// `dst[i] += a * src[i]`.
// Always inlined: it is the inner loop of every convolution, and a call per row would cost more
// than the row's work on short rows (keyword spotting's are 5 wide).
#[inline(always)]
fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += a * s;
    }
}

/// Clamps to `[min, max]` without the panics of `f32::clamp`; NaN stays NaN.
#[inline]
pub(super) fn clamp(v: f32, [min, max]: [f32; 2]) -> f32 {
    let low = if v < min { min } else { v };
    if low > max {
        max
    } else {
        low
    }
}

/// Taps of one output position along one axis: the in-input taps `[first, end)` and how many
/// taps lie in the input or its padding.
#[derive(Clone, Copy)]
struct TapRange {
    first: usize,
    end: usize,
    padded: usize,
}

fn tap_range(w: &Window2d, axis: usize, out_pos: usize, input: usize) -> TapRange {
    let (stride, dilation) = (w.strides[axis] as i64, w.dilations[axis] as i64);
    let kernel = w.kernel[axis] as i64;
    let start = out_pos as i64 * stride - w.pads[axis] as i64;
    // Number of taps j >= 0 with start + j * dilation < limit.
    let below = |limit: i64| {
        if limit <= start {
            0
        } else {
            ((limit - start + dilation - 1) / dilation).min(kernel)
        }
    };
    let first = if start >= 0 { 0 } else { ((-start + dilation - 1) / dilation).min(kernel) };
    let end = below(input as i64).max(first);
    let padded = below(input as i64 + w.pads[axis + 2] as i64);
    TapRange { first: first as usize, end: end as usize, padded: padded as usize }
}

/// Average or max pooling of each channel plane. `geometry.out_channels` equals
/// `in_channels`, and `out_size` comes from [`Window2d::output_extent`] with the same
/// `ceil_mode` as the op.
///
/// An average divides the sum of the in-input taps by their count, or with `count_include_pad`
/// by the count of taps in the input or its padding (taps past the padding, which ceil mode can
/// create, never count). A window without in-input taps gives 0 for an average and negative
/// infinity for a max. Max skips NaN taps, like [`ReduceKind::Max`](crate::ops::ReduceKind).
pub fn pool2d_nchw_f32(
    kind: PoolKind,
    x: &[f32],
    geometry: &Geometry,
    count_include_pad: bool,
    y: &mut [f32],
) {
    let w = &geometry.window;
    let ([ih, iw], [oh, ow]) = (geometry.in_size, geometry.out_size);
    let (dh, dw) = (w.dilations[0] as i64, w.dilations[1] as i64);
    let planes = geometry.batch * geometry.in_channels;
    debug_assert_eq!(x.len(), planes * ih * iw);
    debug_assert_eq!(y.len(), planes * oh * ow);

    for (src, dst) in x.chunks_exact(ih * iw).zip(y.chunks_exact_mut(oh * ow)).take(planes) {
        for oy in 0..oh {
            let ty = tap_range(w, 0, oy, ih);
            let row0 = oy as i64 * w.strides[0] as i64 - w.pads[0] as i64;
            for ox in 0..ow {
                let tx = tap_range(w, 1, ox, iw);
                let col0 = ox as i64 * w.strides[1] as i64 - w.pads[1] as i64;
                let at = |j: usize, i: usize| {
                    let iy = (row0 + j as i64 * dh) as usize;
                    let ix = (col0 + i as i64 * dw) as usize;
                    src[iy * iw + ix]
                };
                dst[oy * ow + ox] = match kind {
                    PoolKind::Average => {
                        let mut sum = 0.0f32;
                        for j in ty.first..ty.end {
                            for i in tx.first..tx.end {
                                sum += at(j, i);
                            }
                        }
                        let count = if count_include_pad {
                            ty.padded * tx.padded
                        } else {
                            (ty.end - ty.first) * (tx.end - tx.first)
                        };
                        if count == 0 {
                            0.0
                        } else {
                            sum / count as f32
                        }
                    }
                    PoolKind::Max => {
                        let mut max = f32::NEG_INFINITY;
                        for j in ty.first..ty.end {
                            for i in tx.first..tx.end {
                                let v = at(j, i);
                                if v > max {
                                    max = v;
                                }
                            }
                        }
                        max
                    }
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::super::integer::{conv2d_nchw_int8, conv2d_nchw_int8_in_place, ConvI8};
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// Deterministic values in [-1, 1) from a 64-bit xorshift.
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[derive(Clone, Copy, Debug)]
    struct Case {
        batch: usize,
        channels: usize,
        size: [usize; 2],
        outputs: usize,
        groups: usize,
        window: Window2d,
    }

    fn window(
        kernel: [u32; 2],
        strides: [u32; 2],
        pads: [u32; 4],
        dilations: [u32; 2],
    ) -> Window2d {
        Window2d { kernel, strides, pads, dilations }
    }

    fn out_size(w: &Window2d, size: [usize; 2], ceil_mode: bool) -> [usize; 2] {
        let extent = |axis| w.output_extent(axis, size[axis] as u64, ceil_mode).unwrap() as usize;
        [extent(0), extent(1)]
    }

    fn geometry(c: &Case, ceil_mode: bool) -> Geometry {
        Geometry {
            batch: c.batch,
            in_channels: c.channels,
            in_size: c.size,
            out_channels: c.outputs,
            out_size: out_size(&c.window, c.size, ceil_mode),
            window: c.window,
        }
    }

    /// Input position of tap `j` for output position `o` along `axis`, if inside the input.
    fn position(w: &Window2d, axis: usize, o: usize, j: usize, input: usize) -> Option<usize> {
        let p = o as i64 * w.strides[axis] as i64 + j as i64 * w.dilations[axis] as i64
            - w.pads[axis] as i64;
        (0..input as i64).contains(&p).then_some(p as usize)
    }

    /// Convolution straight from the definition, accumulated in f64.
    fn reference_conv(c: &Case, x: &[f32], w: &[f32], bias: &[f32], act: [f32; 2]) -> Vec<f32> {
        let [oh, ow] = out_size(&c.window, c.size, false);
        let [ih, iw] = c.size;
        let (kh, kw) = (c.window.kernel[0] as usize, c.window.kernel[1] as usize);
        let cpg = c.channels / c.groups;
        let opg = c.outputs / c.groups;
        let mut y = vec![0.0; c.batch * c.outputs * oh * ow];
        for n in 0..c.batch {
            for o in 0..c.outputs {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut sum = bias[o] as f64;
                        for ci in 0..cpg {
                            let channel = (o / opg) * cpg + ci;
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = position(&c.window, 0, oy, ky, ih);
                                    let ix = position(&c.window, 1, ox, kx, iw);
                                    let (Some(iy), Some(ix)) = (iy, ix) else { continue };
                                    let xv = x[((n * c.channels + channel) * ih + iy) * iw + ix];
                                    let wv = w[((o * cpg + ci) * kh + ky) * kw + kx];
                                    sum += xv as f64 * wv as f64;
                                }
                            }
                        }
                        let v = (sum as f32).max(act[0]).min(act[1]);
                        y[((n * c.outputs + o) * oh + oy) * ow + ox] = v;
                    }
                }
            }
        }
        y
    }

    fn assert_close(ours: &[f32], reference: &[f32], tolerance: f32, what: &str) {
        assert_eq!(ours.len(), reference.len(), "{what}: lengths differ");
        for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
            let limit = tolerance * b.abs().max(1.0);
            assert!((a - b).abs() <= limit, "{what}: element {i} is {a}, expected {b}");
        }
    }

    fn conv_cases() -> Vec<(&'static str, Case)> {
        let case = |batch, channels, size, outputs, groups, window| Case {
            batch,
            channels,
            size,
            outputs,
            groups,
            window,
        };
        let mut cases = vec![
            ("pointwise", case(1, 5, [3, 7], 4, 1, window([1, 1], [1, 1], [0; 4], [1, 1]))),
            ("3x3 same", case(1, 3, [6, 5], 2, 1, window([3, 3], [1, 1], [1; 4], [1, 1]))),
            ("strided odd", case(2, 3, [9, 7], 5, 1, window([3, 2], [2, 3], [1, 0, 2, 1], [1, 1]))),
            ("dilated", case(1, 2, [11, 8], 3, 1, window([3, 3], [1, 2], [2, 1, 2, 0], [2, 3]))),
            ("depthwise", case(2, 6, [5, 5], 6, 6, window([3, 3], [1, 1], [1; 4], [1, 1]))),
            ("grouped", case(1, 6, [7, 4], 4, 2, window([2, 3], [1, 1], [0, 1, 1, 1], [1, 1]))),
            (
                "channel multiplier",
                case(1, 3, [4, 6], 6, 3, window([3, 1], [2, 1], [1; 4], [1, 1])),
            ),
            ("kernel over input", case(1, 2, [2, 3], 2, 1, window([5, 4], [1, 2], [3; 4], [1, 1]))),
            ("strided pointwise", case(1, 4, [5, 6], 3, 1, window([1, 1], [2, 2], [0; 4], [1, 1]))),
            (
                "kws first layer",
                case(1, 1, [49, 10], 8, 1, window([10, 4], [2, 2], [4, 1, 5, 1], [1, 1])),
            ),
            (
                "single tap row",
                case(1, 2, [1, 9], 2, 2, window([1, 3], [1, 1], [0, 1, 0, 1], [1, 2])),
            ),
        ];
        // Miri interprets every operation, so it runs only the cases that cover the kernel's
        // branches: pointwise, padded, strided, depthwise and a kernel longer than the input.
        if cfg!(miri) {
            let covering =
                ["pointwise", "3x3 same", "strided odd", "depthwise", "kernel over input"];
            cases.retain(|(name, _)| covering.contains(name));
        }
        cases
    }

    #[test]
    fn conv2d_f32_matches_reference() {
        for (seed, (name, c)) in conv_cases().into_iter().enumerate() {
            let g = geometry(&c, false);
            let row = c.channels / c.groups * (c.window.kernel[0] * c.window.kernel[1]) as usize;
            let x = random(c.batch * c.channels * c.size[0] * c.size[1], seed as u64 + 1);
            let w = random(c.outputs * row, seed as u64 + 100);
            let bias = random(c.outputs, seed as u64 + 200);
            let mut y = vec![f32::NAN; c.batch * c.outputs * g.out_size[0] * g.out_size[1]];
            let act = [f32::NEG_INFINITY, f32::INFINITY];
            conv2d_nchw_f32(
                &x,
                &g,
                c.groups,
                ConvWeights::F32(&w),
                Some(Bias::F32(&bias)),
                act,
                &mut y,
            );
            assert_close(&y, &reference_conv(&c, &x, &w, &bias, act), 1e-5, name);
        }
    }

    #[test]
    fn conv2d_fused_activation_clamps() {
        let (name, c) = conv_cases()[2];
        let g = geometry(&c, false);
        let row = c.channels / c.groups * 6;
        let x = random(c.batch * c.channels * 63, 7);
        let w: Vec<f32> = random(c.outputs * row, 8).iter().map(|v| v * 4.0).collect();
        let mut y = vec![0.0; c.batch * c.outputs * g.out_size[0] * g.out_size[1]];
        let relu6 = [0.0, 6.0];
        conv2d_nchw_f32(&x, &g, c.groups, ConvWeights::F32(&w), None, relu6, &mut y);
        let zeros = vec![0.0; c.outputs];
        assert_close(&y, &reference_conv(&c, &x, &w, &zeros, relu6), 1e-5, name);
        assert!(y.contains(&0.0), "no value was clamped at 0");
        assert!(y.contains(&6.0), "no value was clamped at 6");
    }

    #[test]
    fn conv2d_int8_and_f16_weights_match_dequantized() {
        for (seed, (name, c)) in conv_cases().into_iter().enumerate() {
            let g = geometry(&c, false);
            let row = c.channels / c.groups * (c.window.kernel[0] * c.window.kernel[1]) as usize;
            let x = random(c.batch * c.channels * c.size[0] * c.size[1], seed as u64 + 300);
            let raw = random(c.outputs * row, seed as u64 + 400);
            let q: Vec<i8> = raw.iter().map(|v| (v * 127.0) as i8).collect();
            let scales: Vec<f32> = (0..c.outputs).map(|o| 0.01 * (o + 1) as f32).collect();
            let dequantized: Vec<f32> =
                q.iter().enumerate().map(|(i, &v)| v as f32 * scales[i / row]).collect();
            let bias = vec![0.5; c.outputs];
            let act = [f32::NEG_INFINITY, f32::INFINITY];
            let expected = reference_conv(&c, &x, &dequantized, &bias, act);
            let mut y = vec![f32::NAN; expected.len()];
            let weights = ConvWeights::I8 { q: &q, scales: &scales };
            conv2d_nchw_f32(&x, &g, c.groups, weights, Some(Bias::F32(&bias)), act, &mut y);
            assert_close(&y, &expected, 1e-5, name);

            let bits: Vec<u16> = raw.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let widened: Vec<f32> =
                bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
            let expected = reference_conv(&c, &x, &widened, &bias, act);
            conv2d_nchw_f32(
                &x,
                &g,
                c.groups,
                ConvWeights::F16(&bits),
                Some(Bias::F32(&bias)),
                act,
                &mut y,
            );
            assert_close(&y, &expected, 1e-5, name);
        }
    }

    #[test]
    fn conv2d_int4_weights_match_dequantized() {
        let mut tested = 0;
        for (seed, (name, c)) in conv_cases().into_iter().enumerate() {
            let g = geometry(&c, false);
            let row = c.channels / c.groups * (c.window.kernel[0] * c.window.kernel[1]) as usize;
            // Groups are even and divide the row; odd rows cannot be grouped.
            let Some(group) = (2..=8).rev().step_by(2).find(|d| row.is_multiple_of(*d)) else {
                continue;
            };
            let x = random(c.batch * c.channels * c.size[0] * c.size[1], seed as u64 + 500);
            let q: Vec<i8> = random(c.outputs * row, seed as u64 + 600)
                .iter()
                .map(|v| ((v * 8.0) as i8).clamp(-8, 7))
                .collect();
            let groups_per_row = row / group;
            let scales: Vec<u16> = (0..c.outputs * groups_per_row)
                .map(|i| half::f16::from_f32(0.01 * (i % 7 + 1) as f32).to_bits())
                .collect();
            let row_bytes = row.div_ceil(2);
            let mut packed = vec![0u8; c.outputs * row_bytes];
            for (i, &v) in q.iter().enumerate() {
                let (r, col) = (i / row, i % row);
                let nibble = (v as u8) & 0x0F;
                packed[r * row_bytes + col / 2] |= if col % 2 == 0 { nibble } else { nibble << 4 };
            }
            let dequantized: Vec<f32> = q
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let scale = scales[(i / row) * groups_per_row + (i % row) / group];
                    v as f32 * half::f16::from_bits(scale).to_f32()
                })
                .collect();
            let bias = vec![-0.25; c.outputs];
            let act = [f32::NEG_INFINITY, f32::INFINITY];
            let expected = reference_conv(&c, &x, &dequantized, &bias, act);
            let mut y = vec![f32::NAN; expected.len()];
            let rows = super::super::generic::I4Rows {
                packed: &packed,
                scales: &scales,
                mins: None,
                k: row,
                group,
            };
            conv2d_nchw_f32(
                &x,
                &g,
                c.groups,
                ConvWeights::I4(rows),
                Some(Bias::F32(&bias)),
                act,
                &mut y,
            );
            assert_close(&y, &expected, 1e-5, name);

            let bias_bits: Vec<u16> = (0..c.outputs)
                .map(|o| half::f16::from_f32(0.3 - 0.1 * o as f32).to_bits())
                .collect();
            let widened: Vec<f32> =
                bias_bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
            let expected = reference_conv(&c, &x, &dequantized, &widened, act);
            let f16_bias = Some(Bias::F16(&bias_bits));
            conv2d_nchw_f32(&x, &g, c.groups, ConvWeights::I4(rows), f16_bias, act, &mut y);
            assert_close(&y, &expected, 1e-5, name);
            tested += 1;
        }
        // Under Miri, fewer cases run (see `conv_cases`).
        let minimum = if cfg!(miri) { 1 } else { 3 };
        assert!(tested >= minimum, "only {tested} cases have even rows");
    }

    /// Convolutions that keep their extents and channels, so they can run in place.
    fn in_place_cases() -> Vec<(&'static str, Case)> {
        let case = |batch, channels, size, groups, window| Case {
            batch,
            channels,
            size,
            outputs: channels,
            groups,
            window,
        };
        let dense = |kernel, pads, dilations| window(kernel, [1, 1], pads, dilations);
        let mut cases = vec![
            ("pointwise", case(2, 5, [3, 7], 1, dense([1, 1], [0; 4], [1, 1]))),
            ("pointwise grouped", case(1, 6, [4, 4], 3, dense([1, 1], [0; 4], [1, 1]))),
            ("pointwise depthwise", case(1, 4, [2, 5], 4, dense([1, 1], [0; 4], [1, 1]))),
            ("kws depthwise", case(1, 8, [25, 5], 8, dense([3, 3], [1; 4], [1, 1]))),
            ("depthwise batch", case(3, 2, [6, 4], 2, dense([3, 3], [1; 4], [1, 1]))),
            ("tall kernel", case(1, 3, [7, 5], 3, dense([5, 3], [2, 1, 2, 1], [1, 1]))),
            ("dilated", case(1, 2, [9, 6], 2, dense([3, 3], [2, 1, 2, 1], [2, 1]))),
            ("causal rows", case(1, 2, [5, 4], 2, dense([3, 3], [0, 1, 2, 1], [1, 1]))),
            ("rows above only", case(1, 2, [5, 4], 2, dense([3, 3], [2, 1, 0, 1], [1, 1]))),
            ("padding over height", case(1, 2, [2, 3], 2, dense([5, 1], [4, 0, 0, 0], [1, 1]))),
            ("single row kernel", case(2, 3, [4, 6], 3, dense([1, 3], [0, 1, 0, 1], [1, 1]))),
            ("one row input", case(1, 2, [1, 6], 2, dense([3, 3], [1; 4], [1, 1]))),
            ("wide rows", case(1, 2, [4, 19], 2, dense([3, 3], [1, 2, 1, 2], [1, 2]))),
            ("narrow dilated", case(1, 2, [4, 7], 2, dense([3, 3], [1, 2, 1, 2], [1, 2]))),
            ("kernel over row", case(1, 2, [3, 4], 2, dense([3, 5], [1, 3, 1, 1], [1, 1]))),
        ];
        // Miri interprets every operation, so it runs the small cases that cover each path:
        // pointwise blocks, kept rows above, dilation, causal padding and a batch.
        if cfg!(miri) {
            let covering =
                ["pointwise grouped", "depthwise batch", "dilated", "causal rows", "one row input"];
            cases.retain(|(name, _)| covering.contains(name));
        }
        cases
    }

    #[test]
    fn in_place_conv_is_bit_identical() {
        for (seed, (name, c)) in in_place_cases().into_iter().enumerate() {
            let g = geometry(&c, false);
            assert_eq!(g.out_size, c.size, "{name}: the case changes the extents");
            let row = c.channels / c.groups * (c.window.kernel[0] * c.window.kernel[1]) as usize;
            let x = random(c.batch * c.channels * c.size[0] * c.size[1], seed as u64 + 600);
            let raw = random(c.outputs * row, seed as u64 + 700);
            let q: Vec<i8> = raw.iter().map(|v| (v * 127.0) as i8).collect();
            let scales: Vec<f32> = (0..c.outputs).map(|o| 0.02 * (o + 1) as f32).collect();
            let bits: Vec<u16> = raw.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let bias = random(c.outputs, seed as u64 + 800);
            let needed = in_place_scratch_len(&c.window, c.channels, c.size).unwrap();
            let all_weights = [
                ("f32", ConvWeights::F32(&raw)),
                ("f16", ConvWeights::F16(&bits)),
                ("int8", ConvWeights::I8 { q: &q, scales: &scales }),
            ];
            for (storage, weights) in all_weights {
                for act in [[f32::NEG_INFINITY, f32::INFINITY], [0.0, 0.5]] {
                    let mut expected = vec![f32::NAN; x.len()];
                    conv2d_nchw_f32(
                        &x,
                        &g,
                        c.groups,
                        weights,
                        Some(Bias::F32(&bias)),
                        act,
                        &mut expected,
                    );
                    let extras: &[usize] =
                        if cfg!(miri) { &[0, needed] } else { &[0, 1, needed, 5 * needed] };
                    for &extra in extras {
                        let mut xy = x.clone();
                        let mut scratch = vec![f32::NAN; needed + extra];
                        conv2d_nchw_f32_in_place(
                            &mut xy,
                            &g,
                            c.groups,
                            weights,
                            Some(Bias::F32(&bias)),
                            act,
                            &mut scratch,
                        );
                        for (i, (a, b)) in xy.iter().zip(&expected).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{name}, {storage}, scratch {}: element {i} is {a}, not {b}",
                                scratch.len()
                            );
                        }
                    }
                }
            }
        }
    }

    /// Computes the convolution with int8 activations from the definition. The input under the
    /// kernel at each output position (zeros in the padding) is quantized with its own scale,
    /// the largest magnitude mapping to 127 and ties rounding to even, then summed in integers.
    /// A depthwise convolution with one output per channel uses the scale of the whole plane.
    fn reference_int8(
        c: &Case,
        x: &[f32],
        w: &ConvI8<'_>,
        bias: &[f32],
        act: [f32; 2],
    ) -> Vec<f32> {
        let [oh, ow] = out_size(&c.window, c.size, false);
        let [ih, iw] = c.size;
        let (kh, kw) = (c.window.kernel[0] as usize, c.window.kernel[1] as usize);
        let (cpg, opg) = (c.channels / c.groups, c.outputs / c.groups);
        let mut y = vec![0.0; c.batch * c.outputs * oh * ow];
        for n in 0..c.batch {
            for o in 0..c.outputs {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut window = Vec::new();
                        for ci in 0..cpg {
                            let channel = (o / opg) * cpg + ci;
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = position(&c.window, 0, oy, ky, ih);
                                    let ix = position(&c.window, 1, ox, kx, iw);
                                    window.push(match (iy, ix) {
                                        (Some(iy), Some(ix)) => {
                                            x[((n * c.channels + channel) * ih + iy) * iw + ix]
                                        }
                                        _ => 0.0,
                                    });
                                }
                            }
                        }
                        // A depthwise convolution quantizes each input plane with one scale.
                        let depthwise = c.groups == c.channels && c.outputs == c.channels;
                        let quantized = match depthwise {
                            true => &x[(n * c.channels + o) * ih * iw..][..ih * iw],
                            false => &window[..],
                        };
                        let largest = quantized.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
                        let row = &w.q[o * window.len()..(o + 1) * window.len()];
                        let sum: i32 = window
                            .iter()
                            .zip(row)
                            .map(|(v, &q)| (v * inverse).round_ties_even() as i32 * q as i32)
                            .sum();
                        let scale = largest as f64 / 127.0 * w.scales[o] as f64;
                        let v = (sum as f64 * scale + bias[o] as f64) as f32;
                        y[((n * c.outputs + o) * oh + oy) * ow + ox] = v.max(act[0]).min(act[1]);
                    }
                }
            }
        }
        y
    }

    #[test]
    fn conv2d_int8_activations_match_reference() {
        for (seed, (name, c)) in conv_cases().into_iter().enumerate() {
            let g = geometry(&c, false);
            let row = c.channels / c.groups * (c.window.kernel[0] * c.window.kernel[1]) as usize;
            let x = random(c.batch * c.channels * c.size[0] * c.size[1], seed as u64 + 900);
            let q: Vec<i8> = (0..c.outputs * row).map(|i| [-128, 127, -7, 90, 3][i % 5]).collect();
            let scales: Vec<f32> = (0..c.outputs).map(|o| 0.01 * (o + 1) as f32).collect();
            let w = ConvI8 { q: &q, scales: &scales };
            let bias = random(c.outputs, seed as u64 + 1000);
            for act in [[f32::NEG_INFINITY, f32::INFINITY], [-0.5, 0.5]] {
                let expected = reference_int8(&c, &x, &w, &bias, act);
                let mut y = vec![f32::NAN; expected.len()];
                let bias = Some(Bias::F32(&bias));
                assert!(conv2d_nchw_int8(&x, &g, c.groups, w, bias, act, &mut y), "{name}");
                assert_close(&y, &expected, 1e-5, name);
            }
        }
    }

    /// Depthwise convolutions of every in-place geometry, and strided ones, against the
    /// definition: the integer kernel reads a zero-padded copy of each plane.
    #[test]
    fn int8_depthwise_matches_reference() {
        let strided = |size, kernel, strides, pads, dilations| Case {
            batch: 2,
            channels: 3,
            size,
            outputs: 3,
            groups: 3,
            window: window(kernel, strides, pads, dilations),
        };
        let mut cases = in_place_cases();
        cases.retain(|(_, c)| c.groups == c.channels && c.window.kernel != [1, 1]);
        cases.extend([
            ("stride 2", strided([9, 8], [3, 3], [2, 2], [1; 4], [1, 1])),
            ("stride 2 uneven pads", strided([7, 6], [3, 3], [2, 2], [0, 1, 2, 0], [1, 1])),
            ("stride 1x2 dilated", strided([8, 9], [3, 3], [1, 2], [2, 1, 0, 2], [2, 2])),
            ("5x5 stride 2", strided([10, 7], [5, 5], [2, 2], [2; 4], [1, 1])),
            ("kernel over input", strided([2, 3], [5, 4], [1, 2], [3; 4], [1, 1])),
        ]);
        for (seed, (name, c)) in cases.into_iter().enumerate() {
            let g = geometry(&c, false);
            let taps = (c.window.kernel[0] * c.window.kernel[1]) as usize;
            let x = random(c.batch * c.channels * c.size[0] * c.size[1], seed as u64 + 1400);
            let q: Vec<i8> = (0..c.outputs * taps).map(|i| [-128, 127, -7, 90, 3][i % 5]).collect();
            let scales: Vec<f32> = (0..c.outputs).map(|o| 0.01 * (o + 1) as f32).collect();
            let w = ConvI8 { q: &q, scales: &scales };
            let bias = random(c.outputs, seed as u64 + 1500);
            let act = [-0.75, 0.75];
            let expected = reference_int8(&c, &x, &w, &bias, act);
            let mut y = vec![f32::NAN; expected.len()];
            let b = Some(Bias::F32(&bias));
            assert!(conv2d_nchw_int8(&x, &g, c.groups, w, b, act, &mut y), "{name}");
            assert_close(&y, &expected, 1e-5, name);
        }
    }

    #[test]
    fn int8_in_place_matches_copying_kernel() {
        for (seed, (name, c)) in in_place_cases().into_iter().enumerate() {
            let g = geometry(&c, false);
            let row = c.channels / c.groups * (c.window.kernel[0] * c.window.kernel[1]) as usize;
            let x = random(c.batch * c.channels * c.size[0] * c.size[1], seed as u64 + 1100);
            let q: Vec<i8> = random(c.outputs * row, seed as u64 + 1200)
                .iter()
                .map(|v| (v * 127.0) as i8)
                .collect();
            let scales: Vec<f32> = (0..c.outputs).map(|o| 0.02 * (o + 1) as f32).collect();
            let w = ConvI8 { q: &q, scales: &scales };
            let bias = random(c.outputs, seed as u64 + 1300);
            let bias = Some(Bias::F32(&bias));
            let act = [0.0, 0.5];
            let mut expected = vec![f32::NAN; x.len()];
            assert!(conv2d_nchw_int8(&x, &g, c.groups, w, bias, act, &mut expected), "{name}");
            let mut xy = x.clone();
            let ran = conv2d_nchw_int8_in_place(&mut xy, &g, c.groups, w, bias, act);
            assert!(ran, "{name}");
            for (i, (a, b)) in xy.iter().zip(&expected).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{name}: element {i}");
            }
        }
    }

    #[test]
    fn int8_rejects_long_windows_and_planes() {
        let c = Case {
            batch: 1,
            channels: 57,
            size: [4, 4],
            outputs: 2,
            groups: 1,
            window: window([3, 3], [1, 1], [1; 4], [1, 1]),
        };
        let g = geometry(&c, false);
        let x = random(57 * 16, 1);
        let q = vec![1i8; 2 * 57 * 9];
        let w = ConvI8 { q: &q, scales: &[1.0, 1.0] };
        let mut y = vec![f32::NAN; 2 * 16];
        const { assert!(57 * 9 > super::super::integer::MAX_WINDOW) };
        let act = [f32::NEG_INFINITY, f32::INFINITY];
        assert!(!conv2d_nchw_int8(&x, &g, 1, w, None, act, &mut y));
        assert!(y.iter().all(|v| v.is_nan()), "a refused call wrote its output");

        // Depthwise convolutions, in place and not: planes longer than a window, and a plane of
        // 100 values whose padding of 12 on each side makes it 34 x 34.
        let depthwise_rejected = |size: [usize; 2], kernel: [u32; 2], pads: [u32; 4], seed| {
            let c = Case {
                batch: 1,
                channels: 2,
                size,
                outputs: 2,
                groups: 2,
                window: window(kernel, [1, 1], pads, [1, 1]),
            };
            let g = geometry(&c, false);
            assert_eq!(g.out_size, size, "padding keeps the extents");
            let x = random(2 * size[0] * size[1], seed);
            let q = vec![1i8; 2 * (kernel[0] * kernel[1]) as usize];
            let w = ConvI8 { q: &q, scales: &[1.0, 1.0] };
            let mut y = vec![f32::NAN; x.len()];
            assert!(!conv2d_nchw_int8(&x, &g, 2, w, None, act, &mut y), "{size:?}");
            assert!(y.iter().all(|v| v.is_nan()), "{size:?}: a refused call wrote its output");
            let mut xy = x.clone();
            assert!(!conv2d_nchw_int8_in_place(&mut xy, &g, 2, w, None, act), "{size:?}");
            assert_eq!(xy, x, "{size:?}: a refused call changed its input");
        };
        depthwise_rejected([9, 57], [3, 3], [1; 4], 2);
        depthwise_rejected([10, 10], [25, 25], [12; 4], 3);
    }

    /// Pads, strides and dilations that a file may state but whose input positions do not fit
    /// 32 bits: the integer kernels leave them to the f32 ones instead of overflowing.
    #[test]
    fn int8_rejects_positions_past_32_bits() {
        let act = [f32::NEG_INFINITY, f32::INFINITY];
        let q = [1i8, 1];
        let w = ConvI8 { q: &q, scales: &[1.0, 1.0] };
        // Strides of 2^31 over 3 rows padded by 2^32 - 2 on both sides: 4 output rows.
        let strided = window([1, 1], [1 << 31, 1], [u32::MAX - 1, 0, u32::MAX - 1, 0], [1, 1]);
        let c =
            Case { batch: 1, channels: 1, size: [3, 2], outputs: 1, groups: 1, window: strided };
        let g = geometry(&c, false);
        assert_eq!(g.out_size, [4, 2]);
        let x = random(6, 3);
        let mut y = vec![f32::NAN; 8];
        assert!(!conv2d_nchw_int8(&x, &g, 1, w, None, act, &mut y));
        assert!(y.iter().all(|v| v.is_nan()), "a refused call wrote its output");
        // A depthwise kernel two taps wide, dilated by 2^31 and padded by 2^31 on the left.
        let dilated = window([1, 2], [1, 1], [0, 1 << 31, 0, 0], [1, 1 << 31]);
        let c =
            Case { batch: 1, channels: 1, size: [2, 3], outputs: 1, groups: 1, window: dilated };
        let g = geometry(&c, false);
        assert_eq!(g.out_size, [2, 3]);
        let x = random(6, 4);
        let mut xy = x.clone();
        assert!(!conv2d_nchw_int8_in_place(&mut xy, &g, 1, w, None, act));
        assert_eq!(xy, x, "a refused call changed its input");
        let mut y = vec![f32::NAN; 6];
        assert!(!conv2d_nchw_int8(&x, &g, 1, w, None, act, &mut y));
    }

    #[test]
    fn in_place_scratch_known_sizes() {
        let kws = window([3, 3], [1, 1], [1; 4], [1, 1]);
        assert_eq!(in_place_scratch_len(&kws, 64, [25, 5]), Some(10));
        let pointwise = window([1, 1], [1, 1], [0; 4], [1, 1]);
        assert_eq!(in_place_scratch_len(&pointwise, 64, [25, 5]), Some(64));
        let causal = window([3, 3], [1, 1], [0, 1, 2, 1], [1, 1]);
        assert_eq!(in_place_scratch_len(&causal, 2, [4, 7]), Some(7));
        let tall = window([9, 1], [1, 1], [8, 0, 0, 0], [1, 1]);
        assert_eq!(in_place_scratch_len(&tall, 2, [3, 7]), Some(28), "at most H rows are kept");
        let huge = window([3, 3], [1, 1], [u32::MAX; 4], [1, 1]);
        let size = [usize::MAX, usize::MAX / 2];
        assert_eq!(in_place_scratch_len(&huge, 1, size), None, "overflow is reported");
    }

    /// Pooling straight from the definition.
    fn reference_pool(
        kind: PoolKind,
        c: &Case,
        x: &[f32],
        include_pad: bool,
        ceil: bool,
    ) -> Vec<f32> {
        let [oh, ow] = out_size(&c.window, c.size, ceil);
        let [ih, iw] = c.size;
        let w = &c.window;
        let mut y = Vec::new();
        for plane in 0..c.batch * c.channels {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut sum, mut max, mut count, mut padded) =
                        (0.0f64, f32::NEG_INFINITY, 0, 0);
                    for j in 0..w.kernel[0] as usize {
                        for i in 0..w.kernel[1] as usize {
                            let in_padding = |axis: usize, o: usize, t: usize, input: usize| {
                                let p = (o * w.strides[axis] as usize
                                    + t * w.dilations[axis] as usize)
                                    as i64
                                    - w.pads[axis] as i64;
                                p < (input + w.pads[axis + 2] as usize) as i64
                            };
                            if in_padding(0, oy, j, ih) && in_padding(1, ox, i, iw) {
                                padded += 1;
                            }
                            let iy = position(w, 0, oy, j, ih);
                            let ix = position(w, 1, ox, i, iw);
                            let (Some(iy), Some(ix)) = (iy, ix) else { continue };
                            let v = x[(plane * ih + iy) * iw + ix];
                            sum += v as f64;
                            max = max.max(v);
                            count += 1;
                        }
                    }
                    let divisor = if include_pad { padded } else { count };
                    y.push(match kind {
                        PoolKind::Max => max,
                        PoolKind::Average if divisor == 0 => 0.0,
                        PoolKind::Average => (sum / divisor as f64) as f32,
                    });
                }
            }
        }
        y
    }

    fn pool_cases() -> Vec<(&'static str, Case, bool)> {
        let case = |batch, channels, size, window| Case {
            batch,
            channels,
            size,
            outputs: channels,
            groups: 1,
            window,
        };
        vec![
            ("kws average", case(1, 3, [25, 5], window([25, 5], [25, 5], [0; 4], [1, 1])), false),
            ("2x2 stride 2 odd", case(2, 2, [7, 5], window([2, 2], [2, 2], [0; 4], [1, 1])), false),
            ("3x3 padded", case(1, 2, [6, 7], window([3, 3], [1, 2], [1, 1, 1, 1], [1, 1])), false),
            (
                "asymmetric pads",
                case(1, 1, [5, 9], window([3, 2], [2, 1], [2, 0, 1, 1], [1, 1])),
                false,
            ),
            ("dilated", case(1, 2, [9, 8], window([2, 3], [1, 2], [1, 0, 0, 2], [3, 2])), false),
            ("ceil mode", case(1, 2, [5, 5], window([2, 2], [2, 2], [1; 4], [1, 1])), true),
            (
                "ceil mode unpadded",
                case(1, 1, [7, 6], window([3, 2], [2, 4], [0; 4], [1, 1])),
                true,
            ),
        ]
    }

    #[test]
    fn pooling_matches_reference() {
        for (seed, (name, c, ceil)) in pool_cases().into_iter().enumerate() {
            let g = geometry(&c, ceil);
            let x = random(c.batch * c.channels * c.size[0] * c.size[1], seed as u64 + 500);
            let mut y = vec![f32::NAN; c.batch * c.channels * g.out_size[0] * g.out_size[1]];
            for kind in [PoolKind::Average, PoolKind::Max] {
                for include_pad in [false, true] {
                    pool2d_nchw_f32(kind, &x, &g, include_pad, &mut y);
                    let expected = reference_pool(kind, &c, &x, include_pad, ceil);
                    assert_close(&y, &expected, 1e-5, name);
                }
            }
        }
    }

    #[test]
    fn output_extent_known_answers() {
        let w = window([2, 3], [2, 2], [1, 0, 1, 0], [1, 2]);
        // Height: 5 + 2 padding, kernel 2, stride 2: floor(5 / 2) + 1 = 3; ceil gives 4, but the
        // fourth window would start at 6 >= 5 + 1, past the input, so it is dropped.
        assert_eq!(w.output_extent(0, 5, false), Some(3));
        assert_eq!(w.output_extent(0, 5, true), Some(3));
        // Width: kernel 3 dilated by 2 spans 5 positions of an input of 8: floor(3 / 2) + 1.
        assert_eq!(w.output_extent(1, 8, false), Some(2));
        assert_eq!(w.output_extent(1, 8, true), Some(3));
        assert_eq!(w.output_extent(1, 4, false), None, "span 5 exceeds the input 4");
        let zero_stride = window([1, 1], [0, 1], [0; 4], [1, 1]);
        assert_eq!(zero_stride.output_extent(0, 4, false), None);
        let huge = window([u32::MAX, 1], [1, 1], [u32::MAX; 4], [u32::MAX, 1]);
        assert_eq!(huge.output_extent(0, u32::MAX as u64, false), None);
    }

    #[test]
    fn covered_positions_stay_in_input() {
        for out in 1..6 {
            for input in 1..8 {
                for stride in 1..4 {
                    for offset in -5i64..6 {
                        let (first, end) = covered(out, input, stride, offset);
                        for o in 0..out {
                            let p = o as i64 * stride as i64 + offset;
                            let inside = (0..input as i64).contains(&p);
                            assert_eq!(
                                (first..end).contains(&o),
                                inside,
                                "{out} {input} {stride} {offset} {o}"
                            );
                        }
                    }
                }
            }
        }
    }
}
