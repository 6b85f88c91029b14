//! ONNX conformance: the backend node tests of the `onnx` package, run through the compressor's
//! pipeline and the runtime.
//!
//! `scripts/onnx-node-tests.sh` writes the tests into `target/onnx-node` (one directory per test
//! with `model.onnx` and `test_data_set_0/{input,output}_N.pb`). Every test whose op types are
//! all in the importer's [`SUPPORTED`] list is compressed as `edgefold compress --quantize f32`
//! does, packed, opened with the runtime, run on its inputs and compared with its expected
//! outputs. Floats must be within `|actual - expected| <= 1e-5 + rtol * |expected|`, with rtol
//! 1e-3. Like the ONNX backend runner, bfloat16 outputs get two bfloat16 steps (1/64). Unlike it,
//! float16 outputs get two float16 steps (1/512), because the importer computes them in f32.
//! Integers and booleans must be equal. Each test ends up in one of four classes:
//!
//! - passed;
//! - failed: a wrong shape or value, or an import, packing, open or run error (panics included);
//! - rejected: the importer reports the use of a supported op (or a graph input) as unsupported
//!   and names the reason, such as an element type or attribute it does not handle;
//! - unsupported: the test uses an op type outside [`SUPPORTED`].
//!
//! The test fails when any test is failed. These environment variables change what it does:
//!
//! - `EDGEFOLD_ONNX_NODE_DIR` replaces the directory of the tests;
//! - `EDGEFOLD_ONNX_NODE_FILTER` runs only the tests whose name contains its value;
//! - `EDGEFOLD_ONNX_NODE_REPORT` names a file that receives one tab-separated line per test: name,
//!   class, op types, `retyped` when an input or output type is stored as another, and reason.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use edgefold_compressor::onnx::proto::onnx_type::{BFLOAT16, FLOAT16};
use edgefold_compressor::onnx::proto::{self, value_type};
use edgefold_compressor::onnx::{ConstTensor, ImportError, ImportOptions, SymInt, SUPPORTED};
use edgefold_compressor::pipeline::{compress, CompressError, CompressOptions};
use edgefold_compressor::quantize::{LowRank, Quantize};
use edgefold_compressor::testdata::skip;
use edgefold_runtime::{DType, Model, Session};
use tract_onnx::pb::{ModelProto, TensorProto};
use tract_onnx::prelude::Framework;

const DEFAULT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/onnx-node");

/// Relative tolerance of float outputs (the ONNX backend runner's default).
const RTOL: f64 = 1e-3;
/// Relative tolerance of bfloat16 outputs, two bfloat16 steps (as in the ONNX backend runner).
const BFLOAT16_RTOL: f64 = 1.0 / 64.0;
/// Relative tolerance of float16 outputs, two float16 steps. The ONNX runner keeps 1e-3, but the
/// importer computes float16 models in f32 while the reference rounds every intermediate value to
/// float16, and the two differ by a float16 step or two.
const FLOAT16_RTOL: f64 = 1.0 / 512.0;
/// Absolute tolerance of float outputs.
const ATOL: f64 = 1e-5;

/// Result of one node test.
#[derive(Clone, Debug)]
enum Outcome {
    Passed,
    Failed(String),
    Rejected(String),
    Unsupported(Vec<String>),
}

impl Outcome {
    fn class(&self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed(_) => "failed",
            Outcome::Rejected(_) => "rejected",
            Outcome::Unsupported(_) => "unsupported",
        }
    }

    fn reason(&self) -> String {
        match self {
            Outcome::Passed => String::new(),
            Outcome::Failed(why) | Outcome::Rejected(why) => why.clone(),
            Outcome::Unsupported(ops) => format!("op types {}", ops.join(", ")),
        }
    }
}

/// One node test and its result.
struct Case {
    name: String,
    ops: BTreeSet<String>,
    /// Number of nodes: 1, or more for a test of a function op expanded into its body.
    nodes: usize,
    /// Whether a graph input or output has an element type that the importer stores as another
    /// type (see [`stored_as_other_type`]).
    retyped: bool,
    outcome: Outcome,
}

