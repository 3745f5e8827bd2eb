//! Whole-sequence LSTM and GRU ops (one direction of one layer): input product, recurrence and cell of every step
//! in one candle op with a hand-written backward (`attend_kernels::rnn_seq`), as cuDNN and oneDNN run a layer,
//! instead of a graph of per-step ops whose backward allocates and adds a weight gradient per step.
//!
//! The composed twin of these ops is the per-step path over [`super::lstm_cell_reference`] and
//! [`super::gru_cell_reference`] (`CellImpl::Reference` of the recurrent layers); the tests compare both.
//!
//! # Shapes
//! - LSTM: `x (B, T, C)`, `w_ih (4H, C)`, `w_hh (4H, H)`, `b_ih`, `b_hh (4H)`, `h0`, `c0 (B, H)` →
//!   `y (B, T, H)`, `h_n`, `c_n (B, H)`
//! - GRU: the same with `3H` gate rows and no `c`.

use std::sync::{Arc, Mutex, PoisonError};

use attend_kernels::rnn_seq::{self as k, Cell, SeqDims, SeqFloat, SeqParams, SeqSaved};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::custom::{contiguous, KernelFloat};
use crate::error::shape_str;
use crate::{bail, ensure, Result};

/// The forward's saved activations, in the op's dtype.
#[derive(Debug)]
enum Saved {
    F32(SeqSaved<f32>),
    F64(SeqSaved<f64>),
}

trait SavedOf: KernelFloat + SeqFloat {
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

/// The op's operands: `x (B, T, C)`, the parameters flat, `W_ih`, `W_hh`, `b_ih`, `b_hh` one after the other
/// (a custom op takes three operands), and the initial state `(B, E·H)`: `[h0 | c0]` (LSTM, E = 2) or `h0`.
struct Sequence {
    cell: Cell,
    dims: SeqDims,
    lengths: Vec<usize>,
    /// Whether a backward can follow (an operand tracks gradients): inference keeps no gate activations.
    save: bool,
    /// Shared, not borrowed, by the backward: the lock is held only to clone the handle, never across the kernel.
    saved: Mutex<Option<Arc<Saved>>>,
}

/// `f` over the elements of each contiguous CPU tensor, read where they are.
fn with_slices<T: KernelFloat, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("rnn sequence: runs on the CPU") };
        slices.push(contiguous(T::slice(cpu)?, layout, "rnn sequence operand")?);
    }
    f(&slices)
}

/// `[h0 | c0] (B, 2H)` (LSTM) or `h0 (B, H)` as separate `(B, H)` buffers (`c0` empty for the GRU).
fn split_state<T: Copy>(cell: Cell, b: usize, h: usize, state: &[T]) -> (Vec<T>, Vec<T>) {
    match cell {
        Cell::Lstm => (
            (0..b).flat_map(|r| state[r * 2 * h..r * 2 * h + h].to_vec()).collect(),
            (0..b).flat_map(|r| state[r * 2 * h + h..(r + 1) * 2 * h].to_vec()).collect(),
        ),
        Cell::Gru => (state.to_vec(), vec![]),
    }
}

impl Sequence {
    /// The flat output `out (B·(T + E)·H)` of the kernel, and what it saved.
    fn kernel<T: SeqFloat>(&self, x: &[T], p: SeqParams<T>, state: &[T]) -> (Vec<T>, SeqSaved<T>) {
        let SeqDims { b, h, .. } = self.dims;
        let (h0, c0) = split_state(self.cell, b, h, state);
        k::sequence_forward(self.cell, self.dims, x, p, &self.lengths, &h0, &c0, self.save)
    }

    /// The forward without a graph node (nothing tracks a gradient): `out (B·(T + E)·H)`.
    fn infer<T: KernelFloat + SeqFloat>(
        &self,
        x: &Tensor,
        state: &Tensor,
        p: &[Tensor; 4],
    ) -> candle_core::Result<Tensor> {
        let out = with_slices(&[x, state, &p[0], &p[1], &p[2], &p[3]], |s: &[&[T]]| {
            Ok(self.kernel(s[0], SeqParams { w_ih: s[2], w_hh: s[3], b_ih: s[4], b_hh: s[5] }, s[1]).0)
        })?;
        let n = out.len();
        Tensor::from_vec(out, n, x.device())
    }

