//! Portable kernels over plain slices. Callers pass slices of exactly the lengths the shapes
//! imply; the executor checks this before every call.

use crate::format::MAX_RANK;
use crate::ops::{BinaryKind, ReduceKind, UnaryKind};
use crate::shape::{next_index, Shape};

/// Defines a public function whose body is compiled three times on x86_64: for AVX-512, for AVX2
/// with FMA, and for the baseline. Each call runs the version for [`super::Isa::best`]. The
/// bodies are plain loops that the compiler vectorizes, so wider vectors need nothing but the
/// target features. Elsewhere the body is compiled once.
macro_rules! vectorized {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                match super::Isa::best() {
                    // SAFETY: `best` returns only instruction sets that this CPU supports.
                    super::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    super::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized;

/// Columns of weights dequantized at once into a stack buffer by [`linear`].
pub const LINEAR_CHUNK: usize = 256;

/// Source of weight rows for [`linear`]: writes `out.len()` values of row `row` starting at
/// column `col` as f32.
pub trait WeightRows {
    /// Fills `out` with `w[row, col..col + out.len()]`.
    fn fill(&self, row: usize, col: usize, out: &mut [f32]);
}

/// Dense f32 weights, row-major `[n, k]`.
#[derive(Clone, Copy)]
pub struct F32Rows<'a> {
    /// The values.
    pub w: &'a [f32],
    /// Row length.
    pub k: usize,
}

impl WeightRows for F32Rows<'_> {
    fn fill(&self, row: usize, col: usize, out: &mut [f32]) {
        let start = row * self.k + col;
        out.copy_from_slice(&self.w[start..start + out.len()]);
    }
}

/// Dense f16 weights, row-major `[n, k]`, as raw bits.
#[derive(Clone, Copy)]
pub struct F16Rows<'a> {
    /// The values as IEEE binary16 bits.
    pub w: &'a [u16],
    /// Row length.
    pub k: usize,
}

impl WeightRows for F16Rows<'_> {
    fn fill(&self, row: usize, col: usize, out: &mut [f32]) {
        let start = row * self.k + col;
        let len = out.len();
        for (o, &bits) in out.iter_mut().zip(&self.w[start..start + len]) {
            *o = half::f16::from_bits(bits).to_f32();
        }
    }
}

/// Int8 weights with one scale per row.
#[derive(Clone, Copy)]
pub struct I8Rows<'a> {
    /// Quantized values, row-major `[n, k]`.
    pub q: &'a [i8],
    /// One scale per row.
    pub scales: &'a [f32],
    /// Row length.
    pub k: usize,
}

impl WeightRows for I8Rows<'_> {
    fn fill(&self, row: usize, col: usize, out: &mut [f32]) {
        let start = row * self.k + col;
        let s = self.scales[row];
        let len = out.len();
        for (o, &q) in out.iter_mut().zip(&self.q[start..start + len]) {
            *o = q as f32 * s;
        }
    }
}

/// Int4 weights in groups along each row, two per byte (low nibble first), one f16 scale per group
/// and optionally one f16 minimum per group.
///
/// Without minimums a stored nibble `q` in -8..=7 means `q × scale`; with them it means
/// `(q + 8) × scale + min`, the unsigned 0..=15 grid with an offset that llama.cpp's Q4_1 uses.
#[derive(Clone, Copy, Debug)]
pub struct I4Rows<'a> {
    /// Packed values; each row takes `k.div_ceil(2)` bytes.
    pub packed: &'a [u8],
    /// Scales as f16 bits, `[n, k / group]`.
    pub scales: &'a [u16],
    /// Minimums as f16 bits, `[n, k / group]`, for the grid with offsets.
    pub mins: Option<&'a [u16]>,
    /// Row length.
    pub k: usize,
    /// Group length (even, divides `k`).
    pub group: usize,
}

impl WeightRows for I4Rows<'_> {
    fn fill(&self, row: usize, col: usize, out: &mut [f32]) {
        let row_bytes = self.k.div_ceil(2);
        let groups = self.k / self.group;
        for (i, o) in out.iter_mut().enumerate() {
            let c = col + i;
            let byte = self.packed[row * row_bytes + c / 2];
            let nibble = if c.is_multiple_of(2) { byte & 0x0F } else { byte >> 4 };
            let q = ((nibble as i8) << 4) >> 4;
            let g = row * groups + c / self.group;
            let scale = half::f16::from_bits(self.scales[g]).to_f32();
            *o = match self.mins {
                Some(mins) => (q as f32 + 8.0) * scale + half::f16::from_bits(mins[g]).to_f32(),
                None => q as f32 * scale,
            };
        }
    }
}

/// Dot product with eight independent accumulators, which compilers vectorize.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        sum += x * y;
    }
    sum
}

/// `y[m, j] = bias[j] + Σ_c x[m, c] · w[j, c]` for `m < rows`, `j < n`, `c < k`.
///
/// Weights are turned into f32 [`LINEAR_CHUNK`] columns at a time, once per call, whatever
/// `rows` is.
pub fn linear<W: WeightRows>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &W,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    debug_assert!(x.len() >= rows * k && y.len() >= rows * n);
    for m in 0..rows {
        let out = &mut y[m * n..(m + 1) * n];
        match bias {
            Some(b) => out.copy_from_slice(&b[..n]),
            None => out.fill(0.0),
        }
    }
    let mut buf = [0f32; LINEAR_CHUNK];
    for j in 0..n {
        let mut col = 0;
        while col < k {
            let len = LINEAR_CHUNK.min(k - col);
            let chunk = &mut buf[..len];
            w.fill(j, col, chunk);
            for m in 0..rows {
                let xs = &x[m * k + col..m * k + col + len];
                y[m * n + j] += dot(xs, chunk);
            }
            col += len;
        }
    }
}

