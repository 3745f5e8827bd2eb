//! The instruction sets the flash kernel runs on, chosen once at run time, and the vector operations its tile
//! routines are written over. Each tile routine is generic over [`Simd`] and instantiated inside a
//! `#[target_feature]` function per instruction set; `#[inline(always)]` makes the generic body compile with the
//! caller's features.

/// An instruction set the kernels have a path for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F: 16 f32 lanes, 32 registers.
    Avx512,
    /// AVX2 + FMA: 8 f32 lanes, 16 registers.
    Avx2,
    /// Plain Rust on arrays; what the compiler makes of it (SSE2 on x86-64). Always available.
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports (`ATTEND_ISA=avx512|avx2|portable` overrides, for testing and
    /// benchmarking; an unsupported request falls back to the best available). Decided once per process.
    pub fn detect() -> Isa {
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| match std::env::var("ATTEND_ISA").ok().as_deref() {
            Some("portable") => Isa::Portable,
            Some("avx2") if Isa::Avx2.supported() => Isa::Avx2,
            Some("avx512") if Isa::Avx512.supported() => Isa::Avx512,
            _ => Self::best(),
        })
    }

    fn best() -> Isa {
        [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.supported()).unwrap_or(Isa::Portable)
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every path this CPU can run, best first.
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()).collect()
    }
}

/// Vector operations on f32 lanes. All functions are `unsafe` because they are only sound inside a function
/// compiled with the instruction set (`supported()` checked by the caller), and because loads/stores are unchecked.
pub(crate) trait Simd: Copy {
    const LANES: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn reduce_add(v: Self::V) -> f32;
    unsafe fn reduce_max(v: Self::V) -> f32;
    /// `exp(x)`, with exactly 0 for `x < −87.3` (including −∞) so masked scores contribute nothing; NaN stays NaN
    /// (a diverging run must show, not look like a masked score).
    unsafe fn exp(x: Self::V) -> Self::V;
    /// [`exp`](Self::exp) without the upper clamp, for the softmax's arguments `x = s − m ≤ 0` (up to rounding),
    /// −∞ or NaN; `exp` is this after `min(x, 88.7)`. Not for `x > 88.7`.
    unsafe fn exp_nonpos(x: Self::V) -> Self::V {
        Self::exp(x)
    }
    unsafe fn abs(x: Self::V) -> Self::V;
    /// Lane-wise `if a < b { x } else { y }`.
    unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;

    /// `tanh(x)` as Cephes' tanhf: an odd polynomial for `|x| < 0.625` (where `1 − 2/(e^{2x}+1)` would cancel),
    /// `1 − 2/(e^{2|x|} + 1)` beyond, the sign restored. Relative error ~1e-7.
    #[inline(always)]
    unsafe fn tanh(x: Self::V) -> Self::V {
        let ax = Self::abs(x);
        let one = Self::splat(1.0);
        let big =
            Self::sub(one, Self::mul(Self::splat(2.0), recip::<Self>(Self::add(Self::exp(Self::add(ax, ax)), one))));
        let z = Self::mul(x, x);
        let mut p = Self::splat(TANH_P[0]);
        for c in &TANH_P[1..] {
            p = Self::fma(p, z, Self::splat(*c));
        }
        let small = Self::fma(Self::mul(p, z), x, x);
        let big = Self::select_lt(x, Self::zero(), Self::sub(Self::zero(), big), big);
        Self::select_lt(ax, Self::splat(0.625), small, big)
    }
}

/// `1 / x` by division (exact to the rounding; the approximate reciprocals would cost accuracy here).
#[inline(always)]
unsafe fn recip<S: Simd + ?Sized>(x: S::V) -> S::V {
    div::<S>(S::splat(1.0), x)
}

#[inline(always)]
unsafe fn div<S: Simd + ?Sized>(a: S::V, b: S::V) -> S::V {
    S::div(a, b)
}

const TANH_P: [f32; 5] = [-5.704_988_7e-3, 2.063_908_9e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328_2e-1];

// exp(x) = 2^n · e^r, n = round(x·log2 e), r = x − n·ln 2 ∈ [−ln2/2, ln2/2], e^r by a degree-6 polynomial
// (Cephes' expf coefficients; relative error ≈ 1e-7 over the range).
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];
const EXP_LO: f32 = -87.3;
const EXP_HI: f32 = 88.7;

