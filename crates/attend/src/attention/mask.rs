//! The one mask/bias description of the attention core.
//!
//! A [`Mask`] says which keys each query may see and what is added to the scores. Components combine: every
//! visibility rule must allow a key for it to be seen, and biases add. Conventions, for query `i ∈ 0..T`, key
//! `j ∈ 0..S`, and the end-aligned diagonal `d = i + S − T` (the last query sits on the last key, so a query block
//! of a decoder with a KV cache lines up with its keys):
//!
//! | component | rule |
//! |-----------|------|
//! | [`causal`](Mask::with_causal) | visible iff `j ≤ d` (PyTorch's `is_causal` when `T = S`) |
//! | [`window (l, r)`](Mask::with_window) | visible iff `d − l ≤ j ≤ d + r` (with causal only as `(l, 0)`) |
//! | [`key lengths`](Mask::with_key_lengths) | visible iff `j < len[b]` (right padding of keys) |
//! | [`prefix-LM`](Mask::with_prefix_lengths) | visible iff `j ≤ d` or `j < prefix[b]` (implies causality) |
//! | [`documents`](Mask::with_documents) | visible iff `q_doc[b, i] = k_doc[b, j]` (packed sequences) |
//! | [`tensor`](Mask::with_tensor) | boolean `(…)` with 1 = visible, or additive; broadcastable to `(B, H, T, S)` |
//! | [`ALiBi`](Mask::with_alibi) | adds `−m_h · |d − j|` with the paper's slopes `m_h` for `H` heads |
//! | [`soft-cap c`](Mask::with_softcap) | the scaled score `s` becomes `c · tanh(s / c)` before any bias is added |
//!
//! Order of application: `s = scale · q·k` → soft-cap → `+ ALiBi + additive tensor` → invisible keys get −∞ →
//! softmax. A query that sees no key at all gets an output of zeros, a log-sum-exp of −∞ and zero gradients.
//!
//! Contradictory combinations are errors, not guesses: causal with prefix-LM (prefix-LM already defines the
//! causal part), causal with a window reaching right of the diagonal, prefix-LM with a window.

use candle_core::{DType, Device, Shape, Tensor};

use attend_kernels::flash::masks::{MaskMod, StandardMask};

use crate::position::alibi::alibi_slopes;
use crate::{bail, ensure, Result};

/// ALiBi slopes: the paper's for the number of heads, or given explicitly (one per query head).
#[derive(Clone, Debug, PartialEq)]
pub enum Alibi {
    Paper,
    Slopes(Vec<f64>),
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Mask {
    causal: bool,
    window: Option<(usize, usize)>,
    key_lengths: Option<Vec<usize>>,
    prefix_lengths: Option<Vec<usize>>,
    documents: Option<(Tensor, Tensor)>,
    tensor: Option<MaskTensor>,
    alibi: Option<Alibi>,
    softcap: Option<f64>,
}

/// The structural part of a mask resolved for one call's sizes, read by the bias builder and by fused kernels.
#[derive(Clone, Debug)]
pub struct ResolvedMask {
    pub t: usize,
    pub s: usize,
    pub causal: bool,
    pub window: Option<(usize, usize)>,
    pub key_lengths: Option<Vec<usize>>,
    pub prefix_lengths: Option<Vec<usize>>,
    /// `(q_doc (B·T), k_doc (B·S))`, row-major.
    pub documents: Option<(Vec<i64>, Vec<i64>)>,
    /// One slope per query head.
    pub alibi: Option<Vec<f64>>,
}

impl ResolvedMask {
    /// The structural rules as the kernels' [`StandardMask`]: the one place where visibility is defined, read by
    /// the fused kernel and by the materialised paths alike.
    pub fn as_standard(&self) -> StandardMask<'_> {
        StandardMask {
            t: self.t,
            s: self.s,
            causal: self.causal,
            window: self.window,
            key_lengths: self.key_lengths.as_deref(),
            prefix_lengths: self.prefix_lengths.as_deref(),
            documents: self.documents.as_ref().map(|(a, b)| (&a[..], &b[..])),
            keep: None,
        }
    }

    /// Whether query `i` of batch `b` may see key `j` under the structural rules (not the explicit tensor).
    #[inline]
    pub fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        self.as_standard().visible(b, 0, i, j)
    }

    /// Whether any rule depends on the batch index.
    pub fn per_batch(&self) -> bool {
        self.key_lengths.is_some() || self.prefix_lengths.is_some() || self.documents.is_some()
    }

    /// Whether any rule restricts visibility at all.
    pub fn restricts(&self) -> bool {
        self.causal || self.window.is_some() || self.per_batch()
    }
}

impl Mask {
    /// Every query sees every key.
    pub fn none() -> Self {
        Self::default()
    }

    /// Shorthand for `Mask::none().with_causal()`.
    pub fn causal() -> Self {
        Self::default().with_causal()
    }

    pub fn with_causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// A window side that reaches every key on its side of the diagonal, e.g. `with_window(Mask::UNBOUNDED, 0)`
    /// (any side at least as long as the sequence acts the same).
    pub const UNBOUNDED: usize = attend_kernels::flash::masks::UNBOUNDED;

