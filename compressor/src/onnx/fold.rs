//! Evaluation of nodes whose inputs are all constant: weights stored in another type and
//! converted in the graph, and the shape arithmetic exporters emit (Shape, Gather, Concat, ...),
//! with symbolic extents kept exact.

use std::path::Path;

use edgefold_runtime::format::DType;
use tract_onnx::pb::NodeProto;

use super::consts::{
    broadcast_index, broadcast_shape, pick, rearrange, strides, transpose_index, ConstTensor,
    SymInt,
};
use super::proto::{attr, attr_float, attr_int, attr_ints, dtype_of, onnx_type, tensor, type_name};
use super::{invalid, NodeError, NodeResult};

/// Folds a node with constant inputs; `Ok(None)` when it must run at run time instead.
pub(crate) fn fold(
    node: &NodeProto,
    inputs: &[Option<&ConstTensor>],
    opset: i64,
    model_dir: &Path,
) -> NodeResult<Option<Vec<ConstTensor>>> {
    let input = |i: usize| -> NodeResult<&ConstTensor> {
        inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| NodeError::Invalid(format!("input {i} is missing")))
    };
    let one = |t: ConstTensor| Ok(Some(vec![t]));
    match node.op_type.as_str() {
        "Constant" => {
            if let Some(a) = attr(node, "value") {
                let t =
                    a.t.as_ref()
                        .ok_or(NodeError::Invalid("value attribute without a tensor".into()))?;
                if dtype_of(t.data_type).is_none() {
                    let name = type_name(t.data_type);
                    return Err(NodeError::Unsupported(format!("a constant of type {name}")));
                }
                return one(tensor(t, model_dir).map_err(NodeError::Invalid)?);
            }
            if let Some(a) = attr(node, "value_float") {
                return one(ConstTensor::F32 { shape: vec![], data: vec![a.f] });
            }
            if let Some(a) = attr(node, "value_floats") {
                return one(ConstTensor::F32 {
                    shape: vec![a.floats.len()],
                    data: a.floats.clone(),
                });
            }
            if let Some(a) = attr(node, "value_int") {
                return one(ConstTensor::Int {
                    shape: vec![],
                    data: vec![SymInt::Int(a.i)],
                    dtype: DType::I64,
                });
            }
            if let Some(a) = attr(node, "value_ints") {
                return one(ConstTensor::ints(a.ints.iter().map(|&v| SymInt::Int(v)).collect()));
            }
            Err(NodeError::Unsupported(
                "Constant without a value, value_float(s) or value_int(s)".into(),
            ))
        }
        // Dropout is lowered, which also handles its mask output and training mode.
        "Identity" => Ok(Some(vec![input(0)?.clone()])),
        "Shape" => {
            let dims: Vec<SymInt> =
                input(0)?.shape().iter().map(|&d| SymInt::Int(d as i64)).collect();
            one(shape_slice(node, dims))
        }
        "Size" => {
            let n: usize = input(0)?.shape().iter().product();
            one(ConstTensor::Int {
                shape: vec![],
                data: vec![SymInt::Int(n as i64)],
                dtype: DType::I64,
            })
        }
        "Cast" => one(cast_const(input(0)?, attr_int(node, "to", 1) as i32)?),
        "Gather" => {
            let data = input(0)?;
            let idx = input(1)?
                .known_ints()
                .ok_or(NodeError::Unsupported("symbolic gather indices".into()))?;
            let axis = norm_axis(attr_int(node, "axis", 0), data.shape().len())?;
            let (at, shape) = gather_index(data.shape(), axis, &idx, input(1)?.shape())?;
            one(rearrange(data, &at, shape))
        }
        "Unsqueeze" | "Squeeze" | "Reshape" | "Flatten" => {
            let data = input(0)?;
            let shape = match node.op_type.as_str() {
                "Reshape" => {
                    let spec = input(1)?
                        .known_ints()
                        .ok_or(NodeError::Unsupported("symbolic reshape".into()))?;
                    reshape_target(data.shape(), &spec, attr_int(node, "allowzero", 0) != 0)?
                }
                "Flatten" => {
                    let axis = flatten_axis(attr_int(node, "axis", 1), data.shape().len())?;
                    let s = data.shape();
                    vec![s[..axis].iter().product(), s[axis..].iter().product()]
                }
                op => {
                    let axes = axes_of(node, inputs, opset, 13)?;
                    if op == "Unsqueeze" {
                        unsqueeze_shape(data.shape(), &axes.unwrap_or_default())?
                    } else {
                        squeeze_shape(data.shape(), axes.as_deref())?
                    }
                }
            };
            one(data.reshaped(shape))
        }
        "Concat" => {
            let parts: Vec<&ConstTensor> = inputs.iter().flatten().copied().collect();
            let rank = parts.first().map_or(0, |p| p.shape().len());
            let axis = norm_axis(attr_int(node, "axis", 0), rank)?;
            one(concat(&parts, axis)?)
        }
        "Slice" => {
            let data = input(0)?;
            let spec = slice_spec(node, inputs, opset)?;
            let Some(spec) = spec.known() else { return Ok(None) };
            let (at, shape) = slice_index(data.shape(), &spec)?;
            one(rearrange(data, &at, shape))
        }
        "Transpose" => {
            let data = input(0)?;
            let rank = data.shape().len();
            let perm = perm_of(node, rank)?;
            let (at, shape) = transpose_index(data.shape(), &perm);
            one(rearrange(data, &at, shape))
        }
        "ConstantOfShape" => {
            let shape = input(0)?.known_ints();
            let Some(shape) = shape else { return Ok(None) };
            let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            let n: usize = shape.iter().product();
            let value = match attr(node, "value").and_then(|a| a.t.as_ref()) {
                Some(t) => tensor(t, model_dir).map_err(NodeError::Invalid)?,
                None => ConstTensor::F32 { shape: vec![1], data: vec![0.0] },
            };
            one(match value {
                ConstTensor::F32 { data, .. } => ConstTensor::F32 { shape, data: vec![data[0]; n] },
                ConstTensor::Int { data, dtype, .. } => {
                    ConstTensor::Int { shape, data: vec![data[0]; n], dtype }
                }
            })
        }
        "Expand" => {
            let data = input(0)?;
            let target =
                input(1)?.known_ints().ok_or(NodeError::Unsupported("symbolic expand".into()))?;
            let target: Vec<usize> = target.iter().map(|&d| d.max(0) as usize).collect();
            let shape = broadcast_shape(data.shape(), &target)
                .ok_or(NodeError::Invalid("expand shapes do not broadcast".into()))?;
            let at = broadcast_index(data.shape(), &shape);
            one(rearrange(data, &at, shape))
        }
        "Range" => {
            let (s, l, d) = (scalar_f(input(0)?)?, scalar_f(input(1)?)?, scalar_f(input(2)?)?);
            if d == 0.0 {
                return invalid("range with delta 0");
            }
            let n = ((l - s) / d).ceil().max(0.0) as usize;
            match input(0)? {
                ConstTensor::F32 { .. } => one(ConstTensor::F32 {
                    shape: vec![n],
                    data: (0..n).map(|i| (s + i as f64 * d) as f32).collect(),
                }),
                ConstTensor::Int { dtype, .. } => one(ConstTensor::Int {
                    shape: vec![n],
                    data: (0..n).map(|i| SymInt::Int((s + i as f64 * d) as i64)).collect(),
                    dtype: *dtype,
                }),
            }
        }
        "Where" => {
            let (c, x, y) = (input(0)?, input(1)?, input(2)?);
            let cond = c.known_ints().ok_or(NodeError::Unsupported("symbolic condition".into()))?;
            let shape = broadcast_shape(c.shape(), x.shape())
                .and_then(|s| broadcast_shape(&s, y.shape()))
                .ok_or(NodeError::Invalid("where operands do not broadcast".into()))?;
            let (ic, ix, iy) = (
                broadcast_index(c.shape(), &shape),
                broadcast_index(x.shape(), &shape),
                broadcast_index(y.shape(), &shape),
            );
            let choose = |i: usize| cond[ic[i]] != 0;
            let n = ic.len();
            match (x, y) {
                (ConstTensor::F32 { data: a, .. }, ConstTensor::F32 { data: b, .. }) => {
                    one(ConstTensor::F32 {
                        shape,
                        data: (0..n).map(|i| if choose(i) { a[ix[i]] } else { b[iy[i]] }).collect(),
                    })
                }
                (ConstTensor::Int { data: a, dtype, .. }, ConstTensor::Int { data: b, .. }) => {
                    one(ConstTensor::Int {
                        shape,
                        data: (0..n).map(|i| if choose(i) { a[ix[i]] } else { b[iy[i]] }).collect(),
                        dtype: *dtype,
                    })
                }
                _ => invalid("where branches have different element types"),
            }
        }
        "Max" | "Min" => {
            let mut present = inputs.iter().flatten();
            let mut acc = (*present.next().ok_or(NodeError::Invalid("no inputs".into()))?).clone();
            for next in present {
                match binary(&node.op_type, &acc, next)? {
                    Some(t) => acc = t,
                    None => return Ok(None),
                }
            }
            one(acc)
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "Greater" | "And" | "Or"
        | "Mod" => binary(&node.op_type, input(0)?, input(1)?).map(|t| t.map(|t| vec![t])),
        "ReduceMax" | "ReduceMin" | "ReduceSum" | "ReduceMean" => {
            let (ConstTensor::F32 { shape, data }, Some(axes)) =
                (input(0)?, reduce_axes(node, inputs, opset)?)
            else {
                return Ok(None);
            };
            let keep_dims = attr_int(node, "keepdims", 1) != 0;
            one(reduce(&node.op_type, shape, data, &axes, keep_dims)?)
        }
        "Not" => {
            let v = input(0)?.known_ints().ok_or(NodeError::Unsupported("symbolic Not".into()))?;
            one(ConstTensor::Int {
                shape: input(0)?.shape().to_vec(),
                data: v.iter().map(|&b| SymInt::Int((b == 0) as i64)).collect(),
                dtype: DType::Bool,
            })
        }
        "Sqrt" | "Neg" | "Reciprocal" | "Exp" | "Erf" | "Tanh" | "Relu" | "Abs" | "Sigmoid"
        | "Log" => {
            let x = input(0)?;
            if let ConstTensor::Int { data, dtype, .. } = x {
                if node.op_type == "Neg" || node.op_type == "Abs" {
                    let f = |v: i64| if node.op_type == "Neg" { -v } else { v.abs() };
                    let data: Option<Vec<SymInt>> =
                        data.iter().map(|v| v.as_int().map(|v| SymInt::Int(f(v)))).collect();
                    let data = data.ok_or(NodeError::Unsupported("symbolic arithmetic".into()))?;
                    return one(ConstTensor::Int {
                        shape: x.shape().to_vec(),
                        data,
                        dtype: *dtype,
                    });
                }
            }
            let data = x.to_f32().ok_or(NodeError::Unsupported("symbolic arithmetic".into()))?;
            let f: fn(f32) -> f32 = match node.op_type.as_str() {
                "Sqrt" => f32::sqrt,
                "Neg" => |v| -v,
                "Reciprocal" => |v| 1.0 / v,
                "Exp" => f32::exp,
                "Erf" => |v| libm_erf(v),
                "Tanh" => f32::tanh,
                "Relu" => |v| v.max(0.0),
                "Abs" => f32::abs,
                "Sigmoid" => |v| 1.0 / (1.0 + (-v).exp()),
                _ => f32::ln,
            };
            one(ConstTensor::F32 {
                shape: x.shape().to_vec(),
                data: data.into_iter().map(f).collect(),
            })
        }
        "DequantizeLinear" => {
            let x =
                input(0)?.to_f32().ok_or(NodeError::Invalid("symbolic quantized data".into()))?;
            let scale = input(1)?.to_f32().ok_or(NodeError::Invalid("invalid scale".into()))?;
            let zero = match inputs.get(2).copied().flatten() {
                Some(z) => z.to_f32().ok_or(NodeError::Invalid("invalid zero point".into()))?,
                None => vec![0.0],
            };
            let shape = input(0)?.shape().to_vec();
            let axis = norm_axis(attr_int(node, "axis", 1), shape.len().max(1))?;
            let st = strides(&shape);
            let data = x
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    let c = if scale.len() == 1 { 0 } else { (i / st[axis]) % shape[axis] };
                    (q - zero[c.min(zero.len() - 1)]) * scale[c]
                })
                .collect();
            one(ConstTensor::F32 { shape, data })
        }
        _ => Ok(None),
    }
}

