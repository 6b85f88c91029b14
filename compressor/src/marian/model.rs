//! The f32 host model: a post-norm transformer encoder and an SSRU decoder with cross-attention.
//!
//! The computation follows Marian 1.9 (`src/models/transformer.h` and the SSRU cell in
//! `src/rnn/cells.h` of marian-nmt/marian-dev) for models trained with
//! `transformer-decoder-autoreg: rnn`, `dec-cell: ssru` and `transformer-postprocess: dan`:
//!
//! - embeddings are scaled by `sqrt(dim)` and get sinusoidal positions added;
//! - each encoder layer is self-attention then a ReLU feed-forward block, each followed by a
//!   residual connection and layer normalization (post-norm);
//! - each decoder layer is an SSRU cell `f = sigmoid(x Wf + bf)`, `c = f c' + (1 - f) (x W)`,
//!   output `relu(c)`, then cross-attention over the encoder output, then a feed-forward block,
//!   each followed by a residual connection and layer normalization;
//! - the output layer multiplies by the transposed embedding matrix and adds a bias.

use edgefold_runtime::kernels::{
    self,
    generic::{F32Rows, I4Rows, I8Rows, WeightRows},
    Weights,
};
use std::sync::Arc;

use super::file::MarianFile;
use super::{MarianError, YamlValue};

/// Layer normalization epsilon of Marian's transformer layers.
pub(super) const LAYER_NORM_EPS: f32 = 1e-6;

/// Ratio of the maximum target length to the source length, Marian's `max-length-factor` in the
/// configuration that ships with the Firefox Translations models.
const MAX_LENGTH_FACTOR: f32 = 2.5;

/// Tensors of one encoder layer: the four projections of self-attention with their biases and
/// layer normalization (10), and the feed-forward block's two layers with their biases and layer
/// normalization (6).
const ENCODER_LAYER_TENSORS: usize = 16;

/// Tensors of one decoder layer: the SSRU cell's two weights, forget bias and layer normalization
/// (5), then cross-attention (10) and a feed-forward block (6) as in an encoder layer.
const DECODER_LAYER_TENSORS: usize = 21;

/// Hyperparameters of a Marian transformer with an SSRU decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarianConfig {
    /// Number of encoder layers (`enc-depth`).
    pub encoder_layers: usize,
    /// Number of decoder layers (`dec-depth`).
    pub decoder_layers: usize,
    /// Model width (`dim-emb`).
    pub dim: usize,
    /// Number of attention heads (`transformer-heads`).
    pub heads: usize,
    /// Width of the feed-forward blocks (`transformer-dim-ffn`).
    pub ffn_dim: usize,
    /// Size of the shared source and target vocabulary.
    pub vocab: usize,
}

