//! Image files and the evaluation preprocessing: decoding to RGB f32, atomic PNG writes,
//! resize and center crop with the `image` crate, ImageNet normalization.

use std::path::Path;

use crate::error::{Error, Result};

/// ImageNet channel means.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decodes an image file to RGB f32 in [0, 1], channel-major [3, H, W].
pub fn load_rgb(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let img = image::open(path)
        .map_err(|e| Error::Config(format!("{}: cannot decode image: {e}", path.display())))?
        .to_rgb8();
    Ok(planar(&img))
}

/// Decodes an encoded image (PNG, JPEG, ...; the format is read from its bytes) to RGB f32 in
/// [0, 1], channel-major; `name` says where it came from in errors.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<(usize, usize, Vec<f32>)> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| Error::Config(format!("{name}: cannot decode image: {e}")))?
        .to_rgb8();
    Ok(planar(&img))
}

fn planar(img: &image::RgbImage) -> (usize, usize, Vec<f32>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0.0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            out[c * h * w + y as usize * w + x as usize] = p[c] as f32 / 255.0;
        }
    }
    (h, w, out)
}

/// Writes RGB f32 [3, H, W] in [0, 1] as a PNG (creating folders), atomically and durably.
pub fn save_rgb(path: &Path, h: usize, w: usize, data: &[f32]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::Io {
            path: parent.display().to_string(),
            source: e,
        })?;
    }
    let png =
        encode_png(h, w, data).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    crate::atomic::write_atomic(path, &png)
}

/// Encodes RGB f32 [3, H, W] in [0, 1] as PNG bytes (rounded to 8 bits).
pub fn encode_png(h: usize, w: usize, data: &[f32]) -> std::result::Result<Vec<u8>, String> {
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for (x, y, p) in img.enumerate_pixels_mut() {
        for c in 0..3 {
            p[c] = (data[c * h * w + y as usize * w + x as usize].clamp(0.0, 1.0) * 255.0).round()
                as u8;
        }
    }
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode PNG: {e}"))?;
    Ok(png)
}

/// Whether `path` holds a PNG that decodes to `size` x `size` (a finished pool image, not one
/// a crash or a full disk cut short).
pub fn image_is_complete(path: &Path, size: usize) -> bool {
    image::open(path).is_ok_and(|img| img.width() as usize == size && img.height() as usize == size)
}

/// Resizes [3, h, w] so its shorter side is `short` (the longer side scaled and truncated, as
/// torchvision's `Resize(short)`) with the `image` crate's triangle filter (bilinear, widened
/// when shrinking so every source pixel counts, as PIL's), then center-crops `size` x `size`
/// (offsets rounded half to even, as torchvision's `CenterCrop`). Values stay in [0, 1].
pub fn resize_center_crop(img: &[f32], h: usize, w: usize, short: usize, size: usize) -> Vec<f32> {
    let (nh, nw) = if h <= w {
        (short, (short * w / h).max(size))
    } else {
        ((short * h / w).max(size), short)
    };
    let mut src = image::Rgb32FImage::new(w as u32, h as u32);
    for (x, y, p) in src.enumerate_pixels_mut() {
        for c in 0..3 {
            p[c] = img[c * h * w + y as usize * w + x as usize];
        }
    }
    let resized = if (nh, nw) == (h, w) {
        src
    } else {
        image::imageops::resize(
            &src,
            nw as u32,
            nh as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    // Python's round (half to even), as torchvision's CenterCrop.
    let top = ((nh - size) as f64 / 2.0).round_ties_even() as u32;
    let left = ((nw - size) as f64 / 2.0).round_ties_even() as u32;
    let mut out = vec![0.0; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel(left + x as u32, top + y as u32);
            for c in 0..3 {
                out[c * size * size + y * size + x] = p[c];
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
