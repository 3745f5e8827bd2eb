//! Autoregressive generation from a causal language model with a KV cache: greedy decoding, sampling with
//! temperature, top-k and top-p (nucleus, Holtzman et al. 2020), the repetition penalty of CTRL (Keskar et al. 2019),
//! stop tokens, and tokens streamed to a callback as they come.
//!
//! Prompts of different lengths run as one batch, **left-padded**: every sequence's last prompt token sits in the
//! last column, so each step appends one column for all of them. The padding is hidden by the attention mask, and
//! positions count real tokens only (`position = cumsum(mask) − 1`, as Hugging Face's `generate` does), so a
//! sequence decodes to the same tokens alone or in a batch.
//!
//! Greedy decoding picks the first maximal logit, as `torch.argmax` does, so it reproduces Hugging Face's
//! `generate(do_sample=False)` token for token. Sampling is seeded and counter-based: the draw of step `n`, row `b`
//! depends only on `(seed, n, b)`.
//!
//! Encoder–decoders (T5, the paper's Transformer) generate with [`generate_seq2seq`]: the sources right-padded and
//! encoded once, the memory projected once per layer, the decoder stepping from `decoder_start_token_id` with the
//! same samplers, penalty and stop tokens; beam search for them is [`crate::decode::beam_search`].
//!
//! ```
//! use attend::generate::{generate, GenerateConfig};
//! use attend::models::gpt::{Gpt, GptConfig};
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let vm = VarMap::new();
//! let cfg = GptConfig { n_layers: 1, ..GptConfig::gpt2(40, 32, 16, 2) };
//! let gpt = Gpt::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
//! let prompts = vec![vec![5, 6, 7], vec![9]];
//! let out = generate(&gpt, &prompts, &GenerateConfig { max_new_tokens: 4, ..Default::default() }, |_, _| {})?;
//! assert!(out.iter().all(|g| g.tokens.len() == 4));
//! # Ok(()) }
//! ```

use candle_core::{DType, Device, Tensor};

use crate::models::encoder_decoder::EncoderDecoder;
use crate::models::gpt::{Gpt, GptCache, GptInput};
use crate::{ensure, Result};

/// A decoder-only language model that extends a batch by one column with a cache.
pub trait CausalLm {
    type Cache: Send;
    /// An empty cache.
    fn new_cache(&self) -> Self::Cache;
    /// The longest sequence (prompt and new tokens) the model can hold.
    fn max_positions(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Logits `(B, V)` of the last column, after feeding `ids (B, T)` with `attention_mask (B, S)` over cached and
    /// new columns and `position_ids (B, T)`.
    fn next_logits(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut Self::Cache,
    ) -> Result<Tensor>;
}

impl CausalLm for Gpt {
    type Cache = GptCache;
    fn new_cache(&self) -> GptCache {
        Gpt::new_cache(self)
    }
    fn max_positions(&self) -> usize {
        self.config().n_positions
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn next_logits(&self, ids: &Tensor, mask: &Tensor, pos: &Tensor, cache: &mut GptCache) -> Result<Tensor> {
        let input = GptInput { attention_mask: Some(mask), position_ids: Some(pos), ..GptInput::new(ids) };
        let hidden = self.hidden_states(&input, Some(cache))?.hidden; // (B, T, C)
        let t = hidden.dim(1)?;
        // Only the last column is sampled from: project just it onto the vocabulary.
        self.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?) // (B, V)
    }
}

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first of equal ones).
    Greedy,
    /// A draw from `softmax(logits / temperature)`, restricted to the `top_k` most likely tokens and then to the
    /// smallest set whose probability reaches `top_p`.
    Sample { temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64 },
}

/// Settings of [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// CTRL's penalty θ on tokens already in the sequence (prompt included): a logit `l` becomes `l/θ` if positive,
    /// `l·θ` if not. `1.0` is off.
    pub repetition_penalty: f64,
    /// A sequence ends after emitting one of these (the stop token is kept in its output).
    pub stop_tokens: Vec<u32>,
    /// The id written into padding columns (never attended to; any valid id works).
    pub pad_token: u32,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            sampling: Sampling::Greedy,
            repetition_penalty: 1.0,
            stop_tokens: Vec::new(),
            pad_token: 0,
        }
    }
}

/// One prompt's continuation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The new tokens, ending with the stop token when `stopped`.
    pub tokens: Vec<u32>,
    /// Whether a stop token ended it (rather than `max_new_tokens`).
    pub stopped: bool,
}

