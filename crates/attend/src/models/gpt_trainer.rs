//! A GPT training step without autograd, as llm.c writes it: every parameter, gradient, optimiser moment and
//! activation lives in a buffer allocated once, the forward keeps what the backward needs, and the backward is
//! written out layer by layer on the crate's fused kernels (layer norm, flash attention, GELU, cross-entropy) and
//! the products of [`attend_kernels::matmul`].
//!
//! [`Gpt`](super::gpt::Gpt) through candle's autograd is the reference twin: the same parameters under the same
//! names ([`GptTrainer::new`] reads them from its `VarMap`, [`GptTrainer::write_to`] writes them back), and the
//! tests require the same loss and the same gradient for every parameter. What the fused step saves is what a
//! graph costs at small sizes: a node, a zero-filled gradient and an addition per op, and copies for every
//! reshape or slice.
//!
//! ```text
//! forward (pre-norm, GPT-2 layout), per layer l:
//!   a = LN₁(x_l)   qkv = a W_qkvᵀ + b   o = causal-softmax(q kᵀ/√D) v   m = x_l + o W_oᵀ + b_o
//!   f = LN₂(m)     g = GELU(f W₁ᵀ + b₁)                                  x_{l+1} = m + g W₂ᵀ + b₂
//! logits = LN_f(x_L) W_eᵀ, loss = mean cross-entropy over the targets that are not ignored
//! ```
//!
//! Supported: the GPT-2 layout (pre-norm, final norm), fused or separate q/k/v projections, tied or separate output
//! embedding, exact or tanh GELU, no dropout, distinct layers. Other configurations are refused with a message
//! that names the field: train them through autograd.
//!
//! # Shapes
//! Dimension vocabulary: `B` batch, `T` positions, `N = B·T` rows, `C` model width, `H` heads, `D = C/H`, `F`
//! feed-forward width, `V` vocabulary, `L` layers.
//! - `ids (B, T)` row-major `u32`, `targets (B, T)` `i64` (`-100` = ignored) → scalar loss
//! - logits `(B, T, V)`; stored activations per layer: `(N, C)` ×6, `(B, H, T, D)` ×4, `(B, H, T)`, `(N, F)` ×2
//!
//! ```
//! use attend::models::gpt::{Gpt, GptConfig};
//! use attend::models::gpt_trainer::GptTrainer;
//! use attend_kernels::adamw::AdamW;
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let cfg = GptConfig { n_layers: 2, ..GptConfig::gpt2(50, 16, 32, 2) };
//! let vm = VarMap::new();
//! let _gpt = Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
//! let (b, t) = (2, 8);
//! let mut trainer = GptTrainer::new(&cfg, &vm, b, t)?;
//! let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 50) as u32).collect(); // (B, T)
//! let targets: Vec<i64> = ids.iter().map(|&i| ((i + 1) % 50) as i64).collect(); // (B, T)
//! trainer.zero_grad();
//! let loss = trainer.forward_backward(&ids, &targets)?;
//! trainer.step(&AdamW::default());
//! assert!(loss > 3.0 && loss < 4.5); // ≈ ln 50 at initialisation
//! trainer.write_to(&vm)?; // the Gpt sees the updated weights
//! # Ok(()) }
//! ```

use attend_kernels::adamw::{adamw_step, AdamW};
use attend_kernels::bias::{add_assign, add_bias_rows, add_column_sums};
use attend_kernels::cross_entropy::{cross_entropy_backward, cross_entropy_forward, CrossEntropyConfig};
use attend_kernels::flash::masks::{Causal, NoScoreMod};
use attend_kernels::flash::{flash_backward, flash_forward, FlashConfig, FlashDims, QUANTUM};
use attend_kernels::gelu::{gelu_backward, gelu_forward, GeluKind};
use attend_kernels::matmul::{matmul, Mat};
use attend_kernels::norm::{norm_backward, norm_forward, NormKind};
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use rayon::prelude::*;

use super::gpt::{GptConfig, GptLayout};
use crate::layers::feed_forward::Activation;
use crate::{bail, ensure, Error, Result};