/// Returns whether the importer stores ONNX element type `code` as a different runtime type:
/// float16, bfloat16 and double as f32, int16 and uint16 as i32, uint32 and uint64 as i64. A test
/// with such inputs or outputs checks the values, not the element type.
fn stored_as_other_type(code: i32) -> bool {
    use proto::onnx_type::*;
    [FLOAT16, BFLOAT16, DOUBLE, INT16, UINT16, UINT32, UINT64].contains(&code)
}

/// Op type of a node as the importer names it: the domain is prefixed unless it is the default.
fn op_key(domain: &str, op_type: &str) -> String {
    if domain.is_empty() || domain == "ai.onnx" {
        op_type.to_owned()
    } else {
        format!("{domain}.{op_type}")
    }
}

fn read_model(path: &Path) -> Result<ModelProto, String> {
    tract_onnx::onnx().proto_model_for_path(path).map_err(|e| format!("cannot parse model: {e:#}"))
}

/// Reads `test_data_set_0/{kind}_{index}.pb` as a TensorProto.
fn read_proto(dir: &Path, kind: &str, index: usize) -> Result<TensorProto, String> {
    let path = dir.join("test_data_set_0").join(format!("{kind}_{index}.pb"));
    let file =
        std::fs::File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    tract_onnx::tensor::proto_from_reader(file)
        .map_err(|e| format!("cannot parse {}: {e:#}", path.display()))
}

/// Reads `test_data_set_0/{kind}_{index}.pb` as a tensor.
fn read_tensor(dir: &Path, kind: &str, index: usize) -> Result<ConstTensor, String> {
    let tensor = read_proto(dir, kind, index)?;
    proto::tensor(&tensor, dir).map_err(|e| format!("{kind} {index}: {e}"))
}

