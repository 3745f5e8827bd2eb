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
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor};

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

/// What the three graph nodes of one call share. A candle op has at most three operands and one output; the call has
/// five operands with a gradient (`x`, `W_ih`, `W_hh`, the biases, the initial states) and two outputs (`y`, the
/// final states). So the [`Inputs`] node takes `x` and `small = [b_ih | b_hh | h0 | c0]` and outputs one zero (it
/// only puts them in the graph); the [`Sequence`] node takes that zero, `W_ih` and `W_hh`, reads `x` and `small`
/// here, and outputs the final states; the [`Outputs`] node takes the states and outputs `y`. Concatenating the
/// weights or the outputs into one operand instead would cost a copy forward and, backward, a zeros + add of the
/// whole and one per part (candle accumulates every node's gradient that way).
#[derive(Default)]
struct Link {
    /// `x` and `small`, for the sequence node's forward and backward.
    inputs: Option<(Tensor, Tensor)>,
    /// The forward's activations; shared, not borrowed, by the backward: the lock is held only to clone the handle,
    /// never across the kernel.
    saved: Option<Arc<Saved>>,
    /// `y`, computed with the final states, until the outputs node takes it.
    y: Option<CpuStorage>,
    /// The gradient of `y`, left here by the outputs node's backward for the sequence node's; then the gradients of
    /// `x` and `small`, left by the sequence node's backward for the inputs node's. A node's backward runs after that
    /// of every node that consumes it, so the consumer's comes first. Taken, so that a later backward in which they
    /// play no part does not see them.
    dy: Option<Tensor>,
    dinputs: Option<(Tensor, Tensor)>,
}

