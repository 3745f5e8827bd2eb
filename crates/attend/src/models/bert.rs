//! BERT: a bidirectional Transformer encoder (Devlin et al. 2019), with its pretraining heads (masked LM and next
//! sentence prediction) and the fine-tuning heads of §4: sequence classification, token tagging and span extraction.
//!
//! ```text
//! h_0 = LayerNorm(W_tok[ids] + W_pos[positions] + W_seg[token_type_ids])
//! h_l = TransformerLayer_l(h_{l−1}, key padding mask)          (post-norm, as in the paper)
//! pooled = tanh(W_p h_L[:, 0] + b_p)                            (the [CLS] state, for sentence-level heads)
//! MLM logits = LayerNorm(act(W_t h_L + b_t)) W_tokᵀ + b_V       (tied to the token embeddings)
//! ```
//!
//! RoBERTa and DistilBERT are this model with other settings: RoBERTa counts positions from `padding_idx + 1` over
//! the real tokens ([`BertPositions::FromPadding`]) and has one segment; DistilBERT has no segments and no pooler.
//! Their Hugging Face names map onto these in [`crate::checkpoint::hf`].
//!
//! # Parameters
//! | name | shape |
//! |---|---|
//! | `word_embeddings.weight` | `(V, C)` |
//! | `position_embeddings.weight` | `(P, C)`, `P = max_position_embeddings` |
//! | `token_type_embeddings.weight` | `(G, C)`, `G = type_vocab_size`, absent when `G = 0` |
//! | `embeddings_norm.{weight,bias}` | `(C)` |
//! | `layers.{i}.*` | [`TransformerLayer`] (one set `layers.*` when `share_layers`, ALBERT-style) |
//! | `pooler.{weight,bias}` | `(C, C)`, `(C)`, when `pooler` |
//!
//! Heads: [`BertPretraining`] adds `mlm.transform.*`, `mlm.norm.*`, `mlm.bias (V)` and `nsp.* (2, C)`;
//! [`BertForTask`] adds `head.*`.
//!
//! # Shapes
//! - `input_ids`, `token_type_ids`, `attention_mask`, `position_ids`: `(B, T)`
//! - hidden `(B, T, C)`, pooled `(B, C)`, MLM logits `(B, T, V)`, attention weights `(B, H, T, T)` per layer
//!
//! ```
//! use attend::models::bert::{Bert, BertConfig, BertInput};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = BertConfig { n_layers: 2, ..BertConfig::base(100, 32, 4) };
//! let bert = Bert::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let ids = Tensor::new(&[[2u32, 14, 15, 9, 3], [2, 7, 3, 0, 0]], &dev)?; // (B, T), right-padded
//! let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev)?;
//! let out = bert.forward(&BertInput { attention_mask: Some(&mask), ..BertInput::new(&ids) })?;
//! assert_eq!(out.hidden.dims(), &[2, 5, 32]); // (B, T, C)
//! assert_eq!(out.pooled.unwrap().dims(), &[2, 32]); // (B, C)
//! # Ok(()) }
//! ```

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Init, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{check_ids, padding_mask, TextInput};
use crate::attention::{Mask, MhaOptions};
use crate::error::shape_str;
use crate::layers::feed_forward::Activation;
use crate::layers::linear::Linear;
use crate::layers::norm::{Norm, NormConfig};
use crate::layers::stack::Stack;
use crate::layers::transformer::{LayerContext, NormPosition, TransformerLayer, TransformerLayerConfig};
use crate::ops::{self, CrossEntropyConfig, Reduction};
use crate::position::learned::LearnedPositions;
use crate::rng::{sample::uniform_at, DropoutRng, DropoutStream, TrainingFlag};
use crate::{bail, ensure, Result};

/// The label of a position that no loss counts (PyTorch's and Hugging Face's `ignore_index`).
pub const IGNORE: i64 = -100;

/// How positions are numbered when `position_ids` is not given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BertPositions {
    /// `0, 1, …, T−1` (BERT, DistilBERT).
    #[default]
    Absolute,
    /// RoBERTa's: real tokens count from `padding_idx + 1`, padding tokens get `padding_idx`.
    FromPadding { padding_idx: u32 },
}

