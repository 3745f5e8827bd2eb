//! A fully connected layer, `y = x Wᵀ + b`, on [`crate::ops::linear`] (whose bias gradient is one matrix product
//! rather than candle's strided reduction). Names and initialisation are `nn.Linear`'s (and candle-nn's): `weight
//! (N, K)` and `bias (N)`, uniform in `±1/√K`, so checkpoints move between them unchanged.
//!
//! # Shapes
//! `x (…, K) → (…, N)`.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::Result;

/// `y = x Wᵀ + b`; see the module docs.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight (out, in)` and, when `bias`, `bias (out)` under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Uniform { lo: -bound, up: bound })?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Uniform { lo: -bound, up: bound })?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x (…, in) → (…, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(Linear::forward(self, x)?)
    }
}