#[inline(always)]
fn exp_scalar(x: f32) -> f32 {
    if x < EXP_LO {
        return 0.0;
    }
    if x.is_nan() {
        return x;
    }
    let x = x.min(EXP_HI);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Portable path: 8 lanes as an array; loops the compiler may vectorise.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Simd for Portable {
    const LANES: usize = 8;
    type V = [f32; 8];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const [f32; 8])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut [f32; 8], v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i].max(b[i]))
    }
    #[inline(always)]
    unsafe fn reduce_add(v: Self::V) -> f32 {
        v.iter().sum()
    }
    #[inline(always)]
    unsafe fn reduce_max(v: Self::V) -> f32 {
        v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    }
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        std::array::from_fn(|i| exp_scalar(x[i]))
    }
    #[inline(always)]
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] / b[i])
    }
    #[inline(always)]
    unsafe fn abs(x: Self::V) -> Self::V {
        x.map(f32::abs)
    }
    #[inline(always)]
    unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] < b[i] { x[i] } else { y[i] })
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn reduce_add(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        unsafe fn reduce_max(v: __m512) -> f32 {
            _mm512_reduce_max_ps(v)
        }
        #[inline(always)]
        unsafe fn exp(x: __m512) -> __m512 {
            // The clamp keeps NaN (min returns its second operand when either is NaN); the far left is masked in
            // exp_nonpos.
            Self::exp_nonpos(_mm512_min_ps(_mm512_set1_ps(EXP_HI), x))
        }
        #[inline(always)]
        unsafe fn exp_nonpos(x: __m512) -> __m512 {
            // 13 operations: the live mask (NaN stays live), n = round(x·log2 e), r = x − n·ln 2 in two steps,
            // P(r) by Horner, e = 1 + r·(1 + r·P(r)), and 2ⁿ·e with dead lanes zeroed by scalef's own mask.
            // No clamps: n ≥ −126 on live lanes, and x ≤ 0 never overflows.
            let live = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(EXP_LO));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
                x,
                _mm512_set1_ps(LOG2E),
            ));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(EXP_P[0]);
            for c in &EXP_P[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            let one = _mm512_set1_ps(1.0);
            let e = _mm512_fmadd_ps(r, _mm512_fmadd_ps(r, p, one), one);
            _mm512_maskz_scalef_ps(live, e, n)
        }
        #[inline(always)]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            _mm512_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn abs(x: __m512) -> __m512 {
            _mm512_abs_ps(x)
        }
        #[inline(always)]
        unsafe fn select_lt(a: __m512, b: __m512, x: __m512, y: __m512) -> __m512 {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b), y, x)
        }
    }

    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn reduce_add(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
        #[inline(always)]
        unsafe fn reduce_max(v: __m256) -> f32 {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
        }
        #[inline(always)]
        unsafe fn exp(x: __m256) -> __m256 {
            // As the AVX-512 path: n ≤ 128 after the clamp, so 2ⁿ's exponent bits stay in range (2¹²⁸ is +∞).
            Self::exp_nonpos(_mm256_min_ps(_mm256_set1_ps(EXP_HI), x))
        }
        #[inline(always)]
        unsafe fn exp_nonpos(x: __m256) -> __m256 {
            // As the AVX-512 path, with 2ⁿ built from exponent bits (n ≥ −126 on live lanes; dead lanes masked).
            let live = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(EXP_LO));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                x,
                _mm256_set1_ps(LOG2E),
            ));
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(EXP_P[0]);
            for c in &EXP_P[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let one = _mm256_set1_ps(1.0);
            let e = _mm256_fmadd_ps(r, _mm256_fmadd_ps(r, p, one), one);
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            )));
            _mm256_and_ps(live, _mm256_mul_ps(e, pow2))
        }
        #[inline(always)]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            _mm256_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn abs(x: __m256) -> __m256 {
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), x)
        }
        #[inline(always)]
        unsafe fn select_lt(a: __m256, b: __m256, x: __m256, y: __m256) -> __m256 {
            _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_LT_OQ>(a, b))
        }
    }
}