/// One matrix product `c[m, n] = Σ_k a[m, k] · b[k, n]` (row-major), overwriting `c`.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    for i in 0..m {
        let row = &mut c[i * n..(i + 1) * n];
        row.fill(0.0);
        for p in 0..k {
            let av = a[i * k + p];
            let brow = &b[p * n..(p + 1) * n];
            for (o, &bv) in row.iter_mut().zip(brow) {
                *o += av * bv;
            }
        }
    }
}

/// Iterates over every index of `shape` except the last axis, calling `f` with the element
/// offsets that `strides_a` and `strides_b` give for that index.
#[inline]
pub fn for_each_outer(
    shape: &Shape,
    strides_a: &[usize; MAX_RANK],
    strides_b: &[usize; MAX_RANK],
    mut f: impl FnMut(usize, usize, usize),
) {
    let rank = shape.rank;
    if rank == 0 {
        f(0, 0, 0);
        return;
    }
    let outer: usize = shape.dims[..rank - 1].iter().product();
    let mut index = [0usize; MAX_RANK];
    for o in 0..outer {
        let mut off_a = 0;
        let mut off_b = 0;
        for ax in 0..rank - 1 {
            off_a += index[ax] * strides_a[ax];
            off_b += index[ax] * strides_b[ax];
        }
        f(o, off_a, off_b);
        next_index(&mut index, &shape.dims[..rank - 1]);
    }
}

/// Calls `$apply` with the element function of `$kind` as its first argument, a closure that
/// the compiler inlines into the loops (a function pointer would keep them scalar).
macro_rules! with_binary_fn {
    ($kind:expr, $apply:ident($($arg:expr),*)) => {
        match $kind {
            BinaryKind::Add => $apply(|a: f32, b: f32| a + b, $($arg),*),
            BinaryKind::Sub => $apply(|a: f32, b: f32| a - b, $($arg),*),
            BinaryKind::Mul => $apply(|a: f32, b: f32| a * b, $($arg),*),
            BinaryKind::Div => $apply(|a: f32, b: f32| a / b, $($arg),*),
            BinaryKind::Pow => {
                $apply(|a: f32, b: f32| if b == 2.0 { a * a } else { libm::powf(a, b) }, $($arg),*)
            }
            BinaryKind::Max => {
                $apply(|a: f32, b: f32| if a >= b || b.is_nan() { a } else { b }, $($arg),*)
            }
            BinaryKind::Min => {
                $apply(|a: f32, b: f32| if a <= b || b.is_nan() { a } else { b }, $($arg),*)
            }
        }
    };
}

vectorized! {
    /// Element-wise `out = a ∘ b` with NumPy broadcasting of `a` and `b` to `out_shape`.
    pub fn binary(
        kind: BinaryKind,
        a: &[f32],
        a_shape: &Shape,
        b: &[f32],
        b_shape: &Shape,
        out: &mut [f32],
        out_shape: &Shape,
    ) {
        with_binary_fn!(kind, binary_with(a, a_shape, b, b_shape, out, out_shape))
    }
}

#[inline(always)]
fn binary_with(
    f: impl Fn(f32, f32) -> f32,
    a: &[f32],
    a_shape: &Shape,
    b: &[f32],
    b_shape: &Shape,
    out: &mut [f32],
    out_shape: &Shape,
) {
    if a_shape == out_shape && b_shape == out_shape {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
        return;
    }
    let sa = a_shape.broadcast_strides(out_shape);
    let sb = b_shape.broadcast_strides(out_shape);
    let last = if out_shape.rank == 0 { 1 } else { out_shape.dims[out_shape.rank - 1] };
    let (la, lb) =
        if out_shape.rank == 0 { (0, 0) } else { (sa[out_shape.rank - 1], sb[out_shape.rank - 1]) };
    for_each_outer(out_shape, &sa, &sb, |o, off_a, off_b| {
        let row = &mut out[o * last..(o + 1) * last];
        match (la, lb) {
            // The common cases get loops over contiguous slices, which vectorize.
            (1, 1) => {
                for ((r, &x), &y) in row.iter_mut().zip(&a[off_a..]).zip(&b[off_b..]) {
                    *r = f(x, y);
                }
            }
            (1, 0) => {
                let y = b[off_b];
                for (r, &x) in row.iter_mut().zip(&a[off_a..]) {
                    *r = f(x, y);
                }
            }
            (0, 1) => {
                let x = a[off_a];
                for (r, &y) in row.iter_mut().zip(&b[off_b..]) {
                    *r = f(x, y);
                }
            }
            _ => {
                for (i, r) in row.iter_mut().enumerate() {
                    *r = f(a[off_a + i * la], b[off_b + i * lb]);
                }
            }
        }
    });
}

vectorized! {
    /// Element-wise `a = a ∘ b` in place, with `b` broadcast to `shape` (the shape of `a`), with
    /// the results of [`binary`].
    pub fn binary_in_place(kind: BinaryKind, a: &mut [f32], b: &[f32], b_shape: &Shape, shape: &Shape) {
        with_binary_fn!(kind, binary_in_place_with(a, b, b_shape, shape))
    }
}

#[inline(always)]
fn binary_in_place_with(
    f: impl Fn(f32, f32) -> f32,
    a: &mut [f32],
    b: &[f32],
    b_shape: &Shape,
    shape: &Shape,
) {
    if b_shape == shape {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = f(*x, y);
        }
        return;
    }
    let sb = b_shape.broadcast_strides(shape);
    let last = if shape.rank == 0 { 1 } else { shape.dims[shape.rank - 1] };
    let lb = if shape.rank == 0 { 0 } else { sb[shape.rank - 1] };
    for_each_outer(shape, &sb, &sb, |o, off_b, _| {
        let row = &mut a[o * last..(o + 1) * last];
        match lb {
            1 => {
                for (r, &y) in row.iter_mut().zip(&b[off_b..]) {
                    *r = f(*r, y);
                }
            }
            0 => {
                let y = b[off_b];
                for r in row.iter_mut() {
                    *r = f(*r, y);
                }
            }
            _ => {
                for (i, r) in row.iter_mut().enumerate() {
                    *r = f(*r, b[off_b + i * lb]);
                }
            }
        }
    });
}

