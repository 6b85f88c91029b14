//! The translator's configuration record and the arena layout it implies.

use crate::error::{Error, Result};

/// Metadata key of the configuration record.
pub const CONFIG_KEY: &str = "translator.marian";

/// Length of the configuration record in bytes.
pub const CONFIG_LEN: usize = 40;

/// Version of the configuration record this runtime reads.
const CONFIG_VERSION: u32 = 1;

/// Tensors before the first encoder layer: `Wemb` and `Wemb_b`.
const EMBEDDING_TENSORS: u32 = 2;

/// Shape of a tensor in a layer, in terms of the model's widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartShape {
    /// Matrix `[dim, dim]`.
    Square,
    /// Matrix `[ffn_dim, dim]`, the first layer of a feed-forward block.
    Up,
    /// Matrix `[dim, ffn_dim]`, the second layer of a feed-forward block.
    Down,
    /// Vector `[dim]`.
    Width,
    /// Vector `[ffn_dim]`.
    FfnWidth,
}

/// Tensors of an encoder layer in file order: name suffix and shape.
pub const ENCODER_PARTS: [(&str, PartShape); 16] = [
    ("self_Wq", PartShape::Square),
    ("self_Wq_b", PartShape::Width),
    ("self_Wk", PartShape::Square),
    ("self_Wk_b", PartShape::Width),
    ("self_Wv", PartShape::Square),
    ("self_Wv_b", PartShape::Width),
    ("self_Wo", PartShape::Square),
    ("self_Wo_b", PartShape::Width),
    ("self_Wo_ln_scale", PartShape::Width),
    ("self_Wo_ln_bias", PartShape::Width),
    ("ffn_W1", PartShape::Up),
    ("ffn_W1_b", PartShape::FfnWidth),
    ("ffn_W2", PartShape::Down),
    ("ffn_W2_b", PartShape::Width),
    ("ffn_ffn_ln_scale", PartShape::Width),
    ("ffn_ffn_ln_bias", PartShape::Width),
];

/// Tensors of a decoder layer in file order: name suffix and shape.
pub const DECODER_PARTS: [(&str, PartShape); 21] = [
    ("rnn_W", PartShape::Square),
    ("rnn_Wf", PartShape::Square),
    ("rnn_Wf_b", PartShape::Width),
    ("rnn_ffn_ln_scale", PartShape::Width),
    ("rnn_ffn_ln_bias", PartShape::Width),
    ("context_Wq", PartShape::Square),
    ("context_Wq_b", PartShape::Width),
    ("context_Wk", PartShape::Square),
    ("context_Wk_b", PartShape::Width),
    ("context_Wv", PartShape::Square),
    ("context_Wv_b", PartShape::Width),
    ("context_Wo", PartShape::Square),
    ("context_Wo_b", PartShape::Width),
    ("context_Wo_ln_scale", PartShape::Width),
    ("context_Wo_ln_bias", PartShape::Width),
    ("ffn_W1", PartShape::Up),
    ("ffn_W1_b", PartShape::FfnWidth),
    ("ffn_W2", PartShape::Down),
    ("ffn_W2_b", PartShape::Width),
    ("ffn_ffn_ln_scale", PartShape::Width),
    ("ffn_ffn_ln_bias", PartShape::Width),
];

/// Offset of the self-attention block in an encoder layer, and of the SSRU cell, the
/// cross-attention and the feed-forward block in a decoder layer.
pub(super) const ENCODER_ATTENTION: u32 = 0;
pub(super) const ENCODER_FFN: u32 = 10;
pub(super) const DECODER_SSRU: u32 = 0;
pub(super) const DECODER_ATTENTION: u32 = 5;
pub(super) const DECODER_FFN: u32 = 15;

/// Shape and hyperparameters of a translation model, as stored in its configuration record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TranslatorConfig {
    /// Encoder layers.
    pub encoder_layers: u32,
    /// Decoder layers.
    pub decoder_layers: u32,
    /// Model width; even.
    pub dim: u32,
    /// Attention heads; divides `dim`.
    pub heads: u32,
    /// Hidden width of the feed-forward blocks.
    pub ffn_dim: u32,
    /// Size of the vocabulary shared by source and target.
    pub vocab: u32,
    /// Id of `</s>`, which ends source sentences and translations.
    pub eos: u32,
    /// Maximum source length in tokens, `</s>` included.
    pub max_source: u32,
    /// Epsilon of layer normalization.
    pub norm_eps: f32,
}

