//! `attend op attention`: the attention core, `o = softmax(mask(scale · Q Kᵀ)) V`, on tensors from a safetensors file
//! (or a built-in example), with its log-sum-exp and, given an upstream gradient `do`, the gradients of
//! `Σ o ⊙ do` with respect to `q`, `k`, `v` (and an additive `mask`), computed by candle's autograd.
//!
//! # Shapes
//! - in: `q (B, H, T, D)`, `k (B, Hkv, S, D)`, `v (B, Hkv, S, Dv)` (f32, `H % Hkv == 0`); optional `mask`
//!   broadcastable to `(B, H, T, S)` (u8 with 1 = may attend, or f32 added to the scores); optional `do (B, H, T, Dv)`
//! - out: `o (B, H, T, Dv)`, `lse (B, H, T)` (−∞ for a query that sees no key); with `do`: `dq`, `dk`, `dv` of the
//!   shapes of `q`, `k`, `v`, and `dmask` of the shape of an f32 mask

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use attend::attention::{attention_with, AttentionImpl, AttentionOptions, Mask, MaskTensor};
use candle_core::{DType, Device, Tensor, Var};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::errors;
use crate::tensors::{write_atomic, TensorFile};

/// Which implementation of the attention core runs (`--impl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImplArg {
    /// The flash kernel: tiled online softmax, forward and backward, memory linear in the sequence length (calls it
    /// cannot serve, such as a learned additive mask, run `materialized`).
    Fused,
    /// Fused masked softmax with hand-written backward passes between candle matmuls; materialises (B, H, T, S).
    Materialized,
    /// Composed from plain differentiable candle ops: the oracle for the other implementations.
    Reference,
}

impl From<ImplArg> for AttentionImpl {
    fn from(a: ImplArg) -> Self {
        match a {
            ImplArg::Fused => AttentionImpl::Fused,
            ImplArg::Reference => AttentionImpl::Reference,
            ImplArg::Materialized => AttentionImpl::Materialized,
        }
    }
}

impl ImplArg {
    pub fn name(self) -> &'static str {
        match self {
            ImplArg::Fused => "fused",
            ImplArg::Reference => "reference",
            ImplArg::Materialized => "materialized",
        }
    }
}

/// `--window LEFT,RIGHT`: keys from `LEFT` before to `RIGHT` after the (end-aligned) diagonal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    left: usize,
    right: usize,
}

fn parse_window(s: &str) -> std::result::Result<Window, String> {
    let bad = || format!("expected LEFT,RIGHT as two non-negative integers such as 128,0, got `{s}`");
    let (l, r) = s.split_once(',').ok_or_else(bad)?;
    let left = l.trim().parse().map_err(|_| bad())?;
    let right = r.trim().parse().map_err(|_| bad())?;
    Ok(Window { left, right })
}

#[derive(Debug, Args)]
#[command(after_help = "\
Without --input a built-in example runs (B=2, H=8, Hkv=2, T=S=256, D=Dv=64, seeded normal q, k, v, do), \
so the command needs no files: `attend op attention --causal`.

Mask order: s = scale·q·k → soft-cap c·tanh(s/c) → + ALiBi + additive mask → masked keys get −inf → softmax. \
A query that sees no key gets o = 0, lse = −inf and zero gradients.")]
pub struct AttentionArgs {
    /// Safetensors file with `q` (B,H,T,D), `k` (B,Hkv,S,D), `v` (B,Hkv,S,Dv) in f32, optional `mask` (u8 with
    /// 1 = may attend, or f32 additive; broadcastable to (B,H,T,S)) and optional `do` (B,H,T,Dv). Omit it to run a
    /// built-in example.
    #[arg(long, value_name = "IN.safetensors", requires = "output")]
    input: Option<PathBuf>,
    /// Where to write `o`, `lse` and, when `do` is given, `dq`, `dk`, `dv` (and `dmask` for an f32 mask).
    /// Written atomically. Optional only for the built-in example.
    #[arg(long, value_name = "OUT.safetensors")]
    output: Option<PathBuf>,
    /// Implementation of the attention core.
    #[arg(long = "impl", value_enum, value_name = "IMPL", default_value_t = ImplArg::Fused)]
    implementation: ImplArg,
    /// Causal mask: query i sees key j iff j ≤ i + S − T (end-aligned diagonal).
    #[arg(long)]
    causal: bool,
    /// Local window: query i sees keys d−LEFT ..= d+RIGHT around its diagonal d = i + S − T.
    #[arg(long, value_name = "LEFT,RIGHT", value_parser = parse_window, allow_hyphen_values = true)]
    window: Option<Window>,
    /// Multiplies q·k [default: 1/√D].
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    scale: Option<f64>,
    /// Soft-cap the scaled scores: s → C·tanh(s/C), before any bias.
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    softcap: Option<f64>,
    /// ALiBi biases with the paper's slopes for H heads.
    #[arg(long)]
    alibi: bool,
    /// Print a one-line JSON summary instead of the human-readable one.
    #[arg(long)]
    json: bool,
}

