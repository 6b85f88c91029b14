//! Compression of Marian models: int4 storage per group of matrices, encoder layer removal, and
//! packing into the runtime's file format.
//!
//! A packed Marian model is a file without operators. Its constant tensors are the model's
//! matrices, stored `[outputs, inputs]` in f32, int8 per row or int4 groups, and the layer
//! normalization weights and biases in f32. Its [`CONFIG_KEY`] record gives the hyperparameters
//! as JSON for the host, and its [`TRANSLATOR_KEY`] record gives them, with the maximum source
//! length, to the runtime's translator. [`MarianModel::from_packed`] builds the host model from the
//! file's tensors.

use std::collections::HashMap;

use edgefold_runtime::format::{DType, Quant, TensorKind};
use edgefold_runtime::kernels::Weights;
use edgefold_runtime::translator::TranslatorConfig;
pub use edgefold_runtime::translator::CONFIG_KEY as TRANSLATOR_KEY;
use edgefold_runtime::Model;

use super::model::{
    Attention, DecoderLayer, EncoderLayer, FeedForward, LayerNorm, Linear, LinearWeight, Ssru,
    LAYER_NORM_EPS,
};
use super::{MarianConfig, MarianError, MarianModel};
use crate::gptq::gptq_i4;
use crate::ir::{Graph, Storage};
use crate::plan::ArenaPlan;
use crate::quantize::{quantize_i4, quantize_i4_min};
use crate::writer::{pack as pack_graph, WriteError};

/// Metadata key of a packed Marian model's hyperparameters, as JSON.
pub const CONFIG_KEY: &str = "marian.config";

/// Maximum source length in tokens that the runtime's translator takes from a packed file: 256
/// tokens and `</s>`, as the CLI translates longer lines in pieces of 256 tokens.
pub const MAX_SOURCE: u32 = 257;

/// Group length of int4 storage.
const INT4_GROUP: usize = 32;

/// The groups of matrices that compression treats alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MarianPart {
    /// The shared embedding and output matrix, `[vocab, dim]`.
    Embedding,
    /// The encoder's attention projections.
    EncoderAttention,
    /// The encoder's feed-forward matrices.
    EncoderFfn,
    /// The decoder's SSRU cells and cross-attention projections.
    DecoderAttention,
    /// The decoder's feed-forward matrices.
    DecoderFfn,
}

impl MarianPart {
    /// Every part, largest first.
    pub const ALL: [MarianPart; 5] = [
        MarianPart::Embedding,
        MarianPart::EncoderFfn,
        MarianPart::EncoderAttention,
        MarianPart::DecoderFfn,
        MarianPart::DecoderAttention,
    ];

    /// Returns a short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            MarianPart::Embedding => "embedding",
            MarianPart::EncoderAttention => "encoder attention",
            MarianPart::EncoderFfn => "encoder feed-forward",
            MarianPart::DecoderAttention => "decoder SSRU and attention",
            MarianPart::DecoderFfn => "decoder feed-forward",
        }
    }
}

/// Storage of a part's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixStorage {
    /// Int4 in groups of 32 with an f16 scale each.
    Int4,
    /// Int4 in groups of 32 with an f16 scale and an f16 minimum each.
    Int4Min,
}

impl MatrixStorage {
    /// Returns a short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            MatrixStorage::Int4 => "int4",
            MatrixStorage::Int4Min => "int4 with minimums",
        }
    }
}

/// Accumulates the Gram matrix `XᵀX` of a layer's inputs in f64 while the model translates
/// calibration sentences.
#[derive(Debug)]
pub(crate) struct GramRecorder {
    k: usize,
    gram: std::sync::Mutex<faer::Mat<f64>>,
}

impl GramRecorder {
    fn new(k: usize) -> GramRecorder {
        GramRecorder { k, gram: std::sync::Mutex::new(faer::Mat::zeros(k, k)) }
    }

    /// Adds the rows of `x`, `rows` rows of `k` values.
    pub(super) fn record(&self, x: &[f32], rows: usize) {
        let k = self.k;
        let x = faer::Mat::<f64>::from_fn(rows, k, |i, j| f64::from(x[i * k + j]));
        let mut gram = self.gram.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        faer::linalg::matmul::matmul(
            gram.as_mut(),
            faer::Accum::Add,
            x.transpose(),
            x.as_ref(),
            1.0,
            faer::Par::Seq,
        );
    }

