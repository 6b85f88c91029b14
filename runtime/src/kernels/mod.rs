//! Compute kernels. `generic` contains the portable versions every target can run. `x86_64`
//! (AVX2, AVX-512) and `aarch64` (NEON) contain faster `linear` and `matmul`, which [`linear`]
//! and [`matmul`] pick at run time (at compile time without the `std` feature). `conv` contains
//! the portable convolution and pooling kernels.
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod aarch64;
pub mod attention;
#[cfg(all(target_arch = "x86_64", feature = "std"))]
mod broadcast;
pub mod conv;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod dotprod;
pub mod generic;
#[cfg(feature = "int8-activations")]
pub mod integer;
#[cfg(all(target_arch = "x86_64", feature = "std"))]
mod nibbles;
#[cfg(all(target_arch = "x86_64", feature = "std"))]
mod panels;
#[cfg(feature = "std")]
pub mod parallel;
#[cfg(feature = "std")]
mod pool;
#[cfg(test)]
mod tests;
#[cfg(any(target_arch = "x86_64", all(target_arch = "aarch64", target_feature = "neon")))]
mod tiled;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use core::fmt;

use generic::{F16Rows, F32Rows, I4Rows, I8Rows, WeightRows};

/// Instruction set that a `linear` or `matmul` kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isa {
    /// Portable Rust, for every target.
    Generic,
    /// x86_64 with AVX2, FMA and F16C.
    Avx2,
    /// x86_64 with AVX-512F (and AVX2, FMA, F16C).
    Avx512,
    /// aarch64 with NEON.
    Neon,
}

impl Isa {
    /// Every instruction set, supported here or not.
    pub const ALL: [Isa; 4] = [Isa::Generic, Isa::Avx2, Isa::Avx512, Isa::Neon];

