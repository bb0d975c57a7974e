//! A synthetic image pool in the official StableRep layout (docs/formats.md): a folder with
//! `captions.csv` (no header; relative image path, caption) and one sub-folder per generation
//! seed (`seed_0`, `seed_1`, ...), each holding image j of every caption under the same
//! relative path `{k / 10^6:06}/{(k % 10^6) / 1000:06}/{k % 1000:05}.png`. Or the same pool
//! as WebDataset shards ([`super::webdataset`]): [`Pool::open`] reads either layout, and
//! [`Pool::read_bytes`] reads an image from whichever it is.

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

/// Where a pool's images are.
#[derive(Clone, Debug)]
pub enum Layout {
    /// The official folders: image j of a caption lives under `roots[j]`.
    Folder {
        /// Seed roots, by seed number.
        roots: Vec<PathBuf>,
    },
    /// WebDataset shards: caption i is the sample whose members start at byte `at[i].1` of
    /// `shards[at[i].0]` (12 bytes per caption; pixels are read on demand).
    Shards {
        /// The shard files, sorted by name.
        shards: Vec<PathBuf>,
        /// Images per caption.
        images: usize,
        /// (shard, offset of the sample's first member) per caption.
        at: Vec<(u32, u64)>,
    },
}

/// An opened pool.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The pool folder.
    pub dir: PathBuf,
    /// Where the images are.
    pub layout: Layout,
    /// Captions in index order (for shards, `relpath` is the sample's key).
    pub captions: Vec<Caption>,
}

impl Pool {
    /// Opens `dir`: the official layout when it has `captions.csv` (the `seed_*` roots sorted
    /// by number), otherwise its `*.tar` WebDataset shards.
    pub fn open(dir: &Path) -> Result<Pool> {
        let index = dir.join("captions.csv");
        if !index.exists() && dir.is_dir() {
            let shards = super::webdataset::list_shards(dir)?;
            if !shards.is_empty() {
                return Pool::open_shards(dir, shards);
            }
            return Err(Error::Config(format!(
                "{}: not a pool (no captions.csv and no .tar shards)",
                dir.display()
            )));
        }
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
            layout: Layout::Folder { roots },
            captions,
        })
    }

    /// Opens WebDataset shards, indexing every sample (all must have the same number of
    /// images).
    fn open_shards(dir: &Path, shards: Vec<PathBuf>) -> Result<Pool> {
        let mut captions = Vec::new();
        let mut at = Vec::new();
        let mut images = None;
        for (s, path) in shards.iter().enumerate() {
            for sample in super::webdataset::read_samples(path)? {
                match images {
                    None => images = Some(sample.images),
                    Some(k) if k != sample.images => {
                        return Err(Error::Config(format!(
                            "{}: sample '{}' has {} images where the pool's first has {k}",
                            path.display(),
                            sample.key,
                            sample.images
                        )))
                    }
                    _ => {}
                }
                at.push((s as u32, sample.offset));
                captions.push(Caption {
                    relpath: sample.key,
                    text: sample.text,
                });
            }
        }
        let images = images.ok_or_else(|| {
            Error::Config(format!("{}: its shards hold no samples", dir.display()))
        })?;
        Ok(Pool {
            dir: dir.to_path_buf(),
            layout: Layout::Shards { shards, images, at },
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
            layout: Layout::Folder {
                roots: vec![dir.to_path_buf()],
            },
            captions,
        })
    }

    /// Images per caption (K).
    pub fn images_per_caption(&self) -> usize {
        match &self.layout {
            Layout::Folder { roots } => roots.len(),
            Layout::Shards { images, .. } => *images,
        }
    }

    /// Path of image `j` of caption `i` in the folder layout (`None` for shards).
    pub fn image_path(&self, i: usize, j: usize) -> Option<PathBuf> {
        match &self.layout {
            Layout::Folder { roots } => Some(roots[j].join(&self.captions[i].relpath)),
            Layout::Shards { .. } => None,
        }
    }

    /// Where image `j` of caption `i` is, for messages: its path, or `SHARD:KEY.j`.
    pub fn image_name(&self, i: usize, j: usize) -> String {
        match &self.layout {
            Layout::Folder { roots } => roots[j]
                .join(&self.captions[i].relpath)
                .display()
                .to_string(),
            Layout::Shards { shards, at, .. } => format!(
                "{}:{}.{j}",
                shards[at[i].0 as usize].display(),
                self.captions[i].relpath
            ),
        }
    }

    /// The encoded bytes of image `j` of caption `i` and its file extension (lower case).
    pub fn read_bytes(&self, i: usize, j: usize) -> Result<(Vec<u8>, String)> {
        let ext_of = |name: &str| {
            Path::new(name)
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_else(|| "png".into())
        };
        match &self.layout {
            Layout::Folder { roots } => {
                let path = roots[j].join(&self.captions[i].relpath);
                let bytes = std::fs::read(&path).map_err(|e| Error::Io {
                    path: path.display().to_string(),
                    source: e,
                })?;
                Ok((bytes, ext_of(&self.captions[i].relpath)))
            }
            Layout::Shards { shards, at, .. } => {
                let (s, offset) = at[i];
                let (bytes, name) = super::webdataset::read_image(
                    &shards[s as usize],
                    offset,
                    &self.captions[i].relpath,
                    j,
                )?;
                Ok((bytes, ext_of(&name)))
            }
        }
    }

    /// Image `j` of caption `i` decoded to RGB f32 [3, H, W] in [0, 1]: (H, W, pixels).
    pub fn load_rgb(&self, i: usize, j: usize) -> Result<(usize, usize, Vec<f32>)> {
        let (bytes, _) = self.read_bytes(i, j)?;
        crate::util::image::decode_rgb(&bytes, &self.image_name(i, j))
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
