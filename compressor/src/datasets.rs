//! Calibration and evaluation data given on the command line: STS Benchmark files (sentence pairs
//! with gold scores), plain text (one sentence per line) and NumPy archives (an `inputs` array,
//! batch first, and optionally `labels`).

use std::path::{Path, PathBuf};

use crate::embed::input_for;
use crate::npy::read_npz;
use crate::tensor::{HostTensor, TensorData};
use crate::text::{read_sts, StsPair, TextEncoder};

/// Data read from a file.
#[derive(Clone, Debug)]
pub enum Dataset {
    /// Sentence pairs with similarity scores.
    Pairs(Vec<StsPair>),
    /// Sentences.
    Lines(Vec<String>),
    /// Model inputs, one batch-of-one sample each, and labels when the archive has them.
    Tensors {
        /// Samples.
        inputs: Vec<HostTensor>,
        /// One label per sample.
        labels: Option<Vec<i64>>,
    },
}

/// Why data could not be read.
#[derive(Debug)]
#[non_exhaustive]
pub enum DatasetError {
    /// The file could not be read or parsed.
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl std::fmt::Display for DatasetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatasetError::Read { path, message } => write!(f, "{}: {message}", path.display()),
        }
    }
}

impl std::error::Error for DatasetError {}

/// Reads a dataset, choosing the format by extension (.csv/.tsv STS, .npz arrays, else text).
///
/// # Errors
/// [`DatasetError::Read`] naming the file.
pub fn load(path: &Path) -> Result<Dataset, DatasetError> {
    let fail = |message: String| DatasetError::Read { path: path.to_owned(), message };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "csv" | "tsv" => read_sts(path).map(Dataset::Pairs).map_err(|e| fail(e.to_string())),
        "npz" => {
            let arrays = read_npz(path).map_err(|e| fail(e.to_string()))?;
            let find = |name: &str| arrays.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
            let all = find("inputs").ok_or_else(|| fail("no array named `inputs`".into()))?;
            let inputs =
                split_batch(&all).ok_or_else(|| fail("`inputs` has no batch axis".into()))?;
            let labels = find("labels").and_then(|t| match t.data {
                TensorData::I64(v) => Some(v),
                TensorData::I32(v) => Some(v.into_iter().map(i64::from).collect()),
                _ => None,
            });
            Ok(Dataset::Tensors { inputs, labels })
        }
        _ => {
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            let lines: Vec<String> =
                text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            if lines.is_empty() {
                return Err(fail("no non-empty lines".into()));
            }
            Ok(Dataset::Lines(lines))
        }
    }
}

/// Splits a batch-first tensor into batch-of-one samples.
pub fn split_batch(t: &HostTensor) -> Option<Vec<HostTensor>> {
    let (&batch, rest) = t.shape.split_first()?;
    let per: usize = rest.iter().product();
    let mut shape = vec![1];
    shape.extend_from_slice(rest);
    let slice = |i: usize| match &t.data {
        TensorData::F32(v) => HostTensor::f32(shape.clone(), v[i * per..(i + 1) * per].to_vec()),
        TensorData::I64(v) => HostTensor::i64(shape.clone(), v[i * per..(i + 1) * per].to_vec()),
        TensorData::I32(v) => HostTensor {
            shape: shape.clone(),
            data: TensorData::I32(v[i * per..(i + 1) * per].to_vec()),
        },
        TensorData::Bool(v) => HostTensor {
            shape: shape.clone(),
            data: TensorData::Bool(v[i * per..(i + 1) * per].to_vec()),
        },
    };
    Some((0..batch).map(slice).collect())
}

/// Sentences of a text dataset (both sides of pairs).
pub fn sentences(data: &Dataset) -> Vec<String> {
    match data {
        Dataset::Pairs(pairs) => {
            pairs.iter().flat_map(|p| [p.sentence1.clone(), p.sentence2.clone()]).collect()
        }
        Dataset::Lines(lines) => lines.clone(),
        Dataset::Tensors { .. } => Vec::new(),
    }
}

/// Model inputs for sentences, by the graph's input names.
///
/// # Errors
/// A message naming the sentence or the input that could not be built.
pub fn text_samples(
    encoder: &TextEncoder,
    input_names: &[String],
    sentences: &[String],
) -> Result<Vec<Vec<HostTensor>>, String> {
    sentences
        .iter()
        .map(|s| {
            let e = encoder.encode(s).map_err(|e| e.to_string())?;
            let n = e.ids.len();
            input_names
                .iter()
                .map(|name| {
                    input_for(name, &e)
                        .map(|v| HostTensor::i64(vec![1, n], v.to_vec()))
                        .map_err(|e| e.to_string())
                })
                .collect()
        })
        .collect()
}
