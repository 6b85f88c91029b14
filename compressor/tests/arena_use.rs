//! The arena size a file states is what a run really uses: after painting the arena, a run at the
//! symbols' maximums changes its last byte and nothing past it. Ops planned in place give the same
//! bits as the plan without in-place ops, on hand-built graphs, the ONNX fixtures and the real
//! models (MLPerf Tiny keyword spotting and wake word, paraphrase-MiniLM-L3-v2).

mod common;

use std::path::Path;

use common::{minilm_l3_model, mlperf_tiny_file, random_f32, Aligned};
use edgefold_compressor::ir::{Graph, Node, Storage, Symbol, Value, ValueId};
use edgefold_compressor::onnx::{import, ImportOptions};
use edgefold_compressor::passes::fuse;
use edgefold_compressor::plan::{plan_arena_with, PlanOptions};
use edgefold_compressor::quantize::{quantize, Quantize};
use edgefold_compressor::writer::pack;
use edgefold_runtime::crc32::crc32;
use edgefold_runtime::format::{
    DType, Dim, SectionEntry, SectionKind, TensorEntry, HEADER_LEN, OP_HEADER_LEN,
    SECTION_ENTRY_LEN, TENSOR_ENTRY_LEN,
};
use edgefold_runtime::ops::{BinaryKind, Op, PoolKind, UnaryKind, Window2d};
use edgefold_runtime::{Error, Model, Session};

/// Bytes past the stated arena size that each run also paints, to catch writes beyond it.
const GUARD: usize = 256;

/// The values a run leaves in its outputs, as raw bytes per output.
type Outputs = Vec<Vec<u8>>;

/// What one packed file does to a painted arena.
struct ArenaUse {
    /// `arena_bytes` from the file's header.
    stated: usize,
    /// One past the highest arena byte that a run changed, over two paint bytes.
    high_water: usize,
    /// Ops flagged in place in the file.
    in_place_ops: usize,
    outputs: Outputs,
}

/// Plans and packs `graph`, with or without ops in place.
fn pack_with(graph: &Graph, in_place: bool) -> Aligned {
    let plan = plan_arena_with(graph, &PlanOptions { in_place });
    Aligned::new(&pack(graph, &plan, &[]).expect("graph packs"))
}

