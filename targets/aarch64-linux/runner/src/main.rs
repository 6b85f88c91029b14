//! Runs a packed Edgefold model on raw little-endian input files and prints every output.
//!
//! The binary depends on the runtime only, so it cross-compiles to a small static executable for
//! ARM64 Linux (phones, single-board computers). Each input file contains the elements of one graph
//! input in the model's element type, little-endian, row-major. Its shape is the model's declared
//! shape, with at most one variable axis inferred from the file's length.

use std::fmt;
use std::io::{self, BufWriter, ErrorKind, StdoutLock, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use edgefold_runtime::format::Dim;
use edgefold_runtime::{DType, Error, MappedFile, Model, Session};

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
            "--tolerance" => tolerance = parse_tolerance(&value("--tolerance")?)?,
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

/// Parses `--tolerance`. A NaN or negative tolerance would fail every comparison and an infinite
/// one would pass every comparison but a NaN mismatch, so only finite values >= 0 are valid.
fn parse_tolerance(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(tolerance) if tolerance.is_finite() && tolerance >= 0.0 => Ok(tolerance),
        _ => Err(format!(
            "invalid --tolerance {text:?}: expected a finite number >= 0, such as 1e-5 or 0.01"
        )),
    }
}

/// Formats a graph input's declared shape with each variable axis written as its symbol's name,
/// such as `[batch, 3]`. [`Model::open`] rejects input axes that are neither constant nor a
/// single symbol, so the `?` fallback is only a guard.
fn format_declared_shape(model: &Model<'_>, shape: &[Dim]) -> String {
    let axes: Vec<String> = shape.iter().map(|dim| format_input_axis(model, dim)).collect();
    format!("[{}]", axes.join(", "))
}

fn format_input_axis(model: &Model<'_>, dim: &Dim) -> String {
    match (dim.as_constant(), dim.as_symbol().and_then(|symbol| model.symbol(symbol))) {
        (Some(extent), _) => extent.to_string(),
        (None, Some((name, _))) => name.to_owned(),
        (None, None) => "?".to_owned(),
    }
}

/// Infers the shape of graph input `index` from the file `path` of `elements` elements of `dtype`.
/// The constant axes are the declared ones, and at most one variable axis is sized to fit.
fn input_shape(
    model: &Model<'_>,
    index: usize,
    path: &Path,
    dtype: DType,
    elements: usize,
) -> Result<Vec<usize>, String> {
    let tensor = model.tensor(model.input_tensor(index).map_err(|e| e.to_string())?);
    let tensor = tensor.map_err(|e| e.to_string())?;
    let declared_shape = format_declared_shape(model, tensor.shape());
    let mut shape: Vec<usize> = Vec::with_capacity(tensor.rank as usize);
    let mut variable = None;
    for (axis, dim) in tensor.shape().iter().enumerate() {
        match dim.as_constant() {
            Some(extent) => shape.push(extent as usize),
            None if variable.is_none() => {
                variable = Some(axis);
                shape.push(1);
            }
            None => {
                return Err(format!(
                    "{}: input {index} has shape {declared_shape} with more than one variable \
                     axis, so the runner cannot infer its shape from the file's length",
                    path.display()
                ))
            }
        }
    }

    let fixed: usize = shape.iter().product();
    let how_to_fix = format!("Write the input's elements as little-endian {dtype:?}, row-major.");
    match variable {
        Some(_) if fixed == 0 => Err(format!(
            "{}: input {index} has shape {declared_shape} with an axis of extent 0, so the \
             runner cannot infer its variable axis from the file's length",
            path.display()
        )),
        Some(_) if !elements.is_multiple_of(fixed) => Err(format!(
            "{}: input {index} has shape {declared_shape}, so it needs a multiple of {fixed} \
             {dtype:?} elements, but the file contains {elements}. {how_to_fix}",
            path.display()
        )),
        Some(axis) => {
            shape[axis] = elements / fixed;
            Ok(shape)
        }
        None if fixed != elements => Err(format!(
            "{}: input {index} has shape {declared_shape}, so it needs {fixed} {dtype:?} \
             elements, but the file contains {elements}. {how_to_fix}",
            path.display()
        )),
        None => Ok(shape),
    }
}

/// Decodes little-endian elements of `N` bytes each.
fn decode<const N: usize, T>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| from(c.try_into().expect("chunk of N bytes"))).collect()
}

