//! Lowering of ONNX nodes with run-time inputs into runtime ops, with symbolic shape inference.

use edgefold_runtime::format::{DType, Dim, MAX_RANK, MAX_SYMBOLS};
use edgefold_runtime::ops::{BinaryKind, Op, PoolKind, ReduceKind, UnaryKind, Window2d};
use tract_onnx::pb::NodeProto;

use super::consts::{ConstTensor, SymInt};
use super::fold::{
    axes_of, flatten_axis, norm_axis, perm_of, shape_slice, slice_axis, slice_spec, squeeze_shape,
    unsqueeze_shape,
};
use super::proto::{attr_int, attr_ints, attr_string};
use super::{compose, derived};
use super::{invalid, Importer, NodeError, NodeResult, Val};
use crate::ir::{Node, Storage};

/// ONNX op types the importer handles (by folding, lowering or both).
pub const SUPPORTED: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Celu",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "DepthToSpace",
    "DequantizeLinear",
    "Div",
    "Dropout",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "Log",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mish",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "PRelu",
    "Pow",
    "RMSNormalization",
    "Range",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Selu",
    "Shape",
    "Sigmoid",
    "Size",
    "Slice",
    "Softmax",
    "Softplus",
    "Softsign",
    "SpaceToDepth",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Swish",
    "Tanh",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
];

impl From<u8> for SymDim {
    fn from(v: u8) -> Self {
        SymDim(Dim::constant(v as u32))
    }
}

/// A [`Dim`] usable with the generic shape helpers of the folding code.
#[derive(Clone, Copy, PartialEq, Debug)]
struct SymDim(Dim);

/// The node being lowered, with its name and its inputs (`None` for absent optional ones).
pub(super) struct Ctx<'a> {
    pub(super) node: &'a NodeProto,
    pub(super) name: &'a str,
    pub(super) inputs: &'a [Option<Val>],
}

impl Ctx<'_> {
    pub(super) fn input(&self, i: usize) -> NodeResult<&Val> {
        self.inputs
            .get(i)
            .and_then(Option::as_ref)
            .ok_or_else(|| NodeError::Invalid(format!("input {i} is missing")))
    }

    pub(super) fn opt(&self, i: usize) -> Option<&Val> {
        self.inputs.get(i).and_then(Option::as_ref)
    }

    fn konst(&self, i: usize) -> NodeResult<&ConstTensor> {
        match self.input(i)? {
            Val::Const(c) => Ok(c),
            _ => Err(NodeError::Unsupported(format!("input {i} must be a constant"))),
        }
    }

    /// The constant inputs, `None` for absent or run-time ones.
    fn consts(&self) -> Vec<Option<&ConstTensor>> {
        self.inputs
            .iter()
            .map(|v| match v {
                Some(Val::Const(c)) => Some(c),
                _ => None,
            })
            .collect()
    }

    pub(super) fn hint(&self, i: usize) -> String {
        self.node.input.get(i).cloned().unwrap_or_else(|| format!("{}.{i}", self.name))
    }
}

