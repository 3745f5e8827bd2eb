//! Score functions (attention/score.rs) against the PyTorch oracle scripts/oracle/score.py: forward and every
//! gradient, checkpoint names, finite differences in f64, and errors on mismatched shapes.
mod common;

use std::collections::HashMap;

use attend::attention::score::{
    dot, scaled_dot, AdditiveScore, AdditiveScoreConfig, AnyScore, DotScore, GeneralScore, GeneralScoreConfig,
    HanContextScore, HanContextScoreConfig, ScaledDotScore, Score, ScoreConfig,
};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{Fixture, F32, F32_GRAD};

const AREA: &str = "score";

/// The parameters each parametric fixture case holds, under their checkpoint names.
const GENERAL_PARAMS: &[&str] = &["linear_in.weight"];
const ADDITIVE_PARAMS: &[&str] = &["linear_context.weight", "linear_query.bias", "linear_query.weight", "v.weight"];
const HAN_PARAMS: &[&str] = &["context", "proj.bias", "proj.weight"];

fn meta_usize(fx: &Fixture, key: &str) -> usize {
    fx.meta_str(key).unwrap_or_else(|| panic!("{}: no meta `{key}`", fx.path.display())).parse().unwrap()
}

fn general_config(fx: &Fixture) -> GeneralScoreConfig {
    GeneralScoreConfig { query_dim: meta_usize(fx, "query_dim"), key_dim: meta_usize(fx, "key_dim") }
}

fn additive_config(fx: &Fixture) -> AdditiveScoreConfig {
    AdditiveScoreConfig {
        query_dim: meta_usize(fx, "query_dim"),
        key_dim: meta_usize(fx, "key_dim"),
        attn_dim: meta_usize(fx, "attn_dim"),
    }
}

fn han_config(fx: &Fixture) -> HanContextScoreConfig {
    HanContextScoreConfig { input_dim: meta_usize(fx, "input_dim"), attn_dim: meta_usize(fx, "attn_dim") }
}

/// A VarMap holding the fixture's parameters as Vars (so their gradients can be read back).
fn varmap_from(fx: &Fixture, names: &[&str]) -> VarMap {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for &n in names {
            data.insert(n.to_string(), fx.var(n));
        }
    }
    vm
}

fn vb(vm: &VarMap, dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_varmap(vm, dtype, &Device::Cpu)
}

/// The constructor must ask for exactly the checkpoint names of the reference (a VarMap creates any name it is
/// asked for, so an extra or misspelt name shows up here as a new entry).
fn assert_param_names(label: &str, vm: &VarMap, want: &[&str]) {
    let got: Vec<String> = common::varmap_vars(vm).into_iter().map(|(n, _)| n).collect();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want, "{label}: parameter names");
}

/// Compares `out` and the gradients of sum(out · dout) w.r.t. the inputs and every parameter with the fixture.
fn check_against_oracle(label: &str, fx: &Fixture, out: &Tensor, inputs: &[(&str, &Var)], vm: Option<&VarMap>) {
    common::assert_close(&format!("{label}: out"), out, &fx.t("out"), F32);
    let grads = common::weighted_sum(out, &fx.t("dout")).backward().unwrap();
    let mut params = vm.map(common::varmap_vars).unwrap_or_default();
    params.extend(inputs.iter().map(|(n, v)| (n.to_string(), (*v).clone())));
    for (name, var) in &params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for `{name}`"));
        common::assert_close(&format!("{label}: d{name}"), g, &fx.t(&format!("d{name}")), F32_GRAD);
    }
    // Every gradient the oracle stored was compared (no parameter forgotten).
    let stored = fx.tensors.keys().filter(|k| k.starts_with('d') && *k != "dout").count();
    assert_eq!(stored, params.len(), "{label}: fixture gradients vs compared gradients");
}

// ------------------------------------------------------------------------------------------------------------
// Forward and gradients against the oracle.

#[test]
fn dot_matches_oracle() {
    let fx = common::load(AREA, "dot");
    let (q, k) = (fx.var("q"), fx.var("k"));
    let out = dot(q.as_tensor(), k.as_tensor()).unwrap();
    check_against_oracle("dot", &fx, &out, &[("q", &q), ("k", &k)], None);
    // The Score impl is the same function.
    let via_trait = DotScore.score(q.as_tensor(), k.as_tensor()).unwrap();
    common::assert_close("dot: DotScore", &via_trait, &fx.t("out"), F32);
}

