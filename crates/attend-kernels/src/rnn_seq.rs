//! Whole-sequence LSTM and GRU: every time step of one direction of one layer in one call, input product included,
//! forward and backward, the way cuDNN, oneDNN and llm.c run recurrences rather than as a graph of per-step ops.
//!
//! Forward: the step walk (`rnn_par`, persistent threads, each owning a slice of the hidden units and their
//! packed rows of `W_ih` and `W_hh`) forms each step's gates `b + x_t W_ihᵀ + h_{t−1} W_hhᵀ` in a tile that stays in
//! cache (the input half inside the walk too: a separate product for all steps would write the gates to memory and
//! read them back), applies the fused cell, and copies the tile to the saved activations (blocked column order,
//! [`Blocks`]) only when a backward will follow. Backward: the walk in reverse produces the gate gradients of every
//! step (one product per step, `dh_{t−1} = dgates_t W_hh`), then three large products give `dx = dgates W_ih`,
//! `[dW_ih | dW_hh] = dgatesᵀ [x | h_prev]` for all steps at once, where a per-step autograd graph would
//! allocate and add a weight
//! gradient per step. f64, the checking dtype, runs the same walk and layout.
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
    /// `(T, B, C + H)`: `[x_t | h_{t−1}]`, the input and the state each step read, side by side so that the LSTM's
    /// step product and its weight gradient `[dW_ih | dW_hh] = dgatesᵀ [x | h_prev]` are one product each.
    pub xh: Vec<T>,
    /// `(T, B, H)`: `c_{t−1}` (LSTM; empty for the GRU).
    pub c_prev: Vec<T>,
    /// The blocked order and biases the forward ran (the weights themselves come back with the backward's call).
    blocked: Blocked<T>,
}

/// The parameters of one direction as PyTorch lays them out: `W_ih (G·H, C)`, `W_hh (G·H, H)`, `b_ih`, `b_hh (G·H)`,
/// each row-major.
#[derive(Clone, Copy, Debug)]
pub struct SeqParams<'a, T> {
    pub w_ih: &'a [T],
    pub w_hh: &'a [T],
    pub b_ih: &'a [T],
    pub b_hh: &'a [T],
}

impl<'a, T> SeqParams<'a, T> {
    /// The four, from one flat buffer laid out as [`param_offsets`] says.
    pub fn flat(cell: Cell, c: usize, h: usize, params: &'a [T]) -> Self {
        let gw = cell.gates() * h;
        let [wi, wh, bi, bh] = param_offsets(gw, c, h);
        assert!(params.len() == bh + gw, "rnn sequence: {} flat parameters for G·H {gw}, C {c}, H {h}", params.len());
        Self { w_ih: &params[wi..wh], w_hh: &params[wh..bi], b_ih: &params[bi..bh], b_hh: &params[bh..] }
    }
}

/// The gradients of one direction.
#[derive(Clone, Debug, Default)]
pub struct SeqGrads<T> {
    pub dx: Vec<T>,
    /// Laid out as the parameters (flat `W_ih`, `W_hh`, `b_ih`, `b_hh`).
    pub dparams: Vec<T>,
    pub dh0: Vec<T>,
    /// Empty for the GRU.
    pub dc0: Vec<T>,
}

/// `C (m×n) = A (m×k) · B (k×n)`, strides in elements (`rs` row, `cs` column). `C` need not be initialised: every
/// element is written, none read.
///
/// # Safety
/// `c` addresses `m` rows of `n` elements at stride `c_rs`; `a` and `b` hold the strided ranges named.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    c: *mut T,
    c_rs: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &[T],
    b_rs: usize,
    b_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    // Small products are not worth waking the pool.
    let par =
        if m * n * k >= 1 << 18 && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the caller's; T is f32 or f64.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
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

/// Where `W_ih`, `W_hh`, `b_ih` and `b_hh` start in the flat parameters of `gw = G·H` gate rows. Flat rather than
/// one `(G·H, C + H + 2)` matrix: a caller that concatenates its tensors to build them gets their gradients back as
/// contiguous slices.
pub fn param_offsets(gw: usize, c: usize, h: usize) -> [usize; 4] {
    [0, gw * c, gw * (c + h), gw * (c + h + 1)]
}

