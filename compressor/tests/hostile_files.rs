//! Hostile input for the runtime: hand-built models checked against plain computations, byte flips
//! and truncations of packed files, fields rewritten with their checksums recomputed, and misuse of
//! the session API. Every case must end in a typed error or a complete run, never in a panic or a
//! hang.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edgefold_compressor::ir::{Graph, Node, Storage, Symbol, Value, ValueId};
use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::{compress, CompressOptions};
use edgefold_compressor::plan::plan_arena;
use edgefold_compressor::quantize::{LowRank, Quantize};
use edgefold_compressor::testdata::skip;
use edgefold_compressor::writer::pack;
use edgefold_runtime::crc32::crc32;
use edgefold_runtime::error::Section;
use edgefold_runtime::format::{
    DType, Dim, Header, SectionEntry, SectionKind, TensorEntry, BUFFER_ALIGN, HEADER_LEN, MAX_RANK,
    MAX_SYMBOLS, OP_HEADER_LEN, SECTION_ALIGN, SECTION_ENTRY_LEN, SYMBOL_ENTRY_LEN,
    TENSOR_ENTRY_LEN, VERSION_MAJOR,
};
use edgefold_runtime::ops::{BinaryKind, Op, ReduceKind, UnaryKind};
use edgefold_runtime::{Error, Model, OpenOptions, Session};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// A copy of a file whose first byte sits `misalign` bytes past a 16-byte aligned address.
struct AlignedBytes {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBytes {
    fn new(bytes: &[u8]) -> Self {
        AlignedBytes::with_misalignment(bytes, 0)
    }

    fn with_misalignment(bytes: &[u8], misalign: usize) -> Self {
        let mut storage = vec![0u8; bytes.len() + 2 * BUFFER_ALIGN];
        let address = storage.as_ptr() as usize;
        let start = (BUFFER_ALIGN - address % BUFFER_ALIGN) % BUFFER_ALIGN + misalign;
        storage[start..start + bytes.len()].copy_from_slice(bytes);
        AlignedBytes { storage, start, len: bytes.len() }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// SplitMix64: a small deterministic generator, so every case can be replayed from its index.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Returns a value in `0..n`, for a positive `n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Returns a value in `[low, high)`.
    fn uniform(&mut self, low: f32, high: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        low + (high - low) * unit
    }
}

fn read_le(bytes: &[u8], at: usize, width: usize) -> u64 {
    let mut value = 0u64;
    for (i, &b) in bytes[at..at + width].iter().enumerate() {
        value |= (b as u64) << (8 * i);
    }
    value
}

fn write_le(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    for (i, b) in bytes[at..at + width].iter_mut().enumerate() {
        *b = (value >> (8 * i)) as u8;
    }
}

fn activation(graph: &mut Graph, name: &str, dtype: DType, shape: Vec<Dim>) -> ValueId {
    graph.add_value(Value { name: name.into(), dtype, shape, data: None })
}

fn add_node(graph: &mut Graph, name: &str, op: Op, inputs: &[ValueId], output: ValueId) {
    graph.nodes.push(Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|&i| Some(i)).collect(),
        outputs: vec![output],
    });
}

fn pack_graph(graph: &Graph) -> Vec<u8> {
    let plan = plan_arena(graph);
    let metadata = vec![("model.name".to_string(), b"hostile-files test model".to_vec())];
    pack(graph, &plan, &metadata).expect("the test graph packs")
}

