//! One battery for every instruction set this CPU supports: `linear` over the four weight kinds
//! and `matmul`, against a naive f64 reference, over odd sizes and pseudo-random data.
//!
//! The tolerance is `(k + 2) · ε(f32) · Σ|terms|`, the worst-case rounding bound of a k-term f32
//! sum plus the dequantization product, so a missing, doubled or misplaced term fails.

use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

use super::generic::{F16Rows, F32Rows, I4Rows, I8Rows};
use super::{linear, linear_int8, linear_int8_rows, linear_with, matmul_with, Isa, Weights};

/// Row lengths: around the 8- and 16-lane widths, around a 384-wide layer, and 100.
#[cfg(not(miri))]
const K_SIZES: &[usize] = &[1, 3, 7, 15, 17, 31, 33, 100, 383, 385];
/// Under Miri, which interprets every operation and only runs the portable kernels: a single
/// value and one length past the 8- and 16-lane widths.
#[cfg(miri)]
const K_SIZES: &[usize] = &[1, 17];

/// Row counts of the small-shape batteries: every count up to 9 (the tile heights are at most 8),
/// under Miri one row and one past a tile of 8.
const SMALL_ROWS: &[usize] = if cfg!(miri) { &[1, 9] } else { &[1, 2, 3, 4, 5, 6, 7, 8, 9] };

/// Output widths of the small-shape batteries: every width up to 40 (up to two 16-lane vectors
/// and a remainder), under Miri one width and one past the 16-lane width.
fn small_widths() -> Vec<usize> {
    if cfg!(miri) {
        vec![1, 17]
    } else {
        (1..=40).collect()
    }
}

/// A value written into output slots past the shape, which no kernel may overwrite.
const CANARY: f32 = -7.5e30;

/// splitmix64: small, deterministic and good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn signed_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.signed_unit()).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    F32,
    F16,
    I8,
    I4,
    /// Int4 with a minimum per group.
    I4Min,
}

impl Kind {
    fn is_int4(self) -> bool {
        matches!(self, Kind::I4 | Kind::I4Min)
    }
}

/// Owned weights of one kind, with their exact values for the reference.
struct TestWeights {
    kind: Kind,
    k: usize,
    values: Vec<f32>,
    bits: Vec<u16>,
    q: Vec<i8>,
    packed: Vec<u8>,
    scales: Vec<f32>,
    scale_bits: Vec<u16>,
    min_bits: Vec<u16>,
    group: usize,
    /// Dequantized weights `[n, k]`.
    exact: Vec<f64>,
}

impl TestWeights {
    fn new(kind: Kind, n: usize, k: usize, group: usize, rng: &mut Rng) -> Self {
        let mut w = TestWeights {
            kind,
            k,
            values: Vec::new(),
            bits: Vec::new(),
            q: Vec::new(),
            packed: Vec::new(),
            scales: Vec::new(),
            scale_bits: Vec::new(),
            min_bits: Vec::new(),
            group,
            exact: Vec::new(),
        };
        match kind {
            Kind::F32 => {
                w.values = rng.vec(n * k);
                w.exact = w.values.iter().map(|&v| v as f64).collect();
            }
            Kind::F16 => {
                w.bits = (0..n * k).map(|i| random_f16_bits(i, rng)).collect();
                w.exact = w.bits.iter().map(|&b| half::f16::from_bits(b).to_f64()).collect();
            }
            Kind::I8 => w.fill_i8(n, k, rng),
            Kind::I4 | Kind::I4Min => w.fill_i4(n, k, rng),
        }
        w
    }

    fn fill_i8(&mut self, n: usize, k: usize, rng: &mut Rng) {
        self.q = (0..n * k).map(|_| rng.next_u64() as i8).collect();
        self.scales = (0..n).map(|_| 0.001 + 0.02 * (rng.signed_unit() + 1.0)).collect();
        self.exact = (0..n * k).map(|i| self.q[i] as f64 * self.scales[i / k] as f64).collect();
    }

    fn fill_i4(&mut self, n: usize, k: usize, rng: &mut Rng) {
        let row_bytes = k.div_ceil(2);
        let groups = k / self.group;
        self.packed = (0..n * row_bytes).map(|_| rng.next_u64() as u8).collect();
        self.scale_bits = (0..n * groups)
            .map(|_| half::f16::from_f32(0.01 + 0.1 * (rng.signed_unit() + 1.0)).to_bits())
            .collect();
        if self.kind == Kind::I4Min {
            self.min_bits = (0..n * groups)
                .map(|_| half::f16::from_f32(-0.8 * (rng.signed_unit() + 1.0)).to_bits())
                .collect();
        }
        self.exact = Vec::with_capacity(n * k);
        for j in 0..n {
            for c in 0..k {
                let byte = self.packed[j * row_bytes + c / 2];
                let nibble = if c.is_multiple_of(2) { byte & 0x0F } else { byte >> 4 };
                let q = ((nibble as i8) << 4) >> 4;
                let g = j * groups + c / self.group;
                let scale = half::f16::from_bits(self.scale_bits[g]).to_f64();
                self.exact.push(match self.min_bits.get(g) {
                    Some(&m) => (q as f64 + 8.0) * scale + half::f16::from_bits(m).to_f64(),
                    None => q as f64 * scale,
                });
            }
        }
    }

    fn weights(&self) -> Weights<'_> {
        let k = self.k;
        match self.kind {
            Kind::F32 => Weights::F32(F32Rows { w: &self.values, k }),
            Kind::F16 => Weights::F16(F16Rows { w: &self.bits, k }),
            Kind::I8 => Weights::I8(I8Rows { q: &self.q, scales: &self.scales, k }),
            Kind::I4 | Kind::I4Min => Weights::I4(I4Rows {
                packed: &self.packed,
                scales: &self.scale_bits,
                mins: (self.kind == Kind::I4Min).then_some(&self.min_bits[..]),
                k,
                group: self.group,
            }),
        }
    }
}