fn libm_erf(v: f32) -> f32 {
    edgefold_runtime::kernels::generic::erf(v)
}

fn scalar_f(t: &ConstTensor) -> NodeResult<f64> {
    match t {
        ConstTensor::F32 { data, .. } if data.len() == 1 => Ok(data[0] as f64),
        ConstTensor::Int { data, .. } if data.len() == 1 => data[0]
            .as_int()
            .map(|v| v as f64)
            .ok_or(NodeError::Unsupported("symbolic range".into())),
        _ => invalid("expected a scalar"),
    }
}

/// Reduced axes of a reduction node with constant axes, in ascending order; `Some(vec![])` when
/// `noop_with_empty_axes` leaves the input unchanged.
fn reduce_axes(
    node: &NodeProto,
    inputs: &[Option<&ConstTensor>],
    opset: i64,
) -> NodeResult<Option<Vec<usize>>> {
    let input_from = if node.op_type == "ReduceSum" { 13 } else { 18 };
    let rank = inputs.first().copied().flatten().map_or(0, |t| t.shape().len());
    let axes = match axes_of(node, inputs, opset, input_from)? {
        Some(a) if !a.is_empty() => a,
        _ if attr_int(node, "noop_with_empty_axes", 0) != 0 => return Ok(Some(Vec::new())),
        _ => (0..rank as i64).collect(),
    };
    let mut axes = axes.iter().map(|&a| norm_axis(a, rank)).collect::<NodeResult<Vec<_>>>()?;
    axes.sort_unstable();
    axes.dedup();
    Ok(Some(axes))
}