/// Gauss error function.
#[inline]
pub fn erf(x: f32) -> f32 {
    libm::erff(x)
}

vectorized! {
    /// Element-wise unary op, `out[i] = f(x[i])`.
    pub fn unary(kind: UnaryKind, alpha: f32, beta: f32, x: &[f32], out: &mut [f32]) {
        unary_with(kind, alpha, beta, Separate(x, out));
    }
}

vectorized! {
    /// Element-wise unary op in place, `xy[i] = f(xy[i])`, with the results of [`unary`].
    pub fn unary_in_place(kind: UnaryKind, alpha: f32, beta: f32, xy: &mut [f32]) {
        unary_with(kind, alpha, beta, InPlace(xy));
    }
}

/// Where an element-wise op reads its input and writes its output.
trait ElementMap {
    /// Writes `f(v)` for every input value `v`.
    fn map(self, f: impl Fn(f32) -> f32);
}

/// Input and output in separate slices.
struct Separate<'a>(&'a [f32], &'a mut [f32]);

/// One slice, overwritten.
struct InPlace<'a>(&'a mut [f32]);

impl ElementMap for Separate<'_> {
    #[inline(always)]
    fn map(self, f: impl Fn(f32) -> f32) {
        for (o, &v) in self.1.iter_mut().zip(self.0) {
            *o = f(v);
        }
    }
}

impl ElementMap for InPlace<'_> {
    #[inline(always)]
    fn map(self, f: impl Fn(f32) -> f32) {
        for v in self.0.iter_mut() {
            *v = f(*v);
        }
    }
}

#[inline(always)]
fn unary_with(kind: UnaryKind, alpha: f32, beta: f32, m: impl ElementMap) {
    match kind {
        UnaryKind::Neg => m.map(|v| -v),
        UnaryKind::Abs => m.map(libm::fabsf),
        UnaryKind::Sqrt => m.map(libm::sqrtf),
        UnaryKind::Exp => m.map(libm::expf),
        UnaryKind::Log => m.map(libm::logf),
        UnaryKind::Erf => m.map(erf),
        UnaryKind::Tanh => m.map(libm::tanhf),
        UnaryKind::Sigmoid => m.map(|v| 1.0 / (1.0 + libm::expf(-v))),
        UnaryKind::Relu => m.map(|v| if v > 0.0 { v } else { 0.0 }),
        UnaryKind::Gelu => gelu_map(m),
        UnaryKind::GeluTanh => m.map(|v| {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            0.5 * v * (1.0 + libm::tanhf(C * (v + 0.044_715 * v * v * v)))
        }),
        UnaryKind::Reciprocal => m.map(|v| 1.0 / v),
        UnaryKind::Clip => m.map(|v| {
            let lo = if v < alpha { alpha } else { v };
            if lo > beta {
                beta
            } else {
                lo
            }
        }),
        UnaryKind::Silu => m.map(|v| v / (1.0 + libm::expf(-v))),
    }
}

/// Applies [`gelu_approx`] through `m`; on x86_64 CPUs with FMA, as `gelu_with::<true>` in code
/// compiled for them, where the polynomials take half the instructions.
#[inline(always)]
fn gelu_map(m: impl ElementMap) {
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")]
        fn avx512(m: impl ElementMap) {
            m.map(gelu_with::<true>)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        fn avx2(m: impl ElementMap) {
            m.map(gelu_with::<true>)
        }
        match super::Isa::best() {
            // SAFETY: `best` returns only instruction sets that this CPU supports.
            super::Isa::Avx512 => return unsafe { avx512(m) },
            // SAFETY: as above.
            super::Isa::Avx2 => return unsafe { avx2(m) },
            _ => {}
        }
    }
    m.map(gelu_approx)
}

/// Writes `exp_approx(x[i] - shift)` to `out[i]`; on x86_64 CPUs with FMA, with
/// `exp_with::<true>` in code compiled for them.
#[inline(always)]
fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) {
    #[inline(always)]
    fn run<const FUSED: bool>(x: &[f32], shift: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp_with::<FUSED>(v - shift);
        }
    }
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")]
        fn avx512(x: &[f32], shift: f32, out: &mut [f32]) {
            run::<true>(x, shift, out)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        fn avx2(x: &[f32], shift: f32, out: &mut [f32]) {
            run::<true>(x, shift, out)
        }
        match super::Isa::best() {
            // SAFETY: `best` returns only instruction sets that this CPU supports.
            super::Isa::Avx512 => return unsafe { avx512(x, shift, out) },
            // SAFETY: as above.
            super::Isa::Avx2 => return unsafe { avx2(x, shift, out) },
            _ => {}
        }
    }
    run::<false>(x, shift, out)
}

/// Partial sums kept by [`sum_lanes`] and [`max_lanes`]: enough independent chains for a
/// vectorized loop to hide the latency of its additions.
pub const LANES: usize = 16;

/// Returns `Σ f(v)` over `x`, summed in [`LANES`] interleaved partial sums (element `i` goes to
/// sum `i % LANES`), which are then added in order. Unlike one running sum, the loop vectorizes.
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v);
    }
    acc.iter().sum()
}

/// Returns the largest value of `x` that is not NaN, or -∞ if there is none.
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a = if v > *a { v } else { *a };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

