//! ONNX ops that have no runtime op of their own and are built from runtime ops. They are the
//! activation functions, the logical ops, Sum and Mean, the reductions beyond mean, sum and max,
//! LogSoftmax, batch, instance and RMS normalization, Trilu, Split, and DepthToSpace /
//! SpaceToDepth.

use edgefold_runtime::format::{DType, Dim, MAX_RANK};
use edgefold_runtime::ops::{BinaryKind, Op, ReduceKind, UnaryKind};

use super::compose::{binary_step, finish, require_f32, reshape_step, scalar, step};
use super::consts::{ConstTensor, SymInt};
use super::fold::{float_attr, norm_axis};
use super::lower::{emit, emit_output, reduction_of, Ctx, Reduction};
use super::proto::{attr_int, attr_ints, attr_string};
use super::{invalid, Importer, NodeError, NodeResult, Val};
use crate::ir::ValueId;

/// Adds the intermediate ops of one lowering, naming their values after the node's output with a
/// step number.
struct Builder<'i, 'c, 'a> {
    imp: &'i mut Importer,
    cx: &'c Ctx<'a>,
    steps: usize,
}

impl<'i, 'c, 'a> Builder<'i, 'c, 'a> {
    fn new(imp: &'i mut Importer, cx: &'c Ctx<'a>) -> Self {
        Builder { imp, cx, steps: 0 }
    }

    fn suffix(&mut self) -> String {
        self.steps += 1;
        format!("s{}", self.steps)
    }

    /// Input `i` of the node as an f32 value.
    fn f32_input(&mut self, i: usize) -> NodeResult<ValueId> {
        let id = self.imp.value_id(self.cx.input(i)?, &self.cx.hint(i))?;
        require_f32(self.imp, &[id])?;
        Ok(id)
    }

    fn shape(&self, id: ValueId) -> Vec<Dim> {
        self.imp.graph.values[id].shape.clone()
    }

    fn unary(&mut self, kind: UnaryKind, x: ValueId) -> NodeResult<ValueId> {
        self.clip_or_unary(kind, 0.0, 0.0, x)
    }

    fn clip(&mut self, min: f32, max: f32, x: ValueId) -> NodeResult<ValueId> {
        self.clip_or_unary(UnaryKind::Clip, min, max, x)
    }

    fn clip_or_unary(
        &mut self,
        kind: UnaryKind,
        a: f32,
        b: f32,
        x: ValueId,
    ) -> NodeResult<ValueId> {
        let suffix = self.suffix();
        let shape = self.shape(x);
        let op = Op::Unary { kind, alpha: a, beta: b };
        step(self.imp, self.cx, &suffix, op, vec![Some(x)], DType::F32, shape)
    }

    fn binary(&mut self, kind: BinaryKind, a: ValueId, b: ValueId) -> NodeResult<ValueId> {
        let suffix = self.suffix();
        binary_step(self.imp, self.cx, &suffix, kind, a, b)
    }

    /// Adds `a kind c` for a constant `c`.
    fn with_constant(&mut self, kind: BinaryKind, a: ValueId, c: f32) -> NodeResult<ValueId> {
        let suffix = format!("c{}", self.steps + 1);
        let c = scalar(self.imp, self.cx, &suffix, c)?;
        self.binary(kind, a, c)
    }

    /// Adds a reduction of `x` over the axes in `mask`, or returns `x` when `mask` is 0.
    fn reduce(
        &mut self,
        kind: ReduceKind,
        mask: u32,
        keep_dims: bool,
        x: ValueId,
    ) -> NodeResult<ValueId> {
        if mask == 0 {
            return Ok(x);
        }
        let shape: Vec<Dim> = self
            .shape(x)
            .into_iter()
            .enumerate()
            .filter_map(|(i, d)| match (mask & (1 << i) != 0, keep_dims) {
                (true, true) => Some(Dim::constant(1)),
                (true, false) => None,
                (false, _) => Some(d),
            })
            .collect();
        let suffix = self.suffix();
        let op = Op::Reduce { kind, axes: mask, keep_dims };
        step(self.imp, self.cx, &suffix, op, vec![Some(x)], DType::F32, shape)
    }

    fn reshape(&mut self, x: ValueId, shape: Vec<Dim>) -> NodeResult<ValueId> {
        let suffix = self.suffix();
        reshape_step(self.imp, self.cx, &suffix, x, shape)
    }

