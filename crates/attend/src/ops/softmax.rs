//! Softmax and log-softmax over the last axis; softmax takes an optional mask.
//!
//! `y_j = exp(x_j + m_j − M) / Σ_k exp(x_k + m_k − M)`, with `M` the row maximum. Masked entries count as −∞; a
//! fully-masked row gives `y = 0` (not NaN) and zero gradient, the convention of the attention core.
//!
//! # Shapes
//! `x`: any shape `(…, N)`; a mask broadcasts to the shape of `x`; `y` has the shape of `x`.

use attend_kernels::softmax::{self as k, RowMask};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, in_kernel_dtype, row_offsets, Binary, KernelFloat};
pub use crate::attention::mask::MaskTensor;
use crate::{ensure, Result};

struct Softmax;
struct MaskedSoftmax {
    additive: bool,
}
struct LogSoftmax;

fn softmax_backward(y: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    Binary { name: "attend-softmax-backward", f32: k::softmax_backward, f64: k::softmax_backward }.apply(y, dy)
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "attend-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s.dtype(), "softmax", |T| {
            let x = contiguous(T::slice(s)?, l, "softmax input")?;
            let mut y = vec![0 as T; x.len()];
            k::softmax_forward(x, RowMask::None, &mut y, None, last_dim(l));
            Ok((T::storage(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(softmax_backward(y, dy)?))
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "attend-masked-softmax"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (offsets, col_stride) = row_offsets(l2);
        dispatch_float!(s1.dtype(), "softmax", |T| {
            let x = contiguous(T::slice(s1)?, l1, "softmax input")?;
            let mask = match (self.additive, s2) {
                (false, CpuStorage::U8(m)) => RowMask::Keep { data: m, row_offsets: &offsets, col_stride },
                (true, m) => RowMask::Additive { data: T::slice(m)?, row_offsets: &offsets, col_stride },
                (false, m) => {
                    candle_core::bail!("softmax: boolean mask must be u8, got {:?}", m.dtype())
                }
            };
            let mut y = vec![0 as T; x.len()];
            k::softmax_forward(x, mask, &mut y, None, last_dim(l1));
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        _x: &Tensor,
        mask: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = softmax_backward(y, dy)?;
        // A hidden entry was replaced, not added to: nothing flows back to it (y·(dy − ⟨dy, y⟩) would be NaN there
        // when the row is NaN). The mask is a broadcast view; `where` reads it through its strides.
        let hidden = if self.additive { mask.eq(f64::NEG_INFINITY)? } else { mask.eq(0u8)? };
        let dx = hidden.where_cond(&dx.zeros_like()?, &dx)?;
        // d(x + m) = dx: an additive mask gets the same gradient, and only if something upstream wants it.
        let dmask = (self.additive && mask.track_op()).then(|| dx.clone());
        Ok((Some(dx), dmask))
    }
}

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "attend-log-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s.dtype(), "log_softmax", |T| {
            let x = contiguous(T::slice(s)?, l, "log_softmax input")?;
            let mut y = vec![0 as T; x.len()];
            k::log_softmax_forward(x, &mut y, last_dim(l));
            Ok((T::storage(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            Binary { name: "attend-log-softmax-backward", f32: k::log_softmax_backward, f64: k::log_softmax_backward }
                .apply(y, dy)?,
        ))
    }
}

fn check_rank(x: &Tensor, op: &'static str) -> Result<()> {
    ensure!(
        x.rank() >= 1 && x.elem_count() > 0,
        op,
        "needs a non-empty tensor with at least one axis, got shape {:?}",
        x.dims()
    );
    Ok(())
}

/// Fused softmax over the last axis, with an optional mask (see the module docs).
pub fn softmax(x: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
    check_rank(x, "softmax")?;
    in_kernel_dtype(x, "softmax", |x| {
        let x = x.contiguous()?;
        Ok(match mask {
            None => x.apply_op1(Softmax)?,
            Some(m) => match m.broadcast_to(x.shape(), x.dtype(), "softmax")? {
                MaskTensor::Keep(m) => x.apply_op2(&m, MaskedSoftmax { additive: false })?,
                MaskTensor::Additive(m) => x.apply_op2(&m, MaskedSoftmax { additive: true })?,
            },
        })
    })
}

/// [`softmax`] composed from plain candle ops: the reference twin.
pub fn softmax_reference(x: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
    check_rank(x, "softmax_reference")?;
    let last = x.rank() - 1;
    let s = match mask {
        None => x.clone(),
        Some(m) => m.apply_to(x, "softmax_reference")?,
    };
    let max = s.max_keepdim(last)?;
    // A fully-masked row has max −∞; shifting it by 0 instead keeps exp(−∞) = 0 and the row sum 0.
    let dead = max.eq(f64::NEG_INFINITY)?;
    let max = dead.where_cond(&max.zeros_like()?, &max)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(last)?;
    let sum = sum.eq(0.0)?.where_cond(&sum.ones_like()?, &sum)?;
    Ok(e.broadcast_div(&sum)?)
}

/// Fused log-softmax over the last axis.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    check_rank(x, "log_softmax")?;
    in_kernel_dtype(x, "log_softmax", |x| Ok(x.contiguous()?.apply_op1(LogSoftmax)?))
}

/// [`log_softmax`] composed from plain candle ops.
pub fn log_softmax_reference(x: &Tensor) -> Result<Tensor> {
    check_rank(x, "log_softmax_reference")?;
    let last = x.rank() - 1;
    let max = x.max_keepdim(last)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(last)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Natural-log sum-exp of each row of `x` (last axis), −∞ for rows that are entirely −∞. Not differentiable: it
/// reports statistics (the attention core's `lse`). Output shape: `x` without its last axis.
pub fn logsumexp_rows(x: &Tensor) -> Result<Tensor> {
    check_rank(x, "logsumexp_rows")?;
    let dims = x.dims().to_vec();
    let n = *dims.last().unwrap_or(&1);
    let v: Vec<f64> = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut y = vec![0f64; v.len()];
    let mut lse = vec![0f64; v.len() / n];
    k::softmax_forward(&v, RowMask::None, &mut y, Some(&mut lse), n);
    let out = Tensor::from_vec(lse, &dims[..dims.len() - 1], x.device())?;
    // Statistics are reported in f32 at least.
    Ok(out.to_dtype(if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 })?)
}