/// Mostly normal f16 values in [-1, 1), with every 13th a subnormal and every 29th a signed zero.
fn random_f16_bits(index: usize, rng: &mut Rng) -> u16 {
    let sign = if rng.next_u64() & 1 == 1 { 0x8000 } else { 0 };
    if index.is_multiple_of(29) {
        sign
    } else if index.is_multiple_of(13) {
        sign | (1 + rng.below(0x3FF)) as u16
    } else {
        half::f16::from_f32(rng.signed_unit()).to_bits()
    }
}

/// Returns the instruction sets this CPU runs.
fn supported() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|isa| isa.is_supported()).collect()
}

/// Exact result and `Σ|terms|` of one output.
fn reference_dot(terms: impl Iterator<Item = f64>, start: f64) -> (f64, f64) {
    let (mut sum, mut abs) = (start, start.abs());
    for t in terms {
        sum += t;
        abs += t.abs();
    }
    (sum, abs)
}

/// Asserts `got` is within the rounding bound of a `terms`-long f32 sum of `want`.
fn assert_close(got: f32, want: f64, abs_sum: f64, terms: usize, describe: impl Fn() -> String) {
    let tol = (terms as f64 + 2.0) * f32::EPSILON as f64 * abs_sum + 1e-30;
    let err = (got as f64 - want).abs();
    assert!(err <= tol, "{}: got {got}, expected {want} (error {err:e} > {tol:e})", describe());
}

/// Runs `linear` on every supported instruction set and checks each output and the canary.
fn check_linear(kind: Kind, rows: usize, k: usize, n: usize, group: usize, seed: u64) {
    let mut rng = Rng(seed);
    let x = rng.vec(rows * k);
    let w = TestWeights::new(kind, n, k, group, &mut rng);
    let bias = if (rows + n).is_multiple_of(2) { Some(rng.vec(n)) } else { None };

    let mut want = vec![(0f64, 0f64); rows * n];
    for m in 0..rows {
        for j in 0..n {
            let terms = (0..k).map(|c| x[m * k + c] as f64 * w.exact[j * k + c]);
            let start = bias.as_ref().map_or(0.0, |b| b[j] as f64);
            want[m * n + j] = reference_dot(terms, start);
        }
    }

    for isa in supported() {
        let mut y = vec![CANARY; rows * n + 9];
        linear_with(isa, &x, rows, k, w.weights(), n, bias.as_deref(), &mut y);
        let case = || format!("{isa} {kind:?} rows {rows} k {k} n {n} group {group}");
        for (i, &(value, abs)) in want.iter().enumerate() {
            let describe =
                || format!("{} bias {}: y[{}, {}]", case(), bias.is_some(), i / n, i % n);
            assert_close(y[i], value, abs, k, describe);
        }
        assert!(y[rows * n..].iter().all(|&v| v == CANARY), "{}: wrote past y", case());
    }
}

/// Picks an int4 group length for row length `k`, cycling through lane-aligned and unaligned
/// choices.
fn int4_group(k: usize, pick: usize) -> usize {
    let choices: Vec<usize> =
        [32, 16, 2, 6, 8, k].into_iter().filter(|&g| k.is_multiple_of(g)).collect();
    choices[pick % choices.len()]
}

fn check_kind_small(kind: Kind) {
    for (ki, &k) in K_SIZES.iter().enumerate() {
        // Int4 rows hold an even number of values, since groups are even.
        let k = if kind.is_int4() { k + k % 2 } else { k };
        for &rows in SMALL_ROWS {
            for n in small_widths() {
                let seed = (ki * 1000 + rows * 50 + n) as u64;
                check_linear(kind, rows, k, n, int4_group(k, rows + n), seed);
            }
        }
    }
}

#[test]
fn linear_f32_small_shapes() {
    check_kind_small(Kind::F32);
}

#[test]
fn linear_f16_small_shapes() {
    check_kind_small(Kind::F16);
}

#[test]
fn linear_int8_small_shapes() {
    check_kind_small(Kind::I8);
}

#[test]
fn linear_int4_small_shapes() {
    check_kind_small(Kind::I4);
}

#[test]
fn linear_int4_with_minimums_small_shapes() {
    check_kind_small(Kind::I4Min);
}

#[test]
fn linear_layer_widths() {
    // 17 and 70 rows take the blocked kernels where there are any, and 70 rows by 385 columns
    // span two row blocks and two column blocks of them.
    // Under Miri, 17 rows of a narrow layer.
    let (shapes, widths): (&[(usize, usize)], &[usize]) = if cfg!(miri) {
        (&[(17, 8)], &[9])
    } else {
        (&[(1, 384), (3, 385), (9, 64), (17, 1536), (70, 385)], &[384, 1536])
    };
    for kind in [Kind::F32, Kind::F16, Kind::I8, Kind::I4, Kind::I4Min] {
        for &(rows, k) in shapes {
            let k = if kind.is_int4() { k + k % 2 } else { k };
            for &n in widths {
                check_linear(kind, rows, k, n, int4_group(k, rows), (rows * k + n) as u64);
            }
        }
    }
}

