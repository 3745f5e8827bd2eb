//! The sentence-transformers layout: `modules.json` lists the modules (a Transformer, a Pooling, optionally Dense
//! projections and a Normalize) and where each keeps its files. Both generations of the files are read:
//!
//! | file | sentence-transformers ≤ 5 (most Hub models) | sentence-transformers 6 |
//! |---|---|---|
//! | `<pooling dir>/config.json` | `pooling_mode_cls_token`, `pooling_mode_mean_tokens`, … booleans | `pooling_mode`: a name or a list |
//! | max length | `sentence_bert_config.json`'s `max_seq_length` | the same, else `tokenizer_config.json`'s `model_max_length` |
//!
//! A plain Hugging Face directory (no `modules.json`) embeds as sentence-transformers embeds it: mean pooling, no
//! normalisation. Tokenising is the caller's (the CLI reads `tokenizer.json`); this module turns token ids into
//! sentence embeddings.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{bert::load_bert, file_error, load_file, HfDir};
use crate::layers::pooling::{l2_normalize, pool, PoolingMode};
use crate::models::bert::{AnyBert, Bert, BertInput, BertPositions};
use crate::Result;

/// What a sentence-transformers directory says about turning token states into one embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct SentenceLayout {
    /// The Transformer module's directory (the root, or `0_Transformer/` in old saves).
    pub transformer: PathBuf,
    /// Concatenated in this order.
    pub pooling: Vec<PoolingMode>,
    pub normalize: bool,
    /// Tokens kept per text, special tokens included; `None` when no file says.
    pub max_seq_length: Option<usize>,
    /// Lower-case texts before tokenising (`sentence_bert_config.json`).
    pub do_lower_case: bool,
    /// `Dense` projections after the pooling, in order.
    pub dense: Vec<DenseModule>,
}

/// A sentence-transformers `Dense` module: `y = act(W x + b)` on the pooled embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseModule {
    /// Its directory (`config.json`, `model.safetensors` with `linear.weight (out, in)` and `linear.bias`).
    pub dir: PathBuf,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub activation: DenseActivation,
}

/// The activations a `Dense` module may name that attend implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseActivation {
    /// `torch.nn.modules.activation.Tanh`, sentence-transformers' default.
    Tanh,
    /// `torch.nn.modules.linear.Identity`.
    Identity,
}

/// A Dense module's `config.json`.
fn dense_module(dir: &Path) -> Result<DenseModule> {
    let path = dir.join("config.json");
    let v = read_json(&path)?;
    let size = |key: &str| -> Result<usize> {
        v.get(key)
            .and_then(Value::as_u64)
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| file_error(&path, format!("needs `{key}`, a positive integer")))
    };
    let activation = match v.get("activation_function").and_then(Value::as_str) {
        None | Some("torch.nn.modules.activation.Tanh") => DenseActivation::Tanh,
        Some("torch.nn.modules.linear.Identity") => DenseActivation::Identity,
        Some(other) => {
            return Err(file_error(
                &path,
                format!(
                    "activation_function {other:?} is not supported: attend applies torch.nn.modules.activation.Tanh                      or torch.nn.modules.linear.Identity"
                ),
            ))
        }
    };
    if v.get("use_residual").and_then(Value::as_bool) == Some(true) {
        return Err(file_error(&path, "use_residual true is not supported (attend applies act(W x + b) alone)"));
    }
    for key in ["module_input_name", "module_output_name"] {
        if let Some(name) = v.get(key).and_then(Value::as_str).filter(|&n| n != "sentence_embedding") {
            return Err(file_error(
                &path,
                format!("{key} {name:?} is not supported: attend's Dense modules map sentence_embedding to itself"),
            ));
        }
    }
    Ok(DenseModule {
        dir: dir.to_path_buf(),
        in_features: size("in_features")?,
        out_features: size("out_features")?,
        bias: v.get("bias").and_then(Value::as_bool).unwrap_or(true),
        activation,
    })
}

/// A Dense module's weights, checked against its config.
#[derive(Clone, Debug)]
struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
    activation: DenseActivation,
}

