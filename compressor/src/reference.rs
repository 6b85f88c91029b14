//! Reference runs of an original ONNX model through tract: the outputs that a compressed model is
//! compared against.
//!
//! [`ReferenceModel::load`] parses and optimizes the file once, keeping batch and sequence
//! dimensions symbolic so that later runs with other shapes reuse the same plan. Both models the
//! project targets first (sentence-transformers all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2) stay
//! symbolic with tract-onnx 0.23.9, which the tests check. A model that tract cannot optimize with
//! symbolic dimensions falls back to one plan per distinct set of input shapes, kept in a small
//! cache.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{DimFact, Factoid, GenericFactoid, ShapeFactoid};
use tract_onnx::tract_hir::ops::unimpl::UnimplementedOp;

use crate::tensor::{HostTensor, TensorData};

/// Maximum number of per-shape plans kept for a model that cannot stay symbolic. Each plan contains
/// its own optimized (repacked) copy of the weights, so this bounds memory to a few model sizes.
const SHAPE_CACHE_CAPACITY: usize = 4;

/// Prefix of the tract symbols given to input dimensions that the file leaves unknown.
const UNKNOWN_DIM_PREFIX: &str = "unknown_dim";

/// Errors from loading or running a reference model. Every message names the model file.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReferenceError {
    /// The model file could not be read.
    Read {
        /// Model file.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not an ONNX model: its bytes are not a protobuf `ModelProto` with a graph.
    NotOnnx(crate::onnx::NotOnnxError),
    /// tract could not parse the file as ONNX or translate it into a graph.
    Parse {
        /// Model file.
        path: PathBuf,
        /// tract's error chain.
        detail: String,
    },
    /// The graph contains operators that tract-onnx does not implement.
    UnsupportedOps {
        /// Model file.
        path: PathBuf,
        /// Each unsupported node as `node name (operator)`.
        nodes: Vec<String>,
    },
    /// tract could not type or optimize the graph.
    Optimize {
        /// Model file.
        path: PathBuf,
        /// Input shapes the graph was specialized to, or `None` for the symbolic graph.
        shapes: Option<Vec<Vec<usize>>>,
        /// tract's error chain.
        detail: String,
    },
    /// A graph input has an element type that [`HostTensor`] cannot carry.
    UnsupportedInputType {
        /// Model file.
        path: PathBuf,
        /// Input name.
        input: String,
        /// tract's name of the element type.
        datum_type: String,
    },
    /// `run` received a different number of tensors than the graph has inputs.
    InputCount {
        /// Model file.
        path: PathBuf,
        /// Names of the graph inputs, in order.
        expected: Vec<String>,
        /// Number of tensors received.
        actual: usize,
    },
    /// An input tensor's element type differs from the one the graph declares.
    InputType {
        /// Model file.
        path: PathBuf,
        /// Input name.
        input: String,
        /// Element type the graph declares.
        expected: &'static str,
        /// Element type received.
        actual: &'static str,
    },
    /// An input tensor's shape does not fit the graph or the other inputs.
    InputShape {
        /// Model file.
        path: PathBuf,
        /// Input name.
        input: String,
        /// Shape received.
        actual: Vec<usize>,
        /// The constraint that the shape violates.
        expected: String,
    },
    /// tract failed while running the graph.
    Run {
        /// Model file.
        path: PathBuf,
        /// tract's error chain.
        detail: String,
    },
    /// A graph output has an element type that [`HostTensor`] cannot carry.
    UnsupportedOutputType {
        /// Model file.
        path: PathBuf,
        /// Output name.
        output: String,
        /// tract's name of the element type.
        datum_type: String,
    },
}

impl fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, source } => {
                write!(f, "failed to read ONNX model {}: {source}", path.display())
            }
            Self::NotOnnx(e) => write!(f, "{e}"),
            Self::Parse { path, detail } => {
                write!(f, "failed to load ONNX model {}: {detail}", path.display())
            }
            Self::UnsupportedOps { path, nodes } => write!(
                f,
                "{}: tract-onnx does not implement the operators of {} node(s): {}",
                path.display(),
                nodes.len(),
                nodes.join(", ")
            ),
            Self::Optimize { path, shapes: None, detail } => {
                write!(f, "tract failed to optimize {}: {detail}", path.display())
            }
            Self::Optimize { path, shapes: Some(shapes), detail } => write!(
                f,
                "tract failed to optimize {} for input shapes {shapes:?}: {detail}",
                path.display()
            ),
            Self::UnsupportedInputType { path, input, datum_type } => write!(
                f,
                "{}: input `{input}` has element type {datum_type}, but only f32, i64, i32 and \
                 bool inputs are supported",
                path.display()
            ),
            Self::InputCount { path, expected, actual } => write!(
                f,
                "{}: expected {} input tensors ({}), got {actual}",
                path.display(),
                expected.len(),
                expected.join(", ")
            ),
            Self::InputType { path, input, expected, actual } => write!(
                f,
                "{}: input `{input}` must have element type {expected}, got {actual}",
                path.display()
            ),
            Self::InputShape { path, input, actual, expected } => write!(
                f,
                "{}: input `{input}` has invalid shape {actual:?}: expected {expected}",
                path.display()
            ),
            Self::Run { path, detail } => {
                write!(f, "tract failed to run {}: {detail}", path.display())
            }
            Self::UnsupportedOutputType { path, output, datum_type } => write!(
                f,
                "{}: output `{output}` has element type {datum_type}, but only f32, i64, i32 and \
                 bool outputs are supported",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ReferenceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Display prints the inner error itself, so its cause is the next in the chain.
            Self::NotOnnx(e) => std::error::Error::source(e),
            // Display prints the I/O error of `Read`, so it is not repeated as a cause.
            _ => None,
        }
    }
}

