//! The attention core: `softmax(mask(scale · Q Kᵀ)) V`, the one function every layer and model calls.
//!
//! # Shapes
//! - `q`: `(B, H, T, D)`
//! - `k`: `(B, Hkv, S, D)`, `v`: `(B, Hkv, S, Dv)`, with `H % Hkv == 0`; query head `h` reads K/V head
//!   `h / (H / Hkv)` (grouped-query attention; `Hkv = 1` is multi-query attention)
//! - output `(B, H, T, Dv)`; weights `(B, H, T, S)`; log-sum-exp `(B, H, T)`
//!
//! Grouped heads are handled by viewing the `G = H / Hkv` query heads of a group as extra query rows,
//! `(B, Hkv, G·T, D)`, so K and V are never repeated in memory.

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor};

use super::mask::{neg_inf_like, Mask, ResolvedMask};
use crate::ops::{self, MaskTensor};
use crate::{ensure, Result};

/// How the core computes attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// The flash kernel (`attend_kernels::flash`): tiled online softmax, forward and backward, memory linear in the
    /// sequence length. Calls it cannot serve (f64, a non-CPU device, a learned additive bias that needs its
    /// gradient) run [`Materialized`](Self::Materialized) instead.
    #[default]
    Fused,
    /// Materialises the `(B, H, T, S)` scores; fused masked softmax (and dropout) with hand-written backward
    /// passes between candle matmuls.
    Materialized,
    /// Materialises the scores too, everything composed from plain differentiable candle ops: the oracle for the
    /// other paths.
    Reference,
}

/// Dropout on the attention probabilities, reproducible from its seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionDropout {
    pub p: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Default)]
pub struct AttentionOptions {
    /// Multiplies `q·k`; `None` means `1/√D`.
    pub scale: Option<f64>,
    pub dropout: Option<AttentionDropout>,
    /// Return the `(B, H, T, S)` probabilities (before dropout).
    pub need_weights: bool,
    /// With `need_weights`, only these query heads, in this order: weights `(B, len, T, S)`. The fused path
    /// recomputes just those heads from the saved log-sum-exp, so looking inside one head of a long sequence costs
    /// one head's `T × S`, not all of them.
    pub weight_heads: Option<Vec<usize>>,
    /// Return the `(B, H, T)` natural-log sum-exp of the scaled, capped, biased, masked scores.
    pub need_lse: bool,
    pub implementation: AttentionImpl,
}

#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// `(B, H, T, Dv)`
    pub out: Tensor,
    /// `(B, H, T, S)` when requested.
    pub weights: Option<Tensor>,
    /// `(B, H, T)` when requested; −∞ for a query that sees no key.
    pub lse: Option<Tensor>,
}

/// `softmax(mask(scale · Q Kᵀ)) V` with the default options; see [`attention_with`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: Option<f64>) -> Result<Tensor> {
    let opts = AttentionOptions { scale, ..Default::default() };
    Ok(attention_with(q, k, v, mask, &opts)?.out)
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
    dv: usize,
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    const OP: &str = "attention";
    ensure!(
        q.rank() == 4 && k.rank() == 4 && v.rank() == 4,
        OP,
        "q, k, v must be (B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, Dv); got {:?}, {:?}, {:?}",
        q.dims(),
        k.dims(),
        v.dims()
    );
    let (b, h, t, d) = q.dims4()?;
    let (bk, hkv, s, dk) = k.dims4()?;
    let (bv, hv, sv, dv) = v.dims4()?;
    ensure!(b == bk && b == bv, OP, "batch sizes differ: q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    ensure!(hkv == hv && s == sv, OP, "k {:?} and v {:?} must agree in (B, Hkv, S)", k.dims(), v.dims());
    ensure!(d == dk, OP, "head dims differ: q {:?} has D = {d}, k {:?} has D = {dk}", q.dims(), k.dims());
    ensure!(
        hkv > 0 && h % hkv == 0,
        OP,
        "query heads H = {h} (q {:?}) are not a multiple of key/value heads Hkv = {hkv} (k {:?})",
        q.dims(),
        k.dims()
    );
    ensure!(
        q.dtype() == k.dtype() && q.dtype() == v.dtype() && q.dtype().is_float(),
        OP,
        "q, k, v must share one float dtype, got {:?}, {:?}, {:?}",
        q.dtype(),
        k.dtype(),
        v.dtype()
    );
    ensure!(
        q.device().same_device(k.device()) && q.device().same_device(v.device()),
        OP,
        "q, k, v are on different devices"
    );
    ensure!(
        d > 0 && dv > 0,
        OP,
        "head dims must be positive: q {:?}, k {:?}, v {:?} (an empty B, H, T or S is fine)",
        q.dims(),
        k.dims(),
        v.dims()
    );
    Ok(Dims { b, h, hkv, t, s, d, dv })
}

