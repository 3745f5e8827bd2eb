//! `attend bench attention`: the attention core timed on seeded random inputs, forward only or forward+backward
//! through candle's autograd, reported in PyTorch's units so that `/work/shared/bench/torch_anchor.py` (run in the
//! same session) gives the ratio.
//!
//! # What is timed
//! - forward: `attention_with(q, k, v, mask, opts)`; q, k, v are plain tensors (no graph), like PyTorch tensors
//!   without `requires_grad`;
//! - forward+backward: q, k, v are `Var`s, and one iteration is the forward (which builds the graph), the loss
//!   `L = Σ o ⊙ do` (`ops::vjp_loss`: its gradient is `do`, with no product or gradient of `do` materialised) and
//!   `L.backward()`, the same work as PyTorch's `o = sdpa(q, k, v); torch.autograd.grad(o, (q, k, v), do)` plus
//!   one dot product over `(B, H, T, D)`.
//!
//! # Units
//! `flops = 4·B·H·D` per visible (query, key) pair (two matmuls of `2·D` each), ×3.5 for forward+backward — the
//! convention of the PyTorch anchors, whatever the kernel skips or recomputes (`attend_kernels::flash::
//! attention_flops`). Causal pairs are counted exactly for any T and S (T(T+1)/2 for T = S, where the anchors
//! halve T²). GFLOP/s is `flops / median`; ratios against PyTorch are quoted from times, not GFLOP/s.
//!
//! # Memory
//! `baseline_rss_mb` is the resident set before the inputs exist (after the thread pools have started and the
//! small validation run, whose freed memory is handed back to the kernel first: `attend::alloc::
//! release_freed_memory`), `tensor_mb` the bytes of the tensors the call cannot do without (`q, k, v, o`, and with
//! `--backward` also `do, dq, dk, dv`), `peak_rss_mb` the process's high-water mark (`VmHWM`). What an
//! implementation needs beyond its inputs and outputs is `peak − baseline − tensors`. `page_faults_per_iter` counts
//! the minor page faults of the timed passes: with glibc's default malloc, buffers of a few MB are mmapped and
//! unmapped again every iteration, and touching them afresh costs a fault per 4 KiB page, which is part of what a
//! user of the library pays (PyTorch's passes of the same shapes fault far less).
//!
//! # Validation
//! Before measuring, the chosen implementation is checked on a slice of the timed problem with the same T, S, D,
//! mask and dtype: one batch element and one K/V head with its G = H/Hkv query heads. Where the reference path's
//! `G·T·S` scores fit (up to 2²⁷), against it: output and, with `--backward`, every gradient. Beyond, against a
//! float64 oracle computed here on 64 query rows per head spread over T: output and dQ (a row's dQ depends on that
//! row alone); the JSON says which (`validation`).
//!
//! # Machine
//! The JSON names the CPU (vendor, family/model, brand, micro-architecture, caches), the instruction-set path, the
//! threads, the kernel's tiles and whether freed memory is kept in the process (`attend::alloc`).

use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use attend::attention::{attention_with, AttentionImpl, AttentionOptions, Mask};
use attend_kernels::cpu::CpuInfo;
use attend_kernels::flash::tiles::tiles_for;
use attend_kernels::flash::{attention_flops, FlashDims, Isa};
use candle_core::{DType, Device, Tensor, Var};
use clap::{Args, ValueEnum};
use serde_json::json;

use super::{
    available_threads, configure_threads, mem_available_bytes, minor_faults, peak_rss_mb, rss_mb, Progress, Times,
};
use crate::errors;
use crate::op::attention::{normal_samples, ImplArg};

/// Storage dtype of q, k, v (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
}

impl DtypeArg {
    fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
        }
    }
}

fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a positive integer, got `{s}`")),
    }
}