#[test]
fn linear_many_rows() {
    // On AVX-512, f32 weights from 16 rows, int4 from 32, and f16 and int8 from 16 (from 64 on
    // Zen 4) take the kernel that transposes blocks of one to four vectors of 16 rows. Rows: one
    // full block, one row past it, and two blocks with a partial third. Row lengths: one value, odd ones,
    // MiniLM's, and (one block only) the longest the kernel takes and one past it. Output counts:
    // around its tile of 6 weight rows. Then outputs past its pass of 768, ending inside a
    // 16-output transpose.
    let (rows_list, k_list, n_list): (&[usize], &[usize], &[usize]) = if cfg!(miri) {
        (&[65], &[3], &[7])
    } else {
        (&[64, 65, 130], &[1, 17, 384, 1537], &[1, 6, 7, 13])
    };
    // Blocks of one, two and three vectors, with tiles of 24, 8 and 6 weight rows: rows at and
    // past each block size, output counts around each tile.
    if !cfg!(miri) {
        for kind in [Kind::F32, Kind::F16, Kind::I8] {
            for rows in [16, 17, 31, 32, 33, 47, 48, 63] {
                for (k, n) in [(1, 25), (17, 23), (384, 49), (1537, 9)] {
                    check_linear(kind, rows, k, n, 1, (rows * 5 + k + n) as u64);
                }
            }
        }
    }
    // Int4 weights in groups of a multiple of 16 (with and without minimums) take it from 32 rows:
    // groups of 16, 32 and 48, rows at and past 32 and around the block of 64.
    if !cfg!(miri) {
        for kind in [Kind::I4, Kind::I4Min] {
            for (k, group) in [(16, 16), (96, 48), (384, 32), (1536, 32)] {
                for rows in [32, 33, 64, 65, 130] {
                    for n in [1, 7, 13] {
                        check_linear(kind, rows, k, n, group, (rows * 3 + k + n) as u64);
                    }
                }
            }
        }
    }
    for kind in [Kind::F32, Kind::F16, Kind::I8] {
        if !cfg!(miri) {
            for k in [8192, 8193] {
                check_linear(kind, 64, k, 7, 1, k as u64);
            }
            for (rows, k, n) in [(65, 17, 771), (130, 384, 1541)] {
                check_linear(kind, rows, k, n, 1, (rows + k + n) as u64);
            }
        }
        for &rows in rows_list {
            for &k in k_list {
                for &n in n_list {
                    check_linear(kind, rows, k, n, 1, (rows * 7 + k * 3 + n) as u64);
                }
            }
        }
    }
}

/// Int4 weights in groups of a multiple of 32, below 8 rows: on AVX-512 each row runs alone in
/// blocks of 32 values. Rows up to 8, groups of 32, 64 and 96, output counts around the tile of
/// 4 weight rows and one of SmolLM2-135M's layers. Each row must also equal the row alone.
#[test]
fn linear_int4_block_rows() {
    let shapes: &[(usize, usize)] =
        if cfg!(miri) { &[(32, 32)] } else { &[(32, 32), (64, 64), (192, 32), (576, 96)] };
    let rows_list: &[usize] = if cfg!(miri) { &[2] } else { &[1, 2, 3, 5, 7, 8] };
    for kind in [Kind::I4, Kind::I4Min] {
        for &(k, group) in shapes {
            for &rows in rows_list {
                for n in [1, 2, 3, 4, 5, 6, 9] {
                    check_linear(kind, rows, k, n, group, (rows * 11 + k + n) as u64);
                }
            }
        }
        if !cfg!(miri) {
            check_linear(kind, 1, 576, 1536, 32, 5);
            check_linear(kind, 3, 1536, 576, 32, 6);
        }
        let (rows, k, n) = (5, 192, 9);
        let mut rng = Rng(kind as u64 + 40);
        let w = TestWeights::new(kind, n, k, 32, &mut rng);
        let x = rng.vec(rows * k);
        for isa in supported() {
            let mut batch = vec![0f32; rows * n];
            linear_with(isa, &x, rows, k, w.weights(), n, None, &mut batch);
            for m in 0..rows {
                let mut single = vec![0f32; n];
                let row = &x[m * k..(m + 1) * k];
                linear_with(isa, row, 1, k, w.weights(), n, None, &mut single);
                assert_eq!(&batch[m * n..(m + 1) * n], &single[..], "{isa} {kind:?} row {m}");
            }
        }
    }
}

#[test]
fn linear_int4_unaligned_group() {
    // Groups of 6 and 2 end inside an 8- or 16-lane vector, so each vector needs several scales.
    check_linear(Kind::I4, 5, 48, 19, 6, 1);
    check_linear(Kind::I4Min, 5, 48, 19, 6, 3);
    // Miri interprets every operation, so it skips the wider case.
    if !cfg!(miri) {
        check_linear(Kind::I4, 4, 386, 9, 2, 2);
    }
}

#[test]
fn linear_zero_k_gives_bias() {
    let bias = [1.5f32, -2.0, 0.25];
    for isa in supported() {
        let mut y = [CANARY; 6];
        linear_with(isa, &[], 2, 0, Weights::F32(F32Rows { w: &[], k: 0 }), 3, Some(&bias), &mut y);
        assert_eq!(y, [1.5, -2.0, 0.25, 1.5, -2.0, 0.25], "{isa}");
    }
}

#[test]
fn linear_rows_independent_of_batch() {
    // With weights read in place, a row's result does not depend on how many rows share the
    // call (the blocked int4 and f16 kernels sum in blocks of columns instead).
    let (rows, k, n) = if cfg!(miri) { (5, 40, 7) } else { (9, 300, 21) };
    let mut rng = Rng(77);
    let x = rng.vec(rows * k);
    for (isa, kind) in supported().into_iter().flat_map(|i| [(i, Kind::F32), (i, Kind::I8)]) {
        let w = TestWeights::new(kind, n, k, 2, &mut rng);
        let mut batch = vec![0f32; rows * n];
        linear_with(isa, &x, rows, k, w.weights(), n, None, &mut batch);
        for m in 0..rows {
            let mut single = vec![0f32; n];
            linear_with(isa, &x[m * k..(m + 1) * k], 1, k, w.weights(), n, None, &mut single);
            assert_eq!(&batch[m * n..(m + 1) * n], &single[..], "{isa} {kind:?} row {m}");
        }
    }
}

#[test]
#[should_panic(expected = "y has 5 values")]
fn linear_rejects_short_output() {
    let w = [0f32; 6];
    let mut y = [0f32; 5];
    let isa = Isa::best();
    linear_with(isa, &[0.0; 4], 2, 2, Weights::F32(F32Rows { w: &w, k: 2 }), 3, None, &mut y);
}

#[test]
#[should_panic(expected = "does not divide")]
fn linear_rejects_int4_group_not_dividing_k() {
    let w = I4Rows { packed: &[0; 6], scales: &[0; 2], mins: None, k: 6, group: 4 };
    linear_with(Isa::best(), &[0.0; 6], 1, 6, Weights::I4(w), 1, None, &mut [0.0]);
}

