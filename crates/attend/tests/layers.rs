//! The classic attention layers beyond their oracle fixtures (`attend-cli/tests/op_layer.rs` checks every one
//! against PyTorch, PyTorch Geometric, entmax and the OpenNMT-py references): every parameter trained, padding that
//! never leaks, windows that hold, graph invariances, and the regularisers' definitions.

mod common;

use attend::layers::coattention::CoAttention;
use attend::layers::din::{Activation, DinAttention, DinScore};
use attend::layers::gat::{Gat, GatConfig, GatVersion};
use attend::layers::global::{GlobalAttention, GlobalAttentionConfig, GlobalType};
use attend::layers::han::{AttentionPooling, HanConfig, HierarchicalEncoder};
use attend::layers::local::{LocalAttention, LocalAttentionConfig, LocalMode};
use attend::layers::spatial::{doubly_stochastic_penalty, SpatialAttention, SpatialConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;

fn r(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed, DType::F32)
}

fn r64(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed, DType::F64)
}

/// Σ over outputs of Σ output ⊙ (fixed random weights).
fn loss(outputs: &[&Tensor]) -> Tensor {
    outputs.iter().enumerate().fold(Tensor::new(0f32, &Device::Cpu).unwrap(), |acc, (i, o)| {
        (acc + weighted_sum(o, &randn(o.dims(), 100 + i as u64, o.dtype()))).unwrap()
    })
}

fn vm_vb() -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    (vm, vb)
}

#[test]
fn every_parameter_of_every_layer_receives_a_gradient() {
    let (src, mem) = (r(&[2, 3, 6], 1), r(&[2, 5, 6], 2));
    for kind in [GlobalType::Dot, GlobalType::General, GlobalType::Concat, GlobalType::Mlp] {
        for coverage in [false, true] {
            if coverage && matches!(kind, GlobalType::Dot | GlobalType::General) {
                continue;
            }
            let (vm, vb) = vm_vb();
            let cfg = GlobalAttentionConfig::new(6, kind);
            let a =
                if coverage { GlobalAttention::with_coverage(cfg, vb) } else { GlobalAttention::new(cfg, vb) }.unwrap();
            reseed(&vm, 1, 0.5);
            let prepared = a.prepare(&mem, Some(&[5, 3])).unwrap();
            let cov = r(&[2, 5], 3).abs().unwrap();
            let o = a.step(&src, &prepared, coverage.then_some(&cov)).unwrap();
            let label = format!("global {kind:?} coverage={coverage}");
            if kind == GlobalType::Dot {
                assert_eq!(varmap_vars(&vm).len(), 1, "{label}: linear_out only");
            }
            assert_all_grads_finite_nonzero(
                &label,
                &varmap_vars(&vm),
                &loss(&[&o.attn_h, &o.align]).backward().unwrap(),
            );
        }
    }
    for mode in [LocalMode::Monotonic, LocalMode::Predictive] {
        let (vm, vb) = vm_vb();
        let a = LocalAttention::new(LocalAttentionConfig { dim: 6, window: 2, mode }, vb).unwrap();
        reseed(&vm, 2, 0.5);
        let o = a.forward(&src, &mem, Some(&[5, 4]), 1).unwrap();
        assert_all_grads_finite_nonzero(
            &format!("local {mode:?}"),
            &varmap_vars(&vm),
            &loss(&[&o.attn_h, &o.align]).backward().unwrap(),
        );
    }
    let (vm, vb) = vm_vb();
    let co = CoAttention::bilinear(6, vb).unwrap();
    reseed(&vm, 3, 0.5);
    let co = co.forward(&src, &mem, Some(&[3, 2]), Some(&[5, 4])).unwrap();
    assert_all_grads_finite_nonzero(
        "coattention",
        &varmap_vars(&vm),
        &loss(&[&co.attended1, &co.attended2]).backward().unwrap(),
    );
    let (vm, vb) = vm_vb();
    let p = AttentionPooling::new(6, 4, vb).unwrap();
    reseed(&vm, 4, 0.5);
    let p = p.forward(&mem, Some(&[5, 2])).unwrap();
    assert_all_grads_finite_nonzero("han pooling", &varmap_vars(&vm), &loss(&[&p.pooled]).backward().unwrap());
    let (vm, vb) = vm_vb();
    let cfg = HanConfig { input_size: 6, word_hidden: 3, sentence_hidden: 4, word_attn: 5, sentence_attn: 5 };
    let han = HierarchicalEncoder::new(cfg, vb).unwrap();
    reseed(&vm, 5, 0.5);
    let doc = han.forward(&r(&[2, 3, 4, 6], 4), Some(&[vec![4, 2, 3], vec![1, 3, 0]])).unwrap();
    assert_all_grads_finite_nonzero("han encoder", &varmap_vars(&vm), &loss(&[&doc.document]).backward().unwrap());
    let (vm, vb) = vm_vb();
    let sp = SpatialAttention::new(SpatialConfig { encoder_dim: 6, decoder_dim: 4, attention_dim: 5 }, vb).unwrap();
    reseed(&vm, 6, 0.5);
    let o = sp.forward(&mem, &r(&[2, 4], 5)).unwrap();
    assert_all_grads_finite_nonzero("spatial", &varmap_vars(&vm), &loss(&[&o.context]).backward().unwrap());
    for activation in [Activation::Sigmoid, Activation::Relu] {
        let (vm, vb) = vm_vb();
        let din = DinAttention::new(6, DinScore::Mlp { hidden: vec![8, 4], activation }, vb).unwrap();
        reseed(&vm, 7, 0.5);
        let o = din.forward(&mem, &r(&[2, 6], 6), Some(&[5, 3])).unwrap();
        assert_all_grads_finite_nonzero(
            &format!("din {activation:?}"),
            &varmap_vars(&vm),
            &loss(&[&o.pooled]).backward().unwrap(),
        );
    }
    for version in [GatVersion::V1, GatVersion::V2] {
        let (vm, vb) = vm_vb();
        let gat = Gat::new(GatConfig { heads: 3, ..GatConfig::new(6, 4, version) }, vb).unwrap();
        let edges = Tensor::new(&[[0i64, 1, 2, 3, 4, 0], [1, 2, 3, 4, 0, 2]], &Device::Cpu).unwrap();
        reseed(&vm, 8, 0.5);
        let o = gat.forward(&r(&[5, 6], 7), &edges).unwrap();
        assert_all_grads_finite_nonzero(
            &format!("gat {version:?}"),
            &varmap_vars(&vm),
            &loss(&[&o.out]).backward().unwrap(),
        );
    }
}

