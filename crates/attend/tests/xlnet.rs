//! The permutation LM (two-stream attention): content and query streams, the loss and every gradient against a plain
//! PyTorch implementation of XLNet's two streams (fixtures/xlnet, scripts/oracle/xlnet.py), and the invariances that
//! define it: a query never sees its own token, nothing later in the order reaches an earlier position, the content
//! stream does see its own token, the plan is a permutation with the right targets, every parameter trains.

mod common;

use std::collections::HashMap;

use attend::models::bert::IGNORE;
use attend::models::xlnet::{PermutationLm, PermutationLmConfig, PermutationPlan};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_all_grads_finite_nonzero, assert_close, load, reseed, varmap_vars, Tol};

const TOL: Tol = Tol { atol: 2e-5, rtol: 1e-4 };

#[test]
fn two_streams_loss_and_gradients_match_pytorch() {
    let f = load("xlnet", "two_stream");
    let cfg: PermutationLmConfig = serde_json::from_value(f.meta_json("config").unwrap()).unwrap();
    let vars: HashMap<String, Var> = f
        .tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("grad.") && f.tensors.contains_key(&format!("grad.{k}")))
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let ts: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let lm = PermutationLm::new(&cfg, VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu)).unwrap();
    let ids = f.t("input_ids").to_dtype(DType::U32).unwrap();
    let ranks: Vec<Vec<u32>> = f
        .t("ranks")
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&x| if x < 0 { u32::MAX } else { x as u32 }).collect())
        .collect();
    let plan = PermutationPlan::from_ranks(&ids, ranks, cfg.predict_one_in).unwrap();
    assert_eq!(plan.targets.to_vec2::<i64>().unwrap(), f.t("targets").to_vec2::<i64>().unwrap(), "partial prediction");
    let (h, g) = lm.forward_two_stream(&ids, &plan).unwrap();
    let mask = f.t("attention_mask");
    let real = |x: &Tensor| common::real_rows(x, &mask);
    assert_close("content", &real(&h), &real(&f.t("content")), TOL);
    assert_close("query", &real(&g), &real(&f.t("query")), TOL);
    let loss = lm.loss(&ids, &plan).unwrap();
    assert_close("loss", &loss, &f.t("loss"), TOL);
    let grads = loss.backward().unwrap();
    for (name, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(&format!("grad {name}"), g, &f.t(&format!("grad.{name}")), TOL);
    }
}

fn small() -> (PermutationLm, VarMap) {
    let vm = VarMap::new();
    let cfg = PermutationLmConfig { n_layers: 2, predict_one_in: 2, ..PermutationLmConfig::base(31, 16, 16, 4) };
    let lm = PermutationLm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed(&vm, 4, 0.4);
    (lm, vm)
}

fn row(v: Vec<u32>) -> Tensor {
    Tensor::new(vec![v], &Device::Cpu).unwrap()
}

#[test]
fn a_query_never_sees_its_own_token_or_later_ones_and_content_sees_its_own() {
    let (lm, _) = small();
    let ids = vec![3u32, 14, 15, 9, 2, 6, 20, 11];
    let plan = lm.plan(&row(ids.clone()), None, 11).unwrap();
    let ranks = plan.ranks[0].clone();
    let (h, g) = lm.forward_two_stream(&row(ids.clone()), &plan).unwrap();
    for changed in 0..ids.len() {
        let mut other = ids.clone();
        other[changed] = (other[changed] + 7) % 31;
        let (h2, g2) = lm.forward_two_stream(&row(other), &plan).unwrap();
        for i in 0..ids.len() {
            let dg = (g.get(0).unwrap().get(i).unwrap() - g2.get(0).unwrap().get(i).unwrap()).unwrap().abs().unwrap();
            let dh = (h.get(0).unwrap().get(i).unwrap() - h2.get(0).unwrap().get(i).unwrap()).unwrap().abs().unwrap();
            let (dg, dh) =
                (dg.max_all().unwrap().to_scalar::<f32>().unwrap(), dh.max_all().unwrap().to_scalar::<f32>().unwrap());
            // The query at i sees exactly the tokens earlier in the order; the content at i also its own.
            if ranks[changed] >= ranks[i] {
                assert_eq!(
                    dg, 0.0,
                    "query {i} (rank {}) changed with token {changed} (rank {})",
                    ranks[i], ranks[changed]
                );
            } else {
                assert!(dg > 1e-6, "query {i} must depend on the earlier token {changed}");
            }
            if ranks[changed] > ranks[i] {
                assert_eq!(dh, 0.0, "content {i} changed with a later token {changed}");
            } else {
                assert!(dh > 1e-6, "content {i} must depend on token {changed}");
            }
        }
    }
}

#[test]
fn the_plan_is_a_seeded_permutation_of_the_real_tokens_with_the_last_ranks_as_targets() {
    let (lm, _) = small();
    let ids = Tensor::new(&[[3u32, 14, 15, 9, 2, 6], [7, 8, 9, 0, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let a = lm.plan(&ids, Some(&mask), 5).unwrap();
    let b = lm.plan(&ids, Some(&mask), 5).unwrap();
    let c = lm.plan(&ids, Some(&mask), 6).unwrap();
    assert_eq!(a.ranks, b.ranks, "a seed reproduces the order");
    assert_ne!(a.ranks, c.ranks, "another seed, another order");
    let mut first: Vec<u32> = a.ranks[0].clone();
    first.sort_unstable();
    assert_eq!(first, (0..6).collect::<Vec<_>>());
    assert_eq!(&a.ranks[1][3..], &[u32::MAX; 3], "padding is outside the order");
    let t = a.targets.to_vec2::<i64>().unwrap();
    let ids_v = ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    for (r, n) in [(0usize, 6u32), (1, 3)] {
        let n_pred = n.div_ceil(2).min(n - 1);
        for j in 0..6 {
            let want = if a.ranks[r][j] != u32::MAX && a.ranks[r][j] >= n - n_pred { ids_v[r][j] } else { IGNORE };
            assert_eq!(t[r][j], want, "row {r} position {j}");
        }
    }
    let bad =
        PermutationPlan::from_ranks(&ids, vec![vec![0, 0, 1, 2, 3, 4], vec![0, 1, 2, u32::MAX, u32::MAX, u32::MAX]], 2);
    assert!(bad.unwrap_err().to_string().contains("not a permutation"));
}

#[test]
fn every_parameter_receives_a_gradient_and_the_content_stream_embeds() {
    let (lm, vm) = small();
    let ids = Tensor::new(&[[3u32, 14, 15, 9, 2, 6], [7, 8, 9, 10, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let plan = lm.plan(&ids, Some(&mask), 2).unwrap();
    let loss = lm.loss(&ids, &plan).unwrap();
    assert_all_grads_finite_nonzero("permutation LM", &varmap_vars(&vm), &loss.backward().unwrap());
    // Fine-tuning's view: the content stream with every real token visible, padding invariant.
    let full = lm.forward(&ids, Some(&mask)).unwrap();
    let alone = lm.forward(&Tensor::new(&[[7u32, 8, 9, 10]], &Device::Cpu).unwrap(), None).unwrap();
    assert_close("padding", &full.get(1).unwrap().narrow(0, 0, 4).unwrap(), &alone.get(0).unwrap(), common::F32);
}
