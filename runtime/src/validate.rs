//! Per-op checks done once when a file is opened: tensor indices, element types, symbolic shapes
//! and arena overlap. A shape relation that holds symbolically holds for every symbol value, so
//! the executor only has to re-check what depends on data (indices, slice bounds).
// Builds without every op leave some imports and parameters unused.
#![cfg_attr(not(feature = "all-ops"), allow(unused_imports, unused_variables))]

use crate::error::{Error, Result};
use crate::format::{DType, Dim, Quant, TensorEntry, TensorKind, MAX_RANK};
use crate::kernels::conv::in_place_scratch_len;
use crate::model::{is_absent, Model};
use crate::ops::{Op, OpRecord, Window2d};
use crate::shape::{broadcasts_to, dims_product, expands_to};

/// Checks one op record against the tensor table.
pub(crate) fn check_op(model: &Model<'_>, index: u32, rec: &OpRecord<'_>) -> Result<()> {
    let fail = |reason| Error::InvalidOp { op: index, reason };
    model.string(rec.name)?;
    if !rec.op.is_built() {
        return Err(Error::OpNotBuilt { op: index, feature: rec.op.feature() });
    }
    let (n_in, n_out) = (rec.input_count(), rec.output_count());
    let (min_in, max_in, outs) = arity(&rec.op);
    if n_in < min_in || n_in > max_in || n_out != outs {
        return Err(fail("wrong number of inputs or outputs for this op"));
    }

    let mut inputs = [None; crate::format::MAX_OP_ARITY];
    for (i, slot) in inputs.iter_mut().enumerate().take(n_in) {
        let t = rec.input(i);
        if is_absent(t) {
            if i < min_in {
                return Err(fail("a required input is absent"));
            }
            continue;
        }
        let entry = model.tensor(t).map_err(|_| fail("input tensor index out of range"))?;
        let quantized_ok = matches!(
            (&rec.op, i),
            (Op::Linear { .. }, 1) | (Op::Gather { .. }, 0) | (Op::Conv2d { .. }, 1)
        );
        if entry.quant != Quant::None && !quantized_ok {
            return Err(fail("a quantized tensor is used where only plain values are read"));
        }
        *slot = Some(entry);
    }
    let out_index = rec.output(0);
    let out = model.tensor(out_index).map_err(|_| fail("output tensor index out of range"))?;
    if out.kind != TensorKind::Activation || model.is_graph_input(out_index) {
        return Err(fail("an output must be an activation that is not a graph input"));
    }
    check_overlap(index, rec, &inputs[..n_in], &out)?;

    let input = |i: usize| inputs.get(i).copied().flatten().ok_or(fail("missing input"));
    check_shapes(index, &rec.op, &input, n_in, &out)?;
    let scratch = match rec.op {
        Op::Conv2d { .. } if n_in > 3 && !is_absent(rec.input(3)) => Some(rec.input(3)),
        _ => None,
    };
    match (rec.in_place(), scratch) {
        (true, _) => check_in_place(model, index, &rec.op, &input, scratch, &out),
        (false, Some(_)) => Err(fail("a convolution's scratch input is only used in place")),
        (false, None) => Ok(()),
    }
}

/// Minimum inputs, maximum inputs and output count of each op.
fn arity(op: &Op) -> (usize, usize, usize) {
    match op {
        Op::Linear { .. } => (2, 3, 1),
        Op::Conv2d { .. } => (2, 4, 1),
        Op::MatMul | Op::Binary(_) | Op::Gather { .. } => (2, 2, 1),
        Op::LayerNorm { .. } => (2, 3, 1),
        Op::Concat { .. } => (1, crate::format::MAX_OP_ARITY, 1),
        Op::Where => (3, 3, 1),
        Op::Attention { .. } => (3, 4, 1),
        _ => (1, 1, 1),
    }
}

