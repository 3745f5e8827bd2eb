//! Seq2seq encoder–decoders and decoding: teacher-forced forward equals step-by-step decoding, source padding never
//! leaks, beam search finds the exhaustive best, every parameter trains, and training learns a toy task.
//! The PyTorch oracle of the whole model (`scripts/oracle/seq2seq.py`) is read in `seq2seq_fixtures_match_torch`.

mod common;

use attend::decode::{beam_search, BeamConfig, StepDecoder};
use attend::layers::global::GlobalType;
use attend::models::seq2seq::{Decoder, RnnKind, Seq2Seq, Seq2SeqAttention, Seq2SeqConfig};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::*;

const KINDS: [Seq2SeqAttention; 7] = [
    Seq2SeqAttention::None,
    Seq2SeqAttention::Bahdanau,
    Seq2SeqAttention::Luong(GlobalType::Dot),
    Seq2SeqAttention::Luong(GlobalType::General),
    Seq2SeqAttention::Luong(GlobalType::Concat),
    Seq2SeqAttention::LocalM,
    Seq2SeqAttention::LocalP,
];

fn model(attention: Seq2SeqAttention, rnn: RnnKind, coverage: bool, dtype: DType) -> (VarMap, Seq2Seq) {
    let vm = VarMap::new();
    let cfg = Seq2SeqConfig { rnn, coverage, num_layers: 2, ..Seq2SeqConfig::new(9, 8, 6, attention) };
    let m = Seq2Seq::new(cfg, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    (vm, m)
}

fn ids(v: &[&[u32]]) -> Tensor {
    Tensor::new(v.iter().map(|r| r.to_vec()).collect::<Vec<_>>(), &Device::Cpu).unwrap()
}

fn coverage_ok(a: Seq2SeqAttention) -> bool {
    matches!(a, Seq2SeqAttention::Bahdanau | Seq2SeqAttention::Luong(GlobalType::Concat))
}

#[test]
fn teacher_forcing_equals_step_by_step_decoding() {
    let src = ids(&[&[3, 4, 5, 6, 2], &[7, 8, 2, 0, 0]]);
    let tgt = ids(&[&[1, 3, 4, 5], &[1, 6, 7, 2]]);
    for a in KINDS {
        let (_vm, m) = model(a, RnnKind::Lstm, coverage_ok(a), DType::F64);
        let full = m.forward(&src, Some(&[5, 3]), &tgt, 1.0).unwrap();
        let mut state = m.encode(&src, Some(&[5, 3])).unwrap();
        for t in 0..4 {
            let (out, next) = m.decode_step(&tgt.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &state).unwrap();
            assert_close(
                &format!("{a:?} step {t}"),
                &out.logits,
                &full.logits.narrow(1, t, 1).unwrap().squeeze(1).unwrap(),
                F64,
            );
            state = next;
        }
    }
}

#[test]
fn source_padding_never_leaks() {
    let tgt = ids(&[&[1, 3, 4], &[1, 6, 7]]);
    for a in KINDS {
        for rnn in [RnnKind::Lstm, RnnKind::Gru] {
            let (_vm, m) = model(a, rnn, false, DType::F64);
            let clean = m.forward(&ids(&[&[3, 4, 5, 6], &[7, 8, 0, 0]]), Some(&[4, 2]), &tgt, 1.0).unwrap();
            let noisy = m.forward(&ids(&[&[3, 4, 5, 6], &[7, 8, 5, 6]]), Some(&[4, 2]), &tgt, 1.0).unwrap();
            assert_close(&format!("{a:?} {rnn:?} logits"), &noisy.logits, &clean.logits, F64);
        }
    }
}

#[test]
fn every_parameter_trains_with_every_attention() {
    let src = ids(&[&[3, 4, 5, 6, 2], &[7, 8, 2, 0, 0]]);
    let tgt = ids(&[&[1, 3, 4, 5], &[1, 6, 7, 2]]);
    for a in KINDS {
        for coverage in [false, true] {
            if coverage && !coverage_ok(a) {
                continue;
            }
            let (vm, m) = model(a, RnnKind::Gru, coverage, DType::F32);
            reseed(&vm, 12, 0.5);
            let out = m.forward(&src, Some(&[5, 3]), &tgt, 1.0).unwrap();
            let mut l = weighted_sum(&out.logits, &randn(out.logits.dims(), 3, DType::F32));
            if let Some(c) = &out.coverage_loss {
                l = (l + c.sum_all().unwrap()).unwrap();
            }
            assert_all_grads_finite_nonzero(
                &format!("{a:?} coverage={coverage}"),
                &varmap_vars(&vm),
                &l.backward().unwrap(),
            );
        }
    }
}

#[test]
fn beam_search_finds_the_exhaustive_best_and_greedy_is_beam_one() {
    let src = ids(&[&[3, 4, 5]]);
    let (eos, max_len) = (2u32, 3usize);
    for a in [Seq2SeqAttention::Bahdanau, Seq2SeqAttention::Luong(GlobalType::General)] {
        let vm = VarMap::new();
        let m = Seq2Seq::new(Seq2SeqConfig::new(9, 4, 6, a), VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu))
            .unwrap();
        let dec = Decoder(&m);
        // Every output of up to max_len tokens, scored by the model.
        let mut best = (f64::NEG_INFINITY, vec![]);
        let mut frontier = vec![(vec![], 0.0f64, m.encode(&src, None).unwrap())];
        for _ in 0..max_len {
            let mut next = vec![];
            for (toks, lp, st) in frontier {
                let last = *toks.last().unwrap_or(&1u32);
                let (logp, ns) = dec.step(&[last], &st).unwrap();
                let logp: Vec<f64> = logp.get(0).unwrap().to_vec1().unwrap();
                for (v, l) in logp.iter().enumerate() {
                    let mut t = toks.clone();
                    t.push(v as u32);
                    let total = lp + l;
                    if v as u32 == eos || t.len() == max_len {
                        if total > best.0 {
                            best = (total, t);
                        }
                    } else {
                        next.push((t, total, ns.clone()));
                    }
                }
            }
            frontier = next;
        }
        let cfg = BeamConfig { beam: 64, max_len, length_penalty: 0.0, bos: 1, eos };
        let hyps = beam_search(&dec, m.encode(&src, None).unwrap(), &cfg).unwrap();
        assert_eq!(hyps[0].tokens, best.1, "{a:?}");
        assert!((hyps[0].logprob - best.0).abs() < 1e-9);
        assert!(hyps.windows(2).all(|w| w[0].score >= w[1].score), "ranked best first");
        let greedy = m.greedy(&src, None, 1, eos, max_len).unwrap();
        let one = m.beam_search(&src, &BeamConfig { beam: 1, ..cfg }).unwrap();
        assert_eq!(greedy[0], one[0].tokens, "{a:?}: beam 1 is greedy");
    }
}

