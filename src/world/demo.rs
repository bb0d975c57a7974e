//! The StableRep experiment in miniature, end to end on the mini-world: generate a synthetic
//! pool with a text-to-image model (several images per caption at a low guidance scale),
//! render the same captions "for real", then train at the same batch size and number of steps
//!
//! - StableRep on the synthetic pool (m images of a caption are positives),
//! - SimCLR on the synthetic pool (one image per caption, two augmentations),
//! - SimCLR on the real renders of the same captions,
//!
//! and score each frozen encoder on held-out real renders labelled by shape (kNN and a linear
//! probe). Every stage writes under one folder and is skipped when its output exists, so an
//! interrupted run continues.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::descriptions;
use super::export::{write_labelled, write_pool, LabelKind};
use crate::diffusion::model::{generate_pool, GenerateOptions, SdModel};
use crate::diffusion::sampler::Kind;
use crate::error::{Error, Result};
use crate::eval::linear::ProbeConfig;
use crate::eval::probe::{self, Method, Request};
use crate::gpu::Gpu;
use crate::models::stablerep::HeadConfig;
use crate::models::vit::VitConfig;
use crate::plot::{bar_chart, line_chart, Canvas, Chart, Series, Value};
use crate::train::fixed::ModelConfig;
use crate::train::pool_run::{self, PoolRun};
use crate::train::schedule::Schedule;

/// The experiment's settings.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// The text-to-image model (a diffusers folder).
    pub model: PathBuf,
    /// Training captions.
    pub captions: usize,
    /// Generated images per caption (m).
    pub images_per_caption: usize,
    /// Guidance scale of the generation.
    pub guidance: f64,
    /// Sampler steps (DPM-Solver++ 2M, Karras sigmas).
    pub sampler_steps: usize,
    /// Image side (the model's).
    pub size: usize,
    /// Views per training step, the same for every method: StableRep takes
    /// `views / m` captions with m images each, SimCLR `views / 2` images with two crops.
    pub views_per_step: usize,
    /// Optimizer steps per method.
    pub train_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// The encoder.
    pub vit: VitConfig,
    /// Its projection head.
    pub head: HeadConfig,
    /// Labelled real renders for the probes' training and test sets (each).
    pub eval_images: usize,
    /// Linear probe epochs.
    pub probe_epochs: usize,
    /// Seed of captions, layouts, generation and training.
    pub seed: u64,
}

impl DemoConfig {
    /// The default run on `model` (about 10 minutes on a 2-core software adapter): 96
    /// captions x 4 images at guidance 2 (10 sampler steps), a 3-layer ViT of width 96 on
    /// 32 x 32 images, 250 steps of 32 views per method.
    pub fn new(model: PathBuf) -> DemoConfig {
        DemoConfig {
            model,
            captions: 96,
            images_per_caption: 4,
            guidance: 2.0,
            sampler_steps: 10,
            size: 32,
            views_per_step: 32,
            train_steps: 250,
            lr: 1e-3,
            vit: VitConfig {
                img_size: 32,
                patch: 4,
                width: 96,
                depth: 3,
                heads: 3,
                mlp: 384,
            },
            head: HeadConfig {
                hidden: 256,
                out: 64,
            },
            eval_images: 480,
            probe_epochs: 30,
            seed: 0,
        }
    }

