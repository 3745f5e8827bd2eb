//! Rotary position embedding (RoPE) — "RoFormer: Enhanced Transformer with Rotary Position Embedding"
//! (Su et al., 2021), equation (34).
//!
//! The first `r = rotary_dim` features of every query and key head are split into `r/2` pairs `(a_i, b_i)`, and pair
//! `i` at position `m` is rotated by the angle `m·θ_i`, with `θ_i = base^(−2i/r)`:
//!
//! ```text
//! a_i' = a_i · cos(m θ_i) − b_i · sin(m θ_i)
//! b_i' = a_i · sin(m θ_i) + b_i · cos(m θ_i)
//! ```
//!
//! Because `R(m)ᵀ R(n) = R(n − m)`, the score `⟨R(m) q, R(n) k⟩` depends on the positions only through `n − m`.
//! Features `r..D` pass through unchanged (partial rotary, as GPT-NeoX's `rotary_pct` and Phi's
//! `partial_rotary_factor`).
//!
//! Two conventions pair the features differently; checkpoints trained with one do not work with the other:
//!
//! | layout | pair `i` | used by |
//! |---|---|---|
//! | [`RopeLayout::Halves`] | `(x_i, x_{i + r/2})` | Hugging Face Llama / Mistral / GPT-NeoX / Phi (`rotate_half`) |
//! | [`RopeLayout::Interleaved`] | `(x_{2i}, x_{2i+1})` | original RoFormer, GPT-J (`rotate_every_two`), Meta's Llama reference |
//!
//! The rotation is composed from `narrow`, `broadcast_mul`, `sub`/`add` and `cat`, all differentiable in candle, so
//! this is both the training path and its own reference (candle-nn's fused `rotary_emb` kernels are not used: a
//! training path needs a backward).
//!
//! The cos/sin tables are computed once in f64 on the host and stored in the requested dtype: angles reach
//! `max_positions` radians, where an f32 product `m·θ_i` would already lose digits.
//!
//! # Shapes
//! - tables [`Rope::cos`], [`Rope::sin`]: `(max_positions, r/2)`
//! - [`Rope::apply`]: `x (B, H, T, D) -> (B, H, T, D)` with `r ≤ D`

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::{bail, ensure, Result};

/// Which features form a rotation pair (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// Pair `(x_i, x_{i + r/2})`: Hugging Face Llama / NeoX `rotate_half`.
    Halves,
    /// Pair `(x_{2i}, x_{2i+1})`: RoFormer / GPT-J `rotate_every_two`.
    Interleaved,
}

/// Settings of a [`Rope`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Features rotated per head, even and at most the head dimension `D`. Example: `64` (Llama, full rotary at
    /// `D = 64`); `32` (Phi-2: `D = 80`, `partial_rotary_factor = 0.4`).
    pub rotary_dim: usize,
    /// Positions the tables cover; `offset + T` may not exceed it. Example: `2048`.
    pub max_positions: usize,
    /// Base `θ` of the frequencies `θ_i = base^(−2i/r)`. Example: `10000.0` (RoFormer, Llama 2), `500000.0` (Llama 3).
    pub theta: f64,
    /// Pairing convention. Example: [`RopeLayout::Halves`].
    pub layout: RopeLayout,
}

impl RopeConfig {
    /// Full-width Llama-style defaults: base 10000, [`RopeLayout::Halves`].
    pub fn new(rotary_dim: usize, max_positions: usize) -> Self {
        Self { rotary_dim, max_positions, theta: 10000.0, layout: RopeLayout::Halves }
    }

    /// Checks the settings; [`Rope::new`] calls it.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "RopeConfig";
        ensure!(
            self.rotary_dim > 0 && self.rotary_dim.is_multiple_of(2),
            OP,
            "rotary_dim must be even and positive (features rotate in pairs), got {}",
            self.rotary_dim
        );
        ensure!(self.max_positions > 0, OP, "max_positions must be positive, got 0");
        ensure!(
            self.theta.is_finite() && self.theta > 0.0,
            OP,
            "theta must be finite and positive, got {}",
            self.theta
        );
        Ok(())
    }
}

/// Rotary position embedding with precomputed cos/sin tables.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor, // (max_positions, r/2)
    sin: Tensor, // (max_positions, r/2)
    config: RopeConfig,
}

