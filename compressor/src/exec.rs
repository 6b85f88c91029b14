//! Running an in-memory graph with the runtime: the compressor's own measurements (calibration,
//! candidate evaluation) go through the same code path as the packed file on a device.

use std::alloc::Layout;
use std::path::{Path, PathBuf};

use edgefold_runtime::{DType, Model, Session};

use crate::ir::Graph;
use crate::plan::plan_arena;
use crate::tensor::{HostTensor, TensorData};
use crate::writer::{pack, WriteError};

/// Why an in-memory run failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ExecError {
    /// The graph could not be packed.
    Pack(WriteError),
    /// The runtime rejected the file or failed while running.
    Runtime(edgefold_runtime::Error),
    /// An input or output has an element type this helper does not handle.
    Unsupported(String),
    /// The arena the file needs cannot be allocated.
    Arena(ArenaError),
}

impl std::fmt::Display for ExecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExecError::Pack(e) => write!(f, "{e}"),
            ExecError::Runtime(e) => write!(f, "runtime error: {e}"),
            ExecError::Unsupported(m) => f.write_str(m),
            ExecError::Arena(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ExecError {}

impl From<edgefold_runtime::Error> for ExecError {
    fn from(e: edgefold_runtime::Error) -> Self {
        ExecError::Runtime(e)
    }
}

/// A failed allocation of a packed graph's arena, which is too large for this host's memory.
#[derive(Debug)]
pub struct ArenaError {
    /// The packed file, or `None` for a graph that the compressor packed in memory to measure it.
    pub path: Option<PathBuf>,
    /// The arena size that could not be allocated, in bytes.
    pub bytes: usize,
}

impl std::fmt::Display for ArenaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mebibytes = self.bytes as f64 / (1u64 << 20) as f64;
        match &self.path {
            Some(path) => write!(
                f,
                "cannot allocate the arena of {mebibytes:.1} MiB ({} bytes) that {} needs; \
                 compress the model again with a smaller --max-seq or --max-batch",
                self.bytes,
                path.display()
            ),
            None => write!(
                f,
                "cannot allocate the arena of {mebibytes:.1} MiB ({} bytes) that the model \
                 needs at the requested sizes, so run this command again with a smaller \
                 --max-seq or --max-batch",
                self.bytes
            ),
        }
    }
}

impl std::error::Error for ArenaError {}

/// Allocates a zeroed arena of `bytes` bytes for the packed file at `path`, returning an error
/// where `vec![0; bytes]` would abort the process when the memory is not available.
///
/// Like `vec![0; bytes]`, it requests zeroed memory from the allocator, so that pages the runs
/// never touch (such as the unused end of a key-value cache) need not become resident. Reserving
/// with `Vec::try_reserve_exact` and then filling with zeros would write every page at load.
///
/// # Errors
/// [`ArenaError`] naming `path` and the size when the allocation fails.
pub fn alloc_arena(path: &Path, bytes: usize) -> Result<Vec<u8>, ArenaError> {
    try_alloc_zeroed(bytes).ok_or_else(|| ArenaError { path: Some(path.to_owned()), bytes })
}

/// Allocates `bytes` zeroed bytes as [`alloc_arena`] does, or returns `None` when the allocator
/// fails or `bytes` exceeds `isize::MAX`.
fn try_alloc_zeroed(bytes: usize) -> Option<Vec<u8>> {
    if bytes == 0 {
        return Some(Vec::new());
    }
    let layout = Layout::array::<u8>(bytes).ok()?;
    // SAFETY: `layout` has a nonzero size, as `alloc_zeroed` requires.
    let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
    if pointer.is_null() {
        return None;
    }
    // SAFETY: `pointer` comes from the global allocator with the layout of `bytes` u8 values,
    // which is the layout of a `Vec<u8>` of capacity `bytes`, and all `bytes` are initialized
    // to zero.
    Some(unsafe { Vec::from_raw_parts(pointer, bytes, bytes) })
}