    /// The `--quick` run (about 2 minutes on a 2-core software adapter): 32 captions x 4
    /// images (8 sampler steps), a 2-layer ViT of width 64, 60 steps per method.
    pub fn quick(model: PathBuf) -> DemoConfig {
        DemoConfig {
            captions: 32,
            sampler_steps: 8,
            train_steps: 60,
            vit: VitConfig {
                img_size: 32,
                patch: 4,
                width: 64,
                depth: 2,
                heads: 2,
                mlp: 256,
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
        if self.views_per_step < 2
            || !self.views_per_step.is_multiple_of(2)
            || !self.views_per_step.is_multiple_of(m)
        {
            return Err(Error::Config(format!(
                "views per step ({}) must be even and a multiple of the images per caption ({m})",
                self.views_per_step
            )));
        }
        if self.views_per_step / 2 > self.captions {
            return Err(Error::Config(format!(
                "{} captions are too few for batches of {} views (SimCLR needs {} captions a step)",
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
        Ok(())
    }
}

/// One trained encoder's scores.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    /// The method ("StableRep", "SimCLR").
    pub method: String,
    /// Its training data ("synthetic", "real").
    pub data: String,
    /// Guidance scale of the synthetic pool (0 for real data).
    pub guidance: f64,
    /// Images per caption in the pool.
    pub images_per_caption: usize,
    /// Captions in the pool.
    pub captions: usize,
    /// Views per training step.
    pub views_per_step: usize,
    /// Loss at the last logged step.
    pub final_loss: f32,
    /// Held-out kNN top-1 accuracy on the main object's shape (12 classes).
    pub knn: f64,
    /// Held-out linear probe top-1 accuracy on the shape.
    pub linear: f64,
    /// Held-out kNN top-1 accuracy on the main object's colour (8 classes).
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

/// Renders the held-out evaluation sets: real renders of other captions, labelled by the main
/// object's shape (`out/eval-train`, `out/eval-test`) and the same images labelled by its
/// colour (`out/eval-colour-train`, `out/eval-colour-test`); skipped when present.
pub fn eval_sets(
    out: &Path,
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
                let d = descriptions(images, seed + offset);
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

/// Renders one real image of each of the first `captions` captions of `seed`'s world into
/// the pool `dir` (skipped when present).
pub fn real_pool(
    dir: &Path,
    captions: usize,
    size: usize,
    seed: u64,
    mut progress: impl FnMut(&Step),
) -> Result<()> {
    if !dir.join("captions.csv").exists() {
        write_pool(dir, &descriptions(captions, seed), 1, size, seed, |k, n| {
            progress(&Step {
                stage: "rendering the real pool".into(),
                done: k as u64,
                total: n as u64,
            })
        })?;
    }
    Ok(())
}

/// What a synthetic pool is generated with.
#[derive(Clone, Copy, Debug)]
pub struct PoolSpec {
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
    let captions: Vec<String> = descriptions(p.captions, p.seed)
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

/// One training run: a method on a pool.
#[derive(Clone, Debug)]
pub struct Arm {
    /// "StableRep", "SimCLR", or "untrained" (the encoder as initialized: one step at learning
    /// rate 0), the reference every method should beat.
    pub method: String,
    /// "synthetic" or "real".
    pub data: String,
    /// The pool.
    pub pool: PathBuf,
    /// Captions in the pool.
    pub captions: usize,
    /// Images per caption in the pool.
    pub images_per_caption: usize,
    /// Guidance of the pool (0 for real renders).
    pub guidance: f64,
}

/// Trains `arm` with `c`'s encoder, steps and views per step into `run_dir` (resuming), then
/// scores the frozen encoder on `eval_dir/eval-train` -> `eval_dir/eval-test` by kNN and a
/// linear probe. StableRep with one image per caption falls back to two crops of it (the
/// paper's m = 1 case).
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
    // The untrained reference: one step at learning rate 0 leaves the encoder as initialized.
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
        simclr: !stablerep,
        seed: c.seed,
        checkpoint_every: steps,
        log_every: 10.min(steps),
        out: run_dir.to_path_buf(),
        resume: true,
        labelled_folder: false,
        source_size: None,
    };
    let stage = if untrained {
        "initializing the untrained encoder".to_string()
    } else {
        format!("training {} on {} images", arm.method, arm.data)
    };
    let losses = pool_run::run(
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
    )?;
    let final_loss = match losses.last() {
        Some(&(_, l)) => l,
        None => read_final_loss(run_dir)?,
    };
    let ck = run_dir.join("checkpoint-last.safetensors");
    let stage = format!("evaluating {} ({})", arm.method, arm.data);
    let mut scores = Vec::new();
    for (k, prefix) in ["eval", "eval-colour"].iter().enumerate() {
        let request = |method| Request {
            checkpoint: ck.clone(),
            head_dim: c.head.out,
            train: Some(eval_dir.join(format!("{prefix}-train"))),
            test: eval_dir.join(format!("{prefix}-test")),
            method,
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

/// Runs the demo into `out` (resuming what exists there): the evaluation sets, the real and
/// synthetic pools, then StableRep (synthetic), SimCLR (synthetic), SimCLR (real) and the
/// untrained encoder as a reference. Writes
/// `out/results.json`, the bar chart `out/results.png` and the loss curves `out/losses.png`;
/// returns the four outcomes.
pub fn run(
    gpu: &Arc<Gpu>,
    c: &DemoConfig,
    out: &Path,
    mut progress: impl FnMut(&Step),
) -> Result<Vec<Outcome>> {
    c.check()?;
    let model = SdModel::load(&c.model)?;
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    eval_sets(out, c.eval_images, c.size, c.seed, &mut progress)?;
    let real = out.join("real-pool");
    real_pool(&real, c.captions, c.size, c.seed, &mut progress)?;
    let synthetic = out.join("synthetic-pool");
    let spec = PoolSpec {
        captions: c.captions,
        images_per_caption: c.images_per_caption,
        guidance: c.guidance,
        sampler_steps: c.sampler_steps,
        size: c.size,
        seed: c.seed,
    };
    synthetic_pool(gpu, &model, &spec, &synthetic, &mut progress)?;
    drop(model);

    let arm = |method: &str, data: &str, pool: &Path, m: usize, guidance: f64| Arm {
        method: method.into(),
        data: data.into(),
        pool: pool.to_path_buf(),
        captions: c.captions,
        images_per_caption: m,
        guidance,
    };
    let m = c.images_per_caption;
    let arms = [
        arm("StableRep", "synthetic", &synthetic, m, c.guidance),
        arm("SimCLR", "synthetic", &synthetic, m, c.guidance),
        arm("SimCLR", "real", &real, 1, 0.0),
        arm("untrained", "real", &real, 1, 0.0),
    ];
    let mut outcomes = Vec::new();
    for a in &arms {
        let name = format!("{}-{}", a.method.to_lowercase(), a.data);
        let dir = out.join("runs").join(name);
        outcomes.push(train_arm(gpu, c, a, &dir, out, &mut progress)?);
    }
    let json = serde_json::to_string_pretty(&outcomes).unwrap_or_default();
    let path = out.join("results.json");
    std::fs::write(&path, json).map_err(|e| io(&path, e))?;
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
        .filter(|a| a.method != "untrained")
        .map(|a| {
            let name = format!("{}-{}", a.method.to_lowercase(), a.data);
            let log = read_losses(&out.join("runs").join(&name))?;
            Ok((format!("{} {}", a.method, a.data), log))
        })
        .collect::<Result<_>>()?;
    loss_plot(&curves)?.save(&out.join("losses.png"))?;
    Ok(outcomes)
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
        categories: outcomes.iter().map(label).collect(),
        x_label: "encoder (method, training images)".into(),
        y_label: "top-1 accuracy, % (chance: shape 8.3, colour 12.5)".into(),
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
    if o.method == "untrained" {
        o.method.clone()
    } else {
        format!("{} {}", o.method, o.data)
    }
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
        let w = if o.data == "real" {
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
