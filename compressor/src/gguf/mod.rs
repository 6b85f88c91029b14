//! Reading GGUF files, the format in which llama.cpp stores language models.
//!
//! A file contains a header, metadata as typed key-value pairs, a table of tensors (name, shape,
//! element type, offset) and the tensor data, each tensor at a multiple of the file's alignment.
//! Versions 2 and 3 are read, little-endian only. Every count, length and offset is checked
//! against the file's size before it is used, so a damaged or hostile file gives a
//! [`GgufError`] naming the value, never a panic or a huge allocation.
//!
//! The format is described in llama.cpp's `docs/gguf.md` (ggml repository, `docs/gguf.md`).

mod quants;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use edgefold_runtime::MappedFile;

use crate::file_bytes::FileBytes;

pub use quants::{dequantize, GgmlType};

/// The four bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";

/// Tensor data alignment when the metadata sets none (`general.alignment`).
const DEFAULT_ALIGNMENT: u64 = 32;

/// Maximum tensor rank. ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// Maximum nesting of arrays in metadata. Real files nest at most one level; the limit keeps a
/// hostile file from exhausting the stack.
const MAX_ARRAY_NESTING: usize = 4;

/// Errors from reading a GGUF file.
#[derive(Debug)]
#[non_exhaustive]
pub enum GgufError {
    /// Opening or mapping the file failed.
    Io {
        /// File being read.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid GGUF file of a supported version.
    Format {
        /// File being read.
        path: PathBuf,
        /// Byte offset at which the problem was found.
        offset: u64,
        /// Description of the problem.
        reason: String,
    },
    /// A metadata key the caller needs is missing or has another type.
    Metadata {
        /// File being read.
        path: PathBuf,
        /// Metadata key.
        key: String,
        /// Description of the problem.
        reason: String,
    },
    /// A tensor is missing, has an unexpected shape, or has an element type that cannot be
    /// dequantized.
    Tensor {
        /// File being read.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Description of the problem.
        reason: String,
    },
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            GgufError::Format { path, offset, reason } => {
                write!(f, "{}: invalid GGUF file at byte {offset}: {reason}", path.display())
            }
            GgufError::Metadata { path, key, reason } => {
                write!(f, "{}: metadata key `{key}`: {reason}", path.display())
            }
            GgufError::Tensor { path, name, reason } => {
                write!(f, "{}: tensor `{name}`: {reason}", path.display())
            }
        }
    }
}

// Display prints the I/O error of `Io`, so `source` returns `None` and a report that walks the
// chain of causes (anyhow's `{:#}`) does not print it twice.
impl std::error::Error for GgufError {}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint8`, `uint16`, `uint32` or `uint64`.
    UInt(u64),
    /// `int8`, `int16`, `int32` or `int64`.
    Int(i64),
    /// `float32` or `float64`.
    Float(f64),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string. Invalid UTF-8 is replaced with U+FFFD.
    String(String),
    /// Array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// Returns the value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UInt(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Returns the value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::UInt(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// Returns the string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Returns the elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, such as `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one, so a weight
    /// matrix of `n` rows of `k` values has `dims == [k, n]`.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data within the file.
    pub start: usize,
    /// Data length in bytes.
    pub len: usize,
}

impl TensorInfo {
    /// Returns the number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Returns the shape in row-major order (outermost first), as NumPy and ONNX write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A GGUF file mapped into memory (or passed in as bytes), with its metadata and tensor table
/// parsed.
pub struct GgufFile {
    path: PathBuf,
    file: FileBytes,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let file = MappedFile::open(path)
            .map_err(|source| GgufError::Io { path: path.to_path_buf(), source })?;
        GgufFile::from_file_bytes(path, FileBytes::Mapped(file))
    }