    /// Gives the last value the name of output `index` of the node.
    fn finish(self, index: usize, id: ValueId) -> Val {
        finish(self.imp, self.cx, index, id)
    }
}

/// Adds `max(x, 0)` and `min(x, 0)`, the two halves of the piecewise activations.
fn halves(b: &mut Builder<'_, '_, '_>, x: ValueId) -> NodeResult<(ValueId, ValueId)> {
    let positive = b.unary(UnaryKind::Relu, x)?;
    let negative = b.with_constant(BinaryKind::Min, x, 0.0)?;
    Ok((positive, negative))
}

/// Adds `ln(1 + e^x)` as `max(x, 0) + ln(1 + e^-|x|)`, which does not overflow for large `x`.
fn softplus(b: &mut Builder<'_, '_, '_>, x: ValueId) -> NodeResult<ValueId> {
    let positive = b.unary(UnaryKind::Relu, x)?;
    let magnitude = b.unary(UnaryKind::Abs, x)?;
    let negated = b.unary(UnaryKind::Neg, magnitude)?;
    let exp = b.unary(UnaryKind::Exp, negated)?;
    let shifted = b.with_constant(BinaryKind::Add, exp, 1.0)?;
    let log = b.unary(UnaryKind::Log, shifted)?;
    b.binary(BinaryKind::Add, positive, log)
}

/// Lowers the activation functions LeakyRelu, PRelu, Elu, Selu, Celu, Softplus, Softsign,
/// HardSigmoid, HardSwish, Swish and Mish.
pub(super) fn activation(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let node = cx.node;
    let mut b = Builder::new(imp, cx);
    let x = b.f32_input(0)?;
    let alpha = |default: f32| float_attr(node, "alpha", default);
    let y = match node.op_type.as_str() {
        "LeakyRelu" | "PRelu" => {
            let (positive, negative) = halves(&mut b, x)?;
            let scaled = if node.op_type == "LeakyRelu" {
                b.with_constant(BinaryKind::Mul, negative, alpha(0.01))?
            } else {
                let slope = b.f32_input(1)?;
                b.binary(BinaryKind::Mul, negative, slope)?
            };
            b.binary(BinaryKind::Add, positive, scaled)?
        }
        "Elu" | "Selu" => {
            let default_alpha = if node.op_type == "Elu" { 1.0 } else { 1.673_263_2 };
            let (positive, negative) = halves(&mut b, x)?;
            let exp = b.unary(UnaryKind::Exp, negative)?;
            let less_one = b.with_constant(BinaryKind::Sub, exp, 1.0)?;
            let scaled = b.with_constant(BinaryKind::Mul, less_one, alpha(default_alpha))?;
            let sum = b.binary(BinaryKind::Add, positive, scaled)?;
            if node.op_type == "Selu" {
                b.with_constant(BinaryKind::Mul, sum, float_attr(node, "gamma", 1.050_701))?
            } else {
                sum
            }
        }
        "Celu" => {
            let a = alpha(1.0);
            let positive = b.unary(UnaryKind::Relu, x)?;
            let divided = b.with_constant(BinaryKind::Div, x, a)?;
            let exp = b.unary(UnaryKind::Exp, divided)?;
            let less_one = b.with_constant(BinaryKind::Sub, exp, 1.0)?;
            let scaled = b.with_constant(BinaryKind::Mul, less_one, a)?;
            let negative = b.with_constant(BinaryKind::Min, scaled, 0.0)?;
            b.binary(BinaryKind::Add, positive, negative)?
        }
        "Softplus" => softplus(&mut b, x)?,
        "Softsign" => {
            let magnitude = b.unary(UnaryKind::Abs, x)?;
            let shifted = b.with_constant(BinaryKind::Add, magnitude, 1.0)?;
            b.binary(BinaryKind::Div, x, shifted)?
        }
        "HardSigmoid" | "HardSwish" => {
            let (a, beta) = match node.op_type.as_str() {
                "HardSigmoid" => (alpha(0.2), float_attr(node, "beta", 0.5)),
                _ => (1.0 / 6.0, 0.5),
            };
            let scaled = b.with_constant(BinaryKind::Mul, x, a)?;
            let shifted = b.with_constant(BinaryKind::Add, scaled, beta)?;
            let gate = b.clip(0.0, 1.0, shifted)?;
            match node.op_type.as_str() {
                "HardSigmoid" => gate,
                _ => b.binary(BinaryKind::Mul, x, gate)?,
            }
        }
        "Swish" => {
            let scaled = b.with_constant(BinaryKind::Mul, x, alpha(1.0))?;
            let gate = b.unary(UnaryKind::Sigmoid, scaled)?;
            b.binary(BinaryKind::Mul, x, gate)?
        }
        "Mish" => {
            let soft = softplus(&mut b, x)?;
            let gate = b.unary(UnaryKind::Tanh, soft)?;
            b.binary(BinaryKind::Mul, x, gate)?
        }
        other => return invalid(format!("{other} is not an activation function")),
    };
    if b.shape(y) != b.shape(x) {
        return invalid("the slope does not broadcast to the input");
    }
    Ok(b.finish(0, y))
}

