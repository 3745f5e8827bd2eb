//! The position-wise feed-forward network of a Transformer layer (Vaswani et al. 2017 §3.3), plain or gated
//! (Shazeer 2020, "GLU Variants Improve Transformer"; T5 v1.1's `gated-gelu`):
//!
//! ```text
//! plain:  FFN(x) = act(x W_in + b_in) W_out + b_out
//! gated:  FFN(x) = (act(x W_gate) ⊙ (x W_in)) W_out
//! ```
//!
//! Dropout, when training, acts on the hidden activations (PyTorch's `TransformerEncoderLayer`, T5); the residual
//! dropout belongs to the enclosing layer.
//!
//! # Parameters
//! | name | shape |
//! |---|---|
//! | `fc_in.weight`, `fc_in.bias` | `(F, C)`, `(F)` |
//! | `fc_gate.weight`, `fc_gate.bias` (gated only) | `(F, C)`, `(F)` |
//! | `fc_out.weight`, `fc_out.bias` | `(C, F)`, `(C)` |
//!
//! # Shapes
//! `x (B, T, C) → (B, T, C)`, hidden `(B, T, F)`.

use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::linear::Linear;
use crate::ops::{dropout, gelu, GeluKind};
use crate::rng::{DropoutStream, TrainingFlag};
use crate::{bail, Result};

/// The nonlinearity of a feed-forward network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    /// Exact GELU (erf).
    Gelu,
    /// GELU's tanh approximation (GPT-2's `gelu_new`, PyTorch's `approximate="tanh"`).
    GeluTanh,
    /// `x·σ(x)`.
    Silu,
}

impl Activation {
    /// The activation named as Hugging Face configs name it (`hidden_act`, `activation_function`,
    /// `dense_act_fn`); `None` for names this crate does not implement.
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    /// The name Hugging Face configs give it (the inverse of [`from_hf`](Self::from_hf)).
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Silu => "silu",
        }
    }

    /// Applies the activation (fused with a hand-written backward for GELU).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Gelu => gelu(x, GeluKind::Erf)?,
            Activation::GeluTanh => gelu(x, GeluKind::Tanh)?,
            Activation::Silu => x.silu()?,
        })
    }
}

/// Configuration of [`FeedForward`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeedForwardConfig {
    /// Model width `C`. Example: `768`.
    pub d_model: usize,
    /// Hidden width `F`. Example: `3072` (`4·C`).
    pub d_ff: usize,
    pub activation: Activation,
    /// The gated form (a second input projection `fc_gate`). Example: `false`.
    #[serde(default)]
    pub gated: bool,
    /// Biases on the projections. Example: `true` (T5: `false`).
    #[serde(default = "yes")]
    pub bias: bool,
    /// Dropout on the hidden activations while training. Example: `0.1`.
    #[serde(default)]
    pub dropout: f64,
}

fn yes() -> bool {
    true
}

/// A feed-forward network; see the module docs.
#[derive(Clone, Debug)]
pub struct FeedForward {
    fc_in: Linear,
    fc_gate: Option<Linear>,
    fc_out: Linear,
    config: FeedForwardConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

impl FeedForward {
    pub fn new(config: &FeedForwardConfig, vb: VarBuilder) -> Result<Self> {
        let (c, f) = (config.d_model, config.d_ff);
        if c == 0 || f == 0 {
            bail!("FeedForward", "d_model = {c} and d_ff = {f} must be positive");
        }
        if !(0.0..1.0).contains(&config.dropout) {
            bail!("FeedForward", "dropout must be in [0, 1), got {}", config.dropout);
        }
        let lin = |i, o, name: &str| Linear::new(i, o, config.bias, vb.pp(name));
        Ok(Self {
            fc_in: lin(c, f, "fc_in")?,
            fc_gate: if config.gated { Some(lin(c, f, "fc_gate")?) } else { None },
            fc_out: lin(f, c, "fc_out")?,
            config: config.clone(),
            training: Default::default(),
            dropout: DropoutStream::default(),
        })
    }

    pub fn config(&self) -> &FeedForwardConfig {
        &self.config
    }

    /// Training mode applies the config's dropout; evaluation (the default) never drops.
    pub fn set_training(&self, training: bool) {
        self.training.set(training)
    }

    pub fn set_dropout_stream(&mut self, stream: DropoutStream) {
        self.dropout = stream;
    }

    /// `x (B, T, C) → (B, T, C)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc_in.forward(x)?; // (B, T, F)
        let mut h = match &self.fc_gate {
            Some(gate) => (self.config.activation.apply(&gate.forward(x)?)? * h)?,
            None => self.config.activation.apply(&h)?,
        };
        if self.training.get() && self.config.dropout > 0.0 {
            h = dropout(&h, self.config.dropout, self.dropout.next_seed(), 0)?;
        }
        Ok(self.fc_out.forward(&h)?) // (B, T, C)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(FeedForward::forward(self, x)?)
    }
}