/// Lowers one node whose inputs are not all constant.
pub(crate) fn lower(
    imp: &mut Importer,
    node: &NodeProto,
    name: &str,
    inputs: &[Option<Val>],
) -> NodeResult<Vec<Val>> {
    let cx = Ctx { node, name, inputs };
    let op_type = node.op_type.as_str();
    let val = match op_type {
        "Identity" => cx.input(0)?.clone(),
        "Dropout" => return compose::dropout(imp, &cx),
        "LayerNormalization" => return compose::layer_norm(imp, &cx),
        "Split" => return derived::split(imp, &cx),
        "LeakyRelu" | "PRelu" | "Elu" | "Selu" | "Celu" | "Softplus" | "Softsign"
        | "HardSigmoid" | "HardSwish" | "Swish" | "Mish" => derived::activation(imp, &cx)?,
        "Sum" | "Mean" => derived::sum_or_mean(imp, &cx)?,
        "And" | "Or" | "Xor" | "Not" => derived::logical(imp, &cx)?,
        "ReduceMin" | "ReduceSumSquare" | "ReduceL1" | "ReduceL2" | "ReduceLogSum"
        | "ReduceLogSumExp" => derived::reduction(imp, &cx)?,
        "LogSoftmax" => derived::log_softmax(imp, &cx)?,
        "BatchNormalization" => derived::batch_norm(imp, &cx)?,
        "InstanceNormalization" => derived::instance_norm(imp, &cx)?,
        "RMSNormalization" => derived::rms_norm(imp, &cx)?,
        "Trilu" => derived::trilu(imp, &cx)?,
        "DepthToSpace" | "SpaceToDepth" => derived::depth_space(imp, &cx)?,
        "Shape" => {
            let id = imp.value_id(cx.input(0)?, &cx.hint(0))?;
            let dims = imp.graph.values[id].shape.iter().map(|&d| SymInt::from_dim(d)).collect();
            Val::Const(shape_slice(node, dims))
        }
        "Size" => {
            let id = imp.value_id(cx.input(0)?, &cx.hint(0))?;
            let mut n = SymInt::Int(1);
            for &d in &imp.graph.values[id].shape {
                n = n
                    .checked_mul(SymInt::from_dim(d))
                    .ok_or(NodeError::Unsupported("size overflows".into()))?;
            }
            Val::Const(ConstTensor::Int { shape: vec![], data: vec![n], dtype: DType::I64 })
        }
        "Max" | "Min" if cx.inputs.iter().flatten().count() != 2 => {
            let kind = if op_type == "Max" { BinaryKind::Max } else { BinaryKind::Min };
            compose::variadic(imp, &cx, kind)?
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" => {
            let kind = match op_type {
                "Add" => BinaryKind::Add,
                "Sub" => BinaryKind::Sub,
                "Mul" => BinaryKind::Mul,
                "Div" => BinaryKind::Div,
                "Pow" => BinaryKind::Pow,
                "Max" => BinaryKind::Max,
                _ => BinaryKind::Min,
            };
            binary(imp, &cx, kind)?
        }
        "Relu" => match fuse_into_conv(imp, &cx, 0.0, f32::INFINITY)? {
            Some(fused) => fused,
            None => unary(imp, &cx, UnaryKind::Relu, 0.0, 0.0)?,
        },
        "Sqrt" | "Exp" | "Log" | "Erf" | "Tanh" | "Sigmoid" | "Neg" | "Abs" | "Reciprocal"
        | "Gelu" => {
            let kind = match op_type {
                "Sqrt" => UnaryKind::Sqrt,
                "Exp" => UnaryKind::Exp,
                "Log" => UnaryKind::Log,
                "Erf" => UnaryKind::Erf,
                "Tanh" => UnaryKind::Tanh,
                "Sigmoid" => UnaryKind::Sigmoid,
                "Neg" => UnaryKind::Neg,
                "Abs" => UnaryKind::Abs,
                "Reciprocal" => UnaryKind::Reciprocal,
                _ => match attr_string(node, "approximate").as_deref() {
                    Some("tanh") => UnaryKind::GeluTanh,
                    _ => UnaryKind::Gelu,
                },
            };
            unary(imp, &cx, kind, 0.0, 0.0)?
        }
        "Clip"
            if imp.opset() >= 11
                && [1, 2].iter().any(|&i| matches!(cx.opt(i), Some(Val::Runtime(_)))) =>
        {
            compose::clip_runtime(imp, &cx)?
        }
        "Clip" => {
            let bound = |i: usize, attr: &str, default: f32| -> NodeResult<f32> {
                if imp.opset() >= 11 {
                    match cx.opt(i) {
                        Some(Val::Const(c)) => c
                            .to_f32()
                            .and_then(|v| v.first().copied())
                            .ok_or(NodeError::Invalid("invalid clip bound".into())),
                        Some(_) => {
                            Err(NodeError::Unsupported("clip bounds computed at run time".into()))
                        }
                        None => Ok(default),
                    }
                } else {
                    Ok(super::fold::float_attr(node, attr, default))
                }
            };
            let (lo, hi) = (bound(1, "min", f32::NEG_INFINITY)?, bound(2, "max", f32::INFINITY)?);
            match fuse_into_conv(imp, &cx, lo, hi)? {
                Some(fused) => fused,
                None => unary(imp, &cx, UnaryKind::Clip, lo, hi)?,
            }
        }
        "MatMul" => matmul(imp, &cx)?,
        "Gemm" => compose::gemm(imp, &cx)?,
        "Conv" => conv(imp, &cx)?,
        "AveragePool" => pool(imp, &cx, PoolKind::Average)?,
        "MaxPool" => pool(imp, &cx, PoolKind::Max)?,
        "GlobalAveragePool" | "GlobalMaxPool" => global_pool(imp, &cx)?,
        "Softmax" => {
            let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
            let rank = imp.graph.values[x].shape.len();
            let axis =
                norm_axis(attr_int(node, "axis", if imp.opset() >= 13 { -1 } else { 1 }), rank)?;
            if imp.opset() < 13 && axis + 1 != rank {
                return Err(NodeError::Unsupported("opset < 13 softmax over several axes".into()));
            }
            emit_same(imp, &cx, Op::Softmax { axis: axis as u32 }, vec![Some(x)], x)?
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" => reduce(imp, &cx)?,
        "Gather" => gather(imp, &cx)?,
        "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" => reshape(imp, &cx)?,
        "Transpose" => {
            let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
            let v = &imp.graph.values[x];
            let perm = perm_of(node, v.shape.len())?;
            if perm.len() > MAX_RANK {
                return Err(NodeError::Unsupported("rank above 6".into()));
            }
            let shape: Vec<Dim> = perm.iter().map(|&p| v.shape[p]).collect();
            let mut p = [0u8; MAX_RANK];
            for (i, &a) in perm.iter().enumerate() {
                p[i] = a as u8;
            }
            for (i, slot) in p.iter_mut().enumerate().skip(perm.len()) {
                *slot = i as u8;
            }
            let dtype = v.dtype;
            emit(imp, &cx, Op::Transpose { perm: p }, vec![Some(x)], dtype, shape)?
        }
        "Concat" => concat(imp, &cx)?,
        "Slice" => slice(imp, &cx)?,
        "Expand" => {
            let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
            let target = dims_of(cx.konst(1)?)?;
            let v = &imp.graph.values[x];
            let shape = broadcast_dims(&v.shape, &target)
                .ok_or(NodeError::Invalid("expand shapes do not broadcast".into()))?;
            let dtype = v.dtype;
            if shape == v.shape {
                Val::Runtime(x)
            } else {
                emit(imp, &cx, Op::Expand, vec![Some(x)], dtype, shape)?
            }
        }
        "ConstantOfShape" => {
            let target = dims_of(cx.konst(0)?)?;
            let value = match super::proto::attr(node, "value").and_then(|a| a.t.as_ref()) {
                Some(t) => super::proto::tensor(t, std::path::Path::new("."))
                    .map_err(NodeError::Invalid)?,
                None => ConstTensor::F32 { shape: vec![1], data: vec![0.0] },
            };
            let scalar = Val::Const(value.reshaped(vec![1]));
            let id = imp.value_id(&scalar, &format!("{}.value", cx.name))?;
            let dtype = imp.graph.values[id].dtype;
            emit(imp, &cx, Op::Expand, vec![Some(id)], dtype, target)?
        }
        "Cast" => compose::cast(imp, &cx)?,
        "CastLike" => compose::cast_like(imp, &cx)?,
        "Where" => {
            let ids = (0..3)
                .map(|i| imp.value_id(cx.input(i)?, &cx.hint(i)))
                .collect::<NodeResult<Vec<_>>>()?;
            let v = &imp.graph.values;
            if v[ids[0]].dtype != DType::Bool {
                return invalid("where condition is not boolean");
            }
            let shape = broadcast_dims(&v[ids[1]].shape, &v[ids[2]].shape)
                .and_then(|s| broadcast_dims(&v[ids[0]].shape, &s))
                .ok_or(NodeError::Invalid("where operands do not broadcast".into()))?;
            let dtype = v[ids[1]].dtype;
            emit(imp, &cx, Op::Where, ids.into_iter().map(Some).collect(), dtype, shape)?
        }
        other => {
            return Err(NodeError::Unsupported(format!("{other} on values computed at run time")))
        }
    };
    Ok(vec![val])
}

/// Adds a node computing the node's first output.
pub(super) fn emit(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    op: Op,
    inputs: Vec<Option<usize>>,
    dtype: DType,
    shape: Vec<Dim>,
) -> NodeResult<Val> {
    emit_output(imp, cx, 0, op, inputs, dtype, shape)
}

/// Adds a node computing output `index` of the node.
pub(super) fn emit_output(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    index: usize,
    op: Op,
    inputs: Vec<Option<usize>>,
    dtype: DType,
    shape: Vec<Dim>,
) -> NodeResult<Val> {
    if shape.len() > MAX_RANK {
        return Err(NodeError::Unsupported("rank above 6".into()));
    }
    let out_name = cx.node.output.get(index).cloned().unwrap_or_else(|| cx.name.to_owned());
    let out = imp.activation(&out_name, dtype, shape);
    imp.graph.nodes.push(Node { name: cx.name.to_owned(), op, inputs, outputs: vec![out] });
    Ok(Val::Runtime(out))
}

/// Adds a node whose output has the type and shape of value `like`.
fn emit_same(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    op: Op,
    inputs: Vec<Option<usize>>,
    like: usize,
) -> NodeResult<Val> {
    let (dtype, shape) = (imp.graph.values[like].dtype, imp.graph.values[like].shape.clone());
    if dtype != DType::F32 {
        return Err(NodeError::Unsupported(format!("{:?} elements (only f32 is computed)", dtype)));
    }
    emit(imp, cx, op, inputs, dtype, shape)
}

fn unary(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    kind: UnaryKind,
    alpha: f32,
    beta: f32,
) -> NodeResult<Val> {
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    emit_same(imp, cx, Op::Unary { kind, alpha, beta }, vec![Some(x)], x)
}

/// NumPy broadcast of symbolic shapes.
pub(crate) fn broadcast_dims(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let rank = a.len().max(b.len());
    let one = Dim::constant(1);
    (0..rank)
        .map(|i| {
            let x = if i + a.len() >= rank { a[i + a.len() - rank] } else { one };
            let y = if i + b.len() >= rank { b[i + b.len() - rank] } else { one };
            match (x, y) {
                (x, y) if x == y => Some(x),
                (x, y) if x == one => Some(y),
                (x, y) if y == one => Some(x),
                _ => None,
            }
        })
        .collect()
}

fn dims_of(t: &ConstTensor) -> NodeResult<Vec<Dim>> {
    let ints = t.as_ints().ok_or(NodeError::Invalid("a shape must be integers".into()))?;
    ints.iter()
        .map(|v| {
            v.to_dim().ok_or(NodeError::Unsupported(format!("extent {v:?} (zero or negative)")))
        })
        .collect()
}

fn binary(imp: &mut Importer, cx: &Ctx<'_>, kind: BinaryKind) -> NodeResult<Val> {
    let a = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let mut b = imp.value_id(cx.input(1)?, &cx.hint(1))?;
    let exponent_is_int = imp.graph.values[b].dtype != DType::F32;
    if kind == BinaryKind::Pow && imp.graph.values[a].dtype == DType::F32 && exponent_is_int {
        // Pow allows an integer exponent on a float base; the runtime computes it in f32.
        let shape = imp.graph.values[b].shape.clone();
        let exponent = imp.activation(&format!("{}.f32", cx.hint(1)), DType::F32, shape);
        let name = format!("{}.exponent", cx.name);
        imp.graph.nodes.push(Node {
            name,
            op: Op::Cast,
            inputs: vec![Some(b)],
            outputs: vec![exponent],
        });
        b = exponent;
    }
    let (va, vb) = (&imp.graph.values[a], &imp.graph.values[b]);
    if va.dtype != DType::F32 || vb.dtype != DType::F32 {
        return Err(NodeError::Unsupported(format!(
            "arithmetic on {:?} values at run time",
            va.dtype
        )));
    }
    let shape = broadcast_dims(&va.shape, &vb.shape).ok_or_else(|| {
        NodeError::Invalid(format!("shapes {:?} and {:?} do not broadcast", va.shape, vb.shape))
    })?;
    emit(imp, cx, Op::Binary(kind), vec![Some(a), Some(b)], DType::F32, shape)
}

/// Transposes a constant 2-D f32 matrix `[k, n]` into the kernel layout `[n, k]`.
pub(super) fn transposed(data: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; k * n];
    for r in 0..k {
        for c in 0..n {
            out[c * k + r] = data[r * n + c];
        }
    }
    out
}

