//! Attention: the one core every layer calls ([`attention()`]), its typed mask ([`Mask`]), score functions and layers.

mod core;
mod fused;
pub mod kv_cache;
pub mod mask;
pub mod mha;
pub mod score;

pub use self::core::{
    attention, attention_with, resolve_mask, AttentionDropout, AttentionImpl, AttentionOptions, AttentionOutput,
};
pub use crate::ops::MaskTensor;
pub use kv_cache::KvCache;
pub use mask::{Alibi, Mask, ResolvedMask};
pub use mha::{import_torch_mha, MhaDims, MhaOptions, MhaOutput, MultiHeadAttention, MultiHeadAttentionConfig};
