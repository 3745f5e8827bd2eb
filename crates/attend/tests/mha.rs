//! Multi-head attention (attention/mha.rs) and the KV cache (attention/kv_cache.rs).
//!
//! Oracles: the PyTorch fixtures of scripts/oracle/mha.py (forward, weights and every gradient, against
//! `nn.MultiheadAttention` and an independent SDPA/GQA implementation), f64 finite differences, and invariants
//! (cached decoding equals the full causal forward, padding keys change nothing, GQA with duplicated K/V heads equals
//! MHA, dropout reproducible from its seed).
mod common;

use std::collections::HashMap;

use attend::attention::{
    import_torch_mha, AttentionImpl, KvCache, Mask, MhaOptions, MhaOutput, MultiHeadAttention, MultiHeadAttentionConfig,
};
use attend::position::rope::{Rope, RopeConfig, RopeLayout};
use attend::rng::DropoutRng;
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{Fixture, F32, F32_GRAD};

const AREA: &str = "mha";
const WEIGHTS: &[&str] = &["k_proj.weight", "out_proj.weight", "q_proj.weight", "v_proj.weight"];
const BIASES: &[&str] = &["k_proj.bias", "out_proj.bias", "q_proj.bias", "v_proj.bias"];

// ---------------------------------------------------------------------------------------------------------------
// Helpers.

