//! Score functions of the classic attention mechanisms: how well each query matches each key, before any
//! normalisation (the softmax, masking and weighted sum live in the attention core, [`crate::attention::attention`]).
//!
//! | score | paper | equation | parameters (checkpoint names) |
//! |-------|-------|----------|-------------------------------|
//! | [`dot`] / [`DotScore`] | Luong et al. 2015, eq. 8 "dot" | `s = qᵀ k` | none |
//! | [`scaled_dot`] / [`ScaledDotScore`] | Vaswani et al. 2017, eq. 1 | `s = qᵀ k / √Dk` | none |
//! | [`GeneralScore`] | Luong et al. 2015, eq. 8 "general" | `s = qᵀ W k` | `linear_in.weight` |
//! | [`AdditiveScore`] | Bahdanau et al. 2015, eq. 6 ("concat" in Luong, "mlp" in OpenNMT-py) | `s = vᵀ tanh(W q + U k)` | `linear_query.{weight,bias}`, `linear_context.weight`, `v.weight` |
//! | [`HanContextScore`] | Yang et al. 2016, eq. 5–6 | `u_s = tanh(W h_s + b)`, `s = u_sᵀ u_w` | `proj.{weight,bias}`, `context` |
//!
//! The names of the Luong and Bahdanau parameters are those of OpenNMT-py's `GlobalAttention`, so its
//! `state_dict` entries (under the attention module's prefix) load one to one; OpenNMT-py ties every width to one
//! `dim`, these layers allow `Dq ≠ Dk` and a separate attention width `A`.
//!
//! Half-precision inputs (f16, bf16) are promoted to f32 before any product, so scores are accumulated and returned
//! in f32 (house rule 5); f32 and f64 inputs keep their dtype.
//!
//! # Shapes
//!
//! - `q`: (B, T, Dq) queries, `k`: (B, S, Dk) keys
//! - scores: (B, T, S), unnormalised
//! - [`HanContextScore`]: `h` (B, S, C) → scores (B, S) (the query is the learned context vector `u_w`)
//!
//! ```
//! use attend::attention::score::{scaled_dot, AdditiveScore, AdditiveScoreConfig, Score};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let q = Tensor::randn(0f32, 1., (2, 5, 6), &dev)?; // (B, T, Dq)
//! let k = Tensor::randn(0f32, 1., (2, 7, 8), &dev)?; // (B, S, Dk)
//!
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
//! let cfg = AdditiveScoreConfig { query_dim: 6, key_dim: 8, attn_dim: 16 };
//! let additive = AdditiveScore::new(&cfg, vb.pp("attn"))?;
//! assert_eq!(additive.score(&q, &k)?.dims(), &[2, 5, 7]); // (B, T, S)
//!
//! // The dot products need Dq == Dk; a mismatch is an error that names both shapes.
//! assert!(scaled_dot(&q, &k, None).is_err());
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};
use candle_nn::{linear, linear_no_bias, Init, Linear, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::shape_str;
use crate::{bail, ensure, Result};

/// Anything that maps queries and keys to unnormalised scores; lets a layer hold "any score function"
/// (`Box<dyn Score>`, `&dyn Score` or the closed enum [`AnyScore`]).
///
/// # Shapes
///
/// - `q`: (B, T, Dq), `k`: (B, S, Dk) → (B, T, S)
pub trait Score {
    /// Unnormalised scores `s[b, t, s]` of query `t` against key `s`.
    fn score(&self, q: &Tensor, k: &Tensor) -> Result<Tensor>;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared checks and dtype handling.

/// Checks that `q` (B, T, Dq) and `k` (B, S, Dk) are rank 3 with the same batch and dtype; returns (Dq, Dk).
fn check_qk(op: &'static str, q: &Tensor, k: &Tensor) -> Result<(usize, usize)> {
    let (qs, ks) = (shape_str(q), shape_str(k));
    ensure!(q.rank() == 3 && k.rank() == 3, op, "expected q (B, T, Dq) and k (B, S, Dk), got q {qs} and k {ks}");
    ensure!(q.dim(0)? == k.dim(0)?, op, "batch sizes differ: q {qs} vs k {ks}");
    ensure!(q.dtype() == k.dtype(), op, "dtypes differ: q {qs} {:?} vs k {ks} {:?}", q.dtype(), k.dtype());
    Ok((q.dim(2)?, k.dim(2)?))
}

/// Checks a rank-3 input's last dimension against the width a layer was built for.
fn check_width(op: &'static str, name: &str, x: &Tensor, layout: &str, want: usize) -> Result<()> {
    ensure!(x.rank() == 3, op, "expected {name} {layout}, got {name} {}", shape_str(x));
    let got = x.dim(2)?;
    ensure!(got == want, op, "{name} {} has width {got}, but the layer was built for {want} ({layout})", shape_str(x));
    Ok(())
}

/// The dtype scores are computed in: f32 for half-precision storage (house rule 5), otherwise unchanged.
fn accumulate_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        dt => dt,
    }
}

