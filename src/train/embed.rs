//! Feature extraction with a trained (or converted official) checkpoint: the ViT's CLS
//! features after the final norm, the vector the linear probe and kNN use.

use std::path::Path;
use std::sync::Arc;

use super::fixed::vit_config;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, ParamStore, Plan, PlanOptions};
use crate::models::vit;
use crate::nn::checkpoint::{Checkpoint, HostTensor};

/// Images per plan run when embedding many images.
pub const CHUNK: usize = 64;

/// CLS features [N, width] of normalized images [N, 3, H, W] (processed in chunks of
/// [`CHUNK`]).
pub fn embed(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    images: &HostTensor,
) -> Result<HostTensor> {
    let cfg = vit_config(ck, head_dim)?;
    let s = cfg.img_size;
    if images.shape.len() != 4 || images.shape[1..] != [3, s, s] {
        return Err(Error::Config(format!(
            "images must be [N, 3, {s}, {s}] for this checkpoint, got {:?}",
            images.shape
        )));
    }
    let n = images.shape[0];
    let per = 3 * s * s;
    let mut store = ParamStore::new();
    vit::load_params(gpu, &cfg, "visual.", ck, &mut store)?;
    let mut data = Vec::with_capacity(n * cfg.width);
    let mut start = 0;
    let mut plan_for: Option<(usize, Plan, crate::graph::NodeId, crate::graph::NodeId)> = None;
    while start < n {
        let b = CHUNK.min(n - start);
        if plan_for.as_ref().map(|p| p.0) != Some(b) {
            let mut g = Graph::new();
            let x = g.input("images", &[b, 3, s, s]);
            let f = vit::encoder(&mut g, &cfg, "visual.", x)?;
            let plan = Plan::compile(gpu, &g, &[f], &mut store, PlanOptions::default())?;
            plan_for = Some((b, plan, x, f));
        }
        let (_, plan, x, f) = plan_for.as_ref().expect("plan built above");
        plan.write(*x, &images.data[start * per..(start + b) * per])?;
        data.extend(plan.run_fetch(&[*f])?.remove(0));
        start += b;
    }
    Ok(HostTensor {
        shape: vec![n, cfg.width],
        data,
    })
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
    let images = inp
        .get("images", None)
        .map_err(|e| Error::Config(format!("{}: {e}", input.display())))?;
    let feats = embed(gpu, &ck, head_dim, images)?;
    let n = feats.shape[0];
    let mut o = Checkpoint::default();
    o.tensors.insert("features".into(), feats);
    o.save(out)?;
    Ok(n)
}

/// Decodes image files, applies the evaluation transform at the checkpoint's resolution,
/// embeds them and writes `features` to `out`.
pub fn embed_images(
    gpu: &Arc<Gpu>,
    checkpoint: &Path,
    images: &[std::path::PathBuf],
    out: &Path,
    head_dim: usize,
) -> Result<usize> {
    let ck = Checkpoint::load(checkpoint)?;
    let size = vit_config(&ck, head_dim)?.img_size;
    let mut data = Vec::with_capacity(images.len() * 3 * size * size);
    for path in images {
        let (h, w, img) = crate::data::pool::load_rgb(path)?;
        data.extend(crate::eval::folder::eval_transform(&img, h, w, size));
    }
    let batch = HostTensor {
        shape: vec![images.len(), 3, size, size],
        data,
    };
    let feats = embed(gpu, &ck, head_dim, &batch)?;
    let n = feats.shape[0];
    let mut o = Checkpoint::default();
    o.tensors.insert("features".into(), feats);
    o.save(out)?;
    Ok(n)
}
