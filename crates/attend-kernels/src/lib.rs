//! # attend-kernels — fused CPU kernels on plain slices
//!
//! No tensors here: each kernel takes row-major slices and a row length, so it can be tested and benchmarked on its
//! own and wrapped by any tensor library (the `attend` crate wraps them as candle custom ops with backward passes).
//!
//! Every forward kernel has a backward twin written as its mirror; the `attend` crate's tests compare both against
//! composed candle ops, PyTorch fixtures and finite differences.
//!
//! | kernel | forward | backward |
//! |--------|---------|----------|
//! | [`softmax`] | row softmax with an optional additive or boolean mask, log-sum-exp per row | `dx = y ⊙ (dy − ⟨dy, y⟩)` |
//! | [`softmax::log_softmax_forward`] | `x − lse(x)` | `dx = dy − softmax(x)·Σdy` |
//! | [`cross_entropy`] | per-row loss with ignore index and label smoothing | `dx = g·(p − (1−ε)·onehot − ε/V)` |
//! | [`graph`] | weighted sum over an edge list (graph attention), grouped by target node | `dα` per edge, `dx` grouped by source node |
//! | [`norm`] | layer norm and RMS norm with optional scale | recomputes statistics, `dw` reduced over row blocks |
//! | [`gelu`] | GELU, tanh and erf forms | analytic derivative |
//! | [`dropout`] | counter-based keep mask from `(seed, index)` | the same mask, regenerated |
//! | [`rnn`] | LSTM and GRU cells: all gates of a step in one pass | recomputes the gates, one pass |
//! | [`rnn_seq`] | LSTM and GRU over a whole sequence: per-step gemm + fused cell, lengths, reverse | reverse walk, one gemm per step, `dW_hh` in one gemm |
//! | [`matmul`] | `C [+]= op(A)·op(B)`, transposes as strides (the `gemm` crate) | — (the products of a backward) |
//! | [`adamw`] | AdamW on flat buffers, PyTorch's order of operations | — |
//! | [`tanh`] | `tanh` on the vector paths | `dx = dy ⊙ (1 − y²)` |
//! | [`sparse`] | sparsemax and 1.5-entmax, exact thresholds by sorting | `dz = w ⊙ dp − (⟨w, dp⟩/Σw)·w`, `w` = support or `√p` |

pub mod adamw;
pub mod bias;
pub mod cpu;
pub mod cross_entropy;
pub mod dropout;
pub mod flash;
pub mod gelu;
pub mod gemv;
pub mod graph;
pub mod matmul;
pub mod norm;
mod real;
pub mod rng;
pub mod rnn;
mod rnn_par;
#[doc(hidden)]
pub use rnn_par::cap_team_threads;
pub mod rnn_seq;
pub mod softmax;
pub mod sparse;
pub mod tanh;

pub use real::Real;

/// Rows per rayon task so that each task touches at least ~16K elements: small rows are not worth a task each.
pub(crate) fn rows_per_task(n: usize) -> usize {
    (16_384 / n.max(1)).max(1)
}
