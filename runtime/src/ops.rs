//! The runtime's op set and the binary encoding of op parameters.
//!
//! An op record in the op list is a 16-byte header (code u16, input count u8, output count u8,
//! parameter bytes u16, flags u16, name offset u32, name length u32), then the input tensor
//! indices and the output tensor indices (u32 each, [`NO_TENSOR`](crate::format::NO_TENSOR) for an
//! absent optional input), then the parameters as little-endian u32 words.

use crate::error::{Error, Result};
use crate::format::{MAX_RANK, OP_FLAGS_KNOWN, OP_FLAG_IN_PLACE, OP_HEADER_LEN};

/// Maximum number of parameter words of any op.
pub const MAX_PARAM_WORDS: usize = 16;

/// Element-wise binary operations, with NumPy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BinaryKind {
    /// a + b
    Add = 0,
    /// a - b
    Sub = 1,
    /// a × b
    Mul = 2,
    /// a / b
    Div = 3,
    /// a raised to b
    Pow = 4,
    /// max(a, b)
    Max = 5,
    /// min(a, b)
    Min = 6,
}

/// Element-wise unary operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum UnaryKind {
    /// -x
    Neg = 0,
    /// |x|
    Abs = 1,
    /// Square root.
    Sqrt = 2,
    /// e^x
    Exp = 3,
    /// Natural logarithm.
    Log = 4,
    /// Gauss error function.
    Erf = 5,
    /// Hyperbolic tangent.
    Tanh = 6,
    /// 1 / (1 + e^-x)
    Sigmoid = 7,
    /// max(x, 0)
    Relu = 8,
    /// x · Φ(x) with the exact normal CDF (the erf form).
    Gelu = 9,
    /// GELU by its tanh approximation.
    GeluTanh = 10,
    /// 1 / x
    Reciprocal = 11,
    /// x clamped to [alpha, beta].
    Clip = 12,
    /// x · sigmoid(x)
    Silu = 13,
}

/// An element-wise function fused into the op that produces its input: the op's output is
/// `Unary { kind, alpha, beta }` applied to what the op alone would give.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Activation {
    /// Which function.
    pub kind: UnaryKind,
    /// First parameter (lower bound of Clip).
    pub alpha: f32,
    /// Second parameter (upper bound of Clip).
    pub beta: f32,
}

impl UnaryKind {
    /// Returns the kind with code `code`, or `None` for an unknown code.
    pub fn from_code(code: u32) -> Option<UnaryKind> {
        Some(match code {
            0 => UnaryKind::Neg,
            1 => UnaryKind::Abs,
            2 => UnaryKind::Sqrt,
            3 => UnaryKind::Exp,
            4 => UnaryKind::Log,
            5 => UnaryKind::Erf,
            6 => UnaryKind::Tanh,
            7 => UnaryKind::Sigmoid,
            8 => UnaryKind::Relu,
            9 => UnaryKind::Gelu,
            10 => UnaryKind::GeluTanh,
            11 => UnaryKind::Reciprocal,
            12 => UnaryKind::Clip,
            13 => UnaryKind::Silu,
            _ => return None,
        })
    }
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ReduceKind {
    /// Arithmetic mean.
    Mean = 0,
    /// Sum.
    Sum = 1,
    /// Maximum.
    Max = 2,
}

/// Pooling functions of [`Op::Pool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PoolKind {
    /// Mean of the taps in the window.
    Average = 0,
    /// Largest tap in the window.
    Max = 1,
}

/// Geometry of a sliding window over the two spatial axes (height, width) of an NCHW tensor,
/// shared by [`Op::Conv2d`] and [`Op::Pool`].
///
/// Along each axis, output position `o` reads the input positions
/// `o * stride - pad_begin + j * dilation` for taps `j` in `0..kernel`; positions outside the
/// input are padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window2d {
    /// Kernel extents `[height, width]`, at least 1.
    pub kernel: [u32; 2],
    /// Steps between windows `[height, width]`, at least 1.
    pub strides: [u32; 2],
    /// Padding `[top, left, bottom, right]`.
    pub pads: [u32; 4],
    /// Spacing between taps `[height, width]`, at least 1 (1 is a dense window).
    pub dilations: [u32; 2],
}

