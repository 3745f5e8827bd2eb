//! `attend`: the command-line tool of the `attend` library.
//!
//! ```text
//! attend op attention [--input IN.safetensors] [--output OUT.safetensors] [--impl fused|materialized|reference] ...
//! attend bench attention --batch B --heads H [--kv-heads HKV] --seq T [--kv-seq S] --head-dim D [--causal]
//!     [--backward] [--dtype f32|bf16] [--impl fused|materialized|reference] [--threads N] [--warmup N] [--iters N]
//!     [--json]
//! ```
//!
//! Commands are grouped as clap subcommands so that later ones (`train`, `generate`, `viz`) sit beside `op`.
//! Every failure is reported as one line on stderr (`error: …`, naming the file, tensor and shapes) with a non-zero
//! exit status; nothing the user passes in makes the tool panic.

mod bench;
mod errors;
mod hf;
mod image;
mod op;
mod picture;
mod tensors;
mod train;
mod viz;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Attention mechanisms and attention models on candle.
#[derive(Debug, Parser)]
#[command(name = "attend", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a single library op on tensors from a safetensors file (or a built-in example) and save its outputs.
    #[command(subcommand)]
    Op(op::OpCommand),
    /// Time a library op on seeded random inputs and report GFLOP/s (PyTorch anchor units) and memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Hugging Face model directories: `attend hf run` runs a checkpoint's forward on token ids.
    #[command(subcommand)]
    Hf(hf::run::HfCommand),
    /// Continue a prompt with a causal LM from a Hugging Face directory (greedy or sampled, KV cache).
    Generate(hf::generate::GenerateArgs),
    /// Sentence embeddings from a sentence-transformers (or BERT-family) directory, one JSON line per text.
    Embed(hf::embed::EmbedArgs),
    /// What a model attends to: one self-contained HTML page (head view, model view, rollout, head summary).
    Viz(viz::VizArgs),
    Train(train::TrainArgs),
}

fn main() -> ExitCode {
    // Passes allocate and free tensors of a few MB each; keep that memory in the process (attend::alloc).
    // ATTEND_KEEP_FREED_MEMORY=0 keeps glibc's defaults, to measure what the setting is worth.
    if std::env::var("ATTEND_KEEP_FREED_MEMORY").as_deref() != Ok("0") {
        attend::alloc::keep_freed_memory();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return errors::report_usage(e),
    };
    let result = match cli.command {
        Command::Op(cmd) => op::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Hf(cmd) => hf::run::run(cmd),
        Command::Generate(args) => hf::generate::run(args),
        Command::Embed(args) => hf::embed::run(args),
        Command::Viz(args) => viz::run(args),
        Command::Train(args) => train::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", errors::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
