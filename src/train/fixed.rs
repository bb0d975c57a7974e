//! Training on a fixed, pre-augmented batch (the parity mode used to prove equality with
//! PyTorch): load a checkpoint, run `steps` optimizer steps on the same batch, write the
//! checkpoint and per-step metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::checkpoint;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{adam_hyper, ParamStore, Plan, PlanOptions};
use crate::models::config::model_config;
use crate::models::stablerep::{recipe_adamw, train_step, StepConfig};
use crate::models::text::TextBatch;
use crate::nn::checkpoint::Checkpoint;
use crate::nn::schedule::Schedule;

/// Settings of a fixed-batch run.
#[derive(Clone, Debug)]
pub struct FixedBatchRun {
    /// Initial checkpoint.
    pub init: PathBuf,
    /// safetensors file with `images` [n * m, 3, H, W], normalized, view-major (and, for a
    /// StableRep+ checkpoint, `token_ids` [n, context]).
    pub batch: PathBuf,
    /// Captions per batch (n).
    pub captions: usize,
    /// Images per caption (m).
    pub images_per_caption: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule.
    pub schedule: Schedule,
    /// Decoupled weight decay (applied per the official rule).
    pub weight_decay: f32,
    /// Loss temperature.
    pub temperature: f32,
    /// Head dimension used when the architecture must be inferred.
    pub head_dim: usize,
    /// StableRep+: train the checkpoint's text tower with the image-text loss too (an error
    /// when it has none); otherwise only the image side is trained.
    pub plus: bool,
    /// Output folder.
    pub out: PathBuf,
    /// Where to write the first step's gradients (safetensors, f32, under the parameters'
    /// names), if anywhere.
    pub save_grads: Option<PathBuf>,
    /// Gradient caching in chunks of this many images ([`super::chunked`]).
    pub chunk: Option<usize>,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Loss per step.
    pub losses: Vec<f32>,
    /// The checkpoint written.
    pub checkpoint: PathBuf,
}

/// Runs the steps; calls `progress(step, loss, lr)` after each.
pub fn run(
    gpu: &Arc<Gpu>,
    r: &FixedBatchRun,
    mut progress: impl FnMut(u64, f32, f64),
) -> Result<RunReport> {
    let ck = Checkpoint::load(&r.init)?;
    let mut model = model_config(&ck, r.head_dim)?;
    if !r.plus {
        model.plus = None;
    } else if model.plus.is_none() {
        return Err(Error::Config(format!(
            "{}: StableRep+ needs a checkpoint with a text tower (token_embedding.weight, transformer.resblocks.*, text_projection, image_projection, logit_scale)",
            r.init.display()
        )));
    }
    let batch = Checkpoint::load(&r.batch)?;
    let s = model.vit.img_size;
    let rows = r.captions * r.images_per_caption;
    let images = batch.get("images", Some(&[rows, 3, s, s])).map_err(|e| {
        Error::Config(format!(
            "{e} ({} captions x {} images at {s}x{s})",
            r.captions, r.images_per_caption
        ))
    })?;
    let text = match &model.plus {
        Some(p) => {
            let ids = batch
                .get("token_ids", Some(&[r.captions, p.text.context]))
                .map_err(|e| {
                    Error::Config(format!(
                        "{}: a StableRep+ checkpoint needs the captions' tokens: {e}",
                        r.batch.display()
                    ))
                })?;
            let ids = ids.data.iter().map(|&v| v as u32).collect();
            Some(TextBatch::from_ids(ids, &p.text))
        }
        None => None,
    };
    let adamw = recipe_adamw(r.weight_decay);
    let cfg = StepConfig {
        vit: model.vit,
        head: model.head,
        captions: r.captions,
        images_per_caption: r.images_per_caption,
        temperature: r.temperature,
        adamw,
        augment_from: None,
        plus: model.plus,
    };
    let step = train_step(&cfg)?;
    let mut store = ParamStore::new();
    crate::models::upload(gpu, &ck, &mut store)?;
    // No step entry: a fresh start. One that does not parse is an error, not step 0.
    let start_step: u64 = match ck.metadata.get(checkpoint::STEP_KEY) {
        None => 0,
        Some(v) => v.parse().map_err(|_| {
            Error::Config(format!(
                "{}: the checkpoint's step number `{v}` is not a whole number",
                r.init.display()
            ))
        })?,
    };
    // Chunked (gradient caching) or one plan for the whole step; the loop is the same.
    let mut outputs = vec![step.loss];
    if r.save_grads.is_some() {
        outputs.extend(&step.grads);
    }
    let (plan, chunked) = match r.chunk {
        Some(c) => (
            None,
            Some(if r.save_grads.is_some() {
                super::chunked::ChunkedStep::new_keeping_gradients(gpu, &cfg, c, &mut store)?
            } else {
                super::chunked::ChunkedStep::new(gpu, &cfg, c, &mut store)?
            }),
        ),
        None => {
            let plan = Plan::compile(
                gpu,
                &step.graph,
                &outputs,
                &mut store,
                PlanOptions::default(),
            )?;
            plan.write(step.images, &images.data)?;
            if let (Some(t), Some(inp)) = (&text, &step.text) {
                write_text(&plan, inp, t)?;
            }
            (Some(plan), None)
        }
    };
    let mut metrics = super::MetricsLog::open(&r.out)?;
    let mut losses = Vec::new();
    for i in 0..r.steps {
        let t = start_step + i;
        let lr = r.schedule.lr(r.lr, t);
        let loss = match (&plan, &chunked) {
            (_, Some(cs)) => {
                let want = r.save_grads.is_some() && i == 0;
                let out = cs.step(
                    &images.data,
                    None,
                    text.as_ref(),
                    lr as f32,
                    (t + 1) as u32,
                    want,
                )?;
                if let (Some(path), Some(enc), Some(head)) =
                    (&r.save_grads, &out.encoder_grads, &out.head_grads)
                {
                    let named = cs
                        .encoder_params
                        .iter()
                        .map(|(n, _)| n)
                        .zip(enc)
                        .chain(head.iter().map(|(n, g)| (n, g)));
                    save_named_grads(&store, named, path)?;
                }
                out.loss
            }
            (Some(plan), None) => {
                plan.write(step.hyper, &adam_hyper(lr as f32, &adamw, (t + 1) as u32))?;
                match (&r.save_grads, i) {
                    (Some(path), 0) => {
                        let got = plan.run_fetch(&outputs)?;
                        save_grads(&step, &got[1..], path)?;
                        got[0][0]
                    }
                    _ => plan.run_fetch(&[step.loss])?[0][0],
                }
            }
            (None, None) => return Err(Error::Graph("no training plan".into())),
        };
        if !loss.is_finite() {
            return Err(Error::Graph(format!(
                "loss became {loss} at step {}; the last good checkpoint is {}",
                t + 1,
                r.init.display()
            )));
        }
        metrics.write(&serde_json::json!({"step": t + 1, "loss": loss, "lr": lr}))?;
        losses.push(loss);
        progress(t + 1, loss, lr);
    }
    let path = r.out.join("checkpoint-last.safetensors");
    let config = serde_json::json!({ "model": model, "captions": r.captions, "images_per_caption": r.images_per_caption, "temperature": r.temperature });
    checkpoint::save(&store, &config, start_step + r.steps, &path)?;
    Ok(RunReport {
        losses,
        checkpoint: path,
    })
}

