//! `attend::viz` against Hugging Face `transformers` (fixtures/viz/*, written by scripts/oracle/viz.py from the tiny
//! checkpoints of fixtures/hf/): the weights our models' normal forward returns equal `output_attentions`, and the
//! rollout and head summary equal numpy's from those weights (Abnar & Zuidema's reference formula), and attention
//! flow equals networkx's maximum flow on their layered graph. Then the page:
//! its data block decodes back to the weights, only the chosen heads travel, and bad selections are errors.

mod common;

use attend::checkpoint::hf::{self, HfDir, HfModel};
use attend::models::bert::BertInput;
use attend::models::gpt::GptInput;
use attend::viz::html::{page, PageOptions};
use attend::viz::AttentionMaps;
use candle_core::{DType, Device, Tensor};
use common::{assert_close, hf_dir, load, Fixture, Tol};

const WEIGHTS: Tol = Tol { atol: 1e-5, rtol: 0.0 };

fn maps_of(name: &str) -> (Fixture, AttentionMaps) {
    let f = load("viz", name);
    let ids = f.t("input_ids").to_dtype(DType::U32).unwrap().unsqueeze(0).unwrap();
    let types = f.t("token_type_ids").to_dtype(DType::U32).unwrap().unsqueeze(0).unwrap();
    let model = hf::load(&HfDir::open(hf_dir(name)).unwrap(), DType::F32, &Device::Cpu, false).unwrap();
    let (weights, causal) = match &model {
        HfModel::Bert(m) => {
            let input = BertInput { token_type_ids: Some(&types), need_weights: true, ..BertInput::new(&ids) };
            (m.model.bert().forward(&input).unwrap().weights, false)
        }
        HfModel::Gpt2(m) => {
            let input = GptInput { need_weights: true, ..GptInput::new(&ids) };
            (m.model.hidden_states(&input, None).unwrap().weights, true)
        }
        _ => unreachable!("fixtures/hf/{name} is a BERT or GPT-2 checkpoint"),
    };
    let ids: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    let special: Vec<bool> = f.t("special_mask").to_vec1::<i64>().unwrap().iter().map(|&m| m != 0).collect();
    let tokens = ids.iter().map(|i| format!("t{i}")).collect();
    (f, AttentionMaps::new(tokens, special, &weights, causal).unwrap())
}

fn stack_layers(maps: &AttentionMaps) -> Tensor {
    let (l, h, t) = (maps.num_layers(), maps.num_heads(), maps.len());
    let all: Vec<f32> = (0..l).flat_map(|k| maps.layer(k).to_vec()).collect();
    Tensor::from_vec(all, (l, h, t, t), &Device::Cpu).unwrap()
}

#[test]
fn weights_rollout_and_summary_match_transformers() {
    for name in ["bert", "gpt2"] {
        let (f, maps) = maps_of(name);
        assert_close(&format!("{name}: attentions"), &stack_layers(&maps), &f.t("attentions"), WEIGHTS);
        let (l, t) = (maps.num_layers(), maps.len());
        let roll: Vec<f32> = maps.rollout().unwrap().concat();
        let roll = Tensor::from_vec(roll, (l, t, t), &Device::Cpu).unwrap();
        assert_close(&format!("{name}: rollout"), &roll, &f.t("rollout"), WEIGHTS);
        let flow = Tensor::from_vec(maps.flow().unwrap(), (t, t), &Device::Cpu).unwrap();
        assert_close(&format!("{name}: flow (networkx)"), &flow, &f.t("flow"), WEIGHTS);
        let s = maps.summary();
        for (key, got) in [("entropy", &s.entropy), ("distance", &s.distance), ("special", &s.special)] {
            let got = Tensor::new(got.clone(), &Device::Cpu).unwrap();
            assert_close(&format!("{name}: {key}"), &got, &f.t(key), Tol { atol: 1e-4, rtol: 1e-5 });
        }
    }
}

