//! Multi-head attention — "Attention Is All You Need" (Vaswani et al., 2017), §3.2.2, with grouped-query attention
//! ("GQA", Ainslie et al., 2023) and multi-query attention ("MQA", Shazeer, 2019) as the cases `Hkv < H`.
//!
//! ```text
//! MultiHead(X, M) = Concat(head_1, …, head_H) W^O,   head_h = Attention(X W^Q_h, M W^K_g(h), M W^V_g(h))
//! Attention(Q, K, V) = softmax(mask(Q Kᵀ / √D)) V,    g(h) = ⌊h / (H / Hkv)⌋
//! ```
//!
//! `M = X` in self-attention; in cross-attention `M` is a memory (an encoder's output) of width `Ckv`. The
//! softmax, masking, dropout and head grouping all happen in the one attention core,
//! [`attention_with`](super::attention_with); this layer owns the four projections, the head split/merge, the
//! optional rotary embedding ([`Rope`], applied to queries and keys at their absolute positions) and the KV cache.
//!
//! Deviations from the paper, stated openly: `D` (head_dim) need not be `C / H`; `H·D` is the width of the
//! concatenated heads and `W^O` maps it back to `C`. Keys and values may have their own input widths (PyTorch's
//! `kdim`/`vdim`). Dropout acts on the attention probabilities (PyTorch's `dropout` argument), not on the output.
//!
//! # Parameters (checkpoint names)
//!
//! The names of BART / Hugging Face checkpoints (`model.encoder.layers.0.self_attn.q_proj.weight` loads under the
//! prefix `model.encoder.layers.0.self_attn`). Weights are stored `(out, in)` as `nn.Linear` stores them.
//!
//! | name | shape | role |
//! |------|-------|------|
//! | `q_proj.weight`, `q_proj.bias` | `(H·D, C)`, `(H·D)` | `W^Q` |
//! | `k_proj.weight`, `k_proj.bias` | `(Hkv·D, Ckv)`, `(Hkv·D)` | `W^K` |
//! | `v_proj.weight`, `v_proj.bias` | `(Hkv·D, Cv)`, `(Hkv·D)` | `W^V` |
//! | `out_proj.weight`, `out_proj.bias` | `(C, H·D)`, `(C)` | `W^O` |
//!
//! `torch.nn.MultiheadAttention` packs the input projections; [`import_torch_mha`] is the explicit table that
//! splits its `in_proj_weight` / `in_proj_bias` into these names.
//!
//! # Shapes
//! - `x`: `(B, T, C)` queries (and, in self-attention, keys and values)
//! - `kv`: `(B, S, Ckv)` cross-attention memory; or `key (B, S, Ckv)` and `value (B, S, Cv)` apart
//! - inside: `q (B, H, T, D)`, `k (B, Hkv, S, D)`, `v (B, Hkv, S, D)`; with a cache `S = cached + T`
//! - output `out (B, T, C)`; `weights (B, H, T, S)` when asked for
//!
//! ```
//! use attend::attention::{KvCache, Mask, MhaOptions, MultiHeadAttention, MultiHeadAttentionConfig};
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
//! // GQA: 4 query heads share 2 key/value heads.
//! let cfg = MultiHeadAttentionConfig { n_kv_heads: Some(2), ..MultiHeadAttentionConfig::new(16, 4) };
//! let mha = MultiHeadAttention::new(&cfg, vb.pp("self_attn"))?;
//!
//! let x = Tensor::randn(0f32, 1., (2, 5, 16), &dev)?; // (B, T, C)
//! let opts = MhaOptions { need_weights: true, ..Default::default() };
//! let full = mha.forward(&x, None, &Mask::causal(), None, &opts)?;
//! assert_eq!(full.out.dims(), &[2, 5, 16]); // (B, T, C)
//! assert_eq!(full.weights.unwrap().dims(), &[2, 4, 5, 5]); // (B, H, T, S)
//!
//! // Incremental decoding: one token at a time against a KV cache gives the same last row.
//! let mut cache = KvCache::new(Some(64));
//! let mut last = None;
//! for t in 0..5 {
//!     let xt = x.narrow(1, t, 1)?; // (B, 1, C)
//!     last = Some(mha.forward(&xt, None, &Mask::causal(), Some(&mut cache), &MhaOptions::default())?.out);
//! }
//! let diff = (last.unwrap() - full.out.narrow(1, 4, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};