/// Adds a cast of `x` to `dtype`.
fn cast_step(b: &mut Builder<'_, '_, '_>, x: ValueId, dtype: DType) -> NodeResult<ValueId> {
    let suffix = b.suffix();
    let shape = b.shape(x);
    step(b.imp, b.cx, &suffix, Op::Cast, vec![Some(x)], dtype, shape)
}

/// Input `i` of the node, a boolean value, as f32 0 or 1.
fn bool_input(b: &mut Builder<'_, '_, '_>, i: usize) -> NodeResult<ValueId> {
    let id = b.imp.value_id(b.cx.input(i)?, &b.cx.hint(i))?;
    let dtype = b.imp.graph.values[id].dtype;
    if dtype != DType::Bool {
        return Err(NodeError::Unsupported(format!("logical ops on {dtype:?} values")));
    }
    cast_step(b, id, DType::F32)
}

/// Lowers the logical ops And, Or, Xor and Not on booleans to f32 arithmetic on 0 and 1 between
/// casts: a product, a sum, a difference or `1 - x`, whose nonzero values are true.
pub(super) fn logical(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let mut b = Builder::new(imp, cx);
    let a = bool_input(&mut b, 0)?;
    let y = match cx.node.op_type.as_str() {
        "Not" => {
            let one = scalar(b.imp, cx, "one", 1.0)?;
            b.binary(BinaryKind::Sub, one, a)?
        }
        op => {
            let kind = match op {
                "And" => BinaryKind::Mul,
                "Or" => BinaryKind::Add,
                "Xor" => BinaryKind::Sub,
                other => return invalid(format!("{other} is not a logical op")),
            };
            let other = bool_input(&mut b, 1)?;
            b.binary(kind, a, other)?
        }
    };
    let y = cast_step(&mut b, y, DType::Bool)?;
    Ok(b.finish(0, y))
}

/// Lowers Sum and Mean of any number of f32 inputs.
pub(super) fn sum_or_mean(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let present: Vec<usize> = (0..cx.inputs.len()).filter(|&i| cx.opt(i).is_some()).collect();
    let Some((&first, rest)) = present.split_first() else {
        return invalid("no inputs");
    };
    if rest.is_empty() {
        return Ok(cx.input(first)?.clone());
    }
    let mut b = Builder::new(imp, cx);
    let mut acc = b.f32_input(first)?;
    for &i in rest {
        let next = b.f32_input(i)?;
        acc = b.binary(BinaryKind::Add, acc, next)?;
    }
    if cx.node.op_type == "Mean" {
        acc = b.with_constant(BinaryKind::Div, acc, present.len() as f32)?;
    }
    Ok(b.finish(0, acc))
}