    /// Parses a GGUF file that is already in memory. `path` only names the file in errors and in
    /// [`GgufFile::path`], and nothing is read from it.
    ///
    /// # Errors
    /// [`GgufError::Format`] when the bytes are not a valid GGUF file of version 2 or 3.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::from_file_bytes(path, FileBytes::Owned(bytes))
    }

    fn from_file_bytes(path: &Path, file: FileBytes) -> Result<GgufFile, GgufError> {
        let (version, metadata, tensors) = parse(file.bytes()).map_err(|(offset, reason)| {
            GgufError::Format { path: path.to_path_buf(), offset, reason }
        })?;
        Ok(GgufFile { path: path.to_path_buf(), file, version, metadata, tensors })
    }

    /// Returns the path the file was opened from, or the one given to [`GgufFile::from_bytes`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Returns all metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// Returns the metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Returns the tensor table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Returns the table entry of the tensor `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Returns the raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        // The range was checked against the file's length when the table was parsed.
        &self.file.bytes()[info.start..info.start + info.len]
    }

    /// Returns the total size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file.bytes().len() as u64
    }

    /// Returns the metadata value of `key`, or an error naming the key when it is missing.
    pub fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| self.metadata_error(key, "missing"))
    }

    /// Returns the metadata value of `key` as an unsigned integer.
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| self.metadata_error(key, "expected a non-negative integer"))
    }

    /// Returns the metadata value of `key` as a float.
    pub fn require_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.require(key)?.as_f64().ok_or_else(|| self.metadata_error(key, "expected a number"))
    }

    /// Returns the metadata value of `key` as a string.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        self.require(key)?.as_str().ok_or_else(|| self.metadata_error(key, "expected a string"))
    }

    /// Builds a [`GgufError::Metadata`] for `key`.
    pub fn metadata_error(&self, key: &str, reason: impl Into<String>) -> GgufError {
        GgufError::Metadata { path: self.path.clone(), key: key.to_owned(), reason: reason.into() }
    }

    /// Builds a [`GgufError::Tensor`] for the tensor `name`.
    pub fn tensor_error(&self, name: &str, reason: impl Into<String>) -> GgufError {
        GgufError::Tensor { path: self.path.clone(), name: name.to_owned(), reason: reason.into() }
    }

    /// Dequantizes the tensor `name` to f32, checking that its row-major shape is `shape`.
    pub fn dequantize(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name).ok_or_else(|| self.tensor_error(name, "missing"))?;
        if info.shape() != shape {
            return Err(self
                .tensor_error(name, format!("has shape {:?}, expected {shape:?}", info.shape())));
        }
        dequantize(info.ggml_type, self.tensor_bytes(info), info.elements() as usize)
            .map_err(|reason| self.tensor_error(name, reason))
    }
}

/// A parse failure: the byte offset and the reason.
type ParseError = (u64, String);

/// The result of [`parse`]: the version, the metadata and the tensor table.
type Parsed = (u32, BTreeMap<String, Value>, Vec<TensorInfo>);