/// Validates the options against `H` query heads of dim `D`; returns the scale (default `1/√D`).
fn check_options(op: &'static str, opts: &AttentionOptions, h: usize, d: usize) -> Result<f64> {
    let scale = opts.scale.unwrap_or(1.0 / (d as f64).sqrt());
    ensure!(scale.is_finite(), op, "scale must be finite, got {scale}");
    if let Some(dp) = opts.dropout {
        ensure!((0.0..1.0).contains(&dp.p), op, "dropout probability must be in [0, 1), got {}", dp.p);
    }
    if let Some(heads) = &opts.weight_heads {
        ensure!(heads.iter().all(|&x| x < h), op, "weight_heads {heads:?} name heads outside 0..{h}");
    }
    Ok(scale)
}

/// Attention with every option; see the module docs for shapes and [`Mask`] for the mask semantics.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    let dims = check(q, k, v)?;
    let Dims { b, h, hkv, t, s, d, dv } = dims;
    let resolved = mask.resolve(b, h, t, s)?;
    let scale = check_options("attention", opts, h, d)?;
    if b * h * t * s == 0 {
        return empty(q, dims, opts);
    }
    if opts.implementation == AttentionImpl::Fused && super::fused::supported(q, mask) {
        let (out, weights, lse) = super::fused::attention(q, k, v, mask, resolved, scale, opts)?;
        return Ok(AttentionOutput { out, weights, lse });
    }
    let g = h / hkv;
    let reference = opts.implementation == AttentionImpl::Reference;
    // A hidden pair must contribute nothing, even 0 · NaN: when the data hold NaN or ±∞ (checked here for q, k, v;
    // for the upstream gradient in the backward of `visible_product`), pairs are formed one by one.
    let hides = resolved.restricts() || mask.tensor().is_some();
    if hides && [q, k, v].into_iter().map(non_finite).collect::<candle_core::Result<Vec<_>>>()?.contains(&true) {
        return pairwise(q, k, v, mask, &resolved, scale, opts, dims);
    }

    // 1. Scores. The G query heads of a K/V group become rows: no copy of K.
    let qg = q.contiguous()?.reshape((b, hkv, g * t, d))?; // (B, Hkv, G·T, D)
    let scores = qg.matmul(&matmul_ready(k)?.t()?)?; // (B, Hkv, G·T, S)
    let scores = (scores.reshape((b, h, t, s))? * scale)?; // (B, H, T, S)

    // 2.–4. Soft-cap, ALiBi, structural masks.
    let scores = mod_and_mask(scores, mask, &resolved, b)?;

    // 5. Softmax, with the explicit tensor applied inside it (its gradient, if additive, comes from there).
    let explicit = mask.tensor();
    let probs = if reference { ops::softmax_reference(&scores, explicit)? } else { ops::softmax(&scores, explicit)? }; // (B, H, T, S)

    let lse = if opts.need_lse { Some(masked_lse(&scores, explicit)?) } else { None };

    // 6. Dropout on probabilities; the returned weights are the pre-dropout ones.
    let dropped = dropout(&probs, opts, reference)?;

    // 7. Weighted sum of values, again with grouped heads as rows.
    let pg = dropped.reshape((b, hkv, g * t, s))?; // (B, Hkv, G·T, S)
    let vr = matmul_ready(v)?;
    let out = if hides && (pg.track_op() || vr.track_op()) {
        let hidden = Hidden { mask: mask.clone(), resolved, dims };
        visible_product(&pg, &vr, hidden)?
    } else {
        pg.matmul(&vr)?
    };
    let out = out.reshape((b, h, t, dv))?; // (B, H, T, Dv)

    Ok(AttentionOutput { out, weights: chosen_weights(probs, opts)?, lse })
}

/// A call with nothing to attend: `T = 0` (or `B = 0`, `H = 0`) gives empty outputs; `S = 0` leaves every query
/// without a key, so outputs and weights are 0 and the log-sum-exp −∞, as for any fully masked row.
fn empty(q: &Tensor, Dims { b, h, t, s, dv, .. }: Dims, opts: &AttentionOptions) -> Result<AttentionOutput> {
    let (dev, dt) = (q.device(), q.dtype());
    let heads = opts.weight_heads.as_ref().map_or(h, |x| x.len());
    let weights = if opts.need_weights { Some(Tensor::zeros((b, heads, t, s), dt, dev)?) } else { None };
    let lse_dt = if dt == DType::F64 { DType::F64 } else { DType::F32 };
    let lse =
        if opts.need_lse { Some(Tensor::full(f32::NEG_INFINITY, (b, h, t), dev)?.to_dtype(lse_dt)?) } else { None };
    Ok(AttentionOutput { out: Tensor::zeros((b, h, t, dv), dt, dev)?, weights, lse })
}