#[test]
fn attention_learns_to_reverse_where_the_bottleneck_struggles() {
    // Reverse sequences of 6 tokens: a short training run, the same for both models. The model with attention gets
    // further (lower loss) than the one that must squeeze the source into one vector.
    let dev = Device::Cpu;
    let mut data = vec![];
    for i in 0..32u32 {
        let s: Vec<u32> = (0..6).map(|j| 3 + (i * 7 + j * 5 + i * j) % 9).collect();
        let mut t = vec![1u32];
        t.extend(s.iter().rev());
        t.push(2);
        data.push((s, t));
    }
    let src = Tensor::new(data.iter().map(|d| d.0.clone()).collect::<Vec<_>>(), &dev).unwrap();
    let tgt = Tensor::new(data.iter().map(|d| d.1.clone()).collect::<Vec<_>>(), &dev).unwrap();
    let (tgt_in, tgt_out) = (tgt.narrow(1, 0, 7).unwrap(), tgt.narrow(1, 1, 7).unwrap());
    let train = |a: Seq2SeqAttention| -> (f32, f32) {
        let vm = VarMap::new();
        let cfg = Seq2SeqConfig { embed_dim: 12, ..Seq2SeqConfig::new(12, 12, 24, a) };
        let m = Seq2Seq::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        reseed(&vm, 13, 0.3);
        let mut opt =
            candle_nn::AdamW::new(vm.all_vars(), candle_nn::ParamsAdamW { lr: 0.02, ..Default::default() }).unwrap();
        let mut first = 0.0;
        let mut last = 0.0;
        for step in 0..60 {
            let logits = m.forward(&src, None, &tgt_in, 1.0).unwrap().logits;
            let loss = attend::ops::cross_entropy(
                &logits.reshape((32 * 7, 12)).unwrap(),
                &tgt_out.reshape(32 * 7).unwrap().to_dtype(DType::I64).unwrap(),
                &attend::ops::CrossEntropyConfig { ignore_index: -100, label_smoothing: 0.0 },
                attend::ops::Reduction::Mean,
            )
            .unwrap();
            let l = loss.to_scalar::<f32>().unwrap();
            if step == 0 {
                first = l;
            }
            last = l;
            opt.backward_step(&loss).unwrap();
        }
        (first, last)
    };
    let (f_none, l_none) = train(Seq2SeqAttention::None);
    let (f_att, l_att) = train(Seq2SeqAttention::Luong(GlobalType::General));
    assert!(l_none < f_none && l_att < f_att, "both learn: none {f_none} → {l_none}, attention {f_att} → {l_att}");
    assert!(l_att < l_none, "attention ends lower: {l_att} vs {l_none}");
}

