//! Compression transforms on small generated graphs whose right answers are known.

mod common;

use common::random_f32;
use edgefold_compressor::blocks::find_blocks;
use edgefold_compressor::calibrate::calibrate;
use edgefold_compressor::exec::PackedGraph;
use edgefold_compressor::ir::{Graph, Node, Storage, Symbol, Value};
use edgefold_compressor::planner::{factorize_whitened, verified_drop_order, Evaluator, Task};
use edgefold_compressor::quantize::{factorize, LowRank};
use edgefold_compressor::tensor::HostTensor;
use edgefold_runtime::format::Dim;
use edgefold_runtime::ops::{BinaryKind, Op, UnaryKind};
use edgefold_runtime::DType;

const WIDTH: usize = 8;

/// Residual blocks h + tanh(W h + b); block `identity` has zero weights, so it is an exact identity.
fn residual_chain(blocks: usize, identity: usize) -> Graph {
    let mut g = Graph::default();
    g.symbols.push(Symbol { name: "batch".into(), max: 8 });
    let act = |g: &mut Graph, name: String| {
        g.add_value(Value {
            name,
            dtype: DType::F32,
            shape: vec![Dim::symbol(0), Dim::constant(WIDTH as u32)],
            data: None,
        })
    };
    let mut h = act(&mut g, "x".into());
    g.inputs.push(h);
    for i in 0..blocks {
        let (w, b) = if i == identity {
            (vec![0.0; WIDTH * WIDTH], vec![0.0; WIDTH])
        } else {
            (random_f32(WIDTH * WIDTH, 10 + i as u64), random_f32(WIDTH, 20 + i as u64))
        };
        let w = g.add_const(format!("layer.{i}.fc.weight"), vec![WIDTH, WIDTH], Storage::F32(w));
        let b = g.add_const(format!("layer.{i}.fc.bias"), vec![WIDTH], Storage::F32(b));
        let t = act(&mut g, format!("layer.{i}.t"));
        let a = act(&mut g, format!("layer.{i}.a"));
        let out = act(&mut g, format!("layer.{i}.out"));
        g.nodes.push(Node {
            name: format!("layer.{i}.fc"),
            op: Op::Linear { activation: None },
            inputs: vec![Some(h), Some(w), Some(b)],
            outputs: vec![t],
        });
        let tanh = Op::Unary { kind: UnaryKind::Tanh, alpha: 0.0, beta: 0.0 };
        g.nodes.push(Node {
            name: format!("layer.{i}.act"),
            op: tanh,
            inputs: vec![Some(t)],
            outputs: vec![a],
        });
        g.nodes.push(Node {
            name: format!("layer.{i}.add"),
            op: Op::Binary(BinaryKind::Add),
            inputs: vec![Some(h), Some(a)],
            outputs: vec![out],
        });
        h = out;
    }
    g.outputs.push(h);
    g
}

fn samples(n: usize) -> Vec<Vec<HostTensor>> {
    (0..n)
        .map(|i| vec![HostTensor::f32(vec![2, WIDTH], random_f32(2 * WIDTH, 100 + i as u64))])
        .collect()
}

#[test]
fn identity_block_is_found_and_dropped() {
    let graph = residual_chain(4, 2);
    let blocks = find_blocks(&graph);
    assert_eq!(blocks.iter().map(|b| b.index).collect::<Vec<_>>(), [0, 1, 2, 3]);

    let calibration = calibrate(&graph, &samples(16), |_| {}).unwrap();
    let stats = calibration.blocks.expect("blocks measured");
    assert!(stats.influence[2] < 1e-9, "identity block influence {}", stats.influence[2]);
    for (i, &bi) in stats.influence.iter().enumerate() {
        if i != 2 {
            assert!(bi > 1e-4, "block {i} influence {bi} should be clearly non-zero");
        }
    }
    assert!((stats.cosine[1][2] - 1.0).abs() < 1e-9, "outputs of blocks 1 and 2 are equal");
    assert!(
        (stats.cka[1][2] - 1.0).abs() < 1e-6,
        "CKA of equal outputs is 1, got {}",
        stats.cka[1][2]
    );

    let evaluator = Evaluator::new(&graph, Task::Raw { samples: samples(6) }).unwrap();
    let order = verified_drop_order(&graph, &evaluator, 2, 0.0, |_| {}).unwrap();
    assert_eq!(order[0].0, 2, "the identity block goes first: {order:?}");
    assert!((order[0].1 - 1.0).abs() < 1e-6, "dropping it keeps quality 1, got {}", order[0].1);
    assert!(order[1].1 < 1.0 - 1e-4, "a second drop must cost quality: {order:?}");
}

