//! Temporary files for unit tests, deleted when the test drops them.

use std::path::{Path, PathBuf};

/// A file that is deleted when it is dropped.
pub(crate) struct TempFile(PathBuf);

impl TempFile {
    /// Writes `bytes` to `edgefold-{prefix}-{process id}-{name}` in the temporary directory.
    pub(crate) fn new(prefix: &str, name: &str, bytes: &[u8]) -> TempFile {
        let file = format!("edgefold-{prefix}-{}-{name}", std::process::id());
        let path = std::env::temp_dir().join(file);
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl std::ops::Deref for TempFile {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}
