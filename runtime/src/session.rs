//! Running a model: a session owns a caller-supplied arena and executes the op list in it.

use core::marker::PhantomData;

use crate::cast::{as_bytes, cast, cast_mut, Plain};
use crate::error::{Error, Result};
use crate::format::{
    DType, Quant, TensorEntry, TensorKind, MAX_GRAPH_INPUTS, MAX_RANK, MAX_SYMBOLS, SECTION_ALIGN,
};
use crate::kernels::conv::{self, ConvWeights, Geometry};
use crate::kernels::generic::{self as k, WeightRows};
use crate::model::{is_absent, Model};
use crate::ops::{Op, OpRecord, Window2d};
use crate::shape::{concrete_broadcasts_to, next_index, Shape};

/// Element types that can be passed as inputs and read as outputs.
pub trait Element: Plain {
    /// The matching stored element type.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

/// Per-run state of a model: its arena, bound symbols and which inputs are set.
///
/// The model stays read-only; any number of sessions can share it.
pub struct Session<'m, 'a> {
    model: Model<'m>,
    arena: *mut u8,
    arena_len: usize,
    input_shapes: [Shape; MAX_GRAPH_INPUTS],
    inputs_set: u32,
    symbols: [u64; MAX_SYMBOLS],
    ran: bool,
    _arena: PhantomData<&'a mut [u8]>,
}

impl<'m, 'a> Session<'m, 'a> {
    /// Creates a session whose activations live in `arena`.
    ///
    /// The arena's start is rounded up to a 64-byte boundary, so an unaligned arena needs up to
    /// 63 bytes more than [`Model::arena_bytes`].
    ///
    /// # Errors
    /// [`Error::ArenaTooSmall`] with the required size.
    pub fn new(model: &Model<'m>, arena: &'a mut [u8]) -> Result<Self> {
        let pad = arena.as_ptr().align_offset(SECTION_ALIGN);
        let needed = pad.saturating_add(model.arena_bytes());
        if arena.len() < needed || pad >= SECTION_ALIGN {
            let required = if pad < SECTION_ALIGN { needed } else { model.arena_bytes_unaligned() };
            return Err(Error::ArenaTooSmall {
                required: required as u64,
                provided: arena.len() as u64,
            });
        }
        let arena = &mut arena[pad..];
        Ok(Session {
            model: *model,
            arena: arena.as_mut_ptr(),
            arena_len: arena.len(),
            input_shapes: [Shape { dims: [1; MAX_RANK], rank: 0 }; MAX_GRAPH_INPUTS],
            inputs_set: 0,
            symbols: [1; MAX_SYMBOLS],
            ran: false,
            _arena: PhantomData,
        })
    }

    /// Returns the model this session runs.
    pub fn model(&self) -> &Model<'m> {
        &self.model
    }

    /// Copies `data` with shape `shape` into graph input `index`.
    ///
    /// # Errors
    /// On an unknown index, a wrong element type, or a shape that the model's declared shape does
    /// not allow (constant axes must match; symbolic axes must not exceed their maximum).
    pub fn set_input<T: Element>(
        &mut self,
        index: usize,
        shape: &[usize],
        data: &[T],
    ) -> Result<()> {
        self.set_input_bytes(index, T::DTYPE, shape, as_bytes(data))
    }