/// Writes gradients fetched for `step.grads` under their parameters' names.
fn save_grads(
    step: &crate::models::stablerep::TrainStep,
    grads: &[Vec<f32>],
    path: &Path,
) -> Result<()> {
    use crate::nn::checkpoint::HostTensor;
    let mut ck = Checkpoint::default();
    for ((&p, &gr), data) in step.params.iter().zip(&step.grads).zip(grads) {
        let name = step
            .graph
            .node(p)
            .name
            .clone()
            .ok_or_else(|| Error::Graph(format!("parameter node {p:?} has no name")))?;
        ck.tensors.insert(
            name,
            HostTensor {
                shape: step.graph.shape(gr).to_vec(),
                data: data.clone(),
            },
        );
    }
    ck.save(path)
}

/// Writes gradients given by parameter name, shaped as the parameters in `store` (the chunked
/// step's: the encoder's summed over chunks, then the head's).
fn save_named_grads<'a>(
    store: &ParamStore,
    grads: impl Iterator<Item = (&'a String, &'a Vec<f32>)>,
    path: &Path,
) -> Result<()> {
    use crate::nn::checkpoint::HostTensor;
    let mut ck = Checkpoint::default();
    for (name, data) in grads {
        let shape = store
            .get(name)
            .ok_or_else(|| Error::Graph(format!("no parameter '{name}' for its gradient")))?
            .shape
            .clone();
        ck.tensors.insert(
            name.clone(),
            HostTensor {
                shape,
                data: data.clone(),
            },
        );
    }
    ck.save(path)
}

/// The path of a run's last checkpoint.
pub fn last_checkpoint(out: &Path) -> PathBuf {
    out.join("checkpoint-last.safetensors")
}

/// Writes one batch's token ids and embedding index into a StableRep+ plan.
pub fn write_text(
    plan: &Plan,
    inputs: &crate::models::text::TextInputs,
    t: &TextBatch,
) -> Result<()> {
    plan.write_u32(inputs.ids, &t.ids)?;
    plan.write_u32(inputs.eot, &t.eot)?;
    plan.write_u32(inputs.offsets, &t.offsets)?;
    plan.write_u32(inputs.rows, &t.rows)
}