/// Soft-cap, then ALiBi, then the structural masks, on scaled scores `(B, H, T, S)`. The soft-cap comes before any
/// bias so a −∞ never goes through tanh; the mask *replaces* hidden scores with −∞ (adding −∞ to a NaN score
/// would leave NaN, and a NaN the mask hides must not reach the softmax).
pub(crate) fn mod_and_mask(mut scores: Tensor, mask: &Mask, resolved: &ResolvedMask, b: usize) -> Result<Tensor> {
    if let Some(c) = mask.softcap() {
        scores = ((scores / c)?.tanh()? * c)?;
    }
    if let Some(bias) = resolved.alibi_bias(scores.device())? {
        scores = scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?; // (1, H, T, S)
    }
    if let Some(keep) = resolved.keep(b, scores.device())? {
        let keep = keep.broadcast_as(scores.shape())?; // (B|1, 1, T, S) → (B, H, T, S)
        scores = keep.where_cond(&scores, &neg_inf_like(&scores)?)?;
    }
    Ok(scores)
}

/// Dropout on the probabilities when the options ask for it.
fn dropout(probs: &Tensor, opts: &AttentionOptions, reference: bool) -> Result<Tensor> {
    Ok(match opts.dropout {
        Some(dp) if dp.p > 0.0 && reference => ops::dropout_reference(probs, dp.p, dp.seed, 0)?,
        Some(dp) if dp.p > 0.0 => ops::dropout(probs, dp.p, dp.seed, 0)?,
        _ => probs.clone(),
    })
}

/// The weights the options ask for: all heads, or the chosen ones `(B, len, T, S)`.
fn chosen_weights(probs: Tensor, opts: &AttentionOptions) -> Result<Option<Tensor>> {
    Ok(match (&opts.weight_heads, opts.need_weights) {
        (_, false) => None,
        (None, true) => Some(probs),
        (Some(heads), true) => {
            let idx =
                Tensor::from_vec(heads.iter().map(|&x| x as u32).collect::<Vec<_>>(), heads.len(), probs.device())?;
            Some(probs.index_select(&idx, 1)?) // (B, len, T, S)
        }
    })
}

/// The visible pairs `(B, H, T, S)` (u8), or `None` when the mask hides nothing: structural rules, a boolean
/// tensor, an additive tensor's −∞ entries.
fn visible_pairs(mask: &Mask, resolved: &ResolvedMask, d: Dims, dev: &Device) -> Result<Option<Tensor>> {
    let Dims { b, h, t, s, .. } = d;
    let structural = resolved.keep(b, dev)?.map(|k| k.broadcast_as((b, h, t, s))).transpose()?;
    let explicit = match mask.tensor() {
        None => None,
        Some(MaskTensor::Keep(m)) => Some(m.to_dtype(DType::U8)?.broadcast_as((b, h, t, s))?),
        Some(MaskTensor::Additive(m)) => Some(m.ne(f64::NEG_INFINITY)?.broadcast_as((b, h, t, s))?),
    };
    Ok(match (structural, explicit) {
        (Some(k), Some(e)) => Some((k * e)?),
        (k, e) => k.or(e).map(|x| x.contiguous()).transpose()?,
    })
}

/// What [`visible_product`]'s backward needs to rebuild the visible pairs, only if it ever has to.
struct Hidden {
    mask: Mask,
    resolved: ResolvedMask,
    dims: Dims,
}

/// `p · v` whose backward keeps hidden pairs out of `dv` when the upstream gradient holds NaN or ±∞: a matrix
/// product would add `0 · NaN` from a row into the keys it never saw. The forward value is the plain product; the
/// visible pairs are built only in such a backward.
fn visible_product(p: &Tensor, v: &Tensor, hidden: Hidden) -> Result<Tensor> {
    let value = p.detach().matmul(&v.detach())?; // (B, Hkv, G·T, Dv)
    Ok(p.apply_op3_arc(v, &value, std::sync::Arc::new(Box::new(VisibleProduct(hidden))))?)
}