/// Input values for every graph input at the symbols' maximums: f32 in [-1, 1), and for i64
/// inputs token ids, an attention mask of ones or token types of zeros, chosen by name.
fn max_inputs(model: &Model<'_>) -> Vec<(Vec<usize>, Vec<u8>)> {
    let mut inputs = Vec::new();
    for i in 0..model.input_count() {
        let index = model.input_tensor(i).unwrap();
        let t = model.tensor(index).unwrap();
        let shape: Vec<usize> = t
            .shape()
            .iter()
            .map(|d| d.eval(model.symbol_max()).expect("input extent") as usize)
            .collect();
        let count: usize = shape.iter().product();
        let name = model.tensor_name(index);
        let bytes: Vec<u8> = match t.dtype {
            DType::F32 => {
                random_f32(count, 17 + i as u64).iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            DType::I64 => (0..count as i64)
                .map(|k| match () {
                    _ if name.contains("mask") => 1,
                    _ if name.contains("type") => 0,
                    _ => 100 + (k * 37) % 1000,
                })
                .flat_map(|v: i64| v.to_le_bytes())
                .collect(),
            other => {
                panic!("input {name} has element type {other:?}, which this test does not set")
            }
        };
        inputs.push((shape, bytes));
    }
    inputs
}

/// Runs `file` twice on `inputs`, each time in an arena painted with another byte, and returns
/// what the runs changed. Panics when a run changes a byte past the stated arena, or when the two
/// runs give different outputs.
fn measure(file: &Aligned) -> ArenaUse {
    let model = Model::open(file.bytes()).expect("file opens");
    let stated = model.arena_bytes();
    let in_place_ops = model
        .ops()
        .filter(|item| item.as_ref().map(|(r, _)| r.in_place()).unwrap_or(false))
        .count();
    let inputs = max_inputs(&model);
    let mut high_water = 0;
    let mut outputs: Option<Outputs> = None;
    for paint in [0x5A_u8, 0xA5] {
        let mut storage = vec![paint; stated + GUARD + 64];
        let pad = storage.as_ptr().align_offset(64);
        let arena = &mut storage[pad..pad + stated + GUARD];
        let mut session = Session::new(&model, arena).expect("session");
        for (i, (shape, bytes)) in inputs.iter().enumerate() {
            match model.tensor(model.input_tensor(i).unwrap()).unwrap().dtype {
                DType::F32 => {
                    let values: Vec<f32> = bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    session.set_input::<f32>(i, shape, &values).unwrap();
                }
                _ => {
                    let values: Vec<i64> = bytes
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    session.set_input::<i64>(i, shape, &values).unwrap();
                }
            }
        }
        session.run().expect("run");
        let mut run_outputs = Vec::new();
        for o in 0..model.output_count() {
            let bytes = match session.output_dtype(o).unwrap() {
                DType::F32 => session
                    .output::<f32>(o)
                    .unwrap()
                    .1
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                DType::I64 => session
                    .output::<i64>(o)
                    .unwrap()
                    .1
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                other => panic!("output {o} has element type {other:?}"),
            };
            run_outputs.push(bytes);
        }
        let changed = arena.iter().rposition(|&b| b != paint).map_or(0, |i| i + 1);
        assert!(changed <= stated, "a run wrote byte {} past the stated {stated}", changed - 1);
        high_water = high_water.max(changed);
        if let Some(first) = &outputs {
            assert!(first == &run_outputs, "the outputs depend on the arena's initial bytes");
        }
        outputs = Some(run_outputs);
    }
    ArenaUse { stated, high_water, in_place_ops, outputs: outputs.unwrap() }
}

/// Checks one graph: both plans state the arena their runs use, and give the same outputs.
/// Returns the measurement of the plan with ops in place.
fn check(name: &str, graph: &Graph) -> ArenaUse {
    let shared = measure(&pack_with(graph, true));
    let separate = measure(&pack_with(graph, false));
    eprintln!(
        "{name}: arena {} bytes with {} ops in place, {} bytes without",
        shared.stated, shared.in_place_ops, separate.stated
    );
    assert_eq!(shared.high_water, shared.stated, "{name}: in-place plan's stated arena");
    assert_eq!(separate.high_water, separate.stated, "{name}: plan without in-place ops");
    assert_eq!(separate.in_place_ops, 0, "{name}: ops in place with in-place planning off");
    assert!(shared.stated <= separate.stated, "{name}: in-place planning grew the arena");
    for (o, (a, b)) in shared.outputs.iter().zip(&separate.outputs).enumerate() {
        assert!(a == b, "{name}: output {o} differs between the two plans");
    }
    shared
}

fn activation(graph: &mut Graph, name: &str, shape: Vec<Dim>) -> ValueId {
    graph.add_value(Value { name: name.into(), dtype: DType::F32, shape, data: None })
}

fn node(graph: &mut Graph, name: &str, op: Op, inputs: &[Option<ValueId>], output: ValueId) {
    let inputs = inputs.to_vec();
    graph.nodes.push(Node { name: name.into(), op, inputs, outputs: vec![output] });
}

fn conv(window: Window2d, groups: u32, relu: bool) -> Op {
    let activation_min = if relu { 0.0 } else { f32::NEG_INFINITY };
    Op::Conv2d { window, groups, activation_min, activation_max: f32::INFINITY }
}

/// int8 per-row weights `[rows, cols]` from deterministic values.
fn int8_weight(graph: &mut Graph, name: &str, rows: usize, cols: usize, seed: u64) -> ValueId {
    let raw = random_f32(rows * cols, seed);
    let q = raw.iter().map(|v| (v * 127.0).round() as i8).collect();
    let scales = (0..rows).map(|r| 0.01 + 0.002 * r as f32).collect();
    graph.add_const(name.into(), vec![rows, cols], Storage::I8PerRow { q, scales })
}

/// A small depthwise-separable network with a symbolic batch: a standard convolution, then two
/// blocks of depthwise 3x3 (int8 weights, a tall kernel in the second block) and pointwise
/// convolutions, a separate ReLU, a residual addition, average pooling, a linear layer and
/// softmax.
fn separable_graph() -> Graph {
    let mut g = Graph::default();
    g.symbols.push(Symbol { name: "batch".into(), max: 3 });
    let (b, c) = (Dim::symbol(0), Dim::constant);
    let (channels, height, width) = (6usize, 9usize, 5usize);
    let planes = |g: &mut Graph, name: &str| {
        activation(g, name, vec![b, c(channels as u32), c(height as u32), c(width as u32)])
    };
    let x = activation(&mut g, "x", vec![b, c(1), c(height as u32), c(width as u32)]);
    let w0 = g.add_const("w0".into(), vec![channels, 9], Storage::F32(random_f32(channels * 9, 1)));
    let stem = planes(&mut g, "stem");
    let same3 = Window2d { kernel: [3, 3], strides: [1, 1], pads: [1; 4], dilations: [1, 1] };
    node(&mut g, "stem", conv(same3, 1, true), &[Some(x), Some(w0), None], stem);

    let mut current = stem;
    let windows = [same3, Window2d { kernel: [5, 3], pads: [2, 1, 2, 1], ..same3 }];
    for (i, window) in windows.into_iter().enumerate() {
        let taps = (window.kernel[0] * window.kernel[1]) as usize;
        let dw_w = int8_weight(&mut g, &format!("dw{i}.w"), channels, taps, 10 + i as u64);
        let dw_b = g.add_const(
            format!("dw{i}.b"),
            vec![channels],
            Storage::F32(random_f32(channels, 20 + i as u64)),
        );
        let dw = planes(&mut g, &format!("dw{i}"));
        let op = conv(window, channels as u32, true);
        node(&mut g, &format!("dw{i}"), op, &[Some(current), Some(dw_w), Some(dw_b)], dw);
        let pw_w = int8_weight(&mut g, &format!("pw{i}.w"), channels, channels, 30 + i as u64);
        let pw = planes(&mut g, &format!("pw{i}"));
        let pointwise =
            Window2d { kernel: [1, 1], strides: [1, 1], pads: [0; 4], dilations: [1, 1] };
        node(&mut g, &format!("pw{i}"), conv(pointwise, 1, false), &[Some(dw), Some(pw_w)], pw);
        current = pw;
    }
    let relu = planes(&mut g, "relu");
    let relu_op = Op::Unary { kind: UnaryKind::Relu, alpha: 0.0, beta: 0.0 };
    node(&mut g, "relu", relu_op, &[Some(current)], relu);
    let sum = planes(&mut g, "residual");
    node(&mut g, "residual", Op::Binary(BinaryKind::Add), &[Some(relu), Some(stem)], sum);

    let pooled = activation(&mut g, "pooled", vec![b, c(channels as u32), c(1), c(1)]);
    let global = Window2d {
        kernel: [height as u32, width as u32],
        strides: [1, 1],
        pads: [0; 4],
        dilations: [1, 1],
    };
    let pool = Op::Pool {
        kind: PoolKind::Average,
        window: global,
        count_include_pad: false,
        ceil_mode: false,
    };
    node(&mut g, "pool", pool, &[Some(sum)], pooled);
    let flat = activation(&mut g, "flat", vec![b, c(channels as u32)]);
    node(&mut g, "flatten", Op::Reshape, &[Some(pooled)], flat);
    let fc_w = int8_weight(&mut g, "fc.w", 4, channels, 40);
    let logits = activation(&mut g, "logits", vec![b, c(4)]);
    node(&mut g, "fc", Op::Linear { activation: None }, &[Some(flat), Some(fc_w), None], logits);
    let probs = activation(&mut g, "probs", vec![b, c(4)]);
    node(&mut g, "softmax", Op::Softmax { axis: 1 }, &[Some(logits)], probs);
    g.inputs = vec![x];
    g.outputs = vec![probs];
    g
}

#[test]
fn separable_network_states_its_arena() {
    let graph = separable_graph();
    let used = check("separable network", &graph);
    // Both pointwise convolutions, the second depthwise one, the ReLU and the residual addition.
    // The stem reads the graph input, and the first depthwise convolution reads the stem, which
    // the residual addition reads later, so neither can overwrite its input.
    assert_eq!(used.in_place_ops, 5, "ops planned in place");
}

/// Imports an ONNX file with fused patterns, optionally quantized.
fn load(path: &Path, options: &ImportOptions, mode: Option<Quantize>) -> Graph {
    let mut graph = import(path, options).expect("model imports");
    fuse(&mut graph);
    if let Some(mode) = mode {
        quantize(&mut graph, mode);
    }
    graph
}

#[test]
fn onnx_fixtures_state_their_arena() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let options = ImportOptions { max_batch: 2, max_seq: 8 };
    for name in [
        "windows/conv2d_chain.onnx",
        "windows/conv1d_chain.onnx",
        "windows/conv_shared_output.onnx",
        "onnx/patterns.onnx",
        "onnx/dynamic_shapes.onnx",
    ] {
        check(name, &load(&root.join(name), &options, None));
    }
}

