//! Reading and writing NumPy `.npy` arrays, and reading `.npz` archives of them.
//!
//! The reader accepts format versions 1.0, 2.0 and 3.0 in C order. It converts each dtype to
//! the nearest [`TensorData`] variant: `f2`, `f4` and `f8` to f32, `i4` to i32, `b1` to bool and
//! the other integer types (`i1`, `u1`, `i2`, `u2`, `u4`, `i8`) to i64. Both byte orders are
//! read. The writer emits version 1.0 (2.0 when the header exceeds 65,535 bytes) with
//! little-endian data, byte for byte as `numpy.save` does.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::tensor::{HostTensor, TensorData};

/// First six bytes of every `.npy` file.
const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// NumPy pads the preamble and header to a multiple of this many bytes so that the data is
/// aligned.
const HEADER_ALIGNMENT: usize = 64;

/// Maximum nesting of brackets in a header. NumPy headers nest at most a few levels (structured
/// dtypes), and the limit keeps a hostile header from exhausting the stack.
const MAX_NESTING: usize = 32;

/// Number of header characters that an error message quotes.
const HEADER_QUOTE_CHARS: usize = 200;

/// Errors from reading or writing `.npy` and `.npz` files.
#[derive(Debug)]
#[non_exhaustive]
pub enum NpyError {
    /// Reading or writing a file failed.
    Io {
        /// File being read or written.
        path: PathBuf,
        /// Underlying I/O error.
        source: io::Error,
    },
    /// An `.npz` file is not a valid zip archive.
    Zip {
        /// Archive being read.
        path: PathBuf,
        /// Error reported by the `zip` crate.
        source: zip::result::ZipError,
    },
    /// The bytes are not a supported `.npy` array.
    Format {
        /// File the bytes came from, or `None` for [`parse_npy`].
        path: Option<PathBuf>,
        /// Archive member the bytes came from, for `.npz` files.
        member: Option<String>,
        /// Reason the bytes are rejected.
        error: FormatError,
    },
    /// The tensor to write has a data length that differs from the product of its shape.
    InvalidTensor {
        /// Destination file.
        path: PathBuf,
        /// Shape of the tensor.
        shape: Vec<usize>,
        /// Number of stored elements.
        len: usize,
    },
}

impl fmt::Display for NpyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NpyError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            NpyError::Zip { path, source } => {
                write!(f, "{}: invalid .npz archive: {source}", path.display())
            }
            NpyError::Format { path: Some(path), member: Some(member), error } => {
                write!(f, "{}: member {member}: {error}", path.display())
            }
            NpyError::Format { path: Some(path), member: None, error } => {
                write!(f, "{}: {error}", path.display())
            }
            NpyError::Format { path: None, error, .. } => write!(f, "invalid .npy data: {error}"),
            NpyError::InvalidTensor { path, shape, len } => write!(
                f,
                "cannot write {}: shape {shape:?} needs {} elements, but the tensor stores {len}",
                path.display(),
                shape.iter().product::<usize>()
            ),
        }
    }
}

/// `source()` is left at `None` because every message already ends with its cause's message, and
/// a reporter that walks the chain (anyhow's `{:#}`) would print that cause twice.
impl std::error::Error for NpyError {}

/// Ways in which bytes fail to be a supported `.npy` array.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The bytes end inside the preamble or the header.
    Truncated {
        /// Number of bytes present.
        len: usize,
        /// Number of bytes the preamble and header need.
        needed: usize,
    },
    /// The bytes do not start with `\x93NUMPY`.
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// The format version is not 1.0, 2.0 or 3.0.
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// A version 3.0 header is not valid UTF-8.
    HeaderNotUtf8,
    /// The header is not a dictionary with `descr`, `fortran_order` and `shape`.
    InvalidHeader {
        /// Start of the header text.
        header: String,
        /// Reason the header is rejected.
        reason: String,
    },
    /// The dtype is not one that the reader converts.
    UnsupportedDtype {
        /// The `descr` value of the header.
        descr: String,
    },
    /// The array is stored in Fortran (column-major) order.
    FortranOrder,
    /// The byte size of the shape overflows `usize`.
    ShapeOverflow {
        /// The shape from the header.
        shape: Vec<usize>,
    },
    /// The data after the header is shorter or longer than the shape and dtype need.
    DataLength {
        /// The `descr` value of the header.
        descr: String,
        /// The shape from the header.
        shape: Vec<usize>,
        /// Number of data bytes the shape and dtype need.
        expected: usize,
        /// Number of data bytes present.
        found: usize,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Truncated { len, needed } => {
                write!(f, "truncated: {len} bytes, but the preamble and header need {needed}")
            }
            FormatError::BadMagic { found } => write!(
                f,
                "not a .npy file: expected the magic string \\x93NUMPY, found \"{}\"",
                found.escape_ascii()
            ),
            FormatError::UnsupportedVersion { major, minor } => write!(
                f,
                "unsupported .npy format version {major}.{minor}, expected 1.0, 2.0 or 3.0"
            ),
            FormatError::HeaderNotUtf8 => write!(f, "the version 3.0 header is not valid UTF-8"),
            FormatError::InvalidHeader { header, reason } => {
                write!(f, "invalid header {header:?}: {reason}")
            }
            FormatError::UnsupportedDtype { descr } => write!(
                f,
                "unsupported dtype {descr:?}: expected f2, f4, f8, i1, u1, i2, u2, i4, u4, i8 or \
                 b1, in either byte order"
            ),
            FormatError::FortranOrder => write!(
                f,
                "the array is in Fortran order (fortran_order: True), which is not supported. \
                 Save a C-order copy made with numpy.ascontiguousarray"
            ),
            FormatError::ShapeOverflow { shape } => {
                write!(f, "shape {shape:?} is too large: its byte size overflows usize")
            }
            FormatError::DataLength { descr, shape, expected, found } => write!(
                f,
                "array data is {found} bytes, but shape {shape:?} of dtype {descr} needs {expected}"
            ),
        }
    }
}