impl Window2d {
    /// Number of parameter words of an encoded window.
    pub const WORDS: usize = 10;

    /// Output extent along `axis` (0 = height, 1 = width) for an input extent `input`.
    ///
    /// Rounds down, or up with `ceil_mode`; in ceil mode a last window that would start past the
    /// input and its leading padding is dropped. Returns `None` when a parameter is 0 or the
    /// dilated kernel is longer than the padded input.
    pub fn output_extent(&self, axis: usize, input: u64, ceil_mode: bool) -> Option<u64> {
        let (kernel, stride, dilation) =
            (self.kernel[axis] as u64, self.strides[axis] as u64, self.dilations[axis] as u64);
        let (begin, end) = (self.pads[axis] as u64, self.pads[axis + 2] as u64);
        if kernel == 0 || stride == 0 || dilation == 0 || input == 0 {
            return None;
        }
        let span = dilation.checked_mul(kernel - 1)?.checked_add(1)?;
        let padded = input.checked_add(begin)?.checked_add(end)?;
        let room = padded.checked_sub(span)?;
        if !ceil_mode {
            return Some(room / stride + 1);
        }
        let mut extent = room.div_ceil(stride) + 1;
        if (extent - 1) * stride >= input + begin {
            extent -= 1;
        }
        Some(extent)
    }

    fn encode(&self, words: &mut [u32]) {
        words[..2].copy_from_slice(&self.kernel);
        words[2..4].copy_from_slice(&self.strides);
        words[4..8].copy_from_slice(&self.pads);
        words[8..10].copy_from_slice(&self.dilations);
    }

    #[cfg(any(feature = "op-conv2d", feature = "op-pool"))]
    fn decode(word: &dyn Fn(usize) -> Result<u32>) -> Result<Window2d> {
        Ok(Window2d {
            kernel: [word(0)?, word(1)?],
            strides: [word(2)?, word(3)?],
            pads: [word(4)?, word(5)?, word(6)?, word(7)?],
            dilations: [word(8)?, word(9)?],
        })
    }
}

/// The runtime's cargo feature of each op code (empty for Reshape, which is always built, and for
/// the unused code 0).
const OP_FEATURES: [&str; 19] = [
    "",
    "op-linear",
    "op-matmul",
    "op-binary",
    "op-unary",
    "op-layer-norm",
    "op-softmax",
    "op-reduce",
    "op-gather",
    "",
    "op-transpose",
    "op-concat",
    "op-slice",
    "op-expand",
    "op-cast",
    "op-where",
    "op-conv2d",
    "op-pool",
    "op-attention",
];

