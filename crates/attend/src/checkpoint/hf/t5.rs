//! T5 (`model_type` `t5`, `mt5`): its name table, config and the `T5ForConditionalGeneration` layout, onto
//! [`EncoderDecoder`] in T5's settings.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{
    apply_table, drop_tied_copy, entry, strict_source, tensors_for_file, write_hf_dir, HfDir, Loaded, NameEntry,
};
use crate::layers::feed_forward::Activation;
use crate::layers::norm::NormConfig;
use crate::layers::transformer::NormPosition;
use crate::models::encoder_decoder::{EncoderDecoder, EncoderDecoderConfig, Positions, SharedEmbeddings};
use crate::{ensure, Result};

/// T5's names.
///
/// | Hugging Face | attend |
/// |---|---|
/// | `shared.weight` | `src_embed.weight` (both sides) |
/// | `{encoder,decoder}.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight` | `….layers.{i}.self_attn.{q,k,v,out}_proj.weight` |
/// | `{…}.block.0.layer.0.SelfAttention.relative_attention_bias.weight` | `….position_bias.relative_attention_bias.weight` |
/// | `{…}.block.{i}.layer.0.layer_norm.weight` | `….layers.{i}.self_attn_norm.weight` |
/// | `decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight`, `….layer.1.layer_norm` | `….cross_attn.*`, `….cross_attn_norm` |
/// | `….DenseReluDense.wi.weight` (or gated `wi_0`, `wi_1`), `wo` | `….ffn.fc_in` (gated: `fc_gate`, `fc_in`), `fc_out` |
/// | `{…}.block.{i}.layer.{1,2}.layer_norm.weight` (the feed-forward's) | `….layers.{i}.ffn_norm.weight` |
/// | `{encoder,decoder}.final_layer_norm.weight` | `{encoder,decoder}.norm.weight` |
/// | `lm_head.weight` | `lm_head.weight`, untied only |
pub fn t5_names(config: &EncoderDecoderConfig) -> Vec<NameEntry> {
    let mut t = vec![entry("shared.weight".into(), "src_embed.weight".into(), false)];
    let mut w = |hf: String, ours: String| t.push(entry(format!("{hf}.weight"), format!("{ours}.weight"), false));
    for (side, n) in [("encoder", config.n_encoder_layers), ("decoder", config.n_decoder_layers)] {
        w(
            format!("{side}.block.0.layer.0.SelfAttention.relative_attention_bias"),
            format!("{side}.position_bias.relative_attention_bias"),
        );
        for i in 0..n {
            let (hf, ours) = (format!("{side}.block.{i}.layer"), format!("{side}.layers.{i}"));
            for (p, q) in [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")] {
                w(format!("{hf}.0.SelfAttention.{p}"), format!("{ours}.self_attn.{q}"));
            }
            w(format!("{hf}.0.layer_norm"), format!("{ours}.self_attn_norm"));
            let ff = if side == "decoder" {
                for (p, q) in [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")] {
                    w(format!("{hf}.1.EncDecAttention.{p}"), format!("{ours}.cross_attn.{q}"));
                }
                w(format!("{hf}.1.layer_norm"), format!("{ours}.cross_attn_norm"));
                2
            } else {
                1
            };
            if config.gated_ffn {
                w(format!("{hf}.{ff}.DenseReluDense.wi_0"), format!("{ours}.ffn.fc_gate"));
                w(format!("{hf}.{ff}.DenseReluDense.wi_1"), format!("{ours}.ffn.fc_in"));
            } else {
                w(format!("{hf}.{ff}.DenseReluDense.wi"), format!("{ours}.ffn.fc_in"));
            }
            w(format!("{hf}.{ff}.DenseReluDense.wo"), format!("{ours}.ffn.fc_out"));
            w(format!("{hf}.{ff}.layer_norm"), format!("{ours}.ffn_norm"));
        }
        w(format!("{side}.final_layer_norm"), format!("{side}.norm"));
    }
    if !config.tie_output {
        w("lm_head".into(), "lm_head".into());
    }
    t
}

