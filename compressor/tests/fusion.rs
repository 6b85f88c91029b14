//! Layer fusion on small generated residual chains whose fused results are known exactly, its
//! typed rejections, the verified choice against dropping, and all-MiniLM-L6-v2's real blocks.

mod common;

use std::path::Path;

use common::random_f32;
use edgefold_compressor::blocks::find_blocks;
use edgefold_compressor::calibrate::BlockStats;
use edgefold_compressor::exec::PackedGraph;
use edgefold_compressor::fusion::{
    choose_fusion, fuse_blocks, fuse_run, fuse_runs, similar_runs, verify_run, Difference,
    FuseOptions, FusionError, Run,
};
use edgefold_compressor::ir::{Graph, Node, Storage, Symbol, Value, ValueId};
use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::load_graph;
use edgefold_compressor::planner::{drop_blocks, Evaluator, Task};
use edgefold_compressor::quantize::{quantize, Quantize};
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::testdata::skip;
use edgefold_runtime::format::Dim;
use edgefold_runtime::ops::{BinaryKind, Op, UnaryKind};
use edgefold_runtime::DType;

const WIDTH: usize = 8;

/// One residual block: h + W2 · act(W1 · LN(h) + b1) + b2, with LN and act optional.
#[derive(Clone)]
struct Spec {
    hidden: usize,
    norm: Option<(Vec<f32>, Vec<f32>)>,
    w1: Vec<f32>,
    b1: Vec<f32>,
    act: Option<UnaryKind>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    /// The residual addition reads the normalized input instead of the block input.
    add_normalized: bool,
}

