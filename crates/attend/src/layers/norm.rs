//! Normalisation layers on the fused ops of [`crate::ops::norm`] (hand-written backward; candle-nn's `LayerNorm` and
//! `RmsNorm` would detach the gradient on a training path).
//!
//! - [`Norm::Layer`]: `(x − μ)/√(σ² + eps) ⊙ weight + bias` (Ba et al. 2016; BERT, GPT, ViT).
//! - [`Norm::Rms`]: `x/√(mean(x²) + eps) ⊙ weight` (Zhang & Sennrich 2019; T5 calls it `T5LayerNorm`).
//!
//! # Parameters
//! `weight (C)` (initialised to ones), `bias (C)` (zeros; layer norm with a bias only).
//!
//! # Shapes
//! `x (…, C) → (…, C)`.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ops::{layer_norm, rms_norm};
use crate::Result;

/// Which normalisation and its epsilon.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NormConfig {
    /// Layer norm; `bias = false` drops the shift (as some recent models do).
    Layer { eps: f64, bias: bool },
    /// RMS norm (no shift).
    Rms { eps: f64 },
}

impl NormConfig {
    /// Layer norm with a bias and `eps` (PyTorch's default is `1e-5`, BERT's `1e-12`).
    pub fn layer(eps: f64) -> Self {
        NormConfig::Layer { eps, bias: true }
    }
}

/// A normalisation layer with its parameters; see the module docs.
#[derive(Clone, Debug)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    config: NormConfig,
}

impl Norm {
    /// Loads (or creates) `weight` and, for a layer norm with a bias, `bias` of width `c` under `vb`.
    pub fn new(c: usize, config: NormConfig, vb: VarBuilder) -> Result<Self> {
        let eps = match config {
            NormConfig::Layer { eps, .. } | NormConfig::Rms { eps } => eps,
        };
        crate::ensure!(eps.is_finite() && eps >= 0.0, "Norm", "eps must be finite and ≥ 0, got {eps}");
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = match config {
            NormConfig::Layer { bias: true, .. } => Some(vb.get_with_hints(c, "bias", Init::Const(0.0))?),
            _ => None,
        };
        Ok(Self { weight, bias, config })
    }

    pub fn config(&self) -> NormConfig {
        self.config
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x (…, C) → (…, C)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.config {
            NormConfig::Layer { eps, .. } => layer_norm(x, Some(&self.weight), self.bias.as_ref(), eps),
            NormConfig::Rms { eps } => rms_norm(x, Some(&self.weight), eps),
        }
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(Norm::forward(self, x)?)
    }
}
