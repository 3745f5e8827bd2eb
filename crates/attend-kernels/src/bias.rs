//! Bias rows and their backward (column sums), and the elementwise sum of residual streams, split over threads.

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

/// `db += Σ_r dy[r, :]` for `dy (R, C)`, `C = db.len()` (the backward of [`add_bias_rows`]). Blocks of rows are
/// summed on separate threads and their partial sums added in block order, so the result does not depend on timing.
pub fn add_column_sums<T: Real>(dy: &[T], db: &mut [T]) {
    let c = db.len();
    if c == 0 {
        return;
    }
    assert_eq!(dy.len() % c, 0, "add_column_sums: {} values are not rows of {c}", dy.len());
    let rows_per = crate::rows_per_task(c).max(64);
    let partials: Vec<Vec<T>> = dy
        .par_chunks(c * rows_per)
        .map(|blk| {
            let mut s = vec![T::ZERO; c];
            for row in blk.chunks_exact(c) {
                s.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
            }
            s
        })
        .collect();
    for p in &partials {
        db.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
    }
}

/// `y += x`, elementwise, split over threads.
pub fn add_assign<T: Real>(y: &mut [T], x: &[T]) {
    assert_eq!(y.len(), x.len(), "add_assign: lengths {} and {} differ", y.len(), x.len());
    y.par_chunks_mut(16 * 1024).zip(x.par_chunks(16 * 1024)).for_each(|(a, b)| {
        a.iter_mut().zip(b).for_each(|(a, &b)| *a += b);
    });
}
