//! Inverted dropout driven by a seed: the same `(seed, offset)` gives the same mask, and the backward regenerates it
//! instead of storing it (see `attend_kernels::dropout`).
//!
//! # Shapes
//! Elementwise: any shape; element `i` in row-major order uses random index `offset + i`.

use attend_kernels::dropout::{dropout_forward, dropout_scale_mask};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, in_kernel_dtype, KernelFloat};
use crate::{ensure, Result};

#[derive(Clone, Copy)]
struct Dropout {
    p: f64,
    seed: u64,
    offset: u64,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "attend-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s.dtype(), "dropout", |T| {
            let x = contiguous(T::slice(s)?, l, "dropout input")?;
            let mut y = vec![0 as T; x.len()];
            dropout_forward(x, &mut y, self.seed, self.offset, self.p);
            Ok((T::storage(y), l.shape().clone()))
        })
    }
    /// `dx = dy ⊙ mask/(1−p)`: the forward itself applied to `dy` with the same seed.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1(*self)?))
    }
}

fn check_p(op: &'static str, p: f64) -> Result<()> {
    ensure!((0.0..1.0).contains(&p), op, "drop probability must be in [0, 1), got {p}");
    Ok(())
}

/// Fused dropout with drop probability `p`; `p = 0` returns `x` unchanged.
pub fn dropout(x: &Tensor, p: f64, seed: u64, offset: u64) -> Result<Tensor> {
    check_p("dropout", p)?;
    if p == 0.0 {
        return Ok(x.clone());
    }
    in_kernel_dtype(x, "dropout", |x| Ok(x.contiguous()?.apply_op1(Dropout { p, seed, offset })?))
}

/// The scaled keep mask (`1/(1−p)` kept, 0 dropped) that [`dropout`] multiplies by.
pub fn dropout_mask(shape: &Shape, p: f64, seed: u64, offset: u64, dtype: DType, device: &Device) -> Result<Tensor> {
    check_p("dropout_mask", p)?;
    let mut m = vec![0f32; shape.elem_count()];
    dropout_scale_mask(seed, offset, p, &mut m);
    Ok(Tensor::from_vec(m, shape, device)?.to_dtype(dtype)?)
}

/// [`dropout`] composed from plain candle ops: `x ⊙ dropout_mask` where kept, 0 where dropped (assigned, as the
/// fused op does: a dropped NaN is gone, where `NaN · 0` would keep it).
pub fn dropout_reference(x: &Tensor, p: f64, seed: u64, offset: u64) -> Result<Tensor> {
    let mask = dropout_mask(x.shape(), p, seed, offset, x.dtype(), x.device())?;
    Ok(mask.eq(0.0)?.where_cond(&mask, &(x * &mask)?)?)
}

/// [`dropout`] with probability `p` and the next seed of `stream` while `training` is set; `x` itself otherwise. The
/// one switch every layer and model uses for its own dropouts.
pub fn dropout_while_training(
    x: Tensor,
    p: f64,
    training: &crate::rng::TrainingFlag,
    stream: &crate::rng::DropoutStream,
) -> Result<Tensor> {
    if training.get() && p > 0.0 {
        dropout(&x, p, stream.next_seed(), 0)
    } else {
        Ok(x)
    }
}
