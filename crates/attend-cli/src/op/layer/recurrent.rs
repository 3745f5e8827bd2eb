//! `lstm`, `gru`, `elman`, `jordan`: `x (B, T, C)` [+ `lengths (B)`, `h0`, `c0`] → `output`, `h_n` [, `c_n`], with
//! PyTorch's parameter names.

use anyhow::Result;
use attend::rnn::{Elman, ElmanConfig, Gru, Jordan, JordanConfig, Lstm, Nonlinearity, RnnConfig};
use candle_core::Tensor;

use super::Ctx;

/// `x`, its lengths and the configuration the options describe.
fn common(ctx: &mut Ctx) -> Result<(Tensor, Option<Vec<usize>>, RnnConfig)> {
    let x = ctx.input("x", "(B, T, C)", 3)?;
    let (b, t, c) = x.dims3()?;
    let lengths = ctx.lengths("lengths", b, t, "T")?;
    let cfg = RnnConfig {
        input_size: c,
        hidden_size: ctx.usize_opt("hidden_size", None)?,
        num_layers: ctx.usize_opt("num_layers", Some(1))?,
        bidirectional: ctx.bool_opt("bidirectional", false)?,
        dropout: ctx.f64_opt("dropout", 0.0)?,
        bias: ctx.bool_opt("bias", true)?,
    };
    ctx.check_width("input_size", c)?;
    Ok((x, lengths, cfg))
}

fn outputs(output: Tensor, h_n: Tensor, c_n: Option<Tensor>) -> Vec<(String, Tensor)> {
    let mut v = vec![("output".to_string(), output), ("h_n".to_string(), h_n)];
    v.extend(c_n.map(|c| ("c_n".to_string(), c)));
    v
}

pub fn lstm(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let (x, lengths, cfg) = common(ctx)?;
    let (h0, c0) = (ctx.input_opt("h0", "(L·dirs, B, H)", 3)?, ctx.input_opt("c0", "(L·dirs, B, H)", 3)?);
    let layer = Lstm::new(cfg, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&x, lengths.as_deref(), h0.as_ref(), c0.as_ref()).map_err(|e| ctx.layer_err(e))?;
    Ok(outputs(o.output, o.h_n, o.c_n))
}

pub fn gru(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let (x, lengths, cfg) = common(ctx)?;
    let h0 = ctx.input_opt("h0", "(L·dirs, B, H)", 3)?;
    let layer = Gru::new(cfg, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&x, lengths.as_deref(), h0.as_ref()).map_err(|e| ctx.layer_err(e))?;
    Ok(outputs(o.output, o.h_n, None))
}

pub fn elman(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let (x, lengths, rnn) = common(ctx)?;
    let nonlinearity = Nonlinearity::parse(&ctx.str_opt("nonlinearity", "tanh")?).map_err(|e| ctx.layer_err(e))?;
    let h0 = ctx.input_opt("h0", "(L·dirs, B, H)", 3)?;
    let layer = Elman::new(ElmanConfig { rnn, nonlinearity }, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&x, lengths.as_deref(), h0.as_ref()).map_err(|e| ctx.layer_err(e))?;
    Ok(outputs(o.output, o.h_n, None))
}

pub fn jordan(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let x = ctx.input("x", "(B, T, C)", 3)?;
    let (b, t, c) = x.dims3()?;
    let lengths = ctx.lengths("lengths", b, t, "T")?;
    ctx.check_width("input_size", c)?;
    let cfg = JordanConfig {
        input_size: c,
        hidden_size: ctx.usize_opt("hidden_size", None)?,
        output_size: ctx.usize_opt("output_size", None)?,
    };
    let h0 = ctx.input_opt("h0", "(1, B, O)", 3)?;
    let layer = Jordan::new(cfg, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&x, lengths.as_deref(), h0.as_ref()).map_err(|e| ctx.layer_err(e))?;
    Ok(outputs(o.output, o.h_n, None))
}
