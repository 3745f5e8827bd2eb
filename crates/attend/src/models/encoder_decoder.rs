//! The Transformer encoder–decoder: "Attention Is All You Need" (Vaswani et al. 2017) and T5 (Raffel et al. 2020),
//! one model whose settings pick the variant.
//!
//! ```text
//! memory = Encoder(E_src[src]·s + P_src)                       (self-attention over the source, padding masked)
//! h      = Decoder(E_tgt[tgt]·s + P_tgt, memory)               (causal self-attention, cross-attention to memory)
//! logits = Norm(h) W_outᵀ · o                                  (W_out tied to E_tgt or its own)
//! ```
//!
//! | setting | the paper ([`EncoderDecoderConfig::vaswani`]) | T5 ([`EncoderDecoderConfig::t5`]) |
//! |---|---|---|
//! | positions `P` | sinusoidal, added | none: a learned bias per relative-position bucket and head, shared by the layers of a stack |
//! | embedding scale `s` | `√C` | 1 |
//! | norm | layer norm, post-norm (pre-norm as an option, with final norms) | RMS norm, pre-norm, final norms |
//! | attention | `softmax(QKᵀ/√D)` | `softmax(QKᵀ)` (the scale is folded into the initialisation) |
//! | feed-forward | ReLU | ReLU or gated GELU (T5 v1.1) |
//! | biases | yes | none |
//! | embeddings | source, target and output shared (optional) | one table for both sides; the output tied (scaled by `o = C^-½`) or its own |
//!
//! Label smoothing belongs to training (`ops::cross_entropy`'s `label_smoothing`). Decoding keeps a KV cache per
//! decoder layer and projects the memory once ([`EncoderDecoder::decoder`]), for greedy, sampled or beam search
//! ([`crate::decode`]).
//!
//! # Parameters
//! | name | shape |
//! |---|---|
//! | `src_embed.weight` | `(V_src, C)`; also the target (and output) table when shared |
//! | `tgt_embed.weight` | `(V_tgt, C)`, when not shared |
//! | `encoder.layers.{i}.*`, `decoder.layers.{i}.*` | [`TransformerLayer`] (the decoder's with cross-attention) |
//! | `encoder.norm.*`, `decoder.norm.*` | final norms, pre-norm only |
//! | `encoder.position_bias.relative_attention_bias.weight`, `decoder.…` | `(buckets, H)`, T5 only |
//! | `lm_head.weight` | `(V_tgt, C)`, when the output is not tied |
//!
//! # Shapes
//! - `src (B, S)`, `src_mask (B, S)`, `tgt (B, T)` → memory `(B, S, C)`, logits `(B, T, V_tgt)`
//! - attention weights: encoder `(B, H, S, S)`, decoder self `(B, H, T, T)`, cross `(B, H, T, S)` per layer
//!
//! ```
//! use attend::models::encoder_decoder::{EncoderDecoder, EncoderDecoderConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = EncoderDecoderConfig { n_encoder_layers: 2, n_decoder_layers: 2, ..EncoderDecoderConfig::vaswani(40, 40, 32, 4) };
//! let model = EncoderDecoder::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let src = Tensor::new(&[[5u32, 9, 12, 3, 2]], &dev)?; // (B, S)
//! let tgt = Tensor::new(&[[0u32, 7, 8]], &dev)?; // (B, T), starting with decoder_start_token_id
//! let logits = model.forward(&src, None, &tgt)?;
//! assert_eq!(logits.dims(), &[1, 3, 40]); // (B, T, V_tgt)
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};
use candle_nn::{Embedding, Init, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{check_ids, padding_mask};
use crate::attention::{KvCache, Mask, MaskTensor, MhaOptions, MultiHeadAttentionConfig};
use crate::decode::StepDecoder;
use crate::error::shape_str;
use crate::layers::feed_forward::{Activation, FeedForwardConfig};
use crate::layers::linear::Linear;
use crate::layers::norm::{Norm, NormConfig};
use crate::layers::stack::Stack;
use crate::layers::transformer::{LayerContext, Memory, NormPosition, TransformerLayer, TransformerLayerConfig};
use crate::ops::{self, CrossEntropyConfig, Reduction};
use crate::position::relative::{RelativePositionBias, RelativePositionBiasConfig};
use crate::position::sinusoidal::SinusoidalEncoding;
use crate::rng::{DropoutRng, DropoutStream, TrainingFlag};
use crate::{ensure, Result};

/// How positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Sinusoids added to the embeddings (the paper).
    Sinusoidal,
    /// T5's bucketed relative-position bias, one table per stack.
    Relative { num_buckets: usize, max_distance: usize },
}