fn check_matmul(m: usize, k: usize, n: usize, seed: u64) {
    let mut rng = Rng(seed);
    let a = rng.vec(m * k);
    let b = rng.vec(k * n);
    for isa in supported() {
        let mut c = vec![CANARY; m * n + 5];
        matmul_with(isa, &a, &b, &mut c, m, k, n);
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64);
                let (want, abs) = reference_dot(terms, 0.0);
                let describe = || format!("{isa} matmul {m}x{k}x{n}: c[{i}, {j}]");
                assert_close(c[i * n + j], want, abs, k, describe);
            }
        }
        assert!(c[m * n..].iter().all(|&v| v == CANARY), "{isa} matmul {m}x{k}x{n}: wrote past c");
    }
}

#[test]
fn matmul_small_shapes() {
    for &k in K_SIZES.iter().chain(&[0]) {
        for &m in SMALL_ROWS {
            for n in small_widths() {
                check_matmul(m, k, n, (k * 400 + m * 41 + n) as u64);
            }
        }
    }
}

#[test]
fn matmul_attention_shapes() {
    // Under Miri, one square and one odd-sized product, far smaller.
    let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
        &[(9, 4, 10), (3, 17, 5)]
    } else {
        &[(128, 32, 128), (128, 128, 32), (7, 64, 129), (1, 383, 97)]
    };
    for &(m, k, n) in shapes {
        check_matmul(m, k, n, (m + k + n) as u64);
    }
}

#[test]
fn best_isa_is_supported() {
    assert!(Isa::best().is_supported());
    assert_eq!(Isa::best(), Isa::best());
}

/// Splitting `linear` across threads, by rows of `x` or by outputs, gives the one-thread result
/// exactly, for parts of uneven size and for more parts than rows or outputs. Rows: below, inside
/// and above the thresholds of the AVX-512 kernels (8 rows for int4 blocks, and 16, 32 and 64
/// rows for the broadcast kernel).
#[test]
#[cfg_attr(miri, ignore = "spawns threads for shapes too large for Miri")]
fn threaded_linear_matches_one_thread() {
    use super::parallel::{linear_by_outputs, linear_by_rows, row_parts};
    let mut rng = Rng(91);
    let k = 96;
    for kind in [Kind::F32, Kind::F16, Kind::I8, Kind::I4, Kind::I4Min] {
        let cases = [
            (9, 37, 2),
            (5, 40, 3),
            (2, 17, 4),
            (64, 48, 2),
            (130, 20, 2),
            (193, 9, 3),
            (1, 50, 3),
            (20, 50, 2),
            (40, 33, 3),
            (100, 70, 2),
            (17, 5, 4),
            (5, 40, 4),
            (20, 3, 4),
            (33, 30, 2),
        ];
        for (rows, n, parts) in cases {
            let w = TestWeights::new(kind, n, k, 32, &mut rng);
            let x = rng.vec(rows * k);
            let bias = rng.vec(n);
            let b = Some(bias.as_slice());
            let mut single = vec![CANARY; rows * n + 3];
            super::linear(&x, rows, k, w.weights(), n, b, &mut single);
            for by_outputs in [false, true] {
                let mut split = vec![CANARY; rows * n + 3];
                if by_outputs {
                    let (x, w) = (&x, w.weights());
                    linear_by_outputs(linear, None, parts, x, rows, k, w, n, b, &mut split);
                } else if rows > 1 {
                    let (x, w) = (&x, w.weights());
                    let parts = row_parts(super::min_part_rows(&w, rows, k), parts, rows);
                    linear_by_rows(linear, None, parts, x, rows, k, w, n, b, &mut split);
                } else {
                    continue;
                }
                // With int4 and f16 weights a part of fewer rows than the blocked kernels'
                // threshold may round differently, as the note on `linear` explains. Parts of
                // outputs keep every row, parts of a call that takes the broadcast kernel keep
                // enough rows for it, and the other cases must match bit for bit too.
                let broadcast = super::min_part_rows(&w.weights(), rows, k) > 1;
                let exact = matches!(kind, Kind::F32 | Kind::I8) || rows == 1 || by_outputs;
                let exact = exact || broadcast;
                for (i, (&a, &b)) in single.iter().zip(&split).enumerate() {
                    let close = (a - b).abs() <= 1e-5 * a.abs().max(1.0);
                    assert!(
                        if exact { a.to_bits() == b.to_bits() } else { close },
                        "{kind:?} rows {rows} n {n} in {parts} parts (by outputs {by_outputs}): \
                         value {i} is {b}, one thread {a}"
                    );
                }
            }
        }
    }
}

/// Checks that int8 weights with int8 activations split by rows at any part size where the
/// integer kernel over whole rows takes the call, while the f32-activation kernel keeps the
/// broadcast kernel's minimum. Below that minimum, 16 rows on two threads would be split by
/// outputs, each part reading all the rows.
#[test]
#[cfg(target_arch = "x86_64")]
fn int8_rows_split_by_rows() {
    if !super::int8_row_products_supported() {
        return;
    }
    let mut rng = Rng(23);
    let (n, k) = (64, 384);
    let w = TestWeights::new(Kind::I8, n, k, 32, &mut rng);
    for rows in [2, 16, 17, 31] {
        let min_rows = super::min_part_rows_int8_rows(&w.weights(), rows, k);
        assert_eq!(min_rows, 1, "rows {rows}");
        assert_eq!(super::parallel::row_parts(min_rows, 2, rows), 2, "rows {rows}");
    }
    // Rows longer than the integer kernel takes fall back to the f32-activation rule.
    let long = TestWeights::new(Kind::I8, 4, 8200, 32, &mut rng);
    let rows = 64;
    let fallback = super::min_part_rows_int8_rows(&long.weights(), rows, 8200);
    assert_eq!(fallback, super::min_part_rows(&long.weights(), rows, 8200));
}