impl MarianConfig {
    /// Reads the hyperparameters from the file's YAML configuration and the embedding's shape,
    /// and checks that the options describe an architecture [`MarianModel`] implements.
    ///
    /// # Errors
    /// [`MarianError::Config`] when a required key is missing, names another architecture, or
    /// gives more layers than the file has tensors for, and [`MarianError::Tensor`] when `Wemb` is
    /// missing or not a matrix.
    pub fn from_file(file: &MarianFile) -> Result<MarianConfig, MarianError> {
        let embedding = file.tensor("Wemb").ok_or_else(|| file.tensor_error("Wemb", "missing"))?;
        let [vocab, dim] = embedding.shape[..] else {
            return Err(file.tensor_error(
                "Wemb",
                format!("has shape {:?}, expected [vocab, dim]", embedding.shape),
            ));
        };
        if file.config().is_none() {
            return Err(file.config_error(
                "special:model.yml",
                "missing: the file has no embedded configuration, so the architecture is unknown",
            ));
        }

        let expected = [
            ("type", "transformer"),
            ("transformer-decoder-autoreg", "rnn"),
            ("dec-cell", "ssru"),
            ("transformer-ffn-activation", "relu"),
            ("transformer-ffn-depth", "2"),
            ("transformer-postprocess", "dan"),
            ("transformer-preprocess", ""),
            ("transformer-postprocess-emb", "d"),
            ("tied-embeddings-all", "true"),
        ];
        for (key, value) in expected {
            let found = match file.config_value(key) {
                Some(YamlValue::Scalar(s)) => s.as_str(),
                Some(YamlValue::List(items)) if items.is_empty() => "",
                _ => return Err(file.config_error(key, "missing or not a scalar")),
            };
            if found != value {
                return Err(file
                    .config_error(key, format!("is {found:?}, but only {value:?} is supported")));
            }
        }
        let trained_positions = file.config_value("transformer-train-position-embeddings");
        if trained_positions.and_then(YamlValue::as_bool) == Some(true) {
            return Err(file.config_error(
                "transformer-train-position-embeddings",
                "is true, but only sinusoidal positions are supported",
            ));
        }

        let number = |key: &str| {
            file.config_value(key)
                .and_then(YamlValue::as_usize)
                .filter(|&n| n > 0)
                .ok_or_else(|| file.config_error(key, "missing or not a positive integer"))
        };
        let config = MarianConfig {
            encoder_layers: number("enc-depth")?,
            decoder_layers: number("dec-depth")?,
            dim: number("dim-emb")?,
            heads: number("transformer-heads")?,
            ffn_dim: number("transformer-dim-ffn")?,
            vocab,
        };
        if config.dim != dim {
            return Err(file.config_error(
                "dim-emb",
                format!("is {}, but Wemb has {dim} columns", config.dim),
            ));
        }
        // A depth beyond what the tensor table can contain is rejected here, before it sizes any
        // allocation.
        let tensors = file.tensors().len();
        for (key, layers, per_layer) in [
            ("enc-depth", config.encoder_layers, ENCODER_LAYER_TENSORS),
            ("dec-depth", config.decoder_layers, DECODER_LAYER_TENSORS),
        ] {
            let max = tensors / per_layer;
            if layers > max {
                return Err(file.config_error(
                    key,
                    format!(
                        "is {layers}, but the file's {tensors} tensors are enough for at most \
                         {max} layers of {per_layer} tensors"
                    ),
                ));
            }
        }
        if !config.dim.is_multiple_of(config.heads) || !config.dim.is_multiple_of(2) {
            return Err(file.config_error(
                "transformer-heads",
                format!("{} heads do not divide the even width {}", config.heads, config.dim),
            ));
        }
        Ok(config)
    }

    /// Returns the width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
}

/// A dense layer `y = x W + b`. `W` is kept transposed, `[outputs, inputs]`, as the runtime's
/// `linear` kernels take it: in int8 with one scale when the file stores it so (intgemm8), in
/// f32, or in int4 groups after compression.
#[derive(Debug, Clone)]
pub(super) struct Linear {
    pub(super) weight: LinearWeight,
    pub(super) bias: Option<Vec<f32>>,
    pub(super) inputs: usize,
    pub(super) outputs: usize,
    /// While calibrating, the Gram matrix of the inputs seen so far.
    #[cfg(feature = "compress")]
    pub(super) gram: Option<std::sync::Arc<super::compress::GramRecorder>>,
}

/// The stored values of a matrix `[outputs, inputs]`.
#[derive(Debug, Clone)]
pub(super) enum LinearWeight {
    F32(Vec<f32>),
    /// Values and one scale per output (all equal for a Marian file: its multiplier, inverted).
    I8 {
        q: Vec<i8>,
        scales: Vec<f32>,
    },
    /// Int4 in groups along each row with f16 scales, and f16 minimums when `mins` is set
    /// (the runtime's [`I4Rows`] layout). Only compression makes them.
    #[cfg_attr(not(feature = "compress"), allow(dead_code))]
    I4 {
        packed: Vec<u8>,
        scales: Vec<u16>,
        mins: Option<Vec<u16>>,
        group: usize,
    },
}

impl LinearWeight {
    /// Returns the weights as the runtime's kernels take them, for rows of `k` values.
    fn view(&self, k: usize) -> Weights<'_> {
        match self {
            LinearWeight::F32(w) => Weights::F32(F32Rows { w, k }),
            LinearWeight::I8 { q, scales } => Weights::I8(I8Rows { q, scales, k }),
            LinearWeight::I4 { packed, scales, mins, group } => {
                Weights::I4(I4Rows { packed, scales, mins: mins.as_deref(), k, group: *group })
            }
        }
    }

    /// Returns the bytes the values and their scales take in a packed file.
    #[cfg_attr(not(feature = "compress"), allow(dead_code))]
    pub(super) fn byte_len(&self) -> usize {
        match self {
            LinearWeight::F32(w) => w.len() * 4,
            LinearWeight::I8 { q, scales } => q.len() + scales.len() * 4,
            LinearWeight::I4 { packed, scales, mins, .. } => {
                packed.len() + (scales.len() + mins.as_ref().map_or(0, Vec::len)) * 2
            }
        }
    }
}

