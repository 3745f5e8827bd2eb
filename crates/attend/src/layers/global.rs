//! Global attention of the encoder–decoder (Luong et al. 2015 §3.1; Bahdanau et al. 2015), as OpenNMT-py's
//! `GlobalAttention`: score every source state against the decoder state, normalise, take the context
//! `c = Σ_s a_s h_s`, and combine it with the decoder state.
//!
//! | [`GlobalType`] | score | attentional state | contract name |
//! |---|---|---|---|
//! | `Dot` | `hᵀ h_s` | `tanh(W_out [c; h])` | `luong-dot` |
//! | `General` | `hᵀ W h_s` | `tanh(W_out [c; h])` | `luong-general` |
//! | `Concat` | `vᵀ tanh(W_q h + b_q + W_c h_s)` | `tanh(W_out [c; h])` | `luong-concat` |
//! | `Mlp` | `vᵀ tanh(W_q h + b_q + W_c h_s)` | `W_out [c; h] + b_out` | `bahdanau` (OpenNMT-py `mlp`) |
//!
//! The query `h` is whichever decoder state the model passes: the current one (Luong: `h_t`, then `h̃_t` is fed to
//! the next step, "input feeding") or the previous one (Bahdanau: `s_{t−1}`, and `c` goes into the RNN); the seq2seq
//! decoders choose. Scores run through the classic path ([`crate::attention::classic`]), so any [`Normalizer`]
//! applies and padded memory is hidden by key lengths.
//!
//! Parameters carry OpenNMT-py's names: `linear_in.weight` (general), `linear_context.weight`,
//! `linear_query.{weight,bias}`, `v.weight` (concat/mlp), `linear_out.weight` (+ `linear_out.bias` for mlp).
//!
//! # Shapes
//! - `source`: `(B, T, C)` decoder states (T = 1 when decoding step by step), `memory_bank`: `(B, S, C)`
//! - `attn_h`: `(B, T, C)`, `align`: `(B, T, S)`
//!
//! ```
//! use attend::attention::classic::Normalizer;
//! use attend::layers::global::{GlobalAttention, GlobalAttentionConfig, GlobalType};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = GlobalAttentionConfig { dim: 8, kind: GlobalType::Mlp, normalizer: Normalizer::Softmax };
//! let attn = GlobalAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let h = Tensor::randn(0f32, 1., (2, 1, 8), &dev)?; // one decoding step
//! let memory = Tensor::randn(0f32, 1., (2, 6, 8), &dev)?;
//! let out = attn.forward(&h, &memory, Some(&[6, 4]))?;
//! assert_eq!(out.attn_h.dims(), &[2, 1, 8]);
//! assert_eq!(out.align.get(1)?.get(0)?.to_vec1::<f32>()?[4..], [0.0, 0.0]); // padding gets no weight
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::{linear, linear_no_bias, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::attention::classic::{attend_scores_with, ClassicOptions, Normalizer};
use crate::attention::score::{AdditiveScore, AdditiveScoreConfig, GeneralScore, GeneralScoreConfig, Score};
use crate::attention::Mask;
use crate::error::shape_str;
use crate::{bail, ensure, Result};

/// The score and output form; see the module table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GlobalType {
    Dot,
    General,
    Concat,
    Mlp,
}

