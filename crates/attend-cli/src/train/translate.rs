//! The `translate` task on the built-in synthetic translation ([`super::synth`]): a recurrent encoder–decoder
//! without attention, with Bahdanau attention, Luong global (general) or Luong local-p attention.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use attend::models::seq2seq::{Seq2Seq, Seq2SeqAttention, Seq2SeqConfig};
use attend::ops::{cross_entropy, CrossEntropyConfig, Reduction};
use attend::train::init::seeded_var_builder;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::{json, Map, Value};

use super::synth::{self, Split, BOS, EOS, PAD};
use super::{figures, metrics, Task, TrainConfig};

/// The models of the task, as `--model` names them.
pub const MODELS: [&str; 4] = ["none", "bahdanau", "luong", "luong-local-p"];

fn attention_of(model: &str) -> Result<Seq2SeqAttention> {
    Ok(match model {
        "none" => Seq2SeqAttention::None,
        "bahdanau" => Seq2SeqAttention::Bahdanau,
        "luong" => Seq2SeqAttention::Luong(attend::layers::global::GlobalType::General),
        "luong-local-p" => Seq2SeqAttention::LocalP,
        other => bail!("task translate has no model `{other}`; it has {}", MODELS.join(", ")),
    })
}

pub struct Translate {
    cfg: TrainConfig,
    model: Seq2Seq,
    vars: VarMap,
    /// Held-out `(source, target)` pairs, drawn once.
    eval: Vec<(Vec<u32>, Vec<u32>)>,
}

/// One padded batch: `src (B, S)`, lengths, `tgt_in (B, T)` starting with `bos`, `tgt_out (B, T)` ending with
/// `eos` (−100 on padding).
struct Batch {
    src: Tensor,
    lengths: Vec<usize>,
    tgt_in: Tensor,
    tgt_out: Tensor,
    tokens: usize,
}

fn batch(pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Batch> {
    let dev = Device::Cpu;
    let s = pairs.iter().map(|p| p.0.len()).max().unwrap_or(1);
    let t = pairs.iter().map(|p| p.1.len() + 1).max().unwrap_or(1);
    let (mut src, mut tin, mut tout) = (Vec::new(), Vec::new(), Vec::new());
    for (x, y) in pairs {
        src.extend(x.iter().copied().chain(std::iter::repeat_n(PAD, s - x.len())));
        tin.extend(std::iter::once(BOS).chain(y.iter().copied()).chain(std::iter::repeat_n(PAD, t - y.len() - 1)));
        tout.extend(
            y.iter()
                .map(|&v| v as i64)
                .chain(std::iter::once(EOS as i64))
                .chain(std::iter::repeat_n(-100, t - y.len() - 1)),
        );
    }
    let b = pairs.len();
    Ok(Batch {
        src: Tensor::from_vec(src, (b, s), &dev)?,
        lengths: pairs.iter().map(|p| p.0.len()).collect(),
        tgt_in: Tensor::from_vec(tin, (b, t), &dev)?,
        tgt_out: Tensor::from_vec(tout, (b, t), &dev)?,
        tokens: pairs.iter().map(|p| p.1.len() + 1).sum(),
    })
}

impl Translate {
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        let attention = attention_of(&cfg.model)?;
        let vars = VarMap::new();
        let mcfg = Seq2SeqConfig {
            embed_dim: cfg.embed_dim,
            rnn: cfg.rnn,
            ..Seq2SeqConfig::new(synth::SRC_VOCAB, synth::TGT_VOCAB, cfg.hidden_size, attention)
        };
        let mut model = Seq2Seq::new(mcfg, seeded_var_builder(&vars, cfg.seed, DType::F32, &Device::Cpu))
            .map_err(|e| anyhow!("{e}"))?;
        model.set_dropout_rng(&attend::rng::DropoutRng::new(cfg.seed));
        model.set_training(true);
        let eval = (0..cfg.eval_examples as u64)
            .map(|i| synth::example(cfg.seed, Split::Eval, i, cfg.min_len, cfg.max_len))
            .collect();
        Ok(Translate { cfg: cfg.clone(), model, vars, eval })
    }

    /// Greedy translations of `pairs`' sources, without `eos`.
    fn decode(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Vec<u32>>> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(self.cfg.batch_size.max(1)) {
            let b = batch(chunk)?;
            let max_len = chunk.iter().map(|p| p.1.len()).max().unwrap_or(0) + 5;
            let hyps = self.model.greedy(&b.src, Some(&b.lengths), BOS, EOS, max_len).map_err(|e| anyhow!("{e}"))?;
            out.extend(hyps.into_iter().map(|mut h| {
                if h.last() == Some(&EOS) {
                    h.pop();
                }
                h
            }));
        }
        Ok(out)
    }
}

