//! Layer norm and RMS norm over the last axis (see `attend_kernels::norm` for the equations and the backward).
//!
//! # Shapes
//! `x`: `(…, C)`; `weight` and `bias`: `(C)`; output: the shape of `x`.

use attend_kernels::norm::{norm_backward, norm_forward, NormKind};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, in_kernel_dtype, KernelFloat};
use crate::{ensure, Result};

#[derive(Clone, Copy)]
struct Norm {
    kind: NormKind,
    eps: f64,
}

/// Backward as one op: its output is `dx` followed by `dw` (C values, absent without weight), split by the caller,
/// because a candle custom op returns one tensor.
struct NormBackward(Norm);

fn width(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        "attend-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s.dtype(), "norm", |T| {
            let x = contiguous(T::slice(s)?, l, "norm input")?;
            let mut y = vec![0 as T; x.len()];
            norm_forward(x, None, &mut y, width(l), self.eps, self.kind);
            Ok((T::storage(y), l.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let flat = x.apply_op2(&dy.contiguous()?, NormBackward(*self))?;
        Ok(Some(flat.reshape(x.shape())?))
    }
}

impl CustomOp2 for Norm {
    fn name(&self) -> &'static str {
        "attend-norm-affine"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s1.dtype(), "norm", |T| {
            let x = contiguous(T::slice(s1)?, l1, "norm input")?;
            let w = contiguous(T::slice(s2)?, l2, "norm weight")?;
            let mut y = vec![0 as T; x.len()];
            norm_forward(x, Some(w), &mut y, width(l1), self.eps, self.kind);
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3(w, &dy.contiguous()?, NormBackward(*self))?;
        let n = x.elem_count();
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = flat.narrow(0, n, w.elem_count())?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl NormBackward {
    fn run<T: KernelFloat>(&self, x: &[T], w: Option<&[T]>, dy: &[T], c: usize) -> CpuStorage {
        let n = x.len();
        let mut out = vec![T::default(); n + w.map_or(0, |w| w.len())];
        let (dx, dw) = out.split_at_mut(n);
        let dw = w.map(|_| dw);
        norm_backward(x, w, dy, dx, dw, c, self.0.eps, self.0.kind);
        T::storage(out)
    }
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "attend-norm-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s1.dtype(), "norm backward", |T| {
            let x = contiguous(T::slice(s1)?, l1, "norm input")?;
            let dy = contiguous(T::slice(s2)?, l2, "norm output gradient")?;
            Ok((self.run(x, None, dy, width(l1)), Shape::from(x.len())))
        })
    }
}

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        "attend-norm-affine-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s1.dtype(), "norm backward", |T| {
            let x = contiguous(T::slice(s1)?, l1, "norm input")?;
            let w = contiguous(T::slice(s2)?, l2, "norm weight")?;
            let dy = contiguous(T::slice(s3)?, l3, "norm output gradient")?;
            Ok((self.run(x, Some(w), dy, width(l1)), Shape::from(x.len() + w.len())))
        })
    }
}

fn check(op: &'static str, x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<()> {
    ensure!(
        x.rank() >= 1 && x.elem_count() > 0,
        op,
        "input must be non-empty with a last axis, got shape {:?}",
        x.dims()
    );
    let c = x.dim(x.rank() - 1)?;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t {
            ensure!(
                t.dims() == [c],
                op,
                "{name} has shape {:?}, expected ({c}) for input of shape {:?}",
                t.dims(),
                x.dims()
            );
            ensure!(
                t.dtype() == x.dtype(),
                op,
                "{name} dtype {:?} differs from input dtype {:?}",
                t.dtype(),
                x.dtype()
            );
        }
    }
    ensure!(eps >= 0.0 && eps.is_finite(), op, "eps must be finite and non-negative, got {eps}");
    Ok(())
}

fn fused(
    kind: NormKind,
    op: &'static str,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    check(op, x, weight, bias, eps)?;
    let norm = Norm { kind, eps };
    let y = in_kernel_dtype(x, op, |x| {
        let x = x.contiguous()?;
        Ok(match weight {
            Some(w) => x.apply_op2(&w.to_dtype(x.dtype())?.contiguous()?, norm)?,
            None => x.apply_op1(norm)?,
        })
    })?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Fused layer norm: `(x − μ)/√(σ² + eps) ⊙ weight + bias`.
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    fused(NormKind::Layer, "layer_norm", x, weight, bias, eps)
}

/// Fused RMS norm: `x/√(mean(x²) + eps) ⊙ weight`.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    fused(NormKind::Rms, "rms_norm", x, weight, None, eps)
}

fn reference(
    kind: NormKind,
    op: &'static str,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    check(op, x, weight, bias, eps)?;
    let last = x.rank() - 1;
    let centred = match kind {
        NormKind::Layer => x.broadcast_sub(&x.mean_keepdim(last)?)?,
        NormKind::Rms => x.clone(),
    };
    let var = centred.sqr()?.mean_keepdim(last)?;
    let mut y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// [`layer_norm`] composed from plain candle ops.
pub fn layer_norm_reference(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    reference(NormKind::Layer, "layer_norm_reference", x, weight, bias, eps)
}

/// [`rms_norm`] composed from plain candle ops.
pub fn rms_norm_reference(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    reference(NormKind::Rms, "rms_norm_reference", x, weight, None, eps)
}