/// A copy of a packed file in a buffer with the 16-byte alignment the runtime requires.
pub struct AlignedFile {
    words: Vec<u128>,
    len: usize,
}

impl AlignedFile {
    /// Copies `bytes` into an aligned buffer.
    pub fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(16)) {
            let mut b = [0u8; 16];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u128::from_le_bytes(b);
        }
        AlignedFile { words, len: bytes.len() }
    }

    /// Returns the file's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` is `16 * words.len()` initialized bytes (u128 has no padding) and `len`
        // never exceeds that.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// A graph packed into an aligned buffer, with an arena, ready to run repeatedly.
pub struct PackedGraph {
    file: AlignedFile,
    arena: Vec<u8>,
}

impl PackedGraph {
    /// Plans and packs `graph`.
    ///
    /// # Errors
    /// [`ExecError::Pack`] or a validation error from the runtime.
    pub fn new(graph: &Graph) -> Result<Self, ExecError> {
        let plan = plan_arena(graph);
        let bytes = pack(graph, &plan, &[]).map_err(ExecError::Pack)?;
        Self::from_bytes(&bytes)
    }

    /// Copies packed file bytes into an aligned buffer, and allocates their arena without
    /// aborting when the memory is not available.
    ///
    /// # Errors
    /// A validation error from the runtime, or [`ExecError::Arena`] with the arena size.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ExecError> {
        Self::open(bytes, None)
    }

    /// Copies `bytes`, read from the packed file at `path`, into an aligned buffer, and allocates
    /// their arena as [`PackedGraph::from_bytes`] does.
    ///
    /// # Errors
    /// A validation error from the runtime, or [`ExecError::Arena`] naming `path`.
    pub fn load(bytes: &[u8], path: &Path) -> Result<Self, ExecError> {
        Self::open(bytes, Some(path))
    }

    fn open(bytes: &[u8], path: Option<&Path>) -> Result<Self, ExecError> {
        let file = AlignedFile::new(bytes);
        let model = Model::open(file.bytes())?;
        let arena_bytes = model.arena_bytes_unaligned();
        let arena = try_alloc_zeroed(arena_bytes).ok_or_else(|| {
            ExecError::Arena(ArenaError { path: path.map(Path::to_owned), bytes: arena_bytes })
        })?;
        Ok(PackedGraph { file, arena })
    }

    /// The packed file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.file.bytes()
    }

    /// Runs the graph and returns every output.
    ///
    /// # Errors
    /// Runtime errors, or an element type this helper does not convert.
    pub fn run(&mut self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, ExecError> {
        let file = self.file.bytes();
        let options = edgefold_runtime::OpenOptions { verify_weights: false };
        let model = Model::open_with(file, options)?;
        let mut session = Session::new(&model, &mut self.arena)?;
        for (i, t) in inputs.iter().enumerate() {
            match &t.data {
                TensorData::F32(v) => session.set_input::<f32>(i, &t.shape, v)?,
                TensorData::I64(v) => session.set_input::<i64>(i, &t.shape, v)?,
                TensorData::I32(v) => session.set_input::<i32>(i, &t.shape, v)?,
                TensorData::Bool(v) => {
                    let bytes: Vec<u8> = v.iter().map(|&b| b as u8).collect();
                    session.set_input_bytes(i, DType::Bool, &t.shape, &bytes)?
                }
            }
        }
        session.run()?;
        let mut outputs = Vec::with_capacity(model.output_count());
        for i in 0..model.output_count() {
            outputs.push(match session.output_dtype(i)? {
                DType::F32 => {
                    let (s, v) = session.output::<f32>(i)?;
                    HostTensor::f32(s.as_slice().to_vec(), v.to_vec())
                }
                DType::I64 => {
                    let (s, v) = session.output::<i64>(i)?;
                    HostTensor::i64(s.as_slice().to_vec(), v.to_vec())
                }
                other => return Err(ExecError::Unsupported(format!("{other:?} outputs"))),
            });
        }
        Ok(outputs)
    }
}