/// Checks that a product with an activation, on one thread and split by rows or by outputs,
/// gives the product followed by the activation bit for bit and writes nothing past its outputs.
#[test]
#[cfg_attr(miri, ignore = "spawns threads for shapes too large for Miri")]
fn linear_activation_follows_product() {
    use super::parallel::linear_threads_with;
    use crate::ops::{Activation, UnaryKind};
    let mut rng = Rng(17);
    let k = 64;
    let acts = [
        Activation { kind: UnaryKind::Gelu, alpha: 0.0, beta: 0.0 },
        Activation { kind: UnaryKind::Relu, alpha: 0.0, beta: 0.0 },
        Activation { kind: UnaryKind::Clip, alpha: -0.25, beta: 0.5 },
    ];
    for kind in [Kind::F32, Kind::I8, Kind::I4] {
        let cases = [
            (1, 300, 1),
            (1, 300, 2),
            (3, 33, 2),
            (24, 160, 2),
            (70, 40, 1),
            (100, 80, 2),
            (140, 40, 2),
        ];
        for (rows, n, threads) in cases {
            let w = TestWeights::new(kind, n, k, 32, &mut rng);
            let x = rng.vec(rows * k);
            let bias = rng.vec(n);
            for a in acts {
                let mut want = vec![CANARY; rows * n + 3];
                let b = Some(bias.as_slice());
                linear_threads_with(
                    linear,
                    None,
                    threads,
                    &x,
                    rows,
                    k,
                    w.weights(),
                    n,
                    b,
                    &mut want,
                );
                super::generic::unary_in_place(a.kind, a.alpha, a.beta, &mut want[..rows * n]);
                let mut got = vec![CANARY; rows * n + 3];
                linear_threads_with(
                    linear,
                    Some(a),
                    threads,
                    &x,
                    rows,
                    k,
                    w.weights(),
                    n,
                    b,
                    &mut got,
                );
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&want), bits(&got), "{kind:?} {:?} rows {rows} n {n}", a.kind);
                assert!(got[..rows * n].iter().any(|&v| v != 0.0));
            }
        }
    }
}

/// Checks that a batch of products split across threads equals the products one by one,
/// including broadcast operands and more parts than products.
#[test]
#[cfg_attr(miri, ignore = "spawns threads for shapes too large for Miri")]
fn threaded_matmul_batch_matches_one_thread() {
    use super::parallel::matmul_batch_parts;
    let mut rng = Rng(5);
    let (m, k, n) = (7, 19, 13);
    for (count, parts) in [(12, 2), (3, 2), (2, 5), (1, 2)] {
        let a = rng.vec(count * m * k);
        let b = rng.vec(k * n); // shared by every product, as a broadcast operand
        let mut want = vec![CANARY; count * m * n + 2];
        for i in 0..count {
            let c = &mut want[i * m * n..(i + 1) * m * n];
            super::matmul(&a[i * m * k..(i + 1) * m * k], &b, c, m, k, n);
        }
        let mut got = vec![CANARY; count * m * n + 2];
        let a_of = |i: usize| &a[i * m * k..(i + 1) * m * k];
        matmul_batch_parts(parts, count, a_of, |_| &b[..], &mut got, m, k, n);
        assert_eq!(
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{count} products in {parts} parts"
        );
    }
}

/// `x` quantized as `linear_int8` does: per group of 32, the largest magnitude maps to 127 and
/// values round to the nearest integer (ties to even). Returns the dequantized values.
fn quantized_q8(x: &[f32]) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for group in x.chunks(32) {
        let largest = group.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = largest / 127.0;
        let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
        for &v in group {
            out.push((v * inverse).round_ties_even() as f64 * scale as f64);
        }
    }
    out
}

/// `linear_int8` against an f64 reference on the int8-quantized input, in which the group
/// minimums multiply the exact input as in the kernel. Each result is also within the
/// quantization's error bound of the exact `linear`. Weights are int4 with and without
/// minimums, and int8.
/// Rows of 2, 6, 18 and 48 groups take the kernel; rows of 5 and of 3 groups take the f32 path.
/// Cases have 1 to 5 rows, an all-zero group and one large value in each row.
#[test]
fn linear_int8_activations() {
    // Under Miri, which has no VNNI and runs the f32 path, one small shape.
    let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
        &[(2, 64, 3)]
    } else {
        &[
            (1, 64, 33),
            (5, 576, 17),
            (4, 64, 7),
            (1, 1536, 5),
            (2, 192, 40),
            (2, 160, 9),
            (1, 96, 3),
        ]
    };
    for (case, &(rows, k, n)) in shapes.iter().enumerate() {
        for kind in [Kind::I4Min, Kind::I4, Kind::I8] {
            let mut rng = Rng(900 + case as u64);
            let mut x = rng.vec(rows * k);
            x[..32.min(k)].fill(0.0);
            for m in 0..rows {
                x[m * k + k - 1] = 40.0;
            }
            let w = TestWeights::new(kind, n, k, 32, &mut rng);
            let bias = rng.vec(n);
            let mut y = vec![CANARY; rows * n + 5];
            linear_int8(&x, rows, k, w.weights(), n, Some(&bias), &mut y);
            let mut exact = vec![0f32; rows * n];
            linear(&x, rows, k, w.weights(), n, Some(&bias), &mut exact);
            let integer = k.is_multiple_of(64) && super::int8_products_supported();
            for m in 0..rows {
                let row = &x[m * k..(m + 1) * k];
                let xq = quantized_q8(row);
                for j in 0..n {
                    let describe = || format!("{kind:?} rows {rows} k {k} n {n}: y[{m}, {j}]");
                    let got = y[m * n + j];
                    if !integer {
                        assert_eq!(got, exact[m * n + j], "{}: not the f32 path", describe());
                        continue;
                    }
                    let wrow = &w.exact[j * k..(j + 1) * k];
                    // A group's minimum multiplies the exact inputs, the rest the quantized ones.
                    let min = |c: usize| match kind {
                        Kind::I4Min => half::f16::from_bits(w.min_bits[j * k / 32 + c / 32]),
                        _ => half::f16::ZERO,
                    };
                    let terms = (0..k).map(|c| {
                        let m = min(c).to_f64();
                        (wrow[c] - m) * xq[c] + m * row[c] as f64
                    });
                    let (want, abs) = reference_dot(terms, bias[j] as f64);
                    assert_close(got, want, abs, k, describe);
                    // Each quantized value is within half a step of the input.
                    let bound: f64 = row
                        .chunks(32)
                        .zip(wrow.chunks(32))
                        .map(|(xs, ws)| {
                            let step = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                            ws.iter().map(|w| w.abs()).sum::<f64>() * step / 2.0
                        })
                        .sum();
                    let error = (got - exact[m * n + j]) as f64;
                    assert!(
                        error.abs() <= bound * 1.001 + abs * 1e-5,
                        "{}: {got} is {error:e} from f32 {}, over the bound {bound:e}",
                        describe(),
                        exact[m * n + j]
                    );
                }
            }
            assert!(y[rows * n..].iter().all(|&v| v == CANARY), "rows {rows} k {k}: wrote past y");
        }
    }
}

