//! A labelled image folder: one sub-folder per class, images inside.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::util::image::{eval_transform, load_rgb};

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
