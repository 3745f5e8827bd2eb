//! GPT: a causal decoder language model in the GPT-1 (Radford et al. 2018) and GPT-2 (Radford et al. 2019) layouts.
//!
//! ```text
//! h_0 = W_e[ids] + W_p[positions]                      (token and learned position embeddings)
//! h_l = TransformerLayer_l(h_{l−1}, causal mask)        (post-norm in GPT-1, pre-norm in GPT-2)
//! logits = Norm_f(h_L) W_eᵀ                             (GPT-2's final norm; tied output embedding)
//! ```
//!
//! The pretraining objective is next-token cross-entropy ([`Gpt::lm_loss`]); supervised fine-tuning adds a linear
//! head on the last real token's state and, as in GPT-1 (§3.2), the auxiliary LM loss: `L3 = L2 + λ·L1`
//! ([`GptClassifier`]). Every layer is [`TransformerLayer`]; masks, caches and positions come from the crate's
//! core, so this file only wires them.
//!
//! # Parameters
//! | name | shape |
//! |---|---|
//! | `wte.weight` | `(V, C)` token embeddings (and the output projection when tied) |
//! | `wpe.weight` | `(P, C)` positions, `P = n_positions` |
//! | `layers.{i}.*` | [`TransformerLayer`] (one set `layers.*` when `share_layers`, ALBERT-style) |
//! | `ln_f.weight`, `ln_f.bias` | `(C)`, GPT-2 layout only |
//! | `lm_head.weight` | `(V, C)`, only when `tie_embeddings = false` |
//!
//! Hugging Face's names (`h.{i}.attn.c_attn`, Conv1D's transposed weights) map onto these in
//! [`crate::checkpoint::hf`].
//!
//! # Shapes
//! - `input_ids (B, T)`, `attention_mask (B, S)` with `S = cached + T` (1 = real token), `position_ids (B, T)`
//! - hidden `(B, T, C)`, logits `(B, T, V)`, attention weights `(B, H, T, S)` per layer
//!
//! ```
//! use attend::models::gpt::{Gpt, GptConfig, GptInput};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = GptConfig { n_layers: 2, ..GptConfig::gpt2(50, 16, 32, 4) };
//! let gpt = Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let ids = Tensor::new(&[[3u32, 14, 15, 9, 2]], &dev)?; // (B, T)
//! let logits = gpt.forward(&GptInput::new(&ids), None)?;
//! assert_eq!(logits.dims(), &[1, 5, 50]); // (B, T, V)
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};
use candle_nn::{Embedding, Init, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{check_ids, padding_mask, TextInput};
use crate::attention::{KvCache, Mask, MhaOptions};
use crate::error::shape_str;
use crate::layers::feed_forward::Activation;
use crate::layers::linear::Linear;
use crate::layers::norm::{Norm, NormConfig};
use crate::layers::stack::Stack;
use crate::layers::transformer::{LayerContext, NormPosition, TransformerLayer, TransformerLayerConfig};
use crate::ops::{self, CrossEntropyConfig, Reduction};
use crate::position::learned::LearnedPositions;
use crate::rng::{DropoutRng, DropoutStream, TrainingFlag};
use crate::{ensure, Result};

/// GPT-1 or GPT-2 block layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GptLayout {
    /// Post-norm layers, no final norm.
    Gpt1,
    /// Pre-norm layers and a final norm `ln_f`.
    Gpt2,
}

/// Configuration of [`Gpt`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// `V`. Example: `50257`.
    pub vocab_size: usize,
    /// Longest sequence, the rows of `wpe`. Example: `1024`.
    pub n_positions: usize,
    /// `C`. Example: `768`.
    pub d_model: usize,
    /// Example: `12`.
    pub n_layers: usize,
    /// `H`. Example: `12`.
    pub n_heads: usize,
    /// Feed-forward width; default `4·C`.
    #[serde(default)]
    pub d_ff: Option<usize>,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    pub layout: GptLayout,
    /// Residual and feed-forward dropout while training. Example: `0.1`.
    #[serde(default)]
    pub dropout: f64,
    /// Dropout on the attention weights while training.
    #[serde(default)]
    pub attn_dropout: f64,
    /// Dropout on the summed embeddings while training.
    #[serde(default)]
    pub embd_dropout: f64,
    /// The output projection is `wte` (GPT-1, GPT-2).
    pub tie_embeddings: bool,
    /// One `qkv_proj` instead of three projections (GPT-2's `c_attn`).
    pub fused_qkv: bool,
    /// One layer's parameters for every depth (ALBERT's cross-layer sharing).
    #[serde(default)]
    pub share_layers: bool,
}

