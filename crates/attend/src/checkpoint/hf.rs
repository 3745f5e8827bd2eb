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

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::StrictTensors;
use crate::error::shape_str;
use crate::layers::feed_forward::Activation;
use crate::models::gpt::{Gpt, GptConfig, GptLayout};
use crate::{Error, Result};

/// A Hugging Face model directory: its parsed `config.json` and where its weights are.
#[derive(Clone, Debug)]
pub struct HfDir {
    path: PathBuf,
    config: Map<String, Value>,
    model_type: String,
}

fn file_error(path: &Path, msg: impl Into<String>) -> Error {
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

fn load_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| file_error(path, format!("cannot load: {e}")))
}

/// A model of any supported family, loaded from a directory by its `model_type`.
#[derive(Clone, Debug)]
pub enum HfModel {
    /// `gpt2`: a causal LM (`GPT2LMHeadModel` / `GPT2Model`).
    Gpt2(Loaded<Gpt, GptConfig>),
}

/// The `model_type`s [`load`] reads.
pub const SUPPORTED: &[&str] = &["gpt2"];

/// Loads the directory's model by its `model_type`.
///
/// # Errors
/// An unknown `model_type` (the message lists the supported ones), and every error of the family's loader.
pub fn load(dir: &HfDir, dtype: DType, device: &Device, trainable: bool) -> Result<HfModel> {
    match dir.model_type() {
        "gpt2" => Ok(HfModel::Gpt2(load_gpt2(dir, dtype, device, trainable)?)),
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

fn entry(hf: String, attend: String, transposed: bool) -> NameEntry {
    NameEntry { hf, attend, transposed }
}

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

/// Renames the file's tensors through `table`, transposing where it says; returns attend's names with a label map
/// (attend name → file name) for messages.
///
/// # Errors
/// A tensor of the file that the table does not know (after `ignore`), naming it.
fn apply_table(
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
fn strict_source(
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
    let mut raw = dir.weights(device)?;
    let source = dir.path().join("model.safetensors");
    if raw.keys().any(|k| k.starts_with("transformer.")) {
        raw = raw
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("transformer.").map_or(k.clone(), str::to_string), v))
            .collect();
    }
    let mut table = gpt2_names(config.n_layers);
    match (raw.contains_key("lm_head.weight"), config.tie_embeddings) {
        (true, false) => table.push(entry("lm_head.weight".into(), "lm_head.weight".into(), false)),
        (true, true) => {
            // Some writers store the tied head anyway; it must be the embedding.
            let (head, wte) = (&raw["lm_head.weight"], raw.get("wte.weight"));
            let same = wte.is_some_and(|w| {
                w.dims() == head.dims()
                    && (w - head)
                        .and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>())
                        .is_ok_and(|m| m == 0.0)
            });
            if !same {
                return Err(file_error(
                    &source,
                    "`lm_head.weight` differs from `wte.weight` but config.json says tie_word_embeddings = true",
                ));
            }
            raw.remove("lm_head.weight");
        }
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
    let act = match config.activation {
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
        Activation::GeluTanh => "gelu_new",
        Activation::Silu => "silu",
    };
    let mut table = gpt2_names(config.n_layers);
    if !config.tie_embeddings {
        table.push(entry("lm_head.weight".into(), "lm_head.weight".into(), false));
    }
    let mut named = Vec::with_capacity(table.len());
    for e in &table {
        let t = tensors.get(&e.attend).ok_or_else(|| Error::MissingTensor {
            name: e.attend.clone(),
            location: "the model's parameters".into(),
        })?;
        let t = if e.transposed { t.t()?.contiguous()? } else { t.contiguous()? };
        let name = if e.hf.starts_with("lm_head") { e.hf.clone() } else { format!("transformer.{}", e.hf) };
        named.push((name, t.to_dtype(DType::F32)?));
    }
    let cfg = serde_json::json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": act,
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "attn_pdrop": config.attn_dropout,
        "embd_pdrop": config.embd_dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    });
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, format!("cannot create: {e}")))?;
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    super::write_safetensors(&dir.join("model.safetensors"), &refs, meta)?;
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| file_error(dir, e.to_string()))?;
    super::write_atomic(&dir.join("config.json"), text.as_bytes())
}
