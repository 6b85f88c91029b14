//! Register-tiled `linear` and `matmul` written once over a SIMD vector type ([`Simd`]).
//!
//! Each CPU family implements [`Simd`] with `#[inline(always)]` methods and calls the drivers here
//! from a `#[target_feature]` function, so that the whole kernel is compiled for that
//! instruction set. Nothing here checks lengths: the safe dispatchers in `kernels` do that first.
//!
//! `linear` multiplies a tile of `R` rows of `x` with `C` weight rows. `R * C` vector
//! accumulators run along `k`, and each weight vector is loaded (and dequantized) once per step
//! and used `R` times. Each accumulator is summed across its lanes at the end. `matmul` keeps
//! `R` rows by `V` vectors of output columns in registers and adds one rank-1 update per step of
//! `k`, so every output element is one fused multiply-add chain in ascending `k`.
//!
//! Keep closures out of the loops here: a closure is a function of its own, compiled without the
//! caller's target features, so the intrinsics inside it stay calls (measured 20 times slower).

use super::generic::{F16Rows, F32Rows, I4Rows, I8Rows, WeightRows};

/// Lanes of the widest vector type any implementation uses.
pub(crate) const MAX_LANES: usize = 16;

/// Operations on a vector of `LANES` f32 values for one instruction set.
///
/// # Safety
///
/// Every method needs a CPU with the implementation's instruction set, and every pointer must be
/// valid for the number of elements the method reads or writes.
pub(crate) unsafe trait Simd {
    /// Number of f32 lanes in [`Simd::V`] (at most [`MAX_LANES`]).
    const LANES: usize;
    /// The vector type.
    type V: Copy;

    /// Returns a vector of zeros.
    unsafe fn zero() -> Self::V;
    /// Returns `v` in every lane.
    unsafe fn splat(v: f32) -> Self::V;
    /// Returns the IEEE binary16 value `bits` as f32 in every lane.
    unsafe fn splat_f16(bits: u16) -> Self::V;
    /// Loads `LANES` values from `p` (no alignment needed).
    unsafe fn load(p: *const f32) -> Self::V;
    /// Stores `LANES` values to `p` (no alignment needed).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Returns `acc + a * b`, rounded once.
    unsafe fn mul_add(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
    /// Returns `a * b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Returns the sum of the lanes of `v`.
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// Returns the lane sums of four vectors.
    #[inline(always)]
    unsafe fn reduce_add4(v: [Self::V; 4]) -> [f32; 4] {
        // SAFETY: the same contract as this function.
        unsafe {
            [
                Self::reduce_add(v[0]),
                Self::reduce_add(v[1]),
                Self::reduce_add(v[2]),
                Self::reduce_add(v[3]),
            ]
        }
    }
    /// Converts `LANES` IEEE binary16 values at `p` to f32.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    /// Converts `LANES` int8 values at `p` to f32.
    unsafe fn load_i8(p: *const i8) -> Self::V;
    /// Converts `LANES` signed 4-bit values packed two per byte at `p` (low nibble first, so
    /// `LANES / 2` bytes) to f32.
    unsafe fn load_i4(p: *const u8) -> Self::V;

    /// Loads `len < LANES` values from `p` and zeros in the remaining lanes.
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, len: usize) -> Self::V {
        let mut buf = [0f32; MAX_LANES];
        // SAFETY: the caller guarantees `p` is valid for `len` reads, and `len < LANES <= 16`.
        unsafe { core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len) };
        // SAFETY: `buf` has room for `MAX_LANES >= LANES` values.
        unsafe { Self::load(buf.as_ptr()) }
    }

    /// Stores the first `len < LANES` lanes of `v` to `p`.
    #[inline(always)]
    unsafe fn store_partial(p: *mut f32, v: Self::V, len: usize) {
        let mut buf = [0f32; MAX_LANES];
        // SAFETY: `buf` has room for `MAX_LANES >= LANES` values.
        unsafe { Self::store(buf.as_mut_ptr(), v) };
        // SAFETY: the caller guarantees `p` is valid for `len` writes, and `len < LANES <= 16`.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), p, len) };
    }
}

