//! `stablerep pool convert`: a pool from one layout to the other, image bytes copied as they
//! are (no re-encoding), captions kept in order. Official folders become shards of
//! `per_shard` captions (caption k is sample `{k:010}`); shards become folders with caption k at
//! `seed_j/<relpath(k)>` (the extension its image had) and `captions.csv`.

use std::path::Path;

use super::pool::{relpath, Pool};
use super::webdataset::ShardSink;
use crate::error::{Error, Result};

/// A pool's on-disk layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The official folders with `captions.csv`.
    Folder,
    /// WebDataset tar shards.
    WebDataset,
}

impl Format {
    /// Parses `folder` or `webdataset`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "folder" => Some(Format::Folder),
            "webdataset" | "wds" => Some(Format::WebDataset),
            _ => None,
        }
    }
}

/// Writes `pool` to `to` (a new or empty folder) in `format`; `progress(done, total)` after
/// each caption. Returns images written.
pub fn convert(
    pool: &Pool,
    to: &Path,
    format: Format,
    per_shard: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<usize> {
    if to.exists()
        && std::fs::read_dir(to)
            .map_err(|e| Error::Io {
                path: to.display().to_string(),
                source: e,
            })?
            .next()
            .is_some()
    {
        return Err(Error::Config(format!(
            "--to {}: exists and is not empty (convert writes a new pool)",
            to.display()
        )));
    }
    if format == Format::WebDataset && per_shard == 0 {
        return Err(Error::Config(
            "--captions-per-shard must be positive".into(),
        ));
    }
    let k = pool.images_per_caption();
    let n = pool.captions.len();
    let mut written = 0;
    match format {
        Format::WebDataset => {
            let mut sink = ShardSink::new(to);
            for i in 0..n {
                let images = (0..k)
                    .map(|j| pool.read_bytes(i, j))
                    .collect::<Result<Vec<_>>>()?;
                sink.push(i / per_shard, i as u64, &images, &pool.captions[i].text)?;
                written += k;
                progress(i + 1, n);
            }
            sink.finish()?;
        }
        Format::Folder => {
            let mut rows = String::new();
            for i in 0..n {
                let mut rel = None;
                for j in 0..k {
                    let (bytes, ext) = pool.read_bytes(i, j)?;
                    let r = rel.get_or_insert_with(|| {
                        let base = relpath(i as u64);
                        match ext.as_str() {
                            "png" => base,
                            other => format!("{}.{other}", base.trim_end_matches(".png")),
                        }
                    });
                    let path = to.join(format!("seed_{j}")).join(r.as_str());
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
                            path: dir.display().to_string(),
                            source: e,
                        })?;
                    }
                    crate::atomic::write_atomic(&path, &bytes)?;
                    written += 1;
                }
                rows +=
                    &super::csv::row(&[rel.as_deref().unwrap_or_default(), &pool.captions[i].text]);
                progress(i + 1, n);
            }
            std::fs::create_dir_all(to).map_err(|e| Error::Io {
                path: to.display().to_string(),
                source: e,
            })?;
            crate::atomic::write_atomic(&to.join("captions.csv"), rows.as_bytes())?;
        }
    }
    Ok(written)
}
