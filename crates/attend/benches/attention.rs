//! Criterion benches of the attention core: fused (flash kernel) against materialised, forward and
//! forward+backward, at B = 1, H = 8, D = 64, T = S ∈ {256, 1024}, causal and not.
//!
//! `cargo bench -p attend --bench attention` measures (about a minute); `… -- --test` runs every bench once, as a
//! smoke test. Throughput is reported as "elements" per second where one element is one flop in the PyTorch anchor
//! convention (`4·B·H·T·S·D`, halved for causal, ×3.5 for forward+backward), so `Gelem/s` reads as GFLOP/s and
//! compares with `/work/shared/bench/torch_anchor.py` and `attend bench attention`.
//!
//! Each configuration is validated before it is measured: fused and materialised must agree on the output (and on
//! dq, dk, dv for forward+backward).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use attend::attention::{attention_with, AttentionImpl, AttentionOptions, Mask};
use attend_kernels::flash::{attention_flops, FlashDims};
use candle_core::{DType, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const B: usize = 1;
const H: usize = 8;
const D: usize = 64;

/// Seeded inputs of one configuration; for forward+backward q, k, v are variables.
struct Inputs {
    q: Tensor,    // (B, H, T, D)
    k: Tensor,    // (B, H, S, D)
    v: Tensor,    // (B, H, S, D)
    dout: Tensor, // (B, H, T, D)
}

impl Inputs {
    fn new(t: usize, var: bool) -> Self {
        let leaf = |seed| {
            let x = common::randn(&[B, H, t, D], seed, DType::F32);
            if var {
                Var::from_tensor(&x).unwrap().into_inner()
            } else {
                x
            }
        };
        Inputs { q: leaf(1), k: leaf(2), v: leaf(3), dout: common::randn(&[B, H, t, D], 4, DType::F32) }
    }
}

/// One forward, or forward + `Σ o ⊙ do` + backward; returns o, then dq, dk, dv when `backward`.
fn pass(x: &Inputs, mask: &Mask, imp: AttentionImpl, backward: bool) -> Vec<Tensor> {
    let opts = AttentionOptions { implementation: imp, ..Default::default() };
    let out = attention_with(&x.q, &x.k, &x.v, mask, &opts).unwrap().out; // (B, H, T, D)
    if !backward {
        return vec![out];
    }
    let grads = common::weighted_sum(&out, &x.dout).backward().unwrap();
    let g = |t: &Tensor| grads.get(t).expect("no gradient").clone();
    vec![out, g(&x.q), g(&x.k), g(&x.v)]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn bench_attention(c: &mut Criterion) {
    for backward in [false, true] {
        let mut group = c.benchmark_group(if backward { "attention_fwd_bwd" } else { "attention_fwd" });
        group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
        for t in [256, 1024] {
            let x = Inputs::new(t, backward);
            for causal in [false, true] {
                let mask = if causal { Mask::none().with_causal() } else { Mask::none() };
                // Validate before measuring.
                let fused = pass(&x, &mask, AttentionImpl::Fused, backward);
                let materialized = pass(&x, &mask, AttentionImpl::Materialized, backward);
                for (name, (a, b)) in ["o", "dq", "dk", "dv"].iter().zip(fused.iter().zip(&materialized)) {
                    let diff = max_abs_diff(a, b);
                    assert!(diff < 1e-3, "T={t} causal={causal}: fused and materialized {name} differ by {diff}");
                }
                let dims = FlashDims { b: B, h: H, hkv: H, t, s: t, d: D, dv: D };
                let flops = attention_flops(&dims, causal, backward);
                group.throughput(Throughput::Elements(flops as u64));
                let label = format!("T={t}{}", if causal { "/causal" } else { "" });
                for (name, imp) in [("fused", AttentionImpl::Fused), ("materialized", AttentionImpl::Materialized)] {
                    group.bench_with_input(BenchmarkId::new(name, &label), &x, |bench, x| {
                        bench.iter(|| pass(x, &mask, imp, backward))
                    });
                }
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
