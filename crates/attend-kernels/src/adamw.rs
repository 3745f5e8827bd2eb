//! AdamW (Loshchilov & Hutter 2019) on flat parameter, gradient and moment buffers, in PyTorch's order of
//! operations (`torch.optim.AdamW`, non-amsgrad): decay `θ ← θ(1 − lr·λ)`, moments `m ← β₁m + (1 − β₁)g`,
//! `v ← β₂v + (1 − β₂)g²`, then `θ ← θ − lr · m̂ / (√v̂ + ε)` with `m̂ = m/(1 − β₁ᵗ)`, `v̂ = v/(1 − β₂ᵗ)`.

use rayon::prelude::*;

/// Hyper-parameters of one update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `λ`; the caller passes 0 for the tensors it does not decay.
    pub weight_decay: f64,
}

impl Default for AdamW {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

const CHUNK: usize = 16 * 1024;

/// Step `t ≥ 1` of AdamW on `params`, in place, with the moments `m`, `v` (zeros before the first step).
///
/// # Panics
/// If the four buffers differ in length or `t = 0`.
pub fn adamw_step(hp: &AdamW, t: u64, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n, "adamw_step: buffer lengths differ");
    assert!(t >= 1, "adamw_step: steps count from 1");
    let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
    let (b1, b2) = (hp.beta1 as f32, hp.beta2 as f32);
    // PyTorch folds the bias corrections into the step size and the denominator.
    let bc1 = 1.0 - hp.beta1.powi(t.min(i32::MAX as u64) as i32);
    let bc2_sqrt = (1.0 - hp.beta2.powi(t.min(i32::MAX as u64) as i32)).sqrt();
    let step = (hp.lr / bc1) as f32;
    let (inv_bc2_sqrt, eps) = ((1.0 / bc2_sqrt) as f32, hp.eps as f32);
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let gi = g[i];
                let mi = b1 * m[i] + (1.0 - b1) * gi;
                let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                m[i] = mi;
                v[i] = vi;
                p[i] = p[i] * decay - step * mi / (vi.sqrt() * inv_bc2_sqrt + eps);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The update written out in f64, one element at a time, as `torch.optim.AdamW` documents it.
    fn reference(hp: &AdamW, steps: &[f64], theta0: f64) -> f64 {
        let (mut th, mut m, mut v) = (theta0, 0.0, 0.0);
        for (i, &g) in steps.iter().enumerate() {
            let t = (i + 1) as i32;
            th *= 1.0 - hp.lr * hp.weight_decay;
            m = hp.beta1 * m + (1.0 - hp.beta1) * g;
            v = hp.beta2 * v + (1.0 - hp.beta2) * g * g;
            let (mh, vh) = (m / (1.0 - hp.beta1.powi(t)), v / (1.0 - hp.beta2.powi(t)));
            th -= hp.lr * mh / (vh.sqrt() + hp.eps);
        }
        th
    }

    #[test]
    fn three_steps_follow_the_documented_update() {
        let hp = AdamW { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        let n = 40_000; // more than one chunk
        let theta0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).cos()).collect();
        let grads: Vec<Vec<f32>> =
            (0..3).map(|s| (0..n).map(|i| ((i * (s + 3)) as f32 * 0.013).sin()).collect()).collect();
        let (mut p, mut m, mut v) = (theta0.clone(), vec![0f32; n], vec![0f32; n]);
        for (s, g) in grads.iter().enumerate() {
            adamw_step(&hp, s as u64 + 1, &mut p, g, &mut m, &mut v);
        }
        for i in (0..n).step_by(997) {
            let want = reference(&hp, &grads.iter().map(|g| g[i] as f64).collect::<Vec<_>>(), theta0[i] as f64);
            assert!((p[i] as f64 - want).abs() < 1e-5, "element {i}: {} vs {want}", p[i]);
        }
    }

    #[test]
    fn a_nan_gradient_poisons_only_its_own_parameter() {
        let mut p = vec![1f32; 3];
        let (mut m, mut v) = (vec![0f32; 3], vec![0f32; 3]);
        adamw_step(&AdamW::default(), 1, &mut p, &[0.5, f32::NAN, -0.5], &mut m, &mut v);
        assert!(p[1].is_nan() && p[0].is_finite() && p[2].is_finite());
    }
}
