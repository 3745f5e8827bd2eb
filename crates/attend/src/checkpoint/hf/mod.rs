//! Hugging Face checkpoints from a local directory (`config.json` + `model.safetensors`, or a sharded
//! `model.safetensors.index.json`): reading their configs, the name table of each supported family, and writing our
//! models back in the same layout so that `transformers` loads them. Nothing here touches the network.
//!
//! Every mapping is an explicit table ([`gpt2_names`], …) from the file's names to attend's, with the layout change
//! each entry needs (GPT-2's `Conv1D` stores `(in, out)` where `nn.Linear` stores `(out, in)`). Loading is strict:
//! a tensor the table does not know, a missing one, or one whose shape disagrees with the config is an error naming
//! the file, the tensor and both shapes.
//!
//! | `model_type` | model | file names |
//! |---|---|---|
//! | `gpt2` | [`Gpt`] (GPT-2 layout) | [`gpt2_names`] |
//! | `t5`, `mt5` | [`EncoderDecoder`] in T5's settings | [`t5_names`] |
//! | `vit` | [`Vit`]: image encoder, classification head | [`vit_names`] |
//! | `bert`, `roberta`, `distilbert` | [`AnyBert`]: encoder, pretraining heads or a fine-tuning head | [`bert_names`] |

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::StrictTensors;
use crate::error::shape_str;
use crate::models::bert::{AnyBert, BertConfig};
use crate::models::encoder_decoder::{EncoderDecoder, EncoderDecoderConfig};
use crate::models::gpt::{Gpt, GptConfig};
use crate::models::vit::{Vit, VitConfig};
use crate::{Error, Result};

mod bert;
mod gpt2;
mod sentence;
mod t5;
mod vit;

pub use bert::{bert_config, bert_heads, bert_names, load_bert, save_bert, BertFamily};
pub use gpt2::{gpt2_config, gpt2_names, load_gpt2, save_gpt2};
pub use sentence::{sentence_layout, DenseActivation, DenseModule, SentenceEncoder, SentenceLayout};
pub use t5::{load_t5, save_t5, t5_config, t5_names};
pub use vit::{load_vit, save_vit, vit_config, vit_names};

/// A Hugging Face model directory: its parsed `config.json` and where its weights are.
#[derive(Clone, Debug)]
pub struct HfDir {
    path: PathBuf,
    config: Map<String, Value>,
    model_type: String,
}

pub(crate) fn file_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::File { path: path.to_path_buf(), msg: msg.into() }
}

impl HfDir {
    /// Reads `dir/config.json`.
    ///
    /// # Errors
    /// A missing directory or config, JSON that is not an object, no `model_type`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().to_path_buf();
        if !path.is_dir() {
            return Err(file_error(&path, "not a directory (expected a Hugging Face model directory)"));
        }
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| file_error(&cfg_path, format!("cannot read ({e}); a Hugging Face directory has one")))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| file_error(&cfg_path, format!("not valid JSON: {e}")))?;
        let Value::Object(config) = value else {
            return Err(file_error(&cfg_path, "must hold a JSON object"));
        };
        let model_type = match config.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(file_error(&cfg_path, "has no string field `model_type`")),
        };
        Ok(Self { path, config, model_type })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `model_type` of `config.json` (`gpt2`, `bert`, …).
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    /// `architectures` of `config.json` (`["GPT2LMHeadModel"]`), empty when absent.
    pub fn architectures(&self) -> Vec<String> {
        match self.config.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        }
    }

    /// The raw config.
    pub fn config(&self) -> &Map<String, Value> {
        &self.config
    }

    /// Field `name` of the config, `default` when absent or `null`.
    ///
    /// # Errors
    /// A value of the wrong type, naming the field, its value and the type expected.
    pub fn field<T: DeserializeOwned>(&self, name: &str, default: T) -> Result<T> {
        match self.config.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| file_error(&self.path.join("config.json"), format!("field `{name}` = {v}: {e}"))),
        }
    }

    /// An error for an unsupported config value: names the field, the value, and what is supported.
    pub fn unsupported(&self, name: &str, what: &str) -> Error {
        let v = self.config.get(name).map_or("absent".to_string(), Value::to_string);
        file_error(&self.path.join("config.json"), format!("field `{name}` = {v} is not supported: {what}"))
    }

    /// Every tensor of the directory's weights (`model.safetensors`, or the shards its index names), on `device`.
    ///
    /// # Errors
    /// No safetensors weights (a `pytorch_model.bin`-only directory gets a message saying how to convert it), an
    /// unreadable file, or one tensor in two shards.
    pub fn weights(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let single = self.path.join("model.safetensors");
        if single.is_file() {
            return load_file(&single, device);
        }
        let index = self.path.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| file_error(&index, format!("cannot read: {e}")))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| file_error(&index, format!("not valid JSON: {e}")))?;
            let Some(Value::Object(map)) = v.get("weight_map") else {
                return Err(file_error(&index, "has no object `weight_map`"));
            };
            let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            shards.sort_unstable();
            shards.dedup();
            let mut all = HashMap::new();
            for shard in shards {
                let p = self.path.join(shard);
                for (name, t) in load_file(&p, device)? {
                    if all.insert(name.clone(), t).is_some() {
                        return Err(file_error(&p, format!("tensor `{name}` is also in another shard")));
                    }
                }
            }
            return Ok(all);
        }
        let msg = if self.path.join("pytorch_model.bin").is_file() {
            "holds only pytorch_model.bin (a pickle, which attend does not read); convert it with transformers: \
             `AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`"
        } else {
            "has no model.safetensors (or model.safetensors.index.json)"
        };
        Err(file_error(&self.path, msg))
    }
}