impl Translate {
    /// The share of held-out target tokens (with `eos`) that the model ranks first given the reference prefix.
    fn token_accuracy(&self) -> Result<f64> {
        let (mut right, mut total) = (0usize, 0usize);
        for chunk in self.eval.chunks(self.cfg.batch_size.max(1)) {
            let b = batch(chunk)?;
            let logits =
                self.model.forward(&b.src, Some(&b.lengths), &b.tgt_in, 1.0).map_err(|e| anyhow!("{e}"))?.logits;
            let pred: Vec<u32> = logits.argmax(2)?.flatten_all()?.to_vec1()?;
            let gold: Vec<i64> = b.tgt_out.flatten_all()?.to_vec1()?;
            for (p, g) in pred.iter().zip(&gold).filter(|(_, &g)| g >= 0) {
                right += (*p as i64 == *g) as usize;
                total += 1;
            }
        }
        Ok(right as f64 / total.max(1) as f64)
    }
}

impl Task for Translate {
    fn architecture(&self) -> String {
        format!("translate/{}", self.cfg.model)
    }

    fn vars(&self) -> &VarMap {
        &self.vars
    }

    fn train_loss(&self, index: u64) -> Result<(Tensor, usize)> {
        let first = index * self.cfg.batch_size as u64;
        let pairs: Vec<_> = (first..first + self.cfg.batch_size as u64)
            .map(|i| synth::example(self.cfg.seed, Split::Train, i, self.cfg.min_len, self.cfg.max_len))
            .collect();
        let b = batch(&pairs)?;
        let logits = self.model.forward(&b.src, Some(&b.lengths), &b.tgt_in, 1.0).map_err(|e| anyhow!("{e}"))?.logits;
        let (n, t, v) = logits.dims3()?;
        let ce = CrossEntropyConfig { ignore_index: -100, label_smoothing: 0.0 };
        let loss = cross_entropy(&logits.reshape((n * t, v))?, &b.tgt_out.flatten_all()?, &ce, Reduction::Mean)
            .map_err(|e| anyhow!("{e}"))?;
        Ok((loss, b.tokens))
    }

    fn evaluate(&self) -> Result<Map<String, Value>> {
        self.model.set_training(false);
        let hyps = self.decode(&self.eval);
        let accuracy = self.token_accuracy();
        self.model.set_training(true);
        let (hyps, accuracy) = (hyps?, accuracy?);
        let refs: Vec<Vec<u32>> = self.eval.iter().map(|p| p.1.clone()).collect();
        let mut m = Map::new();
        m.insert("token_accuracy".into(), json!(accuracy));
        m.insert("exact_match".into(), json!(metrics::exact_match(&hyps, &refs)));
        m.insert("bleu".into(), json!(metrics::bleu(&hyps, &refs)));
        // By source length, in three equal bands of the range: where a fixed context vector gives out.
        let (lo, hi) = (self.cfg.min_len, self.cfg.max_len);
        let width = (hi - lo + 1).div_ceil(3);
        let mut bands = Vec::new();
        for k in 0..3 {
            let (a, b) = (lo + k * width, (lo + (k + 1) * width - 1).min(hi));
            if a > hi {
                break;
            }
            let idx: Vec<usize> = (0..refs.len()).filter(|&i| (a..=b).contains(&self.eval[i].0.len())).collect();
            let pick = |v: &[Vec<u32>]| idx.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
            let (h, r) = (pick(&hyps), pick(&refs));
            bands.push(json!({"lengths": format!("{a}-{b}"), "examples": idx.len(),
                "exact_match": metrics::exact_match(&h, &r), "bleu": metrics::bleu(&h, &r)}));
        }
        m.insert("by_length".into(), Value::Array(bands));
        Ok(m)
    }

    fn pictures(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        if self.cfg.model == "none" {
            return Ok(Vec::new()); // no alignment to show
        }
        self.model.set_training(false);
        // Three held-out sentences of different lengths, each with the reference target fed in (teacher forcing).
        let mut picks: Vec<&(Vec<u32>, Vec<u32>)> = self.eval.iter().collect();
        picks.sort_by_key(|p| p.0.len());
        let n = picks.len();
        let chosen = [picks[n / 6], picks[n / 2], picks[n - 1 - n / 10]];
        let mut panels = Vec::new();
        for p in chosen {
            let b = batch(std::slice::from_ref(p))?;
            let out = self.model.forward(&b.src, Some(&b.lengths), &b.tgt_in, 1.0).map_err(|e| anyhow!("{e}"))?;
            let align = out.align.ok_or_else(|| anyhow!("model {} returned no alignment", self.cfg.model))?;
            let (_, t, s) = align.dims3()?;
            let weights: Vec<f32> = align.flatten_all()?.to_vec1()?;
            let cols: Vec<String> = p.0.iter().map(|&w| synth::word(w, false)).collect();
            let rows: Vec<String> = p.1.iter().chain(std::iter::once(&EOS)).map(|&w| synth::word(w, true)).collect();
            panels.push(figures::Heatmap { rows, cols, weights, shape: (t, s) });
        }
        self.model.set_training(true);
        let title = format!("{}: alignment of target words (rows) to source words (columns)", self.architecture());
        figures::write_both(&figures::heatmaps(&title, &panels), &dir.join("alignments"))
    }
}
