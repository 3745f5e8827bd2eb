//! The weighted sum of graph attention over an edge list, fused: `out[i] = Σ_{j → i} α_ji · x_j` per head, with a
//! hand-written backward, and its composed twin (`index_select`, multiply, `index_add`), which materialises the
//! `(E, H, C)` messages. See `attend_kernels::graph`.
//!
//! # Shapes
//! `x (N, H, C)`, `alpha (E, H)`, `src`, `dst (E)` u32 → `(M, H, C)`

use attend_kernels::graph as k;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::custom::{contiguous, dispatch_float, KernelFloat};
use crate::error::shape_str;
use crate::{ensure, Result};

struct EdgeAggregate {
    src: Vec<u32>,
    dst: Vec<u32>,
    m: usize,
}

impl CustomOp2 for EdgeAggregate {
    fn name(&self) -> &'static str {
        "attend-edge-aggregate"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, c) = l1.shape().dims3()?;
        dispatch_float!(s1.dtype(), self.name(), |T| {
            let x = contiguous(T::slice(s1)?, l1, "edge messages")?;
            let a = contiguous(T::slice(s2)?, l2, "edge weights")?;
            let mut out = vec![0 as T; self.m * h * c];
            k::edge_aggregate_forward(x, a, &self.src, &self.dst, h, c, &mut out);
            Ok((T::storage(out), Shape::from((self.m, h, c))))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, h, c) = x.dims3()?;
        let e = self.src.len();
        let dev = x.device();
        macro_rules! run {
            ($t:ty) => {{
                let (xv, av, dv) = (
                    x.flatten_all()?.to_vec1::<$t>()?,
                    alpha.flatten_all()?.to_vec1::<$t>()?,
                    dout.contiguous()?.flatten_all()?.to_vec1::<$t>()?,
                );
                let (mut dx, mut da) = (vec![0 as $t; n * h * c], vec![0 as $t; e * h]);
                k::edge_aggregate_backward(&xv, &av, &self.src, &self.dst, h, c, &dv, &mut dx, &mut da);
                (Tensor::from_vec(dx, (n, h, c), dev)?, Tensor::from_vec(da, (e, h), dev)?)
            }};
        }
        let (dx, da) = match x.dtype() {
            candle_core::DType::F32 => run!(f32),
            candle_core::DType::F64 => run!(f64),
            dt => candle_core::bail!("edge aggregate: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(da)))
    }
}

fn check(x: &Tensor, alpha: &Tensor, src: &[u32], dst: &[u32], m: usize) -> Result<()> {
    const OP: &str = "edge aggregate";
    ensure!(
        x.rank() == 3 && alpha.rank() == 2,
        OP,
        "expected x (N, H, C) and alpha (E, H), got {} and {}",
        shape_str(x),
        shape_str(alpha)
    );
    let (n, h, _) = x.dims3()?;
    ensure!(
        alpha.dims() == [src.len(), h] && dst.len() == src.len(),
        OP,
        "alpha {} does not fit {} edges and H = {h}",
        shape_str(alpha),
        src.len()
    );
    ensure!(
        src.iter().all(|&s| (s as usize) < n) && dst.iter().all(|&d| (d as usize) < m),
        OP,
        "an edge index is out of range (N = {n}, M = {m})"
    );
    Ok(())
}

/// Fused weighted sum over edges into `m` target nodes.
pub fn edge_aggregate(x: &Tensor, alpha: &Tensor, src: &[u32], dst: &[u32], m: usize) -> Result<Tensor> {
    check(x, alpha, src, dst, m)?;
    let op = EdgeAggregate { src: src.to_vec(), dst: dst.to_vec(), m };
    Ok(x.contiguous()?.apply_op2(&alpha.to_dtype(x.dtype())?.contiguous()?, op)?)
}

/// [`edge_aggregate`] composed from plain candle ops.
pub fn edge_aggregate_reference(x: &Tensor, alpha: &Tensor, src: &[u32], dst: &[u32], m: usize) -> Result<Tensor> {
    check(x, alpha, src, dst, m)?;
    let (_, h, c) = x.dims3()?;
    let dev = x.device();
    let (s, d) = (Tensor::from_slice(src, src.len(), dev)?, Tensor::from_slice(dst, dst.len(), dev)?);
    let messages = x.index_select(&s, 0)?.broadcast_mul(&alpha.unsqueeze(2)?)?; // (E, H, C)
    Ok(Tensor::zeros((m, h, c), x.dtype(), dev)?.index_add(&d, &messages, 0)?)
}

struct PairScores {
    src: Vec<u32>,
    dst: Vec<u32>,
    slope: f64,
}

impl candle_core::CustomOp3 for PairScores {
    fn name(&self) -> &'static str {
        "attend-gatv2-pair-scores"
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
        let (_, h, c) = l1.shape().dims3()?;
        dispatch_float!(s1.dtype(), self.name(), |T| {
            let (xl, xr) = (contiguous(T::slice(s1)?, l1, "xl")?, contiguous(T::slice(s2)?, l2, "xr")?);
            let att = contiguous(T::slice(s3)?, l3, "att")?;
            let mut out = vec![0 as T; self.src.len() * h];
            k::pair_scores_forward(xl, xr, att, &self.src, &self.dst, h, c, self.slope as T, &mut out);
            Ok((T::storage(out), Shape::from((self.src.len(), h))))
        })
    }
    fn bwd(
        &self,
        xl: &Tensor,
        xr: &Tensor,
        att: &Tensor,
        _out: &Tensor,
        ds: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, h, c) = xl.dims3()?;
        let dev = xl.device();
        macro_rules! run {
            ($t:ty) => {{
                let v = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<$t>();
                let (a, b, w, g) = (v(xl)?, v(xr)?, v(att)?, v(ds)?);
                let (mut dl, mut dr, mut da) =
                    (vec![0 as $t; n * h * c], vec![0 as $t; n * h * c], vec![0 as $t; h * c]);
                k::pair_scores_backward(
                    &a,
                    &b,
                    &w,
                    &self.src,
                    &self.dst,
                    h,
                    c,
                    self.slope as $t,
                    &g,
                    &mut dl,
                    &mut dr,
                    &mut da,
                );
                (
                    Tensor::from_vec(dl, (n, h, c), dev)?,
                    Tensor::from_vec(dr, (n, h, c), dev)?,
                    Tensor::from_vec(da, att.shape(), dev)?,
                )
            }};
        }
        let (a, b, w) = match xl.dtype() {
            candle_core::DType::F32 => run!(f32),
            candle_core::DType::F64 => run!(f64),
            dt => candle_core::bail!("gatv2 scores: unsupported dtype {dt:?}"),
        };
        Ok((Some(a), Some(b), Some(w)))
    }
}

