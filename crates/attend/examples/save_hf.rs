//! Writes tiny attend models in Hugging Face's layouts, for `scripts/oracle/hf_roundtrip.py` to load with
//! `transformers` (the round trip of issue 8: our checkpoints must load there and compute what they compute here).
//!
//! `cargo run --release -p attend --example save_hf -- OUT_DIR` writes `OUT_DIR/{gpt2,bert-mlm,bert-cls,vit,t5}`.
//! Parameters are seeded (counter-based), so the files are the same on every machine.

use std::collections::HashMap;
use std::path::Path;

use attend::checkpoint::hf::{save_bert, save_gpt2, save_t5, save_vit, BertFamily};
use attend::models::bert::{AnyBert, BertConfig, BertHeads, BertTask};
use attend::models::encoder_decoder::{EncoderDecoder, EncoderDecoderConfig, Positions};
use attend::models::gpt::{Gpt, GptConfig};
use attend::models::vit::{Vit, VitConfig};
use attend::rng::sample::normal;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// Every parameter of `vm` redrawn from N(0, 0.3²) with a seed per name, and returned by name.
fn seeded(vm: &VarMap, seed: u64) -> attend::Result<HashMap<String, Tensor>> {
    let data = vm.data().lock().expect("var map lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut out = HashMap::new();
    for (i, name) in names.into_iter().enumerate() {
        let v = &data[name];
        let t = (normal(seed * 1000 + i as u64, v.shape().clone(), DType::F32, &Device::Cpu)? * 0.3)?;
        v.set(&t)?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

fn main() -> attend::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "fixtures/hf_saved".into());
    let out = Path::new(&out);
    let dev = Device::Cpu;

    let vm = VarMap::new();
    let cfg = GptConfig { n_layers: 2, ..GptConfig::gpt2(97, 32, 32, 4) };
    Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    save_gpt2(&cfg, &seeded(&vm, 1)?, &out.join("gpt2"))?;

    for (name, heads, seed) in [
        ("bert-mlm", BertHeads::Pretraining { mlm: true, nsp: false }, 2),
        ("bert-cls", BertHeads::Task(BertTask::SequenceClassification { n_labels: 3 }), 3),
    ] {
        let vm = VarMap::new();
        let cfg = BertConfig { n_layers: 2, max_position_embeddings: 32, ..BertConfig::base(97, 32, 4) };
        AnyBert::new(&cfg, heads, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        save_bert(BertFamily::Bert, heads, &cfg, &seeded(&vm, seed)?, &out.join(name))?;
    }

    let vm = VarMap::new();
    let cfg = VitConfig { n_layers: 2, n_labels: Some(4), ..VitConfig::base(8, 4, 32, 4) };
    Vit::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    save_vit(&cfg, &seeded(&vm, 4)?, &out.join("vit"))?;

    let vm = VarMap::new();
    let cfg = EncoderDecoderConfig {
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        max_len: 32,
        positions: Positions::Relative { num_buckets: 8, max_distance: 16 },
        ..EncoderDecoderConfig::t5(97, 32, 8, 48, 4)
    };
    EncoderDecoder::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    save_t5(&cfg, &seeded(&vm, 5)?, &out.join("t5"))?;
    println!("wrote gpt2, bert-mlm, bert-cls, vit, t5 under {}", out.display());
    Ok(())
}