    /// Returns whether this CPU runs the kernels for `self`.
    ///
    /// With the `std` feature this queries the CPU (CPUID on x86_64). Without it, x86_64 relies on
    /// the target features enabled at compile time, for example by `-C target-cpu=native`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86_64::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86_64::has_avx512(),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Isa::Neon => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Returns the fastest supported instruction set, which [`linear`] and [`matmul`] use.
    ///
    /// The first call detects it and logs the choice at debug level; later calls reuse it.
    pub fn best() -> Isa {
        // Targets without SIMD kernels (microcontrollers among them) need neither the detection
        // nor the cache and its log line.
        #[cfg(not(any(
            target_arch = "x86_64",
            all(target_arch = "aarch64", target_feature = "neon")
        )))]
        {
            Isa::Generic
        }
        #[cfg(all(
            target_has_atomic = "8",
            any(target_arch = "x86_64", all(target_arch = "aarch64", target_feature = "neon"))
        ))]
        {
            use core::sync::atomic::{AtomicU8, Ordering};
            const UNKNOWN: u8 = u8::MAX;
            static BEST: AtomicU8 = AtomicU8::new(UNKNOWN);

            let cached = BEST.load(Ordering::Relaxed);
            if cached != UNKNOWN {
                return Isa::ALL[cached as usize];
            }
            let isa = Isa::detect();
            let index = Isa::ALL.iter().position(|&i| i == isa).unwrap_or(0);
            if BEST.swap(index as u8, Ordering::Relaxed) == UNKNOWN {
                log::debug!("linear and matmul kernels: {isa}");
            }
            isa
        }
        #[cfg(all(
            not(target_has_atomic = "8"),
            any(target_arch = "x86_64", all(target_arch = "aarch64", target_feature = "neon"))
        ))]
        {
            Isa::detect()
        }
    }

    #[cfg(any(target_arch = "x86_64", all(target_arch = "aarch64", target_feature = "neon")))]
    fn detect() -> Isa {
        // AVX-512 comes first: on a Zen 4 core, whose FMA units are 256 bits wide, it still ran
        // `linear` 5 to 45 % faster than AVX2 for every weight kind at 128 rows.
        [Isa::Avx512, Isa::Avx2, Isa::Neon]
            .into_iter()
            .find(|i| i.is_supported())
            .unwrap_or(Isa::Generic)
    }

    /// Short name, as in the debug log.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Weights of a [`linear`] layer: `n` rows of `k` values, row-major, in one of the stored kinds.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// Dense f32.
    F32(F32Rows<'a>),
    /// Dense f16.
    F16(F16Rows<'a>),
    /// Int8 with one scale per row.
    I8(I8Rows<'a>),
    /// Int4 in groups along each row. Without the `weights-int4` feature the kernels panic on
    /// these weights.
    I4(I4Rows<'a>),
}

/// A `linear` kernel with [`linear`]'s arguments: [`linear`], [`linear_int8`] or
/// [`linear_int8_rows`].
pub type LinearKernel =
    for<'a> fn(&'a [f32], usize, usize, Weights<'a>, usize, Option<&'a [f32]>, &'a mut [f32]);

/// Settings of a model's matrix products, shared by the decoder and the translator.
#[cfg(any(feature = "decoder", feature = "translator"))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Products {
    /// Threads that [`Products::linear`] may use. Boards run one thread.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) threads: usize,
    /// Whether [`Products::linear`] may quantize its input to int8 ([`linear_int8`]).
    pub(crate) int8: bool,
}

#[cfg(any(feature = "decoder", feature = "translator"))]
impl Products {
    /// Computes `y = x Wᵀ + bias` for `rows` rows of `x`, with the row lengths of `x` and `y`
    /// taken from their sizes, on up to `threads` threads with `std` and on one thread on boards.
    pub(crate) fn linear(
        self,
        x: &[f32],
        rows: usize,
        w: Weights<'_>,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let (k, n) = (x.len() / rows.max(1), y.len() / rows.max(1));
        #[cfg(feature = "std")]
        {
            let kernel = match self.int8 {
                true => linear_int8 as parallel::LinearKernel,
                false => linear as parallel::LinearKernel,
            };
            parallel::linear_threads_with(kernel, None, self.threads, x, rows, k, w, n, bias, y);
        }
        #[cfg(not(feature = "std"))]
        match self.int8 {
            true => linear_int8(x, rows, k, w, n, bias, y),
            false => linear(x, rows, k, w, n, bias, y),
        }
    }
}

/// A `linear` call whose slice lengths have been checked against its shape.
pub(crate) struct LinearCall<'a> {
    x: &'a [f32],
    rows: usize,
    k: usize,
    w: Weights<'a>,
    n: usize,
    bias: Option<&'a [f32]>,
    y: &'a mut [f32],
}

/// Returns `a * b`, panicking on overflow.
fn product(a: usize, b: usize) -> usize {
    a.checked_mul(b).expect("tensor size overflows usize")
}

/// Panics unless a slice of `len` values holds the `need` values that a kernel reads.
#[track_caller]
fn check_len(what: &'static str, len: usize, need: usize) {
    if len < need {
        too_short(what, len, need);
    }
}

// The checks share two cold panic sites, so that each check adds a compare and a call to the
// code, not its own formatting.
#[cold]
#[inline(never)]
#[track_caller]
fn too_short(what: &'static str, len: usize, need: usize) -> ! {
    panic!("{what} has {len} values, but the shape needs {need}")
}

#[cold]
#[inline(never)]
#[track_caller]
fn invalid(what: &'static str, value: usize) -> ! {
    panic!("{what}: {value}")
}

/// Panics for int4 weights in a build without the `weights-int4` feature, whose kernels then
/// link no int4 code. Files with int4 tensors do not open in such a build.
#[cfg(not(feature = "weights-int4"))]
#[cold]
#[inline(never)]
#[track_caller]
pub(crate) fn int4_not_built() -> ! {
    panic!("int4 weights: the runtime is built without the `weights-int4` feature")
}

#[cold]
#[inline(never)]
#[track_caller]
fn not_built(kernel: &'static str, isa: Isa) -> ! {
    panic!("{kernel}: the {} kernels are not built for this target", isa.name())
}

impl<'a> LinearCall<'a> {
    /// Checks every slice against the shape `x: [rows, k]`, `w: [n, k]`, `y: [rows, n]`.
    ///
    /// # Panics
    ///
    /// Panics if a slice is shorter than its shape implies, or if the weights describe another
    /// row length or an invalid int4 group.
    fn new(
        x: &'a [f32],
        rows: usize,
        k: usize,
        w: Weights<'a>,
        n: usize,
        bias: Option<&'a [f32]>,
        y: &'a mut [f32],
    ) -> Self {
        check_len("linear: x", x.len(), product(rows, k));
        check_len("linear: y", y.len(), product(rows, n));
        if let Some(b) = bias {
            check_len("linear: bias", b.len(), n);
        }
        check_weights(&w, k, n);
        LinearCall { x, rows, k, w, n, bias, y }
    }

    /// Raw pointers for the tiled kernels; `y` is written through the returned pointer.
    #[cfg(any(target_arch = "x86_64", all(target_arch = "aarch64", target_feature = "neon")))]
    fn args(&mut self) -> tiled::LinearArgs<'a> {
        tiled::LinearArgs {
            x: self.x.as_ptr(),
            rows: self.rows,
            k: self.k,
            n: self.n,
            bias: self.bias,
            y: self.y.as_mut_ptr(),
        }
    }
}

