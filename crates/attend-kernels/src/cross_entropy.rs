//! Cross-entropy of logits against class indices, with an ignore index and label smoothing (PyTorch's definition).
//!
//! For a row with target `y` over `V` classes and smoothing `ε`:
//! `loss = lse(x) − (1−ε)·x_y − (ε/V)·Σ_j x_j`, and `∂loss/∂x_j = p_j − (1−ε)·[j = y] − ε/V` with `p = softmax(x)`.
//! Rows whose target equals the ignore index have loss 0 and gradient 0.

use rayon::prelude::*;

use crate::{rows_per_task, Real};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyConfig {
    /// Targets equal to this contribute nothing (PyTorch's default is −100).
    pub ignore_index: i64,
    /// ε in [0, 1]: the target distribution is `(1−ε)·onehot + ε/V`.
    pub label_smoothing: f64,
}

impl Default for CrossEntropyConfig {
    fn default() -> Self {
        Self { ignore_index: -100, label_smoothing: 0.0 }
    }
}

/// The first target that is neither the ignore index nor in `0..v`, as `(row, target)`.
pub fn find_bad_target(targets: &[i64], v: usize, cfg: &CrossEntropyConfig) -> Option<(usize, i64)> {
    targets.iter().enumerate().find(|(_, &t)| t != cfg.ignore_index && (t < 0 || t as usize >= v)).map(|(i, &t)| (i, t))
}

fn row_lse<T: Real>(xr: &[T]) -> T {
    let m = xr.iter().fold(T::NEG_INFINITY, |m, &v| m.max(v));
    m + xr.iter().fold(T::ZERO, |s, &v| s + (v - m).exp()).ln()
}

/// Per-row losses into `loss` (length `N = logits.len() / v`). Targets must be valid (see [`find_bad_target`]).
pub fn cross_entropy_forward<T: Real>(
    logits: &[T],
    targets: &[i64],
    v: usize,
    cfg: &CrossEntropyConfig,
    loss: &mut [T],
) {
    assert!(
        v > 0 && logits.len() == targets.len() * v && loss.len() == targets.len(),
        "cross_entropy_forward: bad lengths"
    );
    let eps = T::from_f64(cfg.label_smoothing);
    let inv_v = T::from_f64(1.0 / v as f64);
    loss.par_iter_mut().enumerate().with_min_len(rows_per_task(v)).for_each(|(r, l)| {
        let t = targets[r];
        if t == cfg.ignore_index {
            *l = T::ZERO;
            return;
        }
        let xr = &logits[r * v..(r + 1) * v];
        let lse = row_lse(xr);
        let mut out = lse - (T::ONE - eps) * xr[t as usize];
        if cfg.label_smoothing != 0.0 {
            out -= eps * inv_v * xr.iter().fold(T::ZERO, |s, &x| s + x);
        }
        *l = out;
    });
}

/// Gradient of `Σ_r dloss[r]·loss[r]` with respect to the logits.
pub fn cross_entropy_backward<T: Real>(
    logits: &[T],
    targets: &[i64],
    v: usize,
    cfg: &CrossEntropyConfig,
    dloss: &[T],
    dlogits: &mut [T],
) {
    assert!(
        v > 0 && logits.len() == targets.len() * v && dloss.len() == targets.len() && dlogits.len() == logits.len(),
        "cross_entropy_backward: bad lengths"
    );
    let eps = T::from_f64(cfg.label_smoothing);
    let smooth = eps * T::from_f64(1.0 / v as f64);
    dlogits.par_chunks_mut(v).enumerate().with_min_len(rows_per_task(v)).for_each(|(r, dr)| {
        let t = targets[r];
        if t == cfg.ignore_index {
            dr.iter_mut().for_each(|d| *d = T::ZERO);
            return;
        }
        let xr = &logits[r * v..(r + 1) * v];
        let lse = row_lse(xr);
        let g = dloss[r];
        for (d, &x) in dr.iter_mut().zip(xr) {
            *d = g * ((x - lse).exp() - smooth);
        }
        dr[t as usize] -= g * (T::ONE - eps);
    });
}