pub(super) fn linear(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    x: usize,
    weight_nk: Vec<f32>,
    n: usize,
    k: usize,
    bias: Option<Vec<f32>>,
) -> NodeResult<Val> {
    let xv = &imp.graph.values[x];
    if xv.dtype != DType::F32 || xv.shape.last() != Some(&Dim::constant(k as u32)) {
        return invalid(format!(
            "matmul input {:?} does not end in the weight's {k} rows",
            xv.shape
        ));
    }
    let mut shape = xv.shape.clone();
    *shape.last_mut().expect("checked non-empty") = Dim::constant(n as u32);
    // Keep the source weight's name: it carries the layer structure (e.g. encoder.layer.3...).
    let w_name = imp.unique_name(&cx.hint(1));
    let w = imp.graph.add_const(w_name, vec![n, k], Storage::F32(weight_nk));
    let b = bias.map(|b| {
        let name = imp.unique_name(&format!("{}.bias", cx.name));
        imp.graph.add_const(name, vec![n], Storage::F32(b))
    });
    emit(imp, cx, Op::Linear { activation: None }, vec![Some(x), Some(w), b], DType::F32, shape)
}

fn matmul(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    if let (Val::Runtime(_), Val::Const(ConstTensor::F32 { shape, data })) =
        (cx.input(0)?, cx.input(1)?)
    {
        if shape.len() == 2 {
            let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
            let (k, n) = (shape[0], shape[1]);
            return linear(imp, cx, x, transposed(data, k, n), n, k, None);
        }
    }
    let a = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let b = imp.value_id(cx.input(1)?, &cx.hint(1))?;
    let (sa, sb) = (imp.graph.values[a].shape.clone(), imp.graph.values[b].shape.clone());
    if sa.len() < 2 || sb.len() < 2 {
        return compose::matmul_vectors(imp, cx, a, b);
    }
    if sa[sa.len() - 1] != sb[sb.len() - 2] {
        return invalid(format!("matmul inner extents differ: {sa:?} x {sb:?}"));
    }
    let mut shape = broadcast_dims(&sa[..sa.len() - 2], &sb[..sb.len() - 2])
        .ok_or(NodeError::Invalid("matmul batch axes do not broadcast".into()))?;
    shape.push(sa[sa.len() - 2]);
    shape.push(sb[sb.len() - 1]);
    emit(imp, cx, Op::MatMul, vec![Some(a), Some(b)], DType::F32, shape)
}

