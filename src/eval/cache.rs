//! Feature caches: the CLS features of a labelled folder (or a file list) written as
//! safetensors shards, so a second probe does not embed the images again.
//!
//! A cache is a folder: `features-000000.safetensors`, ... each with `features` [rows, D] and
//! `labels` [rows] (class indices as f32; absent for a file list) of up to [`SHARD_ROWS`]
//! images, and `index.json` ([`Index`]), written last: a cache without it is incomplete.
//! The index records which checkpoint made the features (a fingerprint of its `visual.*`
//! tensors) and which images (a fingerprint of the listing), so features of another encoder
//! are refused and a changed folder is embedded again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::data::folder::LabelledFolder;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::features::embed_paths_each;
use crate::nn::checkpoint::{Checkpoint, HostTensor};

/// Images per shard by default.
pub const SHARD_ROWS: usize = 8192;

/// The index file's name.
pub const INDEX: &str = "index.json";

/// Features of a labelled folder (or of a file list, with no classes and label 0 throughout).
#[derive(Clone, Debug)]
pub struct Features {
    /// [images, dim], row-major.
    pub feats: Vec<f32>,
    /// Class index per image.
    pub labels: Vec<usize>,
    /// Feature width.
    pub dim: usize,
    /// Class names.
    pub classes: Vec<String>,
}

/// What `index.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    /// Fingerprint of the checkpoint's `visual.*` tensors ([`fingerprint`]).
    pub checkpoint: String,
    /// The folder or list that was embedded.
    pub source: String,
    /// Fingerprint of its listing (paths and labels, in order).
    pub listing: String,
    /// Images.
    pub images: usize,
    /// Feature width.
    pub dim: usize,
    /// Class names (empty for a file list).
    pub classes: Vec<String>,
    /// Shard files, in order.
    pub shards: Vec<String>,
}

/// FNV-1a, 64 bits.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// A fingerprint of a checkpoint's encoder: its `visual.*` names, shapes and values.
pub fn fingerprint(ck: &Checkpoint) -> String {
    let mut h = Fnv::new();
    for (name, t) in ck.tensors.iter().filter(|(k, _)| k.starts_with("visual.")) {
        h.bytes(name.as_bytes());
        for &d in &t.shape {
            h.bytes(&(d as u64).to_le_bytes());
        }
        for v in &t.data {
            h.bytes(&v.to_bits().to_le_bytes());
        }
    }
    h.hex()
}

/// Images to embed: a labelled folder (`DIR/<class>/<image>`) or a file list (one path per
/// line, relative to the list's folder; blank lines and `#` comments skipped).
#[derive(Clone, Debug)]
pub struct Source {
    /// Image paths.
    pub paths: Vec<PathBuf>,
    /// Class per image (all 0 for a list).
    pub labels: Vec<usize>,
    /// Class names (empty for a list).
    pub classes: Vec<String>,
}

impl Source {
    /// Opens a labelled folder or a file list.
    pub fn open(p: &Path) -> Result<Source> {
        if p.is_dir() {
            let f = LabelledFolder::open(p)?;
            return Ok(Source {
                paths: f.items.iter().map(|(p, _)| p.clone()).collect(),
                labels: f.items.iter().map(|&(_, l)| l).collect(),
                classes: f.classes,
            });
        }
        let text = std::fs::read_to_string(p).map_err(|e| Error::Io {
            path: p.display().to_string(),
            source: e,
        })?;
        let base = p.parent().unwrap_or(Path::new("."));
        let paths: Vec<PathBuf> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| base.join(l))
            .collect();
        if paths.is_empty() {
            return Err(Error::Config(format!("{}: lists no images", p.display())));
        }
        Ok(Source {
            labels: vec![0; paths.len()],
            paths,
            classes: Vec::new(),
        })
    }

    /// A fingerprint of the listing (paths and labels in order).
    pub fn listing(&self) -> String {
        let mut h = Fnv::new();
        for (p, l) in self.paths.iter().zip(&self.labels) {
            h.bytes(p.to_string_lossy().as_bytes());
            h.bytes(&[0]);
            h.bytes(&(*l as u64).to_le_bytes());
        }
        h.hex()
    }
}

fn shard_name(s: usize) -> String {
    format!("features-{s:06}.safetensors")
}

fn write_shard(
    out: &Path,
    s: usize,
    feats: &[f32],
    labels: &[usize],
    dim: usize,
) -> Result<String> {
    let name = shard_name(s);
    let mut ck = Checkpoint::default();
    let rows = labels.len();
    ck.tensors.insert(
        "features".into(),
        HostTensor {
            shape: vec![rows, dim],
            data: feats.to_vec(),
        },
    );
    ck.tensors.insert(
        "labels".into(),
        HostTensor {
            shape: vec![rows],
            data: labels.iter().map(|&l| l as f32).collect(),
        },
    );
    ck.save(&out.join(&name))?;
    Ok(name)
}