#[derive(Debug, Args)]
#[command(after_help = "\
Example (the PyTorch anchors' shape): `attend bench attention --batch 1 --heads 8 --seq 2048 --head-dim 64 --causal \
--backward --threads 2 --json`.

flops = 4·B·H·D per visible (query, key) pair (causal pairs counted exactly), ×3.5 with --backward (PyTorch anchor \
convention); GFLOP/s uses the median time. With --backward an iteration is the forward (building the autograd \
graph), L = Σ o ⊙ do and L.backward(). The implementation is first checked on a slice with the same T, S and D. \
ATTEND_TILES=BQxBK overrides the kernel's tiles; ATTEND_KEEP_FREED_MEMORY=0 keeps glibc's allocator defaults.")]
pub struct BenchAttentionArgs {
    /// Batch size B.
    #[arg(long, value_name = "B", value_parser = positive)]
    batch: usize,
    /// Query heads H.
    #[arg(long, value_name = "H", value_parser = positive)]
    heads: usize,
    /// Key/value heads Hkv (H must be a multiple) [default: H].
    #[arg(long = "kv-heads", value_name = "HKV", value_parser = positive)]
    kv_heads: Option<usize>,
    /// Query length T.
    #[arg(long, value_name = "T", value_parser = positive)]
    seq: usize,
    /// Key/value length S [default: T].
    #[arg(long = "kv-seq", value_name = "S", value_parser = positive)]
    kv_seq: Option<usize>,
    /// Head dim D of queries, keys and values.
    #[arg(long = "head-dim", value_name = "D", value_parser = positive)]
    head_dim: usize,
    /// Causal mask (end-aligned diagonal: query i sees key j iff j ≤ i + S − T).
    #[arg(long)]
    causal: bool,
    /// Time forward+backward (gradients of Σ o ⊙ do with respect to q, k, v) instead of the forward alone.
    #[arg(long)]
    backward: bool,
    /// Storage dtype of q, k, v, do.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Implementation of the attention core.
    #[arg(long = "impl", value_enum, value_name = "IMPL", default_value_t = ImplArg::Fused)]
    implementation: ImplArg,
    /// Threads for rayon's global pool and candle's matmul/element-wise pools [default: available parallelism].
    #[arg(long, value_name = "N", value_parser = positive)]
    threads: Option<usize>,
    /// Untimed iterations first.
    #[arg(long, value_name = "N", default_value_t = 2)]
    warmup: usize,
    /// Timed iterations.
    #[arg(long, value_name = "N", value_parser = positive, default_value_t = 10)]
    iters: usize,
    /// Print exactly one JSON object line instead of the human-readable summary.
    #[arg(long)]
    json: bool,
}

/// One benchmark configuration, validated.
#[derive(Clone, Copy, Debug)]
struct Config {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
    causal: bool,
    backward: bool,
    dtype: DtypeArg,
    implementation: ImplArg,
}

impl Config {
    fn from_args(a: &BenchAttentionArgs) -> Result<Self> {
        let hkv = a.kv_heads.unwrap_or(a.heads);
        if !a.heads.is_multiple_of(hkv) {
            bail!("--heads {} is not a multiple of --kv-heads {hkv}", a.heads);
        }
        Ok(Config {
            b: a.batch,
            h: a.heads,
            hkv,
            t: a.seq,
            s: a.kv_seq.unwrap_or(a.seq),
            d: a.head_dim,
            causal: a.causal,
            backward: a.backward,
            dtype: a.dtype,
            implementation: a.implementation,
        })
    }

    /// Floating-point operations per iteration, PyTorch anchor convention (see the module docs).
    fn flops(&self) -> f64 {
        let dims = FlashDims { b: self.b, h: self.h, hkv: self.hkv, t: self.t, s: self.s, d: self.d, dv: self.d };
        attention_flops(&dims, self.causal, self.backward)
    }

    /// Bytes of q, k, v, o (and do, dq, dk, dv with `--backward`) in the storage dtype.
    fn tensor_bytes(&self) -> usize {
        let q = self.b * self.h * self.t * self.d; // (B, H, T, D): q, o, do, dq
        let kv = self.b * self.hkv * self.s * self.d; // (B, Hkv, S, D): k, v, dk, dv
        let elems = if self.backward { 4 * q + 4 * kv } else { 2 * q + 2 * kv };
        elems * self.dtype.dtype().size_in_bytes()
    }

    fn mask(&self) -> Mask {
        if self.causal {
            Mask::none().with_causal()
        } else {
            Mask::none()
        }
    }

    fn options(&self) -> AttentionOptions {
        AttentionOptions { implementation: self.implementation.into(), ..Default::default() }
    }

    fn describe(&self) -> String {
        let pass = if self.backward { "forward+backward" } else { "forward" };
        let mask = if self.causal { "causal" } else { "no mask" };
        format!("{} {}, {pass}, {mask}", self.implementation.name(), self.dtype.name())
    }
}

fn candle<T>(r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| anyhow!(errors::candle(&e)))
}

