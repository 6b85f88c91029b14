//! Lowerings of supported ONNX ops that take several runtime ops. They cover variadic Max and
//! Min, Clip with bounds computed at run time, Gemm with any operands and MatMul of vectors. They
//! also cover LayerNormalization over several axes or with its statistics outputs, Cast with
//! float16 rounding, and Dropout with its mask.

use edgefold_runtime::format::{DType, Dim, MAX_RANK};
use edgefold_runtime::ops::{BinaryKind, Op, ReduceKind, UnaryKind};

use super::consts::{ConstTensor, SymInt};
use super::fold::{cast_const, float_attr, norm_axis};
use super::lower::{broadcast_dims, emit, emit_output, linear, transposed, Ctx};
use super::proto::{attr_int, dtype_of, onnx_code, onnx_type, type_name};
use super::{invalid, Importer, NodeError, NodeResult, Val};
use crate::ir::{Node, ValueId};

/// Adds an intermediate node of a lowering. Its value is named after the node's first output with
/// `.suffix`, and [`finish`] gives the last value of the lowering the output's own name.
pub(super) fn step(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    suffix: &str,
    op: Op,
    inputs: Vec<Option<ValueId>>,
    dtype: DType,
    shape: Vec<Dim>,
) -> NodeResult<ValueId> {
    if shape.len() > MAX_RANK {
        return Err(NodeError::Unsupported("rank above 6".into()));
    }
    let base = cx.node.output.first().filter(|o| !o.is_empty()).map_or(cx.name, String::as_str);
    let out = imp.activation(&format!("{base}.{suffix}"), dtype, shape);
    let name = format!("{}.{suffix}", cx.name);
    imp.graph.nodes.push(Node { name, op, inputs, outputs: vec![out] });
    Ok(out)
}

/// Names value `id` after output `index` of the node and returns it.
pub(super) fn finish(imp: &mut Importer, cx: &Ctx<'_>, index: usize, id: ValueId) -> Val {
    if let Some(name) = cx.node.output.get(index).filter(|n| !n.is_empty()) {
        let name = imp.unique_name(name);
        imp.graph.values[id].name = name;
    }
    Val::Runtime(id)
}

/// Rejects values the runtime does not compute with: only f32 arithmetic runs.
pub(super) fn require_f32(imp: &Importer, ids: &[ValueId]) -> NodeResult<()> {
    match ids.iter().map(|&id| imp.graph.values[id].dtype).find(|&d| d != DType::F32) {
        Some(dtype) => Err(NodeError::Unsupported(format!("arithmetic on {dtype:?} values"))),
        None => Ok(()),
    }
}

/// Adds `a kind b` on f32 values, with broadcasting.
pub(super) fn binary_step(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    suffix: &str,
    kind: BinaryKind,
    a: ValueId,
    b: ValueId,
) -> NodeResult<ValueId> {
    require_f32(imp, &[a, b])?;
    let (sa, sb) = (&imp.graph.values[a].shape, &imp.graph.values[b].shape);
    let shape = broadcast_dims(sa, sb)
        .ok_or_else(|| NodeError::Invalid(format!("shapes {sa:?} and {sb:?} do not broadcast")))?;
    step(imp, cx, suffix, Op::Binary(kind), vec![Some(a), Some(b)], DType::F32, shape)
}

/// Adds `op` on one value, keeping its type and shape.
pub(super) fn same_step(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    suffix: &str,
    op: Op,
    x: ValueId,
) -> NodeResult<ValueId> {
    let (dtype, shape) = (imp.graph.values[x].dtype, imp.graph.values[x].shape.clone());
    step(imp, cx, suffix, op, vec![Some(x)], dtype, shape)
}

/// Adds a reshape of `x` to `shape`, or returns `x` when the shape is already that.
pub(super) fn reshape_step(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    suffix: &str,
    x: ValueId,
    shape: Vec<Dim>,
) -> NodeResult<ValueId> {
    if imp.graph.values[x].shape == shape {
        return Ok(x);
    }
    let dtype = imp.graph.values[x].dtype;
    step(imp, cx, suffix, Op::Reshape, vec![Some(x)], dtype, shape)
}