fn check<T>(cell: Cell, d: &SeqDims, p: &SeqParams<T>, lengths: &[usize]) {
    let SeqDims { b, t, c, h, .. } = *d;
    let gw = cell.gates() * h;
    assert!(
        p.w_ih.len() == gw * c
            && p.w_hh.len() == gw * h
            && p.b_ih.len() == gw
            && p.b_hh.len() == gw
            && lengths.len() == b
            && lengths.iter().all(|&l| l <= t),
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
        xh: Vec::new(),
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

/// The backward of [`sequence_forward`] (run with `save`): `p` are the parameters it ran with, `dout (B·(T + E)·H)`
/// the gradient of its `out`.
pub fn sequence_backward<T: SeqFloat>(saved: &SeqSaved<T>, p: SeqParams<T>, dout: &[T]) -> SeqGrads<T> {
    let (cell, d, lengths) = (saved.cell, saved.dims, &saved.lengths[..]);
    check(cell, &d, &p, lengths);
    let SeqDims { b, t: tt, c, h, .. } = d;
    let (gw, e) = (cell.gates() * h, cell.extra_rows());
    let lstm = cell == Cell::Lstm;
    assert!(
        dout.len() == b * (tt + e) * h && saved.gates.len() == b * tt * gw && saved.xh.len() == b * tt * (c + h),
        "rnn sequence backward: lengths"
    );
    let mut g = SeqGrads {
        dx: Vec::with_capacity(b * tt * c),
        dparams: Vec::with_capacity(gw * (c + h + 2)),
        dh0: vec![T::ZERO; b * h],
        dc0: vec![T::ZERO; if lstm { b * h } else { 0 }],
    };
    if tt == 0 {
        for r in 0..b {
            g.dh0[r * h..(r + 1) * h].copy_from_slice(&dout[r * h..(r + 1) * h]);
            if lstm {
                g.dc0[r * h..(r + 1) * h].copy_from_slice(&dout[(b + r) * h..(b + r + 1) * h]);
            }
        }
        g.dparams.resize(gw * (c + h + 2), T::ZERO);
        return g;
    }
    let bw = &saved.blocked;
    assert!(bw.perm.len() == gw, "rnn sequence backward: the forward kept no activations");
    let walk = Walk { cell, d, lengths, p, perm: &bw.perm, bias: &bw.bias, b_hh: &bw.b_hh };
    let mut dgx = Vec::new();
    let (mut db, mut db_x) = (vec![T::ZERO; gw], vec![T::ZERO; gw]);
    let dgates = walk.backward(saved, dout, &mut dgx, &mut db, &mut db_x, &mut g.dh0, &mut g.dc0);
    let dgx = if lstm { &dgates } else { &dgx };
    let ld = c + h;
    // The products write every element of their outputs, and the permutations below every element of the
    // gradients: no buffer here is zero-filled first (10 MB a B32 T64 H256 LSTM backward).
    // dx = dgx W_ih: (B, T, C) from (T·B × G·H) · (G·H × C).
    walk.input_grad(dgx, &mut g.dx);
    // [dW_ih | dW_hh] = dgatesᵀ [x | h_prev]: (G·H × T·B) · (T·B × C + H), one product for the LSTM; the GRU's two
    // halves have different gate gradients (dW_ih from dgx, dW_hh from dgh).
    let mut dw: Vec<T> = Vec::with_capacity(gw * ld);
    // SAFETY: dw has room for G·H rows of C + H; the gate gradients hold T·B rows of G·H, xh T·B rows of C + H.
    unsafe {
        if lstm {
            gemm(gw, ld, b * tt, dw.as_mut_ptr(), ld, &dgates, 1, gw, &saved.xh, ld, 1);
        } else {
            gemm(gw, c, b * tt, dw.as_mut_ptr(), ld, dgx, 1, gw, &saved.xh, ld, 1);
            gemm(gw, h, b * tt, dw.as_mut_ptr().add(c), ld, &dgates, 1, gw, &saved.xh[c..], ld, 1);
        }
        dw.set_len(gw * ld);
    }
    // Back to PyTorch's rows, with the bias gradients (the LSTM's two biases both add to the gates).
    let db_ih = if lstm { &db } else { &db_x };
    let [wi, wh, bi, bh] = param_offsets(gw, c, h);
    let gp = g.dparams.as_mut_ptr();
    for (col, (row, &r)) in dw.chunks_exact(ld).zip(&bw.perm).enumerate() {
        // SAFETY: PyTorch row r of W_ih, W_hh, b_ih and b_hh in g.dparams' room; `perm` is a permutation, so every
        // element is written once.
        unsafe {
            std::ptr::copy_nonoverlapping(row.as_ptr(), gp.add(wi + r * c), c);
            std::ptr::copy_nonoverlapping(row[c..].as_ptr(), gp.add(wh + r * h), h);
            gp.add(bi + r).write(db_ih[col]);
            gp.add(bh + r).write(db[col]);
        }
    }
    // SAFETY: as above.
    unsafe { g.dparams.set_len(gw * (c + h + 2)) };
    g
}
