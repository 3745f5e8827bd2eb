//! The attention core against PyTorch (SDPA where it applies, a float64 manual oracle elsewhere), finite
//! differences, and invariances: key padding, causality, KV-cache decoding, GQA ≡ repeated K/V.

mod common;

use attend::attention::{
    attention_with, AttentionDropout, AttentionImpl, AttentionOptions, AttentionOutput, Mask, MaskTensor,
};
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::*;

const IMPLS: [AttentionImpl; 3] = [AttentionImpl::Fused, AttentionImpl::Materialized, AttentionImpl::Reference];

fn full_opts(imp: AttentionImpl, scale: Option<f64>) -> AttentionOptions {
    AttentionOptions { scale, need_weights: true, need_lse: true, implementation: imp, ..Default::default() }
}

#[test]
fn attention_matches_pytorch_for_every_mask_kind() {
    let cases = fixture_cases("attention");
    assert!(cases.len() >= 30, "expected the full sweep of attention fixtures, found {}", cases.len());
    for case in cases {
        let f = load("attention", &case);
        for imp in IMPLS {
            let (q, k, v) = (f.var("q"), f.var("k"), f.var("v"));
            let (mask, mvar) = mask_of(&f);
            let o = attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, &full_opts(imp, scale_of(&f)))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            let label = format!("{case} {imp:?}");
            assert_close(&format!("{label} out"), &o.out, &f.t("out"), F32);
            assert_close(&format!("{label} lse"), o.lse.as_ref().unwrap(), &f.t("lse"), F32);
            assert_close(&format!("{label} weights"), o.weights.as_ref().unwrap(), &f.t("weights"), F32);
            let g = weighted_sum(&o.out, &f.t("dout")).backward().unwrap();
            for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
                assert_close(&format!("{label} {name}"), g.get(x.as_tensor()).unwrap(), &f.t(name), F32_GRAD);
            }
            if let Some(m) = mvar {
                assert_close(&format!("{label} dmask"), g.get(m.as_tensor()).unwrap(), &f.t("dmask"), F32_GRAD);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------

fn run(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, imp: AttentionImpl) -> AttentionOutput {
    attention_with(q, k, v, mask, &full_opts(imp, None)).unwrap()
}

#[test]
fn hand_written_backward_matches_finite_differences() {
    // Every component at once, in f64: softcap, ALiBi, causal window, key lengths, an additive tensor, GQA, T < S.
    let (b, h, hkv, t, s, d) = (2, 4, 2, 5, 7, 3);
    let add = randn(&[1, h, t, s], 5, DType::F64);
    let mask = Mask::causal()
        .with_window(4, 0)
        .with_key_lengths(vec![7, 5])
        .with_alibi()
        .with_softcap(2.0)
        .with_tensor(MaskTensor::Additive(add.clone()));
    let q = (randn(&[b, h, t, d], 1, DType::F64) * 1.5).unwrap();
    let k = (randn(&[b, hkv, s, d], 2, DType::F64) * 1.5).unwrap();
    let v = randn(&[b, hkv, s, d], 3, DType::F64);
    let dout = randn(&[b, h, t, d], 4, DType::F64);
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor, m: &Mask| {
        weighted_sum(&run(q, k, v, m, AttentionImpl::Materialized).out, &dout)
    };
    let (qv, kv, vv, av) = (
        Var::from_tensor(&q).unwrap(),
        Var::from_tensor(&k).unwrap(),
        Var::from_tensor(&v).unwrap(),
        Var::from_tensor(&add).unwrap(),
    );
    let m_var = mask.clone().with_tensor(MaskTensor::Additive(av.as_tensor().clone()));
    let g = loss(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &m_var).backward().unwrap();
    let f64s = |t: Tensor| t.to_scalar::<f64>().unwrap();
    check_finite_diff("dq", &q, g.get(qv.as_tensor()).unwrap(), |x| f64s(loss(x, &k, &v, &mask)), 40);
    check_finite_diff("dk", &k, g.get(kv.as_tensor()).unwrap(), |x| f64s(loss(&q, x, &v, &mask)), 40);
    check_finite_diff("dv", &v, g.get(vv.as_tensor()).unwrap(), |x| f64s(loss(&q, &k, x, &mask)), 40);
    check_finite_diff(
        "dmask",
        &add,
        g.get(av.as_tensor()).unwrap(),
        |x| f64s(loss(&q, &k, &v, &mask.clone().with_tensor(MaskTensor::Additive(x.clone())))),
        40,
    );
}

#[test]
fn materialized_equals_reference_in_f64_with_dropout() {
    let (b, h, hkv, t, s, d) = (2, 6, 3, 9, 9, 8);
    let q = Var::from_tensor(&randn(&[b, h, t, d], 11, DType::F64)).unwrap();
    let k = Var::from_tensor(&randn(&[b, hkv, s, d], 12, DType::F64)).unwrap();
    let v = Var::from_tensor(&randn(&[b, hkv, s, d], 13, DType::F64)).unwrap();
    let dout = randn(&[b, h, t, d], 14, DType::F64);
    let mask = Mask::causal().with_alibi();
    let mut res = vec![];
    for imp in IMPLS {
        let opts = AttentionOptions {
            dropout: Some(AttentionDropout { p: 0.2, seed: 77 }),
            implementation: imp,
            ..Default::default()
        };
        let o = attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, &opts).unwrap();
        let g = weighted_sum(&o.out, &dout).backward().unwrap();
        res.push([
            o.out,
            g.get(q.as_tensor()).unwrap().clone(),
            g.get(k.as_tensor()).unwrap().clone(),
            g.get(v.as_tensor()).unwrap().clone(),
        ]);
    }
    for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
        assert_close(&format!("dropout {name}"), &res[0][i], &res[1][i], F64);
    }
    // The same seed reproduces, another seed differs, p = 0 is no dropout.
    let with = |seed| {
        let opts = AttentionOptions { dropout: Some(AttentionDropout { p: 0.2, seed }), ..Default::default() };
        attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, &opts).unwrap().out
    };
    assert_close("same seed", &with(77), &res[0][0], F64);
    let diff = (with(78) - &res[0][0]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff > 1e-3, "another seed must drop other probabilities");
}

