//! Whole-sequence LSTM and GRU: every time step of one direction of one layer in one call, forward and backward,
//! the way llm.c and cuDNN run recurrences rather than as a graph of per-step ops.
//!
//! The caller computes the input half of the gates for all steps at once (`gx = x W_ihᵀ + b`, one large matrix
//! product). Per step, this kernel does the recurrent product `h W_hhᵀ` (gemm) and the fused cell. In f32 the steps
//! run on persistent threads over packed weights (`rnn_par`); the step loops here serve f64, the checking dtype. The backward
//! walks the steps in reverse with one gemm per step (`dh_{t−1} = dgates_t W_hh`) and then forms the weight
//! gradient of all steps in **one** gemm (`dW_hh = Σ_t dgates_tᵀ h_{t−1}`), where a per-step autograd graph would
//! allocate and add a `(G·H, H)` gradient per step.
//!
//! Lengths: a row `b` processes steps `t < len[b]` only; past its length its state is carried unchanged and its
//! output is zero. `reverse` walks `t = T−1 … 0` (the backward direction of a bidirectional layer, which so starts
//! at each sequence's own last step).
//!
//! # Shapes (row-major)
//! `gx (B, T, G·H)`, `w_hh (G·H, H)`, states `(B, H)`, outputs `y (B, T, H)`; `G = 4` (LSTM, gates i f g o) or
//! `3` (GRU, gates r z n; its `b_hh` is passed apart because `r` multiplies `W_hn h + b_hn`).

use std::any::TypeId;

use crate::rnn::{as_f32, as_f32_mut, gru_cell_backward, gru_cell_forward, lstm_cell_backward, lstm_cell_forward};
use crate::Real;

/// The saved activations as f32 when `T` is f32.
fn saved_f32<T: 'static>(s: &mut SeqSaved<T>) -> Option<&mut SeqSaved<f32>> {
    // SAFETY: T is f32, so the types are the same.
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| unsafe { &mut *(s as *mut SeqSaved<T> as *mut SeqSaved<f32>) })
}

fn saved_f32_ref<T: 'static>(s: &SeqSaved<T>) -> Option<&SeqSaved<f32>> {
    // SAFETY: as `saved_f32`.
    (TypeId::of::<T>() == TypeId::of::<f32>()).then(|| unsafe { &*(s as *const SeqSaved<T> as *const SeqSaved<f32>) })
}

/// Sizes of one sequence call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqDims {
    pub b: usize,
    pub t: usize,
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