/// Continues every prompt; `on_token(row, token)` sees each new token as soon as it is chosen.
///
/// # Errors
/// An empty prompt, a token outside the vocabulary, a prompt plus `max_new_tokens` longer than the model's context,
/// sampling settings out of range (temperature ≤ 0, top-p outside (0, 1], top-k = 0, penalty ≤ 0).
pub fn generate<M: CausalLm + Sync>(
    model: &M,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    const OP: &str = "generate";
    let v = model.vocab_size();
    ensure!(!prompts.is_empty(), OP, "no prompts");
    for (i, p) in prompts.iter().enumerate() {
        ensure!(!p.is_empty(), OP, "prompt {i} is empty: a causal LM needs at least one token to condition on");
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= v) {
            crate::bail!(OP, "prompt {i} has token id {bad}, outside the vocabulary 0..{v}");
        }
    }
    check_config(OP, cfg, v)?;
    let b = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    ensure!(
        width + cfg.max_new_tokens <= model.max_positions(),
        OP,
        "the longest prompt ({width} tokens) plus max_new_tokens = {} exceeds the model's context of {} positions",
        cfg.max_new_tokens,
        model.max_positions()
    );
    let dev = Device::Cpu;

    // Left padding: the prompt of row r fills the last len_r columns.
    let mut ids = vec![cfg.pad_token; b * width];
    let mut mask = vec![0u32; b * width];
    let mut pos = vec![0u32; b * width];
    for (r, p) in prompts.iter().enumerate() {
        let pad = width - p.len();
        for (j, &tok) in p.iter().enumerate() {
            ids[r * width + pad + j] = tok;
            mask[r * width + pad + j] = 1;
            pos[r * width + pad + j] = j as u32;
        }
    }
    let mut history: Vec<Vec<u32>> = prompts.to_vec(); // for the repetition penalty
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut mask_all = mask.clone(); // (B, S) row-major, grows by one column per step
    let mut s = width;
    let mut cache = model.new_cache();
    let mut step_ids = Tensor::from_vec(ids, (b, width), &dev)?;
    let mut step_pos = Tensor::from_vec(pos, (b, width), &dev)?;
    let mut out: Vec<Generation> = vec![Generation { tokens: Vec::new(), stopped: false }; b];

    for step in 0..cfg.max_new_tokens {
        let mask_t = Tensor::from_vec(mask_all.clone(), (b, s), &dev)?;
        // On a worker of rayon's pool: the step's parallel products then share their work with this thread instead
        // of waking the pool and sleeping on a latch, ~50 times per token (BENCHMARKS.md, decoding).
        let logits = rayon::scope(|_| model.next_logits(&step_ids, &mask_t, &step_pos, &mut cache))?; // (B, V)
        let logits: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut chosen = Vec::with_capacity(b);
        for (r, mut row) in logits.into_iter().enumerate() {
            if out[r].stopped {
                chosen.push(cfg.pad_token);
                continue;
            }
            penalise(&mut row, &history[r], cfg.repetition_penalty);
            let tok = choose(&row, &cfg.sampling, step as u64, r as u64);
            out[r].tokens.push(tok);
            out[r].stopped = cfg.stop_tokens.contains(&tok);
            history[r].push(tok);
            on_token(r, tok);
            chosen.push(tok);
        }
        if out.iter().all(|g| g.stopped) || step + 1 == cfg.max_new_tokens {
            break;
        }
        // Append one column: the chosen tokens, visible, at each row's next position.
        let mut grown = Vec::with_capacity(b * (s + 1));
        for r in 0..b {
            grown.extend_from_slice(&mask_all[r * s..(r + 1) * s]);
            grown.push(1);
        }
        mask_all = grown;
        s += 1;
        step_ids = Tensor::from_vec(chosen, (b, 1), &dev)?;
        step_pos = Tensor::from_vec(next_pos.clone(), (b, 1), &dev)?;
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok(out)
}

/// The settings that do not depend on the model: the padding token, the penalty, the sampler's ranges.
fn check_config(op: &'static str, cfg: &GenerateConfig, v: usize) -> Result<()> {
    ensure!((cfg.pad_token as usize) < v, op, "pad_token {} is outside the vocabulary 0..{v}", cfg.pad_token);
    ensure!(cfg.repetition_penalty > 0.0, op, "repetition_penalty must be positive, got {}", cfg.repetition_penalty);
    if let Sampling::Sample { temperature, top_k, top_p, .. } = &cfg.sampling {
        ensure!(*temperature > 0.0, op, "temperature must be positive, got {temperature} (use greedy decoding for 0)");
        ensure!(top_k.is_none_or(|k| k > 0), op, "top_k must be at least 1");
        ensure!(top_p.is_none_or(|p| p > 0.0 && p <= 1.0), op, "top_p must be in (0, 1], got {top_p:?}");
    }
    Ok(())
}

