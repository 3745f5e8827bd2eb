//! ALiBi — "Train Short, Test Long: Attention with Linear Biases" (Press et al., 2022).
//!
//! Head `h` adds `−m_h · |i − j|` to the score of query `i` and key `j`; the slopes `m_h` form a geometric sequence.
//! The bias itself is built by the attention core from [`crate::attention::Mask::alibi`]; this file owns the slopes.

/// The slopes of the ALiBi paper for `n_heads` heads.
///
/// For a power of two `n`, `m_h = 2^(−8(h+1)/n)`. Otherwise the slopes of the closest smaller power of two `p` are
/// followed by every other slope of `2p` (the reference implementation's rule), so the first heads keep the same
/// slopes as the power-of-two model.
pub fn alibi_slopes(n_heads: usize) -> Vec<f64> {
    fn pow2_slopes(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-8.0 / n as f64);
        (0..n).map(|i| start.powi(i as i32 + 1)).collect()
    }
    if n_heads == 0 {
        return Vec::new();
    }
    if n_heads.is_power_of_two() {
        return pow2_slopes(n_heads);
    }
    let closest = 1usize << (usize::BITS - 1 - n_heads.leading_zeros());
    let mut slopes = pow2_slopes(closest);
    let extra = pow2_slopes(2 * closest);
    slopes.extend(extra.into_iter().step_by(2).take(n_heads - closest));
    slopes
}