/// Weight rows that the tiled `linear` reads one vector at a time.
///
/// # Safety
///
/// Callers of the methods must pass `row < n` and columns inside the row (`col + LANES <= k` for
/// [`VecRows::load`], `col + len <= k` for [`VecRows::load_partial`]), where `n` and `k` are the
/// shape the slices were checked against.
pub(crate) unsafe trait VecRows<S: Simd> {
    /// Loads `w[row, col..col + LANES]` as f32, before [`VecRows::row_scale`].
    unsafe fn load(&self, row: usize, col: usize) -> S::V;
    /// Loads `w[row, col..col + len]` for `len < LANES`, zeros after.
    unsafe fn load_partial(&self, row: usize, col: usize, len: usize) -> S::V;
    /// Factor applied to the finished dot product of `row`.
    #[inline(always)]
    fn row_scale(&self, _row: usize) -> f32 {
        1.0
    }
    /// Asks the CPU to fetch the cache line of `w[row, col]` into L1. Any `row` and `col` may be
    /// passed: a fetch past the weights reads nothing and changes no result.
    #[inline(always)]
    fn prefetch(&self, _row: usize, _col: usize) {}
}

/// Asks the CPU to fetch the cache line at `p` into L1. `p` need not point into valid memory.
/// NOTE: the speed-up was measured on one x86_64 CPU with AVX-512 only (AMD Zen 4); the AVX2
/// kernels were not timed with it, and on aarch64 this does nothing.
#[inline(always)]
fn prefetch_line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address, and SSE is part of x86_64.
    unsafe {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Converts up to `len` values with `f` into a zero-padded buffer and loads it.
#[inline(always)]
unsafe fn load_converted<S: Simd>(len: usize, f: impl Fn(usize) -> f32) -> S::V {
    let mut buf = [0f32; MAX_LANES];
    for (i, b) in buf.iter_mut().take(len).enumerate() {
        *b = f(i);
    }
    // SAFETY: `buf` has room for `MAX_LANES >= LANES` values.
    unsafe { S::load(buf.as_ptr()) }
}

// SAFETY: `load` reads `LANES` values starting at `row * k + col`, which the contract keeps
// inside the `n * k` values the dispatcher checked.
unsafe impl<S: Simd> VecRows<S> for F32Rows<'_> {
    #[inline(always)]
    unsafe fn load(&self, row: usize, col: usize) -> S::V {
        // SAFETY: in bounds by the trait contract.
        unsafe { S::load(self.w.as_ptr().add(row * self.k + col)) }
    }

    #[inline(always)]
    unsafe fn load_partial(&self, row: usize, col: usize, len: usize) -> S::V {
        // SAFETY: in bounds by the trait contract.
        unsafe { S::load_partial(self.w.as_ptr().add(row * self.k + col), len) }
    }

    #[inline(always)]
    fn prefetch(&self, row: usize, col: usize) {
        prefetch_line(self.w.as_ptr().wrapping_add(row * self.k + col));
    }
}

// SAFETY: as for `F32Rows`, over `u16` values.
unsafe impl<S: Simd> VecRows<S> for F16Rows<'_> {
    #[inline(always)]
    unsafe fn load(&self, row: usize, col: usize) -> S::V {
        // SAFETY: in bounds by the trait contract.
        unsafe { S::load_f16(self.w.as_ptr().add(row * self.k + col)) }
    }

    #[inline(always)]
    unsafe fn load_partial(&self, row: usize, col: usize, len: usize) -> S::V {
        let start = row * self.k + col;
        let bits = &self.w[start..start + len];
        // SAFETY: forwarded from the caller.
        unsafe { load_converted::<S>(len, |i| half::f16::from_bits(bits[i]).to_f32()) }
    }

    #[inline(always)]
    fn prefetch(&self, row: usize, col: usize) {
        prefetch_line(self.w.as_ptr().wrapping_add(row * self.k + col));
    }
}