impl Dense {
    fn load(m: &DenseModule, dtype: DType, device: &Device) -> Result<Self> {
        let path = m.dir.join("model.safetensors");
        if !path.is_file() {
            let msg = if m.dir.join("pytorch_model.bin").is_file() {
                "holds only pytorch_model.bin (a pickle, which attend does not read); re-save the model with                  sentence-transformers' `save(DIR, safe_serialization=True)`"
            } else {
                "has no model.safetensors"
            };
            return Err(file_error(&m.dir, msg));
        }
        let mut w = load_file(&path, device)?;
        let mut take = |name: &str, dims: &[usize]| -> Result<Tensor> {
            let t = w.remove(name).ok_or_else(|| file_error(&path, format!("has no tensor `{name}`")))?;
            if t.dims() != dims {
                return Err(file_error(
                    &path,
                    format!("tensor `{name}` is {:?}, expected {dims:?} from config.json", t.dims()),
                ));
            }
            Ok(t.to_dtype(dtype)?)
        };
        let weight = take("linear.weight", &[m.out_features, m.in_features])?;
        let bias = if m.bias { Some(take("linear.bias", &[m.out_features])?) } else { None };
        Ok(Self { weight, bias, activation: m.activation })
    }

    /// # Shapes
    /// `(B, in)` → `(B, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::ops::linear(x, &self.weight, self.bias.as_ref())?;
        Ok(match self.activation {
            DenseActivation::Tanh => y.tanh()?,
            DenseActivation::Identity => y,
        })
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| file_error(path, format!("not valid JSON: {e}")))
}

/// The pooling modes of a Pooling module's `config.json`, in either generation's keys.
fn pooling_modes(path: &Path) -> Result<Vec<PoolingMode>> {
    let v = read_json(path)?;
    let by_name = |name: &str| -> Result<PoolingMode> {
        PoolingMode::from_st_name(name).ok_or_else(|| {
            file_error(
                path,
                format!(
                    "pooling_mode {name:?} is not supported: use cls, max, mean, mean_sqrt_len_tokens, weightedmean \
                     or lasttoken"
                ),
            )
        })
    };
    let modes = match v.get("pooling_mode") {
        Some(Value::String(s)) => vec![by_name(s)?],
        Some(Value::Array(a)) => {
            a.iter().map(|x| by_name(x.as_str().unwrap_or("(not a string)"))).collect::<Result<Vec<_>>>()?
        }
        _ => {
            // Older configs switch modes on one by one; they concatenate in sentence-transformers' fixed order.
            let keys = [
                ("pooling_mode_cls_token", PoolingMode::Cls),
                ("pooling_mode_max_tokens", PoolingMode::Max),
                ("pooling_mode_mean_tokens", PoolingMode::Mean),
                ("pooling_mode_mean_sqrt_len_tokens", PoolingMode::MeanSqrtLen),
                ("pooling_mode_weightedmean_tokens", PoolingMode::WeightedMean),
                ("pooling_mode_lasttoken", PoolingMode::LastToken),
            ];
            keys.iter().filter(|(k, _)| v.get(*k).and_then(Value::as_bool) == Some(true)).map(|(_, m)| *m).collect()
        }
    };
    if modes.is_empty() {
        return Err(file_error(path, "chooses no pooling mode (pooling_mode or a pooling_mode_*_tokens key)"));
    }
    Ok(modes)
}