impl Linear {
    fn load(
        file: &MarianFile,
        weight: &str,
        bias: Option<&str>,
        inputs: usize,
        outputs: usize,
    ) -> Result<Linear, MarianError> {
        let weight = match file.int8_matrix(weight, Some(&[inputs, outputs])) {
            Ok(m) => LinearWeight::I8 {
                q: transpose(&m.values, inputs, outputs),
                scales: vec![1.0 / m.multiplier; outputs],
            },
            Err(_) => {
                let w = file.tensor_f32(weight, Some(&[inputs, outputs]))?;
                LinearWeight::F32(transpose(&w, inputs, outputs))
            }
        };
        let bias = match bias {
            Some(name) => Some(file.tensor_f32(name, Some(&[1, outputs]))?),
            None => None,
        };
        Ok(Linear::new(weight, bias, inputs, outputs))
    }

    /// Returns a layer with the given weights and bias that records nothing.
    pub(super) fn new(
        weight: LinearWeight,
        bias: Option<Vec<f32>>,
        inputs: usize,
        outputs: usize,
    ) -> Linear {
        Linear {
            weight,
            bias,
            inputs,
            outputs,
            #[cfg(feature = "compress")]
            gram: None,
        }
    }

    /// Applies the layer to `rows` input rows stored one after another. With `int8`, the
    /// inputs of int8 and int4 weights may be quantized to int8 for integer products
    /// ([`kernels::linear_int8`]).
    fn forward(&self, x: &[f32], rows: usize, int8: bool) -> Vec<f32> {
        debug_assert_eq!(x.len(), rows * self.inputs);
        #[cfg(feature = "compress")]
        if let Some(gram) = &self.gram {
            gram.record(x, rows);
        }
        let mut y = vec![0.0f32; rows * self.outputs];
        let (k, n) = (self.inputs, self.outputs);
        let w = self.weight.view(k);
        let bias = self.bias.as_deref();
        match int8 {
            true => kernels::linear_int8(x, rows, k, w, n, bias, &mut y),
            false => kernels::linear(x, rows, k, w, n, bias, &mut y),
        }
        y
    }

    /// Writes row `r` of the stored `[outputs, inputs]` matrix into `out` as f32.
    pub(super) fn row(&self, r: usize, out: &mut [f32]) {
        let k = self.inputs;
        if let LinearWeight::I4 { packed, scales, mins, group } = &self.weight {
            // One scale (and minimum) per group, decoded once.
            let groups = k / group;
            let bytes = &packed[r * k.div_ceil(2)..][..k.div_ceil(2)];
            for (g, chunk) in out.chunks_exact_mut(*group).enumerate() {
                let at = r * groups + g;
                let scale = half::f16::from_bits(scales[at]).to_f32();
                let (offset, min) = match mins {
                    Some(mins) => (8.0, half::f16::from_bits(mins[at]).to_f32()),
                    None => (0.0, 0.0),
                };
                let pairs = &bytes[g * group / 2..][..group / 2];
                for (o, &byte) in chunk.chunks_exact_mut(2).zip(pairs) {
                    let low = (((byte << 4) as i8) >> 4) as f32;
                    let high = ((byte as i8) >> 4) as f32;
                    o[0] = (low + offset) * scale + min;
                    o[1] = (high + offset) * scale + min;
                }
            }
            return;
        }
        match self.weight.view(k) {
            Weights::F32(w) => w.fill(r, 0, out),
            Weights::F16(w) => w.fill(r, 0, out),
            Weights::I8(w) => w.fill(r, 0, out),
            Weights::I4(w) => w.fill(r, 0, out),
        }
    }

    /// Returns the stored matrix `[outputs, inputs]` as f32.
    #[cfg_attr(not(feature = "compress"), allow(dead_code))]
    pub(super) fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.outputs * self.inputs];
        for (r, row) in out.chunks_exact_mut(self.inputs).enumerate() {
            self.row(r, row);
        }
        out
    }
}

/// Transposes a row-major `[rows, cols]` matrix to `[cols, rows]`.
fn transpose<T: Copy + Default>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); values.len()];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

#[derive(Debug, Clone)]
pub(super) struct LayerNorm {
    pub(super) scale: Vec<f32>,
    pub(super) bias: Vec<f32>,
}

impl LayerNorm {
    fn load(file: &MarianFile, prefix: &str, dim: usize) -> Result<LayerNorm, MarianError> {
        Ok(LayerNorm {
            scale: file.tensor_f32(&format!("{prefix}_ln_scale"), Some(&[1, dim]))?,
            bias: file.tensor_f32(&format!("{prefix}_ln_bias"), Some(&[1, dim]))?,
        })
    }

