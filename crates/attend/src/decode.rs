//! Decoding a model one token at a time: greedy and beam search with length normalisation, for any model that can
//! take a step over a batch of hypotheses ([`StepDecoder`]): the seq2seq models here and the Transformer
//! encoder–decoders.
//!
//! Beam search keeps the `K` best partial hypotheses by summed log-probability; a hypothesis that emits `eos` is
//! finished; the search stops when `K` hypotheses are finished or at `max_len`. Finished hypotheses are ranked by
//! `log p / len^α` (`α = 0`: raw log-probability, which favours short outputs; `α = 1`: per-token average).
//!
//! ```
//! use attend::decode::{beam_search, BeamConfig, StepDecoder};
//! use candle_core::{Device, Tensor};
//! /// A toy model whose next-token distribution does not depend on the prefix.
//! struct Fixed(Tensor);
//! impl StepDecoder for Fixed {
//!     type State = ();
//!     fn step(&self, tokens: &[u32], _: &()) -> attend::Result<(Tensor, ())> {
//!         Ok((self.0.broadcast_as((tokens.len(), 3))?.contiguous()?, ()))
//!     }
//!     fn select(&self, _: &(), _: &[usize]) -> attend::Result<()> { Ok(()) }
//! }
//! # fn main() -> attend::Result<()> {
//! let logp = Tensor::new(&[[0.5f32, 0.3, 0.2]], &Device::Cpu)?.log()?; // token 2 is eos
//! let cfg = BeamConfig { beam: 3, max_len: 3, length_penalty: 0.0, bos: 0, eos: 2 };
//! let best = &beam_search(&Fixed(logp.clone()), (), &cfg)?[0];
//! assert_eq!(best.tokens, [2]); // ending at once beats any longer output under raw log-probability
//! let per_token = BeamConfig { length_penalty: 1.0, ..cfg };
//! let best = &beam_search(&Fixed(logp), (), &per_token)?[0];
//! assert_eq!((best.tokens.as_slice(), best.finished), (&[0, 0, 0][..], false)); // cut by max_len
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};

use crate::{ensure, Result};

/// A model that extends a batch of hypotheses by one token.
pub trait StepDecoder {
    /// Whatever the model carries between steps (recurrent state, caches, coverage), batched over hypotheses.
    type State: Clone;

    /// Log-probabilities `(K, V)` of the next token after each hypothesis's last token `tokens[k]`, and the state
    /// after the step.
    fn step(&self, tokens: &[u32], state: &Self::State) -> Result<(Tensor, Self::State)>;

    /// The state of hypotheses `indices` (rows picked, repeated and reordered).
    fn select(&self, state: &Self::State, indices: &[usize]) -> Result<Self::State>;
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamConfig {
    /// Hypotheses kept, `K ≥ 1` (1 is greedy).
    pub beam: usize,
    /// Most tokens generated, `eos` included.
    pub max_len: usize,
    /// `α` of `log p / len^α`.
    pub length_penalty: f64,
    pub bos: u32,
    pub eos: u32,
}

/// A decoded output.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens (`bos` left out; ends with `eos` if finished).
    pub tokens: Vec<u32>,
    /// Summed log-probability.
    pub logprob: f64,
    /// `logprob / len^α`, what hypotheses are ranked by.
    pub score: f64,
    pub finished: bool,
}

/// Beam search from `init`, the state of one source (batch 1). Returns up to `beam` hypotheses, best first.
pub fn beam_search<D: StepDecoder>(model: &D, init: D::State, cfg: &BeamConfig) -> Result<Vec<Hypothesis>> {
    ensure!(cfg.beam > 0 && cfg.max_len > 0, "beam search", "beam and max_len must be positive, got {cfg:?}");
    let ranked = |tokens: Vec<u32>, logprob: f64, finished: bool| {
        let len = tokens.len().max(1) as f64;
        Hypothesis { score: logprob / len.powf(cfg.length_penalty), tokens, logprob, finished }
    };
    let mut alive: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
    let mut state = init;
    let mut done: Vec<Hypothesis> = Vec::new();
    for _ in 0..cfg.max_len {
        let last: Vec<u32> = alive.iter().map(|(t, _)| *t.last().unwrap_or(&cfg.bos)).collect();
        let (logp, next) = model.step(&last, &state)?;
        let logp: Vec<Vec<f64>> = logp.to_dtype(DType::F64)?.to_vec2()?;
        // Every extension of every hypothesis, best first; ties keep the earlier hypothesis and the smaller token.
        let mut cands: Vec<(usize, u32, f64)> = Vec::with_capacity(alive.len() * logp[0].len());
        for (k, (_, lp)) in alive.iter().enumerate() {
            cands.extend(logp[k].iter().enumerate().map(|(v, &l)| (k, v as u32, lp + l)));
        }
        cands.sort_by(|a, b| b.2.total_cmp(&a.2));
        let mut keep = Vec::new();
        let mut next_alive = Vec::new();
        for (k, v, lp) in cands.into_iter().take(cfg.beam) {
            let mut tokens = alive[k].0.clone();
            tokens.push(v);
            if v == cfg.eos {
                done.push(ranked(tokens, lp, true));
            } else {
                keep.push(k);
                next_alive.push((tokens, lp));
            }
        }
        if done.len() >= cfg.beam || next_alive.is_empty() {
            alive = next_alive;
            break;
        }
        state = model.select(&next, &keep)?;
        alive = next_alive;
    }
    // Hypotheses cut by max_len compete too, marked unfinished.
    done.extend(alive.into_iter().map(|(t, lp)| ranked(t, lp, false)));
    done.sort_by(|a, b| b.score.total_cmp(&a.score));
    done.truncate(cfg.beam);
    Ok(done)
}

/// Greedy decoding of a batch: each hypothesis takes its most likely token until `eos` or `max_len`. Returns the
/// tokens of each (`eos` included when reached).
pub fn greedy<D: StepDecoder>(
    model: &D,
    init: D::State,
    batch: usize,
    bos: u32,
    eos: u32,
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut last = vec![bos; batch];
    let mut state = init;
    for _ in 0..max_len {
        let (logp, next) = model.step(&last, &state)?;
        let best: Vec<u32> = logp.argmax(1)?.to_dtype(DType::U32)?.to_vec1()?;
        for (b, &t) in best.iter().enumerate() {
            if out[b].last() != Some(&eos) {
                out[b].push(t);
                last[b] = t;
            }
        }
        state = next;
        if out.iter().all(|o| o.last() == Some(&eos)) {
            break;
        }
    }
    Ok(out)
}
