//! BERT: parity with Hugging Face `transformers` on tiny BERT checkpoints (fixtures/hf/bert*, roberta, distilbert,
//! written by scripts/oracle/hf.py) — hidden states, pooler, masked-LM logits, the pretraining loss and every
//! gradient, the three fine-tuning heads' logits and losses, RoBERTa's and DistilBERT's encoders — and the invariances: padding never changes the
//! real tokens, every parameter of every head trains, a saved model loads back identically. Plus the 80/10/10
//! masking, span decoding, sentence pooling and embeddings against sentence-transformers, and the loader's errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use attend::checkpoint::hf::{
    load_bert, save_bert, sentence_layout, BertFamily, DenseActivation, HfDir, SentenceEncoder,
};
use attend::layers::pooling::{l2_normalize, pool, PoolingMode};
use attend::models::bert::{
    best_spans, AnyBert, BertConfig, BertForTask, BertHeads, BertInput, BertTask, MlmMasking, TaskLogits, IGNORE,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_all_grads_finite_nonzero, assert_close, hf_dir, load, real_rows, reseed, varmap_vars, Tol};

/// The issue's bar for checkpoint parity: max abs difference ≤ 1e-4.
const PARITY: Tol = Tol { atol: 1e-4, rtol: 0.0 };

fn ids_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn load_dir(name: &str) -> AnyBert {
    load_bert(&HfDir::open(hf_dir(name)).unwrap(), DType::F32, &Device::Cpu, false).unwrap().model
}

#[test]
fn bert_hidden_states_and_pooler_match_transformers() {
    let AnyBert::Encoder(bert) = load_dir("bert") else { panic!("BertModel loads as the bare encoder") };
    let f = load("hf_ref", "bert");
    let (ids, tt, mask) = (ids_of(&f.t("input_ids")), f.t("token_type_ids"), f.t("attention_mask"));
    let input = BertInput { attention_mask: Some(&mask), token_type_ids: Some(&tt), ..BertInput::new(&ids) };
    let out = bert.forward(&input).unwrap();
    let want = f.t("last_hidden_state");
    assert_close("last_hidden_state", &real_rows(&out.hidden, &mask), &real_rows(&want, &mask), PARITY);
    assert_close("pooler_output", &out.pooled.unwrap(), &f.t("pooler_output"), PARITY);
}

#[test]
fn bert_masked_lm_logits_match_transformers() {
    let model = load_dir("bert-mlm");
    assert_eq!(model.heads(), BertHeads::Pretraining { mlm: true, nsp: false });
    let AnyBert::Pretraining(mlm) = model else { unreachable!() };
    assert!(mlm.bert().config().pooler == false, "BertForMaskedLM has no pooler");
    let f = load("hf_ref", "bert-mlm");
    let (ids, tt, mask) = (ids_of(&f.t("input_ids")), f.t("token_type_ids"), f.t("attention_mask"));
    let input = BertInput { attention_mask: Some(&mask), token_type_ids: Some(&tt), ..BertInput::new(&ids) };
    let logits = mlm.forward(&input).unwrap().mlm_logits.unwrap();
    assert_close("mlm_logits", &real_rows(&logits, &mask), &real_rows(&f.t("mlm_logits"), &mask), PARITY);
}

#[test]
fn padding_and_its_ids_never_change_the_real_tokens() {
    let AnyBert::Encoder(bert) = load_dir("bert") else { unreachable!() };
    let f = load("hf_ref", "bert");
    let (ids, mask) = (ids_of(&f.t("input_ids")), f.t("attention_mask"));
    let n = mask.get(1).unwrap().to_dtype(DType::U32).unwrap().sum_all().unwrap().to_scalar::<u32>().unwrap() as usize;
    let row = ids.narrow(0, 1, 1).unwrap();
    let alone = bert.forward(&BertInput::new(&row.narrow(1, 0, n).unwrap())).unwrap();
    // The same row with junk ids in its padding.
    let mut junk: Vec<u32> = row.flatten_all().unwrap().to_vec1().unwrap();
    junk[n..].iter_mut().for_each(|x| *x = 77);
    let junk = Tensor::new(vec![junk], &Device::Cpu).unwrap();
    let m = mask.narrow(0, 1, 1).unwrap();
    let padded = bert.forward(&BertInput { attention_mask: Some(&m), ..BertInput::new(&junk) }).unwrap();
    assert_close("real tokens", &padded.hidden.narrow(1, 0, n).unwrap(), &alone.hidden, common::F32);
    assert_close("pooled", &padded.pooled.unwrap(), &alone.pooled.unwrap(), common::F32);
}