/// Which embedding tables are one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedEmbeddings {
    /// Source, target and output each their own.
    None,
    /// The output projection is the target embedding.
    TargetOutput,
    /// Source and target share one table (a joint vocabulary; T5); the output has its own unless `tie_output`.
    SourceTarget,
    /// One table for source, target and output (the paper §3.4).
    All,
}

/// Configuration of [`EncoderDecoder`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderDecoderConfig {
    /// Example: `37000`.
    pub src_vocab: usize,
    /// Equal to `src_vocab` when the source and target tables are shared.
    pub tgt_vocab: usize,
    /// `C`. Example: `512`.
    pub d_model: usize,
    /// `H`. Example: `8`.
    pub n_heads: usize,
    /// `D`; default `C / H` (T5's `d_kv`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Example: `2048`.
    pub d_ff: usize,
    pub n_encoder_layers: usize,
    pub n_decoder_layers: usize,
    pub activation: Activation,
    /// A gated feed-forward (T5 v1.1's gated GELU).
    #[serde(default)]
    pub gated_ffn: bool,
    /// Biases on the projections and feed-forward layers.
    pub bias: bool,
    pub norm: NormConfig,
    pub norm_position: NormPosition,
    pub positions: Positions,
    /// Longest source or target (the sinusoid table has no limit; this bounds caches and inputs). Example: `512`.
    pub max_len: usize,
    /// Multiply embeddings by `√C` (the paper).
    pub scale_embeddings: bool,
    /// The attention score scale; default `1/√D` (T5: `1`).
    #[serde(default)]
    pub attention_scale: Option<f64>,
    pub shared_embeddings: SharedEmbeddings,
    /// With [`SharedEmbeddings::SourceTarget`]: the output is the shared table too, scaled by `C^-½` (T5 v1.0).
    #[serde(default)]
    pub tie_output: bool,
    /// Residual, embedding and feed-forward dropout while training. Example: `0.1`.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub attn_dropout: f64,
    /// Dropout between the feed-forward layers (T5; the paper has none).
    #[serde(default)]
    pub ffn_dropout: f64,
    /// The first decoder input. Example: `0` (T5's pad).
    pub decoder_start_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl EncoderDecoderConfig {
    /// The paper's base model at the given sizes: 6 + 6 post-norm layers, `d_ff = 4·C`, ReLU, sinusoids, `√C`
    /// scaling, every table shared (so `src_vocab = tgt_vocab` in use), start 0, end 1, pad 2, 512 positions.
    pub fn vaswani(src_vocab: usize, tgt_vocab: usize, d_model: usize, n_heads: usize) -> Self {
        Self {
            src_vocab,
            tgt_vocab,
            d_model,
            n_heads,
            head_dim: None,
            d_ff: 4 * d_model,
            n_encoder_layers: 6,
            n_decoder_layers: 6,
            activation: Activation::Relu,
            gated_ffn: false,
            bias: true,
            norm: NormConfig::layer(1e-5),
            norm_position: NormPosition::Post,
            positions: Positions::Sinusoidal,
            max_len: 512,
            scale_embeddings: true,
            attention_scale: None,
            shared_embeddings: if src_vocab == tgt_vocab {
                SharedEmbeddings::All
            } else {
                SharedEmbeddings::TargetOutput
            },
            tie_output: false,
            dropout: 0.1,
            attn_dropout: 0.0,
            ffn_dropout: 0.0,
            decoder_start_token_id: 0,
            eos_token_id: 1,
            pad_token_id: 2,
        }
    }

    /// T5 v1.1's layout at the given sizes: RMS norm (ε = 1e-6), pre-norm, 32 buckets up to distance 128, no biases,
    /// unscaled scores, gated GELU, one shared table and an untied head; start = pad = 0, end = 1.
    pub fn t5(vocab: usize, d_model: usize, d_kv: usize, d_ff: usize, n_heads: usize) -> Self {
        Self {
            src_vocab: vocab,
            tgt_vocab: vocab,
            d_model,
            n_heads,
            head_dim: Some(d_kv),
            d_ff,
            n_encoder_layers: 8,
            n_decoder_layers: 8,
            activation: Activation::GeluTanh,
            gated_ffn: true,
            bias: false,
            norm: NormConfig::Rms { eps: 1e-6 },
            norm_position: NormPosition::Pre,
            positions: Positions::Relative { num_buckets: 32, max_distance: 128 },
            max_len: 512,
            scale_embeddings: false,
            attention_scale: Some(1.0),
            shared_embeddings: SharedEmbeddings::SourceTarget,
            tie_output: false,
            dropout: 0.1,
            attn_dropout: 0.0,
            ffn_dropout: 0.1,
            decoder_start_token_id: 0,
            eos_token_id: 1,
            pad_token_id: 0,
        }
    }

    /// The configuration of each layer; `cross` for the decoder's.
    pub fn layer(&self, cross: bool) -> TransformerLayerConfig {
        let c = self.d_model;
        TransformerLayerConfig {
            attention: MultiHeadAttentionConfig {
                head_dim: self.head_dim,
                bias: self.bias,
                scale: self.attention_scale,
                dropout: self.attn_dropout,
                ..MultiHeadAttentionConfig::new(c, self.n_heads)
            },
            feed_forward: FeedForwardConfig {
                d_model: c,
                d_ff: self.d_ff,
                activation: self.activation,
                gated: self.gated_ffn,
                bias: self.bias,
                dropout: self.ffn_dropout,
            },
            norm: self.norm,
            norm_position: self.norm_position,
            cross_attention: cross,
            dropout: self.dropout,
        }
    }
}