/// `linear_int8_rows` against an f64 reference on each row quantized with one scale, and within
/// that quantization's error bound of the exact `linear`. Shapes cover row lengths around the
/// 64-byte step (1, 63, 64, 65, 130) and MiniLM's layers (384, 1536), output counts around the
/// tile width of 4, and 1 to 37 rows (more than two blocks of 16). Each row has an all-zero
/// stretch, one large value and one row is all zeros. Int4 weights take the grouped kernel.
#[test]
fn linear_int8_rows_activations() {
    let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
        &[(2, 65, 3)]
    } else {
        &[
            (1, 1, 1),
            (3, 63, 5),
            (17, 64, 4),
            (4, 65, 9),
            (5, 130, 3),
            (37, 384, 13),
            (16, 1536, 6),
            (2, 8192, 2),
            (32, 7, 17),
            (70, 384, 70),
            (33, 8192, 3),
        ]
    };
    for (case, &(rows, k, n)) in shapes.iter().enumerate() {
        let mut rng = Rng(700 + case as u64);
        let mut x = rng.vec(rows * k);
        x[..(k / 3).min(40)].fill(0.0);
        for m in 0..rows {
            x[m * k + k / 2] = -25.0;
        }
        if rows > 2 {
            x[k..2 * k].fill(0.0);
        }
        let w = TestWeights::new(Kind::I8, n, k, 32, &mut rng);
        let bias = rng.vec(n);
        let mut y = vec![CANARY; rows * n + 5];
        linear_int8_rows(&x, rows, k, w.weights(), n, Some(&bias), &mut y);
        let mut exact = vec![0f32; rows * n];
        linear(&x, rows, k, w.weights(), n, Some(&bias), &mut exact);
        let integer = super::int8_row_products_supported();
        for m in 0..rows {
            let row = &x[m * k..(m + 1) * k];
            let largest = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            let step = largest / 127.0;
            let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
            let xq: Vec<f64> =
                row.iter().map(|&v| (v * inverse).round_ties_even() as f64 * step as f64).collect();
            for j in 0..n {
                let describe = || format!("rows {rows} k {k} n {n}: y[{m}, {j}]");
                let got = y[m * n + j];
                let wrow = &w.exact[j * k..(j + 1) * k];
                let terms = (0..k).map(|c| wrow[c] * xq[c]);
                let (want, abs) = reference_dot(terms, bias[j] as f64);
                if integer {
                    assert_close(got, want, abs, k, describe);
                } else if !super::int8_products_supported() {
                    // Without an integer kernel for rows, `linear_int8` has none either here:
                    // it is `linear`.
                    assert_eq!(got, exact[m * n + j], "{}: not the f32 path", describe());
                }
                let bound: f64 = wrow.iter().map(|w| w.abs()).sum::<f64>() * step as f64 / 2.0;
                let error = (got - exact[m * n + j]) as f64;
                assert!(
                    !integer || error.abs() <= bound * 1.001 + abs * 1e-5,
                    "{}: {got} is {error:e} from f32 {}, over the bound {bound:e}",
                    describe(),
                    exact[m * n + j]
                );
            }
        }
        assert!(y[rows * n..].iter().all(|&v| v == CANARY), "rows {rows} k {k}: wrote past y");
    }
}

/// With one scale per row the integer sums are exact, so a row's outputs are the same bits in a
/// call of 70 rows (which repacks the weights where VNNI is present) as in a call of one row.
#[test]
fn linear_int8_rows_independent_of_batch() {
    let (rows, k, n) = if cfg!(miri) { (3, 65, 5) } else { (70, 200, 37) };
    let mut rng = Rng(4242);
    let x = rng.vec(rows * k);
    let w = TestWeights::new(Kind::I8, n, k, 32, &mut rng);
    let bias = rng.vec(n);
    let mut batch = vec![0f32; rows * n];
    linear_int8_rows(&x, rows, k, w.weights(), n, Some(&bias), &mut batch);
    for m in 0..rows {
        let mut single = vec![0f32; n];
        let row = &x[m * k..(m + 1) * k];
        linear_int8_rows(row, 1, k, w.weights(), n, Some(&bias), &mut single);
        assert_eq!(&batch[m * n..(m + 1) * n], &single[..], "row {m}");
    }
}