/// Configuration of [`Bert`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// `V`. Example: `30522`.
    pub vocab_size: usize,
    /// Rows of the position table. Example: `512`.
    pub max_position_embeddings: usize,
    /// Segments (`G`); 0 for none (DistilBERT). Example: `2`.
    pub type_vocab_size: usize,
    /// `C`. Example: `768`.
    pub d_model: usize,
    /// Example: `12`.
    pub n_layers: usize,
    /// `H`. Example: `12`.
    pub n_heads: usize,
    /// Feed-forward width. Example: `3072`.
    pub d_ff: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    /// Dropout on the embeddings, each residual branch and the heads' inputs while training. Example: `0.1`.
    #[serde(default)]
    pub dropout: f64,
    /// Dropout on the attention weights while training.
    #[serde(default)]
    pub attn_dropout: f64,
    /// The `tanh` pooler over the first token (BERT, RoBERTa; not DistilBERT or the MLM-only checkpoints).
    pub pooler: bool,
    #[serde(default)]
    pub positions: BertPositions,
    /// One layer's parameters for every depth (ALBERT's cross-layer sharing).
    #[serde(default)]
    pub share_layers: bool,
}

impl BertConfig {
    /// BERT-base's settings (gelu, ε = 1e-12, 512 positions, 2 segments, `d_ff = 4·C`, pooler) at the given sizes.
    pub fn base(vocab_size: usize, d_model: usize, n_heads: usize) -> Self {
        Self {
            vocab_size,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            d_model,
            n_layers: 12,
            n_heads,
            d_ff: 4 * d_model,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-12,
            dropout: 0.0,
            attn_dropout: 0.0,
            pooler: true,
            positions: BertPositions::Absolute,
            share_layers: false,
        }
    }

    /// The configuration of each (post-norm) layer.
    pub fn layer(&self) -> TransformerLayerConfig {
        let norm = NormConfig::layer(self.layer_norm_eps);
        TransformerLayerConfig::plain(self.d_model, self.n_heads, self.d_ff, self.activation, norm, NormPosition::Post)
            .with_dropout(self.dropout, self.attn_dropout)
    }
}

/// The inputs of one BERT forward call ([`TextInput`]): `token_type_ids` default to segment 0, `position_ids` to
/// [`BertPositions`]' rule.
pub type BertInput<'a> = TextInput<'a>;

/// The encoder's outputs.
#[derive(Clone, Debug)]
pub struct BertOutput {
    /// `(B, T, C)`: Hugging Face's `last_hidden_state`.
    pub hidden: Tensor,
    /// `(B, C)`: `pooler_output`, when the model has a pooler.
    pub pooled: Option<Tensor>,
    /// One `(B, H, T, T)` per layer, when asked for.
    pub weights: Vec<Tensor>,
}

/// The BERT encoder; see the module docs.
#[derive(Clone, Debug)]
pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: LearnedPositions,
    token_type_embeddings: Option<Embedding>,
    embeddings_norm: Norm,
    layers: Stack<TransformerLayer>,
    pooler: Option<Linear>,
    config: BertConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

/// Embedding tables start as BERT's N(0, 0.02) when created rather than loaded.
fn embedding_table(rows: usize, c: usize, vb: VarBuilder) -> Result<Embedding> {
    let w = vb.get_with_hints((rows, c), "weight", Init::Randn { mean: 0.0, stdev: 0.02 })?;
    Ok(Embedding::new(w, c))
}

impl Bert {
    const OP: &'static str = "Bert";

