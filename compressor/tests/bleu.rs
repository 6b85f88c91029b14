//! BLEU, chrF and the 13a tokenizer against sacreBLEU.
//!
//! The references are the first Portuguese sentences of the Tatoeba English-Portuguese test set
//! from the evaluation data beside the repository. The hypotheses are the same sentences corrupted by a seeded
//! generator: words dropped, swapped, repeated or cut, punctuation changed, empty lines, HTML-like
//! tags, escaped entities and numbers with commas, periods and hyphens. The expected scores come
//! from sacreBLEU, run by python3 on the same files at test time (`pip install sacrebleu`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{python_can_import, scratch_dir, tatoeba_path};
use edgefold_compressor::bleu::{
    corpus_bleu, corpus_chrf, sentence_bleu, tokenize_13a, BleuScore, ChrfScore, ScoreError,
};
use edgefold_compressor::testdata::skip;
use serde_json::Value;

/// Number of Tatoeba sentences used as references.
const SENTENCES: usize = 1000;

/// Maximum relative difference from sacreBLEU's floating-point results.
const RELATIVE_TOLERANCE: f64 = 1e-9;

/// Reads the hypothesis file and the reference files named on the command line, scores them with
/// sacreBLEU's defaults, and prints the scores and their statistics as JSON.
const SACREBLEU_CORPUS_SCRIPT: &str = r#"
import json, sys
import sacrebleu
from sacrebleu.metrics import CHRF
from sacrebleu.utils import sum_of_lists

def read_lines(path):
    with open(path, encoding="utf-8", newline="") as f:
        return f.read().split("\n")

def bleu_json(score):
    return {"score": score.score, "counts": score.counts, "totals": score.totals,
            "precisions": score.precisions, "bp": score.bp,
            "sys_len": score.sys_len, "ref_len": score.ref_len}

hyps = read_lines(sys.argv[1])
refs = [read_lines(path) for path in sys.argv[2:]]
chrf = sacrebleu.corpus_chrf(hyps, refs)
chrf_statistics = sum_of_lists(CHRF()._extract_corpus_statistics(hyps, refs))
sentences = [sacrebleu.sentence_bleu(hyp, [stream[i] for stream in refs])
             for i, hyp in enumerate(hyps)]
print(json.dumps({
    "version": sacrebleu.__version__,
    "bleu": bleu_json(sacrebleu.corpus_bleu(hyps, refs)),
    "chrf": {"score": chrf.score, "statistics": chrf_statistics},
    "sentence_bleu": [bleu_json(score) for score in sentences],
}))
"#;

/// Reads a JSON list of strings from the file named on the command line and prints the list of
/// their sacreBLEU `13a` tokenizations.
const SACREBLEU_TOKENIZE_SCRIPT: &str = r#"
import json, sys
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

with open(sys.argv[1], encoding="utf-8") as f:
    lines = json.load(f)
tokenizer = Tokenizer13a()
print(json.dumps([tokenizer(line) for line in lines]))
"#;

/// Lines that exercise each rule of the 13a tokenizer.
const TRICKY_LINES: &[&str] = &[
    "",
    "   ",
    "Hello, world.",
    "3.14 and 1,000,000 and 2.500,00.",
    "a.,b ,. .5 5. 1., ,1",
    "e.g., U.S.A. ... ,,, etc.",
    "1990-2000, 5-a, a-5, x-y, --, -1",
    "<skipped>removed<skipped> words",
    "joined hy-\nphen and a\nbreak",
    "trailing hyphen-\n",
    "&quot;quoted&quot; &amp;lt; &lt;b&gt;bold&lt;/b&gt; &amp; &apos;",
    "<b>Bold</b> <a href=\"x.html\">link</a>",
    "$5.00! 50% #tag @user a+b=c (x) [y] {z} ~`^_|\\/",
    "O'Neil's rock'n'roll",
    "São Paulo, 2024. Ação: 1.º lugar; não?",
    "tab\tseparated\u{a0}nbsp\u{2009}thin\u{3000}ideographic",
    "file\u{1c}group\u{1d}record\u{1e}unit\u{1f}separators\u{85}next",
    "zero\u{200b}width stays joined",
    "Arabic digits ٣.٤ and fullwidth ３,４",
    "—em dash— «aspas» “curly” ½,¾ ",
    "R$ 12,50 (doze reais e cinquenta centavos).",
    "a.b.c,d,e 1.a a.1 1,a a,1",
];