/// Deterministic pseudo-normal values (sum of uniforms from a xorshift), so that failures reproduce.
fn det(shape: &[usize], seed: u64, amp: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32
    };
    let v: Vec<f32> = (0..n).map(|_| ((0..4).map(|_| next()).sum::<f32>() - 2.0) * 1.7 * amp).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A layer whose parameters are deterministic (VarMap's own init draws from an unseeded RNG).
fn seeded_layer(cfg: &MultiHeadAttentionConfig, seed: u64) -> (VarMap, MultiHeadAttention) {
    let vm = VarMap::new();
    let mha = MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    for (i, (name, var)) in common::varmap_vars(&vm).into_iter().enumerate() {
        let dims = var.dims().to_vec();
        let amp = if dims.len() == 2 { 1.0 / (dims[1] as f32).sqrt() } else { 0.3 };
        var.set(&det(&dims, seed * 1000 + i as u64, amp)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    (vm, mha)
}

fn cfg(c: usize, h: usize, hkv: usize) -> MultiHeadAttentionConfig {
    MultiHeadAttentionConfig { n_kv_heads: Some(hkv), ..MultiHeadAttentionConfig::new(c, h) }
}

fn rope(rotary_dim: usize, max_positions: usize, theta: f64) -> Rope {
    let rc = RopeConfig { rotary_dim, max_positions, theta, layout: RopeLayout::Halves };
    Rope::new(&rc, DType::F32, &Device::Cpu).unwrap()
}

fn meta_usize(fx: &Fixture, key: &str) -> usize {
    fx.meta_json(key).and_then(|v| v.as_u64()).unwrap_or_else(|| panic!("{}: meta `{key}`", fx.path.display())) as usize
}

fn fixture_config(fx: &Fixture) -> MultiHeadAttentionConfig {
    MultiHeadAttentionConfig {
        d_model: meta_usize(fx, "d_model"),
        n_heads: meta_usize(fx, "n_heads"),
        n_kv_heads: Some(meta_usize(fx, "n_kv_heads")),
        head_dim: Some(meta_usize(fx, "head_dim")),
        kv_dim: Some(meta_usize(fx, "kv_dim")),
        value_dim: Some(meta_usize(fx, "value_dim")),
        bias: fx.meta_json("bias").and_then(|v| v.as_bool()).unwrap(),
        dropout: 0.0,
        scale: None,
        fused_qkv: false,
    }
}

fn fixture_mask(fx: &Fixture) -> Mask {
    let mut m = Mask::none();
    if fx.meta_json("causal").and_then(|v| v.as_bool()).unwrap() {
        m = m.with_causal();
    }
    if let Some(serde_json::Value::Array(kl)) = fx.meta_json("key_lengths") {
        m = m.with_key_lengths(kl.iter().map(|v| v.as_u64().unwrap() as usize).collect());
    }
    m
}

fn fixture_rope(fx: &Fixture) -> Option<Rope> {
    match fx.meta_json("rope")? {
        serde_json::Value::Null => None,
        r => Some(rope(
            r["rotary_dim"].as_u64().unwrap() as usize,
            r["max_positions"].as_u64().unwrap() as usize,
            r["theta"].as_f64().unwrap(),
        )),
    }
}

fn param_names(bias: bool) -> Vec<&'static str> {
    let mut v: Vec<&str> = WEIGHTS.to_vec();
    if bias {
        v.extend_from_slice(BIASES);
    }
    v.sort();
    v
}

/// A VarMap holding the fixture's parameters as Vars.
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

fn vb(vm: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu)
}

fn err_msg<T: std::fmt::Debug>(r: attend::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message `{msg}` should mention `{p}`");
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

/// `T` queries of `x` (B, T, C) decoded `chunk` at a time against a cache: the outputs concatenated along T and the
/// weights of each chunk, `(B, H, chunk, S_so_far)`, when asked for, with the chunk's first position.
fn decode_in_chunks(
    mha: &MultiHeadAttention,
    x: &Tensor,
    chunk: usize,
    cache: &mut KvCache,
    opts: &MhaOptions,
) -> (Tensor, Vec<(usize, Option<Tensor>)>) {
    let t = x.dim(1).unwrap();
    let (mut outs, mut weights) = (vec![], vec![]);
    let base = cache.len();
    let mut start = 0;
    while start < t {
        let n = chunk.min(t - start);
        let xc = x.narrow(1, start, n).unwrap(); // (B, n, C)
        let MhaOutput { out, weights: w } = mha.forward(&xc, None, &Mask::causal(), Some(cache), opts).unwrap();
        assert_eq!(cache.len(), base + start + n);
        outs.push(out);
        weights.push((base + start, w));
        start += n;
    }
    (Tensor::cat(&outs, 1).unwrap(), weights)
}

// ---------------------------------------------------------------------------------------------------------------
// Against the PyTorch oracle.

/// Forward, weights and the gradients of x, the memory and every parameter, on both paths of the attention core.
#[test]
fn fixtures_forward_weights_and_every_gradient() {
    for case in common::fixture_cases(AREA) {
        let fx = common::load(AREA, &case);
        let config = fixture_config(&fx);
        let names = param_names(config.bias);
        let rope = fixture_rope(&fx);
        let mask = fixture_mask(&fx);
        for implementation in [AttentionImpl::Materialized, AttentionImpl::Reference] {
            let label = format!("{case} {implementation:?}");
            let vm = varmap_from(&fx, &names);
            let mha = MultiHeadAttention::new(&config, vb(&vm)).unwrap();
            let got: Vec<String> = common::varmap_vars(&vm).into_iter().map(|(n, _)| n).collect();
            assert_eq!(got, names, "{label}: the layer asks for exactly the checkpoint names");

            let opts = MhaOptions { need_weights: true, rope: rope.as_ref(), implementation, ..Default::default() };
            let x = fx.var("x");
            let mut inputs = vec![("x".to_string(), x.clone())];
            let res = match fx.meta_json("memory").unwrap() {
                serde_json::Value::Null => mha.forward(x.as_tensor(), None, &mask, None, &opts),
                m if m == "kv" => {
                    let kv = fx.var("kv");
                    inputs.push(("kv".into(), kv.clone()));
                    mha.forward(x.as_tensor(), Some(kv.as_tensor()), &mask, None, &opts)
                }
                m if m == "key_value" => {
                    let (key, value) = (fx.var("key"), fx.var("value"));
                    inputs.push(("key".into(), key.clone()));
                    inputs.push(("value".into(), value.clone()));
                    mha.forward_qkv(x.as_tensor(), key.as_tensor(), value.as_tensor(), &mask, &opts)
                }
                m => panic!("{label}: unknown memory {m}"),
            };
            let MhaOutput { out, weights } = res.unwrap_or_else(|e| panic!("{label}: {e}"));
            common::assert_close(&format!("{label}: out"), &out, &fx.t("out"), F32);
            common::assert_close(&format!("{label}: weights"), &weights.unwrap(), &fx.t("weights"), F32);

            let grads = common::weighted_sum(&out, &fx.t("dout")).backward().unwrap();
            let mut all = common::varmap_vars(&vm);
            all.extend(inputs);
            for (name, var) in &all {
                let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{label}: no gradient for `{name}`"));
                common::assert_close(&format!("{label}: d{name}"), g, &fx.t(&format!("d{name}")), F32_GRAD);
            }
            let stored = fx.tensors.keys().filter(|k| k.starts_with('d') && *k != "dout").count();
            assert_eq!(stored, all.len(), "{label}: every gradient the oracle stored is compared");
        }
    }
}

/// `nn.MultiheadAttention`'s own state dict, through the importer table, loads as the split checkpoint names, with
/// and without a module prefix, and reproduces the oracle's output.
#[test]
fn torch_state_dict_import_matches_split_parameters() {
    let mut seen = 0;
    for case in common::fixture_cases(AREA) {
        let fx = common::load(AREA, &case);
        if fx.meta_str("oracle") != Some("torch") {
            continue;
        }
        seen += 1;
        let config = fixture_config(&fx);
        for prefix in ["", "model.decoder.layers.0.encoder_attn"] {
            let state: HashMap<String, Tensor> = fx
                .tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("torch.").map(|n| (n, v)))
                .map(|(n, v)| (if prefix.is_empty() { n.to_string() } else { format!("{prefix}.{n}") }, v.clone()))
                .collect();
            assert!(!state.is_empty(), "{case}: no torch.* tensors");
            let map = import_torch_mha(&state, prefix).unwrap();
            let mut keys: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
            keys.sort();
            let want: Vec<String> = param_names(config.bias)
                .iter()
                .map(|n| if prefix.is_empty() { n.to_string() } else { format!("{prefix}.{n}") })
                .collect();
            assert_eq!(keys, want, "{case}: imported names");
            for n in param_names(config.bias) {
                let k = if prefix.is_empty() { n.to_string() } else { format!("{prefix}.{n}") };
                common::assert_close(
                    &format!("{case}: imported {n}"),
                    &map[&k],
                    &fx.t(n),
                    common::Tol { atol: 0.0, rtol: 0.0 },
                );
            }
            let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
            let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
            let mha = MultiHeadAttention::new(&config, vb).unwrap();
            let opts = MhaOptions::default();
            let x = fx.t("x");
            let out = match (fx.opt("kv"), fx.opt("key"), fx.opt("value")) {
                (Some(kv), _, _) => mha.forward(&x, Some(&kv), &fixture_mask(&fx), None, &opts),
                (None, Some(k), Some(v)) => mha.forward_qkv(&x, &k, &v, &fixture_mask(&fx), &opts),
                _ => mha.forward(&x, None, &fixture_mask(&fx), None, &opts),
            }
            .unwrap()
            .out;
            common::assert_close(&format!("{case}: out after import"), &out, &fx.t("out"), F32);
        }
    }
    assert!(seen >= 5, "expected the nn.MultiheadAttention cases, saw {seen}");
}

#[test]
fn torch_import_rejects_unsupported_and_malformed_state() {
    let fx = common::load(AREA, "mha_self");
    let base: HashMap<String, Tensor> =
        fx.tensors.iter().filter_map(|(k, v)| k.strip_prefix("torch.").map(|n| (n.to_string(), v.clone()))).collect();

    let mut s = base.clone();
    s.insert("bias_k".into(), Tensor::zeros((1, 1, 12), DType::F32, &Device::Cpu).unwrap());
    assert_mentions(&err_msg(import_torch_mha(&s, "")), &["bias_k"]);

    let mut s = base.clone();
    s.insert("in_proj_weight".into(), Tensor::zeros((30, 12), DType::F32, &Device::Cpu).unwrap());
    assert_mentions(&err_msg(import_torch_mha(&s, "")), &["in_proj_weight", "(30, 12)", "36"]);

    let mut s = base.clone();
    s.remove("in_proj_weight");
    assert_mentions(&err_msg(import_torch_mha(&s, "")), &["in_proj_weight", "q_proj_weight"]);

    let mut s = base;
    s.remove("out_proj.weight");
    assert_mentions(&err_msg(import_torch_mha(&s, "")), &["out_proj.weight"]);
}

/// f64 central differences of the gradient w.r.t. the queries' input, for GQA + RoPE + causal + padding.
#[test]
fn finite_differences_f64_gqa_rope() {
    let config = MultiHeadAttentionConfig { head_dim: Some(4), ..cfg(8, 4, 2) };
    let (vm, _) = seeded_layer(&config, 11);
    let params: HashMap<String, Tensor> =
        common::varmap_vars(&vm).into_iter().map(|(n, v)| (n, v.as_tensor().to_dtype(DType::F64).unwrap())).collect();
    let mha = MultiHeadAttention::new(&config, VarBuilder::from_tensors(params, DType::F64, &Device::Cpu)).unwrap();
    let rc = RopeConfig { rotary_dim: 4, max_positions: 16, theta: 100.0, layout: RopeLayout::Halves };
    let rope = Rope::new(&rc, DType::F64, &Device::Cpu).unwrap();
    let mask = Mask::causal().with_key_lengths(vec![5, 3]);
    let x = det(&[2, 5, 8], 12, 1.0).to_dtype(DType::F64).unwrap();
    let dout = det(&[2, 5, 8], 13, 1.0).to_dtype(DType::F64).unwrap();
    let opts = MhaOptions { rope: Some(&rope), ..Default::default() };
    let loss =
        |x: &Tensor| -> Tensor { common::weighted_sum(&mha.forward(x, None, &mask, None, &opts).unwrap().out, &dout) };
    let xv = Var::from_tensor(&x).unwrap();
    let grads = loss(xv.as_tensor()).backward().unwrap();
    let dx = grads.get(xv.as_tensor()).unwrap();
    common::check_finite_diff("dx", &x, dx, |x| loss(x).to_scalar::<f64>().unwrap(), 40);
}

// ---------------------------------------------------------------------------------------------------------------
// Gradients reach every parameter.

#[test]
fn every_parameter_of_every_configuration_gets_a_finite_nonzero_gradient() {
    let rp = rope(4, 32, 10000.0);
    let configs: Vec<(&str, MultiHeadAttentionConfig, bool, Option<&Rope>, Mask)> = vec![
        ("self", cfg(12, 3, 3), false, None, Mask::none()),
        ("causal no bias", MultiHeadAttentionConfig { bias: false, ..cfg(12, 4, 4) }, false, None, Mask::causal()),
        ("cross kdim", MultiHeadAttentionConfig { kv_dim: Some(6), ..cfg(12, 2, 2) }, true, None, Mask::none()),
        ("gqa", cfg(16, 4, 2), false, None, Mask::causal().with_key_lengths(vec![6, 4])),
        ("mqa", cfg(16, 4, 1), false, None, Mask::causal()),
        ("head_dim", MultiHeadAttentionConfig { head_dim: Some(8), ..cfg(12, 2, 2) }, false, None, Mask::none()),
        ("gqa rope", MultiHeadAttentionConfig { head_dim: Some(4), ..cfg(16, 4, 2) }, false, Some(&rp), Mask::causal()),
        ("dropout", MultiHeadAttentionConfig { dropout: 0.2, ..cfg(12, 3, 3) }, false, None, Mask::causal()),
    ];
    for (i, (label, config, cross, rope, mask)) in configs.into_iter().enumerate() {
        let (vm, mha) = seeded_layer(&config, 100 + i as u64);
        let x = Var::from_tensor(&det(&[2, 6, config.d_model], 200 + i as u64, 1.0)).unwrap();
        let kv = Var::from_tensor(&det(&[2, 5, config.kv_dim.unwrap_or(config.d_model)], 300, 1.0)).unwrap();
        mha.set_training(true);
        let opts = MhaOptions { rope, ..Default::default() };
        let out = mha.forward(x.as_tensor(), cross.then_some(kv.as_tensor()), &mask, None, &opts).unwrap().out;
        let grads = common::weighted_sum(&out, &det(out.dims(), 400, 1.0)).backward().unwrap();
        let mut vars = common::varmap_vars(&vm);
        assert_eq!(vars.len(), if config.bias { 8 } else { 4 }, "{label}: parameter count");
        vars.push(("x".into(), x));
        if cross {
            vars.push(("kv".into(), kv));
        }
        common::assert_all_grads_finite_nonzero(label, &vars, &grads);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Invariants.

/// (a) Decoding token by token, and in chunks of 3, against a KV cache equals the full causal forward: outputs and
/// the weights of each chunk (the full weights' rows, restricted to the keys seen so far; the rest are zero).
#[test]
fn kv_cache_decoding_equals_full_causal_forward() {
    let rp = rope(8, 64, 10000.0);
    let cases: Vec<(&str, MultiHeadAttentionConfig, Option<&Rope>)> = vec![
        ("mha", cfg(12, 3, 3), None),
        ("gqa rope", MultiHeadAttentionConfig { head_dim: Some(8), ..cfg(16, 4, 2) }, Some(&rp)),
        ("mqa no bias", MultiHeadAttentionConfig { bias: false, ..cfg(16, 4, 1) }, None),
    ];
    for (i, (label, config, rope)) in cases.into_iter().enumerate() {
        let (_, mha) = seeded_layer(&config, 20 + i as u64);
        let x = det(&[2, 8, config.d_model], 30 + i as u64, 1.0);
        let opts = MhaOptions { need_weights: true, rope, ..Default::default() };
        let full = mha.forward(&x, None, &Mask::causal(), None, &opts).unwrap();
        let full_w = full.weights.unwrap(); // (B, H, T, T)
        for (chunk, max_len) in [(1, None), (3, None), (1, Some(8)), (3, Some(20)), (8, None)] {
            let mut cache = KvCache::new(max_len);
            let (out, weights) = decode_in_chunks(&mha, &x, chunk, &mut cache, &opts);
            let l = format!("{label}, chunks of {chunk}, max_len {max_len:?}");
            common::assert_close(&format!("{l}: out"), &out, &full.out, F32);
            for (start, w) in weights {
                let w = w.expect("weights were asked for");
                let (n, s) = (w.dim(2).unwrap(), w.dim(3).unwrap());
                assert_eq!(s, start + n, "{l}: keys seen by the chunk at {start}");
                let want = full_w.narrow(2, start, n).unwrap().narrow(3, 0, s).unwrap();
                common::assert_close(&format!("{l}: weights of chunk at {start}"), &w, &want, F32);
                if s < 8 {
                    let rest = full_w.narrow(2, start, n).unwrap().narrow(3, s, 8 - s).unwrap();
                    assert_eq!(max_abs(&rest), 0.0, "{l}: causal weights beyond the cache");
                }
            }
        }
    }
}

/// Rolling the cache back (rejected speculative tokens) and decoding other tokens equals the full forward of the
/// accepted sequence; tensors returned before the rollback keep their values.
#[test]
fn kv_cache_rollback_then_redecode_equals_full_forward() {
    let rp = rope(4, 32, 10000.0);
    let config = MultiHeadAttentionConfig { head_dim: Some(4), ..cfg(12, 4, 2) };
    let (_, mha) = seeded_layer(&config, 40);
    let opts = MhaOptions { rope: Some(&rp), ..Default::default() };
    let accepted = det(&[2, 4, 12], 41, 1.0);
    let rejected = det(&[2, 3, 12], 42, 1.0);
    let replacement = det(&[2, 3, 12], 43, 1.0);
    for max_len in [None, Some(16)] {
        let mut cache = KvCache::new(max_len);
        mha.forward(&accepted, None, &Mask::causal(), Some(&mut cache), &opts).unwrap();
        mha.forward(&rejected, None, &Mask::causal(), Some(&mut cache), &opts).unwrap();
        let k_before = cache.k().unwrap().unwrap().copy().unwrap(); // (B, Hkv, 7, D), a copy to compare with
        let k_view = cache.k().unwrap().unwrap(); // a view the cache handed out
        cache.truncate(4).unwrap();
        assert_eq!(cache.len(), 4);
        let out = decode_in_chunks(&mha, &replacement, 1, &mut cache, &opts).0;
        let seq = Tensor::cat(&[&accepted, &replacement], 1).unwrap();
        let full = mha.forward(&seq, None, &Mask::causal(), None, &opts).unwrap().out;
        common::assert_close("redecoded", &out, &full.narrow(1, 4, 3).unwrap(), F32);
        common::assert_close(
            "view handed out before the rollback",
            &k_view,
            &k_before,
            common::Tol { atol: 0.0, rtol: 0.0 },
        );
    }
}

#[test]
fn kv_cache_grows_truncates_resets_and_reports_sizes() {
    let dev = Device::Cpu;
    let mut cache = KvCache::new(None);
    assert!(cache.is_empty() && cache.k().unwrap().is_none() && cache.capacity() == 0);
    let (mut ks, mut vs) = (vec![], vec![]);
    for step in 0..40u64 {
        let t = 1 + (step % 3) as usize;
        let (k, v) = (det(&[2, 3, t, 4], step, 1.0), det(&[2, 3, t, 5], 1000 + step, 1.0));
        let (k_all, v_all) = cache.append(&k, &v).unwrap();
        ks.push(k);
        vs.push(v);
        let want_k = Tensor::cat(&ks, 2).unwrap();
        let want_v = Tensor::cat(&vs, 2).unwrap();
        assert_eq!(cache.len(), want_k.dim(2).unwrap());
        assert!(cache.capacity() >= cache.len());
        common::assert_close("k_all", &k_all, &want_k, common::Tol { atol: 0.0, rtol: 0.0 });
        common::assert_close("v_all", &v_all, &want_v, common::Tol { atol: 0.0, rtol: 0.0 });
    }
    // Doubling growth: far fewer reallocations than appends (capacity a power-of-two multiple of the first).
    assert!(cache.capacity() < 2 * cache.len() + 16, "capacity {} for {}", cache.capacity(), cache.len());

    let before = cache.k().unwrap().unwrap().narrow(2, 0, 5).unwrap().copy().unwrap();
    cache.truncate(5).unwrap();
    common::assert_close("kept prefix", &cache.k().unwrap().unwrap(), &before, common::Tol { atol: 0.0, rtol: 0.0 });
    assert_mentions(&err_msg(cache.truncate(6)), &["6", "5"]);

    // Sizes are fixed until reset.
    let e = err_msg(cache.append(&det(&[2, 2, 1, 4], 1, 1.0), &det(&[2, 2, 1, 5], 2, 1.0)));
    assert_mentions(&e, &["(2, 2, 1, 4)", "(2, 3, 5, 4)"]);
    let e = err_msg(cache.append(&det(&[2, 3, 1, 4], 1, 1.0), &det(&[2, 3, 2, 5], 2, 1.0)));
    assert_mentions(&e, &["(2, 3, 1, 4)", "(2, 3, 2, 5)"]);
    let e = err_msg(cache.append(&det(&[2, 3, 4], 1, 1.0), &det(&[2, 3, 4], 2, 1.0)));
    assert_mentions(&e, &["(2, 3, 4)"]);
    let kf64 = det(&[2, 3, 1, 4], 1, 1.0).to_dtype(DType::F64).unwrap();
    assert!(cache.append(&kf64, &det(&[2, 3, 1, 5], 2, 1.0)).is_err());
    assert_eq!(cache.len(), 5, "a failed append leaves the cache unchanged");
    cache.reset();
    assert!(cache.is_empty() && cache.capacity() == 0);
    cache
        .append(
            &Tensor::zeros((1, 1, 2, 8), DType::F64, &dev).unwrap(),
            &Tensor::zeros((1, 1, 2, 8), DType::F64, &dev).unwrap(),
        )
        .unwrap();
    assert_eq!(cache.len(), 2);

    // max_len: preallocated once, exceeded with an error naming the sizes.
    let mut cache = KvCache::new(Some(6));
    cache.append(&det(&[1, 2, 4, 3], 1, 1.0), &det(&[1, 2, 4, 3], 2, 1.0)).unwrap();
    assert_eq!(cache.capacity(), 6);
    let e = err_msg(cache.append(&det(&[1, 2, 3, 3], 3, 1.0), &det(&[1, 2, 3, 3], 4, 1.0)));
    assert_mentions(&e, &["T = 3", "4 cached", "7", "max_len = 6"]);
    assert_eq!(cache.len(), 4);
    cache.append(&det(&[1, 2, 2, 3], 5, 1.0), &det(&[1, 2, 2, 3], 6, 1.0)).unwrap();
    assert_eq!(cache.len(), 6);
}

/// Gradients reach the keys and values of the current call and stop at the cached ones.
#[test]
fn kv_cache_passes_gradients_of_new_positions_only() {
    let mut cache = KvCache::new(None);
    let k0 = Var::from_tensor(&det(&[1, 2, 3, 4], 1, 1.0)).unwrap();
    let v0 = Var::from_tensor(&det(&[1, 2, 3, 4], 2, 1.0)).unwrap();
    cache.append(k0.as_tensor(), v0.as_tensor()).unwrap();
    let k1 = Var::from_tensor(&det(&[1, 2, 2, 4], 3, 1.0)).unwrap();
    let v1 = Var::from_tensor(&det(&[1, 2, 2, 4], 4, 1.0)).unwrap();
    let (k_all, v_all) = cache.append(k1.as_tensor(), v1.as_tensor()).unwrap();
    assert_eq!(k_all.dims(), &[1, 2, 5, 4]);
    let w = det(&[1, 2, 5, 4], 5, 1.0);
    let loss = ((common::weighted_sum(&k_all, &w) + common::weighted_sum(&v_all, &w)).unwrap()).sum_all().unwrap();
    let grads = loss.backward().unwrap();
    common::assert_close("dk1", grads.get(k1.as_tensor()).unwrap(), &w.narrow(2, 3, 2).unwrap(), F32);
    common::assert_close("dv1", grads.get(v1.as_tensor()).unwrap(), &w.narrow(2, 3, 2).unwrap(), F32);
    assert!(grads.get(k0.as_tensor()).is_none(), "cached keys are detached");
}

/// (b) Padding keys beyond `key_lengths` change nothing, whatever they hold; they receive zero gradient.
#[test]
fn garbage_keys_beyond_key_lengths_change_nothing() {
    // Self-attention (with and without causal): extend the sequence with garbage tokens; the first T rows agree.
    for (causal, config) in [(false, cfg(12, 3, 3)), (true, cfg(16, 4, 2))] {
        let (_, mha) = seeded_layer(&config, 50);
        let c = config.d_model;
        let x = det(&[2, 5, c], 51, 1.0);
        let lengths = vec![5, 3];
        let mask = |m: Mask| if causal { m.with_causal() } else { m };
        let opts = MhaOptions { need_weights: true, ..Default::default() };
        let base = mha.forward(&x, None, &mask(Mask::none().with_key_lengths(lengths.clone())), None, &opts).unwrap();
        let garbage = det(&[2, 4, c], 52, 50.0);
        let ext = Var::from_tensor(&Tensor::cat(&[&x, &garbage], 1).unwrap()).unwrap();
        let got =
            mha.forward(ext.as_tensor(), None, &mask(Mask::none().with_key_lengths(lengths)), None, &opts).unwrap();
        let label = format!("self-attention, causal {causal}");
        common::assert_close(&format!("{label}: out"), &got.out.narrow(1, 0, 5).unwrap(), &base.out, F32);
        let w = got.weights.unwrap().narrow(2, 0, 5).unwrap(); // (B, H, 5, 9)
        common::assert_close(&format!("{label}: weights"), &w.narrow(3, 0, 5).unwrap(), &base.weights.unwrap(), F32);
        assert_eq!(max_abs(&w.narrow(3, 5, 4).unwrap()), 0.0, "{label}: weight on a garbage key");
        // Only the real queries carry a loss: the garbage then gets exactly zero gradient.
        let dout =
            Tensor::cat(&[&det(&[2, 5, c], 53, 1.0), &Tensor::zeros((2, 4, c), DType::F32, &Device::Cpu).unwrap()], 1)
                .unwrap();
        let grads = common::weighted_sum(&got.out, &dout).backward().unwrap();
        let g = grads.get(ext.as_tensor()).unwrap();
        assert_eq!(max_abs(&g.narrow(1, 5, 4).unwrap()), 0.0, "{label}: gradient into garbage tokens");
        assert!(max_abs(&g.narrow(1, 0, 5).unwrap()) > 0.0);
    }

    // Cross-attention: garbage appended to the memory of batch element 1 (valid length 4 of 7).
    let config = MultiHeadAttentionConfig { kv_dim: Some(6), ..cfg(12, 2, 2) };
    let (_, mha) = seeded_layer(&config, 60);
    let x = det(&[2, 3, 12], 61, 1.0);
    let mem = det(&[2, 7, 6], 62, 1.0);
    let mem_garbage = Tensor::cat(&[&mem.i((.., 0..4, ..)).unwrap(), &det(&[2, 3, 6], 63, 80.0)], 1).unwrap();
    let mem_garbage = Tensor::cat(&[&mem.i(0..1).unwrap(), &mem_garbage.i(1..2).unwrap()], 0).unwrap();
    let mask = Mask::none().with_key_lengths(vec![7, 4]);
    let opts = MhaOptions::default();
    let a = mha.forward(&x, Some(&mem), &mask, None, &opts).unwrap().out;
    let mv = Var::from_tensor(&mem_garbage).unwrap();
    let b = mha.forward(&x, Some(mv.as_tensor()), &mask, None, &opts).unwrap().out;
    common::assert_close("cross-attention with garbage memory", &b, &a, F32);
    let grads = common::weighted_sum(&b, &det(&[2, 3, 12], 64, 1.0)).backward().unwrap();
    let g = grads.get(mv.as_tensor()).unwrap();
    assert_eq!(max_abs(&g.i((1, 4.., ..)).unwrap()), 0.0, "gradient into padded memory");
    assert!(max_abs(&g.i((1, 0..4, ..)).unwrap()) > 0.0);
}

/// (c) GQA whose K/V heads are duplicated into `H` heads (an MHA layer) computes the same function.
#[test]
fn gqa_with_duplicated_kv_heads_equals_mha() {
    for (hkv, bias) in [(2, true), (1, false), (4, true)] {
        let (h, c, d) = (4, 16, 4);
        let gqa_cfg = MultiHeadAttentionConfig { bias, ..cfg(c, h, hkv) };
        let (gvm, gqa) = seeded_layer(&gqa_cfg, 70 + hkv as u64);
        // Query head j of the MHA layer reads what query head j reads in GQA: K/V head j / (H / Hkv).
        let rows: Vec<u32> = (0..h).flat_map(|j| (0..d).map(move |i| ((j / (h / hkv)) * d + i) as u32)).collect();
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let mut params = HashMap::new();
        for (name, var) in common::varmap_vars(&gvm) {
            let t = var.as_tensor().clone();
            let t = if name.starts_with('k') || name.starts_with('v') { t.index_select(&rows, 0).unwrap() } else { t };
            params.insert(name, t);
        }
        let mha_cfg = MultiHeadAttentionConfig { bias, ..cfg(c, h, h) };
        let mha =
            MultiHeadAttention::new(&mha_cfg, VarBuilder::from_tensors(params, DType::F32, &Device::Cpu)).unwrap();
        let x = det(&[2, 6, c], 75, 1.0);
        for mask in [Mask::none(), Mask::causal().with_key_lengths(vec![6, 2])] {
            let opts = MhaOptions { need_weights: true, ..Default::default() };
            let a = gqa.forward(&x, None, &mask, None, &opts).unwrap();
            let b = mha.forward(&x, None, &mask, None, &opts).unwrap();
            let label = format!("Hkv = {hkv}, causal {}", mask.is_causal());
            common::assert_close(&format!("{label}: out"), &a.out, &b.out, F32);
            common::assert_close(&format!("{label}: weights"), &a.weights.unwrap(), &b.weights.unwrap(), F32);
        }
    }
}

/// Cross-attention against a memory projected once (`project_kv` + `forward_projected`), token by token, equals
/// the full cross-attention forward.
#[test]
fn projected_memory_decoding_equals_cross_attention() {
    let config = MultiHeadAttentionConfig { kv_dim: Some(10), ..cfg(16, 4, 2) };
    let (_, mha) = seeded_layer(&config, 80);
    let x = det(&[2, 5, 16], 81, 1.0);
    let mem = det(&[2, 7, 10], 82, 1.0);
    let mask = Mask::none().with_key_lengths(vec![7, 5]);
    let opts = MhaOptions { need_weights: true, ..Default::default() };
    let full = mha.forward(&x, Some(&mem), &mask, None, &opts).unwrap();
    let (k, v) = mha.project_kv(&mem, &mem).unwrap();
    assert_eq!(k.dims(), &[2, 2, 7, 4]);
    for t in 0..5 {
        let step = mha.forward_projected(&x.narrow(1, t, 1).unwrap(), &k, &v, &mask, &opts).unwrap();
        common::assert_close(&format!("step {t}"), &step.out, &full.out.narrow(1, t, 1).unwrap(), F32);
        let w = full.weights.as_ref().unwrap().narrow(2, t, 1).unwrap();
        common::assert_close(&format!("weights {t}"), &step.weights.unwrap(), &w, F32);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Dropout.

#[test]
fn dropout_is_reproducible_from_its_seed_and_off_in_evaluation() {
    let config = MultiHeadAttentionConfig { dropout: 0.3, ..cfg(12, 3, 3) };
    let x = det(&[2, 6, 12], 91, 1.0);
    let mask = Mask::causal();
    let exact = common::Tol { atol: 0.0, rtol: 0.0 };
    // Two layers with the same parameters, streams 0 and 1 of one model generator.
    let model = |seed: u64| {
        let rng = DropoutRng::new(seed);
        let layers: Vec<MultiHeadAttention> = (0..2)
            .map(|_| {
                let (_, mut l) = seeded_layer(&config, 90);
                l.set_dropout_stream(rng.stream());
                l
            })
            .collect();
        (rng, layers)
    };
    let out = |l: &MultiHeadAttention| l.forward(&x, None, &mask, None, &MhaOptions::default()).unwrap().out;
    let differ = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) > 1e-3;

    let (rng, layers) = model(7);
    let eval = out(&layers[0]);
    let (_, plain) = seeded_layer(&MultiHeadAttentionConfig { dropout: 0.0, ..config.clone() }, 90);
    common::assert_close("evaluation (the default) is the identity", &eval, &out(&plain), exact);
    layers.iter().for_each(|l| l.set_training(true));
    // A whole "run": two steps, each calling layer 0 twice and layer 1 once.
    let mut run = Vec::new();
    for _ in 0..2 {
        run.extend([out(&layers[0]), out(&layers[0]), out(&layers[1])]);
        rng.next_step();
    }
    assert!(differ(&run[0], &eval), "training drops something");
    assert!(differ(&run[0], &run[2]), "two layers draw different masks in one step");
    assert!(differ(&run[0], &run[1]), "two calls of one layer in one step draw different masks");
    assert!(differ(&run[0], &run[3]), "two steps draw different masks");
    // One seed reproduces the run; another seed does not.
    let (rng2, again) = model(7);
    again.iter().for_each(|l| l.set_training(true));
    for step in 0..2 {
        let outs = [out(&again[0]), out(&again[0]), out(&again[1])];
        for (i, o) in outs.iter().enumerate() {
            common::assert_close(&format!("same seed, step {step}, output {i}"), o, &run[3 * step + i], exact);
        }
        rng2.next_step();
    }
    let (_, other) = model(8);
    other[0].set_training(true);
    assert!(differ(&out(&other[0]), &run[0]), "another seed drops other weights");
    // A resumed run sets the step back and draws the masks of that step.
    let (rng3, resumed) = model(7);
    resumed.iter().for_each(|l| l.set_training(true));
    rng3.set_step(1);
    common::assert_close("resumed at step 1", &out(&resumed[0]), &run[3], exact);
    // Gradients regenerate the forward's mask: the same seed gives the same gradient.
    let grad = |seed: u64| {
        let (_, ls) = model(seed);
        ls[0].set_training(true);
        let xv = Var::from_tensor(&x).unwrap();
        let o = ls[0].forward(xv.as_tensor(), None, &mask, None, &MhaOptions::default()).unwrap().out;
        common::weighted_sum(&o, &det(&[2, 6, 12], 92, 1.0)).backward().unwrap().get(xv.as_tensor()).unwrap().clone()
    };
    common::assert_close("gradient, same seed", &grad(3), &grad(3), exact);
    // The returned weights are the probabilities before dropout.
    let w = |l: &MultiHeadAttention| {
        let opts = MhaOptions { need_weights: true, ..Default::default() };
        l.forward(&x, None, &mask, None, &opts).unwrap().weights.unwrap()
    };
    common::assert_close("weights before dropout", &w(&layers[0]), &w(&plain), F32);
}

// ---------------------------------------------------------------------------------------------------------------
// Errors, not panics.

#[test]
fn config_errors_name_the_values() {
    let vm = VarMap::new();
    let new = |c: MultiHeadAttentionConfig| err_msg(MultiHeadAttention::new(&c, vb(&vm)));
    assert_mentions(&new(MultiHeadAttentionConfig::new(12, 5)), &["d_model = 12", "n_heads = 5", "head_dim"]);
    assert_mentions(&new(cfg(12, 4, 3)), &["n_kv_heads = 3", "n_heads = 4"]);
    assert_mentions(&new(cfg(12, 4, 0)), &["n_kv_heads = 0"]);
    assert_mentions(&new(MultiHeadAttentionConfig::new(12, 0)), &["n_heads"]);
    assert_mentions(&new(MultiHeadAttentionConfig::new(0, 4)), &["d_model"]);
    assert_mentions(&new(MultiHeadAttentionConfig { dropout: 1.0, ..cfg(12, 4, 4) }), &["dropout", "1"]);
    assert_mentions(&new(MultiHeadAttentionConfig { dropout: f64::NAN, ..cfg(12, 4, 4) }), &["dropout", "NaN"]);
    assert_mentions(&new(MultiHeadAttentionConfig { scale: Some(-1.0), ..cfg(12, 4, 4) }), &["scale", "-1"]);
    assert_mentions(&new(MultiHeadAttentionConfig { head_dim: Some(0), ..cfg(12, 4, 4) }), &["head_dim"]);
    assert_mentions(&new(MultiHeadAttentionConfig { kv_dim: Some(0), ..cfg(12, 4, 4) }), &["kv_dim"]);
    // head_dim given explicitly lifts the divisibility requirement.
    assert!(MultiHeadAttention::new(&MultiHeadAttentionConfig { head_dim: Some(3), ..cfg(12, 5, 5) }, vb(&vm)).is_ok());

    // A checkpoint tensor of the wrong shape is an error, not a panic.
    let mut t = HashMap::new();
    for (n, s) in [
        ("q_proj.weight", (12, 10)),
        ("k_proj.weight", (12, 12)),
        ("v_proj.weight", (12, 12)),
        ("out_proj.weight", (12, 12)),
    ] {
        t.insert(n.to_string(), Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap());
    }
    let config = MultiHeadAttentionConfig { bias: false, ..cfg(12, 4, 4) };
    let e = err_msg(MultiHeadAttention::new(&config, VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)));
    assert_mentions(&e, &["q_proj.weight"]);
}

#[test]
fn serde_config_defaults_and_round_trip() {
    let c: MultiHeadAttentionConfig = serde_json::from_str(r#"{"d_model": 16, "n_heads": 4}"#).unwrap();
    assert_eq!(c, MultiHeadAttentionConfig::new(16, 4));
    let dims = c.resolve().unwrap();
    assert_eq!((dims.c, dims.h, dims.hkv, dims.d, dims.ckv, dims.cv), (16, 4, 4, 4, 16, 16));
    let g = MultiHeadAttentionConfig { n_kv_heads: Some(2), kv_dim: Some(8), bias: false, dropout: 0.1, ..c };
    let back: MultiHeadAttentionConfig = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
    assert_eq!(back, g);
    let d = back.resolve().unwrap();
    assert_eq!((d.hkv, d.ckv, d.cv), (2, 8, 8));
}

#[test]
fn forward_shape_errors_name_the_shapes() {
    let config = MultiHeadAttentionConfig { kv_dim: Some(6), ..cfg(12, 4, 2) };
    let (_, cross) = seeded_layer(&config, 1);
    let (_, selfl) = seeded_layer(&cfg(12, 4, 2), 2);
    let opts = MhaOptions::default();
    let none = Mask::none();
    let x = det(&[2, 5, 12], 3, 1.0);
    let mem = det(&[2, 7, 6], 4, 1.0);

    assert_mentions(
        &err_msg(selfl.forward(&det(&[5, 12], 1, 1.0), None, &none, None, &opts)),
        &["x", "(5, 12)", "(B, T, C)"],
    );
    assert_mentions(
        &err_msg(selfl.forward(&det(&[2, 5, 10], 1, 1.0), None, &none, None, &opts)),
        &["(2, 5, 10)", "12"],
    );
    assert_mentions(
        &err_msg(cross.forward(&x, Some(&det(&[3, 7, 6], 1, 1.0)), &none, None, &opts)),
        &["(3, 7, 6)", "2"],
    );
    assert_mentions(
        &err_msg(cross.forward(&x, Some(&det(&[2, 7, 12], 1, 1.0)), &none, None, &opts)),
        &["(2, 7, 12)", "6"],
    );
    assert_mentions(&err_msg(cross.forward(&x, None, &none, None, &opts)), &["kv_dim = 6", "d_model = 12"]);
    let e = err_msg(cross.forward_qkv(&x, &mem, &det(&[2, 6, 6], 1, 1.0), &none, &opts));
    assert_mentions(&e, &["(2, 7, 6)", "(2, 6, 6)"]);
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert_mentions(&err_msg(selfl.forward(&x64, None, &none, None, &opts)), &["F64", "F32"]);
    // A mask that does not fit (B, H, T, S).
    assert_mentions(
        &err_msg(selfl.forward(&x, None, &Mask::none().with_key_lengths(vec![5]), None, &opts)),
        &["key_lengths", "batch size 2"],
    );
    assert_mentions(
        &err_msg(cross.forward(&x, Some(&mem), &Mask::none().with_key_lengths(vec![7, 8]), None, &opts)),
        &["8", "S = 7"],
    );
    // A cache or RoPE with cross-attention.
    let mut cache = KvCache::new(None);
    assert_mentions(
        &err_msg(cross.forward(&x, Some(&mem), &none, Some(&mut cache), &opts)),
        &["project_kv", "forward_projected"],
    );
    let rp = rope(2, 16, 10000.0);
    let ropt = MhaOptions { rope: Some(&rp), ..Default::default() };
    assert_mentions(&err_msg(cross.forward(&x, Some(&mem), &none, None, &ropt)), &["rotary", "self-attention"]);
    // RoPE beyond its table.
    let mut cache = KvCache::new(None);
    selfl.forward(&det(&[2, 12, 12], 5, 1.0), None, &Mask::causal(), Some(&mut cache), &ropt).unwrap();
    assert_mentions(
        &err_msg(selfl.forward(&det(&[2, 5, 12], 6, 1.0), None, &Mask::causal(), Some(&mut cache), &ropt)),
        &["offset 12", "max_positions = 16"],
    );
    // A full cache, and a cache of another layer's shape.
    let mut cache = KvCache::new(Some(6));
    selfl.forward(&x, None, &Mask::causal(), Some(&mut cache), &opts).unwrap();
    assert_mentions(
        &err_msg(selfl.forward(&det(&[2, 2, 12], 7, 1.0), None, &Mask::causal(), Some(&mut cache), &opts)),
        &["max_len = 6", "7"],
    );
    let (_, other) = seeded_layer(&cfg(12, 4, 4), 8);
    assert_mentions(
        &err_msg(other.forward(&det(&[2, 1, 12], 9, 1.0), None, &Mask::causal(), Some(&mut cache), &opts)),
        &["(2, 4, 1, 3)", "(2, 2, 5, 3)"],
    );
    // Projected heads of the wrong shape.
    let (k, v) = cross.project_kv(&mem, &mem).unwrap();
    assert_mentions(
        &err_msg(cross.forward_projected(&x, &k.narrow(1, 0, 1).unwrap(), &v, &none, &opts)),
        &["k", "(2, 1, 7, 3)", "(2, 2, S, 3)"],
    );
}
