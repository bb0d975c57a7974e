//! The StableRep experiment in miniature, end to end on the mini-world's simple world (one
//! object; captions name its colour and shape and, half of the time, the background, and
//! leave the rest to chance, as real captions underspecify photos). At the same views per
//! step and steps, it trains
//!
//! - `supervised`: the encoder taught with the shape and colour labels (the ceiling),
//! - `stablerep-oracle` / `simclr-oracle`: on m fresh renders per caption (the renderer is a
//!   perfect generator, so this separates the loss from the generator),
//! - `stablerep-synthetic` / `simclr-synthetic`: on m images per caption from the
//!   text-to-image model at a low guidance scale,
//! - `simclr-real`: on one real render per caption,
//! - `untrained`: the initialization,
//!
//! scores each frozen encoder on held-out real renders labelled by shape and colour (kNN and
//! a linear probe), and measures the generator's fidelity with the shipped judge
//! (`super::judge`). Every stage writes under one folder and is skipped when its output
//! exists, so an interrupted run continues.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::export::{write_labelled, write_pool, LabelKind};
use super::judge::{Fidelity, Judge};
use super::supervised::{self, SupervisedRun};
use super::World;
use crate::data::augment::AugmentConfig;
use crate::diffusion::model::{generate_pool, GenerateOptions, SdModel};
use crate::diffusion::sampler::Kind;
use crate::error::{Error, Result};
use crate::eval::linear::ProbeConfig;
use crate::eval::probe::{self, Method, Request};
use crate::gpu::Gpu;
use crate::models::config::ModelConfig;
use crate::models::stablerep::{HeadConfig, Init};
use crate::models::vit::{Stem, VitConfig};
use crate::nn::schedule::Schedule;
use crate::plot::{bar_chart, line_chart, Canvas, Chart, Series, Value};
use crate::train::pool_run::{self, PoolRun};

/// The arms of the demo, in table order.
pub const ARMS: [&str; 7] = [
    "supervised",
    "stablerep-oracle",
    "simclr-oracle",
    "stablerep-synthetic",
    "simclr-synthetic",
    "simclr-real",
    "untrained",
];

/// The augmentation for 32-pixel mini-world scenes: the paper's pipeline (crop, flip, colour
/// jitter, grayscale, blur) with the crop scale raised to 0.35 - 1 (crops of 8 % of a
/// 32-pixel image often cut the object out) and the blur's sigma scaled to the image (the
/// paper's 0.1 - 2 pixels are for 224-pixel photos; at 32 pixels sigma 2 erases shapes).
pub fn mini_augment() -> AugmentConfig {
    AugmentConfig {
        scale: (0.35, 1.0),
        sigma: (0.1, 0.3),
        ..AugmentConfig::default()
    }
}

/// The experiment's settings.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// The text-to-image model (a diffusers folder).
    pub model: PathBuf,
    /// The fidelity judge (default: the shipped one).
    pub judge: Option<PathBuf>,
    /// The world.
    pub world: World,
    /// Training captions.
    pub captions: usize,
    /// Generated (and oracle-rendered) images per caption (m).
    pub images_per_caption: usize,
    /// Guidance scale of the generation.
    pub guidance: f64,
    /// Sampler steps (DPM-Solver++ 2M, Karras sigmas).
    pub sampler_steps: usize,
    /// Image side (the model's).
    pub size: usize,
    /// Views per training step, the same for every method: StableRep takes
    /// `views / m` captions with m images each, SimCLR `views / 2` images with two crops,
    /// the supervised arm `views` images.
    pub views_per_step: usize,
    /// Optimizer steps per method.
    pub train_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// The encoder.
    pub vit: VitConfig,
    /// Its projection head.
    pub head: HeadConfig,
    /// How every arm's fresh encoder is initialized (the official code's by default).
    pub init: Init,
    /// Augmentation of every arm (the supervised arm without its colour changes, since
    /// colour is one of its labels).
    pub augment: AugmentConfig,
    /// Labelled real renders for the probes' training and test sets (each).
    pub eval_images: usize,
    /// Linear probe epochs.
    pub probe_epochs: usize,
    /// Seed of captions, layouts, generation and training.
    pub seed: u64,
}

