//! Concrete shapes at run time and the symbolic shape checks done once when a file is opened.

use crate::format::{Dim, MAX_RANK, MAX_SYMBOLS};

/// A concrete shape: extents of `rank` axes, the rest 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Extents; entries past `rank` are 1.
    pub dims: [usize; MAX_RANK],
    /// Number of axes.
    pub rank: usize,
}

impl Shape {
    /// Builds a shape from a slice of extents (at most [`MAX_RANK`]).
    pub fn from_slice(dims: &[usize]) -> Option<Shape> {
        if dims.len() > MAX_RANK {
            return None;
        }
        let mut s = Shape { dims: [1; MAX_RANK], rank: dims.len() };
        s.dims[..dims.len()].copy_from_slice(dims);
        Some(s)
    }

    /// Evaluates a symbolic shape for the given symbol values.
    pub fn eval(dims: &[Dim], symbols: &[u64; MAX_SYMBOLS]) -> Option<Shape> {
        let mut s = Shape { dims: [1; MAX_RANK], rank: dims.len().min(MAX_RANK) };
        for (out, d) in s.dims.iter_mut().zip(dims) {
            *out = usize::try_from(d.eval(symbols)?).ok()?;
        }
        Some(s)
    }

    /// The used extents.
    pub fn as_slice(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.as_slice().iter().product()
    }

    /// Row-major element strides.
    pub fn strides(&self) -> [usize; MAX_RANK] {
        let mut strides = [0usize; MAX_RANK];
        let mut acc = 1;
        for i in (0..self.rank).rev() {
            strides[i] = acc;
            acc *= self.dims[i];
        }
        strides
    }

    /// Strides of `self` seen as broadcast to `out` (right-aligned; 0 along broadcast axes).
    ///
    /// The caller has checked that the shapes are broadcast-compatible.
    pub fn broadcast_strides(&self, out: &Shape) -> [usize; MAX_RANK] {
        let own = self.strides();
        let mut strides = [0usize; MAX_RANK];
        let shift = out.rank - self.rank.min(out.rank);
        for i in 0..self.rank.min(out.rank) {
            if self.dims[i] != 1 {
                strides[i + shift] = own[i];
            }
        }
        strides
    }
}

/// Symbolic product of extents, `None` on overflow.
pub fn dims_product(dims: &[Dim]) -> Option<Dim> {
    dims.iter().try_fold(Dim::constant(1), |acc, d| acc.checked_mul(*d))
}

/// Whether `a` broadcasts with `b` to exactly `out` (NumPy rules, right-aligned).
pub fn broadcasts_to(a: &[Dim], b: &[Dim], out: &[Dim]) -> bool {
    if out.len() < a.len().max(b.len()) {
        return false;
    }
    let one = Dim::constant(1);
    for i in 0..out.len() {
        let pick = |s: &[Dim]| {
            let shift = out.len() - s.len();
            if i >= shift {
                s[i - shift]
            } else {
                one
            }
        };
        let (x, y, o) = (pick(a), pick(b), out[i]);
        let ok = match (x == one, y == one) {
            (true, true) => o == one,
            (true, false) => y == o,
            (false, true) => x == o,
            (false, false) => x == o && y == o,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether the concrete shape `a` broadcasts to `out`.
pub fn concrete_broadcasts_to(a: &Shape, out: &Shape) -> bool {
    if a.rank > out.rank {
        return false;
    }
    let shift = out.rank - a.rank;
    (0..a.rank).all(|i| a.dims[i] == 1 || a.dims[i] == out.dims[i + shift])
}

/// Whether `a` expands to `out`: right-aligned, each axis of `a` equal to `out`'s or 1.
pub fn expands_to(a: &[Dim], out: &[Dim]) -> bool {
    if a.len() > out.len() {
        return false;
    }
    let shift = out.len() - a.len();
    a.iter().enumerate().all(|(i, d)| *d == Dim::constant(1) || *d == out[i + shift])
}

/// Advances a row-major multi-index over the extents `dims` by one position, wrapping to all zeros
/// after the last position.
#[inline]
pub fn next_index(index: &mut [usize; crate::format::MAX_RANK], dims: &[usize]) {
    for ax in (0..dims.len()).rev() {
        index[ax] += 1;
        if index[ax] < dims[ax] {
            return;
        }
        index[ax] = 0;
    }
}
