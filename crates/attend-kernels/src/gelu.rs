//! GELU (Hendrycks & Gimpel, 2016): `x·Φ(x)`, exactly with erf or with the tanh approximation
//! `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` used by GPT-2 and BERT checkpoints.

use rayon::prelude::*;

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

pub fn gelu_forward<T: Real>(x: &[T], y: &mut [T], kind: GeluKind) {
    assert_eq!(x.len(), y.len(), "gelu_forward: lengths");
    y.par_iter_mut().zip(x.par_iter()).with_min_len(4096).for_each(|(o, &v)| *o = value_and_slope(v, kind).0);
}

/// `dx = dy ⊙ gelu'(x)`.
pub fn gelu_backward<T: Real>(x: &[T], dy: &[T], dx: &mut [T], kind: GeluKind) {
    assert!(x.len() == dy.len() && x.len() == dx.len(), "gelu_backward: lengths");
    dx.par_iter_mut()
        .zip(x.par_iter().zip(dy.par_iter()))
        .with_min_len(4096)
        .for_each(|(d, (&v, &g))| *d = g * value_and_slope(v, kind).1);
}
