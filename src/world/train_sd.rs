//! Training the mini-world's text-to-image model, a small model of Stable Diffusion's
//! architecture, with the engine. Two stages, each checkpointed atomically and resumable:
//!
//! 1. the VAE on renders of the world's captions (reconstruction + a small KL term), then the
//!    latent scaling factor (1 / the standard deviation of the encoded means);
//! 2. the text encoder and UNet together on epsilon prediction: each step renders a batch of
//!    captions anew (fresh layouts), encodes them with the trained VAE, noises them at random
//!    timesteps of SD's schedule, and drops a caption for the empty prompt with probability
//!    `caption_dropout` (so classifier-free guidance works).
//!
//! The result is a diffusers model folder (`OUT/model`) that the standard loader and samplers
//! run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::export::render_caption;
use super::{Description, World};
use crate::diffusion::blocks::timestep_features;
use crate::diffusion::schedule::{SchedulerConfig, Tables};
use crate::diffusion::training::{denoise_step, init_params, vae_step, write_folder, SmallSd};
use crate::diffusion::vae;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{adam_hyper, Graph, ParamStore, Plan, PlanOptions};
use crate::kernels::layout::embedding_index;
use crate::kernels::optim::AdamW;
use crate::nn::checkpoint::Checkpoint;
use crate::nn::schedule::Schedule;
use crate::text::tokenizer::{Tokenizer, EOT};
use crate::train::checkpoint;
use crate::util::rng::Rng;

/// One stage's optimization settings.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Stage {
    /// Optimizer steps.
    pub steps: u64,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (linear warmup, then cosine to 0).
    pub lr: f64,
    /// Warmup steps.
    pub warmup: u64,
}

/// Everything that defines a training run.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// The model's sizes (its scaling factor is measured in stage 1).
    pub spec: SmallSd,
    /// The world the model draws.
    pub world: World,
    /// Seed of the caption set.
    pub world_seed: u64,
    /// Captions trained on (the first of `world.descriptions(captions, world_seed)`).
    pub captions: usize,
    /// Stage 1.
    pub vae: Stage,
    /// Weight of the KL term.
    pub kl_weight: f32,
    /// Stage 2.
    pub denoiser: Stage,
    /// Probability of training a caption as the empty prompt.
    pub caption_dropout: f64,
    /// Offset noise: the standard deviation of a constant, drawn per image and latent channel,
    /// added to the denoiser's training noise. Without it a model with small latents reads
    /// the background from the mean of the noise (SD's schedule leaves sqrt(alpha_bar_T) =
    /// 0.068 of the image at t = 999, about as much as the noise's spatial mean at 16 x 16) and
    /// ignores the caption for it; see docs/world.md. 0 turns it off.
    pub offset_noise: f32,
    /// The denoiser step from which offset noise is added (0: from the start).
    pub offset_noise_from: u64,
    /// Where the denoiser stage ends and the model is written, when before the end of its
    /// schedule: the learning rate still follows the `denoiser.steps`-step schedule up to
    /// here. `None`: at the schedule's end.
    pub denoiser_stop: Option<u64>,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Seed of initialization, layouts, noise and timesteps.
    pub seed: u64,
}

