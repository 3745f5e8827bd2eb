//! Whole-sequence LSTM and GRU: every time step of one direction of one layer in one call, input product included,
//! forward and backward, the way cuDNN, oneDNN and llm.c run recurrences rather than as a graph of per-step ops.
//!
//! Forward: the step walk (`rnn_par`, persistent threads, each owning a slice of the hidden units and their
//! packed rows of `W_ih` and `W_hh`) forms each step's gates `b + x_t W_ihᵀ + h_{t−1} W_hhᵀ` in a tile that stays in
//! cache (the input half inside the walk too: a separate product for all steps would write the gates to memory and
//! read them back), applies the fused cell, and copies the tile to the saved activations (blocked column order,
//! [`Blocks`]) only when a backward will follow. Backward: the walk in reverse produces the gate gradients of every
//! step, and with each step's the two products that read them while they are in cache, `dh_{t−1} = dgates_t W_hh`
//! and `dx_t = dgates_t W_ih`; every chunk of steps (`WEIGHT_ROWS` rows), each thread adds the chunk's share of its
//! rows of `[dW_ih | dW_hh] = dgatesᵀ [x | h_prev]`, where a per-step autograd graph would allocate and add a weight
//! gradient per step, and a product over all steps after the walk would need every step's gate gradients written
//! out (8 MB at B32 T64 H256) and read back. f64, the checking dtype, runs the same walk and layout.
//!
//! Lengths: a row `b` processes steps `t < len[b]` only; past its length its state is carried unchanged and its
//! output is zero. `reverse` walks `t = T−1 … 0` (the backward direction of a bidirectional layer, which so starts
//! at each sequence's own last step).
//!
//! # Shapes (row-major)
//! `x (B, T, C)`, `params`: `W_ih (G·H, C)`, `W_hh (G·H, H)`, `b_ih`, `b_hh (G·H)` one after the other, flat (PyTorch's rows: gate chunks i f g o for the
//! LSTM, G = 4; r z n for the GRU, G = 3, whose `b_hh` sits inside the reset gate's product), states `(B, H)`,
//! `out`: the outputs `y (B, T, H)`, then `h_n (B, H)` (and `c_n (B, H)`: E = 2 state blocks for the LSTM, 1 for
//! the GRU), flat, so that `y` is a contiguous prefix.

use crate::Real;

use crate::rnn_par::Walk;
pub use crate::rnn_par::{Blocks, SeqFloat, BLOCK};

/// Which recurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    Lstm,
    Gru,
}

impl Cell {
    /// Gate chunks per hidden unit.
    pub fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
        }
    }

    /// Rows of `out` after the outputs: `h_n`, and `c_n` for the LSTM.
    pub fn extra_rows(self) -> usize {
        match self {
            Cell::Lstm => 2,
            Cell::Gru => 1,
        }
    }
}

/// Sizes of one sequence call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqDims {
    pub b: usize,
    pub t: usize,
    /// Input width.
    pub c: usize,
    pub h: usize,
    pub reverse: bool,
}

impl SeqDims {
    /// Step indices in processing order.
    pub(crate) fn order(&self) -> Vec<usize> {
        if self.reverse {
            (0..self.t).rev().collect()
        } else {
            (0..self.t).collect()
        }
    }
}

/// What the forward keeps for the backward, per step `t` (in step order, whatever the direction), gate columns
/// in blocked order, with the cell, sizes and lengths it ran: the backward takes them from here, so it cannot be
/// called with a different run's.
#[derive(Clone, Debug)]
pub struct SeqSaved<T> {
    cell: Cell,
    dims: SeqDims,
    lengths: Vec<usize>,
    /// `(T, B, G·H)`: the LSTM's gate activations σ(i), σ(f), tanh(g), σ(o) (its backward then evaluates one tanh
    /// per unit, not five), or the GRU's `gh = W_hh h + b_hh`.
    pub gates: Vec<T>,
    /// `(T, B, G·H)`: GRU's `gx = W_ih x + b_ih` (empty for the LSTM).
    pub gx: Vec<T>,
    /// `(T, B, H)`: `h_{t−1}`, the state each step read (step-major): with the input, the B operand of the weight
    /// gradient `[dW_ih | dW_hh] = dgatesᵀ [x | h_prev]`.
    pub h: Vec<T>,
    /// `(T, B, H)`: `c_{t−1}` (LSTM; empty for the GRU).
    pub c_prev: Vec<T>,
    /// The blocked order and biases the forward ran (the weights themselves come back with the backward's call).
    blocked: Blocked<T>,
}

