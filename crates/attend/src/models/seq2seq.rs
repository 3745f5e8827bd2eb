//! Recurrent encoder–decoders, with and without attention: the course's translation models.
//!
//! | [`Seq2SeqAttention`] | decoder step `t` | paper |
//! |---|---|---|
//! | `None` | `s_t = RNN(emb(y_{t−1}), s_{t−1})`, `s_0` = the encoder's final state (the one-vector bottleneck) | Sutskever et al. 2014; Cho et al. 2014 |
//! | `Bahdanau` | `c_t = attend(s_{t−1})`, `s_t = RNN([emb; c_t], s_{t−1})`, `o_t = tanh(W_out [c_t; s_t] + b)` | Bahdanau et al. 2015 |
//! | `Luong(kind)` | `h_t = RNN([emb; h̃_{t−1}], h_{t−1})` (input feeding), `h̃_t = tanh(W_c [attend(h_t); h_t])` | Luong et al. 2015 §3.1, §3.3 |
//! | `LocalM`, `LocalP` | as Luong, with local attention around `p_t = t` or a predicted `p_t` | Luong et al. 2015 §3.2 |
//!
//! Logits are `W_gen o_t`. Coverage (Tu et al. 2016) adds the running sum of earlier weights to the additive score
//! (Bahdanau, Luong concat) and reports the coverage loss `Σ_t Σ_s min(α_ts, cov_ts)` (See et al. 2017).
//! Training runs with teacher forcing, or free-running for a share of the steps; decoding is greedy or beam search
//! ([`crate::decode`]).
//!
//! A bidirectional encoder has `H/2` units per direction, so its outputs (the memory) and its final states
//! (concatenated per layer) have the decoder's width `H`.
//!
//! Parameter names: `src_embedding.weight`, `tgt_embedding.weight`, `encoder.*` and `decoder.*` (PyTorch's RNN
//! names), `attention.*` (OpenNMT-py's), `generator.{weight,bias}`.
//!
//! # Shapes
//! - `src`: `(B, S)` token ids, `src_lengths`: `B` counts; `tgt_in`: `(B, T)`, starting with `bos`
//! - logits `(B, T, V)`, alignments `(B, T, S)`
//!
//! ```
//! use attend::models::seq2seq::{RnnKind, Seq2Seq, Seq2SeqAttention, Seq2SeqConfig};
//! use attend::layers::global::GlobalType;
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = Seq2SeqConfig::new(11, 13, 8, Seq2SeqAttention::Luong(GlobalType::General));
//! let model = Seq2Seq::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let src = Tensor::new(&[[4u32, 5, 6, 2], [7, 8, 2, 0]], &dev)?; // (B, S), right-padded
//! let tgt_in = Tensor::new(&[[1u32, 9, 10], [1, 11, 12]], &dev)?; // (B, T), bos = 1
//! let out = model.forward(&src, Some(&[4, 3]), &tgt_in, 1.0)?;
//! assert_eq!(out.logits.dims(), &[2, 3, 13]);
//! assert_eq!(out.align.unwrap().dims(), &[2, 3, 4]);
//! let decoded = model.greedy(&src, Some(&[4, 3]), 1, 2, 5)?; // bos 1, eos 2, at most 5 tokens
//! assert!(decoded.iter().all(|d| !d.is_empty() && d.len() <= 5));
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};
use candle_nn::{embedding, linear, Embedding, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::decode::{self, BeamConfig, Hypothesis, StepDecoder};
use crate::error::shape_str;
use crate::layers::global::{GlobalAttention, GlobalAttentionConfig, GlobalType, PreparedMemory};
use crate::layers::local::{LocalAttention, LocalAttentionConfig, LocalMode};
use crate::rng::{DropoutStream, TrainingFlag};
use crate::rnn::{Gru, Lstm, RnnConfig};
use crate::{bail, ensure, ops, Result};

/// The recurrent cell of encoder and decoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RnnKind {
    #[default]
    Lstm,
    Gru,
}

