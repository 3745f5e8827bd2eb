//! The BERT family (`model_type` `bert`, `roberta`, `distilbert`): name tables, configs, and the layouts of their
//! heads (`…Model`, `…ForMaskedLM`, `BertForPreTraining`, `…ForSequenceClassification`, `…ForTokenClassification`,
//! `…ForQuestionAnswering`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{
    apply_table, drop_tied_copy, entry, set_labels, strict_source, strip_prefix, tensors_for_file, write_hf_dir, HfDir,
    Loaded, NameEntry,
};
use crate::layers::feed_forward::Activation;
use crate::models::bert::{AnyBert, BertConfig, BertHeads, BertPositions, BertTask};
use crate::{ensure, Result};

/// The three layouts of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BertFamily {
    Bert,
    Roberta,
    DistilBert,
}

impl BertFamily {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "bert" => BertFamily::Bert,
            "roberta" => BertFamily::Roberta,
            "distilbert" => BertFamily::DistilBert,
            _ => return None,
        })
    }

    pub fn model_type(self) -> &'static str {
        match self {
            BertFamily::Bert => "bert",
            BertFamily::Roberta => "roberta",
            BertFamily::DistilBert => "distilbert",
        }
    }

    /// What the architectures with heads put before the encoder's names (`bert.` in `BertForMaskedLM`).
    fn prefix(self) -> &'static str {
        match self {
            BertFamily::Bert => "bert.",
            BertFamily::Roberta => "roberta.",
            BertFamily::DistilBert => "distilbert.",
        }
    }

    /// The stem of the architecture names (`Bert` in `BertForMaskedLM`).
    fn stem(self) -> &'static str {
        match self {
            BertFamily::Bert => "Bert",
            BertFamily::Roberta => "Roberta",
            BertFamily::DistilBert => "DistilBert",
        }
    }
}

