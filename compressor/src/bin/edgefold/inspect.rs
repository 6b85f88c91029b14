//! `edgefold inspect` and `edgefold verify`: what a packed file contains, and the result of the
//! self-test that it carries.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

use edgefold_compressor::selftest::{self, VerifyError};
use edgefold_runtime::format::{Quant, SectionKind, TensorKind};
use edgefold_runtime::{DType, MappedFile, Model};

use crate::kind::PackedKind;
use crate::report::{human_bytes, json_float, print_json};
use crate::ReportedInJson;

/// Checks that the packed file at `path` is not a language or translation model, which carry no
/// self-test because `compress --self-test` takes graphs compressed from ONNX only.
fn check_graph_for_self_test(path: &Path) -> Result<()> {
    let (kind, quality_task) = match PackedKind::of_file(path) {
        Some(kind @ PackedKind::LanguageModel) => (kind, "ppl"),
        Some(kind @ PackedKind::Translator) => (kind, "bleu"),
        _ => return Ok(()),
    };
    bail!(
        "{} contains {}, and self-tests exist for graphs compressed from ONNX only; compare \
         it with its original with `edgefold eval --task {quality_task}`",
        path.display(),
        kind.noun()
    )
}

pub(crate) fn cmd_verify(path: &Path, as_json: bool) -> Result<()> {
    // The map gives the same message as the other subcommands when `path` is a directory.
    let map = open_mapped(path)?;
    let bytes = map.bytes();
    check_graph_for_self_test(path)?;

    let outcome = match selftest::verify(bytes, path) {
        Ok(outcome) => outcome,
        // The allocation error names the file already.
        Err(VerifyError::Arena(e)) => return Err(e.into()),
        Err(e) => {
            let context = format!("cannot run the self-test of {}", path.display());
            return Err(anyhow::Error::new(e).context(context));
        }
    };
    let passed = outcome.passed();
    let failure = format!("the self-test of {} failed", path.display());
    if as_json {
        let mut report = json!({
            "file": path,
            "passed": passed,
            "max_abs_error": json_float(outcome.max_abs_error.into()),
            "tolerance": outcome.tolerance,
            "outputs": outcome.outputs,
            "elements": outcome.elements,
        });
        if passed {
            print_json(&report);
            return Ok(());
        }
        report["error"] = json!(failure);
        print_json(&report);
        return Err(ReportedInJson(failure).into());
    } else {
        println!(
            "{}: self-test {}: max abs error {:e} over {} elements of {} output{} (tolerance {:e})",
            path.display(),
            if passed { "passed" } else { "FAILED" },
            outcome.max_abs_error,
            outcome.elements,
            outcome.outputs,
            if outcome.outputs == 1 { "" } else { "s" },
            outcome.tolerance
        );
    }
    if !passed {
        bail!(failure);
    }
    Ok(())
}

pub(crate) fn open_mapped(path: &Path) -> Result<MappedFile> {
    MappedFile::open(path).with_context(|| format!("cannot read {}", path.display()))
}

