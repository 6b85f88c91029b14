//! Runs a packed Edgefold model on raw little-endian input files and prints every output.
//!
//! The binary depends on the runtime only, so it cross-compiles to a small static executable for
//! ARM64 Linux (phones, single-board computers). Each input file contains the elements of one graph
//! input in the model's element type, little-endian, row-major. Its shape is the model's declared
//! shape, with at most one variable axis inferred from the file's length.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use edgefold_runtime::{DType, MappedFile, Model, Session};

const USAGE: &str = "\
usage: edgefold-runner MODEL.fold [INPUT.bin ...] [--save FILE] [--expect FILE]
                       [--tolerance T] [--repeat N] [--int8-activations]

  INPUT.bin        raw little-endian elements of each graph input, in input order
  --save FILE      write every output's elements, concatenated, as raw little-endian bytes
  --expect FILE    compare the f32 outputs, concatenated, with this raw little-endian file and
                   exit with status 1 when an element differs by more than the tolerance
  --tolerance T    largest allowed difference for --expect, absolute for expected values up to
                   1 in magnitude and relative above (default 1e-5)
  --repeat N       run N times and print the mean time per run (default 1)
  --int8-activations
                   quantize the inputs of products with int8 weights to int8 and multiply in
                   integers (Session::set_int8_activations); needs AVX-512 VNNI on x86_64 or
                   the dot-product extension on aarch64";

/// Parsed command line.
struct Args {
    model: PathBuf,
    inputs: Vec<PathBuf>,
    save: Option<PathBuf>,
    expect: Option<PathBuf>,
    tolerance: f32,
    repeat: u32,
    int8_activations: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let (mut save, mut expect, mut tolerance, mut repeat) = (None, None, 1e-5f32, 1u32);
    let mut int8_activations = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--save" => save = Some(PathBuf::from(value("--save")?)),
            "--expect" => expect = Some(PathBuf::from(value("--expect")?)),
            "--tolerance" => {
                let v = value("--tolerance")?;
                tolerance = v.parse().map_err(|_| format!("invalid tolerance {v:?}"))?;
            }
            "--repeat" => {
                let v = value("--repeat")?;
                repeat =
                    v.parse().ok().filter(|&n| n > 0).ok_or(format!("invalid --repeat {v:?}"))?;
            }
            "--int8-activations" => int8_activations = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            flag if flag.starts_with("--") => {
                return Err(format!("unknown option {flag}\n{USAGE}"))
            }
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    if positional.is_empty() {
        return Err(USAGE.to_owned());
    }
    let model = positional.remove(0);
    Ok(Args { model, inputs: positional, save, expect, tolerance, repeat, int8_activations })
}

/// Shape of graph input `index` for a file of `elements` elements: the declared constant axes,
/// and at most one variable axis sized to fit.
fn input_shape(model: &Model<'_>, index: usize, elements: usize) -> Result<Vec<usize>, String> {
    let tensor = model.tensor(model.input_tensor(index).map_err(|e| e.to_string())?);
    let tensor = tensor.map_err(|e| e.to_string())?;
    let mut shape: Vec<usize> = Vec::with_capacity(tensor.rank as usize);
    let mut variable = None;
    for (axis, dim) in tensor.shape().iter().enumerate() {
        match dim.as_constant() {
            Some(extent) => shape.push(extent as usize),
            None if variable.is_none() => {
                variable = Some(axis);
                shape.push(1);
            }
            None => return Err(format!("input {index} has more than one variable axis")),
        }
    }
    let fixed: usize = shape.iter().product();
    if let Some(axis) = variable {
        if fixed == 0 || !elements.is_multiple_of(fixed) {
            return Err(format!("input {index}: {elements} elements do not fill shape {shape:?}"));
        }
        shape[axis] = elements / fixed;
    } else if fixed != elements {
        return Err(format!(
            "input {index} needs {fixed} elements of shape {shape:?}, got {elements}"
        ));
    }
    Ok(shape)
}

/// Decodes little-endian elements of `N` bytes each.
fn decode<const N: usize, T>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| from(c.try_into().expect("chunk of N bytes"))).collect()
}

fn set_input(session: &mut Session<'_, '_>, index: usize, path: &PathBuf) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let model = *session.model();
    let tensor = model.input_tensor(index).and_then(|t| model.tensor(t));
    let dtype = tensor.map_err(|e| e.to_string())?.dtype;
    let size = dtype.size().max(1);
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "{}: {} bytes is not a whole number of {dtype:?}",
            path.display(),
            bytes.len()
        ));
    }
    let shape = input_shape(&model, index, bytes.len() / size)?;
    let result = match dtype {
        DType::F32 => session.set_input(index, &shape, &decode(&bytes, f32::from_le_bytes)),
        DType::I64 => session.set_input(index, &shape, &decode(&bytes, i64::from_le_bytes)),
        DType::I32 => session.set_input(index, &shape, &decode(&bytes, i32::from_le_bytes)),
        DType::U8 => session.set_input(index, &shape, &bytes),
        other => {
            return Err(format!(
                "input {index} has element type {other:?}, which the runner cannot set"
            ))
        }
    };
    result.map_err(|e| format!("input {index} ({}): {e}", path.display()))
}