impl Spec {
    fn random(seed: u64, norm: bool, act: Option<UnaryKind>) -> Spec {
        let hidden = 12;
        let norm = norm.then(|| {
            let gamma = random_f32(WIDTH, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
            (gamma, random_f32(WIDTH, seed + 2))
        });
        Spec {
            hidden,
            norm,
            w1: random_f32(hidden * WIDTH, seed + 3),
            b1: random_f32(hidden, seed + 4),
            act,
            w2: random_f32(WIDTH * hidden, seed + 5).iter().map(|v| 0.5 * v).collect(),
            b2: random_f32(WIDTH, seed + 6),
            add_normalized: false,
        }
    }

    /// h + bias: both weights and the inner bias are zero.
    fn bias_only(bias: Vec<f32>) -> Spec {
        let hidden = 4;
        Spec {
            hidden,
            norm: None,
            w1: vec![0.0; hidden * WIDTH],
            b1: vec![0.0; hidden],
            act: None,
            w2: vec![0.0; WIDTH * hidden],
            b2: bias,
            add_normalized: false,
        }
    }
}

fn activation(g: &mut Graph, name: String, width: usize) -> ValueId {
    g.add_value(Value {
        name,
        dtype: DType::F32,
        shape: vec![Dim::symbol(0), Dim::constant(width as u32)],
        data: None,
    })
}

fn push(g: &mut Graph, name: String, op: Op, inputs: Vec<ValueId>, output: ValueId) {
    let inputs = inputs.into_iter().map(Some).collect();
    g.nodes.push(Node { name, op, inputs, outputs: vec![output] });
}

/// Builds a chain of residual blocks named `layer.{i}.*`, input `x` of shape [batch, WIDTH].
fn chain(specs: &[Spec]) -> Graph {
    let mut g = Graph::default();
    g.symbols.push(Symbol { name: "batch".into(), max: 8 });
    let mut h = activation(&mut g, "x".into(), WIDTH);
    g.inputs.push(h);
    for (i, s) in specs.iter().enumerate() {
        let p = format!("layer.{i}");
        let mut x = h;
        if let Some((gamma, beta)) = &s.norm {
            let gamma =
                g.add_const(format!("{p}.ln.gamma"), vec![WIDTH], Storage::F32(gamma.clone()));
            let beta = g.add_const(format!("{p}.ln.beta"), vec![WIDTH], Storage::F32(beta.clone()));
            let out = activation(&mut g, format!("{p}.ln"), WIDTH);
            push(
                &mut g,
                format!("{p}.ln"),
                Op::LayerNorm { epsilon: 1e-5 },
                vec![x, gamma, beta],
                out,
            );
            x = out;
        }
        let normalized = x;
        let w1 = g.add_const(
            format!("{p}.fc1.weight"),
            vec![s.hidden, WIDTH],
            Storage::F32(s.w1.clone()),
        );
        let b1 = g.add_const(format!("{p}.fc1.bias"), vec![s.hidden], Storage::F32(s.b1.clone()));
        let t = activation(&mut g, format!("{p}.fc1"), s.hidden);
        push(&mut g, format!("{p}.fc1"), Op::Linear { activation: None }, vec![x, w1, b1], t);
        x = t;
        if let Some(kind) = s.act {
            let a = activation(&mut g, format!("{p}.act"), s.hidden);
            push(&mut g, format!("{p}.act"), Op::Unary { kind, alpha: 0.0, beta: 0.0 }, vec![x], a);
            x = a;
        }
        let w2 = g.add_const(
            format!("{p}.fc2.weight"),
            vec![WIDTH, s.hidden],
            Storage::F32(s.w2.clone()),
        );
        let b2 = g.add_const(format!("{p}.fc2.bias"), vec![WIDTH], Storage::F32(s.b2.clone()));
        let y = activation(&mut g, format!("{p}.fc2"), WIDTH);
        push(&mut g, format!("{p}.fc2"), Op::Linear { activation: None }, vec![x, w2, b2], y);
        let out = activation(&mut g, format!("{p}.out"), WIDTH);
        let residual = if s.add_normalized { normalized } else { h };
        push(&mut g, format!("{p}.add"), Op::Binary(BinaryKind::Add), vec![residual, y], out);
        h = out;
    }
    g.outputs.push(h);
    g
}

fn input(seed: u64) -> HostTensor {
    HostTensor::f32(vec![3, WIDTH], random_f32(3 * WIDTH, seed))
}

fn run(g: &Graph, x: &HostTensor) -> Vec<f32> {
    let mut packed = PackedGraph::new(g).expect("graph packs");
    let out = packed.run(std::slice::from_ref(x)).expect("graph runs");
    out[0].as_f32().expect("f32 output").to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
}

fn layers(g: &Graph) -> Vec<usize> {
    find_blocks(g).iter().map(|b| b.index).collect()
}

fn tanh_chain(blocks: usize, norm: bool) -> Vec<Spec> {
    (0..blocks).map(|i| Spec::random(10 * i as u64 + 1, norm, Some(UnaryKind::Tanh))).collect()
}

const WITH_NORM: FuseOptions = FuseOptions { layer_norm: true };
const WITHOUT_NORM: FuseOptions = FuseOptions { layer_norm: false };

#[test]
fn pair_fusion_equals_dropping_first() {
    let graph = chain(&tanh_chain(4, true));
    let mut fused = graph.clone();
    let report = fuse_blocks(&mut fused, &find_blocks(&graph), 1, 1, WITH_NORM).unwrap();
    assert_eq!(report.kept, 1);
    assert_eq!(report.removed, [2]);
    assert_eq!(report.changed, 6, "ln gamma and beta, two weights, two biases");
    assert_eq!(report.kept_layer_norm, 0);
    assert_eq!(layers(&fused), [0, 1, 3]);

    let mut dropped = graph.clone();
    drop_blocks(&mut dropped, &[1]);
    for seed in [5, 6] {
        let x = input(seed);
        assert_eq!(run(&fused, &x), run(&dropped, &x), "θ1 + (θ2 − θ1) is θ2 exactly");
    }
}

#[test]
fn bias_only_run_matches_formula() {
    let bias: Vec<Vec<f32>> = (0..4).map(|i| random_f32(WIDTH, 40 + i)).collect();
    let graph = chain(&bias.iter().cloned().map(Spec::bias_only).collect::<Vec<_>>());
    let mut fused = graph.clone();
    fuse_run(&mut fused, Run { first: 1, merged: 2 }, WITH_NORM).unwrap();
    assert_eq!(layers(&fused), [0, 1]);

    // The fused block adds b1 + (b2 − b1) + (b3 − b1) = b2 + b3 − b1.
    let x = input(7);
    let got = run(&fused, &x);
    let values = x.as_f32().unwrap();
    for (i, &g) in got.iter().enumerate() {
        let c = i % WIDTH;
        let want = values[i] as f64 + bias[0][c] as f64 + bias[2][c] as f64 + bias[3][c] as f64
            - bias[1][c] as f64;
        assert!((g as f64 - want).abs() < 1e-5, "element {i}: {g} against {want}");
    }
}

#[test]
fn fusion_into_zero_block_equals_chain() {
    let mut specs: Vec<Spec> = (0..4).map(|i| Spec::bias_only(random_f32(WIDTH, 50 + i))).collect();
    specs[1] = Spec::bias_only(vec![0.0; WIDTH]);
    let graph = chain(&specs);
    let mut fused = graph.clone();
    fuse_run(&mut fused, Run { first: 1, merged: 2 }, WITH_NORM).unwrap();
    let x = input(8);
    let err = max_diff(&run(&fused, &x), &run(&graph, &x));
    assert!(err < 1e-6, "fused output differs from the four-block chain by {err}");
}

#[test]
fn identical_blocks_fuse_to_one() {
    let mut specs = tanh_chain(5, true);
    specs[2] = specs[1].clone();
    specs[3] = specs[1].clone();
    let graph = chain(&specs);
    let mut fused = graph.clone();
    let report = fuse_run(&mut fused, Run { first: 1, merged: 2 }, WITH_NORM).unwrap();
    assert_eq!(report.changed, 0, "θ + (θ − θ) + (θ − θ) is θ");
    assert_eq!(report.removed, [2, 3]);
    let mut dropped = graph.clone();
    drop_blocks(&mut dropped, &[2, 3]);
    let x = input(9);
    assert_eq!(run(&fused, &x), run(&dropped, &x));
}

#[test]
fn layer_norm_kept_when_excluded() {
    let specs = tanh_chain(3, true);
    let graph = chain(&specs);
    let mut fused = graph.clone();
    let report = fuse_run(&mut fused, Run { first: 0, merged: 1 }, WITHOUT_NORM).unwrap();
    assert_eq!(report.kept_layer_norm, 2);
    assert_eq!(report.changed, 4);

    // Block 0 with its own layer norm and block 1's other parameters, then block 2.
    let mut expected = specs[1].clone();
    expected.norm = specs[0].norm.clone();
    let reference = chain(&[expected, specs[2].clone()]);
    let x = input(10);
    assert_eq!(run(&fused, &x), run(&reference, &x));
}

#[test]
fn shared_constant_is_copied() {
    let specs = tanh_chain(3, false);
    let mut graph = chain(&specs);
    // Block 2 reads block 0's second bias, so block 0's cannot change in place.
    let b0 = graph.values.iter().position(|v| v.name == "layer.0.fc2.bias").unwrap();
    let b2 = graph.values.iter().position(|v| v.name == "layer.2.fc2.bias").unwrap();
    graph.values[b2].data = graph.values[b0].data.clone();
    for node in &mut graph.nodes {
        for i in node.inputs.iter_mut().flatten() {
            if *i == b2 {
                *i = b0;
            }
        }
    }
    graph.prune();
    let x = input(11);
    let before_block2 = specs[2].clone();
    let mut fused = graph.clone();
    fuse_run(&mut fused, Run { first: 0, merged: 1 }, WITH_NORM).unwrap();
    let mut block2 = before_block2;
    block2.b2 = specs[0].b2.clone();
    let reference = chain(&[specs[1].clone(), block2]);
    assert_eq!(run(&fused, &x), run(&reference, &x));
    assert!(fused.values.iter().any(|v| v.name == "layer.0.fc2.bias.fused"));
}

fn mismatch(result: Result<impl std::fmt::Debug, FusionError>) -> (usize, usize, Difference) {
    match result {
        Err(FusionError::Mismatch { first, other, difference }) => (first, other, difference),
        other => panic!("expected a structural mismatch, got {other:?}"),
    }
}

#[test]
fn different_activation_is_rejected() {
    let mut specs = tanh_chain(3, true);
    specs[2].act = Some(UnaryKind::Relu);
    let mut graph = chain(&specs);
    let before = graph.clone();
    let (first, other, difference) =
        mismatch(fuse_run(&mut graph, Run { first: 1, merged: 1 }, WITH_NORM));
    assert_eq!((first, other), (1, 2));
    assert!(
        matches!(&difference, Difference::Op { position: 2, .. }),
        "LN, fc1, then the activation: {difference:?}"
    );
    assert_eq!(graph, before, "a rejected fusion leaves the graph unchanged");
}

#[test]
fn different_hidden_width_is_rejected() {
    let mut specs = tanh_chain(3, false);
    specs[1] = Spec { hidden: 6, ..specs[1].clone() };
    specs[1].w1 = random_f32(6 * WIDTH, 3);
    specs[1].b1 = random_f32(6, 4);
    specs[1].w2 = random_f32(WIDTH * 6, 5);
    let mut graph = chain(&specs);
    let (_, other, difference) =
        mismatch(fuse_run(&mut graph, Run { first: 0, merged: 2 }, WITH_NORM));
    assert_eq!(other, 1);
    // fc1's output is [batch, 6] against [batch, 12]; its weight shape differs too.
    assert!(
        matches!(difference, Difference::Outputs { position: 0 }),
        "expected the fc1 output to differ first: {difference:?}"
    );
}

#[test]
fn missing_layer_norm_is_rejected() {
    let mut specs = tanh_chain(3, true);
    specs[2].norm = None;
    let mut graph = chain(&specs);
    let (_, _, difference) = mismatch(fuse_run(&mut graph, Run { first: 0, merged: 2 }, WITH_NORM));
    assert_eq!(difference, Difference::NodeCount { first: 5, other: 4 });
}

#[test]
fn different_wiring_is_rejected() {
    let mut specs = tanh_chain(3, true);
    specs[1].add_normalized = true;
    let mut graph = chain(&specs);
    let (_, _, difference) = mismatch(fuse_run(&mut graph, Run { first: 0, merged: 1 }, WITH_NORM));
    assert_eq!(difference, Difference::Wiring { position: 4, slot: 0 });
}

#[test]
fn quantized_weights_are_rejected() {
    let mut graph = chain(&tanh_chain(3, false));
    quantize(&mut graph, Quantize::Int8);
    match fuse_run(&mut graph, Run { first: 0, merged: 1 }, WITH_NORM) {
        Err(FusionError::NotF32 { block, name }) => {
            assert_eq!(block, 0);
            assert_eq!(name, "layer.0.fc1.weight");
        }
        other => panic!("expected NotF32, got {other:?}"),
    }
}

#[test]
fn invalid_runs_are_rejected() {
    let graph = chain(&tanh_chain(3, false));
    let blocks = find_blocks(&graph);
    for (first, merged) in [(0, 0), (2, 1), (1, 2), (5, 1)] {
        let mut g = graph.clone();
        let result = fuse_blocks(&mut g, &blocks, first, merged, WITH_NORM);
        assert!(
            matches!(result, Err(FusionError::InvalidRun { blocks: 3, .. })),
            "run at {first} merging {merged}: {result:?}"
        );
    }
    let mut g = graph.clone();
    let result = fuse_run(&mut g, Run { first: 7, merged: 1 }, WITH_NORM);
    match &result {
        Err(FusionError::UnknownBlock { index, available }) => {
            assert_eq!(*index, 7);
            assert_eq!(available, &[0, 1, 2]);
        }
        other => panic!("expected UnknownBlock, got {other:?}"),
    }
    let overlapping = [Run { first: 0, merged: 1 }, Run { first: 1, merged: 1 }];
    let result = fuse_runs(&mut g, &overlapping, WITH_NORM);
    assert!(matches!(result, Err(FusionError::OverlappingRuns(..))), "{result:?}");
}

#[test]
fn separate_runs_fuse_together() {
    let graph = chain(&tanh_chain(5, true));
    let mut fused = graph.clone();
    let runs = [Run { first: 0, merged: 1 }, Run { first: 2, merged: 1 }];
    let reports = fuse_runs(&mut fused, &runs, WITH_NORM).unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(layers(&fused), [0, 2, 4]);
    // Pair fusion with layer norms merged equals dropping each pair's first block.
    let mut dropped = graph.clone();
    drop_blocks(&mut dropped, &[0, 2]);
    let x = input(12);
    assert_eq!(run(&fused, &x), run(&dropped, &x));
}

fn stats(cosines: &[f64]) -> BlockStats {
    let n = cosines.len() + 1;
    let graph = chain(&tanh_chain(n, false));
    let mut cosine = vec![vec![1.0; n]; n];
    for (i, &c) in cosines.iter().enumerate() {
        cosine[i][i + 1] = c;
        cosine[i + 1][i] = c;
    }
    BlockStats { blocks: find_blocks(&graph), cosine, ..Default::default() }
}

#[test]
fn similar_runs_pick_highest_cosines() {
    let s = stats(&[0.5, 0.9, 0.8, 0.3, 0.95]);
    assert_eq!(similar_runs(&s, 1), [Run { first: 4, merged: 1 }]);
    assert_eq!(similar_runs(&s, 2), [Run { first: 1, merged: 1 }, Run { first: 4, merged: 1 }]);
    assert_eq!(similar_runs(&s, 3), [Run { first: 1, merged: 2 }, Run { first: 4, merged: 1 }]);
    assert_eq!(similar_runs(&s, 9), [Run { first: 0, merged: 5 }], "at most every pair");
    assert_eq!(similar_runs(&s, 0), []);
    let tied = stats(&[0.7, 0.7, 0.7]);
    assert_eq!(
        similar_runs(&tied, 1),
        [Run { first: 0, merged: 1 }],
        "ties go to the earlier pair"
    );
}

fn raw_evaluator(graph: &Graph) -> Evaluator {
    let samples = (0..4).map(|i| vec![input(60 + i)]).collect();
    Evaluator::new(graph, Task::Raw { samples }).unwrap()
}

#[test]
fn verified_choice_keeps_paying_fusion() {
    // Block 1 adds nothing, so fusing 1..=3 reproduces the chain while any two dropped blocks
    // lose a bias.
    let mut specs: Vec<Spec> = (0..4).map(|i| Spec::bias_only(random_f32(WIDTH, 70 + i))).collect();
    specs[1] = Spec::bias_only(vec![0.0; WIDTH]);
    let graph = chain(&specs);
    let evaluator = raw_evaluator(&graph);
    let trial = verify_run(&graph, &evaluator, Run { first: 1, merged: 2 }, WITH_NORM).unwrap();
    assert!((trial.fused - 1.0).abs() < 1e-6, "fused quality {}", trial.fused);
    assert!(trial.dropped_quality < 0.999, "dropping two blocks keeps {}", trial.dropped_quality);
    assert!(trial.fusion_pays());

    let choice = choose_fusion(&graph, &evaluator, 2, WITH_NORM, |_| {}).unwrap();
    assert_eq!(choice.runs.len(), 2, "runs 0..=2 and 1..=3");
    let (run, quality) = choice.winner().expect("fusion beats dropping here");
    assert_eq!(run, Run { first: 1, merged: 2 });
    assert!((quality - 1.0).abs() < 1e-6);
    assert_eq!(choice.drop_order.len(), 2);
}

#[test]
fn verified_choice_rejects_tie_with_drop() {
    let graph = chain(&tanh_chain(4, true));
    let evaluator = raw_evaluator(&graph);
    let trial = verify_run(&graph, &evaluator, Run { first: 1, merged: 1 }, WITH_NORM).unwrap();
    let mut dropped = graph.clone();
    drop_blocks(&mut dropped, &[1]);
    let drop_first = evaluator.quality(&dropped).unwrap();
    assert_eq!(trial.fused, drop_first, "a fused pair computes what dropping its first block does");
    assert!(trial.dropped_quality >= drop_first);
    assert!(!trial.fusion_pays(), "a tie keeps the drop");

    let choice = choose_fusion(&graph, &evaluator, 1, WITH_NORM, |_| {}).unwrap();
    assert_eq!(choice.runs.len(), 3);
    assert!(choice.winner().is_none(), "pair fusion never beats the best single drop");
}

fn minilm() -> Option<Graph> {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/models/all-MiniLM-L6-v2-fp32.onnx"
    ));
    if !path.exists() {
        skip(&format!("{} is absent", path.display()));
        return None;
    }
    let (graph, _) = load_graph(path, &ImportOptions { max_batch: 1, max_seq: 32 }).unwrap();
    Some(graph)
}