    /// Keys from `left` before to `right` after the diagonal (inclusive); `(l, 0)` with causal is a sliding window.
    /// Either side may be [`Mask::UNBOUNDED`].
    pub fn with_window(mut self, left: usize, right: usize) -> Self {
        self.window = Some((left, right));
        self
    }

    /// Valid key count per batch element (`B` values, each `≤ S`).
    pub fn with_key_lengths(mut self, lengths: Vec<usize>) -> Self {
        self.key_lengths = Some(lengths);
        self
    }

    /// Prefix-LM: the first `prefix[b]` keys are visible to every query, the rest causally (`B` values).
    pub fn with_prefix_lengths(mut self, prefix: Vec<usize>) -> Self {
        self.prefix_lengths = Some(prefix);
        self
    }

    /// Document ids of queries `(B, T)` and keys `(B, S)` (integer tensors); a query sees only keys of its document.
    pub fn with_documents(mut self, q_doc: Tensor, k_doc: Tensor) -> Self {
        self.documents = Some((q_doc, k_doc));
        self
    }

    /// An explicit boolean or additive tensor broadcastable to `(B, H, T, S)`.
    pub fn with_tensor(mut self, tensor: MaskTensor) -> Self {
        self.tensor = Some(tensor);
        self
    }

    /// ALiBi with the paper's slopes for the number of query heads.
    pub fn with_alibi(mut self) -> Self {
        self.alibi = Some(Alibi::Paper);
        self
    }

    /// ALiBi with explicit slopes, one per query head.
    pub fn with_alibi_slopes(mut self, slopes: Vec<f64>) -> Self {
        self.alibi = Some(Alibi::Slopes(slopes));
        self
    }

    /// Soft-capping `c · tanh(s / c)` of the scaled scores (Gemma 2, Grok).
    pub fn with_softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }

    pub fn is_causal(&self) -> bool {
        self.causal
    }
    pub fn window(&self) -> Option<(usize, usize)> {
        self.window
    }
    pub fn key_lengths(&self) -> Option<&[usize]> {
        self.key_lengths.as_deref()
    }
    pub fn prefix_lengths(&self) -> Option<&[usize]> {
        self.prefix_lengths.as_deref()
    }
    pub fn documents(&self) -> Option<(&Tensor, &Tensor)> {
        self.documents.as_ref().map(|(a, b)| (a, b))
    }
    pub fn tensor(&self) -> Option<&MaskTensor> {
        self.tensor.as_ref()
    }
    pub fn alibi(&self) -> Option<&Alibi> {
        self.alibi.as_ref()
    }
    pub fn softcap(&self) -> Option<f64> {
        self.softcap
    }

    /// Checks the mask against the call's sizes and resolves it (document ids read to the host, ALiBi slopes
    /// computed). Errors name the component and the shapes.
    pub fn resolve(&self, b: usize, h: usize, t: usize, s: usize) -> Result<ResolvedMask> {
        const OP: &str = "attention mask";
        if self.causal && self.prefix_lengths.is_some() {
            bail!(OP, "causal and prefix-LM both set: prefix-LM is already causal outside the prefix; set one");
        }
        if let Some((l, r)) = self.window {
            ensure!(
                !(self.causal && r > 0),
                OP,
                "causal with window ({l}, {r}) is contradictory: causal allows no key right of the diagonal; use ({l}, 0)"
            );
            ensure!(self.prefix_lengths.is_none(), OP, "prefix-LM with a window ({l}, {r}) is ambiguous; choose one");
        }
        for (name, v) in [("key_lengths", &self.key_lengths), ("prefix_lengths", &self.prefix_lengths)] {
            if let Some(v) = v {
                ensure!(v.len() == b, OP, "{name} has {} entries for batch size {b}", v.len());
                if let Some((i, &x)) = v.iter().enumerate().find(|(_, &x)| x > s) {
                    bail!(OP, "{name}[{i}] = {x} exceeds the key length S = {s}");
                }
            }
        }
        let documents = match &self.documents {
            None => None,
            Some((qd, kd)) => {
                ensure!(
                    qd.dims() == [b, t] && kd.dims() == [b, s],
                    OP,
                    "document ids have shapes q {:?} and k {:?}, expected ({b}, {t}) and ({b}, {s})",
                    qd.dims(),
                    kd.dims()
                );
                ensure!(
                    !qd.dtype().is_float() && !kd.dtype().is_float(),
                    OP,
                    "document ids must be integers, got {:?} and {:?}",
                    qd.dtype(),
                    kd.dtype()
                );
                let read = |x: &Tensor| -> Result<Vec<i64>> { Ok(x.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?) };
                Some((read(qd)?, read(kd)?))
            }
        };
        let alibi = match &self.alibi {
            None => None,
            Some(Alibi::Paper) => Some(alibi_slopes(h)),
            Some(Alibi::Slopes(v)) => {
                ensure!(v.len() == h, OP, "{} ALiBi slopes for {h} query heads", v.len());
                Some(v.clone())
            }
        };
        if let Some(c) = self.softcap {
            ensure!(c.is_finite() && c > 0.0, OP, "soft-cap must be positive and finite, got {c}");
        }
        if let Some(m) = &self.tensor {
            let t_ = m.tensor();
            ensure!(
                t_.rank() <= 4 && t_.broadcast_as((b, h, t, s)).is_ok(),
                OP,
                "mask tensor of shape {:?} does not broadcast to (B, H, T, S) = ({b}, {h}, {t}, {s})",
                t_.dims()
            );
        }
        Ok(ResolvedMask {
            t,
            s,
            causal: self.causal,
            window: self.window,
            key_lengths: self.key_lengths.clone(),
            prefix_lengths: self.prefix_lengths.clone(),
            documents,
            alibi,
        })
    }
}