impl GlobalType {
    /// The type of a contract name (`luong-dot`, `luong-general`, `luong-concat`, `bahdanau`).
    pub fn from_layer_name(name: &str) -> Result<Self> {
        Ok(match name {
            "luong-dot" => Self::Dot,
            "luong-general" => Self::General,
            "luong-concat" => Self::Concat,
            "bahdanau" => Self::Mlp,
            _ => bail!("global attention", "unknown layer `{name}`"),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalAttentionConfig {
    /// Width `C` of decoder states and memory (OpenNMT-py's `dim`).
    pub dim: usize,
    pub kind: GlobalType,
    pub normalizer: Normalizer,
}

impl GlobalAttentionConfig {
    pub fn new(dim: usize, kind: GlobalType) -> Self {
        Self { dim, kind, normalizer: Normalizer::Softmax }
    }
}

/// The memory of one batch of source sequences, prepared once for every decoding step: the mask of its lengths and,
/// for the additive scores, the key half `W_c h_s` of the score.
#[derive(Clone, Debug)]
pub struct PreparedMemory {
    /// `(B, S, C)`
    pub memory: Tensor,
    /// `(B, S, C)` for additive scores.
    keys: Option<Tensor>,
    lengths: Option<Vec<usize>>,
}

impl PreparedMemory {
    /// The rows `indices` of every tensor (beam search reorders and repeats hypotheses).
    pub fn select(&self, indices: &Tensor, host: &[usize]) -> Result<Self> {
        Ok(Self {
            memory: self.memory.contiguous()?.index_select(indices, 0)?,
            keys: self.keys.as_ref().map(|k| k.contiguous()?.index_select(indices, 0)).transpose()?,
            lengths: self.lengths.as_ref().map(|l| host.iter().map(|&i| l[i]).collect()),
        })
    }

    pub fn lengths(&self) -> Option<&[usize]> {
        self.lengths.as_deref()
    }

    fn mask(&self) -> Mask {
        match &self.lengths {
            Some(l) => Mask::none().with_key_lengths(l.clone()),
            None => Mask::none(),
        }
    }
}

/// The score of a [`GlobalAttention`].
#[derive(Clone, Debug)]
enum GlobalScore {
    Dot,
    General(GeneralScore),
    Additive(AdditiveScore),
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct GlobalAttention {
    score: GlobalScore,
    linear_out: Linear,
    /// `w_cov` (C ← 1) when built with coverage.
    linear_cover: Option<Linear>,
    config: GlobalAttentionConfig,
}

/// What [`GlobalAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct GlobalOutput {
    /// `(B, T, C)`: the attentional hidden state `h̃`.
    pub attn_h: Tensor,
    /// `(B, T, S)`: the weights over the memory (they carry gradients).
    pub align: Tensor,
    /// `(B, T, C)`: the context `c`.
    pub context: Tensor,
}

impl GlobalAttention {
    const OP: &'static str = "global attention";

    pub fn new(config: GlobalAttentionConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, false, vb)
    }

    /// With coverage (Tu et al. 2016): the additive score also reads how much each source position was attended so
    /// far, through `linear_cover.weight` (C, 1).
    pub fn with_coverage(config: GlobalAttentionConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(config, true, vb)
    }

    fn build(config: GlobalAttentionConfig, coverage: bool, vb: VarBuilder) -> Result<Self> {
        let c = config.dim;
        ensure!(
            !coverage || matches!(config.kind, GlobalType::Concat | GlobalType::Mlp),
            Self::OP,
            "coverage applies to the additive scores (concat, mlp), not {:?}",
            config.kind
        );
        let linear_cover = if coverage { Some(linear_no_bias(1, c, vb.pp("linear_cover"))?) } else { None };
        ensure!(c > 0, Self::OP, "dim must be positive");
        let score = match config.kind {
            GlobalType::Dot => GlobalScore::Dot,
            GlobalType::General => {
                GlobalScore::General(GeneralScore::new(&GeneralScoreConfig { query_dim: c, key_dim: c }, vb.clone())?)
            }
            GlobalType::Concat | GlobalType::Mlp => GlobalScore::Additive(AdditiveScore::new(
                &AdditiveScoreConfig { query_dim: c, key_dim: c, attn_dim: c },
                vb.clone(),
            )?),
        };
        let linear_out = match config.kind {
            GlobalType::Mlp => linear(2 * c, c, vb.pp("linear_out"))?,
            _ => linear_no_bias(2 * c, c, vb.pp("linear_out"))?,
        };
        Ok(Self { score, linear_out, linear_cover, config })
    }

    pub fn config(&self) -> &GlobalAttentionConfig {
        &self.config
    }

    /// Unnormalised scores `(B, T, S)`.
    pub fn score(&self, source: &Tensor, memory_bank: &Tensor) -> Result<Tensor> {
        match &self.score {
            GlobalScore::Dot => crate::attention::score::dot(source, memory_bank),
            GlobalScore::General(s) => s.score(source, memory_bank),
            GlobalScore::Additive(s) => s.score(source, memory_bank),
        }
    }

    /// Attends `source` over `memory_bank`; `memory_lengths` (one per sequence) hides padded memory.
    pub fn forward(
        &self,
        source: &Tensor,
        memory_bank: &Tensor,
        memory_lengths: Option<&[usize]>,
    ) -> Result<GlobalOutput> {
        self.step(source, &self.prepare(memory_bank, memory_lengths)?, None)
    }

    /// Checks the memory and computes what every step reuses.
    pub fn prepare(&self, memory_bank: &Tensor, memory_lengths: Option<&[usize]>) -> Result<PreparedMemory> {
        let c = self.config.dim;
        ensure!(
            memory_bank.rank() == 3 && memory_bank.dim(2)? == c,
            Self::OP,
            "expected memory_bank (B, S, C = {c}), got {}",
            shape_str(memory_bank)
        );
        let keys = match &self.score {
            GlobalScore::Additive(a) => Some(a.project_keys(memory_bank)?), // (B, S, C)
            _ => None,
        };
        Ok(PreparedMemory { memory: memory_bank.clone(), keys, lengths: memory_lengths.map(<[usize]>::to_vec) })
    }

    /// Attends `source` `(B, T, C)` over prepared memory. With `coverage` `(B, S)` (the sum of earlier steps'
    /// weights; additive scores only) the score becomes `vᵀ tanh(W_q h + b_q + W_c h_s + w_cov · cov_s)` (Tu et al.
    /// 2016), so the model can learn not to attend again where it already has.
    pub fn step(&self, source: &Tensor, memory: &PreparedMemory, coverage: Option<&Tensor>) -> Result<GlobalOutput> {
        let c = self.config.dim;
        let (ss, ms) = (shape_str(source), shape_str(&memory.memory));
        ensure!(
            source.rank() == 3 && source.dim(2)? == c && source.dim(0)? == memory.memory.dim(0)?,
            Self::OP,
            "expected source (B, T, C = {c}) for memory_bank {ms}, got source {ss}"
        );
        let scores = match (&self.score, &memory.keys) {
            (GlobalScore::Additive(a), Some(keys)) => {
                let keys = match (coverage, &self.linear_cover) {
                    (None, _) => keys.clone(),
                    (Some(cov), Some(lin)) => (keys + lin.forward(&cov.unsqueeze(2)?)?)?, // (B, S, C)
                    (Some(_), None) => bail!(Self::OP, "coverage needs a layer built with coverage"),
                };
                a.score_projected(source, &keys)?
            }
            _ => {
                ensure!(coverage.is_none(), Self::OP, "coverage applies to the additive scores (concat, mlp) only");
                self.score(source, &memory.memory)?
            }
        }; // (B, T, S)
        let opts = ClassicOptions { normalizer: self.config.normalizer, reference: false };
        let out = attend_scores_with(&scores, &memory.memory, &memory.mask(), opts)?;
        Ok(GlobalOutput { attn_h: self.combine(&out.context, source)?, align: out.weights, context: out.context })
    }

    /// `h̃ = tanh(W_out [c; h])` (Luong) or `W_out [c; h] + b_out` (mlp).
    pub fn combine(&self, context: &Tensor, source: &Tensor) -> Result<Tensor> {
        let out = self.linear_out.forward(&Tensor::cat(&[context, source], 2)?)?; // (B, T, C)
        Ok(match self.config.kind {
            GlobalType::Mlp => out,
            _ => crate::ops::tanh(&out)?,
        })
    }
}
