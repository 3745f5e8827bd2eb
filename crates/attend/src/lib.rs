//! # attend — attention mechanisms and attention models on candle
//!
//! Every layer and model in this crate calls one attention core, [`attention::attention`], with one typed mask
//! description, [`attention::Mask`]. Fused ops in [`ops`] carry hand-written backward passes and sit beside composed
//! reference twins built from plain differentiable candle ops.
//!
//! ## Dimension vocabulary
//!
//! Shape comments (`// (B, H, T, D)`) and `# Shapes` sections throughout the crate use these names:
//!
//! | name | meaning |
//! |------|---------|
//! | `B`  | batch size |
//! | `T`  | query length (target positions) |
//! | `S`  | key/value length (source positions; `S = T` in self-attention without a cache) |
//! | `H`  | query heads |
//! | `Hkv`| key/value heads (`H % Hkv == 0`; `G = H / Hkv` query heads share one K/V head) |
//! | `D`  | head dimension of queries and keys |
//! | `Dv` | head dimension of values (usually `D`) |
//! | `C`  | model (embedding) dimension, `C = H · D` in the usual layouts |
//! | `V`  | vocabulary size |
//! | `N`  | rows of a flattened batch (`N = B · T`) |

pub mod alloc;
pub mod attention;
pub mod checkpoint;
pub mod decode;
pub mod error;
pub mod generate;
pub mod layers;
pub mod models;
pub mod ops;
pub mod position;
pub mod rng;
pub mod rnn;
pub mod train;
pub mod viz;

pub(crate) use error::{bail, ensure};
pub use error::{Error, Result};