/// The family's names for `heads` over an encoder of `config`'s shape. Encoder names are given without the
/// architecture's prefix (`bert.`), which the loader strips and the writer adds; attend's names sit under `bert.`
/// whenever there are heads (as [`AnyBert`] builds them).
///
/// BERT and RoBERTa:
///
/// | Hugging Face | attend |
/// |---|---|
/// | `embeddings.word_embeddings.weight` | `word_embeddings.weight` |
/// | `embeddings.position_embeddings.weight` | `position_embeddings.weight` |
/// | `embeddings.token_type_embeddings.weight` | `token_type_embeddings.weight` |
/// | `embeddings.LayerNorm.*` | `embeddings_norm.*` |
/// | `encoder.layer.{i}.attention.self.{query,key,value}.*` | `layers.{i}.self_attn.{q,k,v}_proj.*` |
/// | `encoder.layer.{i}.attention.output.dense.*` | `layers.{i}.self_attn.out_proj.*` |
/// | `encoder.layer.{i}.attention.output.LayerNorm.*` | `layers.{i}.self_attn_norm.*` |
/// | `encoder.layer.{i}.intermediate.dense.*` | `layers.{i}.ffn.fc_in.*` |
/// | `encoder.layer.{i}.output.dense.*` | `layers.{i}.ffn.fc_out.*` |
/// | `encoder.layer.{i}.output.LayerNorm.*` | `layers.{i}.ffn_norm.*` |
/// | `pooler.dense.*` | `pooler.*` |
///
/// DistilBERT: `transformer.layer.{i}.attention.{q,k,v,out}_lin`, `sa_layer_norm`, `ffn.lin1`, `ffn.lin2`,
/// `output_layer_norm`; no segments, no pooler.
///
/// Heads: masked LM `cls.predictions.transform.dense` / `.LayerNorm` / `cls.predictions.bias` (RoBERTa `lm_head.dense`
/// / `.layer_norm` / `.bias`; DistilBERT `vocab_transform` / `vocab_layer_norm` / `vocab_projector.bias`) →
/// `mlm.transform` / `mlm.norm` / `mlm.bias`; `cls.seq_relationship` → `nsp`; `classifier` or `qa_outputs` → `head`.
///
/// # Errors
/// Heads the family's checkpoints lay out differently from BERT's (RoBERTa's and DistilBERT's two-layer
/// sequence classifier, next-sentence prediction outside BERT).
pub fn bert_names(family: BertFamily, config: &BertConfig, heads: BertHeads) -> Result<Vec<NameEntry>> {
    const OP: &str = "bert_names";
    let enc = if heads == BertHeads::None { "" } else { "bert." };
    let tables = |t: &mut Vec<NameEntry>, names: &[(&str, &str)]| {
        for (hf, ours) in names {
            t.push(entry(format!("embeddings.{hf}.weight"), format!("{enc}{ours}.weight"), false));
        }
    };
    let mut out = Vec::new();
    tables(&mut out, &[("word_embeddings", "word_embeddings"), ("position_embeddings", "position_embeddings")]);
    if config.type_vocab_size > 0 {
        tables(&mut out, &[("token_type_embeddings", "token_type_embeddings")]);
    }
    weight_bias(&mut out, "embeddings.LayerNorm", &format!("{enc}embeddings_norm"));
    let layer_parts: &[(&str, &str)] = match family {
        BertFamily::Bert | BertFamily::Roberta => &[
            ("attention.self.query", "self_attn.q_proj"),
            ("attention.self.key", "self_attn.k_proj"),
            ("attention.self.value", "self_attn.v_proj"),
            ("attention.output.dense", "self_attn.out_proj"),
            ("attention.output.LayerNorm", "self_attn_norm"),
            ("intermediate.dense", "ffn.fc_in"),
            ("output.dense", "ffn.fc_out"),
            ("output.LayerNorm", "ffn_norm"),
        ],
        BertFamily::DistilBert => &[
            ("attention.q_lin", "self_attn.q_proj"),
            ("attention.k_lin", "self_attn.k_proj"),
            ("attention.v_lin", "self_attn.v_proj"),
            ("attention.out_lin", "self_attn.out_proj"),
            ("sa_layer_norm", "self_attn_norm"),
            ("ffn.lin1", "ffn.fc_in"),
            ("ffn.lin2", "ffn.fc_out"),
            ("output_layer_norm", "ffn_norm"),
        ],
    };
    let stack = if family == BertFamily::DistilBert { "transformer.layer" } else { "encoder.layer" };
    for i in 0..config.n_layers {
        for (hf, ours) in layer_parts {
            weight_bias(&mut out, &format!("{stack}.{i}.{hf}"), &format!("{enc}layers.{i}.{ours}"));
        }
    }
    if config.pooler {
        weight_bias(&mut out, "pooler.dense", &format!("{enc}pooler"));
    }
    match heads {
        BertHeads::None => {}
        BertHeads::Pretraining { mlm, nsp } => {
            if mlm {
                let (dense, norm, bias) = match family {
                    BertFamily::Bert => (
                        "cls.predictions.transform.dense",
                        "cls.predictions.transform.LayerNorm",
                        "cls.predictions.bias",
                    ),
                    BertFamily::Roberta => ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
                    BertFamily::DistilBert => ("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"),
                };
                weight_bias(&mut out, dense, "mlm.transform");
                weight_bias(&mut out, norm, "mlm.norm");
                out.push(entry(bias.into(), "mlm.bias".into(), false));
            }
            if nsp {
                ensure!(family == BertFamily::Bert, OP, "next sentence prediction exists only in BERT's layout");
                weight_bias(&mut out, "cls.seq_relationship", "nsp");
            }
        }
        BertHeads::Task(task) => {
            if let BertTask::SequenceClassification { .. } = task {
                ensure!(
                    family == BertFamily::Bert,
                    OP,
                    "{}'s sequence classifier has two layers; attend implements BERT's one-layer head",
                    family.stem()
                );
            }
            let hf = if task == BertTask::QuestionAnswering { "qa_outputs" } else { "classifier" };
            weight_bias(&mut out, hf, "head");
        }
    }
    Ok(out)
}

