//! Whole-sequence LSTM and GRU ops (one direction of one layer): the recurrence of every step in one candle op
//! with a hand-written backward (`attend_kernels::rnn_seq`), instead of a graph of per-step ops whose backward
//! allocates and adds a weight gradient per step. The input half of the gates, `x W_ihᵀ + b`, stays a candle matmul
//! outside (one large product, autograd as usual).
//!
//! The composed twin of these ops is the per-step path over [`super::lstm_cell_reference`] and
//! [`super::gru_cell_reference`] (`CellImpl::Reference` of the recurrent layers); the tests compare both.
//!
//! # Shapes
//! - LSTM: `gx (B, T, 4H)`, `w_hh (4H, H)`, `bias (4H)`, `h0`, `c0 (B, H)` → `y (B, T, H)`, `h_n`, `c_n (B, H)`
//! - GRU: `gx (B, T, 3H)`, `w_hh (3H, H)`, `b_ih`, `b_hh (3H)`, `h0 (B, H)` → `y (B, T, H)`, `h_n (B, H)`

use std::sync::Mutex;

use attend_kernels::rnn_seq::{self as k, SeqDims, SeqSaved};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::custom::{contiguous, KernelFloat};
use crate::error::shape_str;
use crate::{bail, ensure, Result};

/// The forward's saved activations, in the op's dtype.
#[derive(Debug)]
enum Saved {
    F32(SeqSaved<f32>),
    F64(SeqSaved<f64>),
}

trait SavedOf: Sized {
    fn wrap(s: SeqSaved<Self>) -> Saved;
    fn unwrap(s: &Saved) -> Option<&SeqSaved<Self>>;
}

impl SavedOf for f32 {
    fn wrap(s: SeqSaved<f32>) -> Saved {
        Saved::F32(s)
    }
    fn unwrap(s: &Saved) -> Option<&SeqSaved<f32>> {
        match s {
            Saved::F32(x) => Some(x),
            _ => None,
        }
    }
}

impl SavedOf for f64 {
    fn wrap(s: SeqSaved<f64>) -> Saved {
        Saved::F64(s)
    }
    fn unwrap(s: &Saved) -> Option<&SeqSaved<f64>> {
        match s {
            Saved::F64(x) => Some(x),
            _ => None,
        }
    }
}

/// Which recurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    Lstm,
    Gru,
}

struct Sequence {
    cell: Cell,
    dims: SeqDims,
    lengths: Vec<usize>,
    saved: Mutex<Option<Saved>>,
}

fn vec_of<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.contiguous()?.flatten_all()?.to_vec1::<T>()
}

impl Sequence {
    fn forward<T: KernelFloat + SavedOf>(
        &self,
        gx: &[T],
        w: &[T],
        state: &[T],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let SeqDims { b, t, h, .. } = self.dims;
        let (wm, biases) = split_columns(w, h, self.extra_columns());
        let gx = &with_bias(gx, &biases[self.input_bias()]);
        let mut saved = SeqSaved::default();
        let mut y = vec![T::ZERO; b * t * h];
        // Output rows per sequence: T steps, then h_n (and c_n).
        let extra = if self.cell == Cell::Lstm { 2 } else { 1 };
        let mut hs: Vec<T> = (0..b).flat_map(|r| state[r * extra * h..r * extra * h + h].to_vec()).collect();
        match self.cell {
            Cell::Lstm => {
                let mut cs: Vec<T> = (0..b).flat_map(|r| state[r * 2 * h + h..(r + 1) * 2 * h].to_vec()).collect();
                k::lstm_sequence_forward(self.dims, gx, &wm, &self.lengths, &mut hs, &mut cs, &mut y, &mut saved);
                let mut out = Vec::with_capacity(b * (t + 2) * h);
                for r in 0..b {
                    out.extend_from_slice(&y[r * t * h..(r + 1) * t * h]);
                    out.extend_from_slice(&hs[r * h..(r + 1) * h]);
                    out.extend_from_slice(&cs[r * h..(r + 1) * h]);
                }
                *self.saved.lock().expect("saved activations") = Some(T::wrap(saved));
                Ok((T::storage(out), Shape::from((b, t + 2, h))))
            }
            Cell::Gru => {
                k::gru_sequence_forward(self.dims, gx, &wm, &biases[0], &self.lengths, &mut hs, &mut y, &mut saved);
                let mut out = Vec::with_capacity(b * (t + 1) * h);
                for r in 0..b {
                    out.extend_from_slice(&y[r * t * h..(r + 1) * t * h]);
                    out.extend_from_slice(&hs[r * h..(r + 1) * h]);
                }
                *self.saved.lock().expect("saved activations") = Some(T::wrap(saved));
                Ok((T::storage(out), Shape::from((b, t + 1, h))))
            }
        }
    }