impl std::error::Error for FormatError {}

/// Reads a `.npy` file.
///
/// # Errors
/// [`NpyError::Io`] when the file cannot be read, and [`NpyError::Format`] naming the file
/// when its contents are not a supported array (see [`parse_npy`]).
pub fn read_npy(path: &Path) -> Result<HostTensor, NpyError> {
    let bytes = std::fs::read(path).map_err(|source| io_error(path, source))?;
    parse_array(&bytes).map_err(|error| NpyError::Format {
        path: Some(path.to_path_buf()),
        member: None,
        error,
    })
}

/// Parses the bytes of a `.npy` file.
///
/// `f8` values outside the f32 range become infinite, and the other `f8` values are rounded
/// to the nearest f32.
///
/// # Errors
/// [`NpyError::Format`] when the bytes are truncated, lack the magic string, have an unknown
/// version, an invalid header, an unsupported dtype, Fortran order, or data whose length
/// differs from what the shape needs.
pub fn parse_npy(bytes: &[u8]) -> Result<HostTensor, NpyError> {
    parse_array(bytes).map_err(|error| NpyError::Format { path: None, member: None, error })
}

/// Reads every array of an `.npz` archive, in archive order.
///
/// Each name is the member's file name without its `.npy` suffix, as `numpy.load` reports it.
/// Both stored and deflated members are read.
///
/// # Errors
/// [`NpyError::Io`] when the file cannot be read, [`NpyError::Zip`] when it is not a zip
/// archive, and [`NpyError::Format`] naming the member that is not a supported array.
pub fn read_npz(path: &Path) -> Result<Vec<(String, HostTensor)>, NpyError> {
    let file = File::open(path).map_err(|source| io_error(path, source))?;
    let zip_error = |source| NpyError::Zip { path: path.to_path_buf(), source };
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(zip_error)?;

    let mut arrays = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let mut member = archive.by_index(index).map_err(zip_error)?;
        if member.is_dir() {
            continue;
        }
        let name = member.name().to_string();
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).map_err(|source| io_error(path, source))?;

        let tensor = parse_array(&bytes).map_err(|error| NpyError::Format {
            path: Some(path.to_path_buf()),
            member: Some(name.clone()),
            error,
        })?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        arrays.push((key, tensor));
    }
    Ok(arrays)
}

/// Writes a tensor as a `.npy` file.
///
/// The bytes go to a temporary file in the same directory, which is then renamed over `path`,
/// so a failed write leaves no partial file behind.
///
/// # Errors
/// [`NpyError::InvalidTensor`] when the data length differs from the product of the shape, and
/// [`NpyError::Io`] when writing or renaming fails.
///
/// # Panics
/// Panics if the header exceeds 4 GiB, as [`to_npy_bytes`] does.
pub fn write_npy(path: &Path, t: &HostTensor) -> Result<(), NpyError> {
    let len = data_len(&t.data);
    if len != t.len() {
        return Err(NpyError::InvalidTensor {
            path: path.to_path_buf(),
            shape: t.shape.clone(),
            len,
        });
    }
    let bytes = to_npy_bytes(t);
    write_through_temporary(path, &bytes).map_err(|source| io_error(path, source))
}

/// Encodes a tensor as the bytes of a version 1.0 `.npy` file, or version 2.0 when the header
/// does not fit in 65,535 bytes.
///
/// The output matches `numpy.save` byte for byte: dtypes `<f4`, `<i8`, `<i4` and `|b1`, C order
/// and a header padded with spaces to a multiple of 64 bytes.
///
/// # Panics
/// Panics if the data length differs from the product of the shape, or if the header exceeds
/// 4 GiB (a shape with hundreds of millions of axes).
pub fn to_npy_bytes(t: &HostTensor) -> Vec<u8> {
    let len = data_len(&t.data);
    assert_eq!(len, t.len(), "tensor of shape {:?} stores {len} elements", t.shape);

    let (descr, payload) = encode_data(&t.data);
    let mut bytes = encode_preamble(&header_dict(descr, &t.shape));
    bytes.extend_from_slice(&payload);
    bytes
}

fn io_error(path: &Path, source: io::Error) -> NpyError {
    NpyError::Io { path: path.to_path_buf(), source }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// A supported element type of a `.npy` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F16,
    F32,
    F64,
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    Bool,
}

