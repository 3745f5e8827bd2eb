//! `attend embed --model DIR [--json] [--batch-size N] TEXT...` (or `--file F`, one text a line): sentence
//! embeddings as sentence-transformers computes them — the directory's tokenizer, its max length (special tokens
//! included), its pooling and normalisation. With `--json`, one line per text, in input order:
//! `{"text": ..., "embedding": [...]}`; without, a short human-readable summary per text. Empty texts are embedded
//! (as `[CLS] [SEP]`), not refused.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use attend::checkpoint::hf::SentenceEncoder;
use attend::models::bert::BertPositions;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokenizers::{Tokenizer, TruncationParams};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A sentence-transformers directory (modules.json, 1_Pooling/, Dense and Normalize modules) or a plain BERT /
    /// RoBERTa / DistilBERT one (mean pooling).
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON line per text: {"text": ..., "embedding": [...]}.
    #[arg(long)]
    json: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Read the texts from this file, one a line (an empty line is an empty text).
    #[arg(long, conflicts_with = "texts")]
    file: Option<PathBuf>,
    /// The texts to embed.
    #[arg(required_unless_present = "file")]
    texts: Vec<String>,
}

fn read_texts(args: &EmbedArgs) -> Result<Vec<String>> {
    let Some(path) = &args.file else { return Ok(args.texts.clone()) };
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    std::io::BufReader::new(f)
        .lines()
        .map(|l| l.map(|s| s.trim_end_matches('\r').to_string()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("{}: cannot read (is it UTF-8 text?)", path.display()))
}

/// The directory's tokenizer, truncating as sentence-transformers does: to `max_len` tokens, special ones included.
fn tokenizer(enc: &SentenceEncoder, max_len: usize) -> Result<Tokenizer> {
    let dir = &enc.layout().transformer;
    let mut tok = super::tokenizer(dir)?
        .ok_or_else(|| anyhow!("{}: no tokenizer.json, so texts cannot be tokenised", dir.display()))?;
    tok.with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| anyhow!("{}: cannot set truncation to {max_len}: {e}", dir.display()))?;
    tok.with_padding(None);
    Ok(tok)
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let dev = Device::Cpu;
    let enc = SentenceEncoder::load(&args.model, DType::F32, &dev).map_err(|e| anyhow!(crate::errors::attend(&e)))?;
    let texts = read_texts(&args)?;
    if texts.is_empty() {
        bail!(
            "{}: no texts to embed (the file is empty)",
            args.file.as_ref().map_or(String::new(), |p| p.display().to_string())
        );
    }
    let tok = tokenizer(&enc, enc.max_len())?;
    // RoBERTa numbers positions from its padding id, so padding must use it; BERT's padding id is never read.
    let pad = match enc.bert().config().positions {
        BertPositions::FromPadding { padding_idx } => padding_idx,
        BertPositions::Absolute => tok.token_to_id("[PAD]").unwrap_or(0),
    };
    let lower = enc.layout().do_lower_case;
    let encodings = texts
        .iter()
        .map(|t| {
            let t = if lower { t.to_lowercase() } else { t.clone() };
            tok.encode(t.as_str(), true).map_err(|e| anyhow!("cannot tokenise {t:?}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    // Longest first, so each batch pads little; outputs go back to input order.
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].get_ids().len()));
    let bar = if std::io::stderr().is_terminal() && texts.len() > args.batch_size as usize {
        let style =
            ProgressStyle::with_template("{bar:40} {pos}/{len} texts  {per_sec}  ETA {eta}").expect("a valid template");
        ProgressBar::new(texts.len() as u64).with_style(style)
    } else {
        ProgressBar::hidden()
    };
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
    for chunk in order.chunks(args.batch_size as usize) {
        let width = chunk.iter().map(|&i| encodings[i].get_ids().len()).max().unwrap_or(0).max(1);
        let (b, mut ids, mut mask, mut types) = (chunk.len(), Vec::new(), Vec::new(), Vec::new());
        for &i in chunk {
            let e = &encodings[i];
            let n = e.get_ids().len();
            ids.extend(e.get_ids().iter().copied().chain(std::iter::repeat_n(pad, width - n)));
            mask.extend(std::iter::repeat_n(1u32, n).chain(std::iter::repeat_n(0, width - n)));
            types.extend(e.get_type_ids().iter().copied().chain(std::iter::repeat_n(0, width - n)));
        }
        let t = |v: Vec<u32>| Tensor::from_vec(v, (b, width), &dev);
        let has_types = enc.bert().config().type_vocab_size > 0;
        let types = if has_types { Some(t(types)?) } else { None };
        let emb = enc
            .embed(&t(ids)?, &t(mask)?, types.as_ref())
            .map_err(|e| anyhow!("{}: {}", args.model.display(), crate::errors::attend(&e)))?;
        for (&i, row) in chunk.iter().zip(emb.to_vec2::<f32>()?) {
            out[i] = row;
        }
        bar.inc(b as u64);
    }
    bar.finish_and_clear();
    let mut stdout = std::io::stdout().lock();
    for (text, e) in texts.iter().zip(&out) {
        if args.json {
            // Written by hand to keep the contract's key order and f32's shortest digits.
            writeln!(
                stdout,
                r#"{{"text": {}, "embedding": {}}}"#,
                serde_json::to_string(text)?,
                serde_json::to_string(e)?
            )?;
        } else {
            let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
            let head: Vec<String> = e.iter().take(4).map(|x| format!("{x:+.4}")).collect();
            writeln!(stdout, "[{}, …] dim {} ‖e‖ {norm:.4}  {text:?}", head.join(", "), e.len())?;
        }
    }
    Ok(())
}
