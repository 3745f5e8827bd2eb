//! Recurrent networks: Elman and Jordan RNNs, LSTM and GRU; stacked, bidirectional, with dropout between layers,
//! over batches of different lengths.
//!
//! Every layer runs on one driver ([`Recurrence`]). The LSTM and GRU run each direction of each layer as one fused
//! op over the whole sequence, input product, recurrence and cells, with a hand-written backward
//! ([`crate::ops::lstm_sequence`], [`crate::ops::gru_sequence`]: persistent threads that each own a slice of the
//! hidden units, as cuDNN and oneDNN run a layer). The step-by-step path (the input products `W_ih x + b_ih` of all
//! steps in one matrix product, then per step the recurrent product `W_hh h + b_hh` and the cell) serves Elman and
//! Jordan networks, dtypes other than f32 and f64 (with the fused cells [`crate::ops::lstm_cell`],
//! [`crate::ops::gru_cell`]), and the composed twins ([`CellImpl::Reference`]).
//!
//! Parameters carry PyTorch's names and shapes (`weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`,
//! `_reverse` for the backward direction), so an `nn.LSTM` / `nn.GRU` / `nn.RNN` `state_dict` loads one to one.
//!
//! **Lengths.** A sequence `b` of `lengths[b]` steps: steps at or past its length leave the state unchanged and give
//! zero outputs, so padding reaches neither the outputs nor the final states (`pad_packed_sequence`'s result); the
//! backward direction starts at each sequence's own last step.
//!
//! # Shapes
//! - `x`: `(B, T, C)`; `lengths`: `B` entries `≤ T`
//! - `h0`, `c0`, `h_n`, `c_n`: `(L·dirs, B, H)`, layer-major (`l·dirs + d`, `d = 1` the backward direction)
//! - `output`: `(B, T, dirs·H)` (the last layer; forward then backward halves)

mod elman;
mod gru;
mod jordan;
mod lstm;

pub use elman::{Elman, ElmanConfig, Nonlinearity};
pub use gru::Gru;
pub use jordan::{Jordan, JordanConfig, JordanOutput};
pub use lstm::Lstm;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::shape_str;
use crate::ops;
use crate::rng::{DropoutStream, TrainingFlag};
use crate::{ensure, Result};

/// Sizes and options shared by [`Lstm`], [`Gru`] and [`Elman`] (PyTorch's constructor arguments).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RnnConfig {
    /// Input width `C` of the first layer, e.g. 256.
    pub input_size: usize,
    /// Hidden width `H`, e.g. 256.
    pub hidden_size: usize,
    /// Stacked layers `L` (layer `k > 0` reads layer `k − 1`'s output).
    pub num_layers: usize,
    pub bidirectional: bool,
    /// Dropout on each layer's output but the last, while training, in `[0, 1)`.
    pub dropout: f64,
    /// `bias_ih` and `bias_hh` (PyTorch's `bias=True`).
    pub bias: bool,
}

impl RnnConfig {
    /// One forward layer with biases and no dropout.
    pub fn new(input_size: usize, hidden_size: usize) -> Self {
        Self { input_size, hidden_size, num_layers: 1, bidirectional: false, dropout: 0.0, bias: true }
    }

    pub fn dirs(&self) -> usize {
        1 + self.bidirectional as usize
    }

    fn check(&self, op: &'static str) -> Result<()> {
        ensure!(
            self.input_size > 0 && self.hidden_size > 0 && self.num_layers > 0,
            op,
            "input_size, hidden_size and num_layers must be positive, got {self:?}"
        );
        ensure!((0.0..1.0).contains(&self.dropout), op, "dropout must be in [0, 1), got {}", self.dropout);
        Ok(())
    }
}

/// Which cell implementation runs: the fused ops (default) or their composed reference twins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CellImpl {
    #[default]
    Fused,
    Reference,
}

/// What a recurrent layer returns.
#[derive(Clone, Debug)]
pub struct RnnOutput {
    /// `(B, T, dirs·H)`, zero at padded steps.
    pub output: Tensor,
    /// `(L·dirs, B, H)`: the state after each sequence's last valid step.
    pub h_n: Tensor,
    /// `(L·dirs, B, H)` for the LSTM.
    pub c_n: Option<Tensor>,
}

/// The recurrent state of one direction of one layer: `h`, and `c` for the LSTM.
#[derive(Clone, Debug)]
pub(crate) struct State {
    pub h: Tensor,
    pub c: Option<Tensor>,
}

