//! Read-only memory maps of packed files (Linux, Android, macOS).

use std::fs::File;
use std::path::Path;

/// A packed file mapped read-only into memory; pages are loaded on first touch and shared with the
/// page cache, so opening costs no copy of the weights.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps the file at `path`. On Linux and Android the pages are read in when the file is
    /// mapped (`MAP_POPULATE`), in one pass instead of one page fault at a time, since opening
    /// the model reads every section for its checksum.
    ///
    /// # Errors
    /// Any I/O error from opening or mapping the file, and an `InvalidInput` error when `path`
    /// is a directory (which the map would report as "No such device").
    pub fn open(path: &Path) -> std::io::Result<MappedFile> {
        let file = File::open(path)?;
        if file.metadata()?.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path is a directory; pass a packed .fold file",
            ));
        }
        // SAFETY: the map is read-only. Rust's aliasing rules would be broken if another process
        // truncated or rewrote the file while it is mapped; the compressor never rewrites a file in
        // place (it writes a new file and renames it), so a running model keeps the old inode.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file)? };
        Ok(MappedFile { map })
    }

    /// The file's bytes; the start is page-aligned.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::MappedFile;
    use std::string::ToString;

    #[test]
    fn directory_path_is_rejected() {
        let dir = std::env::temp_dir();
        let err = MappedFile::open(&dir).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("directory"), "{err}");
    }

    #[test]
    fn file_maps_its_bytes() {
        let name = std::format!("edgefold-map-{}.bin", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, b"packed bytes").unwrap();
        let map = MappedFile::open(&path);
        std::fs::remove_file(&path).ok();
        assert_eq!(map.unwrap().bytes(), b"packed bytes");
    }
}
