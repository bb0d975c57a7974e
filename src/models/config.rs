//! The architecture of a checkpoint: the model configuration a run stores in its metadata,
//! or, for converted official checkpoints without one, the shapes of its tensors.

use serde::{Deserialize, Serialize};

use super::stablerep::{HeadConfig, PlusConfig};
use super::text::TextConfig;
use super::vit::{self, VitConfig};
use crate::error::{Error, Result};
use crate::nn::checkpoint::{Checkpoint, CONFIG_KEY};

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
    let Some(s) = ck.metadata.get(CONFIG_KEY) else {
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
                    CONFIG_KEY
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_stored_config_is_an_error_not_a_guess() {
        let mut ck = Checkpoint::default();
        ck.metadata.insert(
            CONFIG_KEY.into(),
            r#"{"model": {"vit": {"width": "wide"}}}"#.into(),
        );
        let e = vit_config(&ck, 64).unwrap_err().to_string();
        assert!(
            e.contains("stored model config") && e.contains("malformed"),
            "{e}"
        );
        // No `model` entry: nothing stored, so shapes are inferred (here: no tensors).
        ck.metadata
            .insert(CONFIG_KEY.into(), r#"{"supervised": {}}"#.into());
        assert!(stored_config(&ck).unwrap().is_none());
    }
}