use crate::layers::linear::Linear;
use serde::{Deserialize, Serialize};

use super::core::{attention_with, AttentionDropout, AttentionImpl, AttentionOptions};
use super::kv_cache::KvCache;
use super::mask::Mask;
use crate::error::shape_str;
use crate::position::rope::Rope;
use crate::rng::{DropoutStream, TrainingFlag};
use crate::{ensure, Result};

/// Configuration of [`MultiHeadAttention`]; `None` fields take the defaults named below.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MultiHeadAttentionConfig {
    /// Model width `C` of the queries and of the output. Example: `768` (BART-base).
    pub d_model: usize,
    /// Query heads `H`. Example: `12`.
    pub n_heads: usize,
    /// Key/value heads `Hkv`, a divisor of `H`; default `H` (multi-head). `1 < Hkv < H` is grouped-query attention,
    /// `1` multi-query attention. Example: `Some(4)` (GQA with 3 query heads per key/value head).
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// Head dimension `D`; default `C / H` (then `H` must divide `C`). Example: `Some(64)`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Input width `Ckv` of the keys (cross-attention memory); default `C`. Example: `Some(1024)`.
    #[serde(default)]
    pub kv_dim: Option<usize>,
    /// Input width `Cv` of the values when they come from their own tensor ([`MultiHeadAttention::forward_qkv`],
    /// PyTorch's `vdim`); default `kv_dim`. Example: `None`.
    #[serde(default)]
    pub value_dim: Option<usize>,
    /// Biases on all four projections (PyTorch's `bias=True`, BART); `false` for Llama-style layers. Example: `true`.
    #[serde(default = "default_bias")]
    pub bias: bool,
    /// Dropout probability on the attention weights while training, in `[0, 1)`. Example: `0.1`.
    #[serde(default)]
    pub dropout: f64,
    /// Score scale; default `1/√D`. Example: `None`.
    #[serde(default)]
    pub scale: Option<f64>,
    /// One input projection `qkv_proj` of `(H·D + 2·Hkv·D, C)` instead of three (GPT-2's `c_attn`): one matmul per
    /// call instead of three. Self-attention only. Example: `true`.
    #[serde(default)]
    pub fused_qkv: bool,
}

fn default_bias() -> bool {
    true
}

impl MultiHeadAttentionConfig {
    /// `C = d_model`, `H = n_heads`, everything else at its default (multi-head self-attention with biases, no
    /// dropout).
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        Self {
            d_model,
            n_heads,
            n_kv_heads: None,
            head_dim: None,
            kv_dim: None,
            value_dim: None,
            bias: true,
            dropout: 0.0,
            scale: None,
            fused_qkv: false,
        }
    }

    /// Checks the settings and resolves the defaults; [`MultiHeadAttention::new`] calls it.
    pub fn resolve(&self) -> Result<MhaDims> {
        const OP: &str = "MultiHeadAttentionConfig";
        let (c, h) = (self.d_model, self.n_heads);
        ensure!(c > 0, OP, "d_model must be positive, got 0");
        ensure!(h > 0, OP, "n_heads must be positive, got 0");
        let hkv = self.n_kv_heads.unwrap_or(h);
        ensure!(
            hkv > 0 && h % hkv == 0,
            OP,
            "n_kv_heads = {hkv} must be a positive divisor of n_heads = {h} (each key/value head serves H / Hkv query \
             heads)"
        );
        let d = match self.head_dim {
            Some(d) => d,
            None => {
                ensure!(
                    c % h == 0,
                    OP,
                    "d_model = {c} is not divisible by n_heads = {h}; set head_dim explicitly to use H·D ≠ C"
                );
                c / h
            }
        };
        ensure!(d > 0, OP, "head_dim must be positive, got 0");
        let ckv = self.kv_dim.unwrap_or(c);
        let cv = self.value_dim.unwrap_or(ckv);
        ensure!(ckv > 0 && cv > 0, OP, "kv_dim and value_dim must be positive, got {ckv} and {cv}");
        ensure!(
            self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout),
            OP,
            "dropout must be in [0, 1), got {}",
            self.dropout
        );
        if let Some(s) = self.scale {
            ensure!(s.is_finite() && s > 0.0, OP, "scale must be positive and finite, got {s}");
        }
        ensure!(
            !self.fused_qkv || (ckv == c && cv == c),
            OP,
            "fused_qkv projects one input into queries, keys and values, so kv_dim = {ckv} and value_dim = {cv} must \
             equal d_model = {c}"
        );
        Ok(MhaDims { c, h, hkv, d, ckv, cv })
    }
}

