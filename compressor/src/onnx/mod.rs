//! ONNX import: parses a model with tract-onnx's protobuf reader, folds constant and shape
//! subgraphs (including shapes that depend on the batch or sequence length), and lowers the rest
//! into the runtime's op set.

mod compose;
mod consts;
mod derived;
mod fold;
mod lower;
pub mod proto;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use edgefold_runtime::format::{DType, Dim, MAX_SYMBOLS};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::Framework;

pub use consts::{ConstTensor, SymInt};
pub use lower::SUPPORTED;

use crate::ir::{Graph, Storage, Symbol, Value, ValueId};

/// Limits of the variable dimensions, which size the arena.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Maximum batch size (the first axis of each input when it is variable).
    pub max_batch: u32,
    /// Maximum extent of every other variable axis (sequence length).
    pub max_seq: u32,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { max_batch: 1, max_seq: 128 }
    }
}

/// Error from importing an ONNX model.
#[derive(Debug)]
#[non_exhaustive]
pub enum ImportError {
    /// The file could not be read or parsed as ONNX.
    Read {
        /// The model file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file is not an ONNX model.
    NotOnnx(NotOnnxError),
    /// Some ops are not supported; every one is listed.
    Unsupported {
        /// The model file.
        path: PathBuf,
        /// Op type (with its domain when not the default) and the names of the nodes using it.
        ops: BTreeMap<String, Vec<String>>,
    },
    /// A node is malformed or uses a form the importer cannot represent.
    Invalid {
        /// The model file.
        path: PathBuf,
        /// Node name (or output name when unnamed).
        node: String,
        /// Op type.
        op_type: String,
        /// What is wrong.
        message: String,
    },
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportError::Read { path, message } => {
                write!(f, "cannot read ONNX model {}: {message}", path.display())
            }
            ImportError::NotOnnx(e) => write!(f, "{e}"),
            ImportError::Unsupported { path, ops } => {
                let count: usize = ops.values().map(Vec::len).sum();
                writeln!(
                    f,
                    "{} uses {} unsupported op type(s) in {count} node(s):",
                    path.display(),
                    ops.len()
                )?;
                for (op, nodes) in ops {
                    let shown: Vec<&str> = nodes.iter().take(8).map(String::as_str).collect();
                    let more = if nodes.len() > 8 {
                        format!(" and {} more", nodes.len() - 8)
                    } else {
                        String::new()
                    };
                    writeln!(f, "  {op}: {}{more}", shown.join(", "))?;
                }
                write!(f, "supported op types: {}", lower::SUPPORTED.join(", "))
            }
            ImportError::Invalid { path, node, op_type, message } => {
                write!(f, "{}: node {node} ({op_type}): {message}", path.display())
            }
        }
    }
}

impl std::error::Error for ImportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Display prints the inner error itself, so its cause is the next in the chain.
            ImportError::NotOnnx(e) => e.source(),
            _ => None,
        }
    }
}

/// A file given as an ONNX model whose bytes are not a protobuf `ModelProto` with a graph.
#[derive(Debug)]
pub struct NotOnnxError {
    /// The file.
    pub path: PathBuf,
    /// Reason, as a clause such as "the file is empty".
    pub reason: String,
    /// The protobuf decoder's error, when decoding failed.
    pub cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Display for NotOnnxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not an ONNX model: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for NotOnnxError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Value a source tensor name refers to during import.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    /// A value computed at run time.
    Runtime(ValueId),
    /// A constant known at import time.
    Const(ConstTensor),
    /// Produced by an unsupported node.
    Poisoned,
}

/// Import state.
pub(crate) struct Importer {
    pub(crate) graph: Graph,
    pub(crate) vals: HashMap<String, Val>,
    materialized: HashMap<String, ValueId>,
    symbols: HashMap<String, usize>,
    options: ImportOptions,
    opset: i64,
    generated: usize,
    /// ONNX element types that the file declares for graph inputs, initializers and value infos.
    declared_types: HashMap<String, i32>,
}

