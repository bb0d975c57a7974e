//! Training StableRep from a synthetic pool: batches of n captions x m images drawn by the
//! recipe's sampler, decoded on a background thread (the GPU never waits on PNG decoding when
//! the decoder keeps up), augmented on the GPU inside the training plan, with periodic atomic
//! checkpoints, JSON-lines metrics and exact resume.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use serde::{Deserialize, Serialize};

use super::checkpoint;
use crate::data::augment::{self, AugmentConfig};
use crate::data::pool::Pool;
use crate::data::sampler::Sampler;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{adam_hyper, ParamStore, Plan, PlanOptions};
use crate::models::config::{model_config, ModelConfig};
use crate::models::stablerep::{init_params_with, recipe_adamw, train_step, Init, StepConfig};
use crate::models::text::TextBatch;
use crate::nn::checkpoint::Checkpoint;
use crate::nn::schedule::Schedule;
use crate::util::image::resize_center_crop;
use crate::util::rng::Rng;

/// Settings of a pool run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolRun {
    /// The pool folder.
    pub pool: PathBuf,
    /// Model (used for a fresh start; a resumed or `init` checkpoint's own config wins).
    pub model: ModelConfig,
    /// Optional initial checkpoint.
    pub init: Option<PathBuf>,
    /// How a fresh model is initialized (without `init` or a checkpoint to resume).
    #[serde(default)]
    pub fresh_init: Init,
    /// Captions per batch (n).
    pub captions: usize,
    /// Images per caption (m).
    pub images_per_caption: usize,
    /// Total optimizer steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule.
    pub schedule: Schedule,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Loss temperature.
    pub temperature: f32,
    /// Augment (the strong pipeline) or only resize + normalize.
    pub augment: bool,
    /// The augmentation when `augment` is on (default: the paper's, for 224-pixel images).
    #[serde(default)]
    pub augment_config: Option<AugmentConfig>,
    /// SimCLR control: each caption contributes one image seen through `images_per_caption`
    /// independent augmentations (2 in the paper) instead of different images.
    pub simclr: bool,
    /// Seed for initialization, sampling and augmentation.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Steps between loss readbacks (and metric lines).
    pub log_every: u64,
    /// Output folder.
    pub out: PathBuf,
    /// Continue from `out/checkpoint-last.safetensors` when it exists.
    pub resume: bool,
    /// `pool` is a labelled image folder (`<class>/<image>`, real images) instead of a
    /// synthetic pool: every image is its own caption (use the SimCLR control).
    #[serde(default)]
    pub labelled_folder: bool,
    /// Resize every image's shorter side to this size and center-crop a square on the decoder
    /// thread (images of any size); without it every image must have the first one's size.
    #[serde(default)]
    pub source_size: Option<usize>,
    /// Width per attention head, to read an `init` (or resumed) checkpoint that stores no
    /// model config (a converted official one): 64 in every timm ViT size.
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// Gradient caching: run the encoder in chunks of this many images (a divisor of the
    /// batch), so memory is bounded by the chunk ([`super::chunked`]).
    #[serde(default)]
    pub chunk: Option<usize>,
}

fn default_head_dim() -> usize {
    64
}

/// One decoded batch.
struct Prepared {
    step: u64,
    pixels: Vec<f32>,
    params: Vec<f32>,
    /// StableRep+: the batch's captions, tokenized.
    text: Option<TextBatch>,
}

