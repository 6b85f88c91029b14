//! Marian's binary lexical shortlist (`lex.*.s2t.bin`).
//!
//! For each source token id, the file lists the target ids that most often translate it. While
//! translating a sentence, the output layer only scores the union of the `first` most frequent
//! target ids, the source ids themselves (the vocabulary is shared) and the lists of the
//! sentence's source ids.
//!
//! Layout (little-endian): a header of six `u64` (magic `0xF11A48D5013417F5`, checksum, `first`,
//! `best`, number of offsets, number of list entries), then the offsets as `u64`, then the
//! entries as `u32`. There is one offset per source id plus a final one, so that source id `s`
//! owns the entries `offsets[s]..offsets[s + 1]`.

use std::path::{Path, PathBuf};

use super::MarianError;

const MAGIC: u64 = 0xF11A_48D5_0134_17F5;
const HEADER_BYTES: usize = 6 * 8;

/// A lexical shortlist read into memory.
#[derive(Debug, Clone)]
pub struct Shortlist {
    path: PathBuf,
    first: usize,
    best: usize,
    offsets: Vec<u64>,
    entries: Vec<u32>,
}

impl Shortlist {
    /// Reads and checks a binary shortlist file.
    ///
    /// NOTE: the checksum field is read but not verified, so damage inside the lists is only
    /// found when an entry falls outside the vocabulary.
    ///
    /// # Errors
    /// [`MarianError::Io`] when the file cannot be read, and [`MarianError::Format`] when the
    /// magic, the sizes or the offsets are invalid.
    pub fn open(path: &Path) -> Result<Shortlist, MarianError> {
        let bytes = std::fs::read(path)
            .map_err(|source| MarianError::Io { path: path.to_path_buf(), source })?;
        Shortlist::from_bytes(path, &bytes)
    }

    /// Parses and checks a binary shortlist that is already in memory. `path` only names the
    /// file in errors, and nothing is read from it.
    ///
    /// # Errors
    /// [`MarianError::Format`] when the magic, the sizes or the offsets are invalid.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Shortlist, MarianError> {
        let fail = |offset: usize, reason: String| MarianError::Format {
            path: path.to_path_buf(),
            offset: offset as u64,
            reason,
        };
        if bytes.len() < HEADER_BYTES {
            return Err(fail(
                0,
                format!(
                    "the {}-byte file is shorter than the {HEADER_BYTES}-byte header",
                    bytes.len()
                ),
            ));
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        if word(0) != MAGIC {
            return Err(fail(0, format!("magic {:#x} is not {MAGIC:#x}", word(0))));
        }
        let (first, best, offset_count, entry_count) = (word(2), word(3), word(4), word(5));
        let expected = offset_count
            .checked_mul(8)
            .zip(entry_count.checked_mul(4))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|n| n.checked_add(HEADER_BYTES as u64));
        if expected != Some(bytes.len() as u64) || offset_count == 0 {
            return Err(fail(
                32,
                format!(
                    "{offset_count} offsets and {entry_count} entries do not fit the \
                     {}-byte file",
                    bytes.len()
                ),
            ));
        }

        let offsets_end = HEADER_BYTES + offset_count as usize * 8;
        let offsets: Vec<u64> = bytes[HEADER_BYTES..offsets_end]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (i, pair) in offsets.windows(2).enumerate() {
            if pair[0] > pair[1] || pair[1] > entry_count {
                return Err(fail(
                    HEADER_BYTES + (i + 1) * 8,
                    format!(
                        "offset {} of source id {i} is below the previous offset {} or past the \
                         {entry_count} entries",
                        pair[1], pair[0]
                    ),
                ));
            }
        }
        let entries = bytes[offsets_end..]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Ok(Shortlist {
            path: path.to_path_buf(),
            first: first as usize,
            best: best as usize,
            offsets,
            entries,
        })
    }

    /// Returns how many of the most frequent target ids every shortlist contains.
    pub fn first(&self) -> usize {
        self.first
    }

    /// Returns the maximum number of target ids listed per source id.
    pub fn best(&self) -> usize {
        self.best
    }

    /// Returns the sorted target ids that may appear in the translation of `source`, `eos`
    /// included, for a target vocabulary of `vocab` ids.
    ///
    /// NOTE: Marian pads this set to a multiple of eight ids for its int8 kernels. The padding
    /// is left out, so a translation can rarely differ from Marian's when a padding id would
    /// have won.
    ///
    /// # Errors
    /// [`MarianError::Input`] when a source id has no list, and [`MarianError::Format`] when a
    /// listed target id is outside the vocabulary.
    pub fn candidates(
        &self,
        source: &[u32],
        eos: u32,
        vocab: usize,
    ) -> Result<Vec<u32>, MarianError> {
        let mut selected = vec![false; vocab];
        for flag in selected.iter_mut().take(self.first) {
            *flag = true;
        }
        let mut mark = |id: u32| -> Result<(), MarianError> {
            match selected.get_mut(id as usize) {
                Some(flag) => {
                    *flag = true;
                    Ok(())
                }
                None => Err(MarianError::Format {
                    path: self.path.clone(),
                    offset: 0,
                    reason: format!("target id {id} is outside the vocabulary of {vocab}"),
                }),
            }
        };
        mark(eos)?;
        for &id in source {
            let s = id as usize;
            if s + 1 >= self.offsets.len() {
                return Err(MarianError::Input(format!(
                    "source id {id} has no shortlist in {}, which covers {} ids",
                    self.path.display(),
                    self.offsets.len() - 1
                )));
            }
            mark(id)?;
            let range = self.offsets[s] as usize..self.offsets[s + 1] as usize;
            for &target in &self.entries[range] {
                mark(target)?;
            }
        }
        Ok((0..vocab as u32).filter(|&id| selected[id as usize]).collect())
    }
}
