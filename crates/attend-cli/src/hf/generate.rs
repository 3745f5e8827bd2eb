//! `attend generate --model DIR (--prompt TEXT | --input-ids IDS) [--max-new-tokens N] [--greedy | --temperature T
//! --top-k K --top-p P --seed S] [--repetition-penalty R] [--num-beams N [--length-penalty A]] [--json]`: continues a
//! prompt with a causal LM (gpt2), or writes an encoder–decoder's (t5) output for a source.
//!
//! Without `--json` the text streams to stdout as tokens come; with it, one line `{"ids": [...], "text": ...}`,
//! where `ids` are, as `generate` returns them in `transformers`, the prompt's and the new tokens for a causal LM, and
//! `decoder_start_token_id` and the new tokens for an encoder–decoder; `text` is the decoding of the generated part
//! (of everything for a causal LM; `null` when the directory has no tokenizer.json). Beam search (`--num-beams`) is
//! for encoder–decoders. Decoding is greedy unless a sampling flag is given,
//! as `transformers` does for GPT-2; it stops at the config's `eos_token_id`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use attend::checkpoint::hf::{self, HfModel};
use attend::decode::{beam_search, BeamConfig};
use attend::generate::{generate, generate_seq2seq, GenerateConfig, Sampling};
use attend::models::encoder_decoder::EncoderDecoder;
use candle_core::Tensor;
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
    /// Beam search with this many beams (encoder–decoders such as T5; 1 = greedy or sampled).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with_all = ["temperature", "top_k", "top_p", "seed"])]
    num_beams: u32,
    /// Beam search ranks hypotheses by log p / length^α; this is α.
    #[arg(long, default_value_t = 1.0, requires = "num_beams")]
    length_penalty: f64,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (dir, model) = super::open(&args.model)?;
    let seq2seq = match &model {
        HfModel::Gpt2(_) => false,
        HfModel::T5(_) => true,
        _ => bail!(
            "{}: a {} checkpoint does not generate text; attend generate reads gpt2 (causal) and t5 (encoder–decoder)",
            args.model.display(),
            dir.model_type()
        ),
    };
    if args.num_beams > 1 && !seq2seq {
        bail!(
            "--num-beams {}: beam search is for encoder–decoders (t5); a causal LM decodes greedily or samples",
            args.num_beams
        );
    }
    let tok = super::tokenizer(&args.model)?;
    let prompt: Vec<u32> = match (&args.prompt, &args.input_ids) {
        (Some(text), _) => {
            let tok = tok.as_ref().ok_or_else(|| {
                anyhow!("{}: no tokenizer.json, so --prompt cannot be encoded; pass --input-ids", args.model.display())
            })?;
            // A T5 source ends with </s>, which the tokenizer's post-processor adds; a GPT-2 prompt has no specials.
            let enc = tok.encode(text.as_str(), seq2seq).map_err(|e| anyhow!("--prompt: cannot encode: {e}"))?;
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
    if let HfModel::T5(m) = &model {
        return run_seq2seq(&args, &m.model, prompt, &cfg, &decode);
    }
    let HfModel::Gpt2(lm) = &model else { unreachable!("checked above") };
    let mut stdout = std::io::stdout().lock();
    let mut stream = Stream::new(&decode, prompt.clone(), !args.json, &mut stdout)?;
    let out = generate(&lm.model, &[prompt.clone()], &cfg, |_, t| stream.push(t))
        .map_err(|e| anyhow!(crate::errors::attend(&e)))?;
    stream.finish()?;
    let ids: Vec<u32> = [prompt, out[0].tokens.clone()].concat();
    if args.json {
        let line = serde_json::json!({ "ids": ids, "text": decode(&ids)? });
        writeln!(stdout, "{line}")?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

/// An encoder–decoder's output for one source: streamed (the new tokens' text) or as one JSON line whose `ids` start
/// with `decoder_start_token_id`, as `generate` returns them in `transformers`.
fn run_seq2seq(
    args: &GenerateArgs,
    model: &EncoderDecoder,
    source: Vec<u32>,
    cfg: &GenerateConfig,
    decode: &dyn Fn(&[u32]) -> Result<Option<String>>,
) -> Result<()> {
    let mc = model.config();
    let err = |e: attend::Error| anyhow!(crate::errors::attend(&e));
    let mut stdout = std::io::stdout().lock();
    let tokens = if args.num_beams > 1 {
        let src = Tensor::new(vec![source.clone()], &candle_core::Device::Cpu)?;
        let memory = model.encode(&src, None).map_err(err)?;
        let beam = BeamConfig {
            beam: args.num_beams as usize,
            max_len: args.max_new_tokens,
            length_penalty: args.length_penalty,
            bos: mc.decoder_start_token_id,
            eos: cfg.stop_tokens.first().copied().unwrap_or(mc.eos_token_id),
        };
        let state = model.start_decoding(&memory, None).map_err(err)?;
        let hyps = beam_search(&model.decoder(), state, &beam).map_err(err)?;
        hyps.into_iter().next().map(|h| h.tokens).unwrap_or_default()
    } else {
        let mut stream = Stream::new(decode, Vec::new(), !args.json, &mut stdout)?;
        let out = generate_seq2seq(model, &[source], cfg, |_, t| stream.push(t)).map_err(err)?;
        stream.finish()?;
        out.into_iter().next().map(|g| g.tokens).unwrap_or_default()
    };
    let ids: Vec<u32> = [vec![mc.decoder_start_token_id], tokens.clone()].concat();
    if args.json {
        writeln!(stdout, "{}", serde_json::json!({ "ids": ids, "text": decode(&tokens)? }))?;
    } else {
        if args.num_beams > 1 {
            write!(stdout, "{}", decode(&tokens)?.unwrap_or_else(|| format!("{tokens:?}")))?;
        }
        writeln!(stdout)?;
    }
    Ok(())
}

/// Text printed as tokens come. The whole sequence is decoded again at each token and only what is new is printed:
/// a token can complete a multi-byte character, or change how the previous ones decode. Without a tokenizer, ids.
struct Stream<'a, W: Write> {
    decode: &'a dyn Fn(&[u32]) -> Result<Option<String>>,
    tokens: Vec<u32>,
    /// Bytes of the decoded text already printed.
    shown: usize,
    out: Option<&'a mut W>,
    error: Option<anyhow::Error>,
}

impl<'a, W: Write> Stream<'a, W> {
    /// Prints the decoded `prefix` now when `print`; a `Stream` that does not print only collects.
    fn new(
        decode: &'a dyn Fn(&[u32]) -> Result<Option<String>>,
        prefix: Vec<u32>,
        print: bool,
        out: &'a mut W,
    ) -> Result<Self> {
        let mut s = Self { decode, tokens: prefix, shown: 0, out: print.then_some(out), error: None };
        if let Some(w) = s.out.as_deref_mut() {
            if let Some(text) = (s.decode)(&s.tokens)? {
                write!(w, "{text}")?;
                s.shown = text.len();
            }
        }
        Ok(s)
    }

    fn push(&mut self, t: u32) {
        self.tokens.push(t);
        if self.error.is_some() {
            return;
        }
        let Some(w) = self.out.as_deref_mut() else { return };
        let r = (self.decode)(&self.tokens).and_then(|text| {
            match text {
                Some(text) => {
                    if text.len() > self.shown && text.is_char_boundary(self.shown) && !text.ends_with('\u{FFFD}') {
                        write!(w, "{}", &text[self.shown..])?;
                        self.shown = text.len();
                    }
                }
                None => write!(w, "{t} ")?,
            }
            Ok(w.flush()?)
        });
        self.error = r.err();
    }

    /// The first error met while printing, if any.
    fn finish(self) -> Result<()> {
        self.error.map_or(Ok(()), Err)
    }
}
