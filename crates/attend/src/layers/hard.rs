//! Hard attention: attend to one place (or `k`) instead of a weighted blend of all of them.
//!
//! - [`top_k_attention`]: deterministic; the `k` best scores are kept and normalised, the rest hidden (`k = 1` is
//!   argmax attention). The choice is not differentiable; the weights of the chosen keys are.
//! - [`sample_attention`]: stochastic; one key per query drawn from the softmax distribution, the context is that
//!   key's value, and the log-probability of the draw is returned for the score-function (REINFORCE) estimator
//!   [`reinforce`], which trains the scores with a learned baseline (Williams 1992; Xu et al. 2015 §4.1).
//! - [`gumbel_softmax`]: the differentiable alternative; Gumbel noise, a temperature, and with `hard` a one-hot
//!   forward whose gradient is the soft one's (straight-through; Jang et al. 2017).
//!
//! # Shapes
//! - `scores`: `(B, T, S)`, `values`: `(B, S, Dv)` → context `(B, T, Dv)`, weights `(B, T, S)`; samples `(B, T)`
//!
//! ```
//! use attend::attention::Mask;
//! use attend::layers::hard::{gumbel_softmax, sample_attention, top_k_attention};
//! use candle_core::{Device, Tensor};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let scores = Tensor::new(&[[[0.1f32, 2.0, 0.3, 1.9]]], &dev)?; // (B, T, S) = (1, 1, 4)
//! let values = Tensor::randn(0f32, 1., (1, 4, 3), &dev)?;
//! let top2 = top_k_attention(&scores, &values, 2, &Mask::none())?;
//! assert_eq!(top2.weights.to_vec3::<f32>()?[0][0].iter().filter(|&&w| w > 0.0).count(), 2);
//! let drawn = sample_attention(&scores, &values, &Mask::none(), 7)?;
//! assert_eq!(drawn.choice.dims(), &[1, 1]);
//! let y = gumbel_softmax(&scores, 0.5, true, 7)?; // one-hot forward, soft gradient
//! assert_eq!(y.sum_all()?.to_scalar::<f32>()?, 1.0);
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor, D};

use crate::attention::classic::{attend_scores_with, normalize_scores, ClassicOptions, ClassicOutput};
use crate::attention::{Mask, MaskTensor};
use crate::error::shape_str;
use crate::rng::sample;
use crate::{ensure, ops, Result};

/// Keeps the `k` highest scores of each query (ties: the earlier key), normalised by a softmax over them.
pub fn top_k_attention(scores: &Tensor, values: &Tensor, k: usize, mask: &Mask) -> Result<ClassicOutput> {
    ensure!(scores.rank() == 3, "top-k attention", "expected scores (B, T, S), got {}", shape_str(scores));
    let (b, t, s) = scores.dims3()?;
    ensure!(k > 0, "top-k attention", "k must be positive");
    // The ranking is taken after the mask, so a hidden key is never chosen.
    let visible = normalize_scores(scores, mask, ClassicOptions::default())?; // monotone in the score; 0 if hidden
    let v: Vec<f32> = visible.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut keep = vec![0u8; b * t * s];
    for (row, out) in v.chunks_exact(s).zip(keep.chunks_exact_mut(s)) {
        let mut order: Vec<usize> = (0..s).filter(|&j| row[j] > 0.0).collect();
        order.sort_by(|&x, &y| row[y].total_cmp(&row[x]).then(x.cmp(&y)));
        order.iter().take(k).for_each(|&j| out[j] = 1);
    }
    let keep = Tensor::from_vec(keep, (b, 1, t, s), scores.device())?;
    let mask = mask.clone().with_tensor(MaskTensor::Keep(keep));
    attend_scores_with(scores, values, &mask, ClassicOptions::default())
}

/// One key per query drawn from the attention distribution.
#[derive(Clone, Debug)]
pub struct HardSample {
    /// `(B, T, Dv)`: the chosen key's value.
    pub context: Tensor,
    /// `(B, T, S)`: the distribution drawn from.
    pub weights: Tensor,
    /// `(B, T)` u32: the chosen key.
    pub choice: Tensor,
    /// `(B, T)`: `log p(choice)`, differentiable in the scores (for [`reinforce`]).
    pub log_prob: Tensor,
}

