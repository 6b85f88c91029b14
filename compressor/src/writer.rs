//! Packing a planned graph into the file format read by `edgefold-runtime`.

use std::fs::Metadata;
use std::io::Write;
use std::path::{Path, PathBuf};

use edgefold_runtime::crc32::crc32;
use edgefold_runtime::format::{
    DType, Dim, Header, Quant, SectionEntry, SectionKind, StrRef, SymbolEntry, TensorEntry,
    TensorKind, HEADER_LEN, MAX_GRAPH_INPUTS, MAX_OP_ARITY, MAX_RANK, NO_TENSOR, OP_FLAG_IN_PLACE,
    SECTION_ALIGN, SECTION_ENTRY_LEN, VERSION_MAJOR, VERSION_MINOR,
};
use edgefold_runtime::ops::encode_op;

use crate::ir::{Graph, Storage};
use crate::plan::ArenaPlan;

/// Why writing failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum WriteError {
    /// The graph cannot be represented in the format.
    Unrepresentable(String),
    /// The output file could not be written.
    Io {
        /// The output path.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The output path is a file that the command also reads, so writing would replace it.
    OutputIsInput {
        /// The output path.
        output: std::path::PathBuf,
        /// The input file that `output` names.
        input: std::path::PathBuf,
    },
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Unrepresentable(m) => write!(f, "cannot pack the model: {m}"),
            WriteError::Io { path, source } => {
                write!(f, "cannot write {}: {source}", path.display())
            }
            WriteError::OutputIsInput { output, input } => write!(
                f,
                "the output {} is the input file {}, which writing would replace; choose \
                 another output path",
                output.display(),
                input.display()
            ),
        }
    }
}

impl std::error::Error for WriteError {}

#[derive(Default)]
struct Strings {
    bytes: Vec<u8>,
}

impl Strings {
    fn add(&mut self, s: &str) -> StrRef {
        let r = StrRef { offset: self.bytes.len() as u32, len: s.len() as u32 };
        self.bytes.extend_from_slice(s.as_bytes());
        r
    }
}

fn pad_to(buf: &mut Vec<u8>, align: usize) {
    while !buf.len().is_multiple_of(align) {
        buf.push(0);
    }
}

fn dims_array(shape: &[Dim]) -> [Dim; MAX_RANK] {
    let mut dims = [Dim::constant(1); MAX_RANK];
    dims[..shape.len()].copy_from_slice(shape);
    dims
}

