//! Sparse normalisers over rows: sparsemax (Martins & Astudillo 2016) and 1.5-entmax (Peters et al. 2019).
//!
//! Both map scores to a probability distribution that can put exactly zero on poor scores, between the softmax
//! (everything positive) and hard attention (one winner):
//!
//! - sparsemax: `p = [z − τ]₊` with the threshold `τ` such that `Σ p = 1`;
//! - 1.5-entmax: `p = [z/2 − τ]₊²` with `Σ p = 1`.
//!
//! Both thresholds are found exactly by sorting the row (`O(n log n)`). A −∞ score is a hidden entry (weight 0); a
//! row with no finite score is fully masked and gives zeros; a NaN or +∞ score makes the whole row NaN (the
//! threshold depends on every entry, as PyTorch's `entmax` package gives NaN there too).
//!
//! Backward passes (exact Jacobian-vector products):
//!
//! - sparsemax: `dz = 1[p > 0] ⊙ (dp − mean over the support of dp)`;
//! - 1.5-entmax: with `s = √p`, `dz = s ⊙ dp − (⟨s, dp⟩ / Σ s) · s`.

use rayon::prelude::*;

use crate::{rows_per_task, Real};

/// Which sparse normaliser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseKind {
    Sparsemax,
    Entmax15,
}

/// The finite scores of a row, sorted descending, into `buf`; `None` when the row holds NaN or +∞ (the caller
/// fills it with NaN).
fn sorted_finite<T: Real>(x: &[T], buf: &mut Vec<T>) -> Option<()> {
    buf.clear();
    for &v in x {
        if v.is_nan() || v.to_f64() == f64::INFINITY {
            return None;
        }
        if !v.is_neg_infinity() {
            buf.push(v);
        }
    }
    buf.sort_unstable_by(|a, b| b.partial_cmp(a).expect("finite scores compare"));
    Some(())
}

/// Sparsemax threshold of the descending scores `zs` (non-empty): `τ = (Σ_{j≤k} z_(j) − 1) / k` for the largest
/// `k` with `1 + k·z_(k) > Σ_{j≤k} z_(j)`. The condition holds for a prefix of `k`s, so the scan stops at the first
/// failure.
fn sparsemax_tau<T: Real>(zs: &[T]) -> T {
    let (mut sum, mut k, mut support_sum) = (T::ZERO, 0usize, T::ZERO);
    for (i, &z) in zs.iter().enumerate() {
        sum += z;
        let kk = T::from_f64((i + 1) as f64);
        if T::ONE + kk * z > sum {
            k = i + 1;
            support_sum = sum;
        } else {
            break;
        }
    }
    // k ≥ 1 always: for k = 1 the condition is 1 + z > z.
    (support_sum - T::ONE) / T::from_f64(k as f64)
}

/// 1.5-entmax threshold of the descending halved scores `ys` (non-empty, shifted so the maximum is 0): for each
/// support size `k`, `τ_k = mean_k − √((1 − k·var_k) / k)` solves `Σ_{j≤k} (y_(j) − τ)² = 1`; the support is the
/// largest `k` with `τ_k ≤ y_(k)`.
fn entmax15_tau<T: Real>(ys: &[T]) -> T {
    let (mut sum, mut sumsq) = (T::ZERO, T::ZERO);
    let mut tau = T::ZERO;
    for (i, &y) in ys.iter().enumerate() {
        sum += y;
        sumsq += y * y;
        let k = T::from_f64((i + 1) as f64);
        let mean = sum / k;
        let var = sumsq / k - mean * mean;
        let delta = (T::ONE - k * var) / k;
        let delta = if delta > T::ZERO { delta } else { T::ZERO };
        let t = mean - delta.sqrt();
        if t <= y {
            tau = t;
        } else {
            break;
        }
    }
    tau
}