/// Lowers ReduceMin, ReduceSumSquare, ReduceL1, ReduceL2, ReduceLogSum and ReduceLogSumExp to
/// element-wise ops around a max or sum reduction. With `noop_with_empty_axes` and no axes only
/// the element-wise part remains, as in the ONNX reference.
pub(super) fn reduction(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let mut b = Builder::new(imp, cx);
    let x = b.f32_input(0)?;
    let r = reduction_of(b.imp, cx, x, 18)?;
    let (mask, keep_dims) = r.as_ref().map_or((0, true), |r| (r.mask, r.keep_dims));
    let y = match cx.node.op_type.as_str() {
        "ReduceMin" => {
            let negated = b.unary(UnaryKind::Neg, x)?;
            let max = b.reduce(ReduceKind::Max, mask, keep_dims, negated)?;
            b.unary(UnaryKind::Neg, max)?
        }
        "ReduceSumSquare" | "ReduceL2" => {
            let square = b.binary(BinaryKind::Mul, x, x)?;
            let sum = b.reduce(ReduceKind::Sum, mask, keep_dims, square)?;
            match cx.node.op_type.as_str() {
                "ReduceL2" => b.unary(UnaryKind::Sqrt, sum)?,
                _ => sum,
            }
        }
        "ReduceL1" => {
            let magnitude = b.unary(UnaryKind::Abs, x)?;
            b.reduce(ReduceKind::Sum, mask, keep_dims, magnitude)?
        }
        "ReduceLogSum" => {
            let sum = b.reduce(ReduceKind::Sum, mask, keep_dims, x)?;
            b.unary(UnaryKind::Log, sum)?
        }
        "ReduceLogSumExp" => {
            // Computed as max + ln(sum(exp(x - max))), which does not overflow.
            let max = b.reduce(ReduceKind::Max, mask, true, x)?;
            let shifted = b.binary(BinaryKind::Sub, x, max)?;
            let exp = b.unary(UnaryKind::Exp, shifted)?;
            let sum = b.reduce(ReduceKind::Sum, mask, true, exp)?;
            let log = b.unary(UnaryKind::Log, sum)?;
            let y = b.binary(BinaryKind::Add, log, max)?;
            match &r {
                Some(Reduction { shape, .. }) => b.reshape(y, shape.clone())?,
                None => y,
            }
        }
        other => return invalid(format!("{other} is not a derived reduction")),
    };
    if y == x {
        return Ok(cx.input(0)?.clone());
    }
    Ok(b.finish(0, y))
}

/// Lowers LogSoftmax as `x - max - ln(sum(exp(x - max)))` over the axis (opset 13 and later) or
/// over every axis from `axis` on (earlier opsets, which view the input as a matrix).
pub(super) fn log_softmax(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let mut b = Builder::new(imp, cx);
    let x = b.f32_input(0)?;
    let rank = b.shape(x).len();
    let opset = b.imp.opset();
    let axis = norm_axis(attr_int(cx.node, "axis", if opset >= 13 { -1 } else { 1 }), rank)?;
    let mask = if opset >= 13 { 1 << axis } else { (axis..rank).fold(0u32, |m, a| m | 1 << a) };
    let max = b.reduce(ReduceKind::Max, mask, true, x)?;
    let shifted = b.binary(BinaryKind::Sub, x, max)?;
    let exp = b.unary(UnaryKind::Exp, shifted)?;
    let sum = b.reduce(ReduceKind::Sum, mask, true, exp)?;
    let log = b.unary(UnaryKind::Log, sum)?;
    let y = b.binary(BinaryKind::Sub, shifted, log)?;
    Ok(b.finish(0, y))
}

/// Shape `[C, 1, ..]` that broadcasts a per-channel vector over an input of rank `rank` in NC..
/// layout.
fn channel_shape(channels: Dim, rank: usize) -> Vec<Dim> {
    let mut shape = vec![channels];
    shape.resize(rank - 1, Dim::constant(1));
    shape
}

/// Input `i` of the node, a per-channel f32 vector, reshaped to `[C, 1, ..]`.
fn channel_input(
    b: &mut Builder<'_, '_, '_>,
    i: usize,
    channels: Dim,
    rank: usize,
) -> NodeResult<ValueId> {
    let id = b.f32_input(i)?;
    if b.shape(id) != [channels] {
        return invalid(format!("input {i} is not a vector of the {channels:?} channels"));
    }
    b.reshape(id, channel_shape(channels, rank))
}

/// Per-channel constant of BatchNormalization, when input `i` is a constant f32 vector.
fn constant_vector(cx: &Ctx<'_>, i: usize) -> Option<Vec<f32>> {
    match cx.opt(i) {
        Some(Val::Const(ConstTensor::F32 { shape, data })) if shape.len() == 1 => {
            Some(data.clone())
        }
        _ => None,
    }
}

