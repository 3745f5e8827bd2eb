//! Pooling token states into one vector per sequence over the real (unpadded) tokens: the first token, mean, max,
//! mean scaled by `√n`, position-weighted mean, last token — the modes of sentence-transformers' `Pooling`
//! (Reimers & Gurevych 2019), concatenated when several are chosen. Attention pooling with a learned
//! context vector is [`super::han::AttentionPooling`].
//!
//! # Shapes
//! `hidden (B, T, C)`, `mask (B, T)` (1 = real token) → `(B, k·C)` for `k` modes.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::shape_str;
use crate::{ensure, Result};

/// One pooling mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolingMode {
    /// The first token's state (`[CLS]`).
    Cls,
    /// The elementwise maximum over real tokens.
    Max,
    /// The mean over real tokens.
    Mean,
    /// The sum over real tokens divided by `√n`.
    MeanSqrtLen,
    /// The mean weighted by position `1, 2, …, T` (later tokens count more: SGPT).
    WeightedMean,
    /// The last real token's state (causal models; left or right padding).
    LastToken,
}

impl PoolingMode {
    /// The mode as sentence-transformers names it (`cls`, `max`, `mean`, `mean_sqrt_len_tokens`, `weightedmean`,
    /// `lasttoken`).
    pub fn from_st_name(name: &str) -> Option<Self> {
        Some(match name {
            "cls" => PoolingMode::Cls,
            "max" => PoolingMode::Max,
            "mean" => PoolingMode::Mean,
            "mean_sqrt_len_tokens" => PoolingMode::MeanSqrtLen,
            "weightedmean" => PoolingMode::WeightedMean,
            "lasttoken" => PoolingMode::LastToken,
            _ => return None,
        })
    }
}

/// Each of `modes`, pooled over the real tokens and concatenated in the order given (sentence-transformers'
/// rule). Left and right padding both work: `Cls` is the first real token, `WeightedMean` weighs a row's first real
/// token 1, `LastToken` is the last real one. A row with no real token pools to zeros.
///
/// # Errors
/// `hidden` not `(B, T, C)`, `mask` not `(B, T)`, no mode.
pub fn pool(hidden: &Tensor, mask: &Tensor, modes: &[PoolingMode]) -> Result<Tensor> {
    const OP: &str = "pool";
    let Ok((b, t, c)) = hidden.dims3() else { crate::bail!(OP, "hidden must be (B, T, C), got {}", shape_str(hidden)) };
    ensure!(mask.dims() == [b, t], OP, "mask {} must be (B, T) = ({b}, {t})", shape_str(mask));
    ensure!(!modes.is_empty(), OP, "choose at least one pooling mode");
    let dev = hidden.device();
    let m = mask.ne(0u32)?.to_dtype(hidden.dtype())?.unsqueeze(2)?; // (B, T, 1)
    let n = m.sum(1)?; // (B, 1)
    let any = n.gt(0.0)?.to_dtype(hidden.dtype())?; // (B, 1): 0 for a row with no real token
    let sum = hidden.broadcast_mul(&m)?.sum(1)?; // (B, C)
    let pos = Tensor::arange(1u32, t as u32 + 1, dev)?.to_dtype(DType::F32)?.reshape((1, t))?; // (1, T): 1..=T
    let m32 = m.squeeze(2)?.to_dtype(DType::F32)?; // (B, T)
                                                   // First and last real positions: the largest of (T+1−pos)·m and of pos·m.
    let first = m32.broadcast_mul(&pos.affine(-1.0, t as f64 + 1.0)?)?.argmax(D::Minus1)?; // (B) u32
    let last = m32.broadcast_mul(&pos)?.argmax(D::Minus1)?; // (B) u32
    let row_at = |idx: &Tensor| -> Result<Tensor> {
        let idx = idx.reshape((b, 1, 1))?.broadcast_as((b, 1, c))?.contiguous()?; // (B, 1, C)
        Ok(hidden.gather(&idx, 1)?.squeeze(1)?.broadcast_mul(&any)?) // (B, C)
    };
    let mut parts = Vec::with_capacity(modes.len());
    for mode in modes {
        parts.push(match mode {
            PoolingMode::Cls => row_at(&first)?,
            PoolingMode::Max => {
                let low = neg_inf_where_zero(&m)?; // (B, T, 1): 0 on real tokens, −∞ on padding
                let max = hidden.broadcast_add(&low)?.max(1)?; // (B, C)
                                                               // A row of padding only would be −∞; it is defined as zeros.
                any.ne(0.0)?.broadcast_as(max.shape())?.where_cond(&max, &max.zeros_like()?)?
            }
            PoolingMode::Mean => sum.broadcast_div(&n.clamp(1e-9, f64::INFINITY)?)?,
            PoolingMode::MeanSqrtLen => sum.broadcast_div(&n.clamp(1e-9, f64::INFINITY)?.sqrt()?)?,
            PoolingMode::WeightedMean => {
                // Weight 1 on the first real token, 2 on the next, … whatever the padding side.
                let shift = first.to_dtype(DType::F32)?.unsqueeze(1)?; // (B, 1)
                let w = pos.broadcast_sub(&shift)?.mul(&m32)?.to_dtype(hidden.dtype())?.unsqueeze(2)?; // (B, T, 1)
                hidden.broadcast_mul(&w)?.sum(1)?.broadcast_div(&w.sum(1)?.clamp(1e-9, f64::INFINITY)?)?
            }
            PoolingMode::LastToken => row_at(&last)?,
        });
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// 0 where `m` is 1 and −∞ where it is 0, shaped and typed like `m`.
fn neg_inf_where_zero(m: &Tensor) -> Result<Tensor> {
    let inf = Tensor::full(f32::NEG_INFINITY, m.shape(), m.device())?.to_dtype(m.dtype())?;
    Ok(m.ne(0.0)?.where_cond(&m.zeros_like()?, &inf)?)
}

/// Rows scaled to unit L2 norm (a zero row stays zero, as `torch.nn.functional.normalize` leaves it).
///
/// # Shapes
/// `x (B, D) → (B, D)`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}