    /// Returns the Gram matrix row-major.
    fn values(&self) -> Vec<f64> {
        let gram = self.gram.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (0..self.k * self.k).map(|i| gram[(i / self.k, i % self.k)]).collect()
    }
}

impl Linear {
    /// Stores the matrix as symmetric int4 groups of 32 with error feedback from `gram`, the
    /// Gram matrix of its inputs (GPTQ). Falls back to rounding when the factorization fails.
    fn store_int4_gptq(&mut self, gram: &[f64]) {
        if !self.inputs.is_multiple_of(INT4_GROUP) {
            return;
        }
        let w = self.to_f32();
        match gptq_i4(&w, self.outputs, self.inputs, gram, INT4_GROUP) {
            Ok((packed, scales)) => {
                self.weight = LinearWeight::I4 { packed, scales, mins: None, group: INT4_GROUP };
            }
            Err(e) => {
                log::warn!("error feedback failed ({e}); rounding to the nearest int4 instead");
                self.store_int4(MatrixStorage::Int4);
            }
        }
    }

    /// Stores the matrix as int4 groups, rounding each value to the nearest point of its
    /// group's grid. A matrix whose rows do not split into groups is left as it is.
    fn store_int4(&mut self, storage: MatrixStorage) {
        if !self.inputs.is_multiple_of(INT4_GROUP) {
            return;
        }
        let w = self.to_f32();
        let (n, k) = (self.outputs, self.inputs);
        self.weight = match storage {
            MatrixStorage::Int4 => {
                let (packed, scales) = quantize_i4(&w, n, k, INT4_GROUP);
                LinearWeight::I4 { packed, scales, mins: None, group: INT4_GROUP }
            }
            MatrixStorage::Int4Min => {
                let (packed, scales, mins) = quantize_i4_min(&w, n, k, INT4_GROUP);
                LinearWeight::I4 { packed, scales, mins: Some(mins), group: INT4_GROUP }
            }
        };
    }
}

impl MarianModel {
    fn part_mut(&mut self, part: MarianPart) -> Vec<&mut Linear> {
        match part {
            MarianPart::Embedding => vec![&mut self.embedding],
            MarianPart::EncoderAttention => self
                .encoder
                .iter_mut()
                .flat_map(|l| {
                    let a = &mut l.attention;
                    [&mut a.query, &mut a.key, &mut a.value, &mut a.output]
                })
                .collect(),
            MarianPart::EncoderFfn => {
                self.encoder.iter_mut().flat_map(|l| [&mut l.ffn.up, &mut l.ffn.down]).collect()
            }
            MarianPart::DecoderAttention => self
                .decoder
                .iter_mut()
                .flat_map(|l| {
                    let (s, a) = (&mut l.ssru, &mut l.context);
                    [
                        &mut s.input,
                        &mut s.forget,
                        &mut a.query,
                        &mut a.key,
                        &mut a.value,
                        &mut a.output,
                    ]
                })
                .collect(),
            MarianPart::DecoderFfn => {
                self.decoder.iter_mut().flat_map(|l| [&mut l.ffn.up, &mut l.ffn.down]).collect()
            }
        }
    }

    /// Stores the matrices of `part` as int4 groups of 32.
    pub fn quantize_part(&mut self, part: MarianPart, storage: MatrixStorage) {
        for linear in self.part_mut(part) {
            linear.store_int4(storage);
        }
    }

    /// Stores the matrices of `part` as symmetric int4 groups of 32 with error feedback from
    /// the input statistics in `calibration` (GPTQ). Matrices without statistics are rounded.
    pub fn quantize_part_gptq(&mut self, part: MarianPart, calibration: &MarianCalibration) {
        for (linear, gram) in self.part_mut(part).into_iter().zip(calibration.grams(part)) {
            match gram {
                Some(gram) => linear.store_int4_gptq(gram),
                None => linear.store_int4(MatrixStorage::Int4),
            }
        }
    }

    /// Translates with `run` while recording the inputs of every matrix, and returns their
    /// Gram matrices. The embedding's statistics are those of its use as the output layer.
    pub fn calibrate(
        &self,
        run: impl FnOnce(&MarianModel) -> Result<(), MarianError>,
    ) -> Result<MarianCalibration, MarianError> {
        let mut recording = self.clone();
        for part in MarianPart::ALL {
            for linear in recording.part_mut(part) {
                linear.gram = Some(std::sync::Arc::new(GramRecorder::new(linear.inputs)));
            }
        }
        run(&recording)?;
        let mut grams = HashMap::new();
        for part in MarianPart::ALL {
            let values = recording
                .part_mut(part)
                .into_iter()
                .map(|l| l.gram.take().map(|g| g.values()))
                .collect();
            grams.insert(part, values);
        }
        Ok(MarianCalibration { grams })
    }