/// Lowers BatchNormalization in inference mode, `(x - mean) * scale / sqrt(var + epsilon) + B` per
/// channel (axis 1). With constant statistics this is one multiplication and one addition by
/// precomputed vectors. Training mode and the running statistics outputs are not supported.
pub(super) fn batch_norm(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let node = cx.node;
    if attr_int(node, "training_mode", 0) != 0 || node.output.iter().skip(1).any(|o| !o.is_empty())
    {
        return Err(NodeError::Unsupported("training mode and running statistics".into()));
    }
    let epsilon = float_attr(node, "epsilon", 1e-5);
    let mut b = Builder::new(imp, cx);
    let x = b.f32_input(0)?;
    let shape = b.shape(x);
    if shape.len() < 2 {
        return invalid("the input has no channel axis");
    }
    let (channels, rank) = (shape[1], shape.len());

    let constants: Option<Vec<Vec<f32>>> = (1..5).map(|i| constant_vector(cx, i)).collect();
    let y = match constants {
        Some(c) if c.iter().all(|v| Some(v.len() as u32) == channels.as_constant()) => {
            let scale: Vec<f32> =
                (0..c[0].len()).map(|j| c[0][j] / (c[3][j] + epsilon).sqrt()).collect();
            let shift: Vec<f32> = (0..c[0].len()).map(|j| c[1][j] - c[2][j] * scale[j]).collect();
            let dims: Vec<usize> =
                channel_shape(channels, rank).iter().map(|d| d.factor as usize).collect();
            let mut vector = |name: &str, data: Vec<f32>| {
                let c = Val::Const(ConstTensor::F32 { shape: dims.clone(), data });
                b.imp.value_id(&c, &format!("{}.{name}", cx.name))
            };
            let (scale, shift) = (vector("scale", scale)?, vector("shift", shift)?);
            let scaled = b.binary(BinaryKind::Mul, x, scale)?;
            b.binary(BinaryKind::Add, scaled, shift)?
        }
        _ => {
            let scale = channel_input(&mut b, 1, channels, rank)?;
            let bias = channel_input(&mut b, 2, channels, rank)?;
            let mean = channel_input(&mut b, 3, channels, rank)?;
            let variance = channel_input(&mut b, 4, channels, rank)?;
            let centered = b.binary(BinaryKind::Sub, x, mean)?;
            let shifted = b.with_constant(BinaryKind::Add, variance, epsilon)?;
            let deviation = b.unary(UnaryKind::Sqrt, shifted)?;
            let normalized = b.binary(BinaryKind::Div, centered, deviation)?;
            let scaled = b.binary(BinaryKind::Mul, normalized, scale)?;
            b.binary(BinaryKind::Add, scaled, bias)?
        }
    };
    Ok(b.finish(0, y))
}

/// `(x - mean) / sqrt(var + epsilon)` over the axes in `mask`, with the statistics kept as
/// extent-1 axes.
fn normalize(
    b: &mut Builder<'_, '_, '_>,
    x: ValueId,
    mask: u32,
    epsilon: f32,
) -> NodeResult<ValueId> {
    let mean = b.reduce(ReduceKind::Mean, mask, true, x)?;
    let centered = b.binary(BinaryKind::Sub, x, mean)?;
    let square = b.binary(BinaryKind::Mul, centered, centered)?;
    let variance = b.reduce(ReduceKind::Mean, mask, true, square)?;
    let shifted = b.with_constant(BinaryKind::Add, variance, epsilon)?;
    let deviation = b.unary(UnaryKind::Sqrt, shifted)?;
    b.binary(BinaryKind::Div, centered, deviation)
}

/// Lowers InstanceNormalization: each channel of each batch item normalized over the spatial
/// axes, then scaled and shifted per channel.
pub(super) fn instance_norm(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let epsilon = float_attr(cx.node, "epsilon", 1e-5);
    let mut b = Builder::new(imp, cx);
    let x = b.f32_input(0)?;
    let shape = b.shape(x);
    if shape.len() < 3 {
        return invalid("instance normalization needs spatial axes");
    }
    let (channels, rank) = (shape[1], shape.len());
    let mask = (2..rank).fold(0u32, |m, a| m | 1 << a);
    let normalized = normalize(&mut b, x, mask, epsilon)?;
    let scale = channel_input(&mut b, 1, channels, rank)?;
    let bias = channel_input(&mut b, 2, channels, rank)?;
    let scaled = b.binary(BinaryKind::Mul, normalized, scale)?;
    let y = b.binary(BinaryKind::Add, scaled, bias)?;
    Ok(b.finish(0, y))
}

