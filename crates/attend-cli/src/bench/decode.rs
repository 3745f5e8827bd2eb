//! `attend bench decode [--new-tokens 128] [--prompt 16] [--json]`: greedy decoding of GPT-2 small (124M
//! parameters, random weights, batch 1) with the KV cache, beside `torch_gpt_anchor.py decode` (Hugging Face
//! `generate`).
//!
//! Batch-1 decoding reads every weight once per token, so its limit is memory bandwidth, not FLOPs. The bench
//! measures that limit on the spot, just before every pass (untimed), because a shared machine's bandwidth drifts
//! by tens of percent within minutes: the best of three timed reads of a buffer four times the size of the weights
//! (too big for any cache), summed by all threads. `read_bandwidth_gb_s` is the median of those measurements (their
//! range beside it), `bandwidth_limit_tokens_per_s` = bandwidth / weight bytes, and
//! `fraction_of_bandwidth_limit` compares the median pass with the median bandwidth.

use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use attend::generate::{generate, GenerateConfig};
use attend::models::gpt::{Gpt, GptConfig};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use rayon::prelude::*;
use serde_json::json;

use super::{available_threads, configure_threads, cpu_json, inference_weights, peak_rss_mb, time_passes_after};

#[derive(Debug, Args)]
pub struct BenchDecodeArgs {
    /// New tokens per run.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Prompt length (random ids).
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

/// Read bandwidth in bytes/s: the best of `rounds` parallel sums over `buf`.
fn read_bandwidth(buf: &[f32], rounds: usize) -> f64 {
    let mut best = f64::INFINITY;
    let mut sink = 0.0f32;
    for _ in 0..rounds {
        let t = Instant::now();
        // Sixteen independent lanes so the sum vectorises and the loop waits on memory, not on one adder.
        sink += buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for v in c.chunks_exact(16) {
                    acc.iter_mut().zip(v).for_each(|(a, x)| *a += x);
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    std::mem::size_of_val(buf) as f64 / best
}

pub fn run(args: BenchDecodeArgs) -> Result<()> {
    if args.new_tokens == 0 || args.prompt == 0 || args.iters == 0 {
        bail!("bench decode: --new-tokens, --prompt and --iters must be positive");
    }
    let threads = args.threads.unwrap_or_else(available_threads);
    configure_threads(threads)?;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = GptConfig::gpt2(50257, 1024, 768, 12); // GPT-2 small
    if args.prompt + args.new_tokens > cfg.n_positions {
        bail!("bench decode: --prompt + --new-tokens must be at most {}", cfg.n_positions);
    }
    // Created through a VarMap (GPT-2's initialisation), then rebuilt over detached copies, as loaded from a
    // checkpoint for inference.
    Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).map_err(|e| anyhow!("{e}"))?;
    let gpt = Gpt::new(&cfg, inference_weights(&vm)?).map_err(|e| anyhow!("{e}"))?;
    let params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    let weight_bytes = params * 4;
    let prompt: Vec<u32> = (0..args.prompt as u32).map(|i| (i * 7919 + 13) % 50257).collect();
    let gen_cfg = GenerateConfig { max_new_tokens: args.new_tokens, ..Default::default() };
    let probe: Vec<f32> = (0..weight_bytes).map(|i| (i % 7) as f32).collect(); // 4 × the weights' bytes
    let mut bandwidths = Vec::new();
    let times = time_passes_after(
        "bench decode",
        args.warmup,
        args.iters,
        || {
            bandwidths.push(read_bandwidth(&probe, 3));
            Ok(())
        },
        || generate(&gpt, &[prompt.clone()], &gen_cfg, |_, _| {}).map(drop).map_err(|e| anyhow!("{e}")),
    )?;
    drop(probe);
    bandwidths.sort_by(f64::total_cmp);
    let bandwidth = bandwidths[bandwidths.len() / 2];
    let tokens_per_s = args.new_tokens as f64 / times.median * 1e3;
    let limit = bandwidth / weight_bytes as f64;
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "decode", "model": "gpt2-small", "params": params, "batch": 1, "prompt": args.prompt,
                "new_tokens": args.new_tokens, "threads": threads, "cpu": cpu_json(),
                "median_ms": times.median, "min_ms": times.min, "ms_per_token": times.median / args.new_tokens as f64,
                "tokens_per_s": tokens_per_s, "read_bandwidth_gb_s": bandwidth / 1e9,
                "read_bandwidth_gb_s_range": [bandwidths[0] / 1e9, bandwidths[bandwidths.len() - 1] / 1e9],
                "bandwidth_limit_tokens_per_s": limit, "fraction_of_bandwidth_limit": tokens_per_s / limit,
                "peak_rss_mb": peak_rss_mb(),
            })
        );
    } else {
        println!(
            "attend bench decode: GPT-2 small ({:.0}M parameters), batch 1, prompt {}, {} new tokens\n  time    median {:.1} ms ({:.2} ms/token)\n  rate    {:.1} tokens/s; bandwidth limit {:.1} tokens/s ({:.1} GB/s read, {:.0}% of it)",
            params as f64 / 1e6, args.prompt, args.new_tokens, times.median, times.median / args.new_tokens as f64,
            tokens_per_s, limit, bandwidth / 1e9, 100.0 * tokens_per_s / limit
        );
    }
    Ok(())
}
