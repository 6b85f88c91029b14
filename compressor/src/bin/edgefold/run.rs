//! `edgefold run` and `edgefold embed`: a packed file run on inputs from .npy files, and a packed
//! sentence encoder run on sentences.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

use edgefold_compressor::embed::PackedEmbedder;
use edgefold_compressor::exec::alloc_arena;
use edgefold_compressor::npy::{read_npy, write_npy};
use edgefold_compressor::tensor::{HostTensor, TensorData};
use edgefold_compressor::text::cosine;
use edgefold_runtime::{DType, Model, Session};

use crate::inspect::open_mapped;
use crate::kind::{check_model_kind, check_packed_kind, PackedKind};
use crate::llm;
use crate::report::{counted, json_float, print_json};

fn to_input<'a>(
    t: &'a HostTensor,
    want: DType,
    name: &str,
) -> Result<std::borrow::Cow<'a, HostTensor>> {
    use std::borrow::Cow;
    Ok(match (&t.data, want) {
        (TensorData::F32(_), DType::F32)
        | (TensorData::I64(_), DType::I64)
        | (TensorData::I32(_), DType::I32) => Cow::Borrowed(t),
        (TensorData::I32(v), DType::I64) => {
            Cow::Owned(HostTensor::i64(t.shape.clone(), v.iter().map(|&x| x as i64).collect()))
        }
        (TensorData::I64(v), DType::I32) => Cow::Owned(HostTensor {
            shape: t.shape.clone(),
            data: TensorData::I32(v.iter().map(|&x| x as i32).collect()),
        }),
        (data, want) => bail!(
            "input {name} expects {want:?} elements, but the .npy file contains {}",
            match data {
                TensorData::F32(_) => "f32",
                TensorData::I64(_) => "i64",
                TensorData::I32(_) => "i32",
                TensorData::Bool(_) => "bool",
            }
        ),
    })
}

pub(crate) fn cmd_run(
    path: &Path,
    inputs: &[String],
    output: Option<&Path>,
    output_index: usize,
    products: llm::Products,
    as_json: bool,
) -> Result<()> {
    let map = open_mapped(path)?;
    let model = Model::open(map.bytes())
        .with_context(|| format!("{} is not a valid packed file", path.display()))?;
    let graphs = [PackedKind::Graph, PackedKind::SentenceEncoder];
    check_model_kind(path, &model, &graphs, "a graph")?;
    if inputs.len() != model.input_count() {
        bail!(
            "{} has {}; pass one --input file per input ({} given)",
            path.display(),
            counted(model.input_count() as u64, "input"),
            inputs.len()
        );
    }
    let mut arena = alloc_arena(path, model.arena_bytes_unaligned())?;
    let mut session = Session::new(&model, &mut arena)?;
    session.set_threads(products.threads);
    session.set_int8_activations(products.int8_activations);
    for (position, spec) in inputs.iter().enumerate() {
        let (index, file) = match spec.split_once('=') {
            Some((name, file)) => (
                model
                    .input_index(name)
                    .with_context(|| format!("the model has no input named {name:?}"))?,
                file,
            ),
            None => (position, spec.as_str()),
        };
        let entry = model.tensor(model.input_tensor(index)?)?;
        let name = model.tensor_name(model.input_tensor(index)?);
        // The .npy error names the file.
        let tensor =
            read_npy(Path::new(file)).with_context(|| format!("cannot read input {name}"))?;
        let t = to_input(&tensor, entry.dtype, name)?;
        let result = match &t.data {
            TensorData::F32(v) => session.set_input::<f32>(index, &t.shape, v),
            TensorData::I64(v) => session.set_input::<i64>(index, &t.shape, v),
            TensorData::I32(v) => session.set_input::<i32>(index, &t.shape, v),
            TensorData::Bool(_) => bail!("boolean inputs are not supported"),
        };
        result.with_context(|| format!("input {name} from {file}"))?;
    }
    let started = Instant::now();
    session.run().map_err(|e| describe_run_error(&model, inputs, e))?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut outs = Vec::new();
    for i in 0..model.output_count() {
        let name = model.tensor_name(model.output_tensor(i)?);
        let (shape, preview, tensor) = match session.output_dtype(i)? {
            DType::F32 => {
                let (s, v) = session.output::<f32>(i)?;
                (
                    s,
                    v.iter().take(8).map(|&x| json_float(x.into())).collect::<Vec<_>>(),
                    HostTensor::f32(s.as_slice().to_vec(), v.to_vec()),
                )
            }
            DType::I64 => {
                let (s, v) = session.output::<i64>(i)?;
                (
                    s,
                    v.iter().take(8).map(|x| json!(x)).collect(),
                    HostTensor::i64(s.as_slice().to_vec(), v.to_vec()),
                )
            }
            other => bail!("output {name} has element type {other:?}, which run cannot print"),
        };
        if let Some(p) = output.filter(|_| i == output_index) {
            // The .npy error names the file.
            write_npy(p, &tensor).context("cannot write --output")?;
        }
        outs.push(json!({"name": name, "shape": shape.as_slice(), "first_values": preview}));
    }
    if output.is_some() && output_index >= model.output_count() {
        bail!(
            "--output-index {output_index} is out of range: the model has {}",
            counted(model.output_count() as u64, "output")
        );
    }
    if as_json {
        print_json(&json!({"file": path, "seconds": elapsed, "outputs": outs}));
    } else {
        for o in &outs {
            let name = o["name"].as_str().unwrap_or("");
            println!("{name} {} {}", o["shape"], plain_values(&o["first_values"]));
        }
        eprintln!("ran in {:.2} ms", elapsed * 1e3);
    }
    Ok(())
}

