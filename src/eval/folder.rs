//! A labelled image folder (one sub-folder per class, images inside) and the evaluation
//! preprocessing: resize the shorter side (bilinear), center crop, ImageNet normalization.

use std::path::{Path, PathBuf};

use crate::data::pool::load_rgb;
use crate::error::{Error, Result};

/// ImageNet channel means.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Images with integer labels; class names in label order.
#[derive(Clone, Debug)]
pub struct LabelledFolder {
    /// Class names (sub-folder names, sorted).
    pub classes: Vec<String>,
    /// (image path, label).
    pub items: Vec<(PathBuf, usize)>,
}

impl LabelledFolder {
    /// Lists `dir/<class>/<image>` (png/jpg/jpeg), classes sorted by name.
    pub fn open(dir: &Path) -> Result<LabelledFolder> {
        let io = |p: &Path, e: std::io::Error| Error::Io {
            path: p.display().to_string(),
            source: e,
        };
        let mut classes: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        classes.sort();
        let mut items = Vec::new();
        for (label, c) in classes.iter().enumerate() {
            let cd = dir.join(c);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&cd)
                .map_err(|e| io(&cd, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    let ext = p
                        .extension()
                        .and_then(|x| x.to_str())
                        .unwrap_or_default()
                        .to_lowercase();
                    matches!(ext.as_str(), "png" | "jpg" | "jpeg")
                })
                .collect();
            files.sort();
            items.extend(files.into_iter().map(|f| (f, label)));
        }
        if classes.len() < 2 || items.is_empty() {
            return Err(Error::Config(format!(
                "{}: expected one sub-folder per class (at least 2) with images, found {} classes and {} images",
                dir.display(),
                classes.len(),
                items.len()
            )));
        }
        Ok(LabelledFolder { classes, items })
    }
}

/// Bilinear sample of channel-major [3, h, w] at (y, x) (edge-clamped).
fn sample(img: &[f32], h: usize, w: usize, c: usize, y: f32, x: f32) -> f32 {
    let y = y.clamp(0.0, (h - 1) as f32);
    let x = x.clamp(0.0, (w - 1) as f32);
    let (y0, x0) = (y.floor() as usize, x.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
    let (fy, fx) = (y - y0 as f32, x - x0 as f32);
    let p = |yy: usize, xx: usize| img[c * h * w + yy * w + xx];
    (p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx) * (1.0 - fy)
        + (p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx) * fy
}

/// Resizes [3, h, w] so its shorter side is `short` (bilinear) and center-crops `size` x
/// `size`; values are kept as they are.
pub fn resize_center_crop(img: &[f32], h: usize, w: usize, short: usize, size: usize) -> Vec<f32> {
    let scale = short as f32 / h.min(w) as f32;
    let (rh, rw) = (h as f32 * scale, w as f32 * scale);
    let (oy, ox) = ((rh - size as f32) / 2.0, (rw - size as f32) / 2.0);
    let mut out = vec![0.0; 3 * size * size];
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                // Pixel centers: resized coordinate -> source coordinate.
                let sy = (y as f32 + oy + 0.5) / scale - 0.5;
                let sx = (x as f32 + ox + 0.5) / scale - 0.5;
                out[c * size * size + y * size + x] = sample(img, h, w, c, sy, sx);
            }
        }
    }
    out
}

/// Evaluation transform: resize the shorter side to `size * 8 / 7` (256 for 224), center-crop
/// `size`, normalize. Input [3, h, w] in [0, 1]; output [3, size, size].
pub fn eval_transform(img: &[f32], h: usize, w: usize, size: usize) -> Vec<f32> {
    let mut out = resize_center_crop(img, h, w, (size * 8).div_ceil(7), size);
    for (i, v) in out.iter_mut().enumerate() {
        let c = i / (size * size);
        *v = (*v - MEAN[c]) / STD[c];
    }
    out
}

/// Loads and preprocesses every image of a folder: ([n, 3, size, size] data, labels).
pub fn load_eval(folder: &LabelledFolder, size: usize) -> Result<(Vec<f32>, Vec<usize>)> {
    let mut data = Vec::with_capacity(folder.items.len() * 3 * size * size);
    let mut labels = Vec::with_capacity(folder.items.len());
    for (path, label) in &folder.items {
        let (h, w, img) = load_rgb(path)?;
        data.extend(eval_transform(&img, h, w, size));
        labels.push(*label);
    }
    Ok((data, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_transform_resizes_crops_and_normalizes() {
        // A horizontal ramp 40 wide, 20 high: the center crop keeps the middle of the ramp.
        let (h, w) = (20, 40);
        let img: Vec<f32> = (0..3 * h * w)
            .map(|p| (p % w) as f32 / (w - 1) as f32)
            .collect();
        let out = eval_transform(&img, h, w, 14);
        assert_eq!(out.len(), 3 * 14 * 14);
        let px = |c: usize, y: usize, x: usize| out[c * 196 + y * 14 + x] * STD[c] + MEAN[c];
        // Symmetric around the middle of the ramp, increasing left to right.
        assert!(
            (px(0, 7, 6) + px(0, 7, 7) - 1.0).abs() < 0.02,
            "{} {}",
            px(0, 7, 6),
            px(0, 7, 7)
        );
        assert!(px(1, 3, 0) < px(1, 3, 13));
        let flat = eval_transform(&vec![0.5; 3 * h * w], h, w, 14);
        assert!(flat
            .iter()
            .take(196)
            .all(|&v| (v - (0.5 - MEAN[0]) / STD[0]).abs() < 1e-5));
    }
}
