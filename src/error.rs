//! The crate's error type: every failure a user can cause names the problem.

use thiserror::Error;

/// Everything that can go wrong in `stablerep`, with messages meant for the user.
#[derive(Debug, Error)]
pub enum Error {
    /// No GPU adapter (not even a software one) could be found.
    #[error("no GPU adapter found{detail}.\n{hint}")]
    NoAdapter {
        /// What was searched for (backend, filter).
        detail: String,
        /// How to get an adapter on this platform.
        hint: String,
    },
    /// Requesting a device from the chosen adapter failed.
    #[error("could not open a device on adapter '{adapter}': {reason}")]
    DeviceRequest {
        /// Adapter name.
        adapter: String,
        /// The driver's reason.
        reason: String,
    },
    /// A tensor or buffer is larger than the device allows.
    #[error(
        "{what} needs {bytes} bytes, more than the device allows ({limit} bytes, {limit_name})"
    )]
    TooLarge {
        /// What was being allocated or bound.
        what: String,
        /// Requested size in bytes.
        bytes: u64,
        /// The device's limit in bytes.
        limit: u64,
        /// Name of the wgpu limit.
        limit_name: &'static str,
    },
    /// Shapes do not fit an operation.
    #[error("shape error in {op}: {msg}")]
    Shape {
        /// Operation name.
        op: String,
        /// What is wrong.
        msg: String,
    },
    /// A graph was used in a way it does not support.
    #[error("graph error: {0}")]
    Graph(String),
    /// The GPU reported an error (validation, out of memory, lost device).
    #[error("GPU error: {0}")]
    Gpu(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A setting is impossible.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The job was cancelled (by a progress callback or a worker's cancel).
    #[error("cancelled")]
    Cancelled,
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds a shape error for `op`.
    pub fn shape(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Shape {
            op: op.into(),
            msg: msg.into(),
        }
    }
}
