//! The bytes that a model file reader parses: a file mapped from disk, or bytes that the caller
//! already has in memory.

use edgefold_runtime::MappedFile;

/// Contents of an opened model file.
pub(crate) enum FileBytes {
    /// A file mapped read-only from disk.
    Mapped(MappedFile),
    /// Bytes passed in by the caller.
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Returns the whole contents.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(file) => file.bytes(),
            FileBytes::Owned(bytes) => bytes,
        }
    }
}