fn attend_err(e: attend::Error) -> anyhow::Error {
    anyhow!(errors::attend(&e))
}

/// Seeded standard-normal inputs; with `--backward` q, k, v are variables.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

/// A seeded standard-normal tensor of the bench's dtype; a variable when `var`.
fn generate(cfg: &Config, shape: (usize, usize, usize, usize), seed: u64, var: bool) -> Result<Tensor> {
    let dev = Device::Cpu;
    let x = normal_samples(shape.0 * shape.1 * shape.2 * shape.3, seed);
    candle(match (cfg.dtype, var) {
        // The vector becomes the variable's storage: no second copy, even for a moment.
        (DtypeArg::F32, true) => Var::from_vec(x, shape, &dev).map(Var::into_inner),
        (DtypeArg::F32, false) => Tensor::from_vec(x, shape, &dev),
        (dt, var) => Tensor::from_vec(x, shape, &dev).and_then(|t| t.to_dtype(dt.dtype())).and_then(|t| {
            if var {
                Var::from_tensor(&t).map(Var::into_inner)
            } else {
                Ok(t)
            }
        }),
    })
}

impl Inputs {
    fn new(cfg: &Config, seed: u64) -> Result<Self> {
        let var = cfg.backward;
        Ok(Inputs {
            q: generate(cfg, (cfg.b, cfg.h, cfg.t, cfg.d), seed, var)?, // (B, H, T, D)
            k: generate(cfg, (cfg.b, cfg.hkv, cfg.s, cfg.d), seed + 1, var)?, // (B, Hkv, S, D)
            v: generate(cfg, (cfg.b, cfg.hkv, cfg.s, cfg.d), seed + 2, var)?, // (B, Hkv, S, D)
        })
    }

    /// The upstream gradient `do` (B, H, T, D) with `--backward`. A pass consumes it: the loss hands it to the
    /// gradient store, which keeps its own copy, so the timed loop makes a fresh one (untimed) for every pass and
    /// only one tensor of its size lives through the backward, as in a network, where nobody holds `do`.
    fn upstream(cfg: &Config, seed: u64) -> Result<Option<Tensor>> {
        cfg.backward.then(|| generate(cfg, (cfg.b, cfg.h, cfg.t, cfg.d), seed + 3, false)).transpose()
    }
}

/// The output and, with an upstream gradient, `dq`, `dk`, `dv` of one pass.
struct Pass {
    out: Tensor,
    grads: Option<[Tensor; 3]>,
}

/// One iteration: forward, and with `do` the loss `Σ o ⊙ do` and its backward (graph construction included).
fn pass(x: &Inputs, dout: Option<Tensor>, mask: &Mask, opts: &AttentionOptions) -> Result<Pass> {
    let out = attention_with(&x.q, &x.k, &x.v, mask, opts).map_err(attend_err)?.out; // (B, H, T, D)
    let Some(dout) = dout else { return Ok(Pass { out, grads: None }) };
    let loss = attend::ops::vjp_loss(&out, dout).map_err(attend_err)?;
    let store = candle(loss.backward())?;
    let grad = |t: &Tensor, name: &str| -> Result<Tensor> {
        store.get(t).cloned().ok_or_else(|| anyhow!("backward produced no gradient for {name}"))
    };
    let grads = [grad(&x.q, "q")?, grad(&x.k, "k")?, grad(&x.v, "v")?];
    Ok(Pass { out, grads: Some(grads) })
}

