//! T5 relative position bias — "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
//! (Raffel et al., 2020), section 2.1; bucketing from mesh-tensorflow, as in Hugging Face `T5Attention`.
//!
//! Each head `h` learns one scalar per relative-position bucket, added to the attention logits:
//!
//! ```text
//! score[h, i, j] = q_i · k_j + W[bucket(j − i), h]
//! ```
//!
//! With `n` the distance (`|j − i|` bidirectionally; `max(i − j, 0)` causally, where keys after the query all share
//! bucket 0) and `N` the buckets for one direction (`num_buckets / 2` bidirectionally, the sign taking the other
//! half; `num_buckets` causally), half of them, `n < N/2`, are exact; the rest are logarithmic up to `max_distance`:
//!
//! ```text
//! bucket(n) = n                                                                          if n < N/2
//!           = min(N − 1, N/2 + ⌊ln(n / (N/2)) / ln(max_distance / (N/2)) · (N − N/2)⌋)   otherwise
//! ```
//!
//! The logarithmic branch is evaluated in f32, as mesh-tensorflow (`tf.to_float`) and Hugging Face (`.float()`)
//! do: at T5's defaults the exact value is an integer at `n = 16, 32, 64`, where only the reference's own rounding
//! decides the side. tests/position.rs checks every `|n| ≤ 300` against Hugging Face for five settings.
//!
//! T5 shares one bias across all layers of a stack: the first layer's `SelfAttention` owns
//! `relative_attention_bias.weight` and the others reuse its output. The bias is handed to the attention core as an
//! additive mask tensor.
//!
//! # Shapes
//! - `relative_attention_bias.weight`: `(num_buckets, H)`
//! - [`RelativePositionBias::forward`]: `-> (1, H, T, S)`

use candle_core::{Device, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{ensure, Result};

/// The T5 bucket of `relative_position = key_position − query_position` (HF `T5Attention._relative_position_bucket`).
///
/// The result lies in `0..num_buckets`. Arguments that [`RelativePositionBiasConfig::validate`] rejects (fewer than
/// two exact buckets, `max_distance` not beyond them) still give a value in that range — the logarithmic branch then
/// saturates — rather than panicking.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets;
    let mut bucket = 0usize;
    // 1. Fold the sign: bidirectionally, keys after the query use the upper half of the buckets; causally, keys
    //    after the query (never attended) share distance 0.
    let n: u64 = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.unsigned_abs()
    } else if relative_position < 0 {
        relative_position.unsigned_abs()
    } else {
        0
    };
    // 2. Exact buckets for small distances.
    let max_exact = num_buckets / 2;
    if n < max_exact as u64 {
        return bucket + n as usize;
    }
    // 3. Logarithmic buckets, in f32 to match the reference bit for bit; `as usize` truncates toward zero like
    //    torch's `.to(torch.long)` and saturates (NaN → 0) on degenerate arguments.
    let log_ratio = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let scaled = ((n as f32) / (max_exact as f32)).ln() / log_ratio * ((num_buckets - max_exact) as f32);
    let large = max_exact.saturating_add(scaled as usize).min(num_buckets.saturating_sub(1));
    bucket + large
}

/// Settings of a [`RelativePositionBias`], named as T5's config fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelativePositionBiasConfig {
    /// Heads `H`, one bias per bucket each. Example: `8` (t5-small).
    pub n_heads: usize,
    /// `relative_attention_num_buckets`. Example: `32`.
    pub num_buckets: usize,
    /// `relative_attention_max_distance`: distances at or beyond it share the last bucket. Example: `128`.
    pub max_distance: usize,
    /// `true` for the encoder (keys on both sides), `false` for the causal decoder (`!is_decoder`). Example: `true`.
    pub bidirectional: bool,
}

impl RelativePositionBiasConfig {
    /// T5's defaults (32 buckets, max distance 128) for `n_heads` heads.
    pub fn t5(n_heads: usize, bidirectional: bool) -> Self {
        Self { n_heads, num_buckets: 32, max_distance: 128, bidirectional }
    }

