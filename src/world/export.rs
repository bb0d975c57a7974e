//! Writing the mini-world to disk: a pool in the official layout (the "real" renders of a set
//! of captions, several per caption if asked) and labelled folders (`<label>/<n>.png`) for
//! evaluation.

use std::path::Path;

use super::render::render;
use super::{layout_rng, Description, Labels, Scene, COLOURS, GROUNDS, SHAPES};
use crate::data::{csv, pool};
use crate::error::{Error, Result};

/// Which label names the folders of a labelled export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LabelKind {
    /// The main object's shape (12 classes).
    Shape,
    /// The main object's colour (8 classes).
    Colour,
    /// The background colour (5 classes).
    Ground,
}

impl LabelKind {
    /// The class name of `labels` under this kind.
    pub fn class(self, labels: &Labels) -> &'static str {
        match self {
            LabelKind::Shape => SHAPES[labels.shape],
            LabelKind::Colour => COLOURS[labels.colour].0,
            LabelKind::Ground => GROUNDS[labels.ground].0,
        }
    }
}

/// The layout of image `k` of caption `c` (index in its list) under `seed`.
pub fn scene_of(d: &Description, c: usize, k: usize, seed: u64) -> Scene {
    Scene::layout(d, &mut layout_rng(seed, c as u64, k as u64))
}

/// The render of image `k` of caption `c` (index in its list) under `seed`.
pub fn render_caption(d: &Description, c: usize, k: usize, size: usize, seed: u64) -> Vec<f32> {
    render(&scene_of(d, c, k, seed), size)
}

/// Writes `descriptions` as a pool in `dir`: `captions.csv` and `seed_j/...` for `per_caption`
/// renders each; `progress(done, total)` after every image.
pub fn write_pool(
    dir: &Path,
    descriptions: &[Description],
    per_caption: usize,
    size: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    if per_caption == 0 || size < 8 {
        return Err(Error::Config(format!(
            "a world pool needs at least one image per caption and 8 pixels (got {per_caption}, {size})"
        )));
    }
    let mut index = String::new();
    let total = descriptions.len() * per_caption;
    for (c, d) in descriptions.iter().enumerate() {
        let rel = pool::relpath(c as u64);
        index += &csv::row(&[&rel, &d.caption()]);
        for j in 0..per_caption {
            let img = render_caption(d, c, j, size, seed);
            crate::util::image::save_rgb(
                &dir.join(format!("seed_{j}")).join(&rel),
                size,
                size,
                &img,
            )?;
            progress(c * per_caption + j + 1, total);
        }
    }
    let path = dir.join("captions.csv");
    let tmp = dir.join("captions.csv.tmp");
    std::fs::write(&tmp, index)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })
}

/// Writes one render of each description into `dir/<label>/<n>.png` (n = its index).
pub fn write_labelled(
    dir: &Path,
    descriptions: &[Description],
    kind: LabelKind,
    size: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    for (c, d) in descriptions.iter().enumerate() {
        let scene = scene_of(d, c, 0, seed);
        let name = kind.class(&scene.labels());
        let img = render(&scene, size);
        crate::util::image::save_rgb(
            &dir.join(name).join(format!("{c:06}.png")),
            size,
            size,
            &img,
        )?;
        progress(c + 1, descriptions.len());
    }
    Ok(())
}
