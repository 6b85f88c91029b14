//! Convolution and pooling import on small generated ONNX graphs (see fixtures/windows/make.py):
//! 1-D and 2-D windows, groups, dilations, asymmetric and automatic padding, ceil mode, fused
//! activations and global pooling, checked against tract running the same files.

mod common;

use std::path::PathBuf;

use common::{max_abs_diff, pack_graph, random_f32, run};
use edgefold_compressor::ir::Graph;
use edgefold_compressor::onnx::{import, ImportOptions};
use edgefold_compressor::passes::fuse;
use edgefold_compressor::reference::ReferenceModel;
use edgefold_compressor::tensor::HostTensor;
use edgefold_runtime::ops::{Op, PoolKind, ReduceKind};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/windows").join(name)
}

fn load(name: &str) -> Graph {
    let options = ImportOptions { max_batch: 3, max_seq: 1 };
    let mut graph = import(&fixture(name), &options).expect("fixture imports");
    fuse(&mut graph);
    graph
}

/// Runs the packed graph and tract on the same random input and returns the max abs difference.
fn difference_from_tract(name: &str, graph: &Graph, shape: &[usize], seed: u64) -> f32 {
    let x = HostTensor::f32(shape.to_vec(), random_f32(shape.iter().product(), seed));
    let ours = run(&pack_graph(graph), std::slice::from_ref(&x));
    let reference = ReferenceModel::load(&fixture(name)).expect("tract loads the fixture");
    let theirs = reference.run(&[x]).expect("tract runs");
    max_abs_diff(&ours[0], &theirs[0])
}

fn activation_bounds(graph: &Graph) -> Vec<(f32, f32)> {
    let bounds = graph.nodes.iter().filter_map(|n| match n.op {
        Op::Conv2d { activation_min, activation_max, .. } => Some((activation_min, activation_max)),
        _ => None,
    });
    bounds.collect()
}

#[test]
fn conv2d_chain_matches_tract() {
    let graph = load("conv2d_chain.onnx");
    assert_eq!(activation_bounds(&graph), [(0.0, f32::INFINITY), (0.0, 6.0)]);
    let kinds: Vec<Op> = graph.nodes.iter().map(|n| n.op).collect();
    assert!(matches!(kinds[2], Op::Pool { kind: PoolKind::Max, ceil_mode: true, .. }));
    assert!(matches!(kinds[3], Op::Pool { kind: PoolKind::Average, count_include_pad: false, .. }));
    assert!(matches!(kinds[4], Op::Reduce { kind: ReduceKind::Mean, axes: 0b1100, .. }));
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    for batch in [1, 3] {
        let diff = difference_from_tract("conv2d_chain.onnx", &graph, &[batch, 4, 13, 11], 11);
        assert!(diff < 1e-5, "batch {batch}: max abs difference {diff}");
    }
}

#[test]
fn conv1d_chain_matches_tract() {
    let graph = load("conv1d_chain.onnx");
    let convs = graph.nodes.iter().filter(|n| matches!(n.op, Op::Conv2d { .. })).count();
    assert_eq!(convs, 1);
    let diff = difference_from_tract("conv1d_chain.onnx", &graph, &[1, 3, 17], 12);
    assert!(diff < 1e-5, "max abs difference {diff}");
}

#[test]
fn shared_conv_output_keeps_unfused_copy() {
    let graph = load("conv_shared_output.onnx");
    assert_eq!(
        activation_bounds(&graph),
        [(f32::NEG_INFINITY, f32::INFINITY), (0.0, f32::INFINITY)]
    );
    let diff = difference_from_tract("conv_shared_output.onnx", &graph, &[1, 2, 5, 6], 13);
    assert!(diff < 1e-5, "max abs difference {diff}");
}

/// Builds a graph of one window op on an input `[2, channels, 6, 5]` with a `[n, row]` f32 weight for
/// convolutions.
fn window_graph(op: Op, channels: u32, weight: Option<[usize; 2]>, out: [u32; 4]) -> Graph {
    use edgefold_compressor::ir::{Node, Storage, Value};
    use edgefold_runtime::format::{DType, Dim};

    let mut graph = Graph::default();
    let dims = |d: [u32; 4]| d.iter().map(|&e| Dim::constant(e)).collect();
    let x = graph.add_value(Value {
        name: "x".into(),
        dtype: DType::F32,
        shape: dims([2, channels, 6, 5]),
        data: None,
    });
    let mut inputs = vec![Some(x)];
    if let Some([n, k]) = weight {
        let w = graph.add_const("w".into(), vec![n, k], Storage::F32(random_f32(n * k, 5)));
        inputs.push(Some(w));
    }
    let y = graph.add_value(Value {
        name: "y".into(),
        dtype: DType::F32,
        shape: dims(out),
        data: None,
    });
    graph.nodes.push(Node { name: "window".into(), op, inputs, outputs: vec![y] });
    graph.inputs.push(x);
    graph.outputs.push(y);
    graph
}

