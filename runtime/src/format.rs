//! The packed file format, shared by the writer (in the compressor) and the reader (here), so the
//! two cannot drift apart. `docs/format.md` specifies the same layout in prose.
//!
//! All integers are little-endian. A file is a 128-byte header, a section table right after it,
//! then sections, each starting at a multiple of [`SECTION_ALIGN`] bytes.

use crate::error::{Error, Result, Section};

/// The first eight bytes of every file.
pub const MAGIC: [u8; 8] = *b"EDGEFOLD";
/// Major format version: readers reject any other major version.
pub const VERSION_MAJOR: u16 = 1;
/// Minor format version: a reader accepts files with any minor version of its major version.
pub const VERSION_MINOR: u16 = 0;
/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 128;
/// Length of one section table entry in bytes.
pub const SECTION_ENTRY_LEN: usize = 32;
/// Length of one tensor table entry in bytes.
pub const TENSOR_ENTRY_LEN: usize = 96;
/// Length of one symbol entry in bytes.
pub const SYMBOL_ENTRY_LEN: usize = 16;
/// Length of the fixed part of an op record in bytes.
pub const OP_HEADER_LEN: usize = 16;
/// Op record flag: the op writes its output over input 0, which occupies the same arena region.
pub const OP_FLAG_IN_PLACE: u16 = 1;
/// Every op record flag this reader knows; a record with another bit set is invalid.
pub const OP_FLAGS_KNOWN: u16 = OP_FLAG_IN_PLACE;
/// Alignment of sections in the file, of constant tensors in the weights section and of
/// activations in the arena.
pub const SECTION_ALIGN: usize = 64;
/// Alignment the file buffer's start address must have in memory (the largest element alignment).
pub const BUFFER_ALIGN: usize = 16;
/// Maximum tensor rank.
pub const MAX_RANK: usize = 6;
/// Maximum number of symbolic dimensions (such as batch and sequence length) in one model.
pub const MAX_SYMBOLS: usize = 4;
/// Maximum number of inputs or outputs of one op.
pub const MAX_OP_ARITY: usize = 16;
/// Maximum number of graph inputs.
pub const MAX_GRAPH_INPUTS: usize = 32;
/// Index meaning "no tensor" in optional tensor references.
pub const NO_TENSOR: u32 = u32::MAX;

/// Section kinds, as stored in the section table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SectionKind {
    /// UTF-8 names referenced by offset and length.
    Strings = 1,
    /// Symbol table: [`SYMBOL_ENTRY_LEN`]-byte entries.
    Symbols = 2,
    /// Tensor table: [`TENSOR_ENTRY_LEN`]-byte entries.
    Tensors = 3,
    /// Op records, in execution order.
    Ops = 4,
    /// Graph input tensor indices then graph output tensor indices, each a u32.
    Io = 5,
    /// Key-value metadata records.
    Metadata = 6,
    /// Constant tensor data.
    Weights = 7,
}

impl SectionKind {
    /// All kinds, in the order a file stores them.
    pub const ALL: [SectionKind; 7] = [
        SectionKind::Strings,
        SectionKind::Symbols,
        SectionKind::Tensors,
        SectionKind::Ops,
        SectionKind::Io,
        SectionKind::Metadata,
        SectionKind::Weights,
    ];

    /// Decodes a stored kind.
    pub fn from_u32(v: u32) -> Option<Self> {
        SectionKind::ALL.iter().copied().find(|k| *k as u32 == v)
    }

    /// The section named in errors.
    pub fn section(self) -> Section {
        match self {
            SectionKind::Strings => Section::Strings,
            SectionKind::Symbols => Section::Symbols,
            SectionKind::Tensors => Section::Tensors,
            SectionKind::Ops => Section::Ops,
            SectionKind::Io => Section::Io,
            SectionKind::Metadata => Section::Metadata,
            SectionKind::Weights => Section::Weights,
        }
    }
}

/// Element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 1,
    /// IEEE 754 binary16.
    F16 = 2,
    /// Signed 8-bit integer (quantized weights).
    I8 = 3,
    /// Signed 4-bit integer, two per byte, low nibble first (quantized weights).
    I4 = 4,
    /// Signed 32-bit integer.
    I32 = 5,
    /// Signed 64-bit integer.
    I64 = 6,
    /// Boolean, one byte, 0 or 1.
    Bool = 7,
    /// Unsigned 8-bit integer.
    U8 = 8,
}