/// One stack (encoder or decoder): layers, its position bias, its final norm.
#[derive(Clone, Debug)]
struct Side {
    layers: Stack<TransformerLayer>,
    position_bias: Option<RelativePositionBias>,
    norm: Option<Norm>,
}

impl Side {
    fn new(cfg: &EncoderDecoderConfig, decoder: bool, vb: VarBuilder) -> Result<Self> {
        let n = if decoder { cfg.n_decoder_layers } else { cfg.n_encoder_layers };
        let layer_cfg = cfg.layer(decoder);
        let position_bias = match cfg.positions {
            Positions::Relative { num_buckets, max_distance } => {
                let rc = RelativePositionBiasConfig {
                    n_heads: cfg.n_heads,
                    num_buckets,
                    max_distance,
                    bidirectional: !decoder,
                };
                Some(RelativePositionBias::new(&rc, vb.pp("position_bias"))?)
            }
            Positions::Sinusoidal => None,
        };
        let norm = match cfg.norm_position {
            NormPosition::Pre => Some(Norm::new(cfg.d_model, cfg.norm, vb.pp("norm"))?),
            NormPosition::Post => None,
        };
        Ok(Self {
            layers: Stack::distinct(n, |vb| TransformerLayer::new(&layer_cfg, vb), vb.pp("layers"))?,
            position_bias,
            norm,
        })
    }

    /// The self-attention mask of this stack: `base` (causal or none) with the key padding of `keep (B, S)` (the
    /// shared [`padding_mask`]: right padding as key lengths) and T5's bias for queries at `offset..offset+t` over
    /// keys `0..s`.
    fn mask(&self, base: Mask, keep: Option<&Tensor>, t: usize, s: usize, offset: usize) -> Result<Mask> {
        let mask = match keep {
            Some(k) => padding_mask(EncoderDecoder::OP, base, Some(k), k.dim(0)?, s)?,
            None => base,
        };
        let Some(pb) = &self.position_bias else { return Ok(mask) };
        let mut bias = pb.forward(t, s, offset)?; // (1, H, T, S)
        if let Some(MaskTensor::Keep(p)) = mask.tensor() {
            // Padding that is not a key length (left padding) joins the bias as −∞, so one tensor carries both.
            let inf = Tensor::full(f32::NEG_INFINITY, p.shape(), p.device())?.to_dtype(bias.dtype())?;
            let add = p.where_cond(&inf.zeros_like()?, &inf)?; // (B, 1, 1, S)
            bias = bias.broadcast_add(&add)?; // (B, H, T, S)
        }
        Ok(mask.with_tensor(MaskTensor::Additive(bias)))
    }

    fn set_training(&self, training: bool) {
        (0..self.layers.depth()).for_each(|i| self.layers.layer(i).set_training(training));
    }
}

/// The decoder's state between steps: a self-attention cache per layer, the memory projected once per layer, and its
/// padding.
#[derive(Clone, Debug)]
pub struct DecoderState {
    caches: Vec<KvCache>,
    /// Per layer: `k, v (B, H, S, D)`.
    memory: Vec<(Tensor, Tensor)>,
    /// `(B, S)` u8, 1 = real source token.
    memory_keep: Tensor,
}

