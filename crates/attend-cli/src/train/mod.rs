//! `attend train`: training runs from the command line, and the main job.
//!
//! ```text
//! attend train                      the main job: seq2seq with Bahdanau attention against the same model without
//!                                   attention on the built-in synthetic translation, then both sets of metrics
//! attend train --list               every task × model with its preset
//! attend train --task TASK [--model MODEL] [--config FILE] [--data PATH] --out RUN_DIR [--steps N] [--seed S]
//!     [--checkpoint-every N] [--resume] [--set KEY=VALUE]...
//! ```
//!
//! A run resolves its configuration from the task's preset, then `--config` (TOML), then the flags, then each
//! `--set` (any key of the config), and writes into RUN_DIR: `config.toml` (the resolved config), `metrics.jsonl`
//! (one object per logged step: `step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`; evaluation lines add the task's
//! metrics), `summary.json`, `checkpoints/step-N/` (see `attend::checkpoint::training`), `loss.png|svg` and the
//! task's pictures. Every batch is drawn from `(seed, step)`, every update is deterministic, and checkpoints hold
//! the optimiser's moments: `--resume` after a kill ends with the same `summary.json` loss as a run never stopped.

mod figures;
mod metrics;
mod synth;
mod translate;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use attend::checkpoint::training::{self as ckpt, TrainingState, FORMAT_VERSION};
use attend::models::seq2seq::RnnKind;
use attend::train::optim::AdamW;
use attend::train::schedule::Schedule;
use candle_core::Tensor;
use candle_nn::VarMap;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

#[derive(Clone, Debug, Args)]
pub struct TrainArgs {
    /// The task (`attend train --list` shows them); without it, the main job runs.
    #[arg(long)]
    task: Option<String>,
    /// The model for the task (default: the task's first).
    #[arg(long)]
    model: Option<String>,
    /// A TOML file of config keys (over the task's preset).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A data file or directory (tasks whose data is built in need none).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The run directory (the main job's default: `attend-runs/main`).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Print every task × model with its preset.
    #[arg(long)]
    list: bool,
    /// Set any config key, `--set hidden_size=64` (a TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// Every setting of a run; `config.toml` holds it resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub task: String,
    pub model: String,
    pub seed: u64,
    /// Optimiser updates.
    pub steps: u64,
    pub batch_size: usize,
    /// Peak learning rate (AdamW); warm-up then cosine decay to `min_lr_ratio · lr`.
    pub lr: f64,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    /// On matrices and embeddings only.
    pub weight_decay: f64,
    /// Global gradient-norm clipping (0: off).
    pub clip: f64,
    pub log_every: u64,
    /// Evaluate on the held-out set every this many steps (0: only at the end).
    pub eval_every: u64,
    pub eval_examples: usize,
    /// A multiple of `log_every` (0: only at the end).
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Sentence lengths of the synthetic translation.
    pub min_len: usize,
    pub max_len: usize,
    pub embed_dim: usize,
    pub hidden_size: usize,
    pub rnn: RnnKind,
}

/// The tasks and models `--list` prints; a task's first model is its default.
const TASKS: [(&str, &[&str], &str); 1] =
    [("translate", &translate::MODELS, "synthetic translation (block reordering, long-range agreement), built in")];

/// The preset of a task and model.
fn preset(task: &str, model: &str) -> Result<TrainConfig> {
    match task {
        "translate" => Ok(TrainConfig {
            task: task.into(),
            model: model.into(),
            seed: 0,
            steps: 1000,
            batch_size: 64,
            lr: 5e-3,
            warmup: 50,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            clip: 1.0,
            log_every: 10,
            eval_every: 0,
            eval_examples: 240,
            checkpoint_every: 200,
            keep_checkpoints: 2,
            min_len: 4,
            max_len: 24,
            embed_dim: 32,
            hidden_size: 64,
            rnn: RnnKind::Lstm,
        }),
        other => bail!("unknown task `{other}`; `attend train --list` shows the tasks ({})", task_names()),
    }
}

fn task_names() -> String {
    TASKS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
}

/// What the loop needs of a task.
pub trait Task {
    /// `task/model`: what a checkpoint holds.
    fn architecture(&self) -> String;
    fn vars(&self) -> &VarMap;
    /// The mean loss of training batch `index` and the target tokens it predicts.
    fn train_loss(&self, index: u64) -> Result<(Tensor, usize)>;
    /// Held-out metrics.
    fn evaluate(&self) -> Result<Map<String, Value>>;
    /// The task's pictures, written under `dir`.
    fn pictures(&self, dir: &Path) -> Result<Vec<PathBuf>>;
}

fn build(cfg: &TrainConfig) -> Result<Box<dyn Task>> {
    match cfg.task.as_str() {
        "translate" => Ok(Box::new(translate::Translate::new(cfg)?)),
        other => bail!("unknown task `{other}` ({})", task_names()),
    }
}

