//! Models built from the layers: each file one model family.
//!
//! | model | file |
//! |---|---|
//! | [`seq2seq::Seq2Seq`]: recurrent encoder–decoder, no attention / Bahdanau / Luong global / local-m / local-p, coverage | `seq2seq.rs` |
//! | [`bert::Bert`], [`bert::BertPretraining`], [`bert::BertForTask`]: bidirectional encoder, masked-LM and next-sentence pretraining, classification / tagging / span heads (RoBERTa, DistilBERT by settings) | `bert.rs` |
//! | [`encoder_decoder::EncoderDecoder`]: Transformer encoder–decoder, the paper's (sinusoids, post-norm, shared tables) and T5's (relative bias, RMS pre-norm, gated GELU) | `encoder_decoder.rs` |
//! | [`gpt::Gpt`], [`gpt::GptClassifier`]: causal decoder LM, GPT-1 and GPT-2 layouts, fine-tuning with the auxiliary LM loss | `gpt.rs` |
//! | [`vit::Vit`]: Vision Transformer, patches + class token + learned positions, classification head | `vit.rs` |
//! | [`xlnet::PermutationLm`]: XLNet-style permutation LM, two-stream attention, partial prediction | `xlnet.rs` |
//! | [`ram::Ram`]: recurrent attention model, glimpses and REINFORCE (Mnih et al. 2014) | `ram.rs` |

pub mod bert;
pub mod encoder_decoder;
pub mod gpt;
pub mod gpt_trainer;
pub mod ram;
pub mod seq2seq;
pub mod vit;
pub mod xlnet;

use candle_core::{DType, Tensor};

use crate::attention::{Mask, MaskTensor};
use crate::error::shape_str;
use crate::{bail, ensure, Result};

/// The inputs of one forward call of a text model, under Hugging Face's argument names; all but `input_ids` are
/// optional, as there.
#[derive(Clone, Copy, Debug)]
pub struct TextInput<'a> {
    /// `(B, T)` token ids, `u32` or `i64`.
    pub input_ids: &'a Tensor,
    /// `(B, S)`: 1 for a real token, 0 for padding (keys never attended to); `S = T`, or cached + `T` when decoding.
    pub attention_mask: Option<&'a Tensor>,
    /// `(B, T)` absolute positions.
    pub position_ids: Option<&'a Tensor>,
    /// `(B, T)` segment ids.
    pub token_type_ids: Option<&'a Tensor>,
    /// Return every layer's attention weights.
    pub need_weights: bool,
}

impl<'a> TextInput<'a> {
    pub fn new(input_ids: &'a Tensor) -> Self {
        Self { input_ids, attention_mask: None, position_ids: None, token_type_ids: None, need_weights: false }
    }
}

/// Checks `(B, T)` token ids against the vocabulary; returns `(B, T)`.
pub(crate) fn check_ids(op: &'static str, ids: &Tensor, vocab: usize) -> Result<(usize, usize)> {
    let Ok((b, t)) = ids.dims2() else { bail!(op, "input_ids must be (B, T), got {}", shape_str(ids)) };
    ensure!(b > 0 && t > 0, op, "input_ids {} is empty", shape_str(ids));
    ensure!(
        matches!(ids.dtype(), DType::U32 | DType::I64 | DType::U8),
        op,
        "input_ids must be integers (u32 or i64), got {:?}",
        ids.dtype()
    );
    let flat = ids.flatten_all()?.to_dtype(DType::I64)?;
    let (lo, hi) = (flat.min(0)?.to_scalar::<i64>()?, flat.max(0)?.to_scalar::<i64>()?);
    ensure!(
        lo >= 0 && (hi as usize) < vocab,
        op,
        "token id {} is outside the vocabulary 0..{vocab}",
        if lo < 0 { lo } else { hi }
    );
    Ok((b, t))
}

/// `base` (the causal mask of a decoder, no mask for an encoder) with the keys whose Hugging Face-style
/// `attention_mask (B, S)` is 0 hidden (left or right padding).
pub(crate) fn padding_mask(
    op: &'static str,
    base: Mask,
    attention_mask: Option<&Tensor>,
    b: usize,
    s: usize,
) -> Result<Mask> {
    Ok(match attention_mask {
        None => base,
        Some(m) => {
            ensure!(
                m.dims() == [b, s],
                op,
                "attention_mask {} must be (B, S) = ({b}, {s}): one entry per cached and new position",
                shape_str(m)
            );
            let keep = m.ne(0u32)?; // (B, S) u8
                                    // Right padding (every row a run of ones, then zeros) is a key length per row, which the kernel
                                    // classifies per tile; only other patterns (left padding) need the per-element tensor.
            let rows = keep.to_vec2::<u8>()?;
            let lengths: Vec<usize> = rows.iter().map(|r| r.iter().take_while(|&&x| x != 0).count()).collect();
            let right_padded = rows.iter().zip(&lengths).all(|(r, &n)| r[n..].iter().all(|&x| x == 0));
            if !right_padded {
                base.with_tensor(MaskTensor::Keep(keep.reshape((b, 1, 1, s))?)) // (B, 1, 1, S)
            } else if lengths.iter().all(|&n| n == s) {
                base
            } else {
                base.with_key_lengths(lengths)
            }
        }
    })
}