    /// Copies the little-endian elements of type `dtype` in `bytes` into graph input `index`.
    ///
    /// Covers the element types [`set_input`](Self::set_input) has no Rust type for, such as
    /// [`DType::Bool`] (one byte per element, nonzero is true) and [`DType::I8`].
    ///
    /// # Errors
    /// As [`set_input`](Self::set_input); a byte count other than the shape's element count times
    /// the element size is a shape mismatch.
    pub fn set_input_bytes(
        &mut self,
        index: usize,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<()> {
        let t_index = self.model.input_tensor(index)?;
        let t = self.model.tensor(t_index)?;
        let input = index as u32;
        if t.dtype != dtype {
            return Err(Error::InputDtypeMismatch { input, expected: t.dtype, given: dtype });
        }
        if shape.len() != t.rank as usize {
            return Err(Error::InputShapeMismatch {
                input,
                axis: shape.len().min(t.rank as usize) as u32,
                expected: t.rank as u64,
                given: shape.len() as u64,
            });
        }
        for (axis, (d, &given)) in t.shape().iter().zip(shape).enumerate() {
            let limit = d.eval(self.model.symbol_max()).unwrap_or(0);
            let ok = match d.as_constant() {
                Some(c) => given as u64 == c as u64,
                None => given >= 1 && given as u64 <= limit,
            };
            if !ok {
                let axis = axis as u32;
                return Err(Error::InputShapeMismatch {
                    input,
                    axis,
                    expected: limit,
                    given: given as u64,
                });
            }
        }
        let shape = Shape::from_slice(shape).ok_or(Error::UnknownIo { index: input })?;
        if bytes.len() != shape.numel() * dtype.size() {
            return Err(Error::InputShapeMismatch {
                input,
                axis: u32::MAX,
                expected: shape.numel() as u64,
                given: (bytes.len() / dtype.size().max(1)) as u64,
            });
        }
        let dst = self.activation_mut(&t, bytes.len(), u32::MAX)?;
        dst.copy_from_slice(bytes);
        self.input_shapes[index] = shape;
        self.inputs_set |= 1 << index;
        self.ran = false;
        Ok(())
    }

    /// Runs every op once.
    ///
    /// # Errors
    /// [`Error::InputNotSet`], [`Error::SymbolConflict`], or a data-dependent error such as an
    /// out-of-range gather index.
    pub fn run(&mut self) -> Result<()> {
        self.ran = false;
        self.bind_symbols()?;
        let model = self.model;
        for (index, item) in model.ops().enumerate() {
            let (record, _) = item?;
            self.execute(index as u32, &record)?;
        }
        self.ran = true;
        Ok(())
    }

    /// Shape and values of graph output `index` after a successful [`run`](Self::run).
    ///
    /// # Errors
    /// [`Error::NotRun`], an unknown index, or a different element type.
    pub fn output<T: Element>(&self, index: usize) -> Result<(Shape, &[T])> {
        if !self.ran {
            return Err(Error::NotRun);
        }
        let t = self.model.tensor(self.model.output_tensor(index)?)?;
        if t.dtype != T::DTYPE {
            return Err(Error::InputDtypeMismatch {
                input: index as u32,
                expected: t.dtype,
                given: T::DTYPE,
            });
        }
        let shape = self.shape(&t, u32::MAX)?;
        let bytes = self.bytes(&t, shape.numel() * t.dtype.size(), u32::MAX)?;
        let values =
            cast(bytes).ok_or(Error::RuntimeShape { op: u32::MAX, reason: "misaligned output" })?;
        Ok((shape, values))
    }

    /// Shape, element type and little-endian element bytes of graph output `index` after a
    /// successful [`run`](Self::run), for any element type.
    ///
    /// # Errors
    /// [`Error::NotRun`] or an unknown index.
    pub fn output_bytes(&self, index: usize) -> Result<(Shape, DType, &[u8])> {
        if !self.ran {
            return Err(Error::NotRun);
        }
        let t = self.model.tensor(self.model.output_tensor(index)?)?;
        let shape = self.shape(&t, u32::MAX)?;
        let bytes = self.bytes(&t, shape.numel() * t.dtype.size(), u32::MAX)?;
        Ok((shape, t.dtype, bytes))
    }

    /// Element type of graph output `index`.
    pub fn output_dtype(&self, index: usize) -> Result<DType> {
        Ok(self.model.tensor(self.model.output_tensor(index)?)?.dtype)
    }

    /// Current values of the symbolic dimensions, as bound by the inputs of the last run.
    pub fn symbols(&self) -> &[u64; MAX_SYMBOLS] {
        &self.symbols
    }

    fn bind_symbols(&mut self) -> Result<()> {
        let mut bound = [0u64; MAX_SYMBOLS];
        for i in 0..self.model.input_count() {
            if self.inputs_set & (1 << i) == 0 {
                return Err(Error::InputNotSet { input: i as u32 });
            }
            let t = self.model.tensor(self.model.input_tensor(i)?)?;
            for (axis, d) in t.shape().iter().enumerate() {
                if let Some(s) = d.as_symbol() {
                    let value = self.input_shapes[i].dims[axis] as u64;
                    if bound[s] != 0 && bound[s] != value {
                        return Err(Error::SymbolConflict {
                            symbol: s as u32,
                            first: bound[s],
                            second: value,
                        });
                    }
                    bound[s] = value;
                }
            }
        }
        for (s, b) in self.symbols.iter_mut().zip(bound) {
            *s = if b == 0 { 1 } else { b };
        }
        Ok(())
    }

    fn shape(&self, t: &TensorEntry, op: u32) -> Result<Shape> {
        self.model
            .shape_of(t, &self.symbols)
            .ok_or(Error::RuntimeShape { op, reason: "shape overflows" })
    }

    /// Bytes of a tensor (constant or activation), at least `len` of them.
    fn bytes(&self, t: &TensorEntry, len: usize, op: u32) -> Result<&[u8]> {
        let too_short = Error::RuntimeShape { op, reason: "tensor data shorter than its shape" };
        if len as u64 > t.byte_len {
            return Err(too_short);
        }
        match t.kind {
            TensorKind::Const => self.model.const_bytes(t).get(..len).ok_or(too_short),
            TensorKind::Activation => {
                let start = t.offset as usize;
                if start.checked_add(len).is_none_or(|end| end > self.arena_len) {
                    return Err(too_short);
                }
                // SAFETY: `start + len` is within the arena, which this session borrows mutably for
                // 'a. Shared views handed out here never overlap the one mutable view an op writes
                // to: the file's op checks guarantee an op's output range is disjoint from its
                // input ranges, and `execute` writes only to that output.
                Ok(unsafe { core::slice::from_raw_parts(self.arena.add(start), len) })
            }
        }
    }

    /// Mutable bytes of an activation.
    ///
    /// Takes `&self` so an op can hold its input views while writing its output. Callers ask for
    /// at most one mutable view per op, and only of that op's output (or of a graph input between
    /// runs). The file's op checks keep that range disjoint from the op's inputs.
    #[allow(clippy::mut_from_ref)]
    fn activation_mut(&self, t: &TensorEntry, len: usize, op: u32) -> Result<&mut [u8]> {
        let start = t.offset as usize;
        let bad = Error::RuntimeShape { op, reason: "output outside the arena" };
        if t.kind != TensorKind::Activation || len as u64 > t.byte_len {
            return Err(bad);
        }
        if start.checked_add(len).is_none_or(|end| end > self.arena_len) {
            return Err(bad);
        }
        // SAFETY: the range is within the arena borrowed mutably for 'a (checked above). It is the
        // output of the op being executed (or a graph input being set between runs), which the
        // file's op checks keep disjoint from every input range read during the same op.
        Ok(unsafe { core::slice::from_raw_parts_mut(self.arena.add(start), len) })
    }

    fn typed<T: Plain>(&self, t: &TensorEntry, count: usize, op: u32) -> Result<&[T]> {
        let len = count.saturating_mul(core::mem::size_of::<T>());
        cast(self.bytes(t, len, op)?).ok_or(Error::RuntimeShape { op, reason: "misaligned tensor" })
    }

    fn typed_mut<T: Plain>(&self, t: &TensorEntry, count: usize, op: u32) -> Result<&mut [T]> {
        let len = count.saturating_mul(core::mem::size_of::<T>());
        cast_mut(self.activation_mut(t, len, op)?)
            .ok_or(Error::RuntimeShape { op, reason: "misaligned tensor" })
    }

    fn execute(&mut self, op: u32, rec: &OpRecord<'_>) -> Result<()> {
        let model = self.model;
        let input = |i: usize| model.tensor(rec.input(i));
        let out = model.tensor(rec.output(0))?;
        let out_shape = self.shape(&out, op)?;
        match rec.op {
            Op::Linear => self.linear(op, rec, &out, &out_shape),
            Op::MatMul => self.matmul(op, &input(0)?, &input(1)?, &out, &out_shape),
            Op::Binary(kind) => {
                let (a, b) = (input(0)?, input(1)?);
                let (sa, sb) = (self.shape(&a, op)?, self.shape(&b, op)?);
                if !concrete_broadcasts_to(&sa, &out_shape)
                    || !concrete_broadcasts_to(&sb, &out_shape)
                {
                    return Err(Error::RuntimeShape { op, reason: "operands do not broadcast" });
                }
                let xa = self.typed::<f32>(&a, sa.numel(), op)?;
                let xb = self.typed::<f32>(&b, sb.numel(), op)?;
                let y = self.typed_mut::<f32>(&out, out_shape.numel(), op)?;
                k::binary(kind, xa, &sa, xb, &sb, y, &out_shape);
                Ok(())
            }
            Op::Unary { kind, alpha, beta } => {
                let n = out_shape.numel();
                let x = self.typed::<f32>(&input(0)?, n, op)?;
                let y = self.typed_mut::<f32>(&out, n, op)?;
                k::unary(kind, alpha, beta, x, y);
                Ok(())
            }
            Op::LayerNorm { epsilon } => {
                let n = out_shape.numel();
                let d = out_shape.dims[out_shape.rank.saturating_sub(1)];
                let x = self.typed::<f32>(&input(0)?, n, op)?;
                let gamma = self.typed::<f32>(&input(1)?, d, op)?;
                let beta = match rec.input_count() > 2 && !is_absent(rec.input(2)) {
                    true => Some(self.typed::<f32>(&input(2)?, d, op)?),
                    false => None,
                };
                let y = self.typed_mut::<f32>(&out, n, op)?;
                k::layer_norm(x, gamma, beta, epsilon, d, y);
                Ok(())
            }
            Op::Softmax { axis } => {
                let axis = (axis as usize).min(out_shape.rank.saturating_sub(1));
                let dims = out_shape.as_slice();
                let outer: usize = dims[..axis].iter().product();
                let inner: usize = dims[axis + 1..].iter().product();
                let n = out_shape.numel();
                let x = self.typed::<f32>(&input(0)?, n, op)?;
                let y = self.typed_mut::<f32>(&out, n, op)?;
                k::softmax(x, y, outer, dims[axis], inner);
                Ok(())
            }
            Op::Reduce { kind, axes, .. } => {
                let x_entry = input(0)?;
                let xs = self.shape(&x_entry, op)?;
                let x = self.typed::<f32>(&x_entry, xs.numel(), op)?;
                let y = self.typed_mut::<f32>(&out, out_shape.numel(), op)?;
                k::reduce(kind, x, &xs, axes, y);
                Ok(())
            }
            Op::Gather { axis } => {
                self.gather(op, axis as usize, &input(0)?, &input(1)?, &out, &out_shape)
            }
            Op::Reshape => {
                let x = input(0)?;
                if x.kind == TensorKind::Activation && x.offset == out.offset {
                    return Ok(());
                }
                let len = out_shape.numel() * out.dtype.size();
                let src = self.bytes(&x, len, op)?;
                self.activation_mut(&out, len, op)?.copy_from_slice(src);
                Ok(())
            }
            Op::Transpose { perm } => {
                let x = input(0)?;
                let xs = self.shape(&x, op)?;
                self.movement(op, Movement::Transpose(perm), &x, &xs, &out, &out_shape)
            }
            Op::Expand => {
                let x = input(0)?;
                let xs = self.shape(&x, op)?;
                if !concrete_broadcasts_to(&xs, &out_shape) {
                    return Err(Error::RuntimeShape { op, reason: "input does not broadcast" });
                }
                self.movement(op, Movement::Expand, &x, &xs, &out, &out_shape)
            }
            Op::Concat { axis } => self.concat(op, rec, axis as usize, &out, &out_shape),
            Op::Slice { starts, steps } => {
                self.slice(op, &input(0)?, &starts, &steps, &out, &out_shape)
            }
            Op::Cast => self.cast_op(op, &input(0)?, &out, &out_shape),
            Op::Where => self.where_op(op, rec, &out, &out_shape),
            Op::Conv2d { window, groups, activation_min, activation_max } => {
                let activation = [activation_min, activation_max];
                self.conv2d(op, rec, window, groups as usize, activation, &out, &out_shape)
            }
            Op::Pool { kind, window, count_include_pad, .. } => {
                let x = input(0)?;
                let geometry = self.window_geometry(op, &x, window, &out_shape)?;
                let xv = self.typed::<f32>(&x, window_input_len(&geometry), op)?;
                let y = self.typed_mut::<f32>(&out, out_shape.numel(), op)?;
                conv::pool2d_nchw_f32(kind, xv, &geometry, count_include_pad, y);
                Ok(())
            }
        }
    }

    /// Returns the concrete extents of a window op, whose shapes were checked at open.
    fn window_geometry(
        &self,
        op: u32,
        x: &TensorEntry,
        window: Window2d,
        out_shape: &Shape,
    ) -> Result<Geometry> {
        let xs = self.shape(x, op)?;
        if xs.rank != 4 || out_shape.rank != 4 || xs.dims[0] != out_shape.dims[0] {
            return Err(Error::RuntimeShape { op, reason: "window op shapes are not NCHW" });
        }
        Ok(Geometry {
            batch: xs.dims[0],
            in_channels: xs.dims[1],
            in_size: [xs.dims[2], xs.dims[3]],
            out_channels: out_shape.dims[1],
            out_size: [out_shape.dims[2], out_shape.dims[3]],
            window,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn conv2d(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        window: Window2d,
        groups: usize,
        activation: [f32; 2],
        out: &TensorEntry,
        out_shape: &Shape,
    ) -> Result<()> {
        let model = self.model;
        let x = model.tensor(rec.input(0))?;
        let w = model.tensor(rec.input(1))?;
        let geometry = self.window_geometry(op, &x, window, out_shape)?;
        let xv = self.typed::<f32>(&x, window_input_len(&geometry), op)?;
        let bias = match rec.input_count() > 2 && !is_absent(rec.input(2)) {
            true => {
                let b = model.tensor(rec.input(2))?;
                Some(match b.dtype {
                    DType::F16 => {
                        conv::Bias::F16(self.typed::<u16>(&b, geometry.out_channels, op)?)
                    }
                    _ => conv::Bias::F32(self.typed::<f32>(&b, geometry.out_channels, op)?),
                })
            }
            false => None,
        };
        let y = self.typed_mut::<f32>(out, out_shape.numel(), op)?;
        let bad = Error::RuntimeShape { op, reason: "weight data does not match its shape" };
        let weights = match (w.dtype, w.quant) {
            (DType::F32, Quant::None) => ConvWeights::F32(cast(model.const_bytes(&w)).ok_or(bad)?),
            (DType::F16, Quant::None) => ConvWeights::F16(cast(model.const_bytes(&w)).ok_or(bad)?),
            (DType::I8, Quant::PerRow) => {
                let scales = model.const_bytes(&model.tensor(w.scale_tensor)?);
                ConvWeights::I8 {
                    q: cast(model.const_bytes(&w)).ok_or(bad)?,
                    scales: cast(scales).ok_or(bad)?,
                }
            }
            (DType::I4, Quant::Grouped) => {
                let scales = model.const_bytes(&model.tensor(w.scale_tensor)?);
                ConvWeights::I4(k::I4Rows {
                    packed: model.const_bytes(&w),
                    scales: cast(scales).ok_or(bad)?,
                    k: w.dims[1].factor as usize,
                    group: w.group_size as usize,
                })
            }
            _ => return Err(bad),
        };
        conv::conv2d_nchw_f32(xv, &geometry, groups, weights, bias, activation, y);
        Ok(())
    }

    fn linear(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        out: &TensorEntry,
        out_shape: &Shape,
    ) -> Result<()> {
        use crate::kernels::{self, Weights};

        let model = self.model;
        let x_entry = model.tensor(rec.input(0))?;
        let w = model.tensor(rec.input(1))?;
        let (n, kk) = (w.dims[0].factor as usize, w.dims[1].factor as usize);
        let rows = out_shape.numel().checked_div(n).unwrap_or(0);
        let x = self.typed::<f32>(&x_entry, rows * kk, op)?;
        let bias = match rec.input_count() > 2 && !is_absent(rec.input(2)) {
            true => Some(self.typed::<f32>(&model.tensor(rec.input(2))?, n, op)?),
            false => None,
        };
        let y = self.typed_mut::<f32>(out, rows * n, op)?;
        let bad = Error::RuntimeShape { op, reason: "weight data does not match its shape" };
        let weights = match (w.dtype, w.quant) {
            (DType::F32, _) => {
                let data = cast::<f32>(model.const_bytes(&w)).ok_or(bad)?;
                Weights::F32(k::F32Rows { w: data, k: kk })
            }
            (DType::F16, _) => {
                let data = cast::<u16>(model.const_bytes(&w)).ok_or(bad)?;
                Weights::F16(k::F16Rows { w: data, k: kk })
            }
            (DType::I8, Quant::PerRow) => {
                let q = cast::<i8>(model.const_bytes(&w)).ok_or(bad)?;
                let s = model.tensor(w.scale_tensor)?;
                let scales = cast::<f32>(model.const_bytes(&s)).ok_or(bad)?;
                Weights::I8(k::I8Rows { q, scales, k: kk })
            }
            (DType::I4, Quant::Grouped) => {
                let s = model.tensor(w.scale_tensor)?;
                let scales = cast::<u16>(model.const_bytes(&s)).ok_or(bad)?;
                let packed = model.const_bytes(&w);
                let group = w.group_size as usize;
                Weights::I4(k::I4Rows { packed, scales, k: kk, group })
            }
            _ => return Err(bad),
        };
        kernels::linear(x, rows, kk, weights, n, bias, y);
        Ok(())
    }

    fn matmul(
        &mut self,
        op: u32,
        a: &TensorEntry,
        b: &TensorEntry,
        out: &TensorEntry,
        os: &Shape,
    ) -> Result<()> {
        let (sa, sb) = (self.shape(a, op)?, self.shape(b, op)?);
        let (m, kk) = (sa.dims[sa.rank - 2], sa.dims[sa.rank - 1]);
        let n = sb.dims[sb.rank - 1];
        if sb.dims[sb.rank - 2] != kk || os.dims[os.rank - 2] != m || os.dims[os.rank - 1] != n {
            return Err(Error::RuntimeShape { op, reason: "matmul extents differ" });
        }
        let batch = |s: &Shape| Shape::from_slice(&s.as_slice()[..s.rank - 2]);
        let bad = Error::RuntimeShape { op, reason: "matmul batch axes do not broadcast" };
        let (ba, bb, bo) = (batch(&sa).ok_or(bad)?, batch(&sb).ok_or(bad)?, batch(os).ok_or(bad)?);
        if !concrete_broadcasts_to(&ba, &bo) || !concrete_broadcasts_to(&bb, &bo) {
            return Err(bad);
        }
        let xa = self.typed::<f32>(a, sa.numel(), op)?;
        let xb = self.typed::<f32>(b, sb.numel(), op)?;
        let y = self.typed_mut::<f32>(out, os.numel(), op)?;
        let (stride_a, stride_b) = (ba.broadcast_strides(&bo), bb.broadcast_strides(&bo));
        let mut index = [0usize; MAX_RANK];
        for bi in 0..bo.numel() {
            let (mut oa, mut ob) = (0, 0);
            for ax in 0..bo.rank {
                oa += index[ax] * stride_a[ax];
                ob += index[ax] * stride_b[ax];
            }
            let a_mat = &xa[oa * m * kk..(oa + 1) * m * kk];
            let b_mat = &xb[ob * kk * n..(ob + 1) * kk * n];
            crate::kernels::matmul(a_mat, b_mat, &mut y[bi * m * n..(bi + 1) * m * n], m, kk, n);
            next_index(&mut index, bo.as_slice());
        }
        Ok(())
    }

    fn gather(
        &mut self,
        op: u32,
        axis: usize,
        data: &TensorEntry,
        indices: &TensorEntry,
        out: &TensorEntry,
        out_shape: &Shape,
    ) -> Result<()> {
        let ds = self.shape(data, op)?;
        let is = self.shape(indices, op)?;
        let extent = ds.dims[axis];
        let outer: usize = ds.dims[..axis].iter().product();
        let inner: usize = ds.as_slice()[axis + 1..].iter().product();
        let count = is.numel();
        if outer * count * inner != out_shape.numel() {
            return Err(Error::RuntimeShape { op, reason: "gather output size mismatch" });
        }
        let index_at = |i: usize| -> Result<usize> {
            let raw = match indices.dtype {
                DType::I64 => self.typed::<i64>(indices, count, op)?[i],
                _ => self.typed::<i32>(indices, count, op)?[i] as i64,
            };
            let v = if raw < 0 { raw + extent as i64 } else { raw };
            if v < 0 || v as u64 >= extent as u64 {
                return Err(Error::IndexOutOfRange { op, index: raw, extent: extent as u64 });
            }
            Ok(v as usize)
        };
        if data.quant == Quant::PerRow {
            let bad =
                Error::RuntimeShape { op, reason: "quantized table does not match its shape" };
            let q = cast::<i8>(self.model.const_bytes(data)).ok_or(bad)?;
            let s = self.model.tensor(data.scale_tensor)?;
            let scales = cast::<f32>(self.model.const_bytes(&s)).ok_or(bad)?;
            let y = self.typed_mut::<f32>(out, out_shape.numel(), op)?;
            for i in 0..count {
                let row = index_at(i)?;
                let src = q.get(row * inner..(row + 1) * inner).ok_or(bad)?;
                let scale = scales.get(row).copied().ok_or(bad)?;
                for (o, &v) in y[i * inner..(i + 1) * inner].iter_mut().zip(src) {
                    *o = v as f32 * scale;
                }
            }
            return Ok(());
        }
        if data.quant == Quant::Grouped {
            let bad = Error::RuntimeShape { op, reason: "int4 table does not match its shape" };
            let s = self.model.tensor(data.scale_tensor)?;
            let scales = cast::<u16>(self.model.const_bytes(&s)).ok_or(bad)?;
            let rows = k::I4Rows {
                packed: self.model.const_bytes(data),
                scales,
                k: inner,
                group: data.group_size as usize,
            };
            let y = self.typed_mut::<f32>(out, out_shape.numel(), op)?;
            for i in 0..count {
                let row = index_at(i)?;
                rows.fill(row, 0, &mut y[i * inner..(i + 1) * inner]);
            }
            return Ok(());
        }
        if data.dtype == DType::F16 {
            let bad = Error::RuntimeShape { op, reason: "f16 table does not match its shape" };
            let table = self.typed::<u16>(data, ds.numel(), op)?;
            let y = self.typed_mut::<f32>(out, out_shape.numel(), op)?;
            for o in 0..outer {
                for i in 0..count {
                    let row = index_at(i)?;
                    let from = (o * extent + row) * inner;
                    let src = table.get(from..from + inner).ok_or(bad)?;
                    let to = (o * count + i) * inner;
                    for (dst, &bits) in y[to..to + inner].iter_mut().zip(src) {
                        *dst = half::f16::from_bits(bits).to_f32();
                    }
                }
            }
            return Ok(());
        }
        let esize = data.dtype.size();
        let src = self.bytes(data, ds.numel() * esize, op)?;
        let dst = self.activation_mut(out, out_shape.numel() * esize, op)?;
        let block = inner * esize;
        for o in 0..outer {
            for i in 0..count {
                let row = index_at(i)?;
                let from = (o * extent + row) * block;
                let to = (o * count + i) * block;
                dst[to..to + block].copy_from_slice(&src[from..from + block]);
            }
        }
        Ok(())
    }

    /// Runs a transpose or expand on typed views chosen by element size.
    fn movement(
        &mut self,
        op: u32,
        m: Movement,
        x: &TensorEntry,
        xs: &Shape,
        out: &TensorEntry,
        os: &Shape,
    ) -> Result<()> {
        let esize = x.dtype.size();
        let src = self.bytes(x, xs.numel() * esize, op)?;
        let dst = self.activation_mut(out, os.numel() * esize, op)?;
        let bad = Error::RuntimeShape { op, reason: "misaligned tensor" };
        match esize {
            1 => m.apply(src, xs, dst, os),
            2 => m.apply(cast::<u16>(src).ok_or(bad)?, xs, cast_mut::<u16>(dst).ok_or(bad)?, os),
            4 => m.apply(cast::<u32>(src).ok_or(bad)?, xs, cast_mut::<u32>(dst).ok_or(bad)?, os),
            8 => m.apply(cast::<u64>(src).ok_or(bad)?, xs, cast_mut::<u64>(dst).ok_or(bad)?, os),
            _ => return Err(bad),
        }
        Ok(())
    }

    fn concat(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        axis: usize,
        out: &TensorEntry,
        os: &Shape,
    ) -> Result<()> {
        let esize = out.dtype.size();
        let outer: usize = os.dims[..axis].iter().product();
        let inner: usize = os.as_slice()[axis + 1..].iter().product();
        let out_block = os.dims[axis] * inner * esize;
        let dst = self.activation_mut(out, os.numel() * esize, op)?;
        let mut at = 0;
        for i in 0..rec.input_count() {
            let x = self.model.tensor(rec.input(i))?;
            let xs = self.shape(&x, op)?;
            let block = xs.dims[axis] * inner * esize;
            if at + block > out_block {
                return Err(Error::RuntimeShape { op, reason: "concat inputs exceed the output" });
            }
            let src = self.bytes(&x, xs.numel() * esize, op)?;
            for o in 0..outer {
                let to = o * out_block + at;
                dst[to..to + block].copy_from_slice(&src[o * block..(o + 1) * block]);
            }
            at += block;
        }
        Ok(())
    }

    fn slice(
        &mut self,
        op: u32,
        x: &TensorEntry,
        starts: &[u32; MAX_RANK],
        steps: &[i32; MAX_RANK],
        out: &TensorEntry,
        os: &Shape,
    ) -> Result<()> {
        let xs = self.shape(x, op)?;
        for ax in 0..os.rank {
            let (start, step, len) = (starts[ax] as i64, steps[ax] as i64, os.dims[ax] as i64);
            let last = start + (len - 1) * step;
            if start >= xs.dims[ax] as i64 || last < 0 || last >= xs.dims[ax] as i64 {
                return Err(Error::RuntimeShape { op, reason: "slice reaches past the input" });
            }
        }
        let esize = x.dtype.size();
        let src = self.bytes(x, xs.numel() * esize, op)?;
        let dst = self.activation_mut(out, os.numel() * esize, op)?;
        let strides = xs.strides();
        let mut index = [0usize; MAX_RANK];
        for chunk in dst.chunks_exact_mut(esize.max(1)) {
            let mut from = 0i64;
            for ax in 0..os.rank {
                let pos = starts[ax] as i64 + index[ax] as i64 * steps[ax] as i64;
                from += pos * strides[ax] as i64;
            }
            let from = from as usize * esize;
            chunk.copy_from_slice(&src[from..from + esize]);
            next_index(&mut index, os.as_slice());
        }
        Ok(())
    }

    fn cast_op(&mut self, op: u32, x: &TensorEntry, out: &TensorEntry, os: &Shape) -> Result<()> {
        let n = os.numel();
        let src = self.bytes(x, n * x.dtype.size(), op)?;
        let dst = self.activation_mut(out, n * out.dtype.size(), op)?;
        let bad = Error::RuntimeShape { op, reason: "unsupported cast" };
        for i in 0..n {
            let v = read_scalar(src, x.dtype, i).ok_or(bad)?;
            write_scalar(dst, out.dtype, i, v).ok_or(bad)?;
        }
        Ok(())
    }

    fn where_op(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        out: &TensorEntry,
        os: &Shape,
    ) -> Result<()> {
        let model = self.model;
        let (c, x, y) =
            (model.tensor(rec.input(0))?, model.tensor(rec.input(1))?, model.tensor(rec.input(2))?);
        let (cs, xs, ys) = (self.shape(&c, op)?, self.shape(&x, op)?, self.shape(&y, op)?);
        let fits = [&cs, &xs, &ys].iter().all(|s| concrete_broadcasts_to(s, os));
        if !fits {
            return Err(Error::RuntimeShape { op, reason: "where operands do not broadcast" });
        }
        let esize = out.dtype.size();
        let cond = self.bytes(&c, cs.numel(), op)?;
        let xb = self.bytes(&x, xs.numel() * esize, op)?;
        let yb = self.bytes(&y, ys.numel() * esize, op)?;
        let dst = self.activation_mut(out, os.numel() * esize, op)?;
        let (sc, sx, sy) =
            (cs.broadcast_strides(os), xs.broadcast_strides(os), ys.broadcast_strides(os));
        let mut index = [0usize; MAX_RANK];
        for chunk in dst.chunks_exact_mut(esize.max(1)) {
            let (mut oc, mut ox, mut oy) = (0, 0, 0);
            for ax in 0..os.rank {
                oc += index[ax] * sc[ax];
                ox += index[ax] * sx[ax];
                oy += index[ax] * sy[ax];
            }
            let pick = if cond[oc] != 0 { &xb[ox * esize..] } else { &yb[oy * esize..] };
            chunk.copy_from_slice(&pick[..esize]);
            next_index(&mut index, os.as_slice());
        }
        Ok(())
    }
}

/// Elements of a window op's input.
fn window_input_len(g: &Geometry) -> usize {
    g.batch * g.in_channels * g.in_size[0] * g.in_size[1]
}

/// Data-movement kernels that only depend on the element size.
#[derive(Clone, Copy)]
enum Movement {
    Transpose([u8; MAX_RANK]),
    Expand,
}

impl Movement {
    fn apply<T: Copy>(self, src: &[T], xs: &Shape, dst: &mut [T], os: &Shape) {
        match self {
            Movement::Transpose(perm) => k::transpose(src, xs, &perm, dst),
            Movement::Expand => k::expand(src, xs, dst, os),
        }
    }
}

/// A scalar read for casts: integers stay exact, floats go through f64.
#[derive(Clone, Copy)]
enum Scalar {
    Int(i64),
    Float(f64),
}

fn read_scalar(bytes: &[u8], dtype: DType, i: usize) -> Option<Scalar> {
    let size = dtype.size();
    let b = bytes.get(i * size..(i + 1) * size)?;
    Some(match dtype {
        DType::F32 => Scalar::Float(f32::from_le_bytes(b.try_into().ok()?) as f64),
        DType::F16 => Scalar::Float(half::f16::from_le_bytes(b.try_into().ok()?).to_f64()),
        DType::I64 => Scalar::Int(i64::from_le_bytes(b.try_into().ok()?)),
        DType::I32 => Scalar::Int(i32::from_le_bytes(b.try_into().ok()?) as i64),
        DType::I8 => Scalar::Int(b[0] as i8 as i64),
        DType::U8 => Scalar::Int(b[0] as i64),
        DType::Bool => Scalar::Int((b[0] != 0) as i64),
        DType::I4 => return None,
    })
}

fn write_scalar(bytes: &mut [u8], dtype: DType, i: usize, v: Scalar) -> Option<()> {
    let size = dtype.size();
    let b = bytes.get_mut(i * size..(i + 1) * size)?;
    let as_f64 = match v {
        Scalar::Int(x) => x as f64,
        Scalar::Float(x) => x,
    };
    let as_i64 = match v {
        Scalar::Int(x) => x,
        Scalar::Float(x) => x as i64,
    };
    match dtype {
        DType::F32 => b.copy_from_slice(&(as_f64 as f32).to_le_bytes()),
        DType::F16 => b.copy_from_slice(&half::f16::from_f64(as_f64).to_le_bytes()),
        DType::I64 => b.copy_from_slice(&as_i64.to_le_bytes()),
        DType::I32 => b.copy_from_slice(&(as_i64 as i32).to_le_bytes()),
        DType::I8 => b[0] = as_i64 as i8 as u8,
        DType::U8 => b[0] = as_i64 as u8,
        DType::Bool => b[0] = (as_f64 != 0.0) as u8,
        DType::I4 => return None,
    }
    Some(())
}