/// The config with the keys of `over` replaced; `what` (a file or a `--set`) names them in errors.
fn with_keys(cfg: &TrainConfig, over: toml::Table, what: &str) -> Result<TrainConfig> {
    let mut table = toml::Table::try_from(cfg).context("config")?;
    for (key, value) in over {
        if !table.contains_key(&key) {
            let keys: Vec<&str> = table.keys().map(String::as_str).collect();
            bail!("{what}: no config key `{key}`; the keys are {}", keys.join(", "));
        }
        table.insert(key, value);
    }
    toml::Value::Table(table).try_into().map_err(|e| anyhow!("{what}: {e}"))
}

/// `--set key=value`, the value read as TOML (a bare word is a string).
fn apply_set(cfg: &TrainConfig, kv: &str) -> Result<TrainConfig> {
    let (key, value) = kv.split_once('=').ok_or_else(|| anyhow!("--set {kv}: expected KEY=VALUE"))?;
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.trim().into()),
    };
    with_keys(cfg, toml::Table::from_iter([(key.trim().to_string(), parsed)]), &format!("--set {kv}"))
}

fn resolve(args: &TrainArgs, task: &str) -> Result<TrainConfig> {
    let model = args
        .model
        .clone()
        .unwrap_or_else(|| TASKS.iter().find(|t| t.0 == task).map_or(String::new(), |t| t.1[0].to_string()));
    let mut cfg = preset(task, &model)?;
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let over: toml::Table = toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e))?;
        cfg = with_keys(&cfg, over, &path.display().to_string())?;
        if cfg.task != task || (args.model.is_some() && cfg.model != model) {
            bail!(
                "{}: sets task/model {}/{}, but the flags ask for {task}/{model}",
                path.display(),
                cfg.task,
                cfg.model
            );
        }
    }
    if let Some(s) = args.steps {
        cfg.steps = s;
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(c) = args.checkpoint_every {
        cfg.checkpoint_every = c;
    }
    for kv in &args.set {
        cfg = apply_set(&cfg, kv)?;
    }
    check(&cfg)?;
    Ok(cfg)
}

fn check(cfg: &TrainConfig) -> Result<()> {
    let fail = |key: &str, why: &str| Err(anyhow!("config: `{key}` {why}"));
    if !TASKS.iter().any(|t| t.0 == cfg.task && t.1.contains(&cfg.model.as_str())) {
        let models = TASKS.iter().find(|t| t.0 == cfg.task).map(|t| t.1.join(", ")).unwrap_or_default();
        return fail("model", &format!("= {:?} is not a model of task {} ({models})", cfg.model, cfg.task));
    }
    if cfg.steps == 0 || cfg.batch_size == 0 || cfg.log_every == 0 {
        return fail("steps, batch_size, log_every", "must be positive");
    }
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) || !(0.0..=1.0).contains(&cfg.min_lr_ratio) || cfg.clip < 0.0 {
        return fail("lr, min_lr_ratio, clip", "must be lr > 0, 0 ≤ min_lr_ratio ≤ 1, clip ≥ 0");
    }
    if cfg.checkpoint_every % cfg.log_every != 0 {
        return fail("checkpoint_every", "must be a multiple of log_every (a resumed run then logs the same windows)");
    }
    if cfg.min_len == 0 || cfg.max_len < cfg.min_len || cfg.max_len > 200 {
        return fail("min_len, max_len", "must satisfy 1 ≤ min_len ≤ max_len ≤ 200");
    }
    if cfg.embed_dim == 0 || cfg.hidden_size < 2 || cfg.hidden_size % 2 != 0 || cfg.hidden_size > 4096 {
        return fail(
            "embed_dim, hidden_size",
            "must be positive, hidden_size even (a bidirectional encoder) and ≤ 4096",
        );
    }
    if cfg.eval_examples == 0 {
        return fail("eval_examples", "must be positive");
    }
    Ok(())
}

