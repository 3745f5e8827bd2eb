//! GPT-2 (`model_type` `gpt2`): its name table, config and the `GPT2LMHeadModel` layout.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{
    apply_table, drop_tied_copy, entry, strict_source, strip_prefix, tensors_for_file, write_hf_dir, HfDir, Loaded,
    NameEntry,
};
use crate::layers::feed_forward::Activation;
use crate::models::gpt::{Gpt, GptConfig, GptLayout};
use crate::Result;

/// GPT-2's names (`GPT2Model`; `GPT2LMHeadModel` adds the prefix `transformer.`, handled by the loader).
///
/// | Hugging Face | attend | layout |
/// |---|---|---|
/// | `wte.weight`, `wpe.weight` | `wte.weight`, `wpe.weight` | |
/// | `h.{i}.ln_1.{weight,bias}` | `layers.{i}.self_attn_norm.*` | |
/// | `h.{i}.attn.c_attn.{weight,bias}` | `layers.{i}.self_attn.qkv_proj.*` | Conv1D: transposed |
/// | `h.{i}.attn.c_proj.{weight,bias}` | `layers.{i}.self_attn.out_proj.*` | Conv1D: transposed |
/// | `h.{i}.ln_2.{weight,bias}` | `layers.{i}.ffn_norm.*` | |
/// | `h.{i}.mlp.c_fc.{weight,bias}` | `layers.{i}.ffn.fc_in.*` | Conv1D: transposed |
/// | `h.{i}.mlp.c_proj.{weight,bias}` | `layers.{i}.ffn.fc_out.*` | Conv1D: transposed |
/// | `ln_f.{weight,bias}` | `ln_f.*` | |
pub fn gpt2_names(n_layers: usize) -> Vec<NameEntry> {
    let mut t = vec![
        entry("wte.weight".into(), "wte.weight".into(), false),
        entry("wpe.weight".into(), "wpe.weight".into(), false),
        entry("ln_f.weight".into(), "ln_f.weight".into(), false),
        entry("ln_f.bias".into(), "ln_f.bias".into(), false),
    ];
    for i in 0..n_layers {
        let parts = [
            ("ln_1", "self_attn_norm", false),
            ("attn.c_attn", "self_attn.qkv_proj", true),
            ("attn.c_proj", "self_attn.out_proj", true),
            ("ln_2", "ffn_norm", false),
            ("mlp.c_fc", "ffn.fc_in", true),
            ("mlp.c_proj", "ffn.fc_out", true),
        ];
        for (hf, ours, conv) in parts {
            t.push(entry(format!("h.{i}.{hf}.weight"), format!("layers.{i}.{ours}.weight"), conv));
            t.push(entry(format!("h.{i}.{hf}.bias"), format!("layers.{i}.{ours}.bias"), false));
        }
    }
    t
}

/// Buffers that old GPT-2 checkpoints saved beside the parameters (the causal mask), ignored on load.
fn is_gpt2_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

