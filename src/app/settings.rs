//! What the app remembers between runs: every panel's form, as JSON in the user's config folder
//! (`$XDG_CONFIG_HOME/stablerep/app.json`, `~/.config/...`, `%APPDATA%\stablerep\app.json`;
//! `STABLEREP_APP_SETTINGS` names another file). Written atomically whenever a value changes;
//! an unreadable file is reported and replaced by the defaults, never fatal.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable naming the settings file.
pub const SETTINGS_ENV: &str = "STABLEREP_APP_SETTINGS";

/// Every remembered value. Fields missing from an older file take their defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Settings {
    /// The panel shown.
    pub panel: String,
    /// Adapter filter (name and backend of the chosen adapter; empty: the best one).
    pub adapter: String,
    /// Stable Diffusion model: a diffusers folder or a single-file checkpoint.
    pub model: String,
    /// Config folder for a single file (empty: SD 1.5's).
    pub model_config: String,
    /// Models used before, most recent first.
    pub recent_models: Vec<String>,
    /// The Generate panel.
    pub generate: GenerateSettings,
    /// The Pool panel.
    pub pool: PoolSettings,
    /// The Train panel.
    pub train: TrainSettings,
    /// The Evaluate panel.
    pub evaluate: EvaluateSettings,
}

/// Sampling settings shared by Generate and Pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// Guidance scale.
    pub guidance: f64,
    /// Sampler steps.
    pub steps: usize,
    /// Sampler name (`Kind::parse`).
    pub sampler: String,
    /// DDIM's eta.
    pub eta: f64,
    /// Seed.
    pub seed: u64,
    /// Image side in pixels.
    pub size: usize,
    /// UNet weight storage: auto, f16 or f32.
    pub weights: String,
    /// Activation storage (`generate --precision`): auto, f16 or f32.
    pub precision: String,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            guidance: 7.5,
            steps: 50,
            sampler: "ddim".into(),
            eta: 0.0,
            seed: 0,
            size: 512,
            weights: "auto".into(),
            precision: "auto".into(),
        }
    }
}

/// The Generate panel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateSettings {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative: String,
    /// Images per prompt.
    pub images: usize,
    /// Sampling.
    pub sampling: Sampling,
    /// Guidance scales of the side-by-side comparison.
    pub sweep: String,
    /// Folder the Save buttons write to.
    pub save_dir: String,
}

impl Default for GenerateSettings {
    fn default() -> Self {
        GenerateSettings {
            prompt: "a photo of a golden retriever on a beach".into(),
            negative: String::new(),
            images: 4,
            sampling: Sampling::default(),
            sweep: "1 2 4 8 12".into(),
            save_dir: "generated".into(),
        }
    }
}

/// The Pool panel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolSettings {
    /// Captions file (one per line).
    pub captions: String,
    /// Pool folder.
    pub out: String,
    /// Images per caption.
    pub images: usize,
    /// Side of the saved PNGs (0: as generated).
    pub save_size: usize,
    /// Skip captions already done.
    pub resume: bool,
    /// Sampling (the paper uses a low guidance scale, 2).
    pub sampling: Sampling,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            captions: String::new(),
            out: "pool".into(),
            images: 4,
            save_size: 0,
            resume: true,
            sampling: Sampling {
                guidance: 2.0,
                ..Sampling::default()
            },
        }
    }
}

/// The Train panel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSettings {
    /// Pool folder (or labelled folder of real images).
    pub pool: String,
    /// The pool is a labelled folder of real images (SimCLR's real-image control).
    pub labelled_folder: bool,
    /// Output folder (checkpoints).
    pub out: String,
    /// stablerep, simclr or stablerep-plus.
    pub method: String,
    /// ViT width.
    pub width: usize,
    /// ViT depth.
    pub depth: usize,
    /// ViT heads.
    pub heads: usize,
    /// Input resolution.
    pub img_size: usize,
    /// Patch size.
    pub patch: usize,
    /// Head hidden width.
    pub head_hidden: usize,
    /// Head output width.
    pub head_out: usize,
    /// StableRep+ text tower width (heads = width / 64, at least 1).
    pub text_width: usize,
    /// StableRep+ text tower depth.
    pub text_layers: usize,
    /// StableRep+ tokens per caption.
    pub text_context: usize,
    /// StableRep+ embedding width.
    pub embed_dim: usize,
    /// Captions per batch (n).
    pub captions: usize,
    /// Images per caption (m).
    pub images: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Optimizer steps.
    pub steps: u64,
    /// Warmup steps.
    pub warmup: u64,
    /// Loss temperature.
    pub temperature: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// GPU augmentation.
    pub augment: bool,
    /// Seed.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Steps between logged losses.
    pub log_every: u64,
}