impl Dtype {
    fn item_size(self) -> usize {
        match self {
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            Dtype::F16 | Dtype::I16 | Dtype::U16 => 2,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }
}

/// Parses a dtype string such as `<f4`, `>i8` or `|b1` into the type and whether it is
/// big-endian. The byte-order mark `|` ("not applicable") is accepted for one-byte types only.
fn parse_descr(descr: &str) -> Option<(Dtype, bool)> {
    let mut chars = descr.chars();
    let order = chars.next()?;
    let kind = chars.next()?;
    let dtype = match (kind, chars.as_str()) {
        ('f', "2") => Dtype::F16,
        ('f', "4") => Dtype::F32,
        ('f', "8") => Dtype::F64,
        ('i', "1") => Dtype::I8,
        ('u', "1") => Dtype::U8,
        ('i', "2") => Dtype::I16,
        ('u', "2") => Dtype::U16,
        ('i', "4") => Dtype::I32,
        ('u', "4") => Dtype::U32,
        ('i', "8") => Dtype::I64,
        ('b', "1") => Dtype::Bool,
        _ => return None,
    };
    let big_endian = match order {
        '<' => false,
        '>' => true,
        '|' if dtype.item_size() == 1 => false,
        _ => return None,
    };
    Some((dtype, big_endian))
}

/// The parts of a header that the reader uses.
#[derive(Debug)]
struct Header {
    descr: String,
    dtype: Dtype,
    big_endian: bool,
    shape: Vec<usize>,
}

fn parse_array(bytes: &[u8]) -> Result<HostTensor, FormatError> {
    let (header_text, data) = split_header(bytes)?;
    let header = parse_header(&header_text)?;

    let overflow = || FormatError::ShapeOverflow { shape: header.shape.clone() };
    let count = header.shape.iter().try_fold(1usize, |product, &dim| product.checked_mul(dim));
    let count = count.ok_or_else(overflow)?;
    let expected = count.checked_mul(header.dtype.item_size()).ok_or_else(overflow)?;
    if data.len() != expected {
        return Err(FormatError::DataLength {
            descr: header.descr,
            shape: header.shape,
            expected,
            found: data.len(),
        });
    }

    let data = decode_data(header.dtype, header.big_endian, data);
    Ok(HostTensor { shape: header.shape, data })
}

/// Checks the preamble and splits the bytes into the header text and the array data.
fn split_header(bytes: &[u8]) -> Result<(String, &[u8]), FormatError> {
    let prefix = &bytes[..bytes.len().min(MAGIC.len())];
    if prefix != &MAGIC[..prefix.len()] {
        return Err(FormatError::BadMagic { found: prefix.to_vec() });
    }
    if bytes.len() < MAGIC.len() + 2 {
        return Err(FormatError::Truncated { len: bytes.len(), needed: MAGIC.len() + 2 });
    }

    let (major, minor) = (bytes[6], bytes[7]);
    let length_size = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => return Err(FormatError::UnsupportedVersion { major, minor }),
    };
    let start = MAGIC.len() + 2 + length_size;
    let Some(length_bytes) = bytes.get(MAGIC.len() + 2..start) else {
        return Err(FormatError::Truncated { len: bytes.len(), needed: start });
    };

    // The header length is a little-endian u16 in version 1.0 and u32 afterwards.
    let header_len = length_bytes.iter().rev().fold(0usize, |len, &b| (len << 8) | usize::from(b));
    let end = start.saturating_add(header_len);
    let Some(header) = bytes.get(start..end) else {
        return Err(FormatError::Truncated { len: bytes.len(), needed: end });
    };

    // Versions 1.0 and 2.0 store the header in Latin-1, whose bytes are the first 256 code
    // points, and version 3.0 stores it in UTF-8.
    let text = if major == 3 {
        String::from_utf8(header.to_vec()).map_err(|_| FormatError::HeaderNotUtf8)?
    } else {
        header.iter().map(|&b| char::from(b)).collect()
    };
    Ok((text, &bytes[end..]))
}

/// Interprets the header dictionary. Like NumPy, it requires exactly the keys `descr`,
/// `fortran_order` and `shape`.
fn parse_header(text: &str) -> Result<Header, FormatError> {
    let invalid = |reason: String| FormatError::InvalidHeader {
        header: text.chars().take(HEADER_QUOTE_CHARS).collect(),
        reason,
    };
    let Literal::Dict(entries) = LiteralParser::parse(text).map_err(invalid)? else {
        return Err(invalid("expected a dictionary".to_string()));
    };

    let mut descr = None;
    let mut fortran_order = None;
    let mut shape = None;
    for (key, value) in entries {
        let slot = match key.as_str() {
            "descr" => &mut descr,
            "fortran_order" => &mut fortran_order,
            "shape" => &mut shape,
            _ => return Err(invalid(format!("unexpected key {key:?}"))),
        };
        if slot.replace(value).is_some() {
            return Err(invalid(format!("duplicate key {key:?}")));
        }
    }
    let missing = |key: &str| invalid(format!("missing key {key:?}"));
    let descr = descr.ok_or_else(|| missing("descr"))?;
    let fortran_order = fortran_order.ok_or_else(|| missing("fortran_order"))?;
    let shape = shape.ok_or_else(|| missing("shape"))?;

    match fortran_order {
        Literal::Bool(false) => {}
        Literal::Bool(true) => return Err(FormatError::FortranOrder),
        other => return Err(invalid(format!("fortran_order is {other:?}, expected a bool"))),
    }
    let shape = parse_shape(shape).map_err(invalid)?;

    let descr = match descr {
        Literal::Str(descr) => descr,
        // A list describes a structured dtype.
        other => return Err(FormatError::UnsupportedDtype { descr: format!("{other:?}") }),
    };
    let Some((dtype, big_endian)) = parse_descr(&descr) else {
        return Err(FormatError::UnsupportedDtype { descr });
    };
    Ok(Header { descr, dtype, big_endian, shape })
}

fn parse_shape(shape: Literal) -> Result<Vec<usize>, String> {
    let Literal::Tuple(dims) = shape else {
        return Err(format!("shape is {shape:?}, expected a tuple"));
    };
    dims.into_iter()
        .map(|dim| match dim {
            Literal::Int(value) => usize::try_from(value)
                .map_err(|_| format!("shape dimension {value} is not a non-negative integer")),
            other => Err(format!("shape dimension {other:?} is not an integer")),
        })
        .collect()
}

