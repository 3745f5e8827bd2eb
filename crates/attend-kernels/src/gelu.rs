//! GELU (Hendrycks & Gimpel, 2016): `x·Φ(x)`, exactly with erf or with the tanh approximation
//! `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` used by GPT-2 and BERT checkpoints.

use rayon::prelude::*;

use crate::flash::simd::{per_isa, Isa, Simd};
use crate::rnn::{as_f32, as_f32_mut};
use crate::Real;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    Erf,
    Tanh,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const COEF: f64 = 0.044_715;

#[inline(always)]
fn value_and_slope<T: Real>(x: T, kind: GeluKind) -> (T, T) {
    let half = T::from_f64(0.5);
    match kind {
        GeluKind::Erf => {
            let cdf = half * (T::ONE + (x * T::from_f64(FRAC_1_SQRT_2)).erf());
            let pdf = T::from_f64(FRAC_1_SQRT_2PI) * (-half * x * x).exp();
            (x * cdf, cdf + x * pdf)
        }
        GeluKind::Tanh => {
            let c = T::from_f64(SQRT_2_OVER_PI);
            let k = T::from_f64(COEF);
            let t = (c * (x + k * x * x * x)).tanh();
            let du = c * (T::ONE + T::from_f64(3.0 * COEF) * x * x);
            (half * x * (T::ONE + t), half * (T::ONE + t) + half * x * (T::ONE - t * t) * du)
        }
    }
}

/// Elements per parallel task: large enough that a task outweighs its scheduling.
const CHUNK: usize = 16 * 1024;

/// `y = gelu(x)`; f32 runs the vector path of the CPU's instruction set.
pub fn gelu_forward<T: Real>(x: &[T], y: &mut [T], kind: GeluKind) {
    assert_eq!(x.len(), y.len(), "gelu_forward: lengths");
    if let (Some(xf), Some(yf)) = (as_f32(x), as_f32_mut(y)) {
        let isa = Isa::detect();
        yf.par_chunks_mut(CHUNK).zip(xf.par_chunks(CHUNK)).for_each(|(yc, xc)| {
            // SAFETY: `isa` is supported (detected); both chunks have the same length.
            unsafe { gelu_isa(isa, xc, None, yc, kind) }
        });
        return;
    }
    gelu_forward_scalar(x, y, kind)
}

pub(crate) fn gelu_forward_scalar<T: Real>(x: &[T], y: &mut [T], kind: GeluKind) {
    y.par_iter_mut().zip(x.par_iter()).with_min_len(4096).for_each(|(o, &v)| *o = value_and_slope(v, kind).0);
}

/// `dx = dy ⊙ gelu'(x)`; f32 runs the vector path.
pub fn gelu_backward<T: Real>(x: &[T], dy: &[T], dx: &mut [T], kind: GeluKind) {
    assert!(x.len() == dy.len() && x.len() == dx.len(), "gelu_backward: lengths");
    if let (Some(xf), Some(dyf), Some(dxf)) = (as_f32(x), as_f32(dy), as_f32_mut(dx)) {
        let isa = Isa::detect();
        dxf.par_chunks_mut(CHUNK).zip(xf.par_chunks(CHUNK).zip(dyf.par_chunks(CHUNK))).for_each(|(dc, (xc, gc))| {
            // SAFETY: as in `gelu_forward`.
            unsafe { gelu_isa(isa, xc, Some(gc), dc, kind) }
        });
        return;
    }
    gelu_backward_scalar(x, dy, dx, kind)
}

pub(crate) fn gelu_backward_scalar<T: Real>(x: &[T], dy: &[T], dx: &mut [T], kind: GeluKind) {
    dx.par_iter_mut()
        .zip(x.par_iter().zip(dy.par_iter()))
        .with_min_len(4096)
        .for_each(|(d, (&v, &g))| *d = g * value_and_slope(v, kind).1);
}

// Abramowitz & Stegun 7.1.26: erf(x) = 1 − t·(a1 + t·(a2 + … + t·a5))·e^{−x²}, t = 1/(1 + p·x) for x ≥ 0; absolute
// error ≤ 1.5e-7 (PyTorch's vectorised CPU erf uses the same formula).
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [1.061_405_4, -1.453_152_1, 1.421_413_7, -0.284_496_74, 0.254_829_6];

