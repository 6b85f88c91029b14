//! Whitened low-rank factorization: truncates W·S instead of W, where S Sᵀ = XᵀX is the
//! calibration Gram of the layer's input, so the rank-r factors minimise the error of the layer's
//! outputs on the calibration data rather than of its weights (the form of SVD-LLM and DRONE).

use faer::{Accum, Mat, Par, Side};

use crate::spectrum::SpectrumError;

/// Eigendecomposition of a damped input Gram matrix, G = Q Λ Qᵀ.
#[derive(Clone, Debug)]
pub struct Whitening {
    k: usize,
    q: Mat<f64>,
    sqrt_l: Vec<f64>,
}

/// Fraction of the mean eigenvalue added to every eigenvalue, so a singular Gram (fewer tokens than
/// input width, or dead input channels) still gives a finite inverse.
pub const DAMPING: f64 = 1e-4;

impl Whitening {
    /// Decomposes the row-major `k × k` Gram matrix.
    ///
    /// # Errors
    /// [`SpectrumError::NoConvergence`] when the eigendecomposition fails, and shape or
    /// finiteness errors on bad input.
    pub fn new(gram: &[f64], k: usize) -> Result<Self, SpectrumError> {
        if k == 0 || gram.len() != k * k {
            return Err(SpectrumError::ShapeMismatch { rows: k, cols: k, len: gram.len() });
        }
        if let Some(i) = gram.iter().position(|v| !v.is_finite()) {
            return Err(SpectrumError::NonFinite { row: i / k, col: i % k, value: gram[i] as f32 });
        }
        let g = Mat::<f64>::from_fn(k, k, |i, j| 0.5 * (gram[i * k + j] + gram[j * k + i]));
        let eig = g
            .self_adjoint_eigen(Side::Lower)
            .map_err(|_| SpectrumError::NoConvergence { rows: k, cols: k })?;
        let values: Vec<f64> = (0..k).map(|i| eig.S()[i].max(0.0)).collect();
        let mean = values.iter().sum::<f64>() / k as f64;
        let floor = DAMPING * mean.max(f64::MIN_POSITIVE);
        let sqrt_l = values.iter().map(|v| (v + floor).sqrt()).collect();
        Ok(Whitening { k, q: eig.U().to_owned(), sqrt_l })
    }

    /// W · Q · Λ^½ for a row-major `n × k` weight.
    fn whiten(&self, w: &[f32], n: usize) -> Mat<f64> {
        let wm = Mat::<f64>::from_fn(n, self.k, |i, j| w[i * self.k + j] as f64);
        let mut m = Mat::<f64>::zeros(n, self.k);
        faer::linalg::matmul::matmul(
            m.as_mut(),
            Accum::Replace,
            wm.as_ref(),
            self.q.as_ref(),
            1.0,
            Par::Seq,
        );
        for j in 0..self.k {
            for i in 0..n {
                m[(i, j)] *= self.sqrt_l[j];
            }
        }
        m
    }

    /// Singular values of the whitened weight, descending.
    ///
    /// # Errors
    /// [`SpectrumError::NoConvergence`] when the SVD fails.
    pub fn singular_values(&self, w: &[f32], n: usize) -> Result<Vec<f64>, SpectrumError> {
        self.check(w, n)?;
        self.whiten(w, n)
            .singular_values()
            .map_err(|_| SpectrumError::NoConvergence { rows: n, cols: self.k })
    }