#[test]
fn key_padding_changes_nothing() {
    // Keys beyond each batch element's length are garbage; outputs and gradients of the valid keys must not move.
    let (b, h, t, s, pad, d) = (2, 4, 6, 7, 5, 8);
    let lens = vec![7, 4];
    let q = randn(&[b, h, t, d], 21, DType::F32);
    let k = randn(&[b, h, s, d], 22, DType::F32);
    let v = randn(&[b, h, s, d], 23, DType::F32);
    let junk_k = (randn(&[b, h, pad, d], 24, DType::F32) * 100.0).unwrap();
    let junk_v = (randn(&[b, h, pad, d], 25, DType::F32) * 100.0).unwrap();
    let kp = Tensor::cat(&[&k, &junk_k], 2).unwrap();
    let vp = Tensor::cat(&[&v, &junk_v], 2).unwrap();
    for imp in IMPLS {
        let base = run(&q, &k, &v, &Mask::none().with_key_lengths(lens.clone()), imp);
        let padded = run(&q, &kp, &vp, &Mask::none().with_key_lengths(lens.clone()), imp);
        assert_close(&format!("{imp:?} padded out"), &padded.out, &base.out, F32);
        assert_close(&format!("{imp:?} padded lse"), padded.lse.as_ref().unwrap(), base.lse.as_ref().unwrap(), F32);
        let pw = padded.weights.unwrap();
        assert_close(&format!("{imp:?} padded weights"), &pw.narrow(3, 0, s).unwrap(), &base.weights.unwrap(), F32);
        let tail: f32 = pw.narrow(3, s, pad).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(tail, 0.0, "{imp:?}: padded keys must get zero weight");
        // Batch element 0 alone, unpadded, equals its row of the padded batch (lengths only restrict b = 1).
        let b0 = run(&q.i(0..1).unwrap(), &k.i(0..1).unwrap(), &v.i(0..1).unwrap(), &Mask::none(), imp);
        assert_close(&format!("{imp:?} b0"), &b0.out, &padded.out.i(0..1).unwrap(), F32);
    }
}