/// How (and whether) the decoder attends to the encoder; see the module table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seq2SeqAttention {
    None,
    Bahdanau,
    Luong(GlobalType),
    LocalM,
    LocalP,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Seq2SeqConfig {
    pub src_vocab: usize,
    pub tgt_vocab: usize,
    /// Embedding width, e.g. 256.
    pub embed_dim: usize,
    /// Decoder width `H` (and memory width), e.g. 512.
    pub hidden_size: usize,
    pub num_layers: usize,
    pub bidirectional_encoder: bool,
    pub rnn: RnnKind,
    pub attention: Seq2SeqAttention,
    /// Half-width `D` of local attention's window.
    pub window: usize,
    /// Coverage on the additive scores (Bahdanau, Luong concat).
    pub coverage: bool,
    /// Dropout on embeddings, between RNN layers and on the decoder output, while training.
    pub dropout: f64,
}

impl Seq2SeqConfig {
    /// One LSTM layer, a bidirectional encoder, embeddings as wide as the hidden state, window 2, no coverage.
    pub fn new(src_vocab: usize, tgt_vocab: usize, hidden_size: usize, attention: Seq2SeqAttention) -> Self {
        Self {
            src_vocab,
            tgt_vocab,
            embed_dim: hidden_size,
            hidden_size,
            num_layers: 1,
            bidirectional_encoder: true,
            rnn: RnnKind::Lstm,
            attention,
            window: 2,
            coverage: false,
            dropout: 0.0,
        }
    }
}

#[derive(Clone, Debug)]
enum Rnn {
    Lstm(Lstm),
    Gru(Gru),
}

impl Rnn {
    fn new(kind: RnnKind, cfg: RnnConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            RnnKind::Lstm => Rnn::Lstm(Lstm::new(cfg, vb)?),
            RnnKind::Gru => Rnn::Gru(Gru::new(cfg, vb)?),
        })
    }

    /// `(output, h_n, c_n)`.
    fn run(
        &self,
        x: &Tensor,
        lengths: Option<&[usize]>,
        h0: Option<&Tensor>,
        c0: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let o = match self {
            Rnn::Lstm(l) => l.forward(x, lengths, h0, c0)?,
            Rnn::Gru(g) => g.forward(x, lengths, h0)?,
        };
        Ok((o.output, o.h_n, o.c_n))
    }

    fn set_training(&self, t: bool) {
        match self {
            Rnn::Lstm(l) => l.set_training(t),
            Rnn::Gru(g) => g.set_training(t),
        }
    }

    fn set_dropout_stream(&mut self, s: DropoutStream) {
        match self {
            Rnn::Lstm(l) => l.set_dropout_stream(s),
            Rnn::Gru(g) => g.set_dropout_stream(s),
        }
    }
}

#[derive(Clone, Debug)]
enum Attn {
    None,
    Global(GlobalAttention),
    Local(LocalAttention),
}

/// The encoder's output as the decoder reads it.
#[derive(Clone, Debug)]
enum Memory {
    None,
    Global(PreparedMemory),
    Local { memory: Tensor, lengths: Option<Vec<usize>> },
}

/// The decoder's state between steps, batched over sequences (or beam hypotheses).
#[derive(Clone, Debug)]
pub struct DecoderState {
    /// `(L, B, H)`
    h: Tensor,
    c: Option<Tensor>,
    /// `(B, H)`: the previous attentional state `h̃_{t−1}` (Luong input feeding).
    feed: Option<Tensor>,
    /// `(B, S)`: the sum of earlier weights.
    coverage: Option<Tensor>,
    memory: Memory,
    /// The next step's index `t` (local-m aligns with it).
    step: usize,
}

