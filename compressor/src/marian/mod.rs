//! Marian translation models, such as the Firefox Translations "tiny" models, run in f32 on the
//! host.
//!
//! [`MarianFile`] reads Marian's binary model format (`.bin`): named tensors in f32 or int8 with
//! a quantization multiplier, and the training configuration as embedded YAML. [`MarianModel`]
//! builds from it a transformer encoder and a decoder of SSRU (simpler simple recurrent unit)
//! layers with cross-attention, and translates one sentence at a time by greedy or beam search.
//! [`MarianTokenizer`] encodes text with the model's SentencePiece vocabulary through its
//! Hugging Face `tokenizer.json`, and [`Shortlist`] reads the lexical shortlist that restricts
//! the output vocabulary to likely translations of the source words.

#[cfg(feature = "compress")]
mod compress;
mod config;
mod file;
mod model;
mod shortlist;
mod tokenizer;

use std::fmt;
use std::path::PathBuf;

#[cfg(feature = "compress")]
pub use compress::{
    is_packed_marian, pack, translator_config, MarianCalibration, MarianPart, MatrixStorage,
    CONFIG_KEY, MAX_SOURCE, TRANSLATOR_KEY,
};
pub use config::{parse_yaml, YamlValue};
pub use file::{ElementType, Int8Matrix, MarianFile, TensorInfo};
pub use model::{DecoderState, MarianConfig, MarianModel};
pub use shortlist::Shortlist;
pub use tokenizer::MarianTokenizer;

/// Errors from reading a Marian model, its shortlist or its tokenizer, or from decoding.
#[derive(Debug)]
#[non_exhaustive]
pub enum MarianError {
    /// Opening or mapping a file failed.
    Io {
        /// File being read.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid Marian model or shortlist file.
    Format {
        /// File being read.
        path: PathBuf,
        /// Byte offset at which the problem was found.
        offset: u64,
        /// Description of the problem.
        reason: String,
    },
    /// A tensor is missing, has an unexpected shape, or has an unsupported element type.
    Tensor {
        /// File being read.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Description of the problem.
        reason: String,
    },
    /// A configuration key is missing, invalid, or names an architecture this crate cannot run.
    Config {
        /// File being read.
        path: PathBuf,
        /// Configuration key.
        key: String,
        /// Description of the problem.
        reason: String,
    },
    /// The tokenizer file could not be loaded, or text could not be encoded.
    Tokenizer {
        /// Tokenizer file.
        path: PathBuf,
        /// Description of the problem.
        reason: String,
    },
    /// The input of a translation is invalid, such as an empty sentence or a token id outside
    /// the vocabulary.
    Input(String),
}

impl fmt::Display for MarianError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MarianError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            MarianError::Format { path, offset, reason } => {
                write!(f, "{}: invalid file at byte {offset}: {reason}", path.display())
            }
            MarianError::Tensor { path, name, reason } => {
                write!(f, "{}: tensor `{name}`: {reason}", path.display())
            }
            MarianError::Config { path, key, reason } => {
                write!(f, "{}: configuration key `{key}`: {reason}", path.display())
            }
            MarianError::Tokenizer { path, reason } => {
                write!(f, "{}: tokenizer: {reason}", path.display())
            }
            MarianError::Input(reason) => write!(f, "invalid translation input: {reason}"),
        }
    }
}

// Display prints the I/O error of `Io`, so `source` returns `None` and a report that walks the
// chain of causes (anyhow's `{:#}`) does not print it twice.
impl std::error::Error for MarianError {}

#[cfg(test)]
mod tests;