    /// Checks the settings; [`RelativePositionBias::new`] calls it.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "RelativePositionBiasConfig";
        ensure!(self.n_heads > 0, OP, "n_heads must be positive, got 0");
        let per_direction = if self.bidirectional { self.num_buckets / 2 } else { self.num_buckets };
        let max_exact = per_direction / 2;
        ensure!(
            max_exact >= 1,
            OP,
            "num_buckets = {} (bidirectional = {}) leaves no exact bucket; need at least {}",
            self.num_buckets,
            self.bidirectional,
            if self.bidirectional { 4 } else { 2 }
        );
        ensure!(
            self.max_distance > max_exact,
            OP,
            "max_distance = {} must exceed the {max_exact} exact buckets (num_buckets = {}, bidirectional = {})",
            self.max_distance,
            self.num_buckets,
            self.bidirectional
        );
        Ok(())
    }
}

/// A learned per-head bias for each relative-position bucket (T5).
#[derive(Clone, Debug)]
pub struct RelativePositionBias {
    embedding: Embedding, // weight (num_buckets, H)
    config: RelativePositionBiasConfig,
}

impl RelativePositionBias {
    /// Reads or creates `relative_attention_bias.weight` of shape `(num_buckets, H)` under `vb` (pass the
    /// `...SelfAttention` prefix of a T5 checkpoint).
    ///
    /// # Shapes
    /// - `relative_attention_bias.weight`: `(num_buckets, H)`.
    pub fn new(config: &RelativePositionBiasConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let embedding = candle_nn::embedding(config.num_buckets, config.n_heads, vb.pp("relative_attention_bias"))?;
        Ok(Self { embedding, config: config.clone() })
    }

    /// Wraps an existing table (for example a `Var`'s tensor, so gradients reach it).
    ///
    /// # Shapes
    /// - `weight`: `(num_buckets, H)`.
    pub fn from_weight(config: &RelativePositionBiasConfig, weight: Tensor) -> Result<Self> {
        config.validate()?;
        ensure!(
            weight.dims() == [config.num_buckets, config.n_heads],
            "RelativePositionBias::from_weight",
            "weight must be (num_buckets = {}, H = {}), got shape {:?}",
            config.num_buckets,
            config.n_heads,
            weight.dims()
        );
        Ok(Self { embedding: Embedding::new(weight, config.n_heads), config: config.clone() })
    }

    /// The settings.
    pub fn config(&self) -> &RelativePositionBiasConfig {
        &self.config
    }

    /// The bias table, `(num_buckets, H)`.
    pub fn weight(&self) -> &Tensor {
        self.embedding.embeddings()
    }

    /// Bucket ids for queries at positions `offset..offset + t` and keys at `0..s`.
    ///
    /// # Shapes
    /// - returns `(T, S)`, u32, on `device`.
    pub fn buckets(&self, t: usize, s: usize, offset: usize, device: &Device) -> Result<Tensor> {
        const OP: &str = "RelativePositionBias::buckets";
        let fits = |n: usize| i64::try_from(n).is_ok();
        ensure!(
            offset.checked_add(t).is_some_and(fits) && fits(s),
            OP,
            "positions offset {offset} + T {t} or S {s} do not fit in i64"
        );
        let c = &self.config;
        let mut ids = Vec::with_capacity(t * s);
        for i in 0..t {
            let query = (offset + i) as i64;
            for j in 0..s {
                // memory_position − context_position, as HF compute_bias.
                let b = relative_position_bucket(j as i64 - query, c.bidirectional, c.num_buckets, c.max_distance);
                ids.push(b as u32);
            }
        }
        Ok(Tensor::from_vec(ids, (t, s), device)?) // (T, S)
    }

    /// The additive bias for queries at positions `offset..offset + t` and keys at `0..s` (HF
    /// `compute_bias(query_length = t, key_length = s, past_seen_tokens = offset)`). When decoding with a cache
    /// holding `S − T` earlier positions, pass `offset = S − T`. Gradients flow into the table.
    ///
    /// # Shapes
    /// - returns `(1, H, T, S)` in the table's dtype and on its device.
    ///
    /// # Errors
    /// Positions that do not fit in `i64`.
    pub fn forward(&self, t: usize, s: usize, offset: usize) -> Result<Tensor> {
        let weight = self.weight();
        let ids = self.buckets(t, s, offset, weight.device())?; // (T, S)
        let bias = self.embedding.forward(&ids)?; // (T, S, H)
        let bias = bias.permute((2, 0, 1))?.unsqueeze(0)?; // (1, H, T, S)
        Ok(bias.contiguous()?) // (1, H, T, S), row-major for the attention core
    }
}
