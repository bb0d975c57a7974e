//! The training state on disk: every tensor of the [`ParamStore`] (parameters under their
//! official names such as `visual.*` and `image_mlp.*`, AdamW moments as
//! `optimizer.<name>.exp_avg` / `optimizer.<name>.exp_avg_sq`, BatchNorm running statistics)
//! in one safetensors file, with the run's configuration and step in the metadata. Writes are
//! atomic, so an interrupted save keeps the previous checkpoint; a timm user loads the
//! `visual.*` tensors (prefix stripped) with `strict=True`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::ParamStore;
use crate::nn::checkpoint::{Checkpoint, HostTensor};

pub use crate::nn::checkpoint::{CONFIG_KEY, STEP_KEY};

/// The optimizer step a training checkpoint was saved at; an error naming `path` when the
/// metadata lacks it or it is not a number (resuming at step 0 with trained weights would be
/// a silent wrong result).
pub fn read_step(ck: &Checkpoint, path: &Path) -> Result<u64> {
    let s = ck.metadata.get(STEP_KEY).ok_or_else(|| {
        Error::Config(format!(
            "{}: the checkpoint has no '{STEP_KEY}' in its metadata, so it cannot be resumed",
            path.display()
        ))
    })?;
    s.trim().parse().map_err(|_| {
        Error::Config(format!(
            "{}: the checkpoint's step '{s}' is not a number",
            path.display()
        ))
    })
}

/// Reads every tensor of `store` back and writes them with `config` (JSON) and `step`. A
/// tensor with a non-finite value (a gradient that overflowed while the loss stayed finite) is
/// an error that names it and the step, and the file at `path` is left as it was.
pub fn save(store: &ParamStore, config: &serde_json::Value, step: u64, path: &Path) -> Result<()> {
    let mut ck = Checkpoint::default();
    for name in store.names() {
        if name.starts_with(crate::graph::SCRATCH_PREFIX) {
            continue;
        }
        let t = store.get(name).expect("name from the store");
        let data = t.read_f32()?;
        if let Some(v) = data.iter().find(|v| !v.is_finite()) {
            let kept = if path.exists() {
                format!("the last good checkpoint is {}", path.display())
            } else {
                "no checkpoint was written".to_string()
            };
            return Err(Error::Graph(format!(
                "'{name}' holds {v} after step {step}; stopped without saving: {kept}"
            )));
        }
        ck.tensors.insert(
            name.to_string(),
            HostTensor {
                shape: t.shape.clone(),
                data,
            },
        );
    }
    ck.metadata.insert(CONFIG_KEY.into(), config.to_string());
    ck.metadata.insert(STEP_KEY.into(), step.to_string());
    ck.save(path)
}

/// The tensors `names` of `store` read back to the host (parameters without the optimizer's
/// moments, for example).
pub fn tensors<'a>(
    store: &ParamStore,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<Checkpoint> {
    let mut ck = Checkpoint::default();
    for name in names {
        let t = store
            .get(name)
            .ok_or_else(|| Error::Config(format!("no tensor '{name}' in the parameter store")))?;
        ck.tensors.insert(
            name.clone(),
            HostTensor {
                shape: t.shape.clone(),
                data: t.read_f32()?,
            },
        );
    }
    Ok(ck)
}

/// Loads a training checkpoint into `store`; returns (config, step). Checkpoints without
/// metadata (converted official weights) give `Value::Null` and step 0.
pub fn load(
    gpu: &Arc<Gpu>,
    path: &Path,
    store: &mut ParamStore,
) -> Result<(serde_json::Value, u64)> {
    let ck = Checkpoint::load(path)?;
    crate::models::upload(gpu, &ck, store)?;
    let config = match ck.metadata.get(CONFIG_KEY) {
        Some(s) => serde_json::from_str(s).map_err(|e| {
            Error::Config(format!(
                "{}: metadata '{CONFIG_KEY}' is not JSON: {e}",
                path.display()
            ))
        })?,
        None => serde_json::Value::Null,
    };
    let step = match ck.metadata.get(STEP_KEY) {
        Some(s) => s.parse().map_err(|e| {
            Error::Config(format!(
                "{}: metadata '{STEP_KEY}' is not a number: {e}",
                path.display()
            ))
        })?,
        None => 0,
    };
    Ok((config, step))
}

/// Names grouped by their first component (`visual`, `image_mlp`, ...), for summaries.
pub fn summary(store: &ParamStore) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for name in store.names() {
        let head = name.split('.').next().unwrap_or(name).to_string();
        *m.entry(head).or_insert(0) += store.get(name).map_or(0, |t| t.numel());
    }
    m
}