/// Panics unless `w` contains `n` rows of `k` values.
fn check_weights(w: &Weights<'_>, k: usize, n: usize) {
    let len = product(n, k);
    let row_k = match w {
        Weights::F32(w) => {
            check_len("linear: the f32 weights", w.w.len(), len);
            w.k
        }
        Weights::F16(w) => {
            check_len("linear: the f16 weights", w.w.len(), len);
            w.k
        }
        Weights::I8(w) => {
            check_len("linear: the int8 weights", w.q.len(), len);
            check_len("linear: the int8 scales", w.scales.len(), n);
            w.k
        }
        #[cfg(feature = "weights-int4")]
        Weights::I4(w) => {
            let group = w.group;
            if group == 0 || !group.is_multiple_of(2) {
                invalid("linear: the int4 group size is not a positive even number", group);
            }
            if !k.is_multiple_of(group) {
                invalid("linear: the int4 group size does not divide k", group);
            }
            check_len("linear: the int4 weight bytes", w.packed.len(), product(n, k.div_ceil(2)));
            check_len("linear: the int4 scales", w.scales.len(), product(n, k / group));
            if let Some(mins) = w.mins {
                check_len("linear: the int4 minimums", mins.len(), product(n, k / group));
            }
            w.k
        }
        #[cfg(not(feature = "weights-int4"))]
        Weights::I4(_) => int4_not_built(),
    };
    if row_k != k {
        invalid("linear: the weight rows have another length than k", row_k);
    }
}

/// Panics unless `a: [m, k]`, `b: [k, n]` and `c: [m, n]` fit their slices.
fn check_matmul(a: &[f32], b: &[f32], c: &[f32], m: usize, k: usize, n: usize) {
    check_len("matmul: a", a.len(), product(m, k));
    check_len("matmul: b", b.len(), product(k, n));
    check_len("matmul: c", c.len(), product(m, n));
}

/// `y[m, j] = bias[j] + Σ_c x[m, c] · w[j, c]` for `m < rows`, `j < n`, `c < k`, on the
/// instruction set of [`Isa::best`].
///
/// Each output is a sum in a fixed order, so results repeat exactly for the same inputs and
/// instruction set; they differ between instruction sets by rounding only.
///
/// On AVX-512 (with `std`), calls of fewer than 8 rows with int4 weights in groups of a multiple
/// of 32 (rows of at most 65,536 values) run each row alone. A row's result then does not depend
/// on the other rows either. It rounds differently than in a call of 8 rows or more, whatever
/// `k` is, because the kernels pair the columns with the vector lanes differently.
///
/// NOTE: with int4 weights from 8 rows on, and with f16 weights on AVX-512 from 16 rows on (on
/// NEON from 8), the weights are decoded in blocks of 256 columns and each block's sum is added
/// to `y` separately. For `k > 256` a row then rounds differently than in a call with fewer
/// rows. On AVX-512 (with `std`), some calls sum each output in ascending `k` instead. These are
/// calls of 16 rows or more with f32 weights, 32 or more with int4 weights in groups of a
/// multiple of 16, and 64 or more with f16 and int8 weights. A row then rounds differently than
/// in a smaller call. On
/// other CPUs a row's result with f32 or int8 weights does not depend on the other rows.
///
/// # Panics
///
/// Panics if a slice is shorter than the shape implies, or if `w` describes another `k`.
pub fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    linear_with(Isa::best(), x, rows, k, w, n, bias, y);
}