/// Little-endian bytes of `t` stored as `dtype`, the element type of a packed model's input.
fn input_bytes(t: &ConstTensor, dtype: DType) -> Result<Vec<u8>, String> {
    match (t, dtype) {
        (ConstTensor::F32 { data, .. }, DType::F32) => {
            Ok(data.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
        (ConstTensor::Int { data, .. }, _) => {
            let ints: Vec<i64> = data.iter().map(|v| v.as_int().unwrap_or(0)).collect();
            let bytes = match dtype {
                DType::I64 => ints.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::I32 => ints.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect(),
                DType::I8 => ints.iter().map(|&v| v as i8 as u8).collect(),
                DType::U8 => ints.iter().map(|&v| v as u8).collect(),
                DType::Bool => ints.iter().map(|&v| (v != 0) as u8).collect(),
                other => return Err(format!("integer input for a {other:?} model input")),
            };
            Ok(bytes)
        }
        (_, other) => Err(format!("float input for a {other:?} model input")),
    }
}

/// Decodes the runtime's output bytes into integers; `None` for float element types.
fn output_ints(dtype: DType, bytes: &[u8]) -> Option<Vec<i64>> {
    let ints = match dtype {
        DType::I64 => {
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
        }
        DType::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        DType::I8 => bytes.iter().map(|&b| b as i8 as i64).collect(),
        DType::U8 => bytes.iter().map(|&b| b as i64).collect(),
        DType::Bool => bytes.iter().map(|&b| (b != 0) as i64).collect(),
        _ => return None,
    };
    Some(ints)
}

/// Compares one output with its expected value; floats within `ATOL + rtol * |expected|`.
fn compare(
    expected: &ConstTensor,
    rtol: f64,
    shape: &[usize],
    dtype: DType,
    bytes: &[u8],
) -> Result<(), String> {
    if expected.shape() != shape {
        return Err(format!("shape {shape:?}, expected {:?}", expected.shape()));
    }
    match expected {
        ConstTensor::F32 { data, .. } => {
            if dtype != DType::F32 {
                return Err(format!("{dtype:?} elements, expected floats"));
            }
            let actual = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
            for (i, (a, &e)) in actual.zip(data).enumerate() {
                let close = if e.is_nan() || e.is_infinite() {
                    (a.is_nan() && e.is_nan()) || a == e
                } else {
                    ((a as f64) - (e as f64)).abs() <= ATOL + rtol * (e as f64).abs()
                };
                if !close {
                    return Err(format!("element {i} is {a}, expected {e}"));
                }
            }
            Ok(())
        }
        ConstTensor::Int { data, dtype: expected_dtype, .. } => {
            let actual = output_ints(dtype, bytes)
                .ok_or_else(|| format!("{dtype:?} elements, expected {expected_dtype:?}"))?;
            for (i, (&a, e)) in actual.iter().zip(data).enumerate() {
                let e = match e {
                    SymInt::Int(v) if *expected_dtype == DType::Bool => (*v != 0) as i64,
                    SymInt::Int(v) => *v,
                    SymInt::Dim(_) => return Err("symbolic expected value".into()),
                };
                if a != e {
                    return Err(format!("element {i} is {a}, expected {e}"));
                }
            }
            Ok(())
        }
    }
}

/// Copies packed file bytes into a 16-byte aligned buffer, as the runtime requires.
fn aligned(bytes: &[u8]) -> Vec<u128> {
    let mut words = vec![0u128; bytes.len().div_ceil(16)];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks(16)) {
        let mut b = [0u8; 16];
        b[..chunk.len()].copy_from_slice(chunk);
        *word = u128::from_le_bytes(b);
    }
    words
}

/// Opens a packed file, feeds the inputs by name and compares every output in order.
fn run_packed(
    file: &[u8],
    input_names: &[String],
    inputs: &[ConstTensor],
    expected: &[(ConstTensor, f64)],
) -> Result<(), String> {
    let model = Model::open(file).map_err(|e| format!("open: {e}"))?;
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).map_err(|e| format!("session: {e}"))?;
    for (name, t) in input_names.iter().zip(inputs) {
        // The importer drops inputs that no output depends on and makes empty ones constants.
        let Some(index) = model.input_index(name) else { continue };
        let entry = model
            .input_tensor(index)
            .and_then(|t| model.tensor(t))
            .map_err(|e| format!("input {name}: {e}"))?;
        let bytes = input_bytes(t, entry.dtype).map_err(|e| format!("input {name}: {e}"))?;
        session
            .set_input_bytes(index, entry.dtype, t.shape(), &bytes)
            .map_err(|e| format!("input {name}: {e}"))?;
    }
    session.run().map_err(|e| format!("run: {e}"))?;
    if model.output_count() != expected.len() {
        return Err(format!("{} outputs, expected {}", model.output_count(), expected.len()));
    }
    for (i, (e, rtol)) in expected.iter().enumerate() {
        let (shape, dtype, bytes) =
            session.output_bytes(i).map_err(|e| format!("output {i}: {e}"))?;
        compare(e, *rtol, shape.as_slice(), dtype, bytes)
            .map_err(|why| format!("output {i}: {why}"))?;
    }
    Ok(())
}