#[test]
fn keyword_spotting_fits_in_one_activation() {
    let Some(path) = mlperf_tiny_file("kws_ref_model.onnx") else { return };
    let options = ImportOptions::default();
    for mode in [Quantize::Int8, Quantize::F32] {
        let used = check(&format!("kws {mode}"), &load(Path::new(&path), &options, Some(mode)));
        // Four depthwise and four pointwise convolutions run in place. The arena then holds one
        // 64 x 25 x 5 f32 activation (32,000 bytes), the scratch of a pointwise convolution
        // (16 pixels of 64 channels, 4,096 bytes), which the small tensors of the classifier
        // share, and the input (49 x 10 f32, 1,960 bytes) at the end.
        assert_eq!(used.in_place_ops, 8, "kws {mode}: ops in place");
        assert_eq!(used.stated, 32_000 + 4_096 + 1_960, "kws {mode}: arena bytes");
    }
}

#[test]
fn wake_word_states_its_arena() {
    let Some(path) = mlperf_tiny_file("str_ww_ref_model.onnx") else { return };
    let graph = load(Path::new(&path), &ImportOptions::default(), Some(Quantize::Int8));
    check("wake word int8", &graph);
}

#[test]
fn minilm_states_its_arena() {
    let Some(path) = minilm_l3_model() else { return };
    let options = ImportOptions { max_batch: 1, max_seq: 16 };
    let used = check("MiniLM-L3 int8", &load(&path, &options, Some(Quantize::Int8)));
    assert!(used.in_place_ops > 0, "no op of the encoder runs in place");
}