/// Largest `|a − b|` and whether every element is within `atol + rtol·|b|`.
fn compare(a: &Tensor, b: &Tensor, atol: f64, rtol: f64) -> Result<(f64, bool)> {
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        candle(t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()))
    };
    let (a, b) = (flat(a)?, flat(b)?);
    let (mut worst, mut ok) = (0f64, true);
    for (&x, &y) in a.iter().zip(&b) {
        let diff = (x as f64 - y as f64).abs();
        if diff.is_nan() || diff > atol + rtol * (y as f64).abs() {
            ok = false;
        }
        worst = worst.max(if diff.is_nan() { f64::INFINITY } else { diff });
    }
    Ok((worst, ok))
}

/// What the validation ran and found.
struct Validation {
    dims: [usize; 6],
    /// `"reference"` (every output and gradient against the reference path) or `"sampled rows"`.
    method: &'static str,
    max_abs_diff: f64,
}

/// Most `G·T·S` scores the reference path may materialise for validation (f32: 512 MB per copy).
const REFERENCE_SCORES: usize = 1 << 27;

/// The chosen implementation on a slice of the timed problem with the same T, S, D (see the module docs).
fn validate(cfg: &Config) -> Result<Validation> {
    let g = cfg.h / cfg.hkv;
    let slice = Config { b: 1, h: g, hkv: 1, ..*cfg };
    let x = Inputs::new(&slice, 101)?;
    let dout = Inputs::upstream(&slice, 101)?;
    let mask = slice.mask();
    let got = pass(&x, dout.clone(), &mask, &slice.options())?;
    // f32: different summation orders; bf16: outputs and gradients are rounded to 8 significant bits.
    let (atol, rtol) = match cfg.dtype {
        DtypeArg::F32 => (1e-4, 1e-3),
        DtypeArg::Bf16 => (5e-2, 5e-2),
    };
    let dims = [slice.b, slice.h, slice.hkv, slice.t, slice.s, slice.d];
    let fail = |name: &str, worst: f64| {
        anyhow!(
            "validation failed: {} `{name}` differs from the oracle by up to {worst:.3e} (atol {atol}, rtol {rtol}) \
             on B=1 H={} Hkv=1 T={} S={} D={}; not measuring a wrong result",
            cfg.implementation.name(),
            slice.h,
            slice.t,
            slice.s,
            slice.d
        )
    };
    let mut max_abs_diff = 0f64;
    if g * slice.t * slice.s > REFERENCE_SCORES {
        let (worst, ok, name) = sampled_rows(&slice, &x, dout.as_ref(), &got, atol, rtol)?;
        if !ok {
            return Err(fail(name, worst));
        }
        return Ok(Validation { dims, method: "sampled rows", max_abs_diff: worst });
    }
    let leaf = |t: &Tensor| -> Result<Tensor> {
        let t = candle(t.detach().to_dtype(DType::F32))?;
        Ok(if slice.backward { candle(Var::from_tensor(&t))?.into_inner() } else { t })
    };
    let oracle_in = Inputs { q: leaf(&x.q)?, k: leaf(&x.k)?, v: leaf(&x.v)? };
    let oracle_dout = dout.as_ref().map(|t| candle(t.to_dtype(DType::F32))).transpose()?;
    let reference = AttentionOptions { implementation: AttentionImpl::Reference, ..Default::default() };
    let want = pass(&oracle_in, oracle_dout, &mask, &reference)?;
    let mut pairs = vec![("o", &got.out, &want.out)];
    if let (Some(g), Some(w)) = (&got.grads, &want.grads) {
        pairs.extend([("dq", &g[0], &w[0]), ("dk", &g[1], &w[1]), ("dv", &g[2], &w[2])]);
    }
    for (name, a, b) in pairs {
        let (worst, ok) = compare(a, b, atol, rtol)?;
        if !ok {
            return Err(fail(name, worst));
        }
        max_abs_diff = max_abs_diff.max(worst);
    }
    Ok(Validation { dims, method: "reference", max_abs_diff })
}