#[test]
fn scaled_dot_default_scale_matches_oracle() {
    let fx = common::load(AREA, "scaled_dot");
    let (q, k) = (fx.var("q"), fx.var("k"));
    let out = scaled_dot(q.as_tensor(), k.as_tensor(), None).unwrap();
    check_against_oracle("scaled_dot", &fx, &out, &[("q", &q), ("k", &k)], None);
    let via_trait = ScaledDotScore::new(None).unwrap().score(q.as_tensor(), k.as_tensor()).unwrap();
    common::assert_close("scaled_dot: ScaledDotScore", &via_trait, &fx.t("out"), F32);
}

#[test]
fn scaled_dot_given_scale_matches_oracle() {
    let fx = common::load(AREA, "scaled_dot_scale");
    let scale = fx.meta_f64("scale").unwrap();
    let (q, k) = (fx.var("q"), fx.var("k"));
    let out = scaled_dot(q.as_tensor(), k.as_tensor(), Some(scale)).unwrap();
    check_against_oracle("scaled_dot_scale", &fx, &out, &[("q", &q), ("k", &k)], None);
    let via_trait = ScaledDotScore::new(Some(scale)).unwrap().score(q.as_tensor(), k.as_tensor()).unwrap();
    common::assert_close("scaled_dot_scale: ScaledDotScore", &via_trait, &fx.t("out"), F32);
}

#[test]
fn general_matches_oracle() {
    let fx = common::load(AREA, "general");
    let vm = varmap_from(&fx, GENERAL_PARAMS);
    let layer = GeneralScore::new(&general_config(&fx), vb(&vm, DType::F32)).unwrap();
    assert_param_names("general", &vm, GENERAL_PARAMS);
    let (q, k) = (fx.var("q"), fx.var("k"));
    let out = layer.forward(q.as_tensor(), k.as_tensor()).unwrap();
    check_against_oracle("general", &fx, &out, &[("q", &q), ("k", &k)], Some(&vm));
}

#[test]
fn general_bilinear_form_equals_forward() {
    // The documented orientation: s = qᵀ W k with W = linear_in.weightᵀ (Dq, Dk).
    let fx = common::load(AREA, "general");
    let vm = varmap_from(&fx, GENERAL_PARAMS);
    let layer = GeneralScore::new(&general_config(&fx), vb(&vm, DType::F32)).unwrap();
    let (q, k) = (fx.t("q"), fx.t("k"));
    let w = layer.bilinear_weight().unwrap();
    assert_eq!(w.dims(), &[q.dim(2).unwrap(), k.dim(2).unwrap()], "W is (Dq, Dk)");
    let s = q.broadcast_matmul(&w).unwrap().matmul(&k.t().unwrap()).unwrap(); // (B, T, S)
    common::assert_close("general: qᵀ W k", &s, &fx.t("out"), F32);
}

#[test]
fn additive_matches_oracle() {
    let fx = common::load(AREA, "additive");
    let vm = varmap_from(&fx, ADDITIVE_PARAMS);
    let layer = AdditiveScore::new(&additive_config(&fx), vb(&vm, DType::F32)).unwrap();
    assert_param_names("additive", &vm, ADDITIVE_PARAMS);
    let (q, k) = (fx.var("q"), fx.var("k"));
    let out = layer.forward(q.as_tensor(), k.as_tensor()).unwrap();
    check_against_oracle("additive", &fx, &out, &[("q", &q), ("k", &k)], Some(&vm));
}

#[test]
fn additive_projected_keys_equal_forward() {
    // Decoding step by step reuses U k; one query row at a time must give the rows of the full forward.
    let fx = common::load(AREA, "additive");
    let vm = varmap_from(&fx, ADDITIVE_PARAMS);
    let layer = AdditiveScore::new(&additive_config(&fx), vb(&vm, DType::F32)).unwrap();
    let (q, k) = (fx.t("q"), fx.t("k"));
    let uk = layer.project_keys(&k).unwrap(); // (B, S, A)
    let rows: Vec<Tensor> = (0..q.dim(1).unwrap())
        .map(|t| layer.score_projected(&q.narrow(1, t, 1).unwrap(), &uk).unwrap()) // (B, 1, S)
        .collect();
    let stepwise = Tensor::cat(&rows, 1).unwrap(); // (B, T, S)
    common::assert_close("additive: step by step", &stepwise, &fx.t("out"), F32);
}

