//! The `edgefold` binary, run on files of the wrong kind and on models whose scores are not
//! finite. A subcommand given a packed file of another kind names the subcommand that runs it,
//! and a file that is not ONNX is named as such. `compress` stores the source's sha256 for GGUF
//! and Marian models, and `eval` checks it. `--json` writes infinity and NaN as strings.
//!
//! The models are the test fixtures and a tiny Marian model that the tests write, so no test
//! needs the evaluation data or a fetched model.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::{
    compress_command, edgefold, onnx_fixture, random_f32, scratch_dir, stderr_of, stdout_json,
};
use edgefold_compressor::gguf::GgufFile;
use edgefold_compressor::ir::{Graph, Node, Symbol, Value};
use edgefold_compressor::npy::to_npy_bytes;
use edgefold_compressor::plan::plan_arena;
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::writer::pack;
use edgefold_runtime::format::Dim;
use edgefold_runtime::ops::Op;
use edgefold_runtime::DType;
use sha2::{Digest, Sha256};

/// Asserts that `needle` occurs exactly once in `message`.
fn assert_once(message: &str, needle: &str) {
    let count = message.matches(needle).count();
    assert_eq!(count, 1, "{needle:?} occurs {count} times in {message:?}");
}

/// Runs a command to completion with empty stdin, so that `translate` ends at once.
fn output_without_stdin(command: &mut std::process::Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

/// Returns the sha256 of the file at `path` in lowercase hex.
fn sha256_of(path: &Path) -> String {
    let digest = Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn tiny_llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm/tiny-llama.gguf")
}

/// Compresses `patterns.onnx` (no tokenizer) to `path`.
fn compress_graph(path: &Path) {
    let result = compress_command(onnx_fixture("patterns.onnx"), path).output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
}

/// Compresses the tiny Llama fixture `model` to `path` with a context of 64 positions.
fn compress_language_model(model: &Path, path: &Path) {
    let result = compress_command(model, path).args(["--max-seq", "64"]).output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
}

/// Returns the metadata of a packed file, as `inspect --json` prints it.
fn metadata_of(path: &Path) -> serde_json::Value {
    let result = edgefold().arg("inspect").arg(path).arg("--json").output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    stdout_json(&result)["metadata"].clone()
}

// A tiny Marian translation model, written in Marian's binary layout with f32 weights, and a
// word-level tokenizer.json of the same vocabulary.

/// Vocabulary of the tiny Marian model. No word contains the letters j, q, x or z, so a
/// reference made of them shares no word and no character with any translation.
const MARIAN_WORDS: [&str; 12] =
    ["</s>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "big", "red"];
const MARIAN_DIM: usize = 8;
const MARIAN_HEADS: usize = 2;
const MARIAN_FFN: usize = 16;
/// Marian's type code of f32 tensors.
const MARIAN_F32: u64 = 0x404;
/// Marian's type code of int8 tensors, which carries the configuration text.
const MARIAN_INT8: u64 = 0x101;

/// Returns the name and Marian shape of every weight of a model with one encoder and one decoder
/// layer. Matrices are `[inputs, outputs]`, and biases and layer norm weights `[1, width]`.
fn marian_shapes() -> Vec<(String, Vec<usize>)> {
    let (dim, ffn, vocab) = (MARIAN_DIM, MARIAN_FFN, MARIAN_WORDS.len());
    let mut shapes = vec![
        ("Wemb".to_owned(), vec![vocab, dim]),
        ("decoder_ff_logit_out_b".to_owned(), vec![1, vocab]),
    ];

    let mut add = |name: String, shape: Vec<usize>| shapes.push((name, shape));
    let attention = |add: &mut dyn FnMut(String, Vec<usize>), prefix: &str| {
        for part in ["q", "k", "v", "o"] {
            add(format!("{prefix}_W{part}"), vec![dim, dim]);
            add(format!("{prefix}_b{part}"), vec![1, dim]);
        }
        add(format!("{prefix}_Wo_ln_scale"), vec![1, dim]);
        add(format!("{prefix}_Wo_ln_bias"), vec![1, dim]);
    };
    let feed_forward = |add: &mut dyn FnMut(String, Vec<usize>), prefix: &str| {
        add(format!("{prefix}_W1"), vec![dim, ffn]);
        add(format!("{prefix}_b1"), vec![1, ffn]);
        add(format!("{prefix}_W2"), vec![ffn, dim]);
        add(format!("{prefix}_b2"), vec![1, dim]);
        add(format!("{prefix}_ffn_ln_scale"), vec![1, dim]);
        add(format!("{prefix}_ffn_ln_bias"), vec![1, dim]);
    };

    attention(&mut add, "encoder_l1_self");
    feed_forward(&mut add, "encoder_l1_ffn");

    add("decoder_l1_rnn_W".into(), vec![dim, dim]);
    add("decoder_l1_rnn_Wf".into(), vec![dim, dim]);
    add("decoder_l1_rnn_bf".into(), vec![1, dim]);
    add("decoder_l1_rnn_ffn_ln_scale".into(), vec![1, dim]);
    add("decoder_l1_rnn_ffn_ln_bias".into(), vec![1, dim]);
    attention(&mut add, "decoder_l1_context");
    feed_forward(&mut add, "decoder_l1_ffn");

    shapes
}

/// Returns the configuration that Marian embeds as `special:model.yml`, NUL-terminated.
fn marian_config() -> Vec<u8> {
    let yaml = format!(
        "type: transformer\ntransformer-decoder-autoreg: rnn\ndec-cell: ssru\n\
         transformer-ffn-activation: relu\ntransformer-ffn-depth: 2\n\
         transformer-postprocess: dan\ntransformer-preprocess: \"\"\n\
         transformer-postprocess-emb: d\ntied-embeddings-all: true\n\
         enc-depth: 1\ndec-depth: 1\ndim-emb: {MARIAN_DIM}\ntransformer-heads: {MARIAN_HEADS}\n\
         transformer-dim-ffn: {MARIAN_FFN}\n\0"
    );
    yaml.into_bytes()
}

/// Serializes tensors (name, type code, shape, data) as a Marian `.bin` file: the version and
/// count, each header, the names, the shapes, then the data from a multiple of 256 bytes.
fn marian_file_bytes(tensors: &[(String, u64, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let word =
        |out: &mut Vec<u8>, value: usize| out.extend_from_slice(&(value as u64).to_le_bytes());
    let mut out = Vec::new();
    word(&mut out, 1);
    word(&mut out, tensors.len());
    for (name, type_code, shape, data) in tensors {
        word(&mut out, name.len() + 1);
        out.extend_from_slice(&type_code.to_le_bytes());
        word(&mut out, shape.len());
        word(&mut out, data.len());
    }
    for (name, ..) in tensors {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
    }
    for (_, _, shape, _) in tensors {
        for &extent in shape {
            out.extend_from_slice(&(extent as i32).to_le_bytes());
        }
    }
    let padding = (256 - (out.len() + 8) % 256) % 256;
    word(&mut out, padding);
    out.resize(out.len() + padding, 0);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    out
}

/// Writes a tiny Marian model with weights drawn from `seed` (`model.bin`) and its
/// `tokenizer.json` into a new directory `dir/folder`, and returns that directory.
fn write_tiny_marian(dir: &Path, folder: &str, seed: u64) -> PathBuf {
    let model_dir = dir.join(folder);
    std::fs::create_dir_all(&model_dir).unwrap();
    let mut tensors = Vec::new();
    for (index, (name, shape)) in marian_shapes().into_iter().enumerate() {
        let values = random_f32(shape.iter().product(), seed * 1000 + index as u64);
        let data = values.iter().flat_map(|v| (v * 0.5).to_le_bytes()).collect();
        tensors.push((name, MARIAN_F32, shape, data));
    }
    let config = marian_config();
    tensors.push(("special:model.yml".into(), MARIAN_INT8, vec![config.len()], config));
    std::fs::write(model_dir.join("model.bin"), marian_file_bytes(&tensors)).unwrap();

    let vocab: serde_json::Map<String, serde_json::Value> =
        MARIAN_WORDS.iter().enumerate().map(|(id, word)| ((*word).into(), id.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": { "type": "Whitespace" },
        "post_processor": null,
        "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "<unk>" },
    });
    std::fs::write(model_dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    model_dir
}

/// Compresses the Marian model directory `model` into `dir/packed/translator.fold`, which gets the
/// tokenizer beside it, and returns that path.
fn packed_translator(model: &Path, dir: &Path) -> PathBuf {
    let output = dir.join("packed").join("translator.fold");
    std::fs::create_dir_all(output.parent().unwrap()).unwrap();
    let result = compress_command(model, &output).output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    output
}

/// Writes `count` lines of source sentences in the tiny model's vocabulary to `path`.
fn write_sources(path: &Path, count: usize) {
    let lines: Vec<&str> = ["the cat sat on the mat", "a big dog ran", "the red cat"]
        .into_iter()
        .cycle()
        .take(count)
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Returns `edgefold eval ORIGINAL FILE --task bleu --json` on `sources` and `references`.
fn eval_bleu(original: &Path, file: &Path, sources: &Path, references: &Path) -> Output {
    edgefold()
        .arg("eval")
        .arg(original)
        .arg(file)
        .args(["--task", "bleu", "--json", "--data"])
        .arg(sources)
        .arg("--reference")
        .arg(references)
        .output()
        .unwrap()
}

#[test]
fn generate_names_other_kinds() {
    let dir = scratch_dir("generate-kinds");
    let graph = dir.join("graph.fold");
    compress_graph(&graph);
    let marian = write_tiny_marian(&dir, "marian", 1);
    let encoder = dir.join("encoder.fold");
    let result = compress_command(onnx_fixture("patterns.onnx"), &encoder)
        .arg("--tokenizer")
        .arg(marian.join("tokenizer.json"))
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    let translator = packed_translator(&marian, &dir);

    let cases = [
        (&graph, "a graph", "edgefold run"),
        (&encoder, "a sentence encoder (a graph with a tokenizer)", "edgefold embed"),
        (&translator, "a translation model", "edgefold translate"),
    ];
    for (file, noun, subcommand) in cases {
        let result = edgefold()
            .arg("generate")
            .arg(file)
            .args(["--prompt", "the cat", "--json"])
            .output()
            .unwrap();
        let stderr = stderr_of(&result);
        let expected = format!(
            "{} contains {noun}, not a language model; run it with `{subcommand}`",
            file.display()
        );
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&expected), "{stderr}");
        let error = stdout_json(&result)["error"].as_str().unwrap().to_owned();
        assert!(error.contains(&expected), "{error}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn translate_names_other_kinds() {
    let dir = scratch_dir("translate-kinds");
    let graph = dir.join("graph.fold");
    compress_graph(&graph);
    // A directory that contains only a packed language model, without a tokenizer.json.
    let lm_dir = dir.join("lm");
    std::fs::create_dir_all(&lm_dir).unwrap();
    let lm = lm_dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &lm);

    let cases = [
        (&graph, &graph, "a graph", "edgefold run"),
        (&lm, &lm, "a language model", "edgefold generate"),
        (&lm_dir, &lm, "a language model", "edgefold generate"),
    ];
    for (argument, file, noun, subcommand) in cases {
        let result = output_without_stdin(edgefold().arg("translate").arg(argument));
        let stderr = stderr_of(&result);
        let expected = format!(
            "{} contains {noun}, not a translation model; run it with `{subcommand}`",
            file.display()
        );
        assert_eq!(result.status.code(), Some(1), "{}: {stderr}", argument.display());
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(!stderr.contains("tokenizer.json"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn embed_names_other_kinds() {
    let dir = scratch_dir("embed-kinds");
    let lm = dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &lm);
    let marian = write_tiny_marian(&dir, "marian", 1);
    let translator = packed_translator(&marian, &dir);

    let cases = [
        (&lm, "a language model", "edgefold generate"),
        (&translator, "a translation model", "edgefold translate"),
    ];
    for (file, noun, subcommand) in cases {
        // Given a tokenizer, the embedder would otherwise fail on the model's inputs.
        let result = edgefold()
            .arg("embed")
            .arg(file)
            .arg("the cat")
            .arg("--tokenizer")
            .arg(marian.join("tokenizer.json"))
            .output()
            .unwrap();
        let stderr = stderr_of(&result);
        let expected = format!(
            "{} contains {noun}, not a sentence encoder; run it with `{subcommand}`",
            file.display()
        );
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&expected), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_names_other_kinds() {
    let dir = scratch_dir("run-kinds");
    let lm = dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &lm);
    let marian = write_tiny_marian(&dir, "marian", 1);
    let translator = packed_translator(&marian, &dir);

    let cases = [
        (&lm, "a language model", "edgefold generate"),
        (&translator, "a translation model", "edgefold translate"),
    ];
    for (file, noun, subcommand) in cases {
        // The kind is checked before the inputs are read.
        let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/npy/f4_2x3.npy");
        let result = edgefold().arg("run").arg(file).arg("--input").arg(input).output().unwrap();
        let stderr = stderr_of(&result);
        let expected =
            format!("{} contains {noun}, not a graph; run it with `{subcommand}`", file.display());
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&expected), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn text_file_as_onnx_is_named() {
    let dir = scratch_dir("text-as-onnx");
    let text = dir.join("notes.onnx");
    std::fs::write(&text, "hello world\nthis is text, not a model\n").unwrap();
    let empty = dir.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();

    for (file, reason, cause) in [
        (&text, "it does not decode as a protobuf ModelProto", Some("failed to decode Protobuf")),
        (&empty, "the file is empty", None),
    ] {
        let compress = compress_command(file, dir.join("out.fold")).output().unwrap();
        let analyze = edgefold().arg("analyze").arg(file).output().unwrap();
        let bench = edgefold().arg("bench").arg(file).args(["--engine", "tract"]).output().unwrap();
        for (what, result) in [("compress", compress), ("analyze", analyze), ("bench", bench)] {
            let stderr = stderr_of(&result);
            let expected = format!("{} is not an ONNX model: {reason}", file.display());
            assert_eq!(result.status.code(), Some(1), "{what}: {stderr}");
            assert!(stderr.contains(&expected), "{what}: {stderr}");
            // The decoder's own message follows as the cause, once.
            if let Some(cause) = cause {
                assert_once(&stderr, cause);
            }
        }
    }
    assert!(!dir.join("out.fold").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gguf_compress_stores_source_sha256() {
    let dir = scratch_dir("gguf-source");
    let lm = dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &lm);
    let metadata = metadata_of(&lm);
    assert_eq!(metadata["source.sha256"], sha256_of(&tiny_llama()));
    assert_eq!(metadata["source.name"], "tiny-llama.gguf");
    let bytes = std::fs::metadata(tiny_llama()).unwrap().len();
    assert_eq!(metadata["source.bytes"], bytes.to_string());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn marian_compress_stores_source_sha256() {
    let dir = scratch_dir("marian-source");
    let marian = write_tiny_marian(&dir, "marian", 1);
    let translator = packed_translator(&marian, &dir);
    let metadata = metadata_of(&translator);
    assert_eq!(metadata["source.sha256"], sha256_of(&marian.join("model.bin")));
    assert_eq!(metadata["source.name"], "model.bin");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_ppl_reports_source_matches() {
    let dir = scratch_dir("ppl-source");
    let lm = dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &lm);
    let text = dir.join("text.txt");
    std::fs::write(&text, "the tether then the other thing. ".repeat(20)).unwrap();
    // The same model with four bytes appended: it loads, but its sha256 differs.
    let other = dir.join("other.gguf");
    let mut bytes = std::fs::read(tiny_llama()).unwrap();
    bytes.extend_from_slice(&[0; 4]);
    std::fs::write(&other, bytes).unwrap();

    let eval = |original: &Path| {
        edgefold()
            .arg("eval")
            .arg(original)
            .arg(&lm)
            .args(["--task", "ppl", "--window", "32", "--limit", "96", "--json", "--data"])
            .arg(&text)
            .output()
            .unwrap()
    };
    let result = eval(&tiny_llama());
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(!stderr.contains("was not compressed from"), "{stderr}");
    let report = stdout_json(&result);
    assert_eq!(report["source_matches"], true, "{report}");

    let result = eval(&other);
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("lm.fold was not compressed from"), "{stderr}");
    assert!(stderr.contains("other.gguf"), "{stderr}");
    let report = stdout_json(&result);
    assert_eq!(report["source_matches"], false, "{report}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_bleu_reports_source_matches() {
    let dir = scratch_dir("bleu-source");
    let marian = write_tiny_marian(&dir, "marian", 1);
    let other = write_tiny_marian(&dir, "other", 2);
    let translator = packed_translator(&marian, &dir);
    let (sources, references) = (dir.join("sources.txt"), dir.join("references.txt"));
    write_sources(&sources, 3);
    write_sources(&references, 3);

    // The packed model is given as its directory, as translate takes it.
    let result = eval_bleu(&marian, translator.parent().unwrap(), &sources, &references);
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(!stderr.contains("was not compressed from"), "{stderr}");
    let report = stdout_json(&result);
    assert_eq!(report["source_matches"], true, "{report}");

    let result = eval_bleu(&other, &translator, &sources, &references);
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("translator.fold was not compressed from"), "{stderr}");
    let other_model = other.join("model.bin").display().to_string();
    assert!(stderr.contains(&other_model), "{stderr}");
    let report = stdout_json(&result);
    assert_eq!(report["source_matches"], false, "{report}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_bleu_json_nan_ratio() {
    let dir = scratch_dir("bleu-nan");
    let marian = write_tiny_marian(&dir, "marian", 1);
    let translator = packed_translator(&marian, &dir);
    let (sources, references) = (dir.join("sources.txt"), dir.join("references.txt"));
    write_sources(&sources, 2);
    // No translation shares a word or a character with these, so both models score 0.
    std::fs::write(&references, "jjj qqq xxx zzz\nzzz xxx qqq jjj\n").unwrap();

    let result = eval_bleu(&marian, &translator, &sources, &references);
    assert!(result.status.success(), "{}", stderr_of(&result));
    let report = stdout_json(&result);
    assert_eq!(report["results"][0]["bleu"], 0.0, "{report}");
    assert_eq!(report["bleu_ratio"], "nan", "{report}");
    assert_eq!(report["chrf_ratio"], "nan", "{report}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_ppl_json_nan_perplexity() {
    let dir = scratch_dir("ppl-nan");
    // The fixture with NaN final norm weights: every logit, and so the perplexity, is NaN.
    let model = dir.join("nan-norm.gguf");
    let mut bytes = std::fs::read(tiny_llama()).unwrap();
    let file = GgufFile::open(&tiny_llama()).unwrap();
    let norm = file.tensor("output_norm.weight").unwrap();
    for value in bytes[norm.start..norm.start + norm.len].chunks_exact_mut(4) {
        value.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&model, bytes).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(&text, "the tether then the other thing. ".repeat(20)).unwrap();

    let result = edgefold()
        .arg("eval")
        .arg(&model)
        .arg(&model)
        .args(["--task", "ppl", "--window", "32", "--limit", "64", "--json", "--data"])
        .arg(&text)
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    let report = stdout_json(&result);
    assert_eq!(report["results"][0]["perplexity"], "nan", "{report}");
    assert_eq!(report["results"][0]["mean_nll"], "nan", "{report}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Packs a text encoder in form only: `input_ids` [1, sequence] copied to the output.
fn write_token_copy_model(path: &Path) {
    let mut graph = Graph::default();
    graph.symbols.push(Symbol { name: "sequence".into(), max: 16 });
    let shape = vec![Dim::constant(1), Dim::symbol(0)];
    let mut add = |name: &str| {
        let value =
            Value { name: name.into(), dtype: DType::I64, shape: shape.clone(), data: None };
        graph.add_value(value)
    };
    let (ids, copy) = (add("input_ids"), add("copy"));
    graph.nodes.push(Node {
        name: "copy".into(),
        op: Op::Reshape,
        inputs: vec![Some(ids)],
        outputs: vec![copy],
    });
    graph.inputs = vec![ids];
    graph.outputs = vec![copy];
    let plan = plan_arena(&graph);
    std::fs::write(path, pack(&graph, &plan, &[]).expect("the test graph packs")).unwrap();
}

#[test]
fn bench_rejects_zero_runs() {
    let dir = scratch_dir("bench-runs");
    let model = dir.join("copy.fold");
    write_token_copy_model(&model);
    // With no timed runs there is no median latency to report.
    let result = edgefold()
        .arg("bench")
        .arg(&model)
        .args(["--seq", "4", "--runs", "0", "--json"])
        .output()
        .unwrap();
    assert_eq!(result.status.code(), Some(2), "{}", stderr_of(&result));
    let error = stdout_json(&result)["error"].as_str().unwrap().to_owned();
    assert!(error.contains("invalid value '0' for '--runs"), "{error}");

    let result = edgefold()
        .arg("bench")
        .arg(&model)
        .args(["--seq", "4", "--runs", "1", "--json"])
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    let report = stdout_json(&result);
    assert!(report["latency_ms_median"].is_f64(), "{report}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_names_other_kinds() {
    let dir = scratch_dir("bench-kinds");
    let language_model = dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &language_model);
    let marian = write_tiny_marian(&dir, "marian", 1);
    let translator = packed_translator(&marian, &dir);

    let cases = [
        (&language_model, "a language model", "edgefold generate"),
        (&translator, "a translation model", "edgefold translate"),
    ];
    for (file, noun, subcommand) in cases {
        let result =
            edgefold().arg("bench").arg(file).args(["--seq", "4", "--runs", "1"]).output().unwrap();
        let stderr = stderr_of(&result);
        let expected = format!(
            "{} contains {noun}, not a text encoder graph; run it with `{subcommand}`",
            file.display()
        );
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(result.stdout.is_empty(), "{}", String::from_utf8_lossy(&result.stdout));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_tract_large_seq_is_an_error() {
    let Some(model) = common::minilm_l3_model() else { return };
    // 10^8 tokens need attention scores of far more memory than any test machine has, so tract
    // fails to allocate them and panics.
    let result = edgefold()
        .arg("bench")
        .arg(&model)
        .args(["--engine", "tract", "--seq", "100000000", "--runs", "1", "--json"])
        .output()
        .unwrap();
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--seq 100000000"), "{stderr}");
    assert!(stderr.contains("pass a shorter --seq"), "{stderr}");
    assert!(!stderr.contains("panicked at"), "{stderr}");
    let error = stdout_json(&result)["error"].as_str().unwrap().to_owned();
    assert!(error.contains(&model.display().to_string()), "{error}");
}

#[test]
fn compress_json_nan_quality() {
    let dir = scratch_dir("compress-nan");
    // Labels outside the model's 4 classes: the original's accuracy is 0, so every candidate's
    // quality (its accuracy over the original's) is NaN.
    let calibration = dir.join("calibration.npz");
    let samples = 20;
    let values = random_f32(samples * 6, 3);
    let inputs = HostTensor::f32(vec![samples, 6], values);
    let labels = HostTensor::i64(vec![samples], vec![9; samples]);
    let mut archive = zip::ZipWriter::new(std::fs::File::create(&calibration).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, tensor) in [("inputs.npy", &inputs), ("labels.npy", &labels)] {
        archive.start_file(name, options).unwrap();
        archive.write_all(&to_npy_bytes(tensor)).unwrap();
    }
    archive.finish().unwrap();

    let result = compress_command(onnx_fixture("patterns.onnx"), dir.join("out.fold"))
        .args(["--target-size", "5000", "--task", "accuracy", "--json", "--calibration"])
        .arg(&calibration)
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    let report = stdout_json(&result);
    assert_eq!(report["quality"], "nan", "{report}");
    assert_eq!(report["baseline_metric"], 0.0, "{report}");
    let candidates = report["candidates"].as_array().unwrap();
    assert!(!candidates.is_empty(), "{report}");
    assert!(candidates.iter().all(|c| c["quality"] == "nan"), "{report}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gguf_cache_too_large_is_an_error() {
    let dir = scratch_dir("gguf-cache");
    let text = dir.join("text.txt");
    std::fs::write(&text, "the cat sat on the mat. ".repeat(20)).unwrap();
    // 10^12 positions need hundreds of terabytes, which no allocator grants.
    let positions = "1000000000000";
    let generate = edgefold()
        .arg("generate")
        .arg(tiny_llama())
        .args(["--prompt", "hi", "--max-tokens", "2", "--json", "--max-seq", positions])
        .output()
        .unwrap();
    let eval = edgefold()
        .arg("eval")
        .arg(tiny_llama())
        .arg(tiny_llama())
        .args(["--task", "ppl", "--window", positions, "--data"])
        .arg(&text)
        .output()
        .unwrap();

    for (result, option) in [(&generate, "--max-seq"), (&eval, "--window")] {
        let stderr = stderr_of(result);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&tiny_llama().display().to_string()), "{stderr}");
        assert!(stderr.contains("key-value cache of 1000000000000 positions"), "{stderr}");
        assert!(stderr.contains(&format!("lower {option}")), "{stderr}");
    }
    let error = stdout_json(&generate)["error"].as_str().unwrap().to_owned();
    assert!(error.contains("failed to allocate"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes an .npz file with `inputs.npy` and, when given, `labels.npy`.
fn write_npz(path: &Path, inputs: &HostTensor, labels: Option<&HostTensor>) {
    let mut archive = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let arrays = [("inputs.npy", Some(inputs)), ("labels.npy", labels)];
    for (name, tensor) in arrays {
        let Some(tensor) = tensor else { continue };
        archive.start_file(name, options).unwrap();
        archive.write_all(&to_npy_bytes(tensor)).unwrap();
    }
    archive.finish().unwrap();
}

/// Runs `edgefold eval` on `patterns.onnx` and `file` with `--task task` and `args` after it.
fn eval_patterns(file: &Path, task: &str, args: &[&str]) -> Output {
    edgefold()
        .arg("eval")
        .arg(onnx_fixture("patterns.onnx"))
        .arg(file)
        .args(["--task", task])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn eval_raw_nan_outputs() {
    let dir = scratch_dir("eval-raw-nan");
    let graph = dir.join("graph.fold");
    compress_graph(&graph);
    // The first sample gives finite outputs and the second NaN ones, so a minimum or maximum
    // that skips NaN would report the first sample's values.
    let mut values = random_f32(12, 5);
    values[6..].fill(f32::NAN);
    let data = dir.join("nan.npz");
    write_npz(&data, &HostTensor::f32(vec![2, 6], values), None);
    let data = data.to_str().unwrap();

    let text = eval_patterns(&graph, "raw", &["--data", data]);
    assert!(text.status.success(), "{}", stderr_of(&text));
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("cosine mean NaN, min NaN, largest difference NaN"), "{stdout}");

    let json = eval_patterns(&graph, "raw", &["--json", "--data", data]);
    assert!(json.status.success(), "{}", stderr_of(&json));
    let report = stdout_json(&json);
    assert_eq!(report["output_cosine_mean"], "nan", "{report}");
    assert_eq!(report["output_cosine_min"], "nan", "{report}");
    assert_eq!(report["output_max_abs_diff"], "nan", "{report}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_accuracy_rejects_labels_out_of_range() {
    let dir = scratch_dir("eval-labels");
    let graph = dir.join("graph.fold");
    compress_graph(&graph);
    let inputs = HostTensor::f32(vec![2, 6], random_f32(12, 6));
    // patterns.onnx has 4 classes, so labels run from 0 to 3.
    for bad in [99, -1] {
        let data = dir.join(format!("labels{bad}.npz"));
        write_npz(&data, &inputs, Some(&HostTensor::i64(vec![2], vec![1, bad])));
        let result = eval_patterns(&graph, "accuracy", &["--data", data.to_str().unwrap()]);
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&data.display().to_string()), "{stderr}");
        assert!(stderr.contains(&format!("label {bad} for sample 1")), "{stderr}");
        assert!(stderr.contains("class range 0 to 3"), "{stderr}");
    }

    let data = dir.join("labels-valid.npz");
    write_npz(&data, &inputs, Some(&HostTensor::i64(vec![2], vec![0, 3])));
    let result = eval_patterns(&graph, "accuracy", &["--data", data.to_str().unwrap()]);
    assert!(result.status.success(), "{}", stderr_of(&result));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_names_other_kinds_first() {
    let dir = scratch_dir("eval-kinds");
    let language_model = dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &language_model);
    let data = dir.join("inputs.npz");
    write_npz(&data, &HostTensor::f32(vec![1, 6], random_f32(6, 7)), None);
    let sts = dir.join("sts.csv");
    std::fs::write(&sts, "a\tb\tc\td\t4.0\tthe cat\tthe dog\na\tb\tc\td\t1.0\tred\tblue\n")
        .unwrap();
    let marian = write_tiny_marian(&dir, "marian", 1);
    let sources = dir.join("sources.txt");
    write_sources(&sources, 2);

    let cases = [
        (eval_patterns(&language_model, "raw", &["--data", data.to_str().unwrap()]), "a graph"),
        (
            eval_patterns(&language_model, "sts", &["--data", sts.to_str().unwrap()]),
            "a sentence encoder",
        ),
        (eval_bleu(&marian, &language_model, &sources, &sources), "a translation model"),
    ];
    for (result, expected) in cases {
        let stderr = stderr_of(&result);
        let message = format!(
            "{} contains a language model, not {expected}; run it with `edgefold generate`",
            language_model.display()
        );
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&message), "{stderr}");
        // The file is rejected before its source sha256 is compared.
        assert!(!stderr.contains("was not compressed from"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_messages_name_file_once() {
    let dir = scratch_dir("eval-messages");
    let graph = dir.join("graph.fold");
    compress_graph(&graph);
    let data = dir.join("inputs.npz");
    write_npz(&data, &HostTensor::f32(vec![1, 6], random_f32(6, 8)), None);

    // The packed file given where the ONNX original belongs.
    let result = edgefold()
        .arg("eval")
        .arg(&graph)
        .arg(&graph)
        .args(["--task", "raw", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert_once(&stderr, &graph.display().to_string());
    assert!(stderr.contains("give the ONNX model first"), "{stderr}");
    assert!(!stderr.contains("--engine"), "{stderr}");

    let sts = dir.join("sts.csv");
    std::fs::write(&sts, "a\tb\tc\td\t4.0\tthe cat\tthe dog\na\tb\tc\td\t1.0\tred\tblue\n")
        .unwrap();
    let result = eval_patterns(&graph, "sts", &["--limit", "1", "--data", sts.to_str().unwrap()]);
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--limit 1 leaves fewer than 2 pairs"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_tract_packed_file_hint() {
    let dir = scratch_dir("bench-tract-packed");
    let graph = dir.join("graph.fold");
    compress_graph(&graph);
    let result = edgefold().arg("bench").arg(&graph).args(["--engine", "tract"]).output().unwrap();
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert_once(&stderr, &graph.display().to_string());
    assert!(stderr.contains("bench it with --engine edgefold"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn translate_names_gguf_and_onnx() {
    let cases = [
        (tiny_llama(), "is a GGUF language model, not a translation model"),
        (onnx_fixture("patterns.onnx"), "is an ONNX graph, not a translation model"),
    ];
    for (model, expected) in cases {
        let result = output_without_stdin(edgefold().arg("translate").arg(&model));
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("{} {expected}", model.display())), "{stderr}");
        assert!(!stderr.contains("tokenizer.json"), "{stderr}");
    }
}

#[test]
fn inspect_prints_kind_and_sha256() {
    let dir = scratch_dir("inspect-kind");
    let graph = dir.join("graph.fold");
    compress_graph(&graph);
    let language_model = dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &language_model);

    let cases = [
        (&graph, "a graph, run with `edgefold run`", "graph"),
        (&language_model, "a language model, run with `edgefold generate`", "language_model"),
    ];
    for (file, noun, id) in cases {
        let text = edgefold().arg("inspect").arg(file).output().unwrap();
        assert!(text.status.success(), "{}", stderr_of(&text));
        let stdout = String::from_utf8_lossy(&text.stdout);
        assert!(stdout.contains(&format!("  kind: {noun}\n")), "{stdout}");
        let sha256 = metadata_of(file)["source.sha256"].as_str().unwrap().to_owned();
        assert!(stdout.contains(&format!("  source.sha256: {sha256}\n")), "{stdout}");

        let json = edgefold().arg("inspect").arg(file).arg("--json").output().unwrap();
        assert_eq!(stdout_json(&json)["kind"], id);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn verify_language_model_names_eval() {
    let dir = scratch_dir("verify-kinds");
    let language_model = dir.join("lm.fold");
    compress_language_model(&tiny_llama(), &language_model);
    let marian = write_tiny_marian(&dir, "marian", 1);
    let translator = packed_translator(&marian, &dir);

    let cases = [
        (&language_model, "a language model", "ppl"),
        (&translator, "a translation model", "bleu"),
    ];
    for (file, noun, task) in cases {
        let result = edgefold().arg("verify").arg(file).output().unwrap();
        let stderr = stderr_of(&result);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("contains {noun}")), "{stderr}");
        assert!(stderr.contains("self-tests exist for graphs compressed from ONNX"), "{stderr}");
        assert!(stderr.contains(&format!("`edgefold eval --task {task}`")), "{stderr}");
        assert!(!stderr.contains("--self-test"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn messages_count_in_singular() {
    let dir = scratch_dir("singular");
    let model = dir.join("copy.fold");
    write_token_copy_model(&model);
    let result =
        edgefold().arg("bench").arg(&model).args(["--seq", "4", "--runs", "1"]).output().unwrap();
    assert!(result.status.success(), "{}", stderr_of(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("over 1 run\n"), "{stdout}");

    let inputs = ["--input", "a.npy", "--input", "b.npy"];
    let result = edgefold().arg("run").arg(&model).args(inputs).output().unwrap();
    let stderr = stderr_of(&result);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("has 1 input; pass one --input file per input (2 given)"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gguf_large_arena_warning_names_max_seq() {
    let dir = scratch_dir("gguf-arena");
    let packed = dir.join("lm.fold");
    // 5 million positions plan an arena of about 3 GiB, above the 1 GiB warning threshold.
    let result = compress_command(tiny_llama(), &packed).args(["--max-seq", "5000000"]).output();
    let result = result.unwrap();
    let stderr = stderr_of(&result);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("plans an arena of"), "{stderr}");
    assert!(stderr.contains("`generate`, `eval --task ppl`"), "{stderr}");
    assert!(stderr.contains("a smaller --max-seq"), "{stderr}");
    assert!(!stderr.contains("--max-batch"), "{stderr}");
    assert!(!stderr.contains("`bench`"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Returns the messages of `error` and of its chain of causes, joined as anyhow's `{:#}` does.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut messages = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(next) = cause {
        messages.push(next.to_string());
        cause = next.source();
    }
    messages.join(": ")
}

#[test]
fn gguf_io_error_printed_once() {
    let dir = scratch_dir("gguf-io");
    let missing = dir.join("missing.bin");
    let chain = error_chain(&GgufFile::open(&missing).unwrap_err());
    assert_eq!(chain.matches("os error").count(), 1, "{chain}");
    let chain = error_chain(&edgefold_compressor::marian::MarianFile::open(&missing).unwrap_err());
    assert_eq!(chain.matches("os error").count(), 1, "{chain}");
    std::fs::remove_dir_all(&dir).ok();
}
