//! `attend generate --model DIR (--prompt TEXT | --input-ids IDS) [--max-new-tokens N] [--greedy | --temperature T
//! --top-k K --top-p P --seed S] [--repetition-penalty R] [--json]`: continues a prompt with a causal LM.
//!
//! Without `--json` the text streams to stdout as tokens come; with it, one line `{"ids": [...], "text": ...}`,
//! where `ids` are the prompt's and the new tokens (as `generate` returns them in `transformers`) and `text` their
//! decoding (`null` when the directory has no tokenizer.json). Decoding is greedy unless a sampling flag is given,
//! as `transformers` does for GPT-2; it stops at the config's `eos_token_id`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use attend::checkpoint::hf::{self, HfModel};
use attend::generate::{generate, GenerateConfig, Sampling};
use clap::Args;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A Hugging Face causal-LM directory (config.json, model.safetensors, tokenizer.json for --prompt).
    #[arg(long)]
    model: PathBuf,
    /// The prompt as text (needs DIR/tokenizer.json).
    #[arg(long, conflicts_with = "input_ids", required_unless_present = "input_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long)]
    input_ids: Option<String>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Pick the most likely token at each step (the default when no sampling flag is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "seed"])]
    greedy: bool,
    /// Sample from softmax(logits / T).
    #[arg(long)]
    temperature: Option<f64>,
    /// Sample among the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampler.
    #[arg(long)]
    seed: Option<u64>,
    /// CTRL's repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Print one JSON line {"ids": [...], "text": ...} instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (dir, model) = super::open(&args.model)?;
    let HfModel::Gpt2(lm) = &model else {
        bail!(
            "{}: a {} checkpoint is not a causal language model; attend generate reads gpt2",
            args.model.display(),
            dir.model_type()
        );
    };
    let tok = super::tokenizer(&args.model)?;
    let prompt: Vec<u32> = match (&args.prompt, &args.input_ids) {
        (Some(text), _) => {
            let tok = tok.as_ref().ok_or_else(|| {
                anyhow!("{}: no tokenizer.json, so --prompt cannot be encoded; pass --input-ids", args.model.display())
            })?;
            let enc = tok.encode(text.as_str(), false).map_err(|e| anyhow!("--prompt: cannot encode: {e}"))?;
            if enc.get_ids().is_empty() {
                bail!("--prompt {text:?} encodes to no tokens");
            }
            enc.get_ids().to_vec()
        }
        (None, Some(ids)) => super::parse_ids("--input-ids", ids)?,
        (None, None) => unreachable!("clap requires --prompt or --input-ids"),
    };
    let sampling = if args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some() || args.seed.is_some()
    {
        Sampling::Sample {
            temperature: args.temperature.unwrap_or(1.0),
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed.unwrap_or(0),
        }
    } else {
        Sampling::Greedy
    };
    let eos = hf::token_ids(&dir, "eos_token_id").map_err(|e| anyhow!(crate::errors::attend(&e)))?;
    let pad = hf::token_ids(&dir, "pad_token_id").map_err(|e| anyhow!(crate::errors::attend(&e)))?;
    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        repetition_penalty: args.repetition_penalty,
        stop_tokens: eos.clone(),
        pad_token: pad.first().or(eos.first()).copied().unwrap_or(0),
    };
    let decode = |ids: &[u32]| -> Result<Option<String>> {
        match &tok {
            Some(t) => t.decode(ids, false).map(Some).map_err(|e| anyhow!("cannot decode ids: {e}")),
            None => Ok(None),
        }
    };
    let mut stdout = std::io::stdout().lock();
    let mut all = prompt.clone();
    let mut shown = 0usize; // characters of the decoded text already printed
    if !args.json {
        if let Some(text) = decode(&all)? {
            write!(stdout, "{text}")?;
            shown = text.len();
        }
    }
    let mut stream_err = None;
    let out = generate(&lm.model, &[prompt.clone()], &cfg, |_, t| {
        all.push(t);
        if args.json || stream_err.is_some() {
            return;
        }
        // Decode the whole sequence and print what is new: a token can complete a multi-byte character.
        let r = decode(&all).and_then(|text| {
            let text = text.unwrap_or_else(|| format!("{t} "));
            if text.len() > shown && text.is_char_boundary(shown) && !text.ends_with('\u{FFFD}') {
                write!(stdout, "{}", &text[shown..])?;
                stdout.flush()?;
                shown = text.len();
            }
            Ok(())
        });
        if let Err(e) = r {
            stream_err = Some(e);
        }
    })
    .map_err(|e| anyhow!(crate::errors::attend(&e)))?;
    if let Some(e) = stream_err {
        return Err(e);
    }
    let ids: Vec<u32> = [prompt, out[0].tokens.clone()].concat();
    if args.json {
        let line = serde_json::json!({ "ids": ids, "text": decode(&ids)? });
        writeln!(stdout, "{line}")?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}