fn small() -> BertConfig {
    BertConfig { n_layers: 2, max_position_embeddings: 16, ..BertConfig::base(41, 16, 4) }
}

fn batch() -> (Tensor, Tensor, Tensor) {
    let dev = &Device::Cpu;
    let ids = Tensor::new(&[[2u32, 9, 17, 30, 3, 12, 5, 3], [2, 40, 11, 3, 0, 0, 0, 0]], dev).unwrap();
    let tt = Tensor::new(&[[0u32, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]], dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]], dev).unwrap();
    (ids, tt, mask)
}

#[test]
fn every_parameter_of_every_head_receives_a_gradient() {
    let (ids, tt, mask) = batch();
    let input = BertInput { attention_mask: Some(&mask), token_type_ids: Some(&tt), ..BertInput::new(&ids) };
    let dev = &Device::Cpu;
    let build = |heads: BertHeads| {
        let vm = VarMap::new();
        let m = AnyBert::new(&small(), heads, VarBuilder::from_varmap(&vm, DType::F32, dev)).unwrap();
        reseed(&vm, 5, 0.3);
        (m, vm)
    };
    // Pretraining: both losses, with the 80/10/10 corruption of the batch.
    let (m, vm) = build(BertHeads::Pretraining { mlm: true, nsp: true });
    let AnyBert::Pretraining(p) = m else { unreachable!() };
    let masking = MlmMasking { probability: 0.5, mask_token_id: 4, vocab_size: 41, special_ids: vec![0, 2, 3] };
    let (corrupt, labels) = masking.apply(&ids, Some(&mask), 3).unwrap();
    let input_c = BertInput { input_ids: &corrupt, ..input };
    let nsp = Tensor::new(&[0i64, 1], dev).unwrap();
    let loss = p.loss(&input_c, Some(&labels), Some(&nsp)).unwrap();
    assert_all_grads_finite_nonzero("pretraining", &varmap_vars(&vm), &loss.backward().unwrap());

    let labels_for = |task: BertTask| match task {
        BertTask::SequenceClassification { .. } => Tensor::new(&[2i64, 0], dev).unwrap(),
        BertTask::TokenClassification { .. } => Tensor::new(
            &[[IGNORE, 1, 2, 0, IGNORE, 1, 2, 0], [IGNORE, 2, 1, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]],
            dev,
        )
        .unwrap(),
        BertTask::QuestionAnswering => Tensor::new(&[[1i64, 2], [3, 2]], dev).unwrap(),
    };
    for task in [
        BertTask::SequenceClassification { n_labels: 3 },
        BertTask::TokenClassification { n_labels: 3 },
        BertTask::QuestionAnswering,
    ] {
        let (m, vm) = build(BertHeads::Task(task));
        let AnyBert::Task(t) = m else { unreachable!() };
        let mut vars = varmap_vars(&vm);
        if !matches!(task, BertTask::SequenceClassification { .. }) {
            // Token-level heads never read the pooler (Hugging Face builds these without one).
            vars.retain(|(n, _)| !n.starts_with("bert.pooler"));
        }
        let loss = t.loss(&input, &labels_for(task)).unwrap();
        assert_all_grads_finite_nonzero(&format!("{task:?}"), &vars, &loss.backward().unwrap());
    }
}

