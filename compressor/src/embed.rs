//! Sentence embeddings from a packed file (through the runtime) or from the original ONNX model
//! (through tract), chosen and pooled by the same rule so the two can be compared.
//!
//! The embedding is the model's first floating-point `[batch, dim]` output when it has one,
//! otherwise the mean of its first `[batch, seq, dim]` output over the attention mask; then it is
//! L2-normalized. Pass-through integer outputs and other extras do not take part in the choice.

use std::path::Path;

use edgefold_runtime::{DType, MappedFile, Model, Session};

use crate::reference::ReferenceModel;
use crate::tensor::HostTensor;
use crate::text::{l2_normalize, mean_pool, Encoded, TextEncoder};

/// Error from computing an embedding.
#[derive(Debug)]
#[non_exhaustive]
pub enum EmbedError {
    /// The packed file could not be read or opened.
    Open(String),
    /// The model has no output usable as an embedding, or `--output` names none.
    NoEmbeddingOutput(String),
    /// The model has an input that is not a token id, mask or type id.
    UnknownInput(String),
    /// No tokenizer was embedded in the file or given.
    NoTokenizer(String),
    /// Tokenizing failed.
    Text(crate::text::TextError),
    /// The runtime failed.
    Runtime(edgefold_runtime::Error),
    /// The reference run failed.
    Reference(crate::reference::ReferenceError),
    /// The packed file's arena does not fit in memory.
    Arena(crate::exec::ArenaError),
}

impl std::fmt::Display for EmbedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmbedError::Open(m) | EmbedError::NoEmbeddingOutput(m) | EmbedError::NoTokenizer(m) => {
                f.write_str(m)
            }
            EmbedError::UnknownInput(name) => write!(
                f,
                "model input {name:?} is not input_ids, attention_mask or token_type_ids; \
                 sentence embedding needs a text encoder"
            ),
            EmbedError::Text(e) => write!(f, "{e}"),
            EmbedError::Runtime(e) => write!(f, "runtime error: {e}"),
            EmbedError::Reference(e) => write!(f, "{e}"),
            EmbedError::Arena(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for EmbedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Display prints the reference error itself, so its cause is the next in the chain.
            EmbedError::Reference(e) => e.source(),
            _ => None,
        }
    }
}

/// Embedding output index and whether it needs pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputChoice {
    /// Output index.
    pub index: usize,
    /// Whether the output is `[batch, seq, dim]` and is mean-pooled over the mask.
    pub pooled: bool,
}

/// Picks the embedding output from (name, is_f32, rank) descriptions.
pub fn choose_output(
    outputs: &[(String, bool, usize)],
    wanted: Option<&str>,
) -> Result<OutputChoice, EmbedError> {
    if let Some(name) = wanted {
        let (index, (_, f32, rank)) =
            outputs.iter().enumerate().find(|(_, (n, _, _))| n == name).ok_or_else(|| {
                let names: Vec<&str> = outputs.iter().map(|o| o.0.as_str()).collect();
                EmbedError::NoEmbeddingOutput(format!(
                    "no output named {name:?}; outputs: {}",
                    names.join(", ")
                ))
            })?;
        return match (f32, rank) {
            (true, 2) => Ok(OutputChoice { index, pooled: false }),
            (true, 3) => Ok(OutputChoice { index, pooled: true }),
            _ => Err(EmbedError::NoEmbeddingOutput(format!(
                "output {name:?} is not a floating-point [batch, dim] or [batch, seq, dim] tensor"
            ))),
        };
    }
    let find = |r: usize| outputs.iter().position(|(_, f, rank)| *f && *rank == r);
    if let Some(index) = find(2) {
        return Ok(OutputChoice { index, pooled: false });
    }
    if let Some(index) = find(3) {
        return Ok(OutputChoice { index, pooled: true });
    }
    Err(EmbedError::NoEmbeddingOutput(
        "the model has no floating-point [batch, dim] or [batch, seq, dim] output".into(),
    ))
}

/// The token arrays matching each model input name.
pub(crate) fn input_for<'e>(name: &str, e: &'e Encoded) -> Result<&'e [i64], EmbedError> {
    match name {
        "input_ids" => Ok(&e.ids),
        "attention_mask" => Ok(&e.attention_mask),
        "token_type_ids" => Ok(&e.type_ids),
        other => Err(EmbedError::UnknownInput(other.to_owned())),
    }
}

pub(crate) fn finish(values: &[f32], dim: usize, pooled: bool, mask: &[i64]) -> Vec<f32> {
    let mut v = if pooled { mean_pool(values, dim, mask) } else { values[..dim].to_vec() };
    l2_normalize(&mut v);
    v
}

/// Embeds sentences with a packed file.
pub struct PackedEmbedder {
    map: MappedFile,
    arena: Vec<u8>,
    encoder: TextEncoder,
    choice: OutputChoice,
    inputs: Vec<String>,
    int8_activations: bool,
}

