//! The fused path of the attention core: `attend_kernels::flash` (tiled online softmax, no `T × S` buffer) as a
//! candle custom op with a backward pass.
//!
//! The mask is compiled into one of the kernel's specialised variants: no mask, causal, sliding window, or the
//! general [`StandardMask`]; and no score mod, soft-cap, ALiBi, or the general [`StandardScore`] — so a plain
//! causal call runs a kernel with no per-element mask code at all.
//!
//! Head dims that are not multiples of 16 are zero-padded around the op (differentiably). bf16 storage runs the
//! forward with AVX512-BF16 dot products where the CPU has them (the backward in f32); f16 runs in f32.

use std::sync::{Arc, Mutex};

use attend_kernels::flash::masks::{
    Alibi, Causal, NoMask, NoScoreMod, SlidingWindow, Softcap, StandardMask, StandardScore,
};
use attend_kernels::flash::tiles::bf16_dots_pay_off;
use attend_kernels::flash::{
    flash_backward, flash_forward, flash_forward_bf16, flash_probabilities, Bf16, FlashConfig, FlashDims, FlashError,
    MaskMod, ScoreMod, QUANTUM,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::core::non_finite;
use super::mask::{Mask, ResolvedMask};
use super::AttentionOptions;
use crate::ops::MaskTensor;
use crate::Result;

/// Whether the fused kernel can serve this call; otherwise the core uses the materialised path.
pub(crate) fn supported(q: &Tensor, mask: &Mask) -> bool {
    let learned_bias = matches!(mask.tensor(), Some(MaskTensor::Additive(t)) if t.track_op());
    q.device().is_cpu() && q.dtype() != DType::F64 && !learned_bias
}

/// Everything the kernels need, on the host, owned (the op outlives the call for its backward).
struct Plan {
    dims: FlashDims,
    cfg: FlashConfig,
    mask: ResolvedMask,
    keep: Option<(Vec<u8>, [usize; 4])>,
    bias: Option<(Vec<f32>, [usize; 4])>,
    slopes: Option<Vec<f32>>,
    softcap: Option<f32>,
}

/// Where an op's mask and score mod come from: the core's [`Plan`] (dispatching to built-in variants) or a user's
/// own types ([`Custom`]).
trait Mods: Send + Sync + 'static {
    fn dims(&self) -> &FlashDims;
    fn scale(&self) -> f32;
    /// Whether the score mod has a derivative other than 1 (its chain rule must run).
    fn score_active(&self) -> bool;
    fn visit<V: Visit>(&self, v: V) -> V::Out;
}

impl Mods for Plan {
    fn dims(&self) -> &FlashDims {
        &self.dims
    }
    fn scale(&self) -> f32 {
        self.cfg.scale
    }
    fn score_active(&self) -> bool {
        self.softcap.is_some()
    }
    fn visit<V: Visit>(&self, v: V) -> V::Out {
        Plan::visit(self, v)
    }
}

/// A user's mask and score mod, run as they are.
struct Custom<M, F> {
    dims: FlashDims,
    cfg: FlashConfig,
    mask: M,
    score: F,
}

impl<M: MaskMod + Send + 'static, F: ScoreMod + Send + 'static> Mods for Custom<M, F> {
    fn dims(&self) -> &FlashDims {
        &self.dims
    }
    fn scale(&self) -> f32 {
        self.cfg.scale
    }
    fn score_active(&self) -> bool {
        F::ACTIVE
    }
    fn visit<V: Visit>(&self, v: V) -> V::Out {
        v.run(&self.dims, &self.cfg, &self.mask, &self.score)
    }
}

/// Something to run with the plan's mask and score mod as concrete types.
trait Visit {
    type Out;
    fn run<M: MaskMod, F: ScoreMod>(self, dims: &FlashDims, cfg: &FlashConfig, mask: &M, score: &F) -> Self::Out;
}

impl Plan {
    fn offset(&self) -> isize {
        self.dims.s as isize - self.dims.t as isize
    }

