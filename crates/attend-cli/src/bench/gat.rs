//! `attend bench gat`: graph attention on a random graph (uniform random edges, as the PyTorch Geometric anchor
//! `/work/shared/bench/torch_rnn_anchor.py gat`), forward or forward+backward, median ms.

use anyhow::{anyhow, bail, Result};
use attend::layers::gat::{Gat, GatConfig, GatVersion};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use serde_json::json;

use super::{available_threads, configure_threads, cpu_json, peak_rss_mb, time_passes};
use crate::errors;

#[derive(Debug, Args)]
pub struct BenchGatArgs {
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 200_000)]
    edges: usize,
    /// Input features per node.
    #[arg(long = "in", default_value_t = 64)]
    in_channels: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Output features per head.
    #[arg(long, default_value_t = 8)]
    out: usize,
    /// GATv2 instead of GAT.
    #[arg(long)]
    v2: bool,
    /// Forward and backward (the loss Σ out, as the anchor).
    #[arg(long)]
    backward: bool,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 7)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchGatArgs) -> Result<()> {
    if args.nodes == 0 || args.in_channels == 0 || args.heads == 0 || args.out == 0 || args.iters == 0 {
        bail!("bench gat: --nodes, --in, --heads, --out and --iters must be positive");
    }
    let threads = args.threads.unwrap_or_else(available_threads);
    configure_threads(threads)?;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let version = if args.v2 { GatVersion::V2 } else { GatVersion::V1 };
    let cfg = GatConfig { heads: args.heads, ..GatConfig::new(args.in_channels, args.out, version) };
    let gat = Gat::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).map_err(|e| anyhow!(errors::attend(&e)))?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (args.nodes, args.in_channels), &dev)?)?;
    // Uniform random edges from a fixed generator (SplitMix-style bits), like torch.randint in the anchor.
    let pick = |i: u64| (attend_kernels::dropout::random_bits(7, i) as u64 * args.nodes as u64 >> 32) as i64;
    let src: Vec<i64> = (0..args.edges as u64).map(pick).collect();
    let dst: Vec<i64> = (0..args.edges as u64).map(|i| pick(i + args.edges as u64)).collect();
    let edges = Tensor::new(vec![src, dst], &dev)?;
    let times = time_passes("bench gat", args.warmup, args.iters, || {
        let out = gat.forward(x.as_tensor(), &edges).map_err(|e| anyhow!(errors::attend(&e)))?.out;
        if args.backward {
            out.sum_all()?.backward()?;
        }
        Ok(())
    })?;
    if args.json {
        println!(
            "{}",
            json!({
                "bench": if args.v2 { "gatv2" } else { "gat" }, "backward": args.backward, "nodes": args.nodes,
                "edges": args.edges, "in": args.in_channels, "heads": args.heads, "out": args.out,
                "threads": threads, "cpu": cpu_json(), "warmup": args.warmup, "iters": args.iters,
                "median_ms": times.median, "min_ms": times.min, "mean_ms": times.mean, "p90_ms": times.p90,
                "peak_rss_mb": peak_rss_mb(),
            })
        );
    } else {
        println!(
            "attend bench {}: N={} E={} F={} heads {}×{} {}\n  time    median {:.3} ms (min {:.3}, mean {:.3}, p90 {:.3})",
            if args.v2 { "gatv2" } else { "gat" }, args.nodes, args.edges, args.in_channels, args.heads, args.out,
            if args.backward { "forward+backward" } else { "forward" }, times.median, times.min, times.mean, times.p90
        );
    }
    Ok(())
}