/// A linear layer whose weight has exact rank 3.
fn low_rank_layer(n: usize, k: usize, rank: usize) -> (Graph, Vec<f32>) {
    let a = random_f32(n * rank, 1);
    let b = random_f32(rank * k, 2);
    let w: Vec<f32> = (0..n * k)
        .map(|i| (0..rank).map(|r| a[(i / k) * rank + r] * b[r * k + i % k]).sum())
        .collect();
    let mut g = Graph::default();
    g.symbols.push(Symbol { name: "batch".into(), max: 8 });
    let x = g.add_value(Value {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![Dim::symbol(0), Dim::constant(k as u32)],
        data: None,
    });
    let y = g.add_value(Value {
        name: "y".into(),
        dtype: DType::F32,
        shape: vec![Dim::symbol(0), Dim::constant(n as u32)],
        data: None,
    });
    let wid = g.add_const("fc.weight".into(), vec![n, k], Storage::F32(w.clone()));
    g.nodes.push(Node {
        name: "fc".into(),
        op: Op::Linear { activation: None },
        inputs: vec![Some(x), Some(wid)],
        outputs: vec![y],
    });
    g.inputs.push(x);
    g.outputs.push(y);
    (g, w)
}

fn outputs(g: &Graph, k: usize) -> Vec<f32> {
    let mut packed = PackedGraph::new(g).unwrap();
    let x = HostTensor::f32(vec![4, k], random_f32(4 * k, 77));
    packed.run(&[x]).unwrap()[0].as_f32().unwrap().to_vec()
}

#[test]
fn known_rank_is_recovered_exactly() {
    let (n, k) = (40, 48);
    let (graph, _) = low_rank_layer(n, k, 3);
    let expected = outputs(&graph, k);

    let mut plain = graph.clone();
    let done = factorize(&mut plain, LowRank::Energy(0.999_999)).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].rank, 3, "plain SVD finds rank 3");
    let got = outputs(&plain, k);
    let err = expected.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-4, "plain factors differ by {err}");

    let mut whitened = graph.clone();
    let inputs: Vec<Vec<HostTensor>> =
        (0..8).map(|i| vec![HostTensor::f32(vec![8, k], random_f32(8 * k, 5 + i))]).collect();
    let mut calibration = calibrate(&graph, &inputs, |_| {}).unwrap();
    let count = factorize_whitened(&mut whitened, &mut calibration, 0.999_999).unwrap();
    assert_eq!(count, 1);
    let right = whitened.values.iter().find(|v| v.name == "fc.weight.right").expect("right factor");
    assert!(right.shape[0].factor <= 3, "whitened rank {} exceeds 3", right.shape[0].factor);
    let got = outputs(&whitened, k);
    let err = expected.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-3, "whitened factors differ by {err}");
}

#[test]
fn full_rank_weight_stays_dense() {
    let (n, k) = (16, 16);
    let (mut graph, _) = low_rank_layer(n, k, 16);
    let done = factorize(&mut graph, LowRank::Energy(0.999_999)).unwrap();
    assert!(done.is_empty(), "a full-rank 16x16 weight is above the break-even rank: {done:?}");
    assert_eq!(graph.nodes.len(), 1);
}