impl GptConfig {
    /// GPT-2's layout (pre-norm, `gelu_new`, tied embeddings, fused `c_attn`, ε = 1e-5) at the given sizes, 12 layers.
    pub fn gpt2(vocab_size: usize, n_positions: usize, d_model: usize, n_heads: usize) -> Self {
        Self {
            vocab_size,
            n_positions,
            d_model,
            n_layers: 12,
            n_heads,
            d_ff: None,
            activation: Activation::GeluTanh,
            layer_norm_eps: 1e-5,
            layout: GptLayout::Gpt2,
            dropout: 0.0,
            attn_dropout: 0.0,
            embd_dropout: 0.0,
            tie_embeddings: true,
            fused_qkv: true,
            share_layers: false,
        }
    }

    /// The configuration of each layer.
    pub fn layer(&self) -> TransformerLayerConfig {
        let position = match self.layout {
            GptLayout::Gpt1 => NormPosition::Post,
            GptLayout::Gpt2 => NormPosition::Pre,
        };
        let d_ff = self.d_ff.unwrap_or(4 * self.d_model);
        let norm = NormConfig::layer(self.layer_norm_eps);
        let mut cfg = TransformerLayerConfig::plain(self.d_model, self.n_heads, d_ff, self.activation, norm, position)
            .with_dropout(self.dropout, self.attn_dropout);
        cfg.attention.fused_qkv = self.fused_qkv;
        cfg
    }
}

/// The inputs of one GPT forward call ([`TextInput`]): `attention_mask (B, S)` covers the cached and new positions,
/// `position_ids` default to `cached..cached + T`, `token_type_ids` are embedded with the token table and added
/// (Hugging Face GPT-2's rule).
pub type GptInput<'a> = TextInput<'a>;

/// Hidden states and, when asked for, each layer's attention weights.
#[derive(Clone, Debug)]
pub struct GptOutput {
    /// `(B, T, C)` after the final norm (GPT-2) — Hugging Face's `last_hidden_state`.
    pub hidden: Tensor,
    /// One `(B, H, T, S)` per layer.
    pub weights: Vec<Tensor>,
}

/// A key/value cache per layer application, for incremental decoding.
#[derive(Clone, Debug)]
pub struct GptCache {
    layers: Vec<KvCache>,
}

impl GptCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `n` positions of every layer.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.truncate(n))
    }
}

/// A GPT language model; see the module docs.
#[derive(Clone, Debug)]
pub struct Gpt {
    wte: Embedding,
    wpe: LearnedPositions,
    layers: Stack<TransformerLayer>,
    ln_f: Option<Norm>,
    lm_head: Option<Linear>,
    config: GptConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

impl Gpt {
    const OP: &'static str = "Gpt";

