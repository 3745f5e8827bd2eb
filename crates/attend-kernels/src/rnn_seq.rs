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
    /// `(T, B, G·H)`: LSTM gate pre-activations, or GRU's `gh = W_hh h + b_hh`.
    pub gates: Vec<T>,
    /// `(T, B, G·H)`: GRU's `gx = W_ih x + b_ih` (empty for the LSTM).
    pub gx: Vec<T>,
    /// `(T, B, C + H)`: `[x_t | h_{t−1}]`, the input and the state each step read, side by side so that the LSTM's
    /// step product and its weight gradient `[dW_ih | dW_hh] = dgatesᵀ [x | h_prev]` are one product each.
    pub xh: Vec<T>,
    /// `(T, B, H)`: `c_{t−1}` (LSTM; empty for the GRU).
    pub c_prev: Vec<T>,
    /// The parameters as the forward ran them.
    blocked: Blocked<T>,
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

/// `C (m×n) = A (m×k) · B (k×n)` (or `C +=` with `accumulate`), strides in elements (`rs` row, `cs` column).
#[allow(clippy::too_many_arguments)]
fn gemm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [T],
    c_rs: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &[T],
    b_rs: usize,
    b_cs: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    // Small products are not worth waking the pool.
    let par =
        if m * n * k >= 1 << 18 && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the slices cover the strided ranges (checked by the callers' length asserts); T is f32 or f64.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
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

/// The weights `[W_ih | W_hh] (G·H, C + H)` with their rows in blocked order, and the biases the walk adds.
#[derive(Clone, Debug, Default)]
struct Blocked<T> {
    perm: Vec<usize>,
    w: Vec<T>,
    bias: Vec<T>,
    b_hh: Vec<T>,
}

impl<T: Real> Blocked<T> {
    fn new(cell: Cell, d: &SeqDims, params: &[T]) -> Self {
        let (gw, ld) = (cell.gates() * d.h, d.c + d.h);
        let blocks = Blocks { g: cell.gates(), h: d.h };
        let perm: Vec<usize> = (0..gw).map(|col| blocks.natural(col)).collect();
        let (c, h) = (d.c, d.h);
        let [wi, wh, bi, bh] = param_offsets(gw, c, h);
        let mut w = Vec::with_capacity(gw * ld);
        for &r in &perm {
            w.extend_from_slice(&params[wi + r * c..wi + (r + 1) * c]);
            w.extend_from_slice(&params[wh + r * h..wh + (r + 1) * h]);
        }
        let bias = match cell {
            Cell::Lstm => perm.iter().map(|&r| params[bi + r] + params[bh + r]).collect(),
            Cell::Gru => perm.iter().map(|&r| params[bi + r]).collect(),
        };
        let b_hh = perm.iter().map(|&r| params[bh + r]).collect();
        Self { w, bias, b_hh, perm }
    }
}

/// Where `W_ih`, `W_hh`, `b_ih` and `b_hh` start in the flat parameters of `gw = G·H` gate rows. Flat rather than
/// one `(G·H, C + H + 2)` matrix: a caller that concatenates its tensors to build them gets their gradients back as
/// contiguous slices.
pub fn param_offsets(gw: usize, c: usize, h: usize) -> [usize; 4] {
    [0, gw * c, gw * (c + h), gw * (c + h + 1)]
}

/// `(B, T, C)` → `(T, B, C + H)` with `x` in the first `C` columns and zeros after. Steps at or past a sequence's
/// length get zeros too: their gate gradients are zero, and `[dW_ih | dW_hh] = dgatesᵀ [x | h_prev]` must not turn
/// a NaN or inf in the padding into `0 · NaN` (PyTorch's packed sequences never read the padding either).
fn step_major<T: Real>(x: &[T], lengths: &[usize], b: usize, tt: usize, c: usize, h: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(tt * b * (c + h));
    for t in 0..tt {
        for (r, &len) in lengths.iter().enumerate().take(b) {
            if t < len {
                out.extend_from_slice(&x[(r * tt + t) * c..(r * tt + t + 1) * c]);
            } else {
                out.resize(out.len() + c, T::ZERO);
            }
            out.resize(out.len() + h, T::ZERO);
        }
    }
    out
}

fn check<T>(cell: Cell, d: &SeqDims, x: &[T], params: &[T], lengths: &[usize], h0: &[T], c0: &[T]) {
    let SeqDims { b, t, c, h, .. } = *d;
    let gw = cell.gates() * h;
    assert!(
        x.len() == b * t * c
            && params.len() == gw * (c + h + 2)
            && lengths.len() == b
            && lengths.iter().all(|&l| l <= t)
            && h0.len() == b * h
            && c0.len() == if cell == Cell::Lstm { b * h } else { 0 },
        "rnn sequence: lengths"
    );
}

/// One direction of an LSTM or GRU layer over the sequence: writes `out (B·(T + E)·H)` (see the module
/// documentation) and returns what the backward needs (the gate activations only with `save`: inference skips
/// them). `c0` is empty for the GRU.
#[allow(clippy::too_many_arguments)]
pub fn sequence_forward<T: SeqFloat>(
    cell: Cell,
    d: SeqDims,
    x: &[T],
    params: &[T],
    lengths: &[usize],
    h0: &[T],
    c0: &[T],
    out: &mut [T],
    save: bool,
) -> SeqSaved<T> {
    check(cell, &d, x, params, lengths, h0, c0);
    let SeqDims { b, t: tt, h, .. } = d;
    let (gw, e) = (cell.gates() * h, cell.extra_rows());
    assert!(out.len() == b * (tt + e) * h, "rnn sequence: out length");
    let bw = Blocked::new(cell, &d, params);
    let lstm = cell == Cell::Lstm;
    let gates = if save { b * tt * gw } else { 0 };
    let mut saved = SeqSaved {
        cell,
        dims: d,
        lengths: lengths.to_vec(),
        gates: vec![T::ZERO; gates],
        gx: vec![T::ZERO; if lstm { 0 } else { gates }],
        xh: step_major(x, lengths, b, tt, d.c, h),
        c_prev: if lstm { vec![T::ZERO; b * tt * h] } else { vec![] },
        blocked: Blocked::default(),
    };
    if tt == 0 {
        for r in 0..b {
            out[r * h..(r + 1) * h].copy_from_slice(&h0[r * h..(r + 1) * h]);
            if lstm {
                out[(b + r) * h..(b + r + 1) * h].copy_from_slice(&c0[r * h..(r + 1) * h]);
            }
        }
        return saved;
    }
    let first = d.order()[0];
    for r in 0..b {
        let (at, from) = ((first * b + r) * h, r * h);
        saved.xh[(first * b + r) * (d.c + h) + d.c..][..h].copy_from_slice(&h0[from..from + h]);
        if lstm {
            saved.c_prev[at..at + h].copy_from_slice(&c0[from..from + h]);
        }
    }
    let walk = Walk { cell, d, lengths, w: &bw.w, bias: &bw.bias, b_hh: &bw.b_hh };
    walk.forward(&mut saved, out);
    if save {
        saved.blocked = bw;
    }
    saved
}

/// The backward of [`sequence_forward`] (run with `save`): `dout (B·(T + E)·H)` is the gradient of its `out`.
pub fn sequence_backward<T: SeqFloat>(saved: &SeqSaved<T>, dout: &[T]) -> SeqGrads<T> {
    let (cell, d, lengths) = (saved.cell, saved.dims, &saved.lengths[..]);
    let SeqDims { b, t: tt, c, h, .. } = d;
    let (gw, e) = (cell.gates() * h, cell.extra_rows());
    let lstm = cell == Cell::Lstm;
    assert!(
        dout.len() == b * (tt + e) * h && saved.gates.len() == b * tt * gw && saved.xh.len() == b * tt * (c + h),
        "rnn sequence backward: lengths"
    );
    let mut g = SeqGrads {
        dx: vec![T::ZERO; b * tt * c],
        dparams: vec![T::ZERO; gw * (c + h + 2)],
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
        return g;
    }
    let bw = &saved.blocked;
    assert!(bw.perm.len() == gw, "rnn sequence backward: the forward kept no activations");
    let walk = Walk { cell, d, lengths, w: &bw.w, bias: &bw.bias, b_hh: &bw.b_hh };
    let mut dgx = vec![T::ZERO; if lstm { 0 } else { b * tt * gw }];
    let (mut db, mut db_x) = (vec![T::ZERO; gw], vec![T::ZERO; gw]);
    let dgates = walk.backward(saved, dout, &mut dgx, &mut db, &mut db_x, &mut g.dh0, &mut g.dc0);
    let dgx = if lstm { &dgates } else { &dgx };
    let ld = c + h;
    // dx = dgx W_ih: (T·B × G·H) · (G·H × C) (W_ih: the first C columns of the blocked [W_ih | W_hh]), step-major
    // like the gates, then batch-major.
    let mut dx = vec![T::ZERO; b * tt * c];
    gemm(b * tt, c, gw, &mut dx, c, dgx, gw, 1, &bw.w, ld, 1, false);
    for (t, rows) in dx.chunks_exact(b * c).enumerate() {
        for (r, row) in rows.chunks_exact(c).enumerate() {
            g.dx[(r * tt + t) * c..(r * tt + t + 1) * c].copy_from_slice(row);
        }
    }
    // [dW_ih | dW_hh] = dgatesᵀ [x | h_prev]: (G·H × T·B) · (T·B × C + H), one product for the LSTM; the GRU's two
    // halves have different gate gradients (dW_ih from dgx, dW_hh from dgh).
    let mut dw = vec![T::ZERO; gw * ld];
    if lstm {
        gemm(gw, ld, b * tt, &mut dw, ld, &dgates, 1, gw, &saved.xh, ld, 1, false);
    } else {
        gemm(gw, c, b * tt, &mut dw, ld, dgx, 1, gw, &saved.xh, ld, 1, false);
        gemm(gw, h, b * tt, &mut dw[c..], ld, &dgates, 1, gw, &saved.xh[c..], ld, 1, false);
    }
    // Back to PyTorch's rows, with the bias gradients (the LSTM's two biases both add to the gates).
    let db_ih = if lstm { &db } else { &db_x };
    let [wi, wh, bi, bh] = param_offsets(gw, c, h);
    for (col, (row, &r)) in dw.chunks_exact(ld).zip(&bw.perm).enumerate() {
        g.dparams[wi + r * c..wi + (r + 1) * c].copy_from_slice(&row[..c]);
        g.dparams[wh + r * h..wh + (r + 1) * h].copy_from_slice(&row[c..]);
        g.dparams[bi + r] = db_ih[col];
        g.dparams[bh + r] = db[col];
    }
    g
}