impl TranslatorConfig {
    /// Encodes the record: nine little-endian u32 words (version, the eight sizes in field
    /// order) and the epsilon's f32 bits.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let words = [
            CONFIG_VERSION,
            self.encoder_layers,
            self.decoder_layers,
            self.dim,
            self.heads,
            self.ffn_dim,
            self.vocab,
            self.eos,
            self.max_source,
            self.norm_eps.to_bits(),
        ];
        let mut bytes = [0u8; CONFIG_LEN];
        for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    /// Decodes and checks a record.
    ///
    /// # Errors
    /// [`Error::InvalidTranslator`] when the record has another length or version, or describes
    /// an impossible model.
    pub fn parse(bytes: &[u8]) -> Result<TranslatorConfig> {
        let invalid = |reason| Error::InvalidTranslator { tensor: u32::MAX, reason };
        if bytes.len() != CONFIG_LEN {
            return Err(invalid("the record is not 40 bytes long"));
        }
        let mut words = [0u32; CONFIG_LEN / 4];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        if words[0] != CONFIG_VERSION {
            return Err(invalid("unknown record version"));
        }
        let config = TranslatorConfig {
            encoder_layers: words[1],
            decoder_layers: words[2],
            dim: words[3],
            heads: words[4],
            ffn_dim: words[5],
            vocab: words[6],
            eos: words[7],
            max_source: words[8],
            norm_eps: f32::from_bits(words[9]),
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        let invalid = |reason| Err(Error::InvalidTranslator { tensor: u32::MAX, reason });
        let sizes = [
            self.encoder_layers,
            self.decoder_layers,
            self.dim,
            self.heads,
            self.ffn_dim,
            self.vocab,
            self.max_source,
        ];
        if sizes.contains(&0) {
            return invalid("a size is zero");
        }
        if !self.dim.is_multiple_of(2) || !self.dim.is_multiple_of(self.heads) {
            return invalid("the width is odd or the heads do not divide it");
        }
        if self.eos >= self.vocab {
            return invalid("the end-of-sentence id is outside the vocabulary");
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return invalid("the layer normalization epsilon is not a non-negative number");
        }
        if self.tensor_count() > u32::MAX as u64 {
            return invalid("the tensor count overflows");
        }
        if self.layout().is_none() {
            return invalid("the arena size overflows");
        }
        Ok(())
    }

    /// Number of named tensors of the model, in the order the module documentation gives.
    pub fn tensor_count(&self) -> u64 {
        EMBEDDING_TENSORS as u64
            + ENCODER_PARTS.len() as u64 * self.encoder_layers as u64
            + DECODER_PARTS.len() as u64 * self.decoder_layers as u64
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> u32 {
        self.dim / self.heads.max(1)
    }

    /// Arena bytes a [`Translator`](super::Translator) needs, without the alignment padding of
    /// its start. `None` when the size overflows.
    pub fn arena_bytes(&self) -> Option<u64> {
        self.layout().map(|l| l.total as u64 * 4)
    }

    /// Extents of the arena's parts, in f32 values.
    pub(super) fn layout(&self) -> Option<Layout> {
        let u = |v: u32| v as usize;
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let (source, dim, ffn) = (u(self.max_source), u(self.dim), u(self.ffn_dim));
        let layers = u(self.decoder_layers);
        let rows = mul(source, dim)?;
        let parts = [
            rows,                        // x
            rows,                        // q
            rows,                        // k
            rows,                        // v
            rows,                        // attention output
            rows,                        // projection
            mul(source, ffn)?,           // feed-forward hidden
            source,                      // one row of attention scores
            mul(mul(layers, 2)?, rows)?, // cross-attention keys and values
            mul(STEP_ROWS, dim)?,        // decoder step rows
            ffn,                         // decoder step feed-forward hidden
            mul(layers, dim)?,           // SSRU cells of the greedy search
            u(self.vocab),               // logits
            dim,                         // one embedding row
        ];
        let mut total = 0usize;
        for p in parts {
            total = total.checked_add(p)?;
        }
        // The byte count must fit in u64 and in the address space.
        total.checked_mul(4)?;
        Some(Layout { parts, total })
    }
}

/// Rows of `dim` values that a decoder step uses: the hidden state, the SSRU's forget gate and
/// input, the query, the attention output and a projection.
const STEP_ROWS: usize = 6;

#[derive(Clone, Copy, Debug)]
pub(super) struct Layout {
    /// Extent of each part in f32 values, in the order that [`TranslatorConfig::layout`] lists.
    pub(super) parts: [usize; 14],
    pub(super) total: usize,
}

/// Index of the first tensor of encoder layer `layer` (from 0).
pub(super) fn encoder_base(c: &TranslatorConfig, layer: u32) -> u32 {
    EMBEDDING_TENSORS + ENCODER_PARTS.len() as u32 * layer.min(c.encoder_layers)
}

/// Index of the first tensor of decoder layer `layer` (from 0).
pub(super) fn decoder_base(c: &TranslatorConfig, layer: u32) -> u32 {
    encoder_base(c, c.encoder_layers) + DECODER_PARTS.len() as u32 * layer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TranslatorConfig {
        TranslatorConfig {
            encoder_layers: 2,
            decoder_layers: 1,
            dim: 8,
            heads: 2,
            ffn_dim: 16,
            vocab: 11,
            eos: 0,
            max_source: 5,
            norm_eps: 1e-6,
        }
    }

    #[test]
    fn config_round_trips() {
        let config = config();
        assert_eq!(TranslatorConfig::parse(&config.to_bytes()), Ok(config));
        assert_eq!(config.tensor_count(), 2 + 2 * 16 + 21);
    }

    #[test]
    fn config_rejects_bad_records() {
        let base = config();
        let mut cases = [base; 7];
        cases[0].dim = 0;
        cases[1].heads = 3;
        cases[2].dim = 7;
        cases[2].heads = 7;
        cases[3].eos = 11;
        cases[4].norm_eps = f32::NAN;
        cases[5].max_source = u32::MAX;
        cases[5].decoder_layers = u32::MAX;
        cases[6].vocab = 0;
        for case in cases {
            assert!(TranslatorConfig::parse(&case.to_bytes()).is_err(), "{case:?}");
        }
        assert!(TranslatorConfig::parse(&base.to_bytes()[..36]).is_err());
        let mut version = base.to_bytes();
        version[0] = 2;
        assert!(TranslatorConfig::parse(&version).is_err());
    }

    #[test]
    fn arena_bytes_counts_every_part() {
        let c = config();
        let rows = 5 * 8;
        let values = 6 * rows + 5 * 16 + 5 + 2 * rows + 6 * 8 + 16 + 8 + 11 + 8;
        assert_eq!(c.arena_bytes(), Some(values as u64 * 4));
    }
}
