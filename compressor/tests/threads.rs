//! A session split across threads gives the one-thread outputs. They match bit for bit with f32
//! and int8 weights, whose parts keep enough rows to take the kernel the whole call takes, or
//! split the outputs instead. With int4 they match within rounding, because a thread's part of
//! fewer than 8 rows takes another kernel than the whole call, which sums a row differently. The test runs
//! paraphrase-MiniLM-L3-v2 on 1, 2 and 3 threads, at a length whose rows split unevenly and at
//! one too short for two parts of 16 rows.

mod common;

use common::{minilm_l3_model, Aligned};
use edgefold_compressor::onnx::{import, ImportOptions};
use edgefold_compressor::passes::fuse;
use edgefold_compressor::plan::plan_arena;
use edgefold_compressor::quantize::{quantize, Quantize};
use edgefold_compressor::writer::pack;
use edgefold_runtime::{DType, Model, Session};

/// Token inputs of `seq` tokens for each of the model's inputs, chosen by name.
fn token_inputs(model: &Model<'_>, seq: usize) -> Vec<Vec<i64>> {
    (0..model.input_count())
        .map(|i| {
            let name = model.tensor_name(model.input_tensor(i).unwrap());
            (0..seq as i64)
                .map(|k| match () {
                    _ if name.contains("mask") => 1,
                    _ if name.contains("type") => 0,
                    _ => 100 + (k * 7919) % 20000,
                })
                .collect()
        })
        .collect()
}

/// Runs `file` once on `threads` threads and returns every f32 output. (This export of the model
/// also passes its i64 inputs through as outputs.)
fn run(file: &Aligned, seq: usize, threads: usize) -> Vec<Vec<f32>> {
    let model = Model::open(file.bytes()).expect("file opens");
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).expect("session");
    session.set_threads(threads);
    assert_eq!(session.threads(), threads);
    for (i, values) in token_inputs(&model, seq).iter().enumerate() {
        session.set_input::<i64>(i, &[1, seq], values).expect("input is set");
    }
    session.run().expect("run succeeds");
    let floats: Vec<usize> = (0..model.output_count())
        .filter(|&i| session.output_dtype(i).expect("output type") == DType::F32)
        .collect();
    assert_eq!(floats.len(), 2, "the encoder has two f32 outputs");
    floats.iter().map(|&i| session.output::<f32>(i).expect("f32 output").1.to_vec()).collect()
}

#[test]
fn threads_match_one_thread() {
    let Some(path) = minilm_l3_model() else { return };
    // 61 tokens: the 61 rows of each linear layer split 31 + 30 and 21 + 20 + 20. 20 tokens: on
    // AVX-512 the f32 kernel takes 16 rows or more, so the outputs split instead.
    let options = ImportOptions { max_batch: 1, max_seq: 64 };
    for (mode, seq) in [Quantize::F32, Quantize::Int8, Quantize::Int4]
        .into_iter()
        .flat_map(|mode| [(mode, 61), (mode, 20)])
    {
        let mut graph = import(&path, &options).expect("model imports");
        fuse(&mut graph);
        quantize(&mut graph, mode);
        let file = Aligned::new(&pack(&graph, &plan_arena(&graph), &[]).expect("graph packs"));
        let single = run(&file, seq, 1);
        for threads in [2, 3] {
            let split = run(&file, seq, threads);
            for (o, (a, b)) in single.iter().zip(&split).enumerate() {
                assert_eq!(a.len(), b.len());
                let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
                if mode == Quantize::Int4 {
                    assert!(
                        worst <= 1e-5 * scale,
                        "{mode:?}, {seq} tokens, {threads} threads, output {o}: differs by {worst}"
                    );
                } else {
                    assert!(
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{mode:?}, {seq} tokens, {threads} threads, output {o}: differs by {worst}"
                    );
                }
            }
        }
    }
}