/// Lowers RMSNormalization: `x / sqrt(mean(x^2) + epsilon) * scale` over the axes from `axis` on.
pub(super) fn rms_norm(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let epsilon = float_attr(cx.node, "epsilon", 1e-5);
    let mut b = Builder::new(imp, cx);
    let x = b.f32_input(0)?;
    let rank = b.shape(x).len();
    let axis = norm_axis(attr_int(cx.node, "axis", -1), rank)?;
    let mask = (axis..rank).fold(0u32, |m, a| m | 1 << a);
    let square = b.binary(BinaryKind::Mul, x, x)?;
    let mean = b.reduce(ReduceKind::Mean, mask, true, square)?;
    let shifted = b.with_constant(BinaryKind::Add, mean, epsilon)?;
    let rms = b.unary(UnaryKind::Sqrt, shifted)?;
    let normalized = b.binary(BinaryKind::Div, x, rms)?;
    let scale = b.f32_input(1)?;
    let y = b.binary(BinaryKind::Mul, normalized, scale)?;
    if b.shape(y) != b.shape(x) {
        return invalid("the scale does not broadcast to the input");
    }
    Ok(b.finish(0, y))
}

/// Lowers Trilu to a Where between the input and 0 with a constant mask of the last two axes.
pub(super) fn trilu(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let k = match cx.opt(1) {
        None => 0,
        Some(Val::Const(c)) => c
            .known_ints()
            .and_then(|v| v.first().copied())
            .ok_or(NodeError::Invalid("k is not an integer scalar".into()))?,
        Some(_) => return Err(NodeError::Unsupported("k computed at run time".into())),
    };
    let upper = attr_int(cx.node, "upper", 1) != 0;

    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let (dtype, shape) = (imp.graph.values[x].dtype, imp.graph.values[x].shape.clone());
    if shape.len() < 2 {
        return invalid("trilu needs at least two axes");
    }
    let extent = |d: Dim| {
        d.as_constant()
            .map(|v| v as usize)
            .ok_or(NodeError::Unsupported("variable extents in the last two axes".into()))
    };
    let (rows, cols) = (extent(shape[shape.len() - 2])?, extent(shape[shape.len() - 1])?);
    let keep = |i: usize, j: usize| {
        let diagonal = j as i64 - i as i64;
        if upper {
            diagonal >= k
        } else {
            diagonal <= k
        }
    };

    let mask: Vec<SymInt> =
        (0..rows * cols).map(|n| SymInt::Int(keep(n / cols, n % cols) as i64)).collect();
    let mask = ConstTensor::Int { shape: vec![rows, cols], data: mask, dtype: DType::Bool };
    let zero = match dtype {
        DType::F32 => ConstTensor::F32 { shape: vec![1], data: vec![0.0] },
        DType::I64 | DType::I32 | DType::Bool => {
            ConstTensor::Int { shape: vec![1], data: vec![SymInt::Int(0)], dtype }
        }
        other => return Err(NodeError::Unsupported(format!("{other:?} elements"))),
    };
    let mask = imp.value_id(&Val::Const(mask), &format!("{}.mask", cx.name))?;
    let zero = imp.value_id(&Val::Const(zero), &format!("{}.zero", cx.name))?;
    emit(imp, cx, Op::Where, vec![Some(mask), Some(x), Some(zero)], dtype, shape)
}

/// Extents of the parts of a Split of an axis of extent `extent` into `outputs` parts.
fn split_sizes(imp: &Importer, cx: &Ctx<'_>, extent: u32, outputs: usize) -> NodeResult<Vec<u32>> {
    let given: Option<Vec<i64>> = if imp.opset() >= 13 {
        match cx.opt(1) {
            None => None,
            Some(Val::Const(c)) => Some(
                c.known_ints().ok_or(NodeError::Invalid("split sizes are not integers".into()))?,
            ),
            Some(_) => {
                return Err(NodeError::Unsupported("split sizes computed at run time".into()))
            }
        }
    } else {
        attr_ints(cx.node, "split")
    };
    if let Some(sizes) = given {
        if sizes.len() != outputs || sizes.iter().sum::<i64>() != extent as i64 {
            return invalid(format!("split sizes {sizes:?} do not fit extent {extent}"));
        }
        return sizes
            .iter()
            .map(|&s| u32::try_from(s).map_err(|_| NodeError::Invalid(format!("split size {s}"))))
            .collect();
    }
    // Equal parts; with num_outputs (opset 18) the last part may be smaller.
    let parts = attr_int(cx.node, "num_outputs", outputs as i64) as u32;
    if parts == 0 || parts as usize != outputs {
        return invalid(format!("num_outputs {parts} differs from {outputs} outputs"));
    }
    let size = extent.div_ceil(parts);
    Ok((0..parts).map(|i| size.min(extent.saturating_sub(i * size))).collect())
}

