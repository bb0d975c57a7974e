//! One evaluation of a checkpoint on labelled image folders (`<class>/<image>`): CLS features
//! of the frozen encoder, then kNN, a linear probe or few-shot accuracy. The `probe` command
//! and the app's worker share it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use super::cache::Features;
use super::cache::Origin;
use super::knn::{fewshot_accuracy, knn_accuracy, FewShot};
use super::linear::{linear_probe, ProbeConfig};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::checkpoint::Checkpoint;

/// How to score the features.
#[derive(Clone, Debug)]
pub enum Method {
    /// Weighted k nearest neighbours on cosine similarity (needs a train folder).
    Knn {
        /// Neighbours.
        k: usize,
        /// Weight temperature.
        temperature: f64,
    },
    /// Linear classifiers on frozen features, one per base learning rate; the best is
    /// reported (needs a train folder).
    Linear(ProbeConfig),
    /// N-way K-shot nearest prototype on the test folder alone.
    FewShot(FewShot),
}

/// An evaluation to run.
#[derive(Clone, Debug)]
pub struct Request {
    /// Encoder checkpoint.
    pub checkpoint: PathBuf,
    /// Projection width of the checkpoint's head (to read its config).
    pub head_dim: usize,
    /// Labelled training folder (kNN, linear).
    pub train: Option<PathBuf>,
    /// Labelled test folder.
    pub test: PathBuf,
    /// The method.
    pub method: Method,
    /// A feature cache folder: `train/` and `test/` inside are read when they hold this
    /// checkpoint's features of the same images, and written otherwise (docs/scale.md).
    pub features: Option<PathBuf>,
}

/// What an evaluation found.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Top-1 accuracy in [0, 1].
    pub accuracy: f64,
    /// The linear probe's accuracy per base learning rate.
    pub per_lr: Vec<(f64, f64)>,
    /// (images, seconds spent embedding) of the folders that were embedded now.
    pub embedded: (usize, f64),
    /// Images whose features came from the cache.
    pub cached: usize,
}

/// CLS features of every image of a labelled folder (evaluation transform at the encoder's
/// input size), streamed: pixels are not kept.
pub fn folder_features(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    dir: &Path,
) -> Result<Features> {
    Ok(super::cache::folder_features(gpu, ck, head_dim, dir, None, |_, _| {})?.0)
}

/// The test labels renumbered as the train folder numbers the same class names: each folder
/// numbers its own sub-folders in sorted order, so a class present in one and not the other
/// would shift every label after it. A test class the train folder lacks is an error that
/// names it.
pub fn relabel(
    train: &Features,
    test: &Features,
    train_dir: &Path,
    test_dir: &Path,
) -> Result<Vec<usize>> {
    let index: std::collections::HashMap<&str, usize> = train
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let map: Vec<Option<usize>> = test
        .classes
        .iter()
        .map(|c| index.get(c.as_str()).copied())
        .collect();
    let missing: Vec<&str> = test
        .classes
        .iter()
        .zip(&map)
        .filter(|(_, m)| m.is_none())
        .map(|(c, _)| c.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Config(format!(
            "test folder {} has classes the train folder {} lacks: {}",
            test_dir.display(),
            train_dir.display(),
            missing.join(", ")
        )));
    }
    Ok(test
        .labels
        .iter()
        .map(|&l| map[l].expect("checked above"))
        .collect())
}

/// Runs `r`.
pub fn run(gpu: &Arc<Gpu>, r: &Request) -> Result<Outcome> {
    let ck = Checkpoint::load(&r.checkpoint)?;
    let embedded = std::cell::Cell::new((0usize, 0.0f64));
    let cached = std::cell::Cell::new(0usize);
    let features = |dir: &Path, part: &str| -> Result<Features> {
        let cache = r.features.as_ref().map(|c| c.join(part));
        let t0 = std::time::Instant::now();
        let (f, origin) =
            super::cache::folder_features(gpu, &ck, r.head_dim, dir, cache.as_deref(), |_, _| {})?;
        match origin {
            Origin::Cache => cached.set(cached.get() + f.labels.len()),
            Origin::Embedded => {
                let (n, s) = embedded.get();
                embedded.set((n + f.labels.len(), s + t0.elapsed().as_secs_f64()));
            }
        }
        Ok(f)
    };
    let test = features(&r.test, "test")?;
    // Train features with the test labels renumbered to the train folder's class numbers.
    let train = |what: &str| -> Result<(Features, Vec<usize>)> {
        let dir = r.train.as_ref().ok_or_else(|| {
            Error::Config(format!("{what} needs a labelled train folder (--train)"))
        })?;
        let tr = features(dir, "train")?;
        let tl = relabel(&tr, &test, dir, &r.test)?;
        Ok((tr, tl))
    };
    let (te, tl, dim) = (&test.feats, &test.labels, test.dim);
    let mut out = match &r.method {
        Method::Knn { k, temperature } => {
            let (tr, tl) = train("kNN")?;
            Outcome {
                accuracy: knn_accuracy(&tr.feats, &tr.labels, te, &tl, dim, *k, *temperature)?,
                per_lr: vec![],
                embedded: (0, 0.0),
                cached: 0,
            }
        }
        Method::Linear(cfg) => {
            let (tr, tl) = train("the linear probe")?;
            let classes = tr.classes.len();
            let (best, accs) =
                linear_probe(gpu, &tr.feats, &tr.labels, te, &tl, dim, classes, cfg)?;
            Outcome {
                accuracy: best,
                per_lr: cfg.base_lrs.iter().copied().zip(accs).collect(),
                embedded: (0, 0.0),
                cached: 0,
            }
        }
        Method::FewShot(cfg) => Outcome {
            accuracy: fewshot_accuracy(te, tl, dim, cfg)?,
            per_lr: vec![],
            embedded: (0, 0.0),
            cached: 0,
        },
    };
    out.embedded = embedded.get();
    out.cached = cached.get();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(classes: &[&str], labels: &[usize]) -> Features {
        Features {
            feats: vec![0.0; labels.len()],
            labels: labels.to_vec(),
            dim: 1,
            classes: classes.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn test_labels_follow_class_names_not_folder_positions() {
        // The train folder has a class ("bird") the test folder lacks: by position, the test
        // folder's "cat" (0) and "dog" (1) would have read as "bird" and "cat".
        let train = features(&["bird", "cat", "dog"], &[0, 1, 2]);
        let test = features(&["cat", "dog"], &[0, 1, 1, 0]);
        let (a, b) = (Path::new("train"), Path::new("test"));
        assert_eq!(relabel(&train, &test, a, b).unwrap(), vec![1, 2, 2, 1]);
        // A test class with no training images is refused, by name.
        let test = features(&["cat", "emu", "fox"], &[0, 1, 2]);
        let e = relabel(&train, &test, a, b).unwrap_err().to_string();
        assert!(e.contains("emu, fox") && e.contains("train"), "{e}");
    }
}
