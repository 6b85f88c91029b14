//! [`linear`] and [`matmul_batch`] split across threads, with the `std` feature.
//!
//! Each call splits its work into one contiguous part per thread. The calling thread and the
//! workers of [`super::pool`], started once per process, share the parts. Each part gets at least
//! [`MIN_MACS_PER_THREAD`] multiply-adds.
//!
//! The minimum was measured on SmolLM2 generation (2 threads, int4 weights, int8 activations,
//! Xeon with AVX-512). 2^16 gave 114 to 127 tokens/s where 2^18 gave 96 to 99, because with 2^18
//! the 576 x 576 attention projections ran on one thread.
//! NOTE: it was not measured on other CPUs or with more than 2 threads.
//!
//! Work is split by rows of the output or by outputs, so each output value is computed by the
//! same kernel in the same order as on one thread. The broadcast AVX-512 kernel takes f32
//! weights from 16 rows, int4 in groups of a multiple of 16 from 32, and f16 and int8 from 16
//! (64 on Zen 4). A call that takes it is split by rows only into parts that keep that many
//! rows, so that every part takes it too. Where that leaves fewer parts than threads, as for 16
//! to 31 rows of f32 weights on two threads, the call is split by outputs instead: every part
//! then has all the rows. Int8 weights with int8 activations over whole rows
//! ([`linear_int8_rows_threads`]) split by rows at any size. The exception is the one the note on [`linear`] describes: with int4 and f16 weights
//! below that kernel, a part with fewer rows can round differently. Results for a given thread
//! count repeat exactly.

use super::generic::{F16Rows, F32Rows, I4Rows, I8Rows};
use super::{activate, linear, matmul_batch, pool, Weights};
use crate::ops::Activation;

/// Minimum multiply-adds per thread. A smaller call runs on fewer threads.
pub const MIN_MACS_PER_THREAD: usize = 1 << 16;

/// Returns the thread count for `macs` multiply-adds, at most `threads` and at most `parts`.
fn threads_for(threads: usize, macs: usize, parts: usize) -> usize {
    threads.min(parts).min(macs / MIN_MACS_PER_THREAD).max(1)
}

pub use super::LinearKernel;

/// Runs [`linear`] on up to `threads` threads. The rows of `x` are split into contiguous parts.
/// A single row, or rows too few for each part to take the kernel the whole call takes, has its
/// outputs (the rows of `w`) split instead.
///
/// # Panics
///
/// As [`linear`] does, or if a thread panics.
#[allow(clippy::too_many_arguments)]
pub fn linear_threads(
    threads: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    linear_threads_with(linear, None, threads, x, rows, k, w, n, bias, y);
}

/// [`linear_threads`] running `kernel` on each part, then `activation`, if any, on the part's
/// outputs while they are still in the thread's cache.
///
/// # Panics
///
/// As `kernel` does, or if a thread panics.
#[allow(clippy::too_many_arguments)]
pub fn linear_threads_with(
    kernel: LinearKernel,
    activation: Option<Activation>,
    threads: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let min_rows = super::min_part_rows(&w, rows, k);
    split_linear(kernel, min_rows, activation, threads, x, rows, k, w, n, bias, y);
}

/// [`linear_threads_with`] running [`linear_int8_rows`](super::linear_int8_rows). Where that
/// kernel takes the call with integer products over whole rows, parts of rows may have any size,
/// because each row's results depend on that row alone.
///
/// # Panics
///
/// As the kernel does, or if a thread panics.
#[allow(clippy::too_many_arguments)]
pub fn linear_int8_rows_threads(
    activation: Option<Activation>,
    threads: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let min_rows = super::min_part_rows_int8_rows(&w, rows, k);
    let kernel = super::linear_int8_rows;
    split_linear(kernel, min_rows, activation, threads, x, rows, k, w, n, bias, y);
}

