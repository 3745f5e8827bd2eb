//! `y = x Wᵀ + b` with the bias added by an op whose backward sums `dy` over rows with a matrix product: candle's
//! `broadcast_add` backward reduces over the leading axes with a strided scalar loop on one thread, which took ~16%
//! of a small GPT's training step. Up to [`attend_kernels::gemv::MAX_ROWS`] rows of f32 (batch-1 decoding) take a
//! streaming kernel that reads each weight once instead of packing it for a matrix product.
//!
//! # Shapes
//! `x (…, K)`, `weight (N, K)` (`nn.Linear`'s layout), `bias (N)` → `(…, N)`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, KernelFloat};
use crate::error::shape_str;
use crate::{ensure, Result};

/// `x (R, C) + b (C)`, row by row.
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "attend-bias-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s1.dtype(), "bias_add", |T| {
            let x = contiguous(T::slice(s1)?, l1, "bias_add input")?;
            let b = contiguous(T::slice(s2)?, l2, "bias_add bias")?;
            let mut y = x.to_vec();
            attend_kernels::bias::add_bias_rows(&mut y, b);
            Ok((T::storage(y), l1.shape().clone()))
        })
    }
    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = b.dim(0)?;
        let rows = dy.elem_count() / c.max(1);
        let dy2 = dy.reshape((rows, c))?; // (R, C)
        let ones = Tensor::ones((1, rows), dy.dtype(), dy.device())?;
        let db = ones.matmul(&dy2)?.reshape(c)?; // column sums by one product
        Ok((Some(dy.clone()), Some(db)))
    }
}

/// `x (R, K) Wᵀ + b` for `R ≤ MAX_ROWS` f32 rows, by [`attend_kernels::gemv::skinny_linear`].
struct SkinnyLinear;

impl CustomOp3 for SkinnyLinear {
    fn name(&self) -> &'static str {
        "attend-skinny-linear"
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
        let (r, k) = l1.shape().dims2()?;
        let (n, _) = l2.shape().dims2()?;
        let x = contiguous(s1.as_slice::<f32>()?, l1, "linear input")?;
        let w = contiguous(s2.as_slice::<f32>()?, l2, "linear weight")?;
        let b = contiguous(s3.as_slice::<f32>()?, l3, "linear bias")?;
        let mut y = vec![0f32; r * n];
        attend_kernels::gemv::skinny_linear(&x, r, k, &w, n, Some(&b), &mut y);
        Ok((CpuStorage::F32(y), Shape::from((r, n))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.matmul(w)?; // (R, N) · (N, K)
        let dw = dy.t()?.matmul(x)?; // (N, R) · (R, K)
        let db = dy.sum(0)?; // (N)
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

fn check(op: &'static str, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize)> {
    ensure!(weight.rank() == 2, op, "weight {} must be (N, K)", shape_str(weight));
    let (n, k) = weight.dims2()?;
    ensure!(
        x.rank() >= 1 && x.dims()[x.rank() - 1] == k,
        op,
        "x {} must end in K = {k} to match weight {}",
        shape_str(x),
        shape_str(weight)
    );
    if let Some(b) = bias {
        ensure!(b.dims() == [n], op, "bias {} must be (N) = ({n}) for weight {}", shape_str(b), shape_str(weight));
    }
    Ok((n, k))
}

/// `x Wᵀ + b` (fused bias backward; see the module docs).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = check("linear", x, weight, bias)?;
    let mut lead = x.dims().to_vec();
    lead.pop();
    let rows: usize = lead.iter().product();
    if rows <= attend_kernels::gemv::MAX_ROWS && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        let b = match bias {
            Some(b) => b.to_dtype(DType::F32)?,
            None => Tensor::zeros(n, DType::F32, x.device())?,
        };
        let y = x.reshape((rows, k))?.apply_op3(weight, &b, SkinnyLinear)?; // (R, N)
        lead.push(n);
        return Ok(y.reshape(lead)?);
    }
    let y = x.reshape((rows, k))?.matmul(&weight.t()?)?; // (R, N)
    let y = match bias {
        Some(b) if matches!(y.dtype(), candle_core::DType::F32 | candle_core::DType::F64) => {
            y.apply_op2(&b.contiguous()?, BiasAdd)?
        }
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    lead.push(n);
    Ok(y.reshape(lead)?) // (…, N)
}

/// [`linear`] composed from plain candle ops (`broadcast_add` for the bias).
pub fn linear_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    check("linear_reference", x, weight, bias)?;
    let y = x.broadcast_matmul(&weight.t()?)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
