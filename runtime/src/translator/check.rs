//! Checks that a file's tensor table contains the model that its configuration record describes.

use super::config::{decoder_base, encoder_base, PartShape, TranslatorConfig};
use super::config::{DECODER_PARTS, ENCODER_PARTS};
use crate::cast::cast;
use crate::error::{Error, Result};
use crate::format::{DType, TensorEntry, TensorKind};
use crate::kernels::Weights;
use crate::model::Model;

/// Returns whether `name` is `{stack}_l{layer}_{suffix}`, with `layer` written without leading
/// zeros.
fn is_layer_name(name: &str, stack: &str, layer: u32, suffix: &str) -> bool {
    let Some(rest) = name.strip_prefix(stack) else { return false };
    let Some(rest) = rest.strip_prefix("_l") else { return false };
    let Some((number, tail)) = rest.split_once('_') else { return false };
    let digits_ok = !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && !number.starts_with('0');
    digits_ok && number.parse::<u32>() == Ok(layer) && tail == suffix
}

/// Checks that the tensor table starts with the model that `config` describes, in order.
pub(super) fn check_tensors(model: &Model<'_>, config: &TranslatorConfig) -> Result<()> {
    if (model.tensor_count() as u64) < config.tensor_count() {
        return Err(Error::InvalidTranslator {
            tensor: model.tensor_count(),
            reason: "the file has fewer tensors than the configuration names",
        });
    }
    check_part(model, 0, model.tensor_name(0) == "Wemb", Shape::Matrix(config.vocab, config.dim))?;
    check_part(model, 1, model.tensor_name(1) == "Wemb_b", Shape::Vector(config.vocab))?;
    for layer in 0..config.encoder_layers {
        let base = encoder_base(config, layer);
        for (part, &(suffix, shape)) in ENCODER_PARTS.iter().enumerate() {
            let index = base + part as u32;
            let name_ok = is_layer_name(model.tensor_name(index), "encoder", layer + 1, suffix);
            check_part(model, index, name_ok, config.shape(shape))?;
        }
    }
    for layer in 0..config.decoder_layers {
        let base = decoder_base(config, layer);
        for (part, &(suffix, shape)) in DECODER_PARTS.iter().enumerate() {
            let index = base + part as u32;
            let name_ok = is_layer_name(model.tensor_name(index), "decoder", layer + 1, suffix);
            check_part(model, index, name_ok, config.shape(shape))?;
        }
    }
    Ok(())
}

/// A tensor shape that [`check_tensors`] expects.
#[derive(Clone, Copy)]
enum Shape {
    /// `[n, k]`.
    Matrix(u32, u32),
    /// `[len]`.
    Vector(u32),
}

impl TranslatorConfig {
    fn shape(&self, part: PartShape) -> Shape {
        match part {
            PartShape::Square => Shape::Matrix(self.dim, self.dim),
            PartShape::Up => Shape::Matrix(self.ffn_dim, self.dim),
            PartShape::Down => Shape::Matrix(self.dim, self.ffn_dim),
            PartShape::Width => Shape::Vector(self.dim),
            PartShape::FfnWidth => Shape::Vector(self.ffn_dim),
        }
    }
}

fn check_part(model: &Model<'_>, index: u32, name_ok: bool, shape: Shape) -> Result<()> {
    let invalid = |reason| Error::InvalidTranslator { tensor: index, reason };
    let t = model.tensor(index)?;
    if !name_ok {
        return Err(invalid("the tensor's name is not the one its position calls for"));
    }
    match shape {
        Shape::Matrix(n, k) => {
            let fits = is_matrix(&t, n, k)
                && model
                    .linear_weights(&t)
                    .is_some_and(|w| weights_fit(&w, n as usize, k as usize));
            if !fits {
                return Err(invalid("the matrix has another shape or storage than expected"));
            }
        }
        Shape::Vector(len) => {
            let shape_ok = t.rank == 1 && t.dims[0].as_constant() == Some(len);
            let values = cast::<f32>(model.const_bytes(&t));
            let data_ok = values.is_some_and(|v| v.len() == len as usize);
            if t.kind != TensorKind::Const || t.dtype != DType::F32 || !shape_ok || !data_ok {
                return Err(invalid("a bias or layer normalization weight is not f32 [len]"));
            }
        }
    }
    Ok(())
}

fn is_matrix(t: &TensorEntry, n: u32, k: u32) -> bool {
    t.rank == 2 && t.dims[0].as_constant() == Some(n) && t.dims[1].as_constant() == Some(k)
}

/// Returns whether `w` contains `n` rows of `k` values, so that the kernels and
/// [`WeightRows::fill`] read only within its slices.
fn weights_fit(w: &Weights<'_>, n: usize, k: usize) -> bool {
    let Some(len) = n.checked_mul(k) else { return false };
    match w {
        Weights::F32(w) => w.k == k && w.w.len() >= len,
        Weights::F16(w) => w.k == k && w.w.len() >= len,
        Weights::I8(w) => w.k == k && w.q.len() >= len && w.scales.len() >= n,
        Weights::I4(w) => {
            let group_ok = w.group > 0 && w.group.is_multiple_of(2) && k.is_multiple_of(w.group);
            if !group_ok || w.k != k {
                return false;
            }
            let groups = n * (k / w.group);
            let mins_ok = w.mins.is_none_or(|m| m.len() >= groups);
            w.packed.len() >= n * k.div_ceil(2) && w.scales.len() >= groups && mins_ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_match_exactly() {
        assert!(is_layer_name("encoder_l1_self_Wq", "encoder", 1, "self_Wq"));
        assert!(is_layer_name("decoder_l12_rnn_Wf_b", "decoder", 12, "rnn_Wf_b"));
        assert!(!is_layer_name("encoder_l01_self_Wq", "encoder", 1, "self_Wq"));
        assert!(!is_layer_name("encoder_l2_self_Wq", "encoder", 1, "self_Wq"));
        assert!(!is_layer_name("decoder_l1_self_Wq", "encoder", 1, "self_Wq"));
        assert!(!is_layer_name("encoder_l1_self_Wq_b", "encoder", 1, "self_Wq"));
        assert!(!is_layer_name("encoder_l_self_Wq", "encoder", 0, "self_Wq"));
    }
}