#[test]
fn regression_head_is_mean_squared_error() {
    let (ids, _, mask) = batch();
    let vm = VarMap::new();
    let task = BertTask::SequenceClassification { n_labels: 1 };
    let m = BertForTask::new(&small(), task, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed(&vm, 6, 0.3);
    let input = BertInput { attention_mask: Some(&mask), ..BertInput::new(&ids) };
    let y = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
    let TaskLogits::Sequence(l) = m.forward(&input).unwrap().0 else { unreachable!() };
    let l: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
    let want = ((l[0] - 0.5).powi(2) + (l[1] + 1.0).powi(2)) / 2.0;
    let got = m.loss(&input, &y).unwrap().to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
}

#[test]
fn mlm_masking_is_80_10_10_over_eligible_tokens_and_reproducible() {
    let dev = &Device::Cpu;
    let (b, t, v) = (64usize, 128usize, 1000u32);
    // Row r: [CLS]=2, tokens, [SEP]=3, then r % 17 padding positions (id 0, mask 0).
    let mut ids = vec![vec![0u32; t]; b];
    let mut mask = vec![vec![0u32; t]; b];
    for r in 0..b {
        let n = t - r % 17;
        for j in 0..n {
            ids[r][j] = if j == 0 {
                2
            } else if j == n - 1 {
                3
            } else {
                5 + ((r * 31 + j * 7) as u32 % (v - 5))
            };
            mask[r][j] = 1;
        }
    }
    let (ids, mask) = (Tensor::new(ids, dev).unwrap(), Tensor::new(mask, dev).unwrap());
    let m = MlmMasking { probability: 0.15, mask_token_id: 4, vocab_size: v as usize, special_ids: vec![0, 2, 3] };
    let (inp, labels) = m.apply(&ids, Some(&mask), 42).unwrap();
    let (inp2, labels2) = m.apply(&ids, Some(&mask), 42).unwrap();
    assert_eq!(inp.to_vec2::<u32>().unwrap(), inp2.to_vec2::<u32>().unwrap(), "same seed, same corruption");
    assert_eq!(labels.to_vec2::<i64>().unwrap(), labels2.to_vec2::<i64>().unwrap());
    let (orig, inp, labels, mask) = (
        ids.to_vec2::<u32>().unwrap(),
        inp.to_vec2::<u32>().unwrap(),
        labels.to_vec2::<i64>().unwrap(),
        mask.to_vec2::<u32>().unwrap(),
    );
    let (mut eligible, mut chosen, mut masked, mut kept) = (0usize, 0usize, 0usize, 0usize);
    for r in 0..b {
        for j in 0..t {
            let special = [0, 2, 3].contains(&orig[r][j]) || mask[r][j] == 0;
            if labels[r][j] == IGNORE {
                assert_eq!(inp[r][j], orig[r][j], "an unchosen token is unchanged");
            } else {
                assert!(!special, "special token or padding chosen at ({r}, {j})");
                assert_eq!(labels[r][j], orig[r][j] as i64, "the label is the original id");
                chosen += 1;
                masked += (inp[r][j] == 4) as usize;
                kept += (inp[r][j] == orig[r][j]) as usize;
            }
            eligible += !special as usize;
        }
    }
    // Binomial proportions: each bound is more than 5 standard deviations wide.
    let p = chosen as f64 / eligible as f64;
    assert!((p - 0.15).abs() < 0.01, "chosen fraction {p}");
    let (pm, pk) = (masked as f64 / chosen as f64, kept as f64 / chosen as f64);
    assert!((pm - 0.8).abs() < 0.03, "[MASK] fraction {pm}");
    assert!((pk - 0.1).abs() < 0.025, "unchanged fraction {pk} (random replacements rarely hit the original)");
    let (other, _) = m.apply(&ids, Some(&Tensor::new(mask.clone(), dev).unwrap()), 43).unwrap();
    assert_ne!(other.to_vec2::<u32>().unwrap(), inp, "another seed, another corruption");
}

#[test]
fn best_spans_agree_with_brute_force() {
    let dev = &Device::Cpu;
    let (b, t) = (5usize, 11usize);
    let s = common::randn(&[b, t], 7, DType::F32);
    let e = common::randn(&[b, t], 8, DType::F32);
    let allowed: Vec<Vec<u32>> = (0..b).map(|r| (0..t).map(|j| ((j + r) % 4 != 0) as u32).collect()).collect();
    let allowed_t = Tensor::new(allowed.clone(), dev).unwrap();
    let got = best_spans(&s, &e, Some(&allowed_t), 4).unwrap();
    let (sv, ev) = (s.to_vec2::<f32>().unwrap(), e.to_vec2::<f32>().unwrap());
    for r in 0..b {
        let mut best = None::<(usize, usize, f32)>;
        for i in 0..t {
            for j in 0..t {
                if j >= i && j - i < 4 && allowed[r][i] == 1 && allowed[r][j] == 1 {
                    let v = sv[r][i] + ev[r][j];
                    if best.is_none_or(|x| v > x.2) {
                        best = Some((i, j, v));
                    }
                }
            }
        }
        assert_eq!(got[r], best, "row {r}");
    }
    let none = best_spans(&s, &e, Some(&Tensor::zeros((b, t), DType::U32, dev).unwrap()), 4).unwrap();
    assert!(none.iter().all(Option::is_none), "no allowed position, no span");
}

#[test]
fn every_head_saves_in_the_hf_layout_and_loads_back_identically() {
    let (ids, tt, mask) = batch();
    let input = BertInput { attention_mask: Some(&mask), token_type_ids: Some(&tt), ..BertInput::new(&ids) };
    for heads in [
        BertHeads::None,
        BertHeads::Pretraining { mlm: true, nsp: false },
        BertHeads::Pretraining { mlm: true, nsp: true },
        BertHeads::Task(BertTask::SequenceClassification { n_labels: 3 }),
        BertHeads::Task(BertTask::TokenClassification { n_labels: 4 }),
        BertHeads::Task(BertTask::QuestionAnswering),
    ] {
        let vm = VarMap::new();
        let cfg = small();
        let m = AnyBert::new(&cfg, heads, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        reseed(&vm, 9, 0.3);
        let tensors: HashMap<String, Tensor> =
            varmap_vars(&vm).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let dir = std::env::temp_dir().join(format!("attend-bert-roundtrip-{}", std::process::id()));
        save_bert(BertFamily::Bert, heads, &cfg, &tensors, &dir).unwrap();
        let back = load_bert(&HfDir::open(&dir).unwrap(), DType::F32, &Device::Cpu, false).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back.model.heads(), heads);
        let exact = Tol { atol: 0.0, rtol: 0.0 };
        let label = format!("{heads:?}");
        match (&m, &back.model) {
            (AnyBert::Encoder(a), AnyBert::Encoder(b)) => {
                assert_close(&label, &b.forward(&input).unwrap().hidden, &a.forward(&input).unwrap().hidden, exact)
            }
            (AnyBert::Pretraining(a), AnyBert::Pretraining(b)) => {
                let (oa, ob) = (a.forward(&input).unwrap(), b.forward(&input).unwrap());
                assert_close(&label, &ob.mlm_logits.unwrap(), &oa.mlm_logits.unwrap(), exact);
                if let (Some(x), Some(y)) = (oa.nsp_logits, ob.nsp_logits) {
                    assert_close(&label, &y, &x, exact);
                }
            }
            (AnyBert::Task(a), AnyBert::Task(b)) => {
                let flat = |l: TaskLogits| match l {
                    TaskLogits::Sequence(x) | TaskLogits::Token(x) => x.flatten_all().unwrap(),
                    TaskLogits::Span { start, end } => Tensor::cat(&[start, end], 1).unwrap().flatten_all().unwrap(),
                };
                let (la, lb) = (flat(a.forward(&input).unwrap().0), flat(b.forward(&input).unwrap().0));
                assert_close(&label, &lb, &la, exact);
            }
            _ => panic!("{label}: loaded another variant"),
        }
    }
}

fn load_err(dir: &PathBuf) -> String {
    let r = HfDir::open(dir).and_then(|d| load_bert(&d, DType::F32, &Device::Cpu, false));
    let e = r.map(|_| ()).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(dir);
    e.lines().next().unwrap().to_string()
}

#[test]
fn bad_checkpoints_and_inputs_give_one_line_errors_naming_what_is_wrong() {
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "relative positions",
            common::edited_hf_dir("bert", "pet", |c, _| c["position_embedding_type"] = "relative_key".into()),
            "position_embedding_type",
        ),
        (
            "unknown head",
            common::edited_hf_dir("bert", "arch", |c, _| c["architectures"] = serde_json::json!(["BertLMHeadModel"])),
            "architectures",
        ),
        ("activation", common::edited_hf_dir("bert", "act", |c, _| c["hidden_act"] = "mish".into()), "hidden_act"),
        (
            "missing tensor",
            common::edited_hf_dir("bert", "missing", |_, t| {
                t.remove("encoder.layer.1.attention.self.key.bias");
            }),
            "encoder.layer.1.attention.self.key.bias",
        ),
        (
            "untied decoder",
            common::edited_hf_dir("bert-mlm", "untied", |_, t| {
                let w = t["bert.embeddings.word_embeddings.weight"].clone();
                t.insert("cls.predictions.decoder.weight".into(), (w + 1.0).unwrap());
            }),
            "cls.predictions.decoder.weight",
        ),
    ];
    for (label, dir, needle) in cases {
        let e = load_err(&dir);
        assert!(e.contains(needle), "{label}: {e}");
    }
    let AnyBert::Encoder(bert) = load_dir("bert") else { unreachable!() };
    let ids = Tensor::new(&[[2u32, 5, 3]], &Device::Cpu).unwrap();
    let tt = Tensor::new(&[[0u32, 2, 0]], &Device::Cpu).unwrap();
    let e = bert.forward(&BertInput { token_type_ids: Some(&tt), ..BertInput::new(&ids) }).unwrap_err().to_string();
    assert!(e.contains("token_type_ids") && e.contains("0..2"), "{e}");
    let long = Tensor::new(vec![vec![5u32; 65]], &Device::Cpu).unwrap();
    let e = bert.forward(&BertInput::new(&long)).unwrap_err().to_string();
    assert!(e.contains("64"), "{e}");
}