#[test]
fn causal_output_ignores_future_keys() {
    let (b, h, t, d) = (1, 2, 8, 4);
    let q = randn(&[b, h, t, d], 31, DType::F32);
    let k = randn(&[b, h, t, d], 32, DType::F32);
    let v = randn(&[b, h, t, d], 33, DType::F32);
    // Perturb keys and values at positions ≥ 5: query rows 0..5 must not change.
    let noise = Tensor::cat(
        &[Tensor::zeros((b, h, 5, d), DType::F32, &Device::Cpu).unwrap(), randn(&[b, h, 3, d], 34, DType::F32)],
        2,
    )
    .unwrap();
    let a = run(&q, &k, &v, &Mask::causal(), AttentionImpl::Materialized).out;
    let c = run(&q, &(&k + &noise).unwrap(), &(&v + &noise).unwrap(), &Mask::causal(), AttentionImpl::Materialized).out;
    assert_close(
        "causal rows 0..5",
        &c.narrow(2, 0, 5).unwrap(),
        &a.narrow(2, 0, 5).unwrap(),
        Tol { atol: 0.0, rtol: 0.0 },
    );
    let diff = (c.narrow(2, 5, 3).unwrap() - a.narrow(2, 5, 3).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1e-3, "rows ≥ 5 see the perturbed keys");
}

#[test]
fn decoding_against_a_cache_equals_the_full_causal_forward() {
    // End alignment: the last T queries against all S keys with `causal` are the last T rows of the full forward.
    let (b, h, hkv, s, d) = (2, 4, 2, 10, 8);
    let q = randn(&[b, h, s, d], 41, DType::F32);
    let k = randn(&[b, hkv, s, d], 42, DType::F32);
    let v = randn(&[b, hkv, s, d], 43, DType::F32);
    for mask in [Mask::causal(), Mask::causal().with_window(3, 0), Mask::causal().with_alibi()] {
        let full = run(&q, &k, &v, &mask, AttentionImpl::Materialized);
        for t in [1, 3] {
            for start in [t, 5, s - t] {
                // Keys 0..start+t are the cache after the new tokens were appended.
                let part = run(
                    &q.narrow(2, start, t).unwrap(),
                    &k.narrow(2, 0, start + t).unwrap(),
                    &v.narrow(2, 0, start + t).unwrap(),
                    &mask,
                    AttentionImpl::Materialized,
                );
                let label = format!("{mask:?} t={t} start={start}");
                assert_close(&label, &part.out, &full.out.narrow(2, start, t).unwrap(), F32);
                assert_close(
                    &label,
                    part.lse.as_ref().unwrap(),
                    &full.lse.as_ref().unwrap().narrow(2, start, t).unwrap(),
                    F32,
                );
            }
        }
    }
}

#[test]
fn grouped_query_attention_equals_repeated_kv() {
    let (b, h, hkv, t, s, d) = (2, 6, 2, 5, 7, 4);
    let g = h / hkv;
    let q = Var::from_tensor(&randn(&[b, h, t, d], 51, DType::F32)).unwrap();
    let k = Var::from_tensor(&randn(&[b, hkv, s, d], 52, DType::F32)).unwrap();
    let v = Var::from_tensor(&randn(&[b, hkv, s, d], 53, DType::F32)).unwrap();
    // Repeat each K/V head G times (head h reads K/V head h / G).
    let rep = |x: &Tensor| x.unsqueeze(2).unwrap().repeat((1, 1, g, 1, 1)).unwrap().reshape((b, h, s, d)).unwrap();
    let mask = Mask::causal().with_alibi();
    let a = run(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, AttentionImpl::Materialized).out;
    let r = run(q.as_tensor(), &rep(k.as_tensor()), &rep(v.as_tensor()), &mask, AttentionImpl::Materialized).out;
    assert_close("gqa out", &a, &r, F32);
    let dout = randn(&[b, h, t, d], 54, DType::F32);
    let ga = weighted_sum(&a, &dout).backward().unwrap();
    let gr = weighted_sum(&r, &dout).backward().unwrap();
    for x in [&q, &k, &v] {
        assert_close("gqa grad", ga.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap(), F32_GRAD);
    }
}