/// Casts half-precision tensors to f32 (a differentiable `to_dtype`); a no-op clone otherwise.
fn promote(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(accumulate_dtype(x.dtype()))?)
}

/// `lin(x)` in the accumulation dtype of `x`. The parameters are promoted with `x` so that a bf16 checkpoint
/// applied to bf16 activations still accumulates in f32; it is an error for them to have another dtype family.
fn apply_linear(op: &'static str, name: &str, lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let x = promote(x)?;
    let w = promote(lin.weight())?;
    ensure!(
        w.dtype() == x.dtype(),
        op,
        "{name}.weight {} is {:?} but the input is {:?}",
        shape_str(lin.weight()),
        lin.weight().dtype(),
        x.dtype()
    );
    let b = lin.bias().map(promote).transpose()?;
    Ok(Linear::new(w, b).forward(&x)?)
}

// ---------------------------------------------------------------------------------------------------------------
// Dot and scaled dot (parameter-free).

/// Luong "dot" score, `s = qᵀ k`.
///
/// # Shapes
///
/// - `q`: (B, T, D), `k`: (B, S, D) → (B, T, S)
///
/// # Errors
///
/// When either input is not rank 3, the batch sizes differ, the dtypes differ or `Dq ≠ Dk`; the message names both
/// shapes, e.g. `q (2, 5, 8) vs k (2, 7, 6)`.
pub fn dot(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    Ok(dot_checked("dot score", q, k)?.0)
}

/// `q kᵀ` after the checks of [`dot`]; also returns `Dk`.
fn dot_checked(op: &'static str, q: &Tensor, k: &Tensor) -> Result<(Tensor, usize)> {
    let (dq, dk) = check_qk(op, q, k)?;
    ensure!(
        dq == dk,
        op,
        "q {} vs k {}: query width Dq = {dq} must equal key width Dk = {dk} (the general or additive score maps \
         between different widths)",
        shape_str(q),
        shape_str(k)
    );
    let (q, k) = (promote(q)?, promote(k)?);
    // s = q kᵀ; candle's matmul reads the transposed view of k without a copy.
    Ok((q.matmul(&k.t()?)?, dk)) // (B, T, S)
}

/// Vaswani et al. scaled dot-product score, `s = qᵀ k · scale` with `scale = 1/√Dk` unless given.
///
/// The scaling keeps the variance of the scores near 1 for unit-variance q and k, so the softmax that follows does
/// not saturate as `D` grows (Vaswani et al. 2017, §3.2.1).
///
/// # Shapes
///
/// - `q`: (B, T, D), `k`: (B, S, D) → (B, T, S)
///
/// # Errors
///
/// As [`dot`], and when `scale` is not finite.
pub fn scaled_dot(q: &Tensor, k: &Tensor, scale: Option<f64>) -> Result<Tensor> {
    const OP: &str = "scaled dot score";
    if let Some(s) = scale {
        ensure!(s.is_finite(), OP, "scale must be finite, got {s}");
    }
    let (s, dk) = dot_checked(OP, q, k)?; // (B, T, S)
    let scale = scale.unwrap_or(1.0 / (dk as f64).sqrt());
    Ok(s.affine(scale, 0.0)?)
}

/// [`dot`] as a [`Score`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DotScore;

impl Score for DotScore {
    fn score(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        dot(q, k)
    }
}