/// The cell of one step: `(W_ih x + b_ih)` of the step and the state → the new state.
pub(crate) trait Step {
    /// Gate chunks per hidden unit (4 LSTM, 3 GRU, 1 Elman).
    const GATES: usize;
    fn step(&self, gx: &Tensor, gh: &Tensor, state: &State, imp: CellImpl) -> Result<State>;

    /// The whole sequence over `x (B, T, C)` in one fused op, for cells that have one (`None`: step by step).
    fn sequence(
        &self,
        _dir: &Direction,
        _x: &Tensor,
        _init: &State,
        _lengths: Option<&[usize]>,
        _reverse: bool,
    ) -> Result<Option<(Tensor, State)>> {
        Ok(None)
    }
}

/// The parameters of one direction of one layer.
#[derive(Clone, Debug)]
pub(crate) struct Direction {
    pub w_ih: Tensor,
    pub w_hh: Tensor,
    pub b_ih: Option<Tensor>,
    pub b_hh: Option<Tensor>,
}

impl Direction {
    /// Loads `weight_ih_l{k}{sfx}` `(G·H, C_k)` and friends, initialised as PyTorch does: U(−1/√H, 1/√H).
    pub fn new(
        vb: &VarBuilder,
        k: usize,
        sfx: &str,
        gates_h: usize,
        input: usize,
        hidden: usize,
        bias: bool,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let get = |shape: (usize, usize), name: &str| vb.get_with_hints(shape, &format!("{name}_l{k}{sfx}"), init);
        let getb = |name: &str| vb.get_with_hints(gates_h, &format!("{name}_l{k}{sfx}"), init);
        Ok(Self {
            w_ih: get((gates_h, input), "weight_ih")?,
            w_hh: get((gates_h, hidden), "weight_hh")?,
            b_ih: if bias { Some(getb("bias_ih")?) } else { None },
            b_hh: if bias { Some(getb("bias_hh")?) } else { None },
        })
    }

    /// The parameters as the fused sequence ops take them.
    pub fn params(&self) -> ops::SequenceParams<'_> {
        ops::SequenceParams { w_ih: &self.w_ih, w_hh: &self.w_hh, b_ih: self.b_ih.as_ref(), b_hh: self.b_hh.as_ref() }
    }

    /// `x W_ihᵀ + b_ih` for every step: `(B, T, C) → (B, T, G·H)`.
    pub fn input_gates(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let gx = x.reshape((b * t, c))?.matmul(&self.w_ih.t()?)?.reshape((b, t, ()))?; // (B, T, G·H)
        Ok(match &self.b_ih {
            Some(bias) => gx.broadcast_add(bias)?,
            None => gx,
        })
    }

    /// `h W_hhᵀ + b_hh`: `(B, H) → (B, G·H)`.
    pub fn hidden_gates(&self, h: &Tensor) -> Result<Tensor> {
        let gh = h.matmul(&self.w_hh.t()?)?;
        Ok(match &self.b_hh {
            Some(bias) => gh.broadcast_add(bias)?,
            None => gh,
        })
    }
}

/// The lengths of a batch, checked once; their per-step keep masks (`keep[t]`: `(B, 1)` u8, 1 where step `t` is
/// valid) are built only when a step-by-step path asks for them (the fused sequence ops take the lengths as they are).
pub(crate) struct StepMasks<'a> {
    lengths: Option<&'a [usize]>,
    b: usize,
    t: usize,
    dev: Device,
    masks: std::cell::OnceCell<Option<Vec<Tensor>>>,
}

impl<'a> StepMasks<'a> {
    pub fn new(lengths: Option<&'a [usize]>, b: usize, t: usize, dev: &Device, op: &'static str) -> Result<Self> {
        if let Some(l) = lengths {
            ensure!(l.len() == b, op, "lengths has {} entries for batch size B = {b}", l.len());
            if let Some((i, &x)) = l.iter().enumerate().find(|(_, &x)| x > t) {
                crate::bail!(op, "lengths[{i}] = {x} exceeds the sequence length T = {t}");
            }
        }
        Ok(Self { lengths, b, t, dev: dev.clone(), masks: std::cell::OnceCell::new() })
    }