/// An op with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// `y[.., n] = f(Σ_k x[.., k] · w[n, k] + bias[n])`. Inputs: x (f32), w (constant `[N, K]`:
    /// f32, f16, int8 per row or int4 groups), optional bias (f32 `[N]`). `f` is the identity
    /// without an activation.
    Linear {
        /// An element-wise function applied to each output, fused into the product.
        activation: Option<Activation>,
    },
    /// Batched matrix product with broadcast leading axes: `[.., M, K] × [.., K, N]`, f32.
    MatMul,
    /// Element-wise binary op on f32 with broadcasting.
    Binary(BinaryKind),
    /// Element-wise unary op on f32; `alpha` and `beta` are the bounds of [`UnaryKind::Clip`].
    Unary {
        /// Which function.
        kind: UnaryKind,
        /// First parameter (lower bound of Clip).
        alpha: f32,
        /// Second parameter (upper bound of Clip).
        beta: f32,
    },
    /// Layer normalization over the last axis. Inputs: x, gamma, optional beta.
    LayerNorm {
        /// Added to the variance before the square root.
        epsilon: f32,
    },
    /// Softmax along one axis.
    Softmax {
        /// The axis, non-negative.
        axis: u32,
    },
    /// Reduction over the axes set in `axes` (bit i for axis i).
    Reduce {
        /// Which reduction.
        kind: ReduceKind,
        /// Bit mask of reduced axes.
        axes: u32,
        /// Whether reduced axes stay as extent 1.
        keep_dims: bool,
    },
    /// Gathers slices of `data` along `axis` at integer `indices` (negative ones count from the
    /// end). A [`Quant::PerRow`](crate::format::Quant::PerRow) int8 table along axis 0 yields f32.
    Gather {
        /// The indexed axis of `data`.
        axis: u32,
    },
    /// Reinterprets the input with the output's shape (same elements, row-major order).
    Reshape,
    /// Permutes axes: output axis i is input axis `perm[i]`.
    Transpose {
        /// The permutation; entries past the rank are ignored.
        perm: [u8; MAX_RANK],
    },
    /// Joins the inputs along `axis`.
    Concat {
        /// The joined axis.
        axis: u32,
    },
    /// Takes `output extent` elements along each axis from `starts[i]` in steps of `steps[i]`.
    Slice {
        /// First index per axis.
        starts: [u32; MAX_RANK],
        /// Step per axis (non-zero; negative walks backwards).
        steps: [i32; MAX_RANK],
    },
    /// Broadcasts the input to the output's shape.
    Expand,
    /// Converts elements to the output's element type.
    Cast,
    /// Chooses `x` where the boolean condition holds, else `y`, with broadcasting.
    Where,
    /// 2-D convolution of an NCHW f32 tensor. Inputs: x `[N, C, H, W]`, w (constant
    /// `[O, C / groups * kh * kw]`, the ONNX `[O, C / groups, kh, kw]` weight flattened per output
    /// channel; f32, f16 or int8 per row), optional bias (f32 `[O]`). Output `[N, O, OH, OW]`,
    /// each value clamped to `[activation_min, activation_max]`.
    Conv2d {
        /// Kernel, strides, padding and dilations.
        window: Window2d,
        /// Channel groups: output channel `o` reads input channels of group
        /// `o / (O / groups)`; `groups == C` is a depthwise convolution.
        groups: u32,
        /// Lower bound of the fused activation (0 for ReLU, negative infinity for none).
        activation_min: f32,
        /// Upper bound of the fused activation (6 for ReLU6, infinity for none).
        activation_max: f32,
    },
    /// Average or max pooling over the spatial axes of an NCHW f32 tensor.
    Pool {
        /// Which pooling function.
        kind: PoolKind,
        /// Kernel, strides, padding and dilations.
        window: Window2d,
        /// Whether an average divides by the taps in padding too (ONNX `count_include_pad`).
        count_include_pad: bool,
        /// Whether output extents round up (ONNX `ceil_mode`).
        ceil_mode: bool,
    },
    /// Scaled dot-product attention with its softmax, as one op:
    /// `y = softmax(scale · q × k + mask) × v`, the softmax along the last axis. Inputs: q
    /// `[.., S, D]`, k `[.., D, T]` (the keys as columns, the second operand of the scores'
    /// matrix product), v `[.., T, E]` and an optional additive mask that broadcasts to
    /// `[.., S, T]`, all f32. The leading axes of q, k and v broadcast as in [`Op::MatMul`].
    /// Output `[.., S, E]`. The `S x T` scores are never stored.
    Attention {
        /// Factor of the scores before the mask is added.
        scale: f32,
    },
}

impl Op {
    /// The op code stored in the record header.
    pub fn code(&self) -> u16 {
        match self {
            Op::Linear { .. } => 1,
            Op::MatMul => 2,
            Op::Binary(_) => 3,
            Op::Unary { .. } => 4,
            Op::LayerNorm { .. } => 5,
            Op::Softmax { .. } => 6,
            Op::Reduce { .. } => 7,
            Op::Gather { .. } => 8,
            Op::Reshape => 9,
            Op::Transpose { .. } => 10,
            Op::Concat { .. } => 11,
            Op::Slice { .. } => 12,
            Op::Expand => 13,
            Op::Cast => 14,
            Op::Where => 15,
            Op::Conv2d { .. } => 16,
            Op::Pool { .. } => 17,
            Op::Attention { .. } => 18,
        }
    }