    /// Loads (or creates, with GPT-2's N(0, 0.02) initialisation of the embeddings) every parameter under `vb`.
    pub fn new(config: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let (v, c) = (config.vocab_size, config.d_model);
        ensure!(v > 0 && config.n_positions > 0, Self::OP, "vocab_size and n_positions must be positive");
        ensure!(config.n_layers > 0, Self::OP, "n_layers must be positive");
        for (name, p) in
            [("dropout", config.dropout), ("attn_dropout", config.attn_dropout), ("embd_dropout", config.embd_dropout)]
        {
            ensure!((0.0..1.0).contains(&p), Self::OP, "{name} must be in [0, 1), got {p}");
        }
        let init = Init::Randn { mean: 0.0, stdev: 0.02 };
        let wte = Embedding::new(vb.pp("wte").get_with_hints((v, c), "weight", init)?, c);
        let wpe = LearnedPositions::new(config.n_positions, c, vb.pp("wpe"))?;
        let layer_cfg = config.layer();
        let build = |vb: VarBuilder| TransformerLayer::new(&layer_cfg, vb);
        let layers = if config.share_layers {
            Stack::shared(config.n_layers, build, vb.pp("layers"))?
        } else {
            Stack::distinct(config.n_layers, build, vb.pp("layers"))?
        };
        let ln_f = match config.layout {
            GptLayout::Gpt2 => Some(Norm::new(c, NormConfig::layer(config.layer_norm_eps), vb.pp("ln_f"))?),
            GptLayout::Gpt1 => None,
        };
        let lm_head = if config.tie_embeddings { None } else { Some(Linear::new(c, v, false, vb.pp("lm_head"))?) };
        let mut gpt = Self {
            wte,
            wpe,
            layers,
            ln_f,
            lm_head,
            config: config.clone(),
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
        };
        gpt.set_dropout_rng(DropoutRng::process_default());
        Ok(gpt)
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Training mode (dropout on) for the model and every layer.
    pub fn set_training(&self, training: bool) {
        self.training.set(training);
        (0..self.layers.depth()).for_each(|i| self.layers.layer(i).set_training(training));
    }

    /// Draws every dropout stream of the model from `rng` (seeded training).
    pub fn set_dropout_rng(&mut self, rng: &DropoutRng) {
        self.dropout = rng.stream();
        self.layers.for_each_layer_mut(|l| l.set_dropout_rng(rng));
    }

    /// An empty cache sized for this model (`n_positions` keys per layer).
    pub fn new_cache(&self) -> GptCache {
        GptCache { layers: (0..self.layers.depth()).map(|_| KvCache::new(Some(self.config.n_positions))).collect() }
    }

    /// The layer applied at depth `i`.
    pub fn layer(&self, i: usize) -> &TransformerLayer {
        self.layers.layer(i)
    }

    /// Final hidden states; with a `cache`, the `T` new tokens follow the cached positions.
    ///
    /// # Errors
    /// Ids out of `0..V`, shapes that disagree (the message names them), more positions than `n_positions`.
    pub fn hidden_states(&self, input: &GptInput, mut cache: Option<&mut GptCache>) -> Result<GptOutput> {
        let ids = input.input_ids;
        let (b, t) = check_ids(Self::OP, ids, self.config.vocab_size)?;
        let cached = cache.as_ref().map_or(0, |c| c.len());
        let s = cached + t;
        ensure!(
            s <= self.config.n_positions,
            Self::OP,
            "{cached} cached + {t} new positions exceed n_positions = {}",
            self.config.n_positions
        );
        let mut x = self.wte.forward(ids)?; // (B, T, C)
        if let Some(tt) = input.token_type_ids {
            ensure!(tt.dims() == [b, t], Self::OP, "token_type_ids {} must be (B, T) = ({b}, {t})", shape_str(tt));
            check_ids(Self::OP, tt, self.config.vocab_size)?;
            x = (x + self.wte.forward(tt)?)?;
        }
        let mut x = match input.position_ids {
            Some(p) => self.wpe.forward_ids(&x, p)?,
            None => self.wpe.forward(&x, cached)?,
        };
        x = ops::dropout_while_training(x, self.config.embd_dropout, &self.training, &self.dropout)?;
        let mask = padding_mask(Self::OP, Mask::causal(), input.attention_mask, b, s)?;
        let ctx = LayerContext {
            mask: &mask,
            memory: None,
            opts: MhaOptions { need_weights: input.need_weights, ..Default::default() },
        };
        let mut weights = Vec::new();
        for i in 0..self.layers.depth() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let o = self.layers.layer(i).forward(&x, &ctx, layer_cache)?;
            x = o.out;
            weights.extend(o.self_weights);
        }
        let hidden = match &self.ln_f {
            Some(ln) => ln.forward(&x)?,
            None => x,
        };
        Ok(GptOutput { hidden, weights })
    }