vectorized! {
    /// Layer normalization of each row of length `d`.
    pub fn layer_norm(
        x: &[f32],
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
        d: usize,
        out: &mut [f32],
    ) {
        if d == 0 {
            return;
        }
        let gamma = &gamma[..d];
        for (row, orow) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = sum_lanes(row, |v| v) / d as f32;
            let var = sum_lanes(row, |v| (v - mean) * (v - mean)) / d as f32;
            let inv = 1.0 / libm::sqrtf(var + eps);
            let scaled = orow.iter_mut().zip(row).zip(gamma);
            match beta {
                Some(beta) => {
                    for (((o, &v), &g), &b) in scaled.zip(&beta[..d]) {
                        *o = (v - mean) * inv * g + b;
                    }
                }
                None => {
                    for ((o, &v), &g) in scaled {
                        *o = (v - mean) * inv * g;
                    }
                }
            }
        }
    }
}

vectorized! {
    /// Softmax over the middle axis of an `[outer, axis, inner]` view.
    ///
    /// Exponentials come from [`exp_approx`], whose loop the compiler vectorizes when `inner` is 1
    /// (softmax over the last axis, as in attention). Over the last axis the sums run in
    /// [`LANES`] interleaved partial sums; otherwise in ascending order.
    pub fn softmax(x: &[f32], out: &mut [f32], outer: usize, axis: usize, inner: usize) {
        if inner == 1 {
            for (row, orow) in x.chunks_exact(axis).zip(out.chunks_exact_mut(axis)).take(outer) {
                let max = max_lanes(row);
                exp_shifted(row, max, orow);
                let sum = sum_lanes(orow, |v| v);
                let inv = 1.0 / sum;
                for o in orow.iter_mut() {
                    *o *= inv;
                }
            }
            return;
        }
        for o in 0..outer {
            for i in 0..inner {
                let at = |a: usize| o * axis * inner + a * inner + i;
                let mut max = f32::NEG_INFINITY;
                for a in 0..axis {
                    max = if x[at(a)] > max { x[at(a)] } else { max };
                }
                let mut sum = 0.0;
                for a in 0..axis {
                    let e = exp_approx(x[at(a)] - max);
                    out[at(a)] = e;
                    sum += e;
                }
                let inv = 1.0 / sum;
                for a in 0..axis {
                    out[at(a)] *= inv;
                }
            }
        }
    }
}

/// Returns e^x within a few ulp for normal results, without branches or calls, so that loops
/// over it vectorize. Below x = -87.33, where e^x leaves the normal range, the result is 0. Above
/// x = 88.37 it is infinity, although e^x overflows f32 only from 88.72. NaN gives NaN.
///
/// The method is the usual one (as in Cephes `expf`): x = n·ln 2 + r with |r| ≤ ln 2 / 2, a
/// degree-6 polynomial for e^r, and 2^n written into the exponent bits.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// Returns `a · b + c`: with one rounding where `FUSED` (for code compiled with an FMA
/// instruction; needs `std`), otherwise with two.
#[inline(always)]
pub(crate) fn mul_add<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(feature = "std")]
    if FUSED {
        return a.mul_add(b, c);
    }
    a * b + c
}

/// [`exp_approx`], with fused multiply-adds where `FUSED`.
#[inline(always)]
fn exp_with<const FUSED: bool>(x: f32) -> f32 {
    const LOG2_E: f32 = core::f32::consts::LOG2_E;
    // ln 2 split in two, so that n · LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let fma = mul_add::<FUSED>;
    let clamped = x.clamp(-87.33, 88.37);
    let t = fma(clamped, LOG2_E, ROUND);
    let n = t - ROUND;
    let r = fma(-n, LN2_LO, fma(-n, LN2_HI, clamped));
    let p = 1.987_569_1e-4;
    let p = fma(p, r, 1.398_199_9e-3);
    let p = fma(p, r, 8.333_452e-3);
    let p = fma(p, r, 4.166_579_6e-2);
    let p = fma(p, r, 0.166_666_65);
    let p = fma(p, r, 0.5);
    let e = fma(p, r * r, r) + 1.0;
    let bits = (t.to_bits() as i32).wrapping_sub(0x4B40_0000).wrapping_add(127) << 23;
    let value = e * f32::from_bits(bits as u32);
    // The clamped range keeps 2^n normal; the tails and NaN are set here.
    let value = if x > 88.37 { f32::INFINITY } else { value };
    let value = if x < -87.33 { 0.0 } else { value };
    if x.is_nan() {
        x
    } else {
        value
    }
}

/// Returns x · Φ(x), GELU with the exact normal CDF, in vectorizable code. The relative error is
/// below 1e-6 for |x| ≤ 3 and grows with x² (about 1e-5 at |x| = 12), because the f32 rounding
/// of x² enters the exponent.
///
/// Φ comes from erfc by a Chebyshev fit with fractional error below 1.2e-7 everywhere (Press et
/// al., Numerical Recipes, `erfcc`), so the negative tail keeps its relative accuracy where
/// 1 + erf(x) would cancel.
#[inline(always)]
pub fn gelu_approx(v: f32) -> f32 {
    gelu_with::<false>(v)
}

/// [`gelu_approx`], with fused multiply-adds where `FUSED`.
#[inline(always)]
fn gelu_with<const FUSED: bool>(v: f32) -> f32 {
    let fma = mul_add::<FUSED>;
    let u = v.abs() * core::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / fma(0.5, u, 1.0);
    let p = 0.170_872_77;
    let p = fma(p, t, -0.822_152_23);
    let p = fma(p, t, 1.488_515_9);
    let p = fma(p, t, -1.135_204);
    let p = fma(p, t, 0.278_868_07);
    let p = fma(p, t, -0.186_288_06);
    let p = fma(p, t, 0.096_784_18);
    let p = fma(p, t, 0.374_091_96);
    let p = fma(p, t, 1.000_023_7);
    let p = fma(p, t, -1.265_512_2);
    // erfc(u), so Φ(v) = erfc(u) / 2 for v < 0 and 1 - erfc(u) / 2 otherwise.
    let erfc = t * exp_with::<FUSED>(fma(-u, u, p));
    if v < 0.0 {
        0.5 * v * erfc
    } else {
        0.5 * v * (2.0 - erfc)
    }
}