// SAFETY: as for `F32Rows`, over `i8` values; the scale is applied after the dot product.
unsafe impl<S: Simd> VecRows<S> for I8Rows<'_> {
    #[inline(always)]
    unsafe fn load(&self, row: usize, col: usize) -> S::V {
        // SAFETY: in bounds by the trait contract.
        unsafe { S::load_i8(self.q.as_ptr().add(row * self.k + col)) }
    }

    #[inline(always)]
    unsafe fn load_partial(&self, row: usize, col: usize, len: usize) -> S::V {
        let start = row * self.k + col;
        let q = &self.q[start..start + len];
        // SAFETY: forwarded from the caller.
        unsafe { load_converted::<S>(len, |i| q[i] as f32) }
    }

    #[inline(always)]
    fn prefetch(&self, row: usize, col: usize) {
        prefetch_line(self.q.as_ptr().wrapping_add(row * self.k + col));
    }

    #[inline(always)]
    fn row_scale(&self, row: usize) -> f32 {
        self.scales[row]
    }
}

/// Int4 rows whose group length is a multiple of `LANES`, so that one scale covers each vector.
/// `MIN` selects the grid with per-group minimums.
pub(crate) struct I4Aligned<'a, const MIN: bool> {
    w: I4Rows<'a>,
    /// Groups per row.
    groups: usize,
    /// Bytes per row.
    row_bytes: usize,
    /// `log2(group)` when the group length is a power of two, to avoid a division per load.
    group_shift: Option<u32>,
}

impl<'a, const MIN: bool> I4Aligned<'a, MIN> {
    /// Wraps `w`, whose group length must be positive and whose minimums must be present exactly
    /// when `MIN` is true.
    pub(crate) fn new(w: I4Rows<'a>) -> Self {
        debug_assert_eq!(w.mins.is_some(), MIN);
        let group_shift = w.group.is_power_of_two().then(|| w.group.trailing_zeros());
        I4Aligned { w, groups: w.k / w.group, row_bytes: w.k.div_ceil(2), group_shift }
    }

    /// Returns the packed values of every row.
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    pub(crate) fn packed(&self) -> &'a [u8] {
        self.w.packed
    }
}

// SAFETY: `load` reads `LANES / 2` bytes at byte `row * k.div_ceil(2) + col / 2` and one scale
// (and one minimum) at `row * k / group + col / group`; with `col + LANES <= k` they stay inside
// the checked slices. `col` is a multiple of `LANES` (even) on every call, so the vector starts on
// a byte.
unsafe impl<S: Simd, const MIN: bool> VecRows<S> for I4Aligned<'_, MIN> {
    #[inline(always)]
    unsafe fn load(&self, row: usize, col: usize) -> S::V {
        let group = match self.group_shift {
            Some(shift) => col >> shift,
            None => col / self.w.group,
        };
        // SAFETY: in bounds by the trait contract.
        let bits = unsafe { *self.w.scales.get_unchecked(row * self.groups + group) };
        let at = row * self.row_bytes + col / 2;
        // SAFETY: in bounds by the trait contract.
        let q = unsafe { S::load_i4(self.w.packed.as_ptr().add(at)) };
        match self.w.mins {
            Some(mins) if MIN => {
                // SAFETY: the minimums have the shape of the scales, checked with them.
                let min = unsafe { *mins.get_unchecked(row * self.groups + group) };
                // The f16 values are widened by the vector unit: a scalar conversion here cost
                // more than the rest of the load.
                // SAFETY: the caller's CPU supports `S`.
                unsafe {
                    let scale = S::splat_f16(bits);
                    let offset = S::mul_add(S::splat(8.0), scale, S::splat_f16(min));
                    S::mul_add(q, scale, offset)
                }
            }
            // SAFETY: the caller's CPU supports `S`.
            _ => unsafe { S::mul(q, S::splat_f16(bits)) },
        }
    }

    #[inline(always)]
    unsafe fn load_partial(&self, row: usize, col: usize, len: usize) -> S::V {
        let mut buf = [0f32; MAX_LANES];
        self.w.fill(row, col, &mut buf[..len]);
        // SAFETY: `buf` has room for `MAX_LANES >= LANES` values.
        unsafe { S::load(buf.as_ptr()) }
    }
}

/// Any [`WeightRows`] read through its scalar `fill`: the path for int4 groups that split a
/// vector.
pub(crate) struct Filled<'a, W>(pub &'a W);

