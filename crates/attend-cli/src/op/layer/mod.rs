//! `attend op layer`: one classic layer on tensors from files, outputs (and gradients) to a file. The contract
//! (names of layers, parameters, inputs, outputs and options) is docs/layers.md; other tools call it.
//!
//! Each layer family has an adapter that reads what it needs from a [`Ctx`]; the Ctx records what was read, so a
//! parameter, input tensor or option that no adapter asked for is an error (a misspelt name never passes silently).

mod global;
mod graph;
mod normalizers;
mod pooling;
mod recurrent;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use attend::checkpoint::StrictTensors;
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use serde_json::{Map, Value};

use crate::errors;
use crate::tensors::{write_atomic, TensorFile};

/// The layers of the contract, with the adapter that runs each.
const LAYERS: &[(&str, Adapter)] = &[
    ("sparsemax", normalizers::sparsemax),
    ("entmax15", normalizers::entmax15),
    ("lstm", recurrent::lstm),
    ("gru", recurrent::gru),
    ("elman", recurrent::elman),
    ("jordan", recurrent::jordan),
    ("luong-dot", global::luong_dot),
    ("luong-general", global::luong_general),
    ("luong-concat", global::luong_concat),
    ("bahdanau", global::bahdanau),
    ("luong-local-p", global::luong_local_p),
    ("coattention", pooling::coattention),
    ("han-pool", pooling::han_pool),
    ("spatial", pooling::spatial),
    ("din", pooling::din),
    ("gat", graph::gat),
    ("gatv2", graph::gatv2),
];

/// Reads a layer's parameters, inputs and options from the context and returns its named outputs.
type Adapter = fn(&mut Ctx) -> Result<Vec<(String, Tensor)>>;

#[derive(Debug, Args)]
#[command(
    after_help = "Layers, parameter names, inputs, outputs and options: docs/layers.md. If the input file holds \
d<output> for an output, the gradients of Σ output ⊙ d<output> are written as d<name> for every float input and \
every parameter."
)]
pub struct LayerArgs {
    /// Layer name: sparsemax, entmax15, lstm, gru, elman, jordan, luong-dot, luong-general, luong-concat, bahdanau,
    /// luong-local-p, coattention, han-pool, spatial, din, gat, gatv2.
    #[arg(long, value_name = "NAME")]
    layer: String,
    /// Parameters under the reference implementation's state-dict names (left out: a layer without parameters).
    #[arg(long, value_name = "P.safetensors")]
    params: Option<PathBuf>,
    /// Input tensors, batch-first, f32 (int64 for lengths and edge indices), and upstream gradients d<output>.
    #[arg(long, value_name = "IN.safetensors")]
    input: PathBuf,
    /// Where to write the outputs (and gradients), atomically.
    #[arg(long, value_name = "OUT.safetensors")]
    output: PathBuf,
    /// Sizes and flags as a JSON object, e.g. '{"hidden_size": 8, "bidirectional": true}'.
    #[arg(long, value_name = "JSON")]
    options: Option<String>,
}

/// What an adapter reads: parameters (as a strict state dict), input tensors and options, each recorded when read.
pub struct Ctx {
    layer: &'static str,
    params: StrictTensors,
    param_source: String,
    /// Parameters as variables, for their gradients.
    param_vars: Vec<(String, Tensor)>,
    input_source: String,
    inputs: HashMap<String, Tensor>,
    read_inputs: BTreeSet<String>,
    options: Map<String, Value>,
    read_options: BTreeSet<String>,
    device: Device,
}

