//! The compression pipeline behind `edgefold compress`: import, fuse, factorize, quantize, plan and
//! pack, with the settings and the source's checksum recorded in the file's metadata.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ir::Graph;
use crate::onnx::{import, ImportError, ImportOptions};
use crate::passes::{fuse, FuseCounts};
use crate::plan::plan_arena;
use crate::quantize::{factorize, quantize, Factorized, LowRank, Quantize};
use crate::spectrum::SpectrumError;
use crate::writer::{pack, WriteError};

/// Settings of one compression run.
#[derive(Clone, Debug)]
pub struct CompressOptions {
    /// Weight storage type.
    pub quantize: Quantize,
    /// Low-rank factorization of linear weights.
    pub low_rank: LowRank,
    /// Limits of the variable dimensions.
    pub import: ImportOptions,
    /// Tokenizer to embed; `None` looks for `tokenizer.json` beside the model.
    pub tokenizer: Option<PathBuf>,
}

/// What a compression run did.
#[derive(Clone, Debug)]
pub struct CompressReport {
    /// Bytes of the source model file.
    pub source_bytes: u64,
    /// Bytes of the packed file.
    pub output_bytes: u64,
    /// Bytes of constant data before compression (f32).
    pub weight_bytes_before: u64,
    /// Bytes of constant data after compression.
    pub weight_bytes_after: u64,
    /// Arena bytes the packed model needs.
    pub arena_bytes: u64,
    /// Number of ops in the packed model.
    pub ops: usize,
    /// Patterns fused into single ops.
    pub fused: FuseCounts,
    /// Linear weights replaced by low-rank pairs.
    pub factorized: Vec<Factorized>,
    /// Tensors stored in a compressed element type.
    pub quantized: usize,
    /// Tokenizer file embedded, if any.
    pub tokenizer: Option<PathBuf>,
}

/// Why compression failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum CompressError {
    /// Import failed.
    Import(ImportError),
    /// Factorization failed.
    Spectrum(SpectrumError),
    /// Packing failed.
    Write(WriteError),
    /// A file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl std::fmt::Display for CompressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompressError::Import(e) => write!(f, "{e}"),
            CompressError::Spectrum(e) => write!(f, "low-rank factorization failed: {e}"),
            CompressError::Write(e) => write!(f, "{e}"),
            CompressError::Io { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for CompressError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Display prints the import error itself, so its cause is the next in the chain.
            CompressError::Import(e) => e.source(),
            _ => None,
        }
    }
}

/// Imports and fuses a model: the graph every transform starts from.
///
/// # Errors
/// [`CompressError::Import`].
pub fn load_graph(
    path: &Path,
    options: &ImportOptions,
) -> Result<(Graph, FuseCounts), CompressError> {
    log::info!("importing {}", path.display());
    let mut graph = import(path, options).map_err(CompressError::Import)?;
    let fused = fuse(&mut graph);
    log::info!(
        "{} ops, {} values, {} bytes of weights",
        graph.nodes.len(),
        graph.values.len(),
        graph.weight_bytes()
    );
    Ok((graph, fused))
}

/// Compresses the model at `path` into the bytes of a packed file.
///
/// # Errors
/// Any import, factorization or packing failure, naming the file.
pub fn compress(
    path: &Path,
    options: &CompressOptions,
) -> Result<(Vec<u8>, CompressReport), CompressError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CompressError::Io { path, source }
    };
    let source = std::fs::read(path).map_err(io(path))?;

    let (mut graph, fused) = load_graph(path, &options.import)?;
    let weight_bytes_before = graph.weight_bytes() as u64;
    let factorized = factorize(&mut graph, options.low_rank).map_err(CompressError::Spectrum)?;
    if options.low_rank != LowRank::Off {
        log::info!("factorized {} of the linear weights ({})", factorized.len(), options.low_rank);
    }
    let quantized = quantize(&mut graph, options.quantize);
    log::info!("stored {quantized} tensors as {}", options.quantize);
    let plan = plan_arena(&graph);

    let tokenizer = match &options.tokenizer {
        Some(p) => Some(p.clone()),
        None => path.parent().map(|d| d.join("tokenizer.json")).filter(|p| p.exists()),
    };
    let settings = [
        ("compress.quantize", options.quantize.to_string()),
        ("compress.low_rank", options.low_rank.to_string()),
    ];
    if let Some(t) = &tokenizer {
        log::info!("embedding tokenizer {}", t.display());
    }
    let metadata = file_metadata(path, &source, &settings, options, tokenizer.as_deref())?;
    let bytes = pack(&graph, &plan, &metadata).map_err(CompressError::Write)?;
    let report = CompressReport {
        source_bytes: source.len() as u64,
        output_bytes: bytes.len() as u64,
        weight_bytes_before,
        weight_bytes_after: graph.weight_bytes() as u64,
        arena_bytes: plan.arena_bytes,
        ops: graph.nodes.len(),
        fused,
        factorized,
        quantized,
        tokenizer,
    };
    Ok((bytes, report))
}