/// The parameters of one direction as PyTorch lays them out: `W_ih (G·H, C)`, `W_hh (G·H, H)`, `b_ih`, `b_hh (G·H)`,
/// the weights row-major, read in place (each thread of a walk packs its own rows of them straight from there).
#[derive(Clone, Copy, Debug)]
pub struct SeqParams<'a, T> {
    w_ih: &'a [T],
    w_hh: &'a [T],
    c: usize,
    h: usize,
    b_ih: &'a [T],
    b_hh: &'a [T],
}

impl<'a, T: Copy> SeqParams<'a, T> {
    /// PyTorch's four tensors, each contiguous.
    pub fn new(cell: Cell, c: usize, h: usize, w_ih: &'a [T], w_hh: &'a [T], b_ih: &'a [T], b_hh: &'a [T]) -> Self {
        let gw = cell.gates() * h;
        assert!(
            w_ih.len() == gw * c && w_hh.len() == gw * h && b_ih.len() == gw && b_hh.len() == gw,
            "rnn sequence: parameters of {}, {}, {}, {} elements for G·H {gw}, C {c}, H {h}",
            w_ih.len(),
            w_hh.len(),
            b_ih.len(),
            b_hh.len()
        );
        Self { w_ih, w_hh, c, h, b_ih, b_hh }
    }

    /// Row `r` of `W_ih` (C).
    pub(crate) fn ih(&self, r: usize) -> &'a [T] {
        &self.w_ih[r * self.c..][..self.c]
    }

    /// Row `r` of `W_hh` (H).
    pub(crate) fn hh(&self, r: usize) -> &'a [T] {
        &self.w_hh[r * self.h..][..self.h]
    }
}

/// The gradients of one direction.
#[derive(Clone, Debug, Default)]
pub struct SeqGrads<T> {
    pub dx: Vec<T>,
    /// `dW_ih (G·H, C)` and `dW_hh (G·H, H)`, PyTorch's rows.
    pub dw_ih: Vec<T>,
    pub dw_hh: Vec<T>,
    pub db_ih: Vec<T>,
    pub db_hh: Vec<T>,
    pub dh0: Vec<T>,
    /// Empty for the GRU.
    pub dc0: Vec<T>,
}

/// The blocked order of the gate rows and the biases the walk adds, in that order. The weights stay where the caller
/// keeps them: each thread of a walk packs its own rows of them straight from there.
#[derive(Clone, Debug, Default)]
struct Blocked<T> {
    /// Blocked column → PyTorch row.
    perm: Vec<usize>,
    bias: Vec<T>,
    b_hh: Vec<T>,
}

impl<T: Real> Blocked<T> {
    fn new(cell: Cell, d: &SeqDims, p: &SeqParams<T>) -> Self {
        let blocks = Blocks { g: cell.gates(), h: d.h };
        let perm: Vec<usize> = (0..cell.gates() * d.h).map(|col| blocks.natural(col)).collect();
        let bias = match cell {
            Cell::Lstm => perm.iter().map(|&r| p.b_ih[r] + p.b_hh[r]).collect(),
            Cell::Gru => perm.iter().map(|&r| p.b_ih[r]).collect(),
        };
        let b_hh = perm.iter().map(|&r| p.b_hh[r]).collect();
        Self { perm, bias, b_hh }
    }
}

fn check<T>(cell: Cell, d: &SeqDims, p: &SeqParams<T>, lengths: &[usize]) {
    let SeqDims { b, t, c, h, .. } = *d;
    let gw = cell.gates() * h;
    assert!(
        p.c == c && p.h == h && p.b_ih.len() == gw && lengths.len() == b && lengths.iter().all(|&l| l <= t),
        "rnn sequence: parameters or lengths do not fit B {b}, T {t}, C {c}, H {h}"
    );
}