#[test]
fn contradictory_or_mismatched_masks_are_errors() {
    let (b, h, t, s, d) = (2, 4, 3, 5, 8);
    let q = Tensor::zeros((b, h, t, d), DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::zeros((b, h, s, d), DType::F32, &Device::Cpu).unwrap();
    let err = |m: Mask| attention_with(&q, &k, &k, &m, &Default::default()).unwrap_err().to_string();
    let cases: Vec<(Mask, &[&str])> = vec![
        (Mask::causal().with_prefix_lengths(vec![1, 2]), &["causal", "prefix"]),
        (Mask::causal().with_window(2, 1), &["(2, 1)", "(2, 0)"]),
        (Mask::none().with_prefix_lengths(vec![1, 1]).with_window(1, 1), &["prefix", "window"]),
        (Mask::none().with_key_lengths(vec![5]), &["1 entries", "batch size 2"]),
        (Mask::none().with_key_lengths(vec![5, 6]), &["key_lengths[1] = 6", "S = 5"]),
        (Mask::none().with_alibi_slopes(vec![0.5; 3]), &["3 ALiBi slopes", "4 query heads"]),
        (Mask::none().with_softcap(0.0), &["soft-cap"]),
        (
            Mask::none().with_tensor(MaskTensor::Keep(Tensor::zeros((4, 5), DType::U8, &Device::Cpu).unwrap())),
            &["[4, 5]", "(2, 4, 3, 5)"],
        ),
        (
            Mask::none().with_documents(
                Tensor::zeros((2, 4), DType::I64, &Device::Cpu).unwrap(),
                Tensor::zeros((2, 5), DType::I64, &Device::Cpu).unwrap(),
            ),
            &["[2, 4]", "(2, 3)"],
        ),
    ];
    for (m, needles) in cases {
        let e = err(m);
        for n in needles {
            assert!(e.contains(n), "error `{e}` should mention `{n}`");
        }
    }
}

#[test]
fn mismatched_tensors_are_errors_naming_shapes() {
    let z = |s: &[usize], dt: DType| Tensor::zeros(s, dt, &Device::Cpu).unwrap();
    let f = DType::F32;
    let err = |q: Tensor, k: Tensor, v: Tensor| {
        attention_with(&q, &k, &v, &Mask::none(), &Default::default()).unwrap_err().to_string()
    };
    let e = err(z(&[1, 6, 3, 8], f), z(&[1, 4, 5, 8], f), z(&[1, 4, 5, 8], f));
    assert!(e.contains("H = 6") && e.contains("Hkv = 4"), "{e}");
    let e = err(z(&[1, 4, 3, 8], f), z(&[1, 4, 5, 6], f), z(&[1, 4, 5, 8], f));
    assert!(e.contains("[1, 4, 3, 8]") && e.contains("[1, 4, 5, 6]"), "{e}");
    let e = err(z(&[1, 4, 3, 8], f), z(&[1, 4, 5, 8], f), z(&[1, 4, 6, 8], f));
    assert!(e.contains("[1, 4, 5, 8]") && e.contains("[1, 4, 6, 8]"), "{e}");
    let e = err(z(&[4, 3, 8], f), z(&[1, 4, 5, 8], f), z(&[1, 4, 5, 8], f));
    assert!(e.contains("[4, 3, 8]"), "{e}");
    let e = err(z(&[1, 4, 3, 8], f), z(&[1, 4, 5, 8], DType::F64), z(&[1, 4, 5, 8], f));
    assert!(e.contains("F64"), "{e}");
    let e = err(z(&[2, 4, 3, 8], f), z(&[1, 4, 5, 8], f), z(&[1, 4, 5, 8], f));
    assert!(e.contains("batch"), "{e}");
}

#[test]
fn learned_relative_bias_trains_through_the_core() {
    // T5's relative position bias enters the core as an additive mask tensor; its embedding must get gradients
    // together with q, k, v, and the result must equal adding the bias to the scores by hand.
    use attend::position::relative::{RelativePositionBias, RelativePositionBiasConfig};
    let (b, h, t, d) = (2, 4, 6, 8);
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let rel = RelativePositionBias::new(&RelativePositionBiasConfig::t5(h, false), vb.pp("rel")).unwrap();
    let bias = rel.forward(t, t, 0).unwrap(); // (1, H, T, T)
    let q = randn(&[b, h, t, d], 61, DType::F32);
    let k = randn(&[b, h, t, d], 62, DType::F32);
    let v = randn(&[b, h, t, d], 63, DType::F32);
    let mask = Mask::causal().with_tensor(MaskTensor::Additive(bias.clone()));
    let out = run(&q, &k, &v, &mask, AttentionImpl::Materialized).out;
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap().broadcast_add(&bias).unwrap();
    let causal = Tensor::tril2(t, DType::U8, &Device::Cpu).unwrap();
    let p = attend::ops::softmax_reference(&scores, Some(&MaskTensor::Keep(causal))).unwrap();
    assert_close("bias through the core", &out, &p.matmul(&v).unwrap(), F32);
    let g = weighted_sum(&out, &randn(&[b, h, t, d], 64, DType::F32)).backward().unwrap();
    assert_all_grads_finite_nonzero("relative bias", &varmap_vars(&vm), &g);
}

#[test]
fn bf16_storage_matches_f32_within_bf16_precision() {
    note_bf16_path("bf16_storage_matches_f32_within_bf16_precision");
    // bf16 inputs run the fused forward with bf16 dot products (where the CPU has them) and the backward in f32.
    let (b, h, hkv, t, s, d) = (2, 4, 2, 37, 45, 64);
    let q = randn(&[b, h, t, d], 71, DType::F32);
    let k = randn(&[b, hkv, s, d], 72, DType::F32);
    let v = randn(&[b, hkv, s, d], 73, DType::F32);
    let to_bf = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    let (qb, kb, vb) = (to_bf(&q), to_bf(&k), to_bf(&v));
    // The f32 reference sees exactly the bf16-rounded inputs.
    let up = |x: &Var| Var::from_tensor(&x.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
    let (qf, kf, vf) = (up(&qb), up(&kb), up(&vb));
    let dout = randn(&[b, h, t, d], 74, DType::F32);
    for mask in [Mask::none(), Mask::causal().with_alibi()] {
        let ob = run(qb.as_tensor(), kb.as_tensor(), vb.as_tensor(), &mask, AttentionImpl::Fused);
        let of = run(qf.as_tensor(), kf.as_tensor(), vf.as_tensor(), &mask, AttentionImpl::Reference);
        assert_eq!(ob.out.dtype(), DType::BF16);
        let bf = Tol { atol: 2e-2, rtol: 2e-2 };
        assert_close("bf16 out", &ob.out.to_dtype(DType::F32).unwrap(), &of.out, bf);
        assert_close("bf16 lse", ob.lse.as_ref().unwrap(), of.lse.as_ref().unwrap(), Tol { atol: 1e-4, rtol: 1e-4 });
        let gb = weighted_sum(&ob.out.to_dtype(DType::F32).unwrap(), &dout).backward().unwrap();
        let gf = weighted_sum(&of.out, &dout).backward().unwrap();
        for (xb, xf) in [(&qb, &qf), (&kb, &kf), (&vb, &vf)] {
            let got = gb.get(xb.as_tensor()).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            assert_close(
                "bf16 grad",
                &got.to_dtype(DType::F32).unwrap(),
                gf.get(xf.as_tensor()).unwrap(),
                Tol { atol: 5e-2, rtol: 3e-2 },
            );
        }
    }
}

#[test]
fn selected_heads_weights_equal_those_rows_of_all_heads() {
    let (b, h, t, s, d) = (2, 6, 9, 13, 16);
    let q = randn(&[b, h, t, d], 81, DType::F32);
    let k = randn(&[b, 3, s, d], 82, DType::F32);
    let v = randn(&[b, 3, s, d], 83, DType::F32);
    for imp in IMPLS {
        let all = run(&q, &k, &v, &Mask::causal().with_alibi(), imp).weights.unwrap();
        let opts = AttentionOptions { weight_heads: Some(vec![4, 1]), ..full_opts(imp, None) };
        let some = attention_with(&q, &k, &v, &Mask::causal().with_alibi(), &opts).unwrap().weights.unwrap();
        assert_eq!(some.dims(), [b, 2, t, s]);
        assert_close(&format!("{imp:?} head 4"), &some.narrow(1, 0, 1).unwrap(), &all.narrow(1, 4, 1).unwrap(), F32);
        assert_close(&format!("{imp:?} head 1"), &some.narrow(1, 1, 1).unwrap(), &all.narrow(1, 1, 1).unwrap(), F32);
    }
    let bad = AttentionOptions { need_weights: true, weight_heads: Some(vec![6]), ..Default::default() };
    let e = attention_with(&q, &k, &v, &Mask::none(), &bad).unwrap_err().to_string();
    assert!(e.contains("[6]") && e.contains("0..6"), "{e}");
}

/// A user's mask: query i sees keys of the same parity only (a dilated pattern no built-in mask expresses).
struct SameParity;
impl attend::attention::flex::MaskMod for SameParity {
    fn visible(&self, _b: usize, _h: usize, i: usize, j: usize) -> bool {
        i % 2 == j % 2
    }
}

/// A user's score function: per-head temperature, `s / τ_h`.
struct Temperature(Vec<f32>);
impl attend::attention::flex::ScoreMod for Temperature {
    fn apply(&self, _b: usize, h: usize, _i: usize, _j0: usize, row: &mut [f32]) {
        row.iter_mut().for_each(|s| *s /= self.0[h]);
    }
    fn chain(&self, _b: usize, h: usize, _i: usize, _j0: usize, _s: &[f32], ds: &mut [f32]) {
        ds.iter_mut().for_each(|g| *g /= self.0[h]);
    }
}

#[test]
fn flex_attention_runs_user_masks_and_score_functions_with_gradients() {
    use attend::attention::flex::{Causal, NoScoreMod};
    use attend::attention::flex_attention;
    let (b, h, hkv, t, s, d) = (2, 4, 2, 11, 17, 16);
    let vars = || {
        (
            Var::from_tensor(&randn(&[b, h, t, d], 91, DType::F32)).unwrap(),
            Var::from_tensor(&randn(&[b, hkv, s, d], 92, DType::F32)).unwrap(),
            Var::from_tensor(&randn(&[b, hkv, s, d], 93, DType::F32)).unwrap(),
        )
    };
    let dout = randn(&[b, h, t, d], 94, DType::F32);
    let opts = full_opts(AttentionImpl::Fused, None);
    let grads = |o: &AttentionOutput, x: &(Var, Var, Var)| {
        let g = weighted_sum(&o.out, &dout).backward().unwrap();
        [&x.0, &x.1, &x.2].map(|v| g.get(v.as_tensor()).unwrap().clone())
    };
    // 1. A built-in type through flex_attention equals the core's own mask.
    let (x, y) = (vars(), vars());
    let flex =
        flex_attention(x.0.as_tensor(), x.1.as_tensor(), x.2.as_tensor(), Causal { offset: 6 }, NoScoreMod, &opts)
            .unwrap();
    let core = run(y.0.as_tensor(), y.1.as_tensor(), y.2.as_tensor(), &Mask::causal(), AttentionImpl::Reference);
    assert_close("flex causal out", &flex.out, &core.out, F32);
    assert_close("flex causal lse", flex.lse.as_ref().unwrap(), core.lse.as_ref().unwrap(), F32);
    for (a, c) in grads(&flex, &x).iter().zip(grads(&core, &y).iter()) {
        assert_close("flex causal grad", a, c, F32_GRAD);
    }
    // 2. User types, against the reference path given the same rule as a boolean tensor and the temperature
    //    folded into the scale per head (done head by head).
    let temps = vec![0.5f32, 1.0, 2.0, 4.0];
    let (x, y) = (vars(), vars());
    let flex = flex_attention(
        x.0.as_tensor(),
        x.1.as_tensor(),
        x.2.as_tensor(),
        SameParity,
        Temperature(temps.clone()),
        &opts,
    )
    .unwrap();
    let keep: Vec<u8> = (0..t).flat_map(|i| (0..s).map(move |j| (i % 2 == j % 2) as u8)).collect();
    let keep = Tensor::from_vec(keep, (1, 1, t, s), &Device::Cpu).unwrap();
    let g = h / hkv;
    let mut outs = vec![];
    for (hh, tau) in temps.iter().enumerate() {
        let qh = y.0.as_tensor().narrow(1, hh, 1).unwrap();
        let kv = |x: &Var| x.as_tensor().narrow(1, hh / g, 1).unwrap();
        let opts_h = AttentionOptions {
            scale: Some(1.0 / ((d as f64).sqrt() * *tau as f64)),
            ..full_opts(AttentionImpl::Reference, None)
        };
        let mask = Mask::none().with_tensor(MaskTensor::Keep(keep.clone()));
        outs.push(attention_with(&qh, &kv(&y.1), &kv(&y.2), &mask, &opts_h).unwrap().out);
    }
    let reference = AttentionOutput { out: Tensor::cat(&outs, 1).unwrap(), weights: None, lse: None };
    assert_close("flex user out", &flex.out, &reference.out, F32);
    for (a, c) in grads(&flex, &x).iter().zip(grads(&reference, &y).iter()) {
        assert_close("flex user grad", a, c, F32_GRAD);
    }
    // 3. f64 is refused with a clear error.
    let q64 = randn(&[1, 1, 3, 16], 95, DType::F64);
    let e = flex_attention(&q64, &q64, &q64, SameParity, NoScoreMod, &opts).unwrap_err().to_string();
    assert!(e.contains("F64"), "{e}");
}

/// `T = 0` gives empty outputs and `S = 0` gives zeros with a log-sum-exp of −∞ (every query sees no key), on every
/// implementation and through `flex_attention`: not errors.
#[test]
fn empty_queries_and_empty_keys_are_not_errors() {
    use attend::attention::{flex::NoMask, flex::NoScoreMod, flex_attention};
    for (t, s) in [(0, 5), (3, 0), (0, 0)] {
        let q = randn(&[2, 4, t, 8], 1, DType::F32);
        let (k, v) = (randn(&[2, 2, s, 8], 2, DType::F32), randn(&[2, 2, s, 6], 3, DType::F32));
        let mut outs: Vec<AttentionOutput> = IMPLS
            .iter()
            .map(|&imp| attention_with(&q, &k, &v, &Mask::causal(), &full_opts(imp, None)).unwrap())
            .collect();
        outs.push(flex_attention(&q, &k, &v, NoMask, NoScoreMod, &full_opts(AttentionImpl::Fused, None)).unwrap());
        for o in outs {
            assert_eq!(o.out.dims(), &[2, 4, t, 6]);
            assert_eq!(o.weights.as_ref().unwrap().dims(), &[2, 4, t, s]);
            let lse = o.lse.unwrap();
            assert_eq!(lse.dims(), &[2, 4, t]);
            let out: Vec<f32> = o.out.flatten_all().unwrap().to_vec1().unwrap();
            assert!(out.iter().all(|&x| x == 0.0), "T {t} S {s}: outputs of queries with no key are 0");
            let lse: Vec<f32> = lse.flatten_all().unwrap().to_vec1().unwrap();
            assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY), "T {t} S {s}: lse −∞");
        }
    }
}

