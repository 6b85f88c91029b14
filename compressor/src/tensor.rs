//! Owned host tensors: the values the importer folds, the reference run produces and the
//! evaluation code compares.

/// Element storage of a [`HostTensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit signed integers (token ids, masks, shape values).
    I64(Vec<i64>),
    /// 32-bit signed integers.
    I32(Vec<i32>),
    /// Booleans.
    Bool(Vec<bool>),
}

/// A dense, row-major tensor owned by the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Extent of each axis, outermost first.
    pub shape: Vec<usize>,
    /// Elements in row-major order; the length equals the product of `shape`.
    pub data: TensorData,
}

impl HostTensor {
    /// Creates an f32 tensor.
    ///
    /// # Panics
    /// Panics if `data.len()` differs from the product of `shape`.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} mismatch");
        HostTensor { shape, data: TensorData::F32(data) }
    }

    /// Creates an i64 tensor.
    ///
    /// # Panics
    /// Panics if `data.len()` differs from the product of `shape`.
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} mismatch");
        HostTensor { shape, data: TensorData::I64(data) }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Returns true when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the elements as f32 when the tensor stores f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Returns the elements as i64 when the tensor stores i64.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::I64(v) => Some(v),
            _ => None,
        }
    }
}