/// Portuguese words that replace words of a hypothesis.
const REPLACEMENT_WORDS: &[&str] = &["não", "muito", "casa", "Tom", "ele", "é", "ação", "pão"];

/// Numbers, tags and entities inserted into hypotheses to exercise the tokenizer.
const INSERTIONS: &[&str] = &[
    "1,000",
    "3.14",
    "2.500,00",
    "1990-2000",
    "7.5%",
    "R$ 12,50",
    "1.",
    ",5",
    "<b>",
    "</i>",
    "<br/>",
    "&quot;",
    "&amp;",
    "&lt;p&gt;",
    "<skipped>",
    "(sic)",
    "-",
    "...",
];

/// Seeded xorshift generator, so the corrupted hypotheses are the same on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Applies one random edit to the words of a sentence.
fn edit_words(words: &mut Vec<String>, rng: &mut Rng) {
    let len = words.len();
    let at = rng.below(len.max(1));
    match rng.below(10) {
        0 if len > 1 => {
            words.remove(at);
        }
        1 if len > 1 => words.swap(at, (at + 1) % len),
        2 if len > 0 => words.insert(at, words[at].clone()),
        3 if len > 2 => words.truncate(len / 2),
        4 if len > 0 => words[at] = REPLACEMENT_WORDS[rng.below(REPLACEMENT_WORDS.len())].into(),
        5 if len > 0 => words[at] = words[at].to_uppercase(),
        6 if len > 0 => {
            let last = words.last_mut().unwrap();
            let stripped = last.trim_end_matches(['.', '!', '?']).to_owned();
            *last = stripped + [".", "!", "?", " .", ",", "", "...", "-"][rng.below(8)];
        }
        7 if len > 0 => words[at] = format!("<i>{}</i>", words[at]),
        _ => words.insert(at, INSERTIONS[rng.below(INSERTIONS.len())].into()),
    }
}

/// Corrupts a sentence with a few random edits. Some lines stay unchanged, some become empty and
/// some get trailing whitespace.
fn corrupt(line: &str, rng: &mut Rng) -> String {
    match rng.below(20) {
        0 | 1 => return line.to_owned(),
        2 => return String::new(),
        _ => {}
    }
    let mut words: Vec<String> = line.split(' ').map(str::to_owned).collect();
    for _ in 0..1 + rng.below(3) {
        edit_words(&mut words, rng);
    }
    let mut corrupted = words.join(" ");
    if rng.below(10) == 0 {
        corrupted.push_str(" \t");
    }
    corrupted
}