impl Ctx {
    /// A `VarBuilder` over the parameters (strict: missing or misshapen tensors are errors naming them).
    pub fn var_builder(&self) -> candle_nn::VarBuilder<'static> {
        self.params.var_builder(DType::F32, &self.device)
    }

    /// A float input `name` of rank `rank` (described as `layout`, e.g. `(B, T, C)`).
    pub fn input(&mut self, name: &str, layout: &str, rank: usize) -> Result<Tensor> {
        match self.input_opt(name, layout, rank)? {
            Some(t) => Ok(t),
            None => {
                let mut held: Vec<&str> = self.inputs.keys().map(String::as_str).collect();
                held.sort_unstable();
                bail!("{}: missing tensor `{name}` {layout}; the file holds {}", self.input_source, held.join(", "))
            }
        }
    }

    /// Like [`Self::input`] for an optional tensor.
    pub fn input_opt(&mut self, name: &str, layout: &str, rank: usize) -> Result<Option<Tensor>> {
        let Some(t) = self.inputs.get(name).cloned() else { return Ok(None) };
        self.read_inputs.insert(name.to_string());
        let src = &self.input_source;
        if t.dtype() != DType::F32 {
            bail!("{src}: tensor `{name}` {:?} has dtype {}, expected f32", t.dims(), t.dtype().as_str());
        }
        if t.rank() != rank {
            bail!("{src}: tensor `{name}` has shape {:?}, expected {layout}", t.dims());
        }
        Ok(Some(t))
    }

    /// An optional int64 `(B)` tensor of lengths, each in `0..=max`.
    pub fn lengths(&mut self, name: &str, b: usize, max: usize, axis: &str) -> Result<Option<Vec<usize>>> {
        let Some(t) = self.inputs.get(name).cloned() else { return Ok(None) };
        self.read_inputs.insert(name.to_string());
        let src = &self.input_source;
        if t.dtype() != DType::I64 || t.dims() != [b] {
            bail!(
                "{src}: tensor `{name}` {:?} {} must be int64 of shape ({b}) (one length per sequence)",
                t.dims(),
                t.dtype().as_str()
            );
        }
        let v: Vec<i64> = t.to_vec1()?;
        if let Some((i, &l)) = v.iter().enumerate().find(|(_, &l)| l < 0 || l as usize > max) {
            bail!("{src}: `{name}`[{i}] = {l} is outside 0..={max} ({axis} = {max})");
        }
        Ok(Some(v.into_iter().map(|l| l as usize).collect()))
    }

    /// An int64 tensor `name` of rank `rank`, read as it is.
    pub fn int_input(&mut self, name: &str, layout: &str, rank: usize) -> Result<Tensor> {
        let src = self.input_source.clone();
        let t = self.inputs.get(name).cloned().ok_or_else(|| anyhow!("{src}: missing tensor `{name}` {layout}"))?;
        self.read_inputs.insert(name.to_string());
        if t.dtype() != DType::I64 || t.rank() != rank {
            bail!("{src}: tensor `{name}` {:?} {} must be int64 {layout}", t.dims(), t.dtype().as_str());
        }
        Ok(t)
    }

    fn option(&mut self, key: &str) -> Option<Value> {
        self.read_options.insert(key.to_string());
        self.options.get(key).cloned()
    }

    fn bad_option(&self, key: &str, v: &Value, want: &str) -> anyhow::Error {
        anyhow!("{}: option `{key}` = {v} must be {want}", self.layer)
    }

    /// A positive integer option; `default` when absent (`None`: required).
    pub fn usize_opt(&mut self, key: &str, default: Option<usize>) -> Result<usize> {
        match (self.option(key), default) {
            (None, Some(d)) => Ok(d),
            (None, None) => bail!("{}: option `{key}` is required (--options '{{\"{key}\": …}}')", self.layer),
            (Some(v), _) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(self.bad_option(key, &v, "a positive integer")),
            },
        }
    }

    pub fn bool_opt(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.option(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad_option(key, &v, "true or false")),
        }
    }

    pub fn f64_opt(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.option(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad_option(key, &v, "a number")),
        }
    }

    pub fn str_opt(&mut self, key: &str, default: &str) -> Result<String> {
        match self.option(key) {
            None => Ok(default.to_string()),
            Some(v) => v.as_str().map(str::to_string).ok_or_else(|| self.bad_option(key, &v, "a string")),
        }
    }

    /// Checks a width option that the parameters or inputs already fix.
    pub fn check_width(&mut self, key: &str, actual: usize) -> Result<()> {
        let given = self.usize_opt(key, Some(actual))?;
        if given != actual {
            bail!("{}: option `{key}` = {given} disagrees with the tensors, which give {actual}", self.layer);
        }
        Ok(())
    }

    pub fn layer_err(&self, e: attend::Error) -> anyhow::Error {
        anyhow!("{}: {}", self.layer, errors::attend(&e))
    }
}