/// What the forward keeps for the backward: per processed step (in step order `t`), the state before it and the
/// gate pre-activations (LSTM) or recurrent gates `gh` (GRU).
#[derive(Clone, Debug, Default)]
pub struct SeqSaved<T> {
    /// `(T, B, H)`: `h_{t−1}` as step `t` read it.
    pub h_prev: Vec<T>,
    /// `(T, B, H)`: `c_{t−1}` (LSTM).
    pub c_prev: Vec<T>,
    /// `(T, B, G·H)`: LSTM gate pre-activations, or GRU's `gh = W_hh h + b_hh`.
    pub gates: Vec<T>,
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

fn check<T>(d: &SeqDims, g: usize, gx: &[T], w_hh: &[T], lengths: &[usize]) {
    let SeqDims { b, t, h, .. } = *d;
    assert!(
        gx.len() == b * t * g * h && w_hh.len() == g * h * h && lengths.len() == b && lengths.iter().all(|&l| l <= t),
        "rnn sequence: lengths"
    );
}

/// Copies step `t` of `gx (B, T, W)` into `dst (B, W)`.
fn step_rows<T: Copy>(gx: &[T], t: usize, tt: usize, w: usize, dst: &mut [T]) {
    for (r, row) in dst.chunks_exact_mut(w).enumerate() {
        row.copy_from_slice(&gx[(r * tt + t) * w..(r * tt + t + 1) * w]);
    }
}

/// LSTM forward over the sequence. Writes `y (B, T, H)`, the final `h`, `c` (into `h`, `c`, which hold the
/// initial state on entry) and fills `saved`.
#[allow(clippy::too_many_arguments)]
pub fn lstm_sequence_forward<T: Real>(
    d: SeqDims,
    gx: &[T],
    w_hh: &[T],
    lengths: &[usize],
    h: &mut [T],
    c: &mut [T],
    y: &mut [T],
    saved: &mut SeqSaved<T>,
) {
    check(&d, 4, gx, w_hh, lengths);
    let SeqDims { b, t: tt, h: hw, .. } = d;
    assert!(h.len() == b * hw && c.len() == b * hw && y.len() == b * tt * hw, "lstm sequence: state lengths");
    saved.h_prev = vec![T::ZERO; tt * b * hw];
    saved.c_prev = vec![T::ZERO; tt * b * hw];
    saved.gates = vec![T::ZERO; tt * b * 4 * hw];
    y.iter_mut().for_each(|v| *v = T::ZERO);
    if let (Some(gx), Some(w), Some(h), Some(c), Some(y), Some(sv)) =
        (as_f32(gx), as_f32(w_hh), as_f32_mut(h), as_f32_mut(c), as_f32_mut(y), saved_f32(saved))
    {
        crate::rnn_par::lstm_forward(d, gx, w, lengths, h, c, y, sv);
        return;
    }
    let mut hc = vec![T::ZERO; b * 2 * hw];
    for t in d.order() {
        let gates = &mut saved.gates[t * b * 4 * hw..(t + 1) * b * 4 * hw];
        step_rows(gx, t, tt, 4 * hw, gates);
        // gates += h W_hhᵀ: W_hhᵀ (H × 4H) read with row stride 1, column stride H.
        gemm(b, 4 * hw, hw, gates, 4 * hw, h, hw, 1, w_hh, 1, hw, true);
        saved.h_prev[t * b * hw..(t + 1) * b * hw].copy_from_slice(h);
        saved.c_prev[t * b * hw..(t + 1) * b * hw].copy_from_slice(c);
        lstm_cell_forward(gates, c, &mut hc, hw);
        for r in 0..b {
            if t < lengths[r] {
                h[r * hw..(r + 1) * hw].copy_from_slice(&hc[r * 2 * hw..r * 2 * hw + hw]);
                c[r * hw..(r + 1) * hw].copy_from_slice(&hc[r * 2 * hw + hw..(r + 1) * 2 * hw]);
                y[(r * tt + t) * hw..(r * tt + t + 1) * hw].copy_from_slice(&h[r * hw..(r + 1) * hw]);
            }
        }
    }
}

/// LSTM backward. `dy (B, T, H)`; `dh`, `dc` hold the gradients of the final state on entry and of the initial
/// state on return. Writes `dgx (B, T, 4H)` and adds into `dw_hh (4H, H)`.
#[allow(clippy::too_many_arguments)]
pub fn lstm_sequence_backward<T: Real>(
    d: SeqDims,
    w_hh: &[T],
    lengths: &[usize],
    saved: &SeqSaved<T>,
    dy: &[T],
    dh: &mut [T],
    dc: &mut [T],
    dgx: &mut [T],
    dw_hh: &mut [T],
) {
    let SeqDims { b, t: tt, h: hw, .. } = d;
    assert!(
        dy.len() == b * tt * hw && dgx.len() == b * tt * 4 * hw && dw_hh.len() == 4 * hw * hw,
        "lstm backward: lengths"
    );
    let dgates = match (as_f32(w_hh), saved_f32_ref(saved), as_f32(dy), as_f32_mut(dh), as_f32_mut(dc)) {
        (Some(w), Some(sv), Some(dyf), Some(dhf), Some(dcf)) => {
            let g = crate::rnn_par::lstm_backward(d, w, lengths, sv, dyf, dhf, dcf);
            // SAFETY: T is f32 here.
            unsafe { std::mem::transmute::<Vec<f32>, Vec<T>>(g) }
        }
        _ => lstm_backward_steps(d, w_hh, lengths, saved, dy, dh, dc),
    };
    // dW_hh += Σ_t dgates_tᵀ h_{t−1}: (4H × T·B) · (T·B × H) in one product.
    gemm(4 * hw, hw, tt * b, dw_hh, hw, &dgates, 1, 4 * hw, &saved.h_prev, hw, 1, true);
    for r in 0..b {
        for t in 0..tt {
            dgx[(r * tt + t) * 4 * hw..(r * tt + t + 1) * 4 * hw]
                .copy_from_slice(&dgates[(t * b + r) * 4 * hw..(t * b + r + 1) * 4 * hw]);
        }
    }
}

/// The step-by-step walk of [`lstm_sequence_backward`] (f64): the gate gradients `(T, B, 4H)`.
fn lstm_backward_steps<T: Real>(
    d: SeqDims,
    w_hh: &[T],
    lengths: &[usize],
    saved: &SeqSaved<T>,
    dy: &[T],
    dh: &mut [T],
    dc: &mut [T],
) -> Vec<T> {
    let SeqDims { b, t: tt, h: hw, .. } = d;
    let mut dgates = vec![T::ZERO; tt * b * 4 * hw]; // (T, B, 4H)
    let mut dout = vec![T::ZERO; b * 2 * hw];
    let mut dcp = vec![T::ZERO; b * hw];
    let mut dhp = vec![T::ZERO; b * hw];
    let order: Vec<usize> = d.order();
    for &t in order.iter().rev() {
        for r in 0..b {
            for j in 0..hw {
                let valid = t < lengths[r];
                dout[r * 2 * hw + j] = dh[r * hw + j] + if valid { dy[(r * tt + t) * hw + j] } else { T::ZERO };
                dout[r * 2 * hw + hw + j] = dc[r * hw + j];
            }
        }
        let dg = &mut dgates[t * b * 4 * hw..(t + 1) * b * 4 * hw];
        lstm_cell_backward(
            &saved.gates[t * b * 4 * hw..(t + 1) * b * 4 * hw],
            &saved.c_prev[t * b * hw..(t + 1) * b * hw],
            &dout,
            dg,
            &mut dcp,
            hw,
        );
        // A row past its length carried its state through this step: its gradients pass through untouched.
        for r in 0..b {
            if t >= lengths[r] {
                dg[r * 4 * hw..(r + 1) * 4 * hw].iter_mut().for_each(|v| *v = T::ZERO);
                dcp[r * hw..(r + 1) * hw].copy_from_slice(&dc[r * hw..(r + 1) * hw]);
            }
        }
        gemm(b, hw, 4 * hw, &mut dhp, hw, dg, 4 * hw, 1, w_hh, hw, 1, false); // dh_{t−1} = dgates_t W_hh
        for r in 0..b {
            if t >= lengths[r] {
                dhp[r * hw..(r + 1) * hw].copy_from_slice(&dh[r * hw..(r + 1) * hw]);
            }
        }
        dh.copy_from_slice(&dhp);
        dc.copy_from_slice(&dcp);
    }
    dgates
}

/// GRU forward over the sequence; `b_hh (3H)` is added to the recurrent gates. Writes `y (B, T, H)` and the final
/// `h` (which holds the initial state on entry), and fills `saved`.
#[allow(clippy::too_many_arguments)]
pub fn gru_sequence_forward<T: Real>(
    d: SeqDims,
    gx: &[T],
    w_hh: &[T],
    b_hh: &[T],
    lengths: &[usize],
    h: &mut [T],
    y: &mut [T],
    saved: &mut SeqSaved<T>,
) {
    check(&d, 3, gx, w_hh, lengths);
    let SeqDims { b, t: tt, h: hw, .. } = d;
    assert!(b_hh.len() == 3 * hw && h.len() == b * hw && y.len() == b * tt * hw, "gru sequence: lengths");
    saved.h_prev = vec![T::ZERO; tt * b * hw];
    saved.gates = vec![T::ZERO; tt * b * 3 * hw];
    saved.c_prev.clear();
    y.iter_mut().for_each(|v| *v = T::ZERO);
    if let (Some(gx), Some(w), Some(bh), Some(h), Some(y), Some(sv)) =
        (as_f32(gx), as_f32(w_hh), as_f32(b_hh), as_f32_mut(h), as_f32_mut(y), saved_f32(saved))
    {
        crate::rnn_par::gru_forward(d, gx, w, bh, lengths, h, y, sv);
        return;
    }
    let (mut gxt, mut hn) = (vec![T::ZERO; b * 3 * hw], vec![T::ZERO; b * hw]);
    for t in d.order() {
        let gh = &mut saved.gates[t * b * 3 * hw..(t + 1) * b * 3 * hw];
        for row in gh.chunks_exact_mut(3 * hw) {
            row.copy_from_slice(b_hh);
        }
        gemm(b, 3 * hw, hw, gh, 3 * hw, h, hw, 1, w_hh, 1, hw, true); // gh = b_hh + h W_hhᵀ
        step_rows(gx, t, tt, 3 * hw, &mut gxt);
        saved.h_prev[t * b * hw..(t + 1) * b * hw].copy_from_slice(h);
        gru_cell_forward(&gxt, gh, h, &mut hn, hw);
        for r in 0..b {
            if t < lengths[r] {
                h[r * hw..(r + 1) * hw].copy_from_slice(&hn[r * hw..(r + 1) * hw]);
                y[(r * tt + t) * hw..(r * tt + t + 1) * hw].copy_from_slice(&hn[r * hw..(r + 1) * hw]);
            }
        }
    }
}

/// GRU backward. `dh` holds the gradient of the final state on entry and of the initial state on return. Writes
/// `dgx (B, T, 3H)` and adds into `dw_hh (3H, H)` and `db_hh (3H)`.
#[allow(clippy::too_many_arguments)]
pub fn gru_sequence_backward<T: Real>(
    d: SeqDims,
    gx: &[T],
    w_hh: &[T],
    lengths: &[usize],
    saved: &SeqSaved<T>,
    dy: &[T],
    dh: &mut [T],
    dgx: &mut [T],
    dw_hh: &mut [T],
    db_hh: &mut [T],
) {
    let SeqDims { b, t: tt, h: hw, .. } = d;
    assert!(
        dy.len() == b * tt * hw && dgx.len() == b * tt * 3 * hw && dw_hh.len() == 3 * hw * hw && db_hh.len() == 3 * hw,
        "gru backward: lengths"
    );
    let dghs = match (as_f32(gx), as_f32(w_hh), saved_f32_ref(saved), as_f32(dy), as_f32_mut(dh), as_f32_mut(dgx)) {
        (Some(gxf), Some(w), Some(sv), Some(dyf), Some(dhf), Some(dgxf)) => {
            let g = crate::rnn_par::gru_backward(d, gxf, w, lengths, sv, dyf, dhf, dgxf);
            // SAFETY: T is f32 here.
            unsafe { std::mem::transmute::<Vec<f32>, Vec<T>>(g) }
        }
        _ => gru_backward_steps(d, gx, w_hh, lengths, saved, dy, dh, dgx),
    };
    gemm(3 * hw, hw, tt * b, dw_hh, hw, &dghs, 1, 3 * hw, &saved.h_prev, hw, 1, true);
    for row in dghs.chunks_exact(3 * hw) {
        for (a, &g) in db_hh.iter_mut().zip(row) {
            *a += g;
        }
    }
}

/// The step-by-step walk of [`gru_sequence_backward`] (f64): writes `dgx`, returns the recurrent gate gradients
/// `(T, B, 3H)`.
#[allow(clippy::too_many_arguments)]
fn gru_backward_steps<T: Real>(
    d: SeqDims,
    gx: &[T],
    w_hh: &[T],
    lengths: &[usize],
    saved: &SeqSaved<T>,
    dy: &[T],
    dh: &mut [T],
    dgx: &mut [T],
) -> Vec<T> {
    let SeqDims { b, t: tt, h: hw, .. } = d;
    let mut dghs = vec![T::ZERO; tt * b * 3 * hw]; // (T, B, 3H)
    let (mut gxt, mut dgxt) = (vec![T::ZERO; b * 3 * hw], vec![T::ZERO; b * 3 * hw]);
    let (mut dyt, mut ddirect, mut dhp) = (vec![T::ZERO; b * hw], vec![T::ZERO; b * hw], vec![T::ZERO; b * hw]);
    let order: Vec<usize> = d.order();
    for &t in order.iter().rev() {
        for r in 0..b {
            let valid = t < lengths[r];
            for j in 0..hw {
                dyt[r * hw + j] = dh[r * hw + j] + if valid { dy[(r * tt + t) * hw + j] } else { T::ZERO };
            }
        }
        step_rows(gx, t, tt, 3 * hw, &mut gxt);
        let dgh = &mut dghs[t * b * 3 * hw..(t + 1) * b * 3 * hw];
        let hp = &saved.h_prev[t * b * hw..(t + 1) * b * hw];
        gru_cell_backward(
            &gxt,
            &saved.gates[t * b * 3 * hw..(t + 1) * b * 3 * hw],
            hp,
            &dyt,
            &mut dgxt,
            dgh,
            &mut ddirect,
            hw,
        );
        for r in 0..b {
            if t >= lengths[r] {
                dgxt[r * 3 * hw..(r + 1) * 3 * hw].iter_mut().for_each(|v| *v = T::ZERO);
                dgh[r * 3 * hw..(r + 1) * 3 * hw].iter_mut().for_each(|v| *v = T::ZERO);
            }
        }
        // dh_{t−1} = direct part + dgh_t W_hh.
        dhp.copy_from_slice(&ddirect);
        gemm(b, hw, 3 * hw, &mut dhp, hw, dgh, 3 * hw, 1, w_hh, hw, 1, true); // + dgh_t W_hh
        for r in 0..b {
            if t >= lengths[r] {
                dhp[r * hw..(r + 1) * hw].copy_from_slice(&dh[r * hw..(r + 1) * hw]);
            }
            dgx[(r * tt + t) * 3 * hw..(r * tt + t + 1) * 3 * hw].copy_from_slice(&dgxt[r * 3 * hw..(r + 1) * 3 * hw]);
        }
        dh.copy_from_slice(&dhp);
    }
    dghs
}
