//! Row steps of the online softmax (forward) and of the probability recomputation (backward), written once over
//! [`Simd`](super::simd::Simd) and compiled per instruction set.

use super::simd::{per_isa, Simd};
#[cfg(doc)]
use super::QUANTUM;

/// One online-softmax step over a score tile `s` (`rows × n`, leading dimension `ld`), masked entries −∞:
/// `m' = max(m, max_j s)`, `alpha = exp(m − m')`, `s ← exp(s − m')`, `l ← l·alpha + Σ_j s`. A row still fully
/// masked keeps `m = −∞`, gets `s = 0` and `alpha = 1`.
///
/// NaN: the vector max may drop a NaN lane, but `exp(NaN − m') = NaN` then makes `l` NaN, and NaN in `l` (and in
/// the output accumulator, through `P V`) stays NaN for the rest of the row. The one case the max could hide is a
/// row whose only finite-looking entries are NaN (`m' = −∞`): it is scanned for NaN, and if it has one, its tile
/// becomes NaN and `l` NaN, instead of passing for a fully masked row.
#[inline(always)]
unsafe fn online_softmax_generic<S: Simd>(
    s: *mut f32,
    ld: usize,
    rows: usize,
    n: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    for r in 0..rows {
        let row = s.add(r * ld);
        let mut vmax = S::splat(f32::NEG_INFINITY);
        let mut j = 0;
        while j < n {
            vmax = S::max(vmax, S::load(row.add(j)));
            j += S::LANES;
        }
        let m_new = m[r].max(S::reduce_max(vmax));
        if m_new == f32::NEG_INFINITY {
            let nan = (0..n).any(|j| (*row.add(j)).is_nan());
            let fill = S::splat(if nan { f32::NAN } else { 0.0 });
            let mut j = 0;
            while j < n {
                S::store(row.add(j), fill);
                j += S::LANES;
            }
            alpha[r] = 1.0;
            if nan {
                l[r] = f32::NAN;
            }
            continue;
        }
        let shift = S::splat(m_new);
        let mut vsum = S::zero();
        let mut j = 0;
        while j < n {
            let e = S::exp_nonpos(S::sub(S::load(row.add(j)), shift));
            S::store(row.add(j), e);
            vsum = S::add(vsum, e);
            j += S::LANES;
        }
        let a = if m[r] == f32::NEG_INFINITY { 0.0 } else { (m[r] - m_new).exp() };
        alpha[r] = a;
        l[r] = l[r] * a + S::reduce_add(vsum);
        m[r] = m_new;
    }
}

/// `s ← exp(s − lse_row)`, 0 for rows with `lse = −∞` (queries that see no key). A NaN `lse` makes the row NaN,
/// masked entries included: callers with non-finite data zero the invisible entries themselves (careful tiles).
#[inline(always)]
unsafe fn exp_minus_lse_generic<S: Simd>(s: *mut f32, ld: usize, rows: usize, n: usize, lse: &[f32]) {
    for (r, &lr) in lse.iter().enumerate().take(rows) {
        let row = s.add(r * ld);
        if lr == f32::NEG_INFINITY {
            let mut j = 0;
            while j < n {
                S::store(row.add(j), S::zero());
                j += S::LANES;
            }
            continue;
        }
        let shift = S::splat(lr);
        let mut j = 0;
        while j < n {
            S::store(row.add(j), S::exp_nonpos(S::sub(S::load(row.add(j)), shift)));
            j += S::LANES;
        }
    }
}

/// `dp ← p ⊙ (dp − delta_row)`: the softmax backward with `delta = Σ_j p·dp = Σ_d dO·O` precomputed.
#[inline(always)]
unsafe fn softmax_grad_generic<S: Simd>(p: *const f32, dp: *mut f32, ld: usize, rows: usize, n: usize, delta: &[f32]) {
    for (r, &dr) in delta.iter().enumerate().take(rows) {
        let (pr, dpr) = (p.add(r * ld), dp.add(r * ld));
        let d = S::splat(dr);
        let mut j = 0;
        while j < n {
            S::store(dpr.add(j), S::mul(S::load(pr.add(j)), S::sub(S::load(dpr.add(j)), d)));
            j += S::LANES;
        }
    }
}

/// `o_row ← o_row · alpha_row`.
#[inline(always)]
unsafe fn scale_rows_generic<S: Simd>(o: *mut f32, ld: usize, rows: usize, n: usize, alpha: &[f32]) {
    for (r, &a) in alpha.iter().enumerate().take(rows) {
        if a == 1.0 {
            continue;
        }
        let row = o.add(r * ld);
        let av = S::splat(a);
        let mut j = 0;
        while j < n {
            S::store(row.add(j), S::mul(S::load(row.add(j)), av));
            j += S::LANES;
        }
    }
}

per_isa!(
    /// See `online_softmax_generic`.
    online_softmax, online_softmax_generic,
    (s: *mut f32, ld: usize, rows: usize, n: usize, m: &mut [f32], l: &mut [f32], alpha: &mut [f32])
);
per_isa!(
    /// See `exp_minus_lse_generic`.
    exp_minus_lse, exp_minus_lse_generic, (s: *mut f32, ld: usize, rows: usize, n: usize, lse: &[f32])
);
per_isa!(
    /// See `softmax_grad_generic`.
    softmax_grad, softmax_grad_generic, (p: *const f32, dp: *mut f32, ld: usize, rows: usize, n: usize, delta: &[f32])
);
per_isa!(
    /// See `scale_rows_generic`.
    scale_rows, scale_rows_generic, (o: *mut f32, ld: usize, rows: usize, n: usize, alpha: &[f32])
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash::simd::Isa;

    #[test]
    fn row_steps_match_scalar_on_every_path() {
        let (rows, n) = (3, 32);
        let src: Vec<f32> = (0..rows * n)
            .map(|i| if i % 5 == 0 { f32::NEG_INFINITY } else { ((i * 37) % 23) as f32 / 4.0 - 3.0 })
            .collect();
        for isa in Isa::available() {
            let mut s = src.clone();
            let (mut m, mut l, mut alpha) = (vec![f32::NEG_INFINITY, 1.0, 10.0], vec![0.0, 2.0, 3.0], vec![0.0; 3]);
            unsafe { online_softmax(isa, s.as_mut_ptr(), n, rows, n, &mut m, &mut l, &mut alpha) };
            for r in 0..rows {
                let row = &src[r * n..(r + 1) * n];
                let m0 = [f32::NEG_INFINITY, 1.0, 10.0][r];
                let m_new = row.iter().fold(m0, |a, &b| a.max(b));
                assert_eq!(m[r], m_new, "{isa:?} max");
                let a0 = if m0 == f32::NEG_INFINITY { 0.0 } else { (m0 - m_new).exp() };
                assert!((alpha[r] - a0).abs() < 1e-6, "{isa:?} alpha");
                let sum: f32 = row.iter().map(|&x| (x - m_new).exp()).sum();
                let l_want = [0.0, 2.0, 3.0][r] * a0 + sum;
                assert!((l[r] - l_want).abs() < 1e-5 * l_want, "{isa:?} l {} vs {l_want}", l[r]);
                for j in 0..n {
                    let want = (row[j] - m_new).exp();
                    assert!((s[r * n + j] - want).abs() <= 1e-6 * want.max(1e-30), "{isa:?} p");
                    if row[j] == f32::NEG_INFINITY {
                        assert_eq!(s[r * n + j], 0.0);
                    }
                }
            }
        }
    }
}