/// Rejects axes given as a second input computed at run time (from opset `input_from` on), because
/// the output's shape must be known when the file is written.
fn require_const_axes(imp: &Importer, cx: &Ctx<'_>, input_from: i64) -> NodeResult<()> {
    if imp.opset() >= input_from && matches!(cx.opt(1), Some(v) if !matches!(v, Val::Const(_))) {
        return Err(NodeError::Unsupported("axes computed at run time".into()));
    }
    Ok(())
}

/// The reduced axes of a reduction node and the shape of its result.
pub(super) struct Reduction {
    /// Bit `i` is set when axis `i` is reduced.
    pub(super) mask: u32,
    /// Whether reduced axes stay with extent 1.
    pub(super) keep_dims: bool,
    /// Shape of the result.
    pub(super) shape: Vec<Dim>,
}

/// Reads the axes (attribute, or input 1 from opset `input_from` on) and `keepdims` of a
/// reduction of value `x`. Returns `None` when the node leaves its input unchanged
/// (`noop_with_empty_axes` without axes).
pub(super) fn reduction_of(
    imp: &Importer,
    cx: &Ctx<'_>,
    x: usize,
    input_from: i64,
) -> NodeResult<Option<Reduction>> {
    let node = cx.node;
    let shape = &imp.graph.values[x].shape;
    require_const_axes(imp, cx, input_from)?;
    let axes = axes_of(node, &cx.consts(), imp.opset(), input_from)?;
    let keep_dims = attr_int(node, "keepdims", 1) != 0;
    let axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => {
            a.iter().map(|&v| norm_axis(v, shape.len())).collect::<NodeResult<_>>()?
        }
        _ if attr_int(node, "noop_with_empty_axes", 0) != 0 => return Ok(None),
        _ => (0..shape.len()).collect(),
    };
    let mask = axes.iter().fold(0u32, |m, &a| m | 1 << a);
    let shape = shape
        .iter()
        .enumerate()
        .filter_map(|(i, &d)| match (mask & (1 << i) != 0, keep_dims) {
            (true, true) => Some(Dim::constant(1)),
            (true, false) => None,
            (false, _) => Some(d),
        })
        .collect();
    Ok(Some(Reduction { mask, keep_dims, shape }))
}

fn reduce(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let input_from = if cx.node.op_type == "ReduceSum" { 13 } else { 18 };
    let Some(r) = reduction_of(imp, cx, x, input_from)? else {
        return Ok(Val::Runtime(x));
    };
    let kind = match cx.node.op_type.as_str() {
        "ReduceMean" => ReduceKind::Mean,
        "ReduceSum" => ReduceKind::Sum,
        _ => ReduceKind::Max,
    };
    if imp.graph.values[x].dtype != DType::F32 {
        return Err(NodeError::Unsupported("reductions of non-f32 values".into()));
    }
    let op = Op::Reduce { kind, axes: r.mask, keep_dims: r.keep_dims };
    emit(imp, cx, op, vec![Some(x)], DType::F32, r.shape)
}