/// One decoder step's results.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// `(B, V)`
    pub logits: Tensor,
    /// `(B, S)` when the model attends.
    pub align: Option<Tensor>,
    /// `(B)`: `Σ_s min(α_s, cov_s)` with coverage.
    pub coverage_loss: Option<Tensor>,
}

/// What [`Seq2Seq::forward`] returns.
#[derive(Clone, Debug)]
pub struct Seq2SeqOutput {
    /// `(B, T, V)`
    pub logits: Tensor,
    /// `(B, T, S)` when the model attends.
    pub align: Option<Tensor>,
    /// `(B)`: the coverage loss summed over steps, with coverage.
    pub coverage_loss: Option<Tensor>,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Seq2Seq {
    src_embedding: Embedding,
    tgt_embedding: Embedding,
    encoder: Rnn,
    decoder: Rnn,
    attention: Attn,
    generator: Linear,
    config: Seq2SeqConfig,
    training: TrainingFlag,
    dropout: DropoutStream,
}

impl Seq2Seq {
    const OP: &'static str = "seq2seq";

    pub fn new(config: Seq2SeqConfig, vb: VarBuilder) -> Result<Self> {
        let Seq2SeqConfig { src_vocab, tgt_vocab, embed_dim: e, hidden_size: h, num_layers: l, .. } = config;
        ensure!(
            src_vocab > 0 && tgt_vocab > 0 && e > 0 && h > 0 && l > 0,
            Self::OP,
            "sizes must be positive, got {config:?}"
        );
        ensure!(
            !config.bidirectional_encoder || h % 2 == 0,
            Self::OP,
            "a bidirectional encoder needs an even hidden_size (H/2 per direction), got {h}"
        );
        let dirs = 1 + config.bidirectional_encoder as usize;
        let enc_cfg = RnnConfig {
            num_layers: l,
            bidirectional: config.bidirectional_encoder,
            dropout: config.dropout,
            ..RnnConfig::new(e, h / dirs)
        };
        let (attention, extra) = match config.attention {
            Seq2SeqAttention::None => (Attn::None, 0),
            Seq2SeqAttention::Bahdanau | Seq2SeqAttention::Luong(_) => {
                let kind = match config.attention {
                    Seq2SeqAttention::Luong(k) => k,
                    _ => GlobalType::Mlp,
                };
                let cfg = GlobalAttentionConfig::new(h, kind);
                let a = if config.coverage {
                    GlobalAttention::with_coverage(cfg, vb.pp("attention"))?
                } else {
                    GlobalAttention::new(cfg, vb.pp("attention"))?
                };
                (Attn::Global(a), h)
            }
            Seq2SeqAttention::LocalM | Seq2SeqAttention::LocalP => {
                ensure!(
                    !config.coverage,
                    Self::OP,
                    "coverage applies to the additive global scores (Bahdanau, Luong concat)"
                );
                let mode = if config.attention == Seq2SeqAttention::LocalM {
                    LocalMode::Monotonic
                } else {
                    LocalMode::Predictive
                };
                let cfg = LocalAttentionConfig { dim: h, window: config.window, mode };
                (Attn::Local(LocalAttention::new(cfg, vb.pp("attention"))?), h)
            }
        };
        let dec_cfg = RnnConfig { num_layers: l, dropout: config.dropout, ..RnnConfig::new(e + extra, h) };
        Ok(Self {
            src_embedding: embedding(src_vocab, e, vb.pp("src_embedding"))?,
            tgt_embedding: embedding(tgt_vocab, e, vb.pp("tgt_embedding"))?,
            encoder: Rnn::new(config.rnn, enc_cfg, vb.pp("encoder"))?,
            decoder: Rnn::new(config.rnn, dec_cfg, vb.pp("decoder"))?,
            attention,
            generator: linear(h, tgt_vocab, vb.pp("generator"))?,
            config,
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
        })
    }

    pub fn config(&self) -> &Seq2SeqConfig {
        &self.config
    }