impl DType {
    /// Decodes a stored element type.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => DType::F32,
            2 => DType::F16,
            3 => DType::I8,
            4 => DType::I4,
            5 => DType::I32,
            6 => DType::I64,
            7 => DType::Bool,
            8 => DType::U8,
            _ => return None,
        })
    }

    /// Bytes per element; 0 for the packed [`DType::I4`].
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I8 | DType::Bool | DType::U8 => 1,
            DType::I4 => 0,
            DType::I64 => 8,
        }
    }

    /// Bytes taken by `count` elements, `None` on overflow.
    pub fn bytes_for(self, count: u64) -> Option<u64> {
        match self {
            DType::I4 => count.checked_add(1).map(|c| c / 2),
            other => count.checked_mul(other.size() as u64),
        }
    }
}

/// Mapping from a constant tensor's stored integers to real values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Quant {
    /// Values are stored as they are.
    None = 0,
    /// A rank-2 [`DType::I8`] tensor with one f32 scale per row (axis 0) in `scale_tensor`:
    /// value = q × scale\[row\]. Linear weights are stored `[out, in]`, so a row is an output channel.
    PerRow = 1,
    /// A rank-2 [`DType::I4`] tensor quantized in groups of `group_size` consecutive elements of a
    /// row, with one f16 scale per group in `scale_tensor` (shape `[rows, cols / group_size]`):
    /// value = q × scale, q in -8..=7.
    Grouped = 2,
    /// A rank-2 [`DType::I4`] tensor in groups like [`Quant::Grouped`], whose `scale_tensor` is f16
    /// `[2, rows, cols / group_size]`: the scales, then one minimum per group.
    /// value = (q + 8) × scale + min, q in -8..=7 (the unsigned grid 0..=15 of llama.cpp's Q4_1).
    GroupedMin = 3,
}

impl Quant {
    /// Decodes a stored quantization kind.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Quant::None,
            1 => Quant::PerRow,
            2 => Quant::Grouped,
            3 => Quant::GroupedMin,
            _ => return None,
        })
    }
}

/// Storage location of a tensor's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TensorKind {
    /// In the weights section of the file (read-only).
    Const = 0,
    /// In the session's arena, at an offset planned offline.
    Activation = 1,
}

/// One axis extent: `factor` times the product of the symbols raised to `exponents`.
///
/// Symbols are the model's variable dimensions (batch size, sequence length). A product of such
/// monomials is again one, so reshapes that merge axes stay exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dim {
    /// Constant factor.
    pub factor: u32,
    /// Exponent of each symbol.
    pub exponents: [u8; MAX_SYMBOLS],
}

impl Dim {
    /// A constant extent.
    pub const fn constant(value: u32) -> Self {
        Dim { factor: value, exponents: [0; MAX_SYMBOLS] }
    }

    /// The bare symbol `index`.
    ///
    /// # Panics
    /// Panics if `index >= MAX_SYMBOLS`.
    pub const fn symbol(index: usize) -> Self {
        let mut exponents = [0; MAX_SYMBOLS];
        exponents[index] = 1;
        Dim { factor: 1, exponents }
    }

    /// Returns the value when the extent does not depend on any symbol.
    pub fn as_constant(&self) -> Option<u32> {
        self.exponents.iter().all(|&e| e == 0).then_some(self.factor)
    }

    /// Returns the symbol index when the extent is exactly one symbol.
    pub fn as_symbol(&self) -> Option<usize> {
        if self.factor != 1 {
            return None;
        }
        let mut found = None;
        for (i, &e) in self.exponents.iter().enumerate() {
            match (e, found) {
                (0, _) => {}
                (1, None) => found = Some(i),
                _ => return None,
            }
        }
        found
    }

    /// Product of two extents, `None` on overflow.
    pub fn checked_mul(self, other: Dim) -> Option<Dim> {
        let mut exponents = [0u8; MAX_SYMBOLS];
        for (i, e) in exponents.iter_mut().enumerate() {
            *e = self.exponents[i].checked_add(other.exponents[i])?;
        }
        Some(Dim { factor: self.factor.checked_mul(other.factor)?, exponents })
    }

    /// Returns true when both extents have the same symbols and exponents.
    pub fn same_symbols(&self, other: &Dim) -> bool {
        self.exponents == other.exponents
    }

    /// Evaluates the extent for the given symbol values, `None` on overflow.
    pub fn eval(&self, symbols: &[u64; MAX_SYMBOLS]) -> Option<u64> {
        let mut v = self.factor as u64;
        for (i, &e) in self.exponents.iter().enumerate() {
            for _ in 0..e {
                v = v.checked_mul(symbols[i])?;
            }
        }
        Some(v)
    }

    /// Encodes the extent into 8 bytes.
    pub fn to_bytes(&self) -> [u8; 8] {
        let f = self.factor.to_le_bytes();
        let e = self.exponents;
        [f[0], f[1], f[2], f[3], e[0], e[1], e[2], e[3]]
    }

    /// Decodes 8 bytes written by [`Dim::to_bytes`].
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Dim {
            factor: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            exponents: [b[4], b[5], b[6], b[7]],
        }
    }
}

