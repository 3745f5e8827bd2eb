//! Fused attention on the CPU, FlashAttention-2 style: tiles of queries meet tiles of keys, the softmax is computed
//! online (running max and sum per query), and no `T × S` buffer exists anywhere. The forward writes `O` and the
//! log-sum-exp; the backward recomputes probabilities from the log-sum-exp and writes `dQ`, `dK`, `dV`.
//!
//! # Layout
//! Row-major f32, heads contiguous: `q (B, H, T, D)`, `k (B, Hkv, S, D)`, `v (B, Hkv, S, Dv)`, `o (B, H, T, Dv)`,
//! `lse (B, H, T)`. `D` and `Dv` must be multiples of [`QUANTUM`] (callers zero-pad; zero features change no dot
//! product). Query head `h` reads K/V head `h / (H / Hkv)`; K and V are never repeated.
//!
//! # Variants
//! The kernels are generic over a [`MaskMod`] and a [`ScoreMod`], so each mask/score combination is its own
//! compiled kernel; tiles are skipped or left unchecked as the mask classifies them. The matrix products and the
//! softmax row steps run on AVX-512, AVX2+FMA or portable code, chosen at run time ([`Isa`]).
//!
//! # What it does not do
//! Gradients of additive bias tensors (a learned bias needs the `T × S` gradient; the attend crate routes such calls
//! to its materialised path). bf16 storage is converted to f32 by the caller.

mod backward;
mod bf16;
mod forward;
pub(crate) mod gemm;
pub mod masks;
mod modvec;
mod rows;
pub mod simd;
pub mod tiles;

pub use backward::{flash_backward, PARTIAL_DQ_BUDGET};
pub use forward::{flash_forward, flash_forward_bf16, flash_probabilities, kv_splits, Bf16, Operand};
pub use masks::{MaskMod, ScoreMod, TileKind};
pub use simd::Isa;

pub use bf16::{bf16_dot_supported, bf16_to_f32, f32_to_bf16};
pub use gemm::QUANTUM;

/// Sizes of one attention call (the vocabulary of the attend crate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashDims {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub t: usize,
    pub s: usize,
    /// Head dim of queries and keys, a multiple of [`QUANTUM`].
    pub d: usize,
    /// Head dim of values, a multiple of [`QUANTUM`].
    pub dv: usize,
}

impl FlashDims {
    /// Checks the invariants the kernels rely on and the lengths of the input buffers.
    pub fn check(&self, q: usize, k: usize, v: usize) -> Result<(), FlashError> {
        self.check_sizes()?;
        let FlashDims { b, h, hkv, t, s, d, dv } = *self;
        let len = |xs: &[usize]| xs.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
        let want = (len(&[b, h, t, d]), len(&[b, hkv, s, d]), len(&[b, hkv, s, dv]));
        if want != (Some(q), Some(k), Some(v)) {
            return Err(FlashError::new(format!(
                "flash attention: buffer lengths q {q}, k {k}, v {v} do not match {self:?}"
            )));
        }
        Ok(())
    }

    /// Elements of the output `(B, H, T, Dv)`, or an error if that overflows.
    pub fn out_len(&self) -> Result<usize, FlashError> {
        [self.b, self.h, self.t, self.dv].iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or_else(|| {
            FlashError::new(format!("flash attention: the output of {self:?} has more elements than memory can hold"))
        })
    }

    /// The invariants on the sizes alone: none zero (tested one by one: a product could overflow to zero or
    /// past it), `Hkv` divides `H`, head dims multiples of [`QUANTUM`].
    pub fn check_sizes(&self) -> Result<(), FlashError> {
        let FlashDims { b, h, hkv, t, s, d, dv } = *self;
        if [b, h, hkv, t, s, d, dv].contains(&0) {
            return Err(FlashError::new(format!("flash attention: empty dimension in {self:?}")));
        }
        if h % hkv != 0 {
            return Err(FlashError::new(format!("flash attention: H = {h} is not a multiple of Hkv = {hkv}")));
        }
        if d % QUANTUM != 0 || dv % QUANTUM != 0 {
            return Err(FlashError::new(format!(
                "flash attention: head dims D = {d}, Dv = {dv} must be multiples of {QUANTUM}"
            )));
        }
        Ok(())
    }
}