    fn backward<T: KernelFloat + SavedOf>(
        &self,
        gx: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let SeqDims { b, t, h, .. } = self.dims;
        let guard = self.saved.lock().expect("saved activations");
        let Some(saved) = guard.as_ref().and_then(T::unwrap) else {
            candle_core::bail!("rnn sequence backward: the forward's activations are missing")
        };
        let g: Vec<T> = vec_of(grad)?;
        let extra = if self.cell == Cell::Lstm { 2 } else { 1 };
        let row = (t + extra) * h;
        let dy: Vec<T> = (0..b).flat_map(|r| g[r * row..r * row + t * h].to_vec()).collect();
        let mut dh: Vec<T> = (0..b).flat_map(|r| g[r * row + t * h..r * row + (t + 1) * h].to_vec()).collect();
        let dev = gx.device();
        let (wm, biases) = split_columns(&vec_of::<T>(w)?, h, self.extra_columns());
        match self.cell {
            Cell::Lstm => {
                let mut dc: Vec<T> = (0..b).flat_map(|r| g[r * row + (t + 1) * h..(r + 1) * row].to_vec()).collect();
                let (mut dgx, mut dw) = (vec![T::ZERO; b * t * 4 * h], vec![T::ZERO; 4 * h * h]);
                k::lstm_sequence_backward(
                    self.dims,
                    &wm,
                    &self.lengths,
                    saved,
                    &dy,
                    &mut dh,
                    &mut dc,
                    &mut dgx,
                    &mut dw,
                );
                let dstate: Vec<T> =
                    (0..b).flat_map(|r| [&dh[r * h..(r + 1) * h], &dc[r * h..(r + 1) * h]].concat()).collect();
                let db = column_sums(&dgx, 4 * h);
                Ok((
                    Tensor::from_vec(dgx, (b, t, 4 * h), dev)?,
                    Tensor::from_vec(join_columns(&dw, h, &[&db]), (4 * h, h + 1), dev)?,
                    Tensor::from_vec(dstate, (b, 2 * h), dev)?,
                ))
            }
            Cell::Gru => {
                let gxv = with_bias(&vec_of::<T>(gx)?, &biases[1]);
                let (mut dgx, mut dw, mut db) =
                    (vec![T::ZERO; b * t * 3 * h], vec![T::ZERO; 3 * h * h], vec![T::ZERO; 3 * h]);
                k::gru_sequence_backward(
                    self.dims,
                    &gxv,
                    &wm,
                    &self.lengths,
                    saved,
                    &dy,
                    &mut dh,
                    &mut dgx,
                    &mut dw,
                    &mut db,
                );
                let db_ih = column_sums(&dgx, 3 * h);
                Ok((
                    Tensor::from_vec(dgx, (b, t, 3 * h), dev)?,
                    Tensor::from_vec(join_columns(&dw, h, &[&db, &db_ih]), (3 * h, h + 2), dev)?,
                    Tensor::from_vec(dh, (b, h), dev)?,
                ))
            }
        }
    }
}

impl Sequence {
    /// Bias columns the weight operand carries: LSTM `[W_hh | b_ih + b_hh]`, GRU `[W_hh | b_hh | b_ih]`.
    fn extra_columns(&self) -> usize {
        match self.cell {
            Cell::Lstm => 1,
            Cell::Gru => 2,
        }
    }