    /// Removes the encoder layers at the given indices (0-based); the others keep their order.
    ///
    /// # Errors
    /// [`MarianError::Input`] when an index is out of range or every layer would go.
    pub fn remove_encoder_layers(&mut self, layers: &[usize]) -> Result<(), MarianError> {
        let count = self.encoder.len();
        if let Some(&bad) = layers.iter().find(|&&l| l >= count) {
            return Err(MarianError::Input(format!(
                "encoder layer {bad} does not exist; the model has {count} encoder layers, \
                 numbered from 0"
            )));
        }
        if (0..count).all(|i| layers.contains(&i)) {
            return Err(MarianError::Input(
                "removing every encoder layer leaves no encoder".into(),
            ));
        }
        let mut index = 0;
        self.encoder.retain(|_| {
            index += 1;
            !layers.contains(&(index - 1))
        });
        self.config.encoder_layers = self.encoder.len();
        Ok(())
    }

    /// Returns the bytes the model's tensors take in a packed file, without alignment padding.
    pub fn weight_bytes(&self) -> usize {
        let linear = |l: &Linear| l.weight.byte_len() + l.bias.as_ref().map_or(0, |b| b.len() * 4);
        let norm = |n: &LayerNorm| (n.scale.len() + n.bias.len()) * 4;
        let attention = |a: &Attention| {
            linear(&a.query) + linear(&a.key) + linear(&a.value) + linear(&a.output) + norm(&a.norm)
        };
        let ffn = |f: &FeedForward| linear(&f.up) + linear(&f.down) + norm(&f.norm);
        let encoder: usize =
            self.encoder.iter().map(|l| attention(&l.attention) + ffn(&l.ffn)).sum();
        let decoder: usize = self
            .decoder
            .iter()
            .map(|l| {
                let s = &l.ssru;
                linear(&s.input)
                    + linear(&s.forget)
                    + norm(&s.norm)
                    + attention(&l.context)
                    + ffn(&l.ffn)
            })
            .sum();
        linear(&self.embedding) + encoder + decoder
    }
}

/// Input statistics of a model's matrices, from [`MarianModel::calibrate`].
#[derive(Debug, Clone)]
pub struct MarianCalibration {
    /// Per part, the Gram matrix of each matrix's inputs in the order of the part's matrices.
    grams: HashMap<MarianPart, Vec<Option<Vec<f64>>>>,
}

impl MarianCalibration {
    fn grams(&self, part: MarianPart) -> impl Iterator<Item = Option<&[f64]>> + '_ {
        let list = self.grams.get(&part).map_or(&[][..], Vec::as_slice);
        list.iter().map(Option::as_deref).chain(std::iter::repeat(None))
    }
}

fn storage(weight: &LinearWeight) -> Storage {
    match weight {
        LinearWeight::F32(w) => Storage::F32(w.clone()),
        LinearWeight::I8 { q, scales } => {
            Storage::I8PerRow { q: q.clone(), scales: scales.clone() }
        }
        LinearWeight::I4 { packed, scales, mins: None, group } => {
            Storage::I4Grouped { packed: packed.clone(), scales: scales.clone(), group: *group }
        }
        LinearWeight::I4 { packed, scales, mins: Some(mins), group } => Storage::I4GroupedMin {
            packed: packed.clone(),
            scales: scales.clone(),
            mins: mins.clone(),
            group: *group,
        },
    }
}

/// Adds tensors to a graph under Marian's names: a matrix `NAME` `[outputs, inputs]` with its
/// bias `NAME_b`, and a layer normalization `PREFIX_ln_scale` and `PREFIX_ln_bias`.
struct Tensors {
    graph: Graph,
}

impl Tensors {
    fn linear(&mut self, name: &str, l: &Linear) {
        self.graph.add_const(name.to_owned(), vec![l.outputs, l.inputs], storage(&l.weight));
        if let Some(b) = &l.bias {
            self.graph.add_const(format!("{name}_b"), vec![b.len()], Storage::F32(b.clone()));
        }
    }

    fn norm(&mut self, prefix: &str, n: &LayerNorm) {
        for (suffix, v) in [("ln_scale", &n.scale), ("ln_bias", &n.bias)] {
            self.graph.add_const(
                format!("{prefix}_{suffix}"),
                vec![v.len()],
                Storage::F32(v.clone()),
            );
        }
    }