/// `y = sparsemax(x)` or `y = entmax15(x)` row by row, rows of length `n`.
///
/// Panics if the slice lengths disagree (the `attend` wrappers check shapes first and return errors).
pub fn sparse_forward<T: Real>(kind: SparseKind, x: &[T], y: &mut [T], n: usize) {
    assert!(n > 0 && x.len() == y.len() && x.len() % n == 0, "sparse_forward: bad lengths");
    y.par_chunks_mut(n).enumerate().with_min_len(rows_per_task(n)).for_each_init(Vec::new, |buf, (r, yr)| {
        let xr = &x[r * n..(r + 1) * n];
        if sorted_finite(xr, buf).is_none() {
            yr.iter_mut().for_each(|v| *v = T::NAN);
            return;
        }
        if buf.is_empty() {
            yr.iter_mut().for_each(|v| *v = T::ZERO);
            return;
        }
        match kind {
            SparseKind::Sparsemax => {
                let tau = sparsemax_tau(buf);
                for (o, &z) in yr.iter_mut().zip(xr) {
                    let p = z - tau; // −∞ − τ = −∞ → 0
                    *o = if p > T::ZERO { p } else { T::ZERO };
                }
            }
            SparseKind::Entmax15 => {
                // Shift by the maximum (the distribution is shift-invariant) so the squares stay small.
                let half = T::from_f64(0.5);
                let top = buf[0] * half;
                buf.iter_mut().for_each(|v| *v = *v * half - top);
                let tau = entmax15_tau(buf);
                for (o, &z) in yr.iter_mut().zip(xr) {
                    let d = z * half - top - tau;
                    *o = if d > T::ZERO { d * d } else { T::ZERO };
                }
            }
        }
    });
}

/// Backward of [`sparse_forward`] from its output `y` and the upstream gradient `dy`.
pub fn sparse_backward<T: Real>(kind: SparseKind, y: &[T], dy: &[T], dx: &mut [T], n: usize) {
    assert!(n > 0 && y.len() == dy.len() && y.len() == dx.len() && y.len() % n == 0, "sparse_backward: bad lengths");
    dx.par_chunks_mut(n).enumerate().with_min_len(rows_per_task(n)).for_each(|(r, dxr)| {
        let (yr, dyr) = (&y[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
        // Weights of the support: 1 (sparsemax) or √p (entmax); the gradient is w ⊙ dy − (⟨w, dy⟩ / Σ w) · w.
        let weight = |p: T| -> T {
            match kind {
                SparseKind::Sparsemax => {
                    if p > T::ZERO {
                        T::ONE
                    } else {
                        T::ZERO
                    }
                }
                SparseKind::Entmax15 => {
                    if p > T::ZERO {
                        p.sqrt()
                    } else {
                        T::ZERO
                    }
                }
            }
        };
        let (mut wsum, mut wdot, mut nan) = (T::ZERO, T::ZERO, false);
        for (&p, &g) in yr.iter().zip(dyr) {
            nan |= p.is_nan();
            let w = weight(p);
            wsum += w;
            wdot += w * g;
        }
        if nan {
            dxr.iter_mut().for_each(|d| *d = T::NAN);
            return;
        }
        // A fully-masked row has no support (Σ w = 0) and zero gradient.
        let q = if wsum > T::ZERO { wdot / wsum } else { T::ZERO };
        for ((d, &p), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
            let w = weight(p);
            *d = w * g - q * w;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: SparseKind, x: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        sparse_forward(kind, x, &mut y, x.len());
        y
    }

    #[test]
    fn thresholds_make_distributions_and_hide_minus_infinity() {
        let x = [0.3, -1.2, 2.0, 1.9, f64::NEG_INFINITY, 0.0];
        for kind in [SparseKind::Sparsemax, SparseKind::Entmax15] {
            let y = run(kind, &x);
            assert!((y.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{kind:?} {y:?}");
            assert_eq!(y[4], 0.0);
            assert!(y[1] == 0.0 && y[2] > y[3], "{kind:?} {y:?}");
        }
        // Sparsemax of two close winners: p = (1 ± 0.1) / 2 exactly.
        let y = run(SparseKind::Sparsemax, &[2.0, 1.9, -5.0]);
        assert!((y[0] - 0.55).abs() < 1e-12 && (y[1] - 0.45).abs() < 1e-12 && y[2] == 0.0);
    }

    #[test]
    fn masked_rows_are_zero_and_nan_rows_are_nan() {
        for kind in [SparseKind::Sparsemax, SparseKind::Entmax15] {
            assert_eq!(run(kind, &[f64::NEG_INFINITY; 3]), vec![0.0; 3]);
            assert!(run(kind, &[1.0, f64::NAN, 0.0]).iter().all(|v| v.is_nan()));
            assert!(run(kind, &[1.0, f64::INFINITY, 0.0]).iter().all(|v| v.is_nan()));
            let mut dx = [1.0; 3];
            sparse_backward(kind, &[0.0; 3], &[1.0, 2.0, 3.0], &mut dx, 3);
            assert_eq!(dx, [0.0; 3]);
        }
    }
}