    /// Which bias column is added to the input half of the gates.
    fn input_bias(&self) -> usize {
        match self.cell {
            Cell::Lstm => 0,
            Cell::Gru => 1,
        }
    }
}

/// `(R, H + e)` → `W (R, H)` and the `e` columns after it.
fn split_columns<T: Copy>(w: &[T], h: usize, e: usize) -> (Vec<T>, Vec<Vec<T>>) {
    let rows = w.len() / (h + e);
    let mut wm = Vec::with_capacity(rows * h);
    let mut cols = vec![Vec::with_capacity(rows); e];
    for row in w.chunks_exact(h + e) {
        wm.extend_from_slice(&row[..h]);
        cols.iter_mut().enumerate().for_each(|(i, c)| c.push(row[h + i]));
    }
    (wm, cols)
}

/// `W (R, H)` with columns appended: `(R, H + e)`.
fn join_columns<T: Copy>(w: &[T], h: usize, cols: &[&[T]]) -> Vec<T> {
    let mut out = Vec::with_capacity(w.len() + cols.len() * w.len() / h);
    for (r, row) in w.chunks_exact(h).enumerate() {
        out.extend_from_slice(row);
        out.extend(cols.iter().map(|c| c[r]));
    }
    out
}

/// Every row of width `bias.len()` plus `bias`.
fn with_bias<T: KernelFloat>(x: &[T], bias: &[T]) -> Vec<T> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
    }
    out
}

/// The sum of the rows of width `w` (the gradient of a bias added to every row).
fn column_sums<T: KernelFloat>(x: &[T], w: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; w];
    for row in x.chunks_exact(w) {
        out.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
    }
    out
}

impl CustomOp3 for Sequence {
    fn name(&self) -> &'static str {
        match self.cell {
            Cell::Lstm => "attend-lstm-sequence",
            Cell::Gru => "attend-gru-sequence",
        }
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
        match s1.dtype() {
            DType::F32 => {
                let (a, b, c) = (
                    contiguous(f32::slice(s1)?, l1, "gx")?,
                    contiguous(f32::slice(s2)?, l2, "w_hh")?,
                    contiguous(f32::slice(s3)?, l3, "state")?,
                );
                self.forward::<f32>(a, b, c)
            }
            DType::F64 => {
                let (a, b, c) = (
                    contiguous(f64::slice(s1)?, l1, "gx")?,
                    contiguous(f64::slice(s2)?, l2, "w_hh")?,
                    contiguous(f64::slice(s3)?, l3, "state")?,
                );
                self.forward::<f64>(a, b, c)
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        }
    }

