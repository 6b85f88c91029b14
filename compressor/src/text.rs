//! Text pipeline for sentence-embedding models: tokenization with a Hugging Face
//! `tokenizer.json`, the STS Benchmark reader, mean pooling and the rank and linear correlations
//! that STS evaluation reports.

use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::{
    Encoding, PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// Number of leading characters of a sentence that an encoding error message quotes.
const SENTENCE_PREVIEW_CHARS: usize = 60;

/// Highest similarity score of the STS Benchmark, whose scores start at 0.
const STS_MAX_SCORE: f64 = 5.0;

/// Errors of the text pipeline.
#[derive(Debug)]
#[non_exhaustive]
pub enum TextError {
    /// Reading a file failed.
    Io {
        /// File that could not be read.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The tokenizer definition could not be parsed or configured.
    TokenizerLoad {
        /// File the definition came from, or `None` when it was given as bytes.
        path: Option<PathBuf>,
        /// Error reported by the `tokenizers` crate.
        source: tokenizers::Error,
    },
    /// The token cap leaves no room for text after the special tokens.
    InvalidMaxLen {
        /// Requested cap on the token count.
        max_len: usize,
        /// Special tokens that the tokenizer adds to every single sentence.
        special_tokens: usize,
    },
    /// Tokenizing a sentence failed.
    Encode {
        /// Start of the sentence that failed.
        sentence: String,
        /// Error reported by the `tokenizers` crate.
        source: tokenizers::Error,
    },
    /// A line of an STS file is not valid UTF-8.
    StsNotUtf8 {
        /// STS file.
        path: PathBuf,
        /// Line number, starting at 1.
        line: usize,
    },
    /// A line of an STS file has fewer than the seven required columns.
    StsMissingColumns {
        /// STS file.
        path: PathBuf,
        /// Line number, starting at 1.
        line: usize,
        /// Number of tab-separated columns found.
        found: usize,
    },
    /// The score column of an STS line is not a number in `[0, 5]`.
    StsInvalidScore {
        /// STS file.
        path: PathBuf,
        /// Line number, starting at 1.
        line: usize,
        /// Text of the score column.
        value: String,
    },
    /// An STS file contains no sentence pairs.
    StsEmpty {
        /// STS file.
        path: PathBuf,
    },
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::Io { path, source } => {
                write!(f, "failed to read {}: {source}", path.display())
            }
            TextError::TokenizerLoad { path: Some(path), source } => {
                write!(f, "invalid tokenizer file {}: {source}", path.display())
            }
            TextError::TokenizerLoad { path: None, source } => {
                write!(f, "invalid tokenizer definition: {source}")
            }
            TextError::InvalidMaxLen { max_len, special_tokens } => write!(
                f,
                "max_len {max_len} is too small because the tokenizer adds {special_tokens} \
                 special tokens. Use a max_len of at least {}",
                special_tokens + 1
            ),
            TextError::Encode { sentence, source } => {
                write!(f, "failed to tokenize {sentence:?}: {source}")
            }
            TextError::StsNotUtf8 { path, line } => {
                write!(f, "{}:{line}: line is not valid UTF-8", path.display())
            }
            TextError::StsMissingColumns { path, line, found } => write!(
                f,
                "{}:{line}: expected at least 7 tab-separated columns (genre, file, year, id, \
                 score, sentence1, sentence2), found {found}",
                path.display()
            ),
            TextError::StsInvalidScore { path, line, value } => write!(
                f,
                "{}:{line}: invalid score {value:?}, expected a number from 0 to 5",
                path.display()
            ),
            TextError::StsEmpty { path } => {
                write!(f, "{}: no sentence pairs found", path.display())
            }
        }
    }
}

/// `source()` is left at `None` because every message already ends with its cause's message, and
/// a reporter that walks the chain (anyhow's `{:#}`) would print that cause twice.
impl std::error::Error for TextError {}

/// Model inputs for one sentence, as the i64 tensors that BERT-style ONNX models take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, starting and ending with the tokenizer's special tokens.
    pub ids: Vec<i64>,
    /// 1 for every token (the encoder does not pad).
    pub attention_mask: Vec<i64>,
    /// Segment ids, 0 for a single sentence.
    pub type_ids: Vec<i64>,
}

