//! Tile routines of the flash kernel: a register-blocked matrix product and the row-wise softmax steps, each
//! written once over [`Simd`] and compiled per instruction set.
//!
//! All tiles are row-major f32 with explicit leading dimensions; widths handed to these routines are multiples of
//! 16 (the caller pads), so no routine needs masked loads.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{Isa, Portable, Simd};

/// Rows per AVX-512 micro-tile: 6 rows × 4 vectors = 24 accumulators of the 32 registers, leaving room for the
/// four B vectors and the broadcast A.
const AVX512_MR: usize = 6;

/// Width quantum every tile is padded to (one AVX-512 vector; two AVX2 / portable vectors).
pub const QUANTUM: usize = 16;

/// `C[r][0..NV·L] (+)= Σ_p A[r][p] · B[p][0..NV·L]` for `MR` rows: the accumulators stay in registers.
#[inline(always)]
unsafe fn micro<S: Simd, const MR: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[S::zero(); NV]; MR];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = S::load(c.add(r * ldc + v * S::LANES));
            }
        }
    }
    for p in 0..k {
        let bp = b.add(p * ldb);
        let mut bv = [S::zero(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = S::load(bp.add(v * S::LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = S::splat(*a.add(r * lda + p * a_cs));
            for (v, x) in row.iter_mut().enumerate() {
                *x = S::fma(av, bv[v], *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            S::store(c.add(r * ldc + v * S::LANES), *x);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_rows<S: Simd, const NV: usize>(
    mr: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    match mr {
        8 => micro::<S, 8, NV>(k, a, lda, a_cs, b, ldb, c, ldc, acc),
        7 => micro::<S, 7, NV>(k, a, lda, a_cs, b, ldb, c, ldc, acc),
        6 => micro::<S, 6, NV>(k, a, lda, a_cs, b, ldb, c, ldc, acc),
        5 => micro::<S, 5, NV>(k, a, lda, a_cs, b, ldb, c, ldc, acc),
        4 => micro::<S, 4, NV>(k, a, lda, a_cs, b, ldb, c, ldc, acc),
        3 => micro::<S, 3, NV>(k, a, lda, a_cs, b, ldb, c, ldc, acc),
        2 => micro::<S, 2, NV>(k, a, lda, a_cs, b, ldb, c, ldc, acc),
        _ => micro::<S, 1, NV>(k, a, lda, a_cs, b, ldb, c, ldc, acc),
    }
}

/// Column blocks of `NV` vectors, then single vectors for the rest; rows in blocks of `MR`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_generic<S: Simd, const MR: usize, const NV: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    a_cs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let block = NV * S::LANES;
    let mut col = 0;
    while col < n {
        let wide = n - col >= block;
        let mut r = 0;
        while r < m {
            let mr = (m - r).min(MR);
            let (ar, cr) = (a.add(r * lda), c.add(r * ldc + col));
            if wide {
                micro_rows::<S, NV>(mr, k, ar, lda, a_cs, b.add(col), ldb, cr, ldc, acc);
            } else {
                micro_rows::<S, 1>(mr, k, ar, lda, a_cs, b.add(col), ldb, cr, ldc, acc);
            }
            r += mr;
        }
        col += if wide { block } else { S::LANES };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx512(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    (lda, a_cs): (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    gemm_generic::<Avx512, AVX512_MR, 4>(m, n, k, a, lda, a_cs, b, ldb, c, ldc, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    (lda, a_cs): (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    gemm_generic::<Avx2, 6, 2>(m, n, k, a, lda, a_cs, b, ldb, c, ldc, acc)
}

/// `C (m × n) (+)= A (m × k) · B (k × n)`; `A[r][p]` is at `a + r·a_strides.0 + p·a_strides.1` (`(lda, 1)` for a
/// row-major A, `(1, lda)` for the transpose of a row-major `k × m` matrix — no transposed copy needed); B and C are
/// row-major with leading dimensions `ldb`, `ldc`.
///
/// # Safety
/// `n` is a multiple of [`QUANTUM`]; the pointers address at least the rows and columns described; `isa` is
/// supported by this CPU; `c` does not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_strides: (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    debug_assert!(n % QUANTUM == 0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => gemm_avx512(m, n, k, a, a_strides, b, ldb, c, ldc, accumulate),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => gemm_avx2(m, n, k, a, a_strides, b, ldb, c, ldc, accumulate),
        _ => gemm_generic::<Portable, 4, 2>(m, n, k, a, a_strides.0, a_strides.1, b, ldb, c, ldc, accumulate),
    }
}

/// [`gemm_strided`] with a row-major A of leading dimension `lda`.
///
/// # Safety
/// As for [`gemm_strided`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    gemm_strided(isa, m, n, k, a, (lda, 1), b, ldb, c, ldc, accumulate)
}

// ---------------------------------------------------------------------------------------------------------------
// Row steps of the online softmax (forward) and of the probability recomputation (backward).

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
            let e = S::exp(S::sub(S::load(row.add(j)), shift));
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
            S::store(row.add(j), S::exp(S::sub(S::load(row.add(j)), shift)));
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

macro_rules! per_isa {
    ($(#[$doc:meta])* $name:ident, $generic:ident, ($($arg:ident : $ty:ty),*)) => {
        $(#[$doc])*
        /// # Safety
        /// Tiles address at least `rows` rows of `n` columns (a multiple of [`QUANTUM`]) at stride `ld`; `isa` is
        /// supported by this CPU.
        pub(crate) unsafe fn $name(isa: Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) { $generic::<Avx512>($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) { $generic::<Avx2>($($arg),*) }
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => avx512($($arg),*),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx2($($arg),*),
                _ => $generic::<Portable>($($arg),*),
            }
        }
    };
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

per_isa!(
    /// See `scale_rows_generic`.
    scale_rows, scale_rows_generic, (o: *mut f32, ld: usize, rows: usize, n: usize, alpha: &[f32])
);

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

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_on_every_path() {
        for isa in Isa::available() {
            for &(m, n, k) in &[(1, 16, 1), (3, 16, 5), (4, 64, 64), (7, 48, 13), (64, 80, 64), (9, 112, 3)] {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
                let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5).collect();
                let want = naive(m, n, k, &a, &b);
                let mut c = vec![1f32; m * n];
                unsafe { gemm(isa, m, n, k, a.as_ptr(), k, b.as_ptr(), n, c.as_mut_ptr(), n, false) };
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-5, "{isa:?} {m}x{n}x{k}: {x} vs {y}");
                }
                unsafe { gemm(isa, m, n, k, a.as_ptr(), k, b.as_ptr(), n, c.as_mut_ptr(), n, true) };
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() < 2e-5, "{isa:?} accumulate {m}x{n}x{k}");
                }
            }
        }
    }

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

// ---------------------------------------------------------------------------------------------------------------
// bf16 products with AVX512-BF16: `vdpbf16ps` multiplies pairs of bf16 and adds both products into one f32 lane,
// twice the f32 FMA rate. Operands are laid out in pairs along the reduction axis: A as u32 words holding
// (a[r][2p], a[r][2p+1]), B packed as [p][n][2].

/// Whether this CPU has AVX512-BF16 dot products.
pub fn bf16_dot_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_bf16<const MR: usize, const NV: usize>(
    kp: usize,
    a: *const u32,
    lda: usize,
    b: *const u16,
    n: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(c.add(r * ldc + v * 16));
            }
        }
    }
    for p in 0..kp {
        let bp = b.add(p * n * 2);
        let mut bv: [__m512bh; NV] = [std::mem::transmute(_mm512_setzero_si512()); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = std::mem::transmute(_mm512_loadu_si512(bp.add(v * 32) as *const _));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(a.add(r * lda + p).read_unaligned() as i32));
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_dpbf16_ps(*x, av, bv[v]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc + v * 16), *x);
        }
    }
}

