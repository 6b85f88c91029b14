//! Embedding a self-test in a packed file: a sample input and the outputs this host's runtime
//! computes for it, which `edgefold verify` and the firmware compare against on the device.
//!
//! The record layout is the runtime's ([`edgefold_runtime::selftest`]).

use edgefold_runtime::format::MAX_RANK;
use edgefold_runtime::selftest::{self, RecordTensor, SELF_TEST_KEY};
use edgefold_runtime::{DType, Model, Session, Shape};

use std::path::Path;

use crate::exec::{alloc_arena, AlignedFile, ArenaError};
use crate::tensor::{HostTensor, TensorData};
use crate::writer::{with_metadata, WriteError};

/// Tolerance per unit of the largest expected output magnitude (at least 1): the differences
/// that another CPU's rounding (fused multiply-add, summation order) may add.
pub const RELATIVE_TOLERANCE: f32 = 1e-4;

/// Extent given to every symbolic dimension of the generated sample input, when the symbol's
/// maximum allows it.
pub const SAMPLE_SYMBOL_VALUE: u64 = 4;

/// Error returned when a self-test cannot be embedded.
#[derive(Debug)]
#[non_exhaustive]
pub enum SelfTestError {
    /// The packed file does not open or run.
    Runtime(edgefold_runtime::Error),
    /// The given sample input does not fit the model.
    Input(String),
    /// The file could not be rewritten with the record.
    Write(WriteError),
    /// The arena the file needs cannot be allocated.
    Arena(ArenaError),
}

