//! Turning errors into the one line the tool prints: candle's backtraces and multi-line contexts are folded away,
//! library errors keep their message (which already names the op and the shapes).

use std::process::ExitCode;

/// `candle_core::Error` without a captured backtrace, its context and path folded onto one line.
pub fn candle(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle(inner),
        E::Context { inner, context } => format!("{context}: {}", candle(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle(inner)),
        other => flatten(&other.to_string()),
    }
}

/// An [`attend::Error`] on one line.
pub fn attend(e: &attend::Error) -> String {
    match e {
        attend::Error::Candle(c) => candle(c),
        other => flatten(&other.to_string()),
    }
}

/// The whole `anyhow` chain (`outer: inner: …`) on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    flatten(&format!("{e:#}"))
}

/// Collapses line breaks (and the blank lines around them) into single spaces.
fn flatten(s: &str) -> String {
    s.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Prints a command-line parsing error. `--help` and `--version` print as clap renders them; a usage error is
/// reduced to its first line, so that it is one line like every other error.
pub fn report_usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            // clap's first paragraph is the error itself (a missing argument is named on the line after the
            // first); the usage and the hint after the blank line are left out.
            let text = e.to_string();
            let first: Vec<&str> = text.trim_start().lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
            eprintln!("{} (try --help)", first.join(" "));
            ExitCode::from(2)
        }
    }
}
