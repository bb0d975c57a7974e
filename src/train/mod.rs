//! Training policy on top of the models: learning-rate rules and schedules, and checkpoints of
//! the full training state.

pub mod checkpoint;
pub mod embed;
pub mod fixed;
pub mod pool_run;
pub mod schedule;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The run's `metrics.jsonl` (one JSON object per logged step), opened for appending so a
/// resumed run continues it.
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Creates `out` if needed and opens `out/metrics.jsonl`.
    pub fn open(out: &Path) -> Result<MetricsLog> {
        std::fs::create_dir_all(out).map_err(|e| Error::Io {
            path: out.display().to_string(),
            source: e,
        })?;
        let path = out.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::Io {
                path: path.display().to_string(),
                source: e,
            })?;
        Ok(MetricsLog { file, path })
    }

    /// Appends one line.
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::Io {
            path: self.path.display().to_string(),
            source: e,
        })
    }
}