/// Packs an already transformed graph with the standard metadata; `settings` describes what was
/// done to it (recorded as `compress.plan`).
///
/// # Errors
/// Read or packing failures.
pub fn pack_graph(
    path: &Path,
    graph: &Graph,
    options: &CompressOptions,
    settings: &str,
) -> Result<Vec<u8>, CompressError> {
    let source = std::fs::read(path)
        .map_err(|source| CompressError::Io { path: path.to_owned(), source })?;
    let settings = [("compress.plan", settings.to_owned())];
    let metadata = file_metadata(path, &source, &settings, options, options.tokenizer.as_deref())?;
    let plan = plan_arena(graph);
    pack(graph, &plan, &metadata).map_err(CompressError::Write)
}

/// Metadata key of the source model file's SHA-256, which `eval` compares with the original it
/// is given.
pub const SOURCE_SHA256_KEY: &str = "source.sha256";

/// Returns the metadata records that name the source model: the compressor's version, and the
/// source file's name, SHA-256 (64 lowercase hex digits) and size in bytes.
fn source_records(path: &Path, sha256: String, bytes: u64) -> Vec<(String, Vec<u8>)> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    vec![
        ("edgefold.compressor".into(), env!("CARGO_PKG_VERSION").into()),
        ("source.name".into(), name.into()),
        (SOURCE_SHA256_KEY.into(), sha256.into()),
        ("source.bytes".into(), bytes.to_string().into()),
    ]
}

/// Returns the records that name the source model, as every packed file of an ONNX model
/// carries them, for a model that another packer writes (GGUF and Marian models). The file is
/// read in a stream, so a large model is not held in memory.
///
/// # Errors
/// [`CompressError::Io`] when the file cannot be read.
pub fn source_metadata(path: &Path) -> Result<Vec<(String, Vec<u8>)>, CompressError> {
    let (sha256, bytes) =
        sha256_file(path).map_err(|source| CompressError::Io { path: path.to_owned(), source })?;
    Ok(source_records(path, sha256, bytes))
}

/// Returns the SHA-256 of the file at `path` in lowercase hex, as the `source.sha256` record
/// stores it, and the file's length in bytes.
///
/// # Errors
/// When the file cannot be opened or read.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let bytes = std::io::copy(&mut reader, &mut hasher)?;
    Ok((to_hex(&hasher.finalize()), bytes))
}

fn to_hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds the metadata every packed file carries: compressor version, source name, SHA-256 and
/// size, the settings, the arena limits and the tokenizer when there is one.
fn file_metadata(
    path: &Path,
    source: &[u8],
    settings: &[(&str, String)],
    options: &CompressOptions,
    tokenizer: Option<&Path>,
) -> Result<Vec<(String, Vec<u8>)>, CompressError> {
    let sha256 = to_hex(&Sha256::digest(source));
    let mut metadata = source_records(path, sha256, source.len() as u64);
    for (key, value) in settings {
        metadata.push(((*key).to_owned(), value.as_bytes().to_vec()));
    }
    metadata.push(("compress.max_batch".into(), options.import.max_batch.to_string().into()));
    metadata.push(("compress.max_seq".into(), options.import.max_seq.to_string().into()));
    if let Some(t) = tokenizer {
        let json =
            std::fs::read(t).map_err(|source| CompressError::Io { path: t.to_owned(), source })?;
        metadata.push(("tokenizer.json".into(), json));
    }
    Ok(metadata)
}
