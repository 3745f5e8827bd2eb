//! GPT: parity with Hugging Face `transformers` on a tiny GPT-2 checkpoint (fixtures/hf/gpt2, written by
//! scripts/oracle/hf.py) — logits, hidden states, left padding, the training loss and every gradient, greedy
//! generation token for token — and the invariances: KV-cache decoding equals the full forward, a left-padded batch
//! decodes like its sequences one by one, padding never changes real tokens, the future never reaches the past,
//! every parameter trains. Plus the loader's errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use attend::attention::{KvCache, Mask, MhaOptions, MultiHeadAttention, MultiHeadAttentionConfig};
use attend::checkpoint::hf::{gpt2_names, load_gpt2, save_gpt2, HfDir};
use attend::generate::{generate, GenerateConfig, Sampling};
use attend::layers::feed_forward::Activation;
use attend::models::gpt::{Gpt, GptClassifier, GptConfig, GptInput, GptLayout};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_all_grads_finite_nonzero, assert_close, hf_dir, load, real_rows, reseed, varmap_vars, Tol};

/// The bar for checkpoint parity: max abs difference ≤ 1e-4 on logits and hidden states.
const PARITY: Tol = Tol { atol: 1e-4, rtol: 0.0 };

fn gpt2() -> (Gpt, GptConfig) {
    let l = load_gpt2(&HfDir::open(hf_dir("gpt2")).unwrap(), DType::F32, &Device::Cpu, false).unwrap();
    (l.model, l.config)
}

fn ids_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn row_ids(t: &Tensor, r: usize) -> Vec<u32> {
    ids_of(t).get(r).unwrap().to_vec1().unwrap()
}

#[test]
fn gpt2_logits_and_hidden_states_match_transformers_with_right_padding() {
    let (gpt, _) = gpt2();
    let f = load("hf_ref", "gpt2");
    let (ids, mask) = (ids_of(&f.t("input_ids")), f.t("attention_mask"));
    let input = GptInput { attention_mask: Some(&mask), ..GptInput::new(&ids) };
    let out = gpt.hidden_states(&input, None).unwrap();
    let logits = gpt.logits(&out.hidden).unwrap();
    assert_close("logits", &real_rows(&logits, &mask), &real_rows(&f.t("logits"), &mask), PARITY);
    assert_close(
        "last_hidden_state",
        &real_rows(&out.hidden, &mask),
        &real_rows(&f.t("last_hidden_state"), &mask),
        PARITY,
    );
    // The unpadded row alone, with no mask at all, is the same.
    let one = gpt.forward(&GptInput::new(&ids.narrow(0, 0, 1).unwrap()), None).unwrap();
    assert_close("row 0 without a mask", &one, &f.t("logits").narrow(0, 0, 1).unwrap(), PARITY);
}

#[test]
fn gpt2_left_padding_with_position_ids_matches_transformers() {
    let (gpt, _) = gpt2();
    let f = load("hf_ref", "gpt2");
    let (ids, mask, pos) = (ids_of(&f.t("left_input_ids")), f.t("left_attention_mask"), f.t("left_position_ids"));
    let input = GptInput { attention_mask: Some(&mask), position_ids: Some(&pos), ..GptInput::new(&ids) };
    let logits = gpt.forward(&input, None).unwrap();
    assert_close("left-padded logits", &real_rows(&logits, &mask), &real_rows(&f.t("left_logits"), &mask), PARITY);
}

#[test]
fn gpt2_training_loss_and_every_gradient_match_transformers() {
    let dir = HfDir::open(hf_dir("gpt2")).unwrap();
    let loaded = load_gpt2(&dir, DType::F32, &Device::Cpu, true).unwrap();
    let f = load("hf_ref", "gpt2");
    let ids = ids_of(&f.t("train_ids"));
    loaded.model.set_training(true); // the fixture's dropouts are 0: training mode must change nothing else
    let logits = loaded.model.forward(&GptInput::new(&ids), None).unwrap();
    let loss = Gpt::lm_loss(&logits, &ids, None).unwrap();
    assert_close("loss", &loss, &f.t("loss"), Tol { atol: 1e-5, rtol: 1e-5 });
    let grads = loss.backward().unwrap();
    let table: HashMap<String, (String, bool)> =
        gpt2_names(loaded.config.n_layers).into_iter().map(|e| (e.hf, (e.attend, e.transposed))).collect();
    let mut checked = 0;
    for (name, want) in &f.tensors {
        let Some(hf) = name.strip_prefix("grad.") else { continue };
        let hf = hf.strip_prefix("transformer.").unwrap_or(hf);
        let (ours, transposed) = &table[hf];
        let g = grads.get(loaded.vars[ours].as_tensor()).unwrap_or_else(|| panic!("no gradient for {ours}"));
        let g = if *transposed { g.t().unwrap() } else { g.clone() };
        assert_close(&format!("grad {hf}"), &g, want, Tol { atol: 1e-5, rtol: 1e-4 });
        checked += 1;
    }
    assert_eq!(checked, loaded.vars.len(), "the fixture must hold a gradient for every parameter");
}