pub(crate) fn load_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| file_error(path, format!("cannot load: {e}")))
}

/// A model of any supported family, loaded from a directory by its `model_type`.
#[derive(Clone, Debug)]
pub enum HfModel {
    /// `gpt2`: a causal LM (`GPT2LMHeadModel` / `GPT2Model`).
    Gpt2(Loaded<Gpt, GptConfig>),
    /// `bert`, `roberta`, `distilbert`: an encoder, with the heads its architecture names.
    Bert(Loaded<AnyBert, BertConfig>),
    /// `vit`: an image encoder, with a classification head when its architecture has one.
    Vit(Loaded<Vit, VitConfig>),
    /// `t5`, `mt5`: a text-to-text encoder–decoder.
    T5(Loaded<EncoderDecoder, EncoderDecoderConfig>),
}

/// The `model_type`s [`load`] reads.
pub const SUPPORTED: &[&str] = &["gpt2", "bert", "roberta", "distilbert", "vit", "t5", "mt5"];

/// Loads the directory's model by its `model_type`.
///
/// # Errors
/// An unknown `model_type` (the message lists the supported ones), and every error of the family's loader.
pub fn load(dir: &HfDir, dtype: DType, device: &Device, trainable: bool) -> Result<HfModel> {
    match dir.model_type() {
        "gpt2" => Ok(HfModel::Gpt2(load_gpt2(dir, dtype, device, trainable)?)),
        "bert" | "roberta" | "distilbert" => Ok(HfModel::Bert(load_bert(dir, dtype, device, trainable)?)),
        "vit" => Ok(HfModel::Vit(load_vit(dir, dtype, device, trainable)?)),
        "t5" | "mt5" => Ok(HfModel::T5(load_t5(dir, dtype, device, trainable)?)),
        _ => Err(dir.unsupported("model_type", &format!("attend reads {}", SUPPORTED.join(", ")))),
    }
}

/// A token id from the config (`eos_token_id`, `pad_token_id`, …); `generation_config.json` wins when it has one,
/// as in `transformers`. A list (several end tokens) gives all of them.
pub fn token_ids(dir: &HfDir, field: &str) -> Result<Vec<u32>> {
    let from = |v: &Value| -> Option<Vec<u32>> {
        match v {
            Value::Number(n) => n.as_u64().map(|x| vec![x as u32]),
            Value::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as u32)).collect(),
            _ => None,
        }
    };
    let gen_path = dir.path().join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen_path) {
        let v: Value =
            serde_json::from_str(&text).map_err(|e| file_error(&gen_path, format!("not valid JSON: {e}")))?;
        if let Some(ids) = v.get(field).and_then(from) {
            return Ok(ids);
        }
    }
    Ok(dir.config().get(field).and_then(from).unwrap_or_default())
}

/// One row of a name table: the file's name, attend's name, and whether the matrix is stored transposed in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameEntry {
    pub hf: String,
    pub attend: String,
    /// `Conv1D` weights: `(in, out)` in the file, `(out, in)` here.
    pub transposed: bool,
}

pub(crate) fn entry(hf: String, attend: String, transposed: bool) -> NameEntry {
    NameEntry { hf, attend, transposed }
}

/// Renames the file's tensors through `table`, transposing where it says; returns attend's names with a label map
/// (attend name → file name) for messages.
///
/// # Errors
/// A tensor of the file that the table does not know (after `ignore`), naming it.
pub(crate) fn apply_table(
    file: &Path,
    mut tensors: HashMap<String, Tensor>,
    table: &[NameEntry],
    ignore: impl Fn(&str) -> bool,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let mut out = HashMap::new();
    let mut labels = HashMap::new();
    for e in table {
        labels.insert(e.attend.clone(), if e.transposed { format!("{}` transposed", e.hf) } else { e.hf.clone() });
        if let Some(t) = tensors.remove(&e.hf) {
            let t = if e.transposed {
                if t.rank() != 2 {
                    return Err(file_error(file, format!("tensor `{}` {} should be a matrix", e.hf, shape_str(&t))));
                }
                t.t()?.contiguous()?
            } else {
                t
            };
            out.insert(e.attend.clone(), t);
        }
    }
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !ignore(k)).collect();
    extra.sort();
    if let Some(first) = extra.first() {
        let more = if extra.len() > 1 { format!(" (and {} more)", extra.len() - 1) } else { String::new() };
        return Err(file_error(file, format!("unexpected tensor `{first}`{more}: not part of this model's layout")));
    }
    Ok((out, labels))
}