/// Formats the error for a failed read, write or map of `path`. A directory gets its own message,
/// which ends with `expected_file`, the kind of file that belongs there.
fn file_error(path: &Path, action: &str, expected_file: &str, error: io::Error) -> String {
    if path.is_dir() {
        format!("{} is a directory, but {expected_file}", path.display())
    } else {
        format!("cannot {action} {}: {error}", path.display())
    }
}

/// Formats the error for a file that [`Model::open`] rejected. A file without the Edgefold magic
/// bytes is usually the original model (ONNX or GGUF), so that message adds how to pack it.
fn open_error(path: &Path, error: Error) -> String {
    let message = format!("{}: {error}", path.display());
    if !matches!(error, Error::BadMagic) {
        return message;
    }
    format!(
        "{message}. The runner takes packed .fold files, so convert the model first with \
         `edgefold compress MODEL.onnx -o MODEL.fold`."
    )
}

/// Allocates the zeroed arena of `bytes` bytes that the model at `path` needs, returning an error
/// that names the file, the size and the fix where `vec![0; bytes]` would abort the process.
///
/// Like `vec![0; bytes]`, it requests zeroed memory from the allocator, so that arena pages the
/// runs never touch need not become resident, and peak memory stays what the model uses.
fn alloc_arena(path: &Path, bytes: usize) -> Result<Vec<u8>, String> {
    let error = || {
        format!(
            "cannot allocate the arena of {:.1} MiB ({bytes} bytes) that {} needs; compress the \
             model again with a smaller --max-seq or --max-batch",
            bytes as f64 / (1u64 << 20) as f64,
            path.display()
        )
    };
    if bytes == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(bytes).map_err(|_| error())?;
    // SAFETY: `layout` has a nonzero size, as `alloc_zeroed` requires.
    let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
    if pointer.is_null() {
        return Err(error());
    }
    // SAFETY: the global allocator returned `pointer` for `bytes` u8 values, the layout of a
    // `Vec<u8>` with capacity `bytes`, and `alloc_zeroed` initialized every byte to zero.
    Ok(unsafe { Vec::from_raw_parts(pointer, bytes, bytes) })
}

fn set_input(session: &mut Session<'_, '_>, index: usize, path: &Path) -> Result<(), String> {
    let expected_file = "each INPUT must be a file of raw little-endian elements";
    let bytes = std::fs::read(path).map_err(|e| file_error(path, "read", expected_file, e))?;
    let model = *session.model();
    let tensor = model.input_tensor(index).and_then(|t| model.tensor(t));
    let dtype = tensor.map_err(|e| e.to_string())?.dtype;
    let size = dtype.size().max(1);
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "{}: {} bytes is not a whole number of {size}-byte {dtype:?} elements. Write input \
             {index}'s elements as little-endian {dtype:?}, row-major.",
            path.display(),
            bytes.len()
        ));
    }
    let shape = input_shape(&model, index, path, dtype, bytes.len() / size)?;
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
    result.map_err(|e| set_input_error(index, path, &shape, e))
}

/// Formats the error for an input that [`Session::set_input`] rejected. The runner has already
/// checked the constant axes, so an extent above the model's maximum comes from a variable axis
/// inferred from the file's length, and that message adds how many elements fit.
fn set_input_error(index: usize, path: &Path, shape: &[usize], error: Error) -> String {
    let Error::InputShapeMismatch { axis, expected, given, .. } = error else {
        return format!("input {index} ({}): {error}", path.display());
    };
    if given <= expected {
        return format!("input {index} ({}): {error}", path.display());
    }

    let elements: usize = shape.iter().product();
    let other_axes_product: u64 = (shape.iter().enumerate())
        .filter(|&(other, _)| other != axis as usize)
        .map(|(_, &extent)| extent as u64)
        .product();
    format!(
        "{}: the file's {elements} elements make input {index} of shape {shape:?}, but the model \
         takes at most {expected} at axis {axis}. Write at most {} elements, or compress the \
         model again with a larger --max-batch or --max-seq.",
        path.display(),
        other_axes_product.saturating_mul(expected)
    )
}

/// Standard output, locked and buffered. Once the reader closes the pipe (as `| head` does), later
/// lines are dropped without an error, so the run still saves and compares its outputs.
struct StdoutLines {
    writer: BufWriter<StdoutLock<'static>>,
    closed: bool,
}

impl StdoutLines {
    fn new() -> Self {
        StdoutLines { writer: BufWriter::new(io::stdout().lock()), closed: false }
    }