fn lock(link: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
    // Nothing panics while the lock is held, so a poisoned lock still holds a consistent value.
    link.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The inputs node: operands `x (B, T, C)` and `small = [b_ih | b_hh | h0 | c0]` (flat: `2·G·H + E·B·H`; no `c0`
/// for the GRU, E = 1), output one zero (see [`Link`]).
struct Inputs {
    name: &'static str,
    link: Arc<Mutex<Link>>,
}

/// The sequence node: operands the inputs node's zero, `W_ih (G·H, C)` and `W_hh (G·H, H)`, output the final states
/// `(E, B, H)`: `h_n` (and `c_n`).
struct Sequence {
    cell: Cell,
    dims: SeqDims,
    lengths: Vec<usize>,
    /// Whether a backward can follow (an operand tracks gradients): inference keeps no gate activations.
    save: bool,
    link: Arc<Mutex<Link>>,
}

/// The outputs node: operand the sequence node's states, output `y (B, T, H)` (see [`Link`]).
struct Outputs {
    name: &'static str,
    shape: Shape,
    link: Arc<Mutex<Link>>,
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

impl Sequence {
    /// The flat output `out (B·(T + E)·H)` of the kernel, and what it saved.
    fn kernel<T: SeqFloat>(&self, x: &[T], p: SeqParams<T>, h0: &[T], c0: &[T]) -> (Vec<T>, SeqSaved<T>) {
        k::sequence_forward(self.cell, self.dims, x, p, &self.lengths, h0, c0, self.save)
    }

    /// The parameters from the weights and `small`, and the initial states `h0` and `c0` from `small`.
    fn split<'a, T: Copy>(
        &self,
        w_ih: &'a [T],
        w_hh: &'a [T],
        small: &'a [T],
    ) -> candle_core::Result<(SeqParams<'a, T>, &'a [T], &'a [T])> {
        let SeqDims { b, c, h, .. } = self.dims;
        let (gw, e) = (self.cell.gates() * h, self.cell.extra_rows());
        if small.len() != 2 * gw + e * b * h {
            candle_core::bail!("{}: {} biases and states for G·H {gw}, B {b}, H {h}", self.name(), small.len());
        }
        let (bias, state) = small.split_at(2 * gw);
        let (h0, c0) = state.split_at(b * h);
        Ok((SeqParams::new(self.cell, c, h, w_ih, w_hh, &bias[..gw], &bias[gw..]), h0, c0))
    }

    fn inputs(&self) -> candle_core::Result<(Tensor, Tensor)> {
        match &lock(&self.link).inputs {
            Some(inputs) => Ok(inputs.clone()),
            None => candle_core::bail!("{}: the inputs are missing", self.name()),
        }
    }

    /// The forward without a graph node (nothing tracks a gradient): `out (B·(T + E)·H)`, from `x`, PyTorch's four
    /// parameter tensors and the initial states `h0` [, `c0`].
    fn infer<T: KernelFloat + SeqFloat>(&self, x: &Tensor, p: &[Tensor; 4], state: &[Tensor]) -> Result<Tensor> {
        let SeqDims { c, h, .. } = self.dims;
        let ts: Vec<&Tensor> = [x].into_iter().chain(p).chain(state).collect();
        let out = with_slices(&ts, |s: &[&[T]]| {
            let p = SeqParams::new(self.cell, c, h, s[1], s[2], s[3], s[4]);
            Ok(self.kernel(s[0], p, s[5], s.get(6).copied().unwrap_or(&[])).0)
        })?;
        let n = out.len();
        Ok(Tensor::from_vec(out, n, x.device())?)
    }

    fn forward<T: SavedOf>(&self, w_ih: &[T], w_hh: &[T]) -> candle_core::Result<(CpuStorage, Shape)> {
        let SeqDims { b, t, h, .. } = self.dims;
        let (x, small) = self.inputs()?;
        let (mut out, saved) = with_slices(&[&x, &small], |s: &[&[T]]| {
            let (p, h0, c0) = self.split(w_ih, w_hh, s[1])?;
            Ok(self.kernel(s[0], p, h0, c0))
        })?;
        let states = out.split_off(b * t * h);
        let mut link = lock(&self.link);
        link.saved = Some(Arc::new(T::wrap(saved)));
        link.y = Some(T::storage(out));
        Ok((T::storage(states), Shape::from((self.cell.extra_rows(), b, h))))
    }

    fn backward<T: SavedOf>(
        &self,
        w_ih: &Tensor,
        w_hh: &Tensor,
        dstates: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let SeqDims { b, t, c, h, .. } = self.dims;
        let gw = self.cell.gates() * h;
        let (x, small) = self.inputs()?;
        let (held, dy) = {
            let mut link = lock(&self.link);
            (link.saved.clone(), link.dy.take())
        };
        let Some(saved) = held.as_deref().and_then(T::unwrap) else {
            candle_core::bail!("{} backward: the forward's activations are missing", self.name())
        };
        let dev = w_ih.device();
        // No gradient of y when only the final states reach the loss.
        let dy = match dy {
            Some(dy) => dy.contiguous()?,
            None => Tensor::zeros((b, t, h), w_ih.dtype(), dev)?,
        };
        let dstates = dstates.contiguous()?;
        let g = with_slices(&[w_ih, w_hh, &small, &x, &dy, &dstates], |s: &[&[T]]| {
            let (p, _, _) = self.split(s[0], s[1], s[2])?;
            Ok(k::sequence_backward(saved, p, s[3], s[4], s[5]))
        })?;
        let dsmall = [g.db_ih, g.db_hh, g.dh0, g.dc0].concat();
        let n = dsmall.len();
        lock(&self.link).dinputs = Some((Tensor::from_vec(g.dx, (b, t, c), dev)?, Tensor::from_vec(dsmall, n, dev)?));
        Ok((Tensor::from_vec(g.dw_ih, (gw, c), dev)?, Tensor::from_vec(g.dw_hh, (gw, h), dev)?))
    }
}

impl CustomOp2 for Inputs {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let zero = match s1.dtype() {
            DType::F32 => CpuStorage::F32(vec![0.0]),
            DType::F64 => CpuStorage::F64(vec![0.0]),
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name),
        };
        Ok((zero, Shape::from(1)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _small: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        match lock(&self.link).dinputs.take() {
            Some((dx, dsmall)) => Ok((Some(dx), Some(dsmall))),
            None => candle_core::bail!("{} backward: the sequence's backward left no gradients", self.name),
        }
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
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s2.dtype() {
            DType::F32 => {
                self.forward::<f32>(contiguous(f32::slice(s2)?, l2, "w_ih")?, contiguous(f32::slice(s3)?, l3, "w_hh")?)
            }
            DType::F64 => {
                self.forward::<f64>(contiguous(f64::slice(s2)?, l2, "w_ih")?, contiguous(f64::slice(s3)?, l3, "w_hh")?)
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        }
    }

    fn bwd(
        &self,
        inputs: &Tensor,
        w_ih: &Tensor,
        w_hh: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b) = match w_ih.dtype() {
            DType::F32 => self.backward::<f32>(w_ih, w_hh, grad)?,
            DType::F64 => self.backward::<f64>(w_ih, w_hh, grad)?,
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        // The inputs node's zero reaches nothing: its operands' gradients go through the link.
        Ok((Some(inputs.zeros_like()?), Some(a), Some(b)))
    }
}

impl CustomOp1 for Outputs {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match lock(&self.link).y.take() {
            Some(y) => Ok((y, self.shape.clone())),
            None => candle_core::bail!("{}: the sequence's outputs were already taken", self.name),
        }
    }

    fn bwd(&self, states: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The gradient of y goes to the sequence node through the link; the states themselves get none from here.
        lock(&self.link).dy = Some(grad.clone());
        Ok(Some(states.zeros_like()?))
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

/// Checks the shapes and runs the op: `y (B, T, H)` and the final states `(E, B, H)`: `h_n` [, `c_n`].
fn run(
    cell: Cell,
    op: &'static str,
    x: &Tensor,
    p: SequenceParams,
    state: &[&Tensor],
    lengths: Option<&[usize]>,
    reverse: bool,
) -> Result<(Tensor, Tensor)> {
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
    let state: Vec<Tensor> =
        state.iter().map(|s| s.to_dtype(dtype)?.contiguous()).collect::<candle_core::Result<_>>()?;
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
    let save = x.track_op() || state.iter().any(Tensor::track_op) || parts.iter().any(Tensor::track_op);
    let link = Arc::new(Mutex::new(Link::default()));
    let seq = Sequence { cell, dims: SeqDims { b, t, c, h, reverse }, lengths, save, link: link.clone() };
    let e = cell.extra_rows();
    if !save {
        // Inference: the kernel reads the parameter and state tensors where they are, with no graph node to give
        // them to.
        let out = match dtype {
            DType::F32 => seq.infer::<f32>(&x, &parts, &state)?,
            _ => seq.infer::<f64>(&x, &parts, &state)?,
        };
        let y = out.narrow(0, 0, b * t * h)?.reshape((b, t, h))?;
        return Ok((y, out.narrow(0, b * t * h, e * b * h)?.reshape((e, b, h))?));
    }
    let mut small = vec![parts[2].clone(), parts[3].clone()];
    small.extend(state.iter().map(Tensor::flatten_all).collect::<candle_core::Result<Vec<_>>>()?);
    let small = Tensor::cat(&small, 0)?; // (2·G·H + E·B·H)
    let names = match cell {
        Cell::Lstm => ["attend-lstm-inputs", "attend-lstm-outputs"],
        Cell::Gru => ["attend-gru-inputs", "attend-gru-outputs"],
    };
    lock(&link).inputs = Some((x.clone(), small.clone()));
    let inputs = x.apply_op2(&small, Inputs { name: names[0], link: link.clone() })?; // (1)
    let states = inputs.apply_op3(&parts[0], &parts[1], seq)?; // (E, B, H)
    let y = states.apply_op1(Outputs { name: names[1], shape: Shape::from((b, t, h)), link })?; // (B, T, H)
    Ok((y, states))
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
    let (y, states) = run(Cell::Lstm, "lstm sequence", x, p, &[h0, c0], lengths, reverse)?;
    Ok((y, states.get(0)?, states.get(1)?))
}

/// A whole GRU direction over `x` (`b_hh` inside the reset gate's product, as PyTorch). Returns `y (B, T, H)`, `h_n`.
pub fn gru_sequence(
    x: &Tensor,
    p: SequenceParams,
    h0: &Tensor,
    lengths: Option<&[usize]>,
    reverse: bool,
) -> Result<(Tensor, Tensor)> {
    let (y, states) = run(Cell::Gru, "gru sequence", x, p, &[h0], lengths, reverse)?;
    Ok((y, states.get(0)?))
}
