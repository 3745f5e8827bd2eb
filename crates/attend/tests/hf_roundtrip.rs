//! Our checkpoints in Hugging Face's layout load in `transformers` and compute there what they compute here:
//! fixtures/hf_saved/<name> was written by attend (`examples/save_hf.rs`), loaded strictly by `transformers` in
//! scripts/oracle/hf_roundtrip.py, whose outputs are fixtures/hf_roundtrip/<name>.safetensors. Each directory must
//! also survive attend's own load → save unchanged, tensor for tensor.

mod common;

use std::collections::HashMap;

use attend::checkpoint::hf::{self, save_bert, save_gpt2, save_t5, save_vit, BertFamily, HfDir, HfModel};
use attend::models::bert::{AnyBert, BertInput, PretrainingOutput, TaskLogits};
use attend::models::gpt::GptInput;
use candle_core::{DType, Device, Tensor};
use common::{assert_close, load, real_rows, Tol};

const PARITY: Tol = Tol { atol: 1e-4, rtol: 0.0 };

fn saved(name: &str) -> std::path::PathBuf {
    common::hf_dir("x").parent().unwrap().parent().unwrap().join("hf_saved").join(name)
}

fn model(name: &str, trainable: bool) -> HfModel {
    hf::load(&HfDir::open(saved(name)).unwrap(), DType::F32, &Device::Cpu, trainable).unwrap()
}

/// The logits attend computes for the reference's inputs.
fn logits(name: &str, m: &HfModel, f: &common::Fixture) -> Tensor {
    let ids = || f.t("input_ids").to_dtype(DType::U32).unwrap();
    let mask = || f.t("attention_mask").to_dtype(DType::U32).unwrap();
    match m {
        HfModel::Gpt2(g) => {
            let (ids, mask) = (ids(), mask());
            g.model.forward(&GptInput { attention_mask: Some(&mask), ..GptInput::new(&ids) }, None).unwrap()
        }
        HfModel::Bert(b) => {
            let (ids, mask) = (ids(), mask());
            let input = BertInput { attention_mask: Some(&mask), ..BertInput::new(&ids) };
            match &b.model {
                AnyBert::Pretraining(p) => match p.forward(&input).unwrap() {
                    PretrainingOutput { mlm_logits: Some(l), .. } => l,
                    _ => panic!("{name}: no masked-LM logits"),
                },
                AnyBert::Task(t) => match t.forward(&input).unwrap().0 {
                    TaskLogits::Sequence(l) => l,
                    other => panic!("{name}: {other:?}"),
                },
                AnyBert::Encoder(_) => panic!("{name}: an encoder has no logits"),
            }
        }
        HfModel::Vit(v) => v.model.forward(&f.t("pixel_values"), false).unwrap().logits.unwrap(),
        HfModel::T5(t) => {
            let dec = f.t("decoder_input_ids").to_dtype(DType::U32).unwrap();
            t.model.forward(&ids(), Some(&mask()), &dec).unwrap()
        }
    }
}

#[test]
fn transformers_computes_from_our_checkpoints_what_we_compute() {
    for name in ["gpt2", "bert-mlm", "bert-cls", "vit", "t5"] {
        let f = load("hf_roundtrip", name);
        let got = logits(name, &model(name, false), &f);
        let want = f.t("logits");
        match (got.rank(), name) {
            // Token-level logits: compare the real positions (padding is undefined in both libraries).
            (3, "gpt2" | "bert-mlm") => {
                let mask = f.t("attention_mask");
                assert_close(name, &real_rows(&got, &mask), &real_rows(&want, &mask), PARITY)
            }
            _ => assert_close(name, &got, &want, PARITY),
        }
    }
}

#[test]
fn load_then_save_reproduces_every_tensor_and_the_config() {
    for name in ["gpt2", "bert-mlm", "bert-cls", "vit", "t5"] {
        let dir = std::env::temp_dir().join(format!("attend-resave-{name}-{}", std::process::id()));
        let tensors = |vars: &HashMap<String, candle_core::Var>| -> HashMap<String, Tensor> {
            vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
        };
        match model(name, true) {
            HfModel::Gpt2(m) => save_gpt2(&m.config, &tensors(&m.vars), &dir),
            HfModel::Bert(m) => save_bert(BertFamily::Bert, m.model.heads(), &m.config, &tensors(&m.vars), &dir),
            HfModel::Vit(m) => save_vit(&m.config, &tensors(&m.vars), &dir),
            HfModel::T5(m) => save_t5(&m.config, &tensors(&m.vars), &dir),
        }
        .unwrap();
        let read =
            |d: &std::path::Path| candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
        let (a, b) = (read(&saved(name)), read(&dir));
        let mut names: Vec<&String> = a.keys().collect();
        names.sort();
        assert_eq!(
            names,
            {
                let mut n: Vec<&String> = b.keys().collect();
                n.sort();
                n
            },
            "{name}: tensor names"
        );
        for k in names {
            assert_close(&format!("{name} {k}"), &b[k], &a[k], Tol { atol: 0.0, rtol: 0.0 });
        }
        let json = |d: &std::path::Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
        };
        assert_eq!(json(&dir), json(&saved(name)), "{name}: config.json");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
