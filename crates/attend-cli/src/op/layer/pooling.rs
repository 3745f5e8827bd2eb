//! `coattention`, `han-pool`, `spatial`, `din`: the layers that pool one sequence (or grid, or history) for a query.

use anyhow::{bail, Result};
use attend::layers::coattention::CoAttention;
use attend::layers::din::{Activation, DinAttention, DinScore};
use attend::layers::han::AttentionPooling;
use attend::layers::spatial::{SpatialAttention, SpatialConfig};
use candle_core::Tensor;

use super::Ctx;

pub fn coattention(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let x1 = ctx.input("x1", "(B, T1, C)", 3)?;
    let x2 = ctx.input("x2", "(B, T2, C)", 3)?;
    let (b, t1, c) = x1.dims3()?;
    let t2 = x2.dim(1)?;
    let l1 = ctx.lengths("lengths1", b, t1, "T1")?;
    let l2 = ctx.lengths("lengths2", b, t2, "T2")?;
    let layer = if ctx.params.contains("weight") {
        CoAttention::bilinear(c, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?
    } else {
        CoAttention::plain()
    };
    let o = layer.forward(&x1, &x2, l1.as_deref(), l2.as_deref()).map_err(|e| ctx.layer_err(e))?;
    Ok(vec![
        ("weights1".into(), o.weights1),
        ("attended1".into(), o.attended1),
        ("weights2".into(), o.weights2),
        ("attended2".into(), o.attended2),
    ])
}

pub fn han_pool(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let x = ctx.input("x", "(B, T, C)", 3)?;
    let (b, t, c) = x.dims3()?;
    let lengths = ctx.lengths("lengths", b, t, "T")?;
    let Some(u) = ctx.params.peek("u_omega") else { bail!("{}: missing parameter `u_omega` (A)", ctx.param_source) };
    let layer = AttentionPooling::new(c, u.dim(0)?, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&x, lengths.as_deref()).map_err(|e| ctx.layer_err(e))?;
    Ok(vec![("pooled".into(), o.pooled), ("alphas".into(), o.alphas)])
}

pub fn spatial(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let features = ctx.input("features", "(B, L, E)", 3)?;
    let hidden = ctx.input("hidden", "(B, Dd)", 2)?;
    let Some(w) = ctx.params.peek("encoder_att.weight") else {
        bail!("{}: missing parameter `encoder_att.weight` (A, E)", ctx.param_source)
    };
    let cfg = SpatialConfig { encoder_dim: features.dim(2)?, decoder_dim: hidden.dim(1)?, attention_dim: w.dim(0)? };
    let layer = SpatialAttention::new(cfg, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&features, &hidden).map_err(|e| ctx.layer_err(e))?;
    Ok(vec![("context".into(), o.context), ("alpha".into(), o.alpha), ("beta".into(), o.beta)])
}

pub fn din(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let history = ctx.input("history", "(B, S, C)", 3)?;
    let target = ctx.input("target", "(B, C)", 2)?;
    let (b, s, c) = history.dims3()?;
    let lengths = ctx.lengths("lengths", b, s, "S")?;
    let score = match ctx.str_opt("normalize", "none")?.as_str() {
        "softmax" => DinScore::ScaledDot,
        "none" => {
            let activation = Activation::parse(&ctx.str_opt("activation", "sigmoid")?).map_err(|e| ctx.layer_err(e))?;
            // The hidden widths are those of the parameters: mlp.0 … mlp.{n−1}, the last of width 1.
            let mut hidden = Vec::new();
            while let Some(w) = ctx.params.peek(&format!("mlp.{}.weight", hidden.len())) {
                hidden.push(w.dim(0)?);
            }
            if hidden.pop() != Some(1) {
                bail!(
                    "{}: the MLP `mlp.{{k}}.weight` must end in a layer of width 1 (found widths {hidden:?})",
                    ctx.param_source
                );
            }
            DinScore::Mlp { hidden, activation }
        }
        other => bail!("din: option `normalize` = \"{other}\" must be \"none\" or \"softmax\""),
    };
    let layer = DinAttention::new(c, score, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&history, &target, lengths.as_deref()).map_err(|e| ctx.layer_err(e))?;
    Ok(vec![("pooled".into(), o.pooled), ("weights".into(), o.weights)])
}
