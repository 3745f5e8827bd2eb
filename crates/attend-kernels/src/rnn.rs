//! Fused recurrent cells: every gate of a time step in one pass, forward and backward.
//!
//! The matrix products (`W_ih x + b_ih`, `W_hh h + b_hh`) stay outside, in the tensor library's GEMM; these kernels
//! do everything elementwise that follows them, which in a composed implementation is a dozen separate passes over
//! `(B, 4H)` tensors per step. Gate orders are PyTorch's.
//!
//! LSTM (`gates = W_ih x + b_ih + W_hh h + b_hh`, chunks i, f, g, o):
//! `c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)`, `h' = σ(o) ⊙ tanh(c')`.
//!
//! GRU (`gx = W_ih x + b_ih`, `gh = W_hh h + b_hh`, chunks r, z, n):
//! `r = σ(gx_r + gh_r)`, `z = σ(gx_z + gh_z)`, `n = tanh(gx_n + r ⊙ gh_n)`, `h' = (1 − z) ⊙ n + z ⊙ h`.
//!
//! # Shapes
//! `N` rows (the batch) of hidden width `H`: LSTM `gates (N, 4H)`, `c (N, H)`, output `[h' | c'] (N, 2H)`; GRU
//! `gx`, `gh (N, 3H)`, `h (N, H)`, output `h' (N, H)`.

use std::any::TypeId;

use rayon::prelude::*;

use crate::flash::simd::{per_isa, Isa, Simd};
use crate::rnn_par::{Blocks, BLOCK};
use crate::Real;

/// σ(x) from e = exp(−|x|) ≤ 1: 1/(1 + e) for x ≥ 0, e/(1 + e) below. Nothing overflows, the limits are exact, and
/// the left tail keeps its relative accuracy (`(tanh(x/2) + 1)/2` cancels there: σ(−30) came out 0 in f32).
#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    let e = (T::ZERO - x.max(T::ZERO - x)).exp();
    let r = T::ONE / (T::ONE + e);
    if x < T::ZERO {
        e * r
    } else {
        r
    }
}

/// Rows per thread of a cell kernel: a step of a recurrence is short (tens of microseconds), so a task gets at
/// least 64K gate values before waking another thread is worth it.
fn cell_rows_per_task(width: usize) -> usize {
    ((1 << 16) / width.max(1)).max(1)
}

/// `&[T]` as `&[f32]` when `T` is `f32` (the vector paths are written for f32).
pub(crate) fn as_f32<T: 'static>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 (same type, so same size and alignment).
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

pub(crate) fn as_f32_mut<T: 'static>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as `as_f32`.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

/// LSTM step: from the gate pre-activations `gates (N, 4H)` and the cell `c (N, H)`, writes `[h' | c'] (N, 2H)`.
/// f32 runs the vector path of the CPU's instruction set, rows split over threads.
pub fn lstm_cell_forward<T: Real>(gates: &[T], c: &[T], out: &mut [T], h: usize) {
    assert!(h > 0 && gates.len() == 4 * c.len() && out.len() == 2 * c.len() && c.len() % h == 0, "lstm_cell: lengths");
    if let (Some(g), Some(cf), Some(o)) = (as_f32(gates), as_f32(c), as_f32_mut(out)) {
        let rows = cell_rows_per_task(4 * h);
        let isa = Isa::detect();
        o.par_chunks_mut(2 * h * rows).enumerate().for_each(|(k, ok)| {
            let r0 = k * rows;
            let n = ok.len() / (2 * h);
            // SAFETY: `isa` is supported (detected); the slices hold `n` rows of the lengths the routine reads.
            unsafe { lstm_forward_isa(isa, &g[r0 * 4 * h..(r0 + n) * 4 * h], &cf[r0 * h..(r0 + n) * h], ok, h) }
        });
        return;
    }
    lstm_cell_forward_scalar(gates, c, out, h)
}

/// One LSTM unit from its gate pre-activations `[i, f, g, o]` and cell `c`: the activations σ(i), σ(f), tanh(g),
/// σ(o), the new cell `c'` and output `h'`.
#[inline(always)]
fn lstm_unit_forward<T: Real>(g: [T; 4], c: T) -> ([T; 4], T, T) {
    let (i, f, gg, o) = (sigmoid(g[0]), sigmoid(g[1]), g[2].tanh(), sigmoid(g[3]));
    let c1 = f * c + i * gg;
    ([i, f, gg, o], c1, o * c1.tanh())
}

/// The backward of [`lstm_unit_forward`] from its activations `a`, the cell `c` it read, the total gradient of
/// `h'` and the gradient of `c'` from the next step: the gate gradients and the gradient of `c`.
#[inline(always)]
fn lstm_unit_backward<T: Real>(a: [T; 4], c: T, dh: T, dc: T) -> ([T; 4], T) {
    let [i, f, gg, o] = a;
    let tc = (f * c + i * gg).tanh();
    // The new cell reaches the loss directly and through h' = o ⊙ tanh(c').
    let dct = dc + dh * o * (T::ONE - tc * tc);
    let dg = [
        dct * gg * i * (T::ONE - i),
        dct * c * f * (T::ONE - f),
        dct * i * (T::ONE - gg * gg),
        dh * tc * o * (T::ONE - o),
    ];
    (dg, dct * f)
}

pub(crate) fn lstm_cell_forward_scalar<T: Real>(gates: &[T], c: &[T], out: &mut [T], h: usize) {
    for ((g, cr), o) in gates.chunks_exact(4 * h).zip(c.chunks_exact(h)).zip(out.chunks_exact_mut(2 * h)) {
        let (hn, cn) = o.split_at_mut(h);
        for j in 0..h {
            (_, cn[j], hn[j]) = lstm_unit_forward([g[j], g[h + j], g[2 * h + j], g[3 * h + j]], cr[j]);
        }
    }
}