impl DecoderState {
    /// Target positions decoded so far.
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The model; see the module docs.
#[derive(Clone, Debug)]
pub struct EncoderDecoder {
    src_embed: Embedding,
    tgt_embed: Option<Embedding>,
    encoder: Side,
    decoder: Side,
    lm_head: Option<Linear>,
    sinusoids: Option<SinusoidalEncoding>,
    config: EncoderDecoderConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

impl EncoderDecoder {
    const OP: &'static str = "EncoderDecoder";

    pub fn new(config: &EncoderDecoderConfig, vb: VarBuilder) -> Result<Self> {
        let c = config.d_model;
        ensure!(config.n_encoder_layers > 0 && config.n_decoder_layers > 0, Self::OP, "both stacks need layers");
        ensure!(config.max_len > 0, Self::OP, "max_len must be positive");
        let shared_tables = matches!(config.shared_embeddings, SharedEmbeddings::SourceTarget | SharedEmbeddings::All);
        ensure!(
            !shared_tables || config.src_vocab == config.tgt_vocab,
            Self::OP,
            "{:?} shares one table, but src_vocab = {} and tgt_vocab = {} differ",
            config.shared_embeddings,
            config.src_vocab,
            config.tgt_vocab
        );
        let init = Init::Randn { mean: 0.0, stdev: (c as f64).powf(-0.5) };
        let table = |v: usize, vb: VarBuilder| -> Result<Embedding> {
            Ok(Embedding::new(vb.get_with_hints((v, c), "weight", init)?, c))
        };
        let src_embed = table(config.src_vocab, vb.pp("src_embed"))?;
        let tgt_embed = if shared_tables { None } else { Some(table(config.tgt_vocab, vb.pp("tgt_embed"))?) };
        let tied = match config.shared_embeddings {
            SharedEmbeddings::None => false,
            SharedEmbeddings::TargetOutput | SharedEmbeddings::All => true,
            SharedEmbeddings::SourceTarget => config.tie_output,
        };
        let lm_head = if tied { None } else { Some(Linear::new(c, config.tgt_vocab, false, vb.pp("lm_head"))?) };
        let sinusoids = match config.positions {
            Positions::Sinusoidal => Some(SinusoidalEncoding::new(c)?),
            Positions::Relative { .. } => None,
        };
        let mut model = Self {
            src_embed,
            tgt_embed,
            encoder: Side::new(config, false, vb.pp("encoder"))?,
            decoder: Side::new(config, true, vb.pp("decoder"))?,
            lm_head,
            sinusoids,
            config: config.clone(),
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
        };
        model.set_dropout_rng(DropoutRng::process_default());
        Ok(model)
    }

    pub fn config(&self) -> &EncoderDecoderConfig {
        &self.config
    }

    /// Training mode (dropout on) everywhere.
    pub fn set_training(&self, training: bool) {
        self.training.set(training);
        self.encoder.set_training(training);
        self.decoder.set_training(training);
    }

    /// Draws every dropout stream of the model from `rng` (seeded training).
    pub fn set_dropout_rng(&mut self, rng: &DropoutRng) {
        self.dropout = rng.stream();
        self.encoder.layers.for_each_layer_mut(|l| l.set_dropout_rng(rng));
        self.decoder.layers.for_each_layer_mut(|l| l.set_dropout_rng(rng));
    }

    fn drop(&self, x: Tensor) -> Result<Tensor> {
        ops::dropout_while_training(x, self.config.dropout, &self.training, &self.dropout)
    }

    /// Embedding lookup, scaling and positions for tokens at `offset..`.
    fn embed(&self, table: &Embedding, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let mut x = table.forward(ids)?; // (B, T, C)
        if self.config.scale_embeddings {
            x = (x * (self.config.d_model as f64).sqrt())?;
        }
        if let Some(s) = &self.sinusoids {
            x = s.forward(&x, offset)?;
        }
        self.drop(x)
    }

    fn tgt_table(&self) -> &Embedding {
        self.tgt_embed.as_ref().unwrap_or(&self.src_embed)
    }

    fn check(&self, name: &str, ids: &Tensor, vocab: usize, offset: usize) -> Result<(usize, usize)> {
        let (b, t) = check_ids(Self::OP, ids, vocab)?;
        ensure!(
            offset + t <= self.config.max_len,
            Self::OP,
            "{name} {}: {offset} + {t} positions exceed max_len = {}",
            shape_str(ids),
            self.config.max_len
        );
        Ok((b, t))
    }