/// Sentence tokenizer built from a Hugging Face `tokenizer.json`.
///
/// The encoder truncates every sentence to at most `max_len` tokens, special tokens included,
/// and never pads. Any padding setting in the file is removed, so each encoding is as long as
/// its sentence needs.
pub struct TextEncoder {
    tokenizer: Tokenizer,
}

impl TextEncoder {
    /// Builds an encoder from the bytes of a `tokenizer.json`. `max_len` caps the token count,
    /// special tokens included.
    ///
    /// # Errors
    /// [`TextError::TokenizerLoad`] when the bytes are not a valid tokenizer definition, and
    /// [`TextError::InvalidMaxLen`] when `max_len` leaves no room for a text token.
    pub fn from_bytes(json: &[u8], max_len: usize) -> Result<Self, TextError> {
        Self::build(json, max_len, None)
    }

    /// Builds an encoder from a `tokenizer.json` file, as [`TextEncoder::from_bytes`] does.
    ///
    /// # Errors
    /// [`TextError::Io`] when the file cannot be read, otherwise as [`TextEncoder::from_bytes`].
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, TextError> {
        let json = std::fs::read(path)
            .map_err(|source| TextError::Io { path: path.to_path_buf(), source })?;
        Self::build(&json, max_len, Some(path))
    }

    fn build(json: &[u8], max_len: usize, path: Option<&Path>) -> Result<Self, TextError> {
        let load_error = |source: tokenizers::Error| TextError::TokenizerLoad {
            path: path.map(Path::to_path_buf),
            source,
        };
        let mut tokenizer = Tokenizer::from_bytes(json).map_err(load_error)?;

        // `tokenizers` 0.23 subtracts the special-token count from the cap without checking for
        // underflow, so a cap that leaves no room for a text token is rejected here.
        let special_tokens = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if max_len <= special_tokens {
            return Err(TextError::InvalidMaxLen { max_len, special_tokens });
        }

        let truncation = TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        };
        tokenizer.with_truncation(Some(truncation)).map_err(load_error)?;
        tokenizer.with_padding(None);
        Ok(TextEncoder { tokenizer })
    }

    /// Tokenizes one sentence, adding the special tokens and truncating to `max_len` tokens.
    ///
    /// # Errors
    /// [`TextError::Encode`] when the tokenizer fails on the sentence.
    pub fn encode(&self, sentence: &str) -> Result<Encoded, TextError> {
        let encoding = self.tokenizer.encode(sentence, true).map_err(|source| {
            let sentence = sentence.chars().take(SENTENCE_PREVIEW_CHARS).collect();
            TextError::Encode { sentence, source }
        })?;
        if !encoding.get_overflowing().is_empty() {
            let used = encoding.get_ids().len();
            let preview: String = sentence.chars().take(SENTENCE_PREVIEW_CHARS).collect();
            log::warn!(
                "the sentence \"{preview}\" has more tokens than the model takes, so only its \
                 first {used} tokens are used; compress the model with a larger --max-seq to \
                 keep more"
            );
        }
        Ok(to_encoded(&encoding))
    }
}

fn to_encoded(encoding: &Encoding) -> Encoded {
    let widen = |values: &[u32]| values.iter().map(|&v| i64::from(v)).collect();
    Encoded {
        ids: widen(encoding.get_ids()),
        attention_mask: widen(encoding.get_attention_mask()),
        type_ids: widen(encoding.get_type_ids()),
    }
}

/// One sentence pair of the STS Benchmark with its gold similarity score.
#[derive(Clone, Debug, PartialEq)]
pub struct StsPair {
    /// Gold similarity, from 0 (unrelated) to 5 (equivalent).
    pub score: f64,
    /// First sentence.
    pub sentence1: String,
    /// Second sentence.
    pub sentence2: String,
}