fn c(value: u32) -> Dim {
    Dim::constant(value)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// Error function in f64, from the series erf(x) = 2/√π · e^(-x²) · Σ (2x²)^n · x / (2n+1)!!,
/// whose terms are all positive, so no precision is lost to cancellation.
fn erf64(x: f64) -> f64 {
    if x.abs() > 6.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * x * x / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
}

fn assert_close(ours: &[f32], reference: &[f64], tolerance: f64, what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: output length");
    for (i, (&a, &b)) in ours.iter().zip(reference).enumerate() {
        let diff = (a as f64 - b).abs();
        assert!(
            diff <= tolerance,
            "{what}: element {i} is {a}, expected {b} (difference {diff:e})"
        );
    }
}

fn describe_open(result: &Result<Model<'_>, Error>) -> String {
    match result {
        Ok(_) => "opened".to_string(),
        Err(e) => format!("{e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Test models
// ---------------------------------------------------------------------------------------------

const SMALL_IN: usize = 8;
const SMALL_OUT: usize = 4;
const SMALL_MAX_BATCH: u32 = 4;
const SMALL_EPSILON: f32 = 1e-5;

/// Parameters of the small model: an int8 per-row linear layer, then GELU, layer norm and softmax.
struct SmallWeights {
    q: Vec<i8>,
    scales: Vec<f32>,
    bias: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

fn small_weights() -> SmallWeights {
    let mut rng = SplitMix64(11);
    let q = (0..SMALL_OUT * SMALL_IN).map(|_| (rng.below(255) as i32 - 127) as i8).collect();
    SmallWeights {
        q,
        scales: (0..SMALL_OUT).map(|_| rng.uniform(0.01, 0.02)).collect(),
        bias: (0..SMALL_OUT).map(|_| rng.uniform(-0.5, 0.5)).collect(),
        gamma: (0..SMALL_OUT).map(|_| rng.uniform(0.5, 1.5)).collect(),
        beta: (0..SMALL_OUT).map(|_| rng.uniform(-0.3, 0.3)).collect(),
    }
}

/// x f32 [batch, 8] -> Linear (int8 per row [4, 8], bias) -> GELU -> LayerNorm -> Softmax.
fn small_graph(w: &SmallWeights) -> Graph {
    let mut g = Graph::default();
    g.symbols.push(Symbol { name: "batch".into(), max: SMALL_MAX_BATCH });
    let batch = Dim::symbol(0);
    let x = activation(&mut g, "x", DType::F32, vec![batch, c(SMALL_IN as u32)]);
    let weight = g.add_const(
        "dense.weight".into(),
        vec![SMALL_OUT, SMALL_IN],
        Storage::I8PerRow { q: w.q.clone(), scales: w.scales.clone() },
    );
    let bias = g.add_const("dense.bias".into(), vec![SMALL_OUT], Storage::F32(w.bias.clone()));
    let gamma = g.add_const("norm.gamma".into(), vec![SMALL_OUT], Storage::F32(w.gamma.clone()));
    let beta = g.add_const("norm.beta".into(), vec![SMALL_OUT], Storage::F32(w.beta.clone()));
    let row = vec![batch, c(SMALL_OUT as u32)];
    let dense = activation(&mut g, "dense", DType::F32, row.clone());
    let gelu = activation(&mut g, "gelu", DType::F32, row.clone());
    let norm = activation(&mut g, "norm", DType::F32, row.clone());
    let probs = activation(&mut g, "probs", DType::F32, row);
    add_node(&mut g, "dense", Op::Linear { activation: None }, &[x, weight, bias], dense);
    let gelu_op = Op::Unary { kind: UnaryKind::Gelu, alpha: 0.0, beta: 0.0 };
    add_node(&mut g, "gelu", gelu_op, &[dense], gelu);
    let norm_op = Op::LayerNorm { epsilon: SMALL_EPSILON };
    add_node(&mut g, "norm", norm_op, &[gelu, gamma, beta], norm);
    add_node(&mut g, "softmax", Op::Softmax { axis: 1 }, &[norm], probs);
    g.inputs = vec![x];
    g.outputs = vec![probs];
    g
}

fn small_file() -> Vec<u8> {
    pack_graph(&small_graph(&small_weights()))
}

/// Computes the small model in f64 from the same inputs and dequantized weights.
fn small_reference(w: &SmallWeights, x: &[f32]) -> Vec<f64> {
    let mut out = Vec::new();
    for row in x.chunks(SMALL_IN) {
        let mut h = [0f64; SMALL_OUT];
        for (n, hn) in h.iter_mut().enumerate() {
            let weights = &w.q[n * SMALL_IN..(n + 1) * SMALL_IN];
            let dot: f64 = row
                .iter()
                .zip(weights)
                .map(|(&xv, &q)| xv as f64 * (q as f32 * w.scales[n]) as f64)
                .sum();
            *hn = dot + w.bias[n] as f64;
        }
        for v in h.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf64(*v / std::f64::consts::SQRT_2));
        }
        let mean = h.iter().sum::<f64>() / SMALL_OUT as f64;
        let var = h.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / SMALL_OUT as f64;
        assert!(var > 1e-3, "test data gives a near-constant row (variance {var})");
        let inv = 1.0 / (var + SMALL_EPSILON as f64).sqrt();
        for (i, v) in h.iter_mut().enumerate() {
            *v = (*v - mean) * inv * w.gamma[i] as f64 + w.beta[i] as f64;
        }
        let max = h.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = h.iter().map(|v| (v - max).exp()).sum();
        out.extend(h.iter().map(|v| (v - max).exp() / sum));
    }
    out
}

const VOCAB: usize = 10;
const EMBED: usize = 4;

/// An int8 per-row embedding table with its scales.
struct EmbeddingTable {
    q: Vec<i8>,
    scales: Vec<f32>,
}

fn embedding_table() -> EmbeddingTable {
    let mut rng = SplitMix64(23);
    EmbeddingTable {
        q: (0..VOCAB * EMBED).map(|_| (rng.below(255) as i32 - 127) as i8).collect(),
        scales: (0..VOCAB).map(|_| rng.uniform(0.01, 0.03)).collect(),
    }
}

/// ids i64 [batch, seq] and mask f32 [batch, seq] -> Gather (int8 table [10, 4]) times the mask
/// reshaped to [batch, seq, 1].
fn embedding_graph(table: &EmbeddingTable) -> Graph {
    let mut g = Graph::default();
    g.symbols.push(Symbol { name: "batch".into(), max: 2 });
    g.symbols.push(Symbol { name: "sequence".into(), max: 6 });
    let (batch, seq) = (Dim::symbol(0), Dim::symbol(1));
    let ids = activation(&mut g, "ids", DType::I64, vec![batch, seq]);
    let mask = activation(&mut g, "mask", DType::F32, vec![batch, seq]);
    let weights = g.add_const(
        "embedding.weight".into(),
        vec![VOCAB, EMBED],
        Storage::I8PerRow { q: table.q.clone(), scales: table.scales.clone() },
    );
    let embedded = activation(&mut g, "embedded", DType::F32, vec![batch, seq, c(EMBED as u32)]);
    let mask3 = activation(&mut g, "mask3", DType::F32, vec![batch, seq, c(1)]);
    let masked = activation(&mut g, "masked", DType::F32, vec![batch, seq, c(EMBED as u32)]);
    add_node(&mut g, "embed", Op::Gather { axis: 0 }, &[weights, ids], embedded);
    add_node(&mut g, "mask_axis", Op::Reshape, &[mask], mask3);
    add_node(&mut g, "apply_mask", Op::Binary(BinaryKind::Mul), &[embedded, mask3], masked);
    g.inputs = vec![ids, mask];
    g.outputs = vec![masked];
    g
}

fn embedding_file() -> Vec<u8> {
    pack_graph(&embedding_graph(&embedding_table()))
}

const MIXED_MAX_BATCH: u32 = 3;

/// x f32 [batch, 4, 6] through transpose, matmul, mean, expand, concat, strided slice, sub, relu,
/// cast to bool, where and a gather with constant negative indices.
fn mixed_graph() -> Graph {
    let mut g = Graph::default();
    g.symbols.push(Symbol { name: "batch".into(), max: MIXED_MAX_BATCH });
    let b = Dim::symbol(0);
    let x = activation(&mut g, "x", DType::F32, vec![b, c(4), c(6)]);
    let t = activation(&mut g, "t", DType::F32, vec![b, c(6), c(4)]);
    let m = activation(&mut g, "gram", DType::F32, vec![b, c(4), c(4)]);
    let r = activation(&mut g, "row_mean", DType::F32, vec![b, c(4), c(1)]);
    let e = activation(&mut g, "row_mean_wide", DType::F32, vec![b, c(4), c(4)]);
    let joined = activation(&mut g, "joined", DType::F32, vec![b, c(4), c(8)]);
    let s = activation(&mut g, "odd_rows", DType::F32, vec![b, c(2), c(8)]);
    let one = g.add_const("one".into(), vec![1], Storage::F32(vec![1.0]));
    let d = activation(&mut g, "minus_one", DType::F32, vec![b, c(2), c(8)]);
    let u = activation(&mut g, "relu", DType::F32, vec![b, c(2), c(8)]);
    let cond = activation(&mut g, "above_one", DType::Bool, vec![b, c(2), c(8)]);
    let fallback = g.add_const("fallback".into(), vec![1], Storage::F32(vec![-1.0]));
    let w = activation(&mut g, "chosen", DType::F32, vec![b, c(2), c(8)]);
    let idx = g.add_const("picks".into(), vec![3], Storage::I64(vec![7, 0, -1]));
    let out = activation(&mut g, "picked", DType::F32, vec![b, c(2), c(3)]);

    let perm = [0u8, 2, 1, 3, 4, 5];
    add_node(&mut g, "transpose", Op::Transpose { perm }, &[x], t);
    add_node(&mut g, "gram", Op::MatMul, &[x, t], m);
    let mean = Op::Reduce { kind: ReduceKind::Mean, axes: 1 << 2, keep_dims: true };
    add_node(&mut g, "row_mean", mean, &[m], r);
    add_node(&mut g, "expand", Op::Expand, &[r], e);
    add_node(&mut g, "concat", Op::Concat { axis: 2 }, &[m, e], joined);

    let mut starts = [0u32; MAX_RANK];
    starts[1] = 1;
    let mut steps = [1i32; MAX_RANK];
    steps[1] = 2;
    add_node(&mut g, "slice", Op::Slice { starts, steps }, &[joined], s);
    add_node(&mut g, "sub", Op::Binary(BinaryKind::Sub), &[s, one], d);
    let relu = Op::Unary { kind: UnaryKind::Relu, alpha: 0.0, beta: 0.0 };
    add_node(&mut g, "relu", relu, &[d], u);
    add_node(&mut g, "cast", Op::Cast, &[u], cond);
    add_node(&mut g, "where", Op::Where, &[cond, s, fallback], w);
    add_node(&mut g, "gather", Op::Gather { axis: 2 }, &[w, idx], out);

    g.inputs = vec![x];
    g.outputs = vec![out];
    g
}

fn mixed_file() -> Vec<u8> {
    pack_graph(&mixed_graph())
}

/// Computes the mixed model in f64.
fn mixed_reference(x: &[f32], batch: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for bi in 0..batch {
        let xb = &x[bi * 24..(bi + 1) * 24];
        let at = |i: usize, j: usize| xb[i * 6 + j] as f64;
        let mut joined = [[0f64; 8]; 4];
        for (i, row) in joined.iter_mut().enumerate() {
            for (k, cell) in row.iter_mut().take(4).enumerate() {
                *cell = (0..6).map(|j| at(i, j) * at(k, j)).sum();
            }
            let mean = row[..4].iter().sum::<f64>() / 4.0;
            row[4..].fill(mean);
        }
        for source in [1, 3] {
            let chosen: Vec<f64> = joined[source]
                .iter()
                .map(|&v| {
                    assert!((v - 1.0).abs() > 1e-3, "test data puts a value at the threshold");
                    if v > 1.0 {
                        v
                    } else {
                        -1.0
                    }
                })
                .collect();
            out.extend([chosen[7], chosen[0], chosen[7]]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running opened models
// ---------------------------------------------------------------------------------------------

/// Largest arena the sweeps allocate; models that ask for more are only opened.
const RUN_ARENA_LIMIT: usize = 64 << 20;
/// Largest input (in elements) the sweeps allocate.
const RUN_INPUT_LIMIT: usize = 1 << 20;

/// What running an opened model did.
#[derive(Debug)]
enum RunOutcome {
    Ran,
    Failed(Error),
    TooLarge,
}

fn input_values_f32(count: usize) -> Vec<f32> {
    (0..count).map(|i| ((i * 7919) % 13) as f32 * 0.25 - 1.5).collect()
}

/// Sets every input of a supported element type, with each symbolic axis at `pick(maximum)`,
/// runs, and reads every output of a supported element type.
///
/// # Panics
/// When the runtime breaks its own contract: a session on `arena_bytes_unaligned()` bytes fails,
/// or a successful run's output cannot be read or has the wrong length.
fn run_opened(model: &Model<'_>, pick: &dyn Fn(u64) -> u64) -> RunOutcome {
    let arena_len = model.arena_bytes_unaligned();
    if arena_len > RUN_ARENA_LIMIT {
        let mut small = [0u8; 64];
        match Session::new(model, &mut small) {
            Err(Error::ArenaTooSmall { .. }) => {}
            Err(e) => panic!("a 64-byte arena gave {e:?} instead of ArenaTooSmall"),
            Ok(_) => panic!("a 64-byte arena was accepted for {arena_len} required bytes"),
        }
        return RunOutcome::TooLarge;
    }
    let mut arena = vec![0u8; arena_len];
    let mut session = match Session::new(model, &mut arena) {
        Ok(s) => s,
        Err(e) => panic!("a session on arena_bytes_unaligned() = {arena_len} bytes failed: {e}"),
    };
    for i in 0..model.input_count() {
        let t = model.input_tensor(i).and_then(|t| model.tensor(t));
        let t = t.unwrap_or_else(|e| panic!("input {i} of an opened model is unreadable: {e}"));
        let shape: Vec<usize> = t
            .shape()
            .iter()
            .map(|d| match (d.as_constant(), d.as_symbol()) {
                (Some(value), _) => value as usize,
                (None, Some(s)) => pick(model.symbol_max()[s]) as usize,
                (None, None) => 1,
            })
            .collect();
        let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let Some(count) = count.filter(|&n| n <= RUN_INPUT_LIMIT) else {
            return RunOutcome::TooLarge;
        };
        let set = match t.dtype {
            DType::F32 => session.set_input::<f32>(i, &shape, &input_values_f32(count)),
            DType::I64 => session.set_input::<i64>(i, &shape, &vec![1; count]),
            DType::I32 => session.set_input::<i32>(i, &shape, &vec![1; count]),
            DType::U8 => session.set_input::<u8>(i, &shape, &vec![1; count]),
            _ => continue,
        };
        if let Err(e) = set {
            return RunOutcome::Failed(e);
        }
    }
    if let Err(e) = session.run() {
        return RunOutcome::Failed(e);
    }
    for o in 0..model.output_count() {
        let dtype = session.output_dtype(o).expect("an opened model's outputs have a type");
        let lengths = match dtype {
            DType::F32 => session.output::<f32>(o).map(|(s, v)| (s.numel(), v.len())),
            DType::I64 => session.output::<i64>(o).map(|(s, v)| (s.numel(), v.len())),
            DType::I32 => session.output::<i32>(o).map(|(s, v)| (s.numel(), v.len())),
            DType::U8 => session.output::<u8>(o).map(|(s, v)| (s.numel(), v.len())),
            _ => continue,
        };
        match lengths {
            Ok((numel, len)) => assert_eq!(numel, len, "output {o}: shape and data disagree"),
            Err(e) => panic!("output {o} of a successful run is unreadable: {e}"),
        }
    }
    RunOutcome::Ran
}

fn pick_small(max: u64) -> u64 {
    max.min(3)
}

// ---------------------------------------------------------------------------------------------
// Case runner with a watchdog
// ---------------------------------------------------------------------------------------------

/// Runs `check` on every case in a worker thread, each under `catch_unwind`, and returns one line
/// per failed case. Fails the test when the whole sweep takes longer than `limit`, naming the case
/// that was running.
fn sweep<C, F>(name: &str, cases: Vec<C>, limit: Duration, mut check: F) -> Vec<String>
where
    C: std::fmt::Debug + Send + 'static,
    F: FnMut(&C) -> Result<(), String> + Send + 'static,
{
    let total = cases.len();
    let done = Arc::new(AtomicUsize::new(0));
    let current = Arc::new(Mutex::new(String::new()));
    let (sender, receiver) = mpsc::channel();
    let (done_in_worker, current_in_worker) = (done.clone(), current.clone());
    let worker = std::thread::spawn(move || {
        let mut failures = Vec::new();
        for case in &cases {
            *current_in_worker.lock().unwrap() = format!("{case:?}");
            match catch_unwind(AssertUnwindSafe(|| check(case))) {
                Ok(Ok(())) => {}
                Ok(Err(message)) => failures.push(format!("{case:?}: {message}")),
                Err(payload) => {
                    failures.push(format!("{case:?}: panicked: {}", panic_message(&*payload)))
                }
            }
            done_in_worker.fetch_add(1, Ordering::Relaxed);
        }
        let _ = sender.send(failures);
    });
    let started = Instant::now();
    match receiver.recv_timeout(limit) {
        Ok(failures) => {
            worker.join().expect("the sweep worker finished");
            eprintln!("{name}: {total} cases in {:.1} s", started.elapsed().as_secs_f64());
            failures
        }
        Err(_) => panic!(
            "{name}: no result after {limit:?} ({} of {total} cases done); still running: {}",
            done.load(Ordering::Relaxed),
            current.lock().map(|s| s.clone()).unwrap_or_default()
        ),
    }
}

fn assert_no_failures(name: &str, failures: &[String]) {
    let shown: Vec<&str> = failures.iter().take(40).map(String::as_str).collect();
    assert!(
        failures.is_empty(),
        "{name}: {} cases failed; the first {}:\n{}",
        failures.len(),
        shown.len(),
        shown.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// File layout
// ---------------------------------------------------------------------------------------------

/// Where the header, section table and sections of a packed file lie.
#[derive(Clone, Debug)]
struct Layout {
    header: Header,
    sections: Vec<SectionEntry>,
}

impl Layout {
    fn parse(bytes: &[u8]) -> Layout {
        let header = Header::parse(bytes).expect("the base file has a valid header");
        let sections = (0..header.section_count as usize)
            .map(|i| {
                let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
                SectionEntry::parse(&bytes[at..at + SECTION_ENTRY_LEN]).expect("valid entry")
            })
            .collect();
        Layout { header, sections }
    }

    fn table_end(&self) -> usize {
        HEADER_LEN + self.sections.len() * SECTION_ENTRY_LEN
    }

    fn range(&self, kind: SectionKind) -> Range<usize> {
        let entry = self.sections.iter().find(|s| s.kind == kind).expect("section present");
        entry.offset as usize..(entry.offset + entry.len) as usize
    }

    fn region_of(&self, pos: usize) -> Region {
        if pos < 8 {
            return Region::Magic;
        }
        if pos < 10 {
            return Region::VersionMajor;
        }
        if pos < HEADER_LEN {
            return Region::Header;
        }
        if pos < self.table_end() {
            let within = (pos - HEADER_LEN) % SECTION_ENTRY_LEN;
            let reserved = (4..8).contains(&within) || within >= 28;
            return if reserved { Region::TableReserved } else { Region::TableField };
        }
        for s in &self.sections {
            if (s.offset as usize..(s.offset + s.len) as usize).contains(&pos) {
                return Region::Section(s.kind);
            }
        }
        Region::Padding
    }

    /// Rewrites every section checksum in the table to match the bytes, then re-encodes `header`.
    fn fix_checksums(&self, bytes: &mut [u8], header: &Header) {
        for (i, s) in self.sections.iter().enumerate() {
            let data = &bytes[s.offset as usize..(s.offset + s.len) as usize];
            let crc = crc32(data);
            let at = HEADER_LEN + i * SECTION_ENTRY_LEN + 24;
            bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        }
        bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    }
}

/// Which part of a file a byte belongs to, for the error a flip of it must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    Magic,
    VersionMajor,
    /// The rest of the header, covered by the header checksum.
    Header,
    /// Kind, offset, length or checksum of a section table entry.
    TableField,
    /// Reserved bytes of a section table entry, which no checksum covers.
    TableReserved,
    Section(SectionKind),
    /// Zero padding between sections, which no checksum covers.
    Padding,
}

// ---------------------------------------------------------------------------------------------
// 1. Results against reference computations
// ---------------------------------------------------------------------------------------------

#[test]
fn small_model_matches_reference() {
    let weights = small_weights();
    let file = AlignedBytes::new(&pack_graph(&small_graph(&weights)));
    let model = Model::open(file.bytes()).expect("the small model opens");
    assert_eq!(model.input_count(), 1);
    assert_eq!(model.output_count(), 1);
    assert_eq!(model.symbol(0), Some(("batch", SMALL_MAX_BATCH as u64)));
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let mut rng = SplitMix64(5);
    for batch in 1..=SMALL_MAX_BATCH as usize {
        let x: Vec<f32> = (0..batch * SMALL_IN).map(|_| rng.uniform(-1.5, 1.5)).collect();
        session.set_input::<f32>(0, &[batch, SMALL_IN], &x).unwrap();
        session.run().unwrap();
        let (shape, ours) = session.output::<f32>(0).unwrap();
        assert_eq!(shape.as_slice(), &[batch, SMALL_OUT]);
        let reference = small_reference(&weights, &x);
        assert_close(ours, &reference, 1e-5, &format!("batch {batch}"));
    }
}

#[test]
fn embedding_model_matches_reference() {
    let table = embedding_table();
    let file = AlignedBytes::new(&pack_graph(&embedding_graph(&table)));
    let model = Model::open(file.bytes()).expect("the embedding model opens");
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let ids: Vec<i64> = vec![3, 0, 9, -1, -10, 5, 7, 2];
    let mask: Vec<f32> = vec![1.0, 0.5, 0.0, 1.0, 2.0, -1.0, 1.0, 0.25];
    session.set_input::<i64>(0, &[2, 4], &ids).unwrap();
    session.set_input::<f32>(1, &[2, 4], &mask).unwrap();
    session.run().unwrap();
    let (shape, ours) = session.output::<f32>(0).unwrap();
    assert_eq!(shape.as_slice(), &[2, 4, EMBED]);
    let mut reference = Vec::new();
    for (&id, &m) in ids.iter().zip(&mask) {
        let row = if id < 0 { (id + VOCAB as i64) as usize } else { id as usize };
        for j in 0..EMBED {
            let value = table.q[row * EMBED + j] as f32 * table.scales[row];
            reference.push(value as f64 * m as f64);
        }
    }
    assert_close(ours, &reference, 1e-6, "masked embedding");
}

#[test]
fn mixed_model_matches_reference() {
    let file = AlignedBytes::new(&mixed_file());
    let model = Model::open(file.bytes()).expect("the mixed model opens");
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let mut rng = SplitMix64(9);
    for batch in 1..=MIXED_MAX_BATCH as usize {
        let x: Vec<f32> = (0..batch * 24).map(|_| rng.uniform(-1.0, 1.0)).collect();
        session.set_input::<f32>(0, &[batch, 4, 6], &x).unwrap();
        session.run().unwrap();
        let (shape, ours) = session.output::<f32>(0).unwrap();
        assert_eq!(shape.as_slice(), &[batch, 2, 3]);
        let reference = mixed_reference(&x, batch);
        assert!(reference.iter().any(|&v| v > 1.0), "no value passes the threshold");
        assert!(reference.contains(&-1.0), "no value falls back");
        assert_close(ours, &reference, 1e-4, &format!("batch {batch}"));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Byte flips, truncations, magic, version and alignment
// ---------------------------------------------------------------------------------------------

/// One byte flip: the byte at `pos` is XORed with `mask`.
#[derive(Clone, Copy, Debug)]
struct Flip {
    pos: usize,
    mask: u8,
    region: Region,
}

/// Checks the outcome of opening a file with one flipped byte against what its region demands.
fn check_flip(bytes: &[u8], flip: &Flip) -> Result<(), String> {
    let opened = Model::open(bytes);
    let outcome = describe_open(&opened);
    let expected_ok = match (flip.region, &opened) {
        (Region::Magic, Err(Error::BadMagic)) => true,
        (Region::VersionMajor, Err(Error::UnsupportedVersion { major, .. })) => {
            *major != VERSION_MAJOR
        }
        (Region::Header, Err(Error::ChecksumMismatch { section: Section::Header, .. })) => true,
        (Region::TableField, Err(_)) => true,
        (Region::Section(kind), Err(Error::ChecksumMismatch { section, .. })) => {
            *section == kind.section()
        }
        (Region::TableReserved | Region::Padding, _) => true,
        _ => false,
    };
    if !expected_ok {
        return Err(format!("open gave {outcome}"));
    }
    if let Ok(model) = &opened {
        if let RunOutcome::Failed(e) = run_opened(model, &pick_small) {
            return Err(format!("opened but the run failed: {e:?}"));
        }
    }
    if flip.region == Region::Section(SectionKind::Weights) {
        let options = OpenOptions { verify_weights: false };
        let model = Model::open_with(bytes, options)
            .map_err(|e| format!("open without weight verification gave {e:?}"))?;
        match run_opened(&model, &pick_small) {
            RunOutcome::Ran | RunOutcome::Failed(Error::IndexOutOfRange { .. }) => {}
            other => return Err(format!("the run with changed weights gave {other:?}")),
        }
    }
    Ok(())
}

/// Flips `flips` in place, one at a time, restoring each byte afterwards.
fn flip_sweep(name: &str, file: AlignedBytes, flips: Vec<Flip>, limit: Duration) {
    let mut file = file;
    let failures = sweep(name, flips, limit, move |flip: &Flip| {
        file.bytes_mut()[flip.pos] ^= flip.mask;
        let result = catch_unwind(AssertUnwindSafe(|| check_flip(file.bytes(), flip)));
        file.bytes_mut()[flip.pos] ^= flip.mask;
        match result {
            Ok(r) => r,
            Err(payload) => Err(format!("panicked: {}", panic_message(&*payload))),
        }
    });
    assert_no_failures(name, &failures);
}

fn flips_at(layout: &Layout, positions: impl IntoIterator<Item = usize>) -> Vec<Flip> {
    let mut flips = Vec::new();
    for pos in positions {
        for mask in [0xFF, 0x01] {
            flips.push(Flip { pos, mask, region: layout.region_of(pos) });
        }
    }
    flips
}

#[test]
fn small_file_byte_flips() {
    let bytes = small_file();
    let layout = Layout::parse(&bytes);
    let flips = flips_at(&layout, 0..bytes.len());
    let weights = flips.iter().filter(|f| f.region == Region::Section(SectionKind::Weights));
    assert!(weights.count() > 0, "the sweep covers weight bytes");
    flip_sweep("small file flips", AlignedBytes::new(&bytes), flips, Duration::from_secs(120));
}

/// One truncation: the first `len` bytes, with the header's file length rewritten to match when
/// `rewrite_header` is set.
#[derive(Clone, Copy, Debug)]
struct Truncation {
    len: usize,
    rewrite_header: bool,
}

fn truncation_sweep(name: &str, bytes: &[u8], lengths: Vec<usize>, limit: Duration) {
    let layout = Layout::parse(bytes);
    let mut file = AlignedBytes::new(bytes);
    let original_header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
    let mut cases = Vec::new();
    for &len in &lengths {
        cases.push(Truncation { len, rewrite_header: false });
        if len >= HEADER_LEN {
            cases.push(Truncation { len, rewrite_header: true });
        }
    }
    let failures = sweep(name, cases, limit, move |case: &Truncation| {
        if case.rewrite_header {
            let header = Header { file_len: case.len as u64, ..layout.header };
            file.bytes_mut()[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            let opened = Model::open(&file.bytes()[..case.len]);
            match (&opened, case.rewrite_header) {
                (Err(Error::Truncated { .. }), false) => Ok(()),
                (Err(_), true) => Ok(()),
                _ => Err(format!("open gave {}", describe_open(&opened))),
            }
        }));
        file.bytes_mut()[..HEADER_LEN].copy_from_slice(&original_header);
        match result {
            Ok(r) => r,
            Err(payload) => Err(format!("panicked: {}", panic_message(&*payload))),
        }
    });
    assert_no_failures(name, &failures);
}

/// Lists every length at which a part of the file starts or ends, and one byte either side.
fn boundary_lengths(layout: &Layout, file_len: usize) -> Vec<usize> {
    let mut lengths = vec![0, 1, 7, 8, HEADER_LEN - 1, HEADER_LEN, layout.table_end()];
    for s in &layout.sections {
        let (start, end) = (s.offset as usize, (s.offset + s.len) as usize);
        lengths.extend([start.saturating_sub(1), start, start + 1, end.saturating_sub(1), end]);
    }
    lengths.retain(|&len| len < file_len);
    lengths.sort_unstable();
    lengths.dedup();
    lengths
}

#[test]
fn small_file_truncations() {
    let bytes = small_file();
    let layout = Layout::parse(&bytes);
    let boundaries = boundary_lengths(&layout, bytes.len());
    assert!(boundaries.len() > 20, "the file has sections to cut at");
    let all: Vec<usize> = (0..bytes.len()).collect();
    truncation_sweep("small file truncations", &bytes, all, Duration::from_secs(60));
}

#[test]
fn wrong_magic_is_rejected() {
    let mut bytes = small_file();
    bytes[..8].copy_from_slice(b"EDGEFOLX");
    let file = AlignedBytes::new(&bytes);
    assert_eq!(Model::open(file.bytes()).err(), Some(Error::BadMagic));
    let onnx_start = [0x08, 0x07, 0x12, 0x07, b'p', b'y', b't', b'o'];
    bytes[..8].copy_from_slice(&onnx_start);
    let file = AlignedBytes::new(&bytes);
    assert_eq!(Model::open(file.bytes()).err(), Some(Error::BadMagic));
}

#[test]
fn bumped_major_version_is_rejected() {
    let mut bytes = small_file();
    let layout = Layout::parse(&bytes);
    let header = Header { version_major: VERSION_MAJOR + 1, ..layout.header };
    bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    let file = AlignedBytes::new(&bytes);
    let expected = Error::UnsupportedVersion { major: VERSION_MAJOR + 1, minor: 0 };
    assert_eq!(Model::open(file.bytes()).err(), Some(expected));
    let header = Header { version_major: 0, ..layout.header };
    bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    let file = AlignedBytes::new(&bytes);
    let expected = Error::UnsupportedVersion { major: 0, minor: 0 };
    assert_eq!(Model::open(file.bytes()).err(), Some(expected));
}

#[test]
fn bumped_minor_version_opens() {
    let mut bytes = small_file();
    let layout = Layout::parse(&bytes);
    let header = Header { version_minor: 7, ..layout.header };
    bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    let file = AlignedBytes::new(&bytes);
    let model = Model::open(file.bytes()).expect("a newer minor version opens");
    assert_eq!(model.header().version_minor, 7);
    assert!(matches!(run_opened(&model, &pick_small), RunOutcome::Ran));
}

/// Regression case: the header's arena size can be any u64, and `arena_bytes_unaligned` adds the
/// alignment padding to it, so sizes past isize::MAX must be rejected when the file is opened.
#[test]
fn arena_beyond_address_space_is_rejected() {
    let mut bytes = small_file();
    let layout = Layout::parse(&bytes);
    let largest = isize::MAX as u64 - (SECTION_ALIGN as u64 - 1);
    for arena_bytes in [u64::MAX, u64::MAX - 62, largest + 1] {
        let header = Header { arena_bytes, ..layout.header };
        bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        let file = AlignedBytes::new(&bytes);
        let result = Model::open(file.bytes());
        let ok = matches!(result, Err(Error::InvalidSection { section: Section::Header, .. }));
        assert!(ok, "arena of {arena_bytes} bytes gave {}", describe_open(&result));
    }
    let header = Header { arena_bytes: largest, ..layout.header };
    bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    let file = AlignedBytes::new(&bytes);
    let model = Model::open(file.bytes()).expect("the largest addressable arena size opens");
    assert_eq!(model.arena_bytes_unaligned(), isize::MAX as usize);
    assert!(matches!(run_opened(&model, &pick_small), RunOutcome::TooLarge));
}

#[test]
fn header_bit_flip_fails_header_checksum() {
    let bytes = small_file();
    for pos in [10, 16, 24, 40, 60, 64, 100, 124, 127] {
        let mut flipped = bytes.clone();
        flipped[pos] ^= 0x10;
        let file = AlignedBytes::new(&flipped);
        let result = Model::open(file.bytes());
        let ok = matches!(result, Err(Error::ChecksumMismatch { section: Section::Header, .. }));
        assert!(ok, "flip at header byte {pos} gave {}", describe_open(&result));
    }
}

#[test]
fn weight_bit_flip_fails_weights_checksum() {
    let mut bytes = small_file();
    let layout = Layout::parse(&bytes);
    let weights = layout.range(SectionKind::Weights);
    bytes[weights.start + 3] ^= 0x04;
    let file = AlignedBytes::new(&bytes);
    let result = Model::open(file.bytes());
    let ok = matches!(result, Err(Error::ChecksumMismatch { section: Section::Weights, .. }));
    assert!(ok, "a flipped weight byte gave {}", describe_open(&result));
    let options = OpenOptions { verify_weights: false };
    let model = Model::open_with(file.bytes(), options).expect("opens without weight checks");
    assert!(matches!(run_opened(&model, &pick_small), RunOutcome::Ran));
}

#[test]
fn misaligned_buffer_is_rejected() {
    let bytes = small_file();
    for misalign in 1..BUFFER_ALIGN {
        let file = AlignedBytes::with_misalignment(&bytes, misalign);
        let expected = Error::MisalignedBuffer { required: BUFFER_ALIGN };
        assert_eq!(Model::open(file.bytes()).err(), Some(expected), "misaligned by {misalign}");
    }
    let file = AlignedBytes::with_misalignment(&bytes, BUFFER_ALIGN);
    assert!(Model::open(file.bytes()).is_ok(), "a buffer 16 bytes past alignment is aligned");
}

/// Compresses the real model to int8, once for every test that needs it. Returns `None` when the
/// ONNX file is absent.
fn real_file() -> Option<&'static [u8]> {
    static FILE: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let file = FILE.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/paraphrase-MiniLM-L3-v2/model.onnx");
        if !path.exists() {
            skip(&format!("{} is absent; run scripts/fetch-models.sh", path.display()));
            return None;
        }
        let options = CompressOptions {
            quantize: Quantize::Int8,
            low_rank: LowRank::Off,
            import: ImportOptions { max_batch: 1, max_seq: 16 },
            tokenizer: None,
        };
        let started = Instant::now();
        let (bytes, _) = compress(&path, &options).expect("the real model compresses");
        eprintln!("compressed {} in {:.1} s", path.display(), started.elapsed().as_secs_f64());
        Some(bytes)
    });
    file.as_deref()
}

/// `count` positions spread evenly over `range`, shifted by a seeded offset, first and last
/// included.
fn sample_positions(range: Range<usize>, count: usize, rng: &mut SplitMix64) -> Vec<usize> {
    if range.len() <= count {
        return range.collect();
    }
    let step = range.len() / count;
    let shift = rng.below(step as u64) as usize;
    let mut positions: Vec<usize> = (0..count).map(|i| range.start + i * step + shift).collect();
    positions.push(range.start);
    positions.push(range.end - 1);
    positions.sort_unstable();
    positions.dedup();
    positions
}

#[test]
fn real_file_byte_flips() {
    let Some(bytes) = real_file() else { return };
    let layout = Layout::parse(bytes);
    let file = AlignedBytes::new(bytes);
    {
        let model = Model::open(file.bytes()).expect("the real file opens");
        let baseline = run_opened(&model, &pick_small);
        assert!(matches!(baseline, RunOutcome::Ran), "the real file runs: {baseline:?}");
    }

    let mut rng = SplitMix64(77);
    let mut positions: Vec<usize> = (0..layout.table_end()).collect();
    for kind in SectionKind::ALL {
        let samples = if kind == SectionKind::Weights { 48 } else { 160 };
        positions.extend(sample_positions(layout.range(kind), samples, &mut rng));
    }
    let padding: Vec<usize> = (layout.table_end()..bytes.len())
        .filter(|&p| layout.region_of(p) == Region::Padding)
        .collect();
    positions.extend(sample_positions(0..padding.len(), 32, &mut rng).iter().map(|&i| padding[i]));
    let flips = flips_at(&layout, positions);
    eprintln!("real file: {} bytes, {} flips", bytes.len(), flips.len());
    flip_sweep("real file flips", file, flips, Duration::from_secs(240));
}

#[test]
fn real_file_truncations() {
    let Some(bytes) = real_file() else { return };
    let layout = Layout::parse(bytes);
    let mut lengths = boundary_lengths(&layout, bytes.len());
    let mut rng = SplitMix64(78);
    lengths.extend(sample_positions(0..bytes.len(), 160, &mut rng));
    lengths.sort_unstable();
    lengths.dedup();
    truncation_sweep("real file truncations", bytes, lengths, Duration::from_secs(240));
}

// ---------------------------------------------------------------------------------------------
// 3. Fields rewritten with recomputed checksums
// ---------------------------------------------------------------------------------------------

/// A little-endian field of a file that the fuzzer may rewrite.
#[derive(Clone, Debug)]
struct Field {
    at: usize,
    width: usize,
    name: String,
    /// Byte lengths that a rewrite of this field can make inconsistent.
    repair: Repair,
}

/// Which tensor byte lengths to recompute after a field is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repair {
    Nothing,
    /// The entry of this tensor, whose shape or type the field is part of.
    Tensor(usize),
    /// Every entry, because the field is a symbol's maximum value.
    AllTensors,
}

/// Header fields the fuzzer may rewrite before re-encoding the header.
#[derive(Clone, Copy, Debug)]
enum HeaderField {
    FileLen,
    ArenaBytes,
    TensorCount,
    OpCount,
    InputCount,
    OutputCount,
    SymbolCount,
}

/// The rewritable fields of one base file.
struct Catalog {
    layout: Layout,
    tensor_fields: Vec<Field>,
    op_fields: Vec<Field>,
    io_fields: Vec<Field>,
    symbol_fields: Vec<Field>,
}

fn field(at: usize, width: usize, name: String, repair: Repair) -> Field {
    Field { at, width, name, repair }
}

impl Catalog {
    fn new(bytes: &[u8]) -> Catalog {
        let layout = Layout::parse(bytes);
        let mut tensor_fields = Vec::new();
        let tensors = layout.range(SectionKind::Tensors);
        for (t, at) in tensors.step_by(TENSOR_ENTRY_LEN).enumerate() {
            let named = [
                (0, 4, "name offset"),
                (4, 4, "name length"),
                (8, 1, "dtype"),
                (9, 1, "kind"),
                (10, 1, "rank"),
                (11, 1, "quant"),
                (12, 4, "scale tensor"),
                (16, 4, "group size"),
                (20, 4, "reserved"),
                (24, 8, "offset"),
                (32, 8, "byte length"),
            ];
            for (offset, width, name) in named {
                tensor_fields.push(field(
                    at + offset,
                    width,
                    format!("tensor {t} {name}"),
                    Repair::Tensor(t),
                ));
            }
            // Axes past the rank and exponents of undeclared symbols past the first are ignored
            // or rejected alike, so only the used ones and one more of each are rewritten.
            let axes = (bytes[at + 10] as usize + 1).min(MAX_RANK);
            let symbols = (layout.header.symbol_count as usize + 1).min(MAX_SYMBOLS);
            for d in 0..axes {
                let dim_at = at + 40 + 8 * d;
                tensor_fields.push(field(
                    dim_at,
                    4,
                    format!("tensor {t} dim {d} factor"),
                    Repair::Tensor(t),
                ));
                for s in 0..symbols {
                    let name = format!("tensor {t} dim {d} exponent {s}");
                    tensor_fields.push(field(dim_at + 4 + s, 1, name, Repair::Tensor(t)));
                }
            }
        }

        let mut op_fields = Vec::new();
        let ops = layout.range(SectionKind::Ops);
        let (mut at, mut op) = (ops.start, 0);
        while at < ops.end {
            let n_in = bytes[at + 2] as usize;
            let n_out = bytes[at + 3] as usize;
            let params = read_le(bytes, at + 4, 2) as usize;
            let named = [
                (0, 2, "code"),
                (2, 1, "input count"),
                (3, 1, "output count"),
                (4, 2, "parameter bytes"),
                (6, 2, "reserved"),
                (8, 4, "name offset"),
                (12, 4, "name length"),
            ];
            for (offset, width, name) in named {
                op_fields.push(field(
                    at + offset,
                    width,
                    format!("op {op} {name}"),
                    Repair::Nothing,
                ));
            }
            for i in 0..n_in + n_out {
                let name = if i < n_in {
                    format!("op {op} input {i}")
                } else {
                    format!("op {op} output {}", i - n_in)
                };
                op_fields.push(field(at + OP_HEADER_LEN + 4 * i, 4, name, Repair::Nothing));
            }
            let params_at = at + OP_HEADER_LEN + 4 * (n_in + n_out);
            for w in 0..params / 4 {
                op_fields.push(field(
                    params_at + 4 * w,
                    4,
                    format!("op {op} param {w}"),
                    Repair::Nothing,
                ));
            }
            at = params_at + params;
            op += 1;
        }

        let io_fields = layout
            .range(SectionKind::Io)
            .step_by(4)
            .enumerate()
            .map(|(i, at)| field(at, 4, format!("io entry {i}"), Repair::Nothing))
            .collect();
        let mut symbol_fields = Vec::new();
        for (s, at) in layout.range(SectionKind::Symbols).step_by(SYMBOL_ENTRY_LEN).enumerate() {
            let named = [
                (0, "name offset", Repair::Nothing),
                (4, "name length", Repair::Nothing),
                (8, "maximum", Repair::AllTensors),
            ];
            for (offset, name, repair) in named {
                symbol_fields.push(field(at + offset, 4, format!("symbol {s} {name}"), repair));
            }
        }
        Catalog { layout, tensor_fields, op_fields, io_fields, symbol_fields }
    }

    fn tensor_count(&self) -> u64 {
        self.layout.header.tensor_count as u64
    }
}

/// Picks a new value for a field of `width` bytes: a boundary value, a small value, a nearby
/// value, a tensor index, an aligned offset or random bits.
fn pick_value(rng: &mut SplitMix64, width: usize, original: u64, catalog: &Catalog) -> u64 {
    let bits = 8 * width as u32;
    let all_ones = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let value = match rng.below(12) {
        0 => 0,
        1 => 1,
        2 => original.wrapping_add(rng.below(4) + 1),
        3 => original.wrapping_sub(rng.below(4) + 1),
        4 => original ^ (1u64 << rng.below(bits as u64)),
        5 => all_ones,
        6 => all_ones - rng.below(4),
        7 => 1u64 << (bits - 1),
        8 => rng.below(16),
        9 => rng.below(catalog.tensor_count() + 2),
        10 => SECTION_ALIGN as u64 * rng.below(64),
        _ => rng.next_u64(),
    };
    value & all_ones
}

/// The byte length a tensor entry must state for its shape and element type at the symbols'
/// maximum values, or `None` when it has none.
fn consistent_byte_len(entry: &TensorEntry, symbol_max: &[u64; MAX_SYMBOLS]) -> Option<u64> {
    let dims: Option<Vec<u64>> = entry.shape().iter().map(|d| d.eval(symbol_max)).collect();
    let dims = dims?;
    if entry.dtype == DType::I4 {
        return match dims[..] {
            [rows, cols] => rows.checked_mul(cols.checked_add(1)? / 2),
            _ => None,
        };
    }
    let count = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
    entry.dtype.bytes_for(count)
}

fn symbol_max_of(bytes: &[u8], catalog: &Catalog) -> [u64; MAX_SYMBOLS] {
    let mut max = [1u64; MAX_SYMBOLS];
    let symbols = catalog.layout.range(SectionKind::Symbols);
    for (i, at) in symbols.step_by(SYMBOL_ENTRY_LEN).take(MAX_SYMBOLS).enumerate() {
        max[i] = read_le(bytes, at + 8, 4);
    }
    max
}

/// Applies one to four random rewrites to `bytes` and returns the header to encode with the
/// descriptions of the rewrites. Half of the time, a rewritten tensor entry (every entry, after a
/// symbol's maximum changes) gets the byte length its new shape implies, so that the checks past
/// the byte length are reached too.
fn mutate(bytes: &mut [u8], catalog: &Catalog, rng: &mut SplitMix64) -> (Header, Vec<String>) {
    let mut header = catalog.layout.header;
    let mut notes = Vec::new();
    let mutations = [1, 1, 1, 1, 2, 2, 3, 4][rng.below(8) as usize];
    for _ in 0..mutations {
        let group = match rng.below(100) {
            0..=44 => &catalog.tensor_fields,
            45..=79 => &catalog.op_fields,
            80..=86 => &catalog.io_fields,
            87..=92 => &catalog.symbol_fields,
            _ => {
                let fields = [
                    HeaderField::FileLen,
                    HeaderField::ArenaBytes,
                    HeaderField::TensorCount,
                    HeaderField::OpCount,
                    HeaderField::InputCount,
                    HeaderField::OutputCount,
                    HeaderField::SymbolCount,
                ];
                let which = fields[rng.below(fields.len() as u64) as usize];
                notes.push(mutate_header(&mut header, which, rng, catalog));
                continue;
            }
        };
        let f = &group[rng.below(group.len() as u64) as usize];
        let original = read_le(bytes, f.at, f.width);
        let value = pick_value(rng, f.width, original, catalog);
        write_le(bytes, f.at, f.width, value);
        notes.push(format!("{} {original:#x} -> {value:#x}", f.name));
        let repaired = match f.repair {
            Repair::Nothing => 0..0,
            Repair::Tensor(t) => t..t + 1,
            Repair::AllTensors => 0..catalog.tensor_count() as usize,
        };
        if rng.below(2) == 0 {
            for t in repaired {
                if let Some(len) = repair_byte_len(bytes, catalog, t) {
                    notes.push(format!("tensor {t} byte length made {len:#x}"));
                }
            }
        }
    }
    (header, notes)
}

/// Rewrites the byte length of tensor `t` to match its shape and type, returning the new length,
/// or `None` when the entry no longer parses or has no consistent length.
fn repair_byte_len(bytes: &mut [u8], catalog: &Catalog, t: usize) -> Option<u64> {
    let at = catalog.layout.range(SectionKind::Tensors).start + t * TENSOR_ENTRY_LEN;
    let entry = TensorEntry::parse(&bytes[at..at + TENSOR_ENTRY_LEN], t as u32).ok()?;
    let len = consistent_byte_len(&entry, &symbol_max_of(bytes, catalog))?;
    write_le(bytes, at + 32, 8, len);
    Some(len)
}

fn mutate_header(
    header: &mut Header,
    which: HeaderField,
    rng: &mut SplitMix64,
    catalog: &Catalog,
) -> String {
    let (original, width) = match which {
        HeaderField::FileLen => (header.file_len, 8),
        HeaderField::ArenaBytes => (header.arena_bytes, 8),
        HeaderField::TensorCount => (header.tensor_count as u64, 4),
        HeaderField::OpCount => (header.op_count as u64, 4),
        HeaderField::InputCount => (header.input_count as u64, 4),
        HeaderField::OutputCount => (header.output_count as u64, 4),
        HeaderField::SymbolCount => (header.symbol_count as u64, 4),
    };
    let value = pick_value(rng, width, original, catalog);
    match which {
        HeaderField::FileLen => header.file_len = value,
        HeaderField::ArenaBytes => header.arena_bytes = value,
        HeaderField::TensorCount => header.tensor_count = value as u32,
        HeaderField::OpCount => header.op_count = value as u32,
        HeaderField::InputCount => header.input_count = value as u32,
        HeaderField::OutputCount => header.output_count = value as u32,
        HeaderField::SymbolCount => header.symbol_count = value as u32,
    }
    format!("header {which:?} {original:#x} -> {value:#x}")
}

/// One rewritten file, named by the seed that rewrites the base file.
#[derive(Clone, Copy, Debug)]
struct Rewrite {
    seed: u64,
}

/// What opening and running rewritten files did, for the summary.
#[derive(Default)]
struct RewriteStats {
    opened: usize,
    ran: usize,
    rejected: usize,
}

fn rewrite_sweep(base: &'static str, bytes: Vec<u8>, cases: u64) -> RewriteStats {
    let catalog = Catalog::new(&bytes);
    let stats = Arc::new(Mutex::new(RewriteStats::default()));
    let stats_in_worker = stats.clone();
    let rewrites: Vec<Rewrite> = (0..cases).map(|seed| Rewrite { seed }).collect();
    let name = format!("{base} rewrites");
    let failures = sweep(&name, rewrites, Duration::from_secs(300), move |case: &Rewrite| {
        let mut rng = SplitMix64(case.seed.wrapping_mul(0x1000_0001) ^ 0xF00D);
        let mut file = AlignedBytes::new(&bytes);
        let (header, notes) = mutate(file.bytes_mut(), &catalog, &mut rng);
        catalog.layout.fix_checksums(file.bytes_mut(), &header);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let Ok(model) = Model::open(file.bytes()) else {
                stats_in_worker.lock().unwrap().rejected += 1;
                return;
            };
            stats_in_worker.lock().unwrap().opened += 1;
            let picks: [&dyn Fn(u64) -> u64; 4] =
                [&|_| 1, &|max| max.min(2), &|max| max, &|max| max.saturating_add(1)];
            for pick in picks {
                if let RunOutcome::Ran = run_opened(&model, pick) {
                    stats_in_worker.lock().unwrap().ran += 1;
                }
            }
        }));
        result.map_err(|payload| {
            format!("[{}] panicked: {}", notes.join("; "), panic_message(&*payload))
        })
    });
    assert_no_failures(&name, &failures);
    let stats = std::mem::take(&mut *stats.lock().unwrap());
    eprintln!(
        "{base}: {cases} rewrites, {} opened ({} runs completed), {} rejected",
        stats.opened, stats.ran, stats.rejected
    );
    stats
}

#[test]
fn checksum_fix_up_keeps_files_valid() {
    for bytes in [small_file(), embedding_file(), mixed_file()] {
        let layout = Layout::parse(&bytes);
        let mut file = AlignedBytes::new(&bytes);
        layout.fix_checksums(file.bytes_mut(), &layout.header);
        assert_eq!(file.bytes(), &bytes[..], "fixing the checksums of a valid file changes it");
    }
}

#[test]
fn rewritten_fields_with_fixed_checksums() {
    let bases: [(&'static str, Vec<u8>); 3] =
        [("small", small_file()), ("embedding", embedding_file()), ("mixed", mixed_file())];
    for (base, bytes) in bases {
        let stats = rewrite_sweep(base, bytes, 20_000);
        assert!(stats.opened > 0, "{base}: no rewritten file opened, so the runs were never tried");
        assert!(stats.rejected > 0, "{base}: no rewritten file was rejected");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Misuse of the session API
// ---------------------------------------------------------------------------------------------

#[test]
fn input_with_wrong_dtype_is_rejected() {
    let file = AlignedBytes::new(&small_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let expected = Error::InputDtypeMismatch { input: 0, expected: DType::F32, given: DType::I64 };
    assert_eq!(session.set_input::<i64>(0, &[1, SMALL_IN], &[0; SMALL_IN]), Err(expected));
    let expected = Error::InputDtypeMismatch { input: 0, expected: DType::F32, given: DType::U8 };
    assert_eq!(session.set_input::<u8>(0, &[1, SMALL_IN], &[0; SMALL_IN]), Err(expected));
}

#[test]
fn input_with_wrong_shape_is_rejected() {
    let file = AlignedBytes::new(&small_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let data = vec![0.5f32; 64];
    let max = SMALL_MAX_BATCH as u64;
    let extent = |axis, expected, given, variable| Error::InputShapeMismatch {
        input: 0,
        axis,
        expected,
        given,
        variable,
    };
    let cases: [(&[usize], Error); 5] = [
        (&[SMALL_IN], Error::InputRankMismatch { input: 0, expected: 2, given: 1 }),
        (&[1, SMALL_IN, 1], Error::InputRankMismatch { input: 0, expected: 2, given: 3 }),
        (&[1, 7], extent(1, 8, 7, false)),
        (&[5, SMALL_IN], extent(0, max, 5, true)),
        (&[0, SMALL_IN], extent(0, max, 0, true)),
    ];
    for (shape, expected) in cases {
        let count = shape.iter().product::<usize>();
        let result = session.set_input::<f32>(0, shape, &data[..count]);
        assert_eq!(result, Err(expected), "shape {shape:?}");
    }
}

#[test]
fn input_data_length_must_match_shape() {
    let file = AlignedBytes::new(&small_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let data = vec![0.5f32; 64];
    for (len, expected) in [(2 * SMALL_IN - 1, 2 * SMALL_IN), (2 * SMALL_IN + 1, 2 * SMALL_IN)] {
        let result = session.set_input::<f32>(0, &[2, SMALL_IN], &data[..len]);
        let error =
            Error::InputLengthMismatch { input: 0, expected: expected as u64, given: len as u64 };
        assert_eq!(result, Err(error), "{len} values for shape [2, 8]");
    }
    assert_eq!(session.run(), Err(Error::InputNotSet { input: 0 }), "a rejected input is unset");
}

#[test]
fn run_before_inputs_set_fails() {
    let file = AlignedBytes::new(&small_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    assert_eq!(session.run(), Err(Error::InputNotSet { input: 0 }));

    let file = AlignedBytes::new(&embedding_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    session.set_input::<i64>(0, &[1, 2], &[1, 2]).unwrap();
    assert_eq!(session.run(), Err(Error::InputNotSet { input: 1 }));
    let mut session = Session::new(&model, &mut arena).unwrap();
    session.set_input::<f32>(1, &[1, 2], &[1.0, 1.0]).unwrap();
    assert_eq!(session.run(), Err(Error::InputNotSet { input: 0 }));
}

#[test]
fn output_before_run_fails() {
    let file = AlignedBytes::new(&small_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    assert_eq!(session.output::<f32>(0).err(), Some(Error::NotRun));
    let x = input_values_f32(SMALL_IN);
    session.set_input::<f32>(0, &[1, SMALL_IN], &x).unwrap();
    assert_eq!(session.output::<f32>(0).err(), Some(Error::NotRun), "inputs set, not run");
    session.run().unwrap();
    assert!(session.output::<f32>(0).is_ok());
    session.set_input::<f32>(0, &[1, SMALL_IN], &x).unwrap();
    assert_eq!(session.output::<f32>(0).err(), Some(Error::NotRun), "new inputs since the run");
}

#[test]
fn arena_too_small_reports_required_size() {
    let file = AlignedBytes::new(&small_file());
    let model = Model::open(file.bytes()).unwrap();
    let needed = model.arena_bytes();
    assert!(needed > 0);
    let mut storage = vec![0u8; needed + 2 * SECTION_ALIGN];
    for start in 0..SECTION_ALIGN {
        let address = storage.as_ptr() as usize + start;
        let pad = (SECTION_ALIGN - address % SECTION_ALIGN) % SECTION_ALIGN;
        let short = needed + pad - 1;
        match Session::new(&model, &mut storage[start..start + short]) {
            Err(Error::ArenaTooSmall { required, provided }) => {
                assert_eq!(required, (needed + pad) as u64, "arena at offset {start}");
                assert_eq!(provided, short as u64, "arena at offset {start}");
            }
            Err(e) => panic!("arena at offset {start}: {e:?} instead of ArenaTooSmall"),
            Ok(_) => {
                panic!("arena at offset {start}: {short} bytes accepted, {} needed", short + 1)
            }
        }
        let exact = Session::new(&model, &mut storage[start..start + needed + pad]);
        assert!(exact.is_ok(), "arena at offset {start} with exactly the required bytes");
    }
    let mut empty: [u8; 0] = [];
    let result = Session::new(&model, &mut empty);
    assert!(matches!(result, Err(Error::ArenaTooSmall { provided: 0, .. })));
}

#[test]
fn unknown_input_index_is_rejected() {
    let file = AlignedBytes::new(&small_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let x = input_values_f32(SMALL_IN);
    for index in [1, 2, 31, 32, usize::MAX] {
        let result = session.set_input::<f32>(index, &[1, SMALL_IN], &x);
        assert!(matches!(result, Err(Error::UnknownIo { .. })), "input {index}: {result:?}");
    }
    session.set_input::<f32>(0, &[1, SMALL_IN], &x).unwrap();
    session.run().unwrap();
    for index in [1, 5, usize::MAX] {
        let result = session.output::<f32>(index);
        assert!(matches!(result, Err(Error::UnknownIo { .. })), "output {index}");
    }
}

#[test]
fn conflicting_symbol_bindings_fail() {
    let file = AlignedBytes::new(&embedding_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    session.set_input::<i64>(0, &[1, 3], &[1, 2, 3]).unwrap();
    session.set_input::<f32>(1, &[1, 2], &[1.0, 1.0]).unwrap();
    let expected = Error::SymbolConflict { symbol: 1, first: 3, second: 2 };
    assert_eq!(session.run(), Err(expected));
    assert_eq!(session.output::<f32>(0).err(), Some(Error::NotRun), "after a failed run");
    session.set_input::<f32>(1, &[2, 3], &[1.0; 6]).unwrap();
    let expected = Error::SymbolConflict { symbol: 0, first: 1, second: 2 };
    assert_eq!(session.run(), Err(expected));
    session.set_input::<f32>(1, &[1, 3], &[1.0; 3]).unwrap();
    assert_eq!(session.run(), Ok(()), "consistent shapes run");
}

#[test]
fn gather_index_out_of_range_fails() {
    let file = AlignedBytes::new(&embedding_file());
    let model = Model::open(file.bytes()).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    session.set_input::<f32>(1, &[1, 3], &[1.0; 3]).unwrap();
    let extent = VOCAB as u64;
    for bad in [VOCAB as i64, -(VOCAB as i64) - 1, i64::MAX, i64::MIN] {
        session.set_input::<i64>(0, &[1, 3], &[0, bad, 1]).unwrap();
        let expected = Error::IndexOutOfRange { op: 0, index: bad, extent };
        assert_eq!(session.run(), Err(expected), "index {bad}");
        assert_eq!(session.output::<f32>(0).err(), Some(Error::NotRun));
    }
    session.set_input::<i64>(0, &[1, 3], &[0, -(VOCAB as i64), VOCAB as i64 - 1]).unwrap();
    assert_eq!(session.run(), Ok(()), "the first and last rows by either sign");
}