/// `C (m × n) (+)= A · B` with bf16 operands: `a` holds `m` rows of `kp` bf16 pairs (stride `lda` words), `b` the
/// packed `[kp][n][2]` tile whose first column is the output's first column (`b_col0` columns into a tile of width
/// `n_total`).
///
/// # Safety
/// [`bf16_dot_supported`]; `n % 16 == 0`; pointers address what the sizes describe.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16(
    m: usize,
    n: usize,
    kp: usize,
    a: *const u32,
    lda: usize,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut col = 0;
    while col < n {
        let wide = n - col >= 64;
        let mut r = 0;
        while r < m {
            let mr = (m - r).min(4);
            let (ar, bc, cr) = (a.add(r * lda), b.add(col * 2), c.add(r * ldc + col));
            macro_rules! go {
                ($nv:literal) => {
                    match mr {
                        4 => micro_bf16::<4, $nv>(kp, ar, lda, bc, n, cr, ldc, accumulate),
                        3 => micro_bf16::<3, $nv>(kp, ar, lda, bc, n, cr, ldc, accumulate),
                        2 => micro_bf16::<2, $nv>(kp, ar, lda, bc, n, cr, ldc, accumulate),
                        _ => micro_bf16::<1, $nv>(kp, ar, lda, bc, n, cr, ldc, accumulate),
                    }
                };
            }
            if wide {
                go!(4)
            } else {
                go!(1)
            }
            r += mr;
        }
        col += if wide { 64 } else { 16 };
    }
}

