//! Error messages, JSON errors and progress of the `edgefold` binary, run as the built binary on
//! the small ONNX fixtures and on files that the tests write.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{compress_command, edgefold, onnx_fixture, scratch_dir, stderr_of, stdout_json};
use edgefold_compressor::ir::{Graph, Node, Symbol, Value, ValueId};
use edgefold_compressor::npy::{to_npy_bytes, write_npy};
use edgefold_compressor::plan::plan_arena;
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::writer::{pack, with_metadata};
use edgefold_runtime::format::Dim;
use edgefold_runtime::ops::{BinaryKind, Op};
use edgefold_runtime::selftest::SELF_TEST_KEY;
use edgefold_runtime::{DType, MappedFile, Model};

/// Returns `edgefold compress patterns.onnx -o OUTPUT`, to which the caller adds options.
fn compress_patterns(output: impl AsRef<OsStr>) -> Command {
    compress_command(onnx_fixture("patterns.onnx"), output)
}

/// Compresses `patterns.onnx` (input x f32 [batch, 6]) into `dir`.
fn packed_patterns(dir: &Path) -> PathBuf {
    let packed = dir.join("patterns.fold");
    let result = compress_patterns(&packed).output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    packed
}

/// Writes an .npz with an `inputs` array of `samples` rows of 6 floats, for `patterns.onnx`.
fn write_patterns_npz(path: &Path, samples: usize) {
    let values: Vec<f32> =
        (0..samples * 6).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    let inputs = HostTensor::f32(vec![samples, 6], values);
    let mut archive = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    archive.start_file("inputs.npy", options).unwrap();
    archive.write_all(&to_npy_bytes(&inputs)).unwrap();
    archive.finish().unwrap();
}

/// Asserts that `needle` occurs exactly once in `message`.
fn assert_once(message: &str, needle: &str) {
    let count = message.matches(needle).count();
    assert_eq!(count, 1, "{needle:?} occurs {count} times in {message:?}");
}