    /// `hidden (…, C) → logits (…, V)` through the (tied) output projection.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match &self.lm_head {
            Some(head) => head.forward(hidden)?,
            None => ops::linear(hidden, self.wte.embeddings(), None)?,
        })
    }

    /// Logits `(B, T, V)` of the `T` new tokens.
    pub fn forward(&self, input: &GptInput, cache: Option<&mut GptCache>) -> Result<Tensor> {
        self.logits(&self.hidden_states(input, cache)?.hidden)
    }

    /// Next-token cross-entropy, averaged over the predicted positions: logits at `t` against `ids[t + 1]`;
    /// targets equal to `ignore_index` (or positions whose `attention_mask` is 0) do not count.
    ///
    /// # Shapes
    /// `logits (B, T, V)`, `ids (B, T)` → scalar.
    pub fn lm_loss(logits: &Tensor, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        ensure!(t >= 2, "Gpt::lm_loss", "need at least 2 positions to predict a next token, got T = {t}");
        ensure!(ids.dims() == [b, t], "Gpt::lm_loss", "ids {} must be (B, T) = ({b}, {t})", shape_str(ids));
        let ignore = -100i64;
        let mut targets = ids.narrow(1, 1, t - 1)?.to_dtype(DType::I64)?; // (B, T−1)
        if let Some(m) = attention_mask {
            let keep = m.narrow(1, 1, t - 1)?.to_dtype(DType::U8)?;
            targets = keep.where_cond(&targets, &targets.ones_like()?.affine(0.0, ignore as f64)?)?;
        }
        let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?; // (N, V)
        let cfg = CrossEntropyConfig { ignore_index: ignore, ..Default::default() };
        ops::cross_entropy(&pred, &targets.flatten_all()?, &cfg, Reduction::Mean)
    }
}

/// GPT fine-tuned for classification (GPT-1 §3.2): a linear head on the state of each sequence's last real token,
/// trained with `L3 = L2 + λ·L1` ([`GptClassifier::loss`]).
///
/// # Parameters
/// `gpt.*` ([`Gpt`]), `head.weight (K, C)`, `head.bias (K)`.
#[derive(Clone, Debug)]
pub struct GptClassifier {
    gpt: Gpt,
    head: Linear,
}

/// The two losses and their sum.
#[derive(Clone, Debug)]
pub struct ClassifierLoss {
    /// `L3 = L2 + λ·L1`, what to minimise.
    pub total: Tensor,
    /// `L2`: cross-entropy of the classes.
    pub task: Tensor,
    /// `L1`: the auxiliary language-model loss.
    pub lm: Tensor,
    /// `(B, K)`
    pub class_logits: Tensor,
}

impl GptClassifier {
    pub fn new(config: &GptConfig, n_classes: usize, vb: VarBuilder) -> Result<Self> {
        ensure!(n_classes > 0, "GptClassifier", "n_classes must be positive");
        Ok(Self {
            gpt: Gpt::new(config, vb.pp("gpt"))?,
            head: Linear::new(config.d_model, n_classes, true, vb.pp("head"))?,
        })
    }

    pub fn gpt(&self) -> &Gpt {
        &self.gpt
    }

    /// Class logits `(B, K)` from the state at each sequence's last real token (right padding; the last column when
    /// `attention_mask` is `None`), and the LM logits `(B, T, V)`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let input = GptInput { attention_mask, ..GptInput::new(input_ids) };
        let hidden = self.gpt.hidden_states(&input, None)?.hidden; // (B, T, C)
        let (b, t, c) = hidden.dims3()?;
        let last: Vec<u32> = match attention_mask {
            Some(m) => m.to_dtype(DType::U32)?.sum(1)?.to_vec1::<u32>()?.iter().map(|&n| n.max(1) - 1).collect(),
            None => vec![t as u32 - 1; b],
        };
        let rows: Vec<u32> = last.iter().enumerate().map(|(i, &j)| i as u32 * t as u32 + j).collect();
        let rows = Tensor::new(rows, hidden.device())?;
        let pooled = hidden.reshape((b * t, c))?.index_select(&rows, 0)?; // (B, C)
        Ok((self.head.forward(&pooled)?, self.gpt.logits(&hidden)?))
    }

    /// `L3 = L2 + λ·L1` for class labels `(B)`.
    pub fn loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        lambda: f64,
    ) -> Result<ClassifierLoss> {
        let (class_logits, lm_logits) = self.forward(input_ids, attention_mask)?;
        let task = ops::cross_entropy(&class_logits, labels, &CrossEntropyConfig::default(), Reduction::Mean)?;
        let lm = Gpt::lm_loss(&lm_logits, input_ids, attention_mask)?;
        let total = (&task + (&lm * lambda)?)?;
        Ok(ClassifierLoss { total, task, lm, class_logits })
    }
}
