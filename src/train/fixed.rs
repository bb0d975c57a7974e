//! Training on a fixed, pre-augmented batch (the parity mode used to prove equality with
//! PyTorch): load a checkpoint, run `steps` optimizer steps on the same batch, write the
//! checkpoint and per-step metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::schedule::Schedule;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{adam_hyper, ParamStore, Plan, PlanOptions};
use crate::models::stablerep::{recipe_adamw, train_step, HeadConfig, PlusConfig, StepConfig};
use crate::models::text::{TextBatch, TextConfig};
use crate::models::vit::{self, VitConfig};
use crate::nn::checkpoint::Checkpoint;

/// The architecture stored in a checkpoint's `config` metadata.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Encoder.
    pub vit: VitConfig,
    /// Projection head.
    pub head: HeadConfig,
    /// StableRep+'s text tower and projections (absent: plain StableRep / SimCLR).
    #[serde(default)]
    pub plus: Option<PlusConfig>,
}

/// The model configuration in a checkpoint's metadata, if it has one.
fn stored_config(ck: &Checkpoint) -> Result<Option<ModelConfig>> {
    let Some(s) = ck.metadata.get(checkpoint::CONFIG_KEY) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(s)
        .map_err(|e| Error::Config(format!("checkpoint config is not JSON: {e}")))?;
    // No `model` entry (a converted official checkpoint, a judge): shapes are inferred. A
    // `model` entry that does not parse is an error, not a guess.
    match v.get("model") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(m) => serde_json::from_value::<ModelConfig>(m.clone())
            .map(Some)
            .map_err(|e| {
                Error::Config(format!(
                    "the checkpoint's stored model config (metadata `{}`, key `model`) is \
                     malformed: {e}",
                    checkpoint::CONFIG_KEY
                ))
            }),
    }
}

/// The encoder of a checkpoint: from its metadata, else inferred from the `visual.*` shapes.
pub fn vit_config(ck: &Checkpoint, head_dim: usize) -> Result<VitConfig> {
    match stored_config(ck)? {
        Some(m) => Ok(m.vit),
        None => vit::infer_config(ck, "visual.", head_dim),
    }
}

/// The architecture of a checkpoint: from its metadata, else inferred from tensor shapes
/// (converted official checkpoints have no metadata) with `head_dim` per attention head.
pub fn model_config(ck: &Checkpoint, head_dim: usize) -> Result<ModelConfig> {
    if let Some(m) = stored_config(ck)? {
        return Ok(m);
    }
    let vit = vit::infer_config(ck, "visual.", head_dim)?;
    let l1 = ck.get("image_mlp.layer1.weight", None)?;
    let l3 = ck.get("image_mlp.layer3.weight", None)?;
    Ok(ModelConfig {
        vit,
        head: HeadConfig {
            hidden: l1.shape[0],
            out: l3.shape[0],
        },
        plus: infer_plus(ck, head_dim)?,
    })
}

/// StableRep+'s text tower from tensor shapes (OpenAI names), if the checkpoint has one.
fn infer_plus(ck: &Checkpoint, head_dim: usize) -> Result<Option<PlusConfig>> {
    if !ck.tensors.contains_key("text_projection") {
        return Ok(None);
    }
    let tok = ck.get("token_embedding.weight", None)?;
    let pos = ck.get("positional_embedding", None)?;
    let fc = ck.get("transformer.resblocks.0.mlp.c_fc.weight", None)?;
    let proj = ck.get("text_projection", None)?;
    if tok.shape.len() != 2 || pos.shape.len() != 2 || fc.shape.len() != 2 || proj.shape.len() != 2
    {
        return Err(Error::Config(
            "unexpected text tower tensor shapes in the checkpoint".into(),
        ));
    }
    let layers = (0..)
        .take_while(|l| {
            ck.tensors
                .contains_key(&format!("transformer.resblocks.{l}.attn.in_proj_weight"))
        })
        .count();
    let width = tok.shape[1];
    Ok(Some(PlusConfig {
        text: TextConfig {
            context: pos.shape[0],
            vocab: tok.shape[0],
            width,
            layers,
            heads: (width / head_dim).max(1),
            mlp: fc.shape[0],
        },
        embed: proj.shape[1],
    }))
}

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
            "{}: {e} ({} captions x {} images at {s}x{s})",
            r.batch.display(),
            r.captions,
            r.images_per_caption
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
    for (name, t) in &ck.tensors {
        store.set(gpu, name, &t.shape, &t.data)?;
    }
    let start_step: u64 = ck
        .metadata
        .get(checkpoint::STEP_KEY)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let plan = Plan::compile(
        gpu,
        &step.graph,
        &[step.loss],
        &mut store,
        PlanOptions::default(),
    )?;
    plan.write(step.images, &images.data)?;
    if let (Some(t), Some(inp)) = (&text, &step.text) {
        write_text(&plan, inp, t)?;
    }
    let mut metrics = super::MetricsLog::open(&r.out)?;
    let mut losses = Vec::new();
    for i in 0..r.steps {
        let t = start_step + i;
        let lr = r.schedule.lr(r.lr, t);
        plan.write(step.hyper, &adam_hyper(lr as f32, &adamw, (t + 1) as u32))?;
        let loss = plan.run_fetch(&[step.loss])?[0][0];
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_stored_config_is_an_error_not_a_guess() {
        let mut ck = Checkpoint::default();
        ck.metadata.insert(
            checkpoint::CONFIG_KEY.into(),
            r#"{"model": {"vit": {"width": "wide"}}}"#.into(),
        );
        let e = vit_config(&ck, 64).unwrap_err().to_string();
        assert!(
            e.contains("stored model config") && e.contains("malformed"),
            "{e}"
        );
        // No `model` entry: nothing stored, so shapes are inferred (here: no tensors).
        ck.metadata.insert(
            checkpoint::CONFIG_KEY.into(),
            r#"{"supervised": {}}"#.into(),
        );
        assert!(stored_config(&ck).unwrap().is_none());
    }
}