#[test]
fn window_ops_with_invalid_parameters_are_rejected() {
    use edgefold_runtime::ops::Window2d;
    use edgefold_runtime::{Error, Model};

    let window = Window2d { kernel: [3, 3], strides: [1, 1], pads: [1; 4], dilations: [1, 1] };
    let conv = |window, groups| Op::Conv2d {
        window,
        groups,
        activation_min: f32::NEG_INFINITY,
        activation_max: f32::INFINITY,
    };
    let zero_stride = Window2d { strides: [0, 1], ..window };
    let too_long = Window2d { kernel: [9, 3], pads: [0; 4], ..window };
    let cases = [
        ("valid", conv(window, 2), Some([6, 18]), [2, 6, 6, 5], true),
        ("groups 0", conv(window, 0), Some([6, 18]), [2, 6, 6, 5], false),
        ("groups do not divide", conv(window, 4), Some([6, 9]), [2, 6, 6, 5], false),
        ("row length", conv(window, 2), Some([6, 17]), [2, 6, 6, 5], false),
        ("weight rows", conv(window, 2), Some([4, 18]), [2, 6, 6, 5], false),
        ("output height", conv(window, 2), Some([6, 18]), [2, 6, 5, 5], false),
        ("batch", conv(window, 2), Some([6, 18]), [1, 6, 6, 5], false),
        ("stride 0", conv(zero_stride, 2), Some([6, 18]), [2, 6, 6, 5], false),
        ("kernel over input", conv(too_long, 1), Some([6, 108]), [2, 6, 1, 3], false),
        (
            "pool channels",
            Op::Pool { kind: PoolKind::Max, window, count_include_pad: false, ceil_mode: false },
            None,
            [2, 3, 6, 5],
            false,
        ),
    ];
    for (name, op, weight, out, valid) in cases {
        let file = pack_graph(&window_graph(op, 4, weight, out));
        match Model::open(file.bytes()) {
            Ok(_) => assert!(valid, "{name}: an invalid file opened"),
            Err(Error::InvalidOp { reason, .. }) => assert!(!valid, "{name}: rejected: {reason}"),
            Err(other) => panic!("{name}: unexpected error {other}"),
        }
    }
}

struct Xorshift(u64);

impl Xorshift {
    /// Returns a value in `0..limit`.
    fn below(&mut self, limit: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % limit as u64) as u32
    }

    /// Returns mostly a value in `1..=limit`, and 0 (invalid) one time in 16.
    fn positive(&mut self, limit: u32) -> u32 {
        if self.below(16) == 0 {
            0
        } else {
            1 + self.below(limit)
        }
    }
}

/// Random window parameters, with output shapes mostly right and sometimes off by one: every file
/// either fails to open or runs without a panic.
#[test]
fn random_window_parameters_open_or_fail_cleanly() {
    use edgefold_runtime::ops::Window2d;
    use edgefold_runtime::Model;

    let mut rng = Xorshift(0x2545_F491_4F6C_DD1D);
    let mut opened = 0;
    for round in 0..400 {
        let window = Window2d {
            kernel: [rng.positive(4), rng.positive(4)],
            strides: [rng.positive(3), rng.positive(3)],
            pads: [rng.below(5), rng.below(5), rng.below(5), rng.below(5)],
            dilations: [rng.positive(3), rng.positive(3)],
        };
        let ceil_mode = rng.below(2) == 1;
        let extent = |axis, input| window.output_extent(axis, input, ceil_mode).unwrap_or(1) as u32;
        let mut spatial = [extent(0, 6), extent(1, 5)];
        if rng.below(8) == 0 {
            spatial[rng.below(2) as usize] += 1;
        }
        let channels = [1, 2, 3, 4, 6][rng.below(5) as usize];
        // Mostly a standard or depthwise convolution, sometimes any count from 0 to 4.
        let groups = match rng.below(4) {
            0 => rng.below(5),
            1 => channels,
            _ => 1,
        };
        let (op, weight, out_channels) = if round % 2 == 0 {
            let op = Op::Conv2d { window, groups, activation_min: 0.0, activation_max: 6.0 };
            let row = (channels / groups.max(1)) * window.kernel[0] * window.kernel[1];
            (op, Some([channels as usize, row.max(1) as usize]), channels)
        } else {
            let kind = if rng.below(2) == 0 { PoolKind::Average } else { PoolKind::Max };
            let op = Op::Pool { kind, window, count_include_pad: rng.below(2) == 1, ceil_mode };
            (op, None, channels)
        };
        let graph = window_graph(op, channels, weight, [2, out_channels, spatial[0], spatial[1]]);
        let file = pack_graph(&graph);
        if Model::open(file.bytes()).is_err() {
            continue;
        }
        opened += 1;
        let x = HostTensor::f32(
            vec![2, channels as usize, 6, 5],
            random_f32(60 * channels as usize, 3),
        );
        let y = run(&file, std::slice::from_ref(&x));
        assert!(y[0].as_f32().unwrap().iter().all(|v| !v.is_nan()), "round {round}: NaN output");
    }
    assert!(opened > 100, "only {opened} of 400 random files opened");
}
