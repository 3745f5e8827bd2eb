//! ViT: parity with Hugging Face `transformers` on a tiny `ViTForImageClassification` (fixtures/hf/vit, written by
//! scripts/oracle/hf.py) — logits and the last hidden state — the patch embedding against the convolution it
//! replaces, every parameter training, a saved model loading back identically, and the loader's errors.

mod common;

use std::collections::HashMap;

use attend::checkpoint::hf::{load_vit, save_vit, HfDir};
use attend::layers::patch_embedding::PatchEmbedding;
use attend::models::vit::{Vit, VitConfig};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_all_grads_finite_nonzero, assert_close, hf_dir, load, reseed, varmap_vars, Tol};

const PARITY: Tol = Tol { atol: 1e-4, rtol: 0.0 };

#[test]
fn vit_logits_and_hidden_states_match_transformers() {
    let l = load_vit(&HfDir::open(hf_dir("vit")).unwrap(), DType::F32, &Device::Cpu, false).unwrap();
    assert_eq!(l.config.n_labels, Some(5));
    let f = load("hf_ref", "vit");
    let out = l.model.forward(&f.t("pixel_values"), true).unwrap();
    assert_close("logits", &out.logits.unwrap(), &f.t("logits"), PARITY);
    assert_close("last_hidden_state", &out.hidden, &f.t("last_hidden_state"), PARITY);
    assert_eq!(out.weights.len(), 2);
    assert_eq!(out.weights[0].dims(), &[2, 4, 17, 17]);
}

#[test]
fn patch_embedding_is_the_strided_convolution() {
    let vm = VarMap::new();
    let pe = PatchEmbedding::new(3, 4, 8, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed(&vm, 3, 0.5);
    let x = common::randn(&[2, 3, 8, 12], 4, DType::F32);
    let got = pe.forward(&x).unwrap(); // (B, N, C)
    let vars = varmap_vars(&vm);
    let (b, w) = (vars[0].1.as_tensor(), vars[1].1.as_tensor());
    // candle's conv2d is the composed twin: (B, C, H/P, W/P) → (B, N, C).
    let conv = x.conv2d(w, 0, 4, 1, 1).unwrap().broadcast_add(&b.reshape((1, 8, 1, 1)).unwrap()).unwrap();
    let want = conv.flatten_from(2).unwrap().transpose(1, 2).unwrap();
    assert_close("patches", &got, &want, common::F32);
    let e = pe.forward(&common::randn(&[1, 3, 8, 10], 5, DType::F32)).unwrap_err().to_string();
    assert!(e.contains("4×4 patches"), "{e}");
}

fn small() -> VitConfig {
    VitConfig { n_layers: 2, n_labels: Some(3), ..VitConfig::base(8, 4, 16, 4) }
}

#[test]
fn every_parameter_receives_a_gradient() {
    let vm = VarMap::new();
    let vit = Vit::new(&small(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    reseed(&vm, 8, 0.3);
    let x = common::randn(&[3, 3, 8, 8], 9, DType::F32);
    let labels = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    let loss = vit.loss(&x, &labels).unwrap();
    assert_all_grads_finite_nonzero("vit", &varmap_vars(&vm), &loss.backward().unwrap());
    assert_eq!(vit.predict(&x).unwrap().dims(), &[3]);
}

#[test]
fn saves_in_the_hf_layout_and_loads_back_identically() {
    for cfg in [small(), VitConfig { n_labels: None, pooler: true, ..small() }] {
        let vm = VarMap::new();
        let vit = Vit::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        reseed(&vm, 10, 0.3);
        let tensors: HashMap<String, Tensor> =
            varmap_vars(&vm).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let dir = std::env::temp_dir().join(format!("attend-vit-roundtrip-{}", std::process::id()));
        save_vit(&cfg, &tensors, &dir).unwrap();
        let back = load_vit(&HfDir::open(&dir).unwrap(), DType::F32, &Device::Cpu, false).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back.config, cfg);
        let x = common::randn(&[2, 3, 8, 8], 11, DType::F32);
        let (a, b) = (vit.forward(&x, false).unwrap(), back.model.forward(&x, false).unwrap());
        let exact = Tol { atol: 0.0, rtol: 0.0 };
        assert_close("hidden", &b.hidden, &a.hidden, exact);
        if let (Some(p), Some(q)) = (a.pooled, b.pooled) {
            assert_close("pooled", &q, &p, exact);
        }
    }
}

#[test]
fn bad_checkpoints_and_images_give_one_line_errors() {
    let err = |dir: std::path::PathBuf| {
        let r = HfDir::open(&dir).and_then(|d| load_vit(&d, DType::F32, &Device::Cpu, false));
        let _ = std::fs::remove_dir_all(&dir);
        r.map(|_| ()).unwrap_err().to_string().lines().next().unwrap().to_string()
    };
    let e = err(common::edited_hf_dir("vit", "patch", |c, _| c["patch_size"] = 3.into()));
    assert!(e.contains("patch_size"), "{e}");
    let e = err(common::edited_hf_dir("vit", "pool", |c, _| c["pooler_act"] = "relu".into()));
    assert!(e.contains("pooler_act"), "{e}");
    let e = err(common::edited_hf_dir("vit", "cls", |_, t| {
        t.remove("vit.embeddings.cls_token");
    }));
    assert!(e.contains("embeddings.cls_token"), "{e}");
    let l = load_vit(&HfDir::open(hf_dir("vit")).unwrap(), DType::F32, &Device::Cpu, false).unwrap();
    let e = l.model.forward(&Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap(), false).unwrap_err();
    assert!(e.to_string().contains("16×16"), "{e}");
}
