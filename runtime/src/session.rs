//! Running a model: a session owns a caller-supplied arena and executes the op list in it.

mod execute;

use core::marker::PhantomData;

use crate::cast::{as_bytes, cast, cast_mut, Plain};
use crate::error::{Error, Result};
use crate::format::{
    DType, TensorEntry, TensorKind, MAX_GRAPH_INPUTS, MAX_RANK, MAX_SYMBOLS, SECTION_ALIGN,
};
use crate::model::Model;
use crate::ops::OpRecord;
use crate::shape::Shape;

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
    /// Threads that `linear` and `matmul` may use; see [`Session::set_threads`].
    #[cfg(feature = "std")]
    threads: usize,
    /// Whether `linear` may quantize its input to int8; see [`Session::set_int8_activations`].
    int8_activations: bool,
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
            #[cfg(feature = "std")]
            threads: 1,
            int8_activations: false,
            _arena: PhantomData,
        })
    }

    /// Lets `linear` and `matmul` split their work across up to `threads` threads (at least 1;
    /// 1, the default, runs everything on the calling thread). Small products stay on fewer
    /// threads, since starting one costs tens of microseconds; see [`crate::kernels::parallel`].
    #[cfg(feature = "std")]
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Returns the thread count set by [`set_threads`](Self::set_threads).
    #[cfg(feature = "std")]
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Lets `linear` quantize each row of its input to int8 (one scale per row) and multiply it
    /// with int8 weights in integers, where the CPU has a kernel for that
    /// ([`crate::kernels::linear_int8_rows`]). Int4 weights in groups of 32 take the groups of 32
    /// inputs of [`crate::kernels::linear_int8`] on x86_64 with AVX-512 VNNI. With the
    /// `int8-activations` feature (on with `std`), convolutions with int8 weights on every CPU do
    /// the same with the input under the kernel at each output position, and depthwise ones with
    /// each input plane (`kernels::integer`). Windows and planes of more than 512 values keep f32
    /// inputs, as do other weights and CPUs. Each input is rounded to one of 255 steps of its window's largest
    /// magnitude, and a NaN or an infinity makes every output computed from its window NaN.
    /// Faster where the CPU multiplies integers faster than floats: microcontrollers, and VNNI
    /// and `sdot` for `linear`. On x86_64 the portable integer convolutions are slower than the
    /// f32 ones, so there they serve to reproduce a board's results. Off by default.
    pub fn set_int8_activations(&mut self, on: bool) {
        self.int8_activations = on;
    }

    /// Returns the setting of [`set_int8_activations`](Self::set_int8_activations).
    pub fn int8_activations(&self) -> bool {
        self.int8_activations
    }

    /// Returns the model this session runs.
    pub fn model(&self) -> &Model<'m> {
        &self.model
    }

    /// Copies `data` with shape `shape` into graph input `index`.
    ///
    /// # Errors
    /// On an unknown index, a wrong element type ([`Error::InputDtypeMismatch`]) or another
    /// number of axes ([`Error::InputRankMismatch`]). [`Error::InputShapeMismatch`] for an extent
    /// that the model's declared shape does not allow: constant axes must match, and symbolic
    /// axes take 1 to their maximum. [`Error::InputLengthMismatch`] for data of another length.
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
    /// As [`set_input`](Self::set_input), and [`Error::InputLengthMismatch`] for a byte count
    /// other than the shape's element count times the element size.
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
            let given = shape.len().min(u8::MAX as usize) as u32;
            return Err(Error::InputRankMismatch { input, expected: t.rank as u32, given });
        }
        for (axis, (d, &given)) in t.shape().iter().zip(shape).enumerate() {
            let limit = d.eval(self.model.symbol_max()).unwrap_or(0);
            let ok = match d.as_constant() {
                Some(c) => given as u64 == c as u64,
                None => given >= 1 && given as u64 <= limit,
            };
            if !ok {
                return Err(Error::InputShapeMismatch {
                    input,
                    axis: axis as u32,
                    expected: limit,
                    given: given as u64,
                    variable: d.as_constant().is_none(),
                });
            }
        }
        let shape = Shape::from_slice(shape).ok_or(Error::UnknownIo { index: input })?;
        if bytes.len() != shape.numel() * dtype.size() {
            return Err(Error::InputLengthMismatch {
                input,
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
    // Kept out of line: the op dispatch is large and runs once per inference, and callers that
    // inline it grow by all of it (and size tools can no longer tell it apart from them).
    #[inline(never)]
    pub fn run(&mut self) -> Result<()> {
        self.run_with(|_, _| {})
    }

    /// Runs every op once like [`run`](Self::run), calling `after(index, &record)` when op `index`
    /// has finished. A profiler reads a clock there; the runtime itself has none.
    ///
    /// # Errors
    /// As [`run`](Self::run); `after` is not called for an op that fails.
    pub fn run_with<F: FnMut(u32, &OpRecord<'m>)>(&mut self, mut after: F) -> Result<()> {
        self.ran = false;
        self.bind_symbols()?;
        let model = self.model;
        for (index, item) in model.ops().enumerate() {
            let (record, _) = item?;
            self.execute(index as u32, &record)?;
            after(index as u32, &record);
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
    /// mutable views only of the op's output and of a convolution's scratch (or of a graph input
    /// between runs), and for no shared view of an input that an op overwrites in place. The
    /// file's op checks keep the output, the scratch and the other inputs disjoint.
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
        // output or the scratch of the op being executed (or a graph input being set between
        // runs). The file's op checks keep these two disjoint from each other and from every
        // input range that the op reads through a shared view.
        Ok(unsafe { core::slice::from_raw_parts_mut(self.arena.add(start), len) })
    }

    // A build without any op that reads typed views leaves these two unused.
    #[cfg_attr(not(feature = "all-ops"), allow(dead_code))]
    fn typed<T: Plain>(&self, t: &TensorEntry, count: usize, op: u32) -> Result<&[T]> {
        let len = count.saturating_mul(core::mem::size_of::<T>());
        cast(self.bytes(t, len, op)?).ok_or(Error::RuntimeShape { op, reason: "misaligned tensor" })
    }

    #[cfg_attr(not(feature = "all-ops"), allow(dead_code))]
    fn typed_mut<T: Plain>(&self, t: &TensorEntry, count: usize, op: u32) -> Result<&mut [T]> {
        let len = count.saturating_mul(core::mem::size_of::<T>());
        cast_mut(self.activation_mut(t, len, op)?)
            .ok_or(Error::RuntimeShape { op, reason: "misaligned tensor" })
    }
}
