//! Reading Marian's binary model format.
//!
//! Layout (all integers little-endian), as Marian 1.9 writes it:
//!
//! 1. `u64` format version (1) and `u64` tensor count `n`;
//! 2. `n` headers of four `u64`: name length (with its NUL), element type, rank, data length;
//! 3. the `n` NUL-terminated names, then the `n` shapes as `i32` dimensions;
//! 4. a `u64` padding length and that many padding bytes, so that the data starts aligned;
//! 5. the data of each tensor in header order, `data length` bytes each (padded to 256 bytes in
//!    the files seen so far).
//!
//! Element types are Marian's type codes: a class (`0x100` signed, `0x400` float, `0x4000`
//! intgemm) plus the element size in bytes. Intgemm int8 tensors (`0x4101`) store the int8 values
//! followed by one f32 quantization multiplier: a value `q` stands for `q / multiplier`.
//!
//! Every count, length and offset is checked against the file's size before it is used, so a
//! damaged or hostile file gives a [`MarianError`] naming the file and the value, never a panic.

use std::fmt;
use std::path::{Path, PathBuf};

use edgefold_runtime::MappedFile;

use super::config::{parse_yaml, YamlValue};
use super::MarianError;
use crate::file_bytes::FileBytes;

/// The only format version Marian writes.
const FORMAT_VERSION: u64 = 1;

/// Bytes of one tensor header: name length, type, rank and data length, each a `u64`.
const HEADER_BYTES: u64 = 32;

/// Maximum tensor rank. Marian's shapes have at most four dimensions.
const MAX_RANK: u64 = 4;

/// Maximum length of a tensor name in bytes, far above Marian's longest names (about 40).
const MAX_NAME_BYTES: u64 = 4096;

/// Name of the tensor that contains the training configuration as YAML text.
const CONFIG_TENSOR: &str = "special:model.yml";

/// Element type of a tensor, from Marian's type code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ElementType {
    /// `float32` (code `0x404`).
    Float32,
    /// Plain `int8` (code `0x101`), used for the YAML configuration text.
    Int8,
    /// Intgemm `int8` (code `0x4101`): int8 values followed by one f32 quantization multiplier.
    Intgemm8,
    /// Any other type code, such as float16 or packed formats. Its bytes can be read but not
    /// converted.
    Other(u64),
}

impl ElementType {
    fn from_code(code: u64) -> ElementType {
        match code {
            0x404 => ElementType::Float32,
            0x101 => ElementType::Int8,
            0x4101 => ElementType::Intgemm8,
            other => ElementType::Other(other),
        }
    }

    /// Returns the minimum data length of `elements` values of this type.
    fn min_bytes(self, elements: u64) -> Option<u64> {
        match self {
            ElementType::Float32 => elements.checked_mul(4),
            ElementType::Int8 | ElementType::Other(_) => Some(elements),
            ElementType::Intgemm8 => elements.checked_add(4),
        }
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElementType::Float32 => f.write_str("float32"),
            ElementType::Int8 => f.write_str("int8"),
            ElementType::Intgemm8 => f.write_str("intgemm8"),
            ElementType::Other(code) => write!(f, "type code {code:#x}"),
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, such as `encoder_l1_self_Wq`.
    pub name: String,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Element type.
    pub element_type: ElementType,
    /// Byte offset of the data within the file.
    pub start: usize,
    /// Data length in bytes, including any padding after the values.
    pub len: usize,
}

impl TensorInfo {
    /// Returns the number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An int8 matrix with its quantization multiplier, as stored by Marian, in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    /// Number of rows (the first dimension of the tensor's shape).
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` values in row-major order.
    pub values: Vec<i8>,
    /// Quantization multiplier: a value `q` stands for `q / multiplier`.
    pub multiplier: f32,
}

impl Int8Matrix {
    /// Dequantizes the values to f32 in row-major order.
    pub fn to_f32(&self) -> Vec<f32> {
        self.values.iter().map(|&q| f32::from(q) / self.multiplier).collect()
    }
}

/// A Marian model file mapped into memory (or passed in as bytes), with its tensor table parsed.
pub struct MarianFile {
    path: PathBuf,
    file: FileBytes,
    tensors: Vec<TensorInfo>,
    config: Option<Vec<(String, YamlValue)>>,
}

impl fmt::Debug for MarianFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MarianFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("config", &self.config.as_ref().map(Vec::len))
            .finish()
    }
}

impl MarianFile {
    /// Maps and parses `path`, including the YAML configuration when the file has one.
    ///
    /// # Errors
    /// [`MarianError::Io`] when the file cannot be opened, [`MarianError::Format`] when its
    /// structure is invalid, and [`MarianError::Config`] when the embedded YAML is invalid.
    pub fn open(path: &Path) -> Result<MarianFile, MarianError> {
        let file = MappedFile::open(path)
            .map_err(|source| MarianError::Io { path: path.to_path_buf(), source })?;
        MarianFile::from_file_bytes(path, FileBytes::Mapped(file))
    }

    /// Parses a model file that is already in memory, including its YAML configuration. `path`
    /// only names the file in errors and in [`MarianFile::path`], and nothing is read from it.
    ///
    /// # Errors
    /// [`MarianError::Format`] when the structure is invalid, and [`MarianError::Config`] when
    /// the embedded YAML is invalid.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<MarianFile, MarianError> {
        MarianFile::from_file_bytes(path, FileBytes::Owned(bytes))
    }

    fn from_file_bytes(path: &Path, file: FileBytes) -> Result<MarianFile, MarianError> {
        let tensors = parse(file.bytes()).map_err(|(offset, reason)| MarianError::Format {
            path: path.to_path_buf(),
            offset,
            reason,
        })?;
        let mut out = MarianFile { path: path.to_path_buf(), file, tensors, config: None };
        out.config = out.read_config()?;
        Ok(out)
    }

    /// Returns the path the file was opened from, or the one given to [`MarianFile::from_bytes`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the tensor table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Returns the table entry of the tensor `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Returns the raw bytes of a tensor, including padding.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        // The range was checked against the file's length when the table was parsed.
        &self.file.bytes()[info.start..info.start + info.len]
    }