impl TrainSettings {
    /// The ViT's width per attention head (width / heads), what evaluation needs to read a
    /// checkpoint without a stored config. Not the projection head's output width.
    pub fn attention_head_dim(&self) -> usize {
        self.width / self.heads.max(1)
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            pool: "pool".into(),
            labelled_folder: false,
            out: "runs/stablerep".into(),
            method: "stablerep".into(),
            width: 192,
            depth: 12,
            heads: 3,
            img_size: 224,
            patch: 16,
            head_hidden: 4096,
            head_out: 256,
            text_width: 512,
            text_layers: 12,
            text_context: 77,
            embed_dim: 512,
            captions: 8,
            images: 4,
            lr: 1e-4,
            steps: 1000,
            warmup: 100,
            temperature: 0.1,
            weight_decay: 0.1,
            augment: true,
            seed: 0,
            checkpoint_every: 200,
            log_every: 10,
        }
    }
}

/// The Evaluate panel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvaluateSettings {
    /// Encoder checkpoint.
    pub checkpoint: String,
    /// Its ViT's width per attention head (used to infer the number of heads of a
    /// checkpoint without a stored config).
    pub head_dim: usize,
    /// Labelled training folder.
    pub train: String,
    /// Labelled test folder.
    pub test: String,
    /// knn, linear or fewshot.
    pub method: String,
    /// kNN neighbours.
    pub k: usize,
    /// kNN temperature.
    pub knn_temperature: f64,
    /// Linear probe epochs.
    pub epochs: usize,
    /// Few-shot classes per episode.
    pub ways: usize,
    /// Few-shot support images per class.
    pub shots: usize,
    /// Few-shot episodes.
    pub episodes: usize,
    /// Retrieval: query image index in the test folder.
    pub query: usize,
    /// Retrieval: matches shown.
    pub matches: usize,
    /// Similarity: pool folder.
    pub pool: String,
    /// Similarity: captions in the batch.
    pub batch_captions: usize,
    /// Similarity: images per caption.
    pub batch_images: usize,
}

impl Default for EvaluateSettings {
    fn default() -> Self {
        EvaluateSettings {
            checkpoint: "runs/stablerep/checkpoint-last.safetensors".into(),
            head_dim: 64,
            train: String::new(),
            test: String::new(),
            method: "knn".into(),
            k: 20,
            knn_temperature: 0.07,
            epochs: 90,
            ways: 5,
            shots: 5,
            episodes: 100,
            query: 0,
            matches: 8,
            pool: "pool".into(),
            batch_captions: 4,
            batch_images: 4,
        }
    }
}

impl Settings {
    /// The settings file: `STABLEREP_APP_SETTINGS`, else `app.json` in the user's config folder
    /// (`None` when no home is known).
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(SETTINGS_ENV) {
            return Some(PathBuf::from(p));
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("APPDATA").map(PathBuf::from))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| {
                    let h = PathBuf::from(h);
                    if cfg!(target_os = "macos") {
                        h.join("Library/Application Support")
                    } else {
                        h.join(".config")
                    }
                })
            })?;
        Some(base.join("stablerep").join("app.json"))
    }

    /// Reads `path`; a missing file gives the defaults, an unreadable one the defaults and a
    /// warning to show.
    pub fn load(path: &Path) -> (Settings, Option<String>) {
        match std::fs::read_to_string(path) {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(s) => (s, None),
                Err(e) => (
                    Settings::default(),
                    Some(format!(
                        "{}: not valid settings ({e}); using the defaults",
                        path.display()
                    )),
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Settings::default(), None),
            Err(e) => (
                Settings::default(),
                Some(format!(
                    "{}: cannot read settings ({e}); using the defaults",
                    path.display()
                )),
            ),
        }
    }

    /// Writes to `path` atomically (a temporary file, then a rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// Puts `model` first in the recent list (at most 8 kept).
    pub fn remember_model(&mut self, model: &str) {
        let m = model.trim().to_string();
        if m.is_empty() {
            return;
        }
        self.recent_models.retain(|r| r != &m);
        self.recent_models.insert(0, m);
        self.recent_models.truncate(8);
    }
}