/// Inputs and the output of one op must not share arena bytes, with two exceptions: a reshape's
/// input and input 0 of an op flagged in place may occupy exactly the output's region. A
/// convolution's scratch input (input 3) must not share bytes with its other inputs either.
fn check_overlap(
    index: u32,
    rec: &OpRecord<'_>,
    inputs: &[Option<TensorEntry>],
    out: &TensorEntry,
) -> Result<()> {
    let fail = |reason| Error::InvalidOp { op: index, reason };
    for (i, t) in inputs.iter().enumerate() {
        let Some(t) = t.filter(|t| t.kind == TensorKind::Activation) else { continue };
        let same_place = t.offset == out.offset && t.byte_len == out.byte_len;
        let shared = matches!(rec.op, Op::Reshape) || (i == 0 && rec.in_place());
        if shared && same_place {
            continue;
        }
        if overlaps(&t, out) {
            return Err(fail("output overlaps an input in the arena"));
        }
    }
    if let (Op::Conv2d { .. }, Some(Some(scratch))) = (rec.op, inputs.get(3)) {
        let others = inputs[..3].iter().flatten().filter(|t| t.kind == TensorKind::Activation);
        for t in others {
            if overlaps(t, scratch) {
                return Err(fail("the scratch input overlaps another input in the arena"));
            }
        }
    }
    Ok(())
}

/// Whether two tensors' arena regions share a byte.
fn overlaps(a: &TensorEntry, b: &TensorEntry) -> bool {
    a.offset < b.offset + b.byte_len && b.offset < a.offset + a.byte_len
}

/// Checks an op flagged in place: input 0 has the output's type and shape at the output's
/// offset, and the op is one that the runtime computes in place. A convolution must be pointwise
/// (1x1 kernel, no padding) or depthwise with stride 1, and needs a scratch tensor of at least
/// [`in_place_scratch_len`] f32 elements.
fn check_in_place(
    model: &Model<'_>,
    index: u32,
    op: &Op,
    input: &dyn Fn(usize) -> Result<TensorEntry>,
    scratch: Option<u32>,
    out: &TensorEntry,
) -> Result<()> {
    let fail = |reason| Error::InvalidOp { op: index, reason };
    let ensure = |ok: bool, reason| if ok { Ok(()) } else { Err(fail(reason)) };
    let x = input(0)?;
    let same_place = x.kind == TensorKind::Activation && x.offset == out.offset;
    ensure(same_place, "an op run in place must have input 0 at the output's offset")?;
    ensure(x.dtype == out.dtype && x.shape() == out.shape(), "an op run in place keeps the shape")?;
    let (window, groups) = match *op {
        Op::Unary { .. } | Op::Binary(_) => return Ok(()),
        Op::Conv2d { window, groups, .. } => (window, groups),
        _ => return Err(fail("this op cannot run in place")),
    };
    ensure(window.strides == [1, 1], "a convolution in place needs strides of 1")?;
    // Both extents are constants: check_conv2d has accepted the input.
    let channels = x.dims[1].factor as usize;
    let size = [x.dims[2].factor as usize, x.dims[3].factor as usize];
    if window.kernel == [1, 1] {
        ensure(window.pads == [0; 4], "a pointwise convolution in place has no padding")?;
    } else {
        let depthwise = groups as usize == channels;
        ensure(depthwise, "only pointwise and depthwise convolutions run in place")?;
    }
    let scratch_index = scratch.ok_or(fail("a convolution in place needs a scratch input"))?;
    let s = input(3)?;
    ensure(!model.is_graph_input(scratch_index), "the scratch input is a graph input")?;
    let elements = match (s.dtype, s.kind, s.shape()) {
        (DType::F32, TensorKind::Activation, [d]) => d.as_constant(),
        _ => None,
    };
    let needed = in_place_scratch_len(&window, channels, size);
    let large_enough = matches!((elements, needed), (Some(e), Some(n)) if e as usize >= n);
    ensure(large_enough, "the scratch input must be an f32 activation [n] large enough")
}

