//! Elman network (Elman 1990): the hidden state is fed back, `h' = tanh(W_ih x + b_ih + W_hh h + b_hh)` (or ReLU).
//! PyTorch's `nn.RNN` with `batch_first=True`.
//!
//! # Shapes
//! - `x`: `(B, T, C)`, `h0`: `(L·dirs, B, H)` → `output (B, T, dirs·H)`, `h_n (L·dirs, B, H)`
//! - `weight_ih_l{k}`: `(H, C_k)`, `weight_hh_l{k}`: `(H, H)`, `bias_ih_l{k}`, `bias_hh_l{k}`: `(H)`
//!
//! ```
//! use attend::rnn::{Elman, ElmanConfig, Nonlinearity, RnnConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = ElmanConfig { rnn: RnnConfig::new(3, 5), nonlinearity: Nonlinearity::Relu };
//! let rnn = Elman::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let out = rnn.forward(&Tensor::randn(0f32, 1., (2, 4, 3), &dev)?, None, None)?;
//! assert!(out.output.min_keepdim(2)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|&v| v >= 0.0));
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{recurrent_layer_controls, CellImpl, Recurrence, RnnConfig, RnnOutput, State, Step};
use crate::{bail, Result};

/// The activation of the Elman cell (PyTorch's `nonlinearity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Nonlinearity {
    #[default]
    Tanh,
    Relu,
}

impl Nonlinearity {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "tanh" => Self::Tanh,
            "relu" => Self::Relu,
            _ => bail!("elman", "unknown nonlinearity `{name}`; expected tanh or relu"),
        })
    }
}

/// [`RnnConfig`] plus the activation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ElmanConfig {
    pub rnn: RnnConfig,
    pub nonlinearity: Nonlinearity,
}

struct ElmanStep(Nonlinearity);

impl Step for ElmanStep {
    const GATES: usize = 1;
    fn step(&self, gx: &Tensor, gh: &Tensor, _state: &State, _imp: CellImpl) -> Result<State> {
        // One activation of one sum: nothing to fuse beyond what candle already does.
        let pre = (gx + gh)?;
        let h = match self.0 {
            Nonlinearity::Tanh => crate::ops::tanh(&pre)?,
            Nonlinearity::Relu => pre.relu()?,
        };
        Ok(State { h, c: None })
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Elman {
    inner: Recurrence,
    nonlinearity: Nonlinearity,
}

recurrent_layer_controls!(Elman);

impl Elman {
    /// Loads or creates PyTorch's parameters under `vb`.
    pub fn new(config: ElmanConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self { inner: Recurrence::new(config.rnn, 1, &vb, "elman")?, nonlinearity: config.nonlinearity })
    }

    /// Runs the stack over `x`; `lengths` (one per sequence, `≤ T`) marks right padding.
    pub fn forward(&self, x: &Tensor, lengths: Option<&[usize]>, h0: Option<&Tensor>) -> Result<RnnOutput> {
        self.inner.forward(&ElmanStep(self.nonlinearity), x, lengths, h0, None, "elman")
    }
}
