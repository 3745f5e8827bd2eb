//! `luong-dot`, `luong-general`, `luong-concat`, `bahdanau`, `luong-local-p`: `source (B, T, C)`,
//! `memory_bank (B, S, C)` [+ `memory_lengths (B)`] → `attn_h`, `align`, with OpenNMT-py's parameter names.

use anyhow::{bail, Result};
use attend::attention::classic::Normalizer;
use attend::layers::global::{GlobalAttention, GlobalAttentionConfig, GlobalType};
use attend::layers::local::{LocalAttention, LocalAttentionConfig, LocalMode};
use candle_core::Tensor;

use super::Ctx;

fn inputs(ctx: &mut Ctx) -> Result<(Tensor, Tensor, Option<Vec<usize>>, usize)> {
    let source = ctx.input("source", "(B, T, C)", 3)?;
    let memory = ctx.input("memory_bank", "(B, S, C)", 3)?;
    let (b, _, c) = source.dims3()?;
    let (mb, s, mc) = memory.dims3()?;
    if mb != b || mc != c {
        bail!(
            "{}: source {:?} and memory_bank {:?} must agree on B and C",
            ctx.input_source,
            source.dims(),
            memory.dims()
        );
    }
    let lengths = ctx.lengths("memory_lengths", b, s, "S")?;
    ctx.check_width("dim", c)?;
    Ok((source, memory, lengths, c))
}

fn global(ctx: &mut Ctx, kind: GlobalType) -> Result<Vec<(String, Tensor)>> {
    let (source, memory, lengths, dim) = inputs(ctx)?;
    let normalizer = Normalizer::parse(&ctx.str_opt("normalizer", "softmax")?).map_err(|e| ctx.layer_err(e))?;
    let layer = GlobalAttention::new(GlobalAttentionConfig { dim, kind, normalizer }, ctx.var_builder())
        .map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&source, &memory, lengths.as_deref()).map_err(|e| ctx.layer_err(e))?;
    Ok(vec![("attn_h".into(), o.attn_h), ("align".into(), o.align)])
}

pub fn luong_dot(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    global(ctx, GlobalType::Dot)
}

pub fn luong_general(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    global(ctx, GlobalType::General)
}

pub fn luong_concat(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    global(ctx, GlobalType::Concat)
}

pub fn bahdanau(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    global(ctx, GlobalType::Mlp)
}

pub fn luong_local_p(ctx: &mut Ctx) -> Result<Vec<(String, Tensor)>> {
    let (source, memory, lengths, dim) = inputs(ctx)?;
    let window = ctx.usize_opt("window", None)?;
    let cfg = LocalAttentionConfig { dim, window, mode: LocalMode::Predictive };
    let layer = LocalAttention::new(cfg, ctx.var_builder()).map_err(|e| ctx.layer_err(e))?;
    let o = layer.forward(&source, &memory, lengths.as_deref(), 0).map_err(|e| ctx.layer_err(e))?;
    Ok(vec![("attn_h".into(), o.attn_h), ("align".into(), o.align)])
}
