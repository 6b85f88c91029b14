//! The self-test a packed file carries: embedded by `compress --self-test`, run by `verify`. A
//! file that runs as the host ran it passes; a changed expected value, a malformed record or a
//! file without one is reported, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use edgefold_compressor::exec::PackedGraph;
use edgefold_compressor::onnx::ImportOptions;
use edgefold_compressor::pipeline::{compress, CompressOptions};
use edgefold_compressor::quantize::{LowRank, Quantize};
use edgefold_compressor::selftest::{embed, verify, VerifyError};
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::testdata::skip;
use edgefold_compressor::writer::with_metadata;
use edgefold_runtime::selftest::{Record, SELF_TEST_KEY};
use edgefold_runtime::{Error, Model};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/onnx/");
const KWS: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/mlperf-tiny/kws_ref_model.onnx");

/// The file name that errors of `embed` and `verify` give.
const FILE_NAME: &str = "sample.fold";

fn packed(name: &str, quantize: Quantize) -> Vec<u8> {
    let options = CompressOptions {
        quantize,
        low_rank: LowRank::Off,
        import: ImportOptions { max_batch: 2, max_seq: 16 },
        tokenizer: None,
    };
    compress(&Path::new(FIXTURES).join(name), &options).expect("fixture compresses").0
}

/// Returns the self-test record's value in `file`.
fn record_of(file: &[u8]) -> Vec<u8> {
    let aligned = PackedGraph::from_bytes(file).expect("file opens");
    let model = Model::open(aligned.bytes()).expect("file opens");
    model.metadata(SELF_TEST_KEY).expect("the file has a self-test").to_vec()
}

#[test]
fn self_test_exact_on_same_host() {
    for (name, quantize) in [
        ("patterns.onnx", Quantize::Int8),
        ("dynamic_shapes.onnx", Quantize::F32),
        ("patterns.onnx", Quantize::Int4),
    ] {
        let plain = packed(name, quantize);
        let missing = verify(&plain, Path::new(FILE_NAME));
        assert!(
            matches!(missing, Err(VerifyError::Runtime(Error::NoSelfTest))),
            "{name}: {missing:?}"
        );
        let (with_test, embedded) =
            embed(&plain, Path::new(FILE_NAME), None).expect("self-test embeds");
        assert!(with_test.len() > plain.len());
        assert!(embedded.tolerance >= 1e-4, "{name}: tolerance {}", embedded.tolerance);
        // Symbolic batch and sequence axes take the sample value 4, capped by the maximum.
        assert!(embedded.input_shapes[0].starts_with(&[2]), "{:?}", embedded.input_shapes);
        let outcome = verify(&with_test, Path::new(FILE_NAME)).expect("self-test runs");
        assert!(outcome.passed(), "{name}: {outcome:?}");
        assert_eq!(outcome.max_abs_error, 0.0, "{name}: the same host computes the same bits");
        assert!(outcome.outputs >= 1);
        assert!(outcome.elements > 0);
    }
}

#[test]
fn embedding_keeps_other_sections() {
    let plain = packed("patterns.onnx", Quantize::Int8);
    let (with_test, _) = embed(&plain, Path::new(FILE_NAME), None).expect("self-test embeds");
    let a = PackedGraph::from_bytes(&plain).expect("opens");
    let b = PackedGraph::from_bytes(&with_test).expect("opens");
    let (a, b) = (Model::open(a.bytes()).unwrap(), Model::open(b.bytes()).unwrap());
    assert_eq!(a.arena_bytes_unaligned(), b.arena_bytes_unaligned());
    assert_eq!(a.weights_len(), b.weights_len());
    let entries = |m: &Model<'_>| -> Vec<(String, Vec<u8>)> {
        m.metadata_entries()
            .filter(|(k, _)| *k != SELF_TEST_KEY)
            .map(|(k, v)| (k.to_owned(), v.to_vec()))
            .collect()
    };
    assert_eq!(entries(&a), entries(&b));
    // Embedding twice replaces the record instead of adding a second one.
    let (twice, _) = embed(&with_test, Path::new(FILE_NAME), None).expect("embeds again");
    assert_eq!(twice, with_test);
}