/// Embeds `src` with the encoder of `ck` into the cache folder `out`, streaming: each shard
/// is written as its rows arrive. With `keep`, the features are also returned (a probe needs
/// them); without, memory holds one shard. `progress(done, total)` after each chunk.
#[allow(clippy::too_many_arguments)]
pub fn write(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    src: &Source,
    source_name: &str,
    out: &Path,
    shard_rows: usize,
    keep: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<Option<Features>> {
    let shard_rows = shard_rows.max(1);
    std::fs::create_dir_all(out).map_err(|e| Error::Io {
        path: out.display().to_string(),
        source: e,
    })?;
    // Incomplete from here until the new index is written.
    let index_path = out.join(INDEX);
    if index_path.exists() {
        std::fs::remove_file(&index_path).map_err(|e| Error::Io {
            path: index_path.display().to_string(),
            source: e,
        })?;
    }
    let mut kept = Vec::new();
    let mut buf: Vec<f32> = Vec::new();
    let mut shards = Vec::new();
    let mut row = 0;
    let mut dim = 0;
    embed_paths_each(gpu, ck, head_dim, &src.paths, |rows, width, done, total| {
        dim = width;
        buf.extend_from_slice(rows);
        if keep {
            kept.extend_from_slice(rows);
        }
        while buf.len() >= shard_rows * width {
            let labels = &src.labels[row..row + shard_rows];
            shards.push(write_shard(
                out,
                shards.len(),
                &buf[..shard_rows * width],
                labels,
                width,
            )?);
            buf.drain(..shard_rows * width);
            row += shard_rows;
        }
        progress(done, total);
        Ok(())
    })?;
    if !buf.is_empty() {
        let labels = &src.labels[row..];
        shards.push(write_shard(out, shards.len(), &buf, labels, dim)?);
    }
    // Shards of an earlier, larger cache are not part of this one.
    for s in shards.len().. {
        let stale = out.join(shard_name(s));
        if !stale.exists() {
            break;
        }
        let _ = std::fs::remove_file(stale);
    }
    let index = Index {
        checkpoint: fingerprint(ck),
        source: source_name.to_string(),
        listing: src.listing(),
        images: src.paths.len(),
        dim,
        classes: src.classes.clone(),
        shards,
    };
    let json = serde_json::to_string_pretty(&index)
        .map_err(|e| Error::Config(format!("cannot write the cache index: {e}")))?;
    crate::atomic::write_atomic(&index_path, json.as_bytes())?;
    Ok(keep.then(|| Features {
        feats: kept,
        labels: src.labels.clone(),
        dim,
        classes: src.classes.clone(),
    }))
}

/// The cache's index, if it is complete.
pub fn index(cache: &Path) -> Result<Option<Index>> {
    let path = cache.join(INDEX);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        Error::Config(format!(
            "{}: not a feature cache index: {e}",
            path.display()
        ))
    })
}

/// Reads a complete cache made by the checkpoint with fingerprint `checkpoint`. A cache made
/// by another checkpoint is an error that says so.
pub fn read(cache: &Path, checkpoint: &str) -> Result<Features> {
    let index = index(cache)?.ok_or_else(|| {
        Error::Config(format!(
            "{}: no complete feature cache ({INDEX} is missing)",
            cache.display()
        ))
    })?;
    if index.checkpoint != checkpoint {
        return Err(Error::Config(format!(
            "{}: these features were embedded by another checkpoint (fingerprint {}, this one is {checkpoint}); use another --features folder or delete it",
            cache.display(),
            index.checkpoint
        )));
    }
    let mut feats = Vec::with_capacity(index.images * index.dim);
    let mut labels = Vec::with_capacity(index.images);
    for s in &index.shards {
        let ck = Checkpoint::load(&cache.join(s))?;
        let f = ck.get("features", None)?;
        let l = ck.get("labels", None)?;
        if f.shape.len() != 2 || f.shape[1] != index.dim || l.shape != [f.shape[0]] {
            return Err(Error::Config(format!(
                "{}: features {:?} and labels {:?} do not fit the index (width {})",
                cache.join(s).display(),
                f.shape,
                l.shape,
                index.dim
            )));
        }
        feats.extend_from_slice(&f.data);
        labels.extend(l.data.iter().map(|&v| v as usize));
    }
    if labels.len() != index.images {
        return Err(Error::Config(format!(
            "{}: the shards hold {} images, the index says {}",
            cache.display(),
            labels.len(),
            index.images
        )));
    }
    Ok(Features {
        feats,
        labels,
        dim: index.dim,
        classes: index.classes,
    })
}

/// Where features came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from a complete cache.
    Cache,
    /// Embedded now (and cached, when a cache folder was given).
    Embedded,
}

/// The features of the labelled folder `dir`: from `cache` when it is complete, made by this
/// checkpoint and of the same listing; otherwise embedded (and written to `cache`, if given).
pub fn folder_features(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    dir: &Path,
    cache: Option<&Path>,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Features, Origin)> {
    let src = Source::open(dir)?;
    let name = dir.display().to_string();
    match cache {
        Some(c) => {
            if let Some(ix) = index(c)? {
                let fp = fingerprint(ck);
                if ix.listing == src.listing() || ix.checkpoint != fp {
                    // A cache of another checkpoint is refused here, whatever the listing.
                    let f = read(c, &fp)?;
                    return Ok((f, Origin::Cache));
                }
            }
            let f = write(
                gpu,
                ck,
                head_dim,
                &src,
                &name,
                c,
                SHARD_ROWS,
                true,
                &mut progress,
            )?
            .ok_or_else(|| Error::Config("features were not kept".into()))?;
            Ok((f, Origin::Embedded))
        }
        None => {
            let mut feats = Vec::new();
            let mut dim = 0;
            embed_paths_each(gpu, ck, head_dim, &src.paths, |rows, width, done, total| {
                dim = width;
                feats.extend_from_slice(rows);
                progress(done, total);
                Ok(())
            })?;
            Ok((
                Features {
                    feats,
                    labels: src.labels,
                    dim,
                    classes: src.classes,
                },
                Origin::Embedded,
            ))
        }
    }
}
