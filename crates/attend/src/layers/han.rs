//! Attention pooling with a learned context vector (Hierarchical Attention Networks, Yang et al. 2016), and the
//! two-level HAN encoder built from it.
//!
//! [`AttentionPooling`]: `u_t = tanh(x_t W + b)`, `α = softmax_t(u_tᵀ u_w)`, `pooled = Σ_t α_t x_t`, with the
//! course's parameter names `W_omega (C, A)`, `b_omega (A)`, `u_omega (A)`. The score is
//! [`HanContextScore`](crate::attention::score::HanContextScore); the softmax and the sum are the classic path.
//!
//! [`HierarchicalEncoder`]: words → bidirectional GRU → word pooling per sentence → sentence vectors → bidirectional
//! GRU → sentence pooling → document vector, returning the weights at both levels.
//!
//! # Shapes
//! - pooling: `x (B, T, C)` → `pooled (B, C)`, `alphas (B, T)`
//! - encoder: `words (B, Ns, Nw, C)` → `document (B, 2Hs)`, `word_alphas (B, Ns, Nw)`, `sentence_alphas (B, Ns)`
//!
//! ```
//! use attend::layers::han::{AttentionPooling, HierarchicalEncoder, HanConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
//! let pool = AttentionPooling::new(6, 4, vb.pp("pool"))?;
//! let out = pool.forward(&Tensor::randn(0f32, 1., (2, 5, 6), &dev)?, Some(&[5, 3]))?;
//! assert_eq!((out.pooled.dims(), out.alphas.dims()), (&[2, 6][..], &[2, 5][..]));
//!
//! let cfg = HanConfig { input_size: 6, word_hidden: 4, sentence_hidden: 3, word_attn: 5, sentence_attn: 5 };
//! let han = HierarchicalEncoder::new(cfg, vb.pp("han"))?;
//! let words = Tensor::randn(0f32, 1., (2, 3, 7, 6), &dev)?; // (B, Ns, Nw, C)
//! let doc = han.forward(&words, Some(&[vec![7, 2, 4], vec![5, 0, 0]]))?; // word counts; 0 = no sentence
//! assert_eq!(doc.document.dims(), &[2, 6]);
//! assert_eq!(doc.sentence_alphas.get(1)?.to_vec1::<f32>()?[1..], [0.0, 0.0]);
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::attention::classic::{attend_scores, Normalizer};
use crate::attention::score::{HanContextScore, HanContextScoreConfig};
use crate::attention::Mask;
use crate::error::shape_str;
use crate::rnn::{Gru, RnnConfig};
use crate::{ensure, Result};

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct AttentionPooling {
    score: HanContextScore,
}

/// What [`AttentionPooling::forward`] returns.
#[derive(Clone, Debug)]
pub struct PoolingOutput {
    /// `(B, C)`
    pub pooled: Tensor,
    /// `(B, T)`, zero at padding.
    pub alphas: Tensor,
}

impl AttentionPooling {
    /// Loads or creates `W_omega (C, A)`, `b_omega (A)`, `u_omega (A)` under `vb`.
    pub fn new(input_dim: usize, attn_dim: usize, vb: VarBuilder) -> Result<Self> {
        ensure!(
            input_dim > 0 && attn_dim > 0,
            "attention pooling",
            "widths must be positive, got C = {input_dim}, A = {attn_dim}"
        );
        let bound = 1.0 / (input_dim as f64).sqrt();
        let w = vb.get_with_hints((input_dim, attn_dim), "W_omega", Init::Uniform { lo: -bound, up: bound })?;
        let b = vb.get_with_hints(attn_dim, "b_omega", Init::Const(0.0))?;
        // Not zero: with u_w = 0 every score is equal and W gets no gradient at the first step.
        let u =
            vb.get_with_hints(attn_dim, "u_omega", Init::Randn { mean: 0.0, stdev: 1.0 / (attn_dim as f64).sqrt() })?;
        let cfg = HanContextScoreConfig { input_dim, attn_dim };
        // The course stores W as (C, A) and computes x W; the score's projection is a Linear with weight (A, C).
        Ok(Self { score: HanContextScore::from_parts(&cfg, Linear::new(w.t()?, Some(b)), u)? })
    }

    pub fn score(&self) -> &HanContextScore {
        &self.score
    }