/// With inputs quantized to int8, per row or in groups, a NaN input makes every output of its
/// row NaN, and an infinite input makes them all non-finite. The other rows keep the results they
/// have alone. Shapes: few rows (dot-product kernel) and 40 rows (packed panels where VNNI is
/// present), with the non-finite value in the first and the last group of 32.
#[test]
fn linear_int8_nonfinite_inputs() {
    let shapes: &[(usize, usize, usize)] =
        if cfg!(miri) { &[(4, 64, 3)] } else { &[(4, 64, 3), (5, 200, 17), (40, 384, 20)] };
    let kernels = [
        ("rows", linear_int8_rows as super::LinearKernel),
        ("groups", linear_int8 as super::LinearKernel),
    ];
    for &(rows, k, n) in shapes {
        let mut rng = Rng(rows as u64 * 31 + k as u64);
        let mut x = rng.vec(rows * k);
        x[k + 3] = f32::NAN;
        x[2 * k + k - 1] = f32::INFINITY;
        x[3 * k] = f32::NEG_INFINITY;
        let w = TestWeights::new(Kind::I8, n, k, 32, &mut rng);
        let bias = rng.vec(n);
        for (name, kernel) in kernels {
            let mut y = vec![0f32; rows * n];
            kernel(&x, rows, k, w.weights(), n, Some(&bias), &mut y);
            let case = |m: usize, j: usize| format!("{name} rows {rows} k {k} n {n}: y[{m}, {j}]");
            for j in 0..n {
                assert!(y[n + j].is_nan(), "{} is {}, expected NaN", case(1, j), y[n + j]);
                for m in [2, 3] {
                    let value = y[m * n + j];
                    assert!(!value.is_finite(), "{} is {value}, expected non-finite", case(m, j));
                }
            }
            for m in (0..rows).filter(|m| !(1..=3).contains(m)) {
                let mut single = vec![0f32; n];
                kernel(&x[m * k..(m + 1) * k], 1, k, w.weights(), n, Some(&bias), &mut single);
                assert_eq!(&y[m * n..(m + 1) * n], &single[..], "{name} row {m}");
            }
        }
    }
}

/// How a test feeds the attention mask.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MaskKind {
    None,
    /// One value per key, shared by every query row (a padding mask), every fourth key -inf.
    PerKey,
    /// A value per query row and key, with the keys after each query row -inf (a causal mask).
    Full,
    /// One value per query row, shared by every key.
    PerRow,
}

/// Mask values and their strides for `dims`.
fn attention_mask(
    kind: MaskKind,
    dims: HeadDims,
    rng: &mut Rng,
) -> Option<(Vec<f32>, usize, usize)> {
    let (s, t) = (dims.queries, dims.keys);
    match kind {
        MaskKind::None => None,
        MaskKind::PerKey => Some((
            (0..t)
                .map(
                    |j| if j % 4 == 3 && j + 1 < t { f32::NEG_INFINITY } else { rng.signed_unit() },
                )
                .collect(),
            0,
            1,
        )),
        MaskKind::Full => Some((
            (0..s * t)
                .map(|x| if x % t > x / t { f32::NEG_INFINITY } else { 2.0 * rng.signed_unit() })
                .collect(),
            t,
            1,
        )),
        MaskKind::PerRow => Some(((0..s).map(|_| 3.0 * rng.signed_unit()).collect(), 1, 0)),
    }
}

/// f64 attention of one output, with its rounding bound: each score carries the error of a
/// `depth`-term f32 dot product, and the output that of a `keys`-term weighted sum.
#[allow(clippy::too_many_arguments)]
fn reference_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&(Vec<f32>, usize, usize)>,
    scale: f32,
    dims: HeadDims,
    i: usize,
    e: usize,
) -> (f64, f64) {
    let HeadDims { depth, keys, width, .. } = dims;
    let eps = f32::EPSILON as f64;
    let mut scores = Vec::with_capacity(keys);
    let mut worst = 0f64;
    for t in 0..keys {
        let terms = (0..depth).map(|d| q[i * depth + d] as f64 * k[d * keys + t] as f64);
        let (dot, abs) = reference_dot(terms, 0.0);
        let m = mask.map_or(0.0, |(values, rs, ks)| values[i * rs + t * ks] as f64);
        scores.push(dot * scale as f64 + m);
        if m.is_finite() {
            worst = worst.max(eps * ((depth as f64 + 2.0) * abs * scale as f64 + m.abs()));
        }
    }
    let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let (mut out, mut abs) = (0f64, 0f64);
    for t in 0..keys {
        let p = weights[t] / sum;
        out += p * v[t * width + e] as f64;
        abs += p * (v[t * width + e] as f64).abs();
    }
    // A score error of `worst` changes each probability by about that fraction, and the
    // exponentials and the sums add a few roundings each.
    (out, abs * (2.0 * worst + (keys as f64 + 16.0) * eps) * 2.0 + 1e-30)
}

