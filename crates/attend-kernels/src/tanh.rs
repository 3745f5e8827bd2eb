//! `tanh` on the vector paths (libm's scalar `tanhf` was a fifth of a Bahdanau seq2seq training step: the additive
//! score takes a `tanh` of every query–key pair). Backward from the output: `dx = dy ⊙ (1 − y²)`.

use rayon::prelude::*;

use crate::flash::simd::{per_isa, Isa, Simd};
use crate::rnn::{as_f32, as_f32_mut};
use crate::Real;

const CHUNK: usize = 16 * 1024;

/// `y = tanh(x)`; f32 runs the vector path of the CPU's instruction set.
pub fn tanh_forward<T: Real>(x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "tanh_forward: lengths");
    if let (Some(xf), Some(yf)) = (as_f32(x), as_f32_mut(y)) {
        let isa = Isa::detect();
        yf.par_chunks_mut(CHUNK).zip(xf.par_chunks(CHUNK)).for_each(|(yc, xc)| {
            // SAFETY: `isa` is supported (detected); both chunks have the same length.
            unsafe { tanh_isa(isa, xc, yc) }
        });
        return;
    }
    y.par_iter_mut().zip(x.par_iter()).with_min_len(4096).for_each(|(o, &v)| *o = v.tanh());
}

/// `dx = dy ⊙ (1 − y²)` from the forward's output `y`.
pub fn tanh_backward<T: Real>(y: &[T], dy: &[T], dx: &mut [T]) {
    assert!(y.len() == dy.len() && y.len() == dx.len(), "tanh_backward: lengths");
    dx.par_iter_mut()
        .zip(y.par_iter().zip(dy.par_iter()))
        .with_min_len(4096)
        .for_each(|(d, (&y, &g))| *d = g * (T::ONE - y * y));
}

#[inline(always)]
unsafe fn tanh_chunk<S: Simd>(x: &[f32], out: &mut [f32]) {
    let n = x.len();
    let vec_end = n - n % S::LANES;
    let mut i = 0;
    while i < vec_end {
        S::store(out.as_mut_ptr().add(i), S::tanh(S::load(x.as_ptr().add(i))));
        i += S::LANES;
    }
    for j in vec_end..n {
        out[j] = x[j].tanh();
    }
}

per_isa!(tanh_isa, tanh_chunk, (x: &[f32], out: &mut [f32]));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_matches_libm_and_keeps_nan_and_the_limits() {
        let mut x: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.005).collect();
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 50.0, -50.0, 1e-30, -0.0]);
        for isa in Isa::available() {
            let mut y = vec![0f32; x.len()];
            unsafe { tanh_isa(isa, &x, &mut y) };
            for (&v, &got) in x.iter().zip(&y) {
                let want = (v as f64).tanh();
                if want.is_nan() {
                    assert!(got.is_nan(), "{isa:?} tanh({v}) = {got}");
                } else {
                    assert!(
                        (got as f64 - want).abs() <= 2e-7 * want.abs().max(1e-3),
                        "{isa:?} tanh({v}) = {got}, libm {want}"
                    );
                }
            }
        }
    }
}
