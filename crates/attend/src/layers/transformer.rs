//! One Transformer layer (Vaswani et al. 2017 §3.1): self-attention, optional cross-attention over a memory, and a
//! feed-forward network, each a residual branch with a normalisation, post-norm as in the paper or pre-norm as in
//! GPT-2, ViT and T5 (Xiong et al. 2020):
//!
//! ```text
//! post-norm:  x ← Norm(x + Dropout(Sublayer(x)))          (the paper, BERT, GPT-1)
//! pre-norm:   x ← x + Dropout(Sublayer(Norm(x)))          (GPT-2, ViT, T5; the final norm is the model's)
//! ```
//!
//! The attention of each branch is [`MultiHeadAttention`], so masks, KV caches, rotary embeddings and attention
//! weights all come from the one core.
//!
//! # Parameters
//! | name | layer |
//! |---|---|
//! | `self_attn.*` | [`MultiHeadAttention`] |
//! | `self_attn_norm.*` | [`Norm`] |
//! | `cross_attn.*`, `cross_attn_norm.*` | the same, with `cross_attention` |
//! | `ffn.*` | [`FeedForward`] |
//! | `ffn_norm.*` | [`Norm`] |
//!
//! # Shapes
//! `x (B, T, C)`, memory `(B, S, C)` → `(B, T, C)`; weights `(B, H, T, S)`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::feed_forward::{Activation, FeedForward, FeedForwardConfig};
use super::norm::{Norm, NormConfig};
use crate::attention::{KvCache, Mask, MhaOptions, MultiHeadAttention, MultiHeadAttentionConfig};
use crate::ops::dropout_while_training;
use crate::rng::{DropoutRng, DropoutStream, TrainingFlag};
use crate::{ensure, Result};

/// Where each residual branch normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormPosition {
    /// After the residual sum (the paper, BERT, GPT-1).
    Post,
    /// On the branch input (GPT-2, ViT, T5); the stack then needs a final norm.
    Pre,
}

/// Configuration of [`TransformerLayer`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformerLayerConfig {
    pub attention: MultiHeadAttentionConfig,
    pub feed_forward: FeedForwardConfig,
    pub norm: NormConfig,
    pub norm_position: NormPosition,
    /// A cross-attention branch over a memory (the decoder of an encoder–decoder).
    #[serde(default)]
    pub cross_attention: bool,
    /// Dropout on each branch's output before the residual sum, while training. Example: `0.1`.
    #[serde(default)]
    pub dropout: f64,
}

impl TransformerLayerConfig {
    /// A self-attention layer of `H` heads over `C` and a plain `d_ff` feed-forward, biases everywhere, no dropout:
    /// the layer of BERT, GPT, ViT and the permutation LM, which adjust what differs.
    pub fn plain(
        d_model: usize,
        n_heads: usize,
        d_ff: usize,
        activation: Activation,
        norm: NormConfig,
        norm_position: NormPosition,
    ) -> Self {
        Self {
            attention: MultiHeadAttentionConfig::new(d_model, n_heads),
            feed_forward: FeedForwardConfig { d_model, d_ff, activation, gated: false, bias: true, dropout: 0.0 },
            norm,
            norm_position,
            cross_attention: false,
            dropout: 0.0,
        }
    }

    /// Residual dropout on each branch and dropout on the attention weights.
    pub fn with_dropout(mut self, residual: f64, attention: f64) -> Self {
        self.dropout = residual;
        self.attention.dropout = attention;
        self
    }
}

/// The memory a cross-attention branch reads: raw (projected on every call) or projected once with
/// [`MultiHeadAttention::project_kv`] (decoding).
#[derive(Clone, Copy, Debug)]
pub enum Memory<'a> {
    /// `(B, S, C)`.
    Raw(&'a Tensor),
    /// `k (B, Hkv, S, D)`, `v (B, Hkv, S, D)`.
    Projected(&'a Tensor, &'a Tensor),
}

/// What one layer call reads besides `x`.
#[derive(Clone, Copy, Debug)]
pub struct LayerContext<'a> {
    /// The self-attention mask (causal in a decoder, key padding in an encoder).
    pub mask: &'a Mask,
    /// Cross-attention memory and its mask (the memory's key padding).
    pub memory: Option<(Memory<'a>, &'a Mask)>,
    pub opts: MhaOptions<'a>,
}

/// The output of a layer, with its attention weights when `opts.need_weights` asked for them.
#[derive(Clone, Debug)]
pub struct LayerOutput {
    /// `(B, T, C)`
    pub out: Tensor,
    /// `(B, H, T, S)`
    pub self_weights: Option<Tensor>,
    /// `(B, H, T, S_mem)`
    pub cross_weights: Option<Tensor>,
}

/// One Transformer layer; see the module docs.
#[derive(Clone, Debug)]
pub struct TransformerLayer {
    self_attn: MultiHeadAttention,
    self_attn_norm: Norm,
    cross: Option<(MultiHeadAttention, Norm)>,
    ffn: FeedForward,
    ffn_norm: Norm,
    config: TransformerLayerConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

impl TransformerLayer {
    const OP: &'static str = "TransformerLayer";

