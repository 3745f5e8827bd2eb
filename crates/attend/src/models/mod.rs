//! Models built from the layers: each file one model family.
//!
//! | model | file |
//! |---|---|
//! | [`seq2seq::Seq2Seq`]: recurrent encoder–decoder, no attention / Bahdanau / Luong global / local-m / local-p, coverage | `seq2seq.rs` |
//! | [`gpt::Gpt`], [`gpt::GptClassifier`]: causal decoder LM, GPT-1 and GPT-2 layouts, fine-tuning with the auxiliary LM loss | `gpt.rs` |
//! | [`ram::Ram`]: recurrent attention model, glimpses and REINFORCE (Mnih et al. 2014) | `ram.rs` |

pub mod gpt;
pub mod ram;
pub mod seq2seq;
