//! `linear` and `matmul` on every instruction set this CPU supports, next to the portable
//! kernels they replace, and, where the CPU has integer kernels, int8 weights with int8 inputs
//! quantized in groups of 32 (`linear_int8`) and per row (`linear_int8_rows`). Shapes are those
//! of a 384-wide transformer (MiniLM): the feed-forward layers at 1 and 128 tokens, and one
//! head's two attention products. Fused attention (`attention_head` and its portable version)
//! runs one head at 128 and 512 tokens next to the unfused product, softmax and product. A
//! low-rank pair runs over all rows at once and in blocks of rows, as a fused pair would. The
//! transposes of a 12-head attention block's inputs and output run at 128 tokens. Inputs
//! start on 64-byte boundaries, as weights in a packed file and tensors in a session arena do.
//!
//! Run with `cargo bench -p edgefold-runtime --bench kernels`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgefold_runtime::format::MAX_RANK;
use edgefold_runtime::kernels::attention::{attention_head, portable, HeadDims};
use edgefold_runtime::kernels::generic::{softmax, transpose_bytes, F32Rows, I8Rows};
use edgefold_runtime::kernels::{
    int8_products_supported, linear_int8, linear_int8_rows, linear_with, matmul_with, Isa, Weights,
};
use edgefold_runtime::Shape;

/// A copy of `values` that starts on a 64-byte boundary.
struct Aligned<T> {
    storage: Vec<T>,
    offset: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    fn new(values: &[T]) -> Self {
        let mut storage = vec![T::default(); values.len() + 64];
        let offset = storage.as_ptr().align_offset(64);
        storage[offset..offset + values.len()].copy_from_slice(values);
        Aligned { storage, offset, len: values.len() }
    }

    fn get(&self) -> &[T] {
        &self.storage[self.offset..self.offset + self.len]
    }

    fn get_mut(&mut self) -> &mut [T] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// Deterministic values in [-1, 1) from a linear congruential generator.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn supported() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|isa| isa.is_supported()).collect()
}

fn bench_linear(c: &mut Criterion) {
    for (k, n) in [(384, 1536), (1536, 384)] {
        let floats = values(n * k, 1);
        let quantized: Vec<i8> = floats.iter().map(|&v| (v * 127.0) as i8).collect();
        let (w, q) = (Aligned::new(&floats), Aligned::new(&quantized));
        let scales = vec![1.0 / 127.0; n];
        let bias = values(n, 2);
        for rows in [1, 128] {
            let x = Aligned::new(&values(rows * k, 3));
            let mut y = Aligned::new(&vec![0f32; rows * n]);
            let mut group = c.benchmark_group(format!("linear/rows{rows}_k{k}_n{n}"));
            group.throughput(Throughput::Elements((rows * k * n) as u64));
            if rows > 1 {
                group.sample_size(20);
            }
            for isa in supported() {
                let kinds = [
                    ("f32", Weights::F32(F32Rows { w: w.get(), k })),
                    ("int8", Weights::I8(I8Rows { q: q.get(), scales: &scales, k })),
                ];
                for (kind, weights) in kinds {
                    group.bench_function(BenchmarkId::new(kind, isa), |b| {
                        b.iter(|| {
                            let x = black_box(x.get());
                            linear_with(isa, x, rows, k, weights, n, Some(&bias), y.get_mut())
                        })
                    });
                }
            }
            if int8_products_supported() {
                let weights = Weights::I8(I8Rows { q: q.get(), scales: &scales, k });
                let kernels = [
                    ("int8 x int8, groups", linear_int8 as edgefold_runtime::kernels::LinearKernel),
                    ("int8 x int8, rows", linear_int8_rows),
                ];
                for (name, kernel) in kernels {
                    group.bench_function(BenchmarkId::from_parameter(name), |b| {
                        b.iter(|| {
                            let x = black_box(x.get());
                            kernel(x, rows, k, weights, n, Some(&bias), y.get_mut())
                        })
                    });
                }
            }
            group.finish();
        }
    }
}

fn bench_matmul(c: &mut Criterion) {
    for (m, k, n) in [(128, 32, 128), (128, 128, 32)] {
        bench_matmul_shape(c, m, k, n);
    }
}