    /// The encoder's output (after its final norm) and, when asked, each layer's weights.
    ///
    /// # Shapes
    /// `src (B, S)`, `src_mask (B, S)` (1 = real token) → `(B, S, C)`.
    pub fn encode_with_weights(
        &self,
        src: &Tensor,
        src_mask: Option<&Tensor>,
        need_weights: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (_, s) = self.check("src", src, self.config.src_vocab, 0)?;
        let mut x = self.embed(&self.src_embed, src, 0)?;
        let mask = self.encoder.mask(Mask::none(), src_mask, s, s, 0)?;
        let ctx = LayerContext { mask: &mask, memory: None, opts: MhaOptions { need_weights, ..Default::default() } };
        let mut weights = Vec::new();
        for i in 0..self.encoder.layers.depth() {
            let o = self.encoder.layers.layer(i).forward(&x, &ctx, None)?;
            x = o.out;
            weights.extend(o.self_weights);
        }
        let x = match &self.encoder.norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        Ok((self.drop(x)?, weights))
    }

    /// `src (B, S)` → memory `(B, S, C)`.
    pub fn encode(&self, src: &Tensor, src_mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.encode_with_weights(src, src_mask, false)?.0)
    }

    /// The decoder's final states `(B, T, C)` for `tgt (B, T)` over `memory (B, S, C)`.
    pub fn decode(&self, tgt: &Tensor, memory: &Tensor, src_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = self.check("tgt", tgt, self.config.tgt_vocab, 0)?;
        let s = memory.dim(1)?;
        let keep = self.memory_keep(src_mask, b, s, memory)?;
        let mut x = self.embed(self.tgt_table(), tgt, 0)?;
        let self_mask = self.decoder.mask(Mask::causal(), None, t, t, 0)?;
        let cross_mask = padding_mask(Self::OP, Mask::none(), Some(&keep), b, s)?;
        let ctx = LayerContext {
            mask: &self_mask,
            memory: Some((Memory::Raw(memory), &cross_mask)),
            opts: MhaOptions::default(),
        };
        for i in 0..self.decoder.layers.depth() {
            x = self.decoder.layers.layer(i).forward(&x, &ctx, None)?.out;
        }
        self.decoder_output(x)
    }

    fn memory_keep(&self, src_mask: Option<&Tensor>, b: usize, s: usize, memory: &Tensor) -> Result<Tensor> {
        match src_mask {
            Some(m) => {
                ensure!(m.dims() == [b, s], Self::OP, "src_mask {} must be (B, S) = ({b}, {s})", shape_str(m));
                Ok(m.ne(0u32)?)
            }
            None => Ok(Tensor::ones((b, s), DType::U8, memory.device())?),
        }
    }

    fn decoder_output(&self, x: Tensor) -> Result<Tensor> {
        let x = match &self.decoder.norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        self.drop(x)
    }

