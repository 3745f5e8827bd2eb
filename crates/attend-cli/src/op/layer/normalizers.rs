//! `sparsemax`, `entmax15`: `scores (…, S)` → `weights (…, S)` over the last axis.

use anyhow::{bail, Result};
use attend::attention::classic::Normalizer;
use candle_core::Tensor;

use super::Ctx;

fn normalise(ctx: &mut Ctx, n: Normalizer) -> Result<Vec<(String, Tensor)>> {
    let Some(scores) = ctx.inputs.get("scores").cloned() else {
        bail!("{}: missing tensor `scores` (…, S)", ctx.input_source)
    };
    let scores = ctx.input("scores", &format!("(…, S) of rank {}", scores.rank().max(1)), scores.rank().max(1))?;
    let w = n.apply(&scores, None).map_err(|e| ctx.layer_err(e))?;
    Ok(vec![("weights".into(), w)])
}

pub fn sparsemax(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    normalise(ctx, Normalizer::Sparsemax)
}

pub fn entmax15(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    normalise(ctx, Normalizer::Entmax15)
}