    /// Pools `x`; `lengths` (one per sequence) hides padding.
    pub fn forward(&self, x: &Tensor, lengths: Option<&[usize]>) -> Result<PoolingOutput> {
        let scores = self.score.forward(x)?.unsqueeze(1)?; // (B, 1, T): one query, the context vector
        let mask = match lengths {
            Some(l) => Mask::none().with_key_lengths(l.to_vec()),
            None => Mask::none(),
        };
        let out = attend_scores(&scores, x, &mask, Normalizer::Softmax)?;
        Ok(PoolingOutput { pooled: out.context.squeeze(1)?, alphas: out.weights.squeeze(1)? })
    }
}

/// Sizes of a [`HierarchicalEncoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HanConfig {
    /// Word embedding width `C`.
    pub input_size: usize,
    /// Word GRU width per direction (HAN: 50).
    pub word_hidden: usize,
    /// Sentence GRU width per direction (HAN: 50).
    pub sentence_hidden: usize,
    /// Width of the word-level context vector (HAN: 100).
    pub word_attn: usize,
    pub sentence_attn: usize,
}

/// What [`HierarchicalEncoder::forward`] returns.
#[derive(Clone, Debug)]
pub struct HanOutput {
    /// `(B, 2·sentence_hidden)`
    pub document: Tensor,
    /// `(B, Ns, Nw)`
    pub word_alphas: Tensor,
    /// `(B, Ns)`
    pub sentence_alphas: Tensor,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct HierarchicalEncoder {
    word_rnn: Gru,
    word_pool: AttentionPooling,
    sentence_rnn: Gru,
    sentence_pool: AttentionPooling,
    config: HanConfig,
}

impl HierarchicalEncoder {
    /// Parameters under `word_rnn.`, `word_pool.`, `sentence_rnn.`, `sentence_pool.`.
    pub fn new(config: HanConfig, vb: VarBuilder) -> Result<Self> {
        let bi = |c, h| RnnConfig { bidirectional: true, ..RnnConfig::new(c, h) };
        let (wh, sh) = (config.word_hidden, config.sentence_hidden);
        Ok(Self {
            word_rnn: Gru::new(bi(config.input_size, wh), vb.pp("word_rnn"))?,
            word_pool: AttentionPooling::new(2 * wh, config.word_attn, vb.pp("word_pool"))?,
            sentence_rnn: Gru::new(bi(2 * wh, sh), vb.pp("sentence_rnn"))?,
            sentence_pool: AttentionPooling::new(2 * sh, config.sentence_attn, vb.pp("sentence_pool"))?,
            config,
        })
    }

    pub fn config(&self) -> &HanConfig {
        &self.config
    }

    /// Encodes documents of `Ns` sentences of `Nw` words; `word_lengths[b][s]` counts the words of sentence `s` of
    /// document `b` (0: the document has fewer sentences).
    pub fn forward(&self, words: &Tensor, word_lengths: Option<&[Vec<usize>]>) -> Result<HanOutput> {
        const OP: &str = "HAN encoder";
        ensure!(words.rank() == 4, OP, "expected words (B, Ns, Nw, C), got {}", shape_str(words));
        let (b, ns, nw, c) = words.dims4()?;
        let flat_lengths: Option<Vec<usize>> = match word_lengths {
            None => None,
            Some(l) => {
                ensure!(
                    l.len() == b && l.iter().all(|s| s.len() == ns),
                    OP,
                    "word_lengths must be B = {b} lists of Ns = {ns} counts"
                );
                Some(l.iter().flatten().copied().collect())
            }
        };
        let flat = words.reshape((b * ns, nw, c))?; // (B·Ns, Nw, C)
        let h = self.word_rnn.forward(&flat, flat_lengths.as_deref(), None)?.output; // (B·Ns, Nw, 2Hw)
        let wp = self.word_pool.forward(&h, flat_lengths.as_deref())?;
        let sentences = wp.pooled.reshape((b, ns, ()))?; // (B, Ns, 2Hw)
        let sentence_counts: Option<Vec<usize>> =
            word_lengths.map(|l| l.iter().map(|s| s.iter().take_while(|&&n| n > 0).count()).collect());
        let hs = self.sentence_rnn.forward(&sentences, sentence_counts.as_deref(), None)?.output; // (B, Ns, 2Hs)
        let sp = self.sentence_pool.forward(&hs, sentence_counts.as_deref())?;
        Ok(HanOutput { document: sp.pooled, word_alphas: wp.alphas.reshape((b, ns, nw))?, sentence_alphas: sp.alphas })
    }
}