    /// Returns the top-level keys of the embedded YAML configuration in file order, or `None`
    /// when the file has no `special:model.yml` tensor.
    pub fn config(&self) -> Option<&[(String, YamlValue)]> {
        self.config.as_deref()
    }

    /// Returns the value of the configuration key `key`, if the file has a configuration that
    /// contains it.
    pub fn config_value(&self, key: &str) -> Option<&YamlValue> {
        self.config()?.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Builds a [`MarianError::Tensor`] for the tensor `name`.
    pub fn tensor_error(&self, name: &str, reason: impl Into<String>) -> MarianError {
        MarianError::Tensor {
            path: self.path.clone(),
            name: name.to_owned(),
            reason: reason.into(),
        }
    }

    /// Builds a [`MarianError::Config`] for the configuration key `key`.
    pub fn config_error(&self, key: &str, reason: impl Into<String>) -> MarianError {
        MarianError::Config { path: self.path.clone(), key: key.to_owned(), reason: reason.into() }
    }

    fn require(&self, name: &str) -> Result<&TensorInfo, MarianError> {
        self.tensor(name).ok_or_else(|| self.tensor_error(name, "missing"))
    }

    fn check_shape(&self, info: &TensorInfo, shape: Option<&[usize]>) -> Result<(), MarianError> {
        match shape {
            Some(expected) if info.shape != expected => Err(self.tensor_error(
                &info.name,
                format!("has shape {:?}, expected {expected:?}", info.shape),
            )),
            _ => Ok(()),
        }
    }

    /// Returns the int8 values and the quantization multiplier of the intgemm8 matrix `name` in
    /// row-major order, checking its shape when `shape` is given.
    ///
    /// Intgemm8 matrices are stored transposed (column-major), the layout of the right-hand
    /// operand of an int8 matrix product. `Wemb` is the exception: the output layer multiplies
    /// by its transpose, so it is stored with one embedding per row.
    ///
    /// # Errors
    /// [`MarianError::Tensor`] when the tensor is missing, is not an intgemm8 matrix, has
    /// another shape, or has a multiplier that is not a positive finite number.
    pub fn int8_matrix(
        &self,
        name: &str,
        shape: Option<&[usize]>,
    ) -> Result<Int8Matrix, MarianError> {
        let info = self.require(name)?;
        self.check_shape(info, shape)?;
        if info.element_type != ElementType::Intgemm8 {
            return Err(self.tensor_error(
                name,
                format!("has element type {}, expected intgemm8", info.element_type),
            ));
        }
        let (rows, cols) = match info.shape[..] {
            [rows, cols] => (rows, cols),
            [n] => (1, n),
            _ => {
                return Err(self
                    .tensor_error(name, format!("has shape {:?}, expected a matrix", info.shape)))
            }
        };
        let bytes = self.tensor_bytes(info);
        let count = rows * cols;
        // Parsing checked that the data contains the values and the 4-byte multiplier.
        let raw = &bytes[..count];
        let multiplier = f32::from_le_bytes(bytes[count..count + 4].try_into().unwrap());
        if !(multiplier.is_finite() && multiplier > 0.0) {
            return Err(self.tensor_error(
                name,
                format!("quantization multiplier {multiplier} is not a positive finite number"),
            ));
        }
        let mut values = vec![0i8; count];
        if name == "Wemb" {
            for (v, &b) in values.iter_mut().zip(raw) {
                *v = b as i8;
            }
        } else {
            for (j, column) in raw.chunks_exact(rows.max(1)).enumerate() {
                for (i, &b) in column.iter().enumerate() {
                    values[i * cols + j] = b as i8;
                }
            }
        }
        Ok(Int8Matrix { rows, cols, values, multiplier })
    }

    /// Returns the tensor `name` as f32 values in row-major order, dequantizing int8 matrices,
    /// and checks its shape when `shape` is given.
    ///
    /// # Errors
    /// [`MarianError::Tensor`] when the tensor is missing, has another shape, has an element
    /// type other than float32 or intgemm8, or contains a non-finite value.
    pub fn tensor_f32(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<f32>, MarianError> {
        let info = self.require(name)?;
        self.check_shape(info, shape)?;
        let values = match info.element_type {
            ElementType::Float32 => self.tensor_bytes(info)[..info.elements() * 4]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect::<Vec<f32>>(),
            ElementType::Intgemm8 => self.int8_matrix(name, None)?.to_f32(),
            other => {
                return Err(self.tensor_error(
                    name,
                    format!("has element type {other}, which cannot be converted to f32"),
                ))
            }
        };
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.tensor_error(name, format!("value {at} is {}", values[at])));
        }
        Ok(values)
    }

