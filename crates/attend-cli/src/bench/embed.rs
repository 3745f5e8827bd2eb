//! `attend bench embed [--batch 32] [--tokens 128] [--json]`: sentence embeddings on the all-MiniLM-L6-v2 shape (BERT,
//! 6 layers, C 384, 12 heads, d_ff 1536, 30522 tokens; random weights), mean pooling and L2 normalisation over a full
//! batch — what sentence-transformers' `encode` runs per batch — beside `torch_gpt_anchor.py embed`.

use anyhow::{anyhow, bail, Result};
use attend::layers::pooling::{l2_normalize, pool, PoolingMode};
use attend::models::bert::{BertConfig, BertInput};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde_json::json;

use super::{available_threads, configure_threads, cpu_json, peak_rss_mb, random_bert, time_passes};

#[derive(Debug, Args)]
pub struct BenchEmbedArgs {
    /// Texts per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Tokens per text (no padding).
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

/// all-MiniLM-L6-v2's shape.
fn minilm() -> BertConfig {
    BertConfig { n_layers: 6, max_position_embeddings: 512, ..BertConfig::base(30522, 384, 12) }
}

pub fn run(args: BenchEmbedArgs) -> Result<()> {
    if args.batch == 0 || args.tokens == 0 || args.iters == 0 {
        bail!("bench embed: --batch, --tokens and --iters must be positive");
    }
    let cfg = minilm();
    if args.tokens > cfg.max_position_embeddings {
        bail!("bench embed: --tokens must be at most {}", cfg.max_position_embeddings);
    }
    let threads = args.threads.unwrap_or_else(available_threads);
    configure_threads(threads)?;
    let dev = Device::Cpu;
    let (bert, params) = random_bert(&cfg)?;
    let n = args.batch * args.tokens;
    let ids: Vec<u32> = (0..n as u32).map(|i| (i.wrapping_mul(7919) + 13) % 30522).collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.tokens), &dev)?;
    let mask = Tensor::ones((args.batch, args.tokens), DType::U32, &dev)?;
    let times = time_passes("bench embed", args.warmup, args.iters, || {
        let input = BertInput { attention_mask: Some(&mask), ..BertInput::new(&ids) };
        let h = bert.forward(&input).map_err(|e| anyhow!("{e}"))?.hidden;
        let e = l2_normalize(&pool(&h, &mask, &[PoolingMode::Mean]).map_err(|e| anyhow!("{e}"))?)
            .map_err(|e| anyhow!("{e}"))?;
        std::hint::black_box(e);
        Ok(())
    })?;
    let tokens_per_s = n as f64 / times.median * 1e3;
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "embed", "model": "all-MiniLM-L6-v2 shape", "params": params, "batch": args.batch,
                "tokens": args.tokens, "threads": threads, "cpu": cpu_json(), "median_ms": times.median,
                "min_ms": times.min, "tokens_per_s": tokens_per_s, "texts_per_s": args.batch as f64 / times.median * 1e3,
                "peak_rss_mb": peak_rss_mb(),
            })
        );
    } else {
        println!(
            "attend bench embed: all-MiniLM-L6-v2 shape ({:.1}M parameters), batch {} × {} tokens\n  time    median {:.1} ms\n  rate    {:.0} tokens/s",
            params as f64 / 1e6, args.batch, args.tokens, times.median, tokens_per_s
        );
    }
    Ok(())
}