/// Reduction of `x` (shape `shape`) over the axes in the bit mask `axes` into `out`, laid out as
/// the input shape with reduced axes of extent 1.
pub fn reduce(kind: ReduceKind, x: &[f32], shape: &Shape, axes: u32, out: &mut [f32]) {
    let mut out_shape = *shape;
    let mut count = 1usize;
    for ax in 0..shape.rank {
        if axes & (1 << ax) != 0 {
            out_shape.dims[ax] = 1;
            count *= shape.dims[ax];
        }
    }
    let init = match kind {
        ReduceKind::Max => f32::NEG_INFINITY,
        _ => 0.0,
    };
    out.fill(init);
    let so = out_shape.broadcast_strides(shape);
    let mut index = [0usize; MAX_RANK];
    for &v in x.iter().take(shape.numel()) {
        let mut o = 0;
        for ax in 0..shape.rank {
            o += index[ax] * so[ax];
        }
        match kind {
            ReduceKind::Max => {
                if v > out[o] {
                    out[o] = v
                }
            }
            _ => out[o] += v,
        }
        next_index(&mut index, shape.as_slice());
    }
    if kind == ReduceKind::Mean && count > 0 {
        let inv = 1.0 / count as f32;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

/// Copies `x` (shape `in_shape`) into `out` with axes permuted: output axis i is input axis
/// `perm[i]`.
pub fn transpose<T: Copy>(x: &[T], in_shape: &Shape, perm: &[u8; MAX_RANK], out: &mut [T]) {
    RowGather::transposed(in_shape, perm).copy(x, out);
}

/// Broadcasts `x` (shape `in_shape`) to `out_shape`.
pub fn expand<T: Copy>(x: &[T], in_shape: &Shape, out: &mut [T], out_shape: &Shape) {
    let strides = in_shape.broadcast_strides(out_shape);
    RowGather { shape: *out_shape, strides }.copy(x, out);
}

/// [`transpose`] of elements of `size` bytes, given as bytes. One copy of the code serves every
/// element size, where each type given to [`transpose`] adds its own.
pub fn transpose_bytes(
    x: &[u8],
    in_shape: &Shape,
    perm: &[u8; MAX_RANK],
    out: &mut [u8],
    size: usize,
) {
    let gather = RowGather::transposed(in_shape, perm);
    #[cfg(feature = "std")]
    if size == 4 && gather.copy_words_tiled(x, out) {
        return;
    }
    gather.copy_bytes(x, out, size);
}

/// Side of the square tiles of [`RowGather::copy_words_tiled`]: 16 values of 4 bytes fill one
/// 64-byte cache line.
#[cfg(feature = "std")]
const TILE_SIDE: usize = 16;

/// [`expand`] of elements of `size` bytes, given as bytes.
pub fn expand_bytes(x: &[u8], in_shape: &Shape, out: &mut [u8], out_shape: &Shape, size: usize) {
    let strides = in_shape.broadcast_strides(out_shape);
    RowGather { shape: *out_shape, strides }.copy_bytes(x, out, size);
}

/// A strided copy: output element `index` of `shape` reads input element
/// `sum of index[axis] * strides[axis]`.
struct RowGather {
    shape: Shape,
    strides: [usize; MAX_RANK],
}

impl RowGather {
    /// The copy that permutes the axes of `in_shape`: output axis i is input axis `perm[i]`.
    #[inline(never)]
    fn transposed(in_shape: &Shape, perm: &[u8; MAX_RANK]) -> RowGather {
        let in_strides = in_shape.strides();
        let mut shape = *in_shape;
        let mut strides = [0usize; MAX_RANK];
        for i in 0..in_shape.rank {
            shape.dims[i] = in_shape.dims[perm[i] as usize];
            strides[i] = in_strides[perm[i] as usize];
        }
        RowGather { shape, strides }
    }

    /// Copies row by row. Only the loop over a row depends on `T`, so each element size adds
    /// little code.
    fn copy<T: Copy>(&self, x: &[T], out: &mut [T]) {
        let rank = self.shape.rank;
        let last = if rank == 0 { 1 } else { self.shape.dims[rank - 1] };
        let step = if rank == 0 { 0 } else { self.strides[rank - 1] };
        self.for_each_row(&mut |o, off| {
            let row = &mut out[o * last..(o + 1) * last];
            for (i, r) in row.iter_mut().enumerate() {
                *r = x[off + i * step];
            }
        });
    }

    /// [`copy`](Self::copy) of elements of `size` bytes.
    fn copy_bytes(&self, x: &[u8], out: &mut [u8], size: usize) {
        let rank = self.shape.rank;
        let last = if rank == 0 { 1 } else { self.shape.dims[rank - 1] };
        let step = if rank == 0 { 0 } else { self.strides[rank - 1] * size };
        self.for_each_row(&mut |o, off| {
            let row = &mut out[o * last * size..(o + 1) * last * size];
            let mut from = off * size;
            if step == size {
                // A contiguous run of the input, as when the last axis stays in place.
                row.copy_from_slice(&x[from..from + row.len()]);
                return;
            }
            if size == 4 {
                // Word copies for f32 and the other four-byte types, the common case.
                for r in row.chunks_exact_mut(4) {
                    let word: [u8; 4] = x[from..from + 4].try_into().unwrap_or_default();
                    r.copy_from_slice(&word);
                    from += step;
                }
                return;
            }
            for r in row.chunks_exact_mut(size) {
                r.copy_from_slice(&x[from..from + size]);
                from += step;
            }
        });
    }

    /// Copies 4-byte elements in square tiles when the output's last axis is strided in the input
    /// and another output axis is the input's contiguous one, as when a transpose moves the
    /// sequence axis of keys last. A tile's values are read along the input's contiguous axis and
    /// written along the output's, so both sides use whole cache lines. The row-by-row copy reads
    /// one value per line. Returns `false`, having written nothing, where that does not apply or
    /// a slice is too short for the shape. Builds without `std` (microcontrollers) leave it out
    /// and keep the row copy's smaller code and stack.
    #[cfg(feature = "std")]
    fn copy_words_tiled(&self, x: &[u8], out: &mut [u8]) -> bool {
        let rank = self.shape.rank;
        if rank < 2 || self.strides[rank - 1] == 1 {
            return false;
        }
        let last = rank - 1;
        let Some(j) = (0..last).rev().find(|&a| self.strides[a] == 1 && self.shape.dims[a] > 1)
        else {
            return false;
        };
        let bytes = self.shape.numel().saturating_mul(4);
        if x.len() < bytes || out.len() < bytes {
            return false;
        }

        // The axes other than `j` and the last, then an axis of 1 that `for_each_outer` skips.
        let out_strides = self.shape.strides();
        let mut outer = Shape { dims: [1; MAX_RANK], rank: 0 };
        let (mut from_strides, mut to_strides) = ([0; MAX_RANK], [0; MAX_RANK]);
        for a in (0..last).filter(|&a| a != j) {
            outer.dims[outer.rank] = self.shape.dims[a];
            from_strides[outer.rank] = self.strides[a];
            to_strides[outer.rank] = out_strides[a];
            outer.rank += 1;
        }
        outer.rank += 1;

        // Value (p, q) of a plane: p runs along axis `j`, contiguous in the input, and q along
        // the last axis, contiguous in the output.
        let (p_len, q_len) = (self.shape.dims[j], self.shape.dims[last]);
        let (q_step, p_step) = (self.strides[last], out_strides[j]);
        for_each_outer(&outer, &from_strides, &to_strides, |_, from, to| {
            for p0 in (0..p_len).step_by(TILE_SIDE) {
                let pn = (p_len - p0).min(TILE_SIDE);
                for q0 in (0..q_len).step_by(TILE_SIDE) {
                    let qn = (q_len - q0).min(TILE_SIDE);

                    let mut tile = [[0u32; TILE_SIDE]; TILE_SIDE];
                    for (q, row) in tile[..qn].iter_mut().enumerate() {
                        let at = 4 * (from + (q0 + q) * q_step + p0);
                        for (t, c) in row.iter_mut().zip(x[at..at + 4 * pn].chunks_exact(4)) {
                            *t = u32::from_ne_bytes(c.try_into().unwrap_or_default());
                        }
                    }

                    for p in 0..pn {
                        let at = 4 * (to + (p0 + p) * p_step + q0);
                        for (c, row) in out[at..at + 4 * qn].chunks_exact_mut(4).zip(&tile) {
                            c.copy_from_slice(&row[p].to_ne_bytes());
                        }
                    }
                }
            }
        });
        true
    }

    /// Calls `f` with each output row's index and the input offset of its first element.
    #[inline(never)]
    fn for_each_row(&self, f: &mut dyn FnMut(usize, usize)) {
        let zero = [0usize; MAX_RANK];
        for_each_outer(&self.shape, &self.strides, &zero, |o, off, _| f(o, off));
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::vec::Vec;

    const UNARY_KINDS: [UnaryKind; 14] = [
        UnaryKind::Neg,
        UnaryKind::Abs,
        UnaryKind::Sqrt,
        UnaryKind::Exp,
        UnaryKind::Log,
        UnaryKind::Erf,
        UnaryKind::Tanh,
        UnaryKind::Sigmoid,
        UnaryKind::Relu,
        UnaryKind::Gelu,
        UnaryKind::GeluTanh,
        UnaryKind::Reciprocal,
        UnaryKind::Clip,
        UnaryKind::Silu,
    ];

    const BINARY_KINDS: [BinaryKind; 7] = [
        BinaryKind::Add,
        BinaryKind::Sub,
        BinaryKind::Mul,
        BinaryKind::Div,
        BinaryKind::Pow,
        BinaryKind::Max,
        BinaryKind::Min,
    ];

    /// Values from -4 to 4 in uneven steps, with zeros, infinities and NaN.
    fn values(n: usize) -> Vec<f32> {
        let special = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 2.0];
        (0..n)
            .map(|i| special.get(i).copied().unwrap_or(((i * 37) % 101) as f32 * 0.08 - 4.0))
            .collect()
    }

    fn assert_same_bits(ours: &[f32], expected: &[f32], what: &str) {
        assert_eq!(ours.len(), expected.len(), "{what}: lengths differ");
        for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
            // The sign and payload of a NaN result are unspecified (Miri picks them at random).
            if a.is_nan() && b.is_nan() {
                continue;
            }
            assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i} is {a}, expected {b}");
        }
    }

    #[test]
    fn unary_in_place_matches_unary() {
        let x = values(64);
        for kind in UNARY_KINDS {
            // Under Miri, libm's sqrtf is inline assembly, which Miri cannot run, and Miri adds
            // random rounding errors to the other library functions, so only exact ops compare.
            if cfg!(miri) && !matches!(kind, UnaryKind::Neg | UnaryKind::Abs) {
                continue;
            }
            let mut expected = std::vec![0.0; x.len()];
            unary(kind, -1.5, 2.5, &x, &mut expected);
            let mut xy = x.clone();
            unary_in_place(kind, -1.5, 2.5, &mut xy);
            assert_same_bits(&xy, &expected, &std::format!("{kind:?}"));
        }
    }

    #[test]
    fn binary_in_place_matches_binary() {
        let shape = |dims: &[usize]| Shape::from_slice(dims).unwrap();
        let out = shape(&[2, 3, 4]);
        let cases = [shape(&[2, 3, 4]), shape(&[4]), shape(&[3, 1]), shape(&[2, 1, 4]), shape(&[])];
        let a = values(out.numel());
        for b_shape in cases {
            let b: Vec<f32> = values(b_shape.numel() + 7)[7..].to_vec();
            for kind in BINARY_KINDS {
                // Miri adds random rounding errors to library functions such as powf.
                if cfg!(miri) && kind == BinaryKind::Pow {
                    continue;
                }
                let mut expected = std::vec![0.0; out.numel()];
                binary(kind, &a, &out, &b, &b_shape, &mut expected, &out);
                let mut xy = a.clone();
                binary_in_place(kind, &mut xy, &b, &b_shape, &out);
                let what = std::format!("{kind:?} with b {:?}", b_shape.as_slice());
                assert_same_bits(&xy, &expected, &what);
            }
        }
    }

    /// `binary` against each output element computed on its own from broadcast indices. The
    /// cases have both operands full, one a scalar per row or per column, and a last axis of 1
    /// on either side, with rows of 17 values (not a multiple of any vector width).
    #[test]
    fn binary_broadcasts_like_numpy() {
        let shape = |dims: &[usize]| Shape::from_slice(dims).unwrap();
        let out = shape(&[2, 3, 17]);
        let cases = [
            (shape(&[2, 3, 17]), shape(&[2, 3, 17])),
            (shape(&[2, 3, 17]), shape(&[17])),
            (shape(&[2, 3, 17]), shape(&[3, 1])),
            (shape(&[2, 3, 1]), shape(&[2, 3, 17])),
            (shape(&[1, 3, 17]), shape(&[2, 1, 1])),
            (shape(&[2, 1, 17]), shape(&[])),
        ];
        let elementwise = |kind: BinaryKind, a: f32, b: f32| match kind {
            BinaryKind::Add => a + b,
            BinaryKind::Sub => a - b,
            BinaryKind::Mul => a * b,
            BinaryKind::Div => a / b,
            BinaryKind::Pow => libm::powf(a, b),
            BinaryKind::Max => a.max(b),
            BinaryKind::Min => a.min(b),
        };
        for (a_shape, b_shape) in cases {
            let a = values(a_shape.numel());
            let b: Vec<f32> = values(b_shape.numel() + 5)[5..].to_vec();
            let (sa, sb) = (a_shape.broadcast_strides(&out), b_shape.broadcast_strides(&out));
            for kind in [BinaryKind::Add, BinaryKind::Sub, BinaryKind::Mul, BinaryKind::Div] {
                let mut got = std::vec![0.0; out.numel()];
                binary(kind, &a, &a_shape, &b, &b_shape, &mut got, &out);
                let mut index = [0usize; MAX_RANK];
                for (i, &g) in got.iter().enumerate() {
                    let at = |strides: &[usize; MAX_RANK]| {
                        (0..out.rank).map(|axis| index[axis] * strides[axis]).sum::<usize>()
                    };
                    let want = elementwise(kind, a[at(&sa)], b[at(&sb)]);
                    // The sign and payload of a NaN result are unspecified.
                    let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
                    assert!(
                        same,
                        "{kind:?}, a {:?}, b {:?}, element {i}: {g}, expected {want}",
                        a_shape.as_slice(),
                        b_shape.as_slice()
                    );
                    next_index(&mut index, out.as_slice());
                }
            }
        }
    }

    /// Returns `count + 1` evenly spaced values from `from` to `to`.
    fn sweep(from: f32, to: f32, count: usize) -> impl Iterator<Item = f32> {
        (0..=count).map(move |i| from + (to - from) * i as f32 / count as f32)
    }

    #[test]
    fn exp_approx_relative_error() {
        let count = if cfg!(miri) { 300 } else { 200_000 };
        let mut worst = 0f64;
        for x in sweep(-87.3, 88.3, count) {
            let exact = libm::exp(x as f64);
            for got in [exp_approx(x), exp_with::<true>(x)] {
                let got = got as f64;
                let error = ((got - exact) / exact).abs();
                worst = worst.max(error);
                assert!(error < 3.0 * f32::EPSILON as f64, "e^{x}: {got} against {exact}");
            }
        }
        assert!(worst > 0.0, "the sweep compared nothing");
    }

    #[test]
    fn exp_approx_tails_and_nan() {
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(-88.0), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(89.0), f32::INFINITY);
        assert_eq!(exp_approx(f32::INFINITY), f32::INFINITY);
        assert!(exp_approx(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_approx_relative_error() {
        let count = if cfg!(miri) { 300 } else { 100_000 };
        for v in sweep(-12.0, 12.0, count) {
            let v64 = v as f64;
            let exact = 0.5 * v64 * libm::erfc(-v64 / core::f64::consts::SQRT_2);
            let bound = (1e-6 + 2e-7 * v64 * v64) * exact.abs();
            for (got, fused) in [(gelu_approx(v), false), (gelu_with::<true>(v), true)] {
                let error = (got as f64 - exact).abs();
                assert!(
                    error <= bound || error < 1e-37,
                    "gelu({v}) = {got} (fused {fused}), expected {exact}"
                );
            }
        }
        assert_eq!(gelu_approx(0.0), 0.0);
        assert_eq!(gelu_approx(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu_approx(-30.0), 0.0);
        assert!(gelu_approx(f32::NAN).is_nan());
    }

    /// Softmax over the last axis (vectorized path) and over a middle axis (strided path) against
    /// an f64 reference, including a row of equal values and a row with a large spread.
    #[test]
    fn softmax_matches_reference() {
        let (outer, axis, inner) = (3, 7, 2);
        let mut x = values(outer * axis * inner);
        x[0..7].fill(2.5);
        x[7] = 60.0;
        x[8] = -60.0;
        for (outer, axis, inner) in [(outer * inner, axis, 1), (outer, axis, inner)] {
            let mut out = std::vec![0f32; x.len()];
            softmax(&x, &mut out, outer, axis, inner);
            for o in 0..outer {
                for i in 0..inner {
                    let at = |a: usize| o * axis * inner + a * inner + i;
                    let max = (0..axis).map(|a| x[at(a)] as f64).fold(f64::MIN, f64::max);
                    let sum: f64 = (0..axis).map(|a| libm::exp(x[at(a)] as f64 - max)).sum();
                    for a in 0..axis {
                        let want = libm::exp(x[at(a)] as f64 - max) / sum;
                        let got = out[at(a)] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * want + 1e-30,
                            "[{outer}, {axis}, {inner}] at ({o}, {a}, {i}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The byte-wise transpose and broadcast equal the typed ones for every element size, on
    /// shapes with odd extents, axes of extent 1 and a rank-0 tensor.
    #[test]
    fn byte_copies_match_typed_copies() {
        let shape = |dims: &[usize]| Shape::from_slice(dims).unwrap();
        let mut perm = [0u8; MAX_RANK];
        let cases: [(&[usize], &[u8]); 4] =
            [(&[3, 5, 2], &[2, 0, 1]), (&[1, 4, 1, 3], &[3, 1, 2, 0]), (&[7], &[0]), (&[], &[])];

        for (dims, order) in cases {
            let xs = shape(dims);
            perm[..order.len()].copy_from_slice(order);
            let x: Vec<u64> = (0..xs.numel() as u64).map(|i| i * 0x0101_0203_0507_0B0D).collect();
            let mut want = std::vec![0u64; x.len()];
            transpose(&x, &xs, &perm, &mut want);

            for size in [1, 2, 4, 8] {
                // Elements of `size` bytes: the first `size` bytes of each u64, little-endian.
                let narrow = |v: &[u64]| -> Vec<u8> {
                    v.iter().flat_map(|e| e.to_le_bytes()[..size].to_vec()).collect()
                };
                let x_narrow = narrow(&x);
                let mut got = std::vec![0u8; x_narrow.len()];
                transpose_bytes(&x_narrow, &xs, &perm, &mut got, size);
                assert_eq!(got, narrow(&want), "transpose {dims:?} by {order:?}, {size} bytes");
            }
        }

        let (xs, os) = (shape(&[3, 1, 2]), shape(&[2, 3, 4, 2]));
        let x: Vec<u16> = (0..6).map(|i| 0x0100 * i + 7).collect();
        let mut want = std::vec![0u16; os.numel()];
        expand(&x, &xs, &mut want, &os);

        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut got = std::vec![0u8; want.len() * 2];
        expand_bytes(&bytes, &xs, &mut got, &os, 2);
        let want: Vec<u8> = want.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(got, want, "expand [3, 1, 2] to [2, 3, 4, 2]");
    }

    /// Every permutation of ranks 2 to 4, on extents that leave partial tiles, against the
    /// definition of a transpose: 4-byte elements take the tiled copy where an output axis other
    /// than the last is the input's contiguous one.
    #[test]
    fn word_transpose_matches_definition() {
        // Miri interprets every copy, so it runs the smaller shapes only.
        let cases: &[&[usize]] = if cfg!(miri) {
            &[&[17, 3], &[3, 1, 18]]
        } else {
            &[&[17, 33], &[3, 1, 18], &[2, 19, 5, 16], &[1, 130, 12, 32]]
        };
        for &dims in cases {
            let xs = Shape::from_slice(dims).unwrap();
            let in_strides = xs.strides();
            let x: Vec<u32> = (0..xs.numel() as u32).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
            let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_ne_bytes()).collect();
            for order in permutations(dims.len()) {
                let mut perm = [0u8; MAX_RANK];
                perm[..order.len()].copy_from_slice(&order);
                let out_dims: Vec<usize> = order.iter().map(|&a| dims[a as usize]).collect();
                let os = Shape::from_slice(&out_dims).unwrap();
                let mut want = Vec::with_capacity(x.len());
                let mut index = [0usize; MAX_RANK];
                for _ in 0..x.len() {
                    let from: usize =
                        (0..order.len()).map(|i| index[i] * in_strides[order[i] as usize]).sum();
                    want.extend_from_slice(&x[from].to_ne_bytes());
                    next_index(&mut index, os.as_slice());
                }
                let mut got = std::vec![0xA5u8; bytes.len()];
                transpose_bytes(&bytes, &xs, &perm, &mut got, 4);
                assert!(got == want, "transpose {dims:?} by {order:?}");
            }
        }

        // The keys' transpose of attention takes the tiled copy, and the one that moves whole
        // rows does not.
        let xs = Shape::from_slice(&[1, 18, 3, 16]).unwrap();
        let bytes = std::vec![0u8; 4 * xs.numel()];
        let mut out = std::vec![0u8; bytes.len()];
        for (order, tiled) in [([0u8, 2, 3, 1], true), ([0, 2, 1, 3], false)] {
            let mut perm = [0u8; MAX_RANK];
            perm[..4].copy_from_slice(&order);
            let gather = RowGather::transposed(&xs, &perm);
            assert_eq!(gather.copy_words_tiled(&bytes, &mut out), tiled, "{order:?}");
        }
    }

    /// Returns the permutations of `0..rank`, in lexicographic order.
    fn permutations(rank: usize) -> Vec<Vec<u8>> {
        if rank == 0 {
            return std::vec![Vec::new()];
        }
        let mut all = Vec::new();
        for rest in permutations(rank - 1) {
            for at in 0..rank {
                let mut p = rest.clone();
                p.insert(at, (rank - 1) as u8);
                all.push(p);
            }
        }
        all.sort();
        all
    }
}