/// Reference to a string in the strings section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StrRef {
    /// Byte offset in the strings section.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// Little-endian field reader over a byte slice that fails instead of panicking.
#[derive(Clone, Copy)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, what }
    }

    pub(crate) fn array<const N: usize>(&self, at: usize) -> Result<[u8; N]> {
        let end = at.checked_add(N);
        match end.and_then(|end| self.bytes.get(at..end)) {
            Some(s) => {
                let mut out = [0u8; N];
                out.copy_from_slice(s);
                Ok(out)
            }
            None => Err(Error::Truncated {
                what: self.what,
                needed: (at as u64).saturating_add(N as u64),
                available: self.bytes.len() as u64,
            }),
        }
    }

    pub(crate) fn u8(&self, at: usize) -> Result<u8> {
        Ok(self.array::<1>(at)?[0])
    }

    pub(crate) fn u16(&self, at: usize) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(at)?))
    }

    pub(crate) fn u32(&self, at: usize) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(at)?))
    }

    pub(crate) fn u64(&self, at: usize) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(at)?))
    }
}

/// The fixed header at the start of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Major format version.
    pub version_major: u16,
    /// Minor format version.
    pub version_minor: u16,
    /// Total file length in bytes.
    pub file_len: u64,
    /// Arena bytes a session needs, with the arena's start aligned to [`SECTION_ALIGN`].
    pub arena_bytes: u64,
    /// Number of section table entries.
    pub section_count: u32,
    /// Number of tensors in the tensor table.
    pub tensor_count: u32,
    /// Number of op records.
    pub op_count: u32,
    /// Number of graph inputs.
    pub input_count: u32,
    /// Number of graph outputs.
    pub output_count: u32,
    /// Number of symbolic dimensions.
    pub symbol_count: u32,
    /// Bit flags; none are defined in version 1.0, so readers require 0.
    pub flags: u32,
}

impl Header {
    /// Encodes the header, with its checksum in the last four bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version_major.to_le_bytes());
        b[10..12].copy_from_slice(&self.version_minor.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.file_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.arena_bytes.to_le_bytes());
        b[32..36].copy_from_slice(&self.section_count.to_le_bytes());
        b[36..40].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[40..44].copy_from_slice(&self.tensor_count.to_le_bytes());
        b[44..48].copy_from_slice(&self.op_count.to_le_bytes());
        b[48..52].copy_from_slice(&self.input_count.to_le_bytes());
        b[52..56].copy_from_slice(&self.output_count.to_le_bytes());
        b[56..60].copy_from_slice(&self.symbol_count.to_le_bytes());
        b[60..64].copy_from_slice(&self.flags.to_le_bytes());
        let crc = crate::crc32::crc32(&b[..HEADER_LEN - 4]);
        b[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header: magic, version, length fields and checksum.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let r = Reader::new(bytes, "header");
        let magic: [u8; 8] = r.array(0)?;
        if magic != MAGIC {
            return Err(Error::BadMagic);
        }
        let version_major = r.u16(8)?;
        let version_minor = r.u16(10)?;
        if version_major != VERSION_MAJOR {
            return Err(Error::UnsupportedVersion { major: version_major, minor: version_minor });
        }
        let all: [u8; HEADER_LEN] = r.array(0)?;
        let stored = r.u32(HEADER_LEN - 4)?;
        let computed = crate::crc32::crc32(&all[..HEADER_LEN - 4]);
        if stored != computed {
            return Err(Error::ChecksumMismatch { section: Section::Header, stored, computed });
        }
        if r.u32(12)? as usize != HEADER_LEN || r.u32(36)? as usize != HEADER_LEN {
            return Err(Error::InvalidSection {
                section: Section::Header,
                reason: "header or section table offset is not 128",
            });
        }
        let header = Header {
            version_major,
            version_minor,
            file_len: r.u64(16)?,
            arena_bytes: r.u64(24)?,
            section_count: r.u32(32)?,
            tensor_count: r.u32(40)?,
            op_count: r.u32(44)?,
            input_count: r.u32(48)?,
            output_count: r.u32(52)?,
            symbol_count: r.u32(56)?,
            flags: r.u32(60)?,
        };
        if header.flags != 0 {
            return Err(Error::InvalidSection {
                section: Section::Header,
                reason: "unknown header flags are set",
            });
        }
        Ok(header)
    }
}

/// One entry of the section table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    /// Kind of content in the section.
    pub kind: SectionKind,
    /// Byte offset from the start of the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32 of the section's bytes.
    pub crc32: u32,
}

impl SectionEntry {
    /// Encodes the entry.
    pub fn to_bytes(&self) -> [u8; SECTION_ENTRY_LEN] {
        let mut b = [0u8; SECTION_ENTRY_LEN];
        b[0..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc32.to_le_bytes());
        b
    }