fn check_attention(dims: HeadDims, mask_kind: MaskKind, scale: f32, seed: u64) {
    use super::attention::{attention_head, portable, Mask};
    let HeadDims { queries, depth, keys, width } = dims;
    let mut rng = Rng(seed);
    let q = rng.vec(queries * depth);
    let k = rng.vec(depth * keys);
    let v = rng.vec(keys * width);
    let mask = attention_mask(mask_kind, dims, &mut rng);
    let view =
        mask.as_ref().map(|(values, rs, ks)| Mask { values, row_stride: *rs, key_stride: *ks });
    type Kernel = fn(&[f32], &[f32], &[f32], Option<Mask<'_>>, f32, HeadDims, &mut [f32]);
    for (name, kernel) in [("dispatched", attention_head as Kernel), ("portable", portable)] {
        let mut out = vec![CANARY; queries * width + 3];
        kernel(&q, &k, &v, view, scale, dims, &mut out);
        for i in 0..queries {
            for e in 0..width {
                let (want, tol) = reference_attention(&q, &k, &v, mask.as_ref(), scale, dims, i, e);
                let got = out[i * width + e];
                let err = (got as f64 - want).abs();
                assert!(
                    err <= tol,
                    "{name} attention {dims:?} {mask_kind:?} scale {scale}: out[{i}, {e}] = {got}, \
                     expected {want} (error {err:e} > {tol:e})"
                );
            }
        }
        assert!(out[queries * width..].iter().all(|&x| x == CANARY), "{name}: wrote past out");
    }
}

use super::attention::HeadDims;

#[test]
fn attention_odd_shapes() {
    let (queries, depths, keys, widths): (&[usize], &[usize], &[usize], &[usize]) = if cfg!(miri) {
        (&[1, 5], &[3], &[1, 65], &[17])
    } else {
        (
            &[1, 2, 3, 4, 5, 9],
            &[1, 7, 32, 33],
            &[1, 15, 16, 17, 63, 64, 65, 130],
            &[1, 16, 17, 32, 63, 64, 65, 80],
        )
    };
    let masks = [MaskKind::None, MaskKind::PerKey, MaskKind::Full, MaskKind::PerRow];
    let mut case = 0u64;
    for &s in queries {
        for &d in depths {
            for &t in keys {
                for &e in widths {
                    case += 1;
                    let dims = HeadDims { queries: s, depth: d, keys: t, width: e };
                    let mask = masks[case as usize % masks.len()];
                    check_attention(dims, mask, 1.0 / (d as f32).sqrt(), case);
                }
            }
        }
    }
}

#[test]
fn attention_model_shapes() {
    // MiniLM heads (32 values) at 128 tokens, and longer sequences with every mask.
    let shapes: &[(usize, usize, usize, usize)] = if cfg!(miri) {
        &[(4, 8, 70, 8)]
    } else {
        &[(128, 32, 128, 32), (37, 64, 300, 64), (6, 128, 519, 128)]
    };
    for &(s, d, t, e) in shapes {
        for mask in [MaskKind::None, MaskKind::PerKey, MaskKind::Full] {
            let dims = HeadDims { queries: s, depth: d, keys: t, width: e };
            check_attention(dims, mask, 1.0 / (d as f32).sqrt(), (s * t) as u64);
        }
    }
}

#[test]
fn attention_rescales_when_later_keys_score_higher() {
    // Scores that grow along the keys by far more than exp's range: every block raises the
    // largest score, and the earlier blocks' sums and outputs must shrink to match.
    use super::attention::{attention_head, portable, Mask};
    let dims = HeadDims { queries: 3, depth: 1, keys: 200, width: 5 };
    let q = [30.0f32, -30.0, 0.01];
    let k: Vec<f32> = (0..200).map(|t| t as f32).collect();
    let v: Vec<f32> = (0..200 * 5).map(|x| (x % 7) as f32 - 3.0).collect();
    for kernel in [attention_head, portable] {
        let mut out = vec![0f32; 15];
        kernel(&q, &k, &v, None::<Mask<'_>>, 1.0, dims, &mut out);
        // Row 0: key 199 (score 199) dominates; row 1: key 0; row 2: a gentle slope.
        for e in 0..5 {
            let (want0, _) = reference_attention(&q, &k, &v, None, 1.0, dims, 0, e);
            let (want1, _) = reference_attention(&q, &k, &v, None, 1.0, dims, 1, e);
            let (want2, _) = reference_attention(&q, &k, &v, None, 1.0, dims, 2, e);
            assert!((out[e] as f64 - want0).abs() < 1e-5, "row 0: {} vs {want0}", out[e]);
            assert!((out[5 + e] as f64 - want1).abs() < 1e-5, "row 1: {} vs {want1}", out[5 + e]);
            assert!((out[10 + e] as f64 - want2).abs() < 1e-5, "row 2: {} vs {want2}", out[10 + e]);
        }
        assert_eq!(out[0], v[199 * 5]);
        assert_eq!(out[5], v[0]);
    }
}

#[test]
fn attention_masked_rows_and_empty_keys() {
    use super::attention::{attention_head, portable, Mask};
    let dims = HeadDims { queries: 2, depth: 3, keys: 70, width: 4 };
    let mut rng = Rng(9);
    let (q, k, v) = (rng.vec(6), rng.vec(210), rng.vec(280));
    // Row 0 attends only to key 69 (in the second block); row 1 to no key at all.
    let mut mask = vec![f32::NEG_INFINITY; 140];
    mask[69] = 0.0;
    let view = Mask { values: &mask, row_stride: 70, key_stride: 1 };
    for kernel in [attention_head, portable] {
        let mut out = vec![0f32; 8];
        kernel(&q, &k, &v, Some(view), 0.5, dims, &mut out);
        assert_eq!(&out[..4], &v[69 * 4..70 * 4], "row 0 must copy value row 69");
        assert!(out[4..].iter().all(|x| x.is_nan()), "a row with every key masked gives NaN");

        let mut out = vec![CANARY; 9];
        let empty = HeadDims { keys: 0, ..dims };
        kernel(&q, &[], &[], None, 0.5, empty, &mut out);
        assert!(out[..8].iter().all(|&x| x == 0.0), "no keys gives zeros");
        assert_eq!(out[8], CANARY, "no keys: wrote past out");
    }
}

#[test]
fn attention_nan_input_gives_nan_rows() {
    use super::attention::{attention_head, portable, Mask};
    let dims = HeadDims { queries: 5, depth: 4, keys: 20, width: 3 };
    let mut rng = Rng(3);
    let (mut q, k, v) = (rng.vec(20), rng.vec(80), rng.vec(60));
    q[2 * 4 + 1] = f32::NAN;
    for kernel in [attention_head, portable] {
        let mut out = vec![0f32; 15];
        kernel(&q, &k, &v, None::<Mask<'_>>, 1.0, dims, &mut out);
        for (i, row) in out.chunks(3).enumerate() {
            assert_eq!(row.iter().all(|x| x.is_nan()), i == 2, "row {i}: {row:?}");
        }
    }
}

#[test]
#[should_panic]
fn attention_rejects_mask_past_its_values() {
    use super::attention::{attention_head, Mask};
    let dims = HeadDims { queries: 2, depth: 1, keys: 8, width: 1 };
    let mask = [0f32; 15];
    let view = Mask { values: &mask, row_stride: 8, key_stride: 1 };
    let mut out = [0f32; 2];
    attention_head(&[1.0; 2], &[1.0; 8], &[1.0; 8], Some(view), 1.0, dims, &mut out);
}