    fn attention(&mut self, prefix: &str, a: &Attention) {
        self.linear(&format!("{prefix}_Wq"), &a.query);
        self.linear(&format!("{prefix}_Wk"), &a.key);
        self.linear(&format!("{prefix}_Wv"), &a.value);
        self.linear(&format!("{prefix}_Wo"), &a.output);
        self.norm(&format!("{prefix}_Wo"), &a.norm);
    }

    fn ffn(&mut self, prefix: &str, f: &FeedForward) {
        self.linear(&format!("{prefix}_W1"), &f.up);
        self.linear(&format!("{prefix}_W2"), &f.down);
        self.norm(&format!("{prefix}_ffn"), &f.norm);
    }
}

/// Returns the hyperparameters record of a packed model as JSON.
fn config_json(model: &MarianModel) -> String {
    let c = model.config();
    serde_json::json!({
        "encoder_layers": c.encoder_layers,
        "decoder_layers": c.decoder_layers,
        "dim": c.dim,
        "heads": c.heads,
        "ffn_dim": c.ffn_dim,
        "vocab": c.vocab,
        "eos": model.eos(),
    })
    .to_string()
}

/// Returns the runtime translator's configuration of a packed model, or `None` when a size does
/// not fit the record.
pub fn translator_config(model: &MarianModel) -> Option<TranslatorConfig> {
    let c = model.config();
    let word = |v: usize| u32::try_from(v).ok();
    Some(TranslatorConfig {
        encoder_layers: word(c.encoder_layers)?,
        decoder_layers: word(c.decoder_layers)?,
        dim: word(c.dim)?,
        heads: word(c.heads)?,
        ffn_dim: word(c.ffn_dim)?,
        vocab: word(c.vocab)?,
        eos: model.eos(),
        max_source: MAX_SOURCE,
        norm_eps: LAYER_NORM_EPS,
    })
}

/// Serializes `model` and `metadata` into the bytes of a packed file, with the arena size that
/// the runtime's translator needs for sources of up to [`MAX_SOURCE`] tokens.
///
/// # Errors
/// [`WriteError::Unrepresentable`] when a size exceeds the format's or the translator record's
/// limits.
pub fn pack(model: &MarianModel, metadata: &[(String, Vec<u8>)]) -> Result<Vec<u8>, WriteError> {
    let mut t = Tensors { graph: Graph::default() };
    t.linear("Wemb", &model.embedding);
    for (i, l) in model.encoder.iter().enumerate() {
        t.attention(&format!("encoder_l{}_self", i + 1), &l.attention);
        t.ffn(&format!("encoder_l{}_ffn", i + 1), &l.ffn);
    }
    for (i, l) in model.decoder.iter().enumerate() {
        let rnn = format!("decoder_l{}_rnn", i + 1);
        t.linear(&format!("{rnn}_W"), &l.ssru.input);
        t.linear(&format!("{rnn}_Wf"), &l.ssru.forget);
        t.norm(&format!("{rnn}_ffn"), &l.ssru.norm);
        t.attention(&format!("decoder_l{}_context", i + 1), &l.context);
        t.ffn(&format!("decoder_l{}_ffn", i + 1), &l.ffn);
    }
    let translator = translator_config(model)
        .filter(|c| TranslatorConfig::parse(&c.to_bytes()).is_ok())
        .ok_or_else(|| {
            WriteError::Unrepresentable(format!(
                "the model's sizes {:?} do not fit the translator record",
                model.config()
            ))
        })?;
    let arena_bytes = translator.arena_bytes().ok_or_else(|| {
        WriteError::Unrepresentable("the translator's arena size overflows".into())
    })?;
    let count = t.graph.values.len();
    let plan = ArenaPlan {
        offsets: vec![None; count],
        sizes: vec![0; count],
        in_place: Vec::new(),
        scratch: Vec::new(),
        arena_bytes,
    };
    let mut entries = vec![
        (CONFIG_KEY.to_owned(), config_json(model).into_bytes()),
        (TRANSLATOR_KEY.to_owned(), translator.to_bytes().to_vec()),
    ];
    entries.extend(metadata.iter().cloned());
    pack_graph(&t.graph, &plan, &entries)
}

/// Reads the tensors of a packed model by name, checking each one's shape and storage.
struct Reader<'m, 'a> {
    model: &'m Model<'a>,
    path: &'m std::path::Path,
    index: HashMap<&'a str, u32>,
}