/// `{hf}.weight` and `{hf}.bias` as `{ours}.weight` and `{ours}.bias`.
fn weight_bias(out: &mut Vec<NameEntry>, hf: &str, ours: &str) {
    out.push(entry(format!("{hf}.weight"), format!("{ours}.weight"), false));
    out.push(entry(format!("{hf}.bias"), format!("{ours}.bias"), false));
}

/// The heads an architecture name carries (`BertForMaskedLM` → masked LM); `n_labels` from `id2label`.
///
/// # Errors
/// An architecture attend does not implement, naming it.
pub fn bert_heads(dir: &HfDir, family: BertFamily) -> Result<BertHeads> {
    let archs = dir.architectures();
    let arch = archs.first().cloned().unwrap_or_else(|| format!("{}Model", family.stem()));
    let n_labels = match dir.config().get("id2label") {
        Some(Value::Object(m)) if !m.is_empty() => m.len(),
        _ => dir.field("num_labels", 2usize)?,
    };
    Ok(match arch.strip_prefix(family.stem()).unwrap_or("") {
        "Model" => BertHeads::None,
        "ForMaskedLM" => BertHeads::Pretraining { mlm: true, nsp: false },
        "ForPreTraining" => BertHeads::Pretraining { mlm: true, nsp: true },
        "ForNextSentencePrediction" => BertHeads::Pretraining { mlm: false, nsp: true },
        "ForSequenceClassification" => BertHeads::Task(BertTask::SequenceClassification { n_labels }),
        "ForTokenClassification" => BertHeads::Task(BertTask::TokenClassification { n_labels }),
        "ForQuestionAnswering" => BertHeads::Task(BertTask::QuestionAnswering),
        _ => {
            let s = family.stem();
            return Err(dir.unsupported(
                "architectures",
                &format!(
                    "attend reads {s}Model, {s}ForMaskedLM, {s}ForPreTraining, {s}ForNextSentencePrediction, \
                     {s}ForSequenceClassification, {s}ForTokenClassification and {s}ForQuestionAnswering"
                ),
            ));
        }
    })
}

/// The [`BertConfig`] of a `bert`, `roberta` or `distilbert` directory, with Hugging Face's defaults for absent
/// fields; `pooler` is what the family's bare model has (the loader settles it from the weights).
///
/// # Errors
/// Another `model_type`, a field of the wrong type, or a value attend does not implement (the message names it).
pub fn bert_config(dir: &HfDir) -> Result<(BertFamily, BertConfig)> {
    let family = BertFamily::from_model_type(dir.model_type())
        .ok_or_else(|| dir.unsupported("model_type", "expected \"bert\", \"roberta\" or \"distilbert\""))?;
    let act_field = if family == BertFamily::DistilBert { "activation" } else { "hidden_act" };
    let act: String = dir.field(act_field, "gelu".to_string())?;
    let activation = Activation::from_hf(&act)
        .ok_or_else(|| dir.unsupported(act_field, "use relu, gelu, gelu_new, gelu_pytorch_tanh or silu"))?;
    let config = if family == BertFamily::DistilBert {
        if dir.field("sinusoidal_pos_embds", false)? {
            return Err(dir.unsupported("sinusoidal_pos_embds", "only learned positions (false)"));
        }
        BertConfig {
            vocab_size: dir.field("vocab_size", 30522)?,
            max_position_embeddings: dir.field("max_position_embeddings", 512)?,
            type_vocab_size: 0,
            d_model: dir.field("dim", 768)?,
            n_layers: dir.field("n_layers", 6)?,
            n_heads: dir.field("n_heads", 12)?,
            d_ff: dir.field("hidden_dim", 3072)?,
            activation,
            layer_norm_eps: 1e-12,
            dropout: dir.field("dropout", 0.1)?,
            attn_dropout: dir.field("attention_dropout", 0.1)?,
            pooler: false,
            positions: BertPositions::Absolute,
            share_layers: false,
        }
    } else {
        let pet: String = dir.field("position_embedding_type", "absolute".to_string())?;
        if pet != "absolute" {
            return Err(dir.unsupported("position_embedding_type", "only \"absolute\""));
        }
        if dir.field("is_decoder", false)? || dir.field("add_cross_attention", false)? {
            return Err(dir.unsupported("is_decoder", "BERT as a decoder is not implemented (use the encoder)"));
        }
        let positions = match family {
            BertFamily::Roberta => BertPositions::FromPadding { padding_idx: dir.field("pad_token_id", 1u32)? },
            _ => BertPositions::Absolute,
        };
        BertConfig {
            vocab_size: dir.field("vocab_size", 30522)?,
            max_position_embeddings: dir.field("max_position_embeddings", 512)?,
            type_vocab_size: dir.field("type_vocab_size", 2)?,
            d_model: dir.field("hidden_size", 768)?,
            n_layers: dir.field("num_hidden_layers", 12)?,
            n_heads: dir.field("num_attention_heads", 12)?,
            d_ff: dir.field("intermediate_size", 3072)?,
            activation,
            layer_norm_eps: dir.field("layer_norm_eps", 1e-12)?,
            dropout: dir.field("hidden_dropout_prob", 0.1)?,
            attn_dropout: dir.field("attention_probs_dropout_prob", 0.1)?,
            pooler: true,
            positions,
            share_layers: false,
        }
    };
    let heads_field = if family == BertFamily::DistilBert { "n_heads" } else { "num_attention_heads" };
    if config.n_heads == 0 || config.d_model % config.n_heads != 0 {
        return Err(dir.unsupported(heads_field, &format!("must divide the hidden size {}", config.d_model)));
    }
    Ok((family, config))
}