/// Samples one key per query from `softmax(mask(scores))` with the counter-based generator at `seed` (inverse CDF);
/// a query that sees no key gets key 0 with a zero context and a log-probability of 0.
pub fn sample_attention(scores: &Tensor, values: &Tensor, mask: &Mask, seed: u64) -> Result<HardSample> {
    let weights = normalize_scores(scores, mask, ClassicOptions::default())?; // (B, T, S)
    let (b, t, s) = weights.dims3()?;
    let p: Vec<f64> = weights.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let u: Vec<f64> = sample::uniform(seed, b * t, DType::F64, scores.device())?.to_vec1()?;
    let mut choice = vec![0u32; b * t];
    for (r, c) in choice.iter_mut().enumerate() {
        let row = &p[r * s..(r + 1) * s];
        let mut acc = 0.0;
        // The last visible key absorbs rounding, so a draw never falls past the end.
        let last = row.iter().rposition(|&x| x > 0.0).unwrap_or(0);
        *c = last as u32;
        for (j, &x) in row.iter().enumerate() {
            acc += x;
            if u[r] < acc && x > 0.0 {
                *c = j as u32;
                break;
            }
        }
    }
    let choice = Tensor::from_vec(choice, (b, t), scores.device())?;
    let idx = choice.unsqueeze(2)?; // (B, T, 1)
    let picked = weights.contiguous()?.gather(&idx, 2)?.squeeze(2)?; // (B, T)
                                                                     // log p of a dead row (p = 0) is defined as 0: nothing was chosen, nothing to reinforce.
    let alive = picked.gt(0.0)?;
    let log_prob = alive.where_cond(&alive.where_cond(&picked, &picked.ones_like()?)?.log()?, &picked.zeros_like()?)?;
    let onehot = Tensor::zeros((b, t, s), values.dtype(), values.device())?.scatter_add(
        &idx,
        &alive.unsqueeze(2)?.to_dtype(values.dtype())?,
        2,
    )?;
    let context = onehot.matmul(&values.contiguous()?)?; // (B, T, Dv)
    Ok(HardSample { context, weights, choice, log_prob })
}

/// The two losses of the score-function estimator.
#[derive(Clone, Debug)]
pub struct ReinforceLoss {
    /// `−mean((R − b) · Σ log π)`: its gradient is the REINFORCE estimate of `−∇ E[R]`; the advantage `R − b` is a
    /// constant (detached).
    pub policy: Tensor,
    /// `mean((R − b)²)`: trains the baseline to predict the reward.
    pub baseline: Tensor,
}

/// REINFORCE with a baseline: `log_prob` `(B, N)` of the N draws of each episode, `reward` `(B)`, `baseline`
/// `(B)` or `(B, N)` (a learned prediction of the reward; zeros for none). Subtracting the baseline keeps the
/// estimate unbiased (its expected gradient is zero) and lowers its variance.
pub fn reinforce(log_prob: &Tensor, reward: &Tensor, baseline: &Tensor) -> Result<ReinforceLoss> {
    const OP: &str = "reinforce";
    ensure!(log_prob.rank() == 2, OP, "expected log_prob (B, N), got {}", shape_str(log_prob));
    let (b, n) = log_prob.dims2()?;
    ensure!(reward.dims() == [b], OP, "reward {} must be (B) = ({b})", shape_str(reward));
    let base = match baseline.rank() {
        1 => baseline.unsqueeze(1)?.broadcast_as((b, n))?,
        _ => baseline.clone(),
    };
    ensure!(base.dims() == [b, n], OP, "baseline {} must be (B) or (B, N) = ({b}, {n})", shape_str(baseline));
    let r = reward.unsqueeze(1)?.broadcast_as((b, n))?;
    let advantage = (&r - &base)?.detach();
    let policy = (advantage * log_prob)?.sum(1)?.mean(0)?.neg()?;
    let baseline = (r - base)?.sqr()?.mean_all()?;
    Ok(ReinforceLoss { policy, baseline })
}

/// Gumbel-softmax over the last axis with temperature `tau` (noise from `seed`). With `hard`, the forward value is
/// the one-hot of the argmax and the gradient that of the soft sample (straight-through).
pub fn gumbel_softmax(logits: &Tensor, tau: f64, hard: bool, seed: u64) -> Result<Tensor> {
    ensure!(tau > 0.0 && tau.is_finite(), "gumbel softmax", "the temperature must be positive, got {tau}");
    let g = sample::gumbel(seed, logits.shape(), logits.dtype(), logits.device())?;
    let soft = ops::softmax(&((logits + g)? / tau)?, None)?;
    if !hard {
        return Ok(soft);
    }
    let idx = soft.argmax_keepdim(D::Minus1)?;
    let ones = Tensor::ones(idx.shape(), soft.dtype(), soft.device())?;
    let onehot = soft.zeros_like()?.scatter_add(&idx, &ones, D::Minus1)?;
    Ok(((onehot - &soft)?.detach() + &soft)?)
}