/// An original ONNX model loaded into tract, ready to produce reference outputs.
///
/// `run` takes `&self`, so one loaded model can serve several threads.
pub struct ReferenceModel {
    path: PathBuf,
    input_names: Vec<String>,
    output_names: Vec<String>,
    /// Element type of each input, as declared by the file (`None` when it declares none).
    input_types: Vec<Option<DatumType>>,
    plans: Plans,
}

/// Optimized plans of a [`ReferenceModel`].
enum Plans {
    /// One plan whose input dimensions stay symbolic.
    Symbolic(Arc<TypedRunnableModel>),
    /// The parsed graph, optimized again for each distinct set of input shapes.
    PerShape { model: Box<InferenceModel>, cache: Mutex<ShapeCache> },
}

/// Plans keyed by input shapes, oldest first.
#[derive(Default)]
struct ShapeCache {
    entries: VecDeque<(Vec<Vec<usize>>, Arc<TypedRunnableModel>)>,
}

impl ShapeCache {
    fn get(&self, shapes: &[Vec<usize>]) -> Option<Arc<TypedRunnableModel>> {
        self.entries.iter().find(|(key, _)| key == shapes).map(|(_, plan)| plan.clone())
    }

    fn insert(&mut self, shapes: Vec<Vec<usize>>, plan: Arc<TypedRunnableModel>) {
        if self.entries.iter().any(|(key, _)| *key == shapes) {
            return;
        }
        if self.entries.len() == SHAPE_CACHE_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back((shapes, plan));
    }
}

/// Reads the ONNX file at `path` into tract's graph, as tract's `model_for_path` does, but with
/// the importer's checks of what the file contains. A file of another kind is then named as
/// such instead of getting tract's decoding error alone.
fn parse_model(path: &Path) -> Result<InferenceModel, ReferenceError> {
    use crate::onnx::{read_model_proto, ImportError};

    let parse_error = |detail: String| ReferenceError::Parse { path: path.to_owned(), detail };
    let proto = read_model_proto(path).map_err(|e| match e {
        ImportError::NotOnnx(e) => ReferenceError::NotOnnx(e),
        ImportError::Read { message, .. } => parse_error(message),
        other => parse_error(other.to_string()),
    })?;
    // External tensor data is looked for beside the model, as `model_for_path` does.
    let model_dir = path.parent().and_then(Path::to_str);
    let parsed = tract_onnx::onnx().parse(&proto, model_dir).map_err(|e| parse_error(chain(&e)))?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(parse_error(format!(
            "inputs {:?} are used but never defined",
            parsed.unresolved_inputs
        )));
    }
    Ok(parsed.model)
}

impl ReferenceModel {
    /// Loads and optimizes an ONNX file once, with symbolic dimensions kept symbolic, so batch and
    /// sequence length can vary between runs without optimizing again.
    ///
    /// Input dimensions that the file names (`dim_param`) or leaves unknown become tract symbols.
    /// When tract cannot optimize the graph with symbolic dimensions, the model falls back to
    /// optimizing once per distinct set of input shapes and keeps the last few plans. The
    /// fallback is logged as a warning.
    ///
    /// # Errors
    /// Returns [`ReferenceError::Read`] or [`ReferenceError::Parse`] when the file cannot be read
    /// or parsed, [`ReferenceError::NotOnnx`] when its bytes are not an ONNX model,
    /// [`ReferenceError::UnsupportedOps`] when tract-onnx lacks operators the graph
    /// uses, and [`ReferenceError::UnsupportedInputType`] for inputs of other element types than
    /// f32, i64, i32 and bool.
    pub fn load(path: &Path) -> Result<Self, ReferenceError> {
        Self::load_with(path, true)
    }

