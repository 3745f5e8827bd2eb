//! Sparse normalisers over the last axis: sparsemax (Martins & Astudillo 2016) and 1.5-entmax (Peters et al.
//! 2019), fused with exact backward passes, each beside a composed reference twin.
//!
//! Both give probability distributions that may put exactly zero on poor scores. A mask hides entries (weight 0,
//! gradient 0); a fully-masked row gives zeros; a NaN or +∞ in a row's visible scores makes the row NaN. See
//! `attend_kernels::sparse` for the thresholds and the Jacobians.
//!
//! # Shapes
//! `x`: any shape `(…, N)`; a mask broadcasts to the shape of `x`; the output has the shape of `x`.

use attend_kernels::sparse::{sparse_backward, sparse_forward, SparseKind};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, in_kernel_dtype, Binary, KernelFloat};
use crate::attention::mask::MaskTensor;
use crate::{ensure, Result};

struct Sparse(SparseKind);

impl Sparse {
    fn backward(&self, y: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        fn sparsemax<T: attend_kernels::Real>(y: &[T], dy: &[T], dx: &mut [T], n: usize) {
            sparse_backward(SparseKind::Sparsemax, y, dy, dx, n)
        }
        fn entmax15<T: attend_kernels::Real>(y: &[T], dy: &[T], dx: &mut [T], n: usize) {
            sparse_backward(SparseKind::Entmax15, y, dy, dx, n)
        }
        let op = match self.0 {
            SparseKind::Sparsemax => Binary { name: "attend-sparsemax-backward", f32: sparsemax, f64: sparsemax },
            SparseKind::Entmax15 => Binary { name: "attend-entmax15-backward", f32: entmax15, f64: entmax15 },
        };
        op.apply(y, dy)
    }
}