fn gather(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let data = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let indices = imp.value_id(cx.input(1)?, &cx.hint(1))?;
    let (dv, iv) = (&imp.graph.values[data], &imp.graph.values[indices]);
    if !matches!(iv.dtype, DType::I64 | DType::I32) {
        return invalid("gather indices must be integers");
    }
    let axis = norm_axis(attr_int(cx.node, "axis", 0), dv.shape.len())?;
    let mut shape = dv.shape[..axis].to_vec();
    shape.extend_from_slice(&iv.shape);
    shape.extend_from_slice(&dv.shape[axis + 1..]);
    let dtype = dv.dtype;
    emit(imp, cx, Op::Gather { axis: axis as u32 }, vec![Some(data), Some(indices)], dtype, shape)
}

fn reshape(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let node = cx.node;
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let v = &imp.graph.values[x];
    let input: Vec<SymDim> = v.shape.iter().map(|&d| SymDim(d)).collect();
    let consts = cx.consts();
    let shape: Vec<Dim> = match node.op_type.as_str() {
        "Reshape" => {
            let spec = cx
                .konst(1)?
                .as_ints()
                .ok_or(NodeError::Invalid("reshape target must be integers".into()))?;
            symbolic_reshape(&v.shape, spec, attr_int(node, "allowzero", 0) != 0)?
        }
        "Flatten" => {
            let axis = flatten_axis(attr_int(node, "axis", 1), v.shape.len())?;
            let prod = |s: &[Dim]| s.iter().try_fold(Dim::constant(1), |a, d| a.checked_mul(*d));
            vec![
                prod(&v.shape[..axis]).ok_or(NodeError::Invalid("overflow".into()))?,
                prod(&v.shape[axis..]).ok_or(NodeError::Invalid("overflow".into()))?,
            ]
        }
        "Unsqueeze" => {
            require_const_axes(imp, cx, 13)?;
            let axes = axes_of(node, &consts, imp.opset(), 13)?.unwrap_or_default();
            unsqueeze_shape(&input, &axes)?.into_iter().map(|d| d.0).collect()
        }
        _ => {
            require_const_axes(imp, cx, 13)?;
            let axes = axes_of(node, &consts, imp.opset(), 13)?;
            squeeze_shape(&input, axes.as_deref())?.into_iter().map(|d| d.0).collect()
        }
    };
    let dtype = v.dtype;
    if shape == v.shape {
        return Ok(Val::Runtime(x));
    }
    emit(imp, cx, Op::Reshape, vec![Some(x)], dtype, shape)
}

/// Resolves a reshape target (with 0 = copy and -1 = infer) against a symbolic input shape.
fn symbolic_reshape(input: &[Dim], spec: &[SymInt], allow_zero: bool) -> NodeResult<Vec<Dim>> {
    let mut total = SymInt::Int(1);
    for &d in input {
        total =
            total.checked_mul(SymInt::from_dim(d)).ok_or(NodeError::Invalid("overflow".into()))?;
    }
    let mut out: Vec<Option<Dim>> = Vec::new();
    for (i, &s) in spec.iter().enumerate() {
        out.push(match s {
            SymInt::Int(0) if !allow_zero => Some(
                *input.get(i).ok_or(NodeError::Invalid("reshape copies a missing axis".into()))?,
            ),
            SymInt::Int(-1) => None,
            other => Some(
                other
                    .to_dim()
                    .ok_or(NodeError::Unsupported(format!("reshape extent {other:?}")))?,
            ),
        });
    }
    let mut known = SymInt::Int(1);
    for d in out.iter().flatten() {
        known =
            known.checked_mul(SymInt::from_dim(*d)).ok_or(NodeError::Invalid("overflow".into()))?;
    }
    let inferred = total.checked_div(known);
    let mut result = Vec::with_capacity(out.len());
    let mut infers = 0;
    for d in out {
        match d {
            Some(d) => result.push(d),
            None => {
                infers += 1;
                let d = inferred.and_then(SymInt::to_dim).ok_or(NodeError::Unsupported(
                    "reshape whose -1 extent is not a product of the input's".into(),
                ))?;
                result.push(d);
            }
        }
    }
    if infers > 1 {
        return invalid("reshape with more than one -1");
    }
    if infers == 0 && known != total {
        return invalid(format!("reshape from {input:?} changes the element count"));
    }
    Ok(result)
}

fn concat(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let ids: Vec<usize> = (0..cx.inputs.len())
        .filter(|&i| cx.opt(i).is_some())
        .map(|i| imp.value_id(cx.input(i)?, &cx.hint(i)))
        .collect::<NodeResult<_>>()?;
    let first = imp.graph.values[ids[0]].clone();
    let axis = norm_axis(attr_int(cx.node, "axis", 0), first.shape.len())?;
    let mut total = SymInt::Int(0);
    for &id in &ids {
        let v = &imp.graph.values[id];
        if v.dtype != first.dtype || v.shape.len() != first.shape.len() {
            return invalid("concat inputs differ in type or rank");
        }
        total = total
            .checked_add(SymInt::from_dim(v.shape[axis]))
            .ok_or(NodeError::Unsupported("concat of unlike symbolic extents".into()))?;
    }
    let mut shape = first.shape.clone();
    shape[axis] = total.to_dim().ok_or(NodeError::Invalid("empty concat".into()))?;
    emit(
        imp,
        cx,
        Op::Concat { axis: axis as u32 },
        ids.into_iter().map(Some).collect(),
        first.dtype,
        shape,
    )
}

