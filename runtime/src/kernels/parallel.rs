//! [`linear`] and [`matmul_batch`] split across threads, with the `std` feature.
//!
//! Each call splits its work into one contiguous part per thread. The calling thread runs the
//! first part and rayon's global pool the others, so the worker threads are started once per
//! process and only woken for each call. Each part gets at least [`MIN_MACS_PER_THREAD`]
//! multiply-adds. The pool has one thread per core unless `RAYON_NUM_THREADS` says otherwise;
//! asking for more parts than it has threads queues the extra parts.
//!
//! NOTE: that minimum was not tuned. At the 16 G multiply-adds per second measured for the AVX2
//! kernel it is about 16 µs of work.
//!
//! Work is split by rows of the output, so each output value is computed by the same kernel
//! in the same order as on one thread. The exception is the one the note on [`linear`] describes.
//! With int4 weights (and f16 on AVX-512 and NEON) a row's result can depend on how many rows
//! share the call, so a part with fewer rows can round differently. Results for a given thread
//! count repeat exactly.

use super::generic::{F16Rows, F32Rows, I4Rows, I8Rows};
use super::{linear, linear_int8, matmul_batch, Weights};

/// Minimum multiply-adds per thread. A smaller call runs on fewer threads.
pub const MIN_MACS_PER_THREAD: usize = 1 << 18;

/// Returns the thread count for `macs` multiply-adds, at most `threads` and at most `parts`.
fn threads_for(threads: usize, macs: usize, parts: usize) -> usize {
    threads.min(parts).min(macs / MIN_MACS_PER_THREAD).max(1)
}

/// A `linear` kernel: [`linear`] or [`linear_int8`].
pub type LinearKernel =
    for<'a> fn(&'a [f32], usize, usize, Weights<'a>, usize, Option<&'a [f32]>, &'a mut [f32]);

/// Runs [`linear`] on up to `threads` threads. The rows of `x` are split into contiguous parts,
/// or, for a single row, the rows of `w` (the outputs).
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
    linear_threads_with(linear, threads, x, rows, k, w, n, bias, y);
}

/// [`linear_threads`] running `kernel` on each part.
///
/// # Panics
///
/// As `kernel` does, or if a thread panics.
#[allow(clippy::too_many_arguments)]
pub fn linear_threads_with(
    kernel: LinearKernel,
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
    // A single row is split by outputs, more rows by rows.
    let splittable = if rows == 1 { n } else { rows };
    let parts = threads_for(threads, macs, splittable);
    match (parts, rows) {
        (1, _) => kernel(x, rows, k, w, n, bias, y),
        (_, 1) => linear_by_outputs(kernel, parts, x, k, w, n, bias, y),
        _ => linear_by_rows(kernel, parts, x, rows, k, w, n, bias, y),
    }
}

/// [`linear_threads`] with [`linear_int8`].
///
/// # Panics
///
/// As [`linear`] does, or if a thread panics.
#[allow(clippy::too_many_arguments)]
pub fn linear_int8_threads(
    threads: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    linear_threads_with(linear_int8, threads, x, rows, k, w, n, bias, y);
}

/// Runs `kernel` with the rows of `x` split into `parts` contiguous parts, one per thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_by_rows(
    kernel: LinearKernel,
    parts: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let per = rows.div_ceil(parts);
    let x = &x[..rows * k];
    let y = &mut y[..rows * n];
    rayon_core::in_place_scope(|s| {
        let mut jobs = x.chunks(per * k).zip(y.chunks_mut(per * n));
        let first = jobs.next();
        for (xs, ys) in jobs {
            s.spawn(move |_| kernel(xs, xs.len() / k.max(1), k, w, n, bias, ys));
        }
        if let Some((xs, ys)) = first {
            kernel(xs, xs.len() / k.max(1), k, w, n, bias, ys);
        }
    });
}

/// Runs `kernel` on one row with the outputs split into `parts` contiguous parts, one per
/// thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_by_outputs(
    kernel: LinearKernel,
    parts: usize,
    x: &[f32],
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let per = n.div_ceil(parts);
    let y = &mut y[..n];
    rayon_core::in_place_scope(|s| {
        let mut jobs = y.chunks_mut(per).enumerate();
        let first = jobs.next();
        for (i, ys) in jobs {
            let (start, count) = (i * per, ys.len());
            let w = weight_rows(w, start, count);
            let b = bias.map(|b| &b[start..start + count]);
            s.spawn(move |_| kernel(x, 1, k, w, count, b, ys));
        }
        if let Some((_, ys)) = first {
            let count = ys.len();
            kernel(x, 1, k, weight_rows(w, 0, count), count, bias.map(|b| &b[..count]), ys);
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
    rayon_core::in_place_scope(|s| {
        let mut jobs = c.chunks_mut(per * size).enumerate();
        let first = jobs.next();
        for (i, cs) in jobs {
            s.spawn(move |_| run(i * per, cs));
        }
        if let Some((_, cs)) = first {
            run(0, cs);
        }
    });
}
