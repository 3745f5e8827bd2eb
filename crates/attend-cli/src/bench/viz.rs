//! `attend bench viz [--tokens 512] [--json] [--out page.html]`: what looking inside costs. BERT-base's shape (12
//! layers, C 768, 12 heads; random weights), one sequence: the plain forward beside the forward that returns every
//! layer's weights (the fused kernel's side channel) plus building the page (`AttentionMaps`, rollout, summary,
//! quantised data block). `--out` keeps the page, for timing it in a browser (its `#selftest` reports first paint and
//! layer switch times).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use attend::models::bert::{BertConfig, BertInput};
use attend::viz::html::{page, PageOptions};
use attend::viz::AttentionMaps;
use candle_core::{Device, Tensor};
use clap::Args;
use serde_json::json;

use super::{available_threads, configure_threads, cpu_json, random_bert, time_passes};

#[derive(Debug, Args)]
pub struct BenchVizArgs {
    /// Tokens in the sequence.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Also write the page here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchVizArgs) -> Result<()> {
    let cfg = BertConfig::base(30522, 768, 12);
    if args.tokens == 0 || args.tokens > cfg.max_position_embeddings || args.iters == 0 {
        bail!("bench viz: --tokens must be in 1..={} and --iters positive", cfg.max_position_embeddings);
    }
    let threads = args.threads.unwrap_or_else(available_threads);
    configure_threads(threads)?;
    let dev = Device::Cpu;
    let (bert, _) = random_bert(&cfg)?;
    let t = args.tokens;
    let ids: Vec<u32> = (0..t as u32).map(|i| (i.wrapping_mul(7919) + 13) % 30522).collect();
    let ids = Tensor::from_vec(ids, (1, t), &dev)?;
    let err = |e: attend::Error| anyhow!("{e}");
    let plain = time_passes("bench viz (forward)", args.warmup, args.iters, || {
        std::hint::black_box(bert.forward(&BertInput::new(&ids)).map_err(err)?.hidden);
        Ok(())
    })?;
    let tokens: Vec<String> = (0..t).map(|i| format!("tok{i}")).collect();
    let mut special = vec![false; t];
    special[0] = true;
    special[t - 1] = true;
    let mut html = String::new();
    let viz = time_passes("bench viz (forward + page)", args.warmup, args.iters, || {
        let input = BertInput { need_weights: true, ..BertInput::new(&ids) };
        let weights = bert.forward(&input).map_err(err)?.weights;
        let maps = AttentionMaps::new(tokens.clone(), special.clone(), &weights, false).map_err(err)?;
        html = page(&maps, &PageOptions { title: "bench viz".into(), ..Default::default() }).map_err(err)?;
        Ok(())
    })?;
    if let Some(out) = &args.out {
        attend::checkpoint::write_atomic(out, html.as_bytes()).map_err(err)?;
    }
    let ratio = viz.median / plain.median;
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "viz", "model": "bert-base shape", "tokens": t, "layers": cfg.n_layers, "heads": cfg.n_heads,
                "threads": threads, "cpu": cpu_json(), "forward_median_ms": plain.median,
                "median_ms": viz.median, "ratio_to_forward": ratio, "page_bytes": html.len(),
                "tokens_per_s": t as f64 / viz.median * 1e3,
            })
        );
    } else {
        println!(
            "attend bench viz: bert-base shape, {t} tokens\n  forward          {:.1} ms\n  forward + page   {:.1} ms ({ratio:.2}×)\n  page             {:.1} MB",
            plain.median,
            viz.median,
            html.len() as f64 / 1e6
        );
    }
    Ok(())
}
