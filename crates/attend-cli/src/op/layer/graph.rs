//! `gat`, `gatv2`: `x (N, F)`, `edge_index (2, E)` int64 → `out`, `alpha (E', heads)`, with PyTorch Geometric's
//! parameter names.

use anyhow::Result;
use attend::layers::gat::{Gat, GatConfig, GatVersion};
use candle_core::Tensor;

use super::Ctx;

fn graph(ctx: &mut Ctx, version: GatVersion) -> Result<Vec<(String, Tensor)>> {
    let x = ctx.input("x", "(N, F)", 2)?;
    let edge_index = ctx.int_input("edge_index", "(2, E)", 2)?;
    let f = x.dim(1)?;
    ctx.check_width("in_channels", f)?;
    let cfg = GatConfig {
        heads: ctx.usize_opt("heads", Some(1))?,
        concat: ctx.bool_opt("concat", true)?,
        negative_slope: ctx.f64_opt("negative_slope", 0.2)?,
        add_self_loops: ctx.bool_opt("add_self_loops", true)?,
        dropout: ctx.f64_opt("dropout", 0.0)?,
        bias: ctx.bool_opt("bias", true)?,
        ..GatConfig::new(f, ctx.usize_opt("out_channels", None)?, version)
    };
    let layer = Gat::new(cfg, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&x, &edge_index).map_err(|e| ctx.layer_err(e))?;
    Ok(vec![("out".into(), o.out), ("alpha".into(), o.alpha)])
}

pub fn gat(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    graph(ctx, GatVersion::V1)
}

pub fn gatv2(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    graph(ctx, GatVersion::V2)
}
