//! Gated recurrent unit (Cho et al. 2014), PyTorch's `nn.GRU` with `batch_first=True`.
//!
//! `r = σ(gx_r + gh_r)`, `z = σ(gx_z + gh_z)`, `n = tanh(gx_n + r ⊙ gh_n)`, `h' = (1 − z) ⊙ n + z ⊙ h`, with
//! `gx = W_ih x + b_ih`, `gh = W_hh h + b_hh`; the gates of a step run in one fused op with a hand-written backward
//! ([`crate::ops::gru_cell`]).
//!
//! # Shapes
//! - `x`: `(B, T, C)`, `h0`: `(L·dirs, B, H)` → `output (B, T, dirs·H)`, `h_n (L·dirs, B, H)`
//! - `weight_ih_l{k}`: `(3H, C_k)`, `weight_hh_l{k}`: `(3H, H)`, `bias_ih_l{k}`, `bias_hh_l{k}`: `(3H)`
//!
//! ```
//! use attend::rnn::{Gru, RnnConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let gru = Gru::new(RnnConfig::new(4, 8), VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let x = Tensor::randn(0f32, 1., (2, 7, 4), &dev)?; // (B, T, C)
//! let out = gru.forward(&x, None, None)?;
//! assert_eq!(out.output.dims(), &[2, 7, 8]);
//! // The last output is the final state of a one-layer forward GRU.
//! let last = out.output.narrow(1, 6, 1)?.squeeze(1)?;
//! assert_eq!(last.to_vec2::<f32>()?, out.h_n.get(0)?.to_vec2::<f32>()?);
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{recurrent_layer_controls, CellImpl, Direction, Recurrence, RnnConfig, RnnOutput, State, Step};
use crate::{ops, Result};

struct GruStep;

impl Step for GruStep {
    const GATES: usize = 3;
    fn step(&self, gx: &Tensor, gh: &Tensor, state: &State, imp: CellImpl) -> Result<State> {
        let h = match imp {
            CellImpl::Fused => ops::gru_cell(gx, gh, &state.h)?,
            CellImpl::Reference => ops::gru_cell_reference(gx, gh, &state.h)?,
        };
        Ok(State { h, c: None })
    }

    fn sequence(
        &self,
        dir: &Direction,
        x: &Tensor,
        init: &State,
        lengths: Option<&[usize]>,
        reverse: bool,
    ) -> Result<Option<(Tensor, State)>> {
        let (y, h) = ops::gru_sequence(x, dir.params(), &init.h, lengths, reverse)?;
        Ok(Some((y, State { h, c: None })))
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Gru {
    inner: Recurrence,
}

recurrent_layer_controls!(Gru);

impl Gru {
    /// Loads or creates PyTorch's parameters under `vb`.
    pub fn new(config: RnnConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self { inner: Recurrence::new(config, 3, &vb, "gru")? })
    }

    /// Runs the stack over `x`; `lengths` (one per sequence, `≤ T`) marks right padding.
    pub fn forward(&self, x: &Tensor, lengths: Option<&[usize]>, h0: Option<&Tensor>) -> Result<RnnOutput> {
        self.inner.forward(&GruStep, x, lengths, h0, None, "gru")
    }
}