/// Applies `activation`, if any, to the outputs `y` of a product, in place.
#[inline]
pub fn activate(activation: Option<crate::ops::Activation>, y: &mut [f32]) {
    if let Some(a) = activation {
        generic::unary_in_place(a.kind, a.alpha, a.beta, y);
    }
}

/// Returns the fewest rows each part of a split `linear` call of `rows` rows and `k` columns
/// must have, so that every part takes the kernel the whole call takes. The broadcast AVX-512
/// kernel for f32, f16, int8 and int4 weights rounds differently from the kernels of fewer
/// rows.
#[cfg(feature = "std")]
pub(crate) fn min_part_rows(w: &Weights<'_>, rows: usize, k: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if Isa::best() == Isa::Avx512 && broadcast::applies(w, rows, k) {
            return broadcast::min_rows(w).unwrap_or(1);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, rows, k);
    1
}

/// [`min_part_rows`] for [`linear_int8_rows`]: 1 where it takes the call with integer products
/// over whole rows, whose results do not depend on the other rows of the call.
#[cfg(feature = "std")]
pub(crate) fn min_part_rows_int8_rows(w: &Weights<'_>, rows: usize, k: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if vnni::rows_apply(w, k) {
            return 1;
        }
    }
    min_part_rows(w, rows, k)
}

/// Returns whether this CPU has a kernel for [`linear_int8`]'s integer products (x86_64 with
/// AVX-512 VNNI); without one, [`linear_int8`] is [`linear`].
pub fn int8_products_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vnni::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`linear`] that may quantize `x` to int8 for integer products, where a kernel for the weights
/// and this CPU exists: int4 weights in groups of 32 or int8 weights, `k` a multiple of 64 up to
/// 8,192, and AVX-512 VNNI. Elsewhere it is [`linear`].
///
/// Each row of `x` is quantized in groups of 32 values with the largest magnitude mapped to 127,
/// so results differ from [`linear`]'s by that rounding: a relative error of up to about 0.4 %
/// per input value.
///
/// # Panics
///
/// As [`linear`] does.
pub fn linear_int8(
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut call = LinearCall::new(x, rows, k, w, n, bias, y);
        if vnni::linear(&mut call) {
            return;
        }
    }
    linear(x, rows, k, w, n, bias, y);
}

/// [`linear`] that may quantize each row of `x` to int8 with a single scale, for integer
/// products over the whole row. It does so where the weights are int8 (one scale per row) and
/// one of these holds:
/// - `k` is at most 8,192 and the CPU has AVX-512 VNNI or the aarch64 dot-product extension;
/// - the target has no SIMD kernels (microcontrollers among them), the `int8-activations`
///   feature is on and `k` is at most 512. The portable kernel of `kernels::integer` runs.
///
/// Elsewhere it is [`linear_int8`].
///
/// One scale per row (the largest magnitude maps to 127) rounds small values of a row with a
/// few large ones more coarsely than [`linear_int8`]'s groups of 32, but the integer sums need
/// no conversion until the end of the row. A row's results do not depend on the other rows.
///
/// # Panics
///
/// As [`linear`] does.
pub fn linear_int8_rows(
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut call = LinearCall::new(x, rows, k, w, n, bias, y);
        if vnni::linear_rows(&mut call) {
            return;
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        let mut call = LinearCall::new(x, rows, k, w, n, bias, y);
        if dotprod::linear_rows(&mut call) {
            return;
        }
    }
    #[cfg(all(
        feature = "int8-activations",
        not(any(target_arch = "x86_64", all(target_arch = "aarch64", target_feature = "neon")))
    ))]
    if let Weights::I8(rows_w) = w {
        let call = LinearCall::new(x, rows, k, w, n, bias, y);
        if integer::linear_rows(call.x, rows, &rows_w, n, bias, call.y) {
            return;
        }
    }
    linear_int8(x, rows, k, w, n, bias, y);
}