#[test]
fn han_context_matches_oracle() {
    let fx = common::load(AREA, "han_context");
    let vm = varmap_from(&fx, HAN_PARAMS);
    let layer = HanContextScore::new(&han_config(&fx), vb(&vm, DType::F32)).unwrap();
    assert_param_names("han_context", &vm, HAN_PARAMS);
    let h = fx.var("h");
    let out = layer.forward(h.as_tensor()).unwrap();
    check_against_oracle("han_context", &fx, &out, &[("h", &h)], Some(&vm));
}

#[test]
fn any_score_from_config_matches_oracle() {
    // The config enum round-trips through JSON and builds the same layers (parameters directly under the prefix).
    let cases: Vec<(&str, ScoreConfig, &[&str])> = {
        let scale = common::load(AREA, "scaled_dot_scale").meta_f64("scale").unwrap();
        vec![
            ("dot", ScoreConfig::Dot, &[]),
            ("scaled_dot", ScoreConfig::ScaledDot { scale: None }, &[]),
            ("scaled_dot_scale", ScoreConfig::ScaledDot { scale: Some(scale) }, &[]),
            ("general", ScoreConfig::General(general_config(&common::load(AREA, "general"))), GENERAL_PARAMS),
            ("additive", ScoreConfig::Additive(additive_config(&common::load(AREA, "additive"))), ADDITIVE_PARAMS),
        ]
    };
    for (case, cfg, params) in cases {
        let json = serde_json::to_string(&cfg).unwrap();
        let back: ScoreConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg, "{case}: config JSON round trip ({json})");
        let fx = common::load(AREA, case);
        let vm = varmap_from(&fx, params);
        let layer = AnyScore::new(&back, vb(&vm, DType::F32)).unwrap();
        assert_param_names(case, &vm, params);
        let boxed: Box<dyn Score> = Box::new(layer);
        let out = boxed.score(&fx.t("q"), &fx.t("k")).unwrap();
        common::assert_close(&format!("{case}: AnyScore"), &out, &fx.t("out"), F32);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Gradient flow from a fresh initialisation.

#[test]
fn every_parameter_gets_finite_nonzero_grad() {
    // Fresh parameters from the constructors' own initialisation (not the fixture's), fed the fixture's inputs.
    let dev = Device::Cpu;
    {
        let fx = common::load(AREA, "general");
        let vm = VarMap::new();
        let layer = GeneralScore::new(&general_config(&fx), VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let out = layer.forward(&fx.t("q"), &fx.t("k")).unwrap();
        let grads = common::weighted_sum(&out, &fx.t("dout")).backward().unwrap();
        common::assert_all_grads_finite_nonzero("general", &common::varmap_vars(&vm), &grads);
    }
    {
        let fx = common::load(AREA, "additive");
        let vm = VarMap::new();
        let layer = AdditiveScore::new(&additive_config(&fx), VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let out = layer.forward(&fx.t("q"), &fx.t("k")).unwrap();
        let grads = common::weighted_sum(&out, &fx.t("dout")).backward().unwrap();
        common::assert_all_grads_finite_nonzero("additive", &common::varmap_vars(&vm), &grads);
    }
    {
        let fx = common::load(AREA, "han_context");
        let vm = VarMap::new();
        let layer = HanContextScore::new(&han_config(&fx), VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let out = layer.forward(&fx.t("h")).unwrap();
        let grads = common::weighted_sum(&out, &fx.t("dout")).backward().unwrap();
        common::assert_all_grads_finite_nonzero("han_context", &common::varmap_vars(&vm), &grads);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Finite differences in f64.

/// The fixture's tensors (inputs, parameters, dout) in f64.
fn f64_tensors(fx: &Fixture, names: &[&str]) -> HashMap<String, Tensor> {
    names.iter().map(|&n| (n.to_string(), fx.t(n).to_dtype(DType::F64).unwrap())).collect()
}

/// Finite differences of `loss` w.r.t. every tensor in `names`, against candle's backward through the same loss.
fn finite_diff_all(
    label: &str,
    ts: &HashMap<String, Tensor>,
    names: &[&str],
    loss: impl Fn(&HashMap<String, Tensor>) -> Tensor,
) {
    // Analytic: every tensor as a Var.
    let vars: HashMap<String, Var> = ts.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect();
    let as_tensors: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let grads = loss(&as_tensors).backward().unwrap();
    for &name in names {
        let analytic = grads.get(vars[name].as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
        common::check_finite_diff(
            &format!("{label}: d{name}"),
            &ts[name],
            analytic,
            |x| {
                let mut m = ts.clone();
                m.insert(name.to_string(), x.clone());
                loss(&m).to_scalar::<f64>().unwrap()
            },
            24,
        );
    }
}

#[test]
fn additive_finite_differences_f64() {
    let fx = common::load(AREA, "additive");
    let cfg = additive_config(&fx);
    let mut names = vec!["q", "k"];
    names.extend_from_slice(ADDITIVE_PARAMS);
    let mut all = names.clone();
    all.push("dout");
    let ts = f64_tensors(&fx, &all);
    finite_diff_all("additive f64", &ts, &names, |m| {
        let layer = AdditiveScore::new(&cfg, VarBuilder::from_tensors(m.clone(), DType::F64, &Device::Cpu)).unwrap();
        let out = layer.forward(&m["q"], &m["k"]).unwrap();
        assert_eq!(out.dtype(), DType::F64);
        common::weighted_sum(&out, &m["dout"])
    });
}

#[test]
fn han_context_finite_differences_f64() {
    let fx = common::load(AREA, "han_context");
    let cfg = han_config(&fx);
    let mut names = vec!["h"];
    names.extend_from_slice(HAN_PARAMS);
    let mut all = names.clone();
    all.push("dout");
    let ts = f64_tensors(&fx, &all);
    finite_diff_all("han_context f64", &ts, &names, |m| {
        let layer = HanContextScore::new(&cfg, VarBuilder::from_tensors(m.clone(), DType::F64, &Device::Cpu)).unwrap();
        common::weighted_sum(&layer.forward(&m["h"]).unwrap(), &m["dout"])
    });
}

// ------------------------------------------------------------------------------------------------------------
// Dtypes.

#[test]
fn half_precision_scores_accumulate_in_f32() {
    // bf16 storage: the scores come back in f32 and equal the f32 computation on the same (rounded) values.
    let fx = common::load(AREA, "additive");
    let round = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let (q16, k16) = (round(fx.t("q")), round(fx.t("k")));
    let (q32, k32) = (q16.to_dtype(DType::F32).unwrap(), k16.to_dtype(DType::F32).unwrap());

    let s16 = dot(&q16, &q16).unwrap();
    assert_eq!(s16.dtype(), DType::F32, "dot of bf16");
    common::assert_close("dot bf16", &s16, &dot(&q32, &q32).unwrap(), F32);

    // A bf16 checkpoint with bf16 activations.
    let params: HashMap<String, Tensor> = ADDITIVE_PARAMS.iter().map(|&n| (n.to_string(), round(fx.t(n)))).collect();
    let params32: HashMap<String, Tensor> =
        params.iter().map(|(n, t)| (n.clone(), t.to_dtype(DType::F32).unwrap())).collect();
    let cfg = additive_config(&fx);
    let l16 = AdditiveScore::new(&cfg, VarBuilder::from_tensors(params, DType::BF16, &Device::Cpu)).unwrap();
    let l32 = AdditiveScore::new(&cfg, VarBuilder::from_tensors(params32, DType::F32, &Device::Cpu)).unwrap();
    let s16 = l16.forward(&q16, &k16).unwrap();
    assert_eq!(s16.dtype(), DType::F32, "additive of bf16");
    common::assert_close("additive bf16", &s16, &l32.forward(&q32, &k32).unwrap(), F32);
}

// ------------------------------------------------------------------------------------------------------------
// Errors: mismatched shapes are `Err` naming the shapes, never a panic.

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

fn err_msg<T: std::fmt::Debug>(r: attend::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message {msg:?} should mention {p:?}");
    }
}

#[test]
fn dot_rejects_different_widths() {
    let (q, k) = (zeros(&[2, 5, 8]), zeros(&[2, 7, 6]));
    assert_mentions(&err_msg(dot(&q, &k)), &["dot score", "q (2, 5, 8)", "k (2, 7, 6)"]);
    assert_mentions(&err_msg(scaled_dot(&q, &k, None)), &["scaled dot score", "q (2, 5, 8)", "k (2, 7, 6)"]);
    assert_mentions(&err_msg(DotScore.score(&q, &k)), &["(2, 5, 8)", "(2, 7, 6)"]);
}

#[test]
fn scores_reject_batch_rank_and_dtype_mismatch() {
    let q = zeros(&[2, 5, 8]);
    assert_mentions(&err_msg(dot(&q, &zeros(&[3, 7, 8]))), &["batch", "(2, 5, 8)", "(3, 7, 8)"]);
    assert_mentions(&err_msg(dot(&zeros(&[5, 8]), &zeros(&[2, 7, 8]))), &["(5, 8)", "(2, 7, 8)"]);
    let k64 = zeros(&[2, 7, 8]).to_dtype(DType::F64).unwrap();
    assert_mentions(&err_msg(dot(&q, &k64)), &["dtype", "F32", "F64"]);
}

#[test]
fn scaled_dot_rejects_non_finite_scale() {
    let q = zeros(&[2, 5, 8]);
    assert_mentions(&err_msg(scaled_dot(&q, &q, Some(f64::NAN))), &["scale"]);
    assert_mentions(&err_msg(ScaledDotScore::new(Some(f64::INFINITY))), &["scale"]);
}

#[test]
fn parametric_scores_reject_wrong_widths() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let general = GeneralScore::new(&GeneralScoreConfig { query_dim: 6, key_dim: 8 }, vb.pp("g")).unwrap();
    assert_mentions(
        &err_msg(general.forward(&zeros(&[2, 5, 7]), &zeros(&[2, 7, 8]))),
        &["general score", "q (2, 5, 7)", "6"],
    );
    assert_mentions(&err_msg(general.forward(&zeros(&[2, 5, 6]), &zeros(&[2, 7, 9]))), &["k (2, 7, 9)", "8"]);

    let cfg = AdditiveScoreConfig { query_dim: 6, key_dim: 8, attn_dim: 10 };
    let additive = AdditiveScore::new(&cfg, vb.pp("a")).unwrap();
    assert_mentions(
        &err_msg(additive.forward(&zeros(&[2, 5, 6]), &zeros(&[2, 7, 6]))),
        &["additive score", "k (2, 7, 6)", "8"],
    );
    assert_mentions(&err_msg(additive.forward(&zeros(&[2, 5, 8]), &zeros(&[2, 7, 8]))), &["q (2, 5, 8)", "6"]);
    assert_mentions(&err_msg(additive.score_projected(&zeros(&[2, 5, 6]), &zeros(&[2, 7, 8]))), &["(2, 7, 8)", "10"]);
    assert_mentions(
        &err_msg(additive.score_projected(&zeros(&[2, 5, 6]), &zeros(&[3, 7, 10]))),
        &["batch", "(3, 7, 10)"],
    );

    let han = HanContextScore::new(&HanContextScoreConfig { input_dim: 8, attn_dim: 6 }, vb.pp("h")).unwrap();
    assert_mentions(&err_msg(han.forward(&zeros(&[2, 7, 6]))), &["HAN context score", "h (2, 7, 6)", "8"]);
    assert_mentions(&err_msg(han.forward(&zeros(&[7, 8]))), &["(7, 8)"]);
}

#[test]
fn constructors_reject_bad_configs_and_checkpoints() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    err_msg(GeneralScore::new(&GeneralScoreConfig { query_dim: 0, key_dim: 8 }, vb.pp("g")));
    err_msg(AdditiveScore::new(&AdditiveScoreConfig { query_dim: 6, key_dim: 8, attn_dim: 0 }, vb.pp("a")));
    err_msg(HanContextScore::new(&HanContextScoreConfig { input_dim: 0, attn_dim: 6 }, vb.pp("h")));

    // A checkpoint whose linear_in.weight is stored as W (Dq, Dk) instead of nn.Linear's (Dk, Dq) is refused.
    let fx = common::load(AREA, "general");
    let w = fx.t("linear_in.weight").t().unwrap().contiguous().unwrap();
    let cfg = general_config(&fx);
    assert_ne!(cfg.query_dim, cfg.key_dim, "the fixture must have Dq != Dk for this check");
    let ts = HashMap::from([("linear_in.weight".to_string(), w)]);
    assert_mentions(
        &err_msg(GeneralScore::new(&cfg, VarBuilder::from_tensors(ts, DType::F32, &dev))),
        &["linear_in.weight"],
    );
    // A missing tensor is an error too.
    err_msg(AdditiveScore::new(
        &additive_config(&common::load(AREA, "additive")),
        VarBuilder::from_tensors(HashMap::new(), DType::F32, &dev),
    ));
}

#[test]
fn parameters_of_another_dtype_are_an_error() {
    // f32 checkpoint, f64 activations: an error naming the parameter, not a panic.
    let fx = common::load(AREA, "general");
    let vm = varmap_from(&fx, GENERAL_PARAMS);
    let layer = GeneralScore::new(&general_config(&fx), vb(&vm, DType::F32)).unwrap();
    let q = fx.t("q").to_dtype(DType::F64).unwrap();
    let k = fx.t("k").to_dtype(DType::F64).unwrap();
    assert_mentions(&err_msg(layer.forward(&q, &k)), &["linear_in.weight", "F32", "F64"]);
}