/// Parses the header, metadata and tensor table of a GGUF file held in `bytes`.
fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err((0, format!("the file starts with {magic:02x?}, not the GGUF magic \"GGUF\"")));
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err((4, "version 1 files (before August 2023) are not supported".into())),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err((4, "big-endian GGUF files are not supported".into()))
        }
        v => return Err((4, format!("version {v} is not supported; versions 2 and 3 are"))),
    }
    let tensor_count = r.count("tensor count", 8 + 4 + 4 + 8)?;
    let kv_count = r.count("metadata count", 8 + 4)?;

    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let at = r.pos as u64;
        let key = r.string("metadata key")?;
        let kind = r.u32("metadata value type")?;
        let value = r.value(kind, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err((at, format!("metadata key `{key}` appears twice")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
            _ => {
                return Err((
                    r.pos as u64,
                    format!("general.alignment {v:?} is not a power of two up to 1 MiB"),
                ))
            }
        },
    };

    let mut infos = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let at = r.pos as u64;
        let name = r.string("tensor name")?;
        let n_dims = r.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err((
                at,
                format!("tensor `{name}` has rank {n_dims}, expected 1 to {MAX_DIMS}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("tensor dimension")?);
        }
        let raw_type = r.u32("tensor type")?;
        let offset = r.u64("tensor offset")?;
        infos.push((at, name, dims, raw_type, offset));
    }

    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(infos.len());
    let mut seen = std::collections::HashSet::new();
    for (at, name, dims, raw_type, offset) in infos {
        let fail = |reason: String| (at, format!("tensor `{name}`: {reason}"));
        if !seen.insert(name.clone()) {
            return Err(fail("the name appears twice".into()));
        }
        let ggml_type = GgmlType::from_raw(raw_type)
            .ok_or_else(|| fail(format!("unknown element type {raw_type}")))?;
        if dims.contains(&0) {
            return Err(fail(format!("has a zero dimension in {dims:?}")));
        }
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| fail(format!("dimensions {dims:?} overflow")))?;
        let block = ggml_type.block_elements() as u64;
        if dims[0] % block != 0 {
            return Err(fail(format!(
                "rows of {} elements are not a multiple of the {}-element blocks of {}",
                dims[0],
                block,
                ggml_type.name()
            )));
        }
        let len = (elements / block)
            .checked_mul(ggml_type.block_bytes() as u64)
            .ok_or_else(|| fail("data length overflows".into()))?;
        if offset % alignment != 0 {
            return Err(fail(format!(
                "offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let start = data_start
            .checked_add(offset)
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= file_len));
        let Some(start) = start else {
            return Err(fail(format!(
                "data at offset {offset} (+{data_start}) of {len} bytes runs past the end of the {file_len}-byte file"
            )));
        };
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            start: start as usize,
            len: len as usize,
        });
    }
    Ok((version, metadata, tensors))
}

/// A cursor over the file's bytes that reports offsets in its errors.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], ParseError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err((
                self.pos as u64,
                format!("{what} needs {n} bytes but the file ends {left} bytes further"),
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ParseError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads a u64 count of items that take at least `min_bytes` each, rejecting counts the rest
    /// of the file cannot hold.
    fn count(&mut self, what: &str, min_bytes: u64) -> Result<usize, ParseError> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left / min_bytes.max(1) {
            return Err((
                at,
                format!("{what} {n} is more than the {left} remaining bytes can hold"),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        let at = self.pos as u64;
        let len = self.u64(what)?;
        let raw = self
            .take(len, what)
            .map_err(|_| (at, format!("{what} of {len} bytes runs past the end of the file")))?;
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value, ParseError> {
        let at = self.pos as u64;
        Ok(match kind {
            0 => Value::UInt(u8::from_le_bytes(self.array("uint8")?).into()),
            1 => Value::Int(i8::from_le_bytes(self.array("int8")?).into()),
            2 => Value::UInt(u16::from_le_bytes(self.array("uint16")?).into()),
            3 => Value::Int(i16::from_le_bytes(self.array("int16")?).into()),
            4 => Value::UInt(self.u32("uint32")?.into()),
            5 => Value::Int(i32::from_le_bytes(self.array("int32")?).into()),
            6 => Value::Float(f32::from_le_bytes(self.array("float32")?).into()),
            7 => match self.array::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err((at, format!("bool value {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string("string value")?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err((
                        at,
                        format!("arrays nest deeper than {MAX_ARRAY_NESTING} levels"),
                    ));
                }
                let item_kind = self.u32("array element type")?;
                let min_bytes = match item_kind {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10 | 11 | 12 => 8,
                    9 => 12,
                    k => return Err((at, format!("unknown array element type {k}"))),
                };
                let n = self.count("array length", min_bytes)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_kind, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::UInt(self.u64("uint64")?),
            11 => Value::Int(i64::from_le_bytes(self.array("int64")?)),
            12 => Value::Float(f64::from_le_bytes(self.array("float64")?)),
            k => return Err((at, format!("unknown metadata value type {k}"))),
        })
    }
}

#[cfg(test)]
mod tests;