/// Serializes a graph with its arena plan and metadata into the bytes of a file.
///
/// # Errors
/// [`WriteError::Unrepresentable`] when a value exceeds the format's limits.
pub fn pack(
    graph: &Graph,
    plan: &ArenaPlan,
    metadata: &[(String, Vec<u8>)],
) -> Result<Vec<u8>, WriteError> {
    let bad = |m: String| WriteError::Unrepresentable(m);
    let mut strings = Strings::default();
    let mut weights: Vec<u8> = Vec::new();
    let mut tensors: Vec<TensorEntry> = Vec::with_capacity(graph.values.len());
    let mut extra: Vec<TensorEntry> = Vec::new();
    let n = graph.values.len() as u32;

    let put = |weights: &mut Vec<u8>, bytes: &[u8]| -> u64 {
        pad_to(weights, SECTION_ALIGN);
        let at = weights.len() as u64;
        weights.extend_from_slice(bytes);
        at
    };
    for (i, v) in graph.values.iter().enumerate() {
        if v.shape.len() > MAX_RANK {
            return Err(bad(format!("{} has rank {} (at most {MAX_RANK})", v.name, v.shape.len())));
        }
        let name = strings.add(&v.name);
        let dims = dims_array(&v.shape);
        let rank = v.shape.len() as u8;
        let entry = match &v.data {
            None => TensorEntry {
                name,
                dtype: v.dtype,
                kind: TensorKind::Activation,
                rank,
                quant: Quant::None,
                scale_tensor: NO_TENSOR,
                group_size: 0,
                offset: plan.offsets[i]
                    .ok_or_else(|| bad(format!("{} has no arena offset", v.name)))?,
                byte_len: plan.sizes[i],
                dims,
            },
            Some(data) => {
                let (bytes, quant, scale, group): (Vec<u8>, Quant, u32, u32) = match data {
                    Storage::F32(d) => (
                        d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        Quant::None,
                        NO_TENSOR,
                        0,
                    ),
                    Storage::I64(d) => (
                        d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        Quant::None,
                        NO_TENSOR,
                        0,
                    ),
                    Storage::I32(d) => (
                        d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        Quant::None,
                        NO_TENSOR,
                        0,
                    ),
                    Storage::Bool(d) => (d.clone(), Quant::None, NO_TENSOR, 0),
                    Storage::F16(d) => (
                        d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                        Quant::None,
                        NO_TENSOR,
                        0,
                    ),
                    Storage::I8PerRow { q, scales } => {
                        let scale_bytes: Vec<u8> =
                            scales.iter().flat_map(|x| x.to_le_bytes()).collect();
                        let offset = put(&mut weights, &scale_bytes);
                        let scale_index = n + extra.len() as u32;
                        extra.push(TensorEntry {
                            name: strings.add(&format!("{}.scales", v.name)),
                            dtype: DType::F32,
                            kind: TensorKind::Const,
                            rank: 1,
                            quant: Quant::None,
                            scale_tensor: NO_TENSOR,
                            group_size: 0,
                            offset,
                            byte_len: scale_bytes.len() as u64,
                            dims: dims_array(&[v.shape[0]]),
                        });
                        (q.iter().map(|&x| x as u8).collect(), Quant::PerRow, scale_index, 0)
                    }
                    Storage::I4Grouped { packed, scales, group } => {
                        let scale_bytes: Vec<u8> =
                            scales.iter().flat_map(|x| x.to_le_bytes()).collect();
                        let offset = put(&mut weights, &scale_bytes);
                        let scale_index = n + extra.len() as u32;
                        let groups = v.shape[1].factor / *group as u32;
                        extra.push(TensorEntry {
                            name: strings.add(&format!("{}.scales", v.name)),
                            dtype: DType::F16,
                            kind: TensorKind::Const,
                            rank: 2,
                            quant: Quant::None,
                            scale_tensor: NO_TENSOR,
                            group_size: 0,
                            offset,
                            byte_len: scale_bytes.len() as u64,
                            dims: dims_array(&[v.shape[0], Dim::constant(groups)]),
                        });
                        (packed.clone(), Quant::Grouped, scale_index, *group as u32)
                    }
                    Storage::I4GroupedMin { packed, scales, mins, group } => {
                        let scale_bytes: Vec<u8> =
                            scales.iter().chain(mins).flat_map(|x| x.to_le_bytes()).collect();
                        let offset = put(&mut weights, &scale_bytes);
                        let scale_index = n + extra.len() as u32;
                        let groups = v.shape[1].factor / *group as u32;
                        extra.push(TensorEntry {
                            name: strings.add(&format!("{}.scales", v.name)),
                            dtype: DType::F16,
                            kind: TensorKind::Const,
                            rank: 3,
                            quant: Quant::None,
                            scale_tensor: NO_TENSOR,
                            group_size: 0,
                            offset,
                            byte_len: scale_bytes.len() as u64,
                            dims: dims_array(&[
                                Dim::constant(2),
                                v.shape[0],
                                Dim::constant(groups),
                            ]),
                        });
                        (packed.clone(), Quant::GroupedMin, scale_index, *group as u32)
                    }
                };
                let offset = put(&mut weights, &bytes);
                TensorEntry {
                    name,
                    dtype: data.dtype(),
                    kind: TensorKind::Const,
                    rank,
                    quant,
                    scale_tensor: scale,
                    group_size: group,
                    offset,
                    byte_len: bytes.len() as u64,
                    dims,
                }
            }
        };
        tensors.push(entry);
    }
    tensors.extend(extra);
    // Scratch tensors of the ops that run in place, after the scale tensors.
    let mut scratch_index = vec![None; graph.nodes.len()];
    for (t, node) in graph.nodes.iter().enumerate() {
        let Some(s) = plan.scratch.get(t).copied().flatten() else { continue };
        let elements = u32::try_from(s.elements)
            .map_err(|_| bad(format!("op {} needs {} scratch elements", node.name, s.elements)))?;
        scratch_index[t] = Some(tensors.len() as u32);
        tensors.push(TensorEntry {
            name: strings.add(&format!("{}.scratch", node.name)),
            dtype: DType::F32,
            kind: TensorKind::Activation,
            rank: 1,
            quant: Quant::None,
            scale_tensor: NO_TENSOR,
            group_size: 0,
            offset: s.offset,
            byte_len: 4 * s.elements,
            dims: dims_array(&[Dim::constant(elements)]),
        });
    }

    let mut symbols = Vec::new();
    for s in &graph.symbols {
        symbols.extend_from_slice(
            &SymbolEntry { name: strings.add(&s.name), max_value: s.max }.to_bytes(),
        );
    }
    if graph.inputs.len() > MAX_GRAPH_INPUTS {
        return Err(bad(format!(
            "{} graph inputs (at most {MAX_GRAPH_INPUTS})",
            graph.inputs.len()
        )));
    }
    let mut ops = Vec::new();
    for (t, node) in graph.nodes.iter().enumerate() {
        if node.inputs.len() > MAX_OP_ARITY || node.outputs.len() > MAX_OP_ARITY {
            return Err(bad(format!(
                "op {} has {} inputs and {} outputs (at most {MAX_OP_ARITY} each)",
                node.name,
                node.inputs.len(),
                node.outputs.len()
            )));
        }
        let name = strings.add(&node.name);
        let mut inputs: Vec<u32> =
            node.inputs.iter().map(|i| i.map_or(NO_TENSOR, |v| v as u32)).collect();
        if let Some(scratch) = scratch_index[t] {
            // A convolution's scratch is input 3, after the optional bias.
            inputs.resize(3, NO_TENSOR);
            inputs.push(scratch);
        }
        let outputs: Vec<u32> = node.outputs.iter().map(|&o| o as u32).collect();
        let in_place = plan.in_place.get(t).copied().unwrap_or(false);
        let flags = if in_place { OP_FLAG_IN_PLACE } else { 0 };
        encode_op(&mut ops, &node.op, name, flags, &inputs, &outputs);
    }
    let mut io = Vec::new();
    for &v in graph.inputs.iter().chain(&graph.outputs) {
        io.extend_from_slice(&(v as u32).to_le_bytes());
    }
    let mut meta = Vec::new();
    for (k, v) in metadata {
        meta.extend_from_slice(&(k.len() as u32).to_le_bytes());
        meta.extend_from_slice(&(v.len() as u32).to_le_bytes());
        meta.extend_from_slice(k.as_bytes());
        meta.extend_from_slice(v);
        pad_to(&mut meta, 4);
    }
    let tensor_bytes: Vec<u8> = tensors.iter().flat_map(|t| t.to_bytes()).collect();

    let bodies: [(SectionKind, &[u8]); 7] = [
        (SectionKind::Strings, &strings.bytes),
        (SectionKind::Symbols, &symbols),
        (SectionKind::Tensors, &tensor_bytes),
        (SectionKind::Ops, &ops),
        (SectionKind::Io, &io),
        (SectionKind::Metadata, &meta),
        (SectionKind::Weights, &weights),
    ];
    let header = Header {
        version_major: VERSION_MAJOR,
        version_minor: VERSION_MINOR,
        file_len: 0,
        arena_bytes: plan.arena_bytes,
        section_count: bodies.len() as u32,
        tensor_count: tensors.len() as u32,
        op_count: graph.nodes.len() as u32,
        input_count: graph.inputs.len() as u32,
        output_count: graph.outputs.len() as u32,
        symbol_count: graph.symbols.len() as u32,
        flags: 0,
    };
    Ok(assemble(header, &bodies))
}

