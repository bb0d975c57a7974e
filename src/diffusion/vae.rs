//! Stable Diffusion's `AutoencoderKL` from its `vae/config.json`, with diffusers' parameter
//! names: the encoder (image -> posterior moments after `quant_conv`) and the decoder
//! (`post_quant_conv`, then latent -> image in [-1, 1]). Legacy attention names
//! (`query`/`key`/`value`/`proj_attn`, possibly 1x1-conv shaped) are renamed by
//! [`rename_legacy_attention`].

use serde::Deserialize;

use super::blocks::{attention, conv, linear, resnet_block, Resnet};
use super::split::{self, Parts};
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::nn::checkpoint::Checkpoint;

/// The fields of `AutoencoderKL`'s config that SD uses.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_channels: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Channels per level (128, 256, 512, 512).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// GroupNorm groups (32).
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding and divided before decoding (0.18215).
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
}

fn sd_scale() -> f64 {
    0.18215
}

/// GroupNorm epsilon everywhere in the VAE.
const EPS: f32 = 1e-6;

impl VaeConfig {
    /// Parses `vae/config.json`; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<VaeConfig> {
        let c: VaeConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: not a VAE config: {e}")))?;
        super::check_sizes(
            origin,
            &[
                ("in_channels", c.in_channels, 64),
                ("out_channels", c.out_channels, 64),
                ("latent_channels", c.latent_channels, 1024),
                ("layers_per_block", c.layers_per_block, 16),
                ("norm_num_groups", c.norm_num_groups, 1024),
            ],
        )?;
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            super::check_sizes(origin, &[(&format!("block_out_channels[{i}]"), ch, 16384)])?;
        }
        if !(c.scaling_factor.is_finite() && c.scaling_factor > 0.0) {
            return Err(Error::Config(format!(
                "{origin}: scaling_factor must be positive, got {}",
                c.scaling_factor
            )));
        }
        if c.block_out_channels.is_empty()
            || c.block_out_channels.len() > 8
            || c.block_out_channels
                .iter()
                .any(|&ch| ch == 0 || !ch.is_multiple_of(c.norm_num_groups))
        {
            return Err(Error::Config(format!(
                "{origin}: block_out_channels {:?} must be 1 to 8 multiples of norm_num_groups {}",
                c.block_out_channels, c.norm_num_groups
            )));
        }
        Ok(c)
    }

    /// Image size / latent size.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn res(&self, cin: usize, cout: usize) -> Resnet {
        Resnet {
            cin,
            cout,
            temb: None,
            groups: self.norm_num_groups,
            eps: EPS,
        }
    }
}

/// The VAE's single-head spatial self-attention with a residual (`mid_block.attentions.0`).
fn vae_attention(
    g: &mut Graph,
    prefix: &str,
    x: NodeId,
    ch: usize,
    groups: usize,
) -> Result<NodeId> {
    let s = g.shape(x).to_vec();
    let (b, hw) = (s[0], s[2] * s[3]);
    let gm = g.param(&format!("{prefix}group_norm.weight"), &[ch]);
    let bt = g.param(&format!("{prefix}group_norm.bias"), &[ch]);
    let h = g.group_norm(x, gm, bt, groups, EPS, false)?;
    let h = g.reshape(h, &[b, ch, hw])?;
    let h = g.permute(h, &[0, 2, 1])?;
    let h = g.reshape(h, &[b * hw, ch])?;
    let q = linear(g, &format!("{prefix}to_q."), h, ch, ch)?;
    let k = linear(g, &format!("{prefix}to_k."), h, ch, ch)?;
    let v = linear(g, &format!("{prefix}to_v."), h, ch, ch)?;
    let o = attention(g, q, k, v, b, hw, hw, 1)?;
    let o = linear(g, &format!("{prefix}to_out.0."), o, ch, ch)?;
    let o = g.reshape(o, &[b, hw, ch])?;
    let o = g.permute(o, &[0, 2, 1])?;
    let o = g.reshape(o, &s)?;
    g.add(o, x)
}

/// The mid block: resnet, attention, resnet at `ch` channels.
fn mid_block(g: &mut Graph, c: &VaeConfig, prefix: &str, x: NodeId, ch: usize) -> Result<NodeId> {
    let x = resnet_block(
        g,
        &format!("{prefix}mid_block.resnets.0."),
        x,
        None,
        c.res(ch, ch),
    )?;
    let x = vae_attention(
        g,
        &format!("{prefix}mid_block.attentions.0."),
        x,
        ch,
        c.norm_num_groups,
    )?;
    resnet_block(
        g,
        &format!("{prefix}mid_block.resnets.1."),
        x,
        None,
        c.res(ch, ch),
    )
}

/// GroupNorm, SiLU and the output conv.
fn head(
    g: &mut Graph,
    c: &VaeConfig,
    prefix: &str,
    x: NodeId,
    ch: usize,
    out: usize,
) -> Result<NodeId> {
    let gm = g.param(&format!("{prefix}conv_norm_out.weight"), &[ch]);
    let bt = g.param(&format!("{prefix}conv_norm_out.bias"), &[ch]);
    let x = g.group_norm(x, gm, bt, c.norm_num_groups, EPS, true)?;
    conv(g, &format!("{prefix}conv_out."), x, ch, out, 3, 1)
}

