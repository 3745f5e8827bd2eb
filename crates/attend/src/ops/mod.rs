//! Differentiable fused ops, each with a hand-written backward and a composed `_reference` twin built from plain
//! candle ops. The fused forms run the `attend-kernels` row kernels through candle custom ops; the reference forms
//! are what the tests (and anyone reading the maths) compare them against.
//!
//! candle-nn's `softmax_last_dim`, `layer_norm`, `rms_norm` and `sdpa` detach gradients; nothing on a training path
//! of this crate uses them.
//!
//! Dtypes: the kernels run in f32 and f64; bf16/f16 inputs are converted to f32 and back (statistics and sums
//! accumulate in f32 either way).

mod cross_entropy;
mod custom;
mod dropout;
mod gelu;
mod graph;
mod linear;
mod norm;
mod rnn_cell;
mod rnn_sequence;
mod segment;
mod softmax;
mod sparse;
mod tanh;
mod vjp;

pub use attend_kernels::cross_entropy::CrossEntropyConfig;
pub use attend_kernels::gelu::GeluKind;
pub use attend_kernels::norm::NormKind;
pub use cross_entropy::{cross_entropy, cross_entropy_reference, Reduction};
pub use dropout::{dropout, dropout_mask, dropout_reference, dropout_while_training};
pub use gelu::{gelu, gelu_reference};
pub use graph::{edge_aggregate, edge_aggregate_reference, gatv2_scores, gatv2_scores_reference};
pub use linear::{linear, linear_reference};
pub use norm::{layer_norm, layer_norm_reference, rms_norm, rms_norm_reference};
pub use rnn_cell::{gru_cell, gru_cell_reference, lstm_cell, lstm_cell_reference};
pub use rnn_sequence::{gru_sequence, lstm_sequence, SequenceParams};
pub use segment::segment_softmax;
pub use softmax::{log_softmax, log_softmax_reference, logsumexp_rows, softmax, softmax_reference, MaskTensor};
pub use sparse::{entmax15, entmax15_reference, sparsemax, sparsemax_reference};
pub use tanh::{tanh, tanh_reference};
pub use vjp::vjp_loss;

/// The logistic function `σ(x) = (tanh(x/2) + 1)/2`, composed from differentiable ops: stable in both tails, exactly
/// 0 at −∞ (a hidden score).
pub fn sigmoid(x: &candle_core::Tensor) -> crate::Result<candle_core::Tensor> {
    Ok((((x * 0.5)?.tanh()? + 1.0)? * 0.5)?)
}