impl std::fmt::Display for SelfTestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelfTestError::Runtime(e) => write!(f, "the self-test's sample does not run: {e}"),
            SelfTestError::Input(m) => write!(f, "the self-test's sample input is unusable: {m}"),
            SelfTestError::Write(e) => write!(f, "{e}"),
            SelfTestError::Arena(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SelfTestError {}

impl From<edgefold_runtime::Error> for SelfTestError {
    fn from(e: edgefold_runtime::Error) -> Self {
        SelfTestError::Runtime(e)
    }
}

/// Summary of an embedded self-test.
#[derive(Clone, Debug)]
pub struct Embedded {
    /// Bytes of the record.
    pub record_bytes: usize,
    /// The tolerance stored.
    pub tolerance: f32,
    /// Shapes of the sample inputs.
    pub input_shapes: Vec<Vec<usize>>,
}

/// An owned tensor of the record, before encoding.
struct Owned {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Owned {
    fn view(&self) -> Result<RecordTensor<'_>, SelfTestError> {
        if self.shape.len() > MAX_RANK {
            return Err(SelfTestError::Input(format!(
                "rank {} exceeds the format's {MAX_RANK}",
                self.shape.len()
            )));
        }
        let mut dims = [1usize; MAX_RANK];
        dims[..self.shape.len()].copy_from_slice(&self.shape);
        Ok(RecordTensor { dtype: self.dtype, dims, rank: self.shape.len(), bytes: &self.bytes })
    }
}

fn host_to_owned(t: &HostTensor) -> Owned {
    let (dtype, bytes): (DType, Vec<u8>) = match &t.data {
        TensorData::F32(v) => (DType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::I64(v) => (DType::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::I32(v) => (DType::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::Bool(v) => (DType::Bool, v.iter().map(|&b| u8::from(b)).collect()),
    };
    Owned { dtype, shape: t.shape.clone(), bytes }
}

/// Builds a deterministic sample for every graph input of `model`. Each symbolic dimension is
/// [`SAMPLE_SYMBOL_VALUE`], or its maximum when lower. Float elements are spread over [-1, 1) by
/// a fixed generator, integers are 1 (a valid token id, mask value and index), booleans true.
// NOTE: an integer input whose valid range excludes 1 needs --self-test-input.
fn sample_inputs(model: &Model<'_>) -> Result<Vec<Owned>, SelfTestError> {
    let mut symbols = *model.symbol_max();
    for v in symbols.iter_mut() {
        *v = (*v).clamp(1, SAMPLE_SYMBOL_VALUE);
    }
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut inputs = Vec::new();
    for i in 0..model.input_count() {
        let t = model.tensor(model.input_tensor(i)?)?;
        let shape = Shape::eval(&t.dims[..t.rank as usize], &symbols)
            .ok_or_else(|| SelfTestError::Input(format!("input {i}'s extents overflow")))?;
        let n = shape.numel();
        let bytes: Vec<u8> = match t.dtype {
            DType::F32 => (0..n).flat_map(|_| next().to_le_bytes()).collect(),
            DType::F16 => (0..n).flat_map(|_| half::f16::from_f32(next()).to_le_bytes()).collect(),
            DType::I64 => (0..n).flat_map(|_| 1i64.to_le_bytes()).collect(),
            DType::I32 => (0..n).flat_map(|_| 1i32.to_le_bytes()).collect(),
            DType::I8 | DType::U8 | DType::Bool => vec![1u8; n],
            DType::I4 => {
                return Err(SelfTestError::Input(format!("input {i} has int4 elements")));
            }
        };
        inputs.push(Owned { dtype: t.dtype, shape: shape.as_slice().to_vec(), bytes });
    }
    Ok(inputs)
}

/// Runs `file` on `inputs` (generated when `None`), and returns a copy of `file` that carries the
/// inputs and the outputs as its self-test record, with a tolerance of [`RELATIVE_TOLERANCE`]
/// times the largest expected float magnitude (at least 1). `path` is where the file is to be
/// written.
///
/// # Errors
/// [`SelfTestError`] when the file does not open or run on the sample, its arena cannot be
/// allocated (an error that names `path`), or it cannot be rewritten.
pub fn embed(
    file: &[u8],
    path: &Path,
    inputs: Option<&[HostTensor]>,
) -> Result<(Vec<u8>, Embedded), SelfTestError> {
    let aligned = AlignedFile::new(file);
    let model = Model::open(aligned.bytes())?;
    let inputs: Vec<Owned> = match inputs {
        Some(given) => given.iter().map(host_to_owned).collect(),
        None => sample_inputs(&model)?,
    };
    if inputs.len() != model.input_count() {
        return Err(SelfTestError::Input(format!(
            "{} sample inputs for a model with {}",
            inputs.len(),
            model.input_count()
        )));
    }
    let mut arena =
        alloc_arena(path, model.arena_bytes_unaligned()).map_err(SelfTestError::Arena)?;
    let mut session = Session::new(&model, &mut arena)?;
    for (i, t) in inputs.iter().enumerate() {
        session.set_input_bytes(i, t.dtype, &t.shape, &t.bytes)?;
    }
    session.run()?;
    let mut outputs = Vec::new();
    let mut magnitude = 1.0f32;
    for i in 0..model.output_count() {
        let (shape, dtype, bytes) = session.output_bytes(i)?;
        if dtype == DType::F32 {
            for c in bytes.chunks_exact(4) {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if v.is_finite() {
                    magnitude = magnitude.max(v.abs());
                }
            }
        }
        outputs.push(Owned { dtype, shape: shape.as_slice().to_vec(), bytes: bytes.to_vec() });
    }
    let tolerance = RELATIVE_TOLERANCE * magnitude;

    let input_views = inputs.iter().map(Owned::view).collect::<Result<Vec<_>, _>>()?;
    let output_views = outputs.iter().map(Owned::view).collect::<Result<Vec<_>, _>>()?;
    let mut value = vec![0u8; selftest::encoded_len(&input_views, &output_views)];
    let used = selftest::encode(tolerance, &input_views, &output_views, &mut value)
        .ok_or_else(|| SelfTestError::Input("a tensor exceeds the record's limits".into()))?;
    value.truncate(used);
    let bytes = with_metadata(file, SELF_TEST_KEY, &value).map_err(SelfTestError::Write)?;
    let embedded = Embedded {
        record_bytes: value.len(),
        tolerance,
        input_shapes: inputs.iter().map(|t| t.shape.clone()).collect(),
    };
    Ok((bytes, embedded))
}

/// Error returned when a self-test cannot be run.
#[derive(Debug)]
#[non_exhaustive]
pub enum VerifyError {
    /// The file does not open, carries no or a malformed record, or fails to run.
    Runtime(edgefold_runtime::Error),
    /// The arena the file needs cannot be allocated.
    Arena(ArenaError),
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyError::Runtime(e) => write!(f, "{e}"),
            VerifyError::Arena(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for VerifyError {}

impl From<edgefold_runtime::Error> for VerifyError {
    fn from(e: edgefold_runtime::Error) -> Self {
        VerifyError::Runtime(e)
    }
}

/// Runs the self-test that `file`, read from `path`, carries on this host. The arena is
/// allocated before the record is read.
///
/// # Errors
/// [`VerifyError::Runtime`] when the file does not open, carries no or a malformed record, or
/// fails to run, and [`VerifyError::Arena`] when its arena cannot be allocated.
pub fn verify(file: &[u8], path: &Path) -> Result<selftest::Outcome, VerifyError> {
    let aligned = AlignedFile::new(file);
    let model = Model::open(aligned.bytes())?;
    let mut arena = alloc_arena(path, model.arena_bytes_unaligned()).map_err(VerifyError::Arena)?;
    Ok(selftest::run(&model, &mut arena)?)
}
