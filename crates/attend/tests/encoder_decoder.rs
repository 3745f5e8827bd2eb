//! The Transformer encoder–decoder: parity with Hugging Face `transformers` on a tiny T5 v1.1 checkpoint
//! (fixtures/hf/t5, written by scripts/oracle/hf.py) — encoder states, teacher-forced logits, greedy generation token
//! for token — and, for the paper's layout and T5's, the invariances: cached decoding equals the teacher-forced
//! forward, source padding never changes a sequence, the future never reaches the past, beam 1 is greedy, every
//! parameter trains, a saved T5 loads back identically.

mod common;

use std::collections::HashMap;

use attend::checkpoint::hf::{load_t5, save_t5, HfDir};
use attend::decode::{beam_search, greedy, BeamConfig};
use attend::generate::{generate_seq2seq, GenerateConfig, Sampling};
use attend::layers::transformer::NormPosition;
use attend::models::encoder_decoder::{EncoderDecoder, EncoderDecoderConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_all_grads_finite_nonzero, assert_close, hf_dir, load, real_rows, reseed, varmap_vars, Tol};

const PARITY: Tol = Tol { atol: 1e-4, rtol: 0.0 };

fn t5() -> EncoderDecoder {
    load_t5(&HfDir::open(hf_dir("t5")).unwrap(), DType::F32, &Device::Cpu, false).unwrap().model
}

fn u32s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

#[test]
fn t5_encoder_states_and_logits_match_transformers() {
    let m = t5();
    let f = load("hf_ref", "t5");
    let (ids, mask, dec) = (u32s(&f.t("input_ids")), u32s(&f.t("attention_mask")), u32s(&f.t("decoder_input_ids")));
    let memory = m.encode(&ids, Some(&mask)).unwrap();
    let want = f.t("encoder_last_hidden_state");
    assert_close("encoder_last_hidden_state", &real_rows(&memory, &mask), &real_rows(&want, &mask), PARITY);
    let logits = m.forward(&ids, Some(&mask), &dec).unwrap();
    assert_close("logits", &logits, &f.t("logits"), PARITY);
}

#[test]
fn t5_greedy_generation_matches_transformers_token_for_token() {
    let m = t5();
    let f = load("hf_ref", "t5");
    let want: Vec<u32> = u32s(&f.t("gen_ids")).get(0).unwrap().to_vec1().unwrap();
    let src = u32s(&f.t("input_ids")).narrow(0, 0, 1).unwrap();
    let memory = m.encode(&src, None).unwrap();
    let cfg = m.config();
    let state = m.start_decoding(&memory, None).unwrap();
    let got =
        greedy(&m.decoder(), state.clone(), 1, cfg.decoder_start_token_id, cfg.eos_token_id, want.len() - 1).unwrap();
    assert_eq!([vec![cfg.decoder_start_token_id], got[0].clone()].concat(), want);
    // Beam search with one beam is greedy.
    let beam = BeamConfig {
        beam: 1,
        max_len: want.len() - 1,
        length_penalty: 0.0,
        bos: cfg.decoder_start_token_id,
        eos: cfg.eos_token_id,
    };
    assert_eq!(beam_search(&m.decoder(), state.clone(), &beam).unwrap()[0].tokens, got[0]);
    // Four beams: hypotheses ranked best first, each scored by its own log-probability.
    let hyps = beam_search(&m.decoder(), state, &BeamConfig { beam: 4, ..beam }).unwrap();
    assert!(hyps.len() > 1 && hyps.windows(2).all(|w| w[0].score >= w[1].score));
    // Each hypothesis's log-probability is what the teacher-forced forward gives its tokens.
    for h in &hyps {
        let tgt: Vec<u32> = [vec![cfg.decoder_start_token_id], h.tokens[..h.tokens.len() - 1].to_vec()].concat();
        let logits = m.forward(&src, None, &ids(vec![tgt])).unwrap().squeeze(0).unwrap(); // (T, V)
        let logp: Vec<Vec<f32>> = attend::ops::log_softmax(&logits).unwrap().to_vec2().unwrap();
        let sum: f64 = h.tokens.iter().enumerate().map(|(t, &tok)| logp[t][tok as usize] as f64).sum();
        assert!((sum - h.logprob).abs() < 1e-4, "{:?}: {sum} vs {}", h.tokens, h.logprob);
    }
}

