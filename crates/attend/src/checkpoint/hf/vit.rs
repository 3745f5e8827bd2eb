//! ViT (`model_type` `vit`): its name table, config, and the `ViTModel` / `ViTForImageClassification` layouts.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{
    apply_table, entry, set_labels, strict_source, strip_prefix, tensors_for_file, write_hf_dir, HfDir, Loaded,
    NameEntry,
};
use crate::layers::feed_forward::Activation;
use crate::models::vit::{Vit, VitConfig};
use crate::Result;

/// ViT's names (`ViTModel`; `ViTForImageClassification` puts the encoder under `vit.`, handled by the loader).
///
/// | Hugging Face | attend |
/// |---|---|
/// | `embeddings.cls_token`, `embeddings.position_embeddings` | `cls_token`, `position_embeddings` |
/// | `embeddings.patch_embeddings.projection.*` | `patch_embed.*` |
/// | `encoder.layer.{i}.layernorm_before.*` | `layers.{i}.self_attn_norm.*` |
/// | `encoder.layer.{i}.attention.attention.{query,key,value}.*` | `layers.{i}.self_attn.{q,k,v}_proj.*` |
/// | `encoder.layer.{i}.attention.output.dense.*` | `layers.{i}.self_attn.out_proj.*` |
/// | `encoder.layer.{i}.layernorm_after.*` | `layers.{i}.ffn_norm.*` |
/// | `encoder.layer.{i}.intermediate.dense.*`, `….output.dense.*` | `layers.{i}.ffn.fc_in.*`, `….ffn.fc_out.*` |
/// | `layernorm.*` | `norm.*` |
/// | `pooler.dense.*` | `pooler.*` |
/// | `classifier.*` | `head.*` |
pub fn vit_names(config: &VitConfig) -> Vec<NameEntry> {
    let mut t = vec![
        entry("embeddings.cls_token".into(), "cls_token".into(), false),
        entry("embeddings.position_embeddings".into(), "position_embeddings".into(), false),
    ];
    let pair = |t: &mut Vec<NameEntry>, hf: String, ours: String, bias: bool| {
        t.push(entry(format!("{hf}.weight"), format!("{ours}.weight"), false));
        if bias {
            t.push(entry(format!("{hf}.bias"), format!("{ours}.bias"), false));
        }
    };
    pair(&mut t, "embeddings.patch_embeddings.projection".into(), "patch_embed".into(), true);
    for i in 0..config.n_layers {
        let parts = [
            ("layernorm_before", "self_attn_norm", true),
            ("attention.attention.query", "self_attn.q_proj", config.qkv_bias),
            ("attention.attention.key", "self_attn.k_proj", config.qkv_bias),
            ("attention.attention.value", "self_attn.v_proj", config.qkv_bias),
            ("attention.output.dense", "self_attn.out_proj", true),
            ("layernorm_after", "ffn_norm", true),
            ("intermediate.dense", "ffn.fc_in", true),
            ("output.dense", "ffn.fc_out", true),
        ];
        for (hf, ours, bias) in parts {
            pair(&mut t, format!("encoder.layer.{i}.{hf}"), format!("layers.{i}.{ours}"), bias);
        }
    }
    pair(&mut t, "layernorm".into(), "norm".into(), true);
    if config.pooler {
        pair(&mut t, "pooler.dense".into(), "pooler".into(), true);
    }
    if config.n_labels.is_some() {
        pair(&mut t, "classifier".into(), "head".into(), true);
    }
    t
}