    /// Decodes an entry.
    pub fn parse(bytes: &[u8]) -> Result<SectionEntry> {
        let r = Reader::new(bytes, "section table entry");
        let kind = SectionKind::from_u32(r.u32(0)?).ok_or(Error::InvalidSection {
            section: Section::SectionTable,
            reason: "unknown section kind",
        })?;
        Ok(SectionEntry { kind, offset: r.u64(8)?, len: r.u64(16)?, crc32: r.u32(24)? })
    }
}

/// One entry of the symbol table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymbolEntry {
    /// Symbol name (such as `batch` or `sequence`).
    pub name: StrRef,
    /// Largest value the arena plan allows.
    pub max_value: u32,
}

impl SymbolEntry {
    /// Encodes the entry.
    pub fn to_bytes(&self) -> [u8; SYMBOL_ENTRY_LEN] {
        let mut b = [0u8; SYMBOL_ENTRY_LEN];
        b[0..4].copy_from_slice(&self.name.offset.to_le_bytes());
        b[4..8].copy_from_slice(&self.name.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.max_value.to_le_bytes());
        b
    }

    /// Decodes an entry.
    pub fn parse(bytes: &[u8]) -> Result<SymbolEntry> {
        let r = Reader::new(bytes, "symbol entry");
        Ok(SymbolEntry { name: StrRef { offset: r.u32(0)?, len: r.u32(4)? }, max_value: r.u32(8)? })
    }
}

/// One entry of the tensor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: StrRef,
    /// Element type.
    pub dtype: DType,
    /// Storage location of the bytes.
    pub kind: TensorKind,
    /// Number of axes, at most [`MAX_RANK`].
    pub rank: u8,
    /// Mapping from stored integers to values.
    pub quant: Quant,
    /// Tensor holding the scales for [`Quant::PerRow`] and [`Quant::Grouped`], else [`NO_TENSOR`].
    pub scale_tensor: u32,
    /// Group length for [`Quant::Grouped`], else 0.
    pub group_size: u32,
    /// Constants: offset in the weights section. Activations: offset in the arena.
    pub offset: u64,
    /// Constants: exact byte length. Activations: byte length at the symbols' maximum values.
    pub byte_len: u64,
    /// Extents of the first `rank` axes; the rest are constant 1.
    pub dims: [Dim; MAX_RANK],
}

impl TensorEntry {
    /// Returns the extents of the axes in use.
    pub fn shape(&self) -> &[Dim] {
        &self.dims[..(self.rank as usize).min(MAX_RANK)]
    }

    /// Encodes the entry.
    pub fn to_bytes(&self) -> [u8; TENSOR_ENTRY_LEN] {
        let mut b = [0u8; TENSOR_ENTRY_LEN];
        b[0..4].copy_from_slice(&self.name.offset.to_le_bytes());
        b[4..8].copy_from_slice(&self.name.len.to_le_bytes());
        b[8] = self.dtype as u8;
        b[9] = self.kind as u8;
        b[10] = self.rank;
        b[11] = self.quant as u8;
        b[12..16].copy_from_slice(&self.scale_tensor.to_le_bytes());
        b[16..20].copy_from_slice(&self.group_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.byte_len.to_le_bytes());
        for (i, d) in self.dims.iter().enumerate() {
            b[40 + 8 * i..48 + 8 * i].copy_from_slice(&d.to_bytes());
        }
        b
    }

    /// Decodes an entry; `index` is used in errors.
    pub fn parse(bytes: &[u8], index: u32) -> Result<TensorEntry> {
        let r = Reader::new(bytes, "tensor entry");
        let invalid = |reason| Error::InvalidTensor { tensor: index, reason };
        let dtype = DType::from_u8(r.u8(8)?).ok_or(invalid("unknown element type"))?;
        let kind = match r.u8(9)? {
            0 => TensorKind::Const,
            1 => TensorKind::Activation,
            _ => return Err(invalid("unknown tensor kind")),
        };
        let rank = r.u8(10)?;
        if rank as usize > MAX_RANK {
            return Err(invalid("rank exceeds 6"));
        }
        let quant = Quant::from_u8(r.u8(11)?).ok_or(invalid("unknown quantization kind"))?;
        let mut dims = [Dim::constant(1); MAX_RANK];
        for (i, d) in dims.iter_mut().enumerate() {
            *d = Dim::from_bytes(r.array(40 + 8 * i)?);
        }
        Ok(TensorEntry {
            name: StrRef { offset: r.u32(0)?, len: r.u32(4)? },
            dtype,
            kind,
            rank,
            quant,
            scale_tensor: r.u32(12)?,
            group_size: r.u32(16)?,
            offset: r.u64(24)?,
            byte_len: r.u64(32)?,
            dims,
        })
    }
}