    fn with_score<V: Visit, M: MaskMod>(&self, v: V, mask: &M) -> V::Out {
        let alibi = self.slopes.as_ref().map(|s| Alibi { slopes: s, offset: self.offset() });
        match (self.softcap, alibi, &self.bias) {
            (None, None, None) => v.run(&self.dims, &self.cfg, mask, &NoScoreMod),
            (Some(cap), None, None) => v.run(&self.dims, &self.cfg, mask, &Softcap { cap }),
            (None, Some(a), None) => v.run(&self.dims, &self.cfg, mask, &a),
            (softcap, alibi, bias) => {
                let bias = bias.as_ref().map(|(d, st)| (&d[..], *st));
                v.run(&self.dims, &self.cfg, mask, &StandardScore { softcap, alibi, bias })
            }
        }
    }

    /// Picks the most specialised kernel variant for this mask.
    fn visit<V: Visit>(&self, v: V) -> V::Out {
        let m = &self.mask;
        let offset = self.offset();
        let general = m.per_batch() || self.keep.is_some();
        match (m.causal, m.window, general) {
            (false, None, false) => self.with_score(v, &NoMask),
            (true, None, false) => self.with_score(v, &Causal { offset }),
            (causal, Some((left, right)), false) => {
                self.with_score(v, &SlidingWindow { offset, left, right: if causal { 0 } else { right } })
            }
            _ => {
                let general = StandardMask {
                    t: self.dims.t,
                    s: self.dims.s,
                    causal: m.causal,
                    window: m.window,
                    key_lengths: m.key_lengths.as_deref(),
                    prefix_lengths: m.prefix_lengths.as_deref(),
                    documents: m.documents.as_ref().map(|(a, b)| (&a[..], &b[..])),
                    keep: self.keep.as_ref().map(|(d, st)| (&d[..], *st)),
                };
                self.with_score(v, &general)
            }
        }
    }
}

/// A host copy of a mask tensor and its strides as a broadcast view of `(B, H, T, S)` (0 along broadcast axes).
fn host_broadcast<T: candle_core::WithDType>(
    t: &Tensor,
    full: (usize, usize, usize, usize),
) -> Result<(Vec<T>, [usize; 4])> {
    let dims = t.dims();
    let mut padded = [1usize; 4];
    padded[4 - dims.len()..].copy_from_slice(dims);
    let full = [full.0, full.1, full.2, full.3];
    let mut strides = [0usize; 4];
    let mut acc = 1;
    for a in (0..4).rev() {
        strides[a] = if padded[a] == 1 && full[a] != 1 { 0 } else { acc };
        acc *= padded[a];
    }
    Ok((t.flatten_all()?.to_vec1::<T>()?, strides))
}

/// The forward on f32 or (with AVX512-BF16) bf16 storage; returns the output storage and the log-sum-exp.
enum Forward<'a> {
    F32(&'a [f32], &'a [f32], &'a [f32]),
    Bf16(&'a [Bf16], &'a [Bf16], &'a [Bf16]),
}

impl Visit for Forward<'_> {
    type Out = std::result::Result<(CpuStorage, Vec<f32>), FlashError>;
    fn run<M: MaskMod, F: ScoreMod>(self, dims: &FlashDims, cfg: &FlashConfig, mask: &M, score: &F) -> Self::Out {
        let d = dims;
        let n = d.b * d.h * d.t * d.dv;
        let mut lse = vec![0f32; d.b * d.h * d.t];
        let out = match self {
            Forward::F32(q, k, v) => {
                let mut o = vec![0f32; n];
                flash_forward(d, cfg, mask, score, q, k, v, &mut o, &mut lse)?;
                CpuStorage::F32(o)
            }
            Forward::Bf16(q, k, v) => {
                let mut o = vec![Bf16(0); n];
                flash_forward_bf16(d, cfg, mask, score, q, k, v, &mut o, &mut lse)?;
                CpuStorage::BF16(o.into_iter().map(|x| half::bf16::from_bits(x.0)).collect())
            }
        };
        Ok((out, lse))
    }
}

struct Backward<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    lse: &'a [f32],
    dout: &'a [f32],
}