#[test]
fn padded_memory_never_reaches_the_output() {
    let dev = Device::Cpu;
    let (src, mem) = (r64(&[2, 3, 6], 11), r64(&[2, 5, 6], 12));
    let lengths = [5usize, 3];
    let keep = Tensor::from_vec((0..10).map(|i| ((i % 5) < lengths[i / 5]) as u8).collect::<Vec<_>>(), (2, 5, 1), &dev)
        .unwrap();
    let garbage =
        keep.broadcast_as((2, 5, 6)).unwrap().where_cond(&mem, &(r64(&[2, 5, 6], 13) * 1e3).unwrap()).unwrap();
    for kind in [GlobalType::Dot, GlobalType::General, GlobalType::Concat, GlobalType::Mlp] {
        let vm = VarMap::new();
        let a =
            GlobalAttention::new(GlobalAttentionConfig::new(6, kind), VarBuilder::from_varmap(&vm, DType::F64, &dev))
                .unwrap();
        let (x, y) =
            (a.forward(&src, &mem, Some(&lengths)).unwrap(), a.forward(&src, &garbage, Some(&lengths)).unwrap());
        assert_close(&format!("{kind:?} attn_h"), &x.attn_h, &y.attn_h, F64);
        assert_close(&format!("{kind:?} align"), &x.align, &y.align, F64);
    }
    let co = CoAttention::plain();
    let (x, y) = (
        co.forward(&src, &mem, None, Some(&lengths)).unwrap(),
        co.forward(&src, &garbage, None, Some(&lengths)).unwrap(),
    );
    assert_close("coattention attended1", &x.attended1, &y.attended1, F64);
    // Padded positions of x2 attend to nothing: their rows are zero.
    let pad_rows = x
        .attended2
        .get(1)
        .unwrap()
        .narrow(0, 3, 2)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(pad_rows, 0.0);
}

