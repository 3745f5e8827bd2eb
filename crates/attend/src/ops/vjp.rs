//! A loss whose gradient is a given tensor: how candle, which only differentiates scalars, is asked for a
//! vector–Jacobian product (PyTorch's `out.backward(dout)`).
//!
//! The composed form `(out * dout).sum_all()` gets there too, but its backward materialises three tensors of
//! `out`'s size beside the graph (the product, the gradient of the product, and a gradient for `dout` that nobody
//! asked for), and `dout` itself stays alive beside the copy of it that candle's gradient store makes; at 32K tokens
//! those are 270 MB around an attention backward that needs none of them.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor};

use super::custom::contiguous;
use crate::error::shape_str;
use crate::{Error, Result};

/// `L = Σ out ⊙ dout`, a scalar whose gradient with respect to `out` is `dout` (times the gradient arriving at
/// `L`); `dout` is a constant: it gets no gradient, whether it is tracked or not.
///
/// `vjp_loss(&out, dout)?.backward()?` gives every tracked tensor upstream of `out` the gradient PyTorch's
/// `out.backward(dout)` gives it, without the element-wise product or the gradient of `dout` that
/// `(out * dout)?.sum_all()?.backward()` materialises. The loss owns `dout` until its backward hands it to
/// candle's gradient store (which copies it): pass the last reference and `dout`'s memory is freed then, so that
/// one tensor of `out`'s size, not two, lives through the rest of the backward. The backward of one loss runs
/// once; a second `backward()` of the same loss is an error. The value of `L` is accumulated in f64.
///
/// # Shapes
/// - `out`, `dout`: the same shape, any rank; the same float dtype (f32, f64, bf16 or f16).
/// - returns: a scalar (rank 0) of that dtype.
///
/// # Example
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
/// let out = x.as_tensor().sqr()?; // d out_i / d x_i = 2 x_i
/// let dout = Tensor::new(&[1f32, 0., -1.], &Device::Cpu)?;
/// let grads = attend::ops::vjp_loss(&out, dout)?.backward()?;
/// let dx: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1()?; // 2 x ⊙ dout
/// assert_eq!(dx, [2., 0., -6.]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn vjp_loss(out: &Tensor, dout: Tensor) -> Result<Tensor> {
    if out.dims() != dout.dims() {
        return Err(Error::invalid(
            "vjp_loss",
            format!("out {} and dout {} must have the same shape", shape_str(out), shape_str(&dout)),
        ));
    }
    if out.dtype() != dout.dtype() || !out.dtype().is_float() {
        return Err(Error::invalid(
            "vjp_loss",
            format!("out ({:?}) and dout ({:?}) must have the same float dtype", out.dtype(), dout.dtype()),
        ));
    }
    // The forward reads both contiguously; `dout` is a constant, so its copy (if any) stays out of the graph.
    let dout = dout.detach().contiguous()?;
    Ok(out.contiguous()?.apply_op1(VjpLoss { dout: Mutex::new(Some(dout)) })?)
}

/// `Σ out ⊙ dout` in f64, as a scalar of `out`'s dtype, whose backward hands `dout` (scaled by the gradient
/// arriving at the scalar) to `out`, once.
struct VjpLoss {
    dout: Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp1 for VjpLoss {
    fn name(&self) -> &'static str {
        "vjp-loss"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn dot<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
            a.iter().zip(b).map(|(&x, &y)| x.into() * y.into()).sum()
        }
        let cell = self.dout.lock().map_err(|_| candle_core::Error::Msg("vjp-loss: poisoned lock".into()))?;
        let Some(dout) = cell.as_ref() else { candle_core::bail!("vjp-loss: forward after backward") };
        let (storage, l2) = dout.storage_and_layout();
        let Storage::Cpu(s2) = &*storage else { candle_core::bail!("vjp-loss: dout is not on the CPU") };
        let sum = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => dot(contiguous(a, l1, "out")?, contiguous(b, l2, "dout")?),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => dot(contiguous(a, l1, "out")?, contiguous(b, l2, "dout")?),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => dot(contiguous(a, l1, "out")?, contiguous(b, l2, "dout")?),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => dot(contiguous(a, l1, "out")?, contiguous(b, l2, "dout")?),
            _ => candle_core::bail!("vjp-loss: unsupported dtypes {:?} and {:?}", s1.dtype(), s2.dtype()),
        };
        let scalar = match s1.dtype() {
            DType::F32 => CpuStorage::F32(vec![sum as f32]),
            DType::F64 => CpuStorage::F64(vec![sum]),
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::from_f64(sum)]),
            _ => CpuStorage::F16(vec![half::f16::from_f64(sum)]),
        };
        Ok((scalar, Shape::from(())))
    }

    fn bwd(&self, _out: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dout = self
            .dout
            .lock()
            .map_err(|_| candle_core::Error::Msg("vjp-loss: poisoned lock".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "vjp_loss: the backward of this loss already ran (it hands dout over once); build a new \
                     vjp_loss for another backward"
                        .into(),
                )
            })?;
        // The usual call is `L.backward()`, where the gradient at L is exactly 1: hand `dout` over as it is.
        let g = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(Some(if g == 1.0 { dout } else { dout.affine(g, 0.0)? }))
    }
}