/// [`scaled_dot`] as a [`Score`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScaledDotScore {
    scale: Option<f64>,
}

impl ScaledDotScore {
    /// `scale: None` uses `1/√Dk` of the keys it is given; `Some(s)` must be finite.
    pub fn new(scale: Option<f64>) -> Result<Self> {
        if let Some(s) = scale {
            ensure!(s.is_finite(), "scaled dot score", "scale must be finite, got {s}");
        }
        Ok(Self { scale })
    }

    /// The fixed scale, or `None` for `1/√Dk`.
    pub fn scale(&self) -> Option<f64> {
        self.scale
    }
}

impl Score for ScaledDotScore {
    fn score(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        scaled_dot(q, k, self.scale)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// General / bilinear (Luong).

/// Configuration of [`GeneralScore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneralScoreConfig {
    /// Query width `Dq`, e.g. 512 (the decoder hidden size).
    pub query_dim: usize,
    /// Key width `Dk`, e.g. 1024 (a bidirectional encoder's output size).
    pub key_dim: usize,
}

/// Luong "general" (bilinear) score, `s = qᵀ W k` with `W` (Dq, Dk).
///
/// Checkpoint layout: `W` is stored as the PyTorch `nn.Linear(Dq, Dk, bias=False)` named `linear_in`, applied to
/// the query as OpenNMT-py does (`bmm(linear_in(h_t), h_sᵀ)`). That module's weight is `linear_in.weight` of shape
/// (Dk, Dq) = `Wᵀ`, so an OpenNMT-py / PyTorch checkpoint loads unchanged and `W = linear_in.weightᵀ`
/// ([`GeneralScore::bilinear_weight`]).
///
/// # Shapes
///
/// - `q`: (B, T, Dq), `k`: (B, S, Dk) → (B, T, S)
/// - `linear_in.weight`: (Dk, Dq)
#[derive(Clone, Debug)]
pub struct GeneralScore {
    linear_in: Linear,
    config: GeneralScoreConfig,
}

impl GeneralScore {
    const OP: &'static str = "general score";

    /// Loads or creates `linear_in.weight` (Dk, Dq) under `vb`.
    pub fn new(config: &GeneralScoreConfig, vb: VarBuilder) -> Result<Self> {
        ensure!(
            config.query_dim > 0 && config.key_dim > 0,
            Self::OP,
            "query_dim and key_dim must be positive, got {config:?}"
        );
        let linear_in = linear_no_bias(config.query_dim, config.key_dim, vb.pp("linear_in"))?;
        Ok(Self { linear_in, config: *config })
    }

    pub fn config(&self) -> &GeneralScoreConfig {
        &self.config
    }

    /// The `linear_in` projection (weight (Dk, Dq), no bias).
    pub fn linear_in(&self) -> &Linear {
        &self.linear_in
    }

    /// `W` (Dq, Dk) of `s = qᵀ W k`: the transpose of the stored `linear_in.weight`.
    pub fn bilinear_weight(&self) -> Result<Tensor> {
        Ok(self.linear_in.weight().t()?)
    }