/// A node-level failure, turned into an [`ImportError`] with the node's name.
#[derive(Debug)]
pub(crate) enum NodeError {
    /// The op type, or this use of it, is not supported.
    Unsupported(String),
    /// The node is malformed.
    Invalid(String),
}

pub(crate) type NodeResult<T> = Result<T, NodeError>;

pub(crate) fn invalid<T>(message: impl Into<String>) -> NodeResult<T> {
    Err(NodeError::Invalid(message.into()))
}

/// Returns whether the file at `path` starts with the magic bytes of a packed Edgefold file, which
/// tract would otherwise report as a protobuf decoding error.
pub fn is_packed_file(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && magic == edgefold_runtime::format::MAGIC
}

/// Reads the file at `path` and decodes it as an ONNX model: a protobuf `ModelProto` with a
/// graph.
///
/// # Errors
/// [`ImportError::Read`] when the file cannot be read or is a packed file, and
/// [`ImportError::NotOnnx`] when it is empty, does not decode as a `ModelProto`, or has no
/// graph.
pub fn read_model_proto(path: &Path) -> Result<tract_onnx::pb::ModelProto, ImportError> {
    let read_error = |message: String| ImportError::Read { path: path.to_owned(), message };
    if is_packed_file(path) {
        return Err(read_error(
            "it is a packed .fold file, the output of compress, not ONNX".into(),
        ));
    }
    let not_onnx = |reason: &str, cause: Option<tract_onnx::prelude::TractError>| {
        ImportError::NotOnnx(NotOnnxError {
            path: path.to_owned(),
            reason: reason.to_owned(),
            cause: cause.map(Into::into),
        })
    };
    let mut file = std::fs::File::open(path).map_err(|e| read_error(e.to_string()))?;
    if file.metadata().is_ok_and(|m| m.is_file() && m.len() == 0) {
        return Err(not_onnx("the file is empty", None));
    }
    let proto = tract_onnx::onnx().proto_model_for_read(&mut file).map_err(|e| {
        // Reading fails with an I/O error (a directory, say); anything else is the decoder's.
        match e.downcast_ref::<std::io::Error>() {
            Some(io) => read_error(io.to_string()),
            None => not_onnx("it does not decode as a protobuf ModelProto", Some(e)),
        }
    })?;
    if proto.graph.is_none() {
        return Err(not_onnx("it decodes as a protobuf ModelProto without a graph", None));
    }
    Ok(proto)
}