/// Backward of [`lstm_cell_forward`]: from `d[h' | c'] (N, 2H)` writes `dgates (N, 4H)` and `dc (N, H)`,
/// recomputing the gates from `gates` and `c` (nothing saved but the inputs).
pub fn lstm_cell_backward<T: Real>(gates: &[T], c: &[T], dout: &[T], dgates: &mut [T], dc: &mut [T], h: usize) {
    let n = c.len();
    assert!(
        h > 0 && gates.len() == 4 * n && dout.len() == 2 * n && dgates.len() == 4 * n && dc.len() == n && n % h == 0,
        "lstm_cell_backward: lengths"
    );
    if let (Some(g), Some(cf), Some(d), Some(dg), Some(dcf)) =
        (as_f32(gates), as_f32(c), as_f32(dout), as_f32_mut(dgates), as_f32_mut(dc))
    {
        let rows = cell_rows_per_task(4 * h);
        let isa = Isa::detect();
        dg.par_chunks_mut(4 * h * rows).zip(dcf.par_chunks_mut(h * rows)).enumerate().for_each(|(k, (dgk, dck))| {
            let (r0, m) = (k * rows, dck.len() / h);
            let (gk, ck, dk) =
                (&g[r0 * 4 * h..(r0 + m) * 4 * h], &cf[r0 * h..(r0 + m) * h], &d[r0 * 2 * h..(r0 + m) * 2 * h]);
            // SAFETY: `isa` is supported; the slices hold `m` rows.
            unsafe { lstm_backward_isa(isa, gk, ck, dk, dgk, dck, h) }
        });
        return;
    }
    lstm_cell_backward_scalar(gates, c, dout, dgates, dc, h)
}

pub(crate) fn lstm_cell_backward_scalar<T: Real>(
    gates: &[T],
    c: &[T],
    dout: &[T],
    dgates: &mut [T],
    dc: &mut [T],
    h: usize,
) {
    let rows = gates.chunks_exact(4 * h).zip(c.chunks_exact(h)).zip(dout.chunks_exact(2 * h));
    for (((g, cr), d), (dg, dcr)) in rows.zip(dgates.chunks_exact_mut(4 * h).zip(dc.chunks_exact_mut(h))) {
        let (dh, dc1) = d.split_at(h);
        for j in 0..h {
            let (a, _, _) = lstm_unit_forward([g[j], g[h + j], g[2 * h + j], g[3 * h + j]], cr[j]);
            let (d, dcp) = lstm_unit_backward(a, cr[j], dh[j], dc1[j]);
            (dg[j], dg[h + j], dg[2 * h + j], dg[3 * h + j], dcr[j]) = (d[0], d[1], d[2], d[3], dcp);
        }
    }
}

/// GRU step: from `gx`, `gh (N, 3H)` and `h (N, H)` writes `h' (N, H)`.
pub fn gru_cell_forward<T: Real>(gx: &[T], gh: &[T], hp: &[T], out: &mut [T], h: usize) {
    let n = hp.len();
    assert!(h > 0 && gx.len() == 3 * n && gh.len() == 3 * n && out.len() == n && n % h == 0, "gru_cell: lengths");
    if let (Some(x), Some(g), Some(hf), Some(o)) = (as_f32(gx), as_f32(gh), as_f32(hp), as_f32_mut(out)) {
        let rows = cell_rows_per_task(3 * h);
        let isa = Isa::detect();
        o.par_chunks_mut(h * rows).enumerate().for_each(|(k, ok)| {
            let (r0, m) = (k * rows, ok.len() / h);
            let (xk, gk, hk) =
                (&x[r0 * 3 * h..(r0 + m) * 3 * h], &g[r0 * 3 * h..(r0 + m) * 3 * h], &hf[r0 * h..(r0 + m) * h]);
            // SAFETY: `isa` is supported; the slices hold `m` rows.
            unsafe { gru_forward_isa(isa, xk, gk, hk, ok, h) }
        });
        return;
    }
    gru_cell_forward_scalar(gx, gh, hp, out, h)
}

pub(crate) fn gru_cell_forward_scalar<T: Real>(gx: &[T], gh: &[T], hp: &[T], out: &mut [T], h: usize) {
    let n = hp.len();
    for row in 0..n / h {
        let (x, g) = (&gx[row * 3 * h..(row + 1) * 3 * h], &gh[row * 3 * h..(row + 1) * 3 * h]);
        let (hr, o) = (&hp[row * h..(row + 1) * h], &mut out[row * h..(row + 1) * h]);
        for j in 0..h {
            let r = sigmoid(x[j] + g[j]);
            let z = sigmoid(x[h + j] + g[h + j]);
            let nn = (x[2 * h + j] + r * g[2 * h + j]).tanh();
            o[j] = (T::ONE - z) * nn + z * hr[j];
        }
    }
}

