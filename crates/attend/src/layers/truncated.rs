//! Truncated (windowed) self-attention: each position attends to at most `left` positions before it and `right`
//! after it, as streaming speech models do (a bounded look-back keeps the cost per frame constant). A thin use of
//! the core's window mask on [`MultiHeadAttention`]; the streaming form processes a stream chunk by chunk with a
//! cache that never holds more than `left` positions.
//!
//! # Shapes
//! - `x`: `(B, T, C)` → `(B, T, C)`; a streamed chunk `(B, Tc, C)` → `(B, Tc, C)`
//!
//! ```
//! use attend::attention::MultiHeadAttentionConfig;
//! use attend::layers::truncated::TruncatedSelfAttention;
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> attend::Result<()> {
//! let dev = Device::Cpu;
//! let vm = VarMap::new();
//! let cfg = MultiHeadAttentionConfig::new(8, 2);
//! let layer = TruncatedSelfAttention::new(&cfg, 3, 0, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
//! let x = Tensor::randn(0f32, 1., (1, 10, 8), &dev)?;
//! let whole = layer.forward(&x)?;
//! let mut stream = layer.stream();
//! let parts = [stream.push(&layer, &x.narrow(1, 0, 4)?)?, stream.push(&layer, &x.narrow(1, 4, 6)?)?];
//! let streamed = Tensor::cat(&parts, 1)?;
//! assert!((streamed - whole)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
//! assert!(stream.cached() <= 3); // never more than the look-back
//! # Ok(()) }
//! ```

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::attention::{KvCache, Mask, MhaOptions, MultiHeadAttention, MultiHeadAttentionConfig};
use crate::{ensure, Result};

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct TruncatedSelfAttention {
    mha: MultiHeadAttention,
    left: usize,
    right: usize,
}

impl TruncatedSelfAttention {
    /// Multi-head self-attention over the window `[i − left, i + right]` (`right = 0`: causal, streamable).
    pub fn new(config: &MultiHeadAttentionConfig, left: usize, right: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { mha: MultiHeadAttention::new(config, vb)?, left, right })
    }

    pub fn attention(&self) -> &MultiHeadAttention {
        &self.mha
    }

    fn mask(&self) -> Mask {
        if self.right == 0 {
            Mask::causal().with_window(self.left, 0)
        } else {
            Mask::none().with_window(self.left, self.right)
        }
    }

    /// The whole sequence at once.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.mha.forward(x, None, &self.mask(), None, &MhaOptions::default())?.out)
    }

    /// A stream of chunks (causal windows only).
    pub fn stream(&self) -> TruncatedStream {
        TruncatedStream { cache: KvCache::new(None) }
    }
}

/// The state of a stream: the keys and values of the last `left` positions.
#[derive(Clone, Debug)]
pub struct TruncatedStream {
    cache: KvCache,
}

impl TruncatedStream {
    /// Positions held in the cache (at most the look-back).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Attends a chunk over the cached look-back and itself; keeps the last `left` positions for the next chunk.
    pub fn push(&mut self, layer: &TruncatedSelfAttention, chunk: &Tensor) -> Result<Tensor> {
        ensure!(
            layer.right == 0,
            "truncated self-attention",
            "streaming needs a causal window (right = 0), got right = {}: a position would wait for {} future frames",
            layer.right,
            layer.right
        );
        let out = layer.mha.forward(chunk, None, &layer.mask(), Some(&mut self.cache), &MhaOptions::default())?.out;
        // Bound the cache: only the last `left` positions can be seen by any future query.
        let n = self.cache.len();
        if n > layer.left {
            let (k, v) = (self.cache.k()?.expect("filled"), self.cache.v()?.expect("filled"));
            let keep = layer.left;
            let mut fresh = KvCache::new(None);
            if keep > 0 {
                fresh
                    .append(&k.narrow(2, n - keep, keep)?.contiguous()?, &v.narrow(2, n - keep, keep)?.contiguous()?)?;
            }
            self.cache = fresh;
        }
        Ok(out)
    }
}
