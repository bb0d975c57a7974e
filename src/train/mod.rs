//! Training policy on top of the models: learning-rate rules and schedules, and checkpoints of
//! the full training state.

pub mod checkpoint;
pub mod chunked;
pub mod fixed;
pub mod pool_run;

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

    /// Opens the log of a run resuming at `step`: lines logged after that step (by a run
    /// that stopped before its next checkpoint) are dropped first, so each step is logged once.
    pub fn resume_at(out: &Path, step: u64) -> Result<MetricsLog> {
        let path = out.join("metrics.jsonl");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let keep: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_none_or(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            if keep.len() != text.len() {
                crate::nn::checkpoint::write_atomic(&path, keep.as_bytes())?;
            }
        }
        MetricsLog::open(out)
    }

    /// Appends one line.
    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::Io {
            path: self.path.display().to_string(),
            source: e,
        })
    }
}