/// Max, min, sum or mean of constant f32 data over `axes`.
fn reduce(
    op: &str,
    shape: &[usize],
    data: &[f32],
    axes: &[usize],
    keep_dims: bool,
) -> NodeResult<ConstTensor> {
    let kept: Vec<usize> =
        shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let (init, combine): (f32, fn(f32, f32) -> f32) = match op {
        "ReduceMax" => (f32::NEG_INFINITY, f32::max),
        "ReduceMin" => (f32::INFINITY, f32::min),
        _ => (0.0, |a, b| a + b),
    };
    let mut out = vec![init; kept.iter().product()];
    let out_strides = strides(&kept);
    let mut index = vec![0usize; shape.len()];
    for &v in data {
        let at: usize =
            (0..shape.len()).filter(|a| !axes.contains(a)).map(|a| index[a] * out_strides[a]).sum();
        out[at] = combine(out[at], v);
        for ax in (0..shape.len()).rev() {
            index[ax] += 1;
            if index[ax] < shape[ax] {
                break;
            }
            index[ax] = 0;
        }
    }
    if op == "ReduceMean" {
        let count: usize = axes.iter().map(|&a| shape[a]).product();
        out.iter_mut().for_each(|v| *v /= count as f32);
    }
    let shape = if keep_dims {
        kept
    } else {
        shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
    };
    Ok(ConstTensor::F32 { shape, data: out })
}