fn slice(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let consts = cx.consts();
    if cx.inputs.iter().skip(1).flatten().any(|v| !matches!(v, Val::Const(_))) {
        return Err(NodeError::Unsupported("slice bounds computed at run time".into()));
    }
    let spec = slice_spec(cx.node, &consts, imp.opset())?;
    let v = imp.graph.values[x].clone();
    let rank = v.shape.len();
    let mut starts = [0u32; MAX_RANK];
    let mut steps = [1i32; MAX_RANK];
    let mut shape = v.shape.clone();
    for i in 0..spec.axes.len() {
        let axis = norm_axis(spec.axes[i], rank)?;
        let step = spec.steps[i];
        let dim = v.shape[axis];
        let (start, len) = match (dim.as_constant(), spec.starts[i], spec.ends[i]) {
            (Some(d), SymInt::Int(s), SymInt::Int(e)) => {
                let (s, l) = slice_axis(d as i64, s, e, step);
                (s, Dim::constant(l.max(0) as u32))
            }
            (_, SymInt::Int(0), end) if step == 1 => {
                // Bounds that depend on a symbol: only prefixes [0, end) are representable.
                let end_dim = match end {
                    SymInt::Int(e) if e >= i32::MAX as i64 => dim,
                    SymInt::Int(e) if dim.as_constant().is_none() && e > 0 => {
                        return Err(NodeError::Unsupported(format!(
                            "slice end {e} on a variable axis"
                        )))
                    }
                    other => other.to_dim().ok_or(NodeError::Unsupported(
                        "slice to a negative end on a variable axis".into(),
                    ))?,
                };
                if let Some(extent) = dim.as_constant() {
                    check_prefix_fits(imp, cx, axis, end_dim, extent)?;
                }
                (0, end_dim)
            }
            _ => {
                return Err(NodeError::Unsupported(
                    "slice bounds that depend on a variable extent".into(),
                ))
            }
        };
        if len.factor == 0 {
            return Err(NodeError::Unsupported("empty slices".into()));
        }
        starts[axis] = start as u32;
        steps[axis] = step as i32;
        shape[axis] = len;
    }
    let dtype = v.dtype;
    if shape == v.shape && steps.iter().all(|&s| s == 1) && starts.iter().all(|&s| s == 0) {
        return Ok(Val::Runtime(x));
    }
    emit(imp, cx, Op::Slice { starts, steps }, vec![Some(x)], dtype, shape)
}

/// Rejects a slice `[0, end)` whose symbolic `end` passes the constant `extent` of its axis when
/// the symbols are at their maximums. ONNX clamps such an end to the extent, but the packed Slice
/// keeps `end` as the output extent and fails at run time, so the maximum must be lowered.
fn check_prefix_fits(
    imp: &Importer,
    cx: &Ctx<'_>,
    axis: usize,
    end: Dim,
    extent: u32,
) -> NodeResult<()> {
    let symbols = &imp.graph.symbols;
    let mut maxes = [1u64; MAX_SYMBOLS];
    for (max, symbol) in maxes.iter_mut().zip(symbols) {
        *max = u64::from(symbol.max);
    }
    let reach = end.eval(&maxes).unwrap_or(u64::MAX);
    if reach <= u64::from(extent) {
        return Ok(());
    }

    let used: Vec<usize> = (0..symbols.len()).filter(|&i| end.exponents[i] > 0).collect();
    let at_max: Vec<String> =
        used.iter().map(|&i| format!("{} = {}", symbols[i].name, symbols[i].max)).collect();
    let end_text = match end.as_symbol() {
        Some(_) => format_dim(end, symbols),
        None => format!("{} = {reach}", format_dim(end, symbols)),
    };
    let mut message = format!(
        "with {} (the maximum), the slice end {end_text} is past the extent {extent} of axis \
         {axis} of input {}",
        at_max.join(", "),
        cx.hint(0)
    );
    // With one symbol of exponent 1, the end is `factor * symbol`, so the limit is exact.
    if let [symbol] = used[..] {
        if end.exponents[symbol] == 1 {
            let limit = extent / end.factor;
            let option = match symbol_is_batch(imp, symbol) {
                true => "maximum batch size (--max-batch)",
                false => "maximum sequence length (--max-seq)",
            };
            message.push_str(&format!("; set the {option} to {limit} or less"));
        }
    }
    invalid(message)
}

/// Returns whether `symbol` first appears on axis 0 of a graph input, where the importer gives it
/// the maximum batch size, and not the maximum sequence length.
fn symbol_is_batch(imp: &Importer, symbol: usize) -> bool {
    let axis_of = |&input: &usize| {
        imp.graph.values[input].shape.iter().position(|d| d.as_symbol() == Some(symbol))
    };
    imp.graph.inputs.iter().find_map(axis_of) == Some(0)
}

/// Formats an extent such as `2*sequence` with the symbols' names.
fn format_dim(dim: Dim, symbols: &[crate::ir::Symbol]) -> String {
    let mut parts = Vec::new();
    if dim.factor != 1 || dim.exponents.iter().all(|&e| e == 0) {
        parts.push(dim.factor.to_string());
    }
    for (symbol, &exponent) in symbols.iter().zip(&dim.exponents) {
        for _ in 0..exponent {
            parts.push(symbol.name.clone());
        }
    }
    parts.join("*")
}

/// Extents of a window op's input: batch (maybe symbolic), channels, and 1 or 2 constant spatial
/// extents.
struct WindowInput {
    batch: Dim,
    channels: Dim,
    spatial: Vec<u32>,
}

fn window_input(imp: &Importer, x: usize) -> NodeResult<WindowInput> {
    let v = &imp.graph.values[x];
    if v.dtype != DType::F32 {
        return Err(NodeError::Unsupported(format!(
            "{:?} elements (only f32 is computed)",
            v.dtype
        )));
    }
    if !matches!(v.shape.len(), 3 | 4) {
        return Err(NodeError::Unsupported(format!(
            "input of rank {} (only 1-D and 2-D windows, NCL or NCHW)",
            v.shape.len()
        )));
    }
    let spatial = v.shape[2..]
        .iter()
        .map(|d| d.as_constant())
        .collect::<Option<Vec<u32>>>()
        .ok_or(NodeError::Unsupported("variable spatial extents".into()))?;
    Ok(WindowInput { batch: v.shape[0], channels: v.shape[1], spatial })
}

