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
    /// Failure to read or parse an STS Benchmark file.
    Sts(crate::text::TextError),
    /// Failure to read or parse an `.npz` file.
    Npz(crate::npy::NpyError),
}

impl std::fmt::Display for DatasetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatasetError::Read { path, message } => write!(f, "{}: {message}", path.display()),
            // Both messages already name the file.
            DatasetError::Sts(e) => write!(f, "{e}"),
            DatasetError::Npz(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DatasetError {}

/// Reads a dataset, choosing the format by extension (.csv/.tsv STS, .npz arrays, else text).
///
/// # Errors
/// [`DatasetError::Sts`] for a .csv or .tsv file, [`DatasetError::Npz`] for an .npz file and
/// [`DatasetError::Read`] otherwise, each naming the file.
pub fn load(path: &Path) -> Result<Dataset, DatasetError> {
    let fail = |message: String| DatasetError::Read { path: path.to_owned(), message };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "csv" | "tsv" => read_sts(path).map(Dataset::Pairs).map_err(DatasetError::Sts),
        "npz" => {
            let arrays = read_npz(path).map_err(DatasetError::Npz)?;
            let find = |name: &str| arrays.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
            let (name, all) = match find("inputs") {
                Some(t) => ("inputs".to_owned(), t),
                None => {
                    let others: Vec<_> = arrays.iter().filter(|(n, _)| n != "labels").collect();
                    match others.as_slice() {
                        [(n, t)] => (n.clone(), t.clone()),
                        _ => {
                            let names: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
                            return Err(fail(format!(
                                "no array named `inputs` among {names:?}; name the model input \
                                 array `inputs` (batch first)"
                            )));
                        }
                    }
                }
            };
            let inputs =
                split_batch(&all).ok_or_else(|| fail(format!("`{name}` has no batch axis")))?;
            let labels = match find("labels") {
                Some(t) => Some(labels_of(&t).map_err(fail)?),
                None => None,
            };
            if let Some(l) = &labels {
                if l.len() != inputs.len() {
                    return Err(fail(format!(
                        "`labels` has {} entries but `{name}` has {} samples",
                        l.len(),
                        inputs.len()
                    )));
                }
            }
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

/// Class indices from a `labels` array: integers, or floats that hold whole numbers.
fn labels_of(t: &HostTensor) -> Result<Vec<i64>, String> {
    match &t.data {
        TensorData::I64(v) => Ok(v.clone()),
        TensorData::I32(v) => Ok(v.iter().copied().map(i64::from).collect()),
        TensorData::F32(v) => v
            .iter()
            .map(|&x| {
                if x.fract() == 0.0 && x.abs() < 1e9 {
                    Ok(x as i64)
                } else {
                    Err(format!("`labels` holds {x}, which is not a class index"))
                }
            })
            .collect(),
        TensorData::Bool(_) => Err("`labels` holds booleans, not class indices".into()),
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
