//! Fused LSTM and GRU cells (all gates of a step in one pass, forward and backward), each beside a composed
//! reference twin. The matrix products stay outside, in candle's GEMM; see `attend_kernels::rnn` for the equations.
//!
//! # Shapes
//! - [`lstm_cell`]: `gates (N, 4H)` (pre-activations, PyTorch's order i, f, g, o), `c (N, H)` → `(h', c')`, each
//!   `(N, H)`
//! - [`gru_cell`]: `gx (N, 3H)` (`W_ih x + b_ih`), `gh (N, 3H)` (`W_hh h + b_hh`), `h (N, H)` (order r, z, n) →
//!   `h' (N, H)`

use attend_kernels::rnn;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};

use super::custom::{contiguous, dispatch_float, in_kernel_dtype, KernelFloat};
use super::sigmoid;
use crate::error::shape_str;
use crate::{ensure, Result};

struct LstmCell {
    h: usize,
}
struct LstmCellBackward {
    h: usize,
}
struct GruCell {
    h: usize,
}
struct GruCellBackward {
    h: usize,
}

fn rows(l: &Layout) -> usize {
    l.dims().first().copied().unwrap_or(0)
}

impl CustomOp2 for LstmCell {
    fn name(&self) -> &'static str {
        "attend-lstm-cell"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(s1.dtype(), self.name(), |T| {
            let g = contiguous(T::slice(s1)?, l1, "lstm gates")?;
            let c = contiguous(T::slice(s2)?, l2, "lstm cell")?;
            let mut out = vec![0 as T; 2 * c.len()];
            rnn::lstm_cell_forward(g, c, &mut out, self.h);
            Ok((T::storage(out), Shape::from((rows(l2), 2 * self.h))))
        })
    }
    fn bwd(
        &self,
        gates: &Tensor,
        c: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let h = self.h;
        let packed = gates.apply_op3(c, &dout.contiguous()?, LstmCellBackward { h })?; // (N, 5H) = [dgates | dc]
        Ok((Some(packed.narrow(1, 0, 4 * h)?), Some(packed.narrow(1, 4 * h, h)?)))
    }
}

impl CustomOp3 for LstmCellBackward {
    fn name(&self) -> &'static str {
        "attend-lstm-cell-backward"
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
        let h = self.h;
        dispatch_float!(s1.dtype(), self.name(), |T| {
            let g = contiguous(T::slice(s1)?, l1, "lstm gates")?;
            let c = contiguous(T::slice(s2)?, l2, "lstm cell")?;
            let d = contiguous(T::slice(s3)?, l3, "lstm upstream gradient")?;
            let n = rows(l2);
            let (mut dg, mut dc) = (vec![0 as T; 4 * n * h], vec![0 as T; n * h]);
            rnn::lstm_cell_backward(g, c, d, &mut dg, &mut dc, h);
            let mut out = Vec::with_capacity(5 * n * h);
            for r in 0..n {
                out.extend_from_slice(&dg[r * 4 * h..(r + 1) * 4 * h]);
                out.extend_from_slice(&dc[r * h..(r + 1) * h]);
            }
            Ok((T::storage(out), Shape::from((n, 5 * h))))
        })
    }
}

impl CustomOp3 for GruCell {
    fn name(&self) -> &'static str {
        "attend-gru-cell"
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
        dispatch_float!(s1.dtype(), self.name(), |T| {
            let gx = contiguous(T::slice(s1)?, l1, "gru input gates")?;
            let gh = contiguous(T::slice(s2)?, l2, "gru hidden gates")?;
            let hp = contiguous(T::slice(s3)?, l3, "gru state")?;
            let mut out = vec![0 as T; hp.len()];
            rnn::gru_cell_forward(gx, gh, hp, &mut out, self.h);
            Ok((T::storage(out), l3.shape().clone()))
        })
    }
    fn bwd(
        &self,
        gx: &Tensor,
        gh: &Tensor,
        hp: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = self.h;
        // Four operands for a three-operand op: the two gate tensors travel side by side.
        let g = Tensor::cat(&[gx, gh], 1)?; // (N, 6H)
        let packed = g.apply_op3(hp, &dout.contiguous()?, GruCellBackward { h })?; // (N, 7H) = [dgx | dgh | dh]
        Ok((
            Some(packed.narrow(1, 0, 3 * h)?),
            Some(packed.narrow(1, 3 * h, 3 * h)?),
            Some(packed.narrow(1, 6 * h, h)?),
        ))
    }
}

