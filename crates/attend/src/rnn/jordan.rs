//! Jordan network (Jordan 1986): the *output* is fed back instead of the hidden state.
//!
//! `h_t = tanh(W_ih x_t + b_ih + W_hh y_{t−1} + b_hh)`, `y_t = tanh(W_ho h_t + b_ho)`, `y_{−1} = h0` (zeros by
//! default). One layer, one direction. Parameter names follow PyTorch's pattern, with `weight_ho_l0`/`bias_ho_l0` for
//! the output layer.
//!
//! # Shapes
//! - `x`: `(B, T, C)`, `h0`: `(1, B, O)` → `output (B, T, O)` (zero at padding), `h_n (1, B, O)` (the last valid
//!   output, the state that is fed back)
//! - `weight_ih_l0`: `(H, C)`, `weight_hh_l0`: `(H, O)`, `bias_ih_l0`, `bias_hh_l0`: `(H)`, `weight_ho_l0`:
//!   `(O, H)`, `bias_ho_l0`: `(O)`
//!
//! ```
//! use attend::rnn::{Jordan, JordanConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = JordanConfig { input_size: 4, hidden_size: 6, output_size: 2 };
//! let net = Jordan::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let out = net.forward(&Tensor::randn(0f32, 1., (2, 5, 4), &dev)?, Some(&[5, 3]), None)?;
//! assert_eq!((out.output.dims(), out.h_n.dims()), (&[2, 5, 2][..], &[1, 2, 2][..]));
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{select, StepMasks};
use crate::error::shape_str;
use crate::{ensure, Result};

/// Sizes of a [`Jordan`] network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JordanConfig {
    pub input_size: usize,
    pub hidden_size: usize,
    /// Width `O` of the output that is fed back.
    pub output_size: usize,
}

/// What [`Jordan::forward`] returns.
#[derive(Clone, Debug)]
pub struct JordanOutput {
    /// `(B, T, O)`
    pub output: Tensor,
    /// `(1, B, O)`
    pub h_n: Tensor,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Jordan {
    w_ih: Tensor,
    b_ih: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    w_ho: Tensor,
    b_ho: Tensor,
    config: JordanConfig,
}

impl Jordan {
    const OP: &'static str = "jordan";

    pub fn new(config: JordanConfig, vb: VarBuilder) -> Result<Self> {
        let JordanConfig { input_size: c, hidden_size: h, output_size: o } = config;
        ensure!(c > 0 && h > 0 && o > 0, Self::OP, "sizes must be positive, got {config:?}");
        let init = |fan: usize| {
            let b = 1.0 / (fan as f64).sqrt();
            Init::Uniform { lo: -b, up: b }
        };
        Ok(Self {
            w_ih: vb.get_with_hints((h, c), "weight_ih_l0", init(h))?,
            b_ih: vb.get_with_hints(h, "bias_ih_l0", init(h))?,
            w_hh: vb.get_with_hints((h, o), "weight_hh_l0", init(h))?,
            b_hh: vb.get_with_hints(h, "bias_hh_l0", init(h))?,
            w_ho: vb.get_with_hints((o, h), "weight_ho_l0", init(h))?,
            b_ho: vb.get_with_hints(o, "bias_ho_l0", init(h))?,
            config,
        })
    }

    pub fn config(&self) -> &JordanConfig {
        &self.config
    }

    /// Runs the network over `x`; `lengths` (one per sequence, `≤ T`) marks right padding.
    pub fn forward(&self, x: &Tensor, lengths: Option<&[usize]>, h0: Option<&Tensor>) -> Result<JordanOutput> {
        let JordanConfig { input_size: c, output_size: o, .. } = self.config;
        ensure!(x.rank() == 3 && x.dim(2)? == c, Self::OP, "expected x (B, T, C = {c}), got x {}", shape_str(x));
        let (b, t, _) = x.dims3()?;
        ensure!(t > 0, Self::OP, "x {} has no time steps", shape_str(x));
        let steps = StepMasks::new(lengths, b, t, x.device(), Self::OP)?;
        let keep = steps.masks()?;
        let mut y = match h0 {
            None => Tensor::zeros((b, o), x.dtype(), x.device())?,
            Some(s) => {
                ensure!(
                    s.dims() == [1, b, o],
                    Self::OP,
                    "h0 {} does not fit: expected (1, B, O) = (1, {b}, {o})",
                    shape_str(s)
                );
                s.get(0)?
            }
        };
        let gx = steps
            .zero_padding(x)?
            .reshape((b * t, c))?
            .matmul(&self.w_ih.t()?)?
            .broadcast_add(&self.b_ih)?
            .reshape((b, t, ()))?; // (B, T, H)
        let mut outs = Vec::with_capacity(t);
        for s in 0..t {
            let pre = (gx.narrow(1, s, 1)?.squeeze(1)? + y.matmul(&self.w_hh.t()?)?.broadcast_add(&self.b_hh)?)?; // (B, H)
            let y_new = pre.tanh()?.matmul(&self.w_ho.t()?)?.broadcast_add(&self.b_ho)?.tanh()?; // (B, O)
            match &keep {
                None => {
                    outs.push(y_new.clone());
                    y = y_new;
                }
                Some(k) => {
                    outs.push(select(&k[s], &y_new, &y_new.zeros_like()?)?);
                    y = select(&k[s], &y_new, &y)?;
                }
            }
        }
        Ok(JordanOutput { output: Tensor::stack(&outs, 1)?, h_n: y.unsqueeze(0)? })
    }
}
