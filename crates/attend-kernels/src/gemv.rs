//! `y = x Wᵀ + b` for a few rows of `x`: the products of batch-1 decoding. A general matrix product packs `W` into
//! panels before it multiplies, which for one row of `x` means reading and writing every weight once more than the
//! product needs; here each weight row is streamed once and dotted with every row of `x` while it is in registers,
//! so the product runs at the speed memory delivers the weights. Threads split the output columns.
//!
//! Shapes: `x (R, K)`, `w (N, K)` (`nn.Linear`'s layout), `bias (N)`, `y (R, N)`, with `R ≤ MAX_ROWS`.

use rayon::prelude::*;

use crate::flash::simd::{per_isa, Isa, Simd};
use crate::flash::SyncPtr;

/// The most rows of `x` this path takes; beyond it a matrix product's packing pays for itself.
pub const MAX_ROWS: usize = 4;

/// Weight bytes per task: small enough that every product (down to GPT-2's 768 × 768) splits into dozens of tasks
/// for the threads to balance, large enough that a task's overhead (~1 µs) is noise beside streaming it.
const TASK_BYTES: usize = 96 << 10;

/// `y (R, N) = x (R, K) · w (N, K)ᵀ + bias`; `R ≤ MAX_ROWS`.
///
/// # Panics
/// Lengths that disagree with `(r, k, n)`, or `r > MAX_ROWS` (callers check shapes first).
pub fn skinny_linear(x: &[f32], r: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    assert!(r <= MAX_ROWS, "skinny_linear: {r} rows > {MAX_ROWS}");
    assert!(x.len() == r * k && w.len() == n * k && y.len() == r * n, "skinny_linear: lengths for ({r}, {k}, {n})");
    assert!(bias.is_none_or(|b| b.len() == n), "skinny_linear: bias length");
    if r == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // No weights to stream: every output is its bias (the tasks below would write nothing).
        for row in y.chunks_exact_mut(n) {
            row.iter_mut().enumerate().for_each(|(j, v)| *v = bias.map_or(0.0, |b| b[j]));
        }
        return;
    }
    let isa = Isa::detect();
    let columns = (TASK_BYTES / (4 * k)).clamp(1, n);
    let out = SyncPtr(y.as_mut_ptr());
    (0..n.div_ceil(columns)).into_par_iter().for_each(|t| {
        let (j0, j1) = (t * columns, ((t + 1) * columns).min(n));
        // SAFETY: `isa` is detected; x holds r × k, the weight rows (j1 − j0) × k; this task alone writes the
        // columns j0..j1 of every row of y (r × n).
        unsafe { dots_isa(isa, x, r, k, &w[j0 * k..j1 * k], out.get().add(j0), n) };
        if let Some(b) = bias {
            for row in 0..r {
                // SAFETY: as above, columns j0..j1 of row `row`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(row * n + j0), j1 - j0) };
                dst.iter_mut().zip(&b[j0..j1]).for_each(|(v, &bi)| *v += bi);
            }
        }
    });
}

per_isa!(
    /// `out[row · ld + j] = x (r, k) · ws (m, k)ᵀ` with each weight row loaded once.
    dots_isa,
    dots,
    (x: &[f32], r: usize, k: usize, ws: &[f32], out: *mut f32, ld: usize)
);

#[inline(always)]
unsafe fn dots<S: Simd>(x: &[f32], r: usize, k: usize, ws: &[f32], out: *mut f32, ld: usize) {
    let m = ws.len() / k.max(1);
    let step = 2 * S::LANES;
    let main = k / step * step;
    for j in 0..m {
        let wr = ws.as_ptr().add(j * k);
        // Two accumulators per row hide the FMA latency; up to 4 rows × 2 = 8 registers.
        let mut acc = [[S::zero(); 2]; MAX_ROWS];
        let mut i = 0;
        while i < main {
            let (w0, w1) = (S::load(wr.add(i)), S::load(wr.add(i + S::LANES)));
            for (row, a) in acc.iter_mut().enumerate().take(r) {
                let xr = x.as_ptr().add(row * k + i);
                a[0] = S::fma(S::load(xr), w0, a[0]);
                a[1] = S::fma(S::load(xr.add(S::LANES)), w1, a[1]);
            }
            i += step;
        }
        for (row, a) in acc.iter().enumerate().take(r) {
            let mut s = S::reduce_add(S::add(a[0], a[1]));
            for t in main..k {
                s += x[row * k + t] * *wr.add(t);
            }
            *out.add(row * ld + j) = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 product of the same numbers.
    fn reference(x: &[f32], r: usize, k: usize, w: &[f32], n: usize, b: &[f32]) -> Vec<f64> {
        let mut y = vec![0f64; r * n];
        for row in 0..r {
            for j in 0..n {
                y[row * n + j] = b[j] as f64 + (0..k).map(|t| x[row * k + t] as f64 * w[j * k + t] as f64).sum::<f64>();
            }
        }
        y
    }

    #[test]
    fn every_isa_path_matches_the_f64_product_for_awkward_sizes() {
        let val = |i: usize, salt: usize| (((i * 2654435761 + salt * 40503) % 2001) as f32 - 1000.0) / 700.0;
        for &(r, k, n) in &[(1, 768, 2304), (4, 37, 5), (3, 16, 97), (2, 1, 200), (1, 33, 1), (2, 0, 3)] {
            let x: Vec<f32> = (0..r * k).map(|i| val(i, 1)).collect();
            let w: Vec<f32> = (0..n * k).map(|i| val(i, 2)).collect();
            let b: Vec<f32> = (0..n).map(|i| val(i, 3)).collect();
            let want = reference(&x, r, k, &w, n, &b);
            for isa in Isa::available() {
                let mut got = vec![0f32; r * n];
                // Column blocks of 7 (awkward on purpose), each written in place at stride n.
                for j0 in (0..n).step_by(7) {
                    let j1 = (j0 + 7).min(n);
                    unsafe { dots_isa(isa, &x, r, k, &w[j0 * k..j1 * k], got.as_mut_ptr().add(j0), n) };
                }
                got.iter_mut().enumerate().for_each(|(i, g)| *g += b[i % n]);
                let mut full = vec![f32::NAN; r * n]; // every output must be written
                skinny_linear(&x, r, k, &w, n, Some(&b), &mut full);
                for (i, (&g, &wv)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + wv.abs());
                    assert!((g as f64 - wv).abs() <= tol, "{isa:?} ({r}, {k}, {n}) element {i}: {g} vs {wv}");
                    assert!((full[i] as f64 - wv).abs() <= tol, "skinny_linear ({r}, {k}, {n}) element {i}");
                }
            }
        }
    }

    #[test]
    fn nan_and_infinity_propagate_as_in_a_product() {
        let (r, k, n) = (2, 40, 3);
        let mut x = vec![0.5f32; r * k];
        x[7] = f32::NAN; // row 0
        let mut w = vec![0.25f32; n * k];
        w[k + 3] = f32::INFINITY; // column 1
        let mut y = vec![0f32; r * n];
        skinny_linear(&x, r, k, &w, n, None, &mut y);
        assert!(y[0].is_nan() && y[1].is_nan() && y[2].is_nan(), "row 0 reads the NaN: {y:?}");
        assert_eq!((y[3], y[5]), (5.0, 5.0)); // 40 · 0.5 · 0.25
        assert_eq!(y[4], f32::INFINITY);
    }
}
