//! A synthetic image pool in the official StableRep layout (docs/formats.md): a folder with
//! `captions.csv` (no header; relative image path, caption) and one sub-folder per generation
//! seed (`seed_0`, `seed_1`, ...), each holding image j of every caption under the same
//! relative path `{k / 10^6:06}/{(k % 10^6) / 1000:06}/{k % 1000:05}.png`.

use std::path::{Path, PathBuf};

use super::csv;
use crate::error::{Error, Result};

/// Relative path of caption `k`'s images (the official two-level split).
pub fn relpath(k: u64) -> String {
    format!(
        "{:06}/{:06}/{:05}.png",
        k / 1_000_000,
        (k % 1_000_000) / 1000,
        k % 1000
    )
}

/// One caption of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Caption {
    /// Image path relative to each seed root.
    pub relpath: String,
    /// The caption text.
    pub text: String,
}

/// An opened pool.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The pool folder.
    pub dir: PathBuf,
    /// Seed roots (image j of a caption lives under `roots[j]`).
    pub roots: Vec<PathBuf>,
    /// Captions in index order.
    pub captions: Vec<Caption>,
}

impl Pool {
    /// Opens `dir`: reads `captions.csv` and finds the `seed_*` roots (sorted by number).
    pub fn open(dir: &Path) -> Result<Pool> {
        let index = dir.join("captions.csv");
        let text = std::fs::read_to_string(&index).map_err(|e| Error::Io {
            path: index.display().to_string(),
            source: e,
        })?;
        let mut captions = Vec::new();
        for (i, r) in csv::parse(&text, &index.display().to_string())?
            .into_iter()
            .enumerate()
        {
            if r.len() < 2 {
                return Err(Error::Config(format!(
                    "{}: row {} has {} fields, expected path and caption",
                    index.display(),
                    i + 1,
                    r.len()
                )));
            }
            let lower = r[0].to_lowercase();
            if lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg") {
                captions.push(Caption {
                    relpath: r[0].clone(),
                    text: r[1].clone(),
                });
            }
        }
        let mut seeded: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(|e| Error::Io {
                path: dir.display().to_string(),
                source: e,
            })?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n: u64 = name.strip_prefix("seed_")?.parse().ok()?;
                e.path().is_dir().then_some((n, e.path()))
            })
            .collect();
        seeded.sort();
        let roots: Vec<PathBuf> = seeded.into_iter().map(|(_, p)| p).collect();
        if roots.is_empty() {
            return Err(Error::Config(format!(
                "{}: no seed_* image folders",
                dir.display()
            )));
        }
        if captions.is_empty() {
            return Err(Error::Config(format!("{}: no image rows", index.display())));
        }
        Ok(Pool {
            dir: dir.to_path_buf(),
            roots,
            captions,
        })
    }

    /// A labelled image folder (`dir/<class>/<image>`) as a pool for real-image training:
    /// every image is its own caption (K = 1) whose text is its class name.
    pub fn from_labelled_folder(dir: &Path) -> Result<Pool> {
        let folder = crate::data::folder::LabelledFolder::open(dir)?;
        let captions = folder
            .items
            .iter()
            .map(|(path, label)| Caption {
                relpath: path
                    .strip_prefix(dir)
                    .unwrap_or(path)
                    .to_string_lossy()
                    .into_owned(),
                text: folder.classes[*label].clone(),
            })
            .collect();
        Ok(Pool {
            dir: dir.to_path_buf(),
            roots: vec![dir.to_path_buf()],
            captions,
        })
    }

    /// Images per caption (K).
    pub fn images_per_caption(&self) -> usize {
        self.roots.len()
    }

    /// Path of image `j` of caption `i`.
    pub fn image_path(&self, i: usize, j: usize) -> PathBuf {
        self.roots[j].join(&self.captions[i].relpath)
    }
}

/// The captions of a captions file: one per line, trimmed, blank lines skipped.
pub fn read_captions(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let caps: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if caps.is_empty() {
        return Err(Error::Config(format!("{}: no captions", path.display())));
    }
    Ok(caps)
}
