//! Dropout streams and the training flag: what a training loop needs of every layer with dropout.
//!
//! One [`DropoutRng`] belongs to a model and is made from one seed. It hands each layer a [`DropoutStream`] of its
//! own (layer ids in the order the model asks for them), and a layer draws a fresh seed for each call from
//! `(seed, layer, step, call)`: the step is the model's optimiser step (the loop calls [`DropoutRng::next_step`];
//! a resumed run sets it back with [`DropoutRng::set_step`]), the call counts the layer's calls within that step
//! (a recurrent decoder or a stack that shares one layer calls it many times). So two layers, two steps and two
//! calls never share a mask, and one seed reproduces a whole run. (Layers built without a generator draw streams
//! from [`DropoutRng::process_default`] in construction order: reproducible within one program, but a model that
//! must reproduce from its own seed passes its own generator.)
//!
//! The seeds feed the counter-based dropout of [`crate::ops::dropout`] and the attention core, whose masks depend
//! on `(seed, element index)` alone — not on threads or timing.
//!
//! ```
//! use attend::rng::DropoutRng;
//! let rng = DropoutRng::new(42);
//! let (a, b) = (rng.stream(), rng.stream()); // layers 0 and 1
//! let first = a.next_seed();
//! assert_ne!(first, b.next_seed()); // another layer, another mask
//! assert_ne!(first, a.next_seed()); // another call in the same step
//! rng.next_step();
//! let again = DropoutRng::new(42);
//! assert_eq!(again.stream().next_seed(), first); // one seed reproduces the run
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// SplitMix64's finaliser: a bijection with full avalanche, so neighbouring `(layer, step, call)` give unrelated
/// seeds.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug)]
struct Shared {
    seed: u64,
    step: AtomicU64,
    layers: AtomicU64,
}

/// The dropout generator of one model; clones share it. See the module docs.
#[derive(Clone, Debug)]
pub struct DropoutRng(Arc<Shared>);

impl DropoutRng {
    pub fn new(seed: u64) -> Self {
        DropoutRng(Arc::new(Shared { seed, step: AtomicU64::new(0), layers: AtomicU64::new(0) }))
    }

    /// The generator layers use when nobody gives them one (seed 0): each layer built still gets a stream of its
    /// own, in construction order. Models pass their own [`DropoutRng`] instead.
    pub fn process_default() -> &'static DropoutRng {
        static DEFAULT: OnceLock<DropoutRng> = OnceLock::new();
        DEFAULT.get_or_init(|| DropoutRng::new(0))
    }

    pub fn seed(&self) -> u64 {
        self.0.seed
    }

    /// A stream for the next layer (ids 0, 1, 2, … in the order of the calls).
    pub fn stream(&self) -> DropoutStream {
        let layer = self.0.layers.fetch_add(1, Ordering::Relaxed);
        DropoutStream { rng: self.clone(), layer, calls: Arc::new(Mutex::new((u64::MAX, 0))) }
    }

    /// The current optimiser step.
    pub fn step(&self) -> u64 {
        self.0.step.load(Ordering::Relaxed)
    }

    /// Advances to the next optimiser step: every layer draws new masks.
    pub fn next_step(&self) {
        self.0.step.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the step, e.g. to the step a checkpoint was saved at, so a resumed run draws the masks it would have.
    pub fn set_step(&self, step: u64) {
        self.0.step.store(step, Ordering::Relaxed);
    }
}

/// One layer's share of a [`DropoutRng`]; clones share the call counter (a layer and its clone are one layer).
#[derive(Clone, Debug)]
pub struct DropoutStream {
    rng: DropoutRng,
    layer: u64,
    /// `(step of the last call, calls made in that step)`.
    calls: Arc<Mutex<(u64, u64)>>,
}

impl DropoutStream {
    /// This layer's id within its generator.
    pub fn layer(&self) -> u64 {
        self.layer
    }

    /// The seed of this call: a function of `(seed, layer, step, call within the step)`.
    pub fn next_seed(&self) -> u64 {
        // The step is read under the lock, so two calls racing a `next_step` never both get call 0 of one step.
        let (step, call) = {
            let mut c = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let step = self.rng.step();
            if c.0 != step {
                *c = (step, 0);
            }
            c.1 += 1;
            (step, c.1 - 1)
        };
        mix(mix(mix(mix(self.rng.seed()) ^ self.layer) ^ step) ^ call)
    }
}

impl Default for DropoutStream {
    /// The next stream of [`DropoutRng::process_default`].
    fn default() -> Self {
        DropoutRng::process_default().stream()
    }
}

/// A layer's train/eval mode, held by the layer (not passed on every call) and switchable through `&self`, so a
/// model shared between threads or held behind `Arc` can still be put in training mode. Starts in evaluation:
/// loading a checkpoint and calling `forward` never drops anything by surprise.
#[derive(Debug, Default)]
pub struct TrainingFlag(AtomicBool);

impl TrainingFlag {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    pub fn set(&self, training: bool) {
        self.0.store(training, Ordering::Relaxed)
    }
}

impl Clone for TrainingFlag {
    fn clone(&self) -> Self {
        TrainingFlag(AtomicBool::new(self.get()))
    }
}

/// Counter-based random numbers for sampling layers (hard attention, Gumbel noise, glimpse locations): element `i`
/// of a draw with seed `s` depends on `(s, i)` only, so a seed from a [`DropoutStream`] reproduces it.
pub mod sample {
    use candle_core::{DType, Device, Shape, Tensor};

    use crate::Result;

    /// `U(0, 1)` strictly inside the interval (so `ln u` is finite): element `i` of the draw with seed `seed`.
    pub fn uniform_at(seed: u64, i: u64) -> f64 {
        (attend_kernels::dropout::random_bits(seed, i) as f64 + 0.5) / 4_294_967_296.0
    }

    /// Uniform samples in `(0, 1)`.
    pub fn uniform(seed: u64, shape: impl Into<Shape>, dtype: DType, dev: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f64> = (0..shape.elem_count() as u64).map(|i| uniform_at(seed, i)).collect();
        Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)
    }

    /// Standard normal samples (Box–Muller on two uniforms per element).
    pub fn normal(seed: u64, shape: impl Into<Shape>, dtype: DType, dev: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f64> = (0..shape.elem_count() as u64)
            .map(|i| {
                let (u1, u2) = (uniform_at(seed, 2 * i), uniform_at(seed, 2 * i + 1));
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)
    }

    /// Standard Gumbel samples, `−ln(−ln u)`.
    pub fn gumbel(seed: u64, shape: impl Into<Shape>, dtype: DType, dev: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f64> = (0..shape.elem_count() as u64).map(|i| -(-uniform_at(seed, i).ln()).ln()).collect();
        Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)
    }
}