impl CustomOp1 for Sparse {
    fn name(&self) -> &'static str {
        match self.0 {
            SparseKind::Sparsemax => "attend-sparsemax",
            SparseKind::Entmax15 => "attend-entmax15",
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s.dtype(), self.name(), |T| {
            let x = contiguous(T::slice(s)?, l, "sparse normaliser input")?;
            let mut y = vec![0 as T; x.len()];
            sparse_forward(self.0, x, &mut y, l.dims().last().copied().unwrap_or(1));
            Ok((T::storage(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(y, dy)?))
    }
}

fn check(x: &Tensor, op: &'static str) -> Result<()> {
    ensure!(
        x.rank() >= 1 && x.elem_count() > 0,
        op,
        "needs a non-empty tensor with at least one axis, got shape {:?}",
        x.dims()
    );
    Ok(())
}

fn fused(x: &Tensor, mask: Option<&MaskTensor>, kind: SparseKind, op: &'static str) -> Result<Tensor> {
    check(x, op)?;
    in_kernel_dtype(x, op, |x| {
        // Hidden entries become −∞ (replaced, not added to), which both kernels read as "weight 0"; the gradient
        // reaching a replaced entry is zero through `where`.
        let x = match mask {
            None => x.clone(),
            Some(m) => m.apply_to(x, op)?,
        };
        Ok(x.contiguous()?.apply_op1(Sparse(kind))?)
    })
}

/// Fused sparsemax over the last axis, with an optional mask.
pub fn sparsemax(x: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
    fused(x, mask, SparseKind::Sparsemax, "sparsemax")
}

/// Fused 1.5-entmax over the last axis, with an optional mask.
pub fn entmax15(x: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
    fused(x, mask, SparseKind::Entmax15, "entmax15")
}

/// The threshold machinery shared by the reference twins: the masked row `z` (hidden entries −∞), its entries
/// sorted descending with −∞ replaced by a finite stand-in (so cumulative sums stay finite), `k = 1..N` as a row,
/// and the rows that see nothing.
struct Sorted {
    z: Tensor,
    zs: Tensor,
    k: Tensor,
    dead: Tensor,
}

fn sorted(x: &Tensor, mask: Option<&MaskTensor>, op: &'static str) -> Result<Sorted> {
    check(x, op)?;
    let last = x.rank() - 1;
    let n = x.dim(last)?;
    let z = match mask {
        None => x.clone(),
        Some(m) => m.apply_to(x, op)?,
    };
    let hidden = z.eq(f64::NEG_INFINITY)?;
    let dead = hidden.to_dtype(DType::U32)?.sum_keepdim(last)?.eq(n as u32)?;
    // A hidden entry sorts last and never enters a support; any finite value far below the row works as its
    // stand-in for the cumulative sums (beyond the support they are never read).
    let floor = hidden.where_cond(&z.zeros_like()?, &z)?;
    let low = (floor.min_keepdim(last)?.detach() - 1e4)?;
    let zf = hidden.where_cond(&low.broadcast_as(z.shape())?, &z)?;
    let order = zf.arg_sort_last_dim(false)?;
    let zs = zf.contiguous()?.gather(&order, last)?;
    let k = Tensor::arange(1u32, n as u32 + 1, x.device())?.to_dtype(x.dtype())?;
    Ok(Sorted { z, zs, k, dead })
}

/// Picks, per row, entry `count − 1` of `v` (the threshold at the support size).
fn at_support(v: &Tensor, count: &Tensor) -> Result<Tensor> {
    let last = v.rank() - 1;
    let idx = (count.clamp(1f64, f64::MAX)? - 1.0)?.to_dtype(DType::U32)?;
    Ok(v.contiguous()?.gather(&idx, last)?)
}

fn zero_dead(y: &Tensor, dead: &Tensor) -> Result<Tensor> {
    Ok(dead.broadcast_as(y.shape())?.where_cond(&y.zeros_like()?, y)?)
}

/// [`sparsemax`] composed from plain differentiable candle ops: sort, cumulative sum, the support size as a
/// count of a comparison, `τ = (cumsum_k − 1)/k` gathered at it, `[z − τ]₊`. The gradient reaches `τ` through the
/// gather of the cumulative sum, which is the exact Jacobian.
pub fn sparsemax_reference(x: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
    let Sorted { z, zs, k, dead } = sorted(x, mask, "sparsemax_reference")?;
    let last = x.rank() - 1;
    let cs = zs.cumsum(last)?;
    let support = (zs.broadcast_mul(&k)? + 1.0)?.gt(&cs)?.to_dtype(x.dtype())?.sum_keepdim(last)?;
    let tau = ((at_support(&cs, &support)? - 1.0)? / support.clamp(1f64, f64::MAX)?)?;
    let y = z.broadcast_sub(&tau)?.relu()?;
    zero_dead(&y, &dead)
}

/// [`entmax15`] composed from plain differentiable candle ops: on the halved sorted scores, for each support size
/// `k`, `τ_k = mean_k − √((1 − k·var_k)/k)`; the support is the number of `k` with `τ_k ≤ y_(k)`; `[z/2 − τ]₊²`.
pub fn entmax15_reference(x: &Tensor, mask: Option<&MaskTensor>) -> Result<Tensor> {
    let Sorted { z, zs, k, dead } = sorted(x, mask, "entmax15_reference")?;
    let last = x.rank() - 1;
    // Shift by the row maximum (the distribution is shift-invariant) so the squares stay small.
    let top = zs.narrow(last, 0, 1)?.detach();
    let ys = (zs.broadcast_sub(&top)? * 0.5)?;
    let mean = ys.cumsum(last)?.broadcast_div(&k)?;
    let meansq = ys.sqr()?.cumsum(last)?.broadcast_div(&k)?;
    let var = (meansq - mean.sqr()?)?;
    let delta = (var.broadcast_mul(&k)?.affine(-1.0, 1.0)?).broadcast_div(&k)?;
    // √max(δ, 0) without the 0/0 that sqrt's backward makes at δ ≤ 0 (those support sizes are never chosen, but
    // the gather's backward still visits them).
    let pos = delta.gt(0.0)?;
    let root = pos.where_cond(&pos.where_cond(&delta, &delta.ones_like()?)?.sqrt()?, &delta.zeros_like()?)?;
    let tau = (mean - root)?;
    let support = tau.le(&ys)?.to_dtype(x.dtype())?.sum_keepdim(last)?;
    let tau = at_support(&tau, &support)?;
    let y = (z.broadcast_sub(&top)? * 0.5)?.broadcast_sub(&tau)?.relu()?.sqr()?;
    zero_dead(&y, &dead)
}