#[test]
fn gpt2_greedy_generation_matches_transformers_token_for_token() {
    let (gpt, _) = gpt2();
    let f = load("hf_ref", "gpt2");
    let prompt = row_ids(&f.t("gen_prompt_ids"), 0);
    let want = row_ids(&f.t("gen_ids"), 0);
    let eos = f.meta_f64("eos_token_id").map(|e| e as u32);
    let cfg = GenerateConfig { max_new_tokens: want.len() - prompt.len(), ..Default::default() };
    let got = generate(&gpt, &[prompt.clone()], &cfg, |_, _| {}).unwrap();
    assert_eq!([prompt, got[0].tokens.clone()].concat(), want, "greedy ids (eos {eos:?})");

    // The left-padded batch, as Hugging Face runs it.
    let (p, m, want) = (f.t("gen_batch_prompt_ids"), f.t("gen_batch_attention_mask"), f.t("gen_batch_ids"));
    let width = p.dim(1).unwrap();
    let prompts: Vec<Vec<u32>> = (0..p.dim(0).unwrap())
        .map(|r| {
            let mask: Vec<i64> = m.get(r).unwrap().to_dtype(DType::I64).unwrap().to_vec1().unwrap();
            row_ids(&p, r).into_iter().zip(mask).filter(|&(_, k)| k != 0).map(|(t, _)| t).collect()
        })
        .collect();
    let cfg = GenerateConfig { max_new_tokens: want.dim(1).unwrap() - width, ..Default::default() };
    let got = generate(&gpt, &prompts, &cfg, |_, _| {}).unwrap();
    for (r, g) in got.iter().enumerate() {
        assert_eq!(g.tokens, row_ids(&want, r)[width..].to_vec(), "batched greedy row {r}");
    }
}

/// A random model of the given layout with seeded parameters.
fn random_gpt(cfg: &GptConfig, seed: u64) -> (Gpt, VarMap) {
    let vm = VarMap::new();
    let gpt = Gpt::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed(&vm, seed, 0.3);
    (gpt, vm)
}

fn small(layout: GptLayout) -> GptConfig {
    let base = GptConfig { n_layers: 2, ..GptConfig::gpt2(37, 24, 16, 4) };
    match layout {
        GptLayout::Gpt2 => base,
        GptLayout::Gpt1 => GptConfig { layout, fused_qkv: false, activation: Activation::Gelu, ..base },
    }
}

fn seq(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + salt * 5 + 3) % 37).collect()
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    for layout in [GptLayout::Gpt1, GptLayout::Gpt2] {
        let (gpt, _) = random_gpt(&small(layout), 1);
        let ids = Tensor::new(vec![seq(9, 0), seq(9, 1)], &Device::Cpu).unwrap(); // (B, T)
        let full = gpt.forward(&GptInput::new(&ids), None).unwrap(); // (B, T, V)
        let mut cache = gpt.new_cache();
        // A prefill of 4, then one token at a time.
        let mut parts = vec![gpt.forward(&GptInput::new(&ids.narrow(1, 0, 4).unwrap()), Some(&mut cache)).unwrap()];
        for t in 4..9 {
            parts.push(gpt.forward(&GptInput::new(&ids.narrow(1, t, 1).unwrap()), Some(&mut cache)).unwrap());
        }
        let cached = Tensor::cat(&parts, 1).unwrap();
        assert_close(&format!("{layout:?} cached vs full"), &cached, &full, Tol { atol: 2e-5, rtol: 1e-5 });
    }
}