/// Reads an STS Benchmark file: tab-separated genre, file, year, id, score, sentence1,
/// sentence2 (extra trailing columns ignored; no quoting: a quote character is literal text).
///
/// Lines may end in `\n` or `\r\n`, and empty lines are skipped.
///
/// # Errors
/// [`TextError::Io`] when the file cannot be read, and an error naming the line when a line is
/// not UTF-8, has fewer than seven columns or a score outside `[0, 5]`.
/// [`TextError::StsEmpty`] when the file has no pairs.
pub fn read_sts(path: &Path) -> Result<Vec<StsPair>, TextError> {
    let bytes =
        std::fs::read(path).map_err(|source| TextError::Io { path: path.to_path_buf(), source })?;

    let mut pairs = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        let text = std::str::from_utf8(raw)
            .map_err(|_| TextError::StsNotUtf8 { path: path.to_path_buf(), line })?;
        pairs.push(parse_sts_line(text, path, line)?);
    }

    if pairs.is_empty() {
        return Err(TextError::StsEmpty { path: path.to_path_buf() });
    }
    Ok(pairs)
}

fn parse_sts_line(text: &str, path: &Path, line: usize) -> Result<StsPair, TextError> {
    let columns: Vec<&str> = text.split('\t').collect();
    if columns.len() < 7 {
        let found = columns.len();
        return Err(TextError::StsMissingColumns { path: path.to_path_buf(), line, found });
    }

    let value = columns[4];
    let score = match value.trim().parse::<f64>() {
        Ok(score) if (0.0..=STS_MAX_SCORE).contains(&score) => score,
        _ => {
            let value = value.to_string();
            return Err(TextError::StsInvalidScore { path: path.to_path_buf(), line, value });
        }
    };

    Ok(StsPair { score, sentence1: columns[5].to_string(), sentence2: columns[6].to_string() })
}

/// Spearman rank correlation with average ranks for ties.
///
/// Returns NaN when either input is constant, has fewer than two values or contains NaN,
/// because the correlation is undefined there.
///
/// # Panics
/// Panics if `x` and `y` differ in length.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "spearman: inputs differ in length");
    if x.iter().chain(y).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    pearson(&average_ranks(x), &average_ranks(y))
}

/// Ranks starting at 1, where tied values share the mean of the ranks they span.
fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));

    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end hold equal values, so each gets the mean of ranks start+1..=end.
        let rank = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Pearson correlation.
///
/// Returns NaN when either input is constant, has fewer than two values or contains NaN,
/// because the correlation is undefined there.
///
/// # Panics
/// Panics if `x` and `y` differ in length.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "pearson: inputs differ in length");
    if x.len() < 2 || is_constant(x) || is_constant(y) {
        return f64::NAN;
    }

    let n = x.len() as f64;
    let mean_x = x.iter().sum::<f64>() / n;
    let mean_y = y.iter().sum::<f64>() / n;

    let mut covariance = 0.0;
    let mut variance_x = 0.0;
    let mut variance_y = 0.0;
    for (&a, &b) in x.iter().zip(y) {
        let dx = a - mean_x;
        let dy = b - mean_y;
        covariance += dx * dy;
        variance_x += dx * dx;
        variance_y += dy * dy;
    }

    // Rounding can push the ratio slightly past ±1.
    (covariance / (variance_x * variance_y).sqrt()).clamp(-1.0, 1.0)
}

/// Returns true when all values are exactly equal. Checking this directly keeps rounding in the
/// mean from turning a constant input into a spurious correlation.
fn is_constant(values: &[f64]) -> bool {
    values.iter().all(|&v| v == values[0])
}

/// Mean of the rows of hidden ([seq, dim] row-major) whose mask entry is non-zero.
///
/// Returns a zero vector of length `dim` when no mask entry is non-zero.
///
/// # Panics
/// Panics if `hidden.len()` differs from `mask.len() * dim`.
pub fn mean_pool(hidden: &[f32], dim: usize, mask: &[i64]) -> Vec<f32> {
    assert_eq!(
        hidden.len(),
        mask.len() * dim,
        "mean_pool: hidden has {} values, expected {} rows of {dim}",
        hidden.len(),
        mask.len()
    );

    let mut sum = vec![0.0f64; dim];
    let mut count = 0usize;
    for (row, &keep) in hidden.chunks_exact(dim.max(1)).zip(mask) {
        if keep != 0 {
            count += 1;
            for (total, &value) in sum.iter_mut().zip(row) {
                *total += f64::from(value);
            }
        }
    }

    if count == 0 {
        return vec![0.0; dim];
    }
    sum.iter().map(|&total| (total / count as f64) as f32).collect()
}