fn dims_string(model: &Model<'_>, dims: &[edgefold_runtime::format::Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d.as_constant() {
            Some(c) => c.to_string(),
            None => {
                let mut s = if d.factor == 1 { String::new() } else { format!("{}*", d.factor) };
                let names: Vec<String> = d
                    .exponents
                    .iter()
                    .enumerate()
                    .filter(|(_, &e)| e > 0)
                    .map(|(i, &e)| {
                        let name = model.symbol(i).map_or("?", |s| s.0);
                        if e == 1 {
                            name.to_owned()
                        } else {
                            format!("{name}^{e}")
                        }
                    })
                    .collect();
                s.push_str(&names.join("*"));
                s
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn storage_name(dtype: DType, quant: Quant) -> String {
    match quant {
        Quant::None => format!("{dtype:?}").to_lowercase(),
        Quant::PerRow => "int8 per row".into(),
        Quant::Grouped => "int4 groups".into(),
        Quant::GroupedMin => "int4 groups with minimums".into(),
    }
}

pub(crate) fn cmd_inspect(path: &Path, list_tensors: bool, as_json: bool) -> Result<()> {
    let map = open_mapped(path)?;
    let model = Model::open(map.bytes())
        .with_context(|| format!("{} is not a valid packed file", path.display()))?;
    let header = model.header();
    let io =
        |count: usize, get: &dyn Fn(usize) -> edgefold_runtime::Result<u32>| -> Result<Vec<Json>> {
            (0..count)
                .map(|i| {
                    let t = model.tensor(get(i)?)?;
                    Ok(json!({
                        "name": model.string(t.name)?,
                        "dtype": format!("{:?}", t.dtype).to_lowercase(),
                        "shape": dims_string(&model, t.shape()),
                    }))
                })
                .collect()
        };
    let inputs = io(model.input_count(), &|i| model.input_tensor(i))?;
    let outputs = io(model.output_count(), &|i| model.output_tensor(i))?;
    let mut storage: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    let mut tensors = Vec::new();
    for i in 0..model.tensor_count() {
        let t = model.tensor(i)?;
        if t.kind == TensorKind::Const {
            let e = storage.entry(storage_name(t.dtype, t.quant)).or_default();
            e.0 += 1;
            e.1 += t.byte_len;
        }
        if list_tensors {
            tensors.push(json!({
                "index": i,
                "name": model.string(t.name)?,
                "kind": if t.kind == TensorKind::Const { "const" } else { "activation" },
                "storage": storage_name(t.dtype, t.quant),
                "shape": dims_string(&model, t.shape()),
                "offset": t.offset,
                "bytes": t.byte_len,
            }));
        }
    }
    let mut op_counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for item in model.ops() {
        let (record, _) = item?;
        *op_counts.entry(record.op.name()).or_default() += 1;
    }
    let symbols: Vec<Json> = (0..model.symbol_count())
        .filter_map(|i| model.symbol(i))
        .map(|(name, max)| json!({"name": name, "max": max}))
        .collect();
    let metadata: serde_json::Map<String, Json> = model
        .metadata_entries()
        .map(|(k, v)| {
            let value = match std::str::from_utf8(v) {
                Ok(s) if v.len() <= 256 => json!(s),
                _ => json!(format!("<{} bytes>", v.len())),
            };
            (k.to_owned(), value)
        })
        .collect();
    let _ = SectionKind::ALL;
    let kind = PackedKind::of(&model);
    let summary = json!({
        "file": path,
        "kind": kind.id(),
        "version": format!("{}.{}", header.version_major, header.version_minor),
        "file_bytes": header.file_len,
        "weight_bytes": model.weights_len(),
        "arena_bytes": header.arena_bytes,
        "tensors": model.tensor_count(),
        "ops": model.op_count(),
        "symbols": symbols,
        "inputs": inputs,
        "outputs": outputs,
        "storage": storage.iter().map(|(k, (n, b))| json!({"storage": k, "tensors": n, "bytes": b})).collect::<Vec<_>>(),
        "op_counts": op_counts,
        "metadata": metadata,
        "tensor_list": tensors,
    });
    if as_json {
        print_json(&summary);
        return Ok(());
    }
    println!("{} (format {}.{})", path.display(), header.version_major, header.version_minor);
    println!("  kind: {}, run with `{}`", kind.noun(), kind.subcommand());
    println!(
        "  file {}  weights {}  arena {}",
        human_bytes(header.file_len),
        human_bytes(model.weights_len() as u64),
        human_bytes(header.arena_bytes)
    );
    for (name, max) in (0..model.symbol_count()).filter_map(|i| model.symbol(i)) {
        println!("  symbol {name} <= {max}");
    }
    for (label, list) in [("input", &summary["inputs"]), ("output", &summary["outputs"])] {
        for v in list.as_array().into_iter().flatten() {
            println!(
                "  {label} {} {} {}",
                v["name"].as_str().unwrap_or(""),
                v["dtype"].as_str().unwrap_or(""),
                v["shape"].as_str().unwrap_or("")
            );
        }
    }
    println!("  constants:");
    for (k, (n, b)) in &storage {
        let tensors = if *n == 1 { "tensor " } else { "tensors" };
        println!("    {k:<14} {n:>5} {tensors} {:>12}", human_bytes(*b));
    }
    let ops: Vec<String> = op_counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  ops ({}): {}", model.op_count(), ops.join(", "));
    for (k, v) in &metadata {
        println!("  {k}: {}", v.as_str().unwrap_or(""));
    }
    for t in &tensors {
        println!(
            "  #{:<4} {:<10} {:<14} {:<22} {:>10}  {}",
            t["index"],
            t["kind"].as_str().unwrap_or(""),
            t["storage"].as_str().unwrap_or(""),
            t["shape"].as_str().unwrap_or(""),
            t["bytes"],
            t["name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
