//! Target attention over a user's behaviour history (Deep Interest Network, Zhou et al. 2018): how much each past
//! item says about interest in the candidate item.
//!
//! The activation unit scores item `e_i` against the target `e_t` with an MLP on `[e_i, e_t, e_i − e_t, e_i ⊙ e_t]`;
//! the weights are **not** normalised by a softmax, so the pooled vector keeps the intensity of interest (the
//! paper's point, §4.3): `pooled = Σ_i w_i e_i`. The softmax of the scaled dot `e_tᵀ e_i / √C` is the option
//! [`DinScore::ScaledDot`]. Padded history entries get weight 0.
//!
//! Parameters: `mlp.{k}.weight`, `mlp.{k}.bias` for k = 0, 1, …, the last of width 1.
//!
//! # Shapes
//! - `history`: `(B, S, C)`, `target`: `(B, C)` → `pooled (B, C)`, `weights (B, S)`
//!
//! ```
//! use attend::layers::din::{Activation, DinAttention, DinScore};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let score = DinScore::Mlp { hidden: vec![36], activation: Activation::Sigmoid };
//! let din = DinAttention::new(8, score, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let hist = Tensor::randn(0f32, 1., (2, 5, 8), &dev)?;
//! let out = din.forward(&hist, &Tensor::randn(0f32, 1., (2, 8), &dev)?, Some(&[5, 2]))?;
//! assert_eq!(out.weights.get(1)?.to_vec1::<f32>()?[2..], [0.0, 0.0, 0.0]);
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::{linear, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::attention::classic::{attend_scores, Normalizer};
use crate::attention::Mask;
use crate::error::shape_str;
use crate::{bail, ensure, ops, Result};

/// The activation between the MLP's layers (the paper uses PReLU or Dice; sigmoid is the reference code's default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Sigmoid,
    Relu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "sigmoid" => Self::Sigmoid,
            "relu" => Self::Relu,
            _ => bail!("din", "unknown activation `{name}`; expected sigmoid or relu"),
        })
    }
}

/// How items are scored against the target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DinScore {
    /// The activation unit, hidden widths e.g. `[36]` (the paper's 80-40 on real data), unnormalised weights.
    Mlp { hidden: Vec<usize>, activation: Activation },
    /// `softmax(e_tᵀ e_i / √C)`, no parameters.
    ScaledDot,
}

/// What [`DinAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct DinOutput {
    /// `(B, C)`
    pub pooled: Tensor,
    /// `(B, S)`
    pub weights: Tensor,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct DinAttention {
    mlp: Vec<Linear>,
    activation: Activation,
    dim: usize,
}

impl DinAttention {
    const OP: &'static str = "din attention";

    pub fn new(dim: usize, score: DinScore, vb: VarBuilder) -> Result<Self> {
        ensure!(dim > 0, Self::OP, "the item width must be positive");
        let (mlp, activation) = match score {
            DinScore::ScaledDot => (Vec::new(), Activation::Sigmoid),
            DinScore::Mlp { hidden, activation } => {
                let widths: Vec<usize> = std::iter::once(4 * dim).chain(hidden).chain(std::iter::once(1)).collect();
                ensure!(widths.iter().all(|&w| w > 0), Self::OP, "hidden widths must be positive, got {widths:?}");
                let layers = widths
                    .windows(2)
                    .enumerate()
                    .map(|(k, w)| linear(w[0], w[1], vb.pp(format!("mlp.{k}"))))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (layers, activation)
            }
        };
        Ok(Self { mlp, activation, dim })
    }

    /// Unnormalised scores `(B, S)`.
    fn scores(&self, history: &Tensor, target: &Tensor) -> Result<Tensor> {
        let (b, s, c) = history.dims3()?;
        let et = target.unsqueeze(1)?; // (B, 1, C)
        if self.mlp.is_empty() {
            return Ok((history.matmul(&et.transpose(1, 2)?)?.squeeze(2)? / (c as f64).sqrt())?);
        }
        let et = et.broadcast_as((b, s, c))?;
        let mut h = Tensor::cat(&[history, &et, &(history - &et)?, &(history * &et)?], 2)?; // (B, S, 4C)
        let last = self.mlp.len() - 1;
        for (k, layer) in self.mlp.iter().enumerate() {
            h = layer.forward(&h)?;
            if k < last {
                h = match self.activation {
                    Activation::Sigmoid => ops::sigmoid(&h)?,
                    Activation::Relu => h.relu()?,
                };
            }
        }
        Ok(h.squeeze(2)?) // (B, S)
    }

    /// Pools `history` for `target`; `lengths` (one per user) hides padded history.
    pub fn forward(&self, history: &Tensor, target: &Tensor, lengths: Option<&[usize]>) -> Result<DinOutput> {
        let c = self.dim;
        ensure!(
            history.rank() == 3 && history.dim(2)? == c && target.dims() == [history.dim(0)?, c],
            Self::OP,
            "expected history (B, S, C = {c}) and target (B, C), got history {} and target {}",
            shape_str(history),
            shape_str(target)
        );
        let scores = self.scores(history, target)?.unsqueeze(1)?; // (B, 1, S): the target is the one query
        let mask = match lengths {
            Some(l) => Mask::none().with_key_lengths(l.to_vec()),
            None => Mask::none(),
        };
        let normalizer = if self.mlp.is_empty() { Normalizer::Softmax } else { Normalizer::None };
        let out = attend_scores(&scores, history, &mask, normalizer)?;
        Ok(DinOutput { pooled: out.context.squeeze(1)?, weights: out.weights.squeeze(1)? })
    }
}