/// Lays out the header, the section table and the section bodies, each body at a multiple of
/// [`SECTION_ALIGN`] with its checksum. Sets `header.file_len` and `header.section_count`.
fn assemble(mut header: Header, bodies: &[(SectionKind, &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN + bodies.len() * SECTION_ENTRY_LEN];
    let mut entries = Vec::new();
    for &(kind, body) in bodies {
        pad_to(&mut out, SECTION_ALIGN);
        entries.push(SectionEntry {
            kind,
            offset: out.len() as u64,
            len: body.len() as u64,
            crc32: crc32(body),
        });
        out.extend_from_slice(body);
    }
    for (i, e) in entries.iter().enumerate() {
        let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
        out[at..at + SECTION_ENTRY_LEN].copy_from_slice(&e.to_bytes());
    }
    header.file_len = out.len() as u64;
    header.section_count = entries.len() as u32;
    out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    out
}

/// Returns a copy of the packed file `file` whose metadata contains `value` under `key`: an earlier
/// record with that key is dropped, and the new record goes before a `tokenizer.json` record (which
/// stays last) or at the end. Every other byte of the sections is kept, so the model computes
/// exactly what it did.
///
/// # Errors
/// [`WriteError::Unrepresentable`] when `file` does not open or a length exceeds the format's.
pub fn with_metadata(file: &[u8], key: &str, value: &[u8]) -> Result<Vec<u8>, WriteError> {
    let bad = |m: String| WriteError::Unrepresentable(m);
    let model = edgefold_runtime::Model::open(file)
        .map_err(|e| bad(format!("the packed file does not open: {e}")))?;
    let header = Header::parse(file).map_err(|e| bad(e.to_string()))?;
    let mut records: Vec<(&str, &[u8])> =
        model.metadata_entries().filter(|(k, _)| *k != key).collect();
    let at = records.iter().position(|(k, _)| *k == "tokenizer.json").unwrap_or(records.len());
    records.insert(at, (key, value));
    let mut meta = Vec::new();
    for (k, v) in records {
        let (key_len, value_len) = (u32::try_from(k.len()), u32::try_from(v.len()));
        let (Ok(key_len), Ok(value_len)) = (key_len, value_len) else {
            return Err(bad(format!("metadata record {k} is longer than 4 GiB")));
        };
        meta.extend_from_slice(&key_len.to_le_bytes());
        meta.extend_from_slice(&value_len.to_le_bytes());
        meta.extend_from_slice(k.as_bytes());
        meta.extend_from_slice(v);
        pad_to(&mut meta, 4);
    }
    let mut bodies: Vec<(SectionKind, &[u8])> = Vec::new();
    for i in 0..header.section_count as usize {
        let start = HEADER_LEN + i * SECTION_ENTRY_LEN;
        let entry = file
            .get(start..start + SECTION_ENTRY_LEN)
            .ok_or_else(|| bad("the section table is cut off".into()))
            .and_then(|b| SectionEntry::parse(b).map_err(|e| bad(e.to_string())))?;
        if entry.kind == SectionKind::Metadata {
            bodies.push((entry.kind, &meta));
        } else {
            let range = usize::try_from(entry.offset)
                .ok()
                .zip(usize::try_from(entry.offset.saturating_add(entry.len)).ok())
                .and_then(|(a, b)| file.get(a..b))
                .ok_or_else(|| bad(format!("section {:?} lies outside the file", entry.kind)))?;
            bodies.push((entry.kind, range));
        }
    }
    if !bodies.iter().any(|(kind, _)| *kind == SectionKind::Metadata) {
        return Err(bad("the packed file has no metadata section".into()));
    }
    Ok(assemble(header, &bodies))
}

/// Returns the temporary file that [`write_atomic`] writes before renaming it to `path`: a hidden
/// file in the same directory, named after `path` and the process id.
pub fn temporary_path(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{file_name}.tmp{}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so an
/// interrupted or failed write never leaves a partial file at `path`.
///
/// # Errors
/// [`WriteError::Io`] naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let io = |source| WriteError::Io { path: path.to_owned(), source };
    let tmp = temporary_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Checks that `output` differs from each of `inputs`, so that writing it cannot replace a file
/// that the command reads. Paths compare as the files they name: an output that does not exist
/// yet is no input, and on Unix a hard link or a symbolic link to an input is that input.
///
/// # Errors
/// [`WriteError::OutputIsInput`] naming the output and the input it is.
pub fn check_output_is_not_input(output: &Path, inputs: &[&Path]) -> Result<(), WriteError> {
    let Ok(output_metadata) = std::fs::metadata(output) else { return Ok(()) };
    for &input in inputs {
        let Ok(input_metadata) = std::fs::metadata(input) else { continue };
        if same_file(output, &output_metadata, input, &input_metadata) {
            let error = WriteError::OutputIsInput { output: output.into(), input: input.into() };
            return Err(error);
        }
    }
    Ok(())
}

/// Returns whether two existing paths name the same file: the same device and inode on Unix, the
/// same canonical path elsewhere.
fn same_file(a: &Path, a_metadata: &Metadata, b: &Path, b_metadata: &Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let _ = (a, b);
        a_metadata.dev() == b_metadata.dev() && a_metadata.ino() == b_metadata.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (a_metadata, b_metadata);
        match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}