    /// Adds `residual` to `x` and normalizes each row in place.
    fn add_and_normalize(&self, x: &mut [f32], residual: &[f32]) {
        let dim = self.scale.len();
        for (row, res) in x.chunks_exact_mut(dim).zip(residual.chunks_exact(dim)) {
            for (v, &r) in row.iter_mut().zip(res) {
                *v += r;
            }
            let mean = row.iter().sum::<f32>() / dim as f32;
            let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
            let inv = 1.0 / (variance + LAYER_NORM_EPS).sqrt();
            for ((v, &s), &b) in row.iter_mut().zip(&self.scale).zip(&self.bias) {
                *v = (*v - mean) * inv * s + b;
            }
        }
    }
}

/// Multi-head attention with its output projection and the layer normalization after it.
#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) query: Linear,
    pub(super) key: Linear,
    pub(super) value: Linear,
    pub(super) output: Linear,
    pub(super) norm: LayerNorm,
}

impl Attention {
    fn load(file: &MarianFile, prefix: &str, dim: usize) -> Result<Attention, MarianError> {
        let linear = |w: &str, b: &str| {
            Linear::load(file, &format!("{prefix}_{w}"), Some(&format!("{prefix}_{b}")), dim, dim)
        };
        Ok(Attention {
            query: linear("Wq", "bq")?,
            key: linear("Wk", "bk")?,
            value: linear("Wv", "bv")?,
            output: linear("Wo", "bo")?,
            norm: LayerNorm::load(file, &format!("{prefix}_Wo"), dim)?,
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct FeedForward {
    pub(super) up: Linear,
    pub(super) down: Linear,
    pub(super) norm: LayerNorm,
}

impl FeedForward {
    fn load(
        file: &MarianFile,
        prefix: &str,
        dim: usize,
        ffn_dim: usize,
    ) -> Result<FeedForward, MarianError> {
        let name = |suffix: &str| format!("{prefix}_{suffix}");
        Ok(FeedForward {
            up: Linear::load(file, &name("W1"), Some(&name("b1")), dim, ffn_dim)?,
            down: Linear::load(file, &name("W2"), Some(&name("b2")), ffn_dim, dim)?,
            norm: LayerNorm::load(file, &name("ffn"), dim)?,
        })
    }

    /// Applies the block and its residual normalization to `rows` rows of `x` in place.
    fn apply(&self, x: &mut [f32], rows: usize, int8: bool) {
        let mut hidden = self.up.forward(x, rows, int8);
        for v in &mut hidden {
            *v = v.max(0.0);
        }
        let out = self.down.forward(&hidden, rows, int8);
        self.norm.add_and_normalize(x, &out);
    }
}

/// An SSRU cell with the layer normalization after its residual connection.
#[derive(Debug, Clone)]
pub(super) struct Ssru {
    pub(super) input: Linear,
    pub(super) forget: Linear,
    pub(super) norm: LayerNorm,
}

#[derive(Debug, Clone)]
pub(super) struct EncoderLayer {
    pub(super) attention: Attention,
    pub(super) ffn: FeedForward,
}

#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    pub(super) ssru: Ssru,
    pub(super) context: Attention,
    pub(super) ffn: FeedForward,
}

/// Encoder-derived data of one sentence: the source length and, per decoder layer, the
/// cross-attention keys and values, computed once from the encoder output.
#[derive(Debug)]
struct EncoderContext {
    source_len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// The per-sentence state of the decoder: the encoder's keys and values, the SSRU cell of each
/// decoder layer, the target position and the last target token.
///
/// Cloning is cheap: the encoder-derived data is shared, and only the cells (one vector of the
/// model width per decoder layer) are copied.
#[derive(Debug, Clone)]
pub struct DecoderState {
    context: Arc<EncoderContext>,
    encoder_output: Arc<Vec<f32>>,
    cells: Vec<Vec<f32>>,
    position: usize,
    last_token: Option<u32>,
}

impl DecoderState {
    /// Returns the encoder output, `[source_len, dim]` in row-major order.
    pub fn encoder_output(&self) -> &[f32] {
        &self.encoder_output
    }

    /// Returns the number of source tokens, `</s>` included.
    pub fn source_len(&self) -> usize {
        self.context.source_len
    }

    /// Returns the SSRU cell of each decoder layer.
    pub fn cells(&self) -> &[Vec<f32>] {
        &self.cells
    }

    /// Returns the position of the next target token, which is the number of steps taken.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Sets the token that the next step takes as its input.
    pub fn push(&mut self, token: u32) {
        self.last_token = Some(token);
    }
}

/// A Marian transformer with an SSRU decoder, in f32.
#[derive(Debug, Clone)]
pub struct MarianModel {
    pub(super) config: MarianConfig,
    /// `[vocab, dim]`, shared by the source and target embeddings and the output layer, whose
    /// bias it carries.
    pub(super) embedding: Linear,
    pub(super) encoder: Vec<EncoderLayer>,
    pub(super) decoder: Vec<DecoderLayer>,
    eos: u32,
    /// Whether products with int8 weights may quantize their inputs to int8.
    int8_activations: bool,
}

impl MarianModel {
    /// Builds the model from a Marian file, keeping int8 weights in int8. `eos` is the id of
    /// `</s>`, which ends a translation.
    ///
    /// # Errors
    /// [`MarianError::Config`] for an unsupported architecture, [`MarianError::Tensor`] when a
    /// weight is missing or has another shape, and [`MarianError::Input`] when `eos` is outside
    /// the vocabulary.
    pub fn from_file(file: &MarianFile, eos: u32) -> Result<MarianModel, MarianError> {
        let config = MarianConfig::from_file(file)?;
        if eos as usize >= config.vocab {
            return Err(MarianError::Input(format!(
                "end-of-sentence id {eos} is outside the vocabulary of {}",
                config.vocab
            )));
        }
        let (dim, ffn_dim) = (config.dim, config.ffn_dim);
        let (vocab, embedding) = (config.vocab, "Wemb");
        let weight = match file.int8_matrix(embedding, Some(&[vocab, dim])) {
            Ok(m) => LinearWeight::I8 { q: m.values, scales: vec![1.0 / m.multiplier; vocab] },
            Err(_) => LinearWeight::F32(file.tensor_f32(embedding, Some(&[vocab, dim]))?),
        };
        let bias = file.tensor_f32("decoder_ff_logit_out_b", Some(&[1, vocab]))?;
        let embedding = Linear::new(weight, Some(bias), dim, vocab);

        let mut encoder = Vec::with_capacity(config.encoder_layers);
        for l in 1..=config.encoder_layers {
            encoder.push(EncoderLayer {
                attention: Attention::load(file, &format!("encoder_l{l}_self"), dim)?,
                ffn: FeedForward::load(file, &format!("encoder_l{l}_ffn"), dim, ffn_dim)?,
            });
        }

        let mut decoder = Vec::with_capacity(config.decoder_layers);
        for l in 1..=config.decoder_layers {
            let rnn = format!("decoder_l{l}_rnn");
            let ssru = Ssru {
                input: Linear::load(file, &format!("{rnn}_W"), None, dim, dim)?,
                forget: Linear::load(
                    file,
                    &format!("{rnn}_Wf"),
                    Some(&format!("{rnn}_bf")),
                    dim,
                    dim,
                )?,
                norm: LayerNorm::load(file, &format!("{rnn}_ffn"), dim)?,
            };
            decoder.push(DecoderLayer {
                ssru,
                context: Attention::load(file, &format!("decoder_l{l}_context"), dim)?,
                ffn: FeedForward::load(file, &format!("decoder_l{l}_ffn"), dim, ffn_dim)?,
            });
        }
        Ok(MarianModel { config, embedding, encoder, decoder, eos, int8_activations: false })
    }

    /// Assembles a model from its parts, with f32 activations.
    #[cfg_attr(not(feature = "compress"), allow(dead_code))]
    pub(super) fn from_parts(
        config: MarianConfig,
        embedding: Linear,
        encoder: Vec<EncoderLayer>,
        decoder: Vec<DecoderLayer>,
        eos: u32,
    ) -> MarianModel {
        MarianModel { config, embedding, encoder, decoder, eos, int8_activations: false }
    }

    /// Lets the products with int8 weights quantize their inputs to int8 in groups of 32 where
    /// the runtime has an integer kernel ([`kernels::linear_int8`]): faster, at the cost of
    /// rounding the inputs. Marian quantizes the inputs of these models too, with one precomputed
    /// scale per matrix (the `alphas` of the file name). Off by default.
    pub fn set_int8_activations(&mut self, on: bool) {
        self.int8_activations = on;
    }

    /// Returns the hyperparameters.
    pub fn config(&self) -> &MarianConfig {
        &self.config
    }

    /// Returns the id of `</s>`.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Returns the maximum target length for a source of `source_len` tokens: 2.5 times the
    /// source length, as in the configuration shipped with the Firefox Translations models.
    pub fn max_target_len(source_len: usize) -> usize {
        (source_len as f32 * MAX_LENGTH_FACTOR).ceil() as usize
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), MarianError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.config.vocab) {
            return Err(MarianError::Input(format!(
                "token id {id} is outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        Ok(())
    }

    /// Writes the scaled embeddings of `ids` plus their sinusoidal positions, starting at
    /// position `start`, into `out`.
    fn embed(&self, ids: &[Option<u32>], start: usize, out: &mut [f32]) {
        let dim = self.config.dim;
        let scale = (dim as f32).sqrt();
        for (i, (id, row)) in ids.iter().zip(out.chunks_exact_mut(dim)).enumerate() {
            match id {
                Some(id) => {
                    self.embedding.row(*id as usize, row);
                    for v in row.iter_mut() {
                        *v *= scale;
                    }
                }
                // The first decoder step has no previous token and uses a zero embedding.
                None => row.fill(0.0),
            }
            add_position(row, start + i);
        }
    }

    /// Runs the encoder on source token ids (ending with `</s>`) and returns its output,
    /// `[ids.len(), dim]` in row-major order.
    ///
    /// # Errors
    /// [`MarianError::Input`] when `ids` is empty or contains an id outside the vocabulary.
    pub fn encode(&self, ids: &[u32]) -> Result<Vec<f32>, MarianError> {
        if ids.is_empty() {
            return Err(MarianError::Input("the source sentence has no tokens".into()));
        }
        self.check_ids(ids)?;
        let (n, dim) = (ids.len(), self.config.dim);
        let mut x = vec![0.0f32; n * dim];
        let tokens: Vec<Option<u32>> = ids.iter().map(|&id| Some(id)).collect();
        self.embed(&tokens, 0, &mut x);

        for layer in &self.encoder {
            let a = &layer.attention;
            let q = a.query.forward(&x, n, self.int8_activations);
            let k = a.key.forward(&x, n, self.int8_activations);
            let v = a.value.forward(&x, n, self.int8_activations);
            let mixed = attend(&q, n, &k, &v, n, self.config.heads, dim);
            let out = a.output.forward(&mixed, n, self.int8_activations);
            a.norm.add_and_normalize(&mut x, &out);
            layer.ffn.apply(&mut x, n, self.int8_activations);
        }
        Ok(x)
    }

    /// Encodes a source sentence and returns the decoder state before the first target token.
    ///
    /// # Errors
    /// As [`MarianModel::encode`].
    pub fn start(&self, source: &[u32]) -> Result<DecoderState, MarianError> {
        let output = self.encode(source)?;
        let n = source.len();
        let keys = self
            .decoder
            .iter()
            .map(|l| l.context.key.forward(&output, n, self.int8_activations))
            .collect();
        let values = self
            .decoder
            .iter()
            .map(|l| l.context.value.forward(&output, n, self.int8_activations))
            .collect();
        Ok(DecoderState {
            context: Arc::new(EncoderContext { source_len: n, keys, values }),
            encoder_output: Arc::new(output),
            cells: vec![vec![0.0; self.config.dim]; self.config.decoder_layers],
            position: 0,
            last_token: None,
        })
    }

    /// Runs one decoder step on the state's last token, updates the SSRU cells and the position,
    /// and returns the logits of the next token: over the whole vocabulary when `candidates` is
    /// `None`, else over `candidates` in their order.
    ///
    /// # Errors
    /// [`MarianError::Input`] when a candidate or the pushed token is outside the vocabulary.
    pub fn step(
        &self,
        state: &mut DecoderState,
        candidates: Option<&[u32]>,
    ) -> Result<Vec<f32>, MarianError> {
        if let Some(ids) = candidates {
            self.check_ids(ids)?;
        }
        if let Some(token) = state.last_token {
            self.check_ids(&[token])?;
        }
        let table = self.output_table(candidates);
        let hidden = self.decoder_hidden(state);
        Ok(self.logits(&hidden, table.as_ref()))
    }

    /// Runs one decoder step with the output rows of a sentence's candidates already gathered.
    fn step_with(&self, state: &mut DecoderState, table: Option<&OutputTable>) -> Vec<f32> {
        let hidden = self.decoder_hidden(state);
        self.logits(&hidden, table)
    }

    fn decoder_hidden(&self, state: &mut DecoderState) -> Vec<f32> {
        let dim = self.config.dim;
        let mut y = vec![0.0f32; dim];
        self.embed(&[state.last_token], state.position, &mut y);

        for (l, layer) in self.decoder.iter().enumerate() {
            let cell = &mut state.cells[l];
            let forget = layer.ssru.forget.forward(&y, 1, self.int8_activations);
            let input = layer.ssru.input.forward(&y, 1, self.int8_activations);
            let mut out = vec![0.0f32; dim];
            for i in 0..dim {
                let f = sigmoid(forget[i]);
                cell[i] = f * cell[i] + (1.0 - f) * input[i];
                out[i] = cell[i].max(0.0);
            }
            layer.ssru.norm.add_and_normalize(&mut y, &out);

            let a = &layer.context;
            let q = a.query.forward(&y, 1, self.int8_activations);
            let (keys, values) = (&state.context.keys[l], &state.context.values[l]);
            let n = state.context.source_len;
            let mixed = attend(&q, 1, keys, values, n, self.config.heads, dim);
            let out = a.output.forward(&mixed, 1, self.int8_activations);
            a.norm.add_and_normalize(&mut y, &out);

            layer.ffn.apply(&mut y, 1, self.int8_activations);
        }
        state.position += 1;
        y
    }

    /// Gathers the output rows and biases of `candidates` in f32, once per sentence, so that
    /// each step's logits are one product whatever the storage of the embedding.
    fn output_table(&self, candidates: Option<&[u32]>) -> Option<OutputTable> {
        let ids = candidates?;
        let dim = self.config.dim;
        let mut weights = vec![0.0f32; ids.len() * dim];
        for (&id, row) in ids.iter().zip(weights.chunks_exact_mut(dim)) {
            self.embedding.row(id as usize, row);
        }
        let all = self.embedding.bias.as_deref().unwrap_or(&[]);
        let bias = ids.iter().map(|&id| all.get(id as usize).copied().unwrap_or(0.0)).collect();
        Some(OutputTable { weights, bias })
    }

    /// Returns the logits of the candidates in `table`, or of the whole vocabulary without one.
    fn logits(&self, hidden: &[f32], table: Option<&OutputTable>) -> Vec<f32> {
        #[cfg(feature = "compress")]
        if let Some(gram) = &self.embedding.gram {
            gram.record(hidden, 1);
        }
        let Some(table) = table else {
            return self.embedding.forward(hidden, 1, false);
        };
        let (k, n) = (self.config.dim, table.bias.len());
        let mut y = vec![0.0f32; n];
        let w = Weights::F32(F32Rows { w: &table.weights, k });
        kernels::linear(hidden, 1, k, w, n, Some(&table.bias), &mut y);
        y
    }

    /// Translates source ids (ending with `</s>`) by greedy search and returns the target ids
    /// without `</s>`. The search stops at `</s>` or after `max_len` tokens. With `candidates`,
    /// only those target ids are considered, as a lexical shortlist gives them.
    ///
    /// # Errors
    /// As [`MarianModel::encode`] and [`MarianModel::step`].
    pub fn translate_greedy(
        &self,
        source: &[u32],
        max_len: usize,
        candidates: Option<&[u32]>,
    ) -> Result<Vec<u32>, MarianError> {
        if let Some(ids) = candidates {
            self.check_ids(ids)?;
        }
        let table = self.output_table(candidates);
        let mut state = self.start(source)?;
        let mut out = Vec::new();
        while out.len() < max_len {
            let logits = self.step_with(&mut state, table.as_ref());
            let best = argmax(&logits);
            let token = candidates.map_or(best as u32, |ids| ids[best]);
            if token == self.eos {
                break;
            }
            out.push(token);
            state.push(token);
        }
        Ok(out)
    }

    /// Translates source ids by beam search with `beam` hypotheses and returns the target ids
    /// of the best finished hypothesis without `</s>`.
    ///
    /// Finished hypotheses are ranked by their summed log-probability divided by their length
    /// with `</s>` counted, which is length normalization with exponent 1 (`normalize: 1.0` in
    /// the configuration shipped with the models). A hypothesis still open after `max_len`
    /// tokens competes with the finished ones. `beam == 1` gives the greedy result.
    ///
    /// NOTE: the results have not been compared with Marian's own beam search, which may count
    /// the length or stop the search differently.
    ///
    /// # Errors
    /// [`MarianError::Input`] when `beam` is 0, and as [`MarianModel::translate_greedy`].
    pub fn translate_beam(
        &self,
        source: &[u32],
        beam: usize,
        max_len: usize,
        candidates: Option<&[u32]>,
    ) -> Result<Vec<u32>, MarianError> {
        if beam == 0 {
            return Err(MarianError::Input("the beam size must be at least 1".into()));
        }
        if let Some(ids) = candidates {
            self.check_ids(ids)?;
        }
        let table = self.output_table(candidates);
        let mut alive =
            vec![Hypothesis { state: self.start(source)?, tokens: Vec::new(), score: 0.0 }];
        let mut finished: Vec<(f32, Vec<u32>)> = Vec::new();

        for _ in 0..max_len {
            // Every expansion of every open hypothesis: (score, hypothesis index, token).
            let mut expansions: Vec<(f32, usize, u32)> = Vec::new();
            let mut states = Vec::with_capacity(alive.len());
            for (h, hyp) in alive.iter().enumerate() {
                let mut state = hyp.state.clone();
                let logits = self.step_with(&mut state, table.as_ref());
                let log_probs = log_softmax(&logits);
                for (j, &lp) in log_probs.iter().enumerate() {
                    let token = candidates.map_or(j as u32, |ids| ids[j]);
                    expansions.push((hyp.score + lp, h, token));
                }
                states.push(state);
            }
            // Open hypotheses and those finished so far share the beam, so it narrows as
            // hypotheses end with `</s>`.
            let slots = beam - finished.len();
            expansions.sort_by(|a, b| b.0.total_cmp(&a.0));

            let mut next = Vec::with_capacity(slots);
            for &(score, h, token) in expansions.iter().take(slots) {
                let tokens = &alive[h].tokens;
                if token == self.eos {
                    finished.push((score / (tokens.len() + 1) as f32, tokens.clone()));
                    continue;
                }
                let mut state = states[h].clone();
                state.push(token);
                let mut tokens = tokens.clone();
                tokens.push(token);
                next.push(Hypothesis { state, tokens, score });
            }
            alive = next;
            if finished.len() >= beam || alive.is_empty() {
                break;
            }
        }
        for hyp in alive {
            finished.push((hyp.score / hyp.tokens.len().max(1) as f32, hyp.tokens));
        }
        let best = finished.into_iter().max_by(|a, b| a.0.total_cmp(&b.0));
        Ok(best.map(|(_, tokens)| tokens).unwrap_or_default())
    }
}

/// The output rows `[candidates, dim]` and biases of one sentence's candidate tokens.
struct OutputTable {
    weights: Vec<f32>,
    bias: Vec<f32>,
}

struct Hypothesis {
    state: DecoderState,
    tokens: Vec<u32>,
    score: f32,
}

// NOTE: the runtime's `translator` module computes this model again (positions, attention, layer
// normalization, the SSRU cell) with libm, so the two agree to about 3e-5 in the logits rather
// than exactly. Beam search and the compressor's calibration use this host copy.

/// Adds Marian's sinusoidal position signal of position `position` to one embedding row: sines
/// in the first half and cosines in the second, with timescales from 1 to 10,000 spaced as
/// `10000^(i / (dim/2 - 1))` (`sinusoidalPositionEmbeddings` in Marian's
/// `src/graph/node_initializers.cpp`).
fn add_position(row: &mut [f32], position: usize) {
    let half = row.len() / 2;
    let increment = (10000.0f32).ln() / (half as f32 - 1.0).max(1.0);
    for i in 0..half {
        let angle = position as f32 * (-(i as f32) * increment).exp();
        row[i] += angle.sin();
        row[half + i] += angle.cos();
    }
}

/// Scaled dot-product attention of `nq` query rows over `nk` key and value rows, per head, with
/// the heads' outputs concatenated: `[nq, dim]`.
fn attend(
    q: &[f32],
    nq: usize,
    k: &[f32],
    v: &[f32],
    nk: usize,
    heads: usize,
    dim: usize,
) -> Vec<f32> {
    let head_dim = dim / heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0.0f32; nq * dim];
    let mut weights = vec![0.0f32; nk];
    for i in 0..nq {
        for h in 0..heads {
            let cols = h * head_dim..(h + 1) * head_dim;
            let query = &q[i * dim..][cols.clone()];
            for (j, w) in weights.iter_mut().enumerate() {
                *w = dot(query, &k[j * dim..][cols.clone()]) * scale;
            }
            softmax_in_place(&mut weights);
            let target = &mut out[i * dim..][cols.clone()];
            for (j, &w) in weights.iter().enumerate() {
                for (t, &x) in target.iter_mut().zip(&v[j * dim..][cols.clone()]) {
                    *t += w * x;
                }
            }
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn softmax_in_place(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in values.iter_mut() {
        *v /= sum;
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|v| (v - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|v| v - log_sum).collect()
}

/// Returns the index of the largest value, the first one on ties.
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}