impl<'a> Reader<'_, 'a> {
    fn error(&self, name: &str, reason: impl Into<String>) -> MarianError {
        MarianError::Tensor {
            path: self.path.to_path_buf(),
            name: name.to_owned(),
            reason: reason.into(),
        }
    }

    fn entry(&self, name: &str) -> Result<edgefold_runtime::format::TensorEntry, MarianError> {
        let &i = self.index.get(name).ok_or_else(|| self.error(name, "missing"))?;
        let t = self.model.tensor(i).map_err(|e| self.error(name, e.to_string()))?;
        if t.kind != TensorKind::Const {
            return Err(self.error(name, "is not a constant"));
        }
        Ok(t)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, MarianError> {
        let t = self.entry(name)?;
        let shape_ok = t.rank == 1 && t.dims[0].as_constant() == u32::try_from(len).ok();
        if t.dtype != DType::F32 || t.quant != Quant::None || !shape_ok {
            return Err(self.error(name, format!("must be an f32 vector of {len} values")));
        }
        let bytes = self.model.const_bytes(&t);
        if bytes.len() != len * 4 {
            return Err(self.error(name, format!("has {} bytes for {len} values", bytes.len())));
        }
        let values: Vec<f32> =
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.error(name, format!("value {at} is {}", values[at])));
        }
        Ok(values)
    }

    fn matrix(
        &self,
        name: &str,
        outputs: usize,
        inputs: usize,
    ) -> Result<LinearWeight, MarianError> {
        let t = self.entry(name)?;
        let dims = (t.dims[0].as_constant(), t.dims[1].as_constant());
        if t.rank != 2 || dims != (u32::try_from(outputs).ok(), u32::try_from(inputs).ok()) {
            return Err(self.error(name, format!("must be a [{outputs}, {inputs}] matrix")));
        }
        let bad = || self.error(name, "its data does not match its shape and storage");
        let weights = self.model.linear_weights(&t).ok_or_else(bad)?;
        let (n, k) = (outputs, inputs);
        let weight = match weights {
            Weights::F32(w) if w.w.len() == n * k => LinearWeight::F32(w.w.to_vec()),
            Weights::F16(w) if w.w.len() == n * k => {
                LinearWeight::F32(w.w.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect())
            }
            Weights::I8(w) if w.q.len() == n * k && w.scales.len() == n => {
                LinearWeight::I8 { q: w.q.to_vec(), scales: w.scales.to_vec() }
            }
            Weights::I4(w)
                if w.group > 0
                    && w.group.is_multiple_of(2)
                    && k.is_multiple_of(w.group)
                    && w.packed.len() == n * k.div_ceil(2)
                    && w.scales.len() == n * (k / w.group) =>
            {
                LinearWeight::I4 {
                    packed: w.packed.to_vec(),
                    scales: w.scales.to_vec(),
                    mins: w.mins.map(<[u16]>::to_vec),
                    group: w.group,
                }
            }
            _ => return Err(bad()),
        };
        Ok(weight)
    }

    fn linear(
        &self,
        name: &str,
        bias: bool,
        inputs: usize,
        outputs: usize,
    ) -> Result<Linear, MarianError> {
        let weight = self.matrix(name, outputs, inputs)?;
        let bias = match bias {
            true => Some(self.vector(&format!("{name}_b"), outputs)?),
            false => None,
        };
        Ok(Linear::new(weight, bias, inputs, outputs))
    }

    fn norm(&self, prefix: &str, dim: usize) -> Result<LayerNorm, MarianError> {
        Ok(LayerNorm {
            scale: self.vector(&format!("{prefix}_ln_scale"), dim)?,
            bias: self.vector(&format!("{prefix}_ln_bias"), dim)?,
        })
    }

    fn attention(&self, prefix: &str, dim: usize) -> Result<Attention, MarianError> {
        let linear = |w: &str| self.linear(&format!("{prefix}_{w}"), true, dim, dim);
        Ok(Attention {
            query: linear("Wq")?,
            key: linear("Wk")?,
            value: linear("Wv")?,
            output: linear("Wo")?,
            norm: self.norm(&format!("{prefix}_Wo"), dim)?,
        })
    }

    fn ffn(&self, prefix: &str, dim: usize, ffn_dim: usize) -> Result<FeedForward, MarianError> {
        Ok(FeedForward {
            up: self.linear(&format!("{prefix}_W1"), true, dim, ffn_dim)?,
            down: self.linear(&format!("{prefix}_W2"), true, ffn_dim, dim)?,
            norm: self.norm(&format!("{prefix}_ffn"), dim)?,
        })
    }
}