    /// Writes `line` and a newline.
    fn line(&mut self, line: fmt::Arguments<'_>) -> Result<(), String> {
        if self.closed {
            return Ok(());
        }
        let result = writeln!(self.writer, "{line}");
        self.map_write_result(result)
    }

    /// Writes out the buffered lines.
    fn flush(&mut self) -> Result<(), String> {
        if self.closed {
            return Ok(());
        }
        let result = self.writer.flush();
        self.map_write_result(result)
    }

    fn map_write_result(&mut self, result: io::Result<()>) -> Result<(), String> {
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(format!("cannot write to standard output: {e}")),
        }
    }
}

/// Writes `line` and a newline to standard error. A failed write is ignored because no channel
/// is left to report it on, and a closed pipe must not abort the run.
fn print_error_line(line: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// Prints every output and returns the f32 values of all of them, concatenated, and the raw
/// bytes of all outputs.
fn print_outputs(
    session: &Session<'_, '_>,
    stdout: &mut StdoutLines,
) -> Result<(Vec<f32>, Vec<u8>), String> {
    let model = session.model();
    let (mut values, mut raw) = (Vec::new(), Vec::new());
    for i in 0..model.output_count() {
        let name = model.output_tensor(i).map(|t| model.tensor_name(t)).unwrap_or("");
        let dtype = session.output_dtype(i).map_err(|e| e.to_string())?;
        match dtype {
            DType::F32 => {
                let (shape, v) = session.output::<f32>(i).map_err(|e| e.to_string())?;
                stdout.line(format_args!("output {i} {name} f32 {:?}", shape.as_slice()))?;
                for (k, x) in v.iter().enumerate() {
                    stdout.line(format_args!("  [{k}] {x:e}"))?;
                }
                values.extend_from_slice(v);
                raw.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
            DType::I64 => {
                let (shape, v) = session.output::<i64>(i).map_err(|e| e.to_string())?;
                stdout.line(format_args!("output {i} {name} i64 {:?}: {v:?}", shape.as_slice()))?;
                raw.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
            other => stdout
                .line(format_args!("output {i} {name}: element type {other:?} is not printed"))?,
        }
    }
    Ok((values, raw))
}

/// Differences of `values` from the raw f32 file `path`: the largest absolute difference, and the
/// largest difference divided by `max(1, |expected|)`, which is NaN when only one side is NaN.
fn compare(values: &[f32], path: &Path) -> Result<(f32, f32), String> {
    let expected_file = "--expect takes a file of raw little-endian f32 values";
    let bytes = std::fs::read(path).map_err(|e| file_error(path, "read", expected_file, e))?;
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
    let expected_file = "MODEL must be a packed .fold file";
    let file = MappedFile::open(&args.model)
        .map_err(|e| file_error(&args.model, "map", expected_file, e))?;
    let model = Model::open(file.bytes()).map_err(|e| open_error(&args.model, e))?;
    if args.inputs.len() != model.input_count() {
        return Err(format!(
            "the model has {} inputs but {} input files were given",
            model.input_count(),
            args.inputs.len()
        ));
    }
    let mut arena = alloc_arena(&args.model, model.arena_bytes_unaligned())?;
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
    let mut stdout = StdoutLines::new();
    let (values, raw) = print_outputs(&session, &mut stdout)?;
    stdout.flush()?;
    print_error_line(format_args!(
        "{}: {} ops, {} arena bytes, {} weight bytes, {per_run:?} per run",
        args.model.display(),
        model.op_count(),
        model.arena_bytes(),
        model.weights_len()
    ));

    if let Some(path) = &args.save {
        let expected_file = "--save takes the path of a file to write";
        std::fs::write(path, &raw).map_err(|e| file_error(path, "write", expected_file, e))?;
    }
    let Some(path) = &args.expect else { return Ok(true) };
    let (absolute, scaled) = compare(&values, path)?;
    let ok = scaled <= args.tolerance;
    print_error_line(format_args!(
        "difference from {}: max abs {absolute:e}, max relative to max(1, |expected|) {scaled:e} \
         ({} {:e})",
        path.display(),
        if ok { "within the tolerance" } else { "above the tolerance" },
        args.tolerance
    ));
    Ok(ok)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            print_error_line(format_args!("{message}"));
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            print_error_line(format_args!("error: {message}"));
            ExitCode::from(2)
        }
    }
}