pub fn run(args: LayerArgs) -> Result<()> {
    let device = Device::Cpu;
    let Some(&(layer, adapter)) = LAYERS.iter().find(|(n, _)| *n == args.layer) else {
        let names: Vec<&str> = LAYERS.iter().map(|(n, _)| *n).collect();
        bail!("unknown layer `{}`; expected one of {}", args.layer, names.join(", "))
    };
    let options = match &args.options {
        None => Map::new(),
        Some(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => m,
            Ok(other) => bail!("--options must be a JSON object, got {other}"),
            Err(e) => bail!("--options is not valid JSON: {e}"),
        },
    };
    let inputs = TensorFile::open_all(&args.input, &device)?;
    let input_source = args.input.display().to_string();
    let dnames: Vec<String> = inputs.names().iter().filter(|n| n.starts_with('d')).cloned().collect();
    let grad = !dnames.is_empty();

    // Leaves: with upstream gradients, every float tensor becomes a variable so autograd reaches it.
    let leaf = |t: Tensor| -> Result<Tensor> {
        Ok(if grad && t.dtype().is_float() {
            Var::from_tensor(&t).map_err(|e| anyhow!(errors::candle(&e)))?.as_tensor().clone()
        } else {
            t
        })
    };
    let (params, param_source) = match &args.params {
        Some(p) => (TensorFile::open_all(p, &device)?.into_map(), p.display().to_string()),
        None => (HashMap::new(), "--params (not given)".to_string()),
    };
    let mut param_vars = Vec::new();
    let mut pmap = HashMap::new();
    for (name, t) in params {
        if t.dtype() != DType::F32 {
            bail!("{param_source}: parameter `{name}` {:?} has dtype {}, expected f32", t.dims(), t.dtype().as_str());
        }
        let t = leaf(t)?;
        param_vars.push((name.clone(), t.clone()));
        pmap.insert(name, t);
    }
    param_vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut input_map = HashMap::new();
    for (name, t) in inputs.into_map() {
        let t = if dnames.contains(&name) { t } else { leaf(t)? };
        input_map.insert(name, t);
    }
    let mut ctx = Ctx {
        layer,
        params: StrictTensors::new(pmap, param_source.clone()),
        param_source: param_source.clone(),
        param_vars,
        input_source: input_source.clone(),
        inputs: input_map,
        read_inputs: BTreeSet::new(),
        options,
        read_options: BTreeSet::new(),
        device,
    };

    let outputs = adapter(&mut ctx)?;

    // Nothing may go unread: a misspelt option, parameter or tensor is an error, not a default.
    let unknown: Vec<&String> = ctx.options.keys().filter(|k| !ctx.read_options.contains(*k)).collect();
    if !unknown.is_empty() {
        let known: Vec<&String> = ctx.read_options.iter().collect();
        bail!("{layer}: unknown option(s) {unknown:?}; this layer reads {known:?}");
    }
    let unused = ctx.params.unused();
    if !unused.is_empty() {
        bail!("{param_source}: parameter(s) {unused:?} are not used by {layer} with these options");
    }
    let out_names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
    let unread: Vec<&String> = ctx
        .inputs
        .keys()
        .filter(|k| !ctx.read_inputs.contains(*k) && !k.strip_prefix('d').is_some_and(|o| out_names.contains(&o)))
        .collect();
    if !unread.is_empty() {
        bail!("{input_source}: tensor(s) {unread:?} are not inputs of {layer} (outputs: {out_names:?})");
    }

    let mut written: Vec<(String, Tensor)> =
        outputs.iter().map(|(n, t)| Ok((n.clone(), t.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
    if grad {
        written.extend(gradients(&ctx, &outputs)?);
    }
    let refs: Vec<(&str, &Tensor)> = written.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([("layer".to_string(), layer.to_string())]);
    write_atomic(&args.output, &refs, meta)
}

/// `d<name>` for every float input and parameter: the gradient of `Σ_o Σ o ⊙ d<o>` (zeros where none flows).
fn gradients(ctx: &Ctx, outputs: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    let mut loss: Option<Tensor> = None;
    for (name, o) in outputs {
        let Some(d) = ctx.inputs.get(&format!("d{name}")) else { continue };
        if d.dims() != o.dims() {
            bail!(
                "{}: upstream gradient `d{name}` has shape {:?}, but output `{name}` has {:?}",
                ctx.input_source,
                d.dims(),
                o.dims()
            );
        }
        let term = (o * d.to_dtype(o.dtype())?)?.sum_all()?;
        loss = Some(match loss {
            None => term,
            Some(l) => (l + term)?,
        });
    }
    let loss = loss.ok_or_else(|| {
        anyhow!(
            "{}: no upstream gradient names an output ({:?})",
            ctx.input_source,
            outputs.iter().map(|(n, _)| n).collect::<Vec<_>>()
        )
    })?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    let mut leaves: Vec<(&String, &Tensor)> = ctx.param_vars.iter().map(|(n, t)| (n, t)).collect();
    let mut inputs: Vec<(&String, &Tensor)> =
        ctx.inputs.iter().filter(|(n, t)| t.dtype().is_float() && ctx.read_inputs.contains(*n)).collect();
    inputs.sort_by(|a, b| a.0.cmp(b.0));
    leaves.extend(inputs);
    for (name, t) in leaves {
        let g = match grads.get(t) {
            Some(g) => g.to_dtype(DType::F32)?,
            None => t.zeros_like()?.to_dtype(DType::F32)?,
        };
        out.push((format!("d{name}"), g));
    }
    Ok(out)
}
