//! Models built from the layers: each file one model family.
//!
//! | model | file |
//! |---|---|
//! | [`seq2seq::Seq2Seq`]: recurrent encoder–decoder, no attention / Bahdanau / Luong global / local-m / local-p, coverage | `seq2seq.rs` |

pub mod seq2seq;