/// Lowers Split to one Slice per output.
pub(super) fn split(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Vec<Val>> {
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let (dtype, shape) = (imp.graph.values[x].dtype, imp.graph.values[x].shape.clone());
    let axis = norm_axis(attr_int(cx.node, "axis", 0), shape.len())?;
    let extent = shape[axis]
        .as_constant()
        .ok_or(NodeError::Unsupported("splitting an axis of variable extent".into()))?;
    let sizes = split_sizes(imp, cx, extent, cx.node.output.len())?;
    if sizes.contains(&0) {
        return Err(NodeError::Unsupported("empty split parts".into()));
    }
    let mut outputs = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for (i, &size) in sizes.iter().enumerate() {
        let mut starts = [0u32; MAX_RANK];
        starts[axis] = start;
        let mut part = shape.clone();
        part[axis] = Dim::constant(size);
        let op = Op::Slice { starts, steps: [1; MAX_RANK] };
        outputs.push(emit_output(imp, cx, i, op, vec![Some(x)], dtype, part)?);
        start += size;
    }
    Ok(outputs)
}

/// Lowers DepthToSpace and SpaceToDepth (NCHW) to a reshape to rank 6, a transpose and a reshape.
pub(super) fn depth_space(imp: &mut Importer, cx: &Ctx<'_>) -> NodeResult<Val> {
    let x = imp.value_id(cx.input(0)?, &cx.hint(0))?;
    let (dtype, shape) = (imp.graph.values[x].dtype, imp.graph.values[x].shape.clone());
    let block = u32::try_from(attr_int(cx.node, "blocksize", 0))
        .ok()
        .filter(|&b| b > 0)
        .ok_or(NodeError::Invalid("blocksize must be positive".into()))?;
    let dcr = match attr_string(cx.node, "mode").as_deref() {
        None | Some("DCR") => true,
        Some("CRD") => false,
        Some(other) => return invalid(format!("unknown mode {other:?}")),
    };
    let [n, c, h, w] = shape[..] else {
        return invalid("the input is not NCHW");
    };
    let constant = |d: Dim| {
        d.as_constant().ok_or(NodeError::Unsupported("variable channel or spatial extents".into()))
    };
    let (c, h, w) = (constant(c)?, constant(h)?, constant(w)?);

    let k = Dim::constant;
    let (expanded, perm, out) = if cx.node.op_type == "DepthToSpace" {
        if c % (block * block) != 0 {
            return invalid("channels are not a multiple of blocksize squared");
        }
        let depth = c / (block * block);
        let (expanded, perm) = if dcr {
            ([n, k(block), k(block), k(depth), k(h), k(w)], [0, 3, 4, 1, 5, 2])
        } else {
            ([n, k(depth), k(block), k(block), k(h), k(w)], [0, 1, 4, 2, 5, 3])
        };
        (expanded, perm, [n, k(depth), k(h * block), k(w * block)])
    } else {
        if h % block != 0 || w % block != 0 {
            return invalid("spatial extents are not multiples of blocksize");
        }
        let expanded = [n, k(c), k(h / block), k(block), k(w / block), k(block)];
        let perm = if dcr { [0, 3, 5, 1, 2, 4] } else { [0, 1, 3, 5, 2, 4] };
        (expanded, perm, [n, k(c * block * block), k(h / block), k(w / block)])
    };

    let reshaped = reshape_step(imp, cx, "blocks", x, expanded.to_vec())?;
    let permuted: Vec<Dim> = perm.iter().map(|&p| expanded[p]).collect();
    let op = Op::Transpose { perm: perm.map(|p| p as u8) };
    let moved = step(imp, cx, "moved", op, vec![Some(reshaped)], dtype, permuted)?;
    emit(imp, cx, Op::Reshape, vec![Some(moved)], dtype, out.to_vec())
}