/// GATv2's scores `s[e, h] = Σ_c a[h, c] · LeakyReLU(xl[src(e), h, c] + xr[dst(e), h, c])`, fused (no `(E, H, C)`
/// pairs), with a hand-written backward.
///
/// # Shapes
/// `xl`, `xr (N, H, C)`, `att` with `H · C` elements → `(E, H)`
pub fn gatv2_scores(xl: &Tensor, xr: &Tensor, att: &Tensor, src: &[u32], dst: &[u32], slope: f64) -> Result<Tensor> {
    const OP: &str = "gatv2 scores";
    ensure!(
        xl.rank() == 3 && xl.dims() == xr.dims(),
        OP,
        "xl {} and xr {} must be (N, H, C) alike",
        shape_str(xl),
        shape_str(xr)
    );
    let (n, h, c) = xl.dims3()?;
    ensure!(att.elem_count() == h * c, OP, "att {} does not hold H·C = {} values", shape_str(att), h * c);
    ensure!(
        src.len() == dst.len() && src.iter().chain(dst).all(|&v| (v as usize) < n),
        OP,
        "an edge index is out of range for N = {n}"
    );
    let op = PairScores { src: src.to_vec(), dst: dst.to_vec(), slope };
    Ok(xl.contiguous()?.apply_op3(&xr.contiguous()?, &att.to_dtype(xl.dtype())?.contiguous()?, op)?)
}

/// [`gatv2_scores`] composed from plain candle ops (materialises the pairs).
pub fn gatv2_scores_reference(
    xl: &Tensor,
    xr: &Tensor,
    att: &Tensor,
    src: &[u32],
    dst: &[u32],
    slope: f64,
) -> Result<Tensor> {
    let dev = xl.device();
    let (_, h, c) = xl.dims3()?;
    let (s, d) = (Tensor::from_slice(src, src.len(), dev)?, Tensor::from_slice(dst, dst.len(), dev)?);
    let z = (xl.index_select(&s, 0)? + xr.index_select(&d, 0)?)?; // (E, H, C)
    let r = z.relu()?;
    let leaky = (&r + ((&z - &r)? * slope)?)?;
    Ok(leaky.broadcast_mul(&att.reshape((1, h, c))?)?.sum(2)?)
}
