//! The classic attention path: **scores → mask → normalise → weighted sum**, for every score function
//! ([`Score`]: dot, scaled dot, general, additive, a user's own) and every normaliser ([`Normalizer`]: softmax,
//! sigmoid, sparsemax, 1.5-entmax).
//!
//! The Transformer core ([`super::attention_with`]) fuses the dot-product score into its kernel; the classic
//! mechanisms (Bahdanau, Luong, HAN, co-attention, spatial and recommender attention) compute their scores with a
//! parameterised function first, and come here with them. The typed [`Mask`] applies as it does in the core (with one
//! head): soft-cap, then ALiBi, then the structural rules and the mask tensor replace hidden scores with −∞. A query
//! that sees no key gets zero weights and a zero context.
//!
//! # Shapes
//! - `scores`: `(B, T, S)`, `values`: `(B, S, Dv)`
//! - weights `(B, T, S)`, context `(B, T, Dv)`
//!
//! ```
//! use attend::attention::classic::{attend_scores, Normalizer};
//! use attend::attention::Mask;
//! use candle_core::{Device, Tensor};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let scores = Tensor::new(&[[[2.0f32, 1.9, -1.0], [0.0, 0.0, 5.0]]], &dev)?; // (B, T, S) = (1, 2, 3)
//! let values = Tensor::randn(0f32, 1., (1, 3, 4), &dev)?; // (B, S, Dv)
//! let out = attend_scores(&scores, &values, &Mask::none(), Normalizer::Sparsemax)?;
//! let w = out.weights.to_vec3::<f32>()?;
//! assert_eq!(w[0][0][2], 0.0); // sparsemax gives the poor score exactly zero weight
//! assert_eq!(w[0][1], [0.0, 0.0, 1.0]); // and a clear winner all of it (hard attention)
//! assert_eq!(out.context.dims(), &[1, 2, 4]); // (B, T, Dv)
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::mask::{Mask, MaskTensor};
use super::score::Score;
use crate::error::shape_str;
use crate::{bail, ensure, ops, Result};

/// How scores become weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalizer {
    /// `exp(s) / Σ exp(s)`: every visible key gets a positive weight.
    #[default]
    Softmax,
    /// `σ(s)` for each key on its own: weights in [0, 1] with no sum constraint (several keys, or none, may be fully
    /// attended).
    Sigmoid,
    /// `[s − τ]₊` with `Σ = 1` (Martins & Astudillo 2016): exact zeros for poor scores.
    Sparsemax,
    /// `[s/2 − τ]₊²` with `Σ = 1` (Peters et al. 2019): sparse, smoother than sparsemax.
    Entmax15,
    /// The scores themselves on visible keys, 0 on hidden ones: for mechanisms whose score already is the weight
    /// (Deep Interest Network keeps the intensity of interest that a softmax would normalise away).
    None,
}

impl Normalizer {
    pub const NAMES: [&'static str; 5] = ["softmax", "sigmoid", "sparsemax", "entmax15", "none"];

    /// The normaliser called `name` (one of [`Self::NAMES`]).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "softmax" => Self::Softmax,
            "sigmoid" => Self::Sigmoid,
            "sparsemax" => Self::Sparsemax,
            "entmax15" => Self::Entmax15,
            "none" => Self::None,
            _ => bail!("normalizer", "unknown normalizer `{name}`; expected one of {}", Self::NAMES.join(", ")),
        })
    }

    /// Normalises `scores` over the last axis with the fused ops; `mask` (broadcast to the scores) hides entries.
    pub fn apply(self, scores: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
        match self {
            Self::Softmax => ops::softmax(scores, mask),
            Self::Sigmoid => sigmoid(scores, mask),
            Self::Sparsemax => ops::sparsemax(scores, mask),
            Self::Entmax15 => ops::entmax15(scores, mask),
            Self::None => identity(scores, mask),
        }
    }

    /// [`Self::apply`] with the composed reference twins.
    pub fn apply_reference(self, scores: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
        match self {
            Self::Softmax => ops::softmax_reference(scores, mask),
            Self::Sigmoid => sigmoid(scores, mask),
            Self::Sparsemax => ops::sparsemax_reference(scores, mask),
            Self::Entmax15 => ops::entmax15_reference(scores, mask),
            Self::None => identity(scores, mask),
        }
    }
}