/// Defines `pub(crate) unsafe fn $name(isa, args…)` that runs `$generic::<S>(args…)` compiled for the path `isa`:
/// one `#[target_feature]` wrapper per instruction set, so the generic body is built with that set's features.
macro_rules! per_isa {
    ($(#[$doc:meta])* $name:ident, $generic:ident, ($($arg:ident : $ty:ty),*)) => {
        $(#[$doc])*
        /// # Safety
        /// Tiles address at least `rows` rows of `n` columns (a multiple of `QUANTUM`) at stride `ld`; `isa` is
        /// supported by this CPU.
        pub(crate) unsafe fn $name(isa: $crate::flash::simd::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) { $generic::<$crate::flash::simd::Avx512>($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) { $generic::<$crate::flash::simd::Avx2>($($arg),*) }
            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::flash::simd::Isa::Avx512 => avx512($($arg),*),
                #[cfg(target_arch = "x86_64")]
                $crate::flash::simd::Isa::Avx2 => avx2($($arg),*),
                _ => $generic::<$crate::flash::simd::Portable>($($arg),*),
            }
        }
    };
}
pub(crate) use per_isa;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_exp_is_accurate_and_exactly_zero_below_range() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp_scalar(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 3e-7 * want + 1e-37, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp_scalar(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_scalar(-100.0), 0.0);
        assert!(exp_scalar(f32::NAN).is_nan());
    }

    /// Every path's `exp` and `exp_nonpos` against the scalar reference over −87.3..88.7 (and the small positive
    /// arguments rounding gives the softmax), NaN kept, the far left exactly 0, the far right saturated.
    #[test]
    fn vector_exp_matches_the_scalar_over_its_range() {
        unsafe fn both<S: Simd>(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
            let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            for i in (0..x.len()).step_by(S::LANES) {
                S::store(a.as_mut_ptr().add(i), S::exp(S::load(x.as_ptr().add(i))));
                S::store(b.as_mut_ptr().add(i), S::exp_nonpos(S::load(x.as_ptr().add(i))));
            }
            (a, b)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
            both::<Avx512>(x)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
            both::<Avx2>(x)
        }
        let mut x: Vec<f32> = (-8730..=8870).map(|i| i as f32 * 0.01).collect();
        x.extend([f32::NEG_INFINITY, f32::NAN, -0.0, -1e-30, -87.31, -1e30, 1e-7, 1e-4, 100.0, f32::INFINITY]);
        x.resize(x.len().div_ceil(16) * 16, -1.0);
        let mut runs = vec![("portable", unsafe { both::<Portable>(&x) })];
        #[cfg(target_arch = "x86_64")]
        for isa in Isa::available() {
            match isa {
                Isa::Avx512 => runs.push(("avx512", unsafe { avx512(&x) })),
                Isa::Avx2 => runs.push(("avx2", unsafe { avx2(&x) })),
                Isa::Portable => {}
            }
        }
        for (name, (general, nonpos)) in runs {
            for (i, &xi) in x.iter().enumerate() {
                let want = exp_scalar(xi);
                let close = |got: f32| {
                    if xi.is_nan() {
                        got.is_nan()
                    } else if xi < EXP_LO || xi > EXP_HI {
                        got == want || (xi > EXP_HI && got > 1e38) // the clamp saturates near f32::MAX or at +∞
                    } else if want.is_infinite() {
                        got > 1e38 // within 0.4 of the clamp, where 2ⁿ reaches 2¹²⁸ in either form
                    } else {
                        (got - want).abs() <= 2.5e-7 * want
                    }
                };
                assert!(close(general[i]), "{name}: exp({xi}) = {}, scalar {want}", general[i]);
                if xi <= 0.0 || xi < 0.2 || xi.is_nan() {
                    assert!(close(nonpos[i]), "{name}: exp_nonpos({xi}) = {}, scalar {want}", nonpos[i]);
                }
            }
        }
    }

    /// Every path: NaN in, NaN out; −∞ and far-negative in, exactly 0 out; the polynomial agrees with the scalar.
    #[test]
    fn vector_exp_keeps_nan_and_zeroes_the_far_left() {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(x: &[f32; 16]) -> [f32; 16] {
            let mut o = [0f32; 16];
            Avx512::store(o.as_mut_ptr(), Avx512::exp(Avx512::load(x.as_ptr())));
            o
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32; 16]) -> [f32; 16] {
            let mut o = [0f32; 16];
            for h in 0..2 {
                Avx2::store(o.as_mut_ptr().add(8 * h), Avx2::exp(Avx2::load(x.as_ptr().add(8 * h))));
            }
            o
        }
        fn portable(x: &[f32; 16]) -> [f32; 16] {
            let mut o = [0f32; 16];
            for h in 0..2 {
                unsafe {
                    Portable::store(o.as_mut_ptr().add(8 * h), Portable::exp(Portable::load(x.as_ptr().add(8 * h))))
                };
            }
            o
        }
        let x: [f32; 16] = [
            f32::NAN,
            -f32::NAN,
            f32::NEG_INFINITY,
            -100.0,
            -87.4,
            -87.2,
            -1.0,
            0.0,
            0.5,
            10.0,
            88.0,
            f32::NAN,
            1.0,
            -0.25,
            f32::NAN,
            -3.0,
        ];
        let mut results = vec![("portable", portable(&x))];
        #[cfg(target_arch = "x86_64")]
        for isa in Isa::available() {
            match isa {
                Isa::Avx512 => results.push(("avx512", unsafe { avx512(&x) })),
                Isa::Avx2 => results.push(("avx2", unsafe { avx2(&x) })),
                Isa::Portable => {}
            }
        }
        for (name, got) in results {
            for (i, (&xi, &yi)) in x.iter().zip(&got).enumerate() {
                if xi.is_nan() {
                    assert!(yi.is_nan(), "{name}: exp(NaN) at lane {i} gave {yi}");
                } else if xi < EXP_LO {
                    assert_eq!(yi, 0.0, "{name}: exp({xi}) must be exactly 0");
                } else {
                    let want = exp_scalar(xi);
                    assert!((yi - want).abs() <= 1e-6 * want, "{name}: exp({xi}) = {yi}, scalar {want}");
                }
            }
        }
    }
}
