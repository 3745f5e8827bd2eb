//! Row softmax and log-softmax over the last axis.
//!
//! A masked entry takes part as −∞: a keep-mask 0 or an additive −∞ *replaces* the input (a NaN input under a mask
//! is gone, where `NaN + (−∞)` would be NaN). A row whose entries are all −∞ (fully masked) yields zeros and a
//! log-sum-exp of −∞ — never NaN — and its backward yields zeros, because `y = 0` there. Any other NaN or +∞ in a
//! row makes the whole row NaN, as in PyTorch.

use rayon::prelude::*;

use crate::{rows_per_task, Real};

/// A mask applied to the rows of the input: `data[row_offsets[r] + j·col_stride]` is the mask entry for column `j`
/// of row `r`. Offsets make broadcast masks free (a `(1, 1, T, S)` mask over `(B, H, T, S)` scores repeats offsets);
/// `col_stride` is 0 for a mask broadcast along the last axis.
#[derive(Clone, Copy, Debug)]
pub enum RowMask<'a, T> {
    None,
    /// Added to the input; may hold −∞.
    Additive {
        data: &'a [T],
        row_offsets: &'a [usize],
        col_stride: usize,
    },
    /// 1 (non-zero) = may attend, 0 = masked.
    Keep {
        data: &'a [u8],
        row_offsets: &'a [usize],
        col_stride: usize,
    },
}

impl<T: Real> RowMask<'_, T> {
    /// Number of rows the mask describes (`None` describes any number).
    pub fn rows(&self) -> Option<usize> {
        match self {
            RowMask::None => None,
            RowMask::Additive { row_offsets, .. } | RowMask::Keep { row_offsets, .. } => Some(row_offsets.len()),
        }
    }

    /// Writes `x + mask` for row `r` into `s`, masked entries as −∞; returns the row maximum.
    #[inline]
    fn masked_row(&self, r: usize, x: &[T], s: &mut [T]) -> T {
        let mut m = T::NEG_INFINITY;
        match *self {
            RowMask::None => {
                for (sj, &xj) in s.iter_mut().zip(x) {
                    *sj = xj;
                    m = m.max(xj);
                }
            }
            RowMask::Additive { data, row_offsets, col_stride } => {
                let o = row_offsets[r];
                for (j, (sj, &xj)) in s.iter_mut().zip(x).enumerate() {
                    let mj = data[o + j * col_stride];
                    let v = if mj.is_neg_infinity() { mj } else { xj + mj };
                    *sj = v;
                    m = m.max(v);
                }
            }
            RowMask::Keep { data, row_offsets, col_stride } => {
                let o = row_offsets[r];
                for (j, (sj, &xj)) in s.iter_mut().zip(x).enumerate() {
                    let v = if data[o + j * col_stride] != 0 { xj } else { T::NEG_INFINITY };
                    *sj = v;
                    m = m.max(v);
                }
            }
        }
        m
    }
}

/// `y = softmax(x + mask)` row by row, rows of length `n`; writes each row's natural-log sum-exp into `lse` when
/// given (−∞ for a fully-masked row).
///
/// Panics if slice lengths disagree (the `attend` wrappers check shapes first and return errors).
pub fn softmax_forward<T: Real>(x: &[T], mask: RowMask<'_, T>, y: &mut [T], lse: Option<&mut [T]>, n: usize) {
    assert!(n > 0 && x.len() == y.len() && x.len() % n == 0, "softmax_forward: bad lengths");
    let rows = x.len() / n;
    if let Some(mr) = mask.rows() {
        assert_eq!(mr, rows, "softmax_forward: mask rows");
    }
    let row = |r: usize, yr: &mut [T]| -> T {
        let m = mask.masked_row(r, &x[r * n..(r + 1) * n], yr);
        if m.is_neg_infinity() {
            // Fully masked, unless the max only looked past NaNs (`max` ignores NaN).
            let nan = yr.iter().any(|v| v.is_nan());
            let fill = if nan { T::NAN } else { T::ZERO };
            yr.iter_mut().for_each(|v| *v = fill);
            return if nan { T::NAN } else { T::NEG_INFINITY };
        }
        let mut sum = T::ZERO;
        for v in yr.iter_mut() {
            *v = (*v - m).exp();
            sum += *v;
        }
        let inv = T::ONE / sum;
        yr.iter_mut().for_each(|v| *v *= inv);
        m + sum.ln()
    };
    let min_len = rows_per_task(n);
    match lse {
        Some(lse) => {
            assert_eq!(lse.len(), rows, "softmax_forward: lse length");
            y.par_chunks_mut(n).zip(lse.par_iter_mut()).enumerate().with_min_len(min_len).for_each(|(r, (yr, l))| {
                *l = row(r, yr);
            })
        }
        None => y.par_chunks_mut(n).enumerate().with_min_len(min_len).for_each(|(r, yr)| {
            row(r, yr);
        }),
    }
}

/// Backward of [`softmax_forward`]: `dx = y ⊙ (dy − ⟨dy, y⟩)` per row. The gradient of an additive mask is `dx` too.
pub fn softmax_backward<T: Real>(y: &[T], dy: &[T], dx: &mut [T], n: usize) {
    assert!(n > 0 && y.len() == dy.len() && y.len() == dx.len() && y.len() % n == 0, "softmax_backward: bad lengths");
    dx.par_chunks_mut(n).enumerate().with_min_len(rows_per_task(n)).for_each(|(r, dxr)| {
        let (yr, dyr) = (&y[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
        let mut dot = T::ZERO;
        for (&a, &b) in yr.iter().zip(dyr) {
            dot += a * b;
        }
        for ((d, &a), &b) in dxr.iter_mut().zip(yr).zip(dyr) {
            *d = a * (b - dot);
        }
    });
}

/// `y = x − lse(x)` row by row.
pub fn log_softmax_forward<T: Real>(x: &[T], y: &mut [T], n: usize) {
    assert!(n > 0 && x.len() == y.len() && x.len() % n == 0, "log_softmax_forward: bad lengths");
    y.par_chunks_mut(n).enumerate().with_min_len(rows_per_task(n)).for_each(|(r, yr)| {
        let xr = &x[r * n..(r + 1) * n];
        let m = xr.iter().fold(T::NEG_INFINITY, |m, &v| m.max(v));
        if m.is_neg_infinity() {
            // All −∞ gives −∞ (PyTorch gives NaN here; −∞ is the limit). NaN entries make the row NaN.
            let fill = if xr.iter().any(|v| v.is_nan()) { T::NAN } else { T::NEG_INFINITY };
            yr.iter_mut().for_each(|v| *v = fill);
            return;
        }
        let sum = xr.iter().fold(T::ZERO, |s, &v| s + (v - m).exp());
        let lse = m + sum.ln();
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = v - lse;
        }
    });
}

/// Backward of [`log_softmax_forward`]: `dx = dy − exp(y)·Σdy` per row.
pub fn log_softmax_backward<T: Real>(y: &[T], dy: &[T], dx: &mut [T], n: usize) {
    assert!(
        n > 0 && y.len() == dy.len() && y.len() == dx.len() && y.len() % n == 0,
        "log_softmax_backward: bad lengths"
    );
    dx.par_chunks_mut(n).enumerate().with_min_len(rows_per_task(n)).for_each(|(r, dxr)| {
        let (yr, dyr) = (&y[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
        let sum = dyr.iter().fold(T::ZERO, |s, &v| s + v);
        for ((d, &a), &b) in dxr.iter_mut().zip(yr).zip(dyr) {
            *d = b - a.exp() * sum;
        }
    });
}