/// Imports an ONNX file into a graph of runtime ops.
///
/// # Errors
/// [`ImportError::Read`] or [`ImportError::NotOnnx`] from [`read_model_proto`], and
/// [`ImportError::Unsupported`], which lists every unsupported op at once.
pub fn import(path: &Path, options: &ImportOptions) -> Result<Graph, ImportError> {
    let read_error = |message: String| ImportError::Read { path: path.to_owned(), message };
    let proto = read_model_proto(path)?;
    let graph = proto.graph.as_ref().expect("read_model_proto rejects a model without a graph");
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(13, |o| o.version);
    let model_dir = path.parent().unwrap_or(Path::new(".")).to_owned();

    let mut imp = Importer {
        graph: Graph::default(),
        vals: HashMap::new(),
        materialized: HashMap::new(),
        symbols: HashMap::new(),
        options: options.clone(),
        opset,
        generated: 0,
        declared_types: HashMap::new(),
    };
    let infos = graph.input.iter().chain(&graph.value_info).chain(&graph.output);
    for info in infos {
        if let Some((code, _)) = proto::value_type(info) {
            imp.declared_types.insert(info.name.clone(), code);
        }
    }
    for init in &graph.initializer {
        let t = proto::tensor(init, &model_dir).map_err(|m| ImportError::Invalid {
            path: path.to_owned(),
            node: init.name.clone(),
            op_type: "initializer".into(),
            message: m,
        })?;
        imp.vals.insert(init.name.clone(), Val::Const(t));
        imp.declared_types.insert(init.name.clone(), init.data_type);
    }
    let mut unsupported: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for input in &graph.input {
        if imp.vals.contains_key(&input.name) {
            continue; // an initializer listed as an input (older exporters)
        }
        match imp.add_graph_input(input) {
            Ok(()) => {}
            Err(NodeError::Unsupported(why)) => {
                unsupported
                    .entry(format!("graph input ({why})"))
                    .or_default()
                    .push(input.name.clone());
                imp.vals.insert(input.name.clone(), Val::Poisoned);
            }
            Err(NodeError::Invalid(message)) => {
                return Err(ImportError::Invalid {
                    path: path.to_owned(),
                    node: input.name.clone(),
                    op_type: "graph input".into(),
                    message,
                })
            }
        }
    }

    for (i, node) in graph.node.iter().enumerate() {
        let name = node_name(node, i);
        let op_key = if node.domain.is_empty() || node.domain == "ai.onnx" {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        };
        let known = lower::SUPPORTED.contains(&op_key.as_str());
        if !known {
            unsupported.entry(op_key).or_default().push(name);
            imp.poison(node);
            continue;
        }
        if node.input.iter().any(|n| matches!(imp.vals.get(n), Some(Val::Poisoned))) {
            imp.poison(node);
            continue;
        }
        match imp.node(node, &name, &model_dir) {
            Ok(()) => {}
            Err(NodeError::Unsupported(why)) => {
                unsupported.entry(format!("{op_key} ({why})")).or_default().push(name);
                imp.poison(node);
            }
            Err(NodeError::Invalid(message)) => {
                return Err(ImportError::Invalid {
                    path: path.to_owned(),
                    node: name,
                    op_type: node.op_type.clone(),
                    message,
                })
            }
        }
    }
    if !unsupported.is_empty() {
        return Err(ImportError::Unsupported { path: path.to_owned(), ops: unsupported });
    }

    for output in &graph.output {
        let id = match imp.vals.get(&output.name).cloned() {
            Some(Val::Runtime(id)) => id,
            Some(Val::Const(c)) => match imp.materialize_output(&output.name, c) {
                Ok(id) => id,
                Err(NodeError::Unsupported(why)) => {
                    let ops = BTreeMap::from([(
                        format!("graph output ({why})"),
                        vec![output.name.clone()],
                    )]);
                    return Err(ImportError::Unsupported { path: path.to_owned(), ops });
                }
                Err(NodeError::Invalid(message)) => {
                    return Err(ImportError::Invalid {
                        path: path.to_owned(),
                        node: output.name.clone(),
                        op_type: "graph output".into(),
                        message,
                    })
                }
            },
            _ => return Err(read_error(format!("graph output {} is never produced", output.name))),
        };
        let id = imp.name_output(&output.name, id);
        imp.graph.outputs.push(id);
    }
    let mut graph = imp.graph;
    graph.prune();
    Ok(graph)
}

/// The empty tensor of a declared shape with an extent of 0 and no variable extents.
fn empty_tensor(dims: &[proto::DimSpec], dtype: DType) -> Option<ConstTensor> {
    let mut shape = Vec::with_capacity(dims.len());
    for d in dims {
        match d {
            proto::DimSpec::Fixed(v) => shape.push(*v as usize),
            proto::DimSpec::Empty => shape.push(0),
            _ => return None,
        }
    }
    if !shape.contains(&0) {
        return None;
    }
    Some(match dtype {
        DType::F32 => ConstTensor::F32 { shape, data: Vec::new() },
        _ => ConstTensor::Int { shape, data: Vec::new(), dtype },
    })
}

fn node_name(node: &NodeProto, index: usize) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(o) = node.output.first() {
        format!("{}#{}", node.op_type, o)
    } else {
        format!("{}#{index}", node.op_type)
    }
}