const OP: &str = "GptTrainer";
/// Targets equal to this are not predicted (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// The sizes of one trainer, fixed at construction (activations are allocated for them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub h: usize,
    pub d: usize,
    pub f: usize,
    pub v: usize,
    pub l: usize,
}

impl Dims {
    fn n(&self) -> usize {
        self.b * self.t
    }
}

/// One named parameter in the flat buffers.
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    shape: Vec<usize>,
    offset: usize,
}

impl Slot {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Offsets of one layer's parameters. The q, k and v projections (fused or not) are one `(3C, C)` block and one
/// `(3C)` block: separate projections are laid out back to back so the products see one matrix.
#[derive(Clone, Copy, Debug)]
struct LayerAt {
    ln1_w: usize,
    ln1_b: usize,
    qkv_w: usize,
    qkv_b: usize,
    proj_w: usize,
    proj_b: usize,
    ln2_w: usize,
    ln2_b: usize,
    fc_w: usize,
    fc_b: usize,
    out_w: usize,
    out_b: usize,
}

#[derive(Clone, Debug)]
struct At {
    wte: usize,
    wpe: usize,
    layers: Vec<LayerAt>,
    lnf_w: usize,
    lnf_b: usize,
    /// The output projection: `wte` when tied.
    head: usize,
}

/// The name table: every parameter of [`Gpt`](super::gpt::Gpt) this trainer supports, in buffer order.
fn name_table(cfg: &GptConfig, dims: &Dims) -> (Vec<Slot>, At) {
    let Dims { c, f, v, .. } = *dims;
    let mut slots = Vec::new();
    let mut push = |name: String, shape: Vec<usize>| {
        let offset = slots.last().map_or(0, |s: &Slot| s.offset + s.len());
        slots.push(Slot { name, shape, offset });
        offset
    };
    let wte = push("wte.weight".into(), vec![v, c]);
    let wpe = push("wpe.weight".into(), vec![cfg.n_positions, c]);
    let mut layers = Vec::new();
    for i in 0..dims.l {
        let p = |s: &str| format!("layers.{i}.{s}");
        let ln1_w = push(p("self_attn_norm.weight"), vec![c]);
        let ln1_b = push(p("self_attn_norm.bias"), vec![c]);
        let (qkv_w, qkv_b) = if cfg.fused_qkv {
            (push(p("self_attn.qkv_proj.weight"), vec![3 * c, c]), push(p("self_attn.qkv_proj.bias"), vec![3 * c]))
        } else {
            let w = push(p("self_attn.q_proj.weight"), vec![c, c]);
            push(p("self_attn.k_proj.weight"), vec![c, c]);
            push(p("self_attn.v_proj.weight"), vec![c, c]);
            let b = push(p("self_attn.q_proj.bias"), vec![c]);
            push(p("self_attn.k_proj.bias"), vec![c]);
            push(p("self_attn.v_proj.bias"), vec![c]);
            (w, b)
        };
        layers.push(LayerAt {
            ln1_w,
            ln1_b,
            qkv_w,
            qkv_b,
            proj_w: push(p("self_attn.out_proj.weight"), vec![c, c]),
            proj_b: push(p("self_attn.out_proj.bias"), vec![c]),
            ln2_w: push(p("ffn_norm.weight"), vec![c]),
            ln2_b: push(p("ffn_norm.bias"), vec![c]),
            fc_w: push(p("ffn.fc_in.weight"), vec![f, c]),
            fc_b: push(p("ffn.fc_in.bias"), vec![f]),
            out_w: push(p("ffn.fc_out.weight"), vec![c, f]),
            out_b: push(p("ffn.fc_out.bias"), vec![c]),
        });
    }
    let lnf_w = push("ln_f.weight".into(), vec![c]);
    let lnf_b = push("ln_f.bias".into(), vec![c]);
    let head = if cfg.tie_embeddings { wte } else { push("lm_head.weight".into(), vec![v, c]) };
    (slots, At { wte, wpe, layers, lnf_w, lnf_b, head })
}

/// What the forward keeps of one layer for the backward.
struct LayerActs {
    /// `(N, C)` LN₁ output, attention input.
    ln1: Vec<f32>,
    /// `(B, H, T, D)` each.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    /// `(B, H, T)` log-sum-exp of each query's scores.
    lse: Vec<f32>,
    /// `(N, C)` heads merged, the output projection's input.
    atty: Vec<f32>,
    /// `(N, C)` residual stream after attention.
    mid: Vec<f32>,
    /// `(N, C)` LN₂ output.
    ln2: Vec<f32>,
    /// `(N, F)` before and after GELU.
    fch: Vec<f32>,
    fcg: Vec<f32>,
}

impl LayerActs {
    fn new(d: &Dims) -> Self {
        let (nc, nf) = (d.n() * d.c, d.n() * d.f);
        LayerActs {
            ln1: vec![0.0; nc],
            q: vec![0.0; nc],
            k: vec![0.0; nc],
            v: vec![0.0; nc],
            o: vec![0.0; nc],
            lse: vec![0.0; d.b * d.h * d.t],
            atty: vec![0.0; nc],
            mid: vec![0.0; nc],
            ln2: vec![0.0; nc],
            fch: vec![0.0; nf],
            fcg: vec![0.0; nf],
        }
    }
}

/// Buffers the backward overwrites layer after layer.
struct Scratch {
    /// `(N, 3C)`: q, k, v before the heads are split (forward), their gradient (backward).
    qkv: Vec<f32>,
    /// `(N, C)`: the running gradient of the residual stream.
    dres: Vec<f32>,
    /// `(N, C)`: gradient of a norm's output, then of its input.
    dln: Vec<f32>,
    dtmp: Vec<f32>,
    /// `(N, F)` ×2.
    dfcg: Vec<f32>,
    dfch: Vec<f32>,
    /// `(B, H, T, D)` ×4.
    dout: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// `(N, V)`.
    dlogits: Vec<f32>,
    /// `(C)`: a norm's weight gradient before it is added to the store.
    dw: Vec<f32>,
}

/// A GPT language model's training state (parameters, gradients, AdamW moments, activations) for batches of a
/// fixed `(B, T)`; see the module docs.
pub struct GptTrainer {
    config: GptConfig,
    dims: Dims,
    slots: Vec<Slot>,
    at: At,
    params: Vec<f32>,
    grads: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    steps: u64,
    gelu: GeluKind,
    flash: FlashConfig,
    /// `(L + 1)` residual streams, `(N, C)` each: the embeddings, then each layer's output.
    res: Vec<Vec<f32>>,
    layers: Vec<LayerActs>,
    /// `(N, C)` final norm output; `(N, V)` logits; `(N)` per-row losses.
    lnf: Vec<f32>,
    logits: Vec<f32>,
    losses: Vec<f32>,
    scratch: Scratch,
}

impl std::fmt::Debug for GptTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GptTrainer")
            .field("dims", &self.dims)
            .field("params", &self.params.len())
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

/// Why a configuration cannot run on the fused step, naming the field.
fn check_config(cfg: &GptConfig) -> Result<()> {
    let refuse = |field: &str, what: String| -> Result<()> {
        bail!(OP, "config field `{field}` = {what} is not supported by the fused training step; train this model through autograd (Gpt + candle's backward)")
    };
    if cfg.layout != GptLayout::Gpt2 {
        return refuse("layout", format!("{:?} (post-norm); only the GPT-2 pre-norm layout is", cfg.layout));
    }
    for (field, p) in [("dropout", cfg.dropout), ("attn_dropout", cfg.attn_dropout), ("embd_dropout", cfg.embd_dropout)]
    {
        if p != 0.0 {
            return refuse(field, format!("{p} (dropout)"));
        }
    }
    if cfg.share_layers {
        return refuse("share_layers", "true".into());
    }
    if !matches!(cfg.activation, Activation::Gelu | Activation::GeluTanh) {
        return refuse("activation", format!("{:?} (GELU, exact or tanh, is)", cfg.activation));
    }
    ensure!(
        cfg.n_heads > 0 && cfg.d_model.is_multiple_of(cfg.n_heads),
        OP,
        "d_model = {} is not a multiple of n_heads = {}",
        cfg.d_model,
        cfg.n_heads
    );
    let d = cfg.d_model / cfg.n_heads;
    ensure!(
        d.is_multiple_of(QUANTUM),
        OP,
        "head dim D = d_model / n_heads = {d} must be a multiple of {QUANTUM} for the fused attention kernels"
    );
    Ok(())
}

impl GptTrainer {
    /// Reads every parameter of a [`Gpt`](super::gpt::Gpt) built with `config` from `vars` (by name, f32) and
    /// allocates the state for batches `(batch, seq)`.
    ///
    /// # Errors
    /// An unsupported configuration (the message names the field), a missing tensor or one whose shape or dtype
    /// differs from the name table, `seq > n_positions`, an empty batch.
    pub fn new(config: &GptConfig, vars: &VarMap, batch: usize, seq: usize) -> Result<Self> {
        check_config(config)?;
        ensure!(batch > 0 && seq > 0, OP, "batch = {batch} and seq = {seq} must be positive");
        ensure!(seq <= config.n_positions, OP, "seq = {seq} exceeds n_positions = {}", config.n_positions);
        let dims = Dims {
            b: batch,
            t: seq,
            c: config.d_model,
            h: config.n_heads,
            d: config.d_model / config.n_heads,
            f: config.d_ff.unwrap_or(4 * config.d_model),
            v: config.vocab_size,
            l: config.n_layers,
        };
        let (slots, at) = name_table(config, &dims);
        let total = slots.last().map_or(0, |s| s.offset + s.len());
        let mut params = vec![0f32; total];
        {
            let data = vars.data().lock().map_err(|_| Error::invalid(OP, "the VarMap's lock is poisoned"))?;
            for s in &slots {
                let var = data
                    .get(&s.name)
                    .ok_or_else(|| Error::MissingTensor { name: s.name.clone(), location: "the VarMap".into() })?;
                ensure!(
                    var.dims() == s.shape.as_slice() && var.dtype() == DType::F32,
                    OP,
                    "tensor `{}` is {:?} {:?}; the config needs {:?} f32",
                    s.name,
                    var.dims(),
                    var.dtype(),
                    s.shape
                );
                let vals = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                params[s.offset..s.offset + s.len()].copy_from_slice(&vals);
            }
        }
        let (n, c) = (dims.n(), dims.c);
        let nc = n * c;
        let scale = 1.0 / (dims.d as f32).sqrt();
        Ok(GptTrainer {
            config: config.clone(),
            dims,
            at,
            grads: vec![0.0; total],
            m: vec![0.0; total],
            v: vec![0.0; total],
            params,
            slots,
            steps: 0,
            gelu: if config.activation == Activation::Gelu { GeluKind::Erf } else { GeluKind::Tanh },
            flash: FlashConfig::for_head_dims(scale, dims.d, dims.d),
            res: (0..=dims.l).map(|_| vec![0.0; nc]).collect(),
            layers: (0..dims.l).map(|_| LayerActs::new(&dims)).collect(),
            lnf: vec![0.0; nc],
            logits: vec![0.0; n * dims.v],
            losses: vec![0.0; n],
            scratch: Scratch {
                qkv: vec![0.0; 3 * nc],
                dres: vec![0.0; nc],
                dln: vec![0.0; nc],
                dtmp: vec![0.0; nc],
                dfcg: vec![0.0; n * dims.f],
                dfch: vec![0.0; n * dims.f],
                dout: vec![0.0; nc],
                dq: vec![0.0; nc],
                dk: vec![0.0; nc],
                dv: vec![0.0; nc],
                dlogits: vec![0.0; n * dims.v],
                dw: vec![0.0; c],
            },
        })
    }