/// The [`VitConfig`] of a `vit` directory, with Hugging Face's `ViTConfig` defaults for absent fields; the head comes
/// from `architectures` (`ViTForImageClassification`, labels from `id2label`), the pooler from the loader.
///
/// # Errors
/// Another `model_type` or architecture, a field of the wrong type, or a value attend does not implement.
pub fn vit_config(dir: &HfDir) -> Result<VitConfig> {
    if dir.model_type() != "vit" {
        return Err(dir.unsupported("model_type", "expected \"vit\""));
    }
    let act: String = dir.field("hidden_act", "gelu".to_string())?;
    let activation = Activation::from_hf(&act)
        .ok_or_else(|| dir.unsupported("hidden_act", "use relu, gelu, gelu_new, gelu_pytorch_tanh or silu"))?;
    let d_model: usize = dir.field("hidden_size", 768)?;
    if dir.field("pooler_act", "tanh".to_string())? != "tanh" {
        return Err(dir.unsupported("pooler_act", "only tanh"));
    }
    if dir.field("pooler_output_size", d_model)? != d_model {
        return Err(dir.unsupported("pooler_output_size", "only hidden_size"));
    }
    let n_heads: usize = dir.field("num_attention_heads", 12)?;
    if n_heads == 0 || d_model % n_heads != 0 {
        return Err(dir.unsupported("num_attention_heads", &format!("must divide hidden_size = {d_model}")));
    }
    if !dir.field("qkv_bias", true)? {
        // attend's attention has one bias switch for all four projections; ViT keeps the output's bias.
        return Err(dir.unsupported("qkv_bias", "only true"));
    }
    let archs = dir.architectures();
    let n_labels = match archs.first().map(String::as_str).unwrap_or("ViTModel") {
        "ViTModel" => None,
        "ViTForImageClassification" => Some(match dir.config().get("id2label") {
            Some(Value::Object(m)) if !m.is_empty() => m.len(),
            _ => dir.field("num_labels", 2usize)?,
        }),
        _ => return Err(dir.unsupported("architectures", "attend reads ViTModel and ViTForImageClassification")),
    };
    let config = VitConfig {
        image_size: dir.field("image_size", 224)?,
        patch_size: dir.field("patch_size", 16)?,
        num_channels: dir.field("num_channels", 3)?,
        d_model,
        n_layers: dir.field("num_hidden_layers", 12)?,
        n_heads,
        d_ff: dir.field("intermediate_size", 3072)?,
        activation,
        layer_norm_eps: dir.field("layer_norm_eps", 1e-12)?,
        dropout: dir.field("hidden_dropout_prob", 0.0)?,
        attn_dropout: dir.field("attention_probs_dropout_prob", 0.0)?,
        qkv_bias: true,
        pooler: n_labels.is_none(),
        n_labels,
    };
    if config.patch_size == 0 || config.image_size % config.patch_size != 0 {
        return Err(dir.unsupported("patch_size", &format!("must divide image_size = {}", config.image_size)));
    }
    Ok(config)
}

/// A ViT directory as a [`Vit`] in `dtype` on `device`; `trainable` wraps every parameter in a variable.
///
/// # Errors
/// Missing, extra or misshapen tensors (naming the file's tensor), and every error of [`vit_config`].
pub fn load_vit(dir: &HfDir, dtype: DType, device: &Device, trainable: bool) -> Result<Loaded<Vit, VitConfig>> {
    let mut config = vit_config(dir)?;
    let source = dir.path().join("model.safetensors");
    let raw = strip_prefix(dir.weights(device)?, "vit.");
    // `ViTModel(add_pooling_layer=False)` files have no pooler.
    config.pooler = raw.contains_key("pooler.dense.weight");
    let (tensors, labels) = apply_table(&source, raw, &vit_names(&config), |_| false)?;
    let (strict, vars) = strict_source(tensors, labels, &source, dtype, trainable)?;
    let model = Vit::new(&config, strict.var_builder(dtype, device))?;
    Ok(Loaded { model, config, vars })
}

/// Writes a ViT to `dir` as `transformers` reads it (`ViTForImageClassification` with a head, `ViTModel`
/// without), each file atomically; `tensors` are the model's parameters under attend's names.
pub fn save_vit(config: &VitConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    let prefix = if config.n_labels.is_some() { "vit." } else { "" };
    let named = tensors_for_file(&vit_names(config), tensors, |e| {
        if e.hf.starts_with("classifier") {
            e.hf.clone()
        } else {
            format!("{prefix}{}", e.hf)
        }
    })?;
    let mut cfg = serde_json::json!({
        "model_type": "vit",
        "architectures": [if config.n_labels.is_some() { "ViTForImageClassification" } else { "ViTModel" }],
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_ff,
        "hidden_act": config.activation.hf_name(),
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attn_dropout,
        "qkv_bias": config.qkv_bias,
        "torch_dtype": "float32",
    });
    if let Some(l) = config.n_labels {
        set_labels(&mut cfg, l);
    }
    write_hf_dir(dir, &named, &cfg)
}