/// A BERT, RoBERTa or DistilBERT directory as an [`AnyBert`] with the heads its `architectures` names, in `dtype` on
/// `device`; `trainable` wraps every parameter in a variable (fine-tuning).
///
/// # Errors
/// Missing, extra or misshapen tensors (naming the file's tensor), an untied decoder, and every error of
/// [`bert_config`] and [`bert_heads`].
pub fn load_bert(dir: &HfDir, dtype: DType, device: &Device, trainable: bool) -> Result<Loaded<AnyBert, BertConfig>> {
    let (family, mut config) = bert_config(dir)?;
    let heads = bert_heads(dir, family)?;
    let source = dir.path().join("model.safetensors");
    let mut raw = strip_prefix(dir.weights(device)?, family.prefix());
    // The masked-LM and sentence heads read the pooler only when they need it; the file says whether it has one.
    config.pooler = match heads {
        BertHeads::Pretraining { nsp: true, .. } | BertHeads::Task(BertTask::SequenceClassification { .. }) => true,
        _ => raw.contains_key("pooler.dense.weight"),
    };
    // Tied decoders some writers store anyway: they must be the word embeddings (and the head's bias).
    let (decoder, decoder_bias, bias) = match family {
        BertFamily::Bert => ("cls.predictions.decoder", "cls.predictions.decoder.bias", "cls.predictions.bias"),
        BertFamily::Roberta => ("lm_head.decoder", "lm_head.decoder.bias", "lm_head.bias"),
        BertFamily::DistilBert => ("vocab_projector", "vocab_projector.bias", "vocab_projector.bias"),
    };
    drop_tied_copy(&mut raw, &format!("{decoder}.weight"), "embeddings.word_embeddings.weight", &source)?;
    if decoder_bias != bias {
        drop_tied_copy(&mut raw, decoder_bias, bias, &source)?;
    }
    let table = bert_names(family, &config, heads)?;
    let buffers = |name: &str| name == "embeddings.position_ids" || name == "embeddings.token_type_ids";
    let (tensors, labels) = apply_table(&source, raw, &table, buffers)?;
    let (strict, vars) = strict_source(tensors, labels, &source, dtype, trainable)?;
    let model = AnyBert::new(&config, heads, strict.var_builder(dtype, device))?;
    Ok(Loaded { model, config, vars })
}