    fn forward<T: SavedOf>(&self, x: &[T], params: &[T], state: &[T]) -> candle_core::Result<(CpuStorage, Shape)> {
        let SeqDims { c, h, .. } = self.dims;
        let (out, saved) = self.kernel(x, SeqParams::flat(self.cell, c, h, params), state);
        // Nothing panics while the lock is held, so a poisoned lock still holds a consistent value.
        *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(T::wrap(saved)));
        let n = out.len();
        Ok((T::storage(out), Shape::from(n)))
    }

    fn backward<T: SavedOf>(
        &self,
        x: &Tensor,
        params: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let SeqDims { b, t, c, h, .. } = self.dims;
        let held = self.saved.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(saved) = held.as_deref().and_then(T::unwrap) else {
            candle_core::bail!("{} backward: the forward's activations are missing", self.name())
        };
        // The gradient of the flat output is read where it is, as the parameters.
        let grad = grad.contiguous()?;
        let g = with_slices(&[params, &grad], |s: &[&[T]]| {
            Ok(k::sequence_backward(saved, SeqParams::flat(self.cell, c, h, s[0]), s[1]))
        })?;
        let dstate: Vec<T> = match self.cell {
            Cell::Lstm => {
                (0..b).flat_map(|r| [&g.dh0[r * h..(r + 1) * h], &g.dc0[r * h..(r + 1) * h]].concat()).collect()
            }
            Cell::Gru => g.dh0,
        };
        let dev = x.device();
        let gw = self.cell.gates() * h;
        Ok((
            Tensor::from_vec(g.dx, (b, t, c), dev)?,
            Tensor::from_vec(g.dparams, gw * (c + h + 2), dev)?,
            Tensor::from_vec(dstate, (b, self.cell.extra_rows() * h), dev)?,
        ))
    }
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
                    contiguous(f32::slice(s1)?, l1, "x")?,
                    contiguous(f32::slice(s2)?, l2, "params")?,
                    contiguous(f32::slice(s3)?, l3, "state")?,
                );
                self.forward::<f32>(a, b, c)
            }
            DType::F64 => {
                let (a, b, c) = (
                    contiguous(f64::slice(s1)?, l1, "x")?,
                    contiguous(f64::slice(s2)?, l2, "params")?,
                    contiguous(f64::slice(s3)?, l3, "state")?,
                );
                self.forward::<f64>(a, b, c)
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _state: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b, c) = match x.dtype() {
            DType::F32 => self.backward::<f32>(x, params, grad)?,
            DType::F64 => self.backward::<f64>(x, params, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        Ok((Some(a), Some(b), Some(c)))
    }
}

/// The parameters of one direction, as PyTorch names them (biases optional).
#[derive(Clone, Copy, Debug)]
pub struct SequenceParams<'a> {
    pub w_ih: &'a Tensor,
    pub w_hh: &'a Tensor,
    pub b_ih: Option<&'a Tensor>,
    pub b_hh: Option<&'a Tensor>,
}