#[test]
fn vit_weights_and_rollout_over_image_patches_match_transformers() {
    // ViTModel's attentions on the pixel values ViTImageProcessor made of fixtures/viz/vit_image.png: [CLS] and
    // 4 × 4 patches. (The CLI's own preprocessing of that file is checked against the same pixel values.)
    let f = load("viz", "vit");
    let HfModel::Vit(m) = hf::load(&HfDir::open(hf_dir("vit")).unwrap(), DType::F32, &Device::Cpu, false).unwrap()
    else {
        panic!("fixtures/hf/vit is a ViT checkpoint")
    };
    let weights = m.model.forward(&f.t("pixel_values"), true).unwrap().weights;
    let t = 17;
    let tokens = (0..t).map(|i| format!("p{i}")).collect();
    let maps = AttentionMaps::new(tokens, (0..t).map(|i| i == 0).collect(), &weights, false).unwrap();
    assert_close("vit: attentions", &stack_layers(&maps), &f.t("attentions"), WEIGHTS);
    let roll = Tensor::from_vec(maps.rollout().unwrap().concat(), (maps.num_layers(), t, t), &Device::Cpu).unwrap();
    assert_close("vit: rollout", &roll, &f.t("rollout"), WEIGHTS);
}

/// The text between the tags of the element with this id.
fn element<'a>(html: &'a str, id: &str) -> &'a str {
    let open = format!(r#"id="{id}">"#);
    let start = html.find(&open).unwrap_or_else(|| panic!("no element {id}")) + open.len();
    &html[start..start + html[start..].find("</script>").expect("end of the element")]
}

fn data_block(html: &str) -> serde_json::Value {
    serde_json::from_str(element(html, "attend-data")).expect("the data block is JSON")
}

fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    for q in s.as_bytes().chunks(4) {
        let n = q
            .iter()
            .take_while(|&&c| c != b'=')
            .fold((0u32, 0), |(n, k), &c| (n | (val(c) as u32) << (18 - 6 * k), k + 1));
        out.extend((0..n.1 - 1).map(|k| (n.0 >> (16 - 8 * k)) as u8));
    }
    out
}

#[test]
fn the_page_carries_the_chosen_heads_quantised_and_every_token() {
    let (_, mut maps) = maps_of("bert");
    maps.tokens[3] = "</script><b>".into(); // a token that would end the data block if written raw
    let heads = vec![3, 1];
    let opts =
        PageOptions { title: "tiny <bert>".into(), heads: Some(heads.clone()), layer: Some(1), ..Default::default() };
    let html = page(&maps, &opts).unwrap();
    assert!(html.contains("<title>tiny &lt;bert&gt;</title>"));
    assert!(!html.contains("http://") && !html.contains("https://"), "the page must not reach the network");
    let d = data_block(&html);
    assert_eq!(d["tokens"].as_array().unwrap().len(), maps.len());
    assert_eq!(d["tokens"][3], "</script><b>");
    assert_eq!(d["heads"], serde_json::json!(heads));
    assert_eq!(d["layer"], 1);
    let w = unbase64(element(&html, "attend-weights"));
    let t = maps.len();
    assert_eq!(w.len(), maps.num_layers() * heads.len() * t * t);
    for l in 0..maps.num_layers() {
        for (k, &h) in heads.iter().enumerate() {
            let got = &w[(l * heads.len() + k) * t * t..][..t * t];
            for (g, &want) in got.iter().zip(maps.head(l, h)) {
                assert!((*g as f32 / 255.0 - want).abs() <= 0.5 / 255.0 + 1e-6, "layer {l} head {h}");
            }
        }
    }
    // Rollout bytes are relative to each row's largest entry: every row's maximum is 255.
    let r = unbase64(element(&html, "attend-rollout"));
    assert_eq!(r.len(), maps.num_layers() * t * t);
    assert!(r.chunks(t).all(|row| row.iter().max() == Some(&255)));
    assert_eq!(d["summary"]["entropy"].as_array().unwrap().len(), maps.num_layers());
    let flow = unbase64(element(&html, "attend-flow"));
    assert_eq!(flow.len(), t * t, "attention flow travels for a short text");
    let want: Vec<u8> = maps
        .flow()
        .unwrap()
        .chunks(t)
        .flat_map(|row| {
            let max = row.iter().cloned().fold(0f32, f32::max);
            row.iter().map(move |&w| (w / max * 255.0).round() as u8).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(flow, want);
}

#[test]
fn selections_that_do_not_exist_are_errors_naming_them() {
    let (_, maps) = maps_of("gpt2");
    let e = page(&maps, &PageOptions { layer: Some(2), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("layer 2 does not exist") && e.contains("0..2"), "{e}");
    let e = page(&maps, &PageOptions { heads: Some(vec![0, 4]), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("head 4 does not exist") && e.contains("0..4"), "{e}");
    let w = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let e = AttentionMaps::new(vec!["a".into(); 3], vec![false; 3], &[w], false).unwrap_err().to_string();
    assert!(e.contains("(2, 3, 4)") && e.contains("3 tokens"), "{e}");
}
