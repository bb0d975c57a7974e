//! Single-file CompVis / LDM checkpoints (`v1-5-pruned-emaonly.safetensors` and the like): one
//! safetensors file holding the UNet under `model.diffusion_model.`, the VAE under
//! `first_stage_model.` and the CLIP text encoder under `cond_stage_model.transformer.`.
//! The UNet and VAE names are mapped to diffusers' (shared/spec section 2.3; the table was
//! checked against diffusers' own converters by `tools/make_sd_fixtures.py`); DDPM buffers and
//! `model_ema.*` copies are ignored. A file without configs uses SD 1.5's, shipped in
//! `assets/sd15/`.

use crate::error::{Error, Result};
use crate::nn::checkpoint::{Checkpoint, HostTensor};

/// The UNet tensors' prefix in a single file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The VAE tensors' prefix.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// The text encoder tensors' prefix (the rest is transformers' name).
pub const TEXT_PREFIX: &str = "cond_stage_model.transformer.";

/// SD 1.5's `unet/config.json`.
pub const SD15_UNET: &str = include_str!("../../assets/sd15/unet/config.json");
/// SD 1.5's `vae/config.json`.
pub const SD15_VAE: &str = include_str!("../../assets/sd15/vae/config.json");
/// SD 1.5's `text_encoder/config.json`.
pub const SD15_TEXT: &str = include_str!("../../assets/sd15/text_encoder/config.json");

/// Whether a checkpoint looks like a single-file SD checkpoint (has UNet tensors).
pub fn is_single_file(ck: &Checkpoint) -> bool {
    ck.tensors.keys().any(|k| k.starts_with(UNET_PREFIX))
}

/// A UNet resnet's inner LDM name -> diffusers'.
fn resnet_name(rest: &str) -> Option<String> {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    MAP.iter()
        .find_map(|(a, b)| rest.strip_prefix(a).map(|r| format!("{b}{r}")))
}

/// Splits `"12.0.rest"` into (12, 0, "rest").
fn two_indices(s: &str) -> Option<(usize, usize, &str)> {
    let (a, s) = s.split_once('.')?;
    let (b, rest) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?, rest))
}