/// Output and (with a backward) dQ of 64 query rows per head, spread over T, against float64 computed here:
/// `s_j = scale·q·k_j` over visible keys, `p = softmax(s)`, `o = Σ p_j v_j`, `dq = scale·Σ p_j (dO·v_j − Δ) k_j`.
/// Returns the largest difference, whether all are within tolerance, and the tensor of the worst.
fn sampled_rows(
    c: &Config,
    x: &Inputs,
    dout: Option<&Tensor>,
    got: &Pass,
    atol: f64,
    rtol: f64,
) -> Result<(f64, bool, &'static str)> {
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        candle(t.detach().to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()))
    };
    let (q, k, v) = (host(&x.q)?, host(&x.k)?, host(&x.v)?);
    let dout = dout.map(host).transpose()?;
    let out = host(&got.out)?;
    let dq = got.grads.as_ref().map(|g| host(&g[0])).transpose()?;
    let (t, s, d) = (c.t, c.s, c.d);
    let scale = 1.0 / (d as f64).sqrt();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (mut worst, mut ok, mut which) = (0f64, true, "o");
    let mut check = |got: f64, want: f64, name: &'static str| {
        let diff = (got - want).abs();
        if diff.is_nan() || diff > atol + rtol * want.abs() {
            ok = false;
            which = name;
        }
        worst = worst.max(if diff.is_nan() { f64::INFINITY } else { diff });
    };
    let rows: Vec<usize> = (0..64.min(t)).map(|r| r * t / 64.min(t)).collect();
    for h in 0..c.h {
        for &i in &rows {
            let qi = &q[(h * t + i) * d..][..d];
            let last = if c.causal { (i + s).checked_sub(t) } else { Some(s - 1) };
            let Some(last) = last.map(|l| l.min(s - 1)) else { continue }; // sees no key: nothing to compare
            let scores: Vec<f64> = (0..=last).map(|j| scale * dot(qi, &k[j * d..][..d])).collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let l: f64 = e.iter().sum();
            let mut o = vec![0f64; d];
            for (j, ej) in e.iter().enumerate() {
                o.iter_mut().zip(&v[j * d..][..d]).for_each(|(a, b)| *a += ej / l * b);
            }
            for (e_, want) in o.iter().enumerate() {
                check(out[(h * t + i) * d + e_], *want, "o");
            }
            if let (Some(dout), Some(dq)) = (&dout, &dq) {
                let doi = &dout[(h * t + i) * d..][..d];
                let delta = dot(doi, &o);
                let mut g = vec![0f64; d];
                for (j, ej) in e.iter().enumerate() {
                    let ds = ej / l * (dot(doi, &v[j * d..][..d]) - delta) * scale;
                    g.iter_mut().zip(&k[j * d..][..d]).for_each(|(a, b)| *a += ds * b);
                }
                for (e_, want) in g.iter().enumerate() {
                    check(dq[(h * t + i) * d + e_], *want, "dq");
                }
            }
        }
    }
    Ok((worst, ok, which))
}

/// Refuses a materialising run whose `(B, H, T, S)` score buffers could not fit in memory, instead of letting the
/// allocator abort the process.
fn check_memory(cfg: &Config) -> Result<()> {
    if cfg.implementation == ImplArg::Fused {
        return Ok(());
    }
    let scores = (cfg.b * cfg.h) as f64 * cfg.t as f64 * cfg.s as f64 * 4.0;
    let copies = if cfg.backward { 4.0 } else { 2.0 }; // scores and probabilities; their gradients
    let Some(available) = mem_available_bytes() else { return Ok(()) };
    if scores * copies > available as f64 {
        bail!(
            "--impl {} materialises (B, H, T, S) = ({}, {}, {}, {}) scores, about {:.1} GB for {copies} copies, more \
             than the {:.1} GB available; use --impl fused",
            cfg.implementation.name(),
            cfg.b,
            cfg.h,
            cfg.t,
            cfg.s,
            scores * copies / 1e9,
            available as f64 / 1e9
        );
    }
    Ok(())
}

