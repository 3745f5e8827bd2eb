//! `attend bench lstm|gru`: a recurrent layer over a batch of sequences, in the units of the PyTorch anchor
//! (`/work/shared/bench/torch_rnn_anchor.py`: median ms, tokens/s), validated before timing (fused cells against
//! their composed twins on the timed shape).

use anyhow::{anyhow, bail, Result};
use attend::rnn::{CellImpl, Gru, Lstm, RnnConfig};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use serde_json::json;

use super::{available_threads, configure_threads, cpu_json, peak_rss_mb, time_passes};
use crate::errors;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Lstm,
    Gru,
}

#[derive(Debug, Args)]
pub struct BenchRnnArgs {
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    #[arg(long, default_value_t = 256)]
    input: usize,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 1)]
    layers: usize,
    #[arg(long)]
    bidirectional: bool,
    /// Forward and backward (the loss Σ output, as the anchor).
    #[arg(long)]
    backward: bool,
    /// Composed reference cells instead of the fused ones.
    #[arg(long)]
    reference: bool,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 7)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

enum Layer {
    Lstm(Lstm),
    Gru(Gru),
}

impl Layer {
    fn run(&self, x: &Tensor) -> attend::Result<Tensor> {
        Ok(match self {
            Layer::Lstm(l) => l.forward(x, None, None, None)?.output,
            Layer::Gru(g) => g.forward(x, None, None)?.output,
        })
    }
    fn set_impl(&mut self, imp: CellImpl) {
        match self {
            Layer::Lstm(l) => l.set_cell_impl(imp),
            Layer::Gru(g) => g.set_cell_impl(imp),
        }
    }
}

fn at(e: attend::Error) -> anyhow::Error {
    anyhow!(errors::attend(&e))
}

pub fn run(args: BenchRnnArgs, kind: Kind) -> Result<()> {
    let name = if kind == Kind::Lstm { "lstm" } else { "gru" };
    for (flag, v) in [
        ("batch", args.batch),
        ("seq", args.seq),
        ("input", args.input),
        ("hidden", args.hidden),
        ("layers", args.layers),
        ("iters", args.iters),
    ] {
        if v == 0 {
            bail!("bench {name}: --{flag} must be positive");
        }
    }
    let threads = args.threads.unwrap_or_else(available_threads);
    configure_threads(threads)?;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = RnnConfig {
        num_layers: args.layers,
        bidirectional: args.bidirectional,
        ..RnnConfig::new(args.input, args.hidden)
    };
    let mut layer = match kind {
        Kind::Lstm => Layer::Lstm(Lstm::new(cfg.clone(), vb).map_err(at)?),
        Kind::Gru => Layer::Gru(Gru::new(cfg.clone(), vb).map_err(at)?),
    };
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (args.batch, args.seq, args.input), &dev)?)?;

    // Validate on the timed shape: fused cells against the composed twins, forward and input gradient.
    let pass = |layer: &Layer, x: &Tensor| -> Result<(Tensor, Option<Tensor>)> {
        let y = layer.run(x).map_err(at)?;
        let g = if args.backward {
            Some(y.sum_all()?.backward()?.get(x).cloned().ok_or_else(|| anyhow!("no gradient"))?)
        } else {
            None
        };
        Ok((y, g))
    };
    layer.set_impl(CellImpl::Reference);
    let (yr, gr) = pass(&layer, x.as_tensor())?;
    layer.set_impl(CellImpl::Fused);
    let (yf, gf) = pass(&layer, x.as_tensor())?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
        Ok((a - b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    };
    let mut max_diff = diff(&yf, &yr)?;
    if let (Some(a), Some(b)) = (&gf, &gr) {
        max_diff = max_diff.max(diff(a, b)? / (1.0 + b.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?));
    }
    if max_diff > 1e-3 {
        bail!("bench {name}: fused and composed cells disagree by {max_diff:.2e} on the timed shape");
    }
    if args.reference {
        layer.set_impl(CellImpl::Reference);
    }
    // A forward-only run is inference, as the anchor's `torch.no_grad()`: weights and input that track no gradient
    // (as loaded from a checkpoint), so the layer keeps no activations for a backward.
    let input = if args.backward { x.as_tensor().clone() } else { x.as_tensor().detach() };
    if !args.backward {
        let vb = super::inference_weights(&vm)?;
        let imp = if args.reference { CellImpl::Reference } else { CellImpl::Fused };
        layer = match kind {
            Kind::Lstm => Layer::Lstm(Lstm::new(cfg, vb).map_err(at)?),
            Kind::Gru => Layer::Gru(Gru::new(cfg, vb).map_err(at)?),
        };
        layer.set_impl(imp);
    }

    let times =
        time_passes(if kind == Kind::Lstm { "bench lstm" } else { "bench gru" }, args.warmup, args.iters, || {
            pass(&layer, &input).map(drop)
        })?;
    let tokens_per_s = (args.batch * args.seq) as f64 / times.median * 1e3;
    if args.json {
        println!(
            "{}",
            json!({
                "bench": name, "backward": args.backward, "batch": args.batch, "seq": args.seq, "input": args.input,
                "hidden": args.hidden, "layers": args.layers, "bidirectional": args.bidirectional,
                "cells": if args.reference { "reference" } else { "fused" },
                "threads": threads, "candle_threads": candle_core::utils::get_num_threads(), "cpu": cpu_json(),
                "warmup": args.warmup, "iters": args.iters,
                "median_ms": times.median, "min_ms": times.min, "mean_ms": times.mean, "p90_ms": times.p90,
                "tokens_per_s": tokens_per_s, "peak_rss_mb": peak_rss_mb(),
                "max_abs_diff_fused_vs_reference": max_diff,
            })
        );
    } else {
        println!(
            "attend bench {name}: B={} T={} C={} H={} layers {}{}, {}\n  time    median {:.3} ms (min {:.3}, mean {:.3}, p90 {:.3})\n  rate    {:.0} tokens/s\n  check   fused vs composed cells max |Δ| {:.2e}",
            args.batch, args.seq, args.input, args.hidden, args.layers,
            if args.bidirectional { " bidirectional" } else { "" },
            if args.backward { "forward+backward" } else { "forward" },
            times.median, times.min, times.mean, times.p90, tokens_per_s, max_diff
        );
    }
    Ok(())
}