// ---------------------------------------------------------------------------------------------
// Files whose in-place claims are unsafe must not open
// ---------------------------------------------------------------------------------------------

/// A packed file with helpers to rewrite its op flags and tensor entries, then repair the
/// checksums so that only the rewritten fields are wrong.
struct Rewriter {
    bytes: Vec<u8>,
    sections: Vec<SectionEntry>,
    /// File offset of each op record, by op name.
    ops: Vec<(String, usize)>,
}

impl Rewriter {
    fn new(graph: &Graph) -> Rewriter {
        let file = pack_with(graph, true);
        let bytes = file.bytes().to_vec();
        let model = Model::open(file.bytes()).expect("the base file opens");
        let sections: Vec<SectionEntry> = (0..SectionKind::ALL.len())
            .map(|i| {
                let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
                SectionEntry::parse(&bytes[at..at + SECTION_ENTRY_LEN]).unwrap()
            })
            .collect();
        let mut at = Rewriter::section(&sections, SectionKind::Ops).offset as usize;
        let mut ops = Vec::new();
        for item in model.ops() {
            let (record, len) = item.unwrap();
            ops.push((model.op_name(&record).to_string(), at));
            at += len;
        }
        Rewriter { bytes, sections, ops }
    }

    fn section(sections: &[SectionEntry], kind: SectionKind) -> SectionEntry {
        *sections.iter().find(|s| s.kind == kind).expect("section present")
    }