#[test]
fn json_error_on_stdout() {
    let dir = scratch_dir("json-error");
    let missing = dir.join("missing.fold");
    // Each subcommand with its arguments after the packed file.
    let cases: [(&str, &[&str]); 5] = [
        ("inspect", &[]),
        ("verify", &[]),
        ("run", &["--input", "x.npy"]),
        ("embed", &["a sentence"]),
        ("bench", &[]),
    ];
    for (subcommand, rest) in cases {
        let result =
            edgefold().arg(subcommand).arg(&missing).args(rest).arg("--json").output().unwrap();
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "{subcommand}: {stderr}");
        assert!(stderr.starts_with("error: "), "{subcommand}: {stderr}");
        let report = stdout_json(&result);
        let error = report["error"].as_str().unwrap_or_else(|| panic!("{subcommand}: {report}"));
        assert!(error.contains("missing.fold"), "{subcommand}: {error}");
        // The JSON contains the same message as stderr.
        assert_eq!(stderr.trim_end(), format!("error: {error}"), "{subcommand}");
    }

    // Without --json, stdout stays empty.
    let result = edgefold().arg("inspect").arg(&missing).output().unwrap();
    assert_eq!(result.status.code(), Some(1));
    assert!(result.stdout.is_empty(), "{}", String::from_utf8_lossy(&result.stdout));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn json_error_for_invalid_option() {
    let dir = scratch_dir("json-usage");
    let result = compress_patterns(dir.join("out.fold"))
        .args(["--max-seq", "0", "--json"])
        .output()
        .unwrap();
    assert_eq!(result.status.code(), Some(2), "{}", stderr_of(&result));
    let report = stdout_json(&result);
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("--max-seq"), "{error}");
    assert!(error.contains("at least 1"), "{error}");
    assert!(!error.contains("--help"), "{error}");

    // --help is no error, so stdout is the help text.
    let result = edgefold().args(["compress", "--help", "--json"]).output().unwrap();
    assert!(result.status.success());
    assert!(String::from_utf8_lossy(&result.stdout).contains("--max-seq"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn causes_printed_once() {
    let dir = scratch_dir("causes-once");
    let packed = packed_patterns(&dir);
    let input = dir.join("x.npy");
    write_npy(&input, &HostTensor::f32(vec![1, 6], vec![0.5; 6])).unwrap();
    let bad_npy = dir.join("bad.npy");
    std::fs::write(&bad_npy, b"not an array").unwrap();
    let not_found = "No such file or directory";

    let eval = |data: &str, task: &str| {
        edgefold()
            .arg("eval")
            .arg(onnx_fixture("patterns.onnx"))
            .arg(&packed)
            .args(["--task", task, "--data"])
            .arg(dir.join(data))
            .output()
            .unwrap()
    };
    let missing_npz = eval("missing.npz", "raw");
    let missing_csv = eval("missing.csv", "sts");
    let output_dir_missing = edgefold()
        .arg("run")
        .arg(&packed)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.join("no-such-dir").join("out.npy"))
        .output()
        .unwrap();
    let tokenizer_missing = compress_patterns(dir.join("out.fold"))
        .arg("--tokenizer")
        .arg(dir.join("missing.json"))
        .output()
        .unwrap();
    let cases = [
        ("eval --data missing.npz", missing_npz, "missing.npz", not_found),
        ("eval --data missing.csv", missing_csv, "missing.csv", not_found),
        ("run --output", output_dir_missing, "out.npy", not_found),
        ("compress --tokenizer", tokenizer_missing, "missing.json", not_found),
    ];
    for (label, result, file, cause) in cases {
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "{label}: {stderr}");
        assert_once(&stderr, cause);
        assert_once(&stderr, file);
    }

    let result = edgefold().arg("run").arg(&packed).arg("--input").arg(&bad_npy).output().unwrap();
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert_once(&stderr, "not a .npy file");
    assert_once(&stderr, "bad.npy");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn verify_directory_names_fix() {
    let dir = scratch_dir("verify-directory");
    for json in [false, true] {
        let mut command = edgefold();
        command.arg("verify").arg(&dir);
        if json {
            command.arg("--json");
        }
        let result = command.output().unwrap();
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("the path is a directory; pass a packed .fold file"), "{stderr}");
        assert!(!stderr.contains("os error"), "{stderr}");
        if json {
            let report = stdout_json(&result);
            assert!(report["error"].as_str().unwrap().contains("is a directory"), "{report}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn packed_file_as_onnx_is_named() {
    let dir = scratch_dir("packed-as-onnx");
    let packed = packed_patterns(&dir);
    let bench = edgefold().arg("bench").arg(&packed).args(["--engine", "tract"]).output().unwrap();
    let again = dir.join("again.fold");
    let compress = compress_command(&packed, &again).output().unwrap();
    for (what, result) in [("bench", bench), ("compress", compress)] {
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains("is a packed .fold file"), "{what}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn compress_output_directory_rejected() {
    let dir = scratch_dir("output-directory");
    let target = dir.join("adir");
    std::fs::create_dir(&target).unwrap();
    let with_slash = format!("{}/", target.display());
    let missing_with_slash = format!("{}/", dir.join("not-yet").display());
    for output in [target.display().to_string(), with_slash, missing_with_slash] {
        let result = compress_patterns(&output).output().unwrap();
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "-o {output}: {stderr}");
        assert!(stderr.contains("directory; -o takes the path of the file"), "{stderr}");
        assert!(stderr.contains("model.fold"), "{stderr}");
        assert!(!stderr.contains("os error"), "{stderr}");
    }
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "a file was written into adir");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn zero_max_seq_and_batch_rejected() {
    let dir = scratch_dir("zero-limits");
    for option in ["--max-seq", "--max-batch"] {
        let result = compress_patterns(dir.join("out.fold")).args([option, "0"]).output().unwrap();
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(2), "{option}: {stderr}");
        assert!(stderr.contains(&format!("'0' for '{option}")), "{stderr}");
        assert!(stderr.contains("must be at least 1"), "{stderr}");
        assert!(!dir.join("out.fold").exists());
    }
    let result = edgefold()
        .arg("analyze")
        .arg(onnx_fixture("patterns.onnx"))
        .args(["--max-seq", "0"])
        .output()
        .unwrap();
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("must be at least 1"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The planner's stages reach stderr at the default verbosity although stderr is a pipe here,
/// where indicatif draws nothing.
#[test]
fn planner_progress_on_stderr() {
    let dir = scratch_dir("planner-progress");
    let calibration = dir.join("calibration.npz");
    write_patterns_npz(&calibration, 20);
    let result = compress_patterns(dir.join("out.fold"))
        .args(["--min-quality", "0.5", "--task", "raw", "--calibration"])
        .arg(&calibration)
        .output()
        .unwrap();
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("loading"), "{stderr}");
    assert!(stderr.contains("calibrating on 16 samples"), "{stderr}");
    assert!(stderr.contains("evaluating the original"), "{stderr}");
    assert!(stderr.contains("sized drop 0"), "{stderr}");
    assert!(stderr.contains("confirmed quality"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_warns_on_other_original() {
    let dir = scratch_dir("eval-source");
    let packed = packed_patterns(&dir);
    let data = dir.join("data.npz");
    write_patterns_npz(&data, 4);
    // The same graph with an unknown protobuf field (number 100, varint 1) appended: tract reads
    // the same model, but the file's sha256 differs.
    let other = dir.join("other.onnx");
    let mut bytes = std::fs::read(onnx_fixture("patterns.onnx")).unwrap();
    bytes.extend_from_slice(&[0xa0, 0x06, 0x01]);
    std::fs::write(&other, bytes).unwrap();

    let eval = |original: &Path| {
        edgefold()
            .arg("eval")
            .arg(original)
            .arg(&packed)
            .args(["--task", "raw", "--json", "--data"])
            .arg(&data)
            .output()
            .unwrap()
    };
    let result = eval(&other);
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("other.onnx"), "{stderr}");
    assert!(stderr.contains("patterns.fold was not compressed from"), "{stderr}");
    assert_eq!(stdout_json(&result)["source_matches"], false);

    let result = eval(&onnx_fixture("patterns.onnx"));
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(!stderr.contains("was not compressed from"), "{stderr}");
    assert_eq!(stdout_json(&result)["source_matches"], true);
    std::fs::remove_dir_all(&dir).ok();
}

fn activation(graph: &mut Graph, name: &str, shape: Vec<Dim>) -> ValueId {
    graph.add_value(Value { name: name.into(), dtype: DType::F32, shape, data: None })
}

/// Packs `sum = first + second`, three vectors of the symbolic length `sequence` (at most 8).
fn write_sum_model(path: &Path) {
    let mut graph = Graph::default();
    graph.symbols.push(Symbol { name: "sequence".into(), max: 8 });
    let first = activation(&mut graph, "first", vec![Dim::symbol(0)]);
    let second = activation(&mut graph, "second", vec![Dim::symbol(0)]);
    let sum = activation(&mut graph, "sum", vec![Dim::symbol(0)]);
    graph.nodes.push(Node {
        name: "add".into(),
        op: Op::Binary(BinaryKind::Add),
        inputs: vec![Some(first), Some(second)],
        outputs: vec![sum],
    });
    graph.inputs = vec![first, second];
    graph.outputs = vec![sum];
    let plan = plan_arena(&graph);
    std::fs::write(path, pack(&graph, &plan, &[]).expect("the test graph packs")).unwrap();
}

#[test]
fn run_symbol_conflict_names_symbol() {
    let dir = scratch_dir("symbol-conflict");
    let model = dir.join("sum.fold");
    write_sum_model(&model);
    let (four, three) = (dir.join("four.npy"), dir.join("three.npy"));
    write_npy(&four, &HostTensor::f32(vec![4], vec![1.0; 4])).unwrap();
    write_npy(&three, &HostTensor::f32(vec![3], vec![1.0; 3])).unwrap();

    let run = |first: &Path, second: &Path| {
        edgefold()
            .arg("run")
            .arg(&model)
            .arg("--input")
            .arg(first)
            .arg("--input")
            .arg(second)
            .output()
            .unwrap()
    };
    let result = run(&four, &three);
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("\"sequence\""), "{stderr}");
    assert!(stderr.contains("4 by one input and 3 by another"), "{stderr}");
    assert!(stderr.contains("first from"), "{stderr}");
    assert!(stderr.contains("four.npy"), "{stderr}");
    assert!(stderr.contains("second from"), "{stderr}");
    assert!(stderr.contains("three.npy"), "{stderr}");

    // Inputs that agree run.
    let result = run(&four, &four);
    assert!(result.status.success(), "{}", stderr_of(&result));
    std::fs::remove_dir_all(&dir).ok();
}

/// A self-test whose expected output has the wrong shape fails with an infinite error, which the
/// JSON writes as "inf" in the one object on stdout.
#[test]
fn verify_failure_json_says_inf() {
    let dir = scratch_dir("verify-inf");
    let input = dir.join("x.npy");
    write_npy(&input, &HostTensor::f32(vec![1, 6], vec![0.5; 6])).unwrap();
    let packed = dir.join("checked.fold");
    let result = compress_patterns(&packed).arg("--self-test-input").arg(&input).output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));

    // The record is 20 bytes of header, the input (4 bytes of type and rank, extents [1, 6], a
    // byte length and 24 bytes), then the expected output, whose extents [1, 4] start at byte 64.
    let map = MappedFile::open(&packed).unwrap();
    let model = Model::open(map.bytes()).unwrap();
    let mut record = model.metadata(SELF_TEST_KEY).expect("a self-test record").to_vec();
    assert_eq!(record[64..72], [1, 0, 0, 0, 4, 0, 0, 0], "unexpected record layout");
    record[64..72].copy_from_slice(&[2, 0, 0, 0, 2, 0, 0, 0]);
    let broken = with_metadata(map.bytes(), SELF_TEST_KEY, &record).unwrap();
    let broken_path = dir.join("broken.fold");
    std::fs::write(&broken_path, broken).unwrap();

    let result = edgefold().arg("verify").arg(&broken_path).output().unwrap();
    assert_eq!(result.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&result.stdout).contains("max abs error inf"));

    let result = edgefold().arg("verify").arg(&broken_path).arg("--json").output().unwrap();
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("self-test of"), "{stderr}");
    let report = stdout_json(&result);
    assert_eq!(report["passed"], false);
    assert_eq!(report["max_abs_error"], "inf");
    assert!(report["error"].as_str().unwrap().contains("failed"), "{report}");
    std::fs::remove_dir_all(&dir).ok();
}
