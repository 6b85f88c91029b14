//! The same input and settings give byte-identical files, and a failed write leaves nothing behind.

use std::path::{Path, PathBuf};

use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::{compress, CompressOptions};
use edgefold_compressor::quantize::{LowRank, Quantize};
use edgefold_compressor::writer::write_atomic;

fn options(quantize: Quantize, low_rank: LowRank) -> CompressOptions {
    CompressOptions {
        quantize,
        low_rank,
        import: ImportOptions { max_batch: 2, max_seq: 32 },
        tokenizer: None,
    }
}

fn models() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = vec![root.join("tests/fixtures/onnx/patterns.onnx")];
    let l3 = root.join("../models/paraphrase-MiniLM-L3-v2/model.onnx");
    if l3.exists() {
        paths.push(l3);
    } else {
        edgefold_compressor::testdata::skip(&format!(
            "{} is absent (run scripts/fetch-models.sh)",
            l3.display()
        ));
    }
    paths
}

#[test]
fn same_settings_give_identical_bytes() {
    for model in models() {
        for (q, lr) in [
            (Quantize::Int8, LowRank::Off),
            (Quantize::Int4, LowRank::Energy(0.9)),
            (Quantize::F16, LowRank::Elbow),
        ] {
            let (a, _) = compress(&model, &options(q, lr)).unwrap();
            let (b, _) = compress(&model, &options(q, lr)).unwrap();
            assert!(a == b, "{} with {q} and {lr} differs between two runs", model.display());
        }
    }
}

#[test]
fn failed_write_leaves_no_file() {
    let dir = std::env::temp_dir().join(format!("edgefold-write-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("missing-subdir").join("out.fold");
    assert!(write_atomic(&target, b"data").is_err());
    assert!(!target.exists());

    let good = dir.join("out.fold");
    write_atomic(&good, b"first").unwrap();
    write_atomic(&good, b"second").unwrap();
    assert_eq!(std::fs::read(&good).unwrap(), b"second");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "out.fold")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}