    /// Training mode turns on dropout (embeddings, between layers, decoder output).
    pub fn set_training(&self, training: bool) {
        self.training.set(training);
        self.encoder.set_training(training);
        self.decoder.set_training(training);
    }

    /// The model's dropout streams (one per place that drops), from one [`crate::rng::DropoutRng`].
    pub fn set_dropout_rng(&mut self, rng: &crate::rng::DropoutRng) {
        self.dropout = rng.stream();
        self.encoder.set_dropout_stream(rng.stream());
        self.decoder.set_dropout_stream(rng.stream());
    }

    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.config.dropout;
        if p > 0.0 && self.training.get() {
            ops::dropout(x, p, self.dropout.next_seed(), 0)
        } else {
            Ok(x.clone())
        }
    }

    fn check_ids(&self, ids: &Tensor, name: &str, vocab: usize) -> Result<()> {
        ensure!(
            ids.rank() == 2 && !ids.dtype().is_float(),
            Self::OP,
            "expected {name} (B, len) token ids, got {} {:?}",
            shape_str(ids),
            ids.dtype()
        );
        let flat = ids.to_dtype(DType::I64)?.flatten_all()?;
        let (max, min) = (flat.max(0)?.to_scalar::<i64>()?, flat.min(0)?.to_scalar::<i64>()?);
        ensure!(
            min >= 0 && (max as usize) < vocab,
            Self::OP,
            "{name} holds ids in {min}..={max}, outside the vocabulary of {vocab}"
        );
        Ok(())
    }

    /// Runs the encoder and returns the decoder's initial state.
    pub fn encode(&self, src: &Tensor, src_lengths: Option<&[usize]>) -> Result<DecoderState> {
        self.check_ids(src, "src", self.config.src_vocab)?;
        let (b, _) = src.dims2()?;
        let x = self.drop(&self.src_embedding.forward(&src.to_dtype(DType::U32)?)?)?; // (B, S, E)
        let (memory, h_n, c_n) = self.encoder.run(&x, src_lengths, None, None)?; // (B, S, H)
        let l = self.config.num_layers;
        let h = self.config.hidden_size;
        // Bidirectional: (L·2, B, H/2) → (L, B, H), the two directions of a layer side by side.
        let bridge = |s: Tensor| -> Result<Tensor> {
            Ok(if self.config.bidirectional_encoder {
                s.reshape((l, 2, b, h / 2))?.permute((0, 2, 1, 3))?.reshape((l, b, h))?
            } else {
                s
            })
        };
        let memory = match &self.attention {
            Attn::None => Memory::None,
            Attn::Global(a) => Memory::Global(a.prepare(&memory, src_lengths)?),
            Attn::Local(_) => Memory::Local { memory, lengths: src_lengths.map(<[usize]>::to_vec) },
        };
        let luong = matches!(
            self.config.attention,
            Seq2SeqAttention::Luong(_) | Seq2SeqAttention::LocalM | Seq2SeqAttention::LocalP
        );
        let dtype = x.dtype();
        let s = src.dim(1)?;
        Ok(DecoderState {
            h: bridge(h_n)?,
            c: c_n.map(bridge).transpose()?,
            feed: if luong { Some(Tensor::zeros((b, h), dtype, src.device())?) } else { None },
            coverage: if self.config.coverage { Some(Tensor::zeros((b, s), dtype, src.device())?) } else { None },
            memory,
            step: 0,
        })
    }