    /// A short name for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "Linear",
            Op::MatMul => "MatMul",
            Op::Binary(_) => "Binary",
            Op::Unary { .. } => "Unary",
            Op::LayerNorm { .. } => "LayerNorm",
            Op::Softmax { .. } => "Softmax",
            Op::Reduce { .. } => "Reduce",
            Op::Gather { .. } => "Gather",
            Op::Reshape => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Concat { .. } => "Concat",
            Op::Slice { .. } => "Slice",
            Op::Expand => "Expand",
            Op::Cast => "Cast",
            Op::Where => "Where",
            Op::Conv2d { .. } => "Conv2d",
            Op::Pool { .. } => "Pool",
            Op::Attention { .. } => "Attention",
        }
    }

    /// The runtime's cargo feature that builds this op's kernel; Reshape is always built.
    pub fn feature(&self) -> &'static str {
        OP_FEATURES[self.code() as usize]
    }

    /// Whether this build of the runtime runs the op (its cargo feature is on).
    pub fn is_built(&self) -> bool {
        match self {
            Op::Linear { .. } => cfg!(feature = "op-linear"),
            Op::MatMul => cfg!(feature = "op-matmul"),
            Op::Binary(_) => cfg!(feature = "op-binary"),
            Op::Unary { .. } => cfg!(feature = "op-unary"),
            Op::LayerNorm { .. } => cfg!(feature = "op-layer-norm"),
            Op::Softmax { .. } => cfg!(feature = "op-softmax"),
            Op::Reduce { .. } => cfg!(feature = "op-reduce"),
            Op::Gather { .. } => cfg!(feature = "op-gather"),
            Op::Reshape => true,
            Op::Transpose { .. } => cfg!(feature = "op-transpose"),
            Op::Concat { .. } => cfg!(feature = "op-concat"),
            Op::Slice { .. } => cfg!(feature = "op-slice"),
            Op::Expand => cfg!(feature = "op-expand"),
            Op::Cast => cfg!(feature = "op-cast"),
            Op::Where => cfg!(feature = "op-where"),
            Op::Conv2d { .. } => cfg!(feature = "op-conv2d"),
            Op::Pool { .. } => cfg!(feature = "op-pool"),
            Op::Attention { .. } => cfg!(feature = "op-attention"),
        }
    }

    /// Encodes the parameters into `words`, returning how many were used.
    pub fn encode_params(&self, words: &mut [u32; MAX_PARAM_WORDS]) -> usize {
        match *self {
            Op::Linear { activation: None }
            | Op::MatMul
            | Op::Reshape
            | Op::Expand
            | Op::Cast
            | Op::Where => 0,
            Op::Linear { activation: Some(Activation { kind, alpha, beta }) } => {
                words[0] = kind as u32;
                words[1] = alpha.to_bits();
                words[2] = beta.to_bits();
                3
            }
            Op::Binary(kind) => {
                words[0] = kind as u32;
                1
            }
            Op::Unary { kind, alpha, beta } => {
                words[0] = kind as u32;
                words[1] = alpha.to_bits();
                words[2] = beta.to_bits();
                3
            }
            Op::LayerNorm { epsilon } => {
                words[0] = epsilon.to_bits();
                1
            }
            Op::Attention { scale } => {
                words[0] = scale.to_bits();
                1
            }
            Op::Softmax { axis } | Op::Gather { axis } | Op::Concat { axis } => {
                words[0] = axis;
                1
            }
            Op::Reduce { kind, axes, keep_dims } => {
                words[0] = kind as u32;
                words[1] = axes;
                words[2] = keep_dims as u32;
                3
            }
            Op::Transpose { perm } => {
                for (w, &p) in words.iter_mut().zip(perm.iter()) {
                    *w = p as u32;
                }
                MAX_RANK
            }
            Op::Slice { starts, steps } => {
                for i in 0..MAX_RANK {
                    words[i] = starts[i];
                    words[MAX_RANK + i] = steps[i] as u32;
                }
                2 * MAX_RANK
            }
            Op::Conv2d { window, groups, activation_min, activation_max } => {
                window.encode(words);
                words[10] = groups;
                words[11] = activation_min.to_bits();
                words[12] = activation_max.to_bits();
                Window2d::WORDS + 3
            }
            Op::Pool { kind, window, count_include_pad, ceil_mode } => {
                window.encode(words);
                words[10] = kind as u32;
                words[11] = count_include_pad as u32;
                words[12] = ceil_mode as u32;
                Window2d::WORDS + 3
            }
        }
    }

    /// Decodes an op from its code and parameter words; `index` is used in errors.
    pub fn decode(code: u16, words: &[u32], index: u32) -> Result<Op> {
        let invalid = |reason| Error::InvalidOp { op: index, reason };
        // Unused when no built op has parameters.
        #[allow(unused_variables)]
        let word = |i: usize| words.get(i).copied().ok_or(invalid("too few parameters"));
        let op = match code {
            #[cfg(feature = "op-linear")]
            1 => Op::Linear {
                activation: match words.len() {
                    0 => None,
                    1 | 2 => return Err(invalid("a linear activation needs three parameters")),
                    _ => Some(Self::activation(&word, index)?),
                },
            },
            #[cfg(feature = "op-matmul")]
            2 => Op::MatMul,
            #[cfg(feature = "op-binary")]
            3 => Op::Binary(match word(0)? {
                0 => BinaryKind::Add,
                1 => BinaryKind::Sub,
                2 => BinaryKind::Mul,
                3 => BinaryKind::Div,
                4 => BinaryKind::Pow,
                5 => BinaryKind::Max,
                6 => BinaryKind::Min,
                _ => return Err(invalid("unknown binary op kind")),
            }),
            #[cfg(feature = "op-unary")]
            4 => {
                let kind =
                    UnaryKind::from_code(word(0)?).ok_or(invalid("unknown unary op kind"))?;
                Op::Unary { kind, alpha: f32::from_bits(word(1)?), beta: f32::from_bits(word(2)?) }
            }
            #[cfg(feature = "op-layer-norm")]
            5 => Op::LayerNorm { epsilon: f32::from_bits(word(0)?) },
            #[cfg(feature = "op-softmax")]
            6 => Op::Softmax { axis: word(0)? },
            #[cfg(feature = "op-attention")]
            18 => Op::Attention { scale: f32::from_bits(word(0)?) },
            #[cfg(feature = "op-reduce")]
            7 => {
                let kind = match word(0)? {
                    0 => ReduceKind::Mean,
                    1 => ReduceKind::Sum,
                    2 => ReduceKind::Max,
                    _ => return Err(invalid("unknown reduction kind")),
                };
                Op::Reduce { kind, axes: word(1)?, keep_dims: word(2)? != 0 }
            }
            #[cfg(feature = "op-gather")]
            8 => Op::Gather { axis: word(0)? },
            9 => Op::Reshape,
            #[cfg(feature = "op-transpose")]
            10 => {
                let mut perm = [0u8; MAX_RANK];
                for (i, p) in perm.iter_mut().enumerate() {
                    let w = word(i)?;
                    if w as usize >= MAX_RANK {
                        return Err(invalid("transpose permutation entry out of range"));
                    }
                    *p = w as u8;
                }
                Op::Transpose { perm }
            }
            #[cfg(feature = "op-concat")]
            11 => Op::Concat { axis: word(0)? },
            #[cfg(feature = "op-slice")]
            12 => {
                let mut starts = [0u32; MAX_RANK];
                let mut steps = [1i32; MAX_RANK];
                for i in 0..MAX_RANK {
                    starts[i] = word(i)?;
                    steps[i] = word(MAX_RANK + i)? as i32;
                }
                Op::Slice { starts, steps }
            }
            #[cfg(feature = "op-expand")]
            13 => Op::Expand,
            #[cfg(feature = "op-cast")]
            14 => Op::Cast,
            #[cfg(feature = "op-where")]
            15 => Op::Where,
            #[cfg(feature = "op-conv2d")]
            16 => Op::Conv2d {
                window: Window2d::decode(&word)?,
                groups: word(10)?,
                activation_min: f32::from_bits(word(11)?),
                activation_max: f32::from_bits(word(12)?),
            },
            #[cfg(feature = "op-pool")]
            17 => {
                let kind = match word(10)? {
                    0 => PoolKind::Average,
                    1 => PoolKind::Max,
                    _ => return Err(invalid("unknown pooling kind")),
                };
                Op::Pool {
                    kind,
                    window: Window2d::decode(&word)?,
                    count_include_pad: word(11)? != 0,
                    ceil_mode: word(12)? != 0,
                }
            }
            // Ops that this build leaves out are rejected here, before their parameters are read.
            #[allow(unreachable_patterns)]
            1..=18 => {
                return Err(Error::OpNotBuilt { op: index, feature: OP_FEATURES[code as usize] })
            }
            _ => return Err(invalid("unknown op code")),
        };
        Ok(op)
    }

    /// Decodes the activation of an op whose words 0 to 2 contain one. It runs on the unary
    /// kernels, so it needs the `op-unary` feature.
    #[cfg(feature = "op-linear")]
    fn activation(word: &dyn Fn(usize) -> Result<u32>, index: u32) -> Result<Activation> {
        if !cfg!(feature = "op-unary") {
            return Err(Error::OpNotBuilt { op: index, feature: "op-unary" });
        }
        let kind = UnaryKind::from_code(word(0)?)
            .ok_or(Error::InvalidOp { op: index, reason: "unknown activation kind" })?;
        Ok(Activation { kind, alpha: f32::from_bits(word(1)?), beta: f32::from_bits(word(2)?) })
    }
}

