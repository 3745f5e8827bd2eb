//! Long short-term memory (Hochreiter & Schmidhuber 1997), PyTorch's `nn.LSTM` with `batch_first=True`.
//!
//! `i, f, g, o = σ, σ, tanh, σ (W_ih x + b_ih + W_hh h + b_hh)`, `c' = f ⊙ c + i ⊙ g`, `h' = o ⊙ tanh(c')`; the
//! gates of a step run in one fused op with a hand-written backward ([`crate::ops::lstm_cell`]).
//!
//! # Shapes
//! - `x`: `(B, T, C)`, `h0`, `c0`: `(L·dirs, B, H)` → `output (B, T, dirs·H)`, `h_n`, `c_n (L·dirs, B, H)`
//! - `weight_ih_l{k}`: `(4H, C_k)`, `weight_hh_l{k}`: `(4H, H)`, `bias_ih_l{k}`, `bias_hh_l{k}`: `(4H)`
//!
//! ```
//! use attend::rnn::{Lstm, RnnConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = RnnConfig { num_layers: 2, bidirectional: true, ..RnnConfig::new(6, 8) };
//! let lstm = Lstm::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let x = Tensor::randn(0f32, 1., (3, 5, 6), &dev)?; // (B, T, C)
//! let out = lstm.forward(&x, Some(&[5, 2, 4]), None, None)?; // sequences of 5, 2 and 4 steps
//! assert_eq!(out.output.dims(), &[3, 5, 16]); // (B, T, dirs·H)
//! assert_eq!(out.h_n.dims(), &[4, 3, 8]); // (L·dirs, B, H)
//! assert_eq!(out.output.get(1)?.get(3)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0); // padding stays zero
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{recurrent_layer_controls, CellImpl, Direction, Recurrence, RnnConfig, RnnOutput, State, Step};
use crate::{ops, Result};

struct LstmStep;

impl Step for LstmStep {
    const GATES: usize = 4;
    fn step(&self, gx: &Tensor, gh: &Tensor, state: &State, imp: CellImpl) -> Result<State> {
        let gates = (gx + gh)?; // (B, 4H)
        let c = state.c.as_ref().expect("an LSTM state has a cell");
        let (h, c) = match imp {
            CellImpl::Fused => ops::lstm_cell(&gates, c)?,
            CellImpl::Reference => ops::lstm_cell_reference(&gates, c)?,
        };
        Ok(State { h, c: Some(c) })
    }

    fn sequence(
        &self,
        dir: &Direction,
        x: &Tensor,
        init: &State,
        lengths: Option<&[usize]>,
        reverse: bool,
    ) -> Result<Option<(Tensor, State)>> {
        let c0 = init.c.as_ref().expect("an LSTM state has a cell");
        let (y, h, c) = ops::lstm_sequence(x, dir.params(), &init.h, c0, lengths, reverse)?;
        Ok(Some((y, State { h, c: Some(c) })))
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Lstm {
    inner: Recurrence,
}

recurrent_layer_controls!(Lstm);

impl Lstm {
    /// Loads or creates PyTorch's parameters under `vb`.
    pub fn new(config: RnnConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self { inner: Recurrence::new(config, 4, &vb, "lstm")? })
    }

    /// Runs the stack over `x`; `lengths` (one per sequence, `≤ T`) marks right padding.
    pub fn forward(
        &self,
        x: &Tensor,
        lengths: Option<&[usize]>,
        h0: Option<&Tensor>,
        c0: Option<&Tensor>,
    ) -> Result<RnnOutput> {
        self.inner.forward(&LstmStep, x, lengths, h0, c0, "lstm")
    }
}