    pub fn dims(&self) -> Dims {
        self.dims
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Parameter names in buffer order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Number of parameters (each tied tensor once).
    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// AdamW steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// A parameter's values, row-major, by its [`Gpt`](super::gpt::Gpt) name.
    pub fn param(&self, name: &str) -> Option<&[f32]> {
        self.slot(name).map(|s| &self.params[s.offset..s.offset + s.len()])
    }

    /// A parameter's accumulated gradient.
    pub fn grad(&self, name: &str) -> Option<&[f32]> {
        self.slot(name).map(|s| &self.grads[s.offset..s.offset + s.len()])
    }

    /// Logits `(B, T, V)` of the last forward.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Clears the gradients (they accumulate over [`forward_backward`](Self::forward_backward) calls, for
    /// gradient accumulation).
    pub fn zero_grad(&mut self) {
        self.grads.par_chunks_mut(1 << 16).for_each(|g| g.fill(0.0));
    }

    fn check_batch(&self, ids: &[u32], targets: &[i64]) -> Result<usize> {
        let Dims { b, t, v, .. } = self.dims;
        ensure!(ids.len() == b * t, OP, "ids hold {} values; this trainer takes (B, T) = ({b}, {t})", ids.len());
        ensure!(
            targets.len() == b * t,
            OP,
            "targets hold {} values; this trainer takes (B, T) = ({b}, {t})",
            targets.len()
        );
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            bail!(OP, "ids[{i}] = {id} is not below vocab_size = {v}");
        }
        if let Some((i, &y)) =
            targets.iter().enumerate().find(|(_, &y)| y != IGNORE_INDEX && !(0..v as i64).contains(&y))
        {
            bail!(OP, "targets[{i}] = {y} is neither in 0..{v} nor the ignore index {IGNORE_INDEX}");
        }
        Ok(targets.iter().filter(|&&y| y != IGNORE_INDEX).count())
    }

