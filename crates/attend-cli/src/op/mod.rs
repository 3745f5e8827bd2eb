//! `attend op …`: one library op at a time, on tensors from a file, with outputs (and gradients) saved to a file.
//! Useful to check the library against another framework and to script single measurements.

pub mod attention;
pub mod layer;

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum OpCommand {
    /// softmax(mask(scale · Q Kᵀ)) V through the library's attention core, with log-sum-exp and gradients.
    Attention(attention::AttentionArgs),
    /// One classic layer (recurrent, global/local, co-attention, pooling, spatial, recommender, graph attention,
    /// sparse normalisers) with parameters under the reference implementation's names; docs/layers.md.
    Layer(layer::LayerArgs),
}

pub fn run(cmd: OpCommand) -> Result<()> {
    match cmd {
        OpCommand::Attention(args) => attention::run(args),
        OpCommand::Layer(args) => layer::run(args),
    }
}
