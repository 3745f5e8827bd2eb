//! `tanh` on the kernels' vector paths (see `attend_kernels::tanh`), its backward `dy ⊙ (1 − y²)` from the output.
//!
//! # Shapes
//! Elementwise: any shape in, the same shape out.

use attend_kernels::tanh::{tanh_backward, tanh_forward};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, in_kernel_dtype, Binary, KernelFloat};
use crate::Result;

struct Tanh;

impl CustomOp1 for Tanh {
    fn name(&self) -> &'static str {
        "attend-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s.dtype(), "tanh", |T| {
            let x = contiguous(T::slice(s)?, l, "tanh input")?;
            let mut y = vec![0 as T; x.len()];
            tanh_forward(x, &mut y);
            Ok((T::storage(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = Binary {
            name: "attend-tanh-backward",
            f32: |y, dy, dx, _| tanh_backward(y, dy, dx),
            f64: |y, dy, dx, _| tanh_backward(y, dy, dx),
        };
        Ok(Some(op.apply(&y.detach(), dy)?))
    }
}

/// Fused `tanh`.
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    in_kernel_dtype(x, "tanh", |x| Ok(x.contiguous()?.apply_op1(Tanh)?))
}

/// [`tanh`] as candle's own op.
pub fn tanh_reference(x: &Tensor) -> Result<Tensor> {
    Ok(x.tanh()?)
}