/// See [`visible_product`]; inputs `(p, v, value)`, output `value`.
struct VisibleProduct(Hidden);

impl candle_core::CustomOp3 for VisibleProduct {
    fn name(&self) -> &'static str {
        "attend-visible-product"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        value: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // `value` is a fresh product: its storage is exactly its contiguous elements.
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("attend-visible-product: the value must be a fresh contiguous tensor");
        }
        Ok((value.clone(), l.shape().clone()))
    }
    fn bwd(
        &self,
        p: &Tensor,
        v: &Tensor,
        _: &Tensor,
        _: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dp = dout.matmul(&v.t()?)?; // (B, Hkv, G·T, S); hidden entries are zeroed by the softmax's backward
        if !non_finite(dout)? {
            return Ok((Some(dp), Some(p.t()?.matmul(dout)?), None)); // dv (B, Hkv, S, Dv)
        }
        // Σ_i over visible pairs only: products (B, Hkv, rows, S, Dv) with hidden ones replaced by 0, a block of
        // query rows at a time so the buffer stays near 2²⁴ elements.
        let Hidden { mask, resolved, dims } = &self.0;
        let (b, hkv, rows, s) = p.dims4()?;
        let keep = match visible_pairs(mask, resolved, *dims, p.device())? {
            Some(k) => k.reshape((b, hkv, rows, s))?, // (B, Hkv, G·T, S)
            None => Tensor::ones((b, hkv, rows, s), DType::U8, p.device())?,
        };
        let dvw = v.dim(3)?;
        let block = ((1usize << 24) / (b * hkv * s * dvw).max(1)).clamp(1, rows);
        let mut dv = v.zeros_like()?; // (B, Hkv, S, Dv)
        for r0 in (0..rows).step_by(block) {
            let n = block.min(rows - r0);
            let (pr, dr) = (p.narrow(2, r0, n)?, dout.narrow(2, r0, n)?);
            let prod = pr.unsqueeze(4)?.broadcast_mul(&dr.unsqueeze(3)?)?; // (B, Hkv, n, S, Dv)
            let keep = keep.narrow(2, r0, n)?.unsqueeze(4)?.broadcast_as(prod.shape())?;
            dv = (dv + keep.where_cond(&prod, &prod.zeros_like()?)?.sum(2)?)?;
        }
        Ok((Some(dp), Some(dv), None))
    }
}

/// Whether `x` holds a NaN or ±∞ (`x − x` is NaN exactly there).
pub(crate) fn non_finite(x: &Tensor) -> candle_core::Result<bool> {
    let x = x.detach();
    (&x - &x)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>().map(f64::is_nan)
}

/// The materialised paths when q, k or v hold NaN or ±∞ and the mask hides pairs: every (query, key) pair is formed
/// on its own, with a hidden pair's operands replaced by zeros before they meet. A matrix product would add
/// `0 · NaN` from a hidden key into a row that never sees it (in the output, and in every gradient); here a hidden
/// pair contributes exactly nothing, as in the fused kernel's careful tiles. Costs `B·H·T·S·max(D, Dv)` memory —
/// the price of a rare case (a diverging run, garbage in padding), paid only then.
#[allow(clippy::too_many_arguments)]
fn pairwise(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    resolved: &ResolvedMask,
    scale: f64,
    opts: &AttentionOptions,
    dims: Dims,
) -> Result<AttentionOutput> {
    let Dims { b, h, hkv, t, s, d, dv } = dims;
    let reference = opts.implementation == AttentionImpl::Reference;
    let (dev, dt) = (q.device(), q.dtype());
    // 1. Which pairs are visible.
    let keep = match visible_pairs(mask, resolved, dims, dev)? {
        Some(k) => k,
        None => Tensor::ones((b, h, t, s), DType::U8, dev)?,
    }; // (B, H, T, S)
    let additive = match mask.tensor() {
        Some(MaskTensor::Additive(m)) => Some(m.to_dtype(dt)?.broadcast_as((b, h, t, s))?),
        _ => None,
    };
    // 2. K/V heads repeated to the query heads (this path is not about speed).
    // x (B, Hkv, S, w) → (B, H, S, w)
    let repeat = |x: &Tensor, w: usize| -> Result<Tensor> {
        Ok(x.unsqueeze(2)?.broadcast_as((b, hkv, h / hkv, s, w))?.reshape((b, h, s, w))?)
    };
    // x broadcast to (B, H, T, S, w), zero on hidden pairs.
    let pairs = |x: Tensor, w: usize| -> Result<Tensor> {
        let zeros = Tensor::zeros((b, h, t, s, w), dt, dev)?;
        Ok(keep.unsqueeze(4)?.broadcast_as((b, h, t, s, w))?.where_cond(&x.broadcast_as((b, h, t, s, w))?, &zeros)?)
    };
    // 3. Scores of visible pairs; hidden ones are −∞ after the mods.
    let qm = pairs(q.unsqueeze(3)?, d)?; // (B, H, T, S, D)
    let km = pairs(repeat(k, d)?.unsqueeze(2)?, d)?; // (B, H, T, S, D)
    let mut scores = ((qm * km)?.sum(4)? * scale)?; // (B, H, T, S)
    if let Some(c) = mask.softcap() {
        scores = ((scores / c)?.tanh()? * c)?;
    }
    if let Some(bias) = resolved.alibi_bias(dev)? {
        scores = scores.broadcast_add(&bias.to_dtype(dt)?)?;
    }
    if let Some(m) = additive {
        scores = (scores + keep.where_cond(&m, &m.zeros_like()?)?)?;
    }
    let scores = keep.where_cond(&scores, &neg_inf_like(&scores)?)?;
    let probs = if reference { ops::softmax_reference(&scores, None)? } else { ops::softmax(&scores, None)? };
    let lse = if opts.need_lse { Some(masked_lse(&scores, None)?) } else { None };
    // 4. Weighted sum over visible pairs.
    let dropped = dropout(&probs, opts, reference)?;
    let vm = pairs(repeat(v, dv)?.unsqueeze(2)?, dv)?; // (B, H, T, S, Dv)
    let out = dropped.unsqueeze(4)?.broadcast_mul(&vm)?.sum(3)?; // (B, H, T, Dv)
    Ok(AttentionOutput { out, weights: chosen_weights(probs, opts)?, lse })
}

