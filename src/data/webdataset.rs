//! Pools as WebDataset shards (docs/formats.md): tar files `pool-000000.tar`, `pool-000001.tar`,
//! ... each holding a fixed number of captions; caption k is the sample with key `{k:010}`,
//! members `KEY.0.png` ... `KEY.{K-1}.png` (its K images) and `KEY.txt` (its caption), in the
//! layout `webdataset` and `img2dataset` read. As webdataset does, a member's key is its path
//! up to the first '.' of its file name and the rest is its field; a sample is a run of
//! consecutive members with one key. Shards written elsewhere with one image per sample
//! (`KEY.jpg`, `KEY.txt`, ...) read as K = 1; other fields (`.json`, `.cls`, ...) are ignored.

use std::path::{Path, PathBuf};

use super::tar::{TarReader, TarWriter};
use crate::error::{Error, Result};

/// Name of shard `s`.
pub fn shard_name(s: usize) -> String {
    format!("pool-{s:06}.tar")
}

/// Key of caption `k`.
pub fn key(k: u64) -> String {
    format!("{k:010}")
}

/// Splits a member name into (key, field) as webdataset does.
pub fn split_key(name: &str) -> Option<(&str, &str)> {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base..].find('.')? + base;
    Some((&name[..dot], &name[dot + 1..]))
}

/// Image extensions a pool may hold.
const IMAGE_EXTS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The image index a field names: `3.png` is image 3; a bare `png`/`jpg` is image 0 of a
/// one-image sample. `None` for other fields.
fn image_index(field: &str) -> Option<usize> {
    let lower = field.to_ascii_lowercase();
    if IMAGE_EXTS.contains(&lower.as_str()) {
        return Some(0);
    }
    let (idx, ext) = lower.split_once('.')?;
    if !IMAGE_EXTS.contains(&ext) || idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    idx.parse().ok()
}

/// One sample of a shard: its key, caption and where its first member starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample's key.
    pub key: String,
    /// Its caption (the `.txt` member).
    pub text: String,
    /// Offset of its first member's header.
    pub offset: u64,
    /// Its images.
    pub images: usize,
}

/// Reads one shard's samples, checking that each has a caption and images 0..K-1.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let mut r = TarReader::open(path)?;
    let members = r.members()?;
    let fail = |what: String| Error::Config(format!("{}: {what}", path.display()));
    let mut out: Vec<Sample> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut i = 0;
    while i < members.len() {
        let Some((k, _)) = split_key(&members[i].name) else {
            // A member without an extension belongs to no sample (webdataset skips it too).
            i += 1;
            continue;
        };
        let k = k.to_string();
        if !seen.insert(k.clone()) {
            return Err(fail(format!(
                "sample '{k}' appears twice (its members must be consecutive)"
            )));
        }
        let offset = members[i].header;
        let mut text = None;
        let mut idx = Vec::new();
        while i < members.len() && split_key(&members[i].name).is_some_and(|(k2, _)| k2 == k) {
            let (_, field) = split_key(&members[i].name).unwrap_or_default();
            if field == "txt" {
                let bytes = r.read(&members[i])?;
                text =
                    Some(String::from_utf8(bytes).map_err(|_| {
                        fail(format!("sample '{k}': its .txt caption is not UTF-8"))
                    })?);
            } else if let Some(j) = image_index(field) {
                idx.push(j);
            }
            i += 1;
        }
        let text = text.ok_or_else(|| fail(format!("sample '{k}' has no .txt caption")))?;
        idx.sort_unstable();
        if idx.is_empty() || idx.iter().enumerate().any(|(a, &b)| a != b) {
            return Err(fail(format!(
                "sample '{k}' has images {idx:?}; want 0.png, 1.png, ... with none missing"
            )));
        }
        out.push(Sample {
            key: k,
            text: text.trim_end_matches(['\n', '\r']).to_string(),
            offset,
            images: idx.len(),
        });
    }
    Ok(out)
}

/// Reads image `j` of the sample `key` whose members start at `offset`: its bytes and its
/// member name.
pub fn read_image(path: &Path, offset: u64, key: &str, j: usize) -> Result<(Vec<u8>, String)> {
    let mut r = TarReader::open(path)?;
    let mut at = offset;
    while let Some(m) = r.member_at(at)? {
        match split_key(&m.name) {
            Some((k, field)) if k == key => {
                if image_index(field) == Some(j) {
                    let data = r.read(&m)?;
                    return Ok((data, m.name));
                }
            }
            _ => break,
        }
        at = m.next();
    }
    Err(Error::Config(format!(
        "{}: sample '{key}' has no image {j} (the shard changed since it was opened?)",
        path.display()
    )))
}

/// The `*.tar` shards of a folder, sorted by name (temporary `.tar.tmp` files left by an
/// interrupted writer are not shards).
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::Io {
            path: dir.display().to_string(),
            source: e,
        })?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar") && p.is_file())
        .collect();
    shards.sort();
    Ok(shards)
}

/// Writes samples into shards of `per_shard` captions each: `begin(s)` / `push` / `end`.
pub struct ShardSink {
    writer: Option<(usize, TarWriter)>,
    dir: PathBuf,
}

impl ShardSink {
    /// A sink writing into `dir`.
    pub fn new(dir: &Path) -> ShardSink {
        ShardSink {
            writer: None,
            dir: dir.to_path_buf(),
        }
    }

    /// Path of shard `s`.
    pub fn path(&self, s: usize) -> PathBuf {
        self.dir.join(shard_name(s))
    }

    /// Appends caption `k`'s sample to shard `s` (finishing the previous shard when `s` moves
    /// on). `images` are encoded files with their extensions.
    pub fn push(
        &mut self,
        s: usize,
        k: u64,
        images: &[(Vec<u8>, String)],
        text: &str,
    ) -> Result<()> {
        if self.writer.as_ref().is_some_and(|(cur, _)| *cur != s) {
            self.finish()?;
        }
        if self.writer.is_none() {
            self.writer = Some((s, TarWriter::create(&self.path(s))?));
        }
        let (_, w) = self
            .writer
            .as_mut()
            .ok_or_else(|| Error::Config("no shard".into()))?;
        let key = key(k);
        for (j, (bytes, ext)) in images.iter().enumerate() {
            w.append(&format!("{key}.{j}.{ext}"), bytes)?;
        }
        w.append(&format!("{key}.txt"), text.as_bytes())
    }

    /// Finishes the open shard (renaming it into place).
    pub fn finish(&mut self) -> Result<()> {
        match self.writer.take() {
            Some((_, w)) => w.finish(),
            None => Ok(()),
        }
    }
}

/// Whether shard `path` is complete with exactly the captions `range` (keys in order), each
/// with `images` images: what a resumed run may skip.
pub fn shard_is_complete(path: &Path, range: std::ops::Range<usize>, images: usize) -> bool {
    read_samples(path).is_ok_and(|s| {
        s.len() == range.len()
            && s.iter()
                .zip(range)
                .all(|(s, k)| s.key == key(k as u64) && s.images == images)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_fields_follow_webdataset() {
        assert_eq!(split_key("0000000042.3.png"), Some(("0000000042", "3.png")));
        assert_eq!(split_key("a.b/c.txt"), Some(("a.b/c", "txt")));
        assert_eq!(split_key("noext"), None);
        assert_eq!(image_index("3.png"), Some(3));
        assert_eq!(image_index("jpg"), Some(0));
        assert_eq!(image_index("JPEG"), Some(0));
        assert_eq!(image_index("json"), None);
        assert_eq!(image_index("x.png"), None);
        assert_eq!(key(42), "0000000042");
    }
}