    /// Loads like [`load`](Self::load). With `try_symbolic` false, the model goes straight to one
    /// plan per set of input shapes, which lets tests exercise that path on real models.
    fn load_with(path: &Path, try_symbolic: bool) -> Result<Self, ReferenceError> {
        std::fs::metadata(path)
            .map_err(|source| ReferenceError::Read { path: path.to_owned(), source })?;
        if crate::onnx::is_packed_file(path) {
            // The caller adds the advice that fits its command.
            let detail = "it is a packed .fold file, not ONNX".to_owned();
            return Err(ReferenceError::Parse { path: path.to_owned(), detail });
        }
        let mut model = parse_model(path)?;
        check_ops_implemented(path, &model)?;

        let input_names = input_names(path, &model)?;
        let output_names = output_names(path, &model)?;
        let input_types = input_types(path, &model, &input_names)?;
        log::info!(
            "loaded reference model {}: inputs {input_names:?}, outputs {output_names:?}",
            path.display()
        );

        symbolize_unknown_dims(path, &mut model)?;
        let symbolic = if try_symbolic { Some(optimize(model.clone())) } else { None };
        let plans = match symbolic {
            Some(Ok(plan)) => {
                log::debug!("{}: optimized with symbolic input dimensions", path.display());
                Plans::Symbolic(plan)
            }
            Some(Err(e)) => {
                log::warn!(
                    "{}: tract cannot optimize with symbolic input dimensions ({}), so the model \
                     will be optimized again for each distinct set of input shapes",
                    path.display(),
                    chain(&e)
                );
                Plans::PerShape { model: Box::new(model), cache: Mutex::new(ShapeCache::default()) }
            }
            None => {
                Plans::PerShape { model: Box::new(model), cache: Mutex::new(ShapeCache::default()) }
            }
        };

        Ok(ReferenceModel { path: path.to_owned(), input_names, output_names, input_types, plans })
    }

    /// Names of the graph inputs, in the order `run` expects them.
    pub fn input_names(&self) -> &[String] {
        &self.input_names
    }

    /// Names of the graph outputs, in the order `run` returns them.
    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// Returns true when one plan with symbolic input dimensions serves every input shape, and
    /// false when the model is optimized again for each distinct set of input shapes.
    pub fn has_symbolic_dims(&self) -> bool {
        matches!(self.plans, Plans::Symbolic(_))
    }

