//! The output side of `edgefold compress`, run as the built binary. An output path that names an
//! input file is rejected. A too-large arena gives a warning at compress time and an error, not
//! an abort, at load time. An interrupted write leaves no temporary file.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    compress_command, edgefold, minilm_l3_model, onnx_fixture, repo_root, scratch_dir, stderr_of,
};
use edgefold_compressor::testdata::skip;

/// A batch size whose arena (terabytes for `dynamic_shapes.onnx` and for MiniLM) is far more
/// memory than test machines have.
const HUGE_MAX_BATCH: &str = "4000000000";

/// The maximum sequence length of `dynamic_shapes.onnx`, whose table of positions has 16 rows.
const FIXTURE_MAX_SEQ: &str = "16";

/// Returns whether an allocation larger than the machine's memory fails, as it does unless the
/// kernel overcommits every allocation (`vm.overcommit_memory = 1`).
fn huge_allocations_fail() -> bool {
    let mode = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
    if mode.trim() == "1" {
        eprintln!("skipping: vm.overcommit_memory is 1, so a huge arena would be allocated");
        return false;
    }
    true
}

#[test]
fn compress_rejects_output_that_is_input() {
    let dir = scratch_dir("output-is-input");
    let model = dir.join("same.onnx");
    std::fs::copy(onnx_fixture("dynamic_shapes.onnx"), &model).unwrap();
    let original = std::fs::read(&model).unwrap();
    let link = dir.join("link.onnx");
    std::fs::hard_link(&model, &link).unwrap();
    let tokenizer = dir.join("tokenizer.json");
    std::fs::write(&tokenizer, b"{}").unwrap();

    // The output as given, through another spelling, as a hard link, and as the tokenizer that
    // is read from beside the model.
    let relative = dir.join("..").join(dir.file_name().unwrap()).join("same.onnx");
    for output in [&model, &relative, &link, &tokenizer] {
        let result =
            compress_command(&model, output).args(["--max-seq", FIXTURE_MAX_SEQ]).output().unwrap();
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "-o {}: {stderr}", output.display());
        assert!(stderr.contains(&output.display().to_string()), "{stderr}");
        assert!(stderr.contains("choose another output path"), "{stderr}");
    }
    assert_eq!(std::fs::read(&model).unwrap(), original, "the input model was changed");
    assert_eq!(std::fs::read(&tokenizer).unwrap(), b"{}", "the tokenizer was changed");

    // An output that exists but is no input is replaced as before.
    let other = dir.join("other.fold");
    std::fs::write(&other, b"old").unwrap();
    let result =
        compress_command(&model, &other).args(["--max-seq", FIXTURE_MAX_SEQ]).output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    assert_ne!(std::fs::read(&other).unwrap(), b"old");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn huge_arena_warns_then_fails_cleanly() {
    if !huge_allocations_fail() {
        return;
    }
    let dir = scratch_dir("huge-arena");
    let packed = dir.join("huge.fold");
    let result = compress_command(onnx_fixture("dynamic_shapes.onnx"), &packed)
        .args(["--max-seq", FIXTURE_MAX_SEQ, "--max-batch", HUGE_MAX_BATCH])
        .output()
        .unwrap();
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("plans an arena of"), "{stderr}");
    assert!(stderr.contains("MiB"), "{stderr}");
    assert!(stderr.contains("a smaller --max-seq or --max-batch"), "{stderr}");

    let input = dir.join("x.npy");
    let npy_fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/npy/f4_2x3.npy");
    std::fs::copy(npy_fixture, &input).unwrap();
    let commands: [&[&str]; 3] = [&["run", "--input", "x.npy"], &["bench"], &["verify"]];
    for args in commands {
        let result = edgefold()
            .current_dir(&dir)
            .arg(args[0])
            .arg("huge.fold")
            .args(&args[1..])
            .output()
            .unwrap();
        assert_clean_arena_error(&result, args[0], "huge.fold");
    }

    // Embedding a self-test runs the model, so it needs the arena at compress time.
    let with_test = dir.join("huge-self-test.fold");
    let result = compress_command(onnx_fixture("dynamic_shapes.onnx"), &with_test)
        .args(["--max-seq", FIXTURE_MAX_SEQ, "--max-batch", HUGE_MAX_BATCH, "--self-test"])
        .output()
        .unwrap();
    assert_clean_arena_error(&result, "compress --self-test", &with_test.display().to_string());
    assert!(!with_test.exists(), "a file was written without its self-test");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn huge_arena_embed_fails_cleanly() {
    if !huge_allocations_fail() {
        return;
    }
    let Some(model) = minilm_l3_model() else { return };
    let dir = scratch_dir("huge-arena-embed");
    let packed = dir.join("huge.fold");
    let result =
        compress_command(&model, &packed).args(["--max-batch", HUGE_MAX_BATCH]).output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    let result = edgefold().arg("embed").arg(&packed).arg("hello").output().unwrap();
    assert_clean_arena_error(&result, "embed", &packed.display().to_string());
    std::fs::remove_dir_all(&dir).ok();
}

/// Checks that `command` ended with status 1 and an error that names the file, the arena size
/// and the fix, instead of aborting on the failed allocation.
fn assert_clean_arena_error(result: &Output, command: &str, file: &str) {
    let stderr = stderr_of(result);
    assert_eq!(result.status.code(), Some(1), "{command}: {stderr}");
    assert!(!stderr.contains("memory allocation of"), "{command}: {stderr}");
    assert!(stderr.contains("cannot allocate the arena of"), "{command}: {stderr}");
    assert!(stderr.contains("MiB"), "{command}: {stderr}");
    assert!(stderr.contains(file), "{command}: {stderr}");
    assert!(stderr.contains("smaller --max-seq or --max-batch"), "{command}: {stderr}");
}

/// Returns the names of the hidden temporary files in `dir`.
fn temporary_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.') && name.contains(".tmp"))
        .collect()
}

#[cfg(unix)]
#[test]
fn interrupted_write_leaves_no_temporary_file() {
    // The larger the model, the longer the write lasts and the surer the signal lands in it.
    let candidates = [
        repo_root().join("../shared/data/models/all-MiniLM-L6-v2-fp32.onnx"),
        repo_root().join("models/paraphrase-MiniLM-L3-v2/model.onnx"),
    ];
    let Some(model) = candidates.iter().find(|p| p.exists()) else {
        skip("no ONNX model of tens of MB is present to make the write last");
        return;
    };
    let dir = scratch_dir("interrupt");
    let output = dir.join("out.fold");
    // A signal that arrives after the write finished proves nothing, so the test tries again.
    for _ in 0..5 {
        std::fs::write(&output, b"previous output").unwrap();
        let mut child = compress_command(model, &output)
            .args(["--quantize", "f32"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut signalled = false;
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            if !temporary_files(&dir).is_empty() {
                let sent =
                    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
                assert!(sent.success(), "kill -INT failed");
                signalled = true;
                break;
            }
        }
        let status = child.wait().unwrap();
        if !signalled || status.success() {
            continue;
        }
        let leftovers = temporary_files(&dir);
        assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
        assert_eq!(status.code(), Some(130), "status after SIGINT: {status}");
        let output_bytes = std::fs::read(&output).unwrap();
        assert_eq!(output_bytes, b"previous output", "the existing output was not kept intact");
        std::fs::remove_dir_all(&dir).ok();
        return;
    }
    eprintln!("skipping: the write finished before SIGINT arrived in each of 5 tries");
    std::fs::remove_dir_all(&dir).ok();
}