impl PackedEmbedder {
    /// Maps `path`, checks it, and prepares the tokenizer (embedded in the file unless `tokenizer`
    /// is given).
    ///
    /// # Errors
    /// When the file is invalid, has no tokenizer, or no embedding output.
    pub fn open(
        path: &Path,
        tokenizer: Option<&Path>,
        output: Option<&str>,
    ) -> Result<Self, EmbedError> {
        let map = MappedFile::open(path)
            .map_err(|e| EmbedError::Open(format!("cannot read {}: {e}", path.display())))?;
        let model = Model::open(map.bytes())
            .map_err(|e| EmbedError::Open(format!("{}: {e}", path.display())))?;
        let max_len = (0..model.symbol_count())
            .filter_map(|i| model.symbol(i))
            .filter(|(name, _)| !name.contains("batch"))
            .map(|(_, max)| max as usize)
            .max()
            .unwrap_or(128);
        let encoder = match tokenizer {
            Some(p) => TextEncoder::from_file(p, max_len).map_err(EmbedError::Text)?,
            None => {
                let json = model.metadata("tokenizer.json").ok_or_else(|| {
                    EmbedError::NoTokenizer(format!(
                        "{} has no tokenizer; pass --tokenizer tokenizer.json or compress with --tokenizer",
                        path.display()
                    ))
                })?;
                TextEncoder::from_bytes(json, max_len).map_err(EmbedError::Text)?
            }
        };
        let mut outputs = Vec::new();
        for i in 0..model.output_count() {
            let t = model
                .tensor(model.output_tensor(i).map_err(EmbedError::Runtime)?)
                .map_err(EmbedError::Runtime)?;
            outputs.push((
                model.string(t.name).unwrap_or("").to_owned(),
                t.dtype == DType::F32,
                t.rank as usize,
            ));
        }
        let choice = choose_output(&outputs, output)?;
        let inputs: Vec<String> = (0..model.input_count())
            .map(|i| model.input_tensor(i).map(|t| model.tensor_name(t).to_owned()))
            .collect::<Result<_, _>>()
            .map_err(EmbedError::Runtime)?;
        for name in &inputs {
            input_for(name, &Encoded { ids: vec![], attention_mask: vec![], type_ids: vec![] })?;
        }
        let arena = crate::exec::alloc_arena(path, model.arena_bytes_unaligned())
            .map_err(EmbedError::Arena)?;
        Ok(PackedEmbedder { map, arena, encoder, choice, inputs, int8_activations: false })
    }

    /// Quantizes the inputs of the matrix products to int8 where the runtime has an integer
    /// kernel; see [`Session::set_int8_activations`].
    pub fn set_int8_activations(&mut self, on: bool) {
        self.int8_activations = on;
    }

    /// Returns the tokenizer in use.
    pub fn encoder(&self) -> &TextEncoder {
        &self.encoder
    }

    /// Embeds one sentence.
    ///
    /// # Errors
    /// On tokenizer or runtime failures.
    pub fn embed(&mut self, sentence: &str) -> Result<Vec<f32>, EmbedError> {
        let e = self.encoder.encode(sentence).map_err(EmbedError::Text)?;
        let model = Model::open_with(
            self.map.bytes(),
            edgefold_runtime::OpenOptions { verify_weights: false },
        )
        .map_err(EmbedError::Runtime)?;
        let mut session = Session::new(&model, &mut self.arena).map_err(EmbedError::Runtime)?;
        session.set_int8_activations(self.int8_activations);
        let n = e.ids.len();
        for (i, name) in self.inputs.iter().enumerate() {
            session
                .set_input::<i64>(i, &[1, n], input_for(name, &e)?)
                .map_err(EmbedError::Runtime)?;
        }
        session.run().map_err(EmbedError::Runtime)?;
        let (shape, values) =
            session.output::<f32>(self.choice.index).map_err(EmbedError::Runtime)?;
        let dim = shape.dims[shape.rank - 1];
        Ok(finish(values, dim, self.choice.pooled, &e.attention_mask))
    }
}

/// Embeds sentences with the original ONNX model through tract.
pub struct ReferenceEmbedder {
    model: ReferenceModel,
    choice: OutputChoice,
}

impl ReferenceEmbedder {
    /// Loads the model and picks its embedding output by the same rule as [`PackedEmbedder`].
    ///
    /// # Errors
    /// When the model cannot be loaded or has no embedding output.
    pub fn load(
        path: &Path,
        output: Option<&str>,
        probe: &TextEncoder,
    ) -> Result<Self, EmbedError> {
        let model = ReferenceModel::load(path).map_err(EmbedError::Reference)?;
        let e = probe.encode("probe").map_err(EmbedError::Text)?;
        let outputs = run_reference(&model, &e)?;
        let described: Vec<(String, bool, usize)> = model
            .output_names()
            .iter()
            .zip(&outputs)
            .map(|(n, t)| (n.clone(), t.as_f32().is_some(), t.shape.len()))
            .collect();
        let choice = choose_output(&described, output)?;
        Ok(ReferenceEmbedder { model, choice })
    }

    /// Embeds one pre-tokenized sentence.
    ///
    /// # Errors
    /// On reference run failures.
    pub fn embed(&self, e: &Encoded) -> Result<Vec<f32>, EmbedError> {
        let outputs = run_reference(&self.model, e)?;
        let t = &outputs[self.choice.index];
        let values = t
            .as_f32()
            .ok_or_else(|| EmbedError::NoEmbeddingOutput("embedding output is not f32".into()))?;
        let dim = *t.shape.last().unwrap_or(&0);
        Ok(finish(values, dim, self.choice.pooled, &e.attention_mask))
    }
}

fn run_reference(model: &ReferenceModel, e: &Encoded) -> Result<Vec<HostTensor>, EmbedError> {
    let n = e.ids.len();
    let inputs: Vec<HostTensor> = model
        .input_names()
        .iter()
        .map(|name| input_for(name, e).map(|v| HostTensor::i64(vec![1, n], v.to_vec())))
        .collect::<Result<_, _>>()?;
    model.run(&inputs).map_err(EmbedError::Reference)
}
