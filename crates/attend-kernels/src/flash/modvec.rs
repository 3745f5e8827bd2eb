//! The vector code of the built-in score modifications: soft-cap (Cephes tanh on every path) with its derivative,
//! and ALiBi rows; compiled per instruction set, called through `masks::Softcap` and `masks::Alibi`.

use super::simd::{per_isa, Isa, Simd};
#[cfg(doc)]
use super::QUANTUM;

/// `row ← c · tanh(row / c)`; a tail shorter than a vector is done in scalar code.
#[inline(always)]
unsafe fn softcap_generic<S: Simd>(row: *mut f32, n: usize, cap: f32) {
    let (c, inv) = (S::splat(cap), S::splat(1.0 / cap));
    let mut j = 0;
    while j + S::LANES <= n {
        S::store(row.add(j), S::mul(c, S::tanh(S::mul(S::load(row.add(j)), inv))));
        j += S::LANES;
    }
    for x in j..n {
        *row.add(x) = cap * (*row.add(x) / cap).tanh();
    }
}

/// `ds ← ds · (1 − tanh²(s / c))`, the derivative of the soft-cap at the scaled scores `s`.
#[inline(always)]
unsafe fn softcap_chain_generic<S: Simd>(s: *const f32, ds: *mut f32, n: usize, cap: f32) {
    let (inv, one) = (S::splat(1.0 / cap), S::splat(1.0));
    let mut j = 0;
    while j + S::LANES <= n {
        let t = S::tanh(S::mul(S::load(s.add(j)), inv));
        S::store(ds.add(j), S::mul(S::load(ds.add(j)), S::sub(one, S::mul(t, t))));
        j += S::LANES;
    }
    for x in j..n {
        let t = (*s.add(x) / cap).tanh();
        *ds.add(x) *= 1.0 - t * t;
    }
}

/// `row[x] ← row[x] − m·|d − x|`: ALiBi for one query whose diagonal is `d` keys from the row's first key.
#[inline(always)]
unsafe fn alibi_generic<S: Simd>(row: *mut f32, n: usize, slope: f32, d: f32) {
    let m = S::splat(slope);
    let step = S::splat(S::LANES as f32);
    // d − x for the lanes of the current vector (no path has more than 16 lanes).
    let mut lanes = [0f32; 16];
    for (i, l) in lanes.iter_mut().enumerate().take(S::LANES) {
        *l = d - i as f32;
    }
    let mut dist = S::load(lanes.as_ptr());
    let mut j = 0;
    while j + S::LANES <= n {
        S::store(row.add(j), S::sub(S::load(row.add(j)), S::mul(m, S::abs(dist))));
        dist = S::sub(dist, step);
        j += S::LANES;
    }
    for x in j..n {
        *row.add(x) -= slope * (d - x as f32).abs();
    }
}

per_isa!(
    /// See `softcap_generic`.
    softcap_row_isa, softcap_generic, (row: *mut f32, n: usize, cap: f32)
);
per_isa!(
    /// See `softcap_chain_generic`.
    softcap_chain_isa, softcap_chain_generic, (s: *const f32, ds: *mut f32, n: usize, cap: f32)
);
per_isa!(
    /// See `alibi_generic`.
    alibi_row_isa, alibi_generic, (row: *mut f32, n: usize, slope: f32, d: f32)
);

/// Soft-cap of a row of scaled scores, vectorised on this CPU's best path.
pub fn softcap_row(row: &mut [f32], cap: f32) {
    // SAFETY: the pointer and length come from one slice; Isa::detect only returns supported paths.
    unsafe { softcap_row_isa(Isa::detect(), row.as_mut_ptr(), row.len(), cap) }
}

/// Chain rule of the soft-cap for a row: `ds ← ds · (1 − tanh²(s / c))`.
pub fn softcap_chain_row(s: &[f32], ds: &mut [f32], cap: f32) {
    let n = s.len().min(ds.len());
    // SAFETY: as above; both slices hold `n` elements.
    unsafe { softcap_chain_isa(Isa::detect(), s.as_ptr(), ds.as_mut_ptr(), n, cap) }
}

/// ALiBi bias `−slope·|d − x|` added to a row whose first key is `d` positions left of the query's diagonal.
pub fn alibi_row(row: &mut [f32], slope: f32, d: f32) {
    // SAFETY: as above.
    unsafe { alibi_row_isa(Isa::detect(), row.as_mut_ptr(), row.len(), slope, d) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_tanh_softcap_and_alibi_match_scalar_on_every_path() {
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.013).chain([1e-6, -1e-6, 0.0, 60.0, -60.0]).collect();
        for isa in Isa::available() {
            for cap in [0.7f32, 5.0, 30.0] {
                let mut row = xs.clone();
                unsafe { softcap_row_isa(isa, row.as_mut_ptr(), row.len(), cap) };
                for (&x, &y) in xs.iter().zip(&row) {
                    let want = (cap as f64) * ((x as f64) / cap as f64).tanh();
                    assert!(
                        (y as f64 - want).abs() <= 5e-7 * want.abs().max(1e-3 * cap as f64),
                        "{isa:?} softcap({x}) = {y}, want {want}"
                    );
                }
                let mut ds = vec![1f32; xs.len()];
                unsafe { softcap_chain_isa(isa, xs.as_ptr(), ds.as_mut_ptr(), xs.len(), cap) };
                for (&x, &g) in xs.iter().zip(&ds) {
                    let t = ((x as f64) / cap as f64).tanh();
                    assert!((g as f64 - (1.0 - t * t)).abs() <= 1e-6, "{isa:?} softcap'({x})");
                }
            }
            for (n, d) in [(64, 10.0f32), (37, -3.0), (5, 100.0)] {
                let mut row = vec![1f32; n];
                unsafe { alibi_row_isa(isa, row.as_mut_ptr(), n, 0.25, d) };
                for (x, &v) in row.iter().enumerate() {
                    assert_eq!(v, 1.0 - 0.25 * (d - x as f32).abs(), "{isa:?} alibi n={n} x={x}");
                }
            }
        }
    }
}