/// Decoded header of one op record.
#[derive(Clone, Copy, Debug)]
pub struct OpRecord<'a> {
    /// The op with its parameters.
    pub op: Op,
    /// Name offset and length in the strings section.
    pub name: crate::format::StrRef,
    /// Flag bits ([`OP_FLAG_IN_PLACE`]); only known bits are set.
    pub flags: u16,
    /// Input tensor indices as raw little-endian bytes.
    inputs: &'a [u8],
    /// Output tensor indices as raw little-endian bytes.
    outputs: &'a [u8],
}

impl<'a> OpRecord<'a> {
    /// Number of inputs, absent optional ones included.
    pub fn input_count(&self) -> usize {
        self.inputs.len() / 4
    }

    /// Number of outputs.
    pub fn output_count(&self) -> usize {
        self.outputs.len() / 4
    }

    /// Tensor index of input `i` ([`NO_TENSOR`](crate::format::NO_TENSOR) when absent).
    pub fn input(&self, i: usize) -> u32 {
        read_u32(self.inputs, i)
    }

    /// Tensor index of output `i`.
    pub fn output(&self, i: usize) -> u32 {
        read_u32(self.outputs, i)
    }

    /// Whether the op writes its output over input 0 ([`OP_FLAG_IN_PLACE`]).
    pub fn in_place(&self) -> bool {
        self.flags & OP_FLAG_IN_PLACE != 0
    }

