//! Co-attention: two sequences attend to each other through one affinity matrix (the bidirectional alignment of
//! sentence-pair models such as ESIM and decomposable attention; the parameterised form of dynamic co-attention).
//!
//! `E = x1 x2ᵀ` (or `x1 W x2ᵀ` with a learned `W`), then the classic path along each axis: `x1`'s tokens attend over
//! `x2` with the softmax of `E`'s rows, `x2`'s tokens over `x1` with the softmax of its columns. Padding hides keys on
//! both sides; rows of padded positions are zero.
//!
//! # Shapes
//! - `x1`: `(B, T1, C)`, `x2`: `(B, T2, C)`, `weight`: `(C, C)`
//! - `weights1 (B, T1, T2)`, `attended1 (B, T1, C)`, `weights2 (B, T2, T1)`, `attended2 (B, T2, C)`
//!
//! ```
//! use attend::layers::coattention::CoAttention;
//! use candle_core::{Device, Tensor};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let (x1, x2) = (Tensor::randn(0f32, 1., (2, 4, 6), &dev)?, Tensor::randn(0f32, 1., (2, 5, 6), &dev)?);
//! let out = CoAttention::plain().forward(&x1, &x2, Some(&[4, 2]), Some(&[5, 3]))?;
//! assert_eq!(out.attended1.dims(), &[2, 4, 6]);
//! assert_eq!(out.weights2.dims(), &[2, 5, 4]);
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::attention::classic::{attend_scores, Normalizer};
use crate::attention::{Mask, MaskTensor};
use crate::error::shape_str;
use crate::{ensure, Result};

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct CoAttention {
    weight: Option<Tensor>,
    normalizer: Normalizer,
}

/// What [`CoAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct CoAttentionOutput {
    pub weights1: Tensor,
    pub attended1: Tensor,
    pub weights2: Tensor,
    pub attended2: Tensor,
}

/// `(B, 1, T, S)` u8: query `i` of sequence `b` sees key `j` iff both are within their lengths.
fn pair_keep(
    lq: Option<&[usize]>,
    lk: Option<&[usize]>,
    b: usize,
    t: usize,
    s: usize,
    dev: &candle_core::Device,
) -> Result<Option<MaskTensor>> {
    if lq.is_none() && lk.is_none() {
        return Ok(None);
    }
    let len = |l: Option<&[usize]>, bi: usize, full: usize| l.map_or(full, |l| l[bi]);
    let mut keep = vec![0u8; b * t * s];
    for bi in 0..b {
        let (nq, nk) = (len(lq, bi, t), len(lk, bi, s));
        for i in 0..nq {
            keep[(bi * t + i) * s..(bi * t + i) * s + nk].iter_mut().for_each(|k| *k = 1);
        }
    }
    Ok(Some(MaskTensor::Keep(Tensor::from_vec(keep, (b, 1, t, s), dev)?)))
}

impl CoAttention {
    const OP: &'static str = "co-attention";

    /// The parameter-free form, `E = x1 x2ᵀ`, with the softmax.
    pub fn plain() -> Self {
        Self { weight: None, normalizer: Normalizer::Softmax }
    }

    /// The parameterised form, `E = x1 W x2ᵀ`, loading or creating `weight` (C, C) under `vb`.
    pub fn bilinear(dim: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (dim as f64).sqrt();
        let weight = vb.get_with_hints((dim, dim), "weight", Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { weight: Some(weight), normalizer: Normalizer::Softmax })
    }

    /// Another normaliser for both directions (sparsemax gives hard alignments).
    pub fn with_normalizer(mut self, normalizer: Normalizer) -> Self {
        self.normalizer = normalizer;
        self
    }

    /// The affinity `E` `(B, T1, T2)`.
    pub fn affinity(&self, x1: &Tensor, x2: &Tensor) -> Result<Tensor> {
        let (s1, s2) = (shape_str(x1), shape_str(x2));
        ensure!(
            x1.rank() == 3 && x2.rank() == 3 && x1.dim(0)? == x2.dim(0)? && x1.dim(2)? == x2.dim(2)?,
            Self::OP,
            "expected x1 (B, T1, C) and x2 (B, T2, C), got x1 {s1} and x2 {s2}"
        );
        let left = match &self.weight {
            None => x1.clone(),
            Some(w) => {
                let (b, t1, c) = x1.dims3()?;
                ensure!(w.dims() == [c, c], Self::OP, "weight {} does not fit x1 {s1}", shape_str(w));
                x1.reshape((b * t1, c))?.matmul(w)?.reshape((b, t1, c))?
            }
        };
        Ok(left.matmul(&x2.t()?)?) // (B, T1, T2)
    }

    pub fn forward(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        lengths1: Option<&[usize]>,
        lengths2: Option<&[usize]>,
    ) -> Result<CoAttentionOutput> {
        let e = self.affinity(x1, x2)?; // (B, T1, T2)
        let (b, t1, t2) = e.dims3()?;
        for (name, l, t) in [("lengths1", lengths1, t1), ("lengths2", lengths2, t2)] {
            if let Some(l) = l {
                ensure!(
                    l.len() == b && l.iter().all(|&x| x <= t),
                    Self::OP,
                    "{name} {l:?} must hold B = {b} lengths ≤ {t}"
                );
            }
        }
        let mask = |lq, lk, t, s| -> Result<Mask> {
            Ok(match pair_keep(lq, lk, b, t, s, e.device())? {
                Some(m) => Mask::none().with_tensor(m),
                None => Mask::none(),
            })
        };
        let one = attend_scores(&e, x2, &mask(lengths1, lengths2, t1, t2)?, self.normalizer)?;
        let two = attend_scores(&e.t()?.contiguous()?, x1, &mask(lengths2, lengths1, t2, t1)?, self.normalizer)?;
        Ok(CoAttentionOutput {
            weights1: one.weights,
            attended1: one.context,
            weights2: two.weights,
            attended2: two.context,
        })
    }
}