/// Reads the reference sentences, or returns `None` after reporting the skip.
fn reference_lines() -> Option<Vec<String>> {
    let path = tatoeba_path("por");
    if !path.exists() {
        skip(&format!("{} is absent (the evaluation data beside the repository)", path.display()));
        return None;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<String> = text.lines().take(SENTENCES).map(str::to_owned).collect();
    assert_eq!(lines.len(), SENTENCES, "{} has too few lines", path.display());
    Some(lines)
}

/// Returns whether python3 can import sacrebleu, after reporting the skip when it cannot.
fn sacrebleu_available() -> bool {
    let reason = "python3 with sacrebleu is needed for the expected scores (pip install sacrebleu)";
    python_can_import("sacrebleu", reason)
}

/// Runs a Python script with arguments and parses the JSON it prints.
fn run_python(script: &str, args: &[PathBuf]) -> Value {
    let output = Command::new("python3").arg("-c").arg(script).args(args).output().unwrap();
    assert!(output.status.success(), "python3 failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Writes lines separated by `\n`, which no line may contain.
fn write_lines(path: &Path, lines: &[String]) {
    for line in lines {
        assert!(!line.contains('\n'), "line feed in {line:?}");
        assert!(!line.contains('\r'), "carriage return in {line:?}");
    }
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// Scores the files with sacreBLEU and returns its JSON output.
fn sacrebleu_scores(name: &str, hypotheses: &[String], references: &[&Vec<String>]) -> Value {
    let dir = scratch_dir(name);
    let hyp_path = dir.join("hypotheses.txt");
    write_lines(&hyp_path, hypotheses);
    let mut args = vec![hyp_path];
    for (k, stream) in references.iter().enumerate() {
        let path = dir.join(format!("references-{k}.txt"));
        write_lines(&path, stream);
        args.push(path);
    }
    let expected = run_python(SACREBLEU_CORPUS_SCRIPT, &args);
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("sacreBLEU version {}", expected["version"]);
    expected
}

fn relative_difference(actual: f64, expected: f64) -> f64 {
    if actual == expected {
        0.0
    } else {
        (actual - expected).abs() / expected.abs().max(actual.abs())
    }
}

fn assert_close(label: &str, actual: f64, expected: f64) {
    let difference = relative_difference(actual, expected);
    assert!(
        difference <= RELATIVE_TOLERANCE,
        "{label}: edgefold {actual} vs sacreBLEU {expected}, relative difference {difference:e}"
    );
}

fn u64_list(value: &Value) -> Vec<u64> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

fn f64_list(value: &Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

/// Checks every field of a BLEU score against sacreBLEU's, counts exactly.
fn assert_bleu_matches(label: &str, actual: &BleuScore, expected: &Value) {
    assert_eq!(actual.counts.to_vec(), u64_list(&expected["counts"]), "{label}: counts");
    assert_eq!(actual.totals.to_vec(), u64_list(&expected["totals"]), "{label}: totals");
    assert_eq!(actual.sys_len, expected["sys_len"].as_u64().unwrap(), "{label}: sys_len");
    assert_eq!(actual.ref_len, expected["ref_len"].as_u64().unwrap(), "{label}: ref_len");
    assert_close(&format!("{label}: bp"), actual.bp, expected["bp"].as_f64().unwrap());
    let precisions = f64_list(&expected["precisions"]);
    for (n, (&p, &q)) in actual.precisions.iter().zip(&precisions).enumerate() {
        assert_close(&format!("{label}: precision of order {}", n + 1), p, q);
    }
    assert_close(&format!("{label}: score"), actual.score, expected["score"].as_f64().unwrap());
}

/// Checks a chrF score and its per-order statistics against sacreBLEU's.
fn assert_chrf_matches(actual: &ChrfScore, expected: &Value) {
    // sacreBLEU stores (hypothesis, reference, matches) per order in one flat list.
    let flat = u64_list(&expected["statistics"]);
    assert_eq!(flat.len(), 3 * actual.statistics.len(), "chrF statistics length");
    for (n, (order, triple)) in actual.statistics.iter().zip(flat.chunks(3)).enumerate() {
        let label = format!("chrF order {}", n + 1);
        assert_eq!(order.hypothesis, triple[0], "{label}: hypothesis n-grams");
        assert_eq!(order.reference, triple[1], "{label}: reference n-grams");
        assert_eq!(order.matches, triple[2], "{label}: matches");
    }
    assert_close("chrF score", actual.score, expected["score"].as_f64().unwrap());
}

/// Checks corpus BLEU, corpus chrF and every sentence BLEU against sacreBLEU.
fn check_against_sacrebleu(name: &str, hypotheses: &[String], references: &[&Vec<String>]) {
    let expected = sacrebleu_scores(name, hypotheses, references);

    let bleu = corpus_bleu(hypotheses, references).unwrap();
    let expected_bleu = expected["bleu"]["score"].as_f64().unwrap();
    eprintln!(
        "{name}: BLEU {} vs sacreBLEU {expected_bleu}, relative difference {:e}",
        bleu.score,
        relative_difference(bleu.score, expected_bleu)
    );
    // Scores far from 0 and 100 show that the corruption left real differences to count.
    assert!(expected_bleu > 10.0, "BLEU {expected_bleu} is too low to test matching");
    assert!(expected_bleu < 90.0, "BLEU {expected_bleu} is too high to test mismatches");
    assert_bleu_matches("corpus BLEU", &bleu, &expected["bleu"]);

    let chrf = corpus_chrf(hypotheses, references).unwrap();
    let expected_chrf = expected["chrf"]["score"].as_f64().unwrap();
    eprintln!(
        "{name}: chrF {} vs sacreBLEU {expected_chrf}, relative difference {:e}",
        chrf.score,
        relative_difference(chrf.score, expected_chrf)
    );
    assert!(expected_chrf > 10.0, "chrF {expected_chrf} is too low to test matching");
    assert!(expected_chrf < 90.0, "chrF {expected_chrf} is too high to test mismatches");
    assert_chrf_matches(&chrf, &expected["chrf"]);

    let sentences = expected["sentence_bleu"].as_array().unwrap();
    assert_eq!(sentences.len(), hypotheses.len(), "sentence BLEU count");
    let mut max_difference: f64 = 0.0;
    for (i, (hypothesis, expected_sentence)) in hypotheses.iter().zip(sentences).enumerate() {
        let refs: Vec<&str> = references.iter().map(|stream| stream[i].as_str()).collect();
        let score = sentence_bleu(hypothesis, &refs).unwrap();
        assert_bleu_matches(&format!("sentence BLEU of line {i}"), &score, expected_sentence);
        let expected_score = expected_sentence["score"].as_f64().unwrap();
        max_difference = max_difference.max(relative_difference(score.score, expected_score));
    }
    eprintln!("{name}: sentence BLEU max relative difference {max_difference:e}");
}

#[test]
fn tokenizer_13a_matches_sacrebleu() {
    if !sacrebleu_available() {
        return;
    }
    let dir = scratch_dir("tokenize");
    let path = dir.join("lines.json");
    std::fs::write(&path, serde_json::to_string(TRICKY_LINES).unwrap()).unwrap();
    let expected = run_python(SACREBLEU_TOKENIZE_SCRIPT, &[path]);
    std::fs::remove_dir_all(&dir).ok();

    let expected = expected.as_array().unwrap();
    assert_eq!(expected.len(), TRICKY_LINES.len());
    for (line, tokens) in TRICKY_LINES.iter().zip(expected) {
        assert_eq!(tokenize_13a(line), tokens.as_str().unwrap(), "tokens of {line:?}");
    }
}

#[test]
fn single_reference_matches_sacrebleu() {
    let Some(references) = reference_lines() else { return };
    if !sacrebleu_available() {
        return;
    }
    let mut rng = Rng::new(1);
    let hypotheses: Vec<String> = references.iter().map(|line| corrupt(line, &mut rng)).collect();
    check_against_sacrebleu("single reference", &hypotheses, &[&references]);
}

#[test]
fn two_references_match_sacrebleu() {
    let Some(references) = reference_lines() else { return };
    if !sacrebleu_available() {
        return;
    }
    let mut rng = Rng::new(2);
    let hypotheses: Vec<String> = references.iter().map(|line| corrupt(line, &mut rng)).collect();
    let second: Vec<String> = references.iter().map(|line| corrupt(line, &mut rng)).collect();
    check_against_sacrebleu("two references", &hypotheses, &[&references, &second]);
}

#[test]
fn short_reference_stream_is_rejected() {
    let hypotheses = ["um", "dois", "três"];
    let complete = ["um", "dois", "três"];
    let short = ["um", "dois"];
    let expected = ScoreError::LengthMismatch { stream: 1, references: 2, hypotheses: 3 };
    let streams: [&[&str]; 2] = [&complete, &short];
    assert_eq!(corpus_bleu(&hypotheses, &streams), Err(expected.clone()));
    assert_eq!(corpus_chrf(&hypotheses, &streams), Err(expected));
}

#[test]
fn missing_references_are_rejected() {
    let hypotheses = vec!["um".to_owned()];
    let streams: [Vec<String>; 0] = [];
    assert_eq!(corpus_bleu(&hypotheses, &streams), Err(ScoreError::NoReferences));
    assert_eq!(corpus_chrf(&hypotheses, &streams), Err(ScoreError::NoReferences));
    assert_eq!(sentence_bleu::<&str>("um", &[]), Err(ScoreError::NoReferences));
}