impl DemoConfig {
    /// The default run on `model` (about 12 - 15 minutes on 2 CPU cores): 96 captions of the
    /// simple world x 4 images at guidance 2 (8 sampler steps), a 3-layer ViT of width 96
    /// with 8-pixel patches on 32 x 32 images, 300 steps of 32 views per arm.
    pub fn new(model: PathBuf) -> DemoConfig {
        DemoConfig {
            model,
            judge: None,
            world: World::Simple,
            captions: 96,
            images_per_caption: 4,
            guidance: 2.0,
            sampler_steps: 8,
            size: 32,
            views_per_step: 32,
            train_steps: 300,
            lr: 1e-3,
            vit: VitConfig {
                img_size: 32,
                patch: 8,
                width: 96,
                depth: 3,
                heads: 3,
                mlp: 384,
                stem: Stem::Patch,
            },
            head: HeadConfig {
                hidden: 256,
                out: 64,
            },
            init: Init::Official,
            augment: mini_augment(),
            eval_images: 480,
            probe_epochs: 30,
            seed: 0,
        }
    }

    /// The `--quick` run: 32 captions x 4 images (6 sampler steps), a 2-layer ViT of width
    /// 64, 60 steps per arm.
    pub fn quick(model: PathBuf) -> DemoConfig {
        DemoConfig {
            captions: 32,
            sampler_steps: 6,
            train_steps: 60,
            vit: VitConfig {
                img_size: 32,
                patch: 8,
                width: 64,
                depth: 2,
                heads: 2,
                mlp: 256,
                stem: Stem::Patch,
            },
            head: HeadConfig {
                hidden: 128,
                out: 64,
            },
            eval_images: 240,
            probe_epochs: 15,
            ..DemoConfig::new(model)
        }
    }

    /// Checks the settings fit together.
    pub fn check(&self) -> Result<()> {
        let m = self.images_per_caption;
        if m == 0 || self.captions == 0 || self.train_steps == 0 || self.sampler_steps == 0 {
            return Err(Error::Config(
                "the demo needs at least 1 caption, 1 image per caption, 1 sampler step and 1 \
                 training step"
                    .into(),
            ));
        }
        if m < 2 {
            return Err(Error::Config(
                "--images-per-caption must be at least 2: StableRep's positives are the other \
                 images of a caption"
                    .into(),
            ));
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return Err(Error::Config(format!(
                "--guidance must be a finite number >= 0, got {}",
                self.guidance
            )));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Config(format!(
                "the learning rate must be a positive number, got {}",
                self.lr
            )));
        }
        if self.views_per_step < 2
            || !self.views_per_step.is_multiple_of(2)
            || !self.views_per_step.is_multiple_of(m)
        {
            return Err(Error::Config(format!(
                "--views {} must be even and a multiple of the images per caption ({m})",
                self.views_per_step
            )));
        }
        if self.views_per_step / 2 > self.captions {
            return Err(Error::Config(format!(
                "{} captions (--captions) are too few for batches of {} views (--views; SimCLR needs {} captions a step)",
                self.captions,
                self.views_per_step,
                self.views_per_step / 2
            )));
        }
        if self.vit.img_size != self.size {
            return Err(Error::Config(format!(
                "the encoder's input size {} differs from the image size {}",
                self.vit.img_size, self.size
            )));
        }
        self.vit.validate()
    }
}

/// One trained encoder's scores.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    /// The arm's name (one of [`ARMS`] in the demo).
    #[serde(default)]
    pub name: String,
    /// The method ("StableRep", "SimCLR", "supervised", "untrained").
    pub method: String,
    /// Its training data ("synthetic", "oracle", "real").
    pub data: String,
    /// Guidance scale of the synthetic pool (0 for rendered data).
    pub guidance: f64,
    /// Images per caption in the pool.
    pub images_per_caption: usize,
    /// Captions in the pool.
    pub captions: usize,
    /// Views per training step.
    pub views_per_step: usize,
    /// Loss at the last logged step (contrastive, or the supervised cross-entropies).
    pub final_loss: f32,
    /// Held-out kNN top-1 accuracy on the main object's shape.
    pub knn: f64,
    /// Held-out linear probe top-1 accuracy on the shape.
    pub linear: f64,
    /// Held-out kNN top-1 accuracy on the main object's colour.
    pub colour_knn: f64,
    /// Held-out linear probe top-1 accuracy on the colour.
    pub colour_linear: f64,
}