/// One UNet tensor name (without the prefix), LDM -> diffusers, for `layers` resnets per
/// down block. `None` when the name is not part of an SD 1.x UNet.
pub fn unet_name(name: &str, layers: usize) -> Option<String> {
    let per = layers + 1;
    if let Some(r) = name.strip_prefix("time_embed.0.") {
        return Some(format!("time_embedding.linear_1.{r}"));
    }
    if let Some(r) = name.strip_prefix("time_embed.2.") {
        return Some(format!("time_embedding.linear_2.{r}"));
    }
    if let Some(r) = name.strip_prefix("out.0.") {
        return Some(format!("conv_norm_out.{r}"));
    }
    if let Some(r) = name.strip_prefix("out.2.") {
        return Some(format!("conv_out.{r}"));
    }
    if let Some(s) = name.strip_prefix("input_blocks.") {
        let (idx, slot, rest) = two_indices(s)?;
        if idx == 0 {
            return (slot == 0).then(|| format!("conv_in.{rest}"));
        }
        let (l, j) = ((idx - 1) / per, (idx - 1) % per);
        return match (j == layers, slot) {
            (true, 0) => rest
                .strip_prefix("op.")
                .map(|r| format!("down_blocks.{l}.downsamplers.0.conv.{r}")),
            (false, 0) => Some(format!(
                "down_blocks.{l}.resnets.{j}.{}",
                resnet_name(rest)?
            )),
            (false, 1) => Some(format!("down_blocks.{l}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    if let Some(s) = name.strip_prefix("middle_block.") {
        let (slot, rest) = s.split_once('.')?;
        return match slot {
            "0" => Some(format!("mid_block.resnets.0.{}", resnet_name(rest)?)),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", resnet_name(rest)?)),
            _ => None,
        };
    }
    if let Some(s) = name.strip_prefix("output_blocks.") {
        let (idx, slot, rest) = two_indices(s)?;
        let (l, j) = (idx / per, idx % per);
        // The upsampler follows the last resnet (and its attention, if the level has one).
        if slot > 0 && j == layers {
            if let Some(r) = rest.strip_prefix("conv.") {
                return Some(format!("up_blocks.{l}.upsamplers.0.conv.{r}"));
            }
        }
        return match slot {
            0 => Some(format!("up_blocks.{l}.resnets.{j}.{}", resnet_name(rest)?)),
            1 => Some(format!("up_blocks.{l}.attentions.{j}.{rest}")),
            _ => None,
        };
    }
    None
}

/// One VAE tensor name (without the prefix), LDM -> diffusers, for `levels` levels (the
/// decoder's levels are numbered the other way round). `None` when not an SD VAE name.
pub fn vae_name(name: &str, levels: usize) -> Option<String> {
    let (side, rest) = name.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| name.to_string());
    }
    let inner = |r: &str| r.replace("nin_shortcut.", "conv_shortcut.");
    let level = |kind: &str, i: usize| match kind {
        "down" => Some(i),
        _ => levels.checked_sub(i + 1),
    };
    for kind in ["down", "up"] {
        if let Some(s) = rest.strip_prefix(&format!("{kind}.")) {
            let (i, s) = s.split_once('.')?;
            let l = level(kind, i.parse().ok()?)?;
            if let Some(s) = s.strip_prefix("block.") {
                let (j, r) = s.split_once('.')?;
                let j: usize = j.parse().ok()?;
                return Some(format!("{side}.{kind}_blocks.{l}.resnets.{j}.{}", inner(r)));
            }
            let r = s.strip_prefix(&format!("{kind}sample.conv."))?;
            return Some(format!(
                "{side}.{kind}_blocks.{l}.{kind}samplers.0.conv.{r}"
            ));
        }
    }
    if let Some(s) = rest.strip_prefix("mid.") {
        for (old, new) in [("block_1.", "resnets.0."), ("block_2.", "resnets.1.")] {
            if let Some(r) = s.strip_prefix(old) {
                return Some(format!("{side}.mid_block.{new}{}", inner(r)));
            }
        }
        let r = s.strip_prefix("attn_1.")?;
        for (old, new) in [
            ("norm.", "group_norm."),
            ("q.", "to_q."),
            ("k.", "to_k."),
            ("v.", "to_v."),
            ("proj_out.", "to_out.0."),
        ] {
            if let Some(r) = r.strip_prefix(old) {
                return Some(format!("{side}.mid_block.attentions.0.{new}{r}"));
            }
        }
        return None;
    }
    if let Some(r) = rest.strip_prefix("norm_out.") {
        return Some(format!("{side}.conv_norm_out.{r}"));
    }
    for keep in ["conv_in.", "conv_out."] {
        if rest.starts_with(keep) {
            return Some(name.to_string());
        }
    }
    None
}

/// The three components of a single file, each under diffusers' names (the text encoder keeps
/// transformers' names after the prefix). `unet_layers` and `vae_levels` come from the configs.
pub struct Split {
    /// UNet tensors.
    pub unet: Checkpoint,
    /// VAE tensors (attention projections may still be 1x1-conv shaped).
    pub vae: Checkpoint,
    /// Text encoder tensors.
    pub text: Checkpoint,
}

/// Splits and renames a single-file checkpoint. A UNet or VAE tensor whose name is not part of
/// SD 1.x's layout is an error that names it (an SDXL or SD 2 file, most likely).
pub fn split(ck: Checkpoint, unet_layers: usize, vae_levels: usize, origin: &str) -> Result<Split> {
    let mut out = Split {
        unet: Checkpoint::default(),
        vae: Checkpoint::default(),
        text: Checkpoint::default(),
    };
    let unknown = |name: &str| {
        Error::Config(format!(
            "{origin}: tensor '{name}' is not part of a Stable Diffusion 1.x checkpoint \
             (is this an SD 2 or SDXL file?)"
        ))
    };
    for (name, t) in ck.tensors {
        // Each renamed tensor keeps the note of whether its file stored it as f16.
        let half = ck.f16_names.contains(&name);
        let put = |c: &mut Checkpoint, n: String, t: HostTensor| {
            if half {
                c.f16_names.insert(n.clone());
            }
            c.tensors.insert(n, t);
        };
        if let Some(r) = name.strip_prefix(UNET_PREFIX) {
            let n = unet_name(r, unet_layers).ok_or_else(|| unknown(&name))?;
            put(&mut out.unet, n, t);
        } else if let Some(r) = name.strip_prefix(VAE_PREFIX) {
            let n = vae_name(r, vae_levels).ok_or_else(|| unknown(&name))?;
            let mut t = t;
            // CompVis stores the mid-block attention projections as 1x1 convolutions.
            if n.contains(".attentions.0.to_") && t.shape.len() == 4 && t.shape[2..] == [1, 1] {
                t.shape.truncate(2);
            }
            put(&mut out.vae, n, t);
        } else if let Some(r) = name.strip_prefix(TEXT_PREFIX) {
            put(&mut out.text, r.to_string(), t);
        }
    }
    for (what, c, prefix) in [
        ("UNet", &out.unet, UNET_PREFIX),
        ("VAE", &out.vae, VAE_PREFIX),
        ("text encoder", &out.text, TEXT_PREFIX),
    ] {
        if c.tensors.is_empty() {
            return Err(Error::Config(format!(
                "{origin}: no {what} tensors (nothing under '{prefix}')"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_the_spec_table() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.4.0.in_layers.2.weight",
                "down_blocks.1.resnets.0.conv1.weight",
            ),
            (
                "input_blocks.5.1.proj_in.weight",
                "down_blocks.1.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.9.0.op.weight",
                "down_blocks.2.downsamplers.0.conv.weight",
            ),
            (
                "middle_block.2.skip_connection.bias",
                "mid_block.resnets.1.conv_shortcut.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_name(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(unet_name("label_emb.0.0.weight", 2), None);
    }

    #[test]
    fn vae_decoder_levels_are_reversed() {
        assert_eq!(
            vae_name("decoder.up.0.block.1.nin_shortcut.weight", 4).as_deref(),
            Some("decoder.up_blocks.3.resnets.1.conv_shortcut.weight")
        );
        assert_eq!(
            vae_name("decoder.up.3.upsample.conv.bias", 4).as_deref(),
            Some("decoder.up_blocks.0.upsamplers.0.conv.bias")
        );
        assert_eq!(
            vae_name("encoder.mid.attn_1.proj_out.weight", 4).as_deref(),
            Some("encoder.mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(vae_name("decoder.up.4.block.0.conv1.weight", 4), None);
    }
}
