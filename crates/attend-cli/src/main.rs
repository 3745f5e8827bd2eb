//! `attend`: the command-line tool of the `attend` library.
//!
//! ```text
//! attend op attention [--input IN.safetensors] [--output OUT.safetensors] [--impl reference|materialized] ...
//! ```
//!
//! Commands are grouped as clap subcommands so that later ones (`train`, `generate`, `bench`, `viz`) sit beside `op`.
//! Every failure is reported as one line on stderr (`error: …`, naming the file, tensor and shapes) with a non-zero
//! exit status; nothing the user passes in makes the tool panic.

mod errors;
mod op;
mod tensors;

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
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return errors::report_usage(e),
    };
    let result = match cli.command {
        Command::Op(cmd) => op::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", errors::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