/// Scales `v` to unit Euclidean length, leaving a zero vector unchanged.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in v.iter_mut() {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// Cosine similarity, accumulated in f64.
///
/// Returns 0 when either vector has zero length, as PyTorch's `cosine_similarity` does.
///
/// # Panics
/// Panics if `a` and `b` differ in length.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine: vectors differ in length");
    let mut dot = 0.0f64;
    let mut norm_a = 0.0f64;
    let mut norm_b = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        norm_a += x * x;
        norm_b += y * y;
    }

    let denominator = (norm_a * norm_b).sqrt();
    if denominator == 0.0 {
        return 0.0;
    }
    dot / denominator
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../models/paraphrase-MiniLM-L3-v2/tokenizer.json");
    const STS_DEV: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/stsb/sts-dev.csv");

    const CLS: i64 = 101;
    const SEP: i64 = 102;

    fn encoder(max_len: usize) -> Option<TextEncoder> {
        let path = Path::new(TOKENIZER);
        if !path.exists() {
            crate::testdata::skip(&format!("tokenizer {TOKENIZER} not found"));
            return None;
        }
        Some(TextEncoder::from_file(path, max_len).unwrap())
    }

    fn sts_dev() -> Option<Vec<StsPair>> {
        let path = Path::new(STS_DEV);
        if !path.exists() {
            crate::testdata::skip(&format!("STS Benchmark file {STS_DEV} not found"));
            return None;
        }
        Some(read_sts(path).unwrap())
    }

    /// Writes `contents` to a file in the temporary directory that is unique to this process.
    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("edgefold-text-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-12, "got {actual}, expected {expected}");
    }

    #[test]
    fn encode_hello_world_ids() {
        let Some(encoder) = encoder(128) else { return };
        let encoded = encoder.encode("Hello world!").unwrap();
        assert_eq!(encoded.ids, [CLS, 7592, 2088, 999, SEP]);
        assert_eq!(encoded.attention_mask, [1; 5]);
        assert_eq!(encoded.type_ids, [0; 5]);
    }

    #[test]
    fn encode_lowercases() {
        let Some(encoder) = encoder(128) else { return };
        let upper = encoder.encode("HELLO World!").unwrap();
        let lower = encoder.encode("hello world!").unwrap();
        assert_eq!(upper, lower);
    }

    #[test]
    fn encode_empty_sentence() {
        let Some(encoder) = encoder(128) else { return };
        assert_eq!(encoder.encode("").unwrap().ids, [CLS, SEP]);
    }

    #[test]
    fn encode_truncation_keeps_special_tokens() {
        let Some(long) = encoder(128) else { return };
        let short = encoder(8).unwrap();
        let sentence = "the quick brown fox jumps over the lazy dog near the river bank";

        let full = long.encode(sentence).unwrap();
        assert!(full.ids.len() > 8, "sentence too short to test truncation: {:?}", full.ids);

        let cut = short.encode(sentence).unwrap();
        assert_eq!(cut.ids.len(), 8);
        assert_eq!(cut.attention_mask.len(), 8);
        assert_eq!(cut.type_ids.len(), 8);
        assert_eq!(cut.ids[0], CLS);
        assert_eq!(cut.ids[7], SEP);
        assert_eq!(cut.ids[1..7], full.ids[1..7]);
    }

    #[test]
    fn encode_smallest_max_len() {
        let Some(encoder) = encoder(3) else { return };
        assert_eq!(encoder.encode("Hello world!").unwrap().ids, [CLS, 7592, SEP]);
    }

    #[test]
    fn encoder_rejects_max_len_without_room() {
        let path = Path::new(TOKENIZER);
        if !path.exists() {
            crate::testdata::skip(&format!("tokenizer {TOKENIZER} not found"));
            return;
        }
        for max_len in [0, 1, 2] {
            let error = TextEncoder::from_file(path, max_len).err().unwrap();
            assert!(
                matches!(error, TextError::InvalidMaxLen { special_tokens: 2, .. }),
                "max_len {max_len}: {error}"
            );
        }
    }

    #[test]
    fn encoder_rejects_invalid_json() {
        let error = TextEncoder::from_bytes(b"{\"version\": ", 128).err().unwrap();
        assert!(matches!(error, TextError::TokenizerLoad { path: None, .. }), "{error}");
    }

    #[test]
    fn encoder_missing_file_names_path() {
        let path = Path::new("/nonexistent/tokenizer.json");
        let error = TextEncoder::from_file(path, 128).err().unwrap();
        assert!(matches!(error, TextError::Io { .. }), "{error}");
        assert!(error.to_string().contains("/nonexistent/tokenizer.json"), "{error}");
    }

    #[test]
    fn encode_sts_dev_within_cap() {
        let Some(encoder) = encoder(16) else { return };
        let Some(pairs) = sts_dev() else { return };
        let mut truncated = 0;
        for pair in &pairs {
            for sentence in [&pair.sentence1, &pair.sentence2] {
                let ids = encoder.encode(sentence).unwrap().ids;
                assert!(ids.len() <= 16, "{sentence:?} gave {} tokens", ids.len());
                assert_eq!(ids.first(), Some(&CLS), "{sentence:?}");
                assert_eq!(ids.last(), Some(&SEP), "{sentence:?}");
                truncated += usize::from(ids.len() == 16);
            }
        }
        assert!(truncated > 100, "only {truncated} sentences reached the cap");
    }

    #[test]
    fn read_sts_dev_pairs() {
        let Some(pairs) = sts_dev() else { return };
        assert_eq!(pairs.len(), 1500);
        for pair in &pairs {
            assert!((0.0..=5.0).contains(&pair.score), "score {}", pair.score);
        }
        assert_eq!(pairs[0].score, 5.0);
        assert_eq!(pairs[0].sentence1, "A man with a hard hat is dancing.");
        assert_eq!(pairs[0].sentence2, "A man wearing a hard hat is dancing.");
    }

    #[test]
    fn read_sts_unbalanced_quote_is_literal() {
        let Some(pairs) = sts_dev() else { return };
        // Line 765 opens a quote that never closes. A CSV reader with quoting would merge the
        // following lines into this field.
        let pair = &pairs[764];
        assert_eq!(pair.score, 1.4);
        assert!(pair.sentence1.starts_with("\"The grass family is one"), "{}", pair.sentence1);
        assert!(pair.sentence2.starts_with("As noted on the Wiki page"), "{}", pair.sentence2);
        assert!(pairs[765].sentence1.len() < 200, "line 766 merged: {}", pairs[765].sentence1);
    }

    #[test]
    fn read_sts_ignores_extra_columns() {
        let Some(pairs) = sts_dev() else { return };
        // Line 1479 carries two source columns after the sentences.
        let pair = &pairs[1478];
        assert_eq!(pair.score, 5.0);
        assert_eq!(pair.sentence2, "High court checks President's recess appointment power");
    }

    #[test]
    fn read_sts_crlf_and_blank_lines() {
        let path = temp_file(
            "crlf.csv",
            b"g\tf\t2012\t0001\t3.5\tA \"b\tc\r\n\r\ng\tf\t2012\t0002\t0\td\te\textra\n",
        );
        let pairs = read_sts(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let expected = [
            StsPair { score: 3.5, sentence1: "A \"b".into(), sentence2: "c".into() },
            StsPair { score: 0.0, sentence1: "d".into(), sentence2: "e".into() },
        ];
        assert_eq!(pairs, expected);
    }

    #[test]
    fn read_sts_rejects_malformed_lines() {
        let good = "g\tf\t2012\t0001\t1.0\ta\tb\n";
        let cases: [(&str, &[u8], usize); 6] = [
            ("columns.csv", b"g\tf\t2012\t0001\t1.0\tonly one sentence\n", 1),
            ("score.csv", b"g\tf\t2012\t0001\thigh\ta\tb\n", 1),
            ("range.csv", b"g\tf\t2012\t0001\t5.5\ta\tb\n", 1),
            ("negative.csv", b"g\tf\t2012\t0001\t-0.1\ta\tb\n", 1),
            ("nan.csv", b"g\tf\t2012\t0001\tNaN\ta\tb\n", 1),
            ("utf8.csv", b"g\tf\t2012\t0001\t1.0\ta\xff\tb\n", 1),
        ];
        for (name, line, line_number) in cases {
            let mut contents = good.as_bytes().to_vec();
            contents.extend_from_slice(line);
            let path = temp_file(name, &contents);
            let error = read_sts(&path).err().unwrap();
            std::fs::remove_file(&path).unwrap();
            let message = error.to_string();
            let location = format!("{}:{}", path.display(), line_number + 1);
            assert!(message.contains(&location), "{name}: {message}");
        }
    }

    #[test]
    fn read_sts_rejects_empty_file() {
        let path = temp_file("empty.csv", b"\n");
        let error = read_sts(&path).err().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(error, TextError::StsEmpty { .. }), "{error}");
    }

    #[test]
    fn spearman_perfect_and_reversed() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let cubes: Vec<f64> = x.iter().map(|v| v * v * v).collect();
        let reversed: Vec<f64> = x.iter().map(|v| -v).collect();
        assert_eq!(spearman(&x, &cubes), 1.0);
        assert_eq!(spearman(&x, &reversed), -1.0);
        assert!(pearson(&x, &cubes) < 0.99);
    }

    #[test]
    fn spearman_hand_computed() {
        // Rank differences -1, 1, -1, 1, 0: rho = 1 - 6 * 4 / (5 * 24) = 0.8.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 1.0, 4.0, 3.0, 5.0];
        assert_close(spearman(&x, &y), 0.8);
    }

    #[test]
    fn spearman_ties_use_average_ranks() {
        // x ranks 1, 2.5, 2.5, 4. Their Pearson correlation with 1, 2, 3, 4 is
        // 4.5 / sqrt(4.5 * 5) = sqrt(0.9); the no-ties formula would give 0.95.
        let x = [1.0, 2.0, 2.0, 3.0];
        let y = [10.0, 20.0, 30.0, 40.0];
        assert_close(spearman(&x, &y), 0.9f64.sqrt());
    }

    #[test]
    fn average_ranks_tie_groups() {
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0]);
    }

    #[test]
    fn spearman_undefined_cases() {
        assert!(spearman(&[2.0, 2.0, 2.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(spearman(&[1.0, 2.0, 3.0], &[0.1, 0.1, 0.1]).is_nan());
        assert!(spearman(&[1.0], &[1.0]).is_nan());
        assert!(spearman(&[], &[]).is_nan());
        assert!(spearman(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    fn pearson_hand_computed() {
        // Deviations -1, 0, 1 and -4/3, -1/3, 5/3: r = 3 / sqrt(2 * 42 / 9) = 9 / sqrt(84).
        assert_close(pearson(&[1.0, 2.0, 3.0], &[1.0, 2.0, 4.0]), 9.0 / 84f64.sqrt());
    }

    #[test]
    fn pearson_constant_is_nan() {
        assert!(pearson(&[0.1, 0.1, 0.1], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    #[should_panic(expected = "differ in length")]
    fn spearman_length_mismatch_panics() {
        spearman(&[1.0, 2.0], &[1.0]);
    }

    #[test]
    fn mean_pool_skips_masked_rows() {
        let hidden = [1.0, 2.0, 100.0, 200.0, 3.0, 6.0];
        assert_eq!(mean_pool(&hidden, 2, &[1, 0, 1]), [2.0, 4.0]);
    }

    #[test]
    fn mean_pool_all_masked_is_zero() {
        assert_eq!(mean_pool(&[1.0, 2.0, 3.0], 3, &[0]), [0.0; 3]);
    }

    #[test]
    fn l2_normalize_unit_length() {
        let mut v = [3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);

        let mut zero = [0.0; 3];
        l2_normalize(&mut zero);
        assert_eq!(zero, [0.0; 3]);
    }

    #[test]
    fn cosine_known_angles() {
        assert_close(cosine(&[1.0, 2.0], &[2.0, 4.0]), 1.0);
        assert_close(cosine(&[1.0, 2.0], &[-1.0, -2.0]), -1.0);
        assert_close(cosine(&[1.0, 0.0], &[0.0, 3.0]), 0.0);
        assert_close(cosine(&[1.0, 1.0], &[1.0, 0.0]), 0.5f64.sqrt());
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