    fn op(&self, name: &str) -> usize {
        self.ops.iter().find(|(n, _)| n == name).map(|&(_, at)| at).expect("op present")
    }

    fn set_flags(&mut self, op: &str, flags: u16) {
        let at = self.op(op) + 6;
        self.bytes[at..at + 2].copy_from_slice(&flags.to_le_bytes());
    }

    /// Tensor index of input `i` (or of the output for `None`) of op `op`.
    fn tensor_of(&self, op: &str, input: Option<usize>) -> u32 {
        let at = self.op(op);
        let n_in = self.bytes[at + 2] as usize;
        let slot = at + OP_HEADER_LEN + 4 * input.unwrap_or(n_in);
        u32::from_le_bytes(self.bytes[slot..slot + 4].try_into().unwrap())
    }

    fn entry_at(&self, tensor: u32) -> usize {
        let tensors = Rewriter::section(&self.sections, SectionKind::Tensors);
        tensors.offset as usize + tensor as usize * TENSOR_ENTRY_LEN
    }

    fn tensor(&self, tensor: u32) -> TensorEntry {
        let at = self.entry_at(tensor);
        TensorEntry::parse(&self.bytes[at..at + TENSOR_ENTRY_LEN], tensor).unwrap()
    }

    fn set_tensor(&mut self, tensor: u32, entry: &TensorEntry) {
        let at = self.entry_at(tensor);
        self.bytes[at..at + TENSOR_ENTRY_LEN].copy_from_slice(&entry.to_bytes());
    }

    /// The rewritten file with every section checksum recomputed.
    fn repaired(&self) -> Aligned {
        let mut bytes = self.bytes.clone();
        for (i, s) in self.sections.iter().enumerate() {
            let crc = crc32(&bytes[s.offset as usize..(s.offset + s.len) as usize]);
            let entry = SectionEntry { crc32: crc, ..*s };
            let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
            bytes[at..at + SECTION_ENTRY_LEN].copy_from_slice(&entry.to_bytes());
        }
        Aligned::new(&bytes)
    }

    /// The error that opening the repaired file gives.
    fn open_error(&self) -> Error {
        match Model::open(self.repaired().bytes()) {
            Ok(_) => panic!("the rewritten file opened"),
            Err(e) => e,
        }
    }
}

/// Asserts that `error` is an op error whose reason contains `expected`.
fn assert_rejected(error: Error, expected: &str, case: &str) {
    match error {
        Error::InvalidOp { reason, .. } if reason.contains(expected) => {}
        other => panic!("{case}: expected an op error about \"{expected}\", got {other:?}"),
    }
}

#[test]
fn unchanged_rewrite_opens() {
    let mut file = Rewriter::new(&separable_graph());
    let relu = file.tensor_of("relu", None);
    let entry = file.tensor(relu);
    file.set_tensor(relu, &entry);
    file.set_flags("relu", 1);
    let repaired = file.repaired();
    assert!(Model::open(repaired.bytes()).is_ok(), "rewriting fields with their values");
}

#[test]
fn unknown_op_flag_is_rejected() {
    let mut file = Rewriter::new(&separable_graph());
    file.set_flags("relu", 0b10);
    assert_rejected(file.open_error(), "unknown op flag", "flag bit 1");
}