fn decode_data(dtype: Dtype, big_endian: bool, data: &[u8]) -> TensorData {
    let order = big_endian;
    match dtype {
        Dtype::F16 => {
            TensorData::F32(decode_items(data, order, |b| half::f16::from_le_bytes(b).to_f32()))
        }
        Dtype::F32 => TensorData::F32(decode_items(data, order, f32::from_le_bytes)),
        Dtype::F64 => TensorData::F32(decode_items(data, order, |b| f64::from_le_bytes(b) as f32)),
        Dtype::I8 => TensorData::I64(data.iter().map(|&b| i64::from(b as i8)).collect()),
        Dtype::U8 => TensorData::I64(data.iter().map(|&b| i64::from(b)).collect()),
        Dtype::I16 => {
            TensorData::I64(decode_items(data, order, |b| i64::from(i16::from_le_bytes(b))))
        }
        Dtype::U16 => {
            TensorData::I64(decode_items(data, order, |b| i64::from(u16::from_le_bytes(b))))
        }
        Dtype::I32 => TensorData::I32(decode_items(data, order, i32::from_le_bytes)),
        Dtype::U32 => {
            TensorData::I64(decode_items(data, order, |b| i64::from(u32::from_le_bytes(b))))
        }
        Dtype::I64 => TensorData::I64(decode_items(data, order, i64::from_le_bytes)),
        // NumPy writes booleans as 0 or 1 and treats any other byte as true, so this does too.
        Dtype::Bool => TensorData::Bool(data.iter().map(|&b| b != 0).collect()),
    }
}

