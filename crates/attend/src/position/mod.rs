//! Positional information: absolute encodings added to embeddings (sinusoidal, learned), rotations applied to
//! queries and keys (RoPE), and biases added to attention scores (ALiBi, T5 relative buckets).

pub mod alibi;
pub mod learned;
pub mod relative;
pub mod rope;
pub mod sinusoidal;