    /// # Shapes
    ///
    /// - `q`: (B, T, Dq), `k`: (B, S, Dk) → (B, T, S)
    pub fn forward(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        check_qk(Self::OP, q, k)?;
        check_width(Self::OP, "q", q, "(B, T, Dq)", self.config.query_dim)?;
        check_width(Self::OP, "k", k, "(B, S, Dk)", self.config.key_dim)?;
        // Project the query into key space first (OpenNMT-py order): Wᵀq costs T·Dq·Dk, W k would cost S·Dq·Dk.
        let wq = apply_linear(Self::OP, "linear_in", &self.linear_in, q)?; // (B, T, Dk)
        let k = promote(k)?;
        Ok(wq.matmul(&k.t()?)?) // (B, T, S)
    }
}

impl Score for GeneralScore {
    fn score(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        self.forward(q, k)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Additive / concat (Bahdanau; OpenNMT-py "mlp").

/// Configuration of [`AdditiveScore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdditiveScoreConfig {
    /// Query width `Dq`, e.g. 512 (the decoder hidden size).
    pub query_dim: usize,
    /// Key width `Dk`, e.g. 1024 (a bidirectional encoder's output size).
    pub key_dim: usize,
    /// Width `A` of the hidden layer inside the score, e.g. 512 (OpenNMT-py uses `A = Dq = Dk`).
    pub attn_dim: usize,
}

/// Bahdanau additive score, `s = vᵀ tanh(W q + U k)` (OpenNMT-py `GlobalAttention` with `attn_type="mlp"`).
///
/// Parameters, named as OpenNMT-py names them: `linear_query` (Dq → A, with bias: `W` and the one bias of the MLP),
/// `linear_context` (Dk → A, no bias: `U`), `v` (A → 1, no bias).
///
/// Memory: every query is added to every key before the `tanh`, so the forward materialises a (B, T, S, A) tensor
/// (and autograd keeps it for the backward): O(B·T·S·A), `A` times the size of the scores. For long sequences, run
/// the decoder one step at a time (T = 1) and project the keys once with [`AdditiveScore::project_keys`].
///
/// # Shapes
///
/// - `q`: (B, T, Dq), `k`: (B, S, Dk) → (B, T, S); intermediate (B, T, S, A)
/// - `linear_query.weight`: (A, Dq), `linear_query.bias`: (A,), `linear_context.weight`: (A, Dk), `v.weight`: (1, A)
#[derive(Clone, Debug)]
pub struct AdditiveScore {
    linear_query: Linear,
    linear_context: Linear,
    v: Linear,
    config: AdditiveScoreConfig,
}

impl AdditiveScore {
    const OP: &'static str = "additive score";

    /// Loads or creates `linear_query.{weight,bias}`, `linear_context.weight` and `v.weight` under `vb`.
    pub fn new(config: &AdditiveScoreConfig, vb: VarBuilder) -> Result<Self> {
        let AdditiveScoreConfig { query_dim, key_dim, attn_dim } = *config;
        ensure!(
            query_dim > 0 && key_dim > 0 && attn_dim > 0,
            Self::OP,
            "query_dim, key_dim and attn_dim must be positive, got {config:?}"
        );
        Ok(Self {
            linear_query: linear(query_dim, attn_dim, vb.pp("linear_query"))?,
            linear_context: linear_no_bias(key_dim, attn_dim, vb.pp("linear_context"))?,
            v: linear_no_bias(attn_dim, 1, vb.pp("v"))?,
            config: *config,
        })
    }

    pub fn config(&self) -> &AdditiveScoreConfig {
        &self.config
    }

    /// `W q + b` (`linear_query`, with bias).
    pub fn linear_query(&self) -> &Linear {
        &self.linear_query
    }

    /// `U k` (`linear_context`, no bias).
    pub fn linear_context(&self) -> &Linear {
        &self.linear_context
    }

    /// `v` (A → 1, no bias).
    pub fn v(&self) -> &Linear {
        &self.v
    }

    /// `U k`: the key half of the score, which does not depend on the query; compute it once per source sequence
    /// when decoding step by step and pass it to [`AdditiveScore::score_projected`].
    ///
    /// # Shapes
    ///
    /// - `k`: (B, S, Dk) → (B, S, A), in the accumulation dtype (f32 for half-precision keys)
    pub fn project_keys(&self, k: &Tensor) -> Result<Tensor> {
        check_width(Self::OP, "k", k, "(B, S, Dk)", self.config.key_dim)?;
        apply_linear(Self::OP, "linear_context", &self.linear_context, k)
    }