/// Converts each `N`-byte item with `from_le`, reversing the bytes first when the data is
/// big-endian. The caller has checked that `data.len()` is a multiple of `N`.
fn decode_items<const N: usize, T>(
    data: &[u8],
    big_endian: bool,
    from_le: impl Fn([u8; N]) -> T,
) -> Vec<T> {
    data.chunks_exact(N)
        .map(|chunk| {
            let mut item = [0u8; N];
            item.copy_from_slice(chunk);
            if big_endian {
                item.reverse();
            }
            from_le(item)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Header literal parser

/// A value of the Python literal subset that `.npy` headers use.
#[derive(Debug, PartialEq)]
enum Literal {
    Str(String),
    Bool(bool),
    None,
    Int(i64),
    Tuple(Vec<Literal>),
    List(Vec<Literal>),
    Dict(Vec<(String, Literal)>),
}

/// Recursive-descent parser for Python literals: strings, integers (with the `L` suffix of
/// Python 2), `True`, `False`, `None`, tuples, lists and dictionaries with string keys.
/// Errors are messages that give the character offset.
struct LiteralParser {
    chars: Vec<char>,
    pos: usize,
}

impl LiteralParser {
    fn parse(text: &str) -> Result<Literal, String> {
        let mut parser = LiteralParser { chars: text.chars().collect(), pos: 0 };
        let value = parser.value(0)?;
        parser.skip_whitespace();
        if parser.pos < parser.chars.len() {
            return Err(parser.unexpected("the end of the header"));
        }
        Ok(value)
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn unexpected(&self, expected: &str) -> String {
        match self.peek() {
            Some(c) => format!("expected {expected} at offset {}, found {c:?}", self.pos),
            None => format!("expected {expected} at offset {}, found the end", self.pos),
        }
    }

    fn expect(&mut self, expected: char) -> Result<(), String> {
        self.skip_whitespace();
        if self.peek() != Some(expected) {
            return Err(self.unexpected(&format!("{expected:?}")));
        }
        self.pos += 1;
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Literal, String> {
        if depth > MAX_NESTING {
            return Err(format!("nesting deeper than {MAX_NESTING} levels at offset {}", self.pos));
        }
        self.skip_whitespace();
        match self.peek() {
            Some('{') => self.dict(depth),
            Some('(') => self.tuple(depth),
            Some('[') => {
                let (items, _) = self.sequence(']', depth)?;
                Ok(Literal::List(items))
            }
            Some(quote @ ('\'' | '"')) => self.string(quote).map(Literal::Str),
            Some(c) if c == '-' || c.is_ascii_digit() => self.integer(),
            Some(c) if c.is_ascii_alphabetic() => self.keyword(),
            _ => Err(self.unexpected("a value")),
        }
    }

    /// Parses `(...)`. As in Python, parentheses around a single value without a comma are
    /// grouping, not a tuple.
    fn tuple(&mut self, depth: usize) -> Result<Literal, String> {
        let (mut items, had_comma) = self.sequence(')', depth)?;
        if items.len() == 1 && !had_comma {
            return Ok(items.remove(0));
        }
        Ok(Literal::Tuple(items))
    }

    /// Parses comma-separated values from an opening bracket to `close`, allowing a trailing
    /// comma. Also returns whether any comma was seen.
    fn sequence(&mut self, close: char, depth: usize) -> Result<(Vec<Literal>, bool), String> {
        self.pos += 1;
        let mut items = Vec::new();
        let mut had_comma = false;
        loop {
            self.skip_whitespace();
            if self.peek() == Some(close) {
                self.pos += 1;
                return Ok((items, had_comma));
            }
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(',') => {
                    self.pos += 1;
                    had_comma = true;
                }
                Some(c) if c == close => {}
                _ => return Err(self.unexpected(&format!("',' or {close:?}"))),
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Result<Literal, String> {
        self.pos += 1;
        let mut entries = Vec::new();
        loop {
            self.skip_whitespace();
            match self.peek() {
                Some('}') => {
                    self.pos += 1;
                    return Ok(Literal::Dict(entries));
                }
                Some(quote @ ('\'' | '"')) => {
                    let key = self.string(quote)?;
                    self.expect(':')?;
                    entries.push((key, self.value(depth + 1)?));
                }
                _ => return Err(self.unexpected("a string key or '}'")),
            }
            self.skip_whitespace();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {}
                _ => return Err(self.unexpected("',' or '}'")),
            }
        }
    }

    /// Parses a quoted string. A backslash keeps the next character literally, which covers
    /// the escaped quotes and backslashes that a dtype field name could contain.
    fn string(&mut self, quote: char) -> Result<String, String> {
        let start = self.pos;
        self.pos += 1;
        let mut text = String::new();
        loop {
            match self.peek() {
                None => return Err(format!("unterminated string starting at offset {start}")),
                Some('\\') => {
                    self.pos += 1;
                    if let Some(c) = self.peek() {
                        text.push(c);
                        self.pos += 1;
                    }
                }
                Some(c) => {
                    self.pos += 1;
                    if c == quote {
                        return Ok(text);
                    }
                    text.push(c);
                }
            }
        }
    }

    fn integer(&mut self) -> Result<Literal, String> {
        let start = self.pos;
        if self.peek() == Some('-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        let digits: String = self.chars[start..self.pos].iter().collect();
        if matches!(self.peek(), Some('L' | 'l')) {
            self.pos += 1;
        }
        digits
            .parse::<i64>()
            .map(Literal::Int)
            .map_err(|_| format!("invalid integer {digits:?} at offset {start}"))
    }

    fn keyword(&mut self) -> Result<Literal, String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            self.pos += 1;
        }
        let word: String = self.chars[start..self.pos].iter().collect();
        match word.as_str() {
            "True" => Ok(Literal::Bool(true)),
            "False" => Ok(Literal::Bool(false)),
            "None" => Ok(Literal::None),
            _ => Err(format!("unknown name {word:?} at offset {start}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

fn data_len(data: &TensorData) -> usize {
    match data {
        TensorData::F32(values) => values.len(),
        TensorData::I64(values) => values.len(),
        TensorData::I32(values) => values.len(),
        TensorData::Bool(values) => values.len(),
    }
}

/// Returns the dtype string and the little-endian bytes of the elements.
fn encode_data(data: &TensorData) -> (&'static str, Vec<u8>) {
    match data {
        TensorData::F32(values) => ("<f4", values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        TensorData::I64(values) => ("<i8", values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        TensorData::I32(values) => ("<i4", values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        TensorData::Bool(values) => ("|b1", values.iter().map(|&v| u8::from(v)).collect()),
    }
}

/// Formats the header dictionary as `numpy.save` does, shape as a Python tuple.
fn header_dict(descr: &str, shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
}

/// Builds the magic string, version, header length and the header padded with spaces and a
/// final newline to a multiple of [`HEADER_ALIGNMENT`] bytes.
fn encode_preamble(dict: &str) -> Vec<u8> {
    let (major, length_size) =
        if padded_header_len(dict, 2) <= usize::from(u16::MAX) { (1u8, 2) } else { (2u8, 4) };
    let header_len = padded_header_len(dict, length_size);
    let total_len = MAGIC.len() + 2 + length_size + header_len;

    let mut bytes = Vec::with_capacity(total_len);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[major, 0]);
    if length_size == 2 {
        bytes.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        let header_len = u32::try_from(header_len).expect("the .npy header exceeds 4 GiB");
        bytes.extend_from_slice(&header_len.to_le_bytes());
    }
    bytes.extend_from_slice(dict.as_bytes());
    bytes.resize(total_len - 1, b' ');
    bytes.push(b'\n');
    bytes
}

/// Length of the header text after padding, for a preamble whose length field has
/// `length_size` bytes.
fn padded_header_len(dict: &str, length_size: usize) -> usize {
    let preamble = MAGIC.len() + 2 + length_size;
    let total = (preamble + dict.len() + 1).next_multiple_of(HEADER_ALIGNMENT);
    total - preamble
}

/// Writes `bytes` to a new temporary file beside `path`, flushes it to disk and renames it over
/// `path`. The temporary file is removed when a step after its creation fails.
fn write_through_temporary(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    let Some(file_name) = path.file_name() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"));
    };
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temporary_name = OsString::from(".");
    temporary_name.push(file_name);
    let suffix = format!(".tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    temporary_name.push(suffix);
    let temporary = directory.join(temporary_name);

    let mut file = File::create_new(&temporary)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    let result = written.and_then(|()| std::fs::rename(&temporary, path));
    if result.is_err() {
        // The write error matters more than a failure to clean up, so this one is ignored.
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/npy");
    const KWS_NPZ: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/mlperf-tiny/kws_ref_model.npz");

    fn fixture(name: &str) -> PathBuf {
        Path::new(FIXTURES).join(name)
    }

    fn read_fixture(name: &str) -> HostTensor {
        read_npy(&fixture(name)).unwrap_or_else(|error| panic!("{error}"))
    }

    fn format_error(result: Result<HostTensor, NpyError>) -> FormatError {
        match result {
            Err(NpyError::Format { error, .. }) => error,
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    /// Builds version 1.0 `.npy` bytes from a header text and data, padding like NumPy.
    fn npy_with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = encode_preamble(header);
        bytes.extend_from_slice(data);
        bytes
    }

    /// Returns a directory under the system temporary directory that is unique to this test.
    fn temporary_directory(name: &str) -> PathBuf {
        let directory =
            std::env::temp_dir().join(format!("edgefold-npy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        directory
    }

    fn matrix_2x3() -> HostTensor {
        HostTensor::f32(vec![2, 3], vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    }

    #[test]
    fn read_f4_every_version_and_byte_order() {
        for name in ["f4_2x3.npy", "f4_2x3_v2.npy", "f4_2x3_v3.npy", "f4_2x3_big_endian.npy"] {
            assert_eq!(read_fixture(name), matrix_2x3(), "{name}");
        }
    }

    #[test]
    fn read_f8_rounds_to_f32() {
        let tensor = read_fixture("f8_3.npy");
        assert_eq!(tensor.shape, [3]);
        assert_eq!(tensor.as_f32().unwrap(), [0.1f32, -2.5, f32::INFINITY]);
    }

    #[test]
    fn read_f2_as_f32() {
        let tensor = read_fixture("f2_3.npy");
        assert_eq!(tensor.as_f32().unwrap(), [1.5, -0.25, 65504.0]);
    }

    #[test]
    fn read_i8_scalar() {
        assert_eq!(read_fixture("i8_scalar.npy"), HostTensor::i64(vec![], vec![-7]));
    }

    #[test]
    fn read_i8_big_endian() {
        let expected = HostTensor::i64(vec![2, 2], vec![1, -2, 1 << 40, -(1 << 62)]);
        assert_eq!(read_fixture("i8_2x2_big_endian.npy"), expected);
    }

    #[test]
    fn read_i4_as_i32() {
        let tensor = read_fixture("i4_2x2.npy");
        assert_eq!(tensor.shape, [2, 2]);
        assert_eq!(tensor.data, TensorData::I32(vec![1, -2, i32::MAX, i32::MIN]));
    }

    #[test]
    fn read_one_byte_integers_as_i64() {
        assert_eq!(read_fixture("i1_3.npy"), HostTensor::i64(vec![3], vec![-128, 0, 127]));
        assert_eq!(read_fixture("u1_3.npy"), HostTensor::i64(vec![3], vec![0, 128, 255]));
    }

    #[test]
    fn read_bool() {
        let tensor = read_fixture("b1_4.npy");
        assert_eq!(tensor.shape, [4]);
        assert_eq!(tensor.data, TensorData::Bool(vec![true, false, false, true]));
    }

    #[test]
    fn read_empty_array() {
        assert_eq!(read_fixture("f4_empty_0x3.npy"), HostTensor::f32(vec![0, 3], vec![]));
    }

    #[test]
    fn read_fortran_order_names_file() {
        let path = fixture("f4_fortran.npy");
        let error = read_npy(&path).unwrap_err();
        assert!(
            matches!(error, NpyError::Format { error: FormatError::FortranOrder, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("f4_fortran.npy"), "{error}");
    }

    #[test]
    fn read_unsupported_dtypes() {
        for (name, descr) in [("u8_2.npy", "<u8"), ("structured.npy", "List")] {
            let error = format_error(read_npy(&fixture(name)));
            let FormatError::UnsupportedDtype { descr: found } = &error else {
                panic!("{name}: {error}");
            };
            assert!(found.contains(descr), "{name}: {error}");
        }
    }

    #[test]
    fn read_missing_file_names_path() {
        let error = read_npy(Path::new("/nonexistent/array.npy")).unwrap_err();
        assert!(matches!(error, NpyError::Io { .. }), "{error}");
        assert!(error.to_string().contains("/nonexistent/array.npy"), "{error}");
    }

    #[test]
    fn write_matches_numpy_bytes() {
        let cases = [
            ("f4_2x3.npy", matrix_2x3()),
            ("i8_scalar.npy", HostTensor::i64(vec![], vec![-7])),
            ("f4_empty_0x3.npy", HostTensor::f32(vec![0, 3], vec![])),
            (
                "i4_2x2.npy",
                HostTensor {
                    shape: vec![2, 2],
                    data: TensorData::I32(vec![1, -2, i32::MAX, i32::MIN]),
                },
            ),
            (
                "b1_4.npy",
                HostTensor {
                    shape: vec![4],
                    data: TensorData::Bool(vec![true, false, false, true]),
                },
            ),
        ];
        for (name, tensor) in cases {
            let expected = std::fs::read(fixture(name)).unwrap();
            assert_eq!(to_npy_bytes(&tensor), expected, "{name}");
        }
    }

    #[test]
    fn round_trip_every_data_type() {
        let cases = [
            HostTensor::f32(vec![], vec![f32::NEG_INFINITY]),
            HostTensor::f32(vec![1, 2, 3], vec![-0.0, 1e-45, f32::MAX, f32::MIN, 3.5, f32::NAN]),
            HostTensor::i64(vec![3, 0], vec![]),
            HostTensor::i64(vec![4], vec![i64::MIN, -1, 0, i64::MAX]),
            HostTensor { shape: vec![2, 1], data: TensorData::I32(vec![i32::MIN, 7]) },
            HostTensor { shape: vec![1, 1, 1], data: TensorData::Bool(vec![true]) },
        ];
        for tensor in cases {
            let bytes = to_npy_bytes(&tensor);
            let data_start = bytes.len() - data_len(&tensor.data) * item_size(&tensor.data);
            assert_eq!(data_start % HEADER_ALIGNMENT, 0, "{:?}", tensor.shape);

            let back = parse_npy(&bytes).unwrap();
            // Compare bit patterns, since NaN != NaN.
            assert_eq!(back.shape, tensor.shape);
            assert_eq!(to_npy_bytes(&back), bytes, "{:?}", tensor.shape);
        }
    }

    fn item_size(data: &TensorData) -> usize {
        match data {
            TensorData::F32(_) | TensorData::I32(_) => 4,
            TensorData::I64(_) => 8,
            TensorData::Bool(_) => 1,
        }
    }

    #[test]
    fn write_long_header_uses_version_2() {
        // 40,000 axes of extent 1 make a header of about 120,000 bytes.
        let shape = vec![1; 40_000];
        let tensor = HostTensor::f32(shape.clone(), vec![2.5]);
        let bytes = to_npy_bytes(&tensor);
        assert_eq!(bytes[6..8], [2, 0]);
        assert_eq!(parse_npy(&bytes).unwrap(), tensor);
    }

    #[test]
    fn write_npy_round_trip_leaves_no_temporary() {
        let directory = temporary_directory("round-trip");
        let path = directory.join("matrix.npy");
        write_npy(&path, &matrix_2x3()).unwrap();
        // A second write replaces the first.
        let scalar = HostTensor::i64(vec![], vec![42]);
        write_npy(&path, &scalar).unwrap();

        assert_eq!(read_npy(&path).unwrap(), scalar);
        let names: Vec<_> = std::fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["matrix.npy"]);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn write_npy_missing_directory() {
        let path = Path::new("/nonexistent/directory/array.npy");
        let error = write_npy(path, &matrix_2x3()).unwrap_err();
        assert!(matches!(error, NpyError::Io { .. }), "{error}");
        assert!(error.to_string().contains("/nonexistent/directory/array.npy"), "{error}");
    }

    #[test]
    fn write_npy_rejects_inconsistent_tensor() {
        let directory = temporary_directory("inconsistent");
        let path = directory.join("bad.npy");
        let tensor = HostTensor { shape: vec![2, 2], data: TensorData::F32(vec![1.0; 3]) };
        let error = write_npy(&path, &tensor).unwrap_err();
        assert!(matches!(error, NpyError::InvalidTensor { len: 3, .. }), "{error}");
        assert_eq!(std::fs::read_dir(&directory).unwrap().count(), 0);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    #[should_panic(expected = "stores 3 elements")]
    fn to_npy_bytes_inconsistent_tensor_panics() {
        let tensor = HostTensor { shape: vec![4], data: TensorData::I64(vec![1, 2, 3]) };
        to_npy_bytes(&tensor);
    }

    #[test]
    fn parse_every_truncation_fails() {
        let bytes = std::fs::read(fixture("f4_2x3.npy")).unwrap();
        for len in 0..bytes.len() {
            let error = format_error(parse_npy(&bytes[..len]));
            let expected = if len < 128 { "Truncated" } else { "DataLength" };
            assert!(format!("{error:?}").starts_with(expected), "length {len}: {error}");
        }
    }

    #[test]
    fn parse_rejects_trailing_data() {
        let mut bytes = std::fs::read(fixture("f4_2x3.npy")).unwrap();
        bytes.extend_from_slice(&[0; 4]);
        let error = format_error(parse_npy(&bytes));
        assert!(
            matches!(error, FormatError::DataLength { expected: 24, found: 28, .. }),
            "{error}"
        );
    }

    #[test]
    fn parse_rejects_bad_magic() {
        let mut bytes = std::fs::read(fixture("f4_2x3.npy")).unwrap();
        bytes[1] = b'X';
        let error = format_error(parse_npy(&bytes));
        assert_eq!(error, FormatError::BadMagic { found: b"\x93XUMPY".to_vec() });
        assert!(error.to_string().contains("\\x93XUMPY"), "{error}");

        let error = format_error(parse_npy(b"PK\x03\x04"));
        assert!(matches!(error, FormatError::BadMagic { .. }), "{error}");
    }

    #[test]
    fn parse_rejects_unknown_versions() {
        let bytes = std::fs::read(fixture("f4_2x3.npy")).unwrap();
        for version in [[0, 0], [1, 1], [4, 0]] {
            let mut changed = bytes.clone();
            changed[6..8].copy_from_slice(&version);
            let error = format_error(parse_npy(&changed));
            let expected = FormatError::UnsupportedVersion { major: version[0], minor: version[1] };
            assert_eq!(error, expected);
        }
    }

    #[test]
    fn parse_rejects_header_longer_than_file() {
        let mut bytes = std::fs::read(fixture("f4_2x3_v2.npy")).unwrap();
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = format_error(parse_npy(&bytes));
        assert!(matches!(error, FormatError::Truncated { len: 152, .. }), "{error}");
    }

    #[test]
    fn parse_rejects_invalid_utf8_v3_header() {
        let mut bytes = std::fs::read(fixture("f4_2x3_v3.npy")).unwrap();
        bytes[80] = 0xff;
        assert_eq!(format_error(parse_npy(&bytes)), FormatError::HeaderNotUtf8);
    }

    #[test]
    fn parse_rejects_invalid_headers() {
        let deep = format!("{{'descr': {}0{}, }}", "[".repeat(10_000), "]".repeat(10_000));
        let cases = [
            ("{'descr': '<f4', 'shape': (2,), }", "missing key \"fortran_order\""),
            ("{'descr': '<f4', 'fortran_order': False, }", "missing key \"shape\""),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1}",
                "unexpected key \"extra\"",
            ),
            (
                "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}",
                "duplicate key",
            ),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2)}", "expected a tuple"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': [2]}", "expected a tuple"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}", "non-negative"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': ('2',)}", "not an integer"),
            ("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}", "expected a bool"),
            ("{'descr': '<f4, 'fortran_order': False, 'shape': (2,)}", "expected"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)", "found the end"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x", "end of the header"),
            ("{'descr': '<f4', 'fortran_order': false, 'shape': (2,)}", "unknown name"),
            ("{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}", "',' or '}'"),
            ("{descr: '<f4', 'fortran_order': False, 'shape': (2,)}", "string key"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}",
                "integer",
            ),
            ("('<f4', False, (2,))", "expected a dictionary"),
            ("", "expected a value"),
            (deep.as_str(), "nesting deeper"),
        ];
        for (header, reason) in cases {
            let bytes = npy_with_header(header, &[0; 8]);
            let error = format_error(parse_npy(&bytes));
            let FormatError::InvalidHeader { reason: found, .. } = &error else {
                panic!("{header}: {error}");
            };
            assert!(found.contains(reason), "{header}: {found}");
        }
    }

    #[test]
    fn parse_accepts_header_variants() {
        // Python 2 long integers, double quotes, another key order and a header without the
        // trailing comma, newline or padding.
        let cases = [
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 1L), }",
            "{\"shape\": (2, 1), \"descr\": \"<f4\", \"fortran_order\": False}",
            "{'fortran_order':False,'shape':(2,1,),'descr':'<f4'}",
        ];
        let data = [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat();
        for header in cases {
            let tensor = parse_npy(&npy_with_header(header, &data)).unwrap();
            assert_eq!(tensor, HostTensor::f32(vec![2, 1], vec![1.0, 2.0]), "{header}");
        }

        let mut bytes = MAGIC.to_vec();
        let header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (3,)}";
        bytes.extend_from_slice(&[1, 0, header.len() as u8, 0]);
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[7, 8, 9]);
        assert_eq!(parse_npy(&bytes).unwrap(), HostTensor::i64(vec![3], vec![7, 8, 9]));
    }

    #[test]
    fn parse_rejects_shape_overflow() {
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296)}";
        let error = format_error(parse_npy(&npy_with_header(header, &[])));
        assert!(matches!(error, FormatError::ShapeOverflow { .. }), "{error}");
    }

    #[test]
    fn parse_huge_shape_without_data() {
        // The data length check runs before any allocation for the elements.
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000)}";
        let error = format_error(parse_npy(&npy_with_header(header, &[0; 16])));
        assert!(matches!(error, FormatError::DataLength { found: 16, .. }), "{error}");
    }

    #[test]
    fn parse_mutated_bytes_never_panics() {
        let original = std::fs::read(fixture("i4_2x2.npy")).unwrap();
        // A fixed-seed xorshift generator keeps the cases reproducible.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 4 {
                let index = (next() % bytes.len() as u64) as usize;
                bytes[index] = next() as u8;
            }
            let cut = (next() % (bytes.len() as u64 + 1)) as usize;
            let _ = parse_npy(&bytes[..cut]);
        }
    }

    #[test]
    fn read_npz_stored_and_deflated() {
        let stored = read_npz(&fixture("stored.npz")).unwrap();
        let expected = vec![
            ("ids".to_string(), HostTensor::i64(vec![1, 3], vec![3, 1, 4])),
            ("scale".to_string(), HostTensor::f32(vec![], vec![0.5])),
        ];
        assert_eq!(stored, expected);

        let deflated = read_npz(&fixture("deflated.npz")).unwrap();
        let ramp: Vec<f32> = (0..100u8).map(f32::from).collect();
        assert_eq!(deflated, [("ramp".to_string(), HostTensor::f32(vec![100], ramp))]);
    }

    #[test]
    fn read_npz_kws_reference() {
        let path = Path::new(KWS_NPZ);
        if !path.exists() {
            crate::testdata::skip(&format!("{KWS_NPZ} not found"));
            return;
        }
        let arrays = read_npz(path).unwrap();
        let names: Vec<&str> = arrays.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["in0", "out0"]);

        let input = arrays[0].1.as_i64().unwrap();
        assert_eq!(arrays[0].1.shape, [1, 49, 10, 1]);
        assert_eq!(input[..4], [88, 34, 2, -60]);
        assert_eq!(input[input.len() - 3..], [-6, 84, 79]);
        assert_eq!(input.iter().sum::<i64>(), 2155);

        let mut expected_output = vec![-128; 11];
        expected_output.push(127);
        assert_eq!(arrays[1].1, HostTensor::i64(vec![1, 12], expected_output));
    }

    #[test]
    fn read_npz_names_broken_member() {
        let error = read_npz(&fixture("broken.npz")).unwrap_err();
        let NpyError::Format { member: Some(member), error: format, .. } = &error else {
            panic!("{error}");
        };
        assert_eq!(member, "broken.npy");
        assert!(matches!(format, FormatError::BadMagic { .. }), "{error}");
        assert!(error.to_string().contains("broken.npz: member broken.npy"), "{error}");
    }

    #[test]
    fn read_npz_rejects_non_zip() {
        let error = read_npz(&fixture("f4_2x3.npy")).unwrap_err();
        assert!(matches!(error, NpyError::Zip { .. }), "{error}");
    }

    #[test]
    fn read_npz_missing_file() {
        let error = read_npz(Path::new("/nonexistent/arrays.npz")).unwrap_err();
        assert!(matches!(error, NpyError::Io { .. }), "{error}");
    }
}