/// The [`GptConfig`] of a `gpt2` directory, with Hugging Face's `GPT2Config` defaults for absent fields.
///
/// # Errors
/// Another `model_type`, a field of the wrong type, or a value attend does not implement (the message names it).
pub fn gpt2_config(dir: &HfDir) -> Result<GptConfig> {
    if dir.model_type() != "gpt2" {
        return Err(dir.unsupported("model_type", "expected \"gpt2\""));
    }
    let act: String = dir.field("activation_function", "gelu_new".to_string())?;
    let activation = Activation::from_hf(&act)
        .ok_or_else(|| dir.unsupported("activation_function", "use relu, gelu, gelu_new, gelu_pytorch_tanh or silu"))?;
    if !dir.field("scale_attn_weights", true)? {
        return Err(dir.unsupported("scale_attn_weights", "attend always scales scores by 1/√D"));
    }
    if dir.field("scale_attn_by_inverse_layer_idx", false)? {
        return Err(dir.unsupported("scale_attn_by_inverse_layer_idx", "only the default false"));
    }
    if dir.field("add_cross_attention", false)? {
        return Err(dir.unsupported("add_cross_attention", "GPT-2 with cross-attention is not implemented"));
    }
    let d_model: usize = dir.field("n_embd", 768)?;
    let n_heads: usize = dir.field("n_head", 12)?;
    if n_heads == 0 || d_model % n_heads != 0 {
        return Err(dir.unsupported("n_head", &format!("must divide n_embd = {d_model}")));
    }
    Ok(GptConfig {
        vocab_size: dir.field("vocab_size", 50257)?,
        n_positions: dir.field("n_positions", 1024)?,
        d_model,
        n_layers: dir.field("n_layer", 12)?,
        n_heads,
        d_ff: dir.field("n_inner", None)?,
        activation,
        layer_norm_eps: dir.field("layer_norm_epsilon", 1e-5)?,
        layout: GptLayout::Gpt2,
        dropout: dir.field("resid_pdrop", 0.1)?,
        attn_dropout: dir.field("attn_pdrop", 0.1)?,
        embd_dropout: dir.field("embd_pdrop", 0.1)?,
        tie_embeddings: dir.field("tie_word_embeddings", true)?,
        fused_qkv: true,
        share_layers: false,
    })
}

/// A GPT-2 directory as a [`Gpt`] in `dtype` on `device`, with the config of [`gpt2_config`]; `trainable` wraps
/// every parameter in a [`Var`] (fine-tuning).
///
/// `GPT2LMHeadModel` files (names under `transformer.`, an optional `lm_head.weight` equal to the tied `wte`) and
/// `GPT2Model` files both load.
///
/// # Errors
/// Missing, extra or misshapen tensors (naming the file's tensor), an untied `lm_head` in a tied config.
pub fn load_gpt2(dir: &HfDir, dtype: DType, device: &Device, trainable: bool) -> Result<Loaded<Gpt, GptConfig>> {
    let config = gpt2_config(dir)?;
    let mut raw = strip_prefix(dir.weights(device)?, "transformer.");
    let source = dir.path().join("model.safetensors");
    let mut table = gpt2_names(config.n_layers);
    match (raw.contains_key("lm_head.weight"), config.tie_embeddings) {
        (true, false) => table.push(entry("lm_head.weight".into(), "lm_head.weight".into(), false)),
        (true, true) => drop_tied_copy(&mut raw, "lm_head.weight", "wte.weight", &source)?,
        _ => {}
    }
    let (tensors, labels) = apply_table(&source, raw, &table, is_gpt2_buffer)?;
    let (strict, vars) = strict_source(tensors, labels, &source, dtype, trainable)?;
    let model = Gpt::new(&config, strict.var_builder(dtype, device))?;
    Ok(Loaded { model, config, vars })
}

/// Writes a GPT-2-layout model to `dir` as `transformers` reads it: `config.json` (`GPT2LMHeadModel`) and
/// `model.safetensors` under Hugging Face's names, each file atomically. `tensors` are the model's parameters under
/// attend's names (a `VarMap`'s contents).
///
/// # Errors
/// A config that GPT-2 cannot express (GPT-1 layout, separate q/k/v projections, shared layers), a missing tensor.
pub fn save_gpt2(config: &GptConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    const OP: &str = "save_gpt2";
    crate::ensure!(
        config.layout == GptLayout::Gpt2 && config.fused_qkv && !config.share_layers,
        OP,
        "GPT-2's format needs the GPT-2 layout with fused_qkv and distinct layers"
    );
    let mut table = gpt2_names(config.n_layers);
    if !config.tie_embeddings {
        table.push(entry("lm_head.weight".into(), "lm_head.weight".into(), false));
    }
    let named = tensors_for_file(&table, tensors, |e| {
        if e.hf.starts_with("lm_head") {
            e.hf.clone()
        } else {
            format!("transformer.{}", e.hf)
        }
    })?;
    let cfg = serde_json::json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": config.activation.hf_name(),
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "attn_pdrop": config.attn_dropout,
        "embd_pdrop": config.embd_dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    });
    write_hf_dir(dir, &named, &cfg)
}
