//! The crate's error type: every failure names what it was doing.

use std::fmt;

/// Errors from the device layer, the kernels and the runtime.
#[derive(Debug)]
pub enum Error {
    /// A CUDA driver, NVRTC or launch failure; the string names the operation.
    Cuda(String),
    /// Shapes or sizes that do not fit together; the string names the argument.
    Shape(String),
    /// An argument outside its valid range.
    Invalid(String),
    /// A file could not be read or written.
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A file whose contents are malformed (corrupt safetensors, bad config.json, bad
    /// tokenizer.json ...); `msg` names the field, tensor or byte range and the problem.
    Format { path: String, msg: String },
    /// The run stopped on SIGINT/SIGTERM (`signal`) after saving its state; `msg` says where.
    Interrupted { signal: i32, msg: String },
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Cuda(s) => write!(f, "CUDA: {s}"),
            Error::Shape(s) => write!(f, "shape mismatch: {s}"),
            Error::Invalid(s) => write!(f, "invalid argument: {s}"),
            Error::Io { path, source } => write!(f, "{path}: {source}"),
            Error::Format { path, msg } => write!(f, "{path}: {msg}"),
            Error::Interrupted { msg, .. } => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}

/// Returns `Error::Shape` unless `len == want`.
pub fn check_len(what: &str, len: usize, want: usize) -> Result<()> {
    if len == want {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{what}: length {len}, expected {want}"
        )))
    }
}