/// erf on a vector: odd, so computed on |x| and the sign restored; NaN stays NaN.
#[inline(always)]
unsafe fn erf_v<S: Simd>(x: S::V) -> S::V {
    let ax = S::abs(x);
    let one = S::splat(1.0);
    let t = S::div(one, S::fma(S::splat(ERF_P), ax, one));
    let mut p = S::splat(ERF_A[0]);
    for a in &ERF_A[1..] {
        p = S::fma(p, t, S::splat(*a));
    }
    let e = S::exp(S::sub(S::zero(), S::mul(ax, ax)));
    let r = S::sub(one, S::mul(S::mul(p, t), e));
    S::select_lt(x, S::zero(), S::sub(S::zero(), r), r)
}

/// GELU and its slope on one vector: `(x·Φ(x), Φ(x) + x·φ(x))` (erf) or the tanh form's.
#[inline(always)]
unsafe fn value_and_slope_v<S: Simd>(x: S::V, kind: GeluKind) -> (S::V, S::V) {
    let (half, one) = (S::splat(0.5), S::splat(1.0));
    match kind {
        GeluKind::Erf => {
            let cdf = S::mul(half, S::add(one, erf_v::<S>(S::mul(x, S::splat(FRAC_1_SQRT_2 as f32)))));
            let pdf = S::mul(S::splat(FRAC_1_SQRT_2PI as f32), S::exp(S::mul(S::splat(-0.5), S::mul(x, x))));
            (S::mul(x, cdf), S::fma(x, pdf, cdf))
        }
        GeluKind::Tanh => {
            let (c, k) = (S::splat(SQRT_2_OVER_PI as f32), S::splat(COEF as f32));
            let x2 = S::mul(x, x);
            let t = S::tanh(S::mul(c, S::fma(S::mul(k, x2), x, x)));
            let one_t = S::add(one, t);
            let du = S::mul(c, S::fma(S::splat((3.0 * COEF) as f32), x2, one));
            let hx = S::mul(half, x);
            (S::mul(hx, one_t), S::fma(S::mul(hx, S::sub(one, S::mul(t, t))), du, S::mul(half, one_t)))
        }
    }
}

/// One chunk: `out = gelu(x)`, or with `dy`, `out = dy ⊙ gelu'(x)`; the tail past the last full vector is scalar.
#[inline(always)]
unsafe fn gelu_chunk<S: Simd>(x: &[f32], dy: Option<&[f32]>, out: &mut [f32], kind: GeluKind) {
    let n = x.len();
    let vec_end = n - n % S::LANES;
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < vec_end {
        let (v, d) = value_and_slope_v::<S>(S::load(xp.add(i)), kind);
        match dy {
            None => S::store(op.add(i), v),
            Some(g) => S::store(op.add(i), S::mul(S::load(g.as_ptr().add(i)), d)),
        }
        i += S::LANES;
    }
    for j in vec_end..n {
        let (v, d) = value_and_slope(x[j], kind);
        out[j] = match dy {
            None => v,
            Some(g) => g[j] * d,
        };
    }
}

per_isa!(gelu_isa, gelu_chunk, (x: &[f32], dy: Option<&[f32]>, out: &mut [f32], kind: GeluKind));

#[cfg(test)]
mod tests {
    use super::*;

    /// Every ISA path against the f64 scalar formula (erf from libm), values and slopes, over a range that covers
    /// the tails (tolerance: f32 rounding of terms of size |x|), with a length that leaves a scalar tail; ±∞ and NaN as the scalar code gives them.
    #[test]
    fn vector_paths_match_the_f64_formula() {
        let mut x: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.01).collect();
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 30.0, -30.0, 1e-20]);
        let dy: Vec<f32> = (0..x.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for kind in [GeluKind::Erf, GeluKind::Tanh] {
            let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let (mut yw, mut dw) = (vec![0f64; x.len()], vec![0f64; x.len()]);
            let dyd: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
            gelu_forward_scalar(&xd, &mut yw, kind);
            gelu_backward_scalar(&xd, &dyd, &mut dw, kind);
            for isa in Isa::available() {
                let (mut y, mut d) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                unsafe {
                    gelu_isa(isa, &x, None, &mut y, kind);
                    gelu_isa(isa, &x, Some(&dy), &mut d, kind);
                }
                for i in 0..x.len() {
                    for (what, got, want) in [("value", y[i] as f64, yw[i]), ("slope", d[i] as f64, dw[i])] {
                        // f32 rounding of terms as large as |x| (1 + tanh cancels in the far negative tail).
                        let tol = 2e-6 * (1.0 + (x[i] as f64).abs()) + 1e-5 * want.abs();
                        let ok = (got.is_nan() && want.is_nan()) || got == want || (got - want).abs() <= tol;
                        assert!(ok, "{isa:?} {kind:?} {what} at x = {}: {got} vs {want}", x[i]);
                    }
                }
            }
        }
    }
}