fn bench_matmul_shape(c: &mut Criterion, m: usize, k: usize, n: usize) {
    let a = Aligned::new(&values(m * k, 4));
    let b = Aligned::new(&values(k * n, 5));
    let mut out = Aligned::new(&vec![0f32; m * n]);
    let mut group = c.benchmark_group(format!("matmul/{m}x{k}x{n}"));
    group.throughput(Throughput::Elements((m * k * n) as u64));
    for isa in supported() {
        group.bench_function(BenchmarkId::from_parameter(isa), |bench| {
            bench.iter(|| {
                let (a, b) = (black_box(a.get()), black_box(b.get()));
                matmul_with(isa, a, b, out.get_mut(), m, k, n)
            })
        });
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    for seq in [128, 512] {
        let (depth, width) = (32, 32);
        let dims = HeadDims { queries: seq, depth, keys: seq, width };
        let q = Aligned::new(&values(seq * depth, 6));
        let k = Aligned::new(&values(depth * seq, 7));
        let v = Aligned::new(&values(seq * width, 8));
        let mask = Aligned::new(&vec![0f32; seq]);
        let mut scores = Aligned::new(&vec![0f32; seq * seq]);
        let mut probs = Aligned::new(&vec![0f32; seq * seq]);
        let mut out = Aligned::new(&vec![0f32; seq * width]);
        let scale = 1.0 / (depth as f32).sqrt();
        let mut group = c.benchmark_group(format!("attention/{seq}x{depth}"));
        group.throughput(Throughput::Elements((seq * seq * (depth + width)) as u64));
        group.bench_function("fused", |bench| {
            bench.iter(|| {
                let (q, k, v) = (black_box(q.get()), black_box(k.get()), black_box(v.get()));
                attention_head(q, k, v, None, scale, dims, out.get_mut())
            })
        });
        group.bench_function("fused-portable", |bench| {
            bench.iter(|| {
                let (q, k, v) = (black_box(q.get()), black_box(k.get()), black_box(v.get()));
                portable(q, k, v, None, scale, dims, out.get_mut())
            })
        });
        // What the ops did before fusion: product, scale and mask, softmax, product.
        let isa = Isa::best();
        group.bench_function("unfused", |bench| {
            bench.iter(|| {
                let (q, k, v) = (black_box(q.get()), black_box(k.get()), black_box(v.get()));
                matmul_with(isa, q, k, scores.get_mut(), seq, depth, seq);
                for row in scores.get_mut().chunks_exact_mut(seq) {
                    for (s, m) in row.iter_mut().zip(mask.get()) {
                        *s = *s * scale + m;
                    }
                }
                softmax(scores.get(), probs.get_mut(), seq, seq, 1);
                matmul_with(isa, probs.get(), v, out.get_mut(), seq, seq, width)
            })
        });
        group.finish();
    }
}

/// Times a low-rank pair `y = (x Vᵀ) Uᵀ` of rank 96 in place of a 384 x 1536 weight, at 128 rows.
/// The two products run over all rows with the intermediate in memory, as a session runs them,
/// and in blocks of rows whose intermediate stays in a small buffer, as a fused pair would.
fn bench_low_rank(c: &mut Criterion) {
    let (rows, k, rank, n) = (128, 384, 96, 1536);
    let (v, u) = (Aligned::new(&values(rank * k, 9)), Aligned::new(&values(n * rank, 10)));
    let to_int8 = |w: &[f32]| w.iter().map(|&v| (v * 127.0) as i8).collect::<Vec<_>>();
    let (vq, uq) = (Aligned::new(&to_int8(v.get())), Aligned::new(&to_int8(u.get())));
    let (v_scales, u_scales) = (vec![1.0 / 127.0; rank], vec![1.0 / 127.0; n]);
    let x = Aligned::new(&values(rows * k, 11));
    let mut middle = Aligned::new(&vec![0f32; rows * rank]);
    let mut y = Aligned::new(&vec![0f32; rows * n]);

    let mut group = c.benchmark_group(format!("low_rank/rows{rows}_k{k}_rank{rank}_n{n}"));
    group.throughput(Throughput::Elements((rows * rank * (k + n)) as u64));
    group.sample_size(20);
    let mut cases = vec![(
        "f32",
        edgefold_runtime::kernels::linear as edgefold_runtime::kernels::LinearKernel,
        Weights::F32(F32Rows { w: v.get(), k }),
        Weights::F32(F32Rows { w: u.get(), k: rank }),
    )];
    if int8_products_supported() {
        cases.push((
            "int8 x int8, rows",
            linear_int8_rows,
            Weights::I8(I8Rows { q: vq.get(), scales: &v_scales, k }),
            Weights::I8(I8Rows { q: uq.get(), scales: &u_scales, k: rank }),
        ));
    }

    for (kind, kernel, first, second) in cases {
        for block in [rows, 32, 16] {
            let name = match block == rows {
                true => format!("{kind}, whole"),
                false => format!("{kind}, blocks of {block} rows"),
            };
            group.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    let x = black_box(x.get());
                    let (middle, y) = (middle.get_mut(), y.get_mut());
                    for start in (0..rows).step_by(block) {
                        let count = block.min(rows - start);
                        let t = &mut middle[..count * rank];
                        kernel(&x[start * k..(start + count) * k], count, k, first, rank, None, t);
                        let out = &mut y[start * n..(start + count) * n];
                        kernel(t, count, rank, second, n, None, out);
                    }
                })
            });
        }
    }
    group.finish();
}

/// Times the transposes around a 12-head attention block at 128 tokens, on f32 values given as
/// bytes as sessions give them. Queries, values and outputs swap the sequence and head axes, so
/// whole rows of 32 values move. Keys also move the sequence axis last, so each value moves alone.
fn bench_transpose(c: &mut Criterion) {
    let (seq, heads, depth) = (128, 12, 32);
    let shape = Shape::from_slice(&[1, seq, heads, depth]).expect("rank 4");
    let x: Vec<u8> = values(seq * heads * depth, 12).iter().flat_map(|v| v.to_le_bytes()).collect();
    let x = Aligned::new(&x);
    let mut out = Aligned::new(&vec![0u8; x.len]);
    let mut group = c.benchmark_group(format!("transpose/{seq}x{heads}x{depth}"));
    group.throughput(Throughput::Bytes(x.len as u64));
    for (name, order) in [("heads first", [0u8, 2, 1, 3]), ("keys as columns", [0, 2, 3, 1])] {
        let mut perm = [0u8; MAX_RANK];
        perm[..4].copy_from_slice(&order);
        group.bench_function(name, |b| {
            b.iter(|| transpose_bytes(black_box(x.get()), &shape, &perm, out.get_mut(), 4))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_linear,
    bench_matmul,
    bench_attention,
    bench_low_rank,
    bench_transpose
);
criterion_main!(benches);