impl Rope {
    /// Builds the cos/sin tables for positions `0..max_positions` in `dtype` on `device`.
    ///
    /// # Shapes
    /// - tables: `(max_positions, r/2)`.
    pub fn new(config: &RopeConfig, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let half = config.rotary_dim / 2;
        // θ_i = base^(−2i/r), i = 0..r/2 (RoFormer eq. 15).
        let inv_freq: Vec<f64> =
            (0..half).map(|i| config.theta.powf(-((2 * i) as f64) / config.rotary_dim as f64)).collect();
        let n = config.max_positions * half;
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for m in 0..config.max_positions {
            for &f in &inv_freq {
                let (s, c) = (m as f64 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        let shape = (config.max_positions, half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?; // (max_positions, r/2)
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?; // (max_positions, r/2)
        Ok(Self { cos, sin, config: config.clone() })
    }

    /// The settings the tables were built from.
    pub fn config(&self) -> &RopeConfig {
        &self.config
    }

    /// `cos(m θ_i)`, `(max_positions, r/2)`.
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }

    /// `sin(m θ_i)`, `(max_positions, r/2)`.
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    /// Rotates the first `r` features of every head of `x` for positions `offset..offset + T`; `offset` is the number
    /// of positions already in the KV cache when decoding. Apply it to queries and keys (never values).
    ///
    /// # Shapes
    /// - `x`: `(B, H, T, D)` -> `(B, H, T, D)`, `D ≥ r`. Works for `Hkv` key heads alike.
    ///
    /// # Errors
    /// `x` not of rank 4, `D < rotary_dim`, or `offset + T > max_positions`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        const OP: &str = "Rope::apply";
        let Ok((b, h, t, d)) = x.dims4() else {
            bail!(OP, "x must be (B, H, T, D), got shape {:?}", x.dims());
        };
        let r = self.config.rotary_dim;
        ensure!(d >= r, OP, "head dimension D = {d} is smaller than rotary_dim = {r} (x shape {:?})", x.dims());
        ensure!(
            offset.checked_add(t).is_some_and(|end| end <= self.config.max_positions),
            OP,
            "positions offset {offset} + T {t} exceed max_positions = {}",
            self.config.max_positions
        );
        let half = r / 2;
        let cos = self.cos.narrow(0, offset, t)?.to_dtype(x.dtype())?; // (T, r/2)
        let sin = self.sin.narrow(0, offset, t)?.to_dtype(x.dtype())?; // (T, r/2)
        let x_rot = x.narrow(D::Minus1, 0, r)?; // (B, H, T, r)

        let rotated = match self.config.layout {
            RopeLayout::Halves => {
                // a_i = x_i, b_i = x_{i + r/2}; the result keeps the halves layout: [a' | b'].
                let a = x_rot.narrow(D::Minus1, 0, half)?; // (B, H, T, r/2)
                let b_ = x_rot.narrow(D::Minus1, half, half)?; // (B, H, T, r/2)
                let a_out = (a.broadcast_mul(&cos)? - b_.broadcast_mul(&sin)?)?; // (B, H, T, r/2)
                let b_out = (a.broadcast_mul(&sin)? + b_.broadcast_mul(&cos)?)?; // (B, H, T, r/2)
                Tensor::cat(&[&a_out, &b_out], D::Minus1)? // (B, H, T, r)
            }
            RopeLayout::Interleaved => {
                // a_i = x_{2i}, b_i = x_{2i+1}: view the pairs as a trailing axis of 2, rotate, and flatten back.
                let pairs = x_rot.reshape((b, h, t, half, 2))?; // (B, H, T, r/2, 2)
                let a = pairs.narrow(D::Minus1, 0, 1)?; // (B, H, T, r/2, 1)
                let b_ = pairs.narrow(D::Minus1, 1, 1)?; // (B, H, T, r/2, 1)
                let cos = cos.unsqueeze(D::Minus1)?; // (T, r/2, 1)
                let sin = sin.unsqueeze(D::Minus1)?; // (T, r/2, 1)
                let a_out = (a.broadcast_mul(&cos)? - b_.broadcast_mul(&sin)?)?; // (B, H, T, r/2, 1)
                let b_out = (a.broadcast_mul(&sin)? + b_.broadcast_mul(&cos)?)?; // (B, H, T, r/2, 1)
                Tensor::cat(&[&a_out, &b_out], D::Minus1)?.reshape((b, h, t, r))?
                // (B, H, T, r)
            }
        };
        if r == d {
            return Ok(rotated);
        }
        let x_pass = x.narrow(D::Minus1, r, d - r)?; // (B, H, T, D - r)
        Ok(Tensor::cat(&[&rotated, &x_pass], D::Minus1)?) // (B, H, T, D)
    }
}