#[test]
fn local_windows_hold() {
    let dev = Device::Cpu;
    let (vm, d) = (VarMap::new(), 2usize);
    let a = LocalAttention::new(
        LocalAttentionConfig { dim: 4, window: d, mode: LocalMode::Monotonic },
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )
    .unwrap();
    let out = a.forward(&r(&[1, 4, 4], 21), &r(&[1, 9, 4], 22), None, 3).unwrap();
    let w: Vec<Vec<f32>> = out.align.get(0).unwrap().to_vec2().unwrap();
    for (i, row) in w.iter().enumerate() {
        let t = 3 + i; // local-m aligns step t with source position t
        for (s, &x) in row.iter().enumerate() {
            assert_eq!(x > 0.0, s.abs_diff(t) <= d, "step {t}, position {s}: {x}");
        }
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let p = LocalAttention::new(
        LocalAttentionConfig { dim: 4, window: d, mode: LocalMode::Predictive },
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )
    .unwrap();
    let out = p.forward(&r(&[2, 3, 4], 23), &r(&[2, 9, 4], 24), Some(&[9, 5]), 0).unwrap();
    let pos: Vec<Vec<f32>> = out.positions.to_vec2().unwrap();
    let w: Vec<Vec<Vec<f32>>> = out.align.to_vec3().unwrap();
    for b in 0..2 {
        for t in 0..3 {
            let len = [9.0, 5.0][b];
            assert!(pos[b][t] > 0.0 && pos[b][t] < len, "p_t = S·σ(·) lies in (0, S_b)");
            for (s, &x) in w[b][t].iter().enumerate() {
                if (s as f32 - pos[b][t]).abs() > d as f32 || s as f32 >= len {
                    assert_eq!(x, 0.0, "outside the window or the sequence");
                }
            }
        }
    }
}

#[test]
fn graph_attention_is_invariant_to_edge_order_and_sees_only_neighbours() {
    let dev = Device::Cpu;
    let (vm, x) = (VarMap::new(), r(&[6, 5], 31));
    for version in [GatVersion::V1, GatVersion::V2] {
        let gat = Gat::new(
            GatConfig { heads: 2, ..GatConfig::new(5, 3, version) },
            VarBuilder::from_varmap(&vm, DType::F32, &dev).pp(format!("{version:?}")),
        )
        .unwrap();
        let edges = [[0i64, 1, 2, 3, 4, 5, 0, 2], [1, 2, 3, 4, 5, 0, 3, 0]];
        let perm = [5usize, 2, 7, 0, 3, 6, 1, 4];
        let shuffled: Vec<Vec<i64>> = (0..2).map(|r| perm.iter().map(|&p| edges[r][p]).collect()).collect();
        let a = gat.forward(&x, &Tensor::new(&edges, &dev).unwrap()).unwrap();
        let b = gat.forward(&x, &Tensor::new(shuffled, &dev).unwrap()).unwrap();
        assert_close(&format!("{version:?} edge order"), &b.out, &a.out, F32);
        // Alphas of the same edge agree; each node's incoming weights sum to 1 per head.
        let (aa, ab): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (a.alpha.to_vec2().unwrap(), b.alpha.to_vec2().unwrap());
        for (k, &p) in perm.iter().enumerate() {
            assert!((ab[k][0] - aa[p][0]).abs() < 1e-6 && (ab[k][1] - aa[p][1]).abs() < 1e-6);
        }
        let dst: Vec<u32> = a.edge_index.get(1).unwrap().to_vec1().unwrap();
        for node in 0..6u32 {
            let s: f32 = dst.iter().zip(&aa).filter(|(&d, _)| d == node).map(|(_, w)| w[1]).sum();
            assert!((s - 1.0).abs() < 1e-5, "node {node}: incoming weights sum to {s}");
        }
        // Changing a node that does not send to node 1 leaves node 1 unchanged (its in-neighbours: 0 and itself).
        let x2 = x.slice_assign(&[4..5, 0..5], &r(&[1, 5], 32)).unwrap();
        let c = gat.forward(&x2, &Tensor::new(&edges, &dev).unwrap()).unwrap();
        assert_close("unrelated node", &c.out.get(1).unwrap(), &a.out.get(1).unwrap(), F32);
    }
}

#[test]
fn graph_attention_scales_to_many_edges() {
    // 2·10⁴ nodes' worth of edges through the edge-list path (a dense adjacency would be 10⁸ entries).
    let dev = Device::Cpu;
    let (n, e) = (10_000usize, 200_000usize);
    let src: Vec<i64> = (0..e).map(|i| ((i * 7919) % n) as i64).collect();
    let dst: Vec<i64> = (0..e).map(|i| ((i * 104_729 + 13) % n) as i64).collect();
    let edges = Tensor::new(vec![src, dst], &dev).unwrap();
    let vm = VarMap::new();
    let gat = Gat::new(
        GatConfig { heads: 4, ..GatConfig::new(16, 8, GatVersion::V1) },
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )
    .unwrap();
    let o = gat.forward(&r(&[n, 16], 41), &edges).unwrap();
    assert_eq!(o.out.dims(), &[n, 32]);
    assert!(o.out.sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
}

#[test]
fn regularisers_and_unnormalised_weights_follow_their_definitions() {
    // Σ_l (1 − Σ_t α_tl)², by hand.
    let alphas = Tensor::new(&[[[0.5f64, 0.5, 0.0], [0.2, 0.2, 0.6]]], &Device::Cpu).unwrap(); // (B, T, L)
    let want = (0.7f64 - 1.0).powi(2) + (0.7f64 - 1.0).powi(2) + (0.6f64 - 1.0).powi(2);
    let got = doubly_stochastic_penalty(&alphas).unwrap().to_vec1::<f64>().unwrap()[0];
    assert!((got - want).abs() < 1e-12);
    // DIN's weights are the MLP's outputs (no sum constraint) and the pooled vector their weighted sum.
    let (_vm, vb) = vm_vb();
    let din = DinAttention::new(4, DinScore::Mlp { hidden: vec![6], activation: Activation::Sigmoid }, vb).unwrap();
    let (hist, tgt) = (r(&[2, 5, 4], 51), r(&[2, 4], 52));
    let o = din.forward(&hist, &tgt, Some(&[5, 2])).unwrap();
    let manual = o.weights.unsqueeze(2).unwrap().broadcast_mul(&hist).unwrap().sum(1).unwrap();
    assert_close("din pooled", &o.pooled, &manual, F32);
    let sums: Vec<f32> = o.weights.sum(1).unwrap().to_vec1().unwrap();
    assert!(sums.iter().any(|s| (s - 1.0).abs() > 1e-3), "DIN weights are not normalised: {sums:?}");
    // The scaled-dot option is a softmax.
    let soft =
        DinAttention::new(4, DinScore::ScaledDot, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))
            .unwrap();
    let sums: Vec<f32> = soft.forward(&hist, &tgt, Some(&[5, 2])).unwrap().weights.sum(1).unwrap().to_vec1().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
}

#[test]
fn truncated_attention_streams_with_a_bounded_cache() {
    use attend::attention::MultiHeadAttentionConfig;
    use attend::layers::truncated::TruncatedSelfAttention;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let x = r64(&[2, 17, 8], 61);
    for left in [0usize, 1, 4] {
        let layer = TruncatedSelfAttention::new(
            &MultiHeadAttentionConfig::new(8, 2),
            left,
            0,
            VarBuilder::from_varmap(&vm, DType::F64, &dev).pp(format!("l{left}")),
        )
        .unwrap();
        let whole = layer.forward(&x).unwrap();
        for chunk in [1usize, 3, 5, 17] {
            let mut stream = layer.stream();
            let mut parts = vec![];
            let mut at = 0;
            while at < 17 {
                let n = chunk.min(17 - at);
                parts.push(stream.push(&layer, &x.narrow(1, at, n).unwrap()).unwrap());
                assert!(stream.cached() <= left, "cache holds {} > left = {left}", stream.cached());
                at += n;
            }
            assert_close(&format!("left {left}, chunks of {chunk}"), &Tensor::cat(&parts, 1).unwrap(), &whole, F64);
        }
        // Position t is unaffected by anything more than `left` steps back.
        let changed = x.slice_assign(&[0..2, 0..1, 0..8], &r64(&[2, 1, 8], 62)).unwrap();
        let after = layer.forward(&changed).unwrap();
        assert_close(
            "beyond the look-back",
            &after.narrow(1, left + 1, 16 - left).unwrap(),
            &whole.narrow(1, left + 1, 16 - left).unwrap(),
            F64,
        );
    }
    let two_sided = TruncatedSelfAttention::new(
        &MultiHeadAttentionConfig::new(8, 2),
        2,
        1,
        VarBuilder::from_varmap(&vm, DType::F64, &dev).pp("two"),
    )
    .unwrap();
    assert!(two_sided.stream().push(&two_sided, &x).unwrap_err().to_string().contains("right = 1"));
}

#[test]
fn shared_stacks_reuse_one_set_of_parameters() {
    use attend::layers::stack::Stack;
    use candle_nn::{linear, Module};
    let dev = Device::Cpu;
    let x = r(&[3, 5], 71);
    let step = |l: &candle_nn::Linear, h: &Tensor| -> attend::Result<Tensor> { Ok(l.forward(h)?.tanh()?) };
    let (vm_s, vb) = vm_vb();
    let shared = Stack::shared(3, |vb| Ok(linear(5, 5, vb)?), vb.pp("block")).unwrap();
    let (vm_d, vb) = vm_vb();
    let distinct = Stack::distinct(3, |vb| Ok(linear(5, 5, vb)?), vb.pp("layers")).unwrap();
    assert_eq!((varmap_vars(&vm_s).len(), varmap_vars(&vm_d).len()), (2, 6));
    assert!(shared.is_shared() && !distinct.is_shared());
    let y = shared.forward(&x, step).unwrap();
    let l = shared.layer(0);
    let manual = step(l, &step(l, &step(l, &x).unwrap()).unwrap()).unwrap();
    assert_close("three applications", &y, &manual, F32);
    // The shared weight's gradient is the sum over its three applications: it equals the gradient of a distinct
    // stack whose three layers hold the same values, summed over the layers.
    let g = weighted_sum(&y, &r(&[3, 5], 72)).backward().unwrap();
    for (name, v) in varmap_vars(&vm_d) {
        let src =
            varmap_vars(&vm_s).into_iter().find(|(n, _)| n.ends_with(name.rsplit('.').next().unwrap())).unwrap().1;
        v.set(src.as_tensor()).unwrap();
    }
    let gd = weighted_sum(&distinct.forward(&x, step).unwrap(), &r(&[3, 5], 72)).backward().unwrap();
    let sum_w =
        (0..3).map(|i| gd.get(distinct.layer(i).weight()).unwrap().clone()).reduce(|a, b| (a + b).unwrap()).unwrap();
    assert_close("shared gradient", g.get(shared.layer(0).weight()).unwrap(), &sum_w, F32_GRAD);
    let _ = dev;
}

#[test]
fn edge_aggregate_equals_its_twin_and_finite_differences() {
    use attend::ops::{edge_aggregate, edge_aggregate_reference};
    let (src, dst) = (vec![0u32, 1, 2, 3, 4, 0, 2, 4, 4], vec![1u32, 2, 3, 4, 0, 2, 0, 1, 1]); // a repeated edge too
    let (x, alpha) = (r64(&[5, 3, 4], 81), r64(&[9, 3], 82));
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    let av = candle_core::Var::from_tensor(&alpha).unwrap();
    let w = r64(&[5, 3, 4], 83);
    let run = |f: fn(&Tensor, &Tensor, &[u32], &[u32], usize) -> attend::Result<Tensor>| {
        let out = f(xv.as_tensor(), av.as_tensor(), &src, &dst, 5).unwrap();
        let g = weighted_sum(&out, &w).backward().unwrap();
        (out, g.get(xv.as_tensor()).unwrap().clone(), g.get(av.as_tensor()).unwrap().clone())
    };
    let (a, b) = (run(edge_aggregate), run(edge_aggregate_reference));
    assert_close("out", &a.0, &b.0, F64);
    assert_close("dx", &a.1, &b.1, F64);
    assert_close("dalpha", &a.2, &b.2, F64);
    fd_check("edge aggregate dx", x.clone(), |x| edge_aggregate(x, &alpha, &src, &dst, 5).unwrap());
    fd_check("edge aggregate dalpha", alpha.clone(), |a| edge_aggregate(&x, a, &src, &dst, 5).unwrap());
}

#[test]
fn gatv2_scores_equal_their_twin_and_finite_differences() {
    use attend::ops::{gatv2_scores, gatv2_scores_reference};
    let (src, dst) = (vec![0u32, 1, 2, 3, 4, 0, 2, 4, 4], vec![1u32, 2, 3, 4, 0, 2, 0, 1, 1]);
    let (xl, xr, att) = (r64(&[5, 3, 4], 91), r64(&[5, 3, 4], 92), r64(&[1, 3, 4], 93));
    let vars: Vec<candle_core::Var> =
        [&xl, &xr, &att].iter().map(|t| candle_core::Var::from_tensor(t).unwrap()).collect();
    let w = r64(&[9, 3], 94);
    let run = |f: fn(&Tensor, &Tensor, &Tensor, &[u32], &[u32], f64) -> attend::Result<Tensor>| {
        let s = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), &src, &dst, 0.2).unwrap();
        let g = weighted_sum(&s, &w).backward().unwrap();
        (s, vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect::<Vec<_>>())
    };
    let (a, b) = (run(gatv2_scores), run(gatv2_scores_reference));
    assert_close("scores", &a.0, &b.0, F64);
    for (i, (p, q)) in a.1.iter().zip(&b.1).enumerate() {
        assert_close(&format!("gradient {i}"), p, q, F64);
    }
    fd_check("gatv2 dxl", xl.clone(), |x| gatv2_scores(x, &xr, &att, &src, &dst, 0.2).unwrap());
    fd_check("gatv2 dxr", xr.clone(), |x| gatv2_scores(&xl, x, &att, &src, &dst, 0.2).unwrap());
    fd_check("gatv2 datt", att.clone(), |a| gatv2_scores(&xl, &xr, a, &src, &dst, 0.2).unwrap());
}
