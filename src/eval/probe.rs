//! One evaluation of a checkpoint on labelled image folders (`<class>/<image>`): CLS features
//! of the frozen encoder, then kNN, a linear probe or few-shot accuracy. The `probe` command
//! and the app's worker share it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::knn::{fewshot_accuracy, knn_accuracy, FewShot};
use super::linear::{linear_probe, ProbeConfig};
use crate::data::folder::LabelledFolder;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::models::features::embed_paths;
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
}

/// Features of a labelled folder.
pub struct Features {
    /// [images, dim], row-major.
    pub feats: Vec<f32>,
    /// Class index per image.
    pub labels: Vec<usize>,
    /// Feature width.
    pub dim: usize,
    /// Class names.
    pub classes: Vec<String>,
}

/// What an evaluation found.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Top-1 accuracy in [0, 1].
    pub accuracy: f64,
    /// The linear probe's accuracy per base learning rate.
    pub per_lr: Vec<(f64, f64)>,
}

/// CLS features of every image of a labelled folder (evaluation transform at the encoder's
/// input size), streamed: pixels are not kept.
pub fn folder_features(
    gpu: &Arc<Gpu>,
    ck: &Checkpoint,
    head_dim: usize,
    dir: &Path,
) -> Result<Features> {
    let f = LabelledFolder::open(dir)?;
    let paths: Vec<PathBuf> = f.items.iter().map(|(p, _)| p.clone()).collect();
    let labels: Vec<usize> = f.items.iter().map(|&(_, l)| l).collect();
    let feats = embed_paths(gpu, ck, head_dim, &paths, |_, _| {})?;
    Ok(Features {
        dim: feats.shape[1],
        feats: feats.data,
        labels,
        classes: f.classes.clone(),
    })
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
    let test = folder_features(gpu, &ck, r.head_dim, &r.test)?;
    // Train features with the test labels renumbered to the train folder's class numbers.
    let train = |what: &str| -> Result<(Features, Vec<usize>)> {
        let dir = r.train.as_ref().ok_or_else(|| {
            Error::Config(format!("{what} needs a labelled train folder (--train)"))
        })?;
        let tr = folder_features(gpu, &ck, r.head_dim, dir)?;
        let tl = relabel(&tr, &test, dir, &r.test)?;
        Ok((tr, tl))
    };
    let (te, tl, dim) = (&test.feats, &test.labels, test.dim);
    Ok(match &r.method {
        Method::Knn { k, temperature } => {
            let (tr, tl) = train("kNN")?;
            Outcome {
                accuracy: knn_accuracy(&tr.feats, &tr.labels, te, &tl, dim, *k, *temperature)?,
                per_lr: vec![],
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
            }
        }
        Method::FewShot(cfg) => Outcome {
            accuracy: fewshot_accuracy(te, tl, dim, cfg)?,
            per_lr: vec![],
        },
    })
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