// SAFETY: `fill` indexes the checked slices and panics instead of reading out of bounds.
unsafe impl<S: Simd, W: WeightRows> VecRows<S> for Filled<'_, W> {
    #[inline(always)]
    unsafe fn load(&self, row: usize, col: usize) -> S::V {
        let mut buf = [0f32; MAX_LANES];
        self.0.fill(row, col, &mut buf[..S::LANES]);
        // SAFETY: `buf` has room for `MAX_LANES >= LANES` values.
        unsafe { S::load(buf.as_ptr()) }
    }

    #[inline(always)]
    unsafe fn load_partial(&self, row: usize, col: usize, len: usize) -> S::V {
        let mut buf = [0f32; MAX_LANES];
        self.0.fill(row, col, &mut buf[..len]);
        // SAFETY: `buf` has room for `MAX_LANES >= LANES` values.
        unsafe { S::load(buf.as_ptr()) }
    }
}

/// Shapes and pointers of one `linear` call, checked by the dispatcher.
pub(crate) struct LinearArgs<'a> {
    /// Input, `[rows, k]`.
    pub x: *const f32,
    /// Rows of `x` and `y`.
    pub rows: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Optional bias of length `n`.
    pub bias: Option<&'a [f32]>,
    /// Output, `[rows, n]`.
    pub y: *mut f32,
}

/// Columns `c0..c1` of a `linear` tile, and whether they are the first (so that the tile sets
/// `y` from the bias instead of adding to it).
#[derive(Clone, Copy)]
struct Span {
    c0: usize,
    c1: usize,
    first: bool,
}

/// Computes `y = x · wᵀ + bias` with tiles of `R` input rows by `C` weight rows, plus one-row
/// and one-column tiles for the edges, each over the whole row length.
///
/// # Safety
///
/// The CPU must support `S`. `x` must be valid for `rows * k` reads and `y` for `rows * n`
/// writes, `w` must contain `n` rows of `k` values, and `bias` (if any) at least `n` values.
#[inline(always)]
pub(crate) unsafe fn linear<S: Simd, W: VecRows<S>, const R: usize, const C: usize>(
    args: &LinearArgs<'_>,
    w: &W,
) {
    const { assert!(S::LANES <= MAX_LANES) };
    let span = Span { c0: 0, c1: args.k, first: true };
    // SAFETY: forwarded from the caller; the span is the whole row.
    unsafe { linear_columns::<S, W, R, C>(args, w, 0..args.rows, 0..args.n, span) }
}

/// Columns of weights decoded at once into the stack buffer of [`linear_blocked`]: with four
/// rows that is 4 KiB.
pub(crate) const BLOCK_COLS: usize = 256;

/// Rows of `x` per block of [`linear_blocked`]: the weights are decoded once per block, and a
/// block of [`BLOCK_COLS`] columns of these rows (64 KiB) stays in a typical L2 cache while every
/// weight row passes over it.
pub(crate) const BLOCK_ROWS: usize = 64;

/// Computes `y = x · wᵀ + bias` like [`linear`], but in blocks of [`BLOCK_COLS`] columns and
/// [`BLOCK_ROWS`] rows, with each `C x BLOCK_COLS` block of weights decoded once into a stack
/// buffer and then read by all the row tiles of the block.
///
/// `C` must be at most 4 (checked at compile time).
///
/// # Safety
///
/// As for [`linear`].
#[inline(always)]
pub(crate) unsafe fn linear_blocked<S: Simd, W: VecRows<S>, const R: usize, const C: usize>(
    args: &LinearArgs<'_>,
    w: &W,
) {
    const { assert!(C <= 4 && BLOCK_COLS.is_multiple_of(S::LANES) && S::LANES <= MAX_LANES) };
    if args.k == 0 {
        // SAFETY: forwarded from the caller; there is no column to decode.
        unsafe { linear::<S, W, R, C>(args, w) };
        return;
    }
    let mut buf = BlockBuffer([0f32; 4 * BLOCK_COLS]);
    let n_full = args.n - args.n % C;
    for c0 in (0..args.k).step_by(BLOCK_COLS) {
        let span = Span { c0, c1: args.k.min(c0 + BLOCK_COLS), first: c0 == 0 };
        for m0 in (0..args.rows).step_by(BLOCK_ROWS) {
            let rows = m0..args.rows.min(m0 + BLOCK_ROWS);
            // SAFETY (whole block): the weight rows and columns decoded exist, the buffer
            // has room for `C <= 4` rows of `BLOCK_COLS`, and the tiles stay inside `rows` and `n`.
            unsafe {
                for j0 in (0..n_full).step_by(C) {
                    let block = decode_block::<S, W, C>(w, j0, span, &mut buf);
                    linear_columns::<S, _, R, C>(args, &block, rows.clone(), j0..j0 + C, span);
                }
                for j0 in n_full..args.n {
                    let block = decode_block::<S, W, 1>(w, j0, span, &mut buf);
                    linear_columns::<S, _, R, 1>(args, &block, rows.clone(), j0..j0 + 1, span);
                }
            }
        }
    }
}