/// `dst[i] = bf16(src[i])` (round to nearest even) for a length that is a multiple of 16.
///
/// # Safety
/// [`bf16_dot_supported`]; `dst.len() >= src.len()`; `src.len() % 16 == 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn convert_to_bf16(src: &[f32], dst: *mut u16) {
    use std::arch::x86_64::*;
    for (c, chunk) in src.chunks_exact(16).enumerate() {
        let h: __m256bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(chunk.as_ptr()));
        _mm256_storeu_si256(dst.add(c * 16) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(h));
    }
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod bf16_tests {
    use super::*;

    #[test]
    fn gemm_bf16_matches_naive() {
        if !bf16_dot_supported() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIP gemm_bf16_matches_naive: this CPU has no AVX512-BF16");
            return;
        }
        for &(m, n, kp) in &[(1, 16, 1), (5, 64, 32), (7, 80, 3), (64, 128, 32)] {
            let k = 2 * kp;
            let a: Vec<u16> = (0..m * k).map(|i| f32_to_bf16(((i * 7919) % 97) as f32 / 97.0 - 0.5)).collect();
            let bm: Vec<u16> = (0..k * n).map(|i| f32_to_bf16(((i * 104_729) % 89) as f32 / 89.0 - 0.5)).collect(); // (k, n)
                                                                                                                    // Pack B as [p][n][2].
            let mut packed = vec![0u16; k * n];
            for p in 0..kp {
                for j in 0..n {
                    packed[(p * n + j) * 2] = bm[(2 * p) * n + j];
                    packed[(p * n + j) * 2 + 1] = bm[(2 * p + 1) * n + j];
                }
            }
            let mut c = vec![0f32; m * n];
            unsafe { gemm_bf16(m, n, kp, a.as_ptr() as *const u32, kp, packed.as_ptr(), c.as_mut_ptr(), n, false) };
            for i in 0..m {
                for j in 0..n {
                    let want: f64 =
                        (0..k).map(|p| bf16_to_f32(a[i * k + p]) as f64 * bf16_to_f32(bm[p * n + j]) as f64).sum();
                    assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "{m}x{n}x{k} at ({i},{j})");
                }
            }
        }
    }
}
