//! The runtime's error type. It never allocates, so it works without `alloc`.

use core::fmt;

/// A section of a packed file, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The fixed-size header at the start of the file.
    Header,
    /// The table that locates every other section.
    SectionTable,
    /// UTF-8 names of tensors, ops and symbols.
    Strings,
    /// Symbolic dimensions with their maximum values.
    Symbols,
    /// The tensor table.
    Tensors,
    /// The op list.
    Ops,
    /// Graph inputs and outputs.
    Io,
    /// Key-value metadata.
    Metadata,
    /// Constant tensor data.
    Weights,
}

/// Everything that can go wrong when opening a file or running a session.
///
/// Messages name the offending value and the limit it broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The buffer is shorter than a structure that must fit in it.
    Truncated {
        /// Structure being read.
        what: &'static str,
        /// Bytes needed from the start of the buffer.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The file does not start with the Edgefold magic bytes.
    BadMagic,
    /// The file was written by an incompatible format version.
    UnsupportedVersion {
        /// Major version found in the file.
        major: u16,
        /// Minor version found in the file.
        minor: u16,
    },
    /// A stored checksum does not match the bytes it covers.
    ChecksumMismatch {
        /// The section whose bytes changed.
        section: Section,
        /// Checksum stored in the file.
        stored: u32,
        /// Checksum of the bytes as found.
        computed: u32,
    },
    /// A section is missing, repeated, misplaced or has an inconsistent length.
    InvalidSection {
        /// The section concerned.
        section: Section,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The file's buffer does not start at an address aligned as the format requires.
    MisalignedBuffer {
        /// Required alignment in bytes.
        required: usize,
    },
    /// The runtime only maps files zero-copy on little-endian processors.
    BigEndianHost,
    /// A tensor table entry is invalid.
    InvalidTensor {
        /// Index of the tensor in the table.
        tensor: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An op record is invalid or inconsistent with its tensors.
    InvalidOp {
        /// Index of the op in the op list.
        op: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A name or metadata string is out of bounds or not UTF-8.
    InvalidString {
        /// Offset of the string in the strings section.
        offset: u32,
    },
    /// The arena passed to a session is smaller than the file requires.
    ArenaTooSmall {
        /// Bytes required, including the padding needed to align the arena's start.
        required: u64,
        /// Bytes provided.
        provided: u64,
    },
    /// No graph input or output has this index or name.
    UnknownIo {
        /// Index asked for (`u32::MAX` when looked up by name).
        index: u32,
    },
    /// An input was given with the wrong element type.
    InputDtypeMismatch {
        /// Input index.
        input: u32,
        /// Element type the model expects.
        expected: crate::format::DType,
        /// Element type given.
        given: crate::format::DType,
    },
    /// An input shape has another number of axes than the model's declared shape.
    InputRankMismatch {
        /// Input index.
        input: u32,
        /// Axes of the model's input.
        expected: u32,
        /// Axes given.
        given: u32,
    },
    /// An input extent does not match the model's declared shape.
    InputShapeMismatch {
        /// Input index.
        input: u32,
        /// Axis that does not match.
        axis: u32,
        /// Extent the model expects at that axis (for a symbolic axis: its maximum).
        expected: u64,
        /// Extent given.
        given: u64,
        /// Whether the axis is symbolic, taking any extent from 1 to `expected`.
        variable: bool,
    },
    /// The data given for an input has another number of elements than its shape.
    InputLengthMismatch {
        /// Input index.
        input: u32,
        /// Elements of the shape given.
        expected: u64,
        /// Elements given.
        given: u64,
    },
    /// Two inputs bind the same symbolic dimension to different values.
    SymbolConflict {
        /// Index of the symbol.
        symbol: u32,
        /// Value bound first.
        first: u64,
        /// Conflicting value.
        second: u64,
    },
    /// `run` was called before every input was set.
    InputNotSet {
        /// Index of the first input not yet set.
        input: u32,
    },
    /// An output was read before a successful `run`.
    NotRun,
    /// An index read from a tensor at run time is out of range.
    IndexOutOfRange {
        /// Op that read the index.
        op: u32,
        /// The index value.
        index: i64,
        /// Extent of the indexed axis.
        extent: u64,
    },
    /// The file uses an op whose kernel this build of the runtime leaves out.
    OpNotBuilt {
        /// Index of the op in the op list.
        op: u32,
        /// The runtime's cargo feature that builds the op.
        feature: &'static str,
    },
    /// The file stores a tensor in a quantization that this build of the runtime leaves out.
    QuantNotBuilt {
        /// Index of the tensor in the tensor table.
        tensor: u32,
        /// The runtime's cargo feature that builds the quantization.
        feature: &'static str,
    },
    /// A shape computed at run time is inconsistent (for example a slice past the end).
    RuntimeShape {
        /// Op that found it.
        op: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file carries no self-test record.
    NoSelfTest,
    /// The self-test record is malformed.
    InvalidSelfTest {
        /// Byte offset in the record's value where decoding stopped.
        at: u32,
        /// Description of the fault.
        reason: &'static str,
    },
    /// The file contains no language model: the decoder configuration record is missing.
    NotADecoder,
    /// The decoder configuration or the tensors it names are inconsistent.
    InvalidDecoder {
        /// Index of the tensor concerned, or `u32::MAX` for the configuration record.
        tensor: u32,
        /// Description of the fault.
        reason: &'static str,
    },
    /// The positions requested exceed the context length fixed when the file was written.
    ContextFull {
        /// Capacity of the key-value cache, in positions.
        capacity: u32,
        /// Positions the call needs.
        needed: u64,
    },
    /// A token id is not in the vocabulary.
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// Vocabulary size.
        vocab: u32,
    },
    /// The file contains no translation model: the translator configuration record is missing.
    NotATranslator,
    /// The translator configuration or the tensors it names are inconsistent.
    InvalidTranslator {
        /// Index of the tensor concerned, or `u32::MAX` for the configuration record.
        tensor: u32,
        /// Description of the fault.
        reason: &'static str,
    },
    /// A source sentence has more tokens than the translator's arena was sized for.
    SourceTooLong {
        /// Maximum source length in tokens, `</s>` included, fixed when the file was written.
        capacity: u32,
        /// Tokens given.
        len: u64,
    },
    /// A decoder step was requested before a source sentence was encoded.
    NoSourceEncoded,
    /// An argument of a translator call is invalid.
    InvalidTranslatorInput {
        /// Description of the fault.
        reason: &'static str,
    },
}

impl Error {
    /// What went wrong, as fixed text without the values that `Display` adds. Printing it needs
    /// no number formatting, so firmware that reports errors this way links less code.
    pub fn reason(&self) -> &'static str {
        match *self {
            Error::Truncated { .. } => "file truncated",
            Error::BadMagic => "not an Edgefold file: the magic bytes are missing",
            Error::UnsupportedVersion { .. } => "format version not supported by this runtime",
            Error::ChecksumMismatch { .. } => "checksum mismatch: the file is corrupted",
            Error::InvalidSection { reason, .. }
            | Error::InvalidTensor { reason, .. }
            | Error::InvalidOp { reason, .. }
            | Error::RuntimeShape { reason, .. }
            | Error::InvalidSelfTest { reason, .. } => reason,
            Error::MisalignedBuffer { .. } => "the file's buffer is not aligned to 16 bytes",
            Error::BigEndianHost => "files are read only on little-endian processors",
            Error::InvalidString { .. } => "a string is out of bounds or not UTF-8",
            Error::ArenaTooSmall { .. } => "arena too small for the model",
            Error::UnknownIo { .. } => "no graph input or output with this index",
            Error::InputDtypeMismatch { .. } => "input element type differs from the model's",
            Error::InputRankMismatch { .. } => "input has another number of axes than the model's",
            Error::InputShapeMismatch { .. } => "input shape does not fit the model's",
            Error::InputLengthMismatch { .. } => "input data does not fill its shape",
            Error::SymbolConflict { .. } => "inputs bind a symbolic dimension to two values",
            Error::InputNotSet { .. } => "an input was not set before run",
            Error::NotRun => "outputs are only available after a successful run",
            Error::IndexOutOfRange { .. } => "index out of range",
            Error::OpNotBuilt { .. } => "the file uses an op that this runtime was built without",
            Error::QuantNotBuilt { .. } => {
                "the file stores weights in a quantization that this runtime was built without"
            }
            Error::NoSelfTest => "the file carries no self-test",
            Error::NotADecoder => "the file contains no language model",
            Error::InvalidDecoder { reason, .. } => reason,
            Error::ContextFull { .. } => "the context length is exhausted",
            Error::TokenOutOfRange { .. } => "token id outside the vocabulary",
            Error::NotATranslator => "the file contains no translation model",
            Error::InvalidTranslator { reason, .. } | Error::InvalidTranslatorInput { reason } => {
                reason
            }
            Error::SourceTooLong { .. } => "the source sentence is longer than the maximum",
            Error::NoSourceEncoded => "no source sentence is encoded",
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Section::Header => "header",
            Section::SectionTable => "section table",
            Section::Strings => "strings section",
            Section::Symbols => "symbols section",
            Section::Tensors => "tensor table",
            Section::Ops => "op list",
            Section::Io => "inputs and outputs section",
            Section::Metadata => "metadata section",
            Section::Weights => "weights section",
        };
        f.write_str(name)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Truncated { what, needed, available } => write!(
                f,
                "file truncated: {what} needs {needed} bytes but only {available} are present"
            ),
            Error::BadMagic => f.write_str("not an Edgefold file: the magic bytes are missing"),
            Error::UnsupportedVersion { major, minor } => write!(
                f,
                "format version {major}.{minor} is not supported by this runtime (reads {}.x); \
                 rebuild the file with a matching compressor or upgrade the runtime",
                crate::format::VERSION_MAJOR
            ),
            Error::ChecksumMismatch { section, stored, computed } => write!(
                f,
                "checksum mismatch in the {section}: stored {stored:#010x}, computed \
                 {computed:#010x}; the file is corrupted"
            ),
            Error::InvalidSection { section, reason } => {
                write!(f, "invalid {section}: {reason}")
            }
            Error::MisalignedBuffer { required } => write!(
                f,
                "the file's buffer must start at an address aligned to {required} bytes; \
                 place it in an aligned static or memory-map it"
            ),
            Error::BigEndianHost => {
                f.write_str("this runtime reads files zero-copy only on little-endian processors")
            }
            Error::InvalidTensor { tensor, reason } => {
                write!(f, "invalid tensor {tensor}: {reason}")
            }
            Error::InvalidOp { op, reason } => write!(f, "invalid op {op}: {reason}"),
            Error::InvalidString { offset } => {
                write!(f, "invalid string at offset {offset}: out of bounds or not UTF-8")
            }
            Error::ArenaTooSmall { required, provided } => write!(
                f,
                "arena too small: the model needs {required} bytes, {provided} were provided"
            ),
            Error::UnknownIo { index } => write!(f, "no graph input or output with index {index}"),
            Error::InputDtypeMismatch { input, expected, given } => {
                write!(f, "input {input} expects {expected:?} elements, got {given:?}")
            }
            Error::InputRankMismatch { input, expected, given } => {
                write!(f, "input {input} has {given} axes, but the model's has {expected}")
            }
            Error::InputShapeMismatch { input, axis, expected, given, variable: true } => write!(
                f,
                "input {input} axis {axis}: extent {given} is outside 1 to {expected}, the range \
                 the model was packed for"
            ),
            Error::InputShapeMismatch { input, axis, expected, given, variable: false } => {
                write!(f, "input {input} axis {axis}: extent {given}, but the model's is {expected}")
            }
            Error::InputLengthMismatch { input, expected, given } => {
                write!(f, "input {input}: {given} elements given for a shape of {expected}")
            }
            Error::SymbolConflict { symbol, first, second } => write!(
                f,
                "symbolic dimension {symbol} bound to {first} by one input and {second} by another"
            ),
            Error::InputNotSet { input } => write!(f, "input {input} was not set before run"),
            Error::NotRun => f.write_str("outputs are only available after a successful run"),
            Error::IndexOutOfRange { op, index, extent } => {
                write!(f, "op {op}: index {index} out of range for an axis of extent {extent}")
            }
            Error::OpNotBuilt { op, feature } => write!(
                f,
                "op {op} is not built into this runtime; enable the runtime's `{feature}` feature"
            ),
            Error::QuantNotBuilt { tensor, feature } => write!(
                f,
                "tensor {tensor} is quantized in a way this runtime is not built for; enable the \
                 runtime's `{feature}` feature"
            ),
            Error::RuntimeShape { op, reason } => write!(f, "op {op}: {reason}"),
            Error::NoSelfTest => f.write_str(
                "the file carries no self-test; compress it again with `edgefold compress \
                 --self-test`",
            ),
            Error::InvalidSelfTest { at, reason } => {
                write!(f, "invalid self-test record at byte {at} of its value: {reason}")
            }
            Error::NotADecoder => f.write_str(
                "the file contains no language model (no decoder configuration); compress a GGUF \
                 model to get one",
            ),
            Error::InvalidDecoder { tensor: u32::MAX, reason } => {
                write!(f, "invalid decoder configuration: {reason}")
            }
            Error::InvalidDecoder { tensor, reason } => {
                write!(f, "invalid decoder tensor {tensor}: {reason}")
            }
            Error::ContextFull { capacity, needed } => write!(
                f,
                "the context has room for {capacity} positions but {needed} are needed; compress the \
                 model again with a larger --max-seq or start a new context"
            ),
            Error::TokenOutOfRange { token, vocab } => {
                write!(f, "token {token} is outside the vocabulary of {vocab}")
            }
            Error::NotATranslator => f.write_str(
                "the file contains no translation model (no translator configuration); pack a \
                 Marian model to get one",
            ),
            Error::InvalidTranslator { tensor: u32::MAX, reason } => {
                write!(f, "invalid translator configuration: {reason}")
            }
            Error::InvalidTranslator { tensor, reason } => {
                write!(f, "invalid translator tensor {tensor}: {reason}")
            }
            Error::SourceTooLong { capacity, len } => write!(
                f,
                "the source sentence has {len} tokens but the translator takes at most \
                 {capacity}; translate it in pieces"
            ),
            Error::NoSourceEncoded => {
                f.write_str("no source sentence is encoded; call encode before step")
            }
            Error::InvalidTranslatorInput { reason } => {
                write!(f, "invalid translator input: {reason}")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// Result type of the runtime.
pub type Result<T> = core::result::Result<T, Error>;