/// A progress line on stderr, only on a terminal and only once the run is projected to take more than 2 s.
pub fn run(args: BenchAttentionArgs) -> Result<()> {
    let cfg = Config::from_args(&args)?;
    let threads = args.threads.unwrap_or_else(available_threads);

    // 1. Threads first: every pool involved sizes itself on first use.
    configure_threads(threads)?;
    let isa = format!("{:?}", Isa::detect()).to_lowercase();
    let tiles = tiles_for(Isa::detect(), cfg.d.div_ceil(16) * 16, cfg.d.div_ceil(16) * 16);
    let candle_threads = candle_core::utils::get_num_threads();

    // 2. Validate before measuring (and refuse what cannot fit).
    check_memory(&cfg)?;
    let validation = validate(&cfg)?;

    // 3. Inputs, once; the baseline is taken just before they exist, with the validation's freed memory handed
    //    back so that the passes cannot hide in it.
    attend::alloc::release_freed_memory();
    let baseline_rss_mb = rss_mb();
    let inputs = Inputs::new(&cfg, 1)?;
    let (mask, opts) = (cfg.mask(), cfg.options());

    // 4. Warmup, then timed iterations. Each pass's tensors are dropped before the next begins.
    let mut progress = Progress::new("bench attention", args.warmup + args.iters);
    let mut ms = Vec::with_capacity(args.iters);
    let mut faults = 0u64;
    for i in 0..args.warmup + args.iters {
        let dout = Inputs::upstream(&cfg, 1)?;
        let faults_before = minor_faults();
        let start = Instant::now();
        let p = pass(&inputs, dout, &mask, &opts)?;
        let took = start.elapsed();
        if i >= args.warmup {
            ms.push(took.as_secs_f64() * 1e3);
            faults += minor_faults().zip(faults_before).map_or(0, |(a, b)| a - b);
        }
        if i + 1 == args.warmup + args.iters {
            // A last sanity check on the full-size result (outside the timing).
            let total =
                candle(p.out.to_dtype(DType::F32).and_then(|o| o.sum_all()).and_then(|x| x.to_scalar::<f32>()))?;
            if !total.is_finite() {
                bail!("the {} output has non-finite values at full size", cfg.implementation.name());
            }
        }
        drop(p);
        progress.tick(i + 1, args.warmup, took);
    }
    progress.finish();
    let peak_rss_mb = peak_rss_mb();

    let times = Times::of(ms);
    let report = Report {
        cfg,
        threads,
        candle_threads,
        isa,
        tiles,
        warmup: args.warmup,
        iters: args.iters,
        gflops: cfg.flops() / (times.median / 1e3) / 1e9,
        times,
        peak_rss_mb,
        baseline_rss_mb,
        tensor_mb: cfg.tensor_bytes() as f64 / 1e6,
        faults_per_iter: minor_faults().map(|_| faults as f64 / args.iters as f64),
        validation,
    };
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    Ok(())
}

struct Report {
    cfg: Config,
    threads: usize,
    /// `candle_core::utils::get_num_threads()`: the gemm threads candle's matmul asks for.
    candle_threads: usize,
    isa: String,
    tiles: attend_kernels::flash::tiles::Tiles,
    warmup: usize,
    iters: usize,
    times: Times,
    gflops: f64,
    peak_rss_mb: Option<f64>,
    baseline_rss_mb: Option<f64>,
    tensor_mb: f64,
    /// Minor page faults per timed iteration (the pass only, not the drop of its outputs).
    faults_per_iter: Option<f64>,
    validation: Validation,
}