/// `σ(s)` on visible entries, 0 on hidden ones (a hidden −∞ gives exactly 0).
fn sigmoid(scores: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
    match mask {
        None => ops::sigmoid(scores),
        Some(m) => ops::sigmoid(&m.apply_to(scores, "sigmoid")?),
    }
}

/// The scores on visible entries, 0 on hidden ones. Hidden entries arrive as −∞ (the structural masks replace them
/// before any normaliser) or are hidden by `mask`; `where` keeps them out, gradient included.
fn identity(scores: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
    let masked = match mask {
        None => scores.clone(),
        Some(m) => m.apply_to(scores, "identity normalizer")?,
    };
    let hidden = masked.eq(f64::NEG_INFINITY)?;
    Ok(hidden.where_cond(&masked.zeros_like()?, &masked)?)
}

/// What the classic path returns.
#[derive(Clone, Debug)]
pub struct ClassicOutput {
    /// `(B, T, Dv)`: the weighted sum of the values.
    pub context: Tensor,
    /// `(B, T, S)`: the normalised weights; they carry gradients (for attention supervision, coverage or
    /// regularisers on the weights).
    pub weights: Tensor,
}

/// Options of the classic path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassicOptions {
    pub normalizer: Normalizer,
    /// Use the composed reference twins of the normalisers (the oracle of the fused ones).
    pub reference: bool,
}

/// The weights of `scores` `(B, T, S)` under `mask`: soft-cap, ALiBi and structural rules as in the core, the mask
/// tensor inside the normaliser.
pub fn normalize_scores(scores: &Tensor, mask: &Mask, opts: ClassicOptions) -> Result<Tensor> {
    const OP: &str = "classic attention";
    ensure!(scores.rank() == 3, OP, "expected scores (B, T, S), got {}", shape_str(scores));
    let (b, t, s) = scores.dims3()?;
    let resolved = mask.resolve(b, 1, t, s)?;
    // One head: the core's mask conventions are written for (B, H, T, S).
    let s4 = super::core::mod_and_mask(scores.unsqueeze(1)?, mask, &resolved, b)?; // (B, 1, T, S)
    let w = if opts.reference {
        opts.normalizer.apply_reference(&s4, mask.tensor())?
    } else {
        opts.normalizer.apply(&s4, mask.tensor())?
    };
    Ok(w.squeeze(1)?) // (B, T, S)
}

/// Scores → mask → normalise → weighted sum.
///
/// # Shapes
/// - `scores`: `(B, T, S)`, `values`: `(B, S, Dv)` → context `(B, T, Dv)`, weights `(B, T, S)`
///
/// # Errors
/// When the ranks, batch sizes or key counts disagree (the message names both shapes), or the mask does not fit.
pub fn attend_scores(scores: &Tensor, values: &Tensor, mask: &Mask, normalizer: Normalizer) -> Result<ClassicOutput> {
    attend_scores_with(scores, values, mask, ClassicOptions { normalizer, reference: false })
}

/// [`attend_scores`] with [`ClassicOptions`].
pub fn attend_scores_with(
    scores: &Tensor,
    values: &Tensor,
    mask: &Mask,
    opts: ClassicOptions,
) -> Result<ClassicOutput> {
    const OP: &str = "classic attention";
    let (ss, vs) = (shape_str(scores), shape_str(values));
    ensure!(
        scores.rank() == 3 && values.rank() == 3,
        OP,
        "expected scores (B, T, S) and values (B, S, Dv), got scores {ss} and values {vs}"
    );
    ensure!(
        scores.dim(0)? == values.dim(0)? && scores.dim(2)? == values.dim(1)?,
        OP,
        "scores {ss} and values {vs} disagree on B or S"
    );
    let weights = normalize_scores(scores, mask, opts)?;
    let context = weights.to_dtype(values.dtype())?.matmul(&values.contiguous()?)?; // (B, T, Dv)
    Ok(ClassicOutput { context, weights })
}

/// The whole classic path from queries, keys and values with any score function.
///
/// # Shapes
/// - `q`: `(B, T, Dq)`, `k`: `(B, S, Dk)`, `v`: `(B, S, Dv)` → context `(B, T, Dv)`, weights `(B, T, S)`
pub fn classic_attention(
    score: &dyn Score,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    opts: ClassicOptions,
) -> Result<ClassicOutput> {
    let scores = score.score(q, k)?;
    attend_scores_with(&scores, v, mask, opts)
}
