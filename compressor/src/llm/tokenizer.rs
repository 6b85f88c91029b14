//! The byte-level BPE tokenizer and chat template that a GGUF file stores in its metadata.
//!
//! GGUF keeps the vocabulary (`tokenizer.ggml.tokens`), the merges, each token's type and the
//! pre-tokenizer's name (`tokenizer.ggml.pre`). The `tokenizers` crate encodes text with the same
//! BPE model and pre-tokenizer that llama.cpp applies for that name. Decoding maps each token's
//! characters back to bytes through GPT-2's byte-to-character table, so a stream of tokens can be
//! printed as soon as its bytes form whole UTF-8 characters.

use std::collections::HashMap;
use std::fmt;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeBuilder, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::{GgufError, GgufFile, Value};

/// Token type of control tokens such as `<|im_start|>` in `tokenizer.ggml.token_type`.
const TOKEN_TYPE_CONTROL: i64 = 3;

/// Errors from encoding text or applying a chat template.
#[derive(Debug)]
#[non_exhaustive]
pub enum TokenizeError {
    /// The `tokenizers` crate failed to encode the text.
    Encode(String),
    /// The chat template is missing or failed to render.
    Template(String),
    /// The tokenizer's stored parts are inconsistent.
    Spec(String),
}

impl fmt::Display for TokenizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizeError::Encode(e) => write!(f, "tokenizing failed: {e}"),
            TokenizeError::Template(e) => write!(f, "chat template: {e}"),
            TokenizeError::Spec(e) => write!(f, "tokenizer: {e}"),
        }
    }
}

impl std::error::Error for TokenizeError {}

/// A tokenizer built from a GGUF file's metadata.
pub struct GgufTokenizer {
    tokenizer: Tokenizer,
    tokens: Vec<String>,
    control: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    /// Byte of each character of GPT-2's byte-to-character table.
    char_bytes: HashMap<char, u8>,
}

impl fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("tokens", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

fn string_array(file: &GgufFile, key: &str) -> Result<Vec<String>, GgufError> {
    let items = file
        .require(key)?
        .as_array()
        .ok_or_else(|| file.metadata_error(key, "expected an array of strings"))?;
    items
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| file.metadata_error(key, "expected an array of strings"))
}

fn optional_token(file: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>, GgufError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            _ => Err(file.metadata_error(key, format!("{v:?} is not a token id below {vocab}"))),
        },
    }
}

/// Parts of a GGUF file's metadata that a byte-level BPE [`GgufTokenizer`] is built from, which
/// a packed file keeps as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerSpec {
    /// Whether digits are split one by one before the byte-level pattern (`smollm`).
    pub split_digits: bool,
    /// Token texts in byte-level characters, indexed by id.
    pub tokens: Vec<String>,
    /// Merges in priority order.
    pub merges: Vec<(String, String)>,
    /// Whether each token is a control token.
    pub control: Vec<bool>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Whether encoding puts the beginning-of-sequence token first.
    pub add_bos: bool,
    /// Jinja chat template.
    pub chat_template: Option<String>,
}

impl TokenizerSpec {
    /// Reads the tokenizer's parts from `file`.
    pub fn from_gguf(file: &GgufFile) -> Result<TokenizerSpec, GgufError> {
        let model = file.require_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(file.metadata_error(
                "tokenizer.ggml.model",
                format!("tokenizer `{model}` is not supported; only byte-level BPE (`gpt2`) is"),
            ));
        }
        // llama.cpp splits digits one by one before the GPT-2 pattern for these models.
        let pre = file.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let split_digits = match pre {
            "default" | "gpt2" => false,
            "smollm" => true,
            other => {
                return Err(file.metadata_error(
                    "tokenizer.ggml.pre",
                    format!(
                        "pre-tokenizer `{other}` is not supported; supported: default, gpt2, smollm"
                    ),
                ))
            }
        };