/// Per-axis integer attribute of `len` entries, `default` when absent.
fn axis_attr(cx: &Ctx<'_>, name: &str, len: usize, default: u32) -> NodeResult<Vec<u32>> {
    let Some(values) = attr_ints(cx.node, name) else {
        return Ok(vec![default; len]);
    };
    if values.len() != len {
        return invalid(format!("{name} has {} entries, expected {len}", values.len()));
    }
    values
        .iter()
        .map(|&v| u32::try_from(v).map_err(|_| NodeError::Invalid(format!("{name} entry {v}"))))
        .collect()
}

/// Resolves a node's window attributes (`strides`, `dilations`, `pads` or `auto_pad`) for the
/// input's spatial extents, and returns the 2-D window and the output's spatial extents. A 1-D
/// window becomes a 2-D one over a height of 1.
fn window_of(
    cx: &Ctx<'_>,
    spatial: &[u32],
    kernel: &[u32],
    ceil_mode: bool,
) -> NodeResult<(Window2d, Vec<u32>)> {
    let r = spatial.len();
    let strides = axis_attr(cx, "strides", r, 1)?;
    let dilations = axis_attr(cx, "dilations", r, 1)?;
    if [kernel, &strides, &dilations].iter().any(|v| v.contains(&0)) {
        return invalid("kernel extents, strides and dilations must be at least 1");
    }
    let auto_pad = attr_string(cx.node, "auto_pad").unwrap_or_default();
    let pads = match auto_pad.as_str() {
        "" | "NOTSET" => axis_attr(cx, "pads", 2 * r, 0)?,
        "VALID" => vec![0; 2 * r],
        "SAME_UPPER" | "SAME_LOWER" => {
            let mut pads = vec![0; 2 * r];
            for a in 0..r {
                let (input, stride) = (spatial[a] as u64, strides[a] as u64);
                let span = dilations[a] as u64 * (kernel[a] as u64 - 1) + 1;
                let total = ((input.div_ceil(stride) - 1) * stride + span).saturating_sub(input);
                let small = (total / 2) as u32;
                let large = (total - total / 2) as u32;
                let upper = auto_pad == "SAME_UPPER";
                pads[a] = if upper { small } else { large };
                pads[a + r] = if upper { large } else { small };
            }
            pads
        }
        other => return invalid(format!("unknown auto_pad {other:?}")),
    };
    // A 1-D window is a 2-D one whose height axis has extent 1 and a kernel of 1.
    let widen = |v: &[u32], fill: u32| if r == 1 { vec![fill, v[0]] } else { v.to_vec() };
    let (k, st, d) = (widen(kernel, 1), widen(&strides, 1), widen(&dilations, 1));
    let (begin, end) = (widen(&pads[..r], 0), widen(&pads[r..], 0));
    let window = Window2d {
        kernel: [k[0], k[1]],
        strides: [st[0], st[1]],
        pads: [begin[0], begin[1], end[0], end[1]],
        dilations: [d[0], d[1]],
    };
    let input = widen(spatial, 1);
    let mut out = Vec::with_capacity(r);
    // The added height axis of a 1-D window has no output extent of its own.
    for (axis, &extent) in input.iter().enumerate().skip(2 - r) {
        let extent = window.output_extent(axis, extent as u64, ceil_mode).ok_or_else(|| {
            NodeError::Invalid(format!("the kernel does not fit the padded input {spatial:?}"))
        })?;
        out.push(u32::try_from(extent).map_err(|_| NodeError::Invalid("overflow".into()))?);
    }
    Ok((window, out))
}

/// Adds a node with a new f32 output value named `value_name`.
fn push_node(
    imp: &mut Importer,
    node_name: String,
    value_name: &str,
    op: Op,
    inputs: Vec<Option<usize>>,
    shape: Vec<Dim>,
) -> usize {
    let out = imp.activation(value_name, DType::F32, shape);
    imp.graph.nodes.push(Node { name: node_name, op, inputs, outputs: vec![out] });
    out
}

/// Emits a window op on `x` with `channels` output channels. A 1-D input `[N, C, L]` is viewed
/// as `[N, C, 1, L]` around the op and the result reshaped back to `[N, channels, OL]`.
fn window_op(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    op: Op,
    x: usize,
    more_inputs: Vec<Option<usize>>,
    channels: Dim,
    out_spatial: &[u32],
) -> NodeResult<Val> {
    let input = window_input(imp, x)?;
    let mut out_shape = vec![input.batch, channels];
    out_shape.extend(out_spatial.iter().map(|&e| Dim::constant(e)));
    if input.spatial.len() == 2 {
        let mut inputs = vec![Some(x)];
        inputs.extend(more_inputs);
        return emit(imp, cx, op, inputs, DType::F32, out_shape);
    }
    let one = Dim::constant(1);
    let length = Dim::constant(input.spatial[0]);
    let x4_shape = vec![input.batch, input.channels, one, length];
    let x4_name = format!("{}.nchw", cx.hint(0));
    let x4 =
        push_node(imp, format!("{}.nchw", cx.name), &x4_name, Op::Reshape, vec![Some(x)], x4_shape);
    let mut inputs = vec![Some(x4)];
    inputs.extend(more_inputs);
    let y4_shape = vec![input.batch, channels, one, Dim::constant(out_spatial[0])];
    let y4_name = format!("{}.nchw", cx.node.output.first().map_or(cx.name, String::as_str));
    let y4 = push_node(imp, cx.name.to_owned(), &y4_name, op, inputs, y4_shape);
    emit(imp, cx, Op::Reshape, vec![Some(y4)], DType::F32, out_shape)
}