/// The encoder: image [B, in_channels, H, W] (H, W multiples of the downscale) -> posterior
/// moments [B, 2 * latent_channels, H / f, W / f] (mean, then log-variance), after `quant_conv`.
pub fn encoder(g: &mut Graph, c: &VaeConfig, prefix: &str, x: NodeId) -> Result<NodeId> {
    let s = g.shape(x).to_vec();
    let f = c.downscale();
    if s.len() != 4 || s[1] != c.in_channels || !s[2].is_multiple_of(f) || !s[3].is_multiple_of(f) {
        return Err(Error::Config(format!(
            "the VAE encoder takes [B, {}, H, W] with H and W multiples of {f}, got {s:?}",
            c.in_channels
        )));
    }
    let p = |n: &str| format!("{prefix}encoder.{n}");
    let mut ch = c.block_out_channels[0];
    let mut x = conv(g, &p("conv_in."), x, c.in_channels, ch, 3, 1)?;
    let levels = c.block_out_channels.len();
    for i in 0..levels {
        let out = c.block_out_channels[i];
        for j in 0..c.layers_per_block {
            x = resnet_block(
                g,
                &p(&format!("down_blocks.{i}.resnets.{j}.")),
                x,
                None,
                c.res(ch, out),
            )?;
            ch = out;
        }
        if i + 1 < levels {
            // diffusers pads right and bottom by one, then convolves with stride 2, no padding.
            let sh = g.shape(x).to_vec();
            let padded = g.pad(x, 2, 0, sh[2] + 1)?;
            let padded = g.pad(padded, 3, 0, sh[3] + 1)?;
            let w = g.param(
                &p(&format!("down_blocks.{i}.downsamplers.0.conv.weight")),
                &[ch, ch, 3, 3],
            );
            let b = g.param(
                &p(&format!("down_blocks.{i}.downsamplers.0.conv.bias")),
                &[ch],
            );
            x = g.conv2d(padded, w, Some(b), 2, 0)?;
        }
    }
    let x = mid_block(g, c, &p(""), x, ch)?;
    let x = head(g, c, &p(""), x, ch, 2 * c.latent_channels)?;
    let m = 2 * c.latent_channels;
    conv(g, &format!("{prefix}quant_conv."), x, m, m, 1, 1)
}

/// The decoder: latent [B, latent_channels, h, w] (already divided by the scaling factor) ->
/// image [B, out_channels, h * f, w * f] in about [-1, 1]. Activations larger than the graph's
/// `max_tensor_bytes` are held as channel chunks (exact: chunks are whole GroupNorm groups).
pub fn decoder(g: &mut Graph, c: &VaeConfig, prefix: &str, z: NodeId) -> Result<NodeId> {
    let s = g.shape(z).to_vec();
    if s.len() != 4 || s[1] != c.latent_channels {
        return Err(Error::Config(format!(
            "the VAE decoder takes [B, {}, h, w], got {s:?}",
            c.latent_channels
        )));
    }
    let l = c.latent_channels;
    let z = conv(g, &format!("{prefix}post_quant_conv."), z, l, l, 1, 1)?;
    let p = |n: &str| format!("{prefix}decoder.{n}");
    let levels = c.block_out_channels.len();
    let mut ch = c.block_out_channels[levels - 1];
    let x = conv(g, &p("conv_in."), z, l, ch, 3, 1)?;
    let x = mid_block(g, c, &p(""), x, ch)?;
    // From here on tensors grow 4x per level: channel chunks keep each under one binding.
    let mut x = Parts::whole(g, x);
    for i in 0..levels {
        let out = c.block_out_channels[levels - 1 - i];
        for j in 0..=c.layers_per_block {
            let prefix = p(&format!("up_blocks.{i}.resnets.{j}."));
            x = split::resnet_block(g, &prefix, &x, c.res(ch, out))?;
            ch = out;
        }
        if i + 1 < levels {
            let prefix = p(&format!("up_blocks.{i}.upsamplers.0.conv."));
            x = split::upsample(g, &prefix, &x, c.norm_num_groups)?;
        }
    }
    let x = split::group_norm(g, &p("conv_norm_out."), &x, c.norm_num_groups, EPS, true)?;
    let out = c.out_channels;
    split::conv(g, &p("conv_out."), &x, out, 3, 1, vec![out])?.join(g)
}

/// Renames old-style VAE attention tensors (`query`, `key`, `value`, `proj_attn`, as in older
/// diffusers folders and CompVis files) to `to_q`, `to_k`, `to_v`, `to_out.0`, flattening
/// 1x1-conv weights [C, C, 1, 1] to [C, C]. Other tensors are kept.
pub fn rename_legacy_attention(ck: &mut Checkpoint) {
    let names: Vec<String> = ck.tensors.keys().cloned().collect();
    for name in names {
        let renamed = [
            (".query.", ".to_q."),
            (".key.", ".to_k."),
            (".value.", ".to_v."),
            (".proj_attn.", ".to_out.0."),
        ]
        .iter()
        .find(|(old, _)| name.contains(old))
        .map(|(old, new)| name.replace(old, new));
        if let Some(new) = renamed {
            let mut t = ck.tensors.remove(&name).expect("listed above");
            if t.shape.len() == 4 && t.shape[2] == 1 && t.shape[3] == 1 {
                t.shape.truncate(2);
            }
            ck.tensors.insert(new, t);
        }
    }
}