/// What a stage reports.
#[derive(Clone, Debug)]
pub struct Step {
    /// The stage.
    pub stage: String,
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Renders the held-out evaluation sets: real renders of `world`'s captions under other
/// seeds, labelled by the main object's shape (`out/eval-train`, `out/eval-test`) and the
/// same images labelled by its colour (`out/eval-colour-train`, `out/eval-colour-test`);
/// skipped when present.
pub fn eval_sets(
    out: &Path,
    world: World,
    images: usize,
    size: usize,
    seed: u64,
    mut progress: impl FnMut(&Step),
) -> Result<()> {
    for (kind, prefix) in [
        (LabelKind::Shape, "eval"),
        (LabelKind::Colour, "eval-colour"),
    ] {
        for (split, offset) in [("train", 1_000), ("test", 2_000)] {
            let name = format!("{prefix}-{split}");
            let dir = out.join(&name);
            if !dir.exists() {
                let tmp = out.join(format!("{name}.partial"));
                let _ = std::fs::remove_dir_all(&tmp);
                let d = world.descriptions(images, seed + offset);
                write_labelled(&tmp, &d, kind, size, seed + offset, |k, n| {
                    progress(&Step {
                        stage: format!("rendering {name}"),
                        done: k as u64,
                        total: n as u64,
                    })
                })?;
                std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
            }
        }
    }
    Ok(())
}

/// Renders `per_caption` images of each of the first `captions` captions of `world` under
/// `seed` into the pool `dir` (skipped when present): one per caption is the real-image
/// control, several the oracle generator.
pub fn rendered_pool(
    dir: &Path,
    world: World,
    captions: usize,
    per_caption: usize,
    size: usize,
    seed: u64,
    mut progress: impl FnMut(&Step),
) -> Result<()> {
    if !dir.join("captions.csv").exists() {
        let stage = if per_caption == 1 {
            "rendering the real pool".to_string()
        } else {
            format!("rendering the oracle pool ({per_caption} per caption)")
        };
        write_pool(
            dir,
            &world.descriptions(captions, seed),
            per_caption,
            size,
            seed,
            |k, n| {
                progress(&Step {
                    stage: stage.clone(),
                    done: k as u64,
                    total: n as u64,
                })
            },
        )?;
    }
    Ok(())
}

/// What a synthetic pool is generated with.
#[derive(Clone, Copy, Debug)]
pub struct PoolSpec {
    /// The world of the captions.
    pub world: World,
    /// Captions (the first of `seed`'s world).
    pub captions: usize,
    /// Images per caption.
    pub images_per_caption: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Sampler steps (DPM-Solver++ 2M, Karras sigmas).
    pub sampler_steps: usize,
    /// Image side.
    pub size: usize,
    /// Seed of the captions and the noise.
    pub seed: u64,
}

/// Generates a synthetic pool into `dir` with `model` (resumes caption by caption).
pub fn synthetic_pool(
    gpu: &Arc<Gpu>,
    model: &SdModel,
    p: &PoolSpec,
    dir: &Path,
    mut progress: impl FnMut(&Step),
) -> Result<()> {
    let captions: Vec<String> = p
        .world
        .descriptions(p.captions, p.seed)
        .iter()
        .map(|d| d.caption())
        .collect();
    let o = GenerateOptions {
        prompt: String::new(),
        negative: String::new(),
        images: p.images_per_caption,
        guidance: p.guidance,
        steps: p.sampler_steps,
        sampler: Kind::DpmPP2M { karras: true },
        seed: p.seed,
        caption: 0,
        size: p.size,
        half_weights: None,
        half_activations: None,
        save_size: None,
        init_noise: None,
    };
    o.check(model)?;
    let stage = format!(
        "generating {} x {} images at guidance {}",
        p.captions, p.images_per_caption, p.guidance
    );
    generate_pool(gpu, model, &o, &captions, (0, 1), true, dir, |s| {
        progress(&Step {
            stage: stage.clone(),
            done: s.done(),
            total: s.total(),
        });
        Ok(())
    })?;
    Ok(())
}

/// The judge's fidelity on a generated pool of `p`'s captions: each image's shape, colour
/// and (where the caption names it) background as the judge reads them against the caption,
/// and the diversity of its features among a caption's images.
pub fn pool_fidelity(judge: &Judge, p: &PoolSpec, dir: &Path) -> Result<Fidelity> {
    let world = p.world.descriptions(p.captions, p.seed);
    let pool = crate::data::pool::Pool::open(dir)?;
    let s = judge.size();
    let mut images = Vec::with_capacity(world.len() * p.images_per_caption * 3 * s * s);
    for c in 0..world.len() {
        for k in 0..p.images_per_caption {
            let (h, w, px) = pool.load_rgb(c, k)?;
            if (h, w) != (s, s) {
                return Err(Error::Config(format!(
                    "{}: {h}x{w}, the judge takes {s}x{s}",
                    pool.image_name(c, k)
                )));
            }
            images.extend(px);
        }
    }
    super::judge::fidelity_of(judge, &world, p.images_per_caption, &images, p.seed)
}

/// One training run: a method on a pool.
#[derive(Clone, Debug)]
pub struct Arm {
    /// Its name (one of [`ARMS`] in the demo).
    pub name: String,
    /// "StableRep", "SimCLR", "supervised", or "untrained" (the encoder as initialized: one
    /// step at learning rate 0), the reference every method should beat.
    pub method: String,
    /// "synthetic", "oracle" or "real".
    pub data: String,
    /// The pool.
    pub pool: PathBuf,
    /// Captions in the pool.
    pub captions: usize,
    /// Images per caption in the pool.
    pub images_per_caption: usize,
    /// Guidance of the pool (0 for renders).
    pub guidance: f64,
}

/// Trains `arm` with `c`'s encoder, steps and views per step into `run_dir` (resuming), then
/// scores the frozen encoder on `eval_dir/eval-train` -> `eval_dir/eval-test` by kNN and a
/// linear probe. StableRep with one image per caption falls back to two crops of it (the
/// paper's m = 1 case). The supervised arm trains on the renders the oracle pool holds
/// (`c`'s captions, seed and images per caption), with the labels.
pub fn train_arm(
    gpu: &Arc<Gpu>,
    c: &DemoConfig,
    arm: &Arm,
    run_dir: &Path,
    eval_dir: &Path,
    mut progress: impl FnMut(&Step),
) -> Result<Outcome> {
    let views = c.views_per_step;
    let untrained = arm.method == "untrained";
    let stage = if untrained {
        "initializing the untrained encoder".to_string()
    } else {
        format!("training {}", arm.name)
    };
    let losses = if arm.method == "supervised" {
        let r = supervised_run(c, arm);
        let steps = r.steps;
        supervised::run(
            gpu,
            &r,
            run_dir,
            |step, _| {
                progress(&Step {
                    stage: stage.clone(),
                    done: step,
                    total: steps,
                })
            },
            &|| false,
        )?
    } else {
        let stablerep = arm.method == "StableRep" && arm.images_per_caption >= 2;
        let (n, m) = if stablerep {
            (views / arm.images_per_caption, arm.images_per_caption)
        } else {
            (views / 2, 2)
        };
        if n == 0 || n * m != views || n > arm.captions {
            return Err(Error::Config(format!(
                "{} on {} captions x {} images cannot fill batches of {views} views",
                arm.method, arm.captions, arm.images_per_caption
            )));
        }
        // The untrained reference: one step at learning rate 0 leaves the encoder as
        // initialized.
        let (steps, lr) = if untrained {
            (1, 0.0)
        } else {
            (c.train_steps, c.lr)
        };
        let r = PoolRun {
            pool: arm.pool.clone(),
            model: ModelConfig {
                vit: c.vit,
                head: c.head,
                plus: None,
            },
            init: None,
            fresh_init: c.init,
            captions: n,
            images_per_caption: m,
            steps,
            lr,
            schedule: Schedule::Cosine {
                warmup: steps / 10,
                total: steps,
            },
            weight_decay: 0.1,
            temperature: 0.1,
            augment: true,
            augment_config: Some(c.augment),
            simclr: !stablerep,
            seed: c.seed,
            checkpoint_every: steps,
            log_every: 10.min(steps),
            out: run_dir.to_path_buf(),
            resume: true,
            labelled_folder: false,
            source_size: None,
            head_dim: 64,
            chunk: None,
        };
        pool_run::run(
            gpu,
            &r,
            |step, _, _| {
                progress(&Step {
                    stage: stage.clone(),
                    done: step,
                    total: steps,
                })
            },
            &|| false,
        )?
    };
    // A run that was already finished logs nothing new: read its last loss back.
    let final_loss = match losses.last() {
        Some(&(_, l)) => l,
        None => read_final_loss(run_dir)?,
    };
    let ck = run_dir.join("checkpoint-last.safetensors");
    let stage = format!("evaluating {}", arm.name);
    let mut scores = Vec::new();
    for (k, prefix) in ["eval", "eval-colour"].iter().enumerate() {
        let request = |method| Request {
            checkpoint: ck.clone(),
            head_dim: c.vit.width / c.vit.heads,
            train: Some(eval_dir.join(format!("{prefix}-train"))),
            test: eval_dir.join(format!("{prefix}-test")),
            method,
            features: None,
        };
        progress(&Step {
            stage: stage.clone(),
            done: 2 * k as u64,
            total: 4,
        });
        let knn = probe::run(
            gpu,
            &request(Method::Knn {
                k: 20,
                temperature: 0.07,
            }),
        )?
        .accuracy;
        progress(&Step {
            stage: stage.clone(),
            done: 2 * k as u64 + 1,
            total: 4,
        });
        let linear = probe::run(
            gpu,
            &request(Method::Linear(ProbeConfig {
                epochs: c.probe_epochs,
                base_lrs: vec![0.01, 0.05, 0.1, 0.3],
                batch: 64,
                ..ProbeConfig::default()
            })),
        )?
        .accuracy;
        scores.push((knn, linear));
    }
    progress(&Step {
        stage,
        done: 4,
        total: 4,
    });
    Ok(Outcome {
        name: arm.name.clone(),
        method: arm.method.clone(),
        data: arm.data.clone(),
        guidance: arm.guidance,
        images_per_caption: arm.images_per_caption,
        captions: arm.captions,
        views_per_step: views,
        final_loss,
        knn: scores[0].0,
        linear: scores[0].1,
        colour_knn: scores[1].0,
        colour_linear: scores[1].1,
    })
}

/// The supervised arm's run: `c`'s encoder, views, steps and learning rate on the oracle
/// pool's renders (`arm`'s captions and images per caption under `c.seed`), labelled by
/// shape and colour, with `c`'s crops and flips but no colour changes.
pub fn supervised_run(c: &DemoConfig, arm: &Arm) -> SupervisedRun {
    SupervisedRun {
        world: c.world,
        captions: arm.captions,
        caption_seed: c.seed,
        renders: arm.images_per_caption as u64,
        layout_seed: c.seed,
        heads: vec![LabelKind::Shape, LabelKind::Colour],
        head_weights: vec![],
        encoder: supervised::Encoder::Vit(c.vit),
        batch: c.views_per_step,
        steps: c.train_steps,
        lr: c.lr,
        weight_decay: 0.1,
        augment: AugmentConfig {
            jitter_p: 0.0,
            gray_p: 0.0,
            ..c.augment
        },
        seed: c.seed,
        init: c.init,
        checkpoint_every: c.train_steps,
        log_every: 10.min(c.train_steps),
    }
}

/// The demo's written results (`results.json`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DemoResults {
    /// Wall-clock seconds of the run that wrote the file (a resumed run counts only its own).
    pub seconds: f64,
    /// The generator's fidelity on the synthetic pool as the judge reads it (fractions), and
    /// the diversity of its images next to the renderer's.
    pub fidelity: FidelitySummary,
    /// Each arm's scores (fractions), in [`ARMS`] order.
    pub arms: Vec<ArmResult>,
}