impl Recipe {
    /// The built-in model's recipe, for the simple world: 32 x 32 images, a 2-level VAE
    /// (latents 4 x 16 x 16: shapes survive a 2x downscale that an 8 x 8 latent blurred), a
    /// 2-level UNet of 16 and 32 channels with cross-attention on both levels and in the
    /// middle, a 2-layer text encoder of width 64 over CLIP's vocabulary with 16 positions
    /// (the simple world's captions take at most 11 tokens). Sized for software adapters.
    pub fn builtin() -> Recipe {
        Recipe {
            spec: SmallSd {
                image_size: 32,
                vae_channels: vec![16, 32],
                latent_channels: 4,
                unet_channels: vec![16, 32],
                unet_attention: vec![true, true],
                unet_heads: 2,
                layers_per_block: 1,
                groups: 8,
                text_width: 64,
                text_layers: 2,
                text_heads: 4,
                text_context: 16,
                scaling_factor: 1.0,
            },
            world: World::Simple,
            world_seed: 0,
            captions: 50_000,
            vae: Stage {
                steps: 600,
                batch: 16,
                lr: 1e-3,
                warmup: 60,
            },
            kl_weight: 1e-4,
            denoiser: Stage {
                steps: 6000,
                batch: 32,
                lr: 7e-4,
                warmup: 200,
            },
            caption_dropout: 0.1,
            offset_noise: 0.2,
            // The built-in run trained 3,200 steps without it before the signal leak was found,
            // and added it for the rest of the schedule (docs/world.md).
            offset_noise_from: 3200,
            // The shipped model is step 5,000 of the 6,000-step schedule: the session that
            // shipped it could not run the last 1,000 steps (docs/world.md).
            denoiser_stop: Some(5000),
            checkpoint_every: 100,
            seed: 0,
        }
    }
}

/// Which part of the run a report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Stage 1.
    Vae,
    /// Measuring the latent scale.
    Scale,
    /// Stage 2.
    Denoiser,
}

/// A progress report: `step` of `total` in `phase`, with the loss read back (when it was).
#[derive(Clone, Copy, Debug)]
pub struct Report {
    /// Phase.
    pub phase: Phase,
    /// Steps done.
    pub step: u64,
    /// Steps in the phase.
    pub total: u64,
    /// The step's loss, when read back.
    pub loss: Option<f32>,
}

const ADAMW: AdamW = AdamW {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.01,
    clamp: None,
};

/// Steps between loss readbacks.
const LOG_EVERY: u64 = 10;

/// Images in the batch that measures the latent scale.
const SCALE_IMAGES: usize = 256;

fn store_from(gpu: &Arc<Gpu>, ck: &Checkpoint) -> Result<ParamStore> {
    let mut store = ParamStore::new();
    crate::models::upload(gpu, ck, &mut store)?;
    Ok(store)
}

/// Fresh parameters, or the stage's checkpoint (and its step) when one exists.
fn start(
    gpu: &Arc<Gpu>,
    g: &Graph,
    path: &Path,
    seed: u64,
) -> Result<(ParamStore, u64, serde_json::Value)> {
    if path.exists() {
        let mut store = ParamStore::new();
        let (config, step) = checkpoint::load(gpu, path, &mut store)?;
        Ok((store, step, config))
    } else {
        Ok((
            store_from(gpu, &init_params(g, seed))?,
            0,
            serde_json::Value::Null,
        ))
    }
}

/// Renders of `picks` (caption index, layout seed) as images in [-1, 1].
fn renders(world: &[Description], picks: &[(usize, u64)], size: usize, seed: u64) -> Vec<f32> {
    picks
        .iter()
        .flat_map(|&(c, k)| render_caption(&world[c], c, k as usize, size, seed))
        .map(|v| 2.0 * v - 1.0)
        .collect()
}

fn picks(rng: &mut Rng, n: usize, captions: usize) -> Vec<(usize, u64)> {
    (0..n)
        .map(|_| (rng.below(captions), rng.next_u64() >> 40))
        .collect()
}

/// Adds offset noise: `noise` holds `planes` equal planes (image x channel); each gets its own
/// constant `std * N(0, 1)`.
pub fn add_offset_noise(noise: &mut [f32], planes: usize, std: f32, rng: &mut Rng) {
    let per = noise.len() / planes.max(1);
    for plane in noise.chunks_mut(per.max(1)) {
        let o = std * rng.normal() as f32;
        plane.iter_mut().for_each(|v| *v += o);
    }
}

fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Eight renders (top row) and their VAE reconstructions (bottom row) as one PNG, to see what
/// stage 1 learned.
fn reconstruction_sheet(
    gpu: &Arc<Gpu>,
    c: &crate::diffusion::vae::VaeConfig,
    weights: &Checkpoint,
    world: &[Description],
    r: &Recipe,
    path: &Path,
) -> Result<()> {
    const N: usize = 8;
    let size = r.spec.image_size;
    let mut g = Graph::new();
    let x = g.input("images", &[N, c.in_channels, size, size]);
    let m = vae::encoder(&mut g, c, "", x)?;
    let mean = g.slice(m, 1, 0, c.latent_channels)?;
    let y = vae::decoder(&mut g, c, "", mean)?;
    let mut store = store_from(gpu, weights)?;
    let plan = Plan::compile(gpu, &g, &[y], &mut store, PlanOptions::default())?;
    let p: Vec<(usize, u64)> = (0..N).map(|i| (i % world.len(), 7)).collect();
    let images = renders(world, &p, size, r.seed);
    plan.write(x, &images)?;
    let rec = plan.run_fetch(&[y])?.remove(0);
    // A [3, 2 * size, N * size] sheet.
    let (h, w) = (2 * size, N * size);
    let mut sheet = vec![0.0f32; 3 * h * w];
    for (row, src) in [&images, &rec].into_iter().enumerate() {
        for i in 0..N {
            for ch in 0..3 {
                for yy in 0..size {
                    for xx in 0..size {
                        let v = src[((i * 3 + ch) * size + yy) * size + xx];
                        sheet[(ch * h + row * size + yy) * w + i * size + xx] =
                            (v * 0.5 + 0.5).clamp(0.0, 1.0);
                    }
                }
            }
        }
    }
    crate::util::image::save_rgb(path, h, w, &sheet)
}