/// Stack buffer of [`linear_blocked`], aligned so that no vector load splits a cache line.
#[repr(C, align(64))]
struct BlockBuffer([f32; 4 * BLOCK_COLS]);

/// Weight rows `j0..j0 + C`, columns `c0..c0 + BLOCK_COLS`, decoded into a buffer.
struct Block<'a, W> {
    buf: *const f32,
    j0: usize,
    c0: usize,
    /// The source, for the row scales.
    w: &'a W,
}

// SAFETY: `decode_block` filled rows `j0..j0 + C` and columns `c0..c0 + BLOCK_COLS`, rounded up to
// whole vectors, and the tiles read only there.
unsafe impl<S: Simd, W: VecRows<S>> VecRows<S> for Block<'_, W> {
    #[inline(always)]
    unsafe fn load(&self, row: usize, col: usize) -> S::V {
        let at = (row - self.j0) * BLOCK_COLS + col - self.c0;
        // SAFETY: inside the decoded part of the buffer.
        unsafe { S::load(self.buf.add(at)) }
    }

    #[inline(always)]
    unsafe fn load_partial(&self, row: usize, col: usize, _len: usize) -> S::V {
        // SAFETY: the decoded part is padded with zeros to a whole vector.
        unsafe { <Self as VecRows<S>>::load(self, row, col) }
    }

    #[inline(always)]
    fn row_scale(&self, row: usize) -> f32 {
        self.w.row_scale(row)
    }
}

/// Decodes weight rows `j0..j0 + C` over `span` into `buf`, one row per [`BLOCK_COLS`] values,
/// with zeros after the span's last column up to a whole vector.
///
/// # Safety
///
/// As for [`linear`], with `j0 + C <= n` and `C <= 4`.
#[inline(always)]
unsafe fn decode_block<'a, S: Simd, W: VecRows<S>, const C: usize>(
    w: &'a W,
    j0: usize,
    span: Span,
    buf: &mut BlockBuffer,
) -> Block<'a, W> {
    let full = span.c1 - (span.c1 - span.c0) % S::LANES;
    let out = buf.0.as_mut_ptr();
    // SAFETY (whole block): each store writes one vector at offset `c * BLOCK_COLS + col - c0`,
    // a multiple of `LANES` below `BLOCK_COLS`, so it stays in row `c` of the buffer.
    unsafe {
        for c in 0..C {
            let row = out.add(c * BLOCK_COLS);
            let mut col = span.c0;
            while col < full {
                S::store(row.add(col - span.c0), w.load(j0 + c, col));
                col += S::LANES;
            }
            if col < span.c1 {
                let v = w.load_partial(j0 + c, col, span.c1 - col);
                S::store(row.add(col - span.c0), v);
            }
        }
    }
    Block { buf: buf.0.as_ptr(), j0, c0: span.c0, w }
}