impl Visit for Backward<'_> {
    type Out = std::result::Result<(Vec<f32>, Vec<f32>, Vec<f32>), FlashError>;
    fn run<M: MaskMod, F: ScoreMod>(self, dims: &FlashDims, cfg: &FlashConfig, mask: &M, score: &F) -> Self::Out {
        let (mut dq, mut dk, mut dv) = (vec![0f32; self.q.len()], vec![0f32; self.k.len()], vec![0f32; self.v.len()]);
        flash_backward(
            dims, cfg, mask, score, self.q, self.k, self.v, self.o, self.lse, self.dout, &mut dq, &mut dk, &mut dv,
        )?;
        Ok((dq, dk, dv))
    }
}

struct Probabilities<'a> {
    q: &'a [f32],
    k: &'a [f32],
    lse: &'a [f32],
    heads: &'a [usize],
}

impl Visit for Probabilities<'_> {
    type Out = std::result::Result<Vec<f32>, FlashError>;
    fn run<M: MaskMod, F: ScoreMod>(self, dims: &FlashDims, cfg: &FlashConfig, mask: &M, score: &F) -> Self::Out {
        let d = dims;
        let mut out = Vec::with_capacity(d.b * self.heads.len() * d.t * d.s);
        for b in 0..d.b {
            for &h in self.heads {
                out.extend(flash_probabilities(d, cfg, mask, score, self.q, self.k, self.lse, b, h)?);
            }
        }
        Ok(out)
    }
}

/// The attention probabilities of chosen heads as a candle op: inputs q, k (f32, contiguous, padded), output
/// `(B, len, T, S)` recomputed from the forward's log-sum-exp. Backward (softmax Jacobian, then the score mod's
/// chain rule, then the score product):
///
/// ```text
/// dS = P ⊙ (dP − rowsum(dP ⊙ P)) ⊙ f'(s)      (0 on hidden pairs)
/// dQ_h += scale · dS K_g(h),   dK_g(h) += scale · dSᵀ Q_h
/// ```
struct WeightsOp<P> {
    plan: Arc<P>,
    lse: Arc<Vec<f32>>,
    heads: Vec<usize>,
}

impl<P: Mods> candle_core::CustomOp2 for WeightsOp<P> {
    fn name(&self) -> &'static str {
        "attend-flash-weights"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k) = (f32_slice(s1, l1, "q")?, f32_slice(s2, l2, "k")?);
        let p = self
            .plan
            .visit(Probabilities { q, k, lse: &self.lse, heads: &self.heads })
            .map_err(candle_core::Error::msg)?;
        let d = self.plan.dims();
        Ok((CpuStorage::F32(p), Shape::from((d.b, self.heads.len(), d.t, d.s))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let FlashDims { h, hkv, .. } = *self.plan.dims();
        let scale = self.plan.scale() as f64;
        let dev = q.device();
        let idx = |v: Vec<u32>| Tensor::from_vec(v, self.heads.len(), dev);
        let q_idx = idx(self.heads.iter().map(|&x| x as u32).collect())?;
        let kv_idx = idx(self.heads.iter().map(|&x| (x / (h / hkv)) as u32).collect())?;
        let (qs, ks) = (q.index_select(&q_idx, 1)?, k.index_select(&kv_idx, 1)?); // (B, len, T|S, Dp)
                                                                                  // dS = P ⊙ (dP − rowsum(dP ⊙ P)), then the chain rule and hidden pairs on the host.
        let ds = (p * dp.broadcast_sub(&(dp * p)?.sum_keepdim(3)?)?)?; // (B, len, T, S)
        let raw = if self.plan.score_active() { Some((qs.matmul(&ks.t()?)? * scale)?) } else { None };
        let host = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
        let mut ds_host = host(&ds)?;
        let raw_host = raw.as_ref().map(host).transpose()?;
        self.plan.visit(WeightsChain { ds: &mut ds_host, raw: raw_host.as_deref(), heads: &self.heads });
        let (dq_sel, dk_sel) = if non_finite(q)? || non_finite(k)? {
            // 0 · NaN across a hidden pair must not reach dQ or dK: sum over visible pairs only.
            let (qh, kh) = (host(&qs)?, host(&ks)?);
            let (mut dq_h, mut dk_h) = (vec![0f32; qh.len()], vec![0f32; kh.len()]);
            let pairs =
                VisibleProducts { ds: &ds_host, q: &qh, k: &kh, dq: &mut dq_h, dk: &mut dk_h, heads: &self.heads };
            self.plan.visit(pairs);
            let back = |v: Vec<f32>, like: &Tensor| -> candle_core::Result<Tensor> {
                Tensor::from_vec(v, like.shape(), dev)? * scale
            };
            (back(dq_h, &qs)?, back(dk_h, &ks)?)
        } else {
            let ds = Tensor::from_vec(ds_host, ds.shape(), dev)?;
            let dq_sel = ds.matmul(&ks)?.affine(scale, 0.0)?; // (B, len, T, Dp)
            (dq_sel, ds.t()?.matmul(&qs)?.affine(scale, 0.0)?) // dk_sel (B, len, S, Dp)
        };
        let dq = q.zeros_like()?.index_add(&q_idx, &dq_sel, 1)?;
        let dk = k.zeros_like()?.index_add(&kv_idx, &dk_sel, 1)?;
        Ok((Some(dq), Some(dk)))
    }
}