/// Lowers an ONNX Conv (1-D or 2-D) with a constant f32 weight `[O, C / group, k..]`, stored
/// flattened to `[O, C / group * kh * kw]`: the same bytes, one row per output channel.
fn conv(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let (w_shape, w_data) = match cx.konst(1)? {
        ConstTensor::F32 { shape, data } => (shape.clone(), data.clone()),
        _ => return Err(NodeError::Unsupported("a weight that is not a constant f32".into())),
    };
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let input = window_input(imp, x)?;
    if w_shape.len() != input.spatial.len() + 2 {
        return invalid(format!("weight shape {w_shape:?} does not match the input's rank"));
    }
    let channels = input
        .channels
        .as_constant()
        .ok_or(NodeError::Unsupported("a variable channel extent".into()))?
        as usize;
    let groups = attr_int(cx.node, "group", 1);
    let (outputs, per_group) = (w_shape[0], w_shape[1]);
    let groups_ok = groups >= 1 && per_group * groups as usize == channels;
    if !groups_ok || outputs % groups as usize != 0 {
        return invalid(format!(
            "group {groups} does not fit {channels} input channels and weight {w_shape:?}"
        ));
    }
    let kernel: Vec<u32> = w_shape[2..].iter().map(|&k| k as u32).collect();
    if let Some(declared) = attr_ints(cx.node, "kernel_shape") {
        if declared.iter().map(|&k| k as u32).ne(kernel.iter().copied()) {
            return invalid(format!("kernel_shape {declared:?} differs from weight {w_shape:?}"));
        }
    }
    let (window, out_spatial) = window_of(cx, &input.spatial, &kernel, false)?;

    let bias = match cx.opt(2) {
        Some(b) => {
            let id = imp.value_id(b, &cx.hint(2))?;
            let v = &imp.graph.values[id];
            if v.dtype != DType::F32 || v.shape != [Dim::constant(outputs as u32)] {
                return invalid(format!("bias {:?} is not f32 [{outputs}]", v.shape));
            }
            Some(id)
        }
        None => None,
    };
    let row = w_data.len() / outputs.max(1);
    // Keep the source weight's name, as for linear weights.
    let w_name = imp.unique_name(&cx.hint(1));
    let w = imp.graph.add_const(w_name, vec![outputs, row], Storage::F32(w_data));
    let op = Op::Conv2d {
        window,
        groups: groups as u32,
        activation_min: f32::NEG_INFINITY,
        activation_max: f32::INFINITY,
    };
    let out_channels = Dim::constant(outputs as u32);
    window_op(imp, cx, op, x, vec![Some(w), bias], out_channels, &out_spatial)
}

/// When the input of a Relu or Clip is the output of a 2-D convolution without a fused
/// activation, emits a copy of that convolution that clamps to `[min, max]` and returns its
/// output. The unfused convolution stays in the graph, and pruning removes it when nothing else
/// reads its output.
fn fuse_into_conv(imp: &mut Importer, cx: &Ctx<'_>, min: f32, max: f32) -> NodeResult<Option<Val>> {
    let Some(Val::Runtime(x)) = cx.opt(0) else {
        return Ok(None);
    };
    let Some(producer) = imp.graph.nodes.iter().rev().find(|n| n.outputs.contains(x)) else {
        return Ok(None);
    };
    let Op::Conv2d { window, groups, activation_min, activation_max } = producer.op else {
        return Ok(None);
    };
    if activation_min != f32::NEG_INFINITY || activation_max != f32::INFINITY {
        return Ok(None);
    }
    let inputs = producer.inputs.clone();
    let shape = imp.graph.values[*x].shape.clone();
    let op = Op::Conv2d { window, groups, activation_min: min, activation_max: max };
    emit(imp, cx, op, inputs, DType::F32, shape).map(Some)
}

/// Lowers AveragePool and MaxPool (1-D or 2-D).
fn pool(imp: &mut Importer, cx: &Ctx<'_>, kind: PoolKind) -> NodeResult<Val> {
    if cx.node.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err(NodeError::Unsupported("the indices output of MaxPool".into()));
    }
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let input = window_input(imp, x)?;
    let kernel = axis_attr(cx, "kernel_shape", input.spatial.len(), 0)?;
    let ceil_mode = attr_int(cx.node, "ceil_mode", 0) != 0;
    let count_include_pad = attr_int(cx.node, "count_include_pad", 0) != 0;
    let (window, out_spatial) = window_of(cx, &input.spatial, &kernel, ceil_mode)?;
    let op = Op::Pool { kind, window, count_include_pad, ceil_mode };
    window_op(imp, cx, op, x, vec![], input.channels, &out_spatial)
}

/// Lowers GlobalAveragePool and GlobalMaxPool to a mean or max over every spatial axis.
fn global_pool(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let v = &imp.graph.values[x];
    let rank = v.shape.len();
    if rank < 3 || v.dtype != DType::F32 {
        return invalid(format!(
            "global pooling needs an f32 input of rank >= 3, got {:?}",
            v.shape
        ));
    }
    let axes = (2..rank).fold(0u32, |mask, a| mask | 1 << a);
    let kind = if cx.node.op_type == "GlobalMaxPool" { ReduceKind::Max } else { ReduceKind::Mean };
    let mut shape = v.shape[..2].to_vec();
    shape.resize(rank, Dim::constant(1));
    emit(imp, cx, Op::Reduce { kind, axes, keep_dims: true }, vec![Some(x)], DType::F32, shape)
}