impl Report {
    fn json(&self) -> String {
        let c = &self.cfg;
        let cpu = CpuInfo::get();
        let v = &self.validation;
        json!({
            "command": "bench attention",
            "impl": c.implementation.name(),
            "dtype": c.dtype.name(),
            "batch": c.b,
            "heads": c.h,
            "kv_heads": c.hkv,
            "seq": c.t,
            "kv_seq": c.s,
            "head_dim": c.d,
            "causal": c.causal,
            "backward": c.backward,
            "threads": self.threads,
            "candle_threads": self.candle_threads,
            "isa": self.isa,
            "cpu": {"vendor": cpu.vendor, "family": cpu.family, "model": cpu.model, "name": cpu.name,
                    "microarchitecture": cpu.microarchitecture(), "l1d_kb": cpu.l1d_bytes / 1024,
                    "l2_kb": cpu.l2_bytes / 1024},
            "tiles": {"block_q": self.tiles.block_q, "block_k": self.tiles.block_k, "source": self.tiles.source},
            "keep_freed_memory": std::env::var("ATTEND_KEEP_FREED_MEMORY").as_deref() != Ok("0"),
            "bf16_kernel": match c.dtype {
                DtypeArg::Bf16 if attend_kernels::flash::tiles::bf16_dots_pay_off() => Some("bf16 dot products"),
                DtypeArg::Bf16 => Some("converted to f32"),
                DtypeArg::F32 => None,
            },
            "warmup": self.warmup,
            "iters": self.iters,
            "median_ms": self.times.median,
            "min_ms": self.times.min,
            "mean_ms": self.times.mean,
            "p90_ms": self.times.p90,
            "gflop": c.flops() / 1e9,
            "gflops": self.gflops,
            "peak_rss_mb": self.peak_rss_mb,
            "baseline_rss_mb": self.baseline_rss_mb,
            "tensor_mb": self.tensor_mb,
            "page_faults_per_iter": self.faults_per_iter,
            "validated_on": {"batch": v.dims[0], "heads": v.dims[1], "kv_heads": v.dims[2], "seq": v.dims[3],
                             "kv_seq": v.dims[4], "head_dim": v.dims[5]},
            "validation": v.method,
            "max_abs_diff_vs_reference": v.max_abs_diff,
        })
        .to_string()
    }

    fn human(&self) -> String {
        let c = &self.cfg;
        let t = &self.times;
        let mut s = format!("attend bench attention: {}\n", c.describe());
        s += &format!(
            "  shape   B={} H={} Hkv={} T={} S={} D={}   isa {}, threads {} (candle gemm {})\n",
            c.b, c.h, c.hkv, c.t, c.s, c.d, self.isa, self.threads, self.candle_threads
        );
        s += &format!(
            "  time    median {:.3} ms  (min {:.3}, mean {:.3}, p90 {:.3}; {} iterations after {} warmup)\n",
            t.median, t.min, t.mean, t.p90, self.iters, self.warmup
        );
        let convention = match (c.causal, c.backward) {
            (false, false) => "4·B·H·T·S·D",
            (true, false) => "4·B·H·D × causal pairs",
            (false, true) => "4·B·H·T·S·D × 3.5 (fwd+bwd)",
            (true, true) => "4·B·H·D × causal pairs × 3.5 (fwd+bwd)",
        };
        let cpu = CpuInfo::get();
        s += &format!(
            "  cpu     {} ({}, family {} model {}), tiles {}×{} ({})\n",
            cpu.name,
            if cpu.microarchitecture().is_empty() { &cpu.vendor } else { cpu.microarchitecture() },
            cpu.family,
            cpu.model,
            self.tiles.block_q,
            self.tiles.block_k,
            self.tiles.source
        );
        s += &format!(
            "  rate    {:.1} GFLOP/s  ({:.3} GFLOP per iteration = {convention})\n",
            self.gflops,
            c.flops() / 1e9
        );
        match (self.peak_rss_mb, self.baseline_rss_mb) {
            (Some(peak), Some(base)) => {
                s += &format!(
                    "  memory  peak RSS {peak:.1} MB = baseline {base:.1} + tensors {:.1} + other {:.1}\n",
                    self.tensor_mb,
                    peak - base - self.tensor_mb
                )
            }
            _ => s += &format!("  memory  tensors {:.1} MB (RSS not available on this system)\n", self.tensor_mb),
        }
        if let Some(f) = self.faults_per_iter {
            s += &format!(
                "  faults  {f:.0} minor page faults per iteration (≈ {:.1} MB of fresh 4 KiB pages)\n",
                f * 4096.0 / 1e6
            );
        }
        let v = &self.validation;
        s += &format!(
            "  check   max |Δ| {:.2e} ({}) on B={} H={} Hkv={} T={} S={} D={}\n",
            v.max_abs_diff, v.method, v.dims[0], v.dims[1], v.dims[2], v.dims[3], v.dims[4], v.dims[5]
        );
        s
    }
}
