//! Importer tests on small generated ONNX graphs (see fixtures/onnx/make.py), checked against
//! tract running the same files.

mod common;

use std::path::PathBuf;

use common::{max_abs_diff, pack_graph, random_f32, run};
use edgefold_compressor::onnx::{import, ImportError, ImportOptions};
use edgefold_compressor::passes::fuse;
use edgefold_compressor::reference::ReferenceModel;
use edgefold_compressor::tensor::HostTensor;
use edgefold_runtime::ops::{Activation, Op, UnaryKind};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(name)
}

#[test]
fn unsupported_ops_are_listed_together() {
    let err = import(&fixture("unsupported.onnx"), &ImportOptions::default()).unwrap_err();
    let ImportError::Unsupported { ops, .. } = &err else { panic!("unexpected error {err}") };
    assert_eq!(
        ops.get("TopK").map(Vec::as_slice),
        Some(&["topk_a".to_string(), "topk_b".to_string()][..])
    );
    assert_eq!(ops.get("Hardmax").map(Vec::as_slice), Some(&["hardmax_a".to_string()][..]));
    assert_eq!(ops.len(), 2, "only TopK and Hardmax are unsupported: {ops:?}");
    let message = err.to_string();
    for name in ["topk_a", "topk_b", "hardmax_a", "unsupported.onnx"] {
        assert!(message.contains(name), "message lacks {name}: {message}");
    }
}

#[test]
fn dequantized_weights_and_patterns_fold() {
    let path = fixture("patterns.onnx");
    let mut graph = import(&path, &ImportOptions { max_batch: 4, max_seq: 1 }).unwrap();
    let counts = fuse(&mut graph);
    assert_eq!(counts.gelu, 1);
    assert_eq!(counts.layer_norm, 1);
    assert_eq!(counts.bias, 1);
    assert_eq!(counts.activation, 1);
    let ops: Vec<Op> = graph.nodes.iter().map(|n| n.op).collect();
    assert_eq!(ops.len(), 2, "expected linear with gelu, layer norm: {ops:?}");
    assert!(matches!(
        ops[0],
        Op::Linear { activation: Some(Activation { kind: UnaryKind::Gelu, .. }) }
    ));
    assert!(matches!(ops[1], Op::LayerNorm { .. }));

    let file = pack_graph(&graph);
    let reference = ReferenceModel::load(&path).unwrap();
    for batch in [1, 3, 4] {
        let x = HostTensor::f32(vec![batch, 6], random_f32(batch * 6, batch as u64));
        let ours = run(&file, std::slice::from_ref(&x));
        let theirs = reference.run(&[x]).unwrap();
        let diff = max_abs_diff(&ours[0], &theirs[0]);
        assert!(diff < 1e-5, "batch {batch}: max abs difference {diff}");
    }
}

#[test]
fn shapes_computed_from_sequence_length() {
    let path = fixture("dynamic_shapes.onnx");
    let graph = import(&path, &ImportOptions { max_batch: 2, max_seq: 16 }).unwrap();
    assert!(
        graph.nodes.iter().all(|n| !matches!(n.op, Op::Concat { .. })),
        "shape arithmetic should fold away: {:?}",
        graph.nodes.iter().map(|n| n.op.name()).collect::<Vec<_>>()
    );
    let file = pack_graph(&graph);
    let reference = ReferenceModel::load(&path).unwrap();
    for (batch, seq) in [(1, 3), (2, 11), (2, 16), (1, 1)] {
        let x = HostTensor::f32(vec![batch, seq, 8], random_f32(batch * seq * 8, seq as u64));
        let ours = run(&file, std::slice::from_ref(&x));
        let theirs = reference.run(&[x]).unwrap();
        let diff = max_abs_diff(&ours[0], &theirs[0]);
        assert!(diff < 1e-6, "batch {batch}, seq {seq}: max abs difference {diff}");
    }
}

