//! Op dispatch: each op of the list runs its kernel on views of the arena and the file.
//!
//! An op whose cargo feature is off has no code here, and `Model::open` rejects files that use it.
// Builds without every op leave some imports and parameters unused.
#![cfg_attr(not(feature = "all-ops"), allow(unused_imports, unused_variables))]

use crate::cast::cast;
use crate::error::{Error, Result};
use crate::format::{DType, Quant, TensorEntry, TensorKind, MAX_RANK};
use crate::kernels::conv::{self, ConvWeights, Geometry};
use crate::kernels::generic as k;
#[cfg(feature = "weights-int4")]
use crate::kernels::generic::WeightRows;
#[cfg(all(feature = "op-conv2d", feature = "int8-activations"))]
use crate::kernels::integer;
use crate::model::is_absent;
use crate::ops::{Activation, BinaryKind, Op, OpRecord, Window2d};
use crate::shape::{concrete_broadcasts_to, next_index, Shape};

use super::Session;

impl<'m> Session<'m, '_> {
    pub(super) fn execute(&mut self, op: u32, rec: &OpRecord<'_>) -> Result<()> {
        let model = self.model;
        let input = |i: usize| model.tensor(rec.input(i));
        // Every op has an input 0 (checked at open); reading it once keeps the code small.
        let x = input(0)?;
        let out = model.tensor(rec.output(0))?;
        let out_shape = self.shape(&out, op)?;
        match rec.op {
            #[cfg(feature = "op-linear")]
            Op::Linear { activation } => self.linear(op, rec, activation, &x, &out, &out_shape),
            #[cfg(feature = "op-matmul")]
            Op::MatMul => self.matmul(op, &x, &input(1)?, &out, &out_shape),
            #[cfg(feature = "op-binary")]
            Op::Binary(kind) => self.binary(op, rec, kind, &x, &out, &out_shape),
            #[cfg(feature = "op-unary")]
            Op::Unary { kind, alpha, beta } => {
                let n = out_shape.numel();
                if rec.in_place() {
                    let y = self.typed_mut::<f32>(&out, n, op)?;
                    k::unary_in_place(kind, alpha, beta, y);
                    return Ok(());
                }
                let x = self.typed::<f32>(&x, n, op)?;
                let y = self.typed_mut::<f32>(&out, n, op)?;
                k::unary(kind, alpha, beta, x, y);
                Ok(())
            }
            #[cfg(feature = "op-layer-norm")]
            Op::LayerNorm { epsilon } => self.layer_norm(op, rec, epsilon, &x, &out, &out_shape),
            #[cfg(feature = "op-attention")]
            Op::Attention { scale } => self.attention(op, rec, scale, &out, &out_shape),
            #[cfg(feature = "op-softmax")]
            Op::Softmax { axis } => {
                let axis = (axis as usize).min(out_shape.rank.saturating_sub(1));
                let dims = out_shape.as_slice();
                let outer: usize = dims[..axis].iter().product();
                let inner: usize = dims[axis + 1..].iter().product();
                let n = out_shape.numel();
                let x = self.typed::<f32>(&x, n, op)?;
                let y = self.typed_mut::<f32>(&out, n, op)?;
                k::softmax(x, y, outer, dims[axis], inner);
                Ok(())
            }
            #[cfg(feature = "op-reduce")]
            Op::Reduce { kind, axes, .. } => {
                let xs = self.shape(&x, op)?;
                let x = self.typed::<f32>(&x, xs.numel(), op)?;
                let y = self.typed_mut::<f32>(&out, out_shape.numel(), op)?;
                k::reduce(kind, x, &xs, axes, y);
                Ok(())
            }
            #[cfg(feature = "op-gather")]
            Op::Gather { axis } => self.gather(op, axis as usize, &x, &input(1)?, &out, &out_shape),
            Op::Reshape => {
                if x.kind == TensorKind::Activation && x.offset == out.offset {
                    return Ok(());
                }
                let len = out_shape.numel() * out.dtype.size();
                let src = self.bytes(&x, len, op)?;
                self.activation_mut(&out, len, op)?.copy_from_slice(src);
                Ok(())
            }
            #[cfg(feature = "op-transpose")]
            Op::Transpose { perm } => {
                let xs = self.shape(&x, op)?;
                self.movement(op, Movement::Transpose(perm), &x, &xs, &out, &out_shape)
            }
            #[cfg(feature = "op-expand")]
            Op::Expand => {
                let xs = self.shape(&x, op)?;
                if !concrete_broadcasts_to(&xs, &out_shape) {
                    return Err(Error::RuntimeShape { op, reason: "input does not broadcast" });
                }
                self.movement(op, Movement::Expand, &x, &xs, &out, &out_shape)
            }
            #[cfg(feature = "op-concat")]
            Op::Concat { axis } => self.concat(op, rec, axis as usize, &out, &out_shape),
            #[cfg(feature = "op-slice")]
            Op::Slice { starts, steps } => self.slice(op, &x, &starts, &steps, &out, &out_shape),
            #[cfg(feature = "op-cast")]
            Op::Cast => self.cast_op(op, &x, &out, &out_shape),
            #[cfg(feature = "op-where")]
            Op::Where => self.where_op(op, rec, &out, &out_shape),
            #[cfg(feature = "op-conv2d")]
            Op::Conv2d { window, groups, activation_min, activation_max } => {
                let activation = [activation_min, activation_max];
                self.conv2d(op, rec, &x, window, groups as usize, activation, &out, &out_shape)
            }
            #[cfg(feature = "op-pool")]
            Op::Pool { kind, window, count_include_pad, .. } => {
                let geometry = self.window_geometry(op, &x, window, &out_shape)?;
                let xv = self.typed::<f32>(&x, window_input_len(&geometry), op)?;
                let y = self.typed_mut::<f32>(&out, out_shape.numel(), op)?;
                conv::pool2d_nchw_f32(kind, xv, &geometry, count_include_pad, y);
                Ok(())
            }
            // Model::open rejects files with ops that this build leaves out.
            #[allow(unreachable_patterns)]
            other => Err(Error::OpNotBuilt { op, feature: other.feature() }),
        }
    }

    #[cfg(feature = "op-binary")]
    fn binary(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        kind: BinaryKind,
        a: &TensorEntry,
        out: &TensorEntry,
        out_shape: &Shape,
    ) -> Result<()> {
        let b = self.model.tensor(rec.input(1))?;
        let (sa, sb) = (self.shape(a, op)?, self.shape(&b, op)?);
        if !concrete_broadcasts_to(&sa, out_shape) || !concrete_broadcasts_to(&sb, out_shape) {
            return Err(Error::RuntimeShape { op, reason: "operands do not broadcast" });
        }
        let xb = self.typed::<f32>(&b, sb.numel(), op)?;
        if rec.in_place() {
            // `a` has the output's shape and place (checked at open).
            let y = self.typed_mut::<f32>(out, out_shape.numel(), op)?;
            k::binary_in_place(kind, y, xb, &sb, out_shape);
            return Ok(());
        }
        let xa = self.typed::<f32>(a, sa.numel(), op)?;
        let y = self.typed_mut::<f32>(out, out_shape.numel(), op)?;
        k::binary(kind, xa, &sa, xb, &sb, y, out_shape);
        Ok(())
    }

    #[cfg(feature = "op-layer-norm")]
    fn layer_norm(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        epsilon: f32,
        x: &TensorEntry,
        out: &TensorEntry,
        out_shape: &Shape,
    ) -> Result<()> {
        let model = self.model;
        let n = out_shape.numel();
        let d = out_shape.dims[out_shape.rank.saturating_sub(1)];
        let x = self.typed::<f32>(x, n, op)?;
        let gamma = self.typed::<f32>(&model.tensor(rec.input(1))?, d, op)?;
        let beta = match rec.input_count() > 2 && !is_absent(rec.input(2)) {
            true => Some(self.typed::<f32>(&model.tensor(rec.input(2))?, d, op)?),
            false => None,
        };
        let y = self.typed_mut::<f32>(out, n, op)?;
        k::layer_norm(x, gamma, beta, epsilon, d, y);
        Ok(())
    }

    /// Returns the concrete extents of a window op, whose shapes were checked at open.
    #[cfg(any(feature = "op-conv2d", feature = "op-pool"))]
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

    #[cfg(feature = "op-conv2d")]
    #[allow(clippy::too_many_arguments)]
    fn conv2d(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        x: &TensorEntry,
        window: Window2d,
        groups: usize,
        activation: [f32; 2],
        out: &TensorEntry,
        out_shape: &Shape,
    ) -> Result<()> {
        let model = self.model;
        let w = model.tensor(rec.input(1))?;
        let geometry = self.window_geometry(op, x, window, out_shape)?;
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
        let weights = self.conv_weights(op, &w)?;
        // With int8 activations, int8 weights take the integer kernels where they apply.
        #[cfg(feature = "int8-activations")]
        let int8 = match weights {
            ConvWeights::I8 { q, scales } if self.int8_activations => {
                Some(integer::ConvI8 { q, scales })
            }
            _ => None,
        };
        if rec.in_place() {
            // Input 0 is the output's region and input 3 the scratch (both checked at open).
            let needed =
                conv::in_place_scratch_len(&window, geometry.in_channels, geometry.in_size);
            let s = model.tensor(rec.input(3))?;
            let len = self.shape(&s, op)?.numel();
            let short = Error::RuntimeShape { op, reason: "scratch shorter than the op needs" };
            if needed.is_none_or(|n| len < n) {
                return Err(short);
            }
            let scratch = self.typed_mut::<f32>(&s, len, op)?;
            let xy = self.typed_mut::<f32>(out, out_shape.numel(), op)?;
            #[cfg(feature = "int8-activations")]
            let integer = int8.is_some_and(|w| {
                integer::conv2d_nchw_int8_in_place(xy, &geometry, groups, w, bias, activation)
            });
            #[cfg(not(feature = "int8-activations"))]
            let integer = false;
            if !integer {
                conv::conv2d_nchw_f32_in_place(
                    xy, &geometry, groups, weights, bias, activation, scratch,
                );
            }
            return Ok(());
        }
        let xv = self.typed::<f32>(x, window_input_len(&geometry), op)?;
        let y = self.typed_mut::<f32>(out, out_shape.numel(), op)?;
        #[cfg(feature = "int8-activations")]
        let integer = int8.is_some_and(|w| {
            integer::conv2d_nchw_int8(xv, &geometry, groups, w, bias, activation, y)
        });
        #[cfg(not(feature = "int8-activations"))]
        let integer = false;
        if !integer {
            conv::conv2d_nchw_f32(xv, &geometry, groups, weights, bias, activation, y);
        }
        Ok(())
    }

    /// A convolution weight's values and scales, borrowed from the file.
    #[cfg(feature = "op-conv2d")]
    fn conv_weights(&self, op: u32, w: &TensorEntry) -> Result<ConvWeights<'m>> {
        let model = self.model;
        let bad = Error::RuntimeShape { op, reason: "weight data does not match its shape" };
        let weights = match (w.dtype, w.quant) {
            (DType::F32, Quant::None) => ConvWeights::F32(cast(model.const_bytes(w)).ok_or(bad)?),
            (DType::F16, Quant::None) => ConvWeights::F16(cast(model.const_bytes(w)).ok_or(bad)?),
            (DType::I8, Quant::PerRow) => {
                let scales = model.const_bytes(&model.tensor(w.scale_tensor)?);
                ConvWeights::I8 {
                    q: cast(model.const_bytes(w)).ok_or(bad)?,
                    scales: cast(scales).ok_or(bad)?,
                }
            }
            #[cfg(feature = "weights-int4")]
            (DType::I4, Quant::Grouped) => ConvWeights::I4(model.int4_rows(w).ok_or(bad)?),
            _ => return Err(bad),
        };
        Ok(weights)
    }

    #[cfg(feature = "op-linear")]
    fn linear(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        activation: Option<Activation>,
        x_entry: &TensorEntry,
        out: &TensorEntry,
        out_shape: &Shape,
    ) -> Result<()> {
        use crate::kernels;

        let model = self.model;
        let w = model.tensor(rec.input(1))?;
        let (n, kk) = (w.dims[0].factor as usize, w.dims[1].factor as usize);
        let rows = out_shape.numel().checked_div(n).unwrap_or(0);
        let x = self.typed::<f32>(x_entry, rows * kk, op)?;
        let bias = match rec.input_count() > 2 && !is_absent(rec.input(2)) {
            true => Some(self.typed::<f32>(&model.tensor(rec.input(2))?, n, op)?),
            false => None,
        };
        let y = self.typed_mut::<f32>(out, rows * n, op)?;
        let bad = Error::RuntimeShape { op, reason: "weight data does not match its shape" };
        let weights = model.linear_weights(&w).ok_or(bad)?;
        let kernel = match self.int8_activations {
            true => kernels::linear_int8_rows as kernels::LinearKernel,
            false => kernels::linear as kernels::LinearKernel,
        };
        #[cfg(feature = "std")]
        match self.int8_activations {
            true => kernels::parallel::linear_int8_rows_threads(
                activation,
                self.threads,
                x,
                rows,
                kk,
                weights,
                n,
                bias,
                y,
            ),
            false => kernels::parallel::linear_threads_with(
                kernel,
                activation,
                self.threads,
                x,
                rows,
                kk,
                weights,
                n,
                bias,
                y,
            ),
        }
        #[cfg(not(feature = "std"))]
        {
            kernel(x, rows, kk, weights, n, bias, y);
            #[cfg(feature = "op-unary")]
            kernels::activate(activation, &mut y[..rows * n]);
        }
        Ok(())
    }

    #[cfg(feature = "op-matmul")]
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
        // Product `bi` reads the operands that its index along the output's batch axes maps to
        // through each operand's broadcast strides.
        let offsets = |mut bi: usize| {
            let (mut oa, mut ob) = (0, 0);
            for ax in (0..bo.rank).rev() {
                let i = bi % bo.dims[ax].max(1);
                bi /= bo.dims[ax].max(1);
                oa += i * stride_a[ax];
                ob += i * stride_b[ax];
            }
            (oa, ob)
        };
        let a_of = |bi: usize| {
            let oa = offsets(bi).0;
            &xa[oa * m * kk..(oa + 1) * m * kk]
        };
        let b_of = |bi: usize| {
            let ob = offsets(bi).1;
            &xb[ob * kk * n..(ob + 1) * kk * n]
        };
        let count = bo.numel();
        #[cfg(feature = "std")]
        crate::kernels::parallel::matmul_batch_threads(
            self.threads,
            count,
            a_of,
            b_of,
            y,
            m,
            kk,
            n,
        );
        #[cfg(not(feature = "std"))]
        crate::kernels::matmul_batch(count, a_of, b_of, y, m, kk, n);
        Ok(())
    }

    #[cfg(feature = "op-attention")]
    fn attention(
        &mut self,
        op: u32,
        rec: &OpRecord<'_>,
        scale: f32,
        out: &TensorEntry,
        os: &Shape,
    ) -> Result<()> {
        use crate::kernels::attention::{attention_head, HeadDims, Mask};
        let model = self.model;
        let (q, kt, v) =
            (model.tensor(rec.input(0))?, model.tensor(rec.input(1))?, model.tensor(rec.input(2))?);
        let (sq, sk, sv) = (self.shape(&q, op)?, self.shape(&kt, op)?, self.shape(&v, op)?);
        let last2 = |s: &Shape| (s.dims[s.rank - 2], s.dims[s.rank - 1]);
        let ((queries, depth), (depth_k, keys), (keys_v, width)) =
            (last2(&sq), last2(&sk), last2(&sv));
        if depth_k != depth || keys_v != keys || last2(os) != (queries, width) {
            return Err(Error::RuntimeShape { op, reason: "attention extents differ" });
        }

        let batch = |s: &Shape| Shape::from_slice(&s.as_slice()[..s.rank - 2]);
        let bad = Error::RuntimeShape { op, reason: "attention batch axes do not broadcast" };
        let (bq, bk, bv) = (batch(&sq).ok_or(bad)?, batch(&sk).ok_or(bad)?, batch(&sv).ok_or(bad)?);
        let bo = batch(os).ok_or(bad)?;
        if ![&bq, &bk, &bv].iter().all(|b| concrete_broadcasts_to(b, &bo)) {
            return Err(bad);
        }
        let mask = match rec.input_count() > 3 && !is_absent(rec.input(3)) {
            true => {
                let m = model.tensor(rec.input(3))?;
                let sm = self.shape(&m, op)?;
                let mut dims = [0usize; MAX_RANK];
                dims[..bo.rank].copy_from_slice(bo.as_slice());
                dims[bo.rank] = queries;
                dims[bo.rank + 1] = keys;
                let scores = Shape::from_slice(&dims[..bo.rank + 2]).ok_or(bad)?;
                if !concrete_broadcasts_to(&sm, &scores) {
                    return Err(Error::RuntimeShape {
                        op,
                        reason: "the attention mask does not broadcast to the scores",
                    });
                }
                Some((self.typed::<f32>(&m, sm.numel(), op)?, sm.broadcast_strides(&scores)))
            }
            false => None,
        };

        let xq = self.typed::<f32>(&q, sq.numel(), op)?;
        let xk = self.typed::<f32>(&kt, sk.numel(), op)?;
        let xv = self.typed::<f32>(&v, sv.numel(), op)?;
        let y = self.typed_mut::<f32>(out, os.numel(), op)?;
        let strides =
            [bq.broadcast_strides(&bo), bk.broadcast_strides(&bo), bv.broadcast_strides(&bo)];
        let dims = HeadDims { queries, depth, keys, width };
        let sizes = [queries * depth, depth * keys, keys * width];
        // Head `bi` reads q, k and v at the index that its position along the output's batch
        // axes maps to through each operand's broadcast strides, and the mask likewise.
        let head = |mut bi: usize, y: &mut [f32]| {
            let mut at = [0usize; 3];
            let mut mask_at = 0;
            for ax in (0..bo.rank).rev() {
                let i = bi % bo.dims[ax].max(1);
                bi /= bo.dims[ax].max(1);
                for (a, s) in at.iter_mut().zip(&strides) {
                    *a += i * s[ax];
                }
                if let Some((_, ms)) = &mask {
                    mask_at += i * ms[ax];
                }
            }
            let (q, k, v) = (
                &xq[at[0] * sizes[0]..][..sizes[0]],
                &xk[at[1] * sizes[1]..][..sizes[1]],
                &xv[at[2] * sizes[2]..][..sizes[2]],
            );
            let mask = mask.as_ref().map(|(values, ms)| Mask {
                values: &values[mask_at..],
                row_stride: ms[bo.rank],
                key_stride: ms[bo.rank + 1],
            });
            attention_head(q, k, v, mask, scale, dims, y);
        };

        let count = bo.numel();
        let len = queries * width;
        #[cfg(feature = "std")]
        {
            let macs = count.saturating_mul(queries).saturating_mul(keys);
            let macs = macs.saturating_mul(depth + width);
            crate::kernels::parallel::for_each_part(self.threads, count, macs, len, y, &head);
        }
        #[cfg(not(feature = "std"))]
        if len > 0 {
            for (bi, part) in y[..count * len].chunks_exact_mut(len).enumerate() {
                head(bi, part);
            }
        }
        Ok(())
    }

    #[cfg(feature = "op-gather")]
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
        #[cfg(feature = "weights-int4")]
        if matches!(data.quant, Quant::Grouped | Quant::GroupedMin) {
            let bad = Error::RuntimeShape { op, reason: "int4 table does not match its shape" };
            let rows = self.model.int4_rows(data).ok_or(bad)?;
            if rows.k != inner {
                return Err(bad);
            }
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

    /// Runs a transpose or expand on the tensors' bytes.
    #[cfg(any(feature = "op-transpose", feature = "op-expand"))]
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
        // One byte-wise copy serves every element size, which keeps the code small on
        // microcontrollers.
        if !matches!(esize, 1 | 2 | 4 | 8) {
            return Err(Error::RuntimeShape { op, reason: "unsupported element size" });
        }
        m.apply_bytes(src, xs, dst, os, esize);
        Ok(())
    }

    #[cfg(feature = "op-concat")]
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

    #[cfg(feature = "op-slice")]
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

    #[cfg(feature = "op-cast")]
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

    #[cfg(feature = "op-where")]
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
#[cfg(any(feature = "op-conv2d", feature = "op-pool"))]
fn window_input_len(g: &Geometry) -> usize {
    g.batch * g.in_channels * g.in_size[0] * g.in_size[1]
}

/// Data-movement kernels that only depend on the element size.
#[cfg(any(feature = "op-transpose", feature = "op-expand"))]
#[derive(Clone, Copy)]
enum Movement {
    #[cfg(feature = "op-transpose")]
    Transpose([u8; MAX_RANK]),
    #[cfg(feature = "op-expand")]
    Expand,
}

#[cfg(any(feature = "op-transpose", feature = "op-expand"))]
impl Movement {
    fn apply_bytes(self, src: &[u8], xs: &Shape, dst: &mut [u8], os: &Shape, size: usize) {
        match self {
            #[cfg(feature = "op-transpose")]
            Movement::Transpose(perm) => k::transpose_bytes(src, xs, &perm, dst, size),
            #[cfg(feature = "op-expand")]
            Movement::Expand => k::expand_bytes(src, xs, dst, os, size),
        }
    }
}

/// A scalar read for casts: integers stay exact, floats go through f64.
#[cfg(feature = "op-cast")]
#[derive(Clone, Copy)]
enum Scalar {
    Int(i64),
    Float(f64),
}

#[cfg(feature = "op-cast")]
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

#[cfg(feature = "op-cast")]
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
