//! The register-blocked matrix product every product of the flash kernel runs on (`Q Kᵀ`, `P V`, and the five of
//! the backward), written once over [`Simd`] and compiled per instruction set.
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

/// What the accumulators of a product start from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Init {
    /// `C = A·B`.
    Zero,
    /// `C += A·B`.
    Accumulate,
    /// `C = bias + A·B`, one bias row (n elements, at the pointer) for every row of C: a recurrence adds its bias
    /// to each step's gates this way instead of copying it into the tile first.
    Row(*const f32),
}

impl Init {
    pub(crate) fn of(accumulate: bool) -> Self {
        if accumulate {
            Init::Accumulate
        } else {
            Init::Zero
        }
    }

    /// The same start for the columns from `col` on.
    #[inline(always)]
    unsafe fn at(self, col: usize) -> Self {
        match self {
            Init::Row(b) => Init::Row(b.add(col)),
            other => other,
        }
    }
}

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
    init: Init,
) {
    let mut acc = [[S::zero(); NV]; MR];
    match init {
        Init::Zero => {}
        Init::Accumulate => {
            for (r, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = S::load(c.add(r * ldc + v * S::LANES));
                }
            }
        }
        Init::Row(bias) => {
            for row in acc.iter_mut() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = S::load(bias.add(v * S::LANES));
                }
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
    acc: Init,
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
    init: Init,
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
                micro_rows::<S, NV>(mr, k, ar, lda, a_cs, b.add(col), ldb, cr, ldc, init.at(col));
            } else {
                micro_rows::<S, 1>(mr, k, ar, lda, a_cs, b.add(col), ldb, cr, ldc, init.at(col));
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
    acc: Init,
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
    acc: Init,
) {
    gemm_generic::<Avx2, 6, 2>(m, n, k, a, lda, a_cs, b, ldb, c, ldc, acc)
}

/// `C (m × n) = init + A (m × k) · B (k × n)`; `A[r][p]` is at `a + r·a_strides.0 + p·a_strides.1` (`(lda, 1)`
/// for a row-major A, `(1, lda)` for the transpose of a row-major `k × m` matrix — no transposed copy needed); B and
/// C are row-major with leading dimensions `ldb`, `ldc`.
///
/// # Safety
/// `n` is a multiple of [`QUANTUM`]; the pointers address at least the rows and columns described; `isa` is
/// supported by this CPU; `c` does not overlap `a` or `b`; an [`Init::Row`] bias holds `n` elements.
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
    init: Init,
) {
    debug_assert!(n % QUANTUM == 0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => gemm_avx512(m, n, k, a, a_strides, b, ldb, c, ldc, init),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => gemm_avx2(m, n, k, a, a_strides, b, ldb, c, ldc, init),
        _ => gemm_generic::<Portable, 4, 2>(m, n, k, a, a_strides.0, a_strides.1, b, ldb, c, ldc, init),
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
    gemm_strided(isa, m, n, k, a, (lda, 1), b, ldb, c, ldc, Init::of(accumulate))
}

#[cfg(test)]
mod tests {
    use super::*;

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
                let bias: Vec<f32> = (0..n).map(|j| j as f32 / 8.0 - 1.0).collect();
                let init = Init::Row(bias.as_ptr());
                unsafe { gemm_strided(isa, m, n, k, a.as_ptr(), (k, 1), b.as_ptr(), n, c.as_mut_ptr(), n, init) };
                for (i, (x, y)) in c.iter().zip(&want).enumerate() {
                    assert!((x - y - bias[i % n]).abs() < 1e-5, "{isa:?} bias row {m}x{n}x{k}");
                }
            }
        }
    }
}