/// The fidelity line of [`DemoResults`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FidelitySummary {
    /// Background read as the caption's, over captions that name one.
    pub background: f64,
    /// Main object's colour as the caption's.
    pub colour: f64,
    /// Main object's shape as the caption's.
    pub shape: f64,
    /// Mean pairwise distance of the judge's features among a caption's generated images.
    pub diversity: f64,
    /// The same among the oracle's renders.
    pub real_diversity: f64,
}

/// One arm's line of [`DemoResults`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ArmResult {
    /// One of [`ARMS`].
    pub name: String,
    /// Colour kNN accuracy.
    pub colour_knn: f64,
    /// Colour linear-probe accuracy.
    pub colour_linear: f64,
    /// Shape kNN accuracy.
    pub shape_knn: f64,
    /// Shape linear-probe accuracy.
    pub shape_linear: f64,
    /// Final training loss (0 for the untrained encoder).
    pub final_loss: f64,
}

impl DemoResults {
    /// The results of `outcomes` with `fidelity`, after `seconds`.
    pub fn new(outcomes: &[Outcome], fidelity: &Fidelity, seconds: f64) -> DemoResults {
        DemoResults {
            seconds,
            fidelity: FidelitySummary {
                background: fidelity.background,
                colour: fidelity.colour,
                shape: fidelity.shape,
                diversity: fidelity.diversity,
                real_diversity: fidelity.real_diversity,
            },
            arms: outcomes
                .iter()
                .map(|o| ArmResult {
                    name: o.name.clone(),
                    colour_knn: o.colour_knn,
                    colour_linear: o.colour_linear,
                    shape_knn: o.knn,
                    shape_linear: o.linear,
                    final_loss: if o.method == "untrained" {
                        0.0
                    } else {
                        o.final_loss as f64
                    },
                })
                .collect(),
        }
    }
}