/// Runs one node test directory.
fn run_case(dir: &Path, proto: &ModelProto) -> Outcome {
    let Some(graph) = proto.graph.as_ref() else {
        return Outcome::Failed("the model has no graph".into());
    };
    // Non-tensor inputs (sequences, optionals) are left to the importer to reject.
    let tensor_inputs: Vec<usize> =
        (0..graph.input.len()).filter(|&i| value_type(&graph.input[i]).is_some()).collect();
    let mut max_extent = 1;
    for &i in &tensor_inputs {
        match read_proto(dir, "input", i) {
            Ok(t) => max_extent = t.dims.iter().copied().fold(max_extent, i64::max),
            Err(why) => return Outcome::Failed(why),
        }
    }
    let max_extent = u32::try_from(max_extent).unwrap_or(u32::MAX);
    let options = CompressOptions {
        quantize: Quantize::F32,
        low_rank: LowRank::Off,
        import: ImportOptions { max_batch: max_extent, max_seq: max_extent },
        tokenizer: None,
    };
    let bytes = match compress(&dir.join("model.onnx"), &options) {
        Ok((bytes, _)) => bytes,
        Err(CompressError::Import(ImportError::Unsupported { ops, .. })) => {
            return Outcome::Rejected(ops.into_keys().collect::<Vec<_>>().join("; "));
        }
        Err(e) => return Outcome::Failed(format!("compress: {e}")),
    };
    let mut inputs = Vec::new();
    let mut input_names = Vec::new();
    for i in tensor_inputs {
        match read_tensor(dir, "input", i) {
            Ok(t) => inputs.push(t),
            Err(why) => return Outcome::Failed(why),
        }
        input_names.push(graph.input[i].name.clone());
    }
    let mut expected = Vec::new();
    for (i, info) in graph.output.iter().enumerate() {
        let rtol = match value_type(info).map(|(code, _)| code) {
            Some(BFLOAT16) => BFLOAT16_RTOL,
            Some(FLOAT16) => FLOAT16_RTOL,
            _ => RTOL,
        };
        match read_tensor(dir, "output", i) {
            Ok(t) => expected.push((t, rtol)),
            Err(why) => return Outcome::Failed(why),
        }
    }
    let words = aligned(&bytes);
    // SAFETY: u128 has no padding, so `words` is `16 * words.len()` initialized bytes, at least
    // `bytes.len()`.
    let file = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, bytes.len()) };
    match run_packed(file, &input_names, &inputs, &expected) {
        Ok(()) => Outcome::Passed,
        Err(why) => Outcome::Failed(why),
    }
}

/// Reads a test's model, classifies its op types and runs it when all are supported.
fn run_test(dir: &Path) -> Case {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut case =
        Case { name, ops: BTreeSet::new(), nodes: 0, retyped: false, outcome: Outcome::Passed };
    let proto = match read_model(&dir.join("model.onnx")) {
        Ok(p) => p,
        Err(why) => {
            case.outcome = Outcome::Failed(why);
            return case;
        }
    };
    let graph = proto.graph.iter();
    case.ops = graph.clone().flat_map(|g| &g.node).map(|n| op_key(&n.domain, &n.op_type)).collect();
    case.nodes = graph.clone().map(|g| g.node.len()).sum();
    case.retyped = graph
        .flat_map(|g| g.input.iter().chain(&g.output))
        .filter_map(value_type)
        .any(|(code, _)| stored_as_other_type(code));
    let unsupported: Vec<String> =
        case.ops.iter().filter(|op| !SUPPORTED.contains(&op.as_str())).cloned().collect();
    if !unsupported.is_empty() {
        case.outcome = Outcome::Unsupported(unsupported);
        return case;
    }
    case.outcome = catch_unwind(AssertUnwindSafe(|| run_case(dir, &proto))).unwrap_or_else(|p| {
        let message = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Outcome::Failed(format!("panic: {message}"))
    });
    case
}

/// Test directories under `root`, sorted by name, keeping names that contain `filter`.
fn test_dirs(root: &Path, filter: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("node test directory is readable")
        .map(|e| e.expect("directory entry is readable").path())
        .filter(|p| p.join("model.onnx").is_file())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(filter)))
        .collect();
    dirs.sort();
    dirs
}

/// Number of tests the generator reports having written (the MANIFEST's `written` line).
fn manifest_count(root: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(root.join("MANIFEST")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("written ")).and_then(|n| n.trim().parse().ok())
}