/// Runs (or resumes) the whole recipe into `out`; returns the model folder. `progress` is
/// called after every step; `cancel` is asked before every step (a cancelled run checkpoints
/// first and ends with [`Error::Cancelled`]).
pub fn train(
    gpu: &Arc<Gpu>,
    r: &Recipe,
    out: &Path,
    mut progress: impl FnMut(&Report),
    cancel: &dyn Fn() -> bool,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::Io {
        path: out.display().to_string(),
        source: e,
    })?;
    let world = r.world.descriptions(r.captions, r.world_seed);
    let (ucfg, vcfg, tcfg) = r.spec.parsed()?;
    let size = r.spec.image_size;
    let lat = size / vcfg.downscale();

    // Stage 1: the VAE.
    let vs = vae_step(&vcfg, r.vae.batch, size, r.kl_weight, &ADAMW)?;
    let vae_path = out.join("vae-training.safetensors");
    let (mut store, done, _) = start(gpu, &vs.graph, &vae_path, r.seed)?;
    let vae_names: Vec<String> = vs
        .params
        .iter()
        .filter_map(|&p| vs.graph.node(p).name.clone())
        .collect();
    if done < r.vae.steps {
        let plan = Plan::compile(
            gpu,
            &vs.graph,
            &[vs.loss],
            &mut store,
            PlanOptions::default(),
        )?;
        let sched = Schedule::Cosine {
            warmup: r.vae.warmup,
            total: r.vae.steps,
        };
        let config = serde_json::json!({"stage": "vae", "stage_settings": r.vae});
        for t in done..r.vae.steps {
            if cancel() {
                checkpoint::save(&store, &config, t, &vae_path)?;
                return Err(Error::Cancelled);
            }
            let mut rng = Rng(r.seed ^ 0xAE ^ t.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let p = picks(&mut rng, r.vae.batch, world.len());
            plan.write(vs.images, &renders(&world, &p, size, r.seed))?;
            let noise = normals(&mut rng, r.vae.batch * vcfg.latent_channels * lat * lat);
            plan.write(vs.noise, &noise)?;
            let lr = sched.lr(r.vae.lr, t);
            plan.write(vs.hyper, &adam_hyper(lr as f32, &ADAMW, (t + 1) as u32))?;
            let log = (t + 1) % LOG_EVERY == 0 || t + 1 == r.vae.steps;
            let loss = if log {
                let l = plan.run_fetch(&[vs.loss])?[0][0];
                if !l.is_finite() {
                    return Err(Error::Graph(format!(
                        "VAE loss became {l} at step {}; the last checkpoint is {}",
                        t + 1,
                        vae_path.display()
                    )));
                }
                Some(l)
            } else {
                plan.run()?;
                None
            };
            if (t + 1) % r.checkpoint_every == 0 || t + 1 == r.vae.steps {
                checkpoint::save(&store, &config, t + 1, &vae_path)?;
            }
            progress(&Report {
                phase: Phase::Vae,
                step: t + 1,
                total: r.vae.steps,
                loss,
            });
        }
    }
    let vae_weights = checkpoint::tensors(&store, &vae_names)?;
    drop(store);
    reconstruction_sheet(
        gpu,
        &vcfg,
        &vae_weights,
        &world,
        r,
        &out.join("vae-check.png"),
    )?;

    // The latent scale, and an encoder for stage 2.
    let mut eg = Graph::new();
    let b2 = r.denoiser.batch;
    let ex = eg.input("images", &[b2, vcfg.in_channels, size, size]);
    let moments = vae::encoder(&mut eg, &vcfg, "", ex)?;
    let emean = eg.slice(moments, 1, 0, vcfg.latent_channels)?;
    let mut estore = store_from(gpu, &vae_weights)?;
    let enc = Plan::compile(gpu, &eg, &[emean], &mut estore, PlanOptions::default())?;
    let mut rng = Rng(r.seed ^ 0x5CA1E);
    let mut sum = (0.0f64, 0.0f64, 0usize);
    for _ in 0..SCALE_IMAGES.div_ceil(b2) {
        let p = picks(&mut rng, b2, world.len());
        enc.write(ex, &renders(&world, &p, size, r.seed))?;
        for v in enc.run_fetch(&[emean])?.remove(0) {
            sum.0 += v as f64;
            sum.1 += (v as f64) * (v as f64);
            sum.2 += 1;
        }
    }
    let mean = sum.0 / sum.2 as f64;
    let std = (sum.1 / sum.2 as f64 - mean * mean).max(1e-12).sqrt();
    let scale = 1.0 / std;
    progress(&Report {
        phase: Phase::Scale,
        step: 1,
        total: 1,
        loss: Some(std as f32),
    });

    // Stage 2: text encoder + UNet.
    let tokens = tcfg.max_position_embeddings;
    let ds = denoise_step(&ucfg, &tcfg, b2, lat, tokens, &ADAMW)?;
    let den_path = out.join("denoiser-training.safetensors");
    let (mut store, done, _) = start(gpu, &ds.graph, &den_path, r.seed ^ 1)?;
    let den_names: Vec<String> = ds
        .params
        .iter()
        .filter_map(|&p| ds.graph.node(p).name.clone())
        .collect();
    let end = r
        .denoiser_stop
        .map_or(r.denoiser.steps, |s| s.min(r.denoiser.steps));
    if done > end {
        return Err(Error::Config(format!(
            "{} is at denoiser step {done}, past the stop at step {end}; give a later stop \
             or another folder",
            den_path.display()
        )));
    }
    if done < end {
        let plan = Plan::compile(
            gpu,
            &ds.graph,
            &[ds.loss],
            &mut store,
            PlanOptions::default(),
        )?;
        let sched = Schedule::Cosine {
            warmup: r.denoiser.warmup,
            total: r.denoiser.steps,
        };
        let tables = Tables::new(&SchedulerConfig::default());
        let tok = Tokenizer::clip_transformers();
        let config = serde_json::json!({
            "stage": "denoiser",
            "scaling_factor": scale,
            "stage_settings": r.denoiser,
        });
        let ch0 = ucfg.block_out_channels[0];
        let steps_t = tables.alphas_cumprod.len();
        for t in done..end {
            if cancel() {
                checkpoint::save(&store, &config, t, &den_path)?;
                return Err(Error::Cancelled);
            }
            let mut rng = Rng(r.seed ^ 0xDE ^ t.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let p = picks(&mut rng, b2, world.len());
            enc.write(ex, &renders(&world, &p, size, r.seed))?;
            let latents: Vec<f32> = enc
                .run_fetch(&[emean])?
                .remove(0)
                .into_iter()
                .map(|v| (v as f64 * scale) as f32)
                .collect();
            let mut ids = Vec::with_capacity(b2 * tokens);
            for &(c, _) in &p {
                let text = if rng.unit() < r.caption_dropout {
                    String::new()
                } else {
                    world[c].caption()
                };
                ids.extend(tok.tokenize(&text, tokens, EOT));
            }
            let (offsets, rows) = embedding_index(&ids, tcfg.vocab_size);
            plan.write_u32(ds.ids, &ids)?;
            plan.write_u32(ds.offsets, &offsets)?;
            plan.write_u32(ds.rows, &rows)?;
            plan.write(ds.latents, &latents)?;
            let mut noise = normals(&mut rng, latents.len());
            let ts: Vec<usize> = (0..b2).map(|_| rng.below(steps_t)).collect();
            if r.offset_noise > 0.0 && t >= r.offset_noise_from {
                // Its own stream, so the draws above stay those of a run without it.
                let mut orng = Rng(r.seed ^ 0x0FF5E7 ^ t.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                add_offset_noise(&mut noise, b2 * ucfg.in_channels, r.offset_noise, &mut orng);
            }
            plan.write(ds.noise, &noise)?;
            let signal: Vec<f32> = ts.iter().map(|&s| tables.acp(s).sqrt() as f32).collect();
            let sigma: Vec<f32> = ts
                .iter()
                .map(|&s| (1.0 - tables.acp(s)).sqrt() as f32)
                .collect();
            plan.write(ds.signal, &signal)?;
            plan.write(ds.sigma, &sigma)?;
            let time: Vec<f32> = ts
                .iter()
                .flat_map(|&s| timestep_features(s as f64, ch0, true, 0.0))
                .collect();
            plan.write(ds.time, &time)?;
            let lr = sched.lr(r.denoiser.lr, t);
            plan.write(ds.hyper, &adam_hyper(lr as f32, &ADAMW, (t + 1) as u32))?;
            let log = (t + 1) % LOG_EVERY == 0 || t + 1 == end;
            let loss = if log {
                let l = plan.run_fetch(&[ds.loss])?[0][0];
                if !l.is_finite() {
                    return Err(Error::Graph(format!(
                        "denoiser loss became {l} at step {}; the last checkpoint is {}",
                        t + 1,
                        den_path.display()
                    )));
                }
                Some(l)
            } else {
                plan.run()?;
                None
            };
            if (t + 1) % r.checkpoint_every == 0 || t + 1 == end {
                checkpoint::save(&store, &config, t + 1, &den_path)?;
            }
            progress(&Report {
                phase: Phase::Denoiser,
                step: t + 1,
                total: end,
                loss,
            });
        }
    }
    let den = checkpoint::tensors(&store, &den_names)?;
    let mut unet = Checkpoint::default();
    let mut text = Checkpoint::default();
    for (k, t) in den.tensors {
        if k.starts_with(crate::diffusion::training::TEXT_PREFIX) {
            text.tensors.insert(k, t);
        } else {
            unet.tensors.insert(k, t);
        }
    }
    let mut spec = r.spec.clone();
    spec.scaling_factor = scale;
    let model = out.join("model");
    write_folder(&model, &spec.configs(), &unet, &vae_weights, &text)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_noise_moves_each_plane_by_its_own_constant() {
        let (planes, per) = (2000, 16);
        let mut noise = vec![0.0f32; planes * per];
        add_offset_noise(&mut noise, planes, 0.5, &mut Rng(7));
        let means: Vec<f64> = noise
            .chunks(per)
            .map(|p| {
                assert!(
                    p.iter().all(|&v| v == p[0]),
                    "a plane got more than one offset"
                );
                p[0] as f64
            })
            .collect();
        let m = means.iter().sum::<f64>() / planes as f64;
        let var = means.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / planes as f64;
        assert!(m.abs() < 0.05, "mean offset {m}");
        assert!((var.sqrt() - 0.5).abs() < 0.03, "offset std {}", var.sqrt());
    }
}