/// What a finished demo returns.
#[derive(Clone, Debug)]
pub struct DemoOutcome {
    /// Every arm's scores, in [`ARMS`] order.
    pub outcomes: Vec<Outcome>,
    /// The generator's fidelity.
    pub fidelity: Fidelity,
}

/// The demo's arms over its pools in `out`.
pub fn arms(c: &DemoConfig, out: &Path) -> Vec<Arm> {
    let m = c.images_per_caption;
    let arm = |name: &str, method: &str, data: &str, pool: &str, m: usize, w: f64| Arm {
        name: name.into(),
        method: method.into(),
        data: data.into(),
        pool: out.join(pool),
        captions: c.captions,
        images_per_caption: m,
        guidance: w,
    };
    vec![
        arm("supervised", "supervised", "oracle", "oracle-pool", m, 0.0),
        arm(
            "stablerep-oracle",
            "StableRep",
            "oracle",
            "oracle-pool",
            m,
            0.0,
        ),
        arm("simclr-oracle", "SimCLR", "oracle", "oracle-pool", m, 0.0),
        arm(
            "stablerep-synthetic",
            "StableRep",
            "synthetic",
            "synthetic-pool",
            m,
            c.guidance,
        ),
        arm(
            "simclr-synthetic",
            "SimCLR",
            "synthetic",
            "synthetic-pool",
            m,
            c.guidance,
        ),
        arm("simclr-real", "SimCLR", "real", "real-pool", 1, 0.0),
        arm("untrained", "untrained", "real", "real-pool", 1, 0.0),
    ]
}

