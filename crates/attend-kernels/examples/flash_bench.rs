//! Quick kernel-only timing of the flash kernel (no candle, no autograd), for tuning:
//! `cargo run --release -p attend-kernels --example flash_bench -- T D [causal] [bwd]`.
//! The user-facing benchmark is `attend bench attention`.

use attend_kernels::flash::masks::{Alibi, Causal, NoMask, NoScoreMod, Softcap};
use attend_kernels::flash::{
    f32_to_bf16, flash_backward, flash_forward, flash_forward_bf16, Bf16, FlashConfig, FlashDims, MaskMod, ScoreMod,
};
use std::time::Instant;

fn fill(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| ((attend_kernels::dropout::random_bits(seed, i as u64) as f64 / 4.294967296e9) - 0.5) as f32)
        .collect()
}

/// Peak resident memory so far, MB (VmHWM), and current (VmRSS).
fn rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run<M: MaskMod, F: ScoreMod>(dims: FlashDims, cfg: FlashConfig, mask: &M, score: &F, bwd: bool, flops: f64) {
    let (q, k, v) = (
        fill(dims.b * dims.h * dims.t * dims.d, 1),
        fill(dims.b * dims.hkv * dims.s * dims.d, 2),
        fill(dims.b * dims.hkv * dims.s * dims.dv, 3),
    );
    let mut o = vec![0f32; dims.b * dims.h * dims.t * dims.dv];
    let mut lse = vec![0f32; dims.b * dims.h * dims.t];
    let dout = fill(o.len(), 4);
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    if std::env::var("BF16").is_ok() {
        let cv = |x: &[f32]| x.iter().map(|&v| Bf16(f32_to_bf16(v))).collect::<Vec<_>>();
        let (qb, kb, vb) = (cv(&q), cv(&k), cv(&v));
        let mut ob = vec![Bf16(0); o.len()];
        let mut ts = vec![];
        for _ in 0..7 {
            let t0 = Instant::now();
            flash_forward_bf16(&dims, &cfg, mask, score, &qb, &kb, &vb, &mut ob, &mut lse).expect("flash forward");
            ts.push(t0.elapsed().as_secs_f64());
        }
        flash_forward(&dims, &cfg, mask, score, &q, &k, &v, &mut o, &mut lse).expect("flash forward");
        let err =
            o.iter().zip(&ob).map(|(a, b)| (a - attend_kernels::flash::bf16_to_f32(b.0)).abs()).fold(0f32, f32::max);
        let f = median(ts);
        println!("bf16 fwd {:.2} ms {:.1} GF/s (max |bf16 − f32| = {err:.2e})", f * 1e3, flops / f / 1e9);
        return;
    }
    let mut fwd_t = vec![];
    let mut bwd_t = vec![];
    let iters = std::env::var("ITERS").ok().and_then(|x| x.parse().ok()).unwrap_or(7);
    // Touch every output so that the baseline holds all tensors; what the peak adds is the kernels' own memory.
    for buf in [&mut o, &mut lse, &mut dq, &mut dk, &mut dv] {
        buf.fill(1.0);
    }
    let (_, base) = rss_mb();
    for it in 0..iters {
        let t0 = Instant::now();
        flash_forward(&dims, &cfg, mask, score, &q, &k, &v, &mut o, &mut lse).expect("flash forward");
        let t1 = Instant::now();
        if bwd {
            flash_backward(&dims, &cfg, mask, score, &q, &k, &v, &o, &lse, &dout, &mut dq, &mut dk, &mut dv)
                .expect("flash backward");
        }
        let t2 = Instant::now();
        if it >= 2 || iters <= 2 {
            fwd_t.push((t1 - t0).as_secs_f64());
            bwd_t.push((t2 - t1).as_secs_f64());
        }
    }
    let (f, b) = (median(fwd_t), median(bwd_t));
    print!("fwd {:.2} ms {:.1} GF/s", f * 1e3, flops / f / 1e9);
    if bwd {
        print!(
            " | bwd {:.2} ms {:.1} GF/s (2.5x flops) | fwd+bwd {:.1} GF/s",
            b * 1e3,
            2.5 * flops / b / 1e9,
            3.5 * flops / (f + b) / 1e9
        );
    }
    println!(" [{:?} bq={} bk={}]", cfg.isa, cfg.block_q, cfg.block_k);
    let (peak, _) = rss_mb();
    println!(
        "memory: {base:.1} MB with every tensor resident, peak {peak:.1} MB: the kernels added {:.1} MB",
        peak - base
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let t: usize = a.get(1).map_or(1024, |x| x.parse().unwrap());
    let d: usize = a.get(2).map_or(64, |x| x.parse().unwrap());
    let causal = a.iter().any(|x| x == "causal");
    let bwd = a.iter().any(|x| x == "bwd");
    // H and HKV pick the heads (default 8 and 8; HKV=1 is multi-query attention).
    let env = |k: &str, default: usize| std::env::var(k).ok().and_then(|x| x.parse().ok()).unwrap_or(default);
    let (h, hkv) = (env("H", 8), env("HKV", env("H", 8)));
    let dims = FlashDims { b: 1, h, hkv, t, s: t, d, dv: d };
    let mut cfg = FlashConfig::for_head_dims(1.0 / (d as f32).sqrt(), d, d);
    if let Ok(x) = std::env::var("BQ") {
        cfg.block_q = x.parse().unwrap();
    }
    if let Ok(x) = std::env::var("BK") {
        cfg.block_k = x.parse().unwrap();
    }
    let flops = attend_kernels::flash::attention_flops(&dims, causal, false);
    // MOD=softcap|alibi times a score mod on top of the mask.
    let slopes: Vec<f32> = (0..h).map(|h| 0.5f32.powi(h as i32 + 1)).collect();
    let alibi = Alibi { slopes: &slopes, offset: 0 };
    let softcap = Softcap { cap: 30.0 };
    match (causal, std::env::var("MOD").ok().as_deref()) {
        (true, Some("alibi")) => run(dims, cfg, &Causal { offset: 0 }, &alibi, bwd, flops),
        (true, Some("softcap")) => run(dims, cfg, &Causal { offset: 0 }, &softcap, bwd, flops),
        (true, _) => run(dims, cfg, &Causal { offset: 0 }, &NoScoreMod, bwd, flops),
        (false, Some("alibi")) => run(dims, cfg, &NoMask, &alibi, bwd, flops),
        (false, Some("softcap")) => run(dims, cfg, &NoMask, &softcap, bwd, flops),
        (false, _) => run(dims, cfg, &NoMask, &NoScoreMod, bwd, flops),
    }
}