/// The sizes of a validated [`MultiHeadAttentionConfig`], defaults resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MhaDims {
    /// Model width `C`.
    pub c: usize,
    /// Query heads `H`.
    pub h: usize,
    /// Key/value heads `Hkv`.
    pub hkv: usize,
    /// Head dimension `D`.
    pub d: usize,
    /// Key input width `Ckv`.
    pub ckv: usize,
    /// Value input width `Cv`.
    pub cv: usize,
}

/// Per-call settings of [`MultiHeadAttention::forward`]. Training mode and dropout masks are the layer's own
/// ([`MultiHeadAttention::set_training`], [`MultiHeadAttention::set_dropout_stream`]), not per call.
#[derive(Clone, Copy, Debug, Default)]
pub struct MhaOptions<'a> {
    /// Return the `(B, H, T, S)` attention weights (before dropout).
    pub need_weights: bool,
    /// Rotary embedding applied to queries and keys at positions `cached..cached + T` (self-attention only).
    pub rope: Option<&'a Rope>,
    /// Which path of the attention core runs; [`AttentionImpl::Reference`] is the composed oracle.
    pub implementation: AttentionImpl,
}

/// Result of a [`MultiHeadAttention`] call.
#[derive(Clone, Debug)]
pub struct MhaOutput {
    /// `(B, T, C)`
    pub out: Tensor,
    /// `(B, H, T, S)` attention probabilities before dropout, when [`MhaOptions::need_weights`] is set.
    pub weights: Option<Tensor>,
}

/// The input projections: three, or one fused (`fused_qkv`).
#[derive(Clone, Debug)]
enum InputProjections {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// Rows `[W^Q; W^K; W^V]`: `(H·D + 2·Hkv·D, C)`.
    Fused(Linear),
}

/// Multi-head (grouped-query, multi-query) attention; see the module docs.
#[derive(Clone, Debug)]
pub struct MultiHeadAttention {
    input: InputProjections,
    out_proj: Linear,
    config: MultiHeadAttentionConfig,
    dims: MhaDims,
    training: TrainingFlag,
    dropout: DropoutStream,
}

impl MultiHeadAttention {
    const OP: &'static str = "MultiHeadAttention";