/// The inputs of one run and where they came from.
struct Inputs {
    /// The input file, or `built-in example`: prefixes every error message.
    source: String,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Option<Tensor>,
    dout: Option<Tensor>,
}

pub fn run(args: AttentionArgs) -> Result<()> {
    let device = Device::Cpu;
    let inputs = match &args.input {
        Some(path) => read_inputs(TensorFile::open(path, &["q", "k", "v", "mask", "do"], &device)?)?,
        None => example(&device)?,
    };
    let Inputs { source, q, k, v, mask, dout } = inputs;

    // 1. Leaves: with an upstream gradient, q, k, v (and an additive mask) become variables for autograd.
    let grad = dout.is_some();
    let leaf = |t: &Tensor| -> Result<Tensor> {
        Ok(if grad {
            Var::from_tensor(t).map_err(|e| anyhow!(errors::candle(&e)))?.as_tensor().clone()
        } else {
            t.clone()
        })
    };
    let (q, k, v) = (leaf(&q)?, leaf(&k)?, leaf(&v)?);
    let mask_tensor = match mask {
        None => None,
        Some(m) if m.dtype() == DType::U8 => Some(MaskTensor::Keep(m)),
        Some(m) if m.dtype() == DType::F32 => Some(MaskTensor::Additive(leaf(&m)?)),
        Some(m) => bail!(
            "{source}: tensor `mask` {:?} has dtype {}, expected u8 (1 = may attend) or f32 (additive)",
            m.dims(),
            m.dtype().as_str()
        ),
    };

    // 2. The mask description, from the flags and the file.
    let mut m = Mask::none();
    if args.causal {
        m = m.with_causal();
    }
    if let Some(w) = args.window {
        m = m.with_window(w.left, w.right);
    }
    if args.alibi {
        m = m.with_alibi();
    }
    if let Some(c) = args.softcap {
        m = m.with_softcap(c);
    }
    if let Some(t) = &mask_tensor {
        m = m.with_tensor(t.clone());
    }
    let opts = AttentionOptions {
        scale: args.scale,
        need_lse: true,
        implementation: args.implementation.into(),
        ..Default::default()
    };

    // 3. Forward.
    let fail = |e: attend::Error| anyhow!("{source}: {}", errors::attend(&e));
    let candle_fail = |e: candle_core::Error| anyhow!("{source}: {}", errors::candle(&e));
    let start = Instant::now();
    let res = attention_with(&q, &k, &v, &m, &opts).map_err(fail)?;
    let forward_s = start.elapsed().as_secs_f64();
    let o = res.out; // (B, H, T, Dv)
    let lse = res.lse.ok_or_else(|| anyhow!("{source}: attention returned no log-sum-exp"))?; // (B, H, T)

    // 4. Backward of L = Σ o ⊙ do: dL/do = do, so the gradients are those of the forward pulled back from `do`.
    let mut outputs: Vec<(&str, Tensor)> = vec![("o", o.detach()), ("lse", lse.detach())];
    let mut backward_s = None;
    let dout_dims = dout.as_ref().map(|t| t.dims().to_vec());
    if let Some(dout) = dout {
        if dout.dims() != o.dims() {
            bail!(
                "{source}: tensor `do` has shape {:?}, expected (B, H, T, Dv) = {:?}, the shape of o",
                dout.dims(),
                o.dims()
            );
        }
        let start = Instant::now();
        // The loss owns `do` and hands it to the gradient store: one tensor of its size through the backward.
        let loss = attend::ops::vjp_loss(&o, dout).map_err(|e| anyhow!("{source}: {e}"))?;
        let grads = loss.backward().map_err(candle_fail)?;
        backward_s = Some(start.elapsed().as_secs_f64());
        let grad_of = |x: &Tensor| -> Result<Tensor> {
            match grads.get(x) {
                Some(g) => Ok(g.clone()),
                None => x.zeros_like().map_err(candle_fail), // no path from x to o
            }
        };
        outputs.push(("dq", grad_of(&q)?));
        outputs.push(("dk", grad_of(&k)?));
        outputs.push(("dv", grad_of(&v)?));
        if let Some(MaskTensor::Additive(mt)) = &mask_tensor {
            outputs.push(("dmask", grad_of(mt)?));
        }
    }

    // 5. Save, then report.
    let (_, _, _, d) = q.dims4().map_err(candle_fail)?;
    let scale = args.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mask_text = describe_mask(&args, mask_tensor.as_ref());
    if let Some(path) = &args.output {
        let metadata = HashMap::from([
            ("producer".to_string(), "attend op attention".to_string()),
            ("impl".to_string(), args.implementation.name().to_string()),
            ("mask".to_string(), mask_text.clone()),
            ("scale".to_string(), scale.to_string()),
        ]);
        let named: Vec<(&str, &Tensor)> = outputs.iter().map(|(n, t)| (*n, t)).collect();
        write_atomic(path, &named, metadata)?;
    }

    let mut inputs: Vec<(&str, &Tensor)> = vec![("q", &q), ("k", &k), ("v", &v)];
    if let Some(t) = &mask_tensor {
        inputs.push(("mask", t.tensor()));
    }
    let mut inputs: Vec<(String, Vec<usize>)> =
        inputs.iter().map(|(n, t)| (n.to_string(), t.dims().to_vec())).collect();
    if let Some(dims) = dout_dims {
        inputs.push(("do".to_string(), dims));
    }
    let stats: Vec<(&str, Vec<usize>, Stats)> = outputs
        .iter()
        .map(|(n, t)| Ok((*n, t.dims().to_vec(), Stats::of(t).map_err(candle_fail)?)))
        .collect::<Result<_>>()?;

    let summary = Summary {
        source: &source,
        input: args.input.as_ref().map(|p| p.display().to_string()),
        output: args.output.as_ref().map(|p| p.display().to_string()),
        implementation: args.implementation.name(),
        mask: &mask_text,
        scale,
        scale_is_default: args.scale.is_none(),
        inputs,
        forward_s,
        backward_s,
        outputs: stats,
    };
    if args.json {
        println!("{}", summary.json());
    } else {
        print!("{}", summary.human());
    }
    Ok(())
}

