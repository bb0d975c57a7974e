//! Views of an encoder's feature space for inspection: nearest-neighbour retrieval by cosine
//! similarity, and the cosine similarity matrix of a set of images (a pool batch of n captions
//! x m images shows the caption blocks that the multi-positive loss creates).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::data::pool::Pool;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::checkpoint::Checkpoint;

/// Rows of `feats` [n, dim] scaled to unit length (zero rows stay zero).
fn normalized(feats: &[f32], dim: usize) -> Vec<f32> {
    let mut out = feats.to_vec();
    for row in out.chunks_mut(dim.max(1)) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    out
}

/// Cosine similarities [n, n] of the rows of `feats` [n, dim].
pub fn cosine_matrix(feats: &[f32], dim: usize) -> Vec<f32> {
    let u = normalized(feats, dim);
    let rows: Vec<&[f32]> = u.chunks(dim.max(1)).collect();
    rows.iter()
        .flat_map(|a| {
            rows.iter()
                .map(move |b| a.iter().zip(*b).map(|(x, y)| x * y).sum::<f32>())
        })
        .collect()
}

/// The `k` rows most similar to row `query` (itself excluded), best first, with their
/// cosine similarity.
pub fn nearest(feats: &[f32], dim: usize, query: usize, k: usize) -> Result<Vec<(usize, f32)>> {
    let n = feats.len() / dim.max(1);
    if query >= n {
        return Err(Error::Config(format!("query image {query} of {n} images")));
    }
    let u = normalized(feats, dim);
    let q = &u[query * dim..(query + 1) * dim];
    let mut sims: Vec<(usize, f32)> = (0..n)
        .filter(|&i| i != query)
        .map(|i| {
            let r = &u[i * dim..(i + 1) * dim];
            (i, q.iter().zip(r).map(|(a, b)| a * b).sum())
        })
        .collect();
    sims.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    sims.truncate(k);
    Ok(sims)
}

/// CLS features [n, dim] of image files through the evaluation transform at the checkpoint's
/// input size.
pub fn image_features(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    paths: &[PathBuf],
) -> Result<(Vec<f32>, usize)> {
    let f = crate::models::features::embed_paths(gpu, ck, head_dim, paths, |_, _| {})?;
    Ok((f.data, f.shape[1]))
}

/// The first `captions` captions x `images` images of a pool, caption-major, with labels
/// ("caption text #j").
pub fn pool_batch(
    pool: &Path,
    captions: usize,
    images: usize,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let p = Pool::open(pool)?;
    if captions == 0
        || images == 0
        || captions > p.captions.len()
        || images > p.images_per_caption()
    {
        return Err(Error::Config(format!(
            "{}: a batch of {captions} captions x {images} images from a pool of {} x {}",
            pool.display(),
            p.captions.len(),
            p.images_per_caption()
        )));
    }
    let mut paths = Vec::new();
    let mut labels = Vec::new();
    for c in 0..captions {
        for j in 0..images {
            paths.push(p.image_path(c, j).ok_or_else(|| {
                Error::Config(format!(
                    "{}: retrieval reads pools in the folder layout; convert shards with `stablerep pool convert --to DIR --format folder`",
                    pool.display()
                ))
            })?);
            labels.push(format!("{} #{j}", p.captions[c].text));
        }
    }
    Ok((paths, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matrix_and_nearest_rank_by_angle() {
        // Rows: x, 2x (same direction), y, -x.
        let f = [1.0, 0.0, 2.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        let m = cosine_matrix(&f, 2);
        assert_eq!(m.len(), 16);
        assert!((m[1] - 1.0).abs() < 1e-6 && m[2].abs() < 1e-6 && (m[3] + 1.0).abs() < 1e-6);
        let nn = nearest(&f, 2, 0, 2).unwrap();
        assert_eq!(nn.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2]);
        assert!(nearest(&f, 2, 4, 1).is_err());
    }
}
