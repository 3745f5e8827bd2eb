//! `attend hf run --model DIR (--input-ids "5,17,33" [--token-type-ids "0,0,1"] | --inputs IN.safetensors)
//! --output OUT.safetensors`: the model's forward on given ids, written under Hugging Face's output names
//! (`logits` for a causal LM, a masked LM or a classifier, `start_logits`/`end_logits` for span extraction,
//! `logits` and `encoder_last_hidden_state` for T5, which also needs `decoder_input_ids`;
//! `last_hidden_state` and `pooler_output` for an encoder; ViT reads `pixel_values` (B, K, H, W) from `--inputs`), f32, shaped as `transformers` returns them:
//! with a batch axis for `--inputs`, without one for `--input-ids`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use attend::checkpoint::hf::HfModel;
use attend::models::bert::{AnyBert, BertInput, PretrainingOutput, TaskLogits};
use attend::models::gpt::GptInput;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};

use crate::tensors::{write_atomic, TensorFile};

#[derive(Debug, Subcommand)]
pub enum HfCommand {
    /// Run a Hugging Face checkpoint directory's forward on token ids and save its outputs.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A Hugging Face model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// One sequence of token ids, comma-separated.
    #[arg(long, conflicts_with = "inputs", required_unless_present = "inputs")]
    input_ids: Option<String>,
    /// Segment ids for --input-ids, comma-separated.
    #[arg(long, requires = "input_ids")]
    token_type_ids: Option<String>,
    /// A safetensors file with `input_ids` (B, T) and optionally `attention_mask`, `token_type_ids`,
    /// `position_ids`, `pixel_values`, `decoder_input_ids`.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Where to write the outputs (safetensors).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(cmd: HfCommand) -> Result<()> {
    match cmd {
        HfCommand::Run(args) => run_forward(args),
    }
}

/// The named integer inputs, batch-first.
struct Inputs {
    tensors: HashMap<String, Tensor>,
    /// Where they came from, for messages.
    source: String,
    batched: bool,
}

impl Inputs {
    fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
}