/// Adds the transpose of a rank-2 value.
fn transpose_step(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    suffix: &str,
    x: ValueId,
) -> NodeResult<ValueId> {
    let v = &imp.graph.values[x];
    if v.shape.len() != 2 {
        return invalid(format!("gemm operand of shape {:?} is not a matrix", v.shape));
    }
    let (dtype, shape) = (v.dtype, vec![v.shape[1], v.shape[0]]);
    let perm = [1, 0, 2, 3, 4, 5];
    step(imp, cx, suffix, Op::Transpose { perm }, vec![Some(x)], dtype, shape)
}

/// Adds a constant f32 `[1]` holding `value`.
pub(super) fn scalar(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    suffix: &str,
    value: f32,
) -> NodeResult<ValueId> {
    let c = Val::Const(ConstTensor::F32 { shape: vec![1], data: vec![value] });
    imp.value_id(&c, &format!("{}.{suffix}", cx.name))
}

/// Lowers Max or Min over any number of inputs to a chain of binary ops.
pub(super) fn variadic(imp: &mut Importer, cx: &Ctx<'_>, kind: BinaryKind) -> NodeResult<Val> {
    let present: Vec<usize> = (0..cx.inputs.len()).filter(|&i| cx.opt(i).is_some()).collect();
    let Some((&first, rest)) = present.split_first() else {
        return invalid("no inputs");
    };
    if rest.is_empty() {
        return Ok(cx.input(first)?.clone());
    }
    let mut acc = imp.value_id(cx.input(first)?, &cx.hint(first))?;
    for &i in rest {
        let next = imp.value_id(cx.input(i)?, &cx.hint(i))?;
        acc = binary_step(imp, cx, &format!("step{i}"), kind, acc, next)?;
    }
    Ok(finish(imp, cx, 0, acc))
}

/// Lowers Clip (opset 11 and later) whose bounds are computed at run time to Max with the lower
/// bound, then Min with the upper bound. Like the ONNX definition, a lower bound above the upper
/// bound yields the upper bound.
pub(super) fn clip_runtime(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let mut y = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    for (i, kind, suffix) in [(1, BinaryKind::Max, "min"), (2, BinaryKind::Min, "max")] {
        if let Some(bound) = cx.opt(i) {
            let b = imp.value_id(bound, &cx.hint(i))?;
            if imp.graph.values[b].shape.iter().any(|d| *d != Dim::constant(1)) {
                return invalid("clip bounds must be scalars");
            }
            y = binary_step(imp, cx, suffix, kind, y, b)?;
        }
    }
    Ok(finish(imp, cx, 0, y))
}

/// Lowers Gemm, `alpha * A' B' + beta * C`. A constant f32 matrix B becomes a linear op's weight
/// (with alpha folded in) and a constant C with one value per output, or a single value, its bias.
/// Any other B goes through a matrix product, and any other C through an addition.
pub(super) fn gemm(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let node = cx.node;
    let alpha = float_attr(node, "alpha", 1.0);
    let beta = float_attr(node, "beta", 1.0);
    let trans_b = attr_int(node, "transB", 0) != 0;
    let mut a = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    require_f32(imp, &[a])?;
    if attr_int(node, "transA", 0) != 0 {
        a = transpose_step(imp, cx, "a_t", a)?;
    }

    if let Val::Const(ConstTensor::F32 { shape, data }) = cx.input(1)? {
        if shape.len() == 2 {
            let (n, k, mut w) = if trans_b {
                (shape[0], shape[1], data.clone())
            } else {
                (shape[1], shape[0], transposed(data, shape[0], shape[1]))
            };
            w.iter_mut().for_each(|v| *v *= alpha);
            let bias = match cx.opt(2) {
                Some(Val::Const(c)) => c.to_f32().filter(|v| v.len() == 1 || v.len() == n),
                _ => None,
            };
            let Some(c) = cx.opt(2).filter(|_| bias.is_none()) else {
                let bias = bias.map(|v| (0..n).map(|i| v[i % v.len()] * beta).collect());
                return linear(imp, cx, a, w, n, k, bias);
            };
            let Val::Runtime(y) = linear(imp, cx, a, w, n, k, None)? else {
                return invalid("linear returned a constant");
            };
            imp.graph.values[y].name = imp.unique_name(&format!("{}.product", cx.name));
            let c = c.clone();
            return add_gemm_bias(imp, cx, y, &c, beta);
        }
    }

    let mut b = imp.value_id(cx.input(1)?, &cx.hint(1))?;
    require_f32(imp, &[b])?;
    if trans_b {
        b = transpose_step(imp, cx, "b_t", b)?;
    }
    let (sa, sb) = (imp.graph.values[a].shape.clone(), imp.graph.values[b].shape.clone());
    if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
        return invalid(format!("gemm operands {sa:?} and {sb:?} do not multiply"));
    }
    let shape = vec![sa[0], sb[1]];
    let mut y = step(imp, cx, "product", Op::MatMul, vec![Some(a), Some(b)], DType::F32, shape)?;
    if alpha != 1.0 {
        let s = scalar(imp, cx, "alpha", alpha)?;
        y = binary_step(imp, cx, "scaled", BinaryKind::Mul, y, s)?;
    }
    match cx.opt(2).cloned() {
        Some(c) => add_gemm_bias(imp, cx, y, &c, beta),
        None => Ok(finish(imp, cx, 0, y)),
    }
}