    /// Validates `config` and loads (or creates) `q_proj`, `k_proj`, `v_proj`, `out_proj` under `vb` (see the module
    /// docs for names and shapes).
    pub fn new(config: &MultiHeadAttentionConfig, vb: VarBuilder) -> Result<Self> {
        let dims = config.resolve()?;
        let MhaDims { c, h, hkv, d, ckv, cv } = dims;
        let lin = |i: usize, o: usize, name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            Linear::new(i, o, config.bias, vb)
        };
        let input = if config.fused_qkv {
            InputProjections::Fused(lin(c, (h + 2 * hkv) * d, "qkv_proj")?)
        } else {
            InputProjections::Separate {
                q: lin(c, h * d, "q_proj")?,
                k: lin(ckv, hkv * d, "k_proj")?,
                v: lin(cv, hkv * d, "v_proj")?,
            }
        };
        Ok(Self {
            input,
            out_proj: lin(h * d, c, "out_proj")?,
            config: config.clone(),
            dims,
            training: TrainingFlag::default(),
            dropout: DropoutStream::default(),
        })
    }

    /// Training mode applies the config's attention dropout; evaluation (the default) never drops.
    pub fn set_training(&self, training: bool) {
        self.training.set(training)
    }

    pub fn is_training(&self) -> bool {
        self.training.get()
    }

    /// Where this layer's dropout masks come from: a stream of the model's [`DropoutRng`](crate::rng::DropoutRng)
    /// (by default, the next stream of [`DropoutRng::process_default`](crate::rng::DropoutRng::process_default)).
    pub fn set_dropout_stream(&mut self, stream: DropoutStream) {
        self.dropout = stream;
    }

    pub fn config(&self) -> &MultiHeadAttentionConfig {
        &self.config
    }

    /// The resolved sizes.
    pub fn dims(&self) -> MhaDims {
        self.dims
    }

    /// `W^Q`, `W^K`, `W^V` with weights `(H·D, C)`, `(Hkv·D, Ckv)`, `(Hkv·D, Cv)`; `None` when fused.
    pub fn qkv_separate(&self) -> Option<(&Linear, &Linear, &Linear)> {
        match &self.input {
            InputProjections::Separate { q, k, v } => Some((q, k, v)),
            InputProjections::Fused(_) => None,
        }
    }

    /// The fused `[W^Q; W^K; W^V]`, weight `(H·D + 2·Hkv·D, C)`; `None` when separate.
    pub fn qkv_fused(&self) -> Option<&Linear> {
        match &self.input {
            InputProjections::Fused(l) => Some(l),
            InputProjections::Separate { .. } => None,
        }
    }

    /// `W^O`: weight `(C, H·D)`.
    pub fn out_proj(&self) -> &Linear {
        &self.out_proj
    }

    /// Self-attention (`kv = None`) or cross-attention over the memory `kv`, which gives both keys and values.
    ///
    /// With a `cache` (self-attention only), the new keys and values are appended to it and the `T` queries attend
    /// over all `S = cached + T` positions; `mask` is resolved for `(T, S)` and end-aligned, so [`Mask::causal`] is
    /// right for prefill and for every decoding step. A rotary embedding in `opts` rotates queries and keys at
    /// positions `cached..cached + T`.
    ///
    /// # Shapes
    /// `x (B, T, C)`, `kv (B, S, Ckv)` → `out (B, T, C)`, `weights (B, H, T, S)`.
    ///
    /// # Errors
    /// Inputs of the wrong rank, width, batch size or dtype (the message names the shapes); a mask that does not fit
    /// `(B, H, T, S)`; a cache or rotary embedding with cross-attention (project the memory once with
    /// [`project_kv`](Self::project_kv) and call [`forward_projected`](Self::forward_projected) instead); a full cache.
    pub fn forward(
        &self,
        x: &Tensor,
        kv: Option<&Tensor>,
        mask: &Mask,
        cache: Option<&mut KvCache>,
        opts: &MhaOptions,
    ) -> Result<MhaOutput> {
        let train = self.is_training();
        match kv {
            None => self.run(x, None, mask, cache, opts, train),
            Some(m) => self.run(x, Some((m, m)), mask, cache, opts, train),
        }
    }

    /// Cross-attention with keys and values from separate inputs (PyTorch's `forward(query, key, value)`).
    ///
    /// # Shapes
    /// `x (B, T, C)`, `key (B, S, Ckv)`, `value (B, S, Cv)` → `out (B, T, C)`, `weights (B, H, T, S)`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward) with a memory.
    pub fn forward_qkv(
        &self,
        x: &Tensor,
        key: &Tensor,
        value: &Tensor,
        mask: &Mask,
        opts: &MhaOptions,
    ) -> Result<MhaOutput> {
        self.run(x, Some((key, value)), mask, None, opts, self.is_training())
    }

    /// Projects a memory into key and value heads once, for decoding against a fixed encoder output with
    /// [`forward_projected`](Self::forward_projected).
    ///
    /// # Shapes
    /// `key (B, S, Ckv)`, `value (B, S, Cv)` → `k (B, Hkv, S, D)`, `v (B, Hkv, S, D)`.
    pub fn project_kv(&self, key: &Tensor, value: &Tensor) -> Result<(Tensor, Tensor)> {
        self.project_kv_for(key, value, None)
    }

    /// [`project_kv`](Self::project_kv), checking the batch size against the queries' when given.
    fn project_kv_for(&self, key: &Tensor, value: &Tensor, batch: Option<usize>) -> Result<(Tensor, Tensor)> {
        let MhaDims { ckv, cv, .. } = self.dims;
        let (b, s) = self.check_input("key", key, "(B, S, Ckv)", ckv, batch)?;
        let (bv, sv) = self.check_input("value", value, "(B, S, Cv)", cv, Some(b))?;
        ensure!(
            (b, s) == (bv, sv),
            Self::OP,
            "key {} and value {} must agree in (B, S)",
            shape_str(key),
            shape_str(value)
        );
        let (_, k_proj, v_proj) = self.separate("cross-attention")?;
        Ok((self.split_heads(k_proj, key, b, s)?, self.split_heads(v_proj, value, b, s)?))
    }

    /// The three separate projections, or an error naming `what` needs them.
    fn separate(&self, what: &str) -> Result<(&Linear, &Linear, &Linear)> {
        match &self.input {
            InputProjections::Separate { q, k, v } => Ok((q, k, v)),
            InputProjections::Fused(_) => {
                crate::bail!(Self::OP, "{what} needs separate q/k/v projections; this layer was built with fused_qkv")
            }
        }
    }

    /// Attention of the queries of `x` over key and value heads from [`project_kv`](Self::project_kv).
    ///
    /// # Shapes
    /// `x (B, T, C)`, `k (B, Hkv, S, D)`, `v (B, Hkv, S, D)` → `out (B, T, C)`, `weights (B, H, T, S)`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), and `k`/`v` not of shape `(B, Hkv, S, D)` for this layer's `Hkv` and `D`.
    pub fn forward_projected(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Mask,
        opts: &MhaOptions,
    ) -> Result<MhaOutput> {
        let MhaDims { hkv, d, .. } = self.dims;
        ensure!(opts.rope.is_none(), Self::OP, "a rotary embedding applies to self-attention only");
        let (b, _) = self.check_input("x", x, "(B, T, C)", self.dims.c, None)?;
        for (name, t) in [("k", k), ("v", v)] {
            let ok = t.rank() == 4 && t.dim(0)? == b && t.dim(1)? == hkv && t.dim(3)? == d;
            ensure!(ok, Self::OP, "{name} {} must be (B, Hkv, S, D) = ({b}, {hkv}, S, {d})", shape_str(t));
        }
        let q = self.project_q(x)?;
        // Heads-major keys for the core's `q kᵀ` (a no-op for project_kv's output).
        self.attend_and_merge(&q, &k.contiguous()?, v, mask, opts, self.is_training())
    }

    /// The one forward path: projections, rotary embedding, cache, attention core, output projection.
    fn run(
        &self,
        x: &Tensor,
        memory: Option<(&Tensor, &Tensor)>,
        mask: &Mask,
        cache: Option<&mut KvCache>,
        opts: &MhaOptions,
        train: bool,
    ) -> Result<MhaOutput> {
        let MhaDims { c, ckv, .. } = self.dims;
        let (b, t) = self.check_input("x", x, "(B, T, C)", c, None)?;
        if memory.is_some() {
            ensure!(
                cache.is_none(),
                Self::OP,
                "a KV cache with cross-attention would append the memory again on every call; project it once with \
                 project_kv and decode with forward_projected"
            );
            ensure!(
                opts.rope.is_none(),
                Self::OP,
                "a rotary embedding applies to self-attention only (queries and keys from one sequence)"
            );
        }

        // 1. Projections and head split.
        let (q, k, v) = match (memory, &self.input) {
            (Some((key, value)), _) => {
                let (k, v) = self.project_kv_for(key, value, Some(b))?; // (B, Hkv, S, D) each
                (self.project_q(x)?, k, v)
            }
            (None, InputProjections::Fused(qkv)) => {
                let MhaDims { h, hkv, d, .. } = self.dims;
                let all = qkv.forward(x)?; // (B, T, (H + 2·Hkv)·D)
                let heads = |start: usize, n: usize| -> Result<Tensor> {
                    let part = all.narrow(2, start * d, n * d)?.reshape((b, t, n, d))?; // (B, T, n, D)
                    Ok(part.transpose(1, 2)?.contiguous()?) // (B, n, T, D)
                };
                (heads(0, h)?, heads(h, hkv)?, heads(h + hkv, hkv)?)
            }
            (None, InputProjections::Separate { k: k_proj, v: v_proj, .. }) => {
                ensure!(
                    ckv == c && self.dims.cv == c,
                    Self::OP,
                    "self-attention needs kv_dim = value_dim = d_model = {c}, but the layer was built with kv_dim = \
                     {ckv}, value_dim = {}",
                    self.dims.cv
                );
                let q = self.project_q(x)?; // (B, H, T, D)
                let k = self.split_heads(k_proj, x, b, t)?; // (B, Hkv, T, D)
                let v = self.split_heads(v_proj, x, b, t)?; // (B, Hkv, T, D)
                (q, k, v)
            }
        };

        // 2. Rotary embedding at absolute positions: the new tokens follow the cached ones.
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let (q, k) = match opts.rope {
            Some(rope) => (rope.apply(&q, offset)?, rope.apply(&k, offset)?),
            None => (q, k),
        };

        // 3. Cache: attend over every position decoded so far.
        let (k, v) = match cache {
            Some(cache) => cache.append(&k, &v)?, // (B, Hkv, S, D) each
            None => (k, v),
        };
        self.attend_and_merge(&q, &k, &v, mask, opts, train)
    }

    /// Key or value heads `(B, Hkv, L, D)` from an input `(B, L, ·)`, contiguous: the core multiplies by `kᵀ` in
    /// place, which needs the head-major layout rather than the strided view the transpose leaves.
    fn split_heads(&self, proj: &Linear, x: &Tensor, b: usize, l: usize) -> Result<Tensor> {
        let MhaDims { hkv, d, .. } = self.dims;
        let heads = proj.forward(x)?.reshape((b, l, hkv, d))?; // (B, L, Hkv, D)
        Ok(heads.transpose(1, 2)?.contiguous()?) // (B, Hkv, L, D)
    }

    /// `q (B, H, T, D)` from `x (B, T, C)`.
    fn project_q(&self, x: &Tensor) -> Result<Tensor> {
        let MhaDims { h, d, .. } = self.dims;
        let (b, t, _) = x.dims3()?;
        let (q_proj, _, _) = self.separate("cross-attention")?;
        Ok(q_proj.forward(x)?.reshape((b, t, h, d))?.transpose(1, 2)?) // (B, H, T, D)
    }

    /// The attention core on projected heads, then `Concat(heads) W^O`.
    fn attend_and_merge(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Mask,
        opts: &MhaOptions,
        train: bool,
    ) -> Result<MhaOutput> {
        let MhaDims { h, d, .. } = self.dims;
        let (b, _, t, _) = q.dims4()?;
        ensure!(
            q.dtype() == k.dtype() && q.dtype() == v.dtype(),
            Self::OP,
            "q {:?}, k {:?} and v {:?} dtypes differ",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
        let dropout = (train && self.config.dropout > 0.0)
            .then(|| AttentionDropout { p: self.config.dropout, seed: self.dropout.next_seed() });
        let core_opts = AttentionOptions {
            scale: self.config.scale,
            dropout,
            need_weights: opts.need_weights,
            need_lse: false,
            implementation: opts.implementation,
            ..Default::default()
        };
        let att = attention_with(q, k, v, mask, &core_opts)?;
        let merged = att.out.transpose(1, 2)?.reshape((b, t, h * d))?; // (B, T, H·D)
        let out = self.out_proj.forward(&merged)?; // (B, T, C)
        Ok(MhaOutput { out, weights: att.weights })
    }

    /// Checks a rank-3 input `(B, L, width)`; returns `(B, L)`.
    fn check_input(
        &self,
        name: &str,
        x: &Tensor,
        layout: &str,
        width: usize,
        batch: Option<usize>,
    ) -> Result<(usize, usize)> {
        let xs = shape_str(x);
        ensure!(x.rank() == 3, Self::OP, "{name} must be {layout}, got {name} {xs}");
        let (b, l, w) = x.dims3()?;
        ensure!(w == width, Self::OP, "{name} {xs} has width {w}, but the layer was built for {width} ({layout})");
        ensure!(b > 0 && l > 0, Self::OP, "{name} {xs} is empty");
        if let Some(want) = batch {
            ensure!(b == want, Self::OP, "{name} {xs} has batch size {b}, the queries {want}");
        }
        let wdt = self.out_proj.weight().dtype();
        ensure!(x.dtype() == wdt, Self::OP, "{name} {xs} is {:?} but the parameters are {wdt:?}", x.dtype());
        Ok((b, l))
    }
}

/// Bidirectional self-attention with no mask, in the layer's own training mode: `x (B, T, C) → (B, T, C)`.
/// (candle's blanket `ModuleT` for every `Module` ignores its `train` argument: switch modes with
/// [`set_training`](MultiHeadAttention::set_training).)
impl Module for MultiHeadAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.run(x, None, &Mask::none(), None, &MhaOptions::default(), self.is_training())?.out)
    }
}