/// The file in a demo folder that records the settings it was started with.
pub const SETTINGS_FILE: &str = "settings.txt";

/// Records `c` in `out/settings.txt` on a fresh folder, and refuses a folder started with
/// other settings (its pools and trained arms would mix with this run's), or a folder that
/// holds anything but no record (a run from before settings were recorded).
pub fn check_folder_settings(c: &DemoConfig, out: &Path) -> Result<()> {
    let path = out.join(SETTINGS_FILE);
    // The default initialization is left out, so folders started before it was a setting
    // stay valid.
    let mine: String = format!("{c:#?}\n")
        .lines()
        .filter(|l| l.trim() != "init: Official,")
        .map(|l| format!("{l}\n"))
        .collect();
    match std::fs::read_to_string(&path) {
        Ok(theirs) if theirs == mine => Ok(()),
        Ok(theirs) => {
            let changed: Vec<String> = mine
                .lines()
                .zip(theirs.lines())
                .filter(|(a, b)| a != b)
                .take(4)
                .map(|(a, b)| format!("{} (was {})", a.trim(), b.trim()))
                .collect();
            Err(Error::Config(format!(
                "{}: this folder was started with other settings: {}; pass another --out, or \
                 remove the folder to start again",
                path.display(),
                changed.join("; ")
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Any pool, evaluation set or run there came from a run that recorded nothing.
            let started = std::fs::read_dir(out)
                .map_err(|e| io(out, e))?
                .next()
                .is_some();
            if started {
                return Err(Error::Config(format!(
                    "{}: the folder holds a demo run from before its settings were recorded, \
                     so a resume could mix settings; pass another --out, or remove the folder",
                    out.display()
                )));
            }
            crate::nn::checkpoint::write_atomic(&path, mine.as_bytes())
        }
        Err(e) => Err(io(&path, e)),
    }
}

/// Runs the demo into `out` (resuming what exists there): the evaluation sets, the real,
/// oracle and synthetic pools, the generator's fidelity, then the seven arms of [`ARMS`].
/// Writes `out/results.json` ([`DemoResults`]), the bar chart `out/results.png` and the
/// loss curves `out/losses.png`.
pub fn run(
    gpu: &Arc<Gpu>,
    c: &DemoConfig,
    out: &Path,
    mut progress: impl FnMut(&Step),
) -> Result<DemoOutcome> {
    let t0 = std::time::Instant::now();
    c.check()?;
    let judge_path = match &c.judge {
        Some(p) => p.clone(),
        None => super::judge::builtin_judge()?,
    };
    let model = SdModel::load(&c.model)?;
    let judge = Judge::load(gpu, &judge_path)?;
    if judge.size() != c.size || judge.run.world != c.world {
        return Err(Error::Config(format!(
            "{}: the judge reads {} x {} images of the {} world; the demo makes {} x {} of the {}",
            judge_path.display(),
            judge.size(),
            judge.size(),
            judge.run.world.name(),
            c.size,
            c.size,
            c.world.name()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    check_folder_settings(c, out)?;
    eval_sets(out, c.world, c.eval_images, c.size, c.seed, &mut progress)?;
    let m = c.images_per_caption;
    rendered_pool(
        &out.join("real-pool"),
        c.world,
        c.captions,
        1,
        c.size,
        c.seed,
        &mut progress,
    )?;
    rendered_pool(
        &out.join("oracle-pool"),
        c.world,
        c.captions,
        m,
        c.size,
        c.seed,
        &mut progress,
    )?;
    let synthetic = out.join("synthetic-pool");
    let spec = PoolSpec {
        world: c.world,
        captions: c.captions,
        images_per_caption: m,
        guidance: c.guidance,
        sampler_steps: c.sampler_steps,
        size: c.size,
        seed: c.seed,
    };
    synthetic_pool(gpu, &model, &spec, &synthetic, &mut progress)?;
    drop(model);
    let fidelity = pool_fidelity(&judge, &spec, &synthetic)?;
    drop(judge);

    let arms = arms(c, out);
    let mut outcomes = Vec::new();
    for a in &arms {
        let dir = out.join("runs").join(&a.name);
        outcomes.push(train_arm(gpu, c, a, &dir, out, &mut progress)?);
    }
    let results = DemoResults::new(&outcomes, &fidelity, t0.elapsed().as_secs_f64());
    let json = serde_json::to_string_pretty(&results)
        .map_err(|e| Error::Config(format!("results do not serialize: {e}")))?;
    let path = out.join("results.json");
    crate::nn::checkpoint::write_atomic(&path, json.as_bytes())?;
    plot(
        &outcomes,
        &format!(
            "{} captions x {m} images, guidance {}",
            c.captions, c.guidance
        ),
    )?
    .save(&out.join("results.png"))?;
    let curves: Vec<(String, Vec<(u64, f32)>)> = arms
        .iter()
        .filter(|a| a.method == "StableRep" || a.method == "SimCLR")
        .map(|a| {
            Ok((
                a.name.clone(),
                read_losses(&out.join("runs").join(&a.name))?,
            ))
        })
        .collect::<Result<_>>()?;
    loss_plot(&curves)?.save(&out.join("losses.png"))?;
    Ok(DemoOutcome { outcomes, fidelity })
}

/// The (step, loss) pairs a run logged (`metrics.jsonl`).
pub fn read_losses(run_dir: &Path) -> Result<Vec<(u64, f32)>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()? as f32))
        })
        .collect())
}

/// Training loss curves, one series per run, over the first run's logged steps.
pub fn loss_plot(curves: &[(String, Vec<(u64, f32)>)]) -> Result<Canvas> {
    let steps: Vec<u64> = curves.first().map_or_else(Vec::new, |c| {
        let mut s: Vec<u64> = c.1.iter().map(|p| p.0).collect();
        s.dedup();
        s
    });
    let every = steps.len().div_ceil(8).max(1);
    let top = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.1 as f64))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    line_chart(&Chart {
        title: "Training loss (contrastive, temperature 0.1)".into(),
        categories: steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i % every == every - 1 {
                    s.to_string()
                } else {
                    String::new()
                }
            })
            .collect(),
        x_label: "step".into(),
        y_label: "loss".into(),
        y_range: (0.0, top.ceil().max(1.0)),
        series: curves
            .iter()
            .map(|(name, log)| Series {
                name: name.clone(),
                values: steps
                    .iter()
                    .map(|s| {
                        log.iter().find(|p| p.0 == *s).map(|p| Value {
                            mean: p.1 as f64,
                            spread: 0.0,
                        })
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// A bar chart of the outcomes' held-out accuracies (shape and colour, kNN and linear probe,
/// in percent).
pub fn plot(outcomes: &[Outcome], subtitle: &str) -> Result<Canvas> {
    let series = |name: &str, f: fn(&Outcome) -> f64| Series {
        name: name.into(),
        values: outcomes
            .iter()
            .map(|o| {
                Some(Value {
                    mean: 100.0 * f(o),
                    spread: 0.0,
                })
            })
            .collect(),
    };
    bar_chart(&Chart {
        title: format!("Held-out accuracy on real renders ({subtitle})"),
        categories: outcomes.iter().map(short_label).collect(),
        x_label: "encoder (SR StableRep, SC SimCLR; oracle, synthetic or real images)".into(),
        y_label: "top-1 accuracy, % (chance: 1 / classes)".into(),
        y_range: (0.0, 100.0),
        series: vec![
            series("colour kNN", |o| o.colour_knn),
            series("colour linear", |o| o.colour_linear),
            series("shape kNN", |o| o.knn),
            series("shape linear", |o| o.linear),
        ],
    })
}

/// "StableRep synthetic", "SimCLR real", "untrained".
pub fn label(o: &Outcome) -> String {
    if !o.name.is_empty() {
        o.name.clone()
    } else if o.method == "untrained" {
        o.method.clone()
    } else {
        format!("{} {}", o.method, o.data)
    }
}

/// A label that fits under a bar: "SR oracle", "SC real", "supervised".
pub fn short_label(o: &Outcome) -> String {
    short(&label(o))
}

/// An arm's name shortened to fit under a bar ("stablerep-oracle" -> "SR oracle").
pub fn short(name: &str) -> String {
    name.replace("stablerep-", "SR ")
        .replace("simclr-", "SC ")
        .replace("synthetic", "synth.")
}

/// The last loss a finished run logged (`metrics.jsonl`), for a run that was already done.
fn read_final_loss(run_dir: &Path) -> Result<f32> {
    read_losses(run_dir)?.last().map(|p| p.1).ok_or_else(|| {
        Error::Config(format!(
            "{}: no loss logged",
            run_dir.join("metrics.jsonl").display()
        ))
    })
}

/// The outcomes as a text table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = format!(
        "{:<20} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "encoder", "guidance", "final loss", "colour kNN", "colour lin", "shape kNN", "shape lin"
    );
    for o in outcomes {
        let w = if o.data != "synthetic" {
            "-".to_string()
        } else {
            format!("{}", o.guidance)
        };
        let loss = if o.method == "untrained" {
            "-".to_string()
        } else {
            format!("{:.4}", o.final_loss)
        };
        s += &format!(
            "{:<20} {:>8} {:>10} {:>9.1}% {:>9.1}% {:>9.1}% {:>9.1}%\n",
            label(o),
            w,
            loss,
            100.0 * o.colour_knn,
            100.0 * o.colour_linear,
            100.0 * o.knn,
            100.0 * o.linear
        );
    }
    s
}