#[test]
fn pooling_matches_sentence_transformers_forward_and_gradient() {
    for case in common::fixture_cases("pooling") {
        let f = load("pooling", &case);
        let modes: Vec<PoolingMode> = f
            .meta_json("modes")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|m| PoolingMode::from_st_name(m.as_str().unwrap()).unwrap())
            .collect();
        let hidden = candle_core::Var::from_tensor(&f.t("hidden")).unwrap();
        let mask = f.t("mask").to_dtype(DType::U32).unwrap();
        let out = pool(hidden.as_tensor(), &mask, &modes).unwrap();
        assert_close(&format!("{case} out"), &out, &f.t("out"), common::F32);
        let g = common::weighted_sum(&out, &f.t("dout")).backward().unwrap();
        assert_close(&format!("{case} dhidden"), g.get(hidden.as_tensor()).unwrap(), &f.t("dhidden"), common::F32);
    }
    // A row with no real token pools to zeros in every mode, and normalising keeps it zero.
    let h = common::randn(&[1, 3, 4], 1, DType::F32);
    let none = Tensor::zeros((1, 3), DType::U32, &Device::Cpu).unwrap();
    let all = [
        PoolingMode::Cls,
        PoolingMode::Max,
        PoolingMode::Mean,
        PoolingMode::MeanSqrtLen,
        PoolingMode::WeightedMean,
        PoolingMode::LastToken,
    ];
    let z = l2_normalize(&pool(&h, &none, &all).unwrap()).unwrap();
    assert_close("empty row", &z, &Tensor::zeros((1, 24), DType::F32, &Device::Cpu).unwrap(), common::F32);
}

