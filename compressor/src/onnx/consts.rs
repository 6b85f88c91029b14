//! Constant tensors seen while importing, including integer tensors whose entries are symbolic
//! extents (the values a `Shape` op produces when the batch or sequence length varies).

use edgefold_runtime::format::{DType, Dim};

/// An integer that may be a symbolic extent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SymInt {
    /// A known integer.
    Int(i64),
    /// A product of symbols and a constant (at least one symbol).
    Dim(Dim),
}

impl SymInt {
    /// Wraps an extent, folding it to an integer when it is constant.
    pub fn from_dim(d: Dim) -> SymInt {
        match d.as_constant() {
            Some(c) => SymInt::Int(c as i64),
            None => SymInt::Dim(d),
        }
    }

    /// The extent this value denotes, if it is a valid (positive) one.
    pub fn to_dim(self) -> Option<Dim> {
        match self {
            SymInt::Int(v) if v >= 1 && v <= u32::MAX as i64 => Some(Dim::constant(v as u32)),
            SymInt::Int(_) => None,
            SymInt::Dim(d) => Some(d),
        }
    }

    /// The integer, when known.
    pub fn as_int(self) -> Option<i64> {
        match self {
            SymInt::Int(v) => Some(v),
            SymInt::Dim(_) => None,
        }
    }

    /// Product, when representable.
    pub fn checked_mul(self, other: SymInt) -> Option<SymInt> {
        match (self, other) {
            (SymInt::Int(a), SymInt::Int(b)) => a.checked_mul(b).map(SymInt::Int),
            (SymInt::Int(0), _) | (_, SymInt::Int(0)) => Some(SymInt::Int(0)),
            (a, b) => Some(SymInt::from_dim(a.to_dim()?.checked_mul(b.to_dim()?)?)),
        }
    }

    /// Quotient (integer division truncating toward zero), when representable.
    pub fn checked_div(self, other: SymInt) -> Option<SymInt> {
        match (self, other) {
            (SymInt::Int(a), SymInt::Int(b)) => (b != 0).then(|| SymInt::Int(a / b)),
            (SymInt::Dim(a), b) => {
                let b = b.to_dim()?;
                let mut exponents = a.exponents;
                for (e, &be) in exponents.iter_mut().zip(&b.exponents) {
                    *e = e.checked_sub(be)?;
                }
                if b.factor == 0 || a.factor % b.factor != 0 {
                    return None;
                }
                Some(SymInt::from_dim(Dim { factor: a.factor / b.factor, exponents }))
            }
            _ => None,
        }
    }

    /// Sum, when representable.
    pub fn checked_add(self, other: SymInt) -> Option<SymInt> {
        match (self, other) {
            (SymInt::Int(a), SymInt::Int(b)) => a.checked_add(b).map(SymInt::Int),
            (x, SymInt::Int(0)) | (SymInt::Int(0), x) => Some(x),
            (SymInt::Dim(a), SymInt::Dim(b)) if a.same_symbols(&b) => {
                Some(SymInt::Dim(Dim { factor: a.factor.checked_add(b.factor)?, ..a }))
            }
            _ => None,
        }
    }

    /// Difference, when representable.
    pub fn checked_sub(self, other: SymInt) -> Option<SymInt> {
        match (self, other) {
            (SymInt::Int(a), SymInt::Int(b)) => a.checked_sub(b).map(SymInt::Int),
            (x, SymInt::Int(0)) => Some(x),
            (SymInt::Dim(a), SymInt::Dim(b)) if a == b => Some(SymInt::Int(0)),
            _ => None,
        }
    }

    /// Equality, when decidable: extents are at least 1, so they never equal a smaller integer.
    pub fn equals(self, other: SymInt) -> Option<bool> {
        match (self, other) {
            (SymInt::Int(a), SymInt::Int(b)) => Some(a == b),
            (SymInt::Dim(_), SymInt::Int(v)) | (SymInt::Int(v), SymInt::Dim(_)) if v < 1 => {
                Some(false)
            }
            (SymInt::Dim(a), SymInt::Dim(b)) if a == b => Some(true),
            _ => None,
        }
    }
}