    fn bwd(
        &self,
        gx: &Tensor,
        w: &Tensor,
        _state: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b, c) = match gx.dtype() {
            DType::F32 => self.backward::<f32>(gx, w, grad)?,
            DType::F64 => self.backward::<f64>(gx, w, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        Ok((Some(a), Some(b), Some(c)))
    }
}

fn check(
    op: &'static str,
    gx: &Tensor,
    w_hh: &Tensor,
    h0: &Tensor,
    g: usize,
    lengths: Option<&[usize]>,
) -> Result<(SeqDims, Vec<usize>)> {
    ensure!(
        gx.rank() == 3 && h0.rank() == 2,
        op,
        "expected gx (B, T, {g}H) and h0 (B, H), got gx {} and h0 {}",
        shape_str(gx),
        shape_str(h0)
    );
    let (b, t, gh) = gx.dims3()?;
    let h = h0.dim(1)?;
    ensure!(
        gh == g * h && h0.dim(0)? == b && w_hh.dims() == [g * h, h],
        op,
        "gx {}, w_hh {} and h0 {} do not fit H = {h}",
        shape_str(gx),
        shape_str(w_hh),
        shape_str(h0)
    );
    ensure!(matches!(gx.dtype(), DType::F32 | DType::F64), op, "runs in f32 or f64, got {:?}", gx.dtype());
    let lengths = match lengths {
        None => vec![t; b],
        Some(l) => {
            ensure!(l.len() == b, op, "lengths has {} entries for B = {b}", l.len());
            if let Some((i, &x)) = l.iter().enumerate().find(|(_, &x)| x > t) {
                bail!(op, "lengths[{i}] = {x} exceeds T = {t}");
            }
            l.to_vec()
        }
    };
    Ok((SeqDims { b, t, h, reverse: false }, lengths))
}

/// The bias column of a weight operand: `b`, or zeros.
fn bias_column(b: Option<&Tensor>, rows: usize, like: &Tensor) -> Result<Tensor> {
    Ok(match b {
        Some(b) => {
            ensure!(b.dims() == [rows], "rnn sequence", "bias {} must be ({rows})", shape_str(b));
            b.to_dtype(like.dtype())?.unsqueeze(1)?
        }
        None => Tensor::zeros((rows, 1), like.dtype(), like.device())?,
    })
}

/// A whole LSTM direction from `gx = x W_ihᵀ` (no bias); `bias` is `b_ih + b_hh` (4H), added inside the op (and
/// its gradient formed there, not by reducing a `(B, T, 4H)` tensor in the graph). `reverse` walks the steps
/// backwards (from each sequence's last valid step).
pub fn lstm_sequence(
    gx: &Tensor,
    w_hh: &Tensor,
    bias: Option<&Tensor>,
    h0: &Tensor,
    c0: &Tensor,
    lengths: Option<&[usize]>,
    reverse: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dims, lengths) = check("lstm sequence", gx, w_hh, h0, 4, lengths)?;
    ensure!(c0.dims() == h0.dims(), "lstm sequence", "c0 {} must match h0 {}", shape_str(c0), shape_str(h0));
    let (t, h) = (dims.t, dims.h);
    let dtype = gx.dtype();
    let state = Tensor::cat(&[h0.to_dtype(dtype)?, c0.to_dtype(dtype)?], 1)?.contiguous()?; // (B, 2H)
    let wb = Tensor::cat(&[w_hh.to_dtype(dtype)?, bias_column(bias, 4 * h, gx)?], 1)?.contiguous()?; // (4H, H + 1)
    let op = Sequence { cell: Cell::Lstm, dims: SeqDims { reverse, ..dims }, lengths, saved: Mutex::new(None) };
    let out = gx.contiguous()?.apply_op3(&wb, &state, op)?; // (B, T + 2, H)
    Ok((out.narrow(1, 0, t)?, out.narrow(1, t, 1)?.squeeze(1)?, out.narrow(1, t + 1, 1)?.squeeze(1)?))
}

/// A whole GRU direction from `gx = x W_ihᵀ` (no bias); `b_ih` is added to it and `b_hh` inside the reset gate's
/// product, as PyTorch does, both inside the op.
pub fn gru_sequence(
    gx: &Tensor,
    w_hh: &Tensor,
    b_ih: Option<&Tensor>,
    b_hh: Option<&Tensor>,
    h0: &Tensor,
    lengths: Option<&[usize]>,
    reverse: bool,
) -> Result<(Tensor, Tensor)> {
    let (dims, lengths) = check("gru sequence", gx, w_hh, h0, 3, lengths)?;
    let SeqDims { t, h, .. } = dims;
    let dtype = gx.dtype();
    // More operands than a three-operand op has: the biases travel as extra columns of W_hh.
    let columns = [w_hh.to_dtype(dtype)?, bias_column(b_hh, 3 * h, gx)?, bias_column(b_ih, 3 * h, gx)?];
    let wb = Tensor::cat(&columns, 1)?.contiguous()?; // (3H, H + 2)
    let op = Sequence { cell: Cell::Gru, dims: SeqDims { reverse, ..dims }, lengths, saved: Mutex::new(None) };
    let out = gx.contiguous()?.apply_op3(&wb, &h0.to_dtype(dtype)?.contiguous()?, op)?; // (B, T + 1, H)
    Ok((out.narrow(1, 0, t)?, out.narrow(1, t, 1)?.squeeze(1)?))
}