#[test]
fn batched_generation_with_padded_sources_equals_each_source_alone() {
    let m = t5();
    let f = load("hf_ref", "t5");
    let want: Vec<u32> = u32s(&f.t("gen_ids")).get(0).unwrap().to_vec1().unwrap();
    let src: Vec<u32> = u32s(&f.t("input_ids")).get(0).unwrap().to_vec1().unwrap();
    let short = vec![37, 89, 62, 1];
    let cfg =
        GenerateConfig { max_new_tokens: want.len() - 1, stop_tokens: vec![1], pad_token: 0, ..Default::default() };
    let mut streamed = vec![Vec::new(); 2];
    let both = generate_seq2seq(&m, &[src.clone(), short.clone()], &cfg, |r, t| streamed[r].push(t)).unwrap();
    assert_eq!(both[0].tokens, want[1..].to_vec(), "greedy, as transformers generates");
    let alone = generate_seq2seq(&m, &[short], &cfg, |_, _| {}).unwrap();
    assert_eq!(both[1].tokens, alone[0].tokens, "the padded source decodes as it does alone");
    assert_eq!(streamed[0], both[0].tokens);
    let sampled = GenerateConfig {
        sampling: Sampling::Sample { temperature: 0.8, top_k: Some(5), top_p: None, seed: 3 },
        ..cfg.clone()
    };
    let (a, b) = (
        generate_seq2seq(&m, &[src.clone()], &sampled, |_, _| {}).unwrap(),
        generate_seq2seq(&m, &[src], &sampled, |_, _| {}).unwrap(),
    );
    assert_eq!(a[0].tokens, b[0].tokens, "a seed reproduces a sample");
}

fn configs() -> Vec<(&'static str, EncoderDecoderConfig)> {
    let vaswani = EncoderDecoderConfig {
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        dropout: 0.0,
        max_len: 32,
        ..EncoderDecoderConfig::vaswani(29, 29, 16, 4)
    };
    let pre = EncoderDecoderConfig { norm_position: NormPosition::Pre, ..vaswani.clone() };
    let t5 = EncoderDecoderConfig {
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        dropout: 0.0,
        ffn_dropout: 0.0,
        max_len: 32,
        positions: attend::models::encoder_decoder::Positions::Relative { num_buckets: 8, max_distance: 12 },
        ..EncoderDecoderConfig::t5(29, 16, 4, 24, 4)
    };
    vec![("vaswani", vaswani), ("pre-norm", pre), ("t5", t5)]
}

fn random(cfg: &EncoderDecoderConfig, seed: u64) -> (EncoderDecoder, VarMap) {
    let vm = VarMap::new();
    let m = EncoderDecoder::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed(&vm, seed, 0.3);
    (m, vm)
}

fn ids(rows: Vec<Vec<u32>>) -> Tensor {
    Tensor::new(rows, &Device::Cpu).unwrap()
}

#[test]
fn cached_decoding_equals_the_teacher_forced_forward() {
    for (name, cfg) in configs() {
        let (m, _) = random(&cfg, 1);
        let src = ids(vec![vec![5, 9, 12, 3, 2, 7], vec![4, 4, 8, 1, 0, 0]]);
        let mask = ids(vec![vec![1; 6], vec![1, 1, 1, 1, 0, 0]]);
        let tgt = ids(vec![vec![0, 7, 8, 11, 3], vec![0, 2, 2, 5, 6]]);
        let full = m.forward(&src, Some(&mask), &tgt).unwrap(); // (B, T, V)
        let memory = m.encode(&src, Some(&mask)).unwrap();
        let mut state = m.start_decoding(&memory, Some(&mask)).unwrap();
        let steps: Vec<Tensor> = (0..5)
            .map(|t| m.decode_step(&tgt.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &mut state).unwrap())
            .collect();
        let cached = Tensor::stack(&steps, 1).unwrap();
        assert_close(&format!("{name}: cached vs full"), &cached, &full, Tol { atol: 2e-5, rtol: 1e-5 });
    }
}