/// A constant tensor during import.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstTensor {
    /// Floating-point values (any float type in the source becomes f32).
    F32 {
        /// Extents.
        shape: Vec<usize>,
        /// Values.
        data: Vec<f32>,
    },
    /// Integer or boolean values, possibly symbolic.
    Int {
        /// Extents.
        shape: Vec<usize>,
        /// Values.
        data: Vec<SymInt>,
        /// Source element type (I64, I32, I8, U8 or Bool).
        dtype: DType,
    },
}

impl ConstTensor {
    /// Extents.
    pub fn shape(&self) -> &[usize] {
        match self {
            ConstTensor::F32 { shape, .. } | ConstTensor::Int { shape, .. } => shape,
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            ConstTensor::F32 { .. } => DType::F32,
            ConstTensor::Int { dtype, .. } => *dtype,
        }
    }

    /// A 1-D i64 tensor.
    pub fn ints(data: Vec<SymInt>) -> ConstTensor {
        ConstTensor::Int { shape: vec![data.len()], data, dtype: DType::I64 }
    }

    /// The integer entries, if this is an integer tensor.
    pub fn as_ints(&self) -> Option<&[SymInt]> {
        match self {
            ConstTensor::Int { data, .. } => Some(data),
            ConstTensor::F32 { .. } => None,
        }
    }

    /// The integer entries as known i64 values, if all are known.
    pub fn known_ints(&self) -> Option<Vec<i64>> {
        self.as_ints()?.iter().map(|v| v.as_int()).collect()
    }

    /// The entries as f32 (integers converted), if all are known.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        match self {
            ConstTensor::F32 { data, .. } => Some(data.clone()),
            ConstTensor::Int { data, .. } => {
                data.iter().map(|v| v.as_int().map(|i| i as f32)).collect()
            }
        }
    }

    /// Same data with a new shape of the same element count.
    pub fn reshaped(&self, shape: Vec<usize>) -> ConstTensor {
        match self.clone() {
            ConstTensor::F32 { data, .. } => ConstTensor::F32 { shape, data },
            ConstTensor::Int { data, dtype, .. } => ConstTensor::Int { shape, data, dtype },
        }
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// NumPy broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![1; rank];
    for (i, o) in out.iter_mut().enumerate() {
        let x = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let y = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        *o = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Maps each index of `out` to the flat index of a tensor of shape `from` broadcast to it.
pub fn broadcast_index(from: &[usize], out: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    let fs = strides(from);
    let shift = out.len() - from.len();
    let mut result = Vec::with_capacity(n);
    let mut index = vec![0usize; out.len()];
    for _ in 0..n {
        let mut flat = 0;
        for (ax, &f) in from.iter().enumerate() {
            if f != 1 {
                flat += index[ax + shift] * fs[ax];
            }
        }
        result.push(flat);
        for ax in (0..out.len()).rev() {
            index[ax] += 1;
            if index[ax] < out[ax] {
                break;
            }
            index[ax] = 0;
        }
    }
    result
}

/// Gathers the elements of `data` at flat indices `at`.
pub fn pick<T: Copy>(data: &[T], at: &[usize]) -> Vec<T> {
    at.iter().map(|&i| data[i]).collect()
}

/// Rearranges a constant by a list of flat source indices, giving it `shape`.
pub fn rearrange(t: &ConstTensor, at: &[usize], shape: Vec<usize>) -> ConstTensor {
    match t {
        ConstTensor::F32 { data, .. } => ConstTensor::F32 { shape, data: pick(data, at) },
        ConstTensor::Int { data, dtype, .. } => {
            ConstTensor::Int { shape, data: pick(data, at), dtype: *dtype }
        }
    }
}

/// Flat source indices of a transpose: output axis i is input axis `perm[i]`.
pub fn transpose_index(shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let s = strides(shape);
    let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let permuted: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let n: usize = out.iter().product();
    let mut at = Vec::with_capacity(n);
    let mut index = vec![0usize; out.len()];
    for _ in 0..n {
        at.push(index.iter().zip(&permuted).map(|(i, s)| i * s).sum());
        for ax in (0..out.len()).rev() {
            index[ax] += 1;
            if index[ax] < out[ax] {
                break;
            }
            index[ax] = 0;
        }
    }
    (at, out)
}