/// Returns whether this CPU has a kernel for [`linear_int8_rows`]'s integer products: x86_64
/// with AVX-512 VNNI, aarch64 with the dot-product extension, or a target without SIMD kernels
/// built with the `int8-activations` feature (the portable kernel of `kernels::integer`). Without
/// one, [`linear_int8_rows`] is [`linear_int8`].
pub fn int8_row_products_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vnni::supported()
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        dotprod::supported()
    }
    #[cfg(not(any(
        target_arch = "x86_64",
        all(target_arch = "aarch64", target_feature = "neon")
    )))]
    {
        cfg!(feature = "int8-activations")
    }
}

/// [`linear`] on a chosen instruction set.
///
/// # Panics
///
/// Panics if the CPU does not support `isa`, or as [`linear`] does.
#[allow(clippy::too_many_arguments)]
pub fn linear_with(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let mut call = LinearCall::new(x, rows, k, w, n, bias, y);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86_64::linear_avx2(&mut call),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86_64::linear_avx512(&mut call),
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        Isa::Neon => aarch64::linear_neon(&mut call),
        Isa::Generic => linear_generic(&mut call),
        #[allow(unreachable_patterns)]
        _ => not_built("linear", isa),
    }
}

fn linear_generic(call: &mut LinearCall<'_>) {
    let LinearCall { x, rows, k, n, bias, w, .. } = *call;
    generic::linear(x, rows, k, &w, n, bias, &mut *call.y);
}

/// Dispatches on the storage once per chunk of up to [`generic::LINEAR_CHUNK`] weights, so the
/// portable `linear` needs one copy for all storage types.
impl WeightRows for Weights<'_> {
    fn fill(&self, row: usize, col: usize, out: &mut [f32]) {
        match self {
            Weights::F32(w) => w.fill(row, col, out),
            Weights::F16(w) => w.fill(row, col, out),
            Weights::I8(w) => w.fill(row, col, out),
            #[cfg(feature = "weights-int4")]
            Weights::I4(w) => w.fill(row, col, out),
            #[cfg(not(feature = "weights-int4"))]
            Weights::I4(_) => int4_not_built(),
        }
    }
}

/// One matrix product `c[m, n] = Σ_k a[m, k] · b[k, n]` (row-major), overwriting `c`, on the
/// instruction set of [`Isa::best`].
///
/// On the SIMD instruction sets each output is one fused multiply-add chain in ascending `k`,
/// whatever the tile it falls in.
///
/// # Panics
///
/// Panics if a slice is shorter than its shape implies.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    matmul_with(Isa::best(), a, b, c, m, k, n);
}

/// `count` matrix products `c[i] = a(i) · b(i)` with [`matmul`], where `a(i)` and `b(i)` return
/// the `[m, k]` and `[k, n]` operands of product `i`, and `c` receives the `[m, n]` results one
/// after another.
///
/// # Panics
///
/// Panics if `c` is shorter than `count` results, or as [`matmul`] does.
#[allow(clippy::too_many_arguments)]
pub fn matmul_batch<'a>(
    count: usize,
    a: impl Fn(usize) -> &'a [f32],
    b: impl Fn(usize) -> &'a [f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    let size = product(m, n);
    if size == 0 {
        return;
    }
    for (i, ci) in c[..product(count, size)].chunks_mut(size).enumerate() {
        matmul(a(i), b(i), ci, m, k, n);
    }
}

/// [`matmul`] on a chosen instruction set.
///
/// # Panics
///
/// Panics if the CPU does not support `isa`, or as [`matmul`] does.
pub fn matmul_with(isa: Isa, a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86_64::matmul_avx2(a, b, c, m, k, n),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86_64::matmul_avx512(a, b, c, m, k, n),
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        Isa::Neon => aarch64::matmul_neon(a, b, c, m, k, n),
        Isa::Generic => {
            check_matmul(a, b, c, m, k, n);
            generic::matmul(a, b, c, m, k, n);
        }
        #[allow(unreachable_patterns)]
        _ => not_built("matmul", isa),
    }
}
