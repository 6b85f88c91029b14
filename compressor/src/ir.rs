//! The compressor's graph: the runtime's op set over named values with symbolic shapes. The
//! importer builds it, passes rewrite it, and the writer packs it.

use edgefold_runtime::format::{DType, Dim};
use edgefold_runtime::ops::Op;

/// Index of a value in [`Graph::values`].
pub type ValueId = usize;

/// Element storage of a constant.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    /// f32 values.
    F32(Vec<f32>),
    /// i64 values.
    I64(Vec<i64>),
    /// i32 values.
    I32(Vec<i32>),
    /// Booleans as bytes, 0 or 1.
    Bool(Vec<u8>),
    /// f16 values as bits.
    F16(Vec<u16>),
    /// Rank-2 int8 with one f32 scale per row.
    I8PerRow {
        /// Quantized values, row-major.
        q: Vec<i8>,
        /// One scale per row.
        scales: Vec<f32>,
    },
    /// Rank-2 int4 in groups along rows, packed two per byte (low nibble first), f16 scales.
    I4Grouped {
        /// Packed values; each row takes `cols.div_ceil(2)` bytes.
        packed: Vec<u8>,
        /// Scales as f16 bits, `[rows, cols / group]`.
        scales: Vec<u16>,
        /// Group length.
        group: usize,
    },
    /// Rank-2 int4 in groups as [`Storage::I4Grouped`], with an f16 minimum per group:
    /// value = (q + 8) × scale + min.
    I4GroupedMin {
        /// Packed values; each row takes `cols.div_ceil(2)` bytes.
        packed: Vec<u8>,
        /// Scales as f16 bits, `[rows, cols / group]`.
        scales: Vec<u16>,
        /// Minimums as f16 bits, `[rows, cols / group]`.
        mins: Vec<u16>,
        /// Group length.
        group: usize,
    },
}

impl Storage {
    /// Element type as the file records it.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::I64(_) => DType::I64,
            Storage::I32(_) => DType::I32,
            Storage::Bool(_) => DType::Bool,
            Storage::F16(_) => DType::F16,
            Storage::I8PerRow { .. } => DType::I8,
            Storage::I4Grouped { .. } | Storage::I4GroupedMin { .. } => DType::I4,
        }
    }

    /// Bytes the data takes in the file, scales included.
    pub fn byte_len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len() * 4,
            Storage::I64(v) => v.len() * 8,
            Storage::I32(v) => v.len() * 4,
            Storage::Bool(v) => v.len(),
            Storage::F16(v) => v.len() * 2,
            Storage::I8PerRow { q, scales } => q.len() + scales.len() * 4,
            Storage::I4Grouped { packed, scales, .. } => packed.len() + scales.len() * 2,
            Storage::I4GroupedMin { packed, scales, mins, .. } => {
                packed.len() + (scales.len() + mins.len()) * 2
            }
        }
    }

    /// The values as f32 when stored densely in f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }
}

/// A tensor of the graph: an activation computed at run time or a constant.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    /// Name, unique in the graph.
    pub name: String,
    /// Element type at run time (f32 for quantized constants read by kernels as f32).
    pub dtype: DType,
    /// Extents, possibly symbolic.
    pub shape: Vec<Dim>,
    /// Data of a constant; `None` for activations.
    pub data: Option<Storage>,
}

impl Value {
    /// Concrete extents of a constant (all axes constant).
    pub fn const_shape(&self) -> Vec<usize> {
        self.shape.iter().map(|d| d.factor as usize).collect()
    }
}

/// One op of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Name, usually the source node's.
    pub name: String,
    /// The runtime op.
    pub op: Op,
    /// Inputs; `None` for an absent optional input.
    pub inputs: Vec<Option<ValueId>>,
    /// Outputs.
    pub outputs: Vec<ValueId>,
}

/// A variable dimension of the graph, such as batch size or sequence length.
#[derive(Clone, Debug, PartialEq)]
pub struct Symbol {
    /// Name from the source model.
    pub name: String,
    /// Largest value the arena plan allows.
    pub max: u32,
}

/// A model in the runtime's op set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    /// All values.
    pub values: Vec<Value>,
    /// Ops in execution order.
    pub nodes: Vec<Node>,
    /// Graph inputs.
    pub inputs: Vec<ValueId>,
    /// Graph outputs.
    pub outputs: Vec<ValueId>,
    /// Symbolic dimensions.
    pub symbols: Vec<Symbol>,
}

impl Graph {
    /// Adds a value and returns its id.
    pub fn add_value(&mut self, value: Value) -> ValueId {
        self.values.push(value);
        self.values.len() - 1
    }

    /// Adds a constant value.
    pub fn add_const(&mut self, name: String, shape: Vec<usize>, data: Storage) -> ValueId {
        let dtype = data.dtype();
        let shape = shape.into_iter().map(|d| Dim::constant(d as u32)).collect();
        self.add_value(Value { name, dtype, shape, data: Some(data) })
    }

    /// Whether a value is a constant.
    pub fn is_const(&self, id: ValueId) -> bool {
        self.values[id].data.is_some()
    }

    /// For each value, the indices of the nodes that read it.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut consumers = vec![Vec::new(); self.values.len()];
        for (n, node) in self.nodes.iter().enumerate() {
            for &v in node.inputs.iter().flatten() {
                consumers[v].push(n);
            }
        }
        consumers
    }

    /// For each value, the node that produces it.
    pub fn producers(&self) -> Vec<Option<usize>> {
        let mut producers = vec![None; self.values.len()];
        for (n, node) in self.nodes.iter().enumerate() {
            for &v in &node.outputs {
                producers[v] = Some(n);
            }
        }
        producers
    }

    /// Removes nodes whose outputs are never read and values never referenced, renumbering ids.
    pub fn prune(&mut self) {
        let mut live = vec![false; self.values.len()];
        for &v in self.outputs.iter().chain(&self.inputs) {
            live[v] = true;
        }
        let mut keep = vec![false; self.nodes.len()];
        for (n, node) in self.nodes.iter().enumerate().rev() {
            if node.outputs.iter().any(|&o| live[o]) {
                keep[n] = true;
                for &i in node.inputs.iter().flatten() {
                    live[i] = true;
                }
            }
        }
        let mut k = keep.iter();
        self.nodes.retain(|_| *k.next().unwrap_or(&false));
        for node in &self.nodes {
            for &o in &node.outputs {
                live[o] = true;
            }
        }
        let mut remap = vec![usize::MAX; self.values.len()];
        let mut values = Vec::new();
        for (i, v) in std::mem::take(&mut self.values).into_iter().enumerate() {
            if live[i] {
                remap[i] = values.len();
                values.push(v);
            }
        }
        self.values = values;
        for node in &mut self.nodes {
            for i in node.inputs.iter_mut().flatten() {
                *i = remap[*i];
            }
            for o in &mut node.outputs {
                *o = remap[*o];
            }
        }
        for v in self.inputs.iter_mut().chain(self.outputs.iter_mut()) {
            *v = remap[*v];
        }
    }

    /// Bytes of all constants.
    pub fn weight_bytes(&self) -> usize {
        self.values.iter().filter_map(|v| v.data.as_ref()).map(Storage::byte_len).sum()
    }
}