/// One direction of an LSTM or GRU layer over the sequence: returns `out (B·(T + E)·H)` (see the module
/// documentation) and what the backward needs (the gate activations only with `save`: inference skips them).
/// `c0` is empty for the GRU.
#[allow(clippy::too_many_arguments)]
pub fn sequence_forward<T: SeqFloat>(
    cell: Cell,
    d: SeqDims,
    x: &[T],
    p: SeqParams<T>,
    lengths: &[usize],
    h0: &[T],
    c0: &[T],
    save: bool,
) -> (Vec<T>, SeqSaved<T>) {
    check(cell, &d, &p, lengths);
    let SeqDims { b, t: tt, c, h, .. } = d;
    let (gw, e) = (cell.gates() * h, cell.extra_rows());
    let lstm = cell == Cell::Lstm;
    assert!(
        x.len() == b * tt * c && h0.len() == b * h && c0.len() == if lstm { b * h } else { 0 },
        "rnn sequence: x or the initial state do not fit B {b}, T {tt}, C {c}, H {h}"
    );
    let bw = Blocked::new(cell, &d, &p);
    let gates = if save { b * tt * gw } else { 0 };
    // Room only: the walk's threads write every element (no zero-filling on this thread first).
    let mut saved = SeqSaved {
        cell,
        dims: d,
        lengths: lengths.to_vec(),
        gates: Vec::with_capacity(gates),
        gx: Vec::with_capacity(if lstm { 0 } else { gates }),
        h: Vec::new(),
        c_prev: Vec::new(),
        blocked: Blocked::default(),
    };
    let mut out = Vec::new();
    if tt == 0 {
        out.extend_from_slice(h0);
        out.extend_from_slice(c0);
        debug_assert_eq!(out.len(), e * b * h);
        return (out, saved);
    }
    let walk = Walk { cell, d, lengths, p, perm: &bw.perm, bias: &bw.bias, b_hh: &bw.b_hh };
    walk.forward(x, h0, c0, &mut saved, &mut out);
    if save {
        saved.blocked = bw;
    }
    (out, saved)
}

/// The backward of [`sequence_forward`] (run with `save`): `p` and `x (B, T, C)` are the parameters and input it
/// ran with, `dy (B, T, H)` and `dfinal (E, B, H)` the gradients of its outputs and final states (`out` split where
/// `y` ends).
pub fn sequence_backward<T: SeqFloat>(
    saved: &SeqSaved<T>,
    p: SeqParams<T>,
    x: &[T],
    dy: &[T],
    dfinal: &[T],
) -> SeqGrads<T> {
    let (cell, d, lengths) = (saved.cell, saved.dims, &saved.lengths[..]);
    check(cell, &d, &p, lengths);
    let SeqDims { b, t: tt, c, h, .. } = d;
    let (gw, e) = (cell.gates() * h, cell.extra_rows());
    let lstm = cell == Cell::Lstm;
    assert!(
        dy.len() == b * tt * h
            && dfinal.len() == e * b * h
            && saved.gates.len() == b * tt * gw
            && x.len() == b * tt * c
            && saved.h.len() == b * tt * h,
        "rnn sequence backward: lengths"
    );
    let mut g = SeqGrads {
        dx: Vec::new(),
        dw_ih: Vec::new(),
        dw_hh: Vec::new(),
        db_ih: vec![T::ZERO; gw],
        db_hh: vec![T::ZERO; gw],
        dh0: dfinal[..b * h].to_vec(),
        dc0: if lstm { dfinal[b * h..].to_vec() } else { vec![] },
    };
    if tt == 0 {
        g.dw_ih.resize(gw * c, T::ZERO);
        g.dw_hh.resize(gw * h, T::ZERO);
        return g;
    }
    let bw = &saved.blocked;
    assert!(bw.perm.len() == gw, "rnn sequence backward: the forward kept no activations");
    let walk = Walk { cell, d, lengths, p, perm: &bw.perm, bias: &bw.bias, b_hh: &bw.b_hh };
    let (mut db, mut db_x) = (vec![T::ZERO; gw], vec![T::ZERO; gw]);
    walk.backward(
        saved,
        x,
        dy,
        dfinal,
        &mut g.dx,
        [&mut g.dw_ih, &mut g.dw_hh],
        &mut db,
        &mut db_x,
        &mut g.dh0,
        &mut g.dc0,
    );
    // Back to PyTorch's rows for the bias gradients (the walk wrote dW in them; the LSTM's two biases both add
    // to the gates).
    let db_ih = if lstm { &db } else { &db_x };
    for (col, &r) in bw.perm.iter().enumerate() {
        g.db_ih[r] = db_ih[col];
        g.db_hh[r] = db[col];
    }
    g
}