/// Reads `dir`'s sentence-transformers layout; a directory without `modules.json` gets mean pooling.
///
/// # Errors
/// Unreadable files, a module attend does not implement (named, with its type), a Transformer that is not the first
/// module.
pub fn sentence_layout(dir: &Path) -> Result<SentenceLayout> {
    let modules_path = dir.join("modules.json");
    let mut layout = SentenceLayout {
        transformer: dir.to_path_buf(),
        pooling: vec![PoolingMode::Mean],
        normalize: false,
        max_seq_length: None,
        do_lower_case: false,
        dense: Vec::new(),
    };
    if modules_path.is_file() {
        let Value::Array(modules) = read_json(&modules_path)? else {
            return Err(file_error(&modules_path, "must hold a JSON list of modules"));
        };
        let mut pooling = None;
        for (i, m) in modules.iter().enumerate() {
            let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
            let sub = dir.join(m.get("path").and_then(Value::as_str).unwrap_or(""));
            // The class name, whichever package path a version files it under.
            match ty.rsplit('.').next().unwrap_or("") {
                "Transformer" if i == 0 => layout.transformer = sub,
                "Pooling" if !layout.normalize && layout.dense.is_empty() => {
                    pooling = Some(pooling_modes(&sub.join("config.json"))?)
                }
                "Dense" if pooling.is_some() && !layout.normalize => layout.dense.push(dense_module(&sub)?),
                "Normalize" => layout.normalize = true,
                _ => {
                    return Err(file_error(
                        &modules_path,
                        format!(
                            "module {i} of type `{ty}` is not supported here: attend reads a Transformer (first), \
                             a Pooling, Dense modules after it and a Normalize (last)"
                        ),
                    ))
                }
            }
        }
        layout.pooling = pooling.unwrap_or(layout.pooling);
    }
    let sbert = layout.transformer.join("sentence_bert_config.json");
    if sbert.is_file() {
        let v = read_json(&sbert)?;
        layout.max_seq_length = v.get("max_seq_length").and_then(Value::as_u64).map(|n| n as usize);
        layout.do_lower_case = v.get("do_lower_case").and_then(Value::as_bool).unwrap_or(false);
    }
    if layout.max_seq_length.is_none() {
        // sentence-transformers 6 keeps the length only here; the Hub's "unlimited" sentinel is a huge number.
        let tc = layout.transformer.join("tokenizer_config.json");
        if tc.is_file() {
            let v = read_json(&tc)?;
            layout.max_seq_length =
                v.get("model_max_length").and_then(Value::as_u64).filter(|&n| n < 1 << 30).map(|n| n as usize);
        }
    }
    Ok(layout)
}

/// A sentence encoder: a BERT-family encoder and its directory's pooling, Dense projections and normalisation.
#[derive(Clone, Debug)]
pub struct SentenceEncoder {
    bert: Bert,
    layout: SentenceLayout,
    dense: Vec<Dense>,
    max_len: usize,
}

impl SentenceEncoder {
    /// Loads `dir` (a sentence-transformers directory or a plain BERT / RoBERTa / DistilBERT one).
    ///
    /// # Errors
    /// Every error of [`sentence_layout`] and [`load_bert`]; a model that is not a BERT-family encoder.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let layout = sentence_layout(dir)?;
        let hf = HfDir::open(&layout.transformer)?;
        let bert = match load_bert(&hf, dtype, device, false)?.model {
            AnyBert::Encoder(b) => b,
            AnyBert::Pretraining(p) => p.bert().clone(),
            AnyBert::Task(t) => t.bert().clone(),
        };
        let cfg = bert.config();
        // RoBERTa's positions start after the padding index, so two rows of its table are never reached.
        let positions = match cfg.positions {
            BertPositions::FromPadding { padding_idx } => cfg.max_position_embeddings - padding_idx as usize - 1,
            BertPositions::Absolute => cfg.max_position_embeddings,
        };
        let max_len = layout.max_seq_length.map_or(positions, |m| m.min(positions));
        // Each projection's input width is what the one before it gives.
        let mut width = cfg.d_model * layout.pooling.len();
        let mut dense = Vec::with_capacity(layout.dense.len());
        for m in &layout.dense {
            if m.in_features != width {
                return Err(file_error(
                    &m.dir.join("config.json"),
                    format!("in_features {} does not fit the {width} values the module before it gives", m.in_features),
                ));
            }
            dense.push(Dense::load(m, dtype, device)?);
            width = m.out_features;
        }
        Ok(Self { bert, layout, dense, max_len })
    }

    pub fn layout(&self) -> &SentenceLayout {
        &self.layout
    }

    /// The longest tokenised text, special tokens included: what the caller must truncate to.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.layout.dense.last().map_or(self.bert.config().d_model * self.layout.pooling.len(), |m| m.out_features)
    }

    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    /// Sentence embeddings of tokenised, padded texts.
    ///
    /// # Shapes
    /// `input_ids`, `attention_mask`, `token_type_ids`: `(B, T)` → `(B, D)`.
    pub fn embed(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let input = BertInput { attention_mask: Some(attention_mask), token_type_ids, ..BertInput::new(input_ids) };
        let hidden = self.bert.forward(&input)?.hidden; // (B, T, C)
        let mut pooled = pool(&hidden, attention_mask, &self.layout.pooling)?; // (B, D)
        for d in &self.dense {
            pooled = d.forward(&pooled)?; // (B, out)
        }
        if self.layout.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }
}