/// Builds a 12-token input for each of the graph's BERT inputs.
fn tokens(graph: &Graph) -> Vec<HostTensor> {
    let ids = [101, 1996, 4937, 2003, 2006, 1996, 13523, 1012, 2009, 2003, 3835, 102];
    graph
        .inputs
        .iter()
        .map(|&v| {
            let values: Vec<i64> = match graph.values[v].name.as_str() {
                "input_ids" => ids.to_vec(),
                "attention_mask" => vec![1; ids.len()],
                _ => vec![0; ids.len()],
            };
            HostTensor::i64(vec![1, ids.len()], values)
        })
        .collect()
}

fn hidden(graph: &Graph, inputs: &[HostTensor]) -> Vec<f32> {
    let mut packed = PackedGraph::new(graph).unwrap();
    packed.run(inputs).unwrap()[0].as_f32().unwrap().to_vec()
}

#[test]
fn minilm_blocks_fuse() {
    let Some(graph) = minilm() else { return };
    let blocks = find_blocks(&graph);
    assert_eq!(blocks.len(), 6);
    for first in 0..5 {
        let mut g = graph.clone();
        let report = fuse_blocks(&mut g, &blocks, first, 1, WITHOUT_NORM).unwrap();
        assert_eq!(report.kept_layer_norm, 4, "two layer norms, scale and shift each");
        assert_eq!(report.changed, 12, "Q, K, V, output, FFN in and out: weight and bias each");
    }
    let mut all = graph.clone();
    let report = fuse_blocks(&mut all, &blocks, 0, 5, WITH_NORM).unwrap();
    assert_eq!(report.removed, [1, 2, 3, 4, 5]);
    assert!(find_blocks(&all).is_empty(), "one block left is no repeated structure");
    let per_block = blocks[0].nodes.len();
    assert_eq!(all.nodes.len(), graph.nodes.len() - 5 * per_block);

    let inputs = tokens(&graph);
    let mut fused = graph.clone();
    fuse_run(&mut fused, Run { first: 2, merged: 1 }, WITH_NORM).unwrap();
    let mut dropped = graph.clone();
    drop_blocks(&mut dropped, &[2]);
    let (a, b) = (hidden(&fused, &inputs), hidden(&dropped, &inputs));
    assert_eq!(a, b, "fusing blocks 2 and 3 computes what dropping block 2 does");
    assert!(max_diff(&a, &hidden(&graph, &inputs)) > 1e-3, "and it differs from the original");

    let mut quantized = graph.clone();
    quantize(&mut quantized, Quantize::Int8);
    let result = fuse_run(&mut quantized, Run { first: 0, merged: 1 }, WITH_NORM);
    assert!(matches!(result, Err(FusionError::NotF32 { block: 0, .. })), "{result:?}");
}
