//! Measures this machine's roofline: the peak f32 multiply-add rate of one core and of all cores,
//! and the memory read bandwidth of one and all cores. Then it times the runtime's f32 `linear`
//! kernel on the feed-forward shape of a 384-wide transformer at 128 tokens (an f32 GEMM of
//! 384x1536 by 1536x128) and reports it as a fraction of the one-core peak.
//!
//! Run with `cargo run --release -p edgefold-runtime --example roofline [-- --json]`.
//!
//! The peak comes from independent chains of fused multiply-adds on the widest vectors this CPU
//! has (AVX-512, else AVX2 with FMA), with enough chains to hide the FMA latency. The bandwidth
//! comes from summing a 1 GiB buffer, far larger than any cache. Each figure is the best of several timed
//! repetitions, which is the rate the hardware allows when nothing else interrupts.

use std::hint::black_box;
use std::time::Instant;

use edgefold_runtime::kernels::generic::F32Rows;
use edgefold_runtime::kernels::{linear, Isa, Weights};

/// Fused multiply-adds per chain and timed repetition of the peak kernel.
const PEAK_STEPS: usize = 20_000_000;
/// Bytes summed by the bandwidth kernel: far beyond the last-level cache.
const STREAM_BYTES: usize = 1 << 30;
/// Timed repetitions of the peak and bandwidth kernels; the best is kept.
const REPEATS: usize = 10;
/// Timed repetitions of the GEMM, each of 10 calls. More than for the peak, because a call is
/// short and more exposed to interruptions on a shared machine.
const GEMM_REPEATS: usize = 30;

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    let peak_one = best_rate(|| peak_flops(PEAK_STEPS));
    let peak_all = best_rate(|| in_parallel(cores, || peak_flops(PEAK_STEPS)));

    let buffer = vec![1.0f32; STREAM_BYTES / 4];
    let read_one = best_rate(|| (sum_bytes(&buffer), STREAM_BYTES as f64));
    let read_all = best_rate(|| {
        let chunk = buffer.len().div_ceil(cores);
        std::thread::scope(|s| {
            let parts: Vec<_> =
                buffer.chunks(chunk).map(|part| s.spawn(move || sum_bytes(part))).collect();
            let sum: f32 = parts.into_iter().map(|p| p.join().expect("a reader panicked")).sum();
            (sum, STREAM_BYTES as f64)
        })
    });
    drop(buffer);

    // y[128, 384] = x[128, 1536] · w[384, 1536]ᵀ: the feed-forward output projection of a
    // 384-wide transformer at 128 tokens.
    let (rows, k, n) = (128usize, 1536usize, 384usize);
    let x = pattern(rows * k, 1);
    let w = pattern(n * k, 2);
    let mut y = vec![0f32; rows * n];
    let gemm_flops = 2.0 * (rows * k * n) as f64;
    let gemm = best_rate_of(GEMM_REPEATS, || {
        let weights = Weights::F32(F32Rows { w: &w, k });
        for _ in 0..10 {
            linear(black_box(&x), rows, k, weights, n, None, &mut y);
        }
        (y[0], 10.0 * gemm_flops)
    });

    let isa = Isa::best();
    if json {
        println!(
            "{{\"cores\":{cores},\"isa\":\"{isa}\",\"peak_gflops_one_core\":{:.2},\
             \"peak_gflops_all_cores\":{:.2},\"read_gbytes_per_s_one_core\":{:.2},\
             \"read_gbytes_per_s_all_cores\":{:.2},\"gemm_gflops\":{:.2},\
             \"gemm_fraction_of_peak\":{:.3}}}",
            peak_one / 1e9,
            peak_all / 1e9,
            read_one / 1e9,
            read_all / 1e9,
            gemm / 1e9,
            gemm / peak_one
        );
    } else {
        println!("cores: {cores}; linear kernels: {isa}");
        println!(
            "peak f32 FMA rate: {:.1} GFLOP/s on one core, {:.1} on {cores}",
            peak_one / 1e9,
            peak_all / 1e9
        );
        println!(
            "memory read: {:.1} GB/s on one core, {:.1} on {cores}",
            read_one / 1e9,
            read_all / 1e9
        );
        println!(
            "f32 GEMM 384x1536 by 1536x128 (linear, 128 rows): {:.1} GFLOP/s = {:.0} % of the \
             one-core peak",
            gemm / 1e9,
            100.0 * gemm / peak_one
        );
    }
}

/// Runs `work`, which returns a value to keep alive and how many units it processed, several
/// times, and returns the best rate in units per second.
fn best_rate<T>(work: impl FnMut() -> (T, f64)) -> f64 {
    best_rate_of(REPEATS, work)
}

/// Runs `work` `repeats` times, as [`best_rate`] does, and returns the best rate.
fn best_rate_of<T>(repeats: usize, mut work: impl FnMut() -> (T, f64)) -> f64 {
    let mut best = 0f64;
    for _ in 0..repeats {
        let start = Instant::now();
        let (kept, units) = work();
        let seconds = start.elapsed().as_secs_f64();
        black_box(kept);
        best = best.max(units / seconds);
    }
    best
}

/// Runs `work` on `threads` threads at once and adds up the units they report.
fn in_parallel(threads: usize, work: impl Fn() -> (f32, f64) + Sync) -> (f32, f64) {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(&work)).collect();
        handles.into_iter().fold((0.0, 0.0), |(v, u), h| {
            let (value, units) = h.join().expect("a peak thread panicked");
            (v + value, u + units)
        })
    })
}

/// Sums `values` with several independent vector accumulators.
fn sum_bytes(values: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let mut chunks = values.chunks_exact(64);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Runs `steps` fused multiply-adds on each of several independent accumulators. Returns a
/// value to keep alive and the floating-point operations done (2 per lane and step).
fn peak_flops(steps: usize) -> (f32, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { x86::peak_avx512(steps) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { x86::peak_avx2(steps) };
        }
    }
    portable_peak(steps)
}

/// Runs the peak kernel in portable code, for CPUs without the vector paths above.
fn portable_peak(steps: usize) -> (f32, f64) {
    let mut acc = [0f32; 32];
    let (a, b) = (black_box(0.999_999f32), black_box(1e-7f32));
    for _ in 0..steps / 4 {
        for v in acc.iter_mut() {
            *v = v.mul_add(a, b);
        }
    }
    (acc.iter().sum(), 2.0 * 32.0 * (steps / 4) as f64)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Independent accumulators: enough to cover an FMA latency of 4 cycles on 2 ports, with
    /// room to spare.
    const CHAINS: usize = 12;

    #[target_feature(enable = "avx512f")]
    pub(super) fn peak_avx512(steps: usize) -> (f32, f64) {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut sum = 0f32;
        for v in acc {
            sum += _mm512_reduce_add_ps(v);
        }
        (sum, 2.0 * 16.0 * (CHAINS * steps) as f64)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn peak_avx2(steps: usize) -> (f32, f64) {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let mut sum = 0f32;
        for v in acc {
            // SAFETY: `lanes` has room for 8 f32 values, the width of one AVX register; the store
            // needs no alignment.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
            sum += lanes.iter().sum::<f32>();
        }
        (sum, 2.0 * 8.0 * (CHAINS * steps) as f64)
    }
}

/// Returns `len` values in [-1, 1) in a repeating pattern: the timing does not depend on them,
/// only on their being finite and not all zero.
fn pattern(len: usize, offset: usize) -> Vec<f32> {
    (0..len).map(|i| ((i + offset) % 97) as f32 / 48.5 - 1.0).collect()
}