    /// Mean cross-entropy of `targets` given `ids`, without gradients; the logits stay readable.
    ///
    /// # Errors
    /// Lengths other than `B·T`, ids `≥ V`, targets outside `0..V` that are not [`IGNORE_INDEX`].
    pub fn loss(&mut self, ids: &[u32], targets: &[i64]) -> Result<f32> {
        let count = self.check_batch(ids, targets)?;
        rayon::scope(|_| {
            self.forward(ids)?;
            Ok(self.mean_loss(targets, count))
        })
    }

    /// Forward and backward: returns the mean loss and adds its gradient to every parameter's.
    ///
    /// # Errors
    /// As [`loss`](Self::loss).
    pub fn forward_backward(&mut self, ids: &[u32], targets: &[i64]) -> Result<f32> {
        let count = self.check_batch(ids, targets)?;
        // On a rayon worker, so the ~30 parallel kernels of a step share work with this thread instead of waking
        // it through a latch each.
        rayon::scope(|_| {
            self.forward(ids)?;
            let loss = self.mean_loss(targets, count);
            self.backward(ids, targets, count)?;
            Ok(loss)
        })
    }

    /// One AdamW step on the gradients (weight decay only on tensors of rank ≥ 2: matrices and embeddings, not
    /// norms and biases), then counts it.
    pub fn step(&mut self, hp: &AdamW) {
        self.steps += 1;
        let t = self.steps;
        for s in &self.slots {
            let r = s.offset..s.offset + s.len();
            let hp = AdamW { weight_decay: if s.shape.len() >= 2 { hp.weight_decay } else { 0.0 }, ..*hp };
            adamw_step(
                &hp,
                t,
                &mut self.params[r.clone()],
                &self.grads[r.clone()],
                &mut self.m[r.clone()],
                &mut self.v[r],
            );
        }
    }