pub fn run(args: TrainArgs) -> Result<()> {
    if args.list {
        for (task, models, about) in TASKS {
            println!("{task}: {about}");
            for m in models {
                let p = preset(task, m)?;
                println!(
                    "  --task {task} --model {m:<14} steps {}, batch {}, lr {}, hidden {}, lengths {}-{}",
                    p.steps, p.batch_size, p.lr, p.hidden_size, p.min_len, p.max_len
                );
            }
        }
        return Ok(());
    }
    if args.data.is_some() {
        bail!(
            "--data: the tasks so far ({}) use built-in data; file formats come with the tasks that read them",
            task_names()
        );
    }
    match args.task.clone() {
        Some(task) => {
            let out = args.out.clone().ok_or_else(|| anyhow!("--out RUN_DIR is required with --task"))?;
            let cfg = resolve(&args, &task)?;
            let summary = train(&cfg, &out, args.resume, "")?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        None => main_job(&args),
    }
}

/// The main job: the same encoder–decoder without attention and with Bahdanau attention, trained alike, then their
/// held-out metrics by sentence length and the attention model's alignments.
fn main_job(args: &TrainArgs) -> Result<()> {
    if args.model.is_some() || args.config.is_some() {
        bail!("--model and --config need --task (the main job trains translate/none and translate/bahdanau)");
    }
    let root = args.out.clone().unwrap_or_else(|| PathBuf::from("attend-runs/main"));
    println!(
        "attend: the main job — a recurrent encoder–decoder without attention against the same model with Bahdanau\n\
         attention, on a synthetic translation (each word translated, every block of three words reversed, and a last\n\
         word that agrees with the first). Runs go to {}.",
        root.display()
    );
    let mut results = Vec::new();
    for model in ["none", "bahdanau"] {
        let a = TrainArgs {
            task: Some("translate".into()),
            model: Some(model.into()),
            out: None,
            list: false,
            ..args.clone()
        };
        let cfg = resolve(&a, "translate")?;
        // Always resumable: a second `attend train` continues (or, when finished, reprints) the runs it left.
        let summary = train(&cfg, &root.join(model), true, model)?;
        results.push((model, summary));
    }
    println!("\nheld-out sentences, greedy decoding (exact match: the whole sentence right):");
    println!("  {:<22} {:>12} {:>8}", "model", "exact match", "BLEU");
    for (model, s) in &results {
        let name = if *model == "none" { "no attention" } else { "Bahdanau attention" };
        println!(
            "  {:<22} {:>12.3} {:>8.3}",
            name,
            s["exact_match"].as_f64().unwrap_or(0.0),
            s["bleu"].as_f64().unwrap_or(0.0)
        );
    }
    println!("\nby source length (exact match):");
    if let (Some(a), Some(b)) = (results[0].1["by_length"].as_array(), results[1].1["by_length"].as_array()) {
        println!("  {:<10} {:>14} {:>20}", "lengths", "no attention", "Bahdanau attention");
        for (x, y) in a.iter().zip(b) {
            println!(
                "  {:<10} {:>14.3} {:>20.3}",
                x["lengths"].as_str().unwrap_or(""),
                x["exact_match"].as_f64().unwrap_or(0.0),
                y["exact_match"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!("\nthe alignments Bahdanau attention learned: {}", root.join("bahdanau/alignments.png").display());
    println!("loss curves: {} and {}", root.join("none/loss.png").display(), root.join("bahdanau/loss.png").display());
    Ok(())
}

/// Appends one JSON line to `metrics.jsonl`.
fn log_line(path: &Path, v: &Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    writeln!(f, "{v}").with_context(|| format!("{}: cannot write", path.display()))
}

/// Keeps the lines of `metrics.jsonl` up to `step` (a resumed run logs the rest again).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step))
        .collect();
    let body = if kept.is_empty() { String::new() } else { kept.join("\n") + "\n" };
    attend::checkpoint::write_atomic(path, body.as_bytes()).map_err(|e| anyhow!("{e}"))
}

/// Trains `cfg` into `out`; returns the summary.
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool, label: &str) -> Result<Value> {
    let dir = out.join("checkpoints");
    let saved_cfg = out.join("config.toml");
    let has_run = ckpt::latest(&dir).map_err(|e| anyhow!("{e}"))?.is_some();
    if has_run && !resume {
        bail!(
            "{} already holds a run (checkpoints/); pass --resume to continue it or choose another --out",
            out.display()
        );
    }
    if resume && saved_cfg.exists() {
        let text =
            std::fs::read_to_string(&saved_cfg).with_context(|| format!("{}: cannot read", saved_cfg.display()))?;
        let old: TrainConfig = toml::from_str(&text).map_err(|e| anyhow!("{}: {}", saved_cfg.display(), e))?;
        if (TrainConfig { steps: cfg.steps, ..old.clone() }) != *cfg {
            bail!(
                "{}: the run was started with other settings; resume with the same ones (only --steps may change)",
                saved_cfg.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    attend::checkpoint::write_atomic(&saved_cfg, toml::to_string(cfg)?.as_bytes()).map_err(|e| anyhow!("{e}"))?;
    let task = build(cfg)?;
    let hyper = attend_kernels::adamw::AdamW { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() };
    let mut opt = AdamW::new(task.vars(), hyper).map_err(|e| anyhow!("{e}"))?;
    let arch = task.architecture();
    let metrics_path = out.join("metrics.jsonl");
    let mut start = 0;
    if resume {
        match ckpt::latest(&dir).map_err(|e| anyhow!("{e}"))? {
            Some(path) => {
                let st = ckpt::load(&path, &arch, task.vars(), &mut opt).map_err(|e| anyhow!("{e}"))?;
                start = st.step;
                truncate_metrics(&metrics_path, start)?;
            }
            None => {
                let _ = std::fs::remove_file(&metrics_path);
            }
        }
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
    let params: usize = task.vars().all_vars().iter().map(|v| v.elem_count()).sum();
    let sched = Schedule::WarmupCosine { warmup: cfg.warmup, total: cfg.steps, min_ratio: cfg.min_lr_ratio };
    let bar = if std::io::stderr().is_terminal() {
        let style =
            ProgressStyle::with_template("{prefix:>10} {bar:30} {pos}/{len} steps  {msg}  {per_sec}  ETA {eta}")
                .expect("a valid template");
        ProgressBar::new(cfg.steps).with_style(style).with_prefix(label.to_string()).with_position(start)
    } else {
        ProgressBar::hidden()
    };
    eprintln!("{arch}: {params} parameters, steps {start}..{}, batch {}", cfg.steps, cfg.batch_size);
    let t0 = Instant::now();
    let (mut win_loss, mut win_steps, mut win_tokens, mut win_t) = (0.0f64, 0u64, 0usize, Instant::now());
    let mut last: Map<String, Value> = Map::new();
    for step in start..cfg.steps {
        let (loss, tokens) = task.train_loss(step)?;
        let l = loss.to_scalar::<f32>()? as f64;
        if !l.is_finite() {
            bail!("{arch}: the loss became {l} at step {step}; lower --set lr=… or raise warmup");
        }
        let grads = loss.backward()?;
        let lr = cfg.lr * sched.factor(step);
        let gnorm = opt.step(&grads, lr, (cfg.clip > 0.0).then_some(cfg.clip)).map_err(|e| anyhow!("{e}"))?;
        let done = step + 1;
        (win_loss, win_steps, win_tokens) = (win_loss + l, win_steps + 1, win_tokens + tokens);
        let is_last = done == cfg.steps;
        if done % cfg.log_every == 0 || is_last {
            let secs = win_t.elapsed().as_secs_f64().max(1e-9);
            let line = json!({"step": done, "loss": win_loss / win_steps as f64, "lr": lr, "grad_norm": gnorm,
                "tokens_per_s": win_tokens as f64 / secs});
            log_line(&metrics_path, &line)?;
            bar.set_message(format!("loss {:.4}", win_loss / win_steps as f64));
            last = line.as_object().cloned().unwrap_or_default();
            (win_loss, win_steps, win_tokens, win_t) = (0.0, 0, 0, Instant::now());
        }
        if (cfg.eval_every > 0 && done % cfg.eval_every == 0) || is_last {
            let mut line = Map::new();
            line.insert("step".into(), json!(done));
            for (k, v) in task.evaluate()? {
                line.insert(format!("eval_{k}"), v);
            }
            log_line(&metrics_path, &Value::Object(line.clone()))?;
            last.extend(line);
        }
        if (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || is_last {
            let state = TrainingState {
                format_version: FORMAT_VERSION,
                architecture: arch.clone(),
                config: serde_json::to_value(cfg)?,
                step: done,
                data_position: done,
                seed: cfg.seed,
                metrics: Value::Object(last.clone()),
            };
            ckpt::save(&dir, task.vars(), &opt, &state, cfg.keep_checkpoints).map_err(|e| anyhow!("{e}"))?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if start >= cfg.steps {
        eprintln!("{arch}: the run is already at step {start} of {}", cfg.steps);
    }
    // The summary comes from the last logged lines, so a resumed run and an uninterrupted one agree.
    let mut summary = Map::new();
    summary.insert("architecture".into(), json!(arch));
    summary.insert("params".into(), json!(params));
    let text = std::fs::read_to_string(&metrics_path).unwrap_or_default();
    let mut train_curve = Vec::new();
    for v in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let Value::Object(o) = v else { continue };
        if let (Some(s), Some(l)) = (o.get("step").and_then(|s| s.as_f64()), o.get("loss").and_then(|l| l.as_f64())) {
            train_curve.push((s, l));
        }
        for (k, v) in o {
            summary.insert(k.strip_prefix("eval_").unwrap_or(&k).to_string(), v);
        }
    }
    summary.insert("seconds".into(), json!(t0.elapsed().as_secs_f64()));
    let summary = Value::Object(summary);
    attend::checkpoint::write_atomic(&out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())
        .map_err(|e| anyhow!("{e}"))?;
    let curve =
        figures::curves(&format!("{arch}: training loss"), "loss", &[("train".into(), [49, 54, 149], train_curve)]);
    figures::write_both(&curve, &out.join("loss"))?;
    task.pictures(out)?;
    Ok(summary)
}