    /// Decodes the record at the start of `bytes`, returning it and its total length.
    pub fn parse(bytes: &'a [u8], index: u32) -> Result<(OpRecord<'a>, usize)> {
        let r = crate::format::Reader::new(bytes, "op record");
        let invalid = |reason| Error::InvalidOp { op: index, reason };
        let code = r.u16(0)?;
        let n_in = r.u8(2)? as usize;
        let n_out = r.u8(3)? as usize;
        let params_len = r.u16(4)? as usize;
        let flags = r.u16(6)?;
        if flags & !OP_FLAGS_KNOWN != 0 {
            return Err(invalid("unknown op flag"));
        }
        if n_in > crate::format::MAX_OP_ARITY || n_out > crate::format::MAX_OP_ARITY {
            return Err(invalid("too many inputs or outputs"));
        }
        if !params_len.is_multiple_of(4) || params_len / 4 > MAX_PARAM_WORDS {
            return Err(invalid("parameter length is not a multiple of 4 or exceeds 64 bytes"));
        }
        let name = crate::format::StrRef { offset: r.u32(8)?, len: r.u32(12)? };
        let in_end = OP_HEADER_LEN + 4 * n_in;
        let out_end = in_end + 4 * n_out;
        let total = out_end + params_len;
        let record = bytes.get(..total).ok_or(Error::Truncated {
            what: "op record",
            needed: total as u64,
            available: bytes.len() as u64,
        })?;
        let mut words = [0u32; MAX_PARAM_WORDS];
        for (i, w) in words.iter_mut().take(params_len / 4).enumerate() {
            *w = read_u32(&record[out_end..], i);
        }
        let op = Op::decode(code, &words[..params_len / 4], index)?;
        let rec = OpRecord {
            op,
            name,
            flags,
            inputs: &record[OP_HEADER_LEN..in_end],
            outputs: &record[in_end..out_end],
        };
        Ok((rec, total))
    }
}

