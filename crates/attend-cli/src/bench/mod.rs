//! `attend bench …`: timings of library ops on seeded random inputs, in the units the PyTorch anchors use
//! (`/work/shared/bench/torch_anchor.py`), so that the two can be run one after the other and quoted as a ratio.
//!
//! # Threads
//! `--threads N` has to reach three pools, all of which size themselves once, on first use:
//! - rayon's global pool, where the attend kernels (`attend_kernels::flash`, softmax, norms) run their `par_iter`s
//!   and where the `gemm` crate runs its `Parallelism::Rayon(n)` tasks: built here with
//!   `rayon::ThreadPoolBuilder::new().num_threads(N).build_global()`;
//! - candle-core 0.11.1's matmul (`cpu_backend::MatMul`) asks `candle_core::utils::get_num_threads()` on every call
//!   how many gemm threads to use; that reads `RAYON_NUM_THREADS` and otherwise defaults to the number of
//!   *physical* cores (or the `CANDLE_CPU_MASK` list), not rayon's pool size;
//! - candle's element-wise ops (`unary_map_vec_par`, `binary_map_vec_par`) run on candle's own barrier pool, sized
//!   once from `CANDLE_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the same physical-core default.
//!
//! So [`configure_threads`] sets both environment variables to `N` and builds rayon's global pool before any tensor
//! exists; the report includes `get_num_threads()` as candle sees it.

pub mod attention;
pub mod decode;
pub mod embed;
pub mod gat;
pub mod rnn;
pub mod train_step;
pub mod viz;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time the attention core (forward, or forward+backward through candle's autograd) and report GFLOP/s and RSS.
    Attention(attention::BenchAttentionArgs),
    /// Time an LSTM (fused cells) over a batch of sequences, forward or forward+backward, in tokens/s.
    Lstm(rnn::BenchRnnArgs),
    /// Time a GRU (fused cells), as `lstm`.
    Gru(rnn::BenchRnnArgs),
    /// Time graph attention (GAT or GATv2) on a random graph, forward or forward+backward.
    Gat(gat::BenchGatArgs),
    /// GPT-2 small greedy decoding, batch 1, against the measured memory-bandwidth limit.
    Decode(decode::BenchDecodeArgs),
    /// Sentence embeddings (mean pooling, normalised) on the all-MiniLM-L6-v2 shape, batch 32 × 128 tokens.
    Embed(embed::BenchEmbedArgs),
    /// One nanoGPT-style GPT training step (forward, backward, AdamW), the anchor's `cpu` or `char` config.
    TrainStep(train_step::BenchTrainStepArgs),
    /// What looking inside costs: BERT-base's forward with and without every layer's weights and the viz page.
    Viz(viz::BenchVizArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Attention(args) => attention::run(args),
        BenchCommand::Lstm(args) => rnn::run(args, rnn::Kind::Lstm),
        BenchCommand::Gru(args) => rnn::run(args, rnn::Kind::Gru),
        BenchCommand::Gat(args) => gat::run(args),
        BenchCommand::Decode(args) => decode::run(args),
        BenchCommand::Embed(args) => embed::run(args),
        BenchCommand::TrainStep(args) => train_step::run(args),
        BenchCommand::Viz(args) => viz::run(args),
    }
}

/// Points rayon's global pool and candle's matmul and element-wise pools at `n` threads (see the module docs).
/// Must run before any tensor op and while the process has a single thread (it sets environment variables).
pub fn configure_threads(n: usize) -> Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
        bail!("cannot configure {n} threads: {e}");
    }
    Ok(())
}

/// Default thread count: what the OS lets this process use.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A `kB` field of `/proc/self/status` in MB (10⁶ bytes); `None` off Linux.
fn proc_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024.0 / 1e6)
}

/// Peak resident set size so far (`VmHWM`), MB.
pub fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("VmHWM:")
}

/// Current resident set size (`VmRSS`), MB.
pub fn rss_mb() -> Option<f64> {
    proc_status_mb("VmRSS:")
}