/// The outputs of an encoder–decoder for a batch of sources (right-padded with the model's `pad_token_id`), each
/// decoded from `decoder_start_token_id` with a cache, greedy or sampled as `cfg` says, until a stop token or
/// `max_new_tokens`; `on_token(row, token)` sees each token as it is chosen. The returned tokens leave out the start
/// token. (Beam search: [`crate::decode::beam_search`] over [`EncoderDecoder::decoder`].)
///
/// # Errors
/// An empty source, a token outside the vocabulary, more tokens than the model's `max_len`, settings out of range.
pub fn generate_seq2seq(
    model: &EncoderDecoder,
    sources: &[Vec<u32>],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    const OP: &str = "generate_seq2seq";
    let mc = model.config();
    ensure!(!sources.is_empty(), OP, "no sources");
    ensure!(sources.iter().all(|s| !s.is_empty()), OP, "an empty source: the encoder needs at least one token");
    check_config(OP, cfg, mc.tgt_vocab)?;
    ensure!(
        cfg.max_new_tokens <= mc.max_len,
        OP,
        "max_new_tokens = {} exceeds the model's max_len = {}",
        cfg.max_new_tokens,
        mc.max_len
    );
    let dev = Device::Cpu;
    let (b, width) = (sources.len(), sources.iter().map(Vec::len).max().unwrap_or(0));
    let mut ids = vec![mc.pad_token_id; b * width];
    let mut mask = vec![0u32; b * width];
    for (r, src) in sources.iter().enumerate() {
        ids[r * width..r * width + src.len()].copy_from_slice(src);
        mask[r * width..r * width + src.len()].iter_mut().for_each(|m| *m = 1);
    }
    let (src, mask) = (Tensor::from_vec(ids, (b, width), &dev)?, Tensor::from_vec(mask, (b, width), &dev)?);
    let memory = model.encode(&src, Some(&mask))?;
    let mut state = model.start_decoding(&memory, Some(&mask))?;
    let mut last = vec![mc.decoder_start_token_id; b];
    let mut out: Vec<Generation> = vec![Generation { tokens: Vec::new(), stopped: false }; b];
    for step in 0..cfg.max_new_tokens {
        let step_ids = Tensor::from_slice(&last, b, &dev)?;
        // On a worker of rayon's pool, as in `generate`.
        let logits = rayon::scope(|_| model.decode_step(&step_ids, &mut state))?; // (B, V)
        let logits: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        for (r, mut row) in logits.into_iter().enumerate() {
            if out[r].stopped {
                last[r] = cfg.pad_token;
                continue;
            }
            penalise(&mut row, &out[r].tokens, cfg.repetition_penalty);
            let tok = choose(&row, &cfg.sampling, step as u64, r as u64);
            out[r].tokens.push(tok);
            out[r].stopped = cfg.stop_tokens.contains(&tok);
            on_token(r, tok);
            last[r] = tok;
        }
        if out.iter().all(|g| g.stopped) {
            break;
        }
    }
    Ok(out)
}

/// CTRL's repetition penalty on the logits of tokens in `seen`.
fn penalise(logits: &mut [f32], seen: &[u32], theta: f64) {
    if theta == 1.0 {
        return;
    }
    let theta = theta as f32;
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let (t, l) = (t as usize, &mut logits[t as usize]);
        if !std::mem::replace(&mut done[t], true) {
            *l = if *l > 0.0 { *l / theta } else { *l * theta };
        }
    }
}

/// The first index of the largest value; NaN never wins.
fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Picks a token from one row of logits.
fn choose(logits: &[f32], sampling: &Sampling, step: u64, row: u64) -> u32 {
    let Sampling::Sample { temperature, top_k, top_p, seed } = sampling else {
        return argmax(logits);
    };
    // Candidates sorted by logit, descending (ties by id, so the order is deterministic).
    let mut order: Vec<u32> = (0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()).collect();
    if order.is_empty() {
        return 0;
    }
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    if let Some(k) = top_k {
        order.truncate((*k).max(1));
    }
    let top = logits[order[0] as usize] as f64;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i as usize] as f64 - top) / temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = top_p {
        // Keep the smallest prefix whose mass reaches p (at least one token).
        let mut mass = 0.0;
        let keep = probs.iter().position(|&q| {
            mass += q;
            mass >= *p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let u = crate::rng::sample::uniform_at(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15), row);
    let mut acc = 0.0;
    for (q, &tok) in probs.iter().zip(&order) {
        acc += q;
        if u < acc {
            return tok;
        }
    }
    *order.last().expect("at least one candidate")
}