    /// Runs the model on `inputs`, given in the order of [`input_names`](Self::input_names), and
    /// returns every graph output in the order of [`output_names`](Self::output_names).
    ///
    /// # Errors
    /// Returns [`ReferenceError::InputCount`], [`ReferenceError::InputType`] or
    /// [`ReferenceError::InputShape`] when the inputs do not match the graph,
    /// [`ReferenceError::Optimize`] when a per-shape plan cannot be built,
    /// [`ReferenceError::Run`] when tract fails, and [`ReferenceError::UnsupportedOutputType`]
    /// for outputs of other element types than f32, i64, i32 and bool.
    pub fn run(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, ReferenceError> {
        self.check_inputs(inputs)?;
        let plan = self.plan_for(inputs)?;

        let mut values = TVec::with_capacity(inputs.len());
        for (input, name) in inputs.iter().zip(&self.input_names) {
            values.push(self.convert_input(input, name)?.into_tvalue());
        }
        let outputs = plan.run(values).map_err(|e| self.run_error(&e))?;

        outputs
            .iter()
            .zip(&self.output_names)
            .map(|(value, name)| self.convert_output(value, name))
            .collect()
    }

    /// Checks the input count, element types and shapes against the graph, so that a mismatch
    /// gets an error naming the input instead of failing deep inside tract.
    fn check_inputs(&self, inputs: &[HostTensor]) -> Result<(), ReferenceError> {
        if inputs.len() != self.input_names.len() {
            return Err(ReferenceError::InputCount {
                path: self.path.clone(),
                expected: self.input_names.clone(),
                actual: inputs.len(),
            });
        }

        for ((input, name), declared) in inputs.iter().zip(&self.input_names).zip(&self.input_types)
        {
            let actual = host_type_name(&input.data);
            if let Some(declared) = declared {
                let expected = type_name(*declared).expect("input types are checked at load");
                if expected != actual {
                    return Err(ReferenceError::InputType {
                        path: self.path.clone(),
                        input: name.clone(),
                        expected,
                        actual,
                    });
                }
            }
            let length = data_len(&input.data);
            if input.shape.iter().product::<usize>() != length {
                return Err(self.shape_error(
                    name,
                    input,
                    format!("a shape with {length} elements, the length of its data"),
                ));
            }
        }

        if let Plans::Symbolic(plan) = &self.plans {
            self.check_symbolic_shapes(plan.model(), inputs)?;
        }
        Ok(())
    }

    /// Checks ranks and fixed dimensions, and that every symbol takes one value across inputs.
    fn check_symbolic_shapes(
        &self,
        model: &TypedModel,
        inputs: &[HostTensor],
    ) -> Result<(), ReferenceError> {
        let mut bound: HashMap<Symbol, (usize, &str)> = HashMap::new();

        for (ix, (input, name)) in inputs.iter().zip(&self.input_names).enumerate() {
            let fact = model.input_fact(ix).map_err(|e| self.run_error(&e))?;
            let dims = fact.shape.dims();
            if dims.len() != input.shape.len() {
                let expected = format!("rank {} ({})", dims.len(), format_dims(dims));
                return Err(self.shape_error(name, input, expected));
            }

            for (axis, (dim, &size)) in dims.iter().zip(&input.shape).enumerate() {
                match dim {
                    TDim::Sym(symbol) => match bound.get(symbol) {
                        Some(&(value, first)) if value != size => {
                            let expected = format!(
                                "axis {axis} ({symbol}) to be {value} as in input `{first}`"
                            );
                            return Err(self.shape_error(name, input, expected));
                        }
                        Some(_) => {}
                        None => {
                            bound.insert(symbol.clone(), (size, name));
                        }
                    },
                    _ => {
                        if let Ok(fixed) = dim.to_i64() {
                            if fixed != size as i64 {
                                let expected = format!("axis {axis} to be {fixed}");
                                return Err(self.shape_error(name, input, expected));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Returns the plan for these inputs, optimizing and caching one when the model is per-shape.
    fn plan_for(&self, inputs: &[HostTensor]) -> Result<Arc<TypedRunnableModel>, ReferenceError> {
        let (model, cache) = match &self.plans {
            Plans::Symbolic(plan) => return Ok(plan.clone()),
            Plans::PerShape { model, cache } => (model, cache),
        };

        let shapes: Vec<Vec<usize>> = inputs.iter().map(|input| input.shape.clone()).collect();
        if let Some(plan) = lock(cache).get(&shapes) {
            return Ok(plan);
        }

        // The lock is released while optimizing so that runs with cached shapes are not blocked.
        // Two threads missing on the same shapes both optimize, and the second insert is dropped.
        log::debug!("{}: optimizing for input shapes {shapes:?}", self.path.display());
        let optimize_error = |e: &TractError| ReferenceError::Optimize {
            path: self.path.clone(),
            shapes: Some(shapes.clone()),
            detail: chain(e),
        };
        let mut concrete = InferenceModel::clone(model);
        for (ix, input) in inputs.iter().enumerate() {
            let fact = InferenceFact::dt_shape(host_datum_type(&input.data), &*input.shape);
            concrete.set_input_fact(ix, fact).map_err(|e| optimize_error(&e))?;
        }
        let plan = optimize(concrete).map_err(|e| optimize_error(&e))?;

        lock(cache).insert(shapes, plan.clone());
        Ok(plan)
    }

    fn convert_input(&self, input: &HostTensor, name: &str) -> Result<Tensor, ReferenceError> {
        let shape = &input.shape;
        let tensor = match &input.data {
            TensorData::F32(values) => Tensor::from_shape(shape, values),
            TensorData::I64(values) => Tensor::from_shape(shape, values),
            TensorData::I32(values) => Tensor::from_shape(shape, values),
            TensorData::Bool(values) => Tensor::from_shape(shape, values),
        };
        tensor.map_err(|e| self.shape_error(name, input, chain(&e)))
    }

    fn convert_output(&self, value: &TValue, name: &str) -> Result<HostTensor, ReferenceError> {
        let tensor: &Tensor = value;
        let shape = tensor.shape().to_vec();
        let data = match tensor.datum_type() {
            DatumType::F32 => TensorData::F32(self.copy_elements(tensor)?),
            // tract computes some integer outputs as shape expressions (TDim); they convert to
            // i64 exactly when they are concrete, which they are after a run.
            DatumType::I64 | DatumType::TDim => {
                let cast = tensor.cast_to::<i64>().map_err(|e| self.run_error(&e))?;
                TensorData::I64(self.copy_elements(&cast)?)
            }
            DatumType::I32 => TensorData::I32(self.copy_elements(tensor)?),
            DatumType::Bool => TensorData::Bool(self.copy_elements(tensor)?),
            other => {
                return Err(ReferenceError::UnsupportedOutputType {
                    path: self.path.clone(),
                    output: name.to_owned(),
                    datum_type: format!("{other:?}"),
                })
            }
        };
        Ok(HostTensor { shape, data })
    }

    fn copy_elements<T: Datum + Copy>(&self, tensor: &Tensor) -> Result<Vec<T>, ReferenceError> {
        let view = tensor.try_as_plain_ram().map_err(|e| self.run_error(&e))?;
        let elements = view.as_slice::<T>().map_err(|e| self.run_error(&e))?;
        Ok(elements.to_vec())
    }

    fn shape_error(&self, name: &str, input: &HostTensor, expected: String) -> ReferenceError {
        ReferenceError::InputShape {
            path: self.path.clone(),
            input: name.to_owned(),
            actual: input.shape.clone(),
            expected,
        }
    }

    fn run_error(&self, error: &TractError) -> ReferenceError {
        ReferenceError::Run { path: self.path.clone(), detail: chain(error) }
    }
}

impl fmt::Debug for ReferenceModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReferenceModel")
            .field("path", &self.path)
            .field("input_names", &self.input_names)
            .field("output_names", &self.output_names)
            .field("symbolic_dims", &self.has_symbolic_dims())
            .finish()
    }
}

/// Lists every node whose operator tract-onnx does not implement, in one error.
fn check_ops_implemented(path: &Path, model: &InferenceModel) -> Result<(), ReferenceError> {
    let nodes: Vec<String> = model
        .nodes()
        .iter()
        .filter(|node| node.op_is::<UnimplementedOp>())
        .map(|node| format!("{} ({})", node.name, node.op().name()))
        .collect();
    if nodes.is_empty() {
        Ok(())
    } else {
        Err(ReferenceError::UnsupportedOps { path: path.to_owned(), nodes })
    }
}

/// Reads the input names; tract names each ONNX graph input's source node after it.
fn input_names(path: &Path, model: &InferenceModel) -> Result<Vec<String>, ReferenceError> {
    let outlets = model.input_outlets().map_err(|e| parse_error(path, &e))?;
    Ok(outlets.iter().map(|outlet| model.node(outlet.node).name.clone()).collect())
}

/// Reads the output names, which tract stores as labels of the output outlets.
fn output_names(path: &Path, model: &InferenceModel) -> Result<Vec<String>, ReferenceError> {
    let outlets = model.output_outlets().map_err(|e| parse_error(path, &e))?;
    Ok(outlets
        .iter()
        .map(|&outlet| match model.outlet_label(outlet) {
            Some(label) => label.to_owned(),
            None => model.node(outlet.node).name.clone(),
        })
        .collect())
}

fn input_types(
    path: &Path,
    model: &InferenceModel,
    names: &[String],
) -> Result<Vec<Option<DatumType>>, ReferenceError> {
    let mut types = Vec::with_capacity(names.len());
    for (ix, name) in names.iter().enumerate() {
        let fact = model.input_fact(ix).map_err(|e| parse_error(path, &e))?;
        let declared = fact.datum_type.concretize();
        if let Some(datum_type) = declared {
            if type_name(datum_type).is_none() {
                return Err(ReferenceError::UnsupportedInputType {
                    path: path.to_owned(),
                    input: name.clone(),
                    datum_type: format!("{datum_type:?}"),
                });
            }
        }
        types.push(declared);
    }
    Ok(types)
}

/// Gives a fresh tract symbol to every input dimension of known rank that the file leaves
/// unknown. Named dimensions (`dim_param`) are already symbols after parsing.
fn symbolize_unknown_dims(path: &Path, model: &mut InferenceModel) -> Result<(), ReferenceError> {
    for ix in 0..model.input_outlets().map_err(|e| parse_error(path, &e))?.len() {
        let fact = model.input_fact(ix).map_err(|e| parse_error(path, &e))?.clone();
        if fact.shape.is_open() || fact.shape.dims().all(|dim| dim.concretize().is_some()) {
            continue;
        }

        let dims: TVec<DimFact> = fact
            .shape
            .dims()
            .map(|dim| match dim {
                GenericFactoid::Only(_) => dim.clone(),
                GenericFactoid::Any => {
                    GenericFactoid::Only(model.symbols.new_with_prefix(UNKNOWN_DIM_PREFIX).into())
                }
            })
            .collect();
        let fact = fact.with_shape(ShapeFactoid::closed(dims));
        model.set_input_fact(ix, fact).map_err(|e| parse_error(path, &e))?;
    }
    Ok(())
}

fn optimize(model: InferenceModel) -> TractResult<Arc<TypedRunnableModel>> {
    model.into_optimized()?.into_runnable()
}

fn lock(cache: &Mutex<ShapeCache>) -> std::sync::MutexGuard<'_, ShapeCache> {
    // A panic while the lock was held cannot leave the cache inconsistent: each mutation is a
    // single push or pop.
    cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn parse_error(path: &Path, error: &TractError) -> ReferenceError {
    ReferenceError::Parse { path: path.to_owned(), detail: chain(error) }
}

/// Formats an error with its causes, outermost first.
fn chain(error: &TractError) -> String {
    format!("{error:#}")
}

/// Returns the [`TensorData`] variant name for a tract element type, or `None` when unsupported.
fn type_name(datum_type: DatumType) -> Option<&'static str> {
    match datum_type {
        DatumType::F32 => Some("f32"),
        DatumType::I64 => Some("i64"),
        DatumType::I32 => Some("i32"),
        DatumType::Bool => Some("bool"),
        _ => None,
    }
}

fn host_type_name(data: &TensorData) -> &'static str {
    match data {
        TensorData::F32(_) => "f32",
        TensorData::I64(_) => "i64",
        TensorData::I32(_) => "i32",
        TensorData::Bool(_) => "bool",
    }
}

fn host_datum_type(data: &TensorData) -> DatumType {
    match data {
        TensorData::F32(_) => DatumType::F32,
        TensorData::I64(_) => DatumType::I64,
        TensorData::I32(_) => DatumType::I32,
        TensorData::Bool(_) => DatumType::Bool,
    }
}

fn data_len(data: &TensorData) -> usize {
    match data {
        TensorData::F32(values) => values.len(),
        TensorData::I64(values) => values.len(),
        TensorData::I32(values) => values.len(),
        TensorData::Bool(values) => values.len(),
    }
}

fn format_dims(dims: &[TDim]) -> String {
    let dims: Vec<String> = dims.iter().map(|dim| dim.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/reference");
    const L6_MODEL: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/models/all-MiniLM-L6-v2-fp32.onnx");
    const L3_MODEL: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../models/paraphrase-MiniLM-L3-v2/model.onnx");

    /// Maximum absolute difference allowed between tract and onnxruntime outputs.
    const TOLERANCE: f32 = 1e-4;

    /// Fixture cases written by make.py: a padded batch of two (sequence 9) and one sentence
    /// (sequence 13).
    const CASES: [&str; 2] = ["batch2", "single"];

    /// Reads a C-order, little-endian .npy file of f32, i64, i32 or bool from the fixtures.
    fn read_npy(name: &str) -> HostTensor {
        let path = format!("{FIXTURES}/{name}.npy");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        assert_eq!(&bytes[..6], b"\x93NUMPY", "{path}: not an .npy file");

        let (header_len, header_start) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
            version => panic!("{path}: unsupported .npy version {version}"),
        };
        let header = std::str::from_utf8(&bytes[header_start..header_start + header_len]).unwrap();
        let body = &bytes[header_start + header_len..];
        assert!(header.contains("'fortran_order': False"), "{path}: not C order: {header}");

        let descr = header.split("'descr': '").nth(1).unwrap().split('\'').next().unwrap();
        let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
        let shape: Vec<usize> = shape_text
            .split(',')
            .map(str::trim)
            .filter(|dim| !dim.is_empty())
            .map(|dim| dim.parse().unwrap())
            .collect();

        let data = match descr {
            "<f4" => TensorData::F32(
                body.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            "<i8" => TensorData::I64(
                body.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            "<i4" => TensorData::I32(
                body.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            "|b1" => TensorData::Bool(body.iter().map(|&b| b != 0).collect()),
            other => panic!("{path}: unsupported dtype {other}"),
        };
        let tensor = HostTensor { shape, data };
        assert_eq!(data_len(&tensor.data), tensor.len(), "{path}: data length mismatch");
        tensor
    }

    /// Returns the model at `path`, loaded once per test binary, or `None` (after printing why)
    /// when the file is absent.
    fn shared_model(
        cell: &'static OnceLock<Option<ReferenceModel>>,
        path: &str,
        how_to_get: &str,
    ) -> Option<&'static ReferenceModel> {
        let model = cell.get_or_init(|| {
            if !Path::new(path).is_file() {
                return None;
            }
            Some(ReferenceModel::load(Path::new(path)).unwrap())
        });
        if model.is_none() {
            crate::testdata::skip(&format!("{path} not found ({how_to_get})"));
        }
        model.as_ref()
    }

    fn l6_model() -> Option<&'static ReferenceModel> {
        static MODEL: OnceLock<Option<ReferenceModel>> = OnceLock::new();
        shared_model(&MODEL, L6_MODEL, "it lives in the shared data directory")
    }

    fn l3_model() -> Option<&'static ReferenceModel> {
        static MODEL: OnceLock<Option<ReferenceModel>> = OnceLock::new();
        shared_model(&MODEL, L3_MODEL, "run scripts/fetch-models.sh")
    }

    fn fixture_model(name: &str) -> PathBuf {
        Path::new(FIXTURES).join(name)
    }

    fn max_abs_diff(actual: &HostTensor, expected: &HostTensor) -> f32 {
        assert_eq!(actual.shape, expected.shape, "shape mismatch");
        let actual = actual.as_f32().expect("actual output is not f32");
        let expected = expected.as_f32().expect("expected output is not f32");
        actual.iter().zip(expected).map(|(a, e)| (a - e).abs()).fold(0.0, f32::max)
    }

    fn assert_close(actual: &HostTensor, expected: &HostTensor, label: &str) {
        let diff = max_abs_diff(actual, expected);
        assert!(diff <= TOLERANCE, "{label}: max abs difference {diff} exceeds {TOLERANCE}");
    }

    fn l6_inputs(case: &str) -> Vec<HostTensor> {
        ["input_ids", "attention_mask", "token_type_ids"]
            .iter()
            .map(|input| read_npy(&format!("l6_{case}_{input}")))
            .collect()
    }

    fn l3_inputs(case: &str) -> Vec<HostTensor> {
        ["input_ids", "attention_mask"]
            .iter()
            .map(|input| read_npy(&format!("l3_{case}_{input}")))
            .collect()
    }

    /// Runs the L3 fixtures through `model` and compares all four outputs with onnxruntime's.
    fn check_l3_cases(model: &ReferenceModel) {
        for case in CASES {
            let inputs = l3_inputs(case);
            let outputs = model.run(&inputs).unwrap();
            assert_eq!(outputs.len(), 4, "{case}: output count");
            assert_eq!(outputs[0], inputs[0], "{case}: input_ids pass-through");
            assert_eq!(outputs[1], inputs[1], "{case}: attention_mask pass-through");

            let tokens = read_npy(&format!("l3_{case}_token_embeddings"));
            assert_close(&outputs[2], &tokens, &format!("{case} token embeddings"));
            let sentence = read_npy(&format!("l3_{case}_sentence_embedding"));
            assert_close(&outputs[3], &sentence, &format!("{case} sentence embedding"));
        }
    }

    #[test]
    fn l6_matches_onnxruntime_at_two_lengths() {
        let Some(model) = l6_model() else { return };
        assert!(model.has_symbolic_dims(), "all-MiniLM-L6-v2 should stay symbolic");
        assert_eq!(model.input_names(), ["input_ids", "attention_mask", "token_type_ids"]);
        assert_eq!(model.output_names(), ["last_hidden_state"]);

        // batch2 then single then batch2 again: the plan must not keep the first shapes.
        for case in ["batch2", "single", "batch2"] {
            let outputs = model.run(&l6_inputs(case)).unwrap();
            assert_eq!(outputs.len(), 1, "{case}: output count");
            let expected = read_npy(&format!("l6_{case}_last_hidden_state"));
            assert_close(&outputs[0], &expected, &format!("{case} last_hidden_state"));
        }
    }

    #[test]
    fn l3_matches_onnxruntime_at_two_lengths() {
        let Some(model) = l3_model() else { return };
        assert!(model.has_symbolic_dims(), "paraphrase-MiniLM-L3-v2 should stay symbolic");
        assert_eq!(model.input_names(), ["input_ids", "attention_mask"]);
        assert_eq!(model.output_names(), ["output", "463", "onnx::Shape_422", "461"]);
        check_l3_cases(model);
    }

    #[test]
    fn per_shape_plans_match_onnxruntime() {
        if !Path::new(L3_MODEL).is_file() {
            crate::testdata::skip(&format!("{L3_MODEL} not found (run scripts/fetch-models.sh)"));
            return;
        }
        let model = ReferenceModel::load_with(Path::new(L3_MODEL), false).unwrap();
        assert!(!model.has_symbolic_dims());

        check_l3_cases(&model);
        check_l3_cases(&model);
        let Plans::PerShape { cache, .. } = &model.plans else { unreachable!() };
        assert_eq!(lock(cache).entries.len(), 2, "one cached plan per distinct shape set");
    }

    #[test]
    fn shape_cache_evicts_oldest() {
        let model = ReferenceModel::load_with(&fixture_model("dtypes.onnx"), false).unwrap();
        let Plans::PerShape { cache, .. } = &model.plans else { unreachable!() };

        for rows in 1..=SHAPE_CACHE_CAPACITY + 1 {
            let outputs = model.run(&dtype_inputs(rows, rows)).unwrap();
            assert_eq!(outputs[0].shape, [rows, 3], "rows {rows}: doubled shape");
        }
        let cache = lock(cache);
        assert_eq!(cache.entries.len(), SHAPE_CACHE_CAPACITY);
        assert_eq!(cache.entries[0].0[0], [2, 3], "the plan for 1 row was evicted first");
    }

    /// Inputs of dtypes.onnx: `x_rows` rows of x, `rows` rows of flags and counts.
    fn dtype_inputs(x_rows: usize, rows: usize) -> Vec<HostTensor> {
        let x: Vec<f32> = (0..x_rows * 3).map(|i| i as f32 * 0.5 - 1.25).collect();
        let flags: Vec<bool> = (0..rows * 3).map(|i| i % 3 != 1).collect();
        let mut counts: Vec<i32> = (0..rows * 3).map(|i| i as i32 * 7 - 10).collect();
        counts[0] = i32::MAX - 1;
        vec![
            HostTensor::f32(vec![x_rows, 3], x),
            HostTensor { shape: vec![rows, 3], data: TensorData::Bool(flags) },
            HostTensor { shape: vec![rows, 3], data: TensorData::I32(counts) },
        ]
    }

    fn check_dtype_outputs(model: &ReferenceModel, x_rows: usize, rows: usize) {
        let inputs = dtype_inputs(x_rows, rows);
        let outputs = model.run(&inputs).unwrap();
        assert_eq!(outputs.len(), 4);

        let x = inputs[0].as_f32().unwrap();
        let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        assert_eq!(outputs[0], HostTensor::f32(vec![x_rows, 3], doubled));

        let TensorData::Bool(flags) = &inputs[1].data else { unreachable!() };
        let negated = flags.iter().map(|f| !f).collect();
        let expected = HostTensor { shape: vec![rows, 3], data: TensorData::Bool(negated) };
        assert_eq!(outputs[1], expected, "not_flags");

        let TensorData::I32(counts) = &inputs[2].data else { unreachable!() };
        let incremented = counts.iter().map(|c| c + 1).collect();
        let expected = HostTensor { shape: vec![rows, 3], data: TensorData::I32(incremented) };
        assert_eq!(outputs[2], expected, "counts_plus_one");

        let widened = counts.iter().map(|&c| i64::from(c)).collect();
        assert_eq!(outputs[3], HostTensor::i64(vec![rows, 3], widened), "counts_i64");
    }

    #[test]
    fn dtypes_round_trip_with_unknown_dim() {
        let model = ReferenceModel::load(&fixture_model("dtypes.onnx")).unwrap();
        assert!(model.has_symbolic_dims());
        assert_eq!(model.input_names(), ["x", "flags", "counts"]);
        assert_eq!(model.output_names(), ["doubled", "not_flags", "counts_plus_one", "counts_i64"]);

        // The unknown first dimension of x is its own symbol, independent of "rows".
        check_dtype_outputs(&model, 2, 2);
        check_dtype_outputs(&model, 5, 1);
        check_dtype_outputs(&model, 1, 4);
    }

    #[test]
    fn dtypes_round_trip_per_shape() {
        let model = ReferenceModel::load_with(&fixture_model("dtypes.onnx"), false).unwrap();
        check_dtype_outputs(&model, 2, 2);
        check_dtype_outputs(&model, 5, 1);
    }

    #[test]
    fn run_rejects_wrong_input_count() {
        let model = ReferenceModel::load(&fixture_model("dtypes.onnx")).unwrap();
        let mut inputs = dtype_inputs(2, 2);
        inputs.pop();

        let error = model.run(&inputs).unwrap_err();
        let ReferenceError::InputCount { expected, actual, .. } = &error else {
            panic!("expected InputCount, got {error:?}");
        };
        assert_eq!(expected, &["x", "flags", "counts"]);
        assert_eq!(*actual, 2);
        let message = error.to_string();
        assert!(message.contains("dtypes.onnx"), "{message}");
        assert!(
            message.contains("expected 3 input tensors (x, flags, counts), got 2"),
            "{message}"
        );
    }

    #[test]
    fn run_rejects_wrong_input_type() {
        let model = ReferenceModel::load(&fixture_model("dtypes.onnx")).unwrap();
        let mut inputs = dtype_inputs(2, 2);
        inputs[2] = HostTensor::i64(vec![2, 3], vec![0; 6]);

        let error = model.run(&inputs).unwrap_err();
        let ReferenceError::InputType { input, expected, actual, .. } = &error else {
            panic!("expected InputType, got {error:?}");
        };
        assert_eq!(input, "counts");
        assert_eq!(*expected, "i32");
        assert_eq!(*actual, "i64");
        assert!(error.to_string().contains("dtypes.onnx"), "{error}");
    }

    #[test]
    fn run_rejects_bad_shapes() {
        let model = ReferenceModel::load(&fixture_model("dtypes.onnx")).unwrap();
        let cases: [(&str, usize, Vec<usize>, &str); 3] = [
            ("rows disagree", 2, vec![3, 3], "(rows) to be 2 as in input `flags`"),
            ("wrong rank", 2, vec![6], "rank 2 ([rows, 3])"),
            ("fixed axis", 2, vec![2, 2], "axis 1 to be 3"),
        ];
        for (case, rows, counts_shape, expected_text) in cases {
            let mut inputs = dtype_inputs(2, rows);
            let length = counts_shape.iter().product();
            inputs[2] =
                HostTensor { shape: counts_shape.clone(), data: TensorData::I32(vec![0; length]) };

            let error = model.run(&inputs).unwrap_err();
            let ReferenceError::InputShape { input, actual, .. } = &error else {
                panic!("{case}: expected InputShape, got {error:?}");
            };
            assert_eq!(input, "counts", "{case}");
            assert_eq!(actual, &counts_shape, "{case}");
            assert!(error.to_string().contains(expected_text), "{case}: {error}");
        }
    }

    #[test]
    fn run_rejects_data_length_mismatch() {
        let model = ReferenceModel::load(&fixture_model("dtypes.onnx")).unwrap();
        let mut inputs = dtype_inputs(2, 2);
        inputs[0] = HostTensor { shape: vec![2, 3], data: TensorData::F32(vec![0.0; 5]) };

        let error = model.run(&inputs).unwrap_err();
        let ReferenceError::InputShape { input, .. } = &error else {
            panic!("expected InputShape, got {error:?}");
        };
        assert_eq!(input, "x");
        assert!(error.to_string().contains("with 5 elements, the length of its data"), "{error}");
    }

    #[test]
    fn l6_rejects_f32_token_ids() {
        let Some(model) = l6_model() else { return };
        let mut inputs = l6_inputs("single");
        inputs[0] = HostTensor::f32(vec![1, 13], vec![0.0; 13]);

        let error = model.run(&inputs).unwrap_err();
        let ReferenceError::InputType { input, expected, actual, .. } = &error else {
            panic!("expected InputType, got {error:?}");
        };
        assert_eq!(input, "input_ids");
        assert_eq!(*expected, "i64");
        assert_eq!(*actual, "f32");
    }

    #[test]
    fn load_reports_missing_file() {
        let path = fixture_model("no_such_model.onnx");
        let error = ReferenceModel::load(&path).unwrap_err();
        assert!(matches!(error, ReferenceError::Read { .. }), "{error:?}");
        assert!(error.to_string().contains("no_such_model.onnx"), "{error}");
    }

    #[test]
    fn load_reports_invalid_onnx() {
        // make.py is a file that exists but is not a protobuf model.
        let path = fixture_model("make.py");
        let error = ReferenceModel::load(&path).unwrap_err();
        assert!(matches!(error, ReferenceError::NotOnnx(_)), "{error:?}");
        assert!(error.to_string().contains("make.py"), "{error}");
        assert!(error.to_string().contains("is not an ONNX model"), "{error}");
        let cause = std::error::Error::source(&error).expect("the decoder's error is the cause");
        assert!(cause.to_string().contains("Protobuf"), "{cause}");
    }

    #[test]
    fn load_lists_unsupported_ops() {
        let error = ReferenceModel::load(&fixture_model("unsupported_op.onnx")).unwrap_err();
        let ReferenceError::UnsupportedOps { nodes, .. } = &error else {
            panic!("expected UnsupportedOps, got {error:?}");
        };
        assert_eq!(nodes.len(), 1, "{nodes:?}");
        assert!(nodes[0].contains("mystery"), "{nodes:?}");
        assert!(nodes[0].contains("EdgefoldNoSuchOp"), "{nodes:?}");
        assert!(error.to_string().contains("unsupported_op.onnx"), "{error}");
    }

    #[test]
    fn reference_model_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ReferenceModel>();
    }
}