/// The [`EncoderDecoderConfig`] of a `t5` / `mt5` directory, with `T5Config`'s defaults for absent fields.
///
/// # Errors
/// Another `model_type`, a field of the wrong type, or a value attend does not implement (the message names it).
pub fn t5_config(dir: &HfDir) -> Result<EncoderDecoderConfig> {
    if !matches!(dir.model_type(), "t5" | "mt5") {
        return Err(dir.unsupported("model_type", "expected \"t5\" or \"mt5\""));
    }
    let proj: String = dir.field("feed_forward_proj", "relu".to_string())?;
    let (gated, act_name) = match proj.strip_prefix("gated-") {
        Some(act) => (true, act.to_string()),
        None => (false, proj.clone()),
    };
    // `gated-gelu` means the tanh GELU (`gelu_new`), as transformers maps it; `dense_act_fn` says so when present.
    let act_name = if act_name == "gelu" { "gelu_new".to_string() } else { act_name };
    let act_name: String = dir.field("dense_act_fn", act_name)?;
    let activation = Activation::from_hf(&act_name).ok_or_else(|| {
        dir.unsupported("feed_forward_proj", "use relu, gated-gelu or gated-silu (or a dense_act_fn attend has)")
    })?;
    let n_layers: usize = dir.field("num_layers", 6)?;
    let dropout: f64 = dir.field("dropout_rate", 0.1)?;
    let tie: bool = dir.field("tie_word_embeddings", true)?;
    let config = EncoderDecoderConfig {
        n_encoder_layers: n_layers,
        n_decoder_layers: dir.field("num_decoder_layers", n_layers)?,
        activation,
        gated_ffn: gated,
        norm: NormConfig::Rms { eps: dir.field("layer_norm_epsilon", 1e-6)? },
        norm_position: NormPosition::Pre,
        positions: Positions::Relative {
            num_buckets: dir.field("relative_attention_num_buckets", 32)?,
            max_distance: dir.field("relative_attention_max_distance", 128)?,
        },
        max_len: dir.field("n_positions", 512)?,
        shared_embeddings: SharedEmbeddings::SourceTarget,
        tie_output: tie,
        dropout,
        attn_dropout: dropout,
        ffn_dropout: dropout,
        decoder_start_token_id: dir.field("decoder_start_token_id", 0)?,
        eos_token_id: dir.field("eos_token_id", 1)?,
        pad_token_id: dir.field("pad_token_id", 0)?,
        ..EncoderDecoderConfig::t5(
            dir.field("vocab_size", 32128)?,
            dir.field("d_model", 512)?,
            dir.field("d_kv", 64)?,
            dir.field("d_ff", 2048)?,
            dir.field("num_heads", 8)?,
        )
    };
    if config.n_heads == 0 {
        return Err(dir.unsupported("num_heads", "must be positive"));
    }
    Ok(config)
}

/// A T5 directory as an [`EncoderDecoder`] in `dtype` on `device`; `trainable` wraps every parameter in a variable.
///
/// # Errors
/// Missing, extra or misshapen tensors (naming the file's tensor), an embedding copy that differs from `shared`,
/// and every error of [`t5_config`].
pub fn load_t5(
    dir: &HfDir,
    dtype: DType,
    device: &Device,
    trainable: bool,
) -> Result<Loaded<EncoderDecoder, EncoderDecoderConfig>> {
    let config = t5_config(dir)?;
    let source = dir.path().join("model.safetensors");
    let mut raw = dir.weights(device)?;
    // Each stack's `embed_tokens` is `shared`; files store it once or three times.
    for copy in ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"] {
        drop_tied_copy(&mut raw, copy, "shared.weight", &source)?;
    }
    if config.tie_output {
        drop_tied_copy(&mut raw, "lm_head.weight", "shared.weight", &source)?;
    }
    let (tensors, labels) = apply_table(&source, raw, &t5_names(&config), |_| false)?;
    let (strict, vars) = strict_source(tensors, labels, &source, dtype, trainable)?;
    let model = EncoderDecoder::new(&config, strict.var_builder(dtype, device))?;
    Ok(Loaded { model, config, vars })
}

/// Writes an [`EncoderDecoder`] in T5's settings to `dir` as `transformers` reads it (`T5ForConditionalGeneration`),
/// each file atomically; `tensors` are the model's parameters under attend's names.
///
/// # Errors
/// A config T5 cannot express (sinusoids, post-norm, layer norm, biases, separate tables), a missing tensor.
pub fn save_t5(config: &EncoderDecoderConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    let Positions::Relative { num_buckets, max_distance } = config.positions else {
        crate::bail!("save_t5", "T5's format needs relative positions");
    };
    let NormConfig::Rms { eps } = config.norm else { crate::bail!("save_t5", "T5's format needs RMS norm") };
    ensure!(
        config.norm_position == NormPosition::Pre
            && !config.bias
            && !config.scale_embeddings
            && config.attention_scale == Some(1.0)
            && config.shared_embeddings == SharedEmbeddings::SourceTarget,
        "save_t5",
        "T5's format needs pre-norm, no biases, unscaled embeddings and scores, and one source/target table"
    );
    let named = tensors_for_file(&t5_names(config), tensors, |e| e.hf.clone())?;
    let act = config.activation.hf_name();
    let cfg = serde_json::json!({
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": config.src_vocab,
        "d_model": config.d_model,
        "d_kv": config.head_dim.unwrap_or(config.d_model / config.n_heads),
        "d_ff": config.d_ff,
        "num_layers": config.n_encoder_layers,
        "num_decoder_layers": config.n_decoder_layers,
        "num_heads": config.n_heads,
        "relative_attention_num_buckets": num_buckets,
        "relative_attention_max_distance": max_distance,
        "dropout_rate": config.dropout,
        "layer_norm_epsilon": eps,
        "feed_forward_proj": if config.gated_ffn { format!("gated-{}", if act == "gelu_new" { "gelu" } else { act }) } else { act.to_string() },
        "dense_act_fn": act,
        "is_encoder_decoder": true,
        "tie_word_embeddings": config.tie_output,
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "n_positions": config.max_len,
        "torch_dtype": "float32",
    });
    write_hf_dir(dir, &named, &cfg)
}
