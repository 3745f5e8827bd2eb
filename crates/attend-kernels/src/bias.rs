//! Adding a bias vector to every row of a matrix, rows split over threads (the forward of a linear layer's bias).

use rayon::prelude::*;

use crate::Real;

/// `y[r, :] += b` for every row `r` of `y (R, C)`, `C = b.len()`.
pub fn add_bias_rows<T: Real>(y: &mut [T], b: &[T]) {
    let c = b.len();
    if c == 0 {
        return;
    }
    assert_eq!(y.len() % c, 0, "add_bias_rows: {} values are not rows of {c}", y.len());
    y.par_chunks_mut(c * 64).for_each(|rows| {
        for row in rows.chunks_exact_mut(c) {
            row.iter_mut().zip(b).for_each(|(v, &bi)| *v += bi);
        }
    });
}