/// Applies the optional `start` and `end` attributes of Shape (opset 15).
pub(crate) fn shape_slice(node: &NodeProto, dims: Vec<SymInt>) -> ConstTensor {
    let rank = dims.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(attr_int(node, "start", 0));
    let end = clamp(attr_int(node, "end", rank));
    ConstTensor::ints(dims[start..end.max(start)].to_vec())
}

pub(crate) fn norm_axis(axis: i64, rank: usize) -> NodeResult<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank.max(1) {
        return invalid(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// Returns the axis of a Flatten node on an input of rank `rank`, in `0..=rank`. Negative values
/// count from `rank`.
pub(crate) fn flatten_axis(axis: i64, rank: usize) -> NodeResult<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize > rank {
        return invalid(format!("flatten axis {axis} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// Axes from the attribute (before `input_from`) or the second input.
pub(crate) fn axes_of(
    node: &NodeProto,
    inputs: &[Option<&ConstTensor>],
    opset: i64,
    input_from: i64,
) -> NodeResult<Option<Vec<i64>>> {
    if opset >= input_from {
        if let Some(Some(t)) = inputs.get(1) {
            return t.known_ints().map(Some).ok_or(NodeError::Unsupported("symbolic axes".into()));
        }
    }
    Ok(attr_ints(node, "axes"))
}

pub(crate) fn unsqueeze_shape<T: Copy + From<u8>>(shape: &[T], axes: &[i64]) -> NodeResult<Vec<T>> {
    let rank = shape.len() + axes.len();
    let mut norm: Vec<usize> =
        axes.iter().map(|&a| norm_axis(a, rank)).collect::<NodeResult<_>>()?;
    norm.sort_unstable();
    let mut out = Vec::with_capacity(rank);
    let mut it = shape.iter();
    for i in 0..rank {
        if norm.binary_search(&i).is_ok() {
            out.push(T::from(1));
        } else {
            out.push(*it.next().ok_or(NodeError::Invalid("repeated unsqueeze axes".into()))?);
        }
    }
    Ok(out)
}

pub(crate) fn squeeze_shape<T: Copy + PartialEq + From<u8>>(
    shape: &[T],
    axes: Option<&[i64]>,
) -> NodeResult<Vec<T>> {
    let one = T::from(1);
    match axes {
        None => Ok(shape.iter().copied().filter(|&d| d != one).collect()),
        Some(axes) => {
            let norm: Vec<usize> =
                axes.iter().map(|&a| norm_axis(a, shape.len())).collect::<NodeResult<_>>()?;
            for &a in &norm {
                if shape[a] != one {
                    return invalid(format!("squeezed axis {a} has extent other than 1"));
                }
            }
            Ok(shape
                .iter()
                .enumerate()
                .filter(|(i, _)| !norm.contains(i))
                .map(|(_, &d)| d)
                .collect())
        }
    }
}

/// Resolves a Reshape target with 0 (copy) and -1 (infer) entries, for concrete shapes.
pub(crate) fn reshape_target(
    input: &[usize],
    spec: &[i64],
    allow_zero: bool,
) -> NodeResult<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            0 if !allow_zero => out.push(
                *input.get(i).ok_or(NodeError::Invalid("reshape copies a missing axis".into()))?,
            ),
            -1 => {
                infer = Some(i);
                out.push(1);
            }
            s if s < 0 => return invalid(format!("reshape extent {s}")),
            s => out.push(s as usize),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return invalid("reshape cannot infer the -1 extent");
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return invalid(format!("reshape from {input:?} to {out:?} changes the element count"));
    }
    Ok(out)
}

/// Converts a constant to ONNX element type `code`, rounding to the precision of float16 and
/// bfloat16, which the importer stores as f32.
pub(crate) fn cast_const(t: &ConstTensor, code: i32) -> NodeResult<ConstTensor> {
    let to = dtype_of(code)
        .ok_or_else(|| NodeError::Unsupported(format!("cast to {}", type_name(code))))?;
    Ok(round_to_type(cast(t, to)?, code))
}

/// Rounds f32 values to the precision of ONNX type `code` when it is float16 or bfloat16, which
/// the importer stores as f32.
fn round_to_type(t: ConstTensor, code: i32) -> ConstTensor {
    let round: fn(f32) -> f32 = match code {
        onnx_type::FLOAT16 => |v| half::f16::from_f32(v).to_f32(),
        onnx_type::BFLOAT16 => |v| half::bf16::from_f32(v).to_f32(),
        _ => return t,
    };
    match t {
        ConstTensor::F32 { shape, data } => {
            ConstTensor::F32 { shape, data: data.into_iter().map(round).collect() }
        }
        other => other,
    }
}

fn cast(t: &ConstTensor, to: DType) -> NodeResult<ConstTensor> {
    let shape = t.shape().to_vec();
    Ok(match (t, to) {
        (ConstTensor::F32 { data, .. }, DType::F32) => {
            ConstTensor::F32 { shape, data: data.clone() }
        }
        (ConstTensor::F32 { data, .. }, dtype) => ConstTensor::Int {
            shape,
            data: data
                .iter()
                .map(|&v| {
                    SymInt::Int(if dtype == DType::Bool { (v != 0.0) as i64 } else { v as i64 })
                })
                .collect(),
            dtype,
        },
        (ConstTensor::Int { .. }, DType::F32) => ConstTensor::F32 {
            shape,
            data: t
                .to_f32()
                .ok_or(NodeError::Unsupported("cast of a symbolic value to float".into()))?,
        },
        (ConstTensor::Int { data, .. }, dtype) => ConstTensor::Int {
            shape,
            data: data
                .iter()
                .map(|&v| match (v, dtype) {
                    (SymInt::Int(i), DType::Bool) => SymInt::Int((i != 0) as i64),
                    (SymInt::Int(i), DType::I32) => SymInt::Int(i as i32 as i64),
                    (SymInt::Int(i), DType::I8) => SymInt::Int(i as i8 as i64),
                    (SymInt::Int(i), DType::U8) => SymInt::Int(i as u8 as i64),
                    (v, _) => v,
                })
                .collect(),
            dtype,
        },
    })
}

/// Flat source indices and output shape of a gather.
pub(crate) fn gather_index(
    shape: &[usize],
    axis: usize,
    indices: &[i64],
    indices_shape: &[usize],
) -> NodeResult<(Vec<usize>, Vec<usize>)> {
    let extent = shape[axis] as i64;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut at = Vec::with_capacity(outer * indices.len() * inner);
    for o in 0..outer {
        for &i in indices {
            let i = if i < 0 { i + extent } else { i };
            if i < 0 || i >= extent {
                return invalid(format!("gather index {i} out of range for extent {extent}"));
            }
            for n in 0..inner {
                at.push((o * extent as usize + i as usize) * inner + n);
            }
        }
    }
    let mut out = shape[..axis].to_vec();
    out.extend_from_slice(indices_shape);
    out.extend_from_slice(&shape[axis + 1..]);
    Ok((at, out))
}

fn concat(parts: &[&ConstTensor], axis: usize) -> NodeResult<ConstTensor> {
    let first = parts.first().ok_or(NodeError::Invalid("concat without inputs".into()))?;
    let mut shape = first.shape().to_vec();
    if shape.is_empty() {
        return invalid("concat of scalars");
    }
    shape[axis] = parts.iter().map(|p| p.shape().get(axis).copied().unwrap_or(0)).sum();
    let outer: usize = shape[..axis].iter().product();
    let float = parts.iter().any(|p| matches!(p, ConstTensor::F32 { .. }));
    if float {
        let mut data = Vec::new();
        for o in 0..outer {
            for p in parts {
                let v = p.to_f32().ok_or(NodeError::Unsupported(
                    "concat of symbolic values with floats".into(),
                ))?;
                let block = v.len() / outer.max(1);
                data.extend_from_slice(&v[o * block..(o + 1) * block]);
            }
        }
        return Ok(ConstTensor::F32 { shape, data });
    }
    let mut data = Vec::new();
    for o in 0..outer {
        for p in parts {
            let v = p.as_ints().unwrap_or(&[]);
            let block = v.len() / outer.max(1);
            data.extend_from_slice(&v[o * block..(o + 1) * block]);
        }
    }
    Ok(ConstTensor::Int { shape, data, dtype: first.dtype() })
}

fn binary(op: &str, a: &ConstTensor, b: &ConstTensor) -> NodeResult<Option<ConstTensor>> {
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
        NodeError::Invalid(format!("shapes {:?} and {:?} do not broadcast", a.shape(), b.shape()))
    })?;
    let (ia, ib) = (broadcast_index(a.shape(), &shape), broadcast_index(b.shape(), &shape));
    let float = matches!(a, ConstTensor::F32 { .. }) || matches!(b, ConstTensor::F32 { .. });
    if float {
        let (Some(x), Some(y)) = (a.to_f32(), b.to_f32()) else {
            return Err(NodeError::Unsupported("float arithmetic on symbolic values".into()));
        };
        let (x, y) = (pick(&x, &ia), pick(&y, &ib));
        let cmp = |f: fn(f32, f32) -> bool| ConstTensor::Int {
            shape: shape.clone(),
            data: x.iter().zip(&y).map(|(&p, &q)| SymInt::Int(f(p, q) as i64)).collect(),
            dtype: DType::Bool,
        };
        let arith = |f: fn(f32, f32) -> f32| ConstTensor::F32 {
            shape: shape.clone(),
            data: x.iter().zip(&y).map(|(&p, &q)| f(p, q)).collect(),
        };
        return Ok(Some(match op {
            "Add" => arith(|p, q| p + q),
            "Sub" => arith(|p, q| p - q),
            "Mul" => arith(|p, q| p * q),
            "Div" => arith(|p, q| p / q),
            "Pow" => arith(f32::powf),
            "Max" => arith(f32::max),
            "Min" => arith(f32::min),
            "Mod" => arith(|p, q| p % q),
            "Equal" => cmp(|p, q| p == q),
            "Less" => cmp(|p, q| p < q),
            "Greater" => cmp(|p, q| p > q),
            _ => return Err(NodeError::Unsupported(format!("{op} on floats"))),
        }));
    }
    let (x, y) = (pick(a.as_ints().unwrap_or(&[]), &ia), pick(b.as_ints().unwrap_or(&[]), &ib));
    let symbolic = || NodeError::Unsupported(format!("{op} on symbolic extents"));
    let mut out = Vec::with_capacity(x.len());
    let mut dtype = a.dtype();
    for (&p, &q) in x.iter().zip(&y) {
        let v = match op {
            "Add" => p.checked_add(q),
            "Sub" => p.checked_sub(q),
            "Mul" => p.checked_mul(q),
            "Div" => p.checked_div(q),
            "Equal" | "Less" | "Greater" | "And" | "Or" => {
                dtype = DType::Bool;
                let r = match op {
                    "Equal" => p.equals(q),
                    _ => match (p.as_int(), q.as_int()) {
                        (Some(p), Some(q)) => Some(match op {
                            "Less" => p < q,
                            "Greater" => p > q,
                            "And" => p != 0 && q != 0,
                            _ => p != 0 || q != 0,
                        }),
                        _ => None,
                    },
                };
                r.map(|r| SymInt::Int(r as i64))
            }
            _ => match (p.as_int(), q.as_int()) {
                (Some(p), Some(q)) => match op {
                    "Max" => Some(SymInt::Int(p.max(q))),
                    "Min" => Some(SymInt::Int(p.min(q))),
                    "Mod" if q != 0 => Some(SymInt::Int(p.rem_euclid(q))),
                    "Pow" if q >= 0 => p.checked_pow(q as u32).map(SymInt::Int),
                    _ => None,
                },
                _ => None,
            },
        };
        out.push(v.ok_or_else(symbolic)?);
    }
    Ok(Some(ConstTensor::Int { shape, data: out, dtype }))
}

/// Per-axis slice parameters, possibly symbolic.
pub(crate) struct SliceSpec {
    pub(crate) starts: Vec<SymInt>,
    pub(crate) ends: Vec<SymInt>,
    pub(crate) axes: Vec<i64>,
    pub(crate) steps: Vec<i64>,
}

pub(crate) struct KnownSlice {
    starts: Vec<i64>,
    ends: Vec<i64>,
    axes: Vec<i64>,
    steps: Vec<i64>,
}

impl SliceSpec {
    fn known(&self) -> Option<KnownSlice> {
        Some(KnownSlice {
            starts: self.starts.iter().map(|v| v.as_int()).collect::<Option<_>>()?,
            ends: self.ends.iter().map(|v| v.as_int()).collect::<Option<_>>()?,
            axes: self.axes.clone(),
            steps: self.steps.clone(),
        })
    }
}

/// Reads Slice parameters from inputs (opset 10+) or attributes (older).
pub(crate) fn slice_spec(
    node: &NodeProto,
    inputs: &[Option<&ConstTensor>],
    opset: i64,
) -> NodeResult<SliceSpec> {
    let ints = |i: usize| -> NodeResult<Option<Vec<SymInt>>> {
        match inputs.get(i).copied().flatten() {
            Some(t) => t
                .as_ints()
                .map(|v| Some(v.to_vec()))
                .ok_or(NodeError::Invalid("slice parameters must be integers".into())),
            None => Ok(None),
        }
    };
    let (starts, ends, axes, steps) = if opset >= 10 {
        let starts = ints(1)?.ok_or(NodeError::Invalid("slice without starts".into()))?;
        let ends = ints(2)?.ok_or(NodeError::Invalid("slice without ends".into()))?;
        let known = |v: Option<Vec<SymInt>>| -> NodeResult<Option<Vec<i64>>> {
            match v {
                Some(v) => v
                    .iter()
                    .map(|x| x.as_int())
                    .collect::<Option<Vec<_>>>()
                    .map(Some)
                    .ok_or(NodeError::Unsupported("symbolic slice axes or steps".into())),
                None => Ok(None),
            }
        };
        (starts, ends, known(ints(3)?)?, known(ints(4)?)?)
    } else {
        let get =
            |n| attr_ints(node, n).map(|v| v.into_iter().map(SymInt::Int).collect::<Vec<_>>());
        (
            get("starts").ok_or(NodeError::Invalid("slice without starts".into()))?,
            get("ends").ok_or(NodeError::Invalid("slice without ends".into()))?,
            attr_ints(node, "axes"),
            None,
        )
    };
    let n = starts.len();
    if ends.len() != n {
        return invalid("slice starts and ends differ in length");
    }
    let axes = axes.unwrap_or_else(|| (0..n as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; n]);
    if axes.len() != n || steps.len() != n || steps.contains(&0) {
        return invalid("slice axes or steps are inconsistent");
    }
    Ok(SliceSpec { starts, ends, axes, steps })
}

/// Clamped start and output length of one sliced axis of concrete extent `dim`.
pub(crate) fn slice_axis(dim: i64, start: i64, end: i64, step: i64) -> (i64, i64) {
    let norm = |v: i64| if v < 0 { v + dim } else { v };
    let (start, end) = (norm(start), norm(end));
    let (start, end) = if step > 0 {
        (start.clamp(0, dim), end.clamp(0, dim))
    } else {
        (start.clamp(-1, dim - 1), end.clamp(-1, dim - 1))
    };
    let len = if step > 0 {
        (end - start + step - 1) / step
    } else {
        (start - end + (-step) - 1) / (-step)
    };
    (start, len.max(0))
}

fn slice_index(shape: &[usize], spec: &KnownSlice) -> NodeResult<(Vec<usize>, Vec<usize>)> {
    let rank = shape.len();
    let mut starts = vec![0i64; rank];
    let mut steps = vec![1i64; rank];
    let mut out: Vec<usize> = shape.to_vec();
    for i in 0..spec.axes.len() {
        let axis = norm_axis(spec.axes[i], rank)?;
        let (s, len) = slice_axis(shape[axis] as i64, spec.starts[i], spec.ends[i], spec.steps[i]);
        starts[axis] = s;
        steps[axis] = spec.steps[i];
        out[axis] = len as usize;
    }
    let st = strides(shape);
    let n: usize = out.iter().product();
    let mut at = Vec::with_capacity(n);
    let mut index = vec![0usize; rank];
    for _ in 0..n {
        let flat: i64 =
            (0..rank).map(|a| (starts[a] + index[a] as i64 * steps[a]) * st[a] as i64).sum();
        at.push(flat as usize);
        for ax in (0..rank).rev() {
            index[ax] += 1;
            if index[ax] < out[ax] {
                break;
            }
            index[ax] = 0;
        }
    }
    Ok((at, out))
}

/// The permutation of a Transpose node (reversed axes by default).
pub(crate) fn perm_of(node: &NodeProto, rank: usize) -> NodeResult<Vec<usize>> {
    let perm: Vec<usize> = match attr_ints(node, "perm") {
        Some(p) => p.iter().map(|&a| norm_axis(a, rank)).collect::<NodeResult<_>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = vec![false; rank];
    for &p in &perm {
        if seen[p] {
            return invalid("transpose permutation repeats an axis");
        }
        seen[p] = true;
    }
    if perm.len() != rank {
        return invalid("transpose permutation length differs from the rank");
    }
    Ok(perm)
}

/// Float attribute helper re-exported for lowering.
pub(crate) fn float_attr(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr_float(node, name, default)
}
