//! Local attention (Luong et al. 2015 §3.2): attend to a window `[p_t − D, p_t + D]` of the source around an
//! aligned position `p_t`, with the general score and the attentional state `h̃ = tanh(W_out [c; h])`.
//!
//! - **local-m** (monotonic): `p_t = t`, the decoder step; weights are the softmax over the window.
//! - **local-p** (predictive): `p_t = S_b · σ(v_pᵀ tanh(W_p h_t))` (`S_b` the source length of sequence `b`); the
//!   windowed softmax is multiplied by a Gaussian `exp(−(s − p_t)² / (2σ²))`, `σ = D/2`, which is what makes `p_t`
//!   differentiable (the window itself is a hard choice).
//!
//! Parameters: `linear_in.weight` (the general score), `linear_out.weight`, and for local-p `linear_p.weight` (C, C),
//! `v_p.weight` (1, C).
//!
//! # Shapes
//! - `source`: `(B, T, C)`, `memory_bank`: `(B, S, C)` → `attn_h (B, T, C)`, `align (B, T, S)`, `positions (B, T)`
//!
//! ```
//! use attend::layers::local::{LocalAttention, LocalAttentionConfig, LocalMode};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = LocalAttentionConfig { dim: 8, window: 2, mode: LocalMode::Monotonic };
//! let attn = LocalAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let out = attn.forward(&Tensor::randn(0f32, 1., (1, 3, 8), &dev)?, &Tensor::randn(0f32, 1., (1, 9, 8), &dev)?, None, 0)?;
//! let row = out.align.get(0)?.get(0)?.to_vec1::<f32>()?; // step 0 sees positions 0..=2
//! assert!(row[..3].iter().all(|&w| w > 0.0) && row[3..].iter().all(|&w| w == 0.0));
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};
use candle_nn::{linear_no_bias, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::attention::classic::{normalize_scores, ClassicOptions};
use crate::attention::score::{GeneralScore, GeneralScoreConfig, Score};
use crate::attention::{Mask, MaskTensor};
use crate::error::shape_str;
use crate::{ensure, ops, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalMode {
    /// local-m: `p_t = t`.
    Monotonic,
    /// local-p: `p_t` predicted from the decoder state, Gaussian-weighted window.
    Predictive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalAttentionConfig {
    /// Width `C` of decoder states and memory.
    pub dim: usize,
    /// Half-width `D` of the window (Luong et al. use 10).
    pub window: usize,
    pub mode: LocalMode,
}

/// What [`LocalAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct LocalOutput {
    /// `(B, T, C)`
    pub attn_h: Tensor,
    /// `(B, T, S)`, zero outside each window.
    pub align: Tensor,
    /// `(B, T)`: the aligned positions `p_t`.
    pub positions: Tensor,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct LocalAttention {
    score: GeneralScore,
    linear_out: Linear,
    /// `(W_p, v_p)` for local-p.
    predictor: Option<(Linear, Linear)>,
    config: LocalAttentionConfig,
}

impl LocalAttention {
    const OP: &'static str = "local attention";

    pub fn new(config: LocalAttentionConfig, vb: VarBuilder) -> Result<Self> {
        let c = config.dim;
        ensure!(c > 0 && config.window > 0, Self::OP, "dim and window must be positive, got {config:?}");
        let predictor = match config.mode {
            LocalMode::Monotonic => None,
            LocalMode::Predictive => {
                Some((linear_no_bias(c, c, vb.pp("linear_p"))?, linear_no_bias(c, 1, vb.pp("v_p"))?))
            }
        };
        Ok(Self {
            score: GeneralScore::new(&GeneralScoreConfig { query_dim: c, key_dim: c }, vb.clone())?,
            linear_out: linear_no_bias(2 * c, c, vb.pp("linear_out"))?,
            predictor,
            config,
        })
    }

    pub fn config(&self) -> &LocalAttentionConfig {
        &self.config
    }

    /// Attends `source` (decoder steps `first_step..first_step + T`, which local-m aligns with) over
    /// `memory_bank`; `memory_lengths` hides padded memory and sets `S_b` for local-p.
    pub fn forward(
        &self,
        source: &Tensor,
        memory_bank: &Tensor,
        memory_lengths: Option<&[usize]>,
        first_step: usize,
    ) -> Result<LocalOutput> {
        let c = self.config.dim;
        ensure!(
            source.rank() == 3 && memory_bank.rank() == 3 && source.dim(2)? == c && memory_bank.dim(2)? == c,
            Self::OP,
            "expected source (B, T, C = {c}) and memory_bank (B, S, C = {c}), got source {} and memory_bank {}",
            shape_str(source),
            shape_str(memory_bank)
        );
        let (b, t, _) = source.dims3()?;
        let s = memory_bank.dim(1)?;
        let dev = source.device();
        let lengths: Vec<usize> = memory_lengths.map(<[usize]>::to_vec).unwrap_or_else(|| vec![s; b]);
        let positions = match &self.predictor {
            None => {
                let p: Vec<f32> = (0..b).flat_map(|_| (0..t).map(|i| (first_step + i) as f32)).collect();
                Tensor::from_vec(p, (b, t), dev)?.to_dtype(source.dtype())?
            }
            Some((w_p, v_p)) => {
                let sb = Tensor::from_vec(lengths.iter().map(|&l| l as f32).collect::<Vec<_>>(), (b, 1), dev)?;
                let sig = ops::sigmoid(&v_p.forward(&w_p.forward(source)?.tanh()?)?.squeeze(2)?)?; // (B, T)
                sig.broadcast_mul(&sb.to_dtype(source.dtype())?)?
            }
        };
        // The window is a hard choice made on the value of p_t.
        let pos: Vec<f64> = positions.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let d = self.config.window as f64;
        let mut keep = vec![0u8; b * t * s];
        for (r, row) in keep.chunks_exact_mut(s).enumerate() {
            for (j, k) in row.iter_mut().enumerate() {
                *k = ((j as f64 - pos[r]).abs() <= d) as u8;
            }
        }
        let keep = Tensor::from_vec(keep, (b, 1, t, s), dev)?; // (B, 1, T, S)
        let mask = Mask::none().with_key_lengths(lengths).with_tensor(MaskTensor::Keep(keep));
        let scores = self.score.score(source, memory_bank)?; // (B, T, S)
        let mut align = normalize_scores(&scores, &mask, ClassicOptions::default())?; // (B, T, S)
        if self.predictor.is_some() {
            let sigma = d / 2.0;
            let js = Tensor::arange(0u32, s as u32, dev)?.to_dtype(source.dtype())?.reshape((1, 1, s))?;
            let dist = js.broadcast_sub(&positions.unsqueeze(2)?)?; // (B, T, S)
            let gauss = (dist.sqr()? * (-1.0 / (2.0 * sigma * sigma)))?.exp()?;
            align = (align * gauss)?;
        }
        let context = align.matmul(&memory_bank.contiguous()?)?; // (B, T, C)
        let attn_h = crate::ops::tanh(&self.linear_out.forward(&Tensor::cat(&[&context, source], 2)?)?)?;
        Ok(LocalOutput { attn_h, align, positions })
    }
}