#[test]
fn self_test_changed_value_fails() {
    let plain = packed("patterns.onnx", Quantize::Int8);
    let (with_test, embedded) =
        embed(&plain, Path::new(FILE_NAME), None).expect("self-test embeds");
    let mut value = record_of(&with_test);
    // The last tensor is the expected output; its last four bytes are its last f32 element.
    let n = value.len();
    let last = f32::from_le_bytes(value[n - 4..].try_into().unwrap());
    let shifted = last + 10.0 * embedded.tolerance;
    value[n - 4..].copy_from_slice(&shifted.to_le_bytes());
    let tampered = with_metadata(&with_test, SELF_TEST_KEY, &value).expect("rewrites");
    let outcome = verify(&tampered, Path::new(FILE_NAME)).expect("self-test runs");
    assert!(!outcome.passed());
    let expected = (shifted - last).abs();
    assert!((outcome.max_abs_error - expected).abs() <= 1e-3 * expected, "{outcome:?}");
}

#[test]
fn malformed_record_typed_error() {
    let plain = packed("dynamic_shapes.onnx", Quantize::F32);
    let (with_test, _) = embed(&plain, Path::new(FILE_NAME), None).expect("self-test embeds");
    let value = record_of(&with_test);
    assert!(Record::parse(&value).is_ok());
    // Every truncation, and every byte of the header and first tensor header flipped.
    let mut cases: Vec<Vec<u8>> = (0..value.len()).map(|cut| value[..cut].to_vec()).collect();
    for at in 0..value.len().min(40) {
        let mut v = value.clone();
        v[at] ^= 0x81;
        cases.push(v);
    }
    let mut errors = 0;
    for case in &cases {
        let file = with_metadata(&with_test, SELF_TEST_KEY, case).expect("rewrites");
        match verify(&file, Path::new(FILE_NAME)) {
            Err(VerifyError::Runtime(Error::InvalidSelfTest { .. })) => errors += 1,
            // A flip in a value (or an extent the model accepts) may still decode and run.
            Ok(_)
            | Err(VerifyError::Runtime(
                Error::InputShapeMismatch { .. } | Error::InputDtypeMismatch { .. },
            )) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    // Every truncation must fail to decode.
    assert!(errors >= value.len(), "{errors} errors in {} cases", cases.len());
}

#[test]
fn self_test_given_input_used() {
    let plain = packed("patterns.onnx", Quantize::F32);
    let x = HostTensor::f32(vec![1, 6], vec![0.5, -1.0, 2.0, 0.0, 3.5, -0.25]);
    let (with_test, embedded) =
        embed(&plain, Path::new(FILE_NAME), Some(std::slice::from_ref(&x))).expect("embeds");
    assert_eq!(embedded.input_shapes, vec![vec![1, 6]]);
    let record = record_of(&with_test);
    let parsed = Record::parse(&record).expect("parses");
    let first = parsed.tensors().next().unwrap().unwrap();
    let values: Vec<f32> =
        first.bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(values, x.as_f32().unwrap());
    assert!(verify(&with_test, Path::new(FILE_NAME)).unwrap().passed());
    // An input of the wrong width is refused with the runtime's error.
    let wrong = HostTensor::f32(vec![1, 5], vec![0.0; 5]);
    assert!(embed(&plain, Path::new(FILE_NAME), Some(&[wrong])).is_err());
    assert!(embed(&plain, Path::new(FILE_NAME), Some(&[])).is_err());
}

/// The command line on keyword spotting: compress with a self-test, then verify it.
#[test]
fn cli_verify_keyword_spotting() {
    if !Path::new(KWS).exists() {
        skip(&format!("{KWS} is missing"));
        return;
    }
    let dir = std::env::temp_dir().join(format!("edgefold-self-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out: PathBuf = dir.join("kws.fold");
    let bin = env!("CARGO_BIN_EXE_edgefold");
    let status = Command::new(bin)
        .args(["compress", KWS, "--quantize", "int8", "--self-test", "-o"])
        .arg(&out)
        .status()
        .expect("edgefold runs");
    assert!(status.success());
    let output = Command::new(bin).args(["verify", "--json"]).arg(&out).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["passed"], true);
    assert_eq!(report["max_abs_error"], 0.0);
    assert_eq!(report["elements"], 12);

    // Without a record, verify names the file and the fix, and fails.
    let plain = dir.join("plain.fold");
    let status = Command::new(bin)
        .args(["compress", KWS, "-o"])
        .arg(&plain)
        .status()
        .expect("edgefold runs");
    assert!(status.success());
    let output = Command::new(bin).arg("verify").arg(&plain).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("plain.fold"), "{stderr}");
    assert!(stderr.contains("--self-test"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