/// Minor page faults of this process so far (`minflt`, field 10 of `/proc/self/stat`); `None` off Linux. Fresh
/// pages touched for the first time cost a fault each, so faults per iteration show allocation churn that the
/// allocator hands back to the OS between iterations.
pub fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // `pid (comm) state ppid …`: comm may hold spaces, so count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(7)?.parse().ok()
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
pub fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line["MemAvailable:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// A one-line progress display on stderr (terminal only), shown once a run is projected to take over 2 s.
pub struct Progress {
    label: &'static str,
    start: Instant,
    total: usize,
    on: bool,
    enabled: bool,
}

impl Progress {
    pub fn new(label: &'static str, total: usize) -> Self {
        Progress { label, start: Instant::now(), total, on: false, enabled: std::io::stderr().is_terminal() }
    }

    /// After iteration `done` (1-based, warmups included) of `total`, which took `last`.
    pub fn tick(&mut self, done: usize, warmup: usize, last: Duration) {
        if !self.enabled {
            return;
        }
        let projected = self.start.elapsed() + last * (self.total - done) as u32;
        self.on |= projected > Duration::from_secs(2);
        if self.on {
            let phase = if done <= warmup {
                format!("warmup {done}/{warmup}")
            } else {
                format!("iteration {}/{}", done - warmup, self.total - warmup)
            };
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[K{}: {phase}, last {:.1} ms", self.label, last.as_secs_f64() * 1e3);
            let _ = err.flush();
        }
    }

    pub fn finish(&self) {
        if self.on {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

/// Timing statistics in milliseconds.
pub struct Times {
    pub median: f64,
    pub min: f64,
    pub mean: f64,
    pub p90: f64,
}

impl Times {
    /// `median` is the upper middle element, as in the PyTorch anchor script (`ts[len(ts) // 2]`).
    pub fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        Times {
            median: ms[n / 2],
            min: ms[0],
            mean: ms.iter().sum::<f64>() / n as f64,
            p90: ms[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1],
        }
    }
}

/// Runs `pass` `warmup + iters` times with a progress line; returns the timed iterations' statistics.
pub fn time_passes(
    label: &'static str,
    warmup: usize,
    iters: usize,
    pass: impl FnMut() -> Result<()>,
) -> Result<Times> {
    time_passes_after(label, warmup, iters, || Ok(()), pass)
}

/// [`time_passes`] with `before` run (untimed) ahead of every pass: a measurement that must be taken under the
/// same conditions as the pass it goes with.
pub fn time_passes_after(
    label: &'static str,
    warmup: usize,
    iters: usize,
    mut before: impl FnMut() -> Result<()>,
    mut pass: impl FnMut() -> Result<()>,
) -> Result<Times> {
    let mut progress = Progress::new(label, warmup + iters);
    let mut ms = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        before()?;
        let start = Instant::now();
        pass()?;
        let took = start.elapsed();
        if i >= warmup {
            ms.push(took.as_secs_f64() * 1e3);
        }
        progress.tick(i + 1, warmup, took);
    }
    progress.finish();
    Ok(Times::of(ms))
}

/// A `VarBuilder` over detached copies of a `VarMap`'s parameters: the same weights as loaded from a checkpoint for
/// inference, so layers keep no activations for a backward.
pub fn inference_weights(vm: &candle_nn::VarMap) -> Result<candle_nn::VarBuilder<'static>> {
    let weights: std::collections::HashMap<String, candle_core::Tensor> = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("parameters"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, &candle_core::Device::Cpu))
}

/// A BERT of `cfg` with seeded random weights that track no gradient (as loaded from a checkpoint), and its
/// parameter count.
pub fn random_bert(cfg: &attend::models::bert::BertConfig) -> Result<(attend::models::bert::Bert, usize)> {
    use attend::models::bert::Bert;
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu);
    Bert::new(cfg, vb).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bert = Bert::new(cfg, inference_weights(&vm)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((bert, vm.all_vars().iter().map(|v| v.elem_count()).sum()))
}

/// The CPU as the bench JSON reports it.
pub fn cpu_json() -> serde_json::Value {
    let cpu = attend_kernels::cpu::CpuInfo::get();
    serde_json::json!({"vendor": cpu.vendor, "family": cpu.family, "model": cpu.model, "name": cpu.name,
                       "microarchitecture": cpu.microarchitecture(), "l1d_kb": cpu.l1d_bytes / 1024,
                       "l2_kb": cpu.l2_bytes / 1024})
}