    /// One decoder step for the tokens `y_{t−1}` `(B)`.
    pub fn decode_step(&self, tokens: &Tensor, state: &DecoderState) -> Result<(StepOutput, DecoderState)> {
        let emb = self.drop(&self.tgt_embedding.forward(&tokens.to_dtype(DType::U32)?)?)?; // (B, E)
        let mut next = state.clone();
        next.step += 1;
        let run_rnn = |input: &Tensor, next: &mut DecoderState| -> Result<Tensor> {
            let (out, h, c) = self.decoder.run(&input.unsqueeze(1)?, None, Some(&state.h), state.c.as_ref())?;
            next.h = h;
            next.c = c;
            Ok(out.squeeze(1)?) // (B, H)
        };
        let (out, align) = match (&self.attention, &state.memory) {
            (Attn::None, _) => (run_rnn(&emb, &mut next)?, None),
            (Attn::Global(a), Memory::Global(mem)) if self.config.attention == Seq2SeqAttention::Bahdanau => {
                // The previous state asks where to look; the context goes into the RNN.
                let query = state.h.get(self.config.num_layers - 1)?.unsqueeze(1)?; // (B, 1, H)
                let att = a.step(&query, mem, state.coverage.as_ref())?;
                let ctx = att.context.squeeze(1)?; // (B, H)
                let s_t = run_rnn(&Tensor::cat(&[&emb, &ctx], 1)?, &mut next)?;
                (
                    ops::tanh(&a.combine(&ctx.unsqueeze(1)?, &s_t.unsqueeze(1)?)?.squeeze(1)?)?,
                    Some(att.align.squeeze(1)?),
                )
            }
            (Attn::Global(a), Memory::Global(mem)) => {
                let feed = state.feed.as_ref().expect("Luong decoders feed h̃");
                let h_t = run_rnn(&Tensor::cat(&[&emb, feed], 1)?, &mut next)?;
                let att = a.step(&h_t.unsqueeze(1)?, mem, state.coverage.as_ref())?;
                let attn_h = att.attn_h.squeeze(1)?; // (B, H)
                next.feed = Some(attn_h.clone());
                (attn_h, Some(att.align.squeeze(1)?))
            }
            (Attn::Local(a), Memory::Local { memory, lengths }) => {
                let feed = state.feed.as_ref().expect("Luong decoders feed h̃");
                let h_t = run_rnn(&Tensor::cat(&[&emb, feed], 1)?, &mut next)?;
                let att = a.forward(&h_t.unsqueeze(1)?, memory, lengths.as_deref(), state.step)?;
                let attn_h = att.attn_h.squeeze(1)?;
                next.feed = Some(attn_h.clone());
                (attn_h, Some(att.align.squeeze(1)?))
            }
            _ => bail!(Self::OP, "the decoder state does not belong to this model's attention"),
        };
        let mut coverage_loss = None;
        if let (Some(cov), Some(a)) = (&state.coverage, &align) {
            coverage_loss = Some(a.minimum(cov)?.sum(1)?); // (B)
            next.coverage = Some((cov + a)?);
        }
        let logits = self.generator.forward(&self.drop(&out)?)?; // (B, V)
        Ok((StepOutput { logits, align, coverage_loss }, next))
    }