/// A model loaded from a directory, with its config and, when loaded trainable, its parameters as variables
/// (under attend's names) for an optimiser.
#[derive(Clone, Debug)]
pub struct Loaded<M, C> {
    pub model: M,
    pub config: C,
    /// Empty unless loaded with `trainable`.
    pub vars: HashMap<String, Var>,
}

/// Wraps the tensors in variables when `trainable` (the model built over them then trains them).
pub(crate) fn strict_source(
    tensors: HashMap<String, Tensor>,
    labels: HashMap<String, String>,
    source: &Path,
    dtype: DType,
    trainable: bool,
) -> Result<(StrictTensors, HashMap<String, Var>)> {
    let mut vars = HashMap::new();
    let mut ts = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(dtype)?;
        if trainable {
            let v = Var::from_tensor(&t)?;
            ts.insert(name.clone(), v.as_tensor().clone());
            vars.insert(name, v);
        } else {
            ts.insert(name, t);
        }
    }
    Ok((StrictTensors::with_labels(ts, source.display().to_string(), labels), vars))
}

/// The file's tensors with `prefix` stripped from the names that carry it (the encoder of `BertForMaskedLM` sits
/// under `bert.`, GPT-2's under `transformer.`); the head's names stay as they are.
pub(crate) fn strip_prefix(raw: HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    raw.into_iter().map(|(k, v)| (k.strip_prefix(prefix).map_or(k.clone(), str::to_string), v)).collect()
}

/// Writes `config.json` and `model.safetensors` (f32, `tensors` under the file's names) into `dir`, each atomically.
pub(crate) fn write_hf_dir(dir: &Path, tensors: &[(String, Tensor)], config: &Value) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, format!("cannot create: {e}")))?;
    let f32s = tensors.iter().map(|(n, t)| Ok((n.as_str(), t.to_dtype(DType::F32)?))).collect::<Result<Vec<_>>>()?;
    let refs: Vec<(&str, &Tensor)> = f32s.iter().map(|(n, t)| (*n, t)).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    super::write_safetensors(&dir.join("model.safetensors"), &refs, meta)?;
    let text = serde_json::to_string_pretty(config).map_err(|e| file_error(dir, e.to_string()))?;
    super::write_atomic(&dir.join("config.json"), text.as_bytes())
}

/// The tensors of `table` from a model's parameters (attend's names), in the file's layout and under its names
/// (`hf_name` adds what the file's architecture prefixes).
pub(crate) fn tensors_for_file(
    table: &[NameEntry],
    tensors: &HashMap<String, Tensor>,
    hf_name: impl Fn(&NameEntry) -> String,
) -> Result<Vec<(String, Tensor)>> {
    table
        .iter()
        .map(|e| {
            let t = tensors.get(&e.attend).ok_or_else(|| Error::MissingTensor {
                name: e.attend.clone(),
                location: "the model's parameters".into(),
            })?;
            let t = if e.transposed { t.t()?.contiguous()? } else { t.contiguous()? };
            Ok((hf_name(e), t))
        })
        .collect()
}

/// Removes `copy` from the file's tensors when it is a stored copy of the tied tensor `of` (some writers store tied
/// heads anyway).
///
/// # Errors
/// `copy` differs from `of`: the model ties them, so loading it would silently drop a trained tensor.
pub(crate) fn drop_tied_copy(raw: &mut HashMap<String, Tensor>, copy: &str, of: &str, file: &Path) -> Result<()> {
    let Some(c) = raw.get(copy) else { return Ok(()) };
    let same = raw.get(of).is_some_and(|w| {
        w.dims() == c.dims()
            && (w - c)
                .and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>())
                .is_ok_and(|m| m == 0.0)
    });
    if !same {
        return Err(file_error(
            file,
            format!("`{copy}` differs from `{of}`, but the model ties them (config.json: tie_word_embeddings)"),
        ));
    }
    raw.remove(copy);
    Ok(())
}

/// `id2label` and `label2id` for `n` labels named `LABEL_i`, as `transformers` writes them by default.
pub(crate) fn set_labels(cfg: &mut Value, n: usize) {
    cfg["id2label"] = (0..n).map(|i| (i.to_string(), Value::String(format!("LABEL_{i}")))).collect();
    cfg["label2id"] = (0..n).map(|i| (format!("LABEL_{i}"), Value::from(i))).collect();
}
