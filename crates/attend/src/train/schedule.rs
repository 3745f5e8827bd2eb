//! Learning-rate schedules as pure functions of the step, so a resumed run computes the same rate from the step
//! alone. [`Schedule::factor`] multiplies the base rate of the update made at `step` (counting from 0).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Linear warm-up over `warmup` steps to the base rate, then a half cosine down to `min_ratio` of it at
    /// `total` steps (and flat after).
    WarmupCosine { warmup: u64, total: u64, min_ratio: f64 },
    /// "Attention Is All You Need" §5.3: linear warm-up, then decay with the inverse square root of the step,
    /// scaled so that the peak (at `warmup`) is the base rate: `min(s / warmup, √(warmup / s))`, `s = step + 1`.
    InverseSqrt { warmup: u64 },
}

impl Schedule {
    /// The factor on the base rate for the update made at `step`.
    pub fn factor(&self, step: u64) -> f64 {
        let s = (step + 1) as f64;
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupCosine { warmup, total, min_ratio } => {
                if step < warmup {
                    return s / warmup as f64;
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((step - warmup) as f64 / span).min(1.0);
                min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::InverseSqrt { warmup } => {
                let w = warmup.max(1) as f64;
                (s / w).min((w / s).sqrt())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_rises_linearly_peaks_and_ends_at_the_floor() {
        let s = Schedule::WarmupCosine { warmup: 4, total: 14, min_ratio: 0.1 };
        let f: Vec<f64> = (0..16).map(|i| s.factor(i)).collect();
        assert_eq!(&f[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(f[4], 1.0);
        assert!((f[9] - 0.55).abs() < 1e-12, "half way: {}", f[9]);
        assert!((f[14] - 0.1).abs() < 1e-12 && (f[15] - 0.1).abs() < 1e-12);
        assert!(f[4..15].windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn inverse_sqrt_peaks_at_warmup() {
        let s = Schedule::InverseSqrt { warmup: 100 };
        assert!((s.factor(49) - 0.5).abs() < 1e-12);
        assert!((s.factor(99) - 1.0).abs() < 1e-12);
        assert!((s.factor(399) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(12345), 1.0);
    }
}
