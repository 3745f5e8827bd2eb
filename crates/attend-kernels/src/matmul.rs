//! Row-major products on slices, `C (M, N) [+]= op(A) (M, K) · op(B) (K, N)` with `op` the identity or a transpose
//! read in place, through the `gemm` crate (the product candle's CPU matmul calls) on rayon's threads.
//!
//! Hand-written backward passes need the three products of a linear layer without copies: `y = x Wᵀ`,
//! `dx = dy W`, `dW += dyᵀ x`. Each is one call here, the transposes expressed as strides.

use rayon::prelude::*;

use crate::flash::SyncPtr;

/// A row-major matrix `(rows, cols)` in `data`, read as itself or as its transpose.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    /// Rows of the stored matrix.
    pub rows: usize,
    /// Columns of the stored matrix (its row stride).
    pub cols: usize,
    /// Read as `(cols, rows)`.
    pub transposed: bool,
}

impl<'a> Mat<'a> {
    /// The stored `(rows, cols)` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, transposed: false }
    }

    /// The same storage read as its transpose `(cols, rows)`.
    pub fn t(self) -> Self {
        Mat { transposed: !self.transposed, ..self }
    }

    /// Shape as read.
    pub fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// (row stride, column stride) as read, in elements.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.cols as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// `c (M, N) = a · b` (or `c += a · b` with `accumulate`), `c` row-major and contiguous.
///
/// # Panics
/// If the shapes disagree or a slice is shorter than its shape: callers check user input before this.
pub fn matmul(c: &mut [f32], a: Mat, b: Mat, accumulate: bool) {
    let (m, k) = a.shape();
    let (kb, n) = b.shape();
    assert_eq!(k, kb, "matmul: inner dimensions {k} and {kb} differ");
    assert!(
        a.data.len() >= a.rows * a.cols && b.data.len() >= b.rows * b.cols,
        "matmul: operand shorter than its shape"
    );
    assert_eq!(c.len(), m * n, "matmul: output has {} elements, not {m}·{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    let threads = rayon::current_num_threads();
    let pieces = if threads > 1 && m * n * k >= SPLIT_WORK { threads } else { 1 };
    // The gemm crate's own threading splits the output's columns after it transposes a row-major product, so a
    // product whose output has few columns (dX and y of a width-C layer) ran on one thread: split the output
    // ourselves along its longer side, one single-threaded product per piece (each re-packs the shared operand,
    // O(K·N) against O(M·K·N / pieces) of arithmetic).
    let along_rows = m >= n;
    let len = if along_rows { m } else { n };
    let step = len.div_ceil(pieces).next_multiple_of(16).min(len);
    let c_ptr = SyncPtr(c.as_mut_ptr());
    let one = |start: usize| {
        let span = step.min(len - start);
        let (pm, pn) = if along_rows { (span, n) } else { (m, span) };
        // SAFETY: the asserts above bound every index the strides reach: a (m, k), b (k, n), c (m, n); pieces
        // write disjoint rows (or columns) of c.
        unsafe {
            let (a_off, b_off, c_off) =
                if along_rows { (start as isize * a_rs, 0, start * n) } else { (0, start as isize * b_cs, start) };
            gemm::gemm(
                pm,
                pn,
                k,
                c_ptr.get().add(c_off),
                1,
                n as isize,
                accumulate,
                a.data.as_ptr().offset(a_off),
                a_cs,
                a_rs,
                b.data.as_ptr().offset(b_off),
                b_cs,
                b_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if step >= len {
        one(0);
    } else {
        (0..len.div_ceil(step)).into_par_iter().for_each(|i| one(i * step));
    }
}

/// Products smaller than this many multiply-adds run on one thread.
const SPLIT_WORK: usize = 1 << 18;

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat, b: Mat) -> Vec<f64> {
        let at = |m: &Mat, i: usize, j: usize| {
            if m.transposed {
                m.data[j * m.cols + i]
            } else {
                m.data[i * m.cols + j]
            }
        };
        let ((m, k), (_, n)) = (a.shape(), b.shape());
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| at(&a, i, p) as f64 * at(&b, p, j) as f64).sum();
            }
        }
        c
    }

    #[test]
    fn every_transpose_matches_the_naive_product_and_accumulates() {
        check_shape(37, 19, 23);
    }

    #[test]
    fn products_split_over_threads_along_rows_or_columns_match_too() {
        // Above SPLIT_WORK; three threads make uneven pieces; m > n splits rows, m < n columns.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (m, k, n) in [(150, 40, 70), (70, 40, 150), (97, 60, 97)] {
            assert!(m * n * k >= SPLIT_WORK);
            pool.install(|| check_shape(m, k, n));
        }
    }

    fn check_shape(m: usize, k: usize, n: usize) {
        let fill = |len: usize, s: f32| (0..len).map(|i| (i as f32 * s).sin()).collect::<Vec<_>>();
        let (a_store, b_store) = (fill(m * k, 0.37), fill(k * n, 0.91));
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta { Mat::new(&a_store, k, m).t() } else { Mat::new(&a_store, m, k) };
            let b = if tb { Mat::new(&b_store, n, k).t() } else { Mat::new(&b_store, k, n) };
            let want = naive(a, b);
            let mut c = vec![f32::NAN; m * n];
            matmul(&mut c, a, b, false);
            for (x, w) in c.iter().zip(&want) {
                assert!((*x as f64 - w).abs() < 1e-4, "ta {ta} tb {tb}: {x} vs {w}");
            }
            let mut c = vec![1f32; m * n];
            matmul(&mut c, a, b, true);
            for (x, w) in c.iter().zip(&want) {
                assert!((*x as f64 - (w + 1.0)).abs() < 1e-4, "accumulate ta {ta} tb {tb}: {x} vs {}", w + 1.0);
            }
        }
    }

    #[test]
    fn an_empty_inner_dimension_writes_zeros_or_leaves_the_sum() {
        let mut c = vec![f32::NAN; 6];
        matmul(&mut c, Mat::new(&[], 2, 0), Mat::new(&[], 0, 3), false);
        assert_eq!(c, vec![0.0; 6]);
        let mut c = vec![2.0; 6];
        matmul(&mut c, Mat::new(&[], 2, 0), Mat::new(&[], 0, 3), true);
        assert_eq!(c, vec![2.0; 6]);
    }
}