fn check_shapes(
    index: u32,
    op: &Op,
    input: &dyn Fn(usize) -> Result<TensorEntry>,
    n_in: usize,
    out: &TensorEntry,
) -> Result<()> {
    let fail = |reason| Error::InvalidOp { op: index, reason };
    let ensure = |ok: bool, reason| if ok { Ok(()) } else { Err(fail(reason)) };
    match *op {
        #[cfg(feature = "op-linear")]
        Op::Linear { .. } => {
            let (x, w) = (input(0)?, input(1)?);
            ensure(x.dtype == DType::F32 && out.dtype == DType::F32, "linear works on f32")?;
            ensure(w.kind == TensorKind::Const && w.rank == 2, "linear weight must be a constant")?;
            let weight_ok = matches!(
                (w.dtype, w.quant),
                (DType::F32, Quant::None)
                    | (DType::F16, Quant::None)
                    | (DType::I8, Quant::PerRow)
                    | (DType::I4, Quant::Grouped)
                    | (DType::I4, Quant::GroupedMin)
            );
            ensure(weight_ok, "unsupported weight storage")?;
            let (n, k) = (w.dims[0], w.dims[1]);
            let xs = x.shape();
            ensure(!xs.is_empty() && xs[xs.len() - 1] == k, "input width differs from weight")?;
            let os = out.shape();
            ensure(os.len() == xs.len(), "output rank differs from input rank")?;
            ensure(os[..os.len() - 1] == xs[..xs.len() - 1], "output leading axes differ")?;
            ensure(os[os.len() - 1] == n, "output width differs from weight rows")?;
            if n_in > 2 {
                if let Ok(b) = input(2) {
                    ensure(b.dtype == DType::F32 && b.shape() == [n], "bias must be f32 [N]")?;
                }
            }
            Ok(())
        }
        #[cfg(feature = "op-matmul")]
        Op::MatMul => {
            let (a, b) = (input(0)?, input(1)?);
            let all_f32 = [a.dtype, b.dtype, out.dtype].iter().all(|&d| d == DType::F32);
            ensure(all_f32, "matmul works on f32")?;
            let (sa, sb, so) = (a.shape(), b.shape(), out.shape());
            ensure(sa.len() >= 2 && sb.len() >= 2 && so.len() >= 2, "matmul needs rank >= 2")?;
            let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
            let (k2, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
            ensure(k == k2, "inner extents differ")?;
            ensure(so[so.len() - 2] == m && so[so.len() - 1] == n, "output extents differ")?;
            let batch_ok =
                broadcasts_to(&sa[..sa.len() - 2], &sb[..sb.len() - 2], &so[..so.len() - 2]);
            ensure(batch_ok, "batch axes do not broadcast")
        }
        #[cfg(feature = "op-binary")]
        Op::Binary(_) => {
            let (a, b) = (input(0)?, input(1)?);
            let all_f32 = [a.dtype, b.dtype, out.dtype].iter().all(|&d| d == DType::F32);
            ensure(all_f32, "binary ops work on f32")?;
            ensure(broadcasts_to(a.shape(), b.shape(), out.shape()), "shapes do not broadcast")
        }
        #[cfg(feature = "op-unary")]
        Op::Unary { .. } => {
            let x = input(0)?;
            ensure(x.dtype == DType::F32 && out.dtype == DType::F32, "unary ops work on f32")?;
            ensure(x.shape() == out.shape(), "unary output shape differs from input")
        }
        #[cfg(feature = "op-layer-norm")]
        Op::LayerNorm { .. } => {
            let (x, gamma) = (input(0)?, input(1)?);
            ensure(x.dtype == DType::F32 && out.dtype == DType::F32, "layer norm works on f32")?;
            ensure(x.shape() == out.shape() && x.rank >= 1, "layer norm shape mismatch")?;
            let d = x.dims[x.rank as usize - 1];
            ensure(gamma.dtype == DType::F32 && gamma.shape() == [d], "gamma must be f32 [D]")?;
            if n_in > 2 {
                if let Ok(beta) = input(2) {
                    ensure(
                        beta.dtype == DType::F32 && beta.shape() == [d],
                        "beta must be f32 [D]",
                    )?;
                }
            }
            Ok(())
        }
        #[cfg(feature = "op-attention")]
        Op::Attention { .. } => {
            let (q, k, v) = (input(0)?, input(1)?, input(2)?);
            let all_f32 = [q.dtype, k.dtype, v.dtype, out.dtype].iter().all(|&d| d == DType::F32);
            ensure(all_f32, "attention works on f32")?;
            let (sq, sk, sv, so) = (q.shape(), k.shape(), v.shape(), out.shape());
            let ranks = [sq.len(), sk.len(), sv.len(), so.len()];
            ensure(ranks.iter().all(|&r| r >= 2), "attention needs rank >= 2")?;
            let last2 = |s: &[Dim]| (s[s.len() - 2], s[s.len() - 1]);
            let ((queries, depth), (depth_k, keys), (keys_v, width)) =
                (last2(sq), last2(sk), last2(sv));
            ensure(depth == depth_k, "queries and keys differ in length")?;
            ensure(keys == keys_v, "keys and values differ in number")?;
            ensure(last2(so) == (queries, width), "attention output extents differ")?;
            let batch = |s: &[Dim]| s.len() - 2;
            let bo = &so[..batch(so)];
            let operands = [&sq[..batch(sq)], &sk[..batch(sk)], &sv[..batch(sv)]];
            ensure(operands.iter().all(|b| expands_to(b, bo)), "batch axes do not broadcast")?;
            if n_in > 3 {
                if let Ok(mask) = input(3) {
                    ensure(mask.dtype == DType::F32, "the attention mask must be f32")?;
                    let mut scores = [Dim::constant(1); MAX_RANK];
                    scores[..bo.len()].copy_from_slice(bo);
                    scores[bo.len()] = queries;
                    scores[bo.len() + 1] = keys;
                    let scores = &scores[..bo.len() + 2];
                    let fits = expands_to(mask.shape(), scores);
                    ensure(fits, "the mask does not broadcast to the scores")?;
                }
            }
            Ok(())
        }
        #[cfg(feature = "op-softmax")]
        Op::Softmax { axis } => {
            let x = input(0)?;
            ensure(x.dtype == DType::F32 && out.dtype == DType::F32, "softmax works on f32")?;
            ensure(x.shape() == out.shape(), "softmax output shape differs")?;
            ensure((axis as usize) < x.rank as usize, "softmax axis out of range")
        }
        #[cfg(feature = "op-reduce")]
        Op::Reduce { axes, keep_dims, .. } => {
            let x = input(0)?;
            ensure(x.dtype == DType::F32 && out.dtype == DType::F32, "reductions work on f32")?;
            ensure(axes >> x.rank == 0 && axes != 0, "reduced axes out of range")?;
            let one = Dim::constant(1);
            let mut expected = [one; MAX_RANK];
            let mut rank = 0;
            for (i, d) in x.shape().iter().enumerate() {
                let reduced = axes & (1 << i) != 0;
                if !reduced || keep_dims {
                    expected[rank] = if reduced { one } else { *d };
                    rank += 1;
                }
            }
            ensure(out.shape() == &expected[..rank], "reduced shape mismatch")
        }
        #[cfg(feature = "op-gather")]
        Op::Gather { axis } => {
            let (data, indices) = (input(0)?, input(1)?);
            let axis = axis as usize;
            ensure(axis < data.rank as usize, "gather axis out of range")?;
            ensure(matches!(indices.dtype, DType::I64 | DType::I32), "indices must be integers")?;
            let out_dtype = match (data.dtype, data.quant) {
                (DType::I8, Quant::PerRow) => {
                    ensure(axis == 0, "quantized tables are gathered along axis 0")?;
                    DType::F32
                }
                (DType::F16, Quant::None) => DType::F32,
                (DType::I4, Quant::Grouped | Quant::GroupedMin) => {
                    ensure(axis == 0, "quantized tables are gathered along axis 0")?;
                    DType::F32
                }
                (DType::I4, _) => return Err(fail("int4 tables need grouped scales")),
                (dtype, _) => dtype,
            };
            ensure(out.dtype == out_dtype, "gather output type mismatch")?;
            let (ds, is) = (data.shape(), indices.shape());
            let rank = ds.len() - 1 + is.len();
            ensure(rank == out.rank as usize, "gather output rank mismatch")?;
            let os = out.shape();
            let ok = os[..axis] == ds[..axis]
                && os[axis..axis + is.len()] == *is
                && os[axis + is.len()..] == ds[axis + 1..];
            ensure(ok, "gather output shape mismatch")
        }
        Op::Reshape => {
            let x = input(0)?;
            ensure(x.dtype == out.dtype, "reshape changes the element type")?;
            let same = dims_product(x.shape()).is_some()
                && dims_product(x.shape()) == dims_product(out.shape());
            ensure(same, "reshape changes the element count")
        }
        #[cfg(feature = "op-transpose")]
        Op::Transpose { perm } => {
            let x = input(0)?;
            let rank = x.rank as usize;
            ensure(x.dtype == out.dtype && out.rank as usize == rank, "transpose mismatch")?;
            let mut seen = [false; MAX_RANK];
            for (i, &p) in perm.iter().enumerate().take(rank) {
                let p = p as usize;
                ensure(p < rank && !seen[p], "transpose permutation is invalid")?;
                seen[p] = true;
                ensure(out.dims[i] == x.dims[p], "transposed shape mismatch")?;
            }
            Ok(())
        }
        #[cfg(feature = "op-concat")]
        Op::Concat { axis } => {
            let axis = axis as usize;
            ensure(axis < out.rank as usize, "concat axis out of range")?;
            let mut total = Dim { factor: 0, exponents: out.dims[axis].exponents };
            for i in 0..n_in {
                let x = input(i)?;
                ensure(x.dtype == out.dtype && x.rank == out.rank, "concat input mismatch")?;
                for a in 0..out.rank as usize {
                    if a != axis {
                        ensure(x.dims[a] == out.dims[a], "concat inputs differ off the axis")?;
                    }
                }
                let d = x.dims[axis];
                ensure(d.same_symbols(&total), "concat of unlike symbolic extents")?;
                total.factor = total.factor.checked_add(d.factor).ok_or(fail("overflow"))?;
            }
            ensure(total == out.dims[axis], "concat output extent mismatch")
        }
        #[cfg(feature = "op-slice")]
        Op::Slice { steps, .. } => {
            let x = input(0)?;
            ensure(x.dtype == out.dtype && x.rank == out.rank, "slice input mismatch")?;
            ensure(steps.iter().all(|&s| s != 0), "slice step is 0")
        }
        #[cfg(feature = "op-expand")]
        Op::Expand => {
            let x = input(0)?;
            ensure(x.dtype == out.dtype, "expand changes the element type")?;
            ensure(expands_to(x.shape(), out.shape()), "input does not broadcast")
        }
        #[cfg(feature = "op-cast")]
        Op::Cast => {
            let x = input(0)?;
            ensure(x.shape() == out.shape(), "cast changes the shape")?;
            let castable = |d: DType| d != DType::I4;
            ensure(castable(x.dtype) && castable(out.dtype), "cast of int4 data")
        }
        #[cfg(feature = "op-where")]
        Op::Where => {
            let (c, x, y) = (input(0)?, input(1)?, input(2)?);
            ensure(c.dtype == DType::Bool, "condition must be boolean")?;
            ensure(x.dtype == out.dtype && y.dtype == out.dtype, "where branch type mismatch")?;
            let xy = broadcasts_to(x.shape(), y.shape(), out.shape());
            ensure(xy && expands_to(c.shape(), out.shape()), "shapes do not broadcast")
        }
        #[cfg(feature = "op-conv2d")]
        Op::Conv2d { window, groups, .. } => {
            let bias = if n_in > 2 { input(2).ok() } else { None };
            check_conv2d(index, &window, groups, &input(0)?, &input(1)?, bias.as_ref(), out)
        }
        #[cfg(feature = "op-pool")]
        Op::Pool { window, ceil_mode, .. } => {
            let x = input(0)?;
            ensure(x.dtype == DType::F32 && out.dtype == DType::F32, "pooling works on f32")?;
            ensure(x.rank == 4 && out.rank == 4, "pooling needs NCHW tensors of rank 4")?;
            ensure(x.dims[..2] == out.dims[..2], "pooling changes the batch or channel extent")?;
            check_window(index, &window, &x.dims[2..4], &out.dims[2..4], ceil_mode)
        }
        // check_op rejects ops that this build leaves out before their shapes are checked.
        #[allow(unreachable_patterns)]
        other => Err(Error::OpNotBuilt { op: index, feature: other.feature() }),
    }
}

/// Checks a convolution: NCHW f32 tensors, the weight's storage and its flattened
/// `[O, C / groups * kh * kw]` shape, the bias, and the output's spatial extents.
#[cfg(feature = "op-conv2d")]
fn check_conv2d(
    index: u32,
    window: &Window2d,
    groups: u32,
    x: &TensorEntry,
    w: &TensorEntry,
    bias: Option<&TensorEntry>,
    out: &TensorEntry,
) -> Result<()> {
    let fail = |reason| Error::InvalidOp { op: index, reason };
    let ensure = |ok: bool, reason| if ok { Ok(()) } else { Err(fail(reason)) };
    ensure(x.dtype == DType::F32 && out.dtype == DType::F32, "convolution works on f32")?;
    ensure(x.rank == 4 && out.rank == 4, "convolution needs NCHW tensors of rank 4")?;
    ensure(x.dims[0] == out.dims[0], "convolution changes the batch extent")?;
    let (channels, outputs) = match (x.dims[1].as_constant(), out.dims[1].as_constant()) {
        (Some(c), Some(o)) => (c as u64, o as u64),
        _ => return Err(fail("convolution channel extents must be constant")),
    };
    let groups = groups as u64;
    ensure(groups > 0, "convolution groups must be at least 1")?;
    ensure(channels % groups == 0 && outputs % groups == 0, "groups do not divide the channels")?;

    ensure(w.kind == TensorKind::Const && w.rank == 2, "convolution weight must be a constant")?;
    let weight_ok = matches!(
        (w.dtype, w.quant),
        (DType::F32, Quant::None)
            | (DType::F16, Quant::None)
            | (DType::I8, Quant::PerRow)
            | (DType::I4, Quant::Grouped)
    );
    ensure(weight_ok, "unsupported convolution weight storage")?;
    let taps = (channels / groups)
        .checked_mul(window.kernel[0] as u64)
        .and_then(|t| t.checked_mul(window.kernel[1] as u64));
    let row = w.dims[1].as_constant().map(u64::from);
    ensure(w.dims[0].as_constant().map(u64::from) == Some(outputs), "weight rows differ from O")?;
    ensure(taps.is_some() && row == taps, "weight row length differs from C / groups * kh * kw")?;
    if let Some(b) = bias {
        let n = Dim::constant(outputs as u32);
        let dtype_ok = matches!(b.dtype, DType::F32 | DType::F16);
        ensure(dtype_ok && b.shape() == [n], "bias must be f32 or f16 [O]")?;
    }
    check_window(index, window, &x.dims[2..4], &out.dims[2..4], false)
}

/// Checks that the spatial extents are constants and that `window` maps the input's onto the
/// output's.
#[cfg(any(feature = "op-conv2d", feature = "op-pool"))]
fn check_window(
    index: u32,
    window: &Window2d,
    input: &[Dim],
    output: &[Dim],
    ceil_mode: bool,
) -> Result<()> {
    let fail = |reason| Error::InvalidOp { op: index, reason };
    let positive = |v: &[u32]| v.iter().all(|&x| x > 0);
    if !positive(&window.kernel) || !positive(&window.strides) || !positive(&window.dilations) {
        return Err(fail("kernel, strides and dilations must be at least 1"));
    }
    for axis in 0..2 {
        let (Some(i), Some(o)) = (input[axis].as_constant(), output[axis].as_constant()) else {
            return Err(fail("spatial extents must be constant"));
        };
        let expected = window
            .output_extent(axis, i as u64, ceil_mode)
            .ok_or(fail("the dilated kernel is longer than the padded input"))?;
        if expected != o as u64 {
            return Err(fail("output spatial extent does not match the window"));
        }
    }
    Ok(())
}