#[test]
fn source_padding_never_changes_a_sequence_and_the_future_never_reaches_the_past() {
    for (name, cfg) in configs() {
        let (m, _) = random(&cfg, 2);
        let tgt = ids(vec![vec![0, 7, 8, 11]]);
        let alone = m.forward(&ids(vec![vec![5, 9, 12]]), None, &tgt).unwrap();
        let padded = m.forward(&ids(vec![vec![5, 9, 12, 28, 3]]), Some(&ids(vec![vec![1, 1, 1, 0, 0]])), &tgt).unwrap();
        assert_close(&format!("{name}: padded source"), &padded, &alone, common::F32);
        let changed = m.forward(&ids(vec![vec![5, 9, 12]]), None, &ids(vec![vec![0, 7, 9, 11]])).unwrap();
        assert_close(
            &format!("{name}: before the change"),
            &changed.narrow(1, 0, 2).unwrap(),
            &alone.narrow(1, 0, 2).unwrap(),
            common::F32,
        );
        let diff = (changed.narrow(1, 2, 2).unwrap() - alone.narrow(1, 2, 2).unwrap()).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-4, "{name}: the change must matter");
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    for (name, cfg) in configs() {
        let (m, vm) = random(&cfg, 3);
        let src = ids(vec![vec![5, 9, 12, 3, 2, 7], vec![4, 4, 8, 1, 0, 0]]);
        let mask = ids(vec![vec![1; 6], vec![1, 1, 1, 1, 0, 0]]);
        let labels = Tensor::new(&[[7i64, 8, 11, 3, 1], [2, 2, 5, 1, -100]], &Device::Cpu).unwrap();
        let loss = m.loss(&src, Some(&mask), &labels, 0.1).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        assert_all_grads_finite_nonzero(name, &varmap_vars(&vm), &loss.backward().unwrap());
    }
}

#[test]
fn shift_right_starts_with_the_decoder_start_and_reads_ignored_labels_as_padding() {
    let (m, _) = random(&configs()[2].1, 4);
    let labels = Tensor::new(&[[7i64, 8, -100, -100]], &Device::Cpu).unwrap();
    let shifted: Vec<u32> = m.shift_right(&labels).unwrap().get(0).unwrap().to_vec1().unwrap();
    assert_eq!(shifted, [0, 7, 8, 0]);
}

#[test]
fn t5_saves_in_the_hf_layout_and_loads_back_identically() {
    let cfg = configs()[2].1.clone();
    let (m, vm) = random(&cfg, 5);
    let tensors: HashMap<String, Tensor> =
        varmap_vars(&vm).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let dir = std::env::temp_dir().join(format!("attend-t5-roundtrip-{}", std::process::id()));
    save_t5(&cfg, &tensors, &dir).unwrap();
    // Loaded trainable, as the original's parameters are: an additive bias that needs its gradient takes the
    // materialised attention path, whose sums round differently from the fused kernel's.
    let back = load_t5(&HfDir::open(&dir).unwrap(), DType::F32, &Device::Cpu, true).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(back.config, cfg);
    let (src, tgt) = (ids(vec![vec![5, 9, 12, 1]]), ids(vec![vec![0, 7, 8]]));
    let exact = Tol { atol: 0.0, rtol: 0.0 };
    assert_close(
        "round trip",
        &back.model.forward(&src, None, &tgt).unwrap(),
        &m.forward(&src, None, &tgt).unwrap(),
        exact,
    );
    let e = save_t5(&configs()[0].1, &tensors, &dir).unwrap_err().to_string();
    assert!(e.contains("relative positions"), "{e}");
}

#[test]
fn bad_checkpoints_and_inputs_give_one_line_errors() {
    let err = |dir: std::path::PathBuf| {
        let r = HfDir::open(&dir).and_then(|d| load_t5(&d, DType::F32, &Device::Cpu, false));
        let _ = std::fs::remove_dir_all(&dir);
        r.map(|_| ()).unwrap_err().to_string().lines().next().unwrap().to_string()
    };
    let e = err(common::edited_hf_dir("t5", "proj", |c, _| {
        c["feed_forward_proj"] = "gated-mish".into();
        c.as_object_mut().unwrap().remove("dense_act_fn");
    }));
    assert!(e.contains("feed_forward_proj"), "{e}");
    let e = err(common::edited_hf_dir("t5", "bias", |_, t| {
        t.remove("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
    }));
    assert!(e.contains("relative_attention_bias"), "{e}");
    let m = t5();
    let e = m.forward(&ids(vec![vec![500]]), None, &ids(vec![vec![0]])).unwrap_err().to_string();
    assert!(e.contains("500"), "{e}");
}