        let tokens = string_array(file, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = string_array(file, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
                None => Err(file.metadata_error(
                    "tokenizer.ggml.merges",
                    format!("merge `{m}` is not two tokens separated by a space"),
                )),
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .as_array()
                .filter(|items| items.len() == tokens.len())
                .and_then(|items| {
                    items
                        .iter()
                        .map(|i| {
                            i.as_u64().map(|x| x as i64).or(match i {
                                Value::Int(x) => Some(*x),
                                _ => None,
                            })
                        })
                        .collect()
                })
                .ok_or_else(|| {
                    file.metadata_error(
                        "tokenizer.ggml.token_type",
                        format!("expected {} integers, one per token", tokens.len()),
                    )
                })?,
        };
        let vocab_len = tokens.len();
        Ok(TokenizerSpec {
            split_digits,
            control: types.iter().map(|&t| t == TOKEN_TYPE_CONTROL).collect(),
            bos: optional_token(file, "tokenizer.ggml.bos_token_id", vocab_len)?,
            eos: optional_token(file, "tokenizer.ggml.eos_token_id", vocab_len)?,
            add_bos: matches!(file.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true))),
            chat_template: file
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_owned),
            merges,
            tokens,
        })
    }

    /// Encodes the parts as JSON.
    pub fn to_json(&self) -> String {
        let merges: Vec<String> = self.merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        let control: Vec<u32> =
            self.control.iter().enumerate().filter(|(_, &c)| c).map(|(i, _)| i as u32).collect();
        serde_json::json!({
            "split_digits": self.split_digits,
            "tokens": self.tokens,
            "merges": merges,
            "control": control,
            "bos": self.bos,
            "eos": self.eos,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        })
        .to_string()
    }

    /// Decodes the parts from [`TokenizerSpec::to_json`]'s output, checking that every id is
    /// inside the vocabulary.
    pub fn from_json(text: &str) -> Result<TokenizerSpec, TokenizeError> {
        let bad = |what: &str| TokenizeError::Spec(what.to_owned());
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| TokenizeError::Spec(e.to_string()))?;
        let strings = |key: &str| -> Result<Vec<String>, TokenizeError> {
            v[key]
                .as_array()
                .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_owned)).collect())
                .ok_or_else(|| bad(&format!("`{key}` is not an array of strings")))
        };
        let tokens = strings("tokens")?;
        let merges = strings("merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
                None => Err(bad(&format!("merge `{m}` is not two tokens separated by a space"))),
            })
            .collect::<Result<_, _>>()?;
        let id = |value: &serde_json::Value| -> Option<u32> {
            value.as_u64().filter(|&i| (i as usize) < tokens.len()).map(|i| i as u32)
        };
        let optional_id = |key: &str| -> Result<Option<u32>, TokenizeError> {
            match &v[key] {
                serde_json::Value::Null => Ok(None),
                value => {
                    id(value).map(Some).ok_or_else(|| bad(&format!("`{key}` is not a token id")))
                }
            }
        };
        let mut control = vec![false; tokens.len()];
        for value in v["control"].as_array().ok_or_else(|| bad("`control` is not an array"))? {
            control[id(value).ok_or_else(|| bad("a control token is not a token id"))? as usize] =
                true;
        }
        Ok(TokenizerSpec {
            split_digits: v["split_digits"].as_bool().unwrap_or(false),
            merges,
            control,
            bos: optional_id("bos")?,
            eos: optional_id("eos")?,
            add_bos: v["add_bos"].as_bool().unwrap_or(false),
            chat_template: v["chat_template"].as_str().map(str::to_owned),
            tokens,
        })
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer stored in `file`.
    pub fn from_gguf(file: &GgufFile) -> Result<GgufTokenizer, GgufError> {
        let spec = TokenizerSpec::from_gguf(file)?;
        GgufTokenizer::from_spec(spec)
            .map_err(|e| file.metadata_error("tokenizer.ggml.merges", e.to_string()))
    }

    /// Builds a tokenizer from its parts.
    pub fn from_spec(spec: TokenizerSpec) -> Result<GgufTokenizer, TokenizeError> {
        let TokenizerSpec {
            split_digits,
            tokens,
            merges,
            control,
            bos,
            eos,
            add_bos,
            chat_template,
        } = spec;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BpeBuilder::new()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizeError::Spec(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        let pre_tokenizer = if split_digits {
            Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level])
        } else {
            Sequence::new(vec![byte_level])
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&control)
            .filter(|(_, &c)| c)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        tokenizer.add_special_tokens(specials).map_err(|e| TokenizeError::Spec(e.to_string()))?;
        Ok(GgufTokenizer {
            tokenizer,
            control,
            bos,
            eos,
            add_bos,
            chat_template,
            char_bytes: byte_chars().into_iter().enumerate().map(|(b, c)| (c, b as u8)).collect(),
            tokens,
        })
    }

    /// Returns the vocabulary size.
    pub fn vocab(&self) -> usize {
        self.tokens.len()
    }

    /// Returns the end-of-sequence token, if the file names one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Returns the text of a token as stored (byte-level characters), if the id is valid.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Returns whether `id` is a control token such as `<|im_end|>`.
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// Encodes `text`, with the beginning-of-sequence token first when the file sets `tokenizer.ggml.add_bos_token`.
    /// Control tokens written in the text, such as `<|im_start|>`, become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let encoding =
            self.tokenizer.encode(text, false).map_err(|e| TokenizeError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Returns the bytes that token `id` stands for. Control tokens give their text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        if self.is_control(id) {
            return text.as_bytes().to_vec();
        }
        let mut out = Vec::with_capacity(text.len());
        for ch in text.chars() {
            match self.char_bytes.get(&ch) {
                Some(&b) => out.push(b),
                // A character outside the table is kept as its own UTF-8.
                None => out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        out
    }

    /// Decodes a whole sequence of tokens to text, replacing invalid UTF-8.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Renders the chat template for one user message, ending with the assistant's turn.
    pub fn chat_prompt(&self, user: &str) -> Result<String, TokenizeError> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            TokenizeError::Template("the file has no tokenizer.chat_template".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template).map_err(|e| TokenizeError::Template(e.to_string()))?;
        let messages = vec![HashMap::from([("role", "user"), ("content", user)])];
        let bos = self.bos.and_then(|id| self.token_text(id)).unwrap_or("");
        let eos = self.eos.and_then(|id| self.token_text(id)).unwrap_or("");
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => bos,
                    eos_token => eos,
                })
            })
            .map_err(|e| TokenizeError::Template(e.to_string()))
    }
}

/// GPT-2's table from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the others to U+0100 onwards in byte order.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
        out[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{fffd}');
            next += 1;
            c
        };
    }
    out
}

/// Turns a stream of tokens into text, holding back bytes until they form whole UTF-8
/// characters.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Adds a token and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tokenizer: &GgufTokenizer, id: u32) -> String {
        self.pending.extend(tokenizer.token_bytes(id));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            // An error with no length is an incomplete character at the end: wait for more.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Bytes that can never become valid are replaced.
            Err(_) => {
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                return text;
            }
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }

    /// Returns whatever bytes remain, with invalid ones replaced.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}
