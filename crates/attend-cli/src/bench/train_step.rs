//! `attend bench train-step --preset cpu|char [--json]`: one nanoGPT-style training step (forward, cross-entropy,
//! backward, AdamW) of the two configs of `torch_gpt_anchor.py` (`../shared/ANCHORS.md`), on random tokens.
//!
//! | preset | layers | heads | C | block | batch | vocab |
//! |---|---|---|---|---|---|---|
//! | `cpu` | 4 | 4 | 128 | 64 | 12 | 65 |
//! | `char` | 6 | 6 | 384 | 256 | 64 | 65 |
//!
//! Like the anchor's model: pre-norm, exact GELU, biases, tied output embedding, no dropout; AdamW with lr 1e-3 and
//! PyTorch's defaults (β = (0.9, 0.999), ε = 1e-8, weight decay 0.01).
//!
//! `--path fused` (the default) runs [`GptTrainer`], the step written out without autograd; `--path autograd` runs
//! the same model through candle's backward and candle-nn's AdamW, the reference the fused step is tested against.

use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use attend::layers::feed_forward::Activation;
use attend::models::gpt::{Gpt, GptConfig, GptInput};
use attend::models::gpt_trainer::GptTrainer;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::{Args, ValueEnum};
use serde_json::json;

use super::{available_threads, configure_threads, cpu_json, peak_rss_mb, time_passes};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    Cpu,
    Char,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StepPath {
    Fused,
    Autograd,
}

#[derive(Debug, Args)]
pub struct BenchTrainStepArgs {
    #[arg(long, value_enum, default_value_t = Preset::Cpu)]
    preset: Preset,
    /// The fused step (`GptTrainer`) or the model through candle's autograd.
    #[arg(long, value_enum, default_value_t = StepPath::Fused)]
    path: StepPath,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchTrainStepArgs) -> Result<()> {
    if args.iters == 0 {
        bail!("bench train-step: --iters must be positive");
    }
    let threads = args.threads.unwrap_or_else(available_threads);
    configure_threads(threads)?;
    let (layers, heads, c, block, batch) = match args.preset {
        Preset::Cpu => (4, 4, 128, 64, 12),
        Preset::Char => (6, 6, 384, 256, 64),
    };
    let vocab = 65;
    let cfg = GptConfig { n_layers: layers, activation: Activation::Gelu, ..GptConfig::gpt2(vocab, block, c, heads) };
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let gpt = Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).map_err(|e| anyhow!("{e}"))?;
    gpt.set_training(true);
    let params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(vm.all_vars(), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
    let x = Tensor::rand(0f32, vocab as f32, (batch, block), &dev)?.floor()?.to_dtype(DType::U32)?;
    let y = Tensor::rand(0f32, vocab as f32, (batch, block), &dev)?.floor()?.to_dtype(DType::U32)?;
    let mut last_loss = f32::NAN;
    // Per phase, to see where a step goes: forward (with the loss), backward, optimiser.
    let mut phases: Vec<[f64; 3]> = Vec::new();
    let mut fused = match args.path {
        StepPath::Fused => Some(GptTrainer::new(&cfg, &vm, batch, block).map_err(|e| anyhow!("{e}"))?),
        StepPath::Autograd => None,
    };
    let ids: Vec<u32> = x.flatten_all()?.to_vec1()?;
    let targets: Vec<i64> = y.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    let hp = attend_kernels::adamw::AdamW::default();
    let times = time_passes("bench train-step", args.warmup, args.iters, || {
        if let Some(tr) = fused.as_mut() {
            // The fused step's forward and backward are one call; the phases split it at the optimiser only.
            let t0 = Instant::now();
            tr.zero_grad();
            last_loss = tr.forward_backward(&ids, &targets).map_err(|e| anyhow!("{e}"))?;
            let t2 = Instant::now();
            tr.step(&hp);
            let t3 = Instant::now();
            phases.push([f64::NAN, (t2 - t0).as_secs_f64() * 1e3, (t3 - t2).as_secs_f64() * 1e3]);
            return Ok(());
        }
        let t0 = Instant::now();
        let logits = gpt.forward(&GptInput::new(&x), None).map_err(|e| anyhow!("{e}"))?; // (B, T, V)
        let loss = attend::ops::cross_entropy(
            &logits.reshape((batch * block, vocab))?, // (N, V)
            &y.flatten_all()?,
            &Default::default(),
            attend::ops::Reduction::Mean,
        )
        .map_err(|e| anyhow!("{e}"))?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        phases.push([(t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64()].map(|s| s * 1e3));
        last_loss = loss.to_scalar::<f32>()?;
        Ok(())
    })?;
    let timed = &mut phases[args.warmup..];
    let median = |i: usize, v: &mut [[f64; 3]]| {
        v.sort_by(|a, b| a[i].total_cmp(&b[i]));
        v[v.len() / 2][i]
    };
    let (fwd, bwd, optim) = (median(0, timed), median(1, timed), median(2, timed));
    if !last_loss.is_finite() {
        bail!("bench train-step: the loss is {last_loss}");
    }
    let tokens_per_s = (batch * block) as f64 / times.median * 1e3;
    let preset = if args.preset == Preset::Cpu { "cpu" } else { "char" };
    let path = if args.path == StepPath::Fused { "fused" } else { "autograd" };
    let phases = if fwd.is_nan() {
        format!("forward+backward {bwd:.2} ms, AdamW {optim:.2} ms")
    } else {
        format!("forward {fwd:.2} ms, backward {bwd:.2} ms, AdamW {optim:.2} ms")
    };
    if args.json {
        let mut v = json!({
            "bench": "train_step", "config": preset, "path": path, "params": params, "threads": threads, "cpu": cpu_json(),
            "median_ms": times.median, "min_ms": times.min, "p90_ms": times.p90, "tokens_per_s": tokens_per_s,
            "optimizer_ms": optim, "loss": last_loss, "peak_rss_mb": peak_rss_mb(),
        });
        // The fused step is one call for forward and backward; the autograd path times them apart.
        if fwd.is_nan() {
            v["forward_backward_ms"] = json!(bwd);
        } else {
            v["forward_ms"] = json!(fwd);
            v["backward_ms"] = json!(bwd);
        }
        println!("{v}");
    } else {
        println!(
            "attend bench train-step {preset} ({path}): {layers} layers, {heads} heads, C {c}, block {block}, batch {batch} ({:.2}M parameters)\n  time    median {:.2} ms (min {:.2}, p90 {:.2})\n  rate    {:.0} tokens/s\n  phases  {phases}",
            params as f64 / 1e6, times.median, times.min, times.p90, tokens_per_s
        );
    }
    Ok(())
}