/// Runs the training; `progress(step, loss, lr)` after each logged step. Returns the losses
/// that were read back. `cancel()` is asked before every step: when it says yes, the steps
/// done so far are checkpointed (so `resume` continues from there) and the run ends with
/// [`Error::Cancelled`].
pub fn run(
    gpu: &Arc<Gpu>,
    r: &PoolRun,
    mut progress: impl FnMut(u64, f32, f64),
    cancel: &dyn Fn() -> bool,
) -> Result<Vec<(u64, f32)>> {
    let pool = if r.labelled_folder {
        Pool::from_labelled_folder(&r.pool)?
    } else {
        Pool::open(&r.pool)?
    };
    let k = pool.images_per_caption();
    // The SimCLR control draws one image per caption and augments it once per view.
    let drawn = if r.simclr { 1 } else { r.images_per_caption };
    let sampler = Sampler::new(pool.captions.len(), k, r.captions, drawn, r.seed)?;
    let source_size = r.source_size;
    let (src_h, src_w) = match source_size {
        Some(0) => {
            return Err(Error::Config("--source-size must be positive".into()));
        }
        Some(s) => (s, s),
        None => {
            let (h, w, _) = pool.load_rgb(0, 0)?;
            (h, w)
        }
    };
    let last = r.out.join("checkpoint-last.safetensors");
    let (ck, start) = if r.resume && last.exists() {
        let ck = Checkpoint::load(&last)?;
        let step = checkpoint::read_step(&ck, &last)?;
        (ck, step)
    } else if let Some(init) = &r.init {
        (Checkpoint::load(init)?, 0)
    } else {
        (
            init_params_with(
                &r.model.vit,
                &r.model.head,
                r.model.plus.as_ref(),
                r.seed,
                r.fresh_init,
            ),
            0,
        )
    };
    let model = if r.init.is_some() || start > 0 {
        // The checkpoint's own architecture (stored, or inferred with `head_dim`); one that
        // can be read neither way is an error, not a silent switch to the flags' model.
        let from = if start > 0 {
            &last
        } else {
            r.init.as_ref().unwrap_or(&last)
        };
        model_config(&ck, r.head_dim)
            .map_err(|e| Error::Config(format!("{}: cannot read its model: {e}", from.display())))?
    } else {
        r.model
    };
    if let Some(s) = source_size {
        if s < model.vit.img_size {
            return Err(Error::Config(format!(
                "--source-size {s} is smaller than the encoder's input ({} pixels)",
                model.vit.img_size
            )));
        }
    }
    let adamw = recipe_adamw(r.weight_decay);
    let step_cfg = StepConfig {
        vit: model.vit,
        head: model.head,
        captions: r.captions,
        images_per_caption: r.images_per_caption,
        temperature: r.temperature,
        adamw,
        augment_from: Some((src_h, src_w)),
        plus: model.plus,
    };
    if model.plus.is_some() && r.simclr {
        return Err(Error::Config(
            "StableRep+ and the SimCLR control are separate methods; pick one".into(),
        ));
    }
    let step = train_step(&step_cfg)?;
    let mut store = ParamStore::new();
    crate::models::upload(gpu, &ck, &mut store)?;
    // Chunked: four plans over the same store; otherwise one plan for the whole step.
    let chunked = match r.chunk {
        Some(c) => Some(super::chunked::ChunkedStep::new(
            gpu, &step_cfg, c, &mut store,
        )?),
        None => None,
    };
    let plan = match chunked {
        Some(_) => None,
        None => Some(Plan::compile(
            gpu,
            &step.graph,
            &[step.loss],
            &mut store,
            PlanOptions::default(),
        )?),
    };
    // Decoder thread: batches in step order, two ahead of the GPU.
    let (tx, rx) = mpsc::sync_channel::<Result<Prepared>>(2);
    let (pool2, sampler2, seed, total, aug, aug_cfg) = (
        pool.clone(),
        sampler.clone(),
        r.seed,
        r.steps,
        r.augment,
        r.augment_config,
    );
    let (simclr, views, plus) = (r.simclr, r.images_per_caption, model.plus);
    let n = r.captions;
    let decoder = std::thread::spawn(move || {
        let acfg = if aug {
            aug_cfg.unwrap_or_default()
        } else {
            AugmentConfig::none()
        };
        for t in start..total {
            let bpe = sampler2.batches_per_epoch() as u64;
            let mut batch = sampler2.batch(t / bpe, (t % bpe) as usize);
            if simclr {
                // One image per caption, repeated for every view (augmented independently).
                let first = batch.picks.clone();
                batch.picks = (0..views).flat_map(|_| first.iter().copied()).collect();
            }
            let mut rng = Rng(seed ^ 0x5EED ^ t.wrapping_mul(0x9E3779B97F4A7C15));
            let mut pixels = Vec::with_capacity(batch.picks.len() * 3 * src_h * src_w);
            let mut params = Vec::with_capacity(batch.picks.len() * 16);
            let mut failed = None;
            for &(c, j) in &batch.picks {
                match pool2.load_rgb(c, j) {
                    Ok((h, w, px)) if source_size.is_some() => {
                        pixels.extend(resize_center_crop(&px, h, w, src_h, src_h));
                    }
                    Ok((h, w, px)) if (h, w) == (src_h, src_w) => pixels.extend(px),
                    Ok((h, w, _)) => {
                        failed = Some(Error::Config(format!(
                            "{}: {h}x{w} differs from the pool's {src_h}x{src_w} (pass --source-size to resize every image)",
                            pool2.image_name(c, j)
                        )));
                        break;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                params.extend(augment::sample(&acfg, src_h, src_w, &mut rng));
            }
            // The first n picks are view 0 of each caption, in caption order.
            let text = plus.map(|p| {
                let caps: Vec<&str> = batch.picks[..n]
                    .iter()
                    .map(|&(c, _)| pool2.captions[c].text.as_str())
                    .collect();
                TextBatch::from_captions(&caps, &p.text)
            });
            let item = match failed {
                Some(e) => Err(e),
                None => Ok(Prepared {
                    step: t,
                    pixels,
                    params,
                    text,
                }),
            };
            let stop = item.is_err();
            if tx.send(item).is_err() || stop {
                return;
            }
        }
    });
    let mut metrics = super::MetricsLog::resume_at(&r.out, start)?;
    let config = serde_json::json!({ "model": model, "run": r });
    let aug_params = step
        .aug_params
        .ok_or_else(|| Error::Graph("training step without augmentation input".into()))?;
    let mut losses = Vec::new();
    for t in start..r.steps {
        if cancel() {
            if t > start {
                checkpoint::save(&store, &config, t, &last)?;
            }
            drop(rx);
            let _ = decoder.join();
            return Err(Error::Cancelled);
        }
        let batch = rx
            .recv()
            .map_err(|_| Error::Graph("the image decoder stopped unexpectedly".into()))??;
        debug_assert_eq!(batch.step, t);
        let lr = r.schedule.lr(r.lr, t);
        let save = (t + 1) % r.checkpoint_every.max(1) == 0 || t + 1 == r.steps;
        let log = (t + 1) % r.log_every.max(1) == 0 || save;
        // The loss when this step logs (a checkpoint step always reads it back, so a
        // non-finite loss is caught before anything is saved).
        let loss = if let Some(plan) = &plan {
            plan.write(step.images, &batch.pixels)?;
            plan.write(aug_params, &batch.params)?;
            if let (Some(t), Some(inp)) = (&batch.text, &step.text) {
                super::fixed::write_text(plan, inp, t)?;
            }
            plan.write(step.hyper, &adam_hyper(lr as f32, &adamw, (t + 1) as u32))?;
            if log {
                Some(plan.run_fetch(&[step.loss])?[0][0])
            } else {
                plan.run()?;
                None
            }
        } else {
            let cs = chunked
                .as_ref()
                .ok_or_else(|| Error::Graph("no training plan".into()))?;
            let out = cs.step(
                &batch.pixels,
                Some(&batch.params),
                batch.text.as_ref(),
                lr as f32,
                (t + 1) as u32,
                false,
            )?;
            // The chunked step has the loss anyway: check it every step.
            (log || !out.loss.is_finite()).then_some(out.loss)
        };
        if let Some(loss) = loss {
            if !loss.is_finite() {
                return Err(Error::Graph(format!(
                    "loss became {loss} at step {}; stopped without saving, the last good checkpoint is {}",
                    t + 1,
                    last.display()
                )));
            }
            metrics.write(&serde_json::json!({"step": t + 1, "loss": loss, "lr": lr}))?;
            losses.push((t + 1, loss));
            progress(t + 1, loss, lr);
        }
        if save {
            checkpoint::save(&store, &config, t + 1, &last)?;
        }
    }
    drop(rx);
    let _ = decoder.join();
    Ok(losses)
}