/// Window sides at the extremes: `Mask::UNBOUNDED` (usize::MAX) and sides far beyond the sequence are "every key on
/// that side", not an overflow that hides every key; on every implementation.
#[test]
fn unbounded_and_huge_window_sides_reach_every_key() {
    let (q, k, v) = (
        randn(&[2, 2, 7, 16], 11, DType::F32),
        randn(&[2, 2, 9, 16], 12, DType::F32),
        randn(&[2, 2, 9, 16], 13, DType::F32),
    );
    let huge = usize::MAX / 2;
    let cases = [
        (Mask::none().with_window(Mask::UNBOUNDED, Mask::UNBOUNDED), Mask::none()),
        (Mask::none().with_window(huge, huge), Mask::none()),
        (Mask::causal().with_window(Mask::UNBOUNDED, 0), Mask::causal()),
        (Mask::causal().with_window(isize::MAX as usize, 0), Mask::causal()),
        (Mask::none().with_window(Mask::UNBOUNDED, 1), Mask::none().with_window(9, 1)),
        (Mask::none().with_window(0, Mask::UNBOUNDED), Mask::none().with_window(0, 7)),
    ];
    for (i, (wide, same)) in cases.iter().enumerate() {
        for imp in IMPLS {
            let got = run(&q, &k, &v, wide, imp);
            let want = run(&q, &k, &v, same, AttentionImpl::Reference);
            assert_close(&format!("case {i} {imp:?} out"), &got.out, &want.out, F32);
            assert_close(&format!("case {i} {imp:?} lse"), got.lse.as_ref().unwrap(), want.lse.as_ref().unwrap(), F32);
        }
    }
}