    /// The score from queries and already projected keys `uk = U k` ([`AdditiveScore::project_keys`]).
    ///
    /// # Shapes
    ///
    /// - `q`: (B, T, Dq), `uk`: (B, S, A) → (B, T, S)
    pub fn score_projected(&self, q: &Tensor, uk: &Tensor) -> Result<Tensor> {
        check_width(Self::OP, "q", q, "(B, T, Dq)", self.config.query_dim)?;
        check_width(Self::OP, "projected keys", uk, "(B, S, A)", self.config.attn_dim)?;
        let (b, t, s) = (q.dim(0)?, q.dim(1)?, uk.dim(1)?);
        ensure!(
            uk.dim(0)? == b,
            Self::OP,
            "batch sizes differ: q {} vs projected keys {}",
            shape_str(q),
            shape_str(uk)
        );
        let wq = apply_linear(Self::OP, "linear_query", &self.linear_query, q)?; // (B, T, A)
        ensure!(
            wq.dtype() == uk.dtype(),
            Self::OP,
            "projected keys are {:?} but projected queries are {:?}",
            uk.dtype(),
            wq.dtype()
        );
        // tanh(W q + U k) for every (query, key) pair: broadcast (B, T, 1, A) + (B, 1, S, A).
        let e = crate::ops::tanh(&wq.unsqueeze(2)?.broadcast_add(&uk.unsqueeze(1)?)?)?; // (B, T, S, A)
                                                                                        // vᵀ e: v is a Linear A → 1, so the last axis collapses to one score.
        let s_ = apply_linear(Self::OP, "v", &self.v, &e)?; // (B, T, S, 1)
        Ok(s_.reshape((b, t, s))?) // (B, T, S)
    }

    /// # Shapes
    ///
    /// - `q`: (B, T, Dq), `k`: (B, S, Dk) → (B, T, S); memory (B, T, S, A)
    pub fn forward(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        check_qk(Self::OP, q, k)?;
        check_width(Self::OP, "q", q, "(B, T, Dq)", self.config.query_dim)?;
        let uk = self.project_keys(k)?; // (B, S, A)
        self.score_projected(q, &uk)
    }
}

impl Score for AdditiveScore {
    fn score(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        self.forward(q, k)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Hierarchical Attention Networks: a learned context vector as the query.

/// Configuration of [`HanContextScore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HanContextScoreConfig {
    /// Width `C` of the annotations `h`, e.g. 100 (a bidirectional GRU with 50 units per direction, as in HAN).
    pub input_dim: usize,
    /// Width `A` of the hidden representation `u` and of the context vector `u_w`, e.g. 100.
    pub attn_dim: usize,
}

/// The score of Hierarchical Attention Networks (Yang et al. 2016, eq. 5–6 before the softmax):
/// `u_s = tanh(W h_s + b)`, `score_s = u_sᵀ u_w`, where the "query" `u_w` is a learned vector shared by every
/// sequence. It scores one sequence against itself, so it is not a [`Score`] (which takes separate queries); the
/// HAN pooling layer applies the softmax over S and the weighted sum of `h`.
///
/// Parameters: `proj` (Linear C → A with bias: `W`, `b`), `context` (`u_w`, shape (A,)).
///
/// # Shapes
///
/// - `h`: (B, S, C) → (B, S)
/// - `proj.weight`: (A, C), `proj.bias`: (A,), `context`: (A,)
#[derive(Clone, Debug)]
pub struct HanContextScore {
    proj: Linear,
    context: Tensor,
    config: HanContextScoreConfig,
}

impl HanContextScore {
    const OP: &'static str = "HAN context score";

    /// Loads or creates `proj.{weight,bias}` and `context` under `vb`.
    ///
    /// A fresh `context` is drawn from N(0, 1/A), not zero: with `u_w = 0` every score is 0 and `proj` would get no
    /// gradient at the first step.
    pub fn new(config: &HanContextScoreConfig, vb: VarBuilder) -> Result<Self> {
        let HanContextScoreConfig { input_dim, attn_dim } = *config;
        ensure!(input_dim > 0 && attn_dim > 0, Self::OP, "input_dim and attn_dim must be positive, got {config:?}");
        let proj = linear(input_dim, attn_dim, vb.pp("proj"))?;
        let init = Init::Randn { mean: 0.0, stdev: 1.0 / (attn_dim as f64).sqrt() };
        let context = vb.get_with_hints(attn_dim, "context", init)?; // (A,)
        Ok(Self { proj, context, config: *config })
    }