impl Importer {
    fn add_graph_input(&mut self, input: &tract_onnx::pb::ValueInfoProto) -> NodeResult<()> {
        let unsupported = |why: String| NodeError::Unsupported(why);
        let (elem, dims) = proto::value_type(input)
            .ok_or_else(|| unsupported("a sequence, map or optional instead of a tensor".into()))?;
        let dtype = proto::dtype_of(elem)
            .ok_or_else(|| unsupported(format!("element type {}", proto::type_name(elem))))?;
        if let Some(empty) = empty_tensor(&dims, dtype) {
            // An input declared with an extent of 0 can only be the empty tensor, so it is that
            // constant and not an input of the packed model.
            // NOTE: an exporter that writes 0 for an unknown extent gets a constant here, and
            // usually an "empty constant tensor" rejection from the first op that computes on it.
            self.vals.insert(input.name.clone(), Val::Const(empty));
            return Ok(());
        }
        let mut shape = Vec::new();
        for (axis, d) in dims.iter().enumerate() {
            let name = match d {
                proto::DimSpec::Fixed(v) => {
                    shape.push(Dim::constant(*v));
                    continue;
                }
                proto::DimSpec::Empty => {
                    return Err(unsupported(format!(
                        "axis {axis} of extent 0 beside variable extents (empty tensors)"
                    )))
                }
                proto::DimSpec::Named(n) => n.clone(),
                proto::DimSpec::Unknown => format!("{}_axis{axis}", input.name),
            };
            let max = if axis == 0 { self.options.max_batch } else { self.options.max_seq };
            shape.push(Dim::symbol(self.symbol(&name, max).map_err(NodeError::Invalid)?));
        }
        let id = self.graph.add_value(Value { name: input.name.clone(), dtype, shape, data: None });
        self.graph.inputs.push(id);
        self.vals.insert(input.name.clone(), Val::Runtime(id));
        Ok(())
    }

    fn symbol(&mut self, name: &str, max: u32) -> Result<usize, String> {
        if let Some(&s) = self.symbols.get(name) {
            return Ok(s);
        }
        let index = self.graph.symbols.len();
        if index >= MAX_SYMBOLS {
            return Err(format!(
                "more than {MAX_SYMBOLS} variable dimensions; fix some in the model's input shapes"
            ));
        }
        self.graph.symbols.push(Symbol { name: name.to_owned(), max });
        self.symbols.insert(name.to_owned(), index);
        Ok(index)
    }

    /// Copies a constant that is a graph output into an activation, because the runtime only
    /// returns activations.
    fn materialize_output(&mut self, name: &str, value: ConstTensor) -> NodeResult<ValueId> {
        let source = self.value_id(&Val::Const(value), &format!("{name}.constant"))?;
        Ok(self.copy_output(name, source))
    }

    /// Names the value of graph output `name` after it and returns that value. The packed file
    /// names each output by its tensor, but an Identity node lowers to its input's value and name.
    /// An intermediate value is renamed, and a graph input or an earlier output, whose names must
    /// stay, is copied.
    fn name_output(&mut self, name: &str, id: ValueId) -> ValueId {
        if self.graph.values[id].name == name {
            return id;
        }
        let is_io =
            |graph: &Graph, v: ValueId| graph.inputs.contains(&v) || graph.outputs.contains(&v);
        // An importer-made name such as `{node}.{suffix}` can equal an ONNX tensor name.
        if let Some(holder) = self.graph.values.iter().position(|v| v.name == name) {
            if !is_io(&self.graph, holder) {
                self.graph.values[holder].name = self.unique_name(name);
            }
        }
        if is_io(&self.graph, id) {
            return self.copy_output(name, id);
        }
        self.graph.values[id].name = self.unique_name(name);
        id
    }

    /// Adds a Reshape to the same shape that copies `source` into a new activation named `name`.
    fn copy_output(&mut self, name: &str, source: ValueId) -> ValueId {
        let (dtype, shape) =
            (self.graph.values[source].dtype, self.graph.values[source].shape.clone());
        let out = self.activation(name, dtype, shape);
        self.graph.nodes.push(crate::ir::Node {
            name: name.to_owned(),
            op: edgefold_runtime::ops::Op::Reshape,
            inputs: vec![Some(source)],
            outputs: vec![out],
        });
        out
    }