/// Reads and checks `q`, `k`, `v` (f32, rank 4) and the optional `mask` and `do` of an input file. Shape agreement
/// between them is checked by the attention core, whose errors name the shapes.
fn read_inputs(mut file: TensorFile) -> Result<Inputs> {
    let q = file.require_f32_4d("q", "(B, H, T, D)")?;
    let k = file.require_f32_4d("k", "(B, Hkv, S, D)")?;
    let v = file.require_f32_4d("v", "(B, Hkv, S, Dv)")?;
    let mask = file.take("mask");
    let dout = file.optional_f32_4d("do", "(B, H, T, Dv)")?;
    Ok(Inputs { source: file.path().display().to_string(), q, k, v, mask, dout })
}

/// The built-in example: seeded standard-normal `q`, `k`, `v`, `do` with grouped-query heads, no mask tensor.
fn example(device: &Device) -> Result<Inputs> {
    const B: usize = 2;
    const H: usize = 8;
    const HKV: usize = 2;
    const T: usize = 256;
    const S: usize = 256;
    const D: usize = 64;
    const DV: usize = 64;
    let gen = |shape: (usize, usize, usize, usize), seed: u64| -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(normal_samples(n, seed), shape, device).map_err(|e| anyhow!(errors::candle(&e)))
    };
    Ok(Inputs {
        source: "built-in example".to_string(),
        q: gen((B, H, T, D), 1)?,
        k: gen((B, HKV, S, D), 2)?,
        v: gen((B, HKV, S, DV), 3)?,
        mask: None,
        dout: Some(gen((B, H, T, DV), 4)?),
    })
}

/// `n` standard-normal samples from a SplitMix64 stream (Box–Muller), identical on every machine and run.
pub fn normal_samples(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next_unit = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64 // in (0, 1): the logarithm below stays finite
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next_unit(), next_unit());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