/// Adds `beta * c` to the product `y` of a Gemm.
fn add_gemm_bias(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    y: ValueId,
    c: &Val,
    beta: f32,
) -> NodeResult<Val> {
    let mut c = imp.value_id(c, &cx.hint(2))?;
    if beta != 1.0 {
        let s = scalar(imp, cx, "beta", beta)?;
        c = binary_step(imp, cx, "c_scaled", BinaryKind::Mul, c, s)?;
    }
    let sum = binary_step(imp, cx, "sum", BinaryKind::Add, y, c)?;
    if imp.graph.values[sum].shape != imp.graph.values[y].shape {
        return invalid("gemm bias does not broadcast to the product");
    }
    Ok(finish(imp, cx, 0, sum))
}

/// Lowers MatMul where an operand is a vector, as NumPy does: a vector on the left is a `[1, K]`
/// row and a vector on the right a `[K, 1]` column, and the added axes are removed afterwards.
pub(super) fn matmul_vectors(
    imp: &mut Importer,
    cx: &Ctx<'_>,
    a: ValueId,
    b: ValueId,
) -> NodeResult<Val> {
    require_f32(imp, &[a, b])?;
    let (sa, sb) = (imp.graph.values[a].shape.clone(), imp.graph.values[b].shape.clone());
    if sa.is_empty() || sb.is_empty() {
        return invalid("matmul of a scalar");
    }
    let one = Dim::constant(1);

    let a2 = match sa.len() {
        1 => reshape_step(imp, cx, "row", a, vec![one, sa[0]])?,
        _ => a,
    };
    let b2 = match sb.len() {
        1 => reshape_step(imp, cx, "column", b, vec![sb[0], one])?,
        _ => b,
    };

    let (sa2, sb2) = (imp.graph.values[a2].shape.clone(), imp.graph.values[b2].shape.clone());
    if sa2[sa2.len() - 1] != sb2[sb2.len() - 2] {
        return invalid(format!("matmul inner extents differ: {sa:?} x {sb:?}"));
    }
    let mut shape = broadcast_dims(&sa2[..sa2.len() - 2], &sb2[..sb2.len() - 2])
        .ok_or(NodeError::Invalid("matmul batch axes do not broadcast".into()))?;
    let batch = shape.clone();
    shape.push(sa2[sa2.len() - 2]);
    shape.push(sb2[sb2.len() - 1]);
    let y = step(imp, cx, "product", Op::MatMul, vec![Some(a2), Some(b2)], DType::F32, shape)?;

    let mut out = batch;
    if sa.len() > 1 {
        out.push(sa[sa.len() - 2]);
    }
    if sb.len() > 1 {
        out.push(sb[sb.len() - 1]);
    }
    emit(imp, cx, Op::Reshape, vec![Some(y)], DType::F32, out)
}

/// Product of extents, when representable.
fn product(dims: &[Dim]) -> NodeResult<Dim> {
    dims.iter()
        .try_fold(Dim::constant(1), |acc, d| acc.checked_mul(*d))
        .ok_or(NodeError::Unsupported("an extent product that overflows".into()))
}