fn read_u32(bytes: &[u8], i: usize) -> u32 {
    match bytes.get(4 * i..4 * i + 4) {
        Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
        _ => crate::format::NO_TENSOR,
    }
}

/// Appends an encoded op record with the flag bits `flags` to `out`.
#[cfg(feature = "alloc")]
pub fn encode_op(
    out: &mut alloc::vec::Vec<u8>,
    op: &Op,
    name: crate::format::StrRef,
    flags: u16,
    inputs: &[u32],
    outputs: &[u32],
) {
    let mut words = [0u32; MAX_PARAM_WORDS];
    let n = op.encode_params(&mut words);
    out.extend_from_slice(&op.code().to_le_bytes());
    out.push(inputs.len() as u8);
    out.push(outputs.len() as u8);
    out.extend_from_slice(&((4 * n) as u16).to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&name.offset.to_le_bytes());
    out.extend_from_slice(&name.len.to_le_bytes());
    for &t in inputs.iter().chain(outputs) {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for w in &words[..n] {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that a Linear's activation round-trips through its parameter words. No words mean
    /// no activation, and one or two words or an unknown kind are rejected.
    #[test]
    #[cfg(all(feature = "op-linear", feature = "op-unary"))]
    fn linear_activation_words() {
        let mut words = [0u32; MAX_PARAM_WORDS];
        let plain = Op::Linear { activation: None };
        assert_eq!(plain.encode_params(&mut words), 0);
        assert_eq!(Op::decode(1, &[], 0).unwrap(), plain);
        let clip = Activation { kind: UnaryKind::Clip, alpha: -1.5, beta: 6.0 };
        let op = Op::Linear { activation: Some(clip) };
        let n = op.encode_params(&mut words);
        assert_eq!(n, 3);
        assert_eq!(Op::decode(1, &words[..n], 0).unwrap(), op);
        // Words past the three are ignored, as for every op.
        assert_eq!(Op::decode(1, &[12, (-1.5f32).to_bits(), 6f32.to_bits(), 7], 0).unwrap(), op);
        for bad in [&[9][..], &[9, 0], &[14, 0, 0], &[u32::MAX, 0, 0]] {
            assert!(
                matches!(Op::decode(1, bad, 3), Err(Error::InvalidOp { op: 3, .. })),
                "{bad:?} was accepted"
            );
        }
    }
}