#[test]
fn in_place_flag_on_other_ops_is_rejected() {
    let mut file = Rewriter::new(&separable_graph());
    file.set_flags("softmax", 1);
    // The softmax output lies apart from its input, so the overlap rules pass.
    assert_rejected(file.open_error(), "input 0 at the output's offset", "softmax, apart");

    let mut file = Rewriter::new(&separable_graph());
    let (x, out) = (file.tensor_of("softmax", Some(0)), file.tensor_of("softmax", None));
    let moved = TensorEntry { offset: file.tensor(x).offset, ..file.tensor(out) };
    file.set_tensor(out, &moved);
    file.set_flags("softmax", 1);
    assert_rejected(file.open_error(), "cannot run in place", "softmax, shared");
}

#[test]
fn in_place_flag_without_shared_region_is_rejected() {
    // The first depthwise convolution reads the stem, which the residual addition reads later,
    // so its output lies apart from its input.
    let mut file = Rewriter::new(&separable_graph());
    file.set_flags("dw0", 1);
    assert_rejected(file.open_error(), "input 0 at the output's offset", "dw0");
}

#[test]
fn cleared_in_place_flag_is_rejected() {
    let mut file = Rewriter::new(&separable_graph());
    file.set_flags("relu", 0);
    assert_rejected(file.open_error(), "overlaps an input", "relu without the flag");
    let mut file = Rewriter::new(&separable_graph());
    file.set_flags("pw0", 0);
    assert_rejected(file.open_error(), "overlaps an input", "pw0 without the flag");
}

#[test]
fn second_operand_in_output_region_is_rejected() {
    let mut file = Rewriter::new(&separable_graph());
    let (b, out) = (file.tensor_of("residual", Some(1)), file.tensor_of("residual", None));
    let moved = TensorEntry { offset: file.tensor(out).offset, ..file.tensor(b) };
    file.set_tensor(b, &moved);
    assert_rejected(file.open_error(), "overlaps an input", "residual operand b");
}

#[test]
fn bad_scratch_is_rejected() {
    let graph = separable_graph();
    for conv in ["pw0", "dw1"] {
        let base = Rewriter::new(&graph);
        let scratch = base.tensor_of(conv, Some(3));
        let entry = base.tensor(scratch);
        let elements = entry.dims[0].factor;
        assert!(entry.byte_len > 0, "{conv}: scratch present");

        let mut file = Rewriter::new(&graph);
        let short = TensorEntry {
            byte_len: 4 * (elements as u64 - 1),
            dims: {
                let mut dims = entry.dims;
                dims[0] = Dim::constant(elements - 1);
                dims
            },
            ..entry
        };
        file.set_tensor(scratch, &short);
        // A pointwise scratch smaller than its planned block still holds one pixel, so only the
        // depthwise one, planned at the minimum, becomes too small.
        if conv == "dw1" {
            assert_rejected(file.open_error(), "large enough", "dw1 scratch one element short");
        }

        let mut file = Rewriter::new(&graph);
        let out = file.tensor(file.tensor_of(conv, None));
        file.set_tensor(scratch, &TensorEntry { offset: out.offset, ..entry });
        assert_rejected(
            file.open_error(),
            "overlaps an input",
            &format!("{conv} scratch on output"),
        );

        let mut file = Rewriter::new(&graph);
        let as_i32 = TensorEntry { dtype: DType::I32, ..entry };
        file.set_tensor(scratch, &as_i32);
        assert_rejected(file.open_error(), "f32 activation", &format!("{conv} i32 scratch"));

        let mut file = Rewriter::new(&graph);
        file.set_flags(conv, 0);
        let error = file.open_error();
        assert!(
            matches!(error, Error::InvalidOp { .. }),
            "{conv}: scratch without the flag gave {error:?}"
        );
    }
}