#[test]
fn seq2seq_fixtures_match_torch() {
    // scripts/oracle/seq2seq.py: nn.LSTM / nn.GRU encoder (packed) and decoder stepped with hx, the OpenNMT-py
    // attention forms, in float64; every output and every parameter's gradient.
    for case in fixture_cases("seq2seq") {
        let f = load("seq2seq", &case);
        let cfg: Seq2SeqConfig = serde_json::from_str(f.meta_str("config").unwrap()).unwrap();
        let mut params = std::collections::HashMap::new();
        let mut vars = vec![];
        for (name, t) in &f.tensors {
            if let Some(p) = name.strip_prefix("p.") {
                let v = Var::from_tensor(t).unwrap();
                params.insert(p.to_string(), v.as_tensor().clone());
                vars.push((p.to_string(), v));
            }
        }
        let strict = attend::checkpoint::StrictTensors::new(params, format!("{case} parameters"));
        let m = Seq2Seq::new(cfg, strict.var_builder(DType::F32, &Device::Cpu)).unwrap();
        assert!(strict.unused().is_empty(), "{case}: unused parameters {:?}", strict.unused());
        let lengths: Vec<usize> = f.t("src_lengths").to_vec1::<i64>().unwrap().iter().map(|&l| l as usize).collect();
        let out = m.forward(&f.t("src"), Some(&lengths), &f.t("tgt_in"), 1.0).unwrap();
        assert_close(&format!("{case} logits"), &out.logits, &f.t("logits"), F32);
        let mut l = weighted_sum(&out.logits, &f.t("dlogits"));
        match (&out.align, f.opt("align")) {
            (Some(a), Some(want)) => {
                assert_close(&format!("{case} align"), a, &want, F32);
                l = (l + weighted_sum(a, &f.t("dalign"))).unwrap();
            }
            (None, None) => {}
            _ => panic!("{case}: alignments present on one side only"),
        }
        match (&out.coverage_loss, f.opt("coverage_loss")) {
            (Some(c), Some(want)) => {
                assert_close(&format!("{case} coverage_loss"), c, &want, F32);
                l = (l + weighted_sum(c, &f.t("dcoverage_loss"))).unwrap();
            }
            (None, None) => {}
            _ => panic!("{case}: coverage loss present on one side only"),
        }
        let g = l.backward().unwrap();
        for (name, v) in &vars {
            let got = g.get(v.as_tensor()).unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
            assert_close(&format!("{case} d{name}"), got, &f.t(&format!("dp.{name}")), F32_GRAD);
        }
    }
}