/// `x` (B, Hkv, S, ·) as candle's batched matmul accepts it: rows contiguous and one stride per batch level.
/// A KV cache's view narrowed along S already is (no copy); a transposed projection is copied.
fn matmul_ready(x: &Tensor) -> Result<Tensor> {
    let (dims, st) = (x.dims(), x.stride());
    let ok = st[3] == 1 && st[2] == dims[3] && st[0] == dims[1] * st[1];
    Ok(if ok { x.clone() } else { x.contiguous()? })
}

/// FlexAttention-style attention with your own mask and score function, compiled into the fused kernel and
/// differentiable: `M` says which keys each query sees (and may classify whole tiles so they are skipped or left
/// unchecked), `F` transforms the scaled scores and supplies its derivative. See `attend_kernels::flash::masks` for
/// the traits and the built-in types, which compose with your own.
///
/// `opts.implementation` is ignored (this is always the fused kernel); everything else applies. Positions passed to
/// `M` and `F` are query `i ∈ 0..T`, key `j ∈ 0..S`, heads `h ∈ 0..H`.
///
/// # Shapes
/// As [`attention_with`]: q `(B, H, T, D)`, k `(B, Hkv, S, D)`, v `(B, Hkv, S, Dv)` → `(B, H, T, Dv)`.
///
/// # Errors
/// Shape mismatches as for [`attention_with`]; f64 inputs and non-CPU devices (the kernel is f32/bf16 on the CPU).
pub fn flex_attention<M, F>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: M,
    score: F,
    opts: &AttentionOptions,
) -> Result<AttentionOutput>
where
    M: attend_kernels::flash::MaskMod + Send + 'static,
    F: attend_kernels::flash::ScoreMod + Send + 'static,
{
    let dims = check(q, k, v)?;
    let Dims { b, h, t, s, d, .. } = dims;
    ensure!(
        q.device().is_cpu() && q.dtype() != DType::F64,
        "flex_attention",
        "runs the fused CPU kernel on f32/bf16/f16; got {:?} on {:?}",
        q.dtype(),
        q.device().location()
    );
    let scale = check_options("flex_attention", opts, h, d)?;
    if b * h * t * s == 0 {
        return empty(q, dims, opts);
    }
    let (out, weights, lse) = super::fused::custom(q, k, v, mask, score, scale, opts)?;
    Ok(AttentionOutput { out, weights, lse })
}

/// Log-sum-exp of the final masked scores, reported, not differentiated.
fn masked_lse(scores: &Tensor, explicit: Option<&MaskTensor>) -> Result<Tensor> {
    let scores = scores.detach();
    let masked = match explicit {
        None => scores,
        Some(m) => m.apply_to(&scores, "attention")?.detach(),
    };
    ops::logsumexp_rows(&masked) // f32, or f64 for f64 scores
}
