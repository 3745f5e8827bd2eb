//! bf16 storage for the forward: AVX512-BF16 dot-product tiles and the conversions.
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