    pub fn new(config: &TransformerLayerConfig, vb: VarBuilder) -> Result<Self> {
        let c = config.attention.d_model;
        ensure!(
            config.feed_forward.d_model == c,
            Self::OP,
            "feed_forward.d_model = {} differs from attention.d_model = {c}",
            config.feed_forward.d_model
        );
        ensure!((0.0..1.0).contains(&config.dropout), Self::OP, "dropout must be in [0, 1), got {}", config.dropout);
        let cross = if config.cross_attention {
            let cfg = MultiHeadAttentionConfig { fused_qkv: false, ..config.attention.clone() };
            Some((
                MultiHeadAttention::new(&cfg, vb.pp("cross_attn"))?,
                Norm::new(c, config.norm, vb.pp("cross_attn_norm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            self_attn: MultiHeadAttention::new(&config.attention, vb.pp("self_attn"))?,
            self_attn_norm: Norm::new(c, config.norm, vb.pp("self_attn_norm"))?,
            cross,
            ffn: FeedForward::new(&config.feed_forward, vb.pp("ffn"))?,
            ffn_norm: Norm::new(c, config.norm, vb.pp("ffn_norm"))?,
            config: config.clone(),
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
        })
    }

    pub fn config(&self) -> &TransformerLayerConfig {
        &self.config
    }

    pub fn self_attn(&self) -> &MultiHeadAttention {
        &self.self_attn
    }

    pub fn cross_attn(&self) -> Option<&MultiHeadAttention> {
        self.cross.as_ref().map(|(a, _)| a)
    }

    /// Training mode (dropout on) for this layer and its sublayers.
    pub fn set_training(&self, training: bool) {
        self.training.set(training);
        self.self_attn.set_training(training);
        if let Some((a, _)) = &self.cross {
            a.set_training(training);
        }
        self.ffn.set_training(training);
    }

    /// Draws this layer's dropout streams (residual, attention, feed-forward) from `rng`.
    pub fn set_dropout_rng(&mut self, rng: &DropoutRng) {
        self.dropout = rng.stream();
        self.self_attn.set_dropout_stream(rng.stream());
        if let Some((a, _)) = &mut self.cross {
            a.set_dropout_stream(rng.stream());
        }
        self.ffn.set_dropout_stream(rng.stream());
    }

    /// One residual branch: `Norm(x + Dropout(f(x)))` or `x + Dropout(f(Norm(x)))`.
    fn branch(&self, x: &Tensor, norm: &Norm, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let drop = |y: Tensor| dropout_while_training(y, self.config.dropout, &self.training, &self.dropout);
        match self.config.norm_position {
            NormPosition::Post => norm.forward(&(x + drop(f(x)?)?)?),
            NormPosition::Pre => Ok((x + drop(f(&norm.forward(x)?)?)?)?),
        }
    }

    /// `x (B, T, C)` through the layer; `cache` holds the self-attention keys and values of earlier positions.
    ///
    /// # Errors
    /// A memory given to a layer without cross-attention or the reverse, and every error of
    /// [`MultiHeadAttention::forward`].
    pub fn forward(&self, x: &Tensor, ctx: &LayerContext, cache: Option<&mut KvCache>) -> Result<LayerOutput> {
        ensure!(
            ctx.memory.is_some() == self.cross.is_some(),
            Self::OP,
            "{}",
            if self.cross.is_some() {
                "this layer has cross-attention and needs a memory"
            } else {
                "a memory was given to a layer without cross-attention"
            }
        );
        let mut self_weights = None;
        let x = self.branch(x, &self.self_attn_norm, |h| {
            let o = self.self_attn.forward(h, None, ctx.mask, cache, &ctx.opts)?;
            self_weights = o.weights;
            Ok(o.out)
        })?;
        let mut cross_weights = None;
        let x = match (&self.cross, ctx.memory) {
            (Some((attn, norm)), Some((memory, mask))) => self.branch(&x, norm, |h| {
                let o = match memory {
                    Memory::Raw(m) => attn.forward(h, Some(m), mask, None, &ctx.opts)?,
                    Memory::Projected(k, v) => attn.forward_projected(h, k, v, mask, &ctx.opts)?,
                };
                cross_weights = o.weights;
                Ok(o.out)
            })?,
            _ => x,
        };
        let out = self.branch(&x, &self.ffn_norm, |h| self.ffn.forward(h))?;
        Ok(LayerOutput { out, self_weights, cross_weights })
    }

    /// XLNet's two-stream self-attention (Yang et al. 2019 §2.3) through this layer's parameters: the content stream
    /// `h` attends under `content_mask` (each position sees itself and what precedes it in the factorisation order),
    /// the query stream `g` under `query_mask` (what strictly precedes it: a position never sees its own token).
    /// Both read keys and values projected once from the content stream; both then pass the feed-forward branch.
    ///
    /// # Shapes
    /// `h (B, T, C)`, `g (B, T, C)` → `(h', g')`, each `(B, T, C)`.
    ///
    /// # Errors
    /// A layer with cross-attention, and every error of [`MultiHeadAttention::forward_projected`].
    pub fn forward_two_stream(
        &self,
        h: &Tensor,
        g: &Tensor,
        content_mask: &Mask,
        query_mask: &Mask,
        opts: &MhaOptions,
    ) -> Result<(Tensor, Tensor)> {
        ensure!(
            self.cross.is_none(),
            Self::OP,
            "two-stream attention is self-attention: this layer has cross-attention"
        );
        let kv_src = match self.config.norm_position {
            NormPosition::Pre => self.self_attn_norm.forward(h)?,
            NormPosition::Post => h.clone(),
        };
        let (k, v) = self.self_attn.project_kv(&kv_src, &kv_src)?; // (B, H, T, D) each
        let attend = |x: &Tensor, mask: &Mask| -> Result<Tensor> {
            self.branch(x, &self.self_attn_norm, |q| Ok(self.self_attn.forward_projected(q, &k, &v, mask, opts)?.out))
        };
        let (h1, g1) = (attend(h, content_mask)?, attend(g, query_mask)?);
        let ffn = |x: &Tensor| self.branch(x, &self.ffn_norm, |y| self.ffn.forward(y));
        Ok((ffn(&h1)?, ffn(&g1)?))
    }
}