fn read_inputs(args: &RunArgs) -> Result<Inputs> {
    let dev = Device::Cpu;
    if let Some(ids) = &args.input_ids {
        let ids = super::parse_ids("--input-ids", ids)?;
        let t = ids.len();
        let mut tensors = HashMap::from([("input_ids".to_string(), Tensor::from_vec(ids, (1, t), &dev)?)]);
        if let Some(tt) = &args.token_type_ids {
            let tt = super::parse_ids("--token-type-ids", tt)?;
            if tt.len() != t {
                bail!("--token-type-ids has {} entries but --input-ids has {t}", tt.len());
            }
            tensors.insert("token_type_ids".into(), Tensor::from_vec(tt, (1, t), &dev)?);
        }
        return Ok(Inputs { tensors, source: "--input-ids".into(), batched: false });
    }
    let path = args.inputs.as_ref().expect("clap requires --inputs without --input-ids");
    let file = TensorFile::open_all(path, &dev)?;
    let source = path.display().to_string();
    let known = ["input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "decoder_input_ids"];
    if let Some(other) = file.names().iter().find(|n| !known.contains(&n.as_str())) {
        bail!("{source}: unknown input `{other}` (expected {})", known.join(", "));
    }
    let mut tensors = file.into_map();
    for name in ["input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids"] {
        if let Some(t) = tensors.get(name) {
            if t.dtype().is_float() || t.rank() != 2 {
                bail!("{source}: `{name}` {:?} of dtype {:?} must be integer (B, T)", t.dims(), t.dtype());
            }
            let t = t.to_dtype(DType::I64)?;
            let min = t.flatten_all()?.min(0)?.to_scalar::<i64>()?;
            if min < 0 {
                bail!("{source}: `{name}` holds {min}; ids are non-negative");
            }
            tensors.insert(name.to_string(), t.to_dtype(DType::U32)?);
        }
    }
    Ok(Inputs { tensors, source, batched: true })
}

/// An error for the first of `unused` that the inputs hold: the family takes no such input.
fn refuse(inputs: &Inputs, unused: &[&str], model_type: &str) -> Result<()> {
    match unused.iter().find(|n| inputs.get(n).is_some()) {
        Some(n) => bail!("{}: `{n}` is not an input of a {model_type} checkpoint", inputs.source),
        None => Ok(()),
    }
}

/// A BERT-family model's outputs under the names its Hugging Face class returns them.
fn bert_outputs(model: &AnyBert, input: &BertInput) -> attend::Result<Vec<(&'static str, Tensor)>> {
    Ok(match model {
        AnyBert::Encoder(b) => {
            let o = b.forward(input)?;
            let mut v = vec![("last_hidden_state", o.hidden)];
            v.extend(o.pooled.map(|p| ("pooler_output", p)));
            v
        }
        AnyBert::Pretraining(p) => match p.forward(input)? {
            PretrainingOutput { mlm_logits: Some(m), nsp_logits: Some(n), .. } => {
                vec![("prediction_logits", m), ("seq_relationship_logits", n)]
            }
            PretrainingOutput { mlm_logits: Some(l), .. } | PretrainingOutput { nsp_logits: Some(l), .. } => {
                vec![("logits", l)]
            }
            _ => unreachable!("BertPretraining has at least one head"),
        },
        AnyBert::Task(t) => match t.forward(input)?.0 {
            TaskLogits::Sequence(l) | TaskLogits::Token(l) => vec![("logits", l)],
            TaskLogits::Span { start, end } => vec![("start_logits", start), ("end_logits", end)],
        },
    })
}

fn run_forward(args: RunArgs) -> Result<()> {
    let (dir, model) = super::open(&args.model)?;
    let inputs = read_inputs(&args)?;
    let src = &inputs.source;
    let outputs: Vec<(&str, Tensor)> = match &model {
        HfModel::Gpt2(m) => {
            refuse(&inputs, &["pixel_values", "decoder_input_ids"], dir.model_type())?;
            let ids = inputs.get("input_ids").ok_or_else(|| anyhow!("{src}: missing `input_ids` (B, T)"))?;
            let input = GptInput {
                attention_mask: inputs.get("attention_mask"),
                position_ids: inputs.get("position_ids"),
                token_type_ids: inputs.get("token_type_ids"),
                ..GptInput::new(ids)
            };
            let logits = m.model.forward(&input, None).map_err(|e| anyhow!("{src}: {}", crate::errors::attend(&e)))?;
            vec![("logits", logits)]
        }
        HfModel::Bert(m) => {
            refuse(&inputs, &["pixel_values", "decoder_input_ids"], dir.model_type())?;
            let ids = inputs.get("input_ids").ok_or_else(|| anyhow!("{src}: missing `input_ids` (B, T)"))?;
            let input = BertInput {
                attention_mask: inputs.get("attention_mask"),
                token_type_ids: inputs.get("token_type_ids"),
                position_ids: inputs.get("position_ids"),
                ..BertInput::new(ids)
            };
            let err = |e: attend::Error| anyhow!("{src}: {}", crate::errors::attend(&e));
            bert_outputs(&m.model, &input).map_err(err)?
        }
        HfModel::T5(m) => {
            refuse(&inputs, &["pixel_values", "token_type_ids", "position_ids"], dir.model_type())?;
            if !inputs.batched {
                bail!("a {} checkpoint also needs decoder_input_ids: pass them with --inputs", dir.model_type());
            }
            let ids = inputs.get("input_ids").ok_or_else(|| anyhow!("{src}: missing `input_ids` (B, S)"))?;
            let dec = inputs.get("decoder_input_ids").ok_or_else(|| {
                anyhow!("{src}: missing `decoder_input_ids` (B, T), which start with decoder_start_token_id")
            })?;
            let err = |e: attend::Error| anyhow!("{src}: {}", crate::errors::attend(&e));
            let memory = m.model.encode(ids, inputs.get("attention_mask")).map_err(err)?;
            let h = m.model.decode(dec, &memory, inputs.get("attention_mask")).map_err(err)?;
            vec![("logits", m.model.logits(&h).map_err(err)?), ("encoder_last_hidden_state", memory)]
        }
        HfModel::Vit(m) => {
            refuse(
                &inputs,
                &["input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids"],
                "vit",
            )?;
            let pixels =
                inputs.get("pixel_values").ok_or_else(|| anyhow!("{src}: missing `pixel_values` (B, K, H, W)"))?;
            let o = m
                .model
                .forward(&pixels.to_dtype(DType::F32)?, false)
                .map_err(|e| anyhow!("{src}: {}", crate::errors::attend(&e)))?;
            match o.logits {
                Some(l) => vec![("logits", l)],
                None => [("last_hidden_state", Some(o.hidden)), ("pooler_output", o.pooled)]
                    .into_iter()
                    .filter_map(|(n, t)| t.map(|t| (n, t)))
                    .collect(),
            }
        }
    };
    let outputs: Vec<(&str, Tensor)> = outputs
        .into_iter()
        .map(|(n, t)| Ok((n, if inputs.batched { t } else { t.squeeze(0)? }.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &Tensor)> = outputs.iter().map(|(n, t)| (*n, t)).collect();
    let meta = HashMap::from([("model_type".to_string(), dir.model_type().to_string())]);
    write_atomic(&args.output, &refs, meta)
}
