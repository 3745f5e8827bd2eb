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

use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time the attention core (forward, or forward+backward through candle's autograd) and report GFLOP/s and RSS.
    Attention(attention::BenchAttentionArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Attention(args) => attention::run(args),
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
