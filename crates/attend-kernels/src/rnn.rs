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

use crate::Real;

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    // (tanh(x/2) + 1)/2 neither overflows nor loses the tails, and is exact in the limits.
    let half = T::from_f64(0.5);
    half * ((x * half).tanh() + T::ONE)
}

/// LSTM step: from the gate pre-activations `gates (N, 4H)` and the cell `c (N, H)`, writes `[h' | c'] (N, 2H)`.
pub fn lstm_cell_forward<T: Real>(gates: &[T], c: &[T], out: &mut [T], h: usize) {
    assert!(h > 0 && gates.len() == 4 * c.len() && out.len() == 2 * c.len() && c.len() % h == 0, "lstm_cell: lengths");
    for ((g, cr), o) in gates.chunks_exact(4 * h).zip(c.chunks_exact(h)).zip(out.chunks_exact_mut(2 * h)) {
        let (hn, cn) = o.split_at_mut(h);
        for j in 0..h {
            let i = sigmoid(g[j]);
            let f = sigmoid(g[h + j]);
            let gg = g[2 * h + j].tanh();
            let og = sigmoid(g[3 * h + j]);
            let c1 = f * cr[j] + i * gg;
            cn[j] = c1;
            hn[j] = og * c1.tanh();
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
    let rows = gates.chunks_exact(4 * h).zip(c.chunks_exact(h)).zip(dout.chunks_exact(2 * h));
    for (((g, cr), d), (dg, dcr)) in rows.zip(dgates.chunks_exact_mut(4 * h).zip(dc.chunks_exact_mut(h))) {
        let (dh, dc1) = d.split_at(h);
        for j in 0..h {
            let i = sigmoid(g[j]);
            let f = sigmoid(g[h + j]);
            let gg = g[2 * h + j].tanh();
            let og = sigmoid(g[3 * h + j]);
            let tc = (f * cr[j] + i * gg).tanh();
            // The new cell reaches the loss directly and through h' = o ⊙ tanh(c').
            let dct = dc1[j] + dh[j] * og * (T::ONE - tc * tc);
            dg[j] = dct * gg * i * (T::ONE - i);
            dg[h + j] = dct * cr[j] * f * (T::ONE - f);
            dg[2 * h + j] = dct * i * (T::ONE - gg * gg);
            dg[3 * h + j] = dh[j] * tc * og * (T::ONE - og);
            dcr[j] = dct * f;
        }
    }
}

/// GRU step: from `gx`, `gh (N, 3H)` and `h (N, H)` writes `h' (N, H)`.
pub fn gru_cell_forward<T: Real>(gx: &[T], gh: &[T], hp: &[T], out: &mut [T], h: usize) {
    let n = hp.len();
    assert!(h > 0 && gx.len() == 3 * n && gh.len() == 3 * n && out.len() == n && n % h == 0, "gru_cell: lengths");
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