/// Backward of [`gru_cell_forward`]: from `dh' (N, H)` writes `dgx`, `dgh (N, 3H)` and the direct part of
/// `dh (N, H)` (the part through `W_hh` comes from `dgh` by the caller's matmul backward).
#[allow(clippy::too_many_arguments)]
pub fn gru_cell_backward<T: Real>(
    gx: &[T],
    gh: &[T],
    hp: &[T],
    dout: &[T],
    dgx: &mut [T],
    dgh: &mut [T],
    dh: &mut [T],
    h: usize,
) {
    let n = hp.len();
    assert!(
        h > 0
            && gx.len() == 3 * n
            && gh.len() == 3 * n
            && dout.len() == n
            && dgx.len() == 3 * n
            && dgh.len() == 3 * n
            && dh.len() == n
            && n % h == 0,
        "gru_cell_backward: lengths"
    );
    if let (Some(x), Some(g), Some(hf), Some(d), Some(dx), Some(dg), Some(dhf)) =
        (as_f32(gx), as_f32(gh), as_f32(hp), as_f32(dout), as_f32_mut(dgx), as_f32_mut(dgh), as_f32_mut(dh))
    {
        let rows = cell_rows_per_task(3 * h);
        let isa = Isa::detect();
        dx.par_chunks_mut(3 * h * rows)
            .zip(dg.par_chunks_mut(3 * h * rows))
            .zip(dhf.par_chunks_mut(h * rows))
            .enumerate()
            .for_each(|(k, ((dxk, dgk), dhk))| {
                let (r0, m) = (k * rows, dhk.len() / h);
                let (a, b) = (r0 * 3 * h, (r0 + m) * 3 * h);
                let (xk, gk, hk, dk) = (&x[a..b], &g[a..b], &hf[r0 * h..(r0 + m) * h], &d[r0 * h..(r0 + m) * h]);
                // SAFETY: `isa` is supported; the slices hold `m` rows.
                unsafe { gru_backward_isa(isa, xk, gk, hk, dk, dxk, dgk, dhk, h) }
            });
        return;
    }
    gru_cell_backward_scalar(gx, gh, hp, dout, dgx, dgh, dh, h)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gru_cell_backward_scalar<T: Real>(
    gx: &[T],
    gh: &[T],
    hp: &[T],
    dout: &[T],
    dgx: &mut [T],
    dgh: &mut [T],
    dh: &mut [T],
    h: usize,
) {
    let n = hp.len();
    for row in 0..n / h {
        let (x, g) = (&gx[row * 3 * h..(row + 1) * 3 * h], &gh[row * 3 * h..(row + 1) * 3 * h]);
        let (hr, d) = (&hp[row * h..(row + 1) * h], &dout[row * h..(row + 1) * h]);
        let (dx, dg) = (&mut dgx[row * 3 * h..(row + 1) * 3 * h], &mut dgh[row * 3 * h..(row + 1) * 3 * h]);
        let dhr = &mut dh[row * h..(row + 1) * h];
        for j in 0..h {
            let r = sigmoid(x[j] + g[j]);
            let z = sigmoid(x[h + j] + g[h + j]);
            let nn = (x[2 * h + j] + r * g[2 * h + j]).tanh();
            let dn = d[j] * (T::ONE - z) * (T::ONE - nn * nn);
            let dz = d[j] * (hr[j] - nn) * z * (T::ONE - z);
            let dr = dn * g[2 * h + j] * r * (T::ONE - r);
            dx[j] = dr;
            dg[j] = dr;
            dx[h + j] = dz;
            dg[h + j] = dz;
            dx[2 * h + j] = dn;
            dg[2 * h + j] = dn * r;
            dhr[j] = d[j] * z;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// f32 vector paths: the same equations over `S::LANES` hidden units at a time; the tail of a row (H not a multiple
// of the lanes) runs the scalar code. Transcendentals are the kernel library's vector exp and tanh (relative error
// ~1e-7).

/// [`sigmoid`] over a vector: half the operations of the tanh form. σ(−∞) = 0, σ(∞) = 1, NaN stays NaN.
#[inline(always)]
unsafe fn sigmoid_v<S: Simd>(x: S::V) -> S::V {
    let e = S::exp_nonpos(S::sub(S::zero(), S::abs(x)));
    let r = S::div(S::splat(1.0), S::add(S::splat(1.0), e));
    S::select_lt(x, S::zero(), S::mul(e, r), r)
}

/// The vector part of a row: `0..h − h % LANES`.
#[inline(always)]
fn vector_len<S: Simd>(h: usize) -> usize {
    h - h % S::LANES
}

/// The activations σ(i), σ(f), tanh(g), σ(o) of one vector of units, gate chunks `stride` apart from `g`.
#[inline(always)]
unsafe fn lstm_acts_v<S: Simd>(g: *const f32, stride: usize) -> [S::V; 4] {
    let i = sigmoid_v::<S>(S::load(g));
    let f = sigmoid_v::<S>(S::load(g.add(stride)));
    let gg = S::tanh(S::load(g.add(2 * stride)));
    [i, f, gg, sigmoid_v::<S>(S::load(g.add(3 * stride)))]
}

/// One vector of LSTM units: gate chunks `stride` apart from `g` (i f g o), the cell `c` → `h'`, `c'`; returns
/// the activations σ(i), σ(f), tanh(g), σ(o) (the sequence kernel keeps them for its backward).
#[inline(always)]
unsafe fn lstm_forward_v<S: Simd>(
    g: *const f32,
    stride: usize,
    c: *const f32,
    hn: *mut f32,
    cn: *mut f32,
) -> [S::V; 4] {
    let [i, f, gg, og] = lstm_acts_v::<S>(g, stride);
    let c1 = S::fma(f, S::load(c), S::mul(i, gg));
    S::store(cn, c1);
    S::store(hn, S::mul(og, S::tanh(c1)));
    [i, f, gg, og]
}

/// One vector of the LSTM backward: `dh` (total) and `dc` (from the next step) → gate gradients, `dc` of `c`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lstm_backward_v<S: Simd>(
    g: *const f32,
    stride: usize,
    c: *const f32,
    dh: S::V,
    dc: S::V,
    dg: *mut f32,
    dg_stride: usize,
    dc_out: *mut f32,
) {
    lstm_backward_acts_v::<S>(lstm_acts_v::<S>(g, stride), c, dh, dc, dg, dg_stride, dc_out)
}

/// [`lstm_backward_v`] from the activations σ(i), σ(f), tanh(g), σ(o) (what the sequence kernel's forward kept).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lstm_backward_acts_v<S: Simd>(
    [i, f, gg, og]: [S::V; 4],
    c: *const f32,
    dh: S::V,
    dc: S::V,
    dg: *mut f32,
    dg_stride: usize,
    dc_out: *mut f32,
) {
    let one = S::splat(1.0);
    let cprev = S::load(c);
    let tc = S::tanh(S::fma(f, cprev, S::mul(i, gg)));
    // dc_total = dc' + dh·o·(1 − tanh²c')
    let dct = S::fma(S::mul(dh, og), S::sub(one, S::mul(tc, tc)), dc);
    S::store(dg, S::mul(S::mul(dct, gg), S::mul(i, S::sub(one, i))));
    S::store(dg.add(dg_stride), S::mul(S::mul(dct, cprev), S::mul(f, S::sub(one, f))));
    S::store(dg.add(2 * dg_stride), S::mul(S::mul(dct, i), S::sub(one, S::mul(gg, gg))));
    S::store(dg.add(3 * dg_stride), S::mul(S::mul(dh, tc), S::mul(og, S::sub(one, og))));
    S::store(dc_out, S::mul(dct, f));
}

/// One vector of GRU units: `x`, `g` chunks (r z n) `stride` apart, `h` → `h'`.
#[inline(always)]
unsafe fn gru_forward_v<S: Simd>(x: *const f32, g: *const f32, stride: usize, hp: *const f32, out: *mut f32) {
    let r = sigmoid_v::<S>(S::add(S::load(x), S::load(g)));
    let z = sigmoid_v::<S>(S::add(S::load(x.add(stride)), S::load(g.add(stride))));
    let n = S::tanh(S::fma(r, S::load(g.add(2 * stride)), S::load(x.add(2 * stride))));
    // h' = n + z (h − n)
    S::store(out, S::fma(z, S::sub(S::load(hp), n), n));
}

/// One vector of the GRU backward: `dy` (total) → input and recurrent gate gradients, the direct part of `dh`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gru_backward_v<S: Simd>(
    x: *const f32,
    g: *const f32,
    stride: usize,
    hp: *const f32,
    dy: S::V,
    dx: *mut f32,
    dg: *mut f32,
    dh: *mut f32,
) {
    let one = S::splat(1.0);
    let ghn = S::load(g.add(2 * stride));
    let r = sigmoid_v::<S>(S::add(S::load(x), S::load(g)));
    let z = sigmoid_v::<S>(S::add(S::load(x.add(stride)), S::load(g.add(stride))));
    let n = S::tanh(S::fma(r, ghn, S::load(x.add(2 * stride))));
    let dn = S::mul(S::mul(dy, S::sub(one, z)), S::sub(one, S::mul(n, n)));
    let dz = S::mul(S::mul(dy, S::sub(S::load(hp), n)), S::mul(z, S::sub(one, z)));
    let dr = S::mul(S::mul(dn, ghn), S::mul(r, S::sub(one, r)));
    S::store(dx, dr);
    S::store(dg, dr);
    S::store(dx.add(stride), dz);
    S::store(dg.add(stride), dz);
    S::store(dx.add(2 * stride), dn);
    S::store(dg.add(2 * stride), S::mul(dn, r));
    S::store(dh, S::mul(dy, z));
}

#[inline(always)]
unsafe fn lstm_forward_rows<S: Simd>(g: &[f32], c: &[f32], out: &mut [f32], h: usize) {
    let hv = vector_len::<S>(h);
    for ((gr, cr), o) in g.chunks_exact(4 * h).zip(c.chunks_exact(h)).zip(out.chunks_exact_mut(2 * h)) {
        let (gp, cp, op) = (gr.as_ptr(), cr.as_ptr(), o.as_mut_ptr());
        for j in (0..hv).step_by(S::LANES) {
            lstm_forward_v::<S>(gp.add(j), h, cp.add(j), op.add(j), op.add(h + j));
        }
        if hv < h {
            let mut tail_g = Vec::with_capacity(4 * (h - hv));
            (0..4).for_each(|q| tail_g.extend_from_slice(&gr[q * h + hv..(q + 1) * h]));
            let mut tail_o = vec![0f32; 2 * (h - hv)];
            lstm_cell_forward_scalar(&tail_g, &cr[hv..], &mut tail_o, h - hv);
            o[hv..h].copy_from_slice(&tail_o[..h - hv]);
            o[h + hv..].copy_from_slice(&tail_o[h - hv..]);
        }
    }
}

#[inline(always)]
unsafe fn lstm_backward_rows<S: Simd>(g: &[f32], c: &[f32], d: &[f32], dg: &mut [f32], dc: &mut [f32], h: usize) {
    let hv = vector_len::<S>(h);
    let rows = g.chunks_exact(4 * h).zip(c.chunks_exact(h)).zip(d.chunks_exact(2 * h));
    for (((gr, cr), dr), (dgr, dcr)) in rows.zip(dg.chunks_exact_mut(4 * h).zip(dc.chunks_exact_mut(h))) {
        let (gp, cp, dp, dgp, dcp) = (gr.as_ptr(), cr.as_ptr(), dr.as_ptr(), dgr.as_mut_ptr(), dcr.as_mut_ptr());
        for j in (0..hv).step_by(S::LANES) {
            let (dh, dc) = (S::load(dp.add(j)), S::load(dp.add(h + j)));
            lstm_backward_v::<S>(gp.add(j), h, cp.add(j), dh, dc, dgp.add(j), h, dcp.add(j));
        }
        if hv < h {
            let t = h - hv;
            let (mut tg, mut td) = (Vec::with_capacity(4 * t), Vec::with_capacity(2 * t));
            (0..4).for_each(|q| tg.extend_from_slice(&gr[q * h + hv..(q + 1) * h]));
            (0..2).for_each(|q| td.extend_from_slice(&dr[q * h + hv..(q + 1) * h]));
            let (mut tdg, mut tdc) = (vec![0f32; 4 * t], vec![0f32; t]);
            lstm_cell_backward_scalar(&tg, &cr[hv..], &td, &mut tdg, &mut tdc, t);
            (0..4).for_each(|q| dgr[q * h + hv..(q + 1) * h].copy_from_slice(&tdg[q * t..(q + 1) * t]));
            dcr[hv..].copy_from_slice(&tdc);
        }
    }
}

#[inline(always)]
unsafe fn gru_forward_rows<S: Simd>(x: &[f32], g: &[f32], hp: &[f32], out: &mut [f32], h: usize) {
    let hv = vector_len::<S>(h);
    for row in 0..hp.len() / h {
        let (xr, gr) = (&x[row * 3 * h..(row + 1) * 3 * h], &g[row * 3 * h..(row + 1) * 3 * h]);
        let (hr, o) = (&hp[row * h..(row + 1) * h], &mut out[row * h..(row + 1) * h]);
        let (xp, gp, hpp, op) = (xr.as_ptr(), gr.as_ptr(), hr.as_ptr(), o.as_mut_ptr());
        for j in (0..hv).step_by(S::LANES) {
            gru_forward_v::<S>(xp.add(j), gp.add(j), h, hpp.add(j), op.add(j));
        }
        if hv < h {
            let t = h - hv;
            let (mut tx, mut tg) = (Vec::with_capacity(3 * t), Vec::with_capacity(3 * t));
            (0..3).for_each(|q| {
                tx.extend_from_slice(&xr[q * h + hv..(q + 1) * h]);
                tg.extend_from_slice(&gr[q * h + hv..(q + 1) * h]);
            });
            gru_cell_forward_scalar(&tx, &tg, &hr[hv..], &mut o[hv..], t);
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gru_backward_rows<S: Simd>(
    x: &[f32],
    g: &[f32],
    hp: &[f32],
    d: &[f32],
    dx: &mut [f32],
    dg: &mut [f32],
    dh: &mut [f32],
    h: usize,
) {
    let hv = vector_len::<S>(h);
    for row in 0..hp.len() / h {
        let (a, b) = (row * 3 * h, (row + 1) * 3 * h);
        let (xr, gr, hr, dr) = (&x[a..b], &g[a..b], &hp[row * h..(row + 1) * h], &d[row * h..(row + 1) * h]);
        let (dxr, dgr, dhr) = (&mut dx[a..b], &mut dg[a..b], &mut dh[row * h..(row + 1) * h]);
        let (xp, gp, hpp, dp) = (xr.as_ptr(), gr.as_ptr(), hr.as_ptr(), dr.as_ptr());
        let (dxp, dgp, dhp) = (dxr.as_mut_ptr(), dgr.as_mut_ptr(), dhr.as_mut_ptr());
        for j in (0..hv).step_by(S::LANES) {
            let dy = S::load(dp.add(j));
            gru_backward_v::<S>(xp.add(j), gp.add(j), h, hpp.add(j), dy, dxp.add(j), dgp.add(j), dhp.add(j));
        }
        if hv < h {
            let t = h - hv;
            let (mut tx, mut tg) = (Vec::with_capacity(3 * t), Vec::with_capacity(3 * t));
            (0..3).for_each(|q| {
                tx.extend_from_slice(&xr[q * h + hv..(q + 1) * h]);
                tg.extend_from_slice(&gr[q * h + hv..(q + 1) * h]);
            });
            let (mut tdx, mut tdg) = (vec![0f32; 3 * t], vec![0f32; 3 * t]);
            gru_cell_backward_scalar(&tx, &tg, &hr[hv..], &dr[hv..], &mut tdx, &mut tdg, &mut dhr[hv..], t);
            (0..3).for_each(|q| {
                dxr[q * h + hv..(q + 1) * h].copy_from_slice(&tdx[q * t..(q + 1) * t]);
                dgr[q * h + hv..(q + 1) * h].copy_from_slice(&tdg[q * t..(q + 1) * t]);
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Blocked rows: one row of a thread's units in the whole-sequence walk's gate layout (`rnn_par::Blocks`): blocks of
// `BLOCK` units, block `k`'s gate chunks side by side from column `G·BLOCK·k`, each chunk as wide as the block. One
// call per row, where a call per block paid the dispatch 16 units at a time.

/// The blocks of a row of `un` units with `g` gates: (width, first gate column, first unit).
#[inline(always)]
fn blocks(un: usize, g: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    Blocks { g, h: un }.iter()
}

/// A block of a blocked row: (width, first gate column, first unit), as [`blocks`] yields.
type Block = (usize, usize, usize);

/// One LSTM block of a blocked row (scalar): gate pre-activations `4w` (replaced by the activations σ(i), σ(f),
/// tanh(g), σ(o): what the backward reads), `c (w)` → `h'`, `c'`.
fn lstm_forward_block<T: Real>(g: &mut [T], c: &[T], hn: &mut [T], cn: &mut [T], (w, go, uo): Block) {
    for j in 0..w {
        let k = go + j;
        let (a, c1, h1) = lstm_unit_forward([g[k], g[k + w], g[k + 2 * w], g[k + 3 * w]], c[uo + j]);
        (cn[uo + j], hn[uo + j]) = (c1, h1);
        (g[k], g[k + w], g[k + 2 * w], g[k + 3 * w]) = (a[0], a[1], a[2], a[3]);
    }
}

/// One LSTM backward block (scalar), from the activations `a (4w)` the forward left and `c (w)` it read: `dc`
/// is updated in place (from the next step's to this step's input cell). One tanh per unit (of `c'`), where
/// recomputing the gates from their pre-activations took five.
#[allow(clippy::too_many_arguments)]
fn lstm_backward_block<T: Real>(a: &[T], c: &[T], dh: &[T], dy: &[T], dc: &mut [T], dg: &mut [T], (w, go, uo): Block) {
    for j in 0..w {
        let (k, u) = (go + j, uo + j);
        let acts = [a[k], a[k + w], a[k + 2 * w], a[k + 3 * w]];
        let (d, dcp) = lstm_unit_backward(acts, c[u], dh[u] + dy[u], dc[u]);
        (dg[k], dg[k + w], dg[k + 2 * w], dg[k + 3 * w], dc[u]) = (d[0], d[1], d[2], d[3], dcp);
    }
}

/// One GRU block (scalar).
fn gru_forward_block<T: Real>(x: &[T], g: &[T], hp: &[T], out: &mut [T], (w, go, uo): Block) {
    let gs = go..go + 3 * w;
    gru_cell_forward_scalar(&x[gs.clone()], &g[gs], &hp[uo..uo + w], &mut out[uo..uo + w], w);
}

/// One GRU backward block (scalar).
#[allow(clippy::too_many_arguments)]
fn gru_backward_block<T: Real>(
    x: &[T],
    g: &[T],
    hp: &[T],
    dh: &[T],
    dy: &[T],
    dx: &mut [T],
    dg: &mut [T],
    direct: &mut [T],
    (w, go, uo): Block,
) {
    let mut d = [T::ZERO; BLOCK];
    for j in 0..w {
        d[j] = dh[uo + j] + dy[uo + j];
    }
    let (gs, u) = (go..go + 3 * w, uo..uo + w);
    gru_cell_backward_scalar(
        &x[gs.clone()],
        &g[gs.clone()],
        &hp[u.clone()],
        &d[..w],
        &mut dx[gs.clone()],
        &mut dg[gs],
        &mut direct[u],
        w,
    );
}

/// LSTM over a blocked row of `un` units: gates `(4·un)`, `c (un)` → `h' (un)`, `c' (un)`. Scalar (any float).
pub(crate) fn lstm_forward_blocked<T: Real>(g: &mut [T], c: &[T], hn: &mut [T], cn: &mut [T], un: usize) {
    blocks(un, 4).for_each(|k| lstm_forward_block(g, c, hn, cn, k));
}

/// LSTM backward over a blocked row, from the forward's activations `a (4·un)`: the total `dh + dy`, the cell
/// gradient `dc` (updated in place) → `dg (4·un)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lstm_backward_blocked<T: Real>(
    a: &[T],
    c: &[T],
    dh: &[T],
    dy: &[T],
    dc: &mut [T],
    dg: &mut [T],
    un: usize,
) {
    blocks(un, 4).for_each(|k| lstm_backward_block(a, c, dh, dy, dc, dg, k));
}

/// GRU over a blocked row: `gx`, `gh (3·un)`, `h (un)` → `h' (un)`.
pub(crate) fn gru_forward_blocked<T: Real>(x: &[T], g: &[T], hp: &[T], out: &mut [T], un: usize) {
    blocks(un, 3).for_each(|k| gru_forward_block(x, g, hp, out, k));
}

/// GRU backward over a blocked row: the total `dh + dy` → `dgx`, `dgh (3·un)` and the direct part of `dh (un)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gru_backward_blocked<T: Real>(
    x: &[T],
    g: &[T],
    hp: &[T],
    dh: &[T],
    dy: &[T],
    dx: &mut [T],
    dg: &mut [T],
    direct: &mut [T],
    un: usize,
) {
    blocks(un, 3).for_each(|k| gru_backward_block(x, g, hp, dh, dy, dx, dg, direct, k));
}

#[inline(always)]
unsafe fn lstm_forward_blocked_v<S: Simd>(g: &mut [f32], c: &[f32], hn: &mut [f32], cn: &mut [f32], un: usize) {
    for (w, go, uo) in blocks(un, 4) {
        if w % S::LANES != 0 {
            lstm_forward_block(g, c, hn, cn, (w, go, uo));
            continue;
        }
        for j in (0..w).step_by(S::LANES) {
            let (gp, cp) = (g.as_mut_ptr().add(go + j), c.as_ptr().add(uo + j));
            let (hp, cnp) = (hn.as_mut_ptr().add(uo + j), cn.as_mut_ptr().add(uo + j));
            // The activations replace the pre-activations, for the backward (see `lstm_forward_block`).
            for (q, v) in lstm_forward_v::<S>(gp, w, cp, hp, cnp).into_iter().enumerate() {
                S::store(gp.add(q * w), v);
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn lstm_backward_blocked_v<S: Simd>(
    a: &[f32],
    c: &[f32],
    dh: &[f32],
    dy: &[f32],
    dc: &mut [f32],
    dg: &mut [f32],
    un: usize,
) {
    for (w, go, uo) in blocks(un, 4) {
        if w % S::LANES != 0 {
            lstm_backward_block(a, c, dh, dy, dc, dg, (w, go, uo));
            continue;
        }
        for j in (0..w).step_by(S::LANES) {
            let (k, gk) = (uo + j, go + j);
            let dht = S::add(S::load(dh.as_ptr().add(k)), S::load(dy.as_ptr().add(k)));
            let dcp = dc.as_mut_ptr().add(k);
            let ap = a.as_ptr().add(gk);
            let acts = [S::load(ap), S::load(ap.add(w)), S::load(ap.add(2 * w)), S::load(ap.add(3 * w))];
            lstm_backward_acts_v::<S>(acts, c.as_ptr().add(k), dht, S::load(dcp), dg.as_mut_ptr().add(gk), w, dcp);
        }
    }
}

#[inline(always)]
unsafe fn gru_forward_blocked_v<S: Simd>(x: &[f32], g: &[f32], hp: &[f32], out: &mut [f32], un: usize) {
    for (w, go, uo) in blocks(un, 3) {
        if w % S::LANES != 0 {
            gru_forward_block(x, g, hp, out, (w, go, uo));
            continue;
        }
        for j in (0..w).step_by(S::LANES) {
            let (gk, k) = (go + j, uo + j);
            gru_forward_v::<S>(x.as_ptr().add(gk), g.as_ptr().add(gk), w, hp.as_ptr().add(k), out.as_mut_ptr().add(k));
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gru_backward_blocked_v<S: Simd>(
    x: &[f32],
    g: &[f32],
    hp: &[f32],
    dh: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dg: &mut [f32],
    direct: &mut [f32],
    un: usize,
) {
    for (w, go, uo) in blocks(un, 3) {
        if w % S::LANES != 0 {
            gru_backward_block(x, g, hp, dh, dy, dx, dg, direct, (w, go, uo));
            continue;
        }
        for j in (0..w).step_by(S::LANES) {
            let (gk, k) = (go + j, uo + j);
            let dyt = S::add(S::load(dh.as_ptr().add(k)), S::load(dy.as_ptr().add(k)));
            let (xp, gp, hpp) = (x.as_ptr().add(gk), g.as_ptr().add(gk), hp.as_ptr().add(k));
            gru_backward_v::<S>(
                xp,
                gp,
                w,
                hpp,
                dyt,
                dx.as_mut_ptr().add(gk),
                dg.as_mut_ptr().add(gk),
                direct.as_mut_ptr().add(k),
            );
        }
    }
}

per_isa!(lstm_forward_blocked_isa, lstm_forward_blocked_v, (g: &mut [f32], c: &[f32], hn: &mut [f32], cn: &mut [f32], un: usize));
per_isa!(
    lstm_backward_blocked_isa,
    lstm_backward_blocked_v,
    (a: &[f32], c: &[f32], dh: &[f32], dy: &[f32], dc: &mut [f32], dg: &mut [f32], un: usize)
);
per_isa!(gru_forward_blocked_isa, gru_forward_blocked_v, (x: &[f32], g: &[f32], hp: &[f32], out: &mut [f32], un: usize));
per_isa!(
    gru_backward_blocked_isa,
    gru_backward_blocked_v,
    (x: &[f32], g: &[f32], hp: &[f32], dh: &[f32], dy: &[f32], dx: &mut [f32], dg: &mut [f32], direct: &mut [f32], un: usize)
);

per_isa!(lstm_forward_isa, lstm_forward_rows, (g: &[f32], c: &[f32], out: &mut [f32], h: usize));
per_isa!(lstm_backward_isa, lstm_backward_rows, (g: &[f32], c: &[f32], d: &[f32], dg: &mut [f32], dc: &mut [f32], h: usize));
per_isa!(gru_forward_isa, gru_forward_rows, (x: &[f32], g: &[f32], hp: &[f32], out: &mut [f32], h: usize));
per_isa!(
    gru_backward_isa,
    gru_backward_rows,
    (x: &[f32], g: &[f32], hp: &[f32], d: &[f32], dx: &mut [f32], dg: &mut [f32], dh: &mut [f32], h: usize)
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences of a scalar loss `⟨w, f(x)⟩` against the hand-written backward, in f64.
    fn check_grad(
        n_in: usize,
        f: &dyn Fn(&[f64]) -> Vec<f64>,
        back: &dyn Fn(&[f64], &[f64]) -> Vec<f64>,
        n_out: usize,
    ) {
        let x: Vec<f64> = (0..n_in).map(|i| ((i * 7919 % 13) as f64 - 6.0) * 0.31).collect();
        let w: Vec<f64> = (0..n_out).map(|i| ((i * 104729 % 11) as f64 - 5.0) * 0.17).collect();
        let analytic = back(&x, &w);
        let eps = 1e-6;
        for k in 0..n_in {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[k] += eps;
            b[k] -= eps;
            let la: f64 = f(&a).iter().zip(&w).map(|(p, q)| p * q).sum();
            let lb: f64 = f(&b).iter().zip(&w).map(|(p, q)| p * q).sum();
            let fd = (la - lb) / (2.0 * eps);
            assert!((fd - analytic[k]).abs() < 1e-7, "input {k}: finite difference {fd} vs backward {}", analytic[k]);
        }
    }

    /// Every instruction-set path in f32 against the scalar code in f64, with a row tail (H not a multiple of any
    /// lane count) and a few saturated gates.
    #[test]
    fn vector_paths_match_the_scalar_kernels() {
        let (n, h) = (3, 37);
        let v = |len: usize, seed: usize| -> Vec<f64> {
            (0..len).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f64 / 1000.0 - 0.5) * 8.0).collect()
        };
        let f32s = |x: &[f64]| -> Vec<f32> { x.iter().map(|&a| a as f32).collect() };
        let close = |label: &str, got: &[f32], want: &[f64]| {
            for (k, (&a, &b)) in got.iter().zip(want).enumerate() {
                assert!((a as f64 - b).abs() <= 2e-6 * (1.0 + b.abs()), "{label}[{k}]: {a} vs {b}");
            }
        };
        let (g, c, d2) = (v(4 * n * h, 1), v(n * h, 2), v(2 * n * h, 3));
        let (gx, gh, hp, d1) = (v(3 * n * h, 4), v(3 * n * h, 5), v(n * h, 6), v(n * h, 7));
        // f64 references (scalar paths), on the f32-rounded inputs.
        let r = |x: &[f64]| -> Vec<f64> { x.iter().map(|&a| a as f32 as f64).collect() };
        let (g, c, d2, gx, gh, hp, d1) = (r(&g), r(&c), r(&d2), r(&gx), r(&gh), r(&hp), r(&d1));
        let mut lf = vec![0.0; 2 * n * h];
        lstm_cell_forward_scalar(&g, &c, &mut lf, h);
        let (mut ldg, mut ldc) = (vec![0.0; 4 * n * h], vec![0.0; n * h]);
        lstm_cell_backward_scalar(&g, &c, &d2, &mut ldg, &mut ldc, h);
        let mut gf = vec![0.0; n * h];
        gru_cell_forward_scalar(&gx, &gh, &hp, &mut gf, h);
        let (mut gdx, mut gdg, mut gdh) = (vec![0.0; 3 * n * h], vec![0.0; 3 * n * h], vec![0.0; n * h]);
        gru_cell_backward_scalar(&gx, &gh, &hp, &d1, &mut gdx, &mut gdg, &mut gdh, h);
        for isa in Isa::available() {
            let l = format!("{isa:?}");
            let mut o = vec![0f32; 2 * n * h];
            unsafe { lstm_forward_isa(isa, &f32s(&g), &f32s(&c), &mut o, h) };
            close(&format!("{l} lstm forward"), &o, &lf);
            let (mut dg, mut dc) = (vec![0f32; 4 * n * h], vec![0f32; n * h]);
            unsafe { lstm_backward_isa(isa, &f32s(&g), &f32s(&c), &f32s(&d2), &mut dg, &mut dc, h) };
            close(&format!("{l} lstm dgates"), &dg, &ldg);
            close(&format!("{l} lstm dc"), &dc, &ldc);
            let mut o = vec![0f32; n * h];
            unsafe { gru_forward_isa(isa, &f32s(&gx), &f32s(&gh), &f32s(&hp), &mut o, h) };
            close(&format!("{l} gru forward"), &o, &gf);
            let (mut dx, mut dg, mut dh) = (vec![0f32; 3 * n * h], vec![0f32; 3 * n * h], vec![0f32; n * h]);
            unsafe {
                gru_backward_isa(isa, &f32s(&gx), &f32s(&gh), &f32s(&hp), &f32s(&d1), &mut dx, &mut dg, &mut dh, h)
            };
            close(&format!("{l} gru dgx"), &dx, &gdx);
            close(&format!("{l} gru dgh"), &dg, &gdg);
            close(&format!("{l} gru dh"), &dh, &gdh);
        }
    }

    /// Saturated gates on every path: σ of a very negative pre-activation keeps its relative accuracy (the cell
    /// state it scales is then tiny, not zero), the limits are exact and NaN propagates.
    #[test]
    fn saturated_gates_keep_their_tails_and_limits() {
        let pre = [-30.0f32, -60.0, -85.0, -100.0, f32::NEG_INFINITY, 30.0, f32::INFINITY, 0.5];
        let h = 16;
        // One row: input gate `pre` (cycled), forget gate 0 on c = 0, cell input 1, output gate 0.
        let mut g = vec![0f32; 4 * h];
        for j in 0..h {
            (g[j], g[2 * h + j]) = (pre[j % pre.len()], 1.0);
        }
        let sigma = |x: f64| 1.0 / (1.0 + (-x).exp());
        for isa in Isa::available() {
            for tail in [false, true] {
                // The scalar tail runs when H is not a multiple of the lanes.
                let hh = if tail { h - 1 } else { h };
                let gr: Vec<f32> = (0..4).flat_map(|q| g[q * h..q * h + hh].to_vec()).collect();
                let mut o = vec![0f32; 2 * hh];
                unsafe { lstm_forward_isa(isa, &gr, &vec![0.0; hh], &mut o, hh) };
                for j in 0..hh {
                    let want = sigma(pre[j % pre.len()] as f64) * 1f64.tanh();
                    let got = o[hh + j] as f64;
                    // Past f32's normal range (σ(−100)) only the absolute size matters.
                    let tol = if want < f32::MIN_POSITIVE as f64 { f32::MIN_POSITIVE as f64 } else { 1e-6 * want };
                    assert!((got - want).abs() <= tol, "{isa:?} tail {tail}: c'[{j}] {got:e} vs {want:e}");
                }
            }
        }
        let mut g = vec![0f32; 4 * h];
        g[3] = f32::NAN;
        for isa in Isa::available() {
            let mut o = vec![0f32; 2 * h];
            unsafe { lstm_forward_isa(isa, &g, &vec![0.0; h], &mut o, h) };
            assert!(o[3].is_nan() && o[h + 3].is_nan() && !o[4].is_nan(), "{isa:?}: NaN in gate i of unit 3: {o:?}");
        }
    }

    #[test]
    fn lstm_cell_backward_matches_finite_differences() {
        let (n, h) = (2, 3);
        let f = |x: &[f64]| {
            let mut o = vec![0.0; 2 * n * h];
            lstm_cell_forward(&x[..4 * n * h], &x[4 * n * h..], &mut o, h);
            o
        };
        let back = |x: &[f64], w: &[f64]| {
            let (mut dg, mut dc) = (vec![0.0; 4 * n * h], vec![0.0; n * h]);
            lstm_cell_backward(&x[..4 * n * h], &x[4 * n * h..], w, &mut dg, &mut dc, h);
            [dg, dc].concat()
        };
        check_grad(5 * n * h, &f, &back, 2 * n * h);
    }

    #[test]
    fn gru_cell_backward_matches_finite_differences() {
        let (n, h) = (2, 3);
        let m = n * h;
        let f = |x: &[f64]| {
            let mut o = vec![0.0; m];
            gru_cell_forward(&x[..3 * m], &x[3 * m..6 * m], &x[6 * m..], &mut o, h);
            o
        };
        let back = |x: &[f64], w: &[f64]| {
            let (mut dx, mut dg, mut dh) = (vec![0.0; 3 * m], vec![0.0; 3 * m], vec![0.0; m]);
            gru_cell_backward(&x[..3 * m], &x[3 * m..6 * m], &x[6 * m..], w, &mut dx, &mut dg, &mut dh, h);
            [dx, dg, dh].concat()
        };
        check_grad(7 * m, &f, &back, m);
    }
}
