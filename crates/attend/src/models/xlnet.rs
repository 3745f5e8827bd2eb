//! Permutation language modelling with two-stream self-attention, after XLNet (Yang et al. 2019): an autoregressive
//! model over a random factorisation order, so each token is predicted from context on both sides without BERT's
//! `[MASK]` corruption.
//!
//! ```text
//! z ~ a random permutation of the real positions           (the factorisation order; rank r(i) of position i)
//! content  h_i⁰ = E[x_i] + P_i     attends to j with r(j) ≤ r(i)    (sees its own token)
//! query    g_i⁰ = w + P_i          attends to j with r(j) < r(i)    (knows where it predicts, never what)
//! both read keys and values from the content stream; the layers' parameters are shared by the two streams
//! loss = − Σ_{i: r(i) ≥ n − n/K} log p(x_i | g_i^L)        (partial prediction: the last 1/K of the order)
//! ```
//!
//! The permutation never reorders the input: it lives only in the two masks, given to the one attention core as
//! keep-masks ([`PermutationPlan`]). Positions are learned absolute embeddings (XLNet's own uses Transformer-XL's
//! relative encoding and memory; this is the "XLNet-style" objective of the course, on the same layers as GPT and
//! BERT). A query row whose rank is 0 sees nothing: the core defines it as zeros, and it is never a target. For
//! fine-tuning and embeddings, [`PermutationLm::forward`] runs the content stream with every real token visible.
//!
//! # Parameters
//! | name | shape |
//! |---|---|
//! | `word_embeddings.weight` | `(V, C)`, also the output projection |
//! | `position_embeddings.weight` | `(P, C)` |
//! | `query_embedding` | `(1, 1, C)`: `w`, the query stream's start |
//! | `layers.{i}.*` | [`TransformerLayer`] |
//! | `norm.{weight,bias}` | `(C)`, pre-norm only |
//! | `lm_bias` | `(V)` |
//!
//! # Shapes
//! `input_ids`, `attention_mask (B, T)` → content and query streams `(B, T, C)`, logits `(B, T, V)`; masks
//! `(B, 1, T, T)`.
//!
//! ```
//! use attend::models::xlnet::{PermutationLm, PermutationLmConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = PermutationLmConfig { n_layers: 2, ..PermutationLmConfig::base(50, 64, 32, 4) };
//! let lm = PermutationLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let ids = Tensor::new(&[[3u32, 14, 15, 9, 2, 6]], &dev)?; // (B, T)
//! let plan = lm.plan(&ids, None, 7)?; // a seeded factorisation order
//! let loss = lm.loss(&ids, &plan)?;
//! assert!(loss.to_scalar::<f32>()?.is_finite());
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};
use candle_nn::{Embedding, Init, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{check_ids, padding_mask};
use crate::attention::{Mask, MaskTensor, MhaOptions};
use crate::error::shape_str;
use crate::layers::feed_forward::Activation;
use crate::layers::norm::{Norm, NormConfig};
use crate::layers::stack::Stack;
use crate::layers::transformer::{LayerContext, NormPosition, TransformerLayer, TransformerLayerConfig};
use crate::models::bert::IGNORE;
use crate::ops::{self, CrossEntropyConfig, Reduction};
use crate::position::learned::LearnedPositions;
use crate::rng::{sample::uniform_at, DropoutRng, DropoutStream, TrainingFlag};
use crate::{ensure, Result};

/// Configuration of [`PermutationLm`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PermutationLmConfig {
    pub vocab_size: usize,
    /// Longest sequence. Example: `512`.
    pub max_len: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_ff: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    /// Post-norm as XLNet, or pre-norm (then with a final norm).
    pub norm_position: NormPosition,
    /// `K` of partial prediction: the last `⌈n/K⌉` positions of each order are predicted. Example: `6`.
    pub predict_one_in: usize,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub attn_dropout: f64,
}

impl PermutationLmConfig {
    /// XLNet-base-like settings at the given sizes: 12 post-norm layers, gelu, ε = 1e-12, `d_ff = 4·C`, K = 6.
    pub fn base(vocab_size: usize, max_len: usize, d_model: usize, n_heads: usize) -> Self {
        Self {
            vocab_size,
            max_len,
            d_model,
            n_layers: 12,
            n_heads,
            d_ff: 4 * d_model,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-12,
            norm_position: NormPosition::Post,
            predict_one_in: 6,
            dropout: 0.0,
            attn_dropout: 0.0,
        }
    }

    pub fn layer(&self) -> TransformerLayerConfig {
        let norm = NormConfig::layer(self.layer_norm_eps);
        TransformerLayerConfig::plain(self.d_model, self.n_heads, self.d_ff, self.activation, norm, self.norm_position)
            .with_dropout(self.dropout, self.attn_dropout)
    }
}