/// Returns whether a packed file contains a Marian model.
pub fn is_packed_marian(model: &Model<'_>) -> bool {
    model.metadata(CONFIG_KEY).is_some()
}

impl MarianModel {
    /// Builds the model from a file written by [`pack`]. `path` names the file in errors, and
    /// `eos` is the tokenizer's end-of-sentence id, which must match the file's.
    ///
    /// # Errors
    /// [`MarianError::Config`] when the configuration record is missing or invalid or its
    /// end-of-sentence id differs from `eos`, and [`MarianError::Tensor`] when a tensor is
    /// missing or has another shape or storage.
    pub fn from_packed(
        model: &Model<'_>,
        path: &std::path::Path,
        eos: u32,
    ) -> Result<MarianModel, MarianError> {
        let config_error = |reason: String| MarianError::Config {
            path: path.to_path_buf(),
            key: CONFIG_KEY.to_owned(),
            reason,
        };
        let record = model
            .metadata(CONFIG_KEY)
            .ok_or_else(|| config_error("missing: the file contains no Marian model".into()))?;
        let json: serde_json::Value = serde_json::from_slice(record)
            .map_err(|e| config_error(format!("is not valid JSON: {e}")))?;
        let number = |key: &str| {
            json.get(key)
                .and_then(serde_json::Value::as_u64)
                .filter(|&n| n > 0 && n <= 1 << 24)
                .map(|n| n as usize)
                .ok_or_else(|| config_error(format!("`{key}` is missing or out of range")))
        };
        let config = MarianConfig {
            encoder_layers: number("encoder_layers")?,
            decoder_layers: number("decoder_layers")?,
            dim: number("dim")?,
            heads: number("heads")?,
            ffn_dim: number("ffn_dim")?,
            vocab: number("vocab")?,
        };
        let file_eos = json.get("eos").and_then(serde_json::Value::as_u64);
        if file_eos != Some(u64::from(eos)) {
            return Err(config_error(format!(
                "gives end-of-sentence id {file_eos:?}, but the tokenizer's is {eos}; use the \
                 tokenizer.json of this model"
            )));
        }
        if !config.dim.is_multiple_of(config.heads) || !config.dim.is_multiple_of(2) {
            return Err(config_error(format!(
                "{} heads do not divide the even width {}",
                config.heads, config.dim
            )));
        }
        if eos as usize >= config.vocab {
            return Err(config_error(format!(
                "end-of-sentence id {eos} is outside the vocabulary of {}",
                config.vocab
            )));
        }

        let tensors = model.tensor_count();
        let mut index = HashMap::with_capacity(tensors as usize);
        for i in 0..tensors {
            index.insert(model.tensor_name(i), i);
        }
        // Every layer needs its tensors, so a count beyond the table is rejected before any
        // allocation it would size.
        let layers = config.encoder_layers + config.decoder_layers;
        if layers > index.len() {
            return Err(config_error(format!(
                "names {layers} layers, more than the file's {} tensors",
                index.len()
            )));
        }

        let r = Reader { model, path, index };
        let (dim, ffn_dim) = (config.dim, config.ffn_dim);
        let embedding = r.linear("Wemb", true, dim, config.vocab)?;
        let mut encoder = Vec::with_capacity(config.encoder_layers);
        for l in 1..=config.encoder_layers {
            encoder.push(EncoderLayer {
                attention: r.attention(&format!("encoder_l{l}_self"), dim)?,
                ffn: r.ffn(&format!("encoder_l{l}_ffn"), dim, ffn_dim)?,
            });
        }
        let mut decoder = Vec::with_capacity(config.decoder_layers);
        for l in 1..=config.decoder_layers {
            let rnn = format!("decoder_l{l}_rnn");
            decoder.push(DecoderLayer {
                ssru: Ssru {
                    input: r.linear(&format!("{rnn}_W"), false, dim, dim)?,
                    forget: r.linear(&format!("{rnn}_Wf"), true, dim, dim)?,
                    norm: r.norm(&format!("{rnn}_ffn"), dim)?,
                },
                context: r.attention(&format!("decoder_l{l}_context"), dim)?,
                ffn: r.ffn(&format!("decoder_l{l}_ffn"), dim, ffn_dim)?,
            });
        }
        Ok(MarianModel::from_parts(config, embedding, encoder, decoder, eos))
    }
}