    /// Decoder states `(…, C)` → logits `(…, V_tgt)`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                // T5 v1.0 rescales before its tied head; the paper's tied output does not.
                let h = if self.config.shared_embeddings == SharedEmbeddings::SourceTarget {
                    (h * (self.config.d_model as f64).powf(-0.5))?
                } else {
                    h.clone()
                };
                Ok(h.broadcast_matmul(&self.tgt_table().embeddings().t()?)?)
            }
        }
    }

    /// Teacher-forced logits `(B, T, V_tgt)` of `tgt (B, T)` (which starts with `decoder_start_token_id`). Target
    /// padding needs no mask: with right padding, the causal mask already keeps it from every real position.
    pub fn forward(&self, src: &Tensor, src_mask: Option<&Tensor>, tgt: &Tensor) -> Result<Tensor> {
        let memory = self.encode(src, src_mask)?;
        self.logits(&self.decode(tgt, &memory, src_mask)?)
    }

    /// `labels (B, T)` shifted right behind `decoder_start_token_id`, ignored labels (−100) read as padding: the
    /// teacher-forcing input of a target (Hugging Face's `_shift_right`).
    pub fn shift_right(&self, labels: &Tensor) -> Result<Tensor> {
        let rows = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let (start, pad) = (self.config.decoder_start_token_id, self.config.pad_token_id);
        let shifted: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                std::iter::once(start)
                    .chain(r[..r.len().saturating_sub(1)].iter().map(|&x| if x < 0 { pad } else { x as u32 }))
                    .collect()
            })
            .collect();
        Ok(Tensor::new(shifted, labels.device())?)
    }

    /// Mean cross-entropy of `labels (B, T)` (−100 ignored) with teacher forcing, and optional label smoothing.
    pub fn loss(
        &self,
        src: &Tensor,
        src_mask: Option<&Tensor>,
        labels: &Tensor,
        label_smoothing: f64,
    ) -> Result<Tensor> {
        let tgt = self.shift_right(labels)?;
        let logits = self.forward(src, src_mask, &tgt)?; // (B, T, V)
        let (b, t, v) = logits.dims3()?;
        let cfg = CrossEntropyConfig { ignore_index: -100, label_smoothing, ..Default::default() };
        let flat = labels.to_dtype(DType::I64)?.flatten_all()?;
        ops::cross_entropy(&logits.reshape((b * t, v))?, &flat, &cfg, Reduction::Mean)
    }

    /// The decoder's starting state for `memory (B, S, C)`: empty caches, the memory projected once per layer.
    pub fn start_decoding(&self, memory: &Tensor, src_mask: Option<&Tensor>) -> Result<DecoderState> {
        let (b, s, _) = memory.dims3()?;
        let keep = self.memory_keep(src_mask, b, s, memory)?;
        let projected = (0..self.decoder.layers.depth())
            .map(|i| {
                let attn = self.decoder.layers.layer(i).cross_attn().expect("decoder layers have cross-attention");
                attn.project_kv(memory, memory)
            })
            .collect::<Result<Vec<_>>>()?;
        let caches = (0..self.decoder.layers.depth()).map(|_| KvCache::new(Some(self.config.max_len))).collect();
        Ok(DecoderState { caches, memory: projected, memory_keep: keep })
    }

    /// Logits `(B, V_tgt)` of the next token after `tokens (B)`, advancing `state` by one position.
    pub fn decode_step(&self, tokens: &Tensor, state: &mut DecoderState) -> Result<Tensor> {
        let offset = state.len();
        let ids = tokens.reshape((tokens.dim(0)?, 1))?; // (B, 1)
        let (b, _) = self.check("tokens", &ids, self.config.tgt_vocab, offset)?;
        let s = state.memory_keep.dim(1)?;
        let mut x = self.embed(self.tgt_table(), &ids, offset)?; // (B, 1, C)
        let self_mask = self.decoder.mask(Mask::causal(), None, 1, offset + 1, offset)?;
        let cross_mask = padding_mask(Self::OP, Mask::none(), Some(&state.memory_keep), b, s)?;
        for i in 0..self.decoder.layers.depth() {
            let (k, v) = &state.memory[i];
            let ctx = LayerContext {
                mask: &self_mask,
                memory: Some((Memory::Projected(k, v), &cross_mask)),
                opts: MhaOptions::default(),
            };
            x = self.decoder.layers.layer(i).forward(&x, &ctx, Some(&mut state.caches[i]))?.out;
        }
        let h = self.decoder_output(x)?;
        self.logits(&h.squeeze(1)?)
    }

    /// This model over one encoded source as a [`StepDecoder`] (greedy and beam search in [`crate::decode`]).
    pub fn decoder(&self) -> StepModel<'_> {
        StepModel(self)
    }
}

/// [`EncoderDecoder`] as a [`StepDecoder`]: log-probabilities of the next token.
pub struct StepModel<'a>(pub &'a EncoderDecoder);

impl StepDecoder for StepModel<'_> {
    type State = DecoderState;

    fn step(&self, tokens: &[u32], state: &DecoderState) -> Result<(Tensor, DecoderState)> {
        let mut next = state.clone();
        let t = Tensor::from_slice(tokens, tokens.len(), next.memory_keep.device())?;
        let logits = self.0.decode_step(&t, &mut next)?;
        Ok((ops::log_softmax(&logits)?, next))
    }

    fn select(&self, s: &DecoderState, indices: &[usize]) -> Result<DecoderState> {
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, indices.len(), s.memory_keep.device())?;
        Ok(DecoderState {
            caches: s.caches.iter().map(|c| c.select(&idx)).collect::<Result<_>>()?,
            memory: s
                .memory
                .iter()
                .map(|(k, v)| Ok((k.contiguous()?.index_select(&idx, 0)?, v.contiguous()?.index_select(&idx, 0)?)))
                .collect::<Result<_>>()?,
            memory_keep: s.memory_keep.index_select(&idx, 0)?,
        })
    }
}