/// A sampled factorisation order as the two attention masks and the prediction targets.
#[derive(Clone, Debug)]
pub struct PermutationPlan {
    /// `(B, T)`: each real position's rank in the order (padding: `u32::MAX`).
    pub ranks: Vec<Vec<u32>>,
    /// `(B, 1, T, T)` u8: `r(j) ≤ r(i)`, real keys only.
    pub content_mask: Tensor,
    /// `(B, 1, T, T)` u8: `r(j) < r(i)`, real keys only.
    pub query_mask: Tensor,
    /// `(B, T)` i64: the token to predict at the last `⌈n/K⌉` ranks, [`IGNORE`] elsewhere.
    pub targets: Tensor,
}

impl PermutationPlan {
    /// The plan of explicit `ranks (B, T)` (a permutation of `0..n_b` over each row's real positions, `u32::MAX` on
    /// padding) for `ids (B, T)`, predicting the last `⌈n_b / k⌉` ranks (at most `n_b − 1`).
    pub fn from_ranks(ids: &Tensor, ranks: Vec<Vec<u32>>, k: usize) -> Result<Self> {
        const OP: &str = "PermutationPlan";
        let (b, t) = ids.dims2()?;
        ensure!(ranks.len() == b && ranks.iter().all(|r| r.len() == t), OP, "ranks must be (B, T) = ({b}, {t})");
        ensure!(k > 0, OP, "predict_one_in must be positive");
        let tokens = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let (mut content, mut query, mut targets) = (vec![0u8; b * t * t], vec![0u8; b * t * t], vec![IGNORE; b * t]);
        for (r, row) in ranks.iter().enumerate() {
            let n = row.iter().filter(|&&x| x != u32::MAX).count() as u32;
            let mut seen: Vec<u32> = row.iter().copied().filter(|&x| x != u32::MAX).collect();
            seen.sort_unstable();
            ensure!(
                seen.iter().enumerate().all(|(i, &x)| x == i as u32),
                OP,
                "row {r}: ranks are not a permutation of 0..{n}"
            );
            let n_pred = n.div_ceil(k as u32).min(n.saturating_sub(1));
            for i in 0..t {
                if row[i] == u32::MAX {
                    continue;
                }
                for j in (0..t).filter(|&j| row[j] != u32::MAX) {
                    content[(r * t + i) * t + j] = (row[j] <= row[i]) as u8;
                    query[(r * t + i) * t + j] = (row[j] < row[i]) as u8;
                }
                if row[i] >= n - n_pred {
                    targets[r * t + i] = tokens[r][i];
                }
            }
        }
        let dev = ids.device();
        Ok(Self {
            ranks,
            content_mask: Tensor::from_vec(content, (b, 1, t, t), dev)?,
            query_mask: Tensor::from_vec(query, (b, 1, t, t), dev)?,
            targets: Tensor::from_vec(targets, (b, t), dev)?,
        })
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct PermutationLm {
    word_embeddings: Embedding,
    position_embeddings: LearnedPositions,
    query_embedding: Tensor,
    layers: Stack<TransformerLayer>,
    norm: Option<Norm>,
    lm_bias: Tensor,
    config: PermutationLmConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

impl PermutationLm {
    const OP: &'static str = "PermutationLm";

    pub fn new(config: &PermutationLmConfig, vb: VarBuilder) -> Result<Self> {
        let c = config.d_model;
        ensure!(config.n_layers > 0 && config.max_len > 0, Self::OP, "n_layers and max_len must be positive");
        ensure!(config.predict_one_in > 0, Self::OP, "predict_one_in must be positive");
        let init = Init::Randn { mean: 0.0, stdev: 0.02 };
        let layer_cfg = config.layer();
        let mut lm = Self {
            word_embeddings: Embedding::new(
                vb.pp("word_embeddings").get_with_hints((config.vocab_size, c), "weight", init)?,
                c,
            ),
            position_embeddings: LearnedPositions::new(config.max_len, c, vb.pp("position_embeddings"))?,
            query_embedding: vb.get_with_hints((1, 1, c), "query_embedding", init)?,
            layers: Stack::distinct(config.n_layers, |vb| TransformerLayer::new(&layer_cfg, vb), vb.pp("layers"))?,
            norm: match config.norm_position {
                NormPosition::Pre => Some(Norm::new(c, NormConfig::layer(config.layer_norm_eps), vb.pp("norm"))?),
                NormPosition::Post => None,
            },
            lm_bias: vb.get_with_hints(config.vocab_size, "lm_bias", Init::Const(0.0))?,
            config: config.clone(),
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
        };
        lm.set_dropout_rng(DropoutRng::process_default());
        Ok(lm)
    }

    pub fn config(&self) -> &PermutationLmConfig {
        &self.config
    }

    pub fn set_training(&self, training: bool) {
        self.training.set(training);
        (0..self.layers.depth()).for_each(|i| self.layers.layer(i).set_training(training));
    }

    pub fn set_dropout_rng(&mut self, rng: &DropoutRng) {
        self.dropout = rng.stream();
        self.layers.for_each_layer_mut(|l| l.set_dropout_rng(rng));
    }

    fn drop(&self, x: Tensor) -> Result<Tensor> {
        ops::dropout_while_training(x, self.config.dropout, &self.training, &self.dropout)
    }

    fn check(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = check_ids(Self::OP, ids, self.config.vocab_size)?;
        ensure!(
            t <= self.config.max_len,
            Self::OP,
            "input_ids {} exceed max_len = {}",
            shape_str(ids),
            self.config.max_len
        );
        Ok((b, t))
    }

    /// A seeded factorisation order per row over its real tokens (`attention_mask` 1), as a [`PermutationPlan`].
    pub fn plan(&self, ids: &Tensor, attention_mask: Option<&Tensor>, seed: u64) -> Result<PermutationPlan> {
        let (b, t) = self.check(ids)?;
        let keep = match attention_mask {
            Some(m) => {
                ensure!(m.dims() == [b, t], Self::OP, "attention_mask {} must be (B, T) = ({b}, {t})", shape_str(m));
                m.ne(0u32)?.to_vec2::<u8>()?
            }
            None => vec![vec![1; t]; b],
        };
        let ranks = keep
            .iter()
            .enumerate()
            .map(|(r, row)| {
                // Fisher–Yates over the real positions, one counter-based draw per swap.
                let mut order: Vec<usize> = (0..t).filter(|&j| row[j] != 0).collect();
                for i in (1..order.len()).rev() {
                    let u = uniform_at(seed, (r * t + i) as u64);
                    order.swap(i, ((u * (i + 1) as f64) as usize).min(i));
                }
                let mut rank = vec![u32::MAX; t];
                order.iter().enumerate().for_each(|(k, &pos)| rank[pos] = k as u32);
                rank
            })
            .collect();
        PermutationPlan::from_ranks(ids, ranks, self.config.predict_one_in)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.word_embeddings.forward(ids)?; // (B, T, C)
        self.drop(self.position_embeddings.forward(&x, 0)?)
    }

    fn final_norm(&self, x: Tensor) -> Result<Tensor> {
        match &self.norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    /// The content and query streams `(B, T, C)` under `plan`'s order.
    pub fn forward_two_stream(&self, ids: &Tensor, plan: &PermutationPlan) -> Result<(Tensor, Tensor)> {
        let (b, t) = self.check(ids)?;
        ensure!(
            plan.content_mask.dims() == [b, 1, t, t],
            Self::OP,
            "the plan's masks {} are not for input_ids {}",
            shape_str(&plan.content_mask),
            shape_str(ids)
        );
        let mut h = self.embed(ids)?;
        // The query stream starts from w at each position: where to predict, not what.
        let w = self.query_embedding.broadcast_as(h.shape())?;
        let mut g = self.drop(self.position_embeddings.forward(&w.contiguous()?, 0)?)?;
        let content = Mask::none().with_tensor(MaskTensor::Keep(plan.content_mask.clone()));
        let query = Mask::none().with_tensor(MaskTensor::Keep(plan.query_mask.clone()));
        for i in 0..self.layers.depth() {
            (h, g) = self.layers.layer(i).forward_two_stream(&h, &g, &content, &query, &MhaOptions::default())?;
        }
        Ok((self.final_norm(h)?, self.final_norm(g)?))
    }

    /// `(…, C)` → logits `(…, V)` through the tied output embedding.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, self.word_embeddings.embeddings(), Some(&self.lm_bias))
    }

    /// The permutation-LM loss: mean cross-entropy of the query stream at `plan`'s targets.
    pub fn loss(&self, ids: &Tensor, plan: &PermutationPlan) -> Result<Tensor> {
        let (_, g) = self.forward_two_stream(ids, plan)?;
        let logits = self.logits(&g)?; // (B, T, V)
        let (b, t, v) = logits.dims3()?;
        let cfg = CrossEntropyConfig { ignore_index: IGNORE, ..Default::default() };
        ops::cross_entropy(&logits.reshape((b * t, v))?, &plan.targets.flatten_all()?, &cfg, Reduction::Mean)
    }

    /// The content stream with every real token visible (fine-tuning, embeddings).
    pub fn forward(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = self.check(ids)?;
        let mask = padding_mask(Self::OP, Mask::none(), attention_mask, b, t)?;
        let ctx = LayerContext { mask: &mask, memory: None, opts: MhaOptions::default() };
        let mut h = self.embed(ids)?;
        for i in 0..self.layers.depth() {
            h = self.layers.layer(i).forward(&h, &ctx, None)?.out;
        }
        self.final_norm(h)
    }
}