/// Covers `rows` and weight rows `cols` with tiles of `R` by `C`, then one-row tiles for the
/// remaining rows and one-column tiles for the remaining weight rows, all over `span`.
///
/// # Safety
///
/// As for [`linear`], with `rows` and `cols` inside `0..rows` and `0..n`.
#[inline(always)]
unsafe fn linear_columns<S: Simd, W: VecRows<S>, const R: usize, const C: usize>(
    args: &LinearArgs<'_>,
    w: &W,
    rows: core::ops::Range<usize>,
    cols: core::ops::Range<usize>,
    span: Span,
) {
    let col_full = cols.end - (cols.end - cols.start) % C;
    let rows_full = rows.end - (rows.end - rows.start) % R;
    // SAFETY (whole block): every tile stays inside `rows` and `cols`.
    unsafe {
        for j0 in (cols.start..col_full).step_by(C) {
            // The first tile of each column group fetches the next group's weights, which the
            // other tiles of the group then find in L1.
            let mut ahead = Some(j0 + C);
            for m0 in (rows.start..rows_full).step_by(R) {
                linear_tile::<S, W, R, C>(args, w, m0, j0, span, ahead.take());
            }
            for m0 in rows_full..rows.end {
                linear_tile::<S, W, 1, C>(args, w, m0, j0, span, ahead.take());
            }
        }
        for j0 in col_full..cols.end {
            for m0 in (rows.start..rows_full).step_by(R) {
                linear_tile::<S, W, R, 1>(args, w, m0, j0, span, None);
            }
            for m0 in rows_full..rows.end {
                linear_tile::<S, W, 1, 1>(args, w, m0, j0, span, None);
            }
        }
    }
}