    /// Rank-`rank` factors (left `n × rank`, right `rank × k`, row-major f32) with
    /// W ≈ left · right, minimising ‖(W − left·right) X‖ over the calibration inputs.
    ///
    /// # Errors
    /// Shape errors, an invalid rank, or SVD failure.
    pub fn factors(
        &self,
        w: &[f32],
        n: usize,
        rank: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), SpectrumError> {
        self.check(w, n)?;
        let max = n.min(self.k);
        if rank == 0 || rank > max {
            return Err(SpectrumError::InvalidRank { rank, max });
        }
        let svd = self
            .whiten(w, n)
            .thin_svd()
            .map_err(|_| SpectrumError::NoConvergence { rows: n, cols: self.k })?;
        let (u, s, v) = (svd.U(), svd.S(), svd.V());
        let mut left = vec![0f32; n * rank];
        for i in 0..n {
            for r in 0..rank {
                left[i * rank + r] = (u[(i, r)] * s[r]) as f32;
            }
        }
        // right = V_rᵀ · Λ^-½ · Qᵀ, i.e. right[r, c] = Σ_j v[j, r] / √λ_j · q[c, j].
        let scaled = Mat::<f64>::from_fn(rank, self.k, |r, j| v[(j, r)] / self.sqrt_l[j]);
        let mut right_m = Mat::<f64>::zeros(rank, self.k);
        faer::linalg::matmul::matmul(
            right_m.as_mut(),
            Accum::Replace,
            scaled.as_ref(),
            self.q.transpose(),
            1.0,
            Par::Seq,
        );
        let right = (0..rank * self.k).map(|i| right_m[(i / self.k, i % self.k)] as f32).collect();
        Ok((left, right))
    }

    /// Computes the whitened weight's SVD once, so that factors of any rank can be cut from it
    /// without another decomposition. [`WhitenedSvd::factors`] gives the same factors as
    /// [`Whitening::factors`].
    ///
    /// # Errors
    /// Shape errors or SVD failure.
    pub fn decompose(&self, w: &[f32], n: usize) -> Result<WhitenedSvd, SpectrumError> {
        self.check(w, n)?;
        let svd = self
            .whiten(w, n)
            .thin_svd()
            .map_err(|_| SpectrumError::NoConvergence { rows: n, cols: self.k })?;
        let (u, s, v) = (svd.U(), svd.S(), svd.V());
        let m = n.min(self.k);
        let singular: Vec<f64> = (0..m).map(|r| s[r]).collect();
        let left = Mat::<f64>::from_fn(n, m, |i, r| u[(i, r)] * singular[r]);
        let scaled = Mat::<f64>::from_fn(m, self.k, |r, j| v[(j, r)] / self.sqrt_l[j]);
        let mut right = Mat::<f64>::zeros(m, self.k);
        faer::linalg::matmul::matmul(
            right.as_mut(),
            Accum::Replace,
            scaled.as_ref(),
            self.q.transpose(),
            1.0,
            Par::Seq,
        );
        Ok(WhitenedSvd { singular, left, right })
    }

    fn check(&self, w: &[f32], n: usize) -> Result<(), SpectrumError> {
        if w.len() != n * self.k {
            return Err(SpectrumError::ShapeMismatch { rows: n, cols: self.k, len: w.len() });
        }
        Ok(())
    }
}

/// A whitened weight's singular values and full-rank factors, from [`Whitening::decompose`].
#[derive(Clone, Debug)]
pub struct WhitenedSvd {
    singular: Vec<f64>,
    /// `n × m`: U · Σ.
    left: Mat<f64>,
    /// `m × k`: Vᵀ · Λ^-½ · Qᵀ.
    right: Mat<f64>,
}

impl WhitenedSvd {
    /// Singular values of the whitened weight, descending.
    pub fn singular_values(&self) -> &[f64] {
        &self.singular
    }

    /// Rank-`rank` factors (left `n × rank`, right `rank × k`, row-major f32), as
    /// [`Whitening::factors`] computes them.
    ///
    /// # Errors
    /// [`SpectrumError::InvalidRank`] unless `0 < rank <= min(n, k)`.
    pub fn factors(&self, rank: usize) -> Result<(Vec<f32>, Vec<f32>), SpectrumError> {
        let (n, m, k) = (self.left.nrows(), self.left.ncols(), self.right.ncols());
        if rank == 0 || rank > m {
            return Err(SpectrumError::InvalidRank { rank, max: m });
        }
        let left = (0..n * rank).map(|i| self.left[(i / rank, i % rank)] as f32).collect();
        let right = (0..rank * k).map(|i| self.right[(i / k, i % k)] as f32).collect();
        Ok((left, right))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
    }

    /// Returns XᵀX for the row-major `tokens × k` matrix `x`.
    fn gram_of(x: &[f64], k: usize) -> Vec<f64> {
        let mut gram = vec![0f64; k * k];
        for row in x.chunks_exact(k) {
            for i in 0..k {
                for j in 0..k {
                    gram[i * k + j] += row[i] * row[j];
                }
            }
        }
        gram
    }

