//! SentencePiece tokenization through the model's Hugging Face `tokenizer.json`.

use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::MarianError;

/// The end-of-sentence token that Marian appends to every source sentence and that ends a
/// translation.
const EOS_TOKEN: &str = "</s>";

/// A tokenizer for a Marian model's shared source and target vocabulary.
pub struct MarianTokenizer {
    path: PathBuf,
    tokenizer: Tokenizer,
    eos: u32,
}

impl fmt::Debug for MarianTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MarianTokenizer")
            .field("path", &self.path)
            .field("vocab", &self.vocab_size())
            .field("eos", &self.eos)
            .finish()
    }
}

impl MarianTokenizer {
    /// Loads the tokenizer from a `tokenizer.json` file.
    ///
    /// # Errors
    /// [`MarianError::Tokenizer`] when the file cannot be read or parsed, or has no `</s>`
    /// token.
    pub fn from_file(path: &Path) -> Result<MarianTokenizer, MarianError> {
        let fail = |reason: String| MarianError::Tokenizer { path: path.to_path_buf(), reason };
        let tokenizer = Tokenizer::from_file(path).map_err(|e| fail(e.to_string()))?;
        let eos = tokenizer
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| fail(format!("the vocabulary has no {EOS_TOKEN} token")))?;
        Ok(MarianTokenizer { path: path.to_path_buf(), tokenizer, eos })
    }

    /// Returns the id of `</s>`.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Returns the vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Encodes one sentence into the token ids of a source sentence, ending with `</s>`.
    ///
    /// # Errors
    /// [`MarianError::Tokenizer`] when the `tokenizers` crate fails to encode the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, MarianError> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| MarianError::Tokenizer {
            path: self.path.clone(),
            reason: format!("encoding {text:?} failed: {e}"),
        })?;
        let mut ids = encoding.get_ids().to_vec();
        ids.push(self.eos);
        Ok(ids)
    }

    /// Decodes target token ids into text, leaving out `</s>`.
    ///
    /// # Errors
    /// [`MarianError::Tokenizer`] when the `tokenizers` crate fails to decode the ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String, MarianError> {
        let kept: Vec<u32> = ids.iter().copied().filter(|&id| id != self.eos).collect();
        self.tokenizer.decode(&kept, true).map_err(|e| MarianError::Tokenizer {
            path: self.path.clone(),
            reason: format!("decoding {} ids failed: {e}", kept.len()),
        })
    }
}