    fn read_config(&self) -> Result<Option<Vec<(String, YamlValue)>>, MarianError> {
        let Some(info) = self.tensor(CONFIG_TENSOR) else { return Ok(None) };
        let bytes = self.tensor_bytes(info);
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(&bytes[..end])
            .map_err(|e| self.tensor_error(CONFIG_TENSOR, format!("is not UTF-8 text: {e}")))?;
        let entries = parse_yaml(text).map_err(|(line, reason)| {
            self.config_error(CONFIG_TENSOR, format!("line {line}: {reason}"))
        })?;
        Ok(Some(entries))
    }
}

/// A parse failure: the byte offset and the reason.
type ParseError = (u64, String);

/// One tensor header before its name and shape are read.
struct Header {
    at: u64,
    name_len: u64,
    type_code: u64,
    rank: u64,
    data_len: u64,
}

/// Parses the headers, names and shapes, and checks every tensor's data range.
fn parse(bytes: &[u8]) -> Result<Vec<TensorInfo>, ParseError> {
    let mut r = Reader { bytes, pos: 0 };
    let version = r.u64("format version")?;
    if version != FORMAT_VERSION {
        return Err((0, format!("format version {version} is not supported; version 1 is")));
    }
    let count = r.count("tensor count", HEADER_BYTES)?;

    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let at = r.pos as u64;
        let name_len = r.u64("name length")?;
        let type_code = r.u64("element type")?;
        let rank = r.u64("rank")?;
        let data_len = r.u64("data length")?;
        if name_len == 0 || name_len > MAX_NAME_BYTES {
            return Err((at, format!("name length {name_len} is not in 1..={MAX_NAME_BYTES}")));
        }
        if rank == 0 || rank > MAX_RANK {
            return Err((at, format!("rank {rank} is not in 1..={MAX_RANK}")));
        }
        headers.push(Header { at, name_len, type_code, rank, data_len });
    }

    let mut names = Vec::with_capacity(count);
    let mut seen = std::collections::HashSet::new();
    for h in &headers {
        let at = r.pos as u64;
        let raw = r.take(h.name_len, "tensor name")?;
        let trimmed = raw.split(|&b| b == 0).next().unwrap_or_default();
        let name = std::str::from_utf8(trimmed)
            .map_err(|_| (at, format!("tensor name {trimmed:02x?} is not UTF-8")))?
            .to_owned();
        if !seen.insert(name.clone()) {
            return Err((at, format!("tensor name `{name}` appears twice")));
        }
        names.push(name);
    }

    let mut shapes = Vec::with_capacity(count);
    for (h, name) in headers.iter().zip(&names) {
        let at = r.pos as u64;
        let mut shape = Vec::with_capacity(h.rank as usize);
        for _ in 0..h.rank {
            let dim = i32::from_le_bytes(r.array("tensor dimension")?);
            if dim <= 0 {
                return Err((at, format!("tensor `{name}` has dimension {dim}")));
            }
            shape.push(dim as usize);
        }
        shapes.push(shape);
    }

    let padding = r.u64("padding length")?;
    r.take(padding, "padding")?;

    let mut tensors = Vec::with_capacity(count);
    for ((h, name), shape) in headers.iter().zip(names).zip(shapes) {
        let element_type = ElementType::from_code(h.type_code);
        let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let needed = elements.and_then(|e| element_type.min_bytes(e));
        let Some(needed) = needed else {
            return Err((h.at, format!("tensor `{name}`: shape {shape:?} overflows")));
        };
        if h.data_len < needed {
            return Err((
                h.at,
                format!(
                    "tensor `{name}`: {} of shape {shape:?} needs {needed} bytes, but the \
                     header gives {}",
                    element_type, h.data_len
                ),
            ));
        }
        let start = r.pos;
        r.take(h.data_len, &format!("data of tensor `{name}`")).map_err(|(at, reason)| {
            (at, format!("{reason}; the file is truncated or the header is damaged"))
        })?;
        tensors.push(TensorInfo { name, shape, element_type, start, len: h.data_len as usize });
    }
    Ok(tensors)
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
                format!("{what} needs {n} bytes, but the file ends {left} bytes further"),
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
}