    fn poison(&mut self, node: &NodeProto) {
        for o in &node.output {
            self.vals.insert(o.clone(), Val::Poisoned);
        }
    }

    fn node(&mut self, node: &NodeProto, name: &str, model_dir: &Path) -> NodeResult<()> {
        let inputs: Vec<Option<Val>> = node
            .input
            .iter()
            .map(|n| if n.is_empty() { Ok(None) } else { self.get(n).map(Some) })
            .collect::<NodeResult<_>>()?;
        let all_const = inputs.iter().flatten().all(|v| matches!(v, Val::Const(_)));
        if all_const {
            let consts: Vec<Option<&ConstTensor>> = inputs
                .iter()
                .map(|v| match v {
                    Some(Val::Const(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if let Some(outputs) = fold::fold(node, &consts, self.opset, model_dir)? {
                for (o, t) in node.output.iter().zip(outputs) {
                    self.vals.insert(o.clone(), Val::Const(t));
                }
                return Ok(());
            }
        }
        let outputs = lower::lower(self, node, name, &inputs)?;
        for (o, v) in node.output.iter().zip(outputs) {
            if !o.is_empty() {
                self.vals.insert(o.clone(), v);
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> NodeResult<Val> {
        self.vals
            .get(name)
            .cloned()
            .ok_or_else(|| NodeError::Invalid(format!("input {name} is never defined")))
    }

    /// Returns the id of a runtime value, adding a constant to the graph when `val` is one.
    pub(crate) fn value_id(&mut self, val: &Val, hint: &str) -> NodeResult<ValueId> {
        match val {
            Val::Runtime(id) => Ok(*id),
            Val::Poisoned => invalid("input comes from an unsupported node"),
            Val::Const(c) => {
                let storage = match c {
                    ConstTensor::F32 { data, .. } => Storage::F32(data.clone()),
                    ConstTensor::Int { data, dtype, .. } => {
                        let ints: Option<Vec<i64>> = data.iter().map(|v| v.as_int()).collect();
                        let ints = ints.ok_or_else(|| {
                            NodeError::Unsupported("a symbolic shape value used as data".into())
                        })?;
                        match dtype {
                            DType::Bool | DType::U8 => {
                                Storage::Bool(ints.iter().map(|&v| (v != 0) as u8).collect())
                            }
                            DType::I32 => Storage::I32(ints.iter().map(|&v| v as i32).collect()),
                            _ => Storage::I64(ints),
                        }
                    }
                };
                let shape = c.shape().to_vec();
                if shape.contains(&0) {
                    return Err(NodeError::Unsupported("an empty constant tensor".into()));
                }
                if let Some(&id) = self.materialized.get(hint) {
                    if self.graph.values[id].data.as_ref() == Some(&storage) {
                        return Ok(id);
                    }
                }
                let name = self.unique_name(hint);
                let id = self.graph.add_const(name, shape, storage);
                self.materialized.insert(hint.to_owned(), id);
                Ok(id)
            }
        }
    }

    /// Adds an activation value.
    pub(crate) fn activation(&mut self, name: &str, dtype: DType, shape: Vec<Dim>) -> ValueId {
        let name = self.unique_name(name);
        self.graph.add_value(Value { name, dtype, shape, data: None })
    }

    pub(crate) fn unique_name(&mut self, base: &str) -> String {
        if self.graph.values.iter().all(|v| v.name != base) {
            return base.to_owned();
        }
        self.generated += 1;
        format!("{base}.{}", self.generated)
    }

    /// Returns the ONNX element type that the file declares for value `name`, if any.
    pub(crate) fn declared_type(&self, name: &str) -> Option<i32> {
        self.declared_types.get(name).copied()
    }

    pub(crate) fn opset(&self) -> i64 {
        self.opset
    }
}
