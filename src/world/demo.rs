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
    /// Captions per training batch for StableRep (SimCLR sees m / 2 times as many, so every
    /// method's batch holds the same number of views).
    pub batch_captions: usize,
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
    /// The default run on `model`: 128 captions x 4 images at guidance 2, a 3-layer ViT of
    /// width 96 on 32 x 32 images, 300 steps of 8 captions x 4 views.
    pub fn new(model: PathBuf) -> DemoConfig {
        DemoConfig {
            model,
            captions: 128,
            images_per_caption: 4,
            guidance: 2.0,
            sampler_steps: 20,
            size: 32,
            batch_captions: 8,
            train_steps: 300,
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
}

/// One trained encoder's scores.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// The method ("StableRep", "SimCLR").
    pub method: String,
    /// Its training data ("synthetic", "real").
    pub data: String,
    /// Views per training step.
    pub views_per_step: usize,
    /// Loss at the last logged step.
    pub final_loss: f32,
    /// Held-out kNN top-1 accuracy (shape, 12 classes).
    pub knn: f64,
    /// Held-out linear probe top-1 accuracy.
    pub linear: f64,
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

/// Runs the experiment into `out` (resuming what exists there); returns the three outcomes
/// and writes them to `out/results.json`.
pub fn run(
    gpu: &Arc<Gpu>,
    c: &DemoConfig,
    out: &Path,
    mut progress: impl FnMut(&Step),
) -> Result<Vec<Outcome>> {
    if c.images_per_caption < 2 || c.batch_captions == 0 || c.train_steps == 0 {
        return Err(Error::Config(
            "the demo needs at least 2 images per caption, 1 caption per batch and 1 step".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let world = descriptions(c.captions, c.seed);
    let captions: Vec<String> = world.iter().map(|d| d.caption()).collect();

    // Held-out real renders, labelled by shape (other captions, other layouts).
    for (name, seed) in [("eval-train", 1_000), ("eval-test", 2_000)] {
        let dir = out.join(name);
        if !dir.exists() {
            let tmp = out.join(format!("{name}.partial"));
            let _ = std::fs::remove_dir_all(&tmp);
            let d = descriptions(c.eval_images, c.seed + seed);
            write_labelled(&tmp, &d, LabelKind::Shape, c.size, c.seed + seed, |k, n| {
                progress(&Step {
                    stage: format!("rendering {name}"),
                    done: k as u64,
                    total: n as u64,
                })
            })?;
            std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
        }
    }
    // The real renders of the training captions, one each.
    let real = out.join("real-pool");
    if !real.join("captions.csv").exists() {
        write_pool(&real, &world, 1, c.size, c.seed, |k, n| {
            progress(&Step {
                stage: "rendering the real pool".into(),
                done: k as u64,
                total: n as u64,
            })
        })?;
    }
    // The synthetic pool (resumes caption by caption).
    let synthetic = out.join("synthetic-pool");
    let model = SdModel::load(&c.model)?;
    let o = GenerateOptions {
        prompt: String::new(),
        negative: String::new(),
        images: c.images_per_caption,
        guidance: c.guidance,
        steps: c.sampler_steps,
        sampler: Kind::DpmPP2M { karras: true },
        seed: c.seed,
        caption: 0,
        size: c.size,
        half_weights: None,
        save_size: None,
        init_noise: None,
    };
    o.check(&model)?;
    generate_pool(gpu, &model, &o, &captions, (0, 1), true, &synthetic, |p| {
        progress(&Step {
            stage: "generating the synthetic pool".into(),
            done: p.done(),
            total: p.total(),
        });
        Ok(())
    })?;
    drop(model);

    let views = c.batch_captions * c.images_per_caption;
    let runs = [
        ("StableRep", "synthetic", &synthetic, false),
        ("SimCLR", "synthetic", &synthetic, true),
        ("SimCLR", "real", &real, true),
    ];
    let mut outcomes = Vec::new();
    for (method, data, pool, simclr) in runs {
        let name = format!("{}-{data}", method.to_lowercase());
        let run_dir = out.join("runs").join(&name);
        // SimCLR: two views of one image per caption, twice the captions: the same views.
        let (n, m) = if simclr {
            (views / 2, 2)
        } else {
            (c.batch_captions, c.images_per_caption)
        };
        let r = PoolRun {
            pool: pool.clone(),
            model: ModelConfig {
                vit: c.vit,
                head: c.head,
                plus: None,
            },
            init: None,
            captions: n.min(c.captions),
            images_per_caption: m,
            steps: c.train_steps,
            lr: c.lr,
            schedule: Schedule::Cosine {
                warmup: c.train_steps / 10,
                total: c.train_steps,
            },
            weight_decay: 0.1,
            temperature: 0.1,
            augment: true,
            simclr,
            seed: c.seed,
            checkpoint_every: c.train_steps,
            log_every: 10.min(c.train_steps),
            out: run_dir.clone(),
            resume: true,
            labelled_folder: false,
            source_size: None,
        };
        let stage = format!("training {method} on {data} images");
        let losses = pool_run::run(
            gpu,
            &r,
            |step, _, _| {
                progress(&Step {
                    stage: stage.clone(),
                    done: step,
                    total: c.train_steps,
                })
            },
            &|| false,
        )?;
        let final_loss = match losses.last() {
            Some(&(_, l)) => l,
            None => read_final_loss(&run_dir)?,
        };
        let ck = run_dir.join("checkpoint-last.safetensors");
        let request = |method| Request {
            checkpoint: ck.clone(),
            head_dim: c.head.out,
            train: Some(out.join("eval-train")),
            test: out.join("eval-test"),
            method,
        };
        progress(&Step {
            stage: format!("evaluating {method} ({data})"),
            done: 0,
            total: 2,
        });
        let knn = probe::run(
            gpu,
            &request(Method::Knn {
                k: 20,
                temperature: 0.07,
            }),
        )?
        .accuracy;
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
        outcomes.push(Outcome {
            method: method.into(),
            data: data.into(),
            views_per_step: n * m,
            final_loss,
            knn,
            linear,
        });
    }
    let json = serde_json::to_string_pretty(&outcomes).unwrap_or_default();
    let path = out.join("results.json");
    std::fs::write(&path, json).map_err(|e| io(&path, e))?;
    Ok(outcomes)
}

/// The last loss a finished run logged (`metrics.jsonl`), for a run that was already done.
fn read_final_loss(run_dir: &Path) -> Result<f32> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    text.lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("loss")?
                .as_f64()
        })
        .map(|v| v as f32)
        .ok_or_else(|| Error::Config(format!("{}: no loss logged", path.display())))
}

/// The outcomes as a text table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = format!(
        "{:<10} {:<10} {:>6} {:>10} {:>8} {:>8}\n",
        "method", "data", "views", "final loss", "kNN", "linear"
    );
    for o in outcomes {
        s += &format!(
            "{:<10} {:<10} {:>6} {:>10.4} {:>7.1}% {:>7.1}%\n",
            o.method,
            o.data,
            o.views_per_step,
            o.final_loss,
            100.0 * o.knn,
            100.0 * o.linear
        );
    }
    s
}
