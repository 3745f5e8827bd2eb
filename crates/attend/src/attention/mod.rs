//! Attention: the one core every layer calls ([`attention()`]), its typed mask ([`Mask`]), score functions and layers.

pub mod classic;
mod core;
mod fused;
pub mod kv_cache;
pub mod mask;
pub mod mha;
pub mod score;

pub use self::core::{
    attention, attention_with, flex_attention, AttentionDropout, AttentionImpl, AttentionOptions, AttentionOutput,
};
pub use crate::checkpoint::import_torch_mha;
/// The traits and built-in types of masks and score functions as code, for [`flex_attention`].
pub use attend_kernels::flash::masks as flex;
pub use kv_cache::KvCache;
pub use mask::{Alibi, Mask, MaskTensor, ResolvedMask};
pub use mha::{MhaDims, MhaOptions, MhaOutput, MultiHeadAttention, MultiHeadAttentionConfig};