    /// Inputs that live in a low-dimensional subspace: whitened factors of any rank at least that
    /// dimension reproduce the outputs exactly, although the weight itself is full rank.
    #[test]
    fn whitened_rank_matches_input_subspace() {
        let (n, k, d, tokens) = (12, 10, 3, 40);
        let mut r = rng(5);
        let w: Vec<f32> = (0..n * k).map(|_| r() as f32).collect();
        let basis: Vec<f64> = (0..d * k).map(|_| r()).collect();
        let mut x = Vec::with_capacity(tokens * k);
        for _ in 0..tokens {
            let c: Vec<f64> = (0..d).map(|_| r()).collect();
            for j in 0..k {
                x.push((0..d).map(|a| c[a] * basis[a * k + j]).sum::<f64>());
            }
        }
        let gram = gram_of(&x, k);
        let wh = Whitening::new(&gram, k).unwrap();
        let sv = wh.singular_values(&w, n).unwrap();
        assert!(sv[d] < 1e-2 * sv[0], "spectrum beyond the subspace should vanish: {sv:?}");
        let (left, right) = wh.factors(&w, n, d).unwrap();
        let mut worst = 0f64;
        let mut scale = 0f64;
        for t in 0..tokens {
            for i in 0..n {
                let exact: f64 = (0..k).map(|j| w[i * k + j] as f64 * x[t * k + j]).sum();
                let mid: Vec<f64> = (0..d)
                    .map(|r| (0..k).map(|j| right[r * k + j] as f64 * x[t * k + j]).sum())
                    .collect();
                let approx: f64 = (0..d).map(|r| left[i * d + r] as f64 * mid[r]).sum();
                worst = worst.max((exact - approx).abs());
                scale = scale.max(exact.abs());
            }
        }
        assert!(worst < 1e-3 * scale, "output error {worst} against scale {scale}");
    }

    #[test]
    fn full_rank_with_identity_gram_is_exact() {
        let (n, k) = (6, 5);
        let mut r = rng(9);
        let w: Vec<f32> = (0..n * k).map(|_| r() as f32).collect();
        let gram: Vec<f64> = (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
        let wh = Whitening::new(&gram, k).unwrap();
        let (left, right) = wh.factors(&w, n, k).unwrap();
        for i in 0..n {
            for j in 0..k {
                let v: f32 = (0..k).map(|r| left[i * k + r] * right[r * k + j]).sum();
                assert!((v - w[i * k + j]).abs() < 1e-4, "({i}, {j}): {v} vs {}", w[i * k + j]);
            }
        }
    }

    /// Factors cut from one stored decomposition match those computed for each rank alone.
    #[test]
    fn stored_svd_gives_same_factors() {
        let (n, k, tokens) = (9, 14, 30);
        let mut r = rng(21);
        let w: Vec<f32> = (0..n * k).map(|_| r() as f32).collect();
        let x: Vec<f64> = (0..tokens * k).map(|_| r()).collect();
        let gram = gram_of(&x, k);
        let wh = Whitening::new(&gram, k).unwrap();
        let stored = wh.decompose(&w, n).unwrap();
        let alone = wh.singular_values(&w, n).unwrap();
        assert_eq!(stored.singular_values().len(), alone.len());
        for (a, b) in stored.singular_values().iter().zip(&alone) {
            assert!((a - b).abs() <= 1e-9 * alone[0], "singular value {a} vs {b}");
        }
        for rank in [1, 4, n] {
            let (left, right) = stored.factors(rank).unwrap();
            let (left_alone, right_alone) = wh.factors(&w, n, rank).unwrap();
            assert_eq!(left, left_alone, "left factor at rank {rank}");
            assert_eq!(right, right_alone, "right factor at rank {rank}");
        }
        assert!(stored.factors(0).is_err());
        assert!(stored.factors(n + 1).is_err());
    }

    #[test]
    fn singular_gram_does_not_fail() {
        let k = 4;
        let gram = vec![0f64; k * k];
        let wh = Whitening::new(&gram, k).unwrap();
        let w = vec![1f32; 3 * k];
        assert!(wh.factors(&w, 3, 1).is_ok());
        assert!(Whitening::new(&[f64::NAN; 16], 4).is_err());
    }
}
