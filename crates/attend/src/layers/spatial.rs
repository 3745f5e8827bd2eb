//! Spatial attention over an encoder's feature grid, for image captioning ("Show, Attend and Tell", Xu et al. 2015):
//! at each decoding step, weights over the `L = H·W` regions from the previous decoder state.
//!
//! `e_l = f_att(a_l, h) = w_fᵀ relu(W_e a_l + b_e + W_d h + b_d) + b_f`, `α = softmax_l(e)`, the gating scalar
//! `β = σ(W_β h + b_β)` (one per feature channel, as the reference implementations do), `z = β ⊙ Σ_l α_l a_l`.
//! Over a whole caption the doubly-stochastic regulariser [`doubly_stochastic_penalty`] pushes every region to be
//! attended about once in total.
//!
//! Parameter names are those of the widely used PyTorch implementation (`encoder_att`, `decoder_att`, `full_att`,
//! `f_beta`).
//!
//! # Shapes
//! - `features`: `(B, L, E)`, `hidden`: `(B, Dd)` → `context (B, E)`, `alpha (B, L)`, `beta (B, E)`
//!
//! ```
//! use attend::layers::spatial::{doubly_stochastic_penalty, SpatialAttention, SpatialConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = SpatialConfig { encoder_dim: 8, decoder_dim: 6, attention_dim: 5 };
//! let att = SpatialAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let grid = Tensor::randn(0f32, 1., (2, 3, 3, 8), &dev)?.reshape((2, 9, 8))?; // a 3×3 grid
//! let out = att.forward(&grid, &Tensor::randn(0f32, 1., (2, 6), &dev)?)?;
//! assert_eq!((out.context.dims(), out.alpha.dims()), (&[2, 8][..], &[2, 9][..]));
//! let alphas = Tensor::stack(&[&out.alpha, &out.alpha], 1)?; // (B, T, L) over a 2-word caption
//! assert_eq!(doubly_stochastic_penalty(&alphas)?.dims(), &[2]);
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::{linear, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::attention::classic::{attend_scores, Normalizer};
use crate::attention::Mask;
use crate::error::shape_str;
use crate::{ensure, ops, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpatialConfig {
    /// Channels `E` of a region's feature (2048 for a ResNet-101 grid).
    pub encoder_dim: usize,
    /// Decoder state width `Dd`.
    pub decoder_dim: usize,
    /// Width `A` of `f_att`'s hidden layer.
    pub attention_dim: usize,
}

/// What [`SpatialAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct SpatialOutput {
    /// `(B, E)`: the gated context `z`.
    pub context: Tensor,
    /// `(B, L)`
    pub alpha: Tensor,
    /// `(B, E)`
    pub beta: Tensor,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct SpatialAttention {
    encoder_att: Linear,
    decoder_att: Linear,
    full_att: Linear,
    f_beta: Linear,
    config: SpatialConfig,
}

impl SpatialAttention {
    const OP: &'static str = "spatial attention";

    pub fn new(config: SpatialConfig, vb: VarBuilder) -> Result<Self> {
        let SpatialConfig { encoder_dim: e, decoder_dim: d, attention_dim: a } = config;
        ensure!(e > 0 && d > 0 && a > 0, Self::OP, "widths must be positive, got {config:?}");
        Ok(Self {
            encoder_att: linear(e, a, vb.pp("encoder_att"))?,
            decoder_att: linear(d, a, vb.pp("decoder_att"))?,
            full_att: linear(a, 1, vb.pp("full_att"))?,
            f_beta: linear(d, e, vb.pp("f_beta"))?,
            config,
        })
    }

    pub fn config(&self) -> &SpatialConfig {
        &self.config
    }

    /// `W_e a_l + b_e` for every region: the part of the score that does not depend on the step; compute it once
    /// per image and pass it to [`Self::forward_projected`] at every step.
    pub fn project_features(&self, features: &Tensor) -> Result<Tensor> {
        let e = self.config.encoder_dim;
        ensure!(
            features.rank() == 3 && features.dim(2)? == e,
            Self::OP,
            "expected features (B, L, E = {e}), got {}",
            shape_str(features)
        );
        Ok(self.encoder_att.forward(features)?) // (B, L, A)
    }

    pub fn forward(&self, features: &Tensor, hidden: &Tensor) -> Result<SpatialOutput> {
        let projected = self.project_features(features)?;
        self.forward_projected(features, &projected, hidden)
    }

    /// One step with features already projected by [`Self::project_features`].
    pub fn forward_projected(&self, features: &Tensor, projected: &Tensor, hidden: &Tensor) -> Result<SpatialOutput> {
        let d = self.config.decoder_dim;
        let b = features.dim(0)?;
        ensure!(
            hidden.dims() == [b, d],
            Self::OP,
            "hidden {} does not fit: expected (B, Dd) = ({b}, {d}) for features {}",
            shape_str(hidden),
            shape_str(features)
        );
        let att2 = self.decoder_att.forward(hidden)?.unsqueeze(1)?; // (B, 1, A)
        let scores = self.full_att.forward(&projected.broadcast_add(&att2)?.relu()?)?; // (B, L, 1)
        let scores = scores.transpose(1, 2)?; // (B, 1, L): the decoder state is the one query
        let out = attend_scores(&scores, features, &Mask::none(), Normalizer::Softmax)?;
        let beta = ops::sigmoid(&self.f_beta.forward(hidden)?)?; // (B, E)
        Ok(SpatialOutput { context: (out.context.squeeze(1)? * &beta)?, alpha: out.weights.squeeze(1)?, beta })
    }
}

/// The doubly-stochastic regulariser of Show, Attend and Tell: `Σ_l (1 − Σ_t α_tl)²` per caption. The weights of
/// each step already sum to 1 over regions; this pushes every region to be attended about once over the caption.
/// Multiply by λ (the paper's `alpha_c`, e.g. 1) and average over the batch in the loss.
///
/// # Shapes
/// - `alphas`: `(B, T, L)` (every step's `alpha`) → `(B)`
pub fn doubly_stochastic_penalty(alphas: &Tensor) -> Result<Tensor> {
    ensure!(alphas.rank() == 3, "doubly-stochastic penalty", "expected alphas (B, T, L), got {}", shape_str(alphas));
    Ok(alphas.sum(1)?.affine(-1.0, 1.0)?.sqr()?.sum(1)?)
}
