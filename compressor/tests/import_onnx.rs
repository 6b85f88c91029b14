//! Importer tests on small generated ONNX graphs (see fixtures/onnx/make.py), checked against
//! tract running the same files.

mod common;

use std::path::PathBuf;

use common::{max_abs_diff, pack_graph, random_f32, run};
use edgefold_compressor::onnx::{import, ImportError, ImportOptions};
use edgefold_compressor::passes::fuse;
use edgefold_compressor::pipeline::load_graph;
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

/// Returns the names of the graph outputs in a packed file, in order.
fn packed_output_names(file: &common::Aligned) -> Vec<String> {
    let model = edgefold_runtime::Model::open(file.bytes()).unwrap();
    let tensors = (0..model.output_count()).map(|i| model.output_tensor(i).unwrap());
    tensors.map(|t| model.tensor_name(t).to_owned()).collect()
}

#[test]
fn identity_outputs_keep_names() {
    let path = fixture("identity_outputs.onnx");
    let options = ImportOptions { max_batch: 2, ..ImportOptions::default() };
    let (graph, _) = load_graph(&path, &options).unwrap();
    let file = pack_graph(&graph);
    assert_eq!(packed_output_names(&file), ["x_copy", "relu_copy", "relu_copy_again"]);
    let inputs: Vec<&str> = graph.inputs.iter().map(|&i| graph.values[i].name.as_str()).collect();
    assert_eq!(inputs, ["x"]);

    let x = random_f32(8, 3);
    let relu: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    let outputs = run(&file, &[HostTensor::f32(vec![2, 4], x.clone())]);
    assert_eq!(outputs.len(), 3);
    assert_eq!(outputs[0].as_f32().unwrap(), x.as_slice(), "x_copy");
    assert_eq!(outputs[1].as_f32().unwrap(), relu.as_slice(), "relu_copy");
    assert_eq!(outputs[2].as_f32().unwrap(), relu.as_slice(), "relu_copy_again");
}

#[test]
fn minilm_outputs_keep_names() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cases: [(PathBuf, &[&str]); 2] = [
        (root.join("../shared/data/models/all-MiniLM-L6-v2-fp32.onnx"), &["last_hidden_state"]),
        (
            root.join("models/paraphrase-MiniLM-L3-v2/model.onnx"),
            &["output", "463", "onnx::Shape_422", "461"],
        ),
    ];
    for (path, expected) in cases {
        if !path.exists() {
            edgefold_compressor::testdata::skip(&format!("{} is absent", path.display()));
            continue;
        }
        let (graph, _) = load_graph(&path, &ImportOptions::default()).unwrap();
        let names = packed_output_names(&pack_graph(&graph));
        assert_eq!(names, expected, "{}", path.display());
    }
}

#[test]
fn slice_of_position_table_within_max_seq() {
    let path = fixture("position_table.onnx");
    let graph = import(&path, &ImportOptions { max_batch: 1, max_seq: 8 }).unwrap();
    let file = pack_graph(&graph);
    let x = random_f32(3 * 4, 5);
    let outputs = run(&file, &[HostTensor::f32(vec![1, 3, 4], x.clone())]);
    let expected: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + i as f32).collect();
    assert_eq!(outputs[0].as_f32().unwrap(), expected.as_slice());
}

#[test]
fn slice_past_position_table_rejected() {
    let path = fixture("position_table.onnx");
    let err = import(&path, &ImportOptions { max_batch: 1, max_seq: 9 }).unwrap_err();
    let ImportError::Invalid { node, op_type, message, .. } = &err else {
        panic!("expected an invalid-node error, got {err}");
    };
    assert_eq!(node, "positions");
    assert_eq!(op_type, "Slice");
    assert!(message.contains("sequence = 9"), "{message}");
    assert!(message.contains("extent 8 of axis 1 of input table"), "{message}");
    assert!(message.contains("(--max-seq) to 8 or less"), "{message}");
}

#[test]
fn minilm_max_seq_past_positions_rejected() {
    let Some(path) = common::minilm_l3_model() else {
        return;
    };
    let err = import(&path, &ImportOptions { max_batch: 1, max_seq: 1000 }).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("(Slice)"), "{message}");
    assert!(message.contains("(--max-seq) to 512 or less"), "{message}");
    assert!(import(&path, &ImportOptions { max_batch: 1, max_seq: 512 }).is_ok());
}