/// Runs `kernel` on up to `threads` threads, with parts of rows of at least `min_rows` rows.
#[allow(clippy::too_many_arguments)]
fn split_linear(
    kernel: LinearKernel,
    min_rows: usize,
    activation: Option<Activation>,
    threads: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let macs = rows.saturating_mul(k).saturating_mul(n);
    // A single row is split by outputs, more rows by rows, unless parts of rows would be too
    // small to take the kernel the whole call takes.
    let splittable = if rows == 1 { n } else { rows };
    let parts = threads_for(threads, macs, splittable);
    if parts == 1 {
        kernel(x, rows, k, w, n, bias, y);
        activate(activation, &mut y[..rows * n]);
    } else if rows == 1 || row_parts(min_rows, parts, rows) < parts.min(n) {
        linear_by_outputs(kernel, activation, parts.min(n), x, rows, k, w, n, bias, y);
    } else {
        let parts = row_parts(min_rows, parts, rows);
        linear_by_rows(kernel, activation, parts, x, rows, k, w, n, bias, y);
    }
}

/// Returns how many parts of `rows` rows to make for `parts` threads when each part must keep
/// at least `min_rows` rows, as a kernel's threshold requires.
pub(crate) fn row_parts(min_rows: usize, parts: usize, rows: usize) -> usize {
    let min_rows = min_rows.max(1);
    let mut parts = parts.min(rows / min_rows).max(1);
    // The last part gets what the others leave, which may be nothing.
    while parts > 1 && rows.saturating_sub((parts - 1) * rows.div_ceil(parts)) < min_rows {
        parts -= 1;
    }
    parts
}

/// Runs `kernel`, then `activation`, with the rows of `x` split into `parts` contiguous parts,
/// one per thread. The caller chooses `parts` with [`row_parts`], so that each part takes the
/// kernel the whole call would.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_by_rows(
    kernel: LinearKernel,
    activation: Option<Activation>,
    parts: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let per = rows.div_ceil(parts.max(1));
    let x = &x[..rows * k];
    split_mut(&mut y[..rows * n], per * n, &|i, ys| {
        let xs = &x[i * per * k..][..ys.len() / n.max(1) * k];
        kernel(xs, ys.len() / n.max(1), k, w, n, bias, ys);
        activate(activation, ys);
    });
}

std::thread_local! {
    /// Outputs of the parts of a call split by outputs, kept between calls: part `i` writes its
    /// `rows x count` outputs at `i * rows * per`, where `per` is the outputs per part.
    static PARTS: core::cell::RefCell<std::vec::Vec<f32>> =
        const { core::cell::RefCell::new(std::vec::Vec::new()) };
}

/// Runs `kernel`, then `activation`, with the outputs (the rows of `w`) split into `parts`
/// contiguous parts, one per thread. Each part reads all the rows of `x` and a part of the
/// weights. With one row, each part writes its outputs in place. With more, each part writes its
/// rows of outputs to a buffer, and the calling thread then copies them into `y`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_by_outputs(
    kernel: LinearKernel,
    activation: Option<Activation>,
    parts: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    if rows == 0 || n == 0 {
        return;
    }
    let per = n.div_ceil(parts.max(1));
    let x = &x[..rows * k];
    let run = |i: usize, ys: &mut [f32]| {
        let count = ys.len() / rows;
        let start = i * per;
        let b = bias.map(|b| &b[start..start + count]);
        kernel(x, rows, k, weight_rows(w, start, count), count, b, ys);
        activate(activation, ys);
    };
    let y = &mut y[..rows * n];
    if rows == 1 {
        return split_mut(y, per, &run);
    }
    PARTS.with(|cell| {
        // Nothing run here splits a call again on this thread, so the buffer is never borrowed
        // twice; a second borrow would panic rather than alias.
        let mut buffer = cell.borrow_mut();
        if buffer.len() < rows * n {
            buffer.resize(rows * n, 0.0);
        }
        split_mut(&mut buffer[..rows * n], rows * per, &run);
        for (i, part) in buffer[..rows * n].chunks(rows * per).enumerate() {
            let count = part.len() / rows;
            for (m, outputs) in part.chunks_exact(count).enumerate() {
                y[m * n + i * per..][..count].copy_from_slice(outputs);
            }
        }
    });
}