    pub fn lengths(&self) -> Option<&'a [usize]> {
        self.lengths
    }

    /// The keep masks, or `None` when every sequence is full length.
    pub fn masks(&self) -> Result<Option<&[Tensor]>> {
        if self.masks.get().is_none() {
            let built = match self.lengths {
                Some(l) if l.iter().any(|&x| x < self.t) => Some(
                    (0..self.t)
                        .map(|s| {
                            Ok(Tensor::from_vec(
                                l.iter().map(|&x| (s < x) as u8).collect::<Vec<_>>(),
                                (self.b, 1),
                                &self.dev,
                            )?)
                        })
                        .collect::<Result<Vec<_>>>()?,
                ),
                _ => None,
            };
            let _ = self.masks.set(built);
        }
        Ok(self.masks.get().and_then(|m| m.as_deref()))
    }

    /// `x (B, T, C)` with the steps at or past each sequence's length set to zero. A step-by-step path computes
    /// every row's gates and discards the padded ones, but its backward still multiplies their zero gradients by
    /// the cell's derivatives and the input: a NaN or inf in the padding would turn `0 · NaN` into NaN weight
    /// gradients. PyTorch's packed sequences never read the padding; neither may we.
    pub fn zero_padding(&self, x: &Tensor) -> Result<Tensor> {
        match self.lengths {
            Some(l) if l.iter().any(|&len| len < self.t) => {
                let keep: Vec<u8> = l.iter().flat_map(|&len| (0..self.t).map(move |s| (s < len) as u8)).collect();
                let keep = Tensor::from_vec(keep, (self.b, self.t, 1), &self.dev)?.broadcast_as(x.shape())?;
                Ok(keep.where_cond(x, &x.zeros_like()?)?)
            }
            _ => Ok(x.clone()),
        }
    }
}

/// `keep ? new : old`, broadcasting the `(B, 1)` mask.
pub(crate) fn select(keep: &Tensor, new: &Tensor, old: &Tensor) -> Result<Tensor> {
    Ok(keep.broadcast_as(new.shape())?.where_cond(new, old)?)
}

/// Runs one direction over the sequence: returns the outputs `(B, T, H)` (zero at padding) and the final state.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_direction<C: Step>(
    cell: &C,
    dir: &Direction,
    x: &Tensor,
    init: State,
    steps: &StepMasks,
    reverse: bool,
    imp: CellImpl,
) -> Result<(Tensor, State)> {
    let t = x.dim(1)?;
    if imp == CellImpl::Fused && matches!(x.dtype(), DType::F32 | DType::F64) {
        if let Some(done) = cell.sequence(dir, x, &init, steps.lengths(), reverse)? {
            return Ok(done);
        }
    }
    let keep = steps.masks()?;
    let gx = dir.input_gates(&steps.zero_padding(x)?)?; // (B, T, G·H)
    let mut state = init;
    let mut outs: Vec<Tensor> = Vec::with_capacity(t);
    let order: Box<dyn Iterator<Item = usize>> = if reverse { Box::new((0..t).rev()) } else { Box::new(0..t) };
    for s in order {
        let gx_s = gx.narrow(1, s, 1)?.squeeze(1)?.contiguous()?; // (B, G·H)
        let gh = dir.hidden_gates(&state.h)?; // (B, G·H)
        let new = cell.step(&gx_s, &gh, &state, imp)?;
        match keep {
            None => {
                outs.push(new.h.clone());
                state = new;
            }
            Some(keep) => {
                // Past its length a sequence keeps its state and outputs zero.
                let k = &keep[s];
                outs.push(select(k, &new.h, &new.h.zeros_like()?)?);
                let c = match (&new.c, &state.c) {
                    (Some(n), Some(o)) => Some(select(k, n, o)?),
                    _ => None,
                };
                state = State { h: select(k, &new.h, &state.h)?, c };
            }
        }
    }
    if reverse {
        outs.reverse();
    }
    Ok((Tensor::stack(&outs, 1)?, state)) // (B, T, H)
}

/// A stack of [`Direction`]s driven by one [`Step`]: what [`Lstm`], [`Gru`] and [`Elman`] share.
#[derive(Clone, Debug)]
pub(crate) struct Recurrence {
    pub config: RnnConfig,
    /// `layers[k][d]`.
    pub layers: Vec<Vec<Direction>>,
    pub training: TrainingFlag,
    pub dropout: DropoutStream,
    pub imp: CellImpl,
}