/// Per-op counts of passed, failed and rejected tests: first among the tests of the op alone
/// (one node), then among the larger graphs that contain it (expanded function bodies).
fn per_op(cases: &[Case]) -> BTreeMap<&str, [[usize; 3]; 2]> {
    let mut table: BTreeMap<&str, [[usize; 3]; 2]> =
        SUPPORTED.iter().map(|&op| (op, [[0usize; 3]; 2])).collect();
    for case in cases {
        let column = match case.outcome {
            Outcome::Passed => 0,
            Outcome::Failed(_) => 1,
            Outcome::Rejected(_) => 2,
            Outcome::Unsupported(_) => continue,
        };
        let group = usize::from(case.nodes > 1);
        for op in &case.ops {
            if let Some(counts) = table.get_mut(op.as_str()) {
                counts[group][column] += 1;
            }
        }
    }
    table
}

fn print_summary(root: &Path, cases: &[Case], seconds: f64) {
    let count = |class: &str| cases.iter().filter(|c| c.outcome.class() == class).count();
    println!("ONNX node tests in {} ({seconds:.1} s)", root.display());
    println!(
        "{} tests: {} passed, {} failed, {} rejected, {} unsupported",
        cases.len(),
        count("passed"),
        count("failed"),
        count("rejected"),
        count("unsupported")
    );
    let retyped = cases.iter().filter(|c| c.retyped && c.outcome.class() == "passed").count();
    println!(
        "{retyped} of the passed tests have float16, bfloat16, double, int16, uint16, uint32 or \
         uint64 inputs or outputs, which the importer stores as f32, i32 or i64"
    );
    let expanded = cases.iter().filter(|c| c.nodes > 1 && c.outcome.class() == "passed").count();
    println!("{expanded} of the passed tests are function ops expanded into several nodes");
    println!(
        "\nPassed / failed / rejected tests of each supported op, alone and in larger graphs:\n"
    );
    println!("| Op | Alone | In larger graphs |");
    println!("|---|---|---|");
    for (op, [alone, larger]) in per_op(cases) {
        let cell = |[p, f, r]: [usize; 3]| format!("{p} / {f} / {r}");
        println!("| {op} | {} | {} |", cell(alone), cell(larger));
    }
    for class in ["rejected", "failed"] {
        let listed: Vec<&Case> = cases.iter().filter(|c| c.outcome.class() == class).collect();
        if !listed.is_empty() {
            println!("\n{class} tests:");
        }
        for case in listed {
            println!("  {}: {}", case.name, case.outcome.reason());
        }
    }
}

fn write_report(path: &Path, cases: &[Case]) {
    let mut text = String::new();
    for case in cases {
        let ops: Vec<&str> = case.ops.iter().map(String::as_str).collect();
        let reason = case.outcome.reason().replace(['\t', '\n'], " ");
        let class = case.outcome.class();
        let retyped = if case.retyped { "retyped" } else { "" };
        text += &format!("{}\t{class}\t{}\t{retyped}\t{reason}\n", case.name, ops.join(","));
    }
    std::fs::write(path, text).expect("report is writable");
}

#[test]
fn onnx_node_conformance() {
    let root = std::env::var_os("EDGEFOLD_ONNX_NODE_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from);
    let Some(written) = manifest_count(&root) else {
        skip(&format!(
            "{} has no MANIFEST; run scripts/onnx-node-tests.sh to write the node tests",
            root.display()
        ));
        return;
    };
    let filter = std::env::var("EDGEFOLD_ONNX_NODE_FILTER").unwrap_or_default();
    let dirs = test_dirs(&root, &filter);
    if filter.is_empty() {
        assert_eq!(dirs.len(), written, "test directories differ from the MANIFEST's count");
    }

    // Panics are caught per test and reported as failures, so the default hook's output would
    // only repeat them.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let start = Instant::now();
    let cases: Vec<Case> = dirs.iter().map(|dir| run_test(dir)).collect();
    std::panic::set_hook(hook);

    print_summary(&root, &cases, start.elapsed().as_secs_f64());
    if let Some(path) = std::env::var_os("EDGEFOLD_ONNX_NODE_REPORT") {
        write_report(Path::new(&path), &cases);
    }
    let failed: Vec<&str> = cases
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
        .map(|c| c.name.as_str())
        .collect();
    assert!(failed.is_empty(), "{} node tests of supported ops failed: {failed:?}", failed.len());
}