#[test]
fn expand_slice_cast_and_where_match_tract() {
    use edgefold_compressor::tensor::TensorData;
    let path = fixture("broadcasts.onnx");
    let graph = import(&path, &ImportOptions { max_batch: 1, max_seq: 8 }).unwrap();
    let names: Vec<&str> = graph.nodes.iter().map(|n| n.op.name()).collect();
    for op in ["Expand", "Slice", "Cast", "Where"] {
        assert!(names.contains(&op), "{op} should stay a runtime op: {names:?}");
    }
    let file = pack_graph(&graph);
    let reference = ReferenceModel::load(&path).unwrap();
    for seed in 0..4u64 {
        let x = HostTensor::f32(vec![1, 6], random_f32(6, seed));
        let mask = (0..9).map(|i| (i * 5 + seed as usize).is_multiple_of(3)).collect();
        let above = HostTensor { shape: vec![3, 3], data: TensorData::Bool(mask) };
        let inputs = [x, above];
        let ours = run(&file, &inputs);
        let theirs = reference.run(&inputs).unwrap();
        let diff = max_abs_diff(&ours[0], &theirs[0]);
        assert!(diff < 1e-6, "seed {seed}: max abs difference {diff}");
    }
}

#[test]
fn blocks_of_minilm_models() {
    use edgefold_compressor::blocks::find_blocks;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cases = [
        (root.join("../shared/data/models/all-MiniLM-L6-v2-fp32.onnx"), 6),
        (root.join("models/paraphrase-MiniLM-L3-v2/model.onnx"), 3),
    ];
    for (path, expected) in cases {
        if !path.exists() {
            edgefold_compressor::testdata::skip(&format!("{} is absent", path.display()));
            continue;
        }
        let mut graph = import(&path, &ImportOptions::default()).unwrap();
        fuse(&mut graph);
        let blocks = find_blocks(&graph);
        let indices: Vec<usize> = blocks.iter().map(|b| b.index).collect();
        assert_eq!(indices, (0..expected).collect::<Vec<_>>(), "{}", path.display());
        for b in &blocks {
            let node = graph.nodes.iter().find(|n| n.outputs.contains(&b.output)).unwrap();
            assert!(
                matches!(node.op, Op::LayerNorm { .. }),
                "block {} ends in {:?}",
                b.index,
                node.op
            );
            assert!(
                b.nodes.iter().filter(|&&n| matches!(graph.nodes[n].op, Op::Linear { .. })).count()
                    == 6
            );
        }
    }
}

#[test]
fn attention_fuses_in_minilm() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/models/all-MiniLM-L6-v2-fp32.onnx");
    if !path.exists() {
        edgefold_compressor::testdata::skip(&format!("{} is absent", path.display()));
        return;
    }
    let unfused = import(&path, &ImportOptions { max_batch: 2, max_seq: 512 }).unwrap();
    let mut fused = unfused.clone();
    let counts = fuse(&mut fused);
    assert_eq!(counts.attention, 6, "one attention per layer");
    assert_eq!(counts.activation, 6, "one GELU per layer joins its linear op");
    for op in [Op::MatMul, Op::Softmax { axis: 3 }] {
        assert!(!fused.nodes.iter().any(|n| n.op == op), "{op:?} is left after fusion");
    }
    // The 12 x 512 x 512 scores per sentence were the largest activations.
    let (before, after) = (pack_graph(&unfused), pack_graph(&fused));
    let arena =
        |file: &common::Aligned| edgefold_runtime::Model::open(file.bytes()).unwrap().arena_bytes();
    let (arena_before, arena_after) = (arena(&before), arena(&after));
    assert!(
        arena_after + 2 * 12 * 512 * 512 * 4 <= arena_before,
        "arena {arena_before} bytes unfused, {arena_after} fused"
    );

    // Two sentences of 150 tokens, the second padded after 90, so the mask removes keys from
    // the last of the three 64-key blocks and from the middle one.
    let seq = 150;
    let ids: Vec<i64> = (0..2 * seq).map(|i| 1000 + (i as i64 * 7919) % 20000).collect();
    let mask: Vec<i64> = (0..2 * seq).map(|i| i64::from(i < seq || i % seq < 90)).collect();
    let inputs = [
        HostTensor::i64(vec![2, seq], ids),
        HostTensor::i64(vec![2, seq], mask),
        HostTensor::i64(vec![2, seq], vec![0; 2 * seq]),
    ];
    let (want, got) = (run(&before, &inputs), run(&after, &inputs));
    let diff = max_abs_diff(&want[0], &got[0]);
    assert!(diff < 1e-4, "fused and unfused outputs differ by up to {diff}");
}
