//! Compress -> write -> open -> run, compared with tract on the original ONNX model.

use std::path::{Path, PathBuf};

use edgefold_compressor::onnx::{import, ImportOptions};
use edgefold_compressor::plan::plan_arena;
use edgefold_compressor::reference::ReferenceModel;
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::text::{read_sts, TextEncoder};
use edgefold_compressor::writer::pack;
use edgefold_runtime::{Model, Session};

fn shared(path: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data").join(path);
    if p.exists() {
        Some(p)
    } else {
        edgefold_compressor::testdata::skip(&format!("{} is absent", p.display()));
        None
    }
}

fn tokenizer() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/paraphrase-MiniLM-L3-v2/tokenizer.json");
    if p.exists() {
        Some(p)
    } else {
        edgefold_compressor::testdata::skip(&format!(
            "{} is absent; run scripts/fetch-models.sh",
            p.display()
        ));
        None
    }
}

#[test]
fn minilm_f32_matches_tract() {
    let (Some(model_path), Some(sts), Some(tok)) =
        (shared("models/all-MiniLM-L6-v2-fp32.onnx"), shared("stsb/sts-dev.csv"), tokenizer())
    else {
        return;
    };
    let graph = import(&model_path, &ImportOptions { max_batch: 1, max_seq: 128 }).unwrap();
    let plan = plan_arena(&graph);
    let bytes = pack(&graph, &plan, &[]).unwrap();
    let mut aligned = vec![0u128; bytes.len().div_ceil(16)];
    let buf: &mut [u8] = bytemuck_bytes(&mut aligned);
    buf[..bytes.len()].copy_from_slice(&bytes);
    let model = Model::open(&buf[..bytes.len()]).unwrap();
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).unwrap();
    let reference = ReferenceModel::load(&model_path).unwrap();
    let encoder = TextEncoder::from_file(&tok, 128).unwrap();
    let pairs = read_sts(&sts).unwrap();
    let mut worst = 0f32;
    for pair in pairs.iter().take(10) {
        for sentence in [&pair.sentence1, &pair.sentence2] {
            let e = encoder.encode(sentence).unwrap();
            let n = e.ids.len();
            session.set_input::<i64>(0, &[1, n], &e.ids).unwrap();
            session.set_input::<i64>(1, &[1, n], &e.attention_mask).unwrap();
            session.set_input::<i64>(2, &[1, n], &e.type_ids).unwrap();
            session.run().unwrap();
            let (shape, ours) = session.output::<f32>(0).unwrap();
            assert_eq!(shape.as_slice(), &[1, n, 384]);
            let inputs = [
                HostTensor::i64(vec![1, n], e.ids.clone()),
                HostTensor::i64(vec![1, n], e.attention_mask.clone()),
                HostTensor::i64(vec![1, n], e.type_ids.clone()),
            ];
            let theirs = reference.run(&inputs).unwrap();
            let theirs = theirs[0].as_f32().unwrap();
            let diff = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            worst = worst.max(diff);
        }
    }
    eprintln!("max abs difference over 20 sentences: {worst:e}");
    assert!(worst < 1e-4, "max abs difference {worst}");
}

fn bytemuck_bytes(v: &mut [u128]) -> &mut [u8] {
    let len = v.len() * 16;
    // SAFETY: u128 has no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, len) }
}