#[test]
fn sentence_embeddings_match_sentence_transformers() {
    let dir = hf_dir("st-bert");
    let layout = sentence_layout(&dir).unwrap();
    assert_eq!(layout.pooling, vec![PoolingMode::Mean]);
    assert!(layout.normalize);
    // sentence-transformers 6 keeps the length only in tokenizer_config.json.
    assert_eq!(layout.max_seq_length, Some(16));
    let enc = SentenceEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.max_len(), 16);
    let f = load("hf_ref", "st-bert");
    let (ids, mask, tt) = (ids_of(&f.t("input_ids")), f.t("attention_mask"), f.t("token_type_ids"));
    let emb = enc.embed(&ids, &mask.to_dtype(DType::U32).unwrap(), Some(&tt)).unwrap();
    assert_close("embeddings", &emb, &f.t("embeddings"), Tol { atol: 1e-5, rtol: 0.0 });
}

/// A copy of fixtures/hf/st-bert in the layout of sentence-transformers ≤ 5 (what most Hub models have): old module
/// type names, boolean pooling keys, `max_seq_length` in sentence_bert_config.json, and a tokenizer_config.json whose
/// own `model_max_length` would be wrong if it were read.
fn st_bert_old_layout(tag: &str) -> std::path::PathBuf {
    let src = hf_dir("st-bert");
    let dir = std::env::temp_dir().join(format!("attend-st-old-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    std::fs::create_dir_all(dir.join("2_Normalize")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
    tc["model_max_length"] = 512.into();
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let modules = serde_json::json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]);
    std::fs::write(dir.join("modules.json"), modules.to_string()).unwrap();
    std::fs::write(dir.join("sentence_bert_config.json"), r#"{"max_seq_length": 16, "do_lower_case": false}"#).unwrap();
    let pooling = serde_json::json!({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true,
        "pooling_mode_max_tokens": false, "pooling_mode_mean_sqrt_len_tokens": false,
        "pooling_mode_weightedmean_tokens": false, "pooling_mode_lasttoken": false, "include_prompt": true
    });
    std::fs::write(dir.join("1_Pooling/config.json"), pooling.to_string()).unwrap();
    dir
}

#[test]
fn the_older_sentence_transformers_layout_reads_the_same() {
    let dir = st_bert_old_layout("same");
    let layout = sentence_layout(&dir).unwrap();
    assert_eq!(
        (layout.pooling.clone(), layout.normalize, layout.max_seq_length),
        (vec![PoolingMode::Mean], true, Some(16))
    );
    let enc = SentenceEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let f = load("hf_ref", "st-bert");
    let (ids, mask, tt) = (ids_of(&f.t("input_ids")), f.t("attention_mask"), f.t("token_type_ids"));
    let emb = enc.embed(&ids, &mask.to_dtype(DType::U32).unwrap(), Some(&tt)).unwrap();
    assert_close("embeddings (old layout)", &emb, &f.t("embeddings"), Tol { atol: 1e-5, rtol: 0.0 });
    // Several boolean modes concatenate in sentence-transformers' fixed order: cls, max, mean.
    let p = dir.join("1_Pooling/config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["pooling_mode_max_tokens"] = true.into();
    v["pooling_mode_cls_token"] = true.into();
    std::fs::write(&p, v.to_string()).unwrap();
    assert_eq!(sentence_layout(&dir).unwrap().pooling, vec![PoolingMode::Cls, PoolingMode::Max, PoolingMode::Mean]);
    // A module attend does not implement is refused by name; so is a Dense after the Normalize (its output would
    // not be normalised, and sentence-transformers' order is the modules.json order).
    let m = dir.join("modules.json");
    let original = std::fs::read_to_string(&m).unwrap();
    for ty in ["sentence_transformers.models.LSTM", "sentence_transformers.models.Dense"] {
        let mut mods: serde_json::Value = serde_json::from_str(&original).unwrap();
        mods.as_array_mut().unwrap().push(serde_json::json!({"idx": 3, "name": "3", "path": "3_X", "type": ty}));
        std::fs::write(&m, mods.to_string()).unwrap();
        let e = sentence_layout(&dir).unwrap_err().to_string();
        assert!(e.contains(ty) && e.contains("modules.json") && !e.contains('\n'), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dense_projections_match_sentence_transformers() {
    let dir = hf_dir("st-dense");
    let layout = sentence_layout(&dir).unwrap();
    let got: Vec<_> = layout.dense.iter().map(|d| (d.in_features, d.out_features, d.bias, d.activation)).collect();
    assert_eq!(got, vec![(32, 24, true, DenseActivation::Tanh), (24, 16, false, DenseActivation::Identity)]);
    let enc = SentenceEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.dim(), 16);
    let f = load("hf_ref", "st-dense");
    let (ids, mask, tt) = (ids_of(&f.t("input_ids")), f.t("attention_mask"), f.t("token_type_ids"));
    let emb = enc.embed(&ids, &mask.to_dtype(DType::U32).unwrap(), Some(&tt)).unwrap();
    assert_close("embeddings (Dense)", &emb, &f.t("embeddings"), Tol { atol: 1e-5, rtol: 0.0 });
}

#[test]
fn dense_modules_attend_cannot_apply_are_one_line_errors_naming_the_file() {
    let src = hf_dir("st-dense");
    let dir = std::env::temp_dir().join(format!("attend-st-dense-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("2_Dense")).unwrap();
    let cfg = dir.join("2_Dense/config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("2_Dense/config.json")).unwrap()).unwrap();
    let load_err = |d: &std::path::Path| match SentenceEncoder::load(d, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    let copy_all = || {
        for entry in std::fs::read_dir(&src).unwrap() {
            let p = entry.unwrap().path();
            let to = dir.join(p.file_name().unwrap());
            if p.is_dir() {
                std::fs::create_dir_all(&to).unwrap();
                for f in std::fs::read_dir(&p).unwrap() {
                    let f = f.unwrap().path();
                    std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
                }
            } else {
                std::fs::copy(&p, &to).unwrap();
            }
        }
    };
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("activation_function", "torch.nn.modules.activation.GELU".into(), "activation_function"),
        ("use_residual", true.into(), "use_residual"),
        ("module_input_name", "token_embeddings".into(), "module_input_name"),
        ("in_features", 31.into(), "in_features 31"),
    ];
    for (key, value, says) in cases {
        copy_all();
        let mut v = original.clone();
        v[key] = value;
        std::fs::write(&cfg, v.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(e.contains(says) && e.contains("2_Dense") && !e.contains('\n'), "{key}: {e}");
    }
    // Weights that do not match the config, or are missing.
    copy_all();
    let mut v = original.clone();
    v["out_features"] = 25.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("linear.weight") && e.contains("[25, 32]") && !e.contains('\n'), "{e}");
    copy_all();
    std::fs::remove_file(dir.join("2_Dense/model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("2_Dense") && e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bert_pretraining_logits_loss_and_every_gradient_match_transformers() {
    let dir = HfDir::open(hf_dir("bert-pretrain")).unwrap();
    let loaded = load_bert(&dir, DType::F32, &Device::Cpu, true).unwrap();
    assert_eq!(loaded.model.heads(), BertHeads::Pretraining { mlm: true, nsp: true });
    let AnyBert::Pretraining(p) = &loaded.model else { unreachable!() };
    let f = load("hf_ref", "bert-pretrain");
    let (ids, tt, mask) = (ids_of(&f.t("input_ids")), f.t("token_type_ids"), f.t("attention_mask"));
    let input = BertInput { attention_mask: Some(&mask), token_type_ids: Some(&tt), ..BertInput::new(&ids) };
    let out = p.forward(&input).unwrap();
    let m = &mask;
    assert_close(
        "prediction_logits",
        &real_rows(&out.mlm_logits.unwrap(), m),
        &real_rows(&f.t("prediction_logits"), m),
        PARITY,
    );
    assert_close("seq_relationship_logits", &out.nsp_logits.unwrap(), &f.t("seq_relationship_logits"), PARITY);
    let loss = p.loss(&input, Some(&f.t("labels")), Some(&f.t("next_sentence_label"))).unwrap();
    assert_close("loss", &loss, &f.t("loss"), Tol { atol: 1e-5, rtol: 1e-5 });
    let grads = loss.backward().unwrap();
    let table: HashMap<String, String> =
        attend::checkpoint::hf::bert_names(BertFamily::Bert, &loaded.config, loaded.model.heads())
            .unwrap()
            .into_iter()
            .map(|e| (e.hf, e.attend))
            .collect();
    let mut checked = 0;
    for (name, want) in &f.tensors {
        let Some(hf) = name.strip_prefix("grad.") else { continue };
        let ours = &table[hf.strip_prefix("bert.").unwrap_or(hf)];
        let g = grads.get(loaded.vars[ours].as_tensor()).unwrap_or_else(|| panic!("no gradient for {ours}"));
        assert_close(&format!("grad {hf}"), g, want, Tol { atol: 1e-5, rtol: 1e-4 });
        checked += 1;
    }
    assert_eq!(checked, loaded.vars.len(), "the fixture holds a gradient for every parameter");
}

#[test]
fn fine_tuning_heads_match_transformers_logits_and_loss() {
    for name in ["bert-cls", "bert-tok", "bert-qa"] {
        let AnyBert::Task(m) = load_dir(name) else { panic!("{name} loads as a task head") };
        let f = load("hf_ref", name);
        let (ids, tt, mask) = (ids_of(&f.t("input_ids")), f.t("token_type_ids"), f.t("attention_mask"));
        let input = BertInput { attention_mask: Some(&mask), token_type_ids: Some(&tt), ..BertInput::new(&ids) };
        let labels = match name {
            "bert-qa" => Tensor::stack(&[f.t("start_positions"), f.t("end_positions")], 0).unwrap(),
            _ => f.t("labels"),
        };
        match m.forward(&input).unwrap().0 {
            TaskLogits::Sequence(l) => assert_close(name, &l, &f.t("logits"), PARITY),
            TaskLogits::Token(l) => {
                assert_close(name, &real_rows(&l, &mask), &real_rows(&f.t("logits"), &mask), PARITY)
            }
            TaskLogits::Span { start, end } => {
                // Padded positions' logits are undefined; compare the real ones of each row.
                let m3 = |x: &Tensor| real_rows(&x.unsqueeze(2).unwrap(), &mask);
                assert_close("start_logits", &m3(&start), &m3(&f.t("start_logits")), PARITY);
                assert_close("end_logits", &m3(&end), &m3(&f.t("end_logits")), PARITY);
            }
        }
        assert_close(
            &format!("{name} loss"),
            &m.loss(&input, &labels).unwrap(),
            &f.t("loss"),
            Tol { atol: 1e-5, rtol: 1e-5 },
        );
    }
}

#[test]
fn roberta_and_distilbert_encoders_match_transformers() {
    for (name, has_pooler) in [("roberta", true), ("distilbert", false)] {
        let AnyBert::Encoder(enc) = load_dir(name) else { panic!("{name} loads as an encoder") };
        let f = load("hf_ref", name);
        let (ids, mask) = (ids_of(&f.t("input_ids")), f.t("attention_mask"));
        let out = enc.forward(&BertInput { attention_mask: Some(&mask), ..BertInput::new(&ids) }).unwrap();
        assert_close(name, &real_rows(&out.hidden, &mask), &real_rows(&f.t("last_hidden_state"), &mask), PARITY);
        assert_eq!(out.pooled.is_some(), has_pooler, "{name} pooler");
        if let Some(p) = out.pooled {
            assert_close(&format!("{name} pooler"), &p, &f.t("pooler_output"), PARITY);
        }
    }
}