    /// From an existing projection `W h + b` (weight (A, C)) and context vector `u_w` (A,), for layers that store
    /// them under other names (the course's `W_omega (C, A)` is this projection's weight transposed).
    pub fn from_parts(config: &HanContextScoreConfig, proj: Linear, context: Tensor) -> Result<Self> {
        let HanContextScoreConfig { input_dim, attn_dim } = *config;
        ensure!(
            proj.weight().dims() == [attn_dim, input_dim] && context.dims() == [attn_dim],
            Self::OP,
            "projection weight {} and context {} do not fit C = {input_dim}, A = {attn_dim}",
            shape_str(proj.weight()),
            shape_str(&context)
        );
        Ok(Self { proj, context, config: *config })
    }

    pub fn config(&self) -> &HanContextScoreConfig {
        &self.config
    }

    /// `W h + b` (`proj`, with bias).
    pub fn proj(&self) -> &Linear {
        &self.proj
    }

    /// The learned context vector `u_w`, shape (A,).
    pub fn context(&self) -> &Tensor {
        &self.context
    }

    /// `u = tanh(W h + b)`, the hidden representation each annotation is scored by.
    ///
    /// # Shapes
    ///
    /// - `h`: (B, S, C) → (B, S, A)
    pub fn hidden(&self, h: &Tensor) -> Result<Tensor> {
        check_width(Self::OP, "h", h, "(B, S, C)", self.config.input_dim)?;
        crate::ops::tanh(&apply_linear(Self::OP, "proj", &self.proj, h)?) // (B, S, A)
    }

    /// # Shapes
    ///
    /// - `h`: (B, S, C) → (B, S)
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let u = self.hidden(h)?; // (B, S, A)
        let (b, s, a) = u.dims3()?;
        let uw = promote(&self.context)?;
        if uw.dtype() != u.dtype() {
            bail!(
                Self::OP,
                "context {} is {:?} but the input is {:?}",
                shape_str(&self.context),
                uw.dtype(),
                u.dtype()
            );
        }
        // score_s = u_sᵀ u_w as one (B·S, A) × (A, 1) product.
        let s_ = u.reshape((b * s, a))?.matmul(&uw.reshape((a, 1))?)?; // (B·S, 1)
        Ok(s_.reshape((b, s))?) // (B, S)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Any score, chosen by configuration.

/// Which score a layer uses, as it appears in a config file: `{"kind": "additive", "query_dim": 512,
/// "key_dim": 1024, "attn_dim": 512}`, `{"kind": "scaled_dot", "scale": null}`, `{"kind": "dot"}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScoreConfig {
    /// [`dot`]; no parameters.
    Dot,
    /// [`scaled_dot`]; `scale: None` (or `null`) means `1/√Dk`.
    ScaledDot {
        #[serde(default)]
        scale: Option<f64>,
    },
    /// [`GeneralScore`].
    General(GeneralScoreConfig),
    /// [`AdditiveScore`].
    Additive(AdditiveScoreConfig),
}

/// One of the query/key score functions, built from a [`ScoreConfig`]; what a layer holds when its score is a
/// configuration choice.
#[derive(Clone, Debug)]
pub enum AnyScore {
    Dot(DotScore),
    ScaledDot(ScaledDotScore),
    General(GeneralScore),
    Additive(AdditiveScore),
}

impl AnyScore {
    /// Builds the configured score; parameters live directly under `vb` (e.g. `vb/linear_in.weight`), as in
    /// OpenNMT-py's `GlobalAttention`.
    pub fn new(config: &ScoreConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match config {
            ScoreConfig::Dot => AnyScore::Dot(DotScore),
            ScoreConfig::ScaledDot { scale } => AnyScore::ScaledDot(ScaledDotScore::new(*scale)?),
            ScoreConfig::General(c) => AnyScore::General(GeneralScore::new(c, vb)?),
            ScoreConfig::Additive(c) => AnyScore::Additive(AdditiveScore::new(c, vb)?),
        })
    }
}

impl Score for AnyScore {
    fn score(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        match self {
            AnyScore::Dot(s) => s.score(q, k),
            AnyScore::ScaledDot(s) => s.score(q, k),
            AnyScore::General(s) => s.score(q, k),
            AnyScore::Additive(s) => s.score(q, k),
        }
    }
}

/// The scores `u_w · tanh(W h + b)` of each annotation (`h (B, S, C) → (B, S)`).
impl Module for HanContextScore {
    fn forward(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        Ok(HanContextScore::forward(self, h)?)
    }
}
