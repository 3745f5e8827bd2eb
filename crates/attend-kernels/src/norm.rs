//! Layer norm (Ba et al., 2016) and RMS norm (Zhang & Sennrich, 2019) over the last axis, with an optional
//! elementwise scale `w`; a bias, when a layer has one, is added outside as a plain differentiable op.
//!
//! Layer norm: `x̂ = (x − μ)·r`, `r = 1/√(var + eps)` (biased variance, as PyTorch). RMS norm: `x̂ = x·r`,
//! `r = 1/√(mean(x²) + eps)`. Output `y = x̂ ⊙ w`.
//!
//! Backward, with `g = dy ⊙ w`: layer norm `dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))`; RMS norm
//! `dx = r·(g − x̂·mean(g ⊙ x̂))`; `dw = Σ_rows dy ⊙ x̂`. Statistics are recomputed rather than stored.

use rayon::prelude::*;

use crate::{rows_per_task, Real};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// Subtract the mean, divide by the standard deviation.
    Layer,
    /// Divide by the root mean square; no centring.
    Rms,
}

/// (mean, 1/std) of a row; the mean is 0 for RMS norm.
#[inline]
fn stats<T: Real>(xr: &[T], kind: NormKind, eps: T) -> (T, T) {
    let n = T::from_f64(xr.len() as f64);
    let mean = match kind {
        NormKind::Layer => xr.iter().fold(T::ZERO, |s, &v| s + v) / n,
        NormKind::Rms => T::ZERO,
    };
    let var = xr.iter().fold(T::ZERO, |s, &v| s + (v - mean) * (v - mean)) / n;
    (mean, T::ONE / (var + eps).sqrt())
}

/// `y = norm(x) ⊙ w` row by row (`w = 1` when `None`).
pub fn norm_forward<T: Real>(x: &[T], w: Option<&[T]>, y: &mut [T], n: usize, eps: f64, kind: NormKind) {
    assert!(n > 0 && x.len() == y.len() && x.len() % n == 0, "norm_forward: bad lengths");
    assert!(w.is_none_or(|w| w.len() == n), "norm_forward: weight length");
    let eps = T::from_f64(eps);
    y.par_chunks_mut(n).enumerate().with_min_len(rows_per_task(n)).for_each(|(r, yr)| {
        let xr = &x[r * n..(r + 1) * n];
        let (mean, rstd) = stats(xr, kind, eps);
        match w {
            Some(w) => yr.iter_mut().zip(xr).zip(w).for_each(|((o, &v), &wj)| *o = (v - mean) * rstd * wj),
            None => yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = (v - mean) * rstd),
        }
    });
}

/// Backward of [`norm_forward`]: writes `dx`, and `dw` when the forward had a weight.
pub fn norm_backward<T: Real>(
    x: &[T],
    w: Option<&[T]>,
    dy: &[T],
    dx: &mut [T],
    dw: Option<&mut [T]>,
    n: usize,
    eps: f64,
    kind: NormKind,
) {
    assert!(n > 0 && x.len() == dy.len() && x.len() == dx.len() && x.len() % n == 0, "norm_backward: bad lengths");
    let eps = T::from_f64(eps);
    let inv_n = T::from_f64(1.0 / n as f64);
    let rows_per = rows_per_task(n);
    // Each task handles a block of rows and returns its partial Σ dy ⊙ x̂; blocks are summed after, so dw needs no
    // atomics and the result does not depend on thread timing.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(n * rows_per)
        .enumerate()
        .map(|(blk, dx_blk)| {
            let mut dw_part = if dw.is_some() { vec![T::ZERO; n] } else { Vec::new() };
            let mut g = vec![T::ZERO; n];
            for (i, dxr) in dx_blk.chunks_mut(n).enumerate() {
                let r = blk * rows_per + i;
                let (xr, dyr) = (&x[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
                let (mean, rstd) = stats(xr, kind, eps);
                let (mut mean_g, mut mean_gx) = (T::ZERO, T::ZERO);
                for j in 0..n {
                    let xh = (xr[j] - mean) * rstd;
                    g[j] = match w {
                        Some(w) => dyr[j] * w[j],
                        None => dyr[j],
                    };
                    mean_g += g[j];
                    mean_gx += g[j] * xh;
                    if !dw_part.is_empty() {
                        dw_part[j] += dyr[j] * xh;
                    }
                }
                mean_g *= inv_n;
                mean_gx *= inv_n;
                if kind == NormKind::Rms {
                    mean_g = T::ZERO;
                }
                for j in 0..n {
                    let xh = (xr[j] - mean) * rstd;
                    dxr[j] = rstd * (g[j] - mean_g - xh * mean_gx);
                }
            }
            dw_part
        })
        .collect();
    if let Some(dw) = dw {
        assert_eq!(dw.len(), n, "norm_backward: dw length");
        dw.iter_mut().for_each(|d| *d = T::ZERO);
        for p in &partials {
            dw.iter_mut().zip(p).for_each(|(d, &v)| *d += v);
        }
    }
}