#[test]
fn a_future_token_never_changes_a_past_position() {
    let (gpt, _) = random_gpt(&small(GptLayout::Gpt2), 2);
    let a = seq(8, 0);
    let mut b = a.clone();
    b[5] = (b[5] + 1) % 37;
    let run =
        |s: &Vec<u32>| gpt.forward(&GptInput::new(&Tensor::new(vec![s.clone()], &Device::Cpu).unwrap()), None).unwrap();
    let (la, lb) = (run(&a), run(&b));
    assert_close(
        "positions before the change",
        &lb.narrow(1, 0, 5).unwrap(),
        &la.narrow(1, 0, 5).unwrap(),
        common::F32,
    );
    let after = (lb.narrow(1, 5, 3).unwrap() - la.narrow(1, 5, 3).unwrap()).unwrap().abs().unwrap();
    assert!(after.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-4, "the changed position must change");
}

#[test]
fn padding_never_changes_the_real_tokens() {
    let (gpt, _) = random_gpt(&small(GptLayout::Gpt2), 3);
    let short = seq(5, 2);
    let alone = gpt.forward(&GptInput::new(&Tensor::new(vec![short.clone()], &Device::Cpu).unwrap()), None).unwrap();
    // Right padding with junk ids.
    let padded = Tensor::new(vec![[short.clone(), vec![36, 1, 2]].concat()], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let out = gpt.forward(&GptInput { attention_mask: Some(&mask), ..GptInput::new(&padded) }, None).unwrap();
    assert_close("right padding", &out.narrow(1, 0, 5).unwrap(), &alone, common::F32);
    // Left padding with positions that count real tokens.
    let padded = Tensor::new(vec![[vec![36, 1, 2], short].concat()], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[0u32, 0, 0, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let pos = Tensor::new(&[[0u32, 0, 0, 0, 1, 2, 3, 4]], &Device::Cpu).unwrap();
    let input = GptInput { attention_mask: Some(&mask), position_ids: Some(&pos), ..GptInput::new(&padded) };
    let out = gpt.forward(&input, None).unwrap();
    assert_close("left padding", &out.narrow(1, 3, 5).unwrap(), &alone, common::F32);
}

#[test]
fn a_left_padded_batch_generates_what_each_prompt_generates_alone() {
    let (gpt, _) = random_gpt(&small(GptLayout::Gpt2), 4);
    let prompts = vec![seq(6, 0), seq(2, 1), seq(4, 2)];
    let samplings =
        [Sampling::Greedy, Sampling::Sample { temperature: 0.8, top_k: Some(10), top_p: Some(0.9), seed: 11 }];
    for sampling in samplings {
        let cfg = GenerateConfig {
            max_new_tokens: 7,
            sampling: sampling.clone(),
            repetition_penalty: 1.3,
            ..Default::default()
        };
        let batch = generate(&gpt, &prompts, &cfg, |_, _| {}).unwrap();
        for (r, p) in prompts.iter().enumerate() {
            // Unpadded, in row r (sampling draws depend on the row): copies of the prompt only.
            let alone_prompts = vec![p.clone(); r + 1];
            let alone = generate(&gpt, &alone_prompts, &cfg, |_, _| {}).unwrap();
            assert_eq!(batch[r], alone[r], "{sampling:?}: prompt {r} in a batch vs alone");
        }
    }
}

#[test]
fn streaming_sees_every_token_in_order_and_stop_tokens_end_a_sequence() {
    let (gpt, _) = random_gpt(&small(GptLayout::Gpt2), 5);
    let prompts = vec![seq(3, 0), seq(5, 1)];
    let free =
        generate(&gpt, &prompts, &GenerateConfig { max_new_tokens: 6, ..Default::default() }, |_, _| {}).unwrap();
    let stop = free[0].tokens[2];
    let cfg = GenerateConfig { max_new_tokens: 6, stop_tokens: vec![stop], ..Default::default() };
    let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); 2];
    let out = generate(&gpt, &prompts, &cfg, |r, t| streamed[r].push(t)).unwrap();
    let cut = free[0].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(out[0].tokens, free[0].tokens[..=cut].to_vec());
    assert!(out[0].stopped);
    assert_eq!(streamed[0], out[0].tokens);
    assert_eq!(streamed[1], out[1].tokens);
}

#[test]
fn every_parameter_of_every_gpt_variant_gets_a_finite_nonzero_gradient() {
    let variants = [
        ("gpt2", small(GptLayout::Gpt2)),
        ("gpt1", small(GptLayout::Gpt1)),
        ("untied, shared layers", GptConfig { tie_embeddings: false, share_layers: true, ..small(GptLayout::Gpt2) }),
    ];
    let ids = Tensor::new(vec![seq(10, 0), seq(10, 3)], &Device::Cpu).unwrap();
    for (label, cfg) in variants {
        let (gpt, vm) = random_gpt(&cfg, 6);
        let logits = gpt.forward(&GptInput::new(&ids), None).unwrap();
        let grads = Gpt::lm_loss(&logits, &ids, None).unwrap().backward().unwrap();
        let vars = varmap_vars(&vm);
        // Positions past the sequence never get a gradient: check the rows that were used.
        let used: Vec<_> = vars
            .iter()
            .map(|(n, v)| {
                let t = if n == "wpe.weight" { v.as_tensor().narrow(0, 0, 10).unwrap() } else { v.as_tensor().clone() };
                (n.clone(), t)
            })
            .collect();
        for (n, t) in &used {
            let g = grads
                .get(vars.iter().find(|(m, _)| m == n).unwrap().1.as_tensor())
                .unwrap_or_else(|| panic!("{label}: {n} got no gradient"));
            let g = if n == "wpe.weight" { g.narrow(0, 0, 10).unwrap() } else { g.clone() };
            assert_eq!(g.dims(), t.dims());
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{label}: {n} gradient not finite");
            assert!(v.iter().any(|&x| x != 0.0), "{label}: {n} gradient all zero");
        }
    }
    // The classifier: L3 = L2 + λ·L1 reaches the head and every GPT parameter.
    let vm = VarMap::new();
    let clf =
        GptClassifier::new(&small(GptLayout::Gpt1), 3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed(&vm, 7, 0.3);
    let ids = Tensor::new(vec![seq(10, 0), seq(10, 3)], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32; 10], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let l = clf.loss(&ids, Some(&mask), &labels, 0.5).unwrap();
    let grads = l.total.backward().unwrap();
    let vars: Vec<_> = varmap_vars(&vm).into_iter().filter(|(n, _)| n != "gpt.wpe.weight").collect();
    assert_all_grads_finite_nonzero("classifier", &vars, &grads);
    let total = l.total.to_scalar::<f32>().unwrap();
    let parts = l.task.to_scalar::<f32>().unwrap() + 0.5 * l.lm.to_scalar::<f32>().unwrap();
    assert!((total - parts).abs() < 1e-5, "L3 = L2 + λ·L1: {total} vs {parts}");
}

#[test]
fn fused_qkv_equals_three_projections_with_the_same_weights() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let fused_cfg =
        MultiHeadAttentionConfig { fused_qkv: true, n_kv_heads: Some(2), ..MultiHeadAttentionConfig::new(16, 4) };
    let fused = MultiHeadAttention::new(&fused_cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    reseed(&vm, 8, 0.3);
    let (w, b) = (fused.qkv_fused().unwrap().weight().clone(), fused.qkv_fused().unwrap().bias().unwrap().clone());
    // Rows [q (H·D = 16); k (Hkv·D = 8); v (8)].
    let mut map = HashMap::new();
    for (name, start, n) in [("q_proj", 0, 16), ("k_proj", 16, 8), ("v_proj", 24, 8)] {
        map.insert(format!("{name}.weight"), w.narrow(0, start, n).unwrap());
        map.insert(format!("{name}.bias"), b.narrow(0, start, n).unwrap());
    }
    for n in ["out_proj.weight", "out_proj.bias"] {
        map.insert(n.to_string(), vm.data().lock().unwrap()[n].as_tensor().clone());
    }
    let sep_cfg = MultiHeadAttentionConfig { fused_qkv: false, ..fused_cfg.clone() };
    let sep = MultiHeadAttention::new(&sep_cfg, VarBuilder::from_tensors(map, DType::F32, &dev)).unwrap();
    let x = common::randn(&[2, 5, 16], 9, DType::F32);
    let opts = MhaOptions::default();
    let (mut c1, mut c2) = (KvCache::new(None), KvCache::new(None));
    let a = fused.forward(&x, None, &Mask::causal(), Some(&mut c1), &opts).unwrap().out;
    let b = sep.forward(&x, None, &Mask::causal(), Some(&mut c2), &opts).unwrap().out;
    assert_close("fused vs separate", &a, &b, common::F32);
    // Cross-attention needs separate projections: a clear error, not a wrong result.
    let err = fused.forward(&x, Some(&x), &Mask::none(), None, &opts).unwrap_err().to_string();
    assert!(err.contains("fused_qkv"), "{err}");
}

#[test]
fn a_saved_model_loads_back_with_identical_logits() {
    let cfg = GptConfig { dropout: 0.1, ..small(GptLayout::Gpt2) };
    let (gpt, vm) = random_gpt(&cfg, 10);
    let tensors: HashMap<String, Tensor> =
        varmap_vars(&vm).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let dir = std::env::temp_dir().join(format!("attend-gpt2-roundtrip-{}", std::process::id()));
    save_gpt2(&cfg, &tensors, &dir).unwrap();
    let back = load_gpt2(&HfDir::open(&dir).unwrap(), DType::F32, &Device::Cpu, false).unwrap();
    assert_eq!(back.config, cfg);
    let ids = Tensor::new(vec![seq(6, 1)], &Device::Cpu).unwrap();
    let (a, b) =
        (gpt.forward(&GptInput::new(&ids), None).unwrap(), back.model.forward(&GptInput::new(&ids), None).unwrap());
    assert_close("round trip", &b, &a, Tol { atol: 0.0, rtol: 0.0 });
    std::fs::remove_dir_all(&dir).unwrap();
}

fn edited_dir(tag: &str, edit: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>)) -> PathBuf {
    common::edited_hf_dir("gpt2", tag, edit)
}

fn load_err(dir: &PathBuf) -> String {
    let r = HfDir::open(dir).and_then(|d| load_gpt2(&d, DType::F32, &Device::Cpu, false));
    let e = r.map(|_| ()).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(dir);
    e
}

#[test]
fn bad_checkpoints_and_inputs_give_one_line_errors_naming_what_is_wrong() {
    let key = |t: &HashMap<String, Tensor>, suffix: &str| t.keys().find(|k| k.ends_with(suffix)).unwrap().clone();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "unsupported activation",
            edited_dir("act", |c, _| c["activation_function"] = "quick_gelu".into()),
            "activation_function",
        ),
        ("wrong type", edited_dir("type", |c, _| c["n_layer"] = "two".into()), "n_layer"),
        (
            "scale_attn_by_inverse_layer_idx",
            edited_dir("scale", |c, _| c["scale_attn_by_inverse_layer_idx"] = true.into()),
            "scale_attn_by_inverse_layer_idx",
        ),
        (
            "extra tensor",
            edited_dir("extra", |_, t| {
                t.insert("h.0.attn.rotary".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
            }),
            "h.0.attn.rotary",
        ),
        (
            "missing tensor",
            edited_dir("missing", |_, t| {
                let k = key(t, "h.1.mlp.c_fc.bias");
                t.remove(&k);
            }),
            "layers.1.ffn.fc_in.bias",
        ),
        ("shape vs config", edited_dir("shape", |c, _| c["n_inner"] = 48.into()), "c_fc.weight"),
        ("pickle only", edited_dir("bin", |_, t| t.clear()), "pytorch_model.bin"),
    ];
    for (label, dir, needle) in cases {
        if label == "pickle only" {
            std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
        }
        let e = load_err(&dir);
        // The message proper is the first line (candle appends a backtrace when RUST_BACKTRACE is set).
        assert!(e.lines().next().unwrap().contains(needle), "{label}: {e}");
    }
    let (gpt, cfg) = gpt2();
    let too_big = Tensor::new(&[[cfg.vocab_size as u32]], &Device::Cpu).unwrap();
    let e = gpt.forward(&GptInput::new(&too_big), None).unwrap_err().to_string();
    assert!(e.contains(&format!("token id {}", cfg.vocab_size)), "{e}");
    let long = vec![1u32; cfg.n_positions];
    let e = generate(&gpt, &[long], &GenerateConfig { max_new_tokens: 1, ..Default::default() }, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("context"), "{e}");
    let _ = D::Minus1;
}