/// Lowers LayerNormalization. Normalization over the last axis is one op. Over several trailing
/// axes, x is viewed as `[outer, inner]` around the op and the scale and bias as `[inner]`. The
/// optional Mean and InvStdDev outputs are computed with reductions over the normalized axes.
pub(super) fn layer_norm(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Vec<Val>> {
    let node = cx.node;
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    require_f32(imp, &[x])?;
    let x_shape = imp.graph.values[x].shape.clone();
    let rank = x_shape.len();
    let axis = norm_axis(attr_int(node, "axis", -1), rank)?;
    let epsilon = float_attr(node, "epsilon", 1e-5);
    let inner = product(&x_shape[axis..])?;
    if inner.as_constant().is_none() {
        return Err(NodeError::Unsupported("normalized axes of variable extent".into()));
    }
    let outer = product(&x_shape[..axis])?;
    let flat = |imp: &mut Importer, i: usize, suffix: &str| -> NodeResult<Option<ValueId>> {
        let Some(v) = cx.opt(i) else { return Ok(None) };
        let id = imp.value_id(v, &cx.hint(i))?;
        require_f32(imp, &[id])?;
        if product(&imp.graph.values[id].shape)? != inner {
            return Err(NodeError::Unsupported(
                "a scale or bias that is broadcast over the normalized axes".into(),
            ));
        }
        reshape_step(imp, cx, suffix, id, vec![inner]).map(Some)
    };
    let gamma = flat(imp, 1, "scale")?.ok_or(NodeError::Invalid("scale is missing".into()))?;
    let beta = flat(imp, 2, "bias")?;
    let op = Op::LayerNorm { epsilon };
    let y = if axis + 1 == rank {
        emit(imp, cx, op, vec![Some(x), Some(gamma), beta], DType::F32, x_shape.clone())?
    } else {
        let x2 = reshape_step(imp, cx, "rows", x, vec![outer, inner])?;
        let shape = vec![outer, inner];
        let y2 =
            step(imp, cx, "normalized", op, vec![Some(x2), Some(gamma), beta], DType::F32, shape)?;
        emit(imp, cx, Op::Reshape, vec![Some(y2)], DType::F32, x_shape.clone())?
    };

    let wants = |i: usize| node.output.get(i).is_some_and(|o| !o.is_empty());
    if !wants(1) && !wants(2) {
        return Ok(vec![y]);
    }
    let axes = (axis..rank).fold(0u32, |mask, a| mask | 1 << a);
    let mean_op = Op::Reduce { kind: ReduceKind::Mean, axes, keep_dims: true };
    let mut reduced = x_shape[..axis].to_vec();
    reduced.resize(rank, Dim::constant(1));
    let mean = step(imp, cx, "mean", mean_op, vec![Some(x)], DType::F32, reduced.clone())?;
    let deviation = binary_step(imp, cx, "deviation", BinaryKind::Sub, x, mean)?;
    let square = binary_step(imp, cx, "square", BinaryKind::Mul, deviation, deviation)?;
    let variance = step(imp, cx, "variance", mean_op, vec![Some(square)], DType::F32, reduced)?;
    let eps = scalar(imp, cx, "epsilon", epsilon)?;
    let shifted = binary_step(imp, cx, "shifted", BinaryKind::Add, variance, eps)?;
    let sqrt = Op::Unary { kind: UnaryKind::Sqrt, alpha: 0.0, beta: 0.0 };
    let deviation = same_step(imp, cx, "std", sqrt, shifted)?;
    let reciprocal = Op::Unary { kind: UnaryKind::Reciprocal, alpha: 0.0, beta: 0.0 };
    let inverse = same_step(imp, cx, "inv_std", reciprocal, deviation)?;
    let mean = finish(imp, cx, 1, mean);
    let inverse = finish(imp, cx, 2, inverse);
    Ok(vec![y, mean, inverse])
}

/// Lowers Cast.
pub(super) fn cast(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    cast_to(imp, cx, attr_int(cx.node, "to", onnx_type::FLOAT as i64) as i32)
}

/// Lowers CastLike, a Cast to the element type of input 1: the type the file declares for it, or
/// else the type the importer stores it as.
pub(super) fn cast_like(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let like = cx.node.input.get(1).map(String::as_str).unwrap_or_default();
    let code = match imp.declared_type(like) {
        Some(code) => code,
        None => match cx.input(1)? {
            Val::Const(c) => onnx_code(c.dtype()),
            other => {
                let id = imp.value_id(other, &cx.hint(1))?;
                onnx_code(imp.graph.values[id].dtype)
            }
        },
    };
    cast_to(imp, cx, code)
}

/// Lowers a cast to ONNX element type `code`. A cast to float16 is a cast to f16 and back, which
/// rounds the values as the float16 type does while later ops keep computing in f32.
fn cast_to(imp: &mut Importer, cx: &Ctx<'_>, code: i32) -> NodeResult<Val> {
    if let Val::Const(c) = cx.input(0)? {
        return Ok(Val::Const(cast_const(c, code)?));
    }
    if code == onnx_type::BFLOAT16 {
        return Err(NodeError::Unsupported(
            "cast to bfloat16 (values are kept in f32 and would not be rounded)".into(),
        ));
    }
    let to = dtype_of(code)
        .ok_or_else(|| NodeError::Unsupported(format!("cast to {}", type_name(code))))?;
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let v = &imp.graph.values[x];
    if code == onnx_type::FLOAT16 {
        let shape = v.shape.clone();
        let half = step(imp, cx, "f16", Op::Cast, vec![Some(x)], DType::F16, shape.clone())?;
        return emit(imp, cx, Op::Cast, vec![Some(half)], DType::F32, shape);
    }
    if v.dtype == to {
        return Ok(Val::Runtime(x));
    }
    let shape = v.shape.clone();
    emit(imp, cx, Op::Cast, vec![Some(x)], to, shape)
}

/// Returns whether a constant's first value is nonzero.
fn truthy(c: &ConstTensor) -> NodeResult<bool> {
    let first = match c {
        ConstTensor::F32 { data, .. } => data.first().map(|&v| v != 0.0),
        ConstTensor::Int { data, .. } => data.first().and_then(|v| v.as_int()).map(|v| v != 0),
    };
    first.ok_or(NodeError::Invalid("an empty or symbolic scalar".into()))
}

/// Lowers Dropout for inference: the output is the input and the optional mask is all true. In
/// training mode only a ratio of 0 is accepted, because other ratios drop values at random.
pub(super) fn dropout(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Vec<Val>> {
    let training = match cx.opt(2) {
        None => false,
        Some(Val::Const(c)) => truthy(c)?,
        Some(_) => return Err(NodeError::Unsupported("training_mode computed at run time".into())),
    };
    if training {
        let ratio = match cx.opt(1) {
            None => 0.5,
            Some(Val::Const(c)) => c.to_f32().and_then(|v| v.first().copied()).unwrap_or(0.5),
            Some(_) => return Err(NodeError::Unsupported("ratio computed at run time".into())),
        };
        if ratio != 0.0 {
            return Err(NodeError::Unsupported(
                "training mode with a nonzero ratio (values are dropped at random)".into(),
            ));
        }
    }
    let x = cx.input(0)?.clone();
    if cx.node.output.get(1).is_none_or(|o| o.is_empty()) {
        return Ok(vec![x]);
    }
    let mask = match &x {
        Val::Const(c) => {
            let shape = c.shape().to_vec();
            let data = vec![SymInt::Int(1); shape.iter().product()];
            Val::Const(ConstTensor::Int { shape, data, dtype: DType::Bool })
        }
        _ => {
            let id = imp.value_id(&x, &cx.hint(0))?;
            let shape = imp.graph.values[id].shape.clone();
            let one =
                ConstTensor::Int { shape: vec![1], data: vec![SymInt::Int(1)], dtype: DType::Bool };
            let one = imp.value_id(&Val::Const(one), &format!("{}.true", cx.name))?;
            emit_output(imp, cx, 1, Op::Expand, vec![Some(one)], DType::Bool, shape)?
        }
    };
    Ok(vec![x, mask])
}