impl CustomOp3 for GruCellBackward {
    fn name(&self) -> &'static str {
        "attend-gru-cell-backward"
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
        let h = self.h;
        dispatch_float!(s1.dtype(), self.name(), |T| {
            let g = contiguous(T::slice(s1)?, l1, "gru gates")?;
            let hp = contiguous(T::slice(s2)?, l2, "gru state")?;
            let d = contiguous(T::slice(s3)?, l3, "gru upstream gradient")?;
            let n = rows(l2);
            let (mut gx, mut gh) = (Vec::with_capacity(3 * n * h), Vec::with_capacity(3 * n * h));
            for r in 0..n {
                gx.extend_from_slice(&g[r * 6 * h..r * 6 * h + 3 * h]);
                gh.extend_from_slice(&g[r * 6 * h + 3 * h..(r + 1) * 6 * h]);
            }
            let (mut dgx, mut dgh, mut dh) = (vec![0 as T; 3 * n * h], vec![0 as T; 3 * n * h], vec![0 as T; n * h]);
            rnn::gru_cell_backward(&gx, &gh, hp, d, &mut dgx, &mut dgh, &mut dh, h);
            let mut out = Vec::with_capacity(7 * n * h);
            for r in 0..n {
                out.extend_from_slice(&dgx[r * 3 * h..(r + 1) * 3 * h]);
                out.extend_from_slice(&dgh[r * 3 * h..(r + 1) * 3 * h]);
                out.extend_from_slice(&dh[r * h..(r + 1) * h]);
            }
            Ok((T::storage(out), Shape::from((n, 7 * h))))
        })
    }
}

fn check_cell(op: &'static str, gates: &[(&str, &Tensor, usize)], state: (&str, &Tensor)) -> Result<usize> {
    let (sname, s) = state;
    ensure!(s.rank() == 2, op, "expected {sname} (N, H), got {sname} {}", shape_str(s));
    let (n, h) = s.dims2()?;
    for &(name, g, k) in gates {
        ensure!(
            g.dims() == [n, k * h],
            op,
            "{name} {} does not fit {sname} {}: expected ({n}, {})",
            shape_str(g),
            shape_str(s),
            k * h
        );
        ensure!(g.dtype() == s.dtype(), op, "{name} is {:?} but {sname} is {:?}", g.dtype(), s.dtype());
    }
    Ok(h)
}

/// Fused LSTM step; returns `(h', c')`.
pub fn lstm_cell(gates: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor)> {
    let h = check_cell("lstm cell", &[("gates", gates, 4)], ("c", c))?;
    let out = in_kernel_dtype(gates, "lstm cell", |g| {
        let c = c.to_dtype(g.dtype())?.contiguous()?;
        Ok(g.contiguous()?.apply_op2(&c, LstmCell { h })?)
    })?; // (N, 2H) = [h' | c']
    Ok((out.narrow(1, 0, h)?, out.narrow(1, h, h)?))
}

/// [`lstm_cell`] composed from plain candle ops.
pub fn lstm_cell_reference(gates: &Tensor, c: &Tensor) -> Result<(Tensor, Tensor)> {
    check_cell("lstm cell", &[("gates", gates, 4)], ("c", c))?;
    let g = gates.chunk(4, D::Minus1)?;
    let (i, f, gg, o) = (sigmoid(&g[0])?, sigmoid(&g[1])?, g[2].tanh()?, sigmoid(&g[3])?);
    let c1 = ((f * c)? + (i * gg)?)?;
    let h1 = (o * c1.tanh()?)?;
    Ok((h1, c1))
}

/// Fused GRU step; returns `h'`.
pub fn gru_cell(gx: &Tensor, gh: &Tensor, h: &Tensor) -> Result<Tensor> {
    let hw = check_cell("gru cell", &[("gx", gx, 3), ("gh", gh, 3)], ("h", h))?;
    in_kernel_dtype(gx, "gru cell", |x| {
        let gh = gh.to_dtype(x.dtype())?.contiguous()?;
        let h = h.to_dtype(x.dtype())?.contiguous()?;
        Ok(x.contiguous()?.apply_op3(&gh, &h, GruCell { h: hw })?)
    })
}

/// [`gru_cell`] composed from plain candle ops.
pub fn gru_cell_reference(gx: &Tensor, gh: &Tensor, h: &Tensor) -> Result<Tensor> {
    check_cell("gru cell", &[("gx", gx, 3), ("gh", gh, 3)], ("h", h))?;
    let (x, g) = (gx.chunk(3, D::Minus1)?, gh.chunk(3, D::Minus1)?);
    let r = sigmoid(&(&x[0] + &g[0])?)?;
    let z = sigmoid(&(&x[1] + &g[1])?)?;
    let n = (&x[2] + (r * &g[2])?)?.tanh()?;
    // h' = (1 − z) ⊙ n + z ⊙ h = n + z ⊙ (h − n)
    Ok((&n + (z * (h - &n)?)?)?)
}