fn describe_mask(args: &AttentionArgs, tensor: Option<&MaskTensor>) -> String {
    let mut parts = Vec::new();
    if args.causal {
        parts.push("causal".to_string());
    }
    if let Some(w) = args.window {
        parts.push(format!("window ({}, {})", w.left, w.right));
    }
    if args.alibi {
        parts.push("alibi".to_string());
    }
    if let Some(c) = args.softcap {
        parts.push(format!("softcap {c}"));
    }
    match tensor {
        Some(MaskTensor::Keep(t)) => parts.push(format!("bool tensor {}", shape_text(t.dims()))),
        Some(MaskTensor::Additive(t)) => parts.push(format!("additive tensor {}", shape_text(t.dims()))),
        None => {}
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(" + ")
    }
}

/// A checksum-like summary of one output: finite values only, with a count of the others (−∞ in `lse`).
struct Stats {
    sum: f64,
    mean_abs: f64,
    non_finite: usize,
}

impl Stats {
    fn of(t: &Tensor) -> candle_core::Result<Self> {
        let x: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let (mut sum, mut abs, mut finite) = (0f64, 0f64, 0usize);
        for &v in x.iter().filter(|v| v.is_finite()) {
            sum += v as f64;
            abs += v.abs() as f64;
            finite += 1;
        }
        Ok(Self { sum, mean_abs: if finite > 0 { abs / finite as f64 } else { 0.0 }, non_finite: x.len() - finite })
    }
}

struct Summary<'a> {
    /// What ran: the input file or `built-in example`.
    source: &'a str,
    /// The input file, `None` for the built-in example.
    input: Option<String>,
    output: Option<String>,
    implementation: &'static str,
    mask: &'a str,
    scale: f64,
    scale_is_default: bool,
    inputs: Vec<(String, Vec<usize>)>,
    forward_s: f64,
    backward_s: Option<f64>,
    outputs: Vec<(&'a str, Vec<usize>, Stats)>,
}

fn shape_text(dims: &[usize]) -> String {
    format!("({})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

impl Summary<'_> {
    fn human(&self) -> String {
        let mut s = format!("attend op attention: {} (impl {})\n", self.source, self.implementation);
        let inputs: Vec<String> = self.inputs.iter().map(|(n, d)| format!("{n} {}", shape_text(d))).collect();
        s += &format!("  inputs  {}\n", inputs.join("  "));
        s += &format!("  mask    {}\n", self.mask);
        s += &format!("  scale   {}{}\n", self.scale, if self.scale_is_default { " (1/√D)" } else { "" });
        let mut time = format!("forward {:.2} ms", self.forward_s * 1e3);
        if let Some(b) = self.backward_s {
            time += &format!(", backward {:.2} ms", b * 1e3);
        }
        s += &format!("  time    {time}\n");
        for (name, dims, st) in &self.outputs {
            s += &format!("  {name:<6}{:<20} sum {:>+14.6e}  mean|x| {:.6e}", shape_text(dims), st.sum, st.mean_abs);
            if st.non_finite > 0 {
                s += &format!("  non-finite {}", st.non_finite);
            }
            s += "\n";
        }
        match &self.output {
            Some(p) => s += &format!("  wrote   {p}\n"),
            None => s += "  output  not written (pass --output OUT.safetensors to save it)\n",
        }
        s
    }

    fn json(&self) -> String {
        let inputs: serde_json::Map<String, serde_json::Value> =
            self.inputs.iter().map(|(n, d)| (n.clone(), json!(d))).collect();
        let outputs: serde_json::Map<String, serde_json::Value> = self
            .outputs
            .iter()
            .map(|(n, d, st)| {
                (
                    n.to_string(),
                    json!({"shape": d, "sum": st.sum, "mean_abs": st.mean_abs, "non_finite": st.non_finite}),
                )
            })
            .collect();
        json!({
            "command": "op attention",
            "input": self.input,
            "output": self.output,
            "impl": self.implementation,
            "mask": self.mask,
            "scale": self.scale,
            "inputs": inputs,
            "forward_ms": self.forward_s * 1e3,
            "backward_ms": self.backward_s.map(|b| b * 1e3),
            "outputs": outputs,
        })
        .to_string()
    }
}