/// The host part of [`WeightsOp`]'s backward: zero hidden pairs (their `P` is 0, but `dP − rowsum` may be NaN),
/// then `dS ← dS ⊙ f'(s)` at the raw scaled scores when the score mod has a derivative.
struct WeightsChain<'a> {
    ds: &'a mut [f32],
    raw: Option<&'a [f32]>,
    heads: &'a [usize],
}

impl Visit for WeightsChain<'_> {
    type Out = ();
    fn run<M: MaskMod, F: ScoreMod>(self, dims: &FlashDims, _: &FlashConfig, mask: &M, score: &F) {
        let (t, s) = (dims.t, dims.s);
        for b in 0..dims.b {
            for (n, &h) in self.heads.iter().enumerate() {
                for i in 0..t {
                    let at = ((b * self.heads.len() + n) * t + i) * s;
                    let row = &mut self.ds[at..at + s];
                    if let Some(raw) = self.raw {
                        score.chain(b, h, i, 0, &raw[at..at + s], row);
                    }
                    for (j, x) in row.iter_mut().enumerate() {
                        if !mask.visible(b, h, i, j) {
                            *x = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// [`WeightsOp`]'s products `dS K` and `dSᵀ Q` over visible pairs only, on the host: for data holding NaN or ±∞.
/// `q (B, len, T, Dp)` and `k (B, len, S, Dp)` are the selected heads and their K/V heads.
struct VisibleProducts<'a> {
    ds: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    heads: &'a [usize],
}

impl Visit for VisibleProducts<'_> {
    type Out = ();
    fn run<M: MaskMod, F: ScoreMod>(self, dims: &FlashDims, _: &FlashConfig, mask: &M, _: &F) {
        let (t, s, d, n) = (dims.t, dims.s, dims.d, self.heads.len());
        for b in 0..dims.b {
            for (x, &h) in self.heads.iter().enumerate() {
                let bn = b * n + x;
                for i in 0..t {
                    for j in (0..s).filter(|&j| mask.visible(b, h, i, j)) {
                        let g = self.ds[(bn * t + i) * s + j];
                        let (qi, kj) = ((bn * t + i) * d, (bn * s + j) * d);
                        for e in 0..d {
                            self.dq[qi + e] += g * self.k[kj + e];
                            self.dk[kj + e] += g * self.q[qi + e];
                        }
                    }
                }
            }
        }
    }
}

/// The candle op: inputs q, k, v (f32, contiguous, padded); output o. The log-sum-exp is kept for the backward.
struct FlashOp<P> {
    plan: Arc<P>,
    lse: Arc<Mutex<Vec<f32>>>,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("fused attention: {what} must be contiguous f32, got {:?}", s.dtype()),
    }
}

fn bf16_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [Bf16]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::BF16(v), Some((a, b))) => {
            let v = &v[a..b];
            // SAFETY: half::bf16 and Bf16 are both transparent wrappers of the same u16 bits.
            Ok(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const Bf16, v.len()) })
        }
        _ => candle_core::bail!("fused attention: {what} must be contiguous bf16, got {:?}", s.dtype()),
    }
}