    /// Decodes `tgt_in` `(B, T)` after encoding `src`. Each step reads the reference token `tgt_in[:, t]` with
    /// probability `teacher_forcing` (1: teacher forcing throughout) and otherwise the model's own previous
    /// prediction (free running), the choice drawn per step from the model's dropout stream (reproducible).
    pub fn forward(
        &self,
        src: &Tensor,
        src_lengths: Option<&[usize]>,
        tgt_in: &Tensor,
        teacher_forcing: f64,
    ) -> Result<Seq2SeqOutput> {
        self.check_ids(tgt_in, "tgt_in", self.config.tgt_vocab)?;
        ensure!(
            (0.0..=1.0).contains(&teacher_forcing),
            Self::OP,
            "teacher_forcing must be in [0, 1], got {teacher_forcing}"
        );
        let (b, t) = tgt_in.dims2()?;
        ensure!(
            src.dim(0)? == b,
            Self::OP,
            "src {} and tgt_in {} have different batch sizes",
            shape_str(src),
            shape_str(tgt_in)
        );
        let mut state = self.encode(src, src_lengths)?;
        let tgt = tgt_in.to_dtype(DType::U32)?;
        let (mut logits, mut aligns, mut cov) = (Vec::with_capacity(t), Vec::with_capacity(t), None::<Tensor>);
        let seed = self.dropout.next_seed();
        let mut prev: Option<Tensor> = None;
        for step in 0..t {
            let reference = tgt.narrow(1, step, 1)?.squeeze(1)?; // (B)
            let tokens = match &prev {
                Some(pred) if teacher_forcing < 1.0 => {
                    let u = attend_kernels::dropout::random_bits(seed, step as u64) as f64 / 4_294_967_296.0;
                    if u < teacher_forcing {
                        reference
                    } else {
                        pred.clone()
                    }
                }
                _ => reference,
            };
            let (out, next) = self.decode_step(&tokens, &state)?;
            prev = Some(out.logits.argmax(1)?.to_dtype(DType::U32)?.detach());
            logits.push(out.logits);
            aligns.extend(out.align);
            if let Some(c) = out.coverage_loss {
                cov = Some(match cov {
                    None => c,
                    Some(acc) => (acc + c)?,
                });
            }
            state = next;
        }
        Ok(Seq2SeqOutput {
            logits: Tensor::stack(&logits, 1)?, // (B, T, V)
            align: if aligns.is_empty() { None } else { Some(Tensor::stack(&aligns, 1)?) }, // (B, T, S)
            coverage_loss: cov,
        })
    }

    /// Greedy decoding of a batch of sources.
    pub fn greedy(
        &self,
        src: &Tensor,
        src_lengths: Option<&[usize]>,
        bos: u32,
        eos: u32,
        max_len: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let init = self.encode(src, src_lengths)?;
        decode::greedy(&Decoder(self), init, src.dim(0)?, bos, eos, max_len)
    }

    /// Beam search for one source `(1, S)`.
    pub fn beam_search(&self, src: &Tensor, cfg: &BeamConfig) -> Result<Vec<Hypothesis>> {
        ensure!(
            src.dims().first() == Some(&1),
            Self::OP,
            "beam search decodes one source (1, S), got {}",
            shape_str(src)
        );
        decode::beam_search(&Decoder(self), self.encode(src, None)?, cfg)
    }
}

/// [`Seq2Seq`] as a [`StepDecoder`] (log-probabilities of the next token).
pub struct Decoder<'a>(pub &'a Seq2Seq);

impl StepDecoder for Decoder<'_> {
    type State = DecoderState;

    fn step(&self, tokens: &[u32], state: &DecoderState) -> Result<(Tensor, DecoderState)> {
        let t = Tensor::from_slice(tokens, tokens.len(), state.h.device())?;
        let (out, next) = self.0.decode_step(&t, state)?;
        Ok((ops::log_softmax(&out.logits)?, next))
    }

    fn select(&self, s: &DecoderState, indices: &[usize]) -> Result<DecoderState> {
        let idx = Tensor::from_vec(indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), indices.len(), s.h.device())?;
        // index_select reads contiguous tensors only (the bridged states are permuted views).
        let rows = |t: &Tensor| t.contiguous()?.index_select(&idx, 0);
        let cols = |t: &Tensor| t.contiguous()?.index_select(&idx, 1);
        Ok(DecoderState {
            h: cols(&s.h)?,
            c: s.c.as_ref().map(cols).transpose()?,
            feed: s.feed.as_ref().map(rows).transpose()?,
            coverage: s.coverage.as_ref().map(rows).transpose()?,
            memory: match &s.memory {
                Memory::None => Memory::None,
                Memory::Global(m) => Memory::Global(m.select(&idx, indices)?),
                Memory::Local { memory, lengths } => Memory::Local {
                    memory: rows(memory)?,
                    lengths: lengths.as_ref().map(|l| indices.iter().map(|&i| l[i]).collect()),
                },
            },
            step: s.step,
        })
    }
}