impl Recurrence {
    pub fn new(config: RnnConfig, gates: usize, vb: &VarBuilder, op: &'static str) -> Result<Self> {
        config.check(op)?;
        let (h, dirs) = (config.hidden_size, config.dirs());
        let layers = (0..config.num_layers)
            .map(|k| {
                let input = if k == 0 { config.input_size } else { dirs * h };
                (0..dirs)
                    .map(|d| {
                        Direction::new(vb, k, if d == 1 { "_reverse" } else { "" }, gates * h, input, h, config.bias)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            layers,
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
            imp: CellImpl::default(),
        })
    }

    /// Checks `x` and an initial state `(L·dirs, B, H)`; zeros when not given.
    fn initial(&self, x: &Tensor, given: Option<&Tensor>, name: &str, op: &'static str) -> Result<Tensor> {
        let (b, h) = (x.dim(0)?, self.config.hidden_size);
        let ld = self.config.num_layers * self.config.dirs();
        match given {
            None => Ok(Tensor::zeros((ld, b, h), x.dtype(), x.device())?),
            Some(s) => {
                ensure!(
                    s.dims() == [ld, b, h],
                    op,
                    "{name} {} does not fit: expected (L·dirs, B, H) = ({ld}, {b}, {h}) for x {}",
                    shape_str(s),
                    shape_str(x)
                );
                Ok(s.to_dtype(x.dtype())?)
            }
        }
    }

    pub fn forward<C: Step>(
        &self,
        cell: &C,
        x: &Tensor,
        lengths: Option<&[usize]>,
        h0: Option<&Tensor>,
        c0: Option<&Tensor>,
        op: &'static str,
    ) -> Result<RnnOutput> {
        let c = self.config.input_size;
        ensure!(
            x.rank() == 3 && x.dim(2)? == c && x.dtype().is_float(),
            op,
            "expected x (B, T, C = {c}) float, got x {} {:?}",
            shape_str(x),
            x.dtype()
        );
        let (b, t, _) = x.dims3()?;
        ensure!(t > 0, op, "x {} has no time steps", shape_str(x));
        let steps = StepMasks::new(lengths, b, t, x.device(), op)?;
        let lstm = C::GATES == 4;
        let h0 = self.initial(x, h0, "h0", op)?;
        let c0 = if lstm { Some(self.initial(x, c0, "c0", op)?) } else { None };
        let dirs = self.config.dirs();
        let (mut hs, mut cs) = (Vec::new(), Vec::new());
        let mut input = x.clone();
        for (k, layer) in self.layers.iter().enumerate() {
            let mut outs = Vec::with_capacity(dirs);
            for (d, dir) in layer.iter().enumerate() {
                let i = k * dirs + d;
                let init = State { h: h0.get(i)?, c: c0.as_ref().map(|c| c.get(i)).transpose()? };
                let (out, last) = run_direction(cell, dir, &input, init, &steps, d == 1, self.imp)?;
                outs.push(out);
                hs.push(last.h);
                cs.extend(last.c);
            }
            input = if dirs == 1 { outs.pop().expect("one direction") } else { Tensor::cat(&outs, 2)? }; // (B, T, dirs·H)
            let p = self.config.dropout;
            if p > 0.0 && k + 1 < self.layers.len() && self.training.get() {
                input = ops::dropout(&input, p, self.dropout.next_seed(), 0)?;
            }
        }
        Ok(RnnOutput {
            output: input,
            h_n: Tensor::stack(&hs, 0)?, // (L·dirs, B, H)
            c_n: if lstm { Some(Tensor::stack(&cs, 0)?) } else { None },
        })
    }
}

/// The setters every recurrent layer offers, written once.
macro_rules! recurrent_layer_controls {
    ($ty:ty) => {
        impl $ty {
            /// Training mode turns on the dropout between layers; layers start in evaluation mode.
            pub fn set_training(&self, training: bool) {
                self.inner.training.set(training)
            }
            pub fn is_training(&self) -> bool {
                self.inner.training.get()
            }
            /// The dropout stream (from the model's [`crate::rng::DropoutRng`]).
            pub fn set_dropout_stream(&mut self, stream: crate::rng::DropoutStream) {
                self.inner.dropout = stream;
            }
            /// Fused cells (default) or their composed reference twins.
            pub fn set_cell_impl(&mut self, imp: crate::rnn::CellImpl) {
                self.inner.imp = imp;
            }
            pub fn config(&self) -> &crate::rnn::RnnConfig {
                &self.inner.config
            }
        }
    };
}
pub(crate) use recurrent_layer_controls;
