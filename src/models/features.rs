//! Feature extraction with a trained (or converted official) checkpoint: the ViT's CLS
//! features after the final norm, the vector the linear probe and kNN use.
//!
//! Image files are streamed: worker threads decode and preprocess one round of chunks while the
//! GPU embeds the previous one, and only features are kept, so memory does not grow with the
//! number of images beyond the features themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::vit_config;
use super::vit::{self, VitConfig};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, NodeId, ParamStore, Plan, PlanOptions};
use crate::nn::checkpoint::{Checkpoint, HostTensor};
use crate::util::image::{eval_transform, load_rgb};

/// Images per plan run when embedding many images.
pub const CHUNK: usize = 64;

/// A checkpoint's encoder, ready to embed batches of preprocessed images.
pub struct Embedder {
    gpu: Arc<Gpu>,
    cfg: VitConfig,
    store: ParamStore,
    /// The plan for the last batch size: (rows, plan, input, features).
    plan: Option<(usize, Plan, NodeId, NodeId)>,
}

impl Embedder {
    /// Loads the encoder (`visual.*`) of `ck`; `head_dim` is used when its architecture must be
    /// inferred.
    pub fn new(gpu: &Arc<Gpu>, ck: &Checkpoint, head_dim: usize) -> Result<Embedder> {
        let cfg = vit_config(ck, head_dim)?;
        let mut store = ParamStore::new();
        vit::load_params(gpu, &cfg, "visual.", ck, &mut store)?;
        Ok(Embedder {
            gpu: gpu.clone(),
            cfg,
            store,
            plan: None,
        })
    }

    /// The encoder's input size.
    pub fn img_size(&self) -> usize {
        self.cfg.img_size
    }

    /// The feature width.
    pub fn width(&self) -> usize {
        self.cfg.width
    }

    /// CLS features [n * width] of normalized images [n, 3, S, S] (run in chunks of [`CHUNK`]).
    pub fn embed(&mut self, images: &[f32]) -> Result<Vec<f32>> {
        let s = self.cfg.img_size;
        let per = 3 * s * s;
        if !images.len().is_multiple_of(per) {
            return Err(Error::Config(format!(
                "{} values are not a whole number of [3, {s}, {s}] images",
                images.len()
            )));
        }
        let n = images.len() / per;
        let mut out = Vec::with_capacity(n * self.cfg.width);
        for chunk in images.chunks(CHUNK * per) {
            let b = chunk.len() / per;
            if self.plan.as_ref().map(|p| p.0) != Some(b) {
                // Drop the old plan first: its buffers go back to the pool for the new one.
                self.plan = None;
                let mut g = Graph::new();
                let x = g.input("images", &[b, 3, s, s]);
                let f = vit::encoder(&mut g, &self.cfg, "visual.", x)?;
                let plan =
                    Plan::compile(&self.gpu, &g, &[f], &mut self.store, PlanOptions::default())?;
                self.plan = Some((b, plan, x, f));
            }
            let (_, plan, x, f) = self.plan.as_ref().expect("plan built above");
            plan.write(*x, chunk)?;
            out.extend(plan.run_fetch(&[*f])?.remove(0));
        }
        Ok(out)
    }
}

/// CLS features [N, width] of normalized images [N, 3, H, W].
pub fn embed(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    images: &HostTensor,
) -> Result<HostTensor> {
    let mut e = Embedder::new(gpu, ck, head_dim)?;
    let s = e.img_size();
    if images.shape.len() != 4 || images.shape[1..] != [3, s, s] {
        return Err(Error::Config(format!(
            "images must be [N, 3, {s}, {s}] for this checkpoint, got {:?}",
            images.shape
        )));
    }
    let data = e.embed(&images.data)?;
    Ok(HostTensor {
        shape: vec![images.shape[0], e.width()],
        data,
    })
}

/// Threads that decode and preprocess image files while the GPU embeds.
fn decode_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