/// Formats a JSON array of numbers from [`json_float`] as `[1.5,nan,-inf]`, without the quotes
/// that JSON puts around the non-finite values.
fn plain_values(values: &Json) -> String {
    let Some(values) = values.as_array() else { return values.to_string() };
    let texts: Vec<String> = values
        .iter()
        .map(|value| match value.as_str() {
            Some(text) => text.to_owned(),
            None => value.to_string(),
        })
        .collect();
    format!("[{}]", texts.join(","))
}

/// Adds to a runtime error of `run` what the runtime cannot name without allocating: for a
/// symbolic dimension bound to two values, the symbol's name and the input files that bind it.
/// `inputs` are the `--input` arguments, as `cmd_run` matched them to the model's inputs.
fn describe_run_error(
    model: &Model<'_>,
    inputs: &[String],
    error: edgefold_runtime::Error,
) -> anyhow::Error {
    let edgefold_runtime::Error::SymbolConflict { symbol, first, second } = error else {
        return error.into();
    };
    let symbol = symbol as usize;
    let name = model.symbol(symbol).map_or("?", |(name, _)| name);
    let mut binders = Vec::new();
    for (position, spec) in inputs.iter().enumerate() {
        let (index, file) = match spec.split_once('=') {
            Some((input_name, file)) => (model.input_index(input_name), file),
            None => (Some(position), spec.as_str()),
        };
        let Some(tensor_index) = index.and_then(|i| model.input_tensor(i).ok()) else {
            continue;
        };
        let Ok(tensor) = model.tensor(tensor_index) else { continue };
        if tensor.shape().iter().any(|d| d.as_symbol() == Some(symbol)) {
            binders.push(format!("{} from {file}", model.tensor_name(tensor_index)));
        }
    }
    anyhow::anyhow!(
        "symbolic dimension {name:?} (symbol {symbol}) is bound to {first} by one input and \
         {second} by another; the inputs with that dimension are {}. Pass arrays whose extents \
         agree on it",
        binders.join(", ")
    )
}

pub(crate) fn cmd_embed(
    path: &Path,
    sentences: &[String],
    tokenizer: Option<&Path>,
    output: Option<&str>,
    as_json: bool,
) -> Result<()> {
    let graphs = [PackedKind::SentenceEncoder, PackedKind::Graph];
    check_packed_kind(path, &graphs, "a sentence encoder")?;
    let mut embedder = PackedEmbedder::open(path, tokenizer, output)?;
    let mut vectors = Vec::new();
    for s in sentences {
        vectors.push(embedder.embed(s).with_context(|| format!("embedding {s:?}"))?);
    }
    let mut pairs = Vec::new();
    for i in 0..vectors.len() {
        for j in i + 1..vectors.len() {
            pairs.push((i, j, cosine(&vectors[i], &vectors[j])));
        }
    }
    if as_json {
        let embeddings: Vec<_> = sentences
            .iter()
            .zip(&vectors)
            .map(|(s, v)| {
                let vector: Vec<_> = v.iter().map(|&x| json_float(x.into())).collect();
                json!({"sentence": s, "dim": v.len(), "vector": vector})
            })
            .collect();
        let cosines: Vec<_> = pairs
            .iter()
            .map(|&(i, j, c)| json!({"a": i, "b": j, "cosine": json_float(c)}))
            .collect();
        print_json(&json!({ "file": path, "embeddings": embeddings, "cosine": cosines }));
        return Ok(());
    }
    for (s, v) in sentences.iter().zip(&vectors) {
        let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.4}")).collect();
        println!("[{}, ...] ({} dims)  {s}", head.join(", "), v.len());
    }
    for (i, j, c) in pairs {
        println!("cosine({i}, {j}) = {c:.4}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_without_quotes() {
        let values = json!([1.5, json_float(f64::NAN), json_float(f64::NEG_INFINITY), 0]);
        assert_eq!(plain_values(&values), "[1.5,nan,-inf,0]");
        assert_eq!(plain_values(&json!([])), "[]");
    }
}