impl ResolvedMask {
    /// The structural rules as a keep mask `(B | 1, 1, T, S)` (u8, 1 = visible), or `None` when every key is
    /// visible. Masking *replaces* scores (`where`), never adds −∞ to them: `NaN + (−∞)` would let a NaN that the
    /// mask hides through.
    pub fn keep(&self, b: usize, device: &Device) -> Result<Option<Tensor>> {
        if !self.restricts() {
            return Ok(None);
        }
        let (t, s) = (self.t, self.s);
        let bb = if self.per_batch() { b } else { 1 };
        let std = self.as_standard();
        let mut v = vec![0u8; bb * t * s];
        for bi in 0..bb {
            for i in 0..t {
                for j in 0..s {
                    v[(bi * t + i) * s + j] = std.visible(bi, 0, i, j) as u8;
                }
            }
        }
        Ok(Some(Tensor::from_vec(v, (bb, 1, t, s), device)?))
    }

    /// The ALiBi bias `−m_h · |d − j|`, `(1, H, T, S)` in f32, or `None` without ALiBi.
    pub fn alibi_bias(&self, device: &Device) -> Result<Option<Tensor>> {
        let Some(slopes) = &self.alibi else { return Ok(None) };
        let (t, s, h) = (self.t, self.s, slopes.len());
        let mut v = vec![0f32; h * t * s];
        for (hi, m) in slopes.iter().enumerate() {
            for i in 0..t {
                let d = (i + s) as f64 - t as f64;
                for j in 0..s {
                    v[(hi * t + i) * s + j] = (-m * (d - j as f64).abs()) as f32;
                }
            }
        }
        Ok(Some(Tensor::from_vec(v, (1, h, t, s), device)?))
    }
}

/// A mask given as a tensor, broadcastable to the tensor it masks.
#[derive(Clone, Debug)]
pub enum MaskTensor {
    /// u8, 1 = may attend, 0 = masked.
    Keep(Tensor),
    /// Added to the scores; −∞ masks. Gradients flow into it (learned biases such as T5's are passed this way).
    Additive(Tensor),
}

/// A tensor of −∞ shaped and typed like `x`.
pub(crate) fn neg_inf_like(x: &Tensor) -> Result<Tensor> {
    Ok(Tensor::full(f32::NEG_INFINITY, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

impl MaskTensor {
    /// `x` with this mask applied, composed from plain (differentiable) ops: a keep-mask 0 or an additive −∞
    /// *replaces* the entry with −∞ (so a NaN it hides stays hidden, where `NaN + (−∞)` is NaN); other additive
    /// entries add. The mask is broadcast to `x` first.
    pub(crate) fn apply_to(&self, x: &Tensor, op: &'static str) -> Result<Tensor> {
        Ok(match self.broadcast_to(x.shape(), x.dtype(), op)? {
            MaskTensor::Additive(m) => m.eq(f64::NEG_INFINITY)?.where_cond(&m, &(x + &m)?)?,
            MaskTensor::Keep(m) => m.where_cond(x, &neg_inf_like(x)?)?,
        })
    }

    pub fn tensor(&self) -> &Tensor {
        match self {
            MaskTensor::Keep(t) | MaskTensor::Additive(t) => t,
        }
    }

    /// Checks dtype and that the mask broadcasts to `shape`; returns it broadcast (a view, no copy).
    pub(crate) fn broadcast_to(&self, shape: &Shape, dtype: DType, op: &'static str) -> Result<MaskTensor> {
        let t = self.tensor();
        let ok = match self {
            MaskTensor::Keep(_) => t.dtype() == DType::U8,
            MaskTensor::Additive(_) => t.dtype().is_float(),
        };
        ensure!(
            ok,
            op,
            "mask of dtype {:?} shape {:?}: a boolean mask must be u8, an additive one a float",
            t.dtype(),
            t.dims()
        );
        let b = t.broadcast_as(shape.clone()).map_err(|_| {
            crate::Error::invalid(op, format!("mask of shape {:?} does not broadcast to {:?}", t.dims(), shape.dims()))
        })?;
        Ok(match self {
            MaskTensor::Keep(_) => MaskTensor::Keep(b),
            MaskTensor::Additive(_) => MaskTensor::Additive(b.to_dtype(dtype)?),
        })
    }
}