/// Writes a BERT-family model to `dir` as `transformers` reads it: `config.json` with the architecture of `heads`
/// and `model.safetensors` under the family's names, each atomically. `tensors` are the model's parameters under
/// attend's names (a `VarMap`'s contents).
///
/// # Errors
/// Shared layers (Hugging Face's BERT has none), RoBERTa positions in another family or the reverse, a head the
/// family lays out differently, a missing tensor.
pub fn save_bert(
    family: BertFamily,
    heads: BertHeads,
    config: &BertConfig,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    const OP: &str = "save_bert";
    ensure!(!config.share_layers, OP, "Hugging Face's {} has no shared layers", family.stem());
    let roberta_positions = matches!(config.positions, BertPositions::FromPadding { .. });
    ensure!(
        roberta_positions == (family == BertFamily::Roberta),
        OP,
        "positions {:?} do not fit the {} layout",
        config.positions,
        family.stem()
    );
    ensure!(
        family != BertFamily::DistilBert || (config.type_vocab_size == 0 && config.layer_norm_eps == 1e-12),
        OP,
        "DistilBERT has no segments and ε = 1e-12"
    );
    // Hugging Face builds these heads without a pooler (`add_pooling_layer=False`), and nothing of ours reads it
    // under them: it is left out rather than written as a tensor `transformers` would reject as unexpected.
    let pooler_read = matches!(
        heads,
        BertHeads::None
            | BertHeads::Pretraining { nsp: true, .. }
            | BertHeads::Task(BertTask::SequenceClassification { .. })
    );
    let written = BertConfig { pooler: config.pooler && pooler_read, ..config.clone() };
    let table = bert_names(family, &written, heads)?;
    let prefix = family.prefix();
    let named = tensors_for_file(&table, tensors, |e| {
        if e.attend.starts_with("bert.") {
            format!("{prefix}{}", e.hf)
        } else {
            e.hf.clone()
        }
    })?;
    let stem = family.stem();
    let arch = match heads {
        BertHeads::None => format!("{stem}Model"),
        BertHeads::Pretraining { mlm: true, nsp: false } => format!("{stem}ForMaskedLM"),
        BertHeads::Pretraining { mlm: true, nsp: true } => format!("{stem}ForPreTraining"),
        BertHeads::Pretraining { .. } => format!("{stem}ForNextSentencePrediction"),
        BertHeads::Task(BertTask::SequenceClassification { .. }) => format!("{stem}ForSequenceClassification"),
        BertHeads::Task(BertTask::TokenClassification { .. }) => format!("{stem}ForTokenClassification"),
        BertHeads::Task(BertTask::QuestionAnswering) => format!("{stem}ForQuestionAnswering"),
    };
    let act = config.activation.hf_name();
    let mut cfg = if family == BertFamily::DistilBert {
        serde_json::json!({
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "dim": config.d_model,
            "n_layers": config.n_layers,
            "n_heads": config.n_heads,
            "hidden_dim": config.d_ff,
            "activation": act,
            "dropout": config.dropout,
            "attention_dropout": config.attn_dropout,
            "sinusoidal_pos_embds": false,
        })
    } else {
        let mut c = serde_json::json!({
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "type_vocab_size": config.type_vocab_size,
            "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "intermediate_size": config.d_ff,
            "hidden_act": act,
            "layer_norm_eps": config.layer_norm_eps,
            "hidden_dropout_prob": config.dropout,
            "attention_probs_dropout_prob": config.attn_dropout,
            "position_embedding_type": "absolute",
        });
        if let BertPositions::FromPadding { padding_idx } = config.positions {
            c["pad_token_id"] = padding_idx.into();
        }
        c
    };
    cfg["model_type"] = family.model_type().into();
    cfg["architectures"] = serde_json::json!([arch]);
    cfg["tie_word_embeddings"] = true.into();
    cfg["torch_dtype"] = "float32".into();
    if let BertHeads::Task(BertTask::SequenceClassification { n_labels } | BertTask::TokenClassification { n_labels }) =
        heads
    {
        set_labels(&mut cfg, n_labels);
    }
    write_hf_dir(dir, &named, &cfg)
}