    /// Loads (or creates) every parameter under `vb`.
    pub fn new(config: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let c = config.d_model;
        ensure!(config.vocab_size > 0, Self::OP, "vocab_size must be positive");
        ensure!(config.max_position_embeddings > 0, Self::OP, "max_position_embeddings must be positive");
        ensure!(config.n_layers > 0, Self::OP, "n_layers must be positive");
        for (name, p) in [("dropout", config.dropout), ("attn_dropout", config.attn_dropout)] {
            ensure!((0.0..1.0).contains(&p), Self::OP, "{name} must be in [0, 1), got {p}");
        }
        let word_embeddings = embedding_table(config.vocab_size, c, vb.pp("word_embeddings"))?;
        let position_embeddings =
            LearnedPositions::new(config.max_position_embeddings, c, vb.pp("position_embeddings"))?;
        let token_type_embeddings = match config.type_vocab_size {
            0 => None,
            g => Some(embedding_table(g, c, vb.pp("token_type_embeddings"))?),
        };
        let embeddings_norm = Norm::new(c, NormConfig::layer(config.layer_norm_eps), vb.pp("embeddings_norm"))?;
        let layer_cfg = config.layer();
        let build = |vb: VarBuilder| TransformerLayer::new(&layer_cfg, vb);
        let layers = if config.share_layers {
            Stack::shared(config.n_layers, build, vb.pp("layers"))?
        } else {
            Stack::distinct(config.n_layers, build, vb.pp("layers"))?
        };
        let pooler = if config.pooler { Some(Linear::new(c, c, true, vb.pp("pooler"))?) } else { None };
        let mut bert = Self {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            pooler,
            config: config.clone(),
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
        };
        bert.set_dropout_rng(DropoutRng::process_default());
        Ok(bert)
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// `(V, C)`: the token embeddings, which the MLM head reuses as its output projection.
    pub fn word_embeddings(&self) -> &Tensor {
        self.word_embeddings.embeddings()
    }

    /// The layer applied at depth `i`.
    pub fn layer(&self, i: usize) -> &TransformerLayer {
        self.layers.layer(i)
    }

    /// Training mode (dropout on) for the model and every layer.
    pub fn set_training(&self, training: bool) {
        self.training.set(training);
        (0..self.layers.depth()).for_each(|i| self.layers.layer(i).set_training(training));
    }

    pub fn is_training(&self) -> bool {
        self.training.get()
    }

    /// Draws every dropout stream of the model from `rng` (seeded training).
    pub fn set_dropout_rng(&mut self, rng: &DropoutRng) {
        self.dropout = rng.stream();
        self.layers.for_each_layer_mut(|l| l.set_dropout_rng(rng));
    }

    /// Dropout on a head's input with this model's rate and stream (the heads' "one extra layer" is trained with it).
    pub(crate) fn head_dropout(&self, x: Tensor) -> Result<Tensor> {
        ops::dropout_while_training(x, self.config.dropout, &self.training, &self.dropout)
    }

    /// RoBERTa's positions: `padding_idx + cumsum(ids ≠ pad)` on real tokens, `padding_idx` on padding.
    fn positions_from_padding(ids: &Tensor, padding_idx: u32) -> Result<Tensor> {
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let pos: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let mut n = 0;
                r.iter()
                    .map(|&id| {
                        if id == padding_idx as i64 {
                            padding_idx
                        } else {
                            n += 1;
                            padding_idx + n
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(Tensor::new(pos, ids.device())?)
    }

    /// Hidden states, the pooled `[CLS]` state and (when asked for) the attention weights.
    ///
    /// # Errors
    /// Ids out of range (tokens, segments, positions), shapes that disagree (the message names them).
    pub fn forward(&self, input: &BertInput) -> Result<BertOutput> {
        let ids = input.input_ids;
        let (b, t) = check_ids(Self::OP, ids, self.config.vocab_size)?;
        let mut x = self.word_embeddings.forward(ids)?; // (B, T, C)
        match (input.token_type_ids, &self.token_type_embeddings) {
            (Some(tt), Some(table)) => {
                ensure!(tt.dims() == [b, t], Self::OP, "token_type_ids {} must be (B, T) = ({b}, {t})", shape_str(tt));
                let g = self.config.type_vocab_size;
                check_ids(Self::OP, tt, g).map_err(|_| {
                    crate::Error::invalid(
                        Self::OP,
                        format!("token_type_ids must be integers in 0..{g} (type_vocab_size)"),
                    )
                })?;
                x = (x + table.forward(tt)?)?;
            }
            // Hugging Face's default segment: every token in segment 0.
            (None, Some(table)) => x = x.broadcast_add(&table.embeddings().get(0)?)?,
            (Some(_), None) => bail!(Self::OP, "token_type_ids given but this model has no segment embeddings"),
            (None, None) => {}
        }
        let x = match (input.position_ids, self.config.positions) {
            (Some(p), _) => self.position_embeddings.forward_ids(&x, p)?,
            (None, BertPositions::Absolute) => self.position_embeddings.forward(&x, 0)?,
            (None, BertPositions::FromPadding { padding_idx }) => {
                self.position_embeddings.forward_ids(&x, &Self::positions_from_padding(ids, padding_idx)?)?
            }
        };
        let mut x = self.head_dropout(self.embeddings_norm.forward(&x)?)?;
        let mask = padding_mask(Self::OP, Mask::none(), input.attention_mask, b, t)?;
        let ctx = LayerContext {
            mask: &mask,
            memory: None,
            opts: MhaOptions { need_weights: input.need_weights, ..Default::default() },
        };
        let mut weights = Vec::new();
        for i in 0..self.layers.depth() {
            let o = self.layers.layer(i).forward(&x, &ctx, None)?;
            x = o.out;
            weights.extend(o.self_weights);
        }
        let pooled = match &self.pooler {
            Some(p) => Some(p.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?.tanh()?), // (B, C)
            None => None,
        };
        Ok(BertOutput { hidden: x, pooled, weights })
    }
}

/// The masked-LM head: `LayerNorm(act(W_t h + b_t)) W_tokᵀ + b_V`, its output projection tied to the token
/// embeddings.
///
/// # Parameters
/// `transform.weight (C, C)`, `transform.bias (C)`, `norm.{weight,bias} (C)`, `bias (V)`.
#[derive(Clone, Debug)]
pub struct MlmHead {
    transform: Linear,
    norm: Norm,
    bias: Tensor,
    activation: Activation,
}

impl MlmHead {
    pub fn new(config: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let c = config.d_model;
        Ok(Self {
            transform: Linear::new(c, c, true, vb.pp("transform"))?,
            norm: Norm::new(c, NormConfig::layer(config.layer_norm_eps), vb.pp("norm"))?,
            bias: vb.get_with_hints(config.vocab_size, "bias", Init::Const(0.0))?,
            activation: config.activation,
        })
    }

    /// `hidden (…, C)` → logits `(…, V)` over `word_embeddings (V, C)`.
    pub fn forward(&self, hidden: &Tensor, word_embeddings: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(&self.activation.apply(&self.transform.forward(hidden)?)?)?;
        ops::linear(&h, word_embeddings, Some(&self.bias))
    }
}

/// BERT with its pretraining heads: masked LM, next sentence prediction, or both (Hugging Face's
/// `BertForMaskedLM`, `BertForNextSentencePrediction`, `BertForPreTraining`).
///
/// # Parameters
/// `bert.*` ([`Bert`]), `mlm.*` ([`MlmHead`]), `nsp.weight (2, C)`, `nsp.bias (2)`.
#[derive(Clone, Debug)]
pub struct BertPretraining {
    bert: Bert,
    mlm: Option<MlmHead>,
    nsp: Option<Linear>,
}

/// The outputs of [`BertPretraining::forward`].
#[derive(Clone, Debug)]
pub struct PretrainingOutput {
    pub encoder: BertOutput,
    /// `(B, T, V)`
    pub mlm_logits: Option<Tensor>,
    /// `(B, 2)`: 0 = B follows A, 1 = B is random.
    pub nsp_logits: Option<Tensor>,
}

impl BertPretraining {
    const OP: &'static str = "BertPretraining";

    /// Which heads to build; NSP needs the pooler.
    pub fn new(config: &BertConfig, mlm: bool, nsp: bool, vb: VarBuilder) -> Result<Self> {
        ensure!(mlm || nsp, Self::OP, "at least one of the masked-LM and next-sentence heads is needed");
        ensure!(!nsp || config.pooler, Self::OP, "next sentence prediction reads the pooler: set pooler = true");
        Ok(Self {
            bert: Bert::new(config, vb.pp("bert"))?,
            mlm: if mlm { Some(MlmHead::new(config, vb.pp("mlm"))?) } else { None },
            nsp: if nsp { Some(Linear::new(config.d_model, 2, true, vb.pp("nsp"))?) } else { None },
        })
    }

    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    pub fn has_mlm(&self) -> bool {
        self.mlm.is_some()
    }

    pub fn has_nsp(&self) -> bool {
        self.nsp.is_some()
    }

    pub fn forward(&self, input: &BertInput) -> Result<PretrainingOutput> {
        let encoder = self.bert.forward(input)?;
        let mlm_logits = match &self.mlm {
            Some(h) => Some(h.forward(&encoder.hidden, self.bert.word_embeddings())?),
            None => None,
        };
        let nsp_logits = match (&self.nsp, &encoder.pooled) {
            (Some(h), Some(p)) => Some(h.forward(&self.bert.head_dropout(p.clone())?)?),
            _ => None,
        };
        Ok(PretrainingOutput { encoder, mlm_logits, nsp_logits })
    }

    /// The pretraining loss (§3.1): mean cross-entropy over the labelled positions of `mlm_labels (B, T)`
    /// ([`IGNORE`] elsewhere, as [`MlmMasking::apply`] writes them) plus the next-sentence cross-entropy of
    /// `nsp_labels (B)`; each term only when its head and labels are present.
    pub fn loss(&self, input: &BertInput, mlm_labels: Option<&Tensor>, nsp_labels: Option<&Tensor>) -> Result<Tensor> {
        let out = self.forward(input)?;
        let cfg = CrossEntropyConfig { ignore_index: IGNORE, ..Default::default() };
        let mut terms = Vec::new();
        if let (Some(logits), Some(labels)) = (&out.mlm_logits, mlm_labels) {
            let (b, t, v) = logits.dims3()?;
            ensure!(labels.dims() == [b, t], Self::OP, "mlm_labels {} must be (B, T) = ({b}, {t})", shape_str(labels));
            let flat = logits.reshape((b * t, v))?; // (N, V)
            terms.push(ops::cross_entropy(&flat, &labels.flatten_all()?.to_dtype(DType::I64)?, &cfg, Reduction::Mean)?);
        }
        if let (Some(logits), Some(labels)) = (&out.nsp_logits, nsp_labels) {
            terms.push(ops::cross_entropy(logits, &labels.to_dtype(DType::I64)?, &cfg, Reduction::Mean)?);
        }
        match terms.len() {
            0 => bail!(Self::OP, "no loss to compute: give the labels of a head the model has"),
            1 => Ok(terms.pop().expect("one term")),
            _ => Ok((&terms[0] + &terms[1])?),
        }
    }
}

/// BERT's masked-LM corruption (§3.1, "80/10/10"): each eligible token is chosen with `probability`; a chosen token
/// becomes `[MASK]` 80% of the time, a uniformly random token 10%, and stays 10%; the labels hold the original id
/// at chosen positions and [`IGNORE`] elsewhere. Special tokens and padding are never chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlmMasking {
    /// Example: `0.15`.
    pub probability: f64,
    pub mask_token_id: u32,
    /// Random replacements are drawn from `0..vocab_size`.
    pub vocab_size: usize,
    /// Ids never chosen (`[CLS]`, `[SEP]`, `[PAD]`, …).
    pub special_ids: Vec<u32>,
}

impl MlmMasking {
    const OP: &'static str = "MlmMasking";

    /// `(corrupted input_ids (B, T) u32, labels (B, T) i64)` for `ids (B, T)`; `attention_mask` 0 marks padding.
    /// The draw is a pure function of `(seed, position)`, so a seed reproduces it.
    pub fn apply(&self, ids: &Tensor, attention_mask: Option<&Tensor>, seed: u64) -> Result<(Tensor, Tensor)> {
        ensure!((0.0..=1.0).contains(&self.probability), Self::OP, "probability must be in [0, 1]");
        ensure!((self.mask_token_id as usize) < self.vocab_size, Self::OP, "mask_token_id outside the vocabulary");
        let (b, t) = check_ids(Self::OP, ids, self.vocab_size)?;
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let keep = match attention_mask {
            Some(m) => {
                ensure!(m.dims() == [b, t], Self::OP, "attention_mask {} must be (B, T) = ({b}, {t})", shape_str(m));
                m.ne(0u32)?.to_vec2::<u8>()?
            }
            None => vec![vec![1; t]; b],
        };
        let (mut input, mut labels) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for (r, row) in rows.iter().enumerate() {
            for (j, &id) in row.iter().enumerate() {
                let i = (r * t + j) as u64;
                let eligible = keep[r][j] != 0 && !self.special_ids.contains(&id);
                // Three independent draws per position: chosen?, which corruption, which random token.
                if eligible && uniform_at(seed, 3 * i) < self.probability {
                    labels.push(id as i64);
                    let u = uniform_at(seed, 3 * i + 1);
                    input.push(if u < 0.8 {
                        self.mask_token_id
                    } else if u < 0.9 {
                        ((uniform_at(seed, 3 * i + 2) * self.vocab_size as f64) as u32).min(self.vocab_size as u32 - 1)
                    } else {
                        id
                    });
                } else {
                    labels.push(IGNORE);
                    input.push(id);
                }
            }
        }
        let dev: &Device = ids.device();
        Ok((Tensor::from_vec(input, (b, t), dev)?, Tensor::from_vec(labels, (b, t), dev)?))
    }
}

/// The fine-tuning tasks of BERT §4, each one linear layer on the encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BertTask {
    /// On the pooled `[CLS]` state: `(B, K)`; `K = 1` is regression (mean squared error), as in Hugging Face.
    SequenceClassification { n_labels: usize },
    /// On every token: `(B, T, K)` (tagging, NER).
    TokenClassification { n_labels: usize },
    /// Span extraction (SQuAD): start and end logits `(B, T)` each.
    QuestionAnswering,
}

impl BertTask {
    fn outputs(self) -> usize {
        match self {
            BertTask::SequenceClassification { n_labels } | BertTask::TokenClassification { n_labels } => n_labels,
            BertTask::QuestionAnswering => 2,
        }
    }
}

/// BERT with a fine-tuning head (Hugging Face's `BertForSequenceClassification`, `BertForTokenClassification`,
/// `BertForQuestionAnswering`).
///
/// # Parameters
/// `bert.*` ([`Bert`]), `head.weight (K, C)`, `head.bias (K)` (`K = 2` for question answering).
#[derive(Clone, Debug)]
pub struct BertForTask {
    bert: Bert,
    head: Linear,
    task: BertTask,
}

/// The logits of [`BertForTask::forward`].
#[derive(Clone, Debug)]
pub enum TaskLogits {
    /// `(B, K)`
    Sequence(Tensor),
    /// `(B, T, K)`
    Token(Tensor),
    /// `(B, T)` each.
    Span { start: Tensor, end: Tensor },
}

impl BertForTask {
    const OP: &'static str = "BertForTask";

    pub fn new(config: &BertConfig, task: BertTask, vb: VarBuilder) -> Result<Self> {
        ensure!(task.outputs() > 0, Self::OP, "n_labels must be positive");
        if let BertTask::SequenceClassification { .. } = task {
            ensure!(config.pooler, Self::OP, "sequence classification reads the pooler: set pooler = true");
        }
        Ok(Self {
            bert: Bert::new(config, vb.pp("bert"))?,
            head: Linear::new(config.d_model, task.outputs(), true, vb.pp("head"))?,
            task,
        })
    }

    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    pub fn task(&self) -> BertTask {
        self.task
    }

    /// The task's logits and the encoder's outputs.
    pub fn forward(&self, input: &BertInput) -> Result<(TaskLogits, BertOutput)> {
        let out = self.bert.forward(input)?;
        let logits = match self.task {
            BertTask::SequenceClassification { .. } => {
                let pooled = out.pooled.clone().expect("checked in new: the model has a pooler");
                TaskLogits::Sequence(self.head.forward(&self.bert.head_dropout(pooled)?)?)
            }
            BertTask::TokenClassification { .. } => {
                TaskLogits::Token(self.head.forward(&self.bert.head_dropout(out.hidden.clone())?)?)
            }
            BertTask::QuestionAnswering => {
                let both = self.head.forward(&out.hidden)?; // (B, T, 2)
                TaskLogits::Span { start: both.narrow(2, 0, 1)?.squeeze(2)?, end: both.narrow(2, 1, 1)?.squeeze(2)? }
            }
        };
        Ok((logits, out))
    }

    /// The task's loss, as Hugging Face computes it:
    /// - sequence classification: cross-entropy of `labels (B)`, or mean squared error against `labels (B)` floats
    ///   when `K = 1`;
    /// - token classification: cross-entropy of `labels (B, T)`, [`IGNORE`] at positions not counted;
    /// - question answering: the mean of the start and end cross-entropies of `labels = [start (B), end (B)]`
    ///   stacked as `(2, B)`; positions outside `0..T` are ignored.
    pub fn loss(&self, input: &BertInput, labels: &Tensor) -> Result<Tensor> {
        let cfg = CrossEntropyConfig { ignore_index: IGNORE, ..Default::default() };
        let ce = |logits: &Tensor, labels: &Tensor| -> Result<Tensor> {
            ops::cross_entropy(logits, &labels.to_dtype(DType::I64)?, &cfg, Reduction::Mean)
        };
        let (logits, _) = self.forward(input)?;
        match logits {
            TaskLogits::Sequence(l) if l.dim(1)? == 1 => {
                let want = labels.to_dtype(l.dtype())?.reshape(l.dims())?;
                Ok((l - want)?.sqr()?.mean_all()?)
            }
            TaskLogits::Sequence(l) => ce(&l, labels),
            TaskLogits::Token(l) => {
                let (b, t, k) = l.dims3()?;
                ensure!(labels.dims() == [b, t], Self::OP, "labels {} must be (B, T) = ({b}, {t})", shape_str(labels));
                ce(&l.reshape((b * t, k))?, &labels.flatten_all()?)
            }
            TaskLogits::Span { start, end } => {
                let (b, t) = start.dims2()?;
                ensure!(
                    labels.dims() == [2, b],
                    Self::OP,
                    "labels {} must be (2, B) = (2, {b}): start and end positions",
                    shape_str(labels)
                );
                // Hugging Face clamps positions into 0..=T and ignores T: answers cut off by truncation.
                let pos = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
                let fix: Vec<Vec<i64>> = pos
                    .iter()
                    .map(|r| r.iter().map(|&p| if (0..t as i64).contains(&p) { p } else { IGNORE }).collect())
                    .collect();
                let fix = Tensor::new(fix, labels.device())?;
                Ok(((ce(&start, &fix.get(0)?)? + ce(&end, &fix.get(1)?)?)? * 0.5)?)
            }
        }
    }
}

/// The best answer span of each row: the `(start, end)` with `start ≤ end < start + max_len` maximising
/// `start_logits[start] + end_logits[end]` among the positions `allowed` marks (1 = may be part of the answer, such as
/// the context's tokens); `None` for a row with no allowed position.
///
/// # Shapes
/// `start_logits`, `end_logits`, `allowed`: `(B, T)`.
pub fn best_spans(
    start_logits: &Tensor,
    end_logits: &Tensor,
    allowed: Option<&Tensor>,
    max_len: usize,
) -> Result<Vec<Option<(usize, usize, f32)>>> {
    const OP: &str = "best_spans";
    let (b, t) = start_logits.dims2()?;
    ensure!(end_logits.dims() == [b, t], OP, "end_logits {} must match start_logits ({b}, {t})", shape_str(end_logits));
    let s = start_logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let e = end_logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let ok = match allowed {
        Some(a) => {
            ensure!(a.dims() == [b, t], OP, "allowed {} must be (B, T) = ({b}, {t})", shape_str(a));
            a.ne(0u32)?.to_vec2::<u8>()?
        }
        None => vec![vec![1; t]; b],
    };
    Ok((0..b)
        .map(|r| {
            let mut best: Option<(usize, usize, f32)> = None;
            for i in (0..t).filter(|&i| ok[r][i] != 0) {
                for j in (i..t.min(i + max_len.max(1))).filter(|&j| ok[r][j] != 0) {
                    let score = s[r][i] + e[r][j];
                    if best.is_none_or(|(_, _, b)| score > b) {
                        best = Some((i, j, score));
                    }
                }
            }
            best
        })
        .collect())
}

/// Which heads sit on the encoder: what a checkpoint's architecture (`BertForMaskedLM`, …) names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BertHeads {
    /// The bare encoder (`BertModel`).
    None,
    /// [`BertPretraining`] with these heads.
    Pretraining { mlm: bool, nsp: bool },
    /// [`BertForTask`].
    Task(BertTask),
}

/// A BERT with any of its heads, as a checkpoint holds it.
#[derive(Clone, Debug)]
pub enum AnyBert {
    Encoder(Bert),
    Pretraining(BertPretraining),
    Task(BertForTask),
}

impl AnyBert {
    /// The encoder's parameters live under `vb` for [`BertHeads::None`] and under `vb.pp("bert")` otherwise.
    pub fn new(config: &BertConfig, heads: BertHeads, vb: VarBuilder) -> Result<Self> {
        Ok(match heads {
            BertHeads::None => AnyBert::Encoder(Bert::new(config, vb)?),
            BertHeads::Pretraining { mlm, nsp } => AnyBert::Pretraining(BertPretraining::new(config, mlm, nsp, vb)?),
            BertHeads::Task(task) => AnyBert::Task(BertForTask::new(config, task, vb)?),
        })
    }

    pub fn heads(&self) -> BertHeads {
        match self {
            AnyBert::Encoder(_) => BertHeads::None,
            AnyBert::Pretraining(p) => BertHeads::Pretraining { mlm: p.has_mlm(), nsp: p.has_nsp() },
            AnyBert::Task(t) => BertHeads::Task(t.task()),
        }
    }

    pub fn bert(&self) -> &Bert {
        match self {
            AnyBert::Encoder(b) => b,
            AnyBert::Pretraining(p) => p.bert(),
            AnyBert::Task(t) => t.bert(),
        }
    }
}