    /// Writes the parameters into `vars` (the [`Gpt`](super::gpt::Gpt) they came from sees the trained weights).
    ///
    /// # Errors
    /// A variable missing from `vars` or of another shape.
    pub fn write_to(&self, vars: &VarMap) -> Result<()> {
        let data = vars.data().lock().map_err(|_| Error::invalid(OP, "the VarMap's lock is poisoned"))?;
        for s in &self.slots {
            let var = data
                .get(&s.name)
                .ok_or_else(|| Error::MissingTensor { name: s.name.clone(), location: "the VarMap".into() })?;
            let t = Tensor::from_slice(&self.params[s.offset..s.offset + s.len()], s.shape.as_slice(), var.device())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Per-row losses of the last forward's logits, and their mean over the `count` rows not ignored.
    fn mean_loss(&mut self, targets: &[i64], count: usize) -> f32 {
        let ce = CrossEntropyConfig { ignore_index: IGNORE_INDEX, ..Default::default() };
        cross_entropy_forward(&self.logits, targets, self.dims.v, &ce, &mut self.losses);
        if count == 0 {
            return 0.0;
        }
        (self.losses.iter().map(|&l| l as f64).sum::<f64>() / count as f64) as f32
    }

    fn flash_dims(&self) -> FlashDims {
        let Dims { b, t, h, d, .. } = self.dims;
        FlashDims { b, h, hkv: h, t, s: t, d, dv: d }
    }

    fn forward(&mut self, ids: &[u32]) -> Result<()> {
        let dims = self.dims;
        let Dims { t, c, f, v, .. } = dims;
        let n = dims.n();
        let eps = self.config.layer_norm_eps;
        let p = &self.params;
        let at = &self.at;
        let fd = self.flash_dims();
        // x₀ = W_e[ids] + W_p[positions]
        let (wte, wpe) = (&p[at.wte..at.wte + v * c], &p[at.wpe..at.wpe + t * c]);
        self.res[0].par_chunks_mut(c).enumerate().for_each(|(r, row)| {
            let (tok, pos) = (ids[r] as usize, r % t);
            let (e, q) = (&wte[tok * c..(tok + 1) * c], &wpe[pos * c..(pos + 1) * c]);
            row.iter_mut().zip(e.iter().zip(q)).for_each(|(o, (&a, &b))| *o = a + b);
        });
        for (l, la) in at.layers.iter().enumerate() {
            let (done, rest) = self.res.split_at_mut(l + 1);
            let (x, out) = (&done[l], &mut rest[0]);
            let acts = &mut self.layers[l];
            layer_norm(x, &p[la.ln1_w..la.ln1_w + c], &p[la.ln1_b..la.ln1_b + c], &mut acts.ln1, eps);
            let qkv = &mut self.scratch.qkv;
            matmul(qkv, Mat::new(&acts.ln1, n, c), Mat::new(&p[la.qkv_w..la.qkv_w + 3 * c * c], 3 * c, c).t(), false);
            add_bias_rows(qkv, &p[la.qkv_b..la.qkv_b + 3 * c]);
            gather_heads(qkv, 3 * c, 0, &mut acts.q, &dims);
            gather_heads(qkv, 3 * c, c, &mut acts.k, &dims);
            gather_heads(qkv, 3 * c, 2 * c, &mut acts.v, &dims);
            flash_forward(
                &fd,
                &self.flash,
                &Causal { offset: 0 },
                &NoScoreMod,
                &acts.q,
                &acts.k,
                &acts.v,
                &mut acts.o,
                &mut acts.lse,
            )
            .map_err(|e| Error::invalid(OP, e.0))?;
            scatter_heads(&acts.o, &mut acts.atty, c, 0, &dims);
            // m = x + o W_oᵀ + b_o, the product accumulated onto the residual
            acts.mid.copy_from_slice(x);
            add_bias_rows(&mut acts.mid, &p[la.proj_b..la.proj_b + c]);
            matmul(
                &mut acts.mid,
                Mat::new(&acts.atty, n, c),
                Mat::new(&p[la.proj_w..la.proj_w + c * c], c, c).t(),
                true,
            );
            layer_norm(&acts.mid, &p[la.ln2_w..la.ln2_w + c], &p[la.ln2_b..la.ln2_b + c], &mut acts.ln2, eps);
            matmul(&mut acts.fch, Mat::new(&acts.ln2, n, c), Mat::new(&p[la.fc_w..la.fc_w + f * c], f, c).t(), false);
            add_bias_rows(&mut acts.fch, &p[la.fc_b..la.fc_b + f]);
            gelu_forward(&acts.fch, &mut acts.fcg, self.gelu);
            out.copy_from_slice(&acts.mid);
            add_bias_rows(out, &p[la.out_b..la.out_b + c]);
            matmul(out, Mat::new(&acts.fcg, n, f), Mat::new(&p[la.out_w..la.out_w + c * f], c, f).t(), true);
        }
        let x = &self.res[dims.l];
        layer_norm(x, &p[at.lnf_w..at.lnf_w + c], &p[at.lnf_b..at.lnf_b + c], &mut self.lnf, eps);
        matmul(&mut self.logits, Mat::new(&self.lnf, n, c), Mat::new(&p[at.head..at.head + v * c], v, c).t(), false);
        Ok(())
    }

    fn backward(&mut self, ids: &[u32], targets: &[i64], count: usize) -> Result<()> {
        let dims = self.dims;
        let Dims { t, c, f, v, .. } = dims;
        let n = dims.n();
        let eps = self.config.layer_norm_eps;
        let fd = self.flash_dims();
        let (p, g, at, s) = (&self.params, &mut self.grads, &self.at, &mut self.scratch);
        let ce = CrossEntropyConfig { ignore_index: IGNORE_INDEX, ..Default::default() };
        // d loss / d logits, each counted row weighing 1/count (ignored rows get zeros from the kernel)
        let dloss = vec![if count == 0 { 0.0 } else { 1.0 / count as f32 }; n];
        cross_entropy_backward(&self.logits, targets, v, &ce, &dloss, &mut s.dlogits);
        // logits = LN_f(x_L) W_headᵀ
        matmul(&mut g[at.head..at.head + v * c], Mat::new(&s.dlogits, n, v).t(), Mat::new(&self.lnf, n, c), true);
        matmul(&mut s.dln, Mat::new(&s.dlogits, n, v), Mat::new(&p[at.head..at.head + v * c], v, c), false);
        norm_grad(&self.res[dims.l], p, g, (at.lnf_w, at.lnf_b), &s.dln, &mut s.dres, &mut s.dw, c, eps);
        for (l, la) in at.layers.iter().enumerate().rev() {
            let acts = &self.layers[l];
            // x_{l+1} = m + GELU(LN₂(m) W₁ᵀ + b₁) W₂ᵀ + b₂; s.dres holds d x_{l+1}
            matmul(&mut s.dfcg, Mat::new(&s.dres, n, c), Mat::new(&p[la.out_w..la.out_w + c * f], c, f), false);
            matmul(&mut g[la.out_w..la.out_w + c * f], Mat::new(&s.dres, n, c).t(), Mat::new(&acts.fcg, n, f), true);
            add_column_sums(&s.dres, &mut g[la.out_b..la.out_b + c]);
            gelu_backward(&acts.fch, &s.dfcg, &mut s.dfch, self.gelu);
            matmul(&mut s.dln, Mat::new(&s.dfch, n, f), Mat::new(&p[la.fc_w..la.fc_w + f * c], f, c), false);
            matmul(&mut g[la.fc_w..la.fc_w + f * c], Mat::new(&s.dfch, n, f).t(), Mat::new(&acts.ln2, n, c), true);
            add_column_sums(&s.dfch, &mut g[la.fc_b..la.fc_b + f]);
            norm_grad(&acts.mid, p, g, (la.ln2_w, la.ln2_b), &s.dln, &mut s.dtmp, &mut s.dw, c, eps);
            // s.dres becomes d m; and m = x_l + attention(LN₁(x_l)) W_oᵀ + b_o
            add_assign(&mut s.dres, &s.dtmp);
            matmul(&mut s.dtmp, Mat::new(&s.dres, n, c), Mat::new(&p[la.proj_w..la.proj_w + c * c], c, c), false);
            matmul(&mut g[la.proj_w..la.proj_w + c * c], Mat::new(&s.dres, n, c).t(), Mat::new(&acts.atty, n, c), true);
            add_column_sums(&s.dres, &mut g[la.proj_b..la.proj_b + c]);
            gather_heads(&s.dtmp, c, 0, &mut s.dout, &dims);
            flash_backward(
                &fd,
                &self.flash,
                &Causal { offset: 0 },
                &NoScoreMod,
                &acts.q,
                &acts.k,
                &acts.v,
                &acts.o,
                &acts.lse,
                &s.dout,
                &mut s.dq,
                &mut s.dk,
                &mut s.dv,
            )
            .map_err(|e| Error::invalid(OP, e.0))?;
            scatter_heads(&s.dq, &mut s.qkv, 3 * c, 0, &dims);
            scatter_heads(&s.dk, &mut s.qkv, 3 * c, c, &dims);
            scatter_heads(&s.dv, &mut s.qkv, 3 * c, 2 * c, &dims);
            matmul(
                &mut s.dln,
                Mat::new(&s.qkv, n, 3 * c),
                Mat::new(&p[la.qkv_w..la.qkv_w + 3 * c * c], 3 * c, c),
                false,
            );
            matmul(
                &mut g[la.qkv_w..la.qkv_w + 3 * c * c],
                Mat::new(&s.qkv, n, 3 * c).t(),
                Mat::new(&acts.ln1, n, c),
                true,
            );
            add_column_sums(&s.qkv, &mut g[la.qkv_b..la.qkv_b + 3 * c]);
            norm_grad(&self.res[l], p, g, (la.ln1_w, la.ln1_b), &s.dln, &mut s.dtmp, &mut s.dw, c, eps);
            add_assign(&mut s.dres, &s.dtmp); // now d x_l
        }
        // x₀ = W_e[ids] + W_p[positions]: rows added in order, so repeated tokens sum deterministically
        let (dwte, rest) = g.split_at_mut(at.wpe);
        let dwpe = &mut rest[..t * c];
        let dwte = &mut dwte[at.wte..at.wte + v * c];
        for (r, row) in s.dres.chunks_exact(c).enumerate() {
            let tok = ids[r] as usize;
            dwte[tok * c..(tok + 1) * c].iter_mut().zip(row).for_each(|(a, &b)| *a += b);
            let pos = r % t;
            dwpe[pos * c..(pos + 1) * c].iter_mut().zip(row).for_each(|(a, &b)| *a += b);
        }
        Ok(())
    }
}

/// `y = LN(x) ⊙ w + b` over rows of `C = w.len()`.
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f64) {
    norm_forward(x, Some(w), y, w.len(), eps, NormKind::Layer);
    add_bias_rows(y, b);
}

/// Backward of [`layer_norm`] with its parameters at `(w, b)` in `p`: writes `dx`, adds `dw`, `db` into `g`.
#[allow(clippy::too_many_arguments)]
fn norm_grad(
    x: &[f32],
    p: &[f32],
    g: &mut [f32],
    (w, b): (usize, usize),
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    c: usize,
    eps: f64,
) {
    norm_backward(x, Some(&p[w..w + c]), dy, dx, Some(dw), c, eps, NormKind::Layer);
    g[w..w + c].iter_mut().zip(dw.iter()).for_each(|(a, &d)| *a += d);
    add_column_sums(dy, &mut g[b..b + c]);
}

/// Columns `[col0, col0 + C)` of `src (B, T, W)` → `dst (B, H, T, D)`.
fn gather_heads(src: &[f32], w: usize, col0: usize, dst: &mut [f32], dims: &Dims) {
    let Dims { h, t, d, .. } = *dims;
    dst.par_chunks_mut(t * d).enumerate().for_each(|(bh, blk)| {
        let (bi, hi) = (bh / h, bh % h);
        for (ti, row) in blk.chunks_exact_mut(d).enumerate() {
            let at = (bi * t + ti) * w + col0 + hi * d;
            row.copy_from_slice(&src[at..at + d]);
        }
    });
}

/// `src (B, H, T, D)` → columns `[col0, col0 + C)` of `dst (B, T, W)`.
fn scatter_heads(src: &[f32], dst: &mut [f32], w: usize, col0: usize, dims: &Dims) {
    let Dims { h, t, d, .. } = *dims;
    dst.par_chunks_mut(w).enumerate().for_each(|(r, row)| {
        let (bi, ti) = (r / t, r % t);
        for hi in 0..h {
            let at = ((bi * h + hi) * t + ti) * d;
            row[col0 + hi * d..col0 + (hi + 1) * d].copy_from_slice(&src[at..at + d]);
        }
    });
}