/// Rows `start..start + count` of `w`.
///
/// # Panics
///
/// Panics if `w` has fewer rows.
fn weight_rows(w: Weights<'_>, start: usize, count: usize) -> Weights<'_> {
    let end = start + count;
    match w {
        Weights::F32(r) => Weights::F32(F32Rows { w: &r.w[start * r.k..end * r.k], k: r.k }),
        Weights::F16(r) => Weights::F16(F16Rows { w: &r.w[start * r.k..end * r.k], k: r.k }),
        Weights::I8(r) => Weights::I8(I8Rows {
            q: &r.q[start * r.k..end * r.k],
            scales: &r.scales[start..end],
            k: r.k,
        }),
        Weights::I4(r) => {
            let (bytes, groups) = (r.k.div_ceil(2), r.k / r.group.max(1));
            Weights::I4(I4Rows {
                packed: &r.packed[start * bytes..end * bytes],
                scales: &r.scales[start * groups..end * groups],
                mins: r.mins.map(|m| &m[start * groups..end * groups]),
                k: r.k,
                group: r.group,
            })
        }
    }
}

/// Runs [`matmul_batch`] on up to `threads` threads, each taking a contiguous part of the
/// products.
///
/// # Panics
///
/// As [`matmul_batch`] does, or if a thread panics.
#[allow(clippy::too_many_arguments)]
pub fn matmul_batch_threads<'a>(
    threads: usize,
    count: usize,
    a: impl Fn(usize) -> &'a [f32] + Sync,
    b: impl Fn(usize) -> &'a [f32] + Sync,
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    let macs = count.saturating_mul(m).saturating_mul(k).saturating_mul(n);
    matmul_batch_parts(threads_for(threads, macs, count), count, a, b, c, m, k, n);
}

/// Runs [`matmul_batch_threads`] split into exactly `parts` parts (fewer when `count` is
/// smaller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_batch_parts<'a>(
    parts: usize,
    count: usize,
    a: impl Fn(usize) -> &'a [f32] + Sync,
    b: impl Fn(usize) -> &'a [f32] + Sync,
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    let size = m * n;
    let parts = parts.clamp(1, count.max(1));
    if parts == 1 || size == 0 {
        return matmul_batch(count, a, b, c, m, k, n);
    }
    let c = &mut c[..count * size];
    let per = count.div_ceil(parts);
    let (a, b) = (&a, &b);
    let run = move |first: usize, out: &mut [f32]| {
        matmul_batch(out.len() / size, |j| a(first + j), |j| b(first + j), out, m, k, n);
    };
    split_mut(c, per * size, &|i, cs| run(i * per, cs));
}

/// Calls `f(i, part)` for each of the `count` consecutive `len`-long parts of `out`, on up to
/// `threads` threads (fewer for fewer than [`MIN_MACS_PER_THREAD`] multiply-adds per thread, out
/// of `macs` in all). Each thread takes a contiguous run of parts.
pub(crate) fn for_each_part(
    threads: usize,
    count: usize,
    macs: usize,
    len: usize,
    out: &mut [f32],
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    if len == 0 {
        return;
    }
    let out = &mut out[..count * len];
    let threads = threads_for(threads, macs, count);
    if threads <= 1 {
        for (i, part) in out.chunks_exact_mut(len).enumerate() {
            f(i, part);
        }
        return;
    }
    let per = count.div_ceil(threads);
    split_mut(out, per * len, &|p, run| {
        for (j, part) in run.chunks_exact_mut(len).enumerate() {
            f(p * per + j, part);
        }
    });
}

/// Calls `f(i, chunk)` for each of the consecutive `chunk`-long parts of `data` (the last may be
/// shorter) on the worker pool, the calling thread taking a part too.
fn split_mut(data: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    if chunk == 0 || data.is_empty() {
        return;
    }
    let len = data.len();
    let parts = len.div_ceil(chunk);
    let base = SharedMut(data.as_mut_ptr());
    pool::run(parts, &|i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: `pool::run` calls this once for each `i < parts`, so the ranges
        // `start..end` are inside `data` and never overlap, and `data` stays borrowed until
        // every call has returned.
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, part);
    });
}

/// A pointer into a slice that the parts of one job write in disjoint ranges.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

impl SharedMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: each part writes its own range of the slice (see `split_mut`).
unsafe impl Send for SharedMut {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl Sync for SharedMut {}
