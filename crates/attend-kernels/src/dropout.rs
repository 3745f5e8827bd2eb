//! Dropout from a counter-based generator: whether element `i` is kept depends only on `(seed, i)`, so the same
//! seed reproduces the same mask on any thread layout, and a backward pass regenerates the mask instead of storing it.
//! (candle's CPU random generator cannot be seeded, which is why this exists.)

use rayon::prelude::*;

use crate::Real;

/// SplitMix64's finaliser: a bijective 64-bit mix with full avalanche.
#[inline(always)]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 32 uniform random bits for element `index` of the stream `seed`.
#[inline(always)]
pub fn random_bits(seed: u64, index: u64) -> u32 {
    (mix(mix(seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(index)) >> 32) as u32
}

/// The integer threshold below which an element is dropped, for drop probability `p` in `[0, 1)`.
#[inline]
pub fn drop_threshold(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * 4_294_967_296.0).min(u32::MAX as f64) as u32
}

/// Whether element `index` survives dropout with probability `p` of dropping.
#[inline(always)]
pub fn keep(seed: u64, index: u64, threshold: u32) -> bool {
    random_bits(seed, index) >= threshold
}

/// The mask scaled for inverted dropout: `1/(1−p)` where kept, 0 where dropped; element `i` uses index `offset + i`.
pub fn dropout_scale_mask<T: Real>(seed: u64, offset: u64, p: f64, mask: &mut [T]) {
    let th = drop_threshold(p);
    let scale = T::from_f64(1.0 / (1.0 - p));
    mask.par_iter_mut().enumerate().with_min_len(4096).for_each(|(i, m)| {
        *m = if keep(seed, offset + i as u64, th) { scale } else { T::ZERO };
    });
}

/// `y = x ⊙ mask/(1−p)`; the backward is the same call on `dy`.
pub fn dropout_forward<T: Real>(x: &[T], y: &mut [T], seed: u64, offset: u64, p: f64) {
    assert_eq!(x.len(), y.len(), "dropout_forward: lengths");
    let th = drop_threshold(p);
    let scale = T::from_f64(1.0 / (1.0 - p));
    y.par_iter_mut().zip(x.par_iter()).enumerate().with_min_len(4096).for_each(|(i, (o, &v))| {
        *o = if keep(seed, offset + i as u64, th) { v * scale } else { T::ZERO };
    });
}