/// Decodes `paths` and applies the evaluation transform at `size`: [len, 3, size, size].
fn decode_chunk(paths: &[PathBuf], size: usize) -> Result<Vec<f32>> {
    let mut data = Vec::with_capacity(paths.len() * 3 * size * size);
    for p in paths {
        let (h, w, img) = load_rgb(p)?;
        data.extend(eval_transform(&img, h, w, size));
    }
    Ok(data)
}

/// CLS features [paths.len(), width] of image files through the evaluation transform, streamed:
/// at most two rounds of decoded chunks exist at a time, whatever the number of images.
/// `progress(done, total)` is called after each chunk.
pub fn embed_paths(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    paths: &[PathBuf],
    mut progress: impl FnMut(usize, usize),
) -> Result<HostTensor> {
    let mut data = Vec::new();
    let width = embed_paths_each(gpu, ck, head_dim, paths, |rows, _, done, total| {
        data.extend_from_slice(rows);
        progress(done, total);
        Ok(())
    })?;
    Ok(HostTensor {
        shape: vec![paths.len(), width],
        data,
    })
}

/// Embeds image files as [`embed_paths`] does, handing each chunk of feature rows to
/// `each(rows, width, done, total)` instead of keeping them (an error it returns stops the
/// run). Returns the feature width.
pub fn embed_paths_each(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    paths: &[PathBuf],
    mut each: impl FnMut(&[f32], usize, usize, usize) -> Result<()>,
) -> Result<usize> {
    let mut e = Embedder::new(gpu, ck, head_dim)?;
    let size = e.img_size();
    let width = e.width();
    let workers = decode_workers();
    let mut embedded = 0;
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<f32>>>(workers);
        s.spawn(move || {
            for round in paths.chunks(CHUNK * workers) {
                let parts: Vec<Result<Vec<f32>>> = std::thread::scope(|d| {
                    let handles: Vec<_> = round
                        .chunks(CHUNK)
                        .map(|c| d.spawn(move || decode_chunk(c, size)))
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|_| {
                                Err(Error::Config("an image decoder thread panicked".into()))
                            })
                        })
                        .collect()
                });
                for p in parts {
                    // The receiver is gone when embedding failed: stop decoding.
                    if tx.send(p).is_err() {
                        return;
                    }
                }
            }
        });
        for part in rx {
            let pixels = part?;
            let rows = e.embed(&pixels)?;
            embedded += rows.len() / width.max(1);
            each(&rows, width, embedded, paths.len())?;
        }
        Ok(())
    })?;
    if embedded != paths.len() {
        return Err(Error::Graph(format!(
            "embedded {embedded} of {} images",
            paths.len()
        )));
    }
    Ok(width)
}

/// Reads `input` (tensor `images`), embeds it and writes `features` to `out` (atomically).
pub fn embed_files(
    gpu: &Arc<Gpu>,
    checkpoint: &Path,
    input: &Path,
    out: &Path,
    head_dim: usize,
) -> Result<usize> {
    let ck = Checkpoint::load(checkpoint)?;
    let inp = Checkpoint::load(input)?;
    let images = inp.get("images", None)?;
    let feats = embed(gpu, &ck, head_dim, images)?;
    let n = feats.shape[0];
    let mut o = Checkpoint::default();
    o.tensors.insert("features".into(), feats);
    o.save(out)?;
    Ok(n)
}

/// Decodes image files, applies the evaluation transform at the checkpoint's resolution,
/// embeds them (streamed, see [`embed_paths`]) and writes `features` to `out`.
pub fn embed_images(
    gpu: &Arc<Gpu>,
    checkpoint: &Path,
    images: &[PathBuf],
    out: &Path,
    head_dim: usize,
    progress: impl FnMut(usize, usize),
) -> Result<usize> {
    let ck = Checkpoint::load(checkpoint)?;
    let feats = embed_paths(gpu, &ck, head_dim, images, progress)?;
    let n = feats.shape[0];
    let mut o = Checkpoint::default();
    o.tensors.insert("features".into(), feats);
    o.save(out)?;
    Ok(n)
}