/// Floating-point operations of one attention call, in the convention of the PyTorch anchors: `4·D` per visible
/// (query, key) pair (the products `Q Kᵀ` and `P V`, `2·D` each; `D` for both, as the anchors count), times 3.5 with
/// the backward (which they count as 2.5 forwards). Causal pairs are counted exactly, end-aligned, for any `T` and
/// `S`: `Σ_i clamp(i + S − T + 1, 0, S)`; for `T = S` that is `T(T + 1)/2`, the anchors' `T²/2` up to `1/T`. The
/// one place this formula lives: the CLI bench, the kernel bench and criterion use it.
pub fn attention_flops(dims: &FlashDims, causal: bool, backward: bool) -> f64 {
    let (t, s) = (dims.t as i64, dims.s as i64);
    let pairs = if causal {
        // Row i sees keys 0..=i + S − T, clipped to 0..S (rows before the diagonal enters see none).
        (0..t).map(|i| (i + s - t + 1).clamp(0, s) as f64).sum::<f64>()
    } else {
        (t * s) as f64
    };
    let f = 4.0 * (dims.b * dims.h) as f64 * dims.d as f64 * pairs;
    if backward {
        3.5 * f
    } else {
        f
    }
}

/// A buffer, size or setting the kernels cannot run with; the message names the sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlashError(pub String);

impl FlashError {
    pub(crate) fn new(msg: String) -> Self {
        FlashError(msg)
    }
}

impl std::fmt::Display for FlashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FlashError {}

/// `Err` with a formatted [`FlashError`] unless `cond` holds.
macro_rules! require {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err($crate::flash::FlashError::new(format!($($arg)*)));
        }
    };
}
pub(crate) use require;

/// Settings of one call.
#[derive(Clone, Copy, Debug)]
pub struct FlashConfig {
    /// Multiplies `q·k`.
    pub scale: f32,
    /// `(p, seed)`: drop probabilities with probability `p`; element `((b·H + h)·T + i)·S + j` of the stream `seed`
    /// decides, the same stream the attend crate's materialised path uses, so both drop the same entries.
    pub dropout: Option<(f64, u64)>,
    pub isa: Isa,
    /// Query rows per tile.
    pub block_q: usize,
    /// Keys per tile (a multiple of [`QUANTUM`]).
    pub block_k: usize,
    /// Most bytes the backward spends on partial dQ when it splits keys across tasks (see the backward's docs):
    /// it then runs query rows in passes that fit. Default [`PARTIAL_DQ_BUDGET`].
    pub dq_budget: usize,
}

impl FlashConfig {
    /// Default tiles (64 × 64) on this CPU's best instruction set; [`for_head_dims`](Self::for_head_dims) picks
    /// tiles for the CPU.
    pub fn new(scale: f32) -> Self {
        FlashConfig { scale, dropout: None, isa: Isa::detect(), block_q: 64, block_k: 64, dq_budget: PARTIAL_DQ_BUDGET }
    }

    /// [`new`](Self::new) with the tiles [`tiles::tiles_for`] picks for these head dims on this CPU.
    pub fn for_head_dims(scale: f32, d: usize, dv: usize) -> Self {
        let cfg = Self::new(scale);
        let t = tiles::tiles_for(cfg.isa, d, dv);
        FlashConfig { block_q: t.block_q, block_k: t.block_k, ..cfg }
    }

    /// Checks the settings the kernels rely on.
    pub fn check(&self) -> Result<(), FlashError> {
        require!(self.isa.supported(), "flash attention: instruction set {:?} is not supported by this CPU", self.isa);
        require!(self.scale.is_finite(), "flash attention: scale must be finite, got {}", self.scale);
        require!(
            self.block_q > 0 && self.block_k > 0 && self.block_k % QUANTUM == 0,
            "flash attention: block sizes ({}, {}) must be positive, keys a multiple of {QUANTUM}",
            self.block_q,
            self.block_k
        );
        if let Some((p, _)) = self.dropout {
            require!((0.0..1.0).contains(&p), "flash attention: dropout probability must be in [0, 1), got {p}");
        }
        Ok(())
    }
}

/// A raw pointer that rayon tasks may share; each task writes a region no other task touches.
pub(crate) struct SyncPtr<T>(pub *mut T);
unsafe impl<T: Send> Send for SyncPtr<T> {}
unsafe impl<T: Send> Sync for SyncPtr<T> {}
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// Through a method, so closures capture the whole `SyncPtr` (edition 2021 would capture the bare field).
    #[inline(always)]
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// Whether no element has an all-ones exponent (NaN or ±∞); `bits` gives an element's bits, `exp` the exponent
/// mask. A max over masked bits vectorises, where `iter().all(is_finite)` would branch per element.
pub(crate) fn all_finite_bits<E: Sync>(xs: &[E], bits: impl Fn(&E) -> u32 + Sync, exp: u32) -> bool {
    use rayon::prelude::*;
    xs.par_chunks(1 << 16).all(|c| c.iter().fold(0, |m, x| m.max(bits(x) & exp)) != exp)
}

pub(crate) fn round_up(x: usize, q: usize) -> usize {
    x.div_ceil(q) * q
}

/// Dropout decision for the probability of query `i`, key `j` of `(b, h)`.
#[inline(always)]
pub(crate) fn dropout_index(dims: &FlashDims, b: usize, h: usize, i: usize, j: usize) -> u64 {
    (((b * dims.h + h) * dims.t + i) * dims.s + j) as u64
}
