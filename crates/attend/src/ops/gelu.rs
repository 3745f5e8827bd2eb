//! GELU, exact (erf) or tanh-approximated (see `attend_kernels::gelu`).
//!
//! # Shapes
//! Elementwise: any shape in, the same shape out.

use attend_kernels::gelu::{gelu_backward, gelu_forward, GeluKind};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, in_kernel_dtype, Binary, KernelFloat};
use crate::Result;

struct Gelu(GeluKind);

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "attend-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s.dtype(), "gelu", |T| {
            let x = contiguous(T::slice(s)?, l, "gelu input")?;
            let mut y = vec![0 as T; x.len()];
            gelu_forward(x, &mut y, self.0);
            Ok((T::storage(y), l.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = match self.0 {
            GeluKind::Erf => Binary {
                name: "attend-gelu-erf-backward",
                f32: |x, dy, dx, _| gelu_backward(x, dy, dx, GeluKind::Erf),
                f64: |x, dy, dx, _| gelu_backward(x, dy, dx, GeluKind::Erf),
            },
            GeluKind::Tanh => Binary {
                name: "attend-gelu-tanh-backward",
                f32: |x, dy, dx, _| gelu_backward(x, dy, dx, GeluKind::Tanh),
                f64: |x, dy, dx, _| gelu_backward(x, dy, dx, GeluKind::Tanh),
            },
        };
        Ok(Some(op.apply(x, dy)?))
    }
}

/// Fused GELU.
pub fn gelu(x: &Tensor, kind: GeluKind) -> Result<Tensor> {
    in_kernel_dtype(x, "gelu", |x| Ok(x.contiguous()?.apply_op1(Gelu(kind))?))
}

/// [`gelu`] composed from plain candle ops.
pub fn gelu_reference(x: &Tensor, kind: GeluKind) -> Result<Tensor> {
    Ok(match kind {
        GeluKind::Erf => ((x * 0.5)? * ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?)?,
        GeluKind::Tanh => {
            let inner = ((x + (x.powf(3.0)? * 0.044_715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
            ((x * 0.5)? * (inner.tanh()? + 1.0)?)?
        }
    })
}
