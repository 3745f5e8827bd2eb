//! One error type for the library. Messages name the op, tensor, file or shape involved, on one line.

use std::path::PathBuf;

/// Everything `attend` can report instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shape, dtype or argument that does not fit what an op expects; the message names both.
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// A tensor that a file or map should hold but does not.
    #[error("missing tensor `{name}` in {location}")]
    MissingTensor { name: String, location: String },
    /// A file that could not be read or written.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// Anything candle reports (its messages already carry shapes).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// So that `?` works in code on candle's `Result` too (a model's `Module::forward`, a training loop): candle's own
/// errors come back unwrapped, ours wrapped with their message.
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            other => candle_core::Error::wrap(other),
        }
    }
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid { op, msg: msg.into() }
    }
}

/// A shape as the `# Shapes` docs write it, `(2, 5, 8)`: error messages name shapes this way.
pub(crate) fn shape_str(t: &candle_core::Tensor) -> String {
    let dims: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
    format!("({})", dims.join(", "))
}

/// `bail!(op, "fmt", args..)` returns an [`Error::Invalid`] from the current function. Crate-private: no macro
/// of ours lands in a user's namespace.
macro_rules! bail {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::Error::invalid($op, format!($($arg)*)))
    };
}

/// `ensure!(cond, op, "fmt", args..)`: [`bail!`] unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $op:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::bail!($op, $($arg)*);
        }
    };
}

pub(crate) use {bail, ensure};