impl<P: Mods> CustomOp3 for FlashOp<P> {
    fn name(&self) -> &'static str {
        "attend-flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = if s1.dtype() == DType::BF16 {
            Forward::Bf16(bf16_slice(s1, l1, "q")?, bf16_slice(s2, l2, "k")?, bf16_slice(s3, l3, "v")?)
        } else {
            Forward::F32(f32_slice(s1, l1, "q")?, f32_slice(s2, l2, "k")?, f32_slice(s3, l3, "v")?)
        };
        let (o, lse) = self.plan.visit(inputs).map_err(candle_core::Error::msg)?;
        *self.lse.lock().unwrap() = lse;
        let d = self.plan.dims();
        Ok((o, Shape::from((d.b, d.h, d.t, d.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // bf16 storage runs its backward in f32 (the gradients go back to bf16 below). f32 tensors are read in place:
        // no copy of q, k, v, o or dO (at long sequence lengths each is as large as everything else together).
        let host: Vec<Tensor> = [q, k, v, o, dout]
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.contiguous())
            .collect::<candle_core::Result<_>>()?;
        let guards: Vec<_> = host.iter().map(|t| t.storage_and_layout()).collect();
        let mut views = Vec::with_capacity(5);
        for ((g, l), name) in guards.iter().zip(["q", "k", "v", "o", "dO"]) {
            match &**g {
                candle_core::Storage::Cpu(cpu) => views.push(f32_slice(cpu, l, name)?),
                _ => candle_core::bail!("fused attention backward: {name} is not on the CPU"),
            }
        }
        let (qv, kv, vv, ov, dov) = (views[0], views[1], views[2], views[3], views[4]);
        let lse = self.lse.lock().unwrap().clone();
        let (dq, dk, dv) = self
            .plan
            .visit(Backward { q: qv, k: kv, v: vv, o: ov, lse: &lse, dout: dov })
            .map_err(candle_core::Error::msg)?;
        let dev = q.device();
        let back = |g: Vec<f32>, like: &Tensor| Tensor::from_vec(g, like.shape(), dev)?.to_dtype(like.dtype());
        Ok((Some(back(dq, q)?), Some(back(dk, k)?), Some(back(dv, v)?)))
    }
}

/// Zero-pads the last axis to a multiple of the kernel's quantum (a no-op view when it already is one).
fn pad_last(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(3)?;
    let p = n.div_ceil(QUANTUM) * QUANTUM;
    Ok(if p == n { x.contiguous()? } else { x.pad_with_zeros(3, 0, p - n)?.contiguous()? })
}

/// q, k, v in the kernel's dtype (f32, or bf16 where the CPU has bf16 dot products; anything else goes through
/// f32), contiguous, head dims zero-padded to the kernel's quantum.
fn prepare(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    // bf16 storage runs the dot-product kernel only where it beats the f32 one (a per-CPU choice, see tiles.rs).
    let kernel_dtype = if q.dtype() == DType::BF16 && bf16_dots_pay_off() { DType::BF16 } else { DType::F32 };
    let cast = |x: &Tensor| -> Result<Tensor> {
        Ok(if x.dtype() == kernel_dtype { x.clone() } else { x.to_dtype(kernel_dtype)? })
    };
    Ok((pad_last(&cast(q)?)?, pad_last(&cast(k)?)?, pad_last(&cast(v)?)?))
}

/// The fused kernel with a user's own mask and score mod (see `flex_attention`). Shapes are validated by the caller.
pub(crate) fn custom<M, F>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: M,
    score: F,
    scale: f64,
    opts: &AttentionOptions,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)>
where
    M: MaskMod + Send + 'static,
    F: ScoreMod + Send + 'static,
{
    let (q32, k32, v32) = prepare(q, k, v)?;
    let (b, h, t, d) = q32.dims4()?;
    let (_, hkv, s, dv) = v32.dims4()?;
    let mut cfg = FlashConfig::for_head_dims(scale as f32, d, dv);
    cfg.dropout = opts.dropout.filter(|d| d.p > 0.0).map(|d| (d.p, d.seed));
    let plan = Custom { dims: FlashDims { b, h, hkv, t, s, d, dv }, cfg, mask, score };
    run(Arc::new(plan), q, (q32, k32, v32), v.dim(3)?, opts)
}