/// Checks the shapes and runs the op: `out (B·(T + E)·H)`, flat: `y (B, T, H)`, `h_n (B, H)` [, `c_n (B, H)`].
fn run(
    cell: Cell,
    op: &'static str,
    x: &Tensor,
    p: SequenceParams,
    state: &[&Tensor],
    lengths: Option<&[usize]>,
    reverse: bool,
) -> Result<Tensor> {
    ensure!(x.rank() == 3, op, "expected x (B, T, C), got {}", shape_str(x));
    let (b, t, c) = x.dims3()?;
    let gw = p.w_hh.dim(0)?;
    let (g, h) = (cell.gates(), gw / cell.gates());
    ensure!(
        gw == g * h && h > 0 && p.w_hh.dims() == [g * h, h] && p.w_ih.dims() == [g * h, c],
        op,
        "w_ih {} and w_hh {} do not fit x {} ({g} gates: expected ({g}H, C) and ({g}H, H))",
        shape_str(p.w_ih),
        shape_str(p.w_hh),
        shape_str(x)
    );
    for s in state {
        ensure!(s.dims() == [b, h], op, "initial state {} must be (B, H) = ({b}, {h})", shape_str(s));
    }
    ensure!(matches!(x.dtype(), DType::F32 | DType::F64), op, "runs in f32 or f64, got {:?}", x.dtype());
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
    let dtype = x.dtype();
    let x = x.contiguous()?;
    let state = Tensor::cat(&state.iter().map(|s| s.to_dtype(dtype)).collect::<candle_core::Result<Vec<_>>>()?, 1)?
        .contiguous()?; // (B, E·H)
    let bias = |v: Option<&Tensor>| -> Result<Tensor> {
        Ok(match v {
            Some(v) => {
                ensure!(v.dims() == [g * h], op, "bias {} must be ({})", shape_str(v), g * h);
                v.to_dtype(dtype)?
            }
            None => Tensor::zeros(g * h, dtype, x.device())?,
        })
    };
    let parts = [
        p.w_ih.to_dtype(dtype)?.contiguous()?,
        p.w_hh.to_dtype(dtype)?.contiguous()?,
        bias(p.b_ih)?.contiguous()?,
        bias(p.b_hh)?.contiguous()?,
    ];
    let save = x.track_op() || state.track_op() || parts.iter().any(Tensor::track_op);
    let op = Sequence { cell, dims: SeqDims { b, t, c, h, reverse }, lengths, save, saved: Mutex::new(None) };
    if !save {
        // Inference: the kernel reads the four parameter tensors where they are, with no graph node to give them
        // to as one operand (a custom op takes three), so no 2·G·H·(C + H) copy into one buffer.
        return Ok(match dtype {
            DType::F32 => op.infer::<f32>(&x, &state, &parts)?,
            _ => op.infer::<f64>(&x, &state, &parts)?,
        });
    }
    let flat: Vec<Tensor> = parts.iter().map(|t| t.flatten_all()).collect::<candle_core::Result<_>>()?;
    let params = Tensor::cat(&flat, 0)?; // (G·H·(C + H + 2)), `rnn_seq::param_offsets`
    Ok(x.apply_op3(&params, &state, op)?) // (B·(T + E)·H)
}

/// A whole LSTM direction over `x`; `reverse` walks the steps backwards (from each sequence's last valid step).
/// Returns `y (B, T, H)`, `h_n`, `c_n`.
pub fn lstm_sequence(
    x: &Tensor,
    p: SequenceParams,
    h0: &Tensor,
    c0: &Tensor,
    lengths: Option<&[usize]>,
    reverse: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let out = run(Cell::Lstm, "lstm sequence", x, p, &[h0, c0], lengths, reverse)?;
    let (y, states) = split_out(&out, x, p.w_hh.dim(1)?, 2)?;
    Ok((y, states[0].clone(), states[1].clone()))
}

/// A whole GRU direction over `x` (`b_hh` inside the reset gate's product, as PyTorch). Returns `y (B, T, H)`, `h_n`.
pub fn gru_sequence(
    x: &Tensor,
    p: SequenceParams,
    h0: &Tensor,
    lengths: Option<&[usize]>,
    reverse: bool,
) -> Result<(Tensor, Tensor)> {
    let out = run(Cell::Gru, "gru sequence", x, p, &[h0], lengths, reverse)?;
    let (y, states) = split_out(&out, x, p.w_hh.dim(1)?, 1)?;
    Ok((y, states[0].clone()))
}

/// The flat output of the op as `y (B, T, H)` and `e` states `(B, H)`, contiguous views.
fn split_out(out: &Tensor, x: &Tensor, h: usize, e: usize) -> Result<(Tensor, Vec<Tensor>)> {
    let (b, t, _) = x.dims3()?;
    let y = out.narrow(0, 0, b * t * h)?.reshape((b, t, h))?;
    let states =
        (0..e).map(|q| Ok(out.narrow(0, (b * t + q * b) * h, b * h)?.reshape((b, h))?)).collect::<Result<Vec<_>>>()?;
    Ok((y, states))
}