/// Computes one `R x C` tile of `linear` at input row `m0` and weight row `j0`, over the
/// columns of `span`. With `ahead`, it also fetches the same columns of the `C` weight rows from
/// there on.
///
/// # Safety
///
/// As for [`linear`], with `m0 + R <= rows`, `j0 + C <= n` and `span.c1 <= k`.
#[inline(always)]
unsafe fn linear_tile<S: Simd, W: VecRows<S>, const R: usize, const C: usize>(
    args: &LinearArgs<'_>,
    w: &W,
    m0: usize,
    j0: usize,
    span: Span,
    ahead: Option<usize>,
) {
    let k = args.k;
    let full = span.c1 - (span.c1 - span.c0) % S::LANES;
    // SAFETY (whole block): rows `m0..m0 + R` of `x` and `y` and weight rows `j0..j0 + C` exist,
    // and every column read is below `span.c1 <= k`.
    unsafe {
        let mut acc = [[S::zero(); C]; R];
        let x = args.x.add(m0 * k);
        let mut col = span.c0;
        while col < full {
            let mut xv = [S::zero(); R];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = S::load(x.add(r * k + col));
            }
            if let Some(next) = ahead {
                for c in 0..C {
                    w.prefetch(next + c, col);
                }
            }
            for c in 0..C {
                let wc = w.load(j0 + c, col);
                for (acc_row, &xr) in acc.iter_mut().zip(&xv) {
                    acc_row[c] = S::mul_add(xr, wc, acc_row[c]);
                }
            }
            col += S::LANES;
        }
        if col < span.c1 {
            let len = span.c1 - col;
            let mut wv = [S::zero(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = w.load_partial(j0 + c, col, len);
            }
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let xv = S::load_partial(x.add(r * k + col), len);
                for (a, &wc) in acc_row.iter_mut().zip(&wv) {
                    *a = S::mul_add(xv, wc, *a);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            let sums = reduce_row::<S, C>(acc_row);
            let out = args.y.add((m0 + r) * args.n + j0);
            for (c, &sum) in sums.iter().enumerate() {
                let start = match (span.first, args.bias) {
                    (true, Some(b)) => *b.get_unchecked(j0 + c),
                    (true, None) => 0.0,
                    (false, _) => *out.add(c),
                };
                *out.add(c) = start + sum * w.row_scale(j0 + c);
            }
        }
    }
}

/// Sums the lanes of each of `C` accumulators, four at a time where possible.
#[inline(always)]
unsafe fn reduce_row<S: Simd, const C: usize>(acc: &[S::V; C]) -> [f32; C] {
    let mut sums = [0f32; C];
    let mut c = 0;
    // SAFETY (whole block): only needs the CPU support the caller guarantees.
    unsafe {
        while c + 4 <= C {
            let four = S::reduce_add4([acc[c], acc[c + 1], acc[c + 2], acc[c + 3]]);
            sums[c..c + 4].copy_from_slice(&four);
            c += 4;
        }
        while c < C {
            sums[c] = S::reduce_add(acc[c]);
            c += 1;
        }
    }
    sums
}

/// Computes `c[m, n] = Σ_p a[m, p] · b[p, n]` (row-major) with tiles of `R` rows by `V` vectors
/// of columns, plus narrower tiles for the edges.
///
/// # Safety
///
/// The CPU must support `S`; `a` must be valid for `m * k` reads, `b` for `k * n` reads and `c`
/// for `m * n` writes.
#[inline(always)]
pub(crate) unsafe fn matmul<S: Simd, const R: usize, const V: usize>(
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    m: usize,
    k: usize,
    n: usize,
) {
    const { assert!(S::LANES <= MAX_LANES) };
    let dims = MatmulDims { a, b, c, k, n };
    let rows_full = m - m % R;
    // SAFETY: the row blocks cover `0..m` without overlap, inside the caller's contract.
    unsafe {
        for i0 in (0..rows_full).step_by(R) {
            matmul_rows::<S, R, V>(&dims, i0);
        }
        for i0 in rows_full..m {
            matmul_rows::<S, 1, V>(&dims, i0);
        }
    }
}

/// Pointers and extents shared by the tiles of one `matmul`.
struct MatmulDims {
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    k: usize,
    n: usize,
}

/// All output columns of rows `i0..i0 + R`.
///
/// # Safety
///
/// As for [`matmul`], with `i0 + R <= m`.
#[inline(always)]
unsafe fn matmul_rows<S: Simd, const R: usize, const V: usize>(d: &MatmulDims, i0: usize) {
    let wide = V * S::LANES;
    let mut j0 = 0;
    // SAFETY (whole block): each tile covers columns `j0..j0 + width` with `j0 + width <= n`.
    unsafe {
        while j0 + wide <= d.n {
            matmul_tile::<S, R, V>(d, i0, j0, S::LANES);
            j0 += wide;
        }
        // Two vectors keep twice as many independent accumulators as one, as in attention
        // with heads of 32 values on 16-lane vectors.
        while V > 2 && j0 + 2 * S::LANES <= d.n {
            matmul_tile::<S, R, 2>(d, i0, j0, S::LANES);
            j0 += 2 * S::LANES;
        }
        while j0 + S::LANES <= d.n {
            matmul_tile::<S, R, 1>(d, i0, j0, S::LANES);
            j0 += S::LANES;
        }
        if j0 < d.n {
            matmul_tile::<S, R, 1>(d, i0, j0, d.n - j0);
        }
    }
}

/// One tile of `R` rows by `V` vectors at column `j0`; with `last < LANES` the tile is a single
/// vector (`V == 1`) of which only the first `last` columns exist.
///
/// # Safety
///
/// As for [`matmul`], with `i0 + R <= m` and `j0 + (V - 1) * LANES + last <= n`.
#[inline(always)]
unsafe fn matmul_tile<S: Simd, const R: usize, const V: usize>(
    d: &MatmulDims,
    i0: usize,
    j0: usize,
    last: usize,
) {
    let partial = last < S::LANES;
    debug_assert!(!partial || V == 1);
    // SAFETY (whole block): reads of `a` stay in rows `i0..i0 + R`, reads of `b` and writes of
    // `c` in columns `j0..j0 + (V - 1) * LANES + last`, both inside the caller's contract.
    unsafe {
        let mut acc = [[S::zero(); V]; R];
        for p in 0..d.k {
            let brow = d.b.add(p * d.n + j0);
            let mut bv = [S::zero(); V];
            for (v, b) in bv.iter_mut().enumerate() {
                *b = if partial {
                    S::load_partial(brow, last)
                } else {
                    S::load(brow.add(v * S::LANES))
                };
            }
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let av = S::splat(*d.a.add((i0 + r) * d.k + p));
                for (a, &b) in acc_row.iter_mut().zip(&bv) {
                    *a = S::mul_add(av, b, *a);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            let crow = d.c.add((i0 + r) * d.n + j0);
            for (v, &a) in acc_row.iter().enumerate() {
                if partial {
                    S::store_partial(crow, a, last);
                } else {
                    S::store(crow.add(v * S::LANES), a);
                }
            }
        }
    }
}