/// Output, weights and log-sum-exp through the fused kernel. The caller has validated shapes and resolved the mask.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    resolved: ResolvedMask,
    scale: f64,
    opts: &AttentionOptions,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let (q32, k32, v32) = prepare(q, k, v)?;
    let (b, h, t, dp) = q32.dims4()?;
    let (_, hkv, s, dvp) = v32.dims4()?;
    let dv = v.dim(3)?;
    let full = (b, h, t, s);
    let (keep, bias) = match mask.tensor() {
        None => (None, None),
        Some(MaskTensor::Keep(m)) => (Some(host_broadcast::<u8>(&m.to_dtype(DType::U8)?, full)?), None),
        Some(MaskTensor::Additive(m)) => {
            let (data, st) = host_broadcast::<f32>(&m.to_dtype(DType::F32)?, full)?;
            // An additive −∞ hides its pair: visibility, not a number to add, so careful tiles skip it too.
            let keep = data
                .contains(&f32::NEG_INFINITY)
                .then(|| (data.iter().map(|&x| (x != f32::NEG_INFINITY) as u8).collect(), st));
            (keep, Some((data, st)))
        }
    };
    let mut cfg = FlashConfig::for_head_dims(scale as f32, dp, dvp);
    cfg.dropout = opts.dropout.filter(|d| d.p > 0.0).map(|d| (d.p, d.seed));
    let plan = Plan {
        dims: FlashDims { b, h, hkv, t, s, d: dp, dv: dvp },
        cfg,
        slopes: resolved.alibi.as_ref().map(|a| a.iter().map(|&x| x as f32).collect()),
        softcap: mask.softcap().map(|c| c as f32),
        mask: resolved,
        keep,
        bias,
    };
    run(Arc::new(plan), q, (q32, k32, v32), dv, opts)
}

/// Runs the op on prepared (cast, padded) inputs and collects output, weights and log-sum-exp.
fn run<P: Mods>(
    plan: Arc<P>,
    q: &Tensor,
    (q32, k32, v32): (Tensor, Tensor, Tensor),
    dv: usize,
    opts: &AttentionOptions,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let in_dtype = q.dtype();
    let kernel_dtype = q32.dtype();
    let FlashDims { b, h, t, .. } = *plan.dims();
    let lse_cell = Arc::new(Mutex::new(Vec::new()));
    let op: Arc<Box<dyn CustomOp3 + Send + Sync>> =
        Arc::new(Box::new(FlashOp { plan: plan.clone(), lse: lse_cell.clone() }));
    let out = q32.apply_op3_arc(&k32, &v32, op)?; // (B, H, T, Dvp)
    let out = if plan.dims().dv == dv { out } else { out.narrow(3, 0, dv)? }; // (B, H, T, Dv)
    let out = if in_dtype == kernel_dtype { out } else { out.to_dtype(in_dtype)? };
    let lse_host = lse_cell.lock().unwrap().clone();
    let weights = if opts.need_weights {
        // Recomputed from the log-sum-exp for the heads asked for, as an op with a backward: a loss on the weights
        // (attention supervision, entropy or coverage penalties) reaches q and k as on the materialised path.
        let heads: Vec<usize> = opts.weight_heads.clone().unwrap_or_else(|| (0..h).collect());
        let op = WeightsOp { plan: plan.clone(), lse: Arc::new(lse_host.clone()), heads };
        let (qf, kf) = (q32.to_dtype(DType::F32)?, k32.to_dtype(DType::F32)?);
        let w = qf.apply_op2_arc(&kf, Arc::new(Box::new(op)))?; // (B, len, T, S)
        Some(w.to_dtype(in_dtype)?)
    } else {
        None
    };
    let lse = if opts.need_lse { Some(Tensor::from_vec(lse_host, (b, h, t), q.device())?) } else { None };
    Ok((out, weights, lse))
}
