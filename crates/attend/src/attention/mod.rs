//! Attention: the one core every layer calls ([`attention()`]), its typed mask ([`Mask`]), score functions and layers.

mod core;
pub mod mask;
pub mod score;

pub use self::core::{
    attention, attention_with, resolve_mask, AttentionDropout, AttentionImpl, AttentionOptions, AttentionOutput,
};
pub use crate::ops::MaskTensor;
pub use mask::{Alibi, Mask, ResolvedMask};