/// Prints every output and returns the f32 values of all of them, concatenated, and the raw
/// bytes of all outputs.
fn print_outputs(session: &Session<'_, '_>) -> Result<(Vec<f32>, Vec<u8>), String> {
    let model = session.model();
    let (mut values, mut raw) = (Vec::new(), Vec::new());
    for i in 0..model.output_count() {
        let name = model.output_tensor(i).map(|t| model.tensor_name(t)).unwrap_or("");
        let dtype = session.output_dtype(i).map_err(|e| e.to_string())?;
        match dtype {
            DType::F32 => {
                let (shape, v) = session.output::<f32>(i).map_err(|e| e.to_string())?;
                println!("output {i} {name} f32 {:?}", shape.as_slice());
                for (k, x) in v.iter().enumerate() {
                    println!("  [{k}] {x:e}");
                }
                values.extend_from_slice(v);
                raw.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
            DType::I64 => {
                let (shape, v) = session.output::<i64>(i).map_err(|e| e.to_string())?;
                println!("output {i} {name} i64 {:?}: {v:?}", shape.as_slice());
                raw.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
            other => println!("output {i} {name}: element type {other:?} is not printed"),
        }
    }
    Ok((values, raw))
}

/// Differences of `values` from the raw f32 file `path`: the largest absolute difference, and the
/// largest difference divided by `max(1, |expected|)`, which is NaN when only one side is NaN.
fn compare(values: &[f32], path: &PathBuf) -> Result<(f32, f32), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let expected = decode(&bytes, f32::from_le_bytes);
    if expected.len() != values.len() {
        return Err(format!(
            "{} holds {} values but the outputs have {}",
            path.display(),
            expected.len(),
            values.len()
        ));
    }
    let pairs = || values.iter().zip(&expected);
    let absolute = pairs().map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let scaled = pairs().map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max);
    let nan_mismatch = pairs().any(|(a, b)| a.is_nan() != b.is_nan());
    Ok((absolute, if nan_mismatch { f32::NAN } else { scaled }))
}

fn run(args: &Args) -> Result<bool, String> {
    let file = MappedFile::open(&args.model)
        .map_err(|e| format!("cannot map {}: {e}", args.model.display()))?;
    let model = Model::open(file.bytes()).map_err(|e| format!("{}: {e}", args.model.display()))?;
    if args.inputs.len() != model.input_count() {
        return Err(format!(
            "the model has {} inputs but {} input files were given",
            model.input_count(),
            args.inputs.len()
        ));
    }
    let mut arena = vec![0u8; model.arena_bytes_unaligned()];
    let mut session = Session::new(&model, &mut arena).map_err(|e| e.to_string())?;
    if args.int8_activations && !edgefold_runtime::kernels::int8_row_products_supported() {
        // Linear layers would keep f32 inputs here while a board multiplies integers, so the
        // output could not serve as a board's reference.
        return Err("--int8-activations needs a CPU with integer row products (x86_64 with \
                    AVX-512 VNNI, or aarch64 with the dot-product extension); run it on one"
            .to_owned());
    }
    session.set_int8_activations(args.int8_activations);
    for (i, path) in args.inputs.iter().enumerate() {
        set_input(&mut session, i, path)?;
    }

    let start = Instant::now();
    for _ in 0..args.repeat {
        session.run().map_err(|e| format!("run failed: {e}"))?;
    }
    let per_run = start.elapsed() / args.repeat;
    let (values, raw) = print_outputs(&session)?;
    eprintln!(
        "{}: {} ops, {} arena bytes, {} weight bytes, {per_run:?} per run",
        args.model.display(),
        model.op_count(),
        model.arena_bytes(),
        model.weights_len()
    );

    if let Some(path) = &args.save {
        std::fs::write(path, &raw).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let Some(path) = &args.expect else { return Ok(true) };
    let (absolute, scaled) = compare(&values, path)?;
    let ok = scaled <= args.tolerance;
    eprintln!(
        "difference from {}: max abs {absolute:e}, max relative to max(1, |expected|) {scaled:e} \
         ({} {:e})",
        path.display(),
        if ok { "within the tolerance" } else { "above the tolerance" },
        args.tolerance
    );
    Ok(ok)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}
