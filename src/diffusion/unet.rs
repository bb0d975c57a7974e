//! Stable Diffusion 1.x's `UNet2DConditionModel`, built from its `unet/config.json` with
//! diffusers' parameter names: sinusoidal time features (computed on the host, see
//! [`super::blocks::timestep_features`]) through the time MLP, `conv_in`, down blocks
//! (`CrossAttnDownBlock2D` / `DownBlock2D`) whose outputs are kept as skips, the cross-attention
//! mid block, up blocks consuming the skips last-in first-out (`cat([x, skip])` on channels),
//! and GroupNorm + SiLU + `conv_out`.

use serde::Deserialize;

use super::blocks::{
    conv, linear, resnet_block, spatial_transformer, upsample, Resnet, SpatialTransformer,
};
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::kernels::elementwise::UnaryOp;

/// An int or a per-block list in `config.json`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    One(usize),
    /// One value per down block.
    List(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            // An empty list is refused by `UNetConfig::from_json`; 0 heads fail there too.
            PerBlock::List(v) => v
                .get(i.min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0),
        }
    }
}

/// The fields of `UNet2DConditionModel`'s config that SD 1.x uses.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in (4).
    pub in_channels: usize,
    /// Latent channels out (4).
    pub out_channels: usize,
    /// Channels per level (320, 640, 1280, 1280).
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D` per level (deepest first).
    pub up_block_types: Vec<String>,
    /// diffusers' name for the number of heads in SD 1.x.
    pub attention_head_dim: PerBlock,
    /// Heads, when the config names them explicitly (wins over `attention_head_dim`).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Width of the text states (768).
    pub cross_attention_dim: usize,
    /// GroupNorm groups (32).
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of the resnets and the output norm.
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    /// Sinusoid order (true: cos first).
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift (0).
    #[serde(default)]
    pub freq_shift: f64,
    /// SD 2.x's linear projections in the transformers (not supported yet).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Extra conditioning (not supported).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Latent side the model was trained at (64 for SD 1.x), when the config says.
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Extra conditioning (not supported).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
}

fn eps5() -> f64 {
    1e-5
}

fn yes() -> bool {
    true
}

impl UNetConfig {
    /// Parses `unet/config.json`; `origin` names it in errors. Rejects what the builder does
    /// not implement, by name.
    pub fn from_json(text: &str, origin: &str) -> Result<UNetConfig> {
        let c: UNetConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: not a UNet config: {e}")))?;
        let bad = |what: String| Err(Error::Config(format!("{origin}: {what}")));
        super::check_sizes(
            origin,
            &[
                ("in_channels", c.in_channels, 1024),
                ("out_channels", c.out_channels, 1024),
                ("layers_per_block", c.layers_per_block, 16),
                ("cross_attention_dim", c.cross_attention_dim, 16384),
                ("norm_num_groups", c.norm_num_groups, 1024),
            ],
        )?;
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            super::check_sizes(origin, &[(&format!("block_out_channels[{i}]"), ch, 16384)])?;
        }
        let n = c.block_out_channels.len();
        if n > 8 {
            return bad(format!(
                "{n} block_out_channels: at most 8 levels are supported (SD uses 4)"
            ));
        }
        for (name, v) in [
            ("attention_head_dim", Some(&c.attention_head_dim)),
            ("num_attention_heads", c.num_attention_heads.as_ref()),
        ] {
            if let Some(PerBlock::List(l)) = v {
                if l.len() != n {
                    return bad(format!(
                        "{name} lists {} values for {n} blocks (want one per block)",
                        l.len()
                    ));
                }
            }
        }
        if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
            return bad(format!(
                "{n} block_out_channels, {} down and {} up block types (must agree)",
                c.down_block_types.len(),
                c.up_block_types.len()
            ));
        }
        for t in c.down_block_types.iter().chain(&c.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return bad(format!("block type '{t}' is not supported"));
            }
        }
        if c.use_linear_projection {
            return bad("use_linear_projection (SD 2.x) is not supported yet".into());
        }
        if c.class_embed_type.is_some() || c.addition_embed_type.is_some() {
            return bad("class or addition embeddings are not supported".into());
        }
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            let heads = c.heads(i);
            if ch == 0
                || !ch.is_multiple_of(c.norm_num_groups)
                || heads == 0
                || !ch.is_multiple_of(heads)
            {
                return bad(format!(
                    "block {i}: {ch} channels do not divide into {} groups and {heads} heads",
                    c.norm_num_groups
                ));
            }
        }
        Ok(c)
    }

    /// Attention heads of level `i`.
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }
}

/// Graph inputs of the UNet.
#[derive(Clone, Copy, Debug)]
pub struct UNetInputs {
    /// The (scaled) latent [B, in_channels, H, W].
    pub sample: NodeId,
    /// Sinusoidal time features [B, block_out_channels[0]].
    pub time: NodeId,
    /// Text states [B * tokens, cross_attention_dim].
    pub context: NodeId,
}

/// The UNet for `batch` latents of `h` x `w` (divisible by 2^(levels - 1)) and `tokens` text
/// states each: returns the noise prediction [B, out_channels, h, w] and the inputs.
/// Parameters are read under `prefix` with diffusers' names.
pub fn unet(
    g: &mut Graph,
    c: &UNetConfig,
    prefix: &str,
    batch: usize,
    h: usize,
    w: usize,
    tokens: usize,
) -> Result<(NodeId, UNetInputs)> {
    let sample = g.input(&format!("{prefix}sample"), &[batch, c.in_channels, h, w]);
    unet_on(g, c, prefix, sample, tokens)
}

/// [`unet`] on a computed `sample` [B, in_channels, h, w] (for example the sampler's scaled
/// latent); `UNetInputs::sample` is then that node.
pub fn unet_on(
    g: &mut Graph,
    c: &UNetConfig,
    prefix: &str,
    sample: NodeId,
    tokens: usize,
) -> Result<(NodeId, UNetInputs)> {
    let batch = g.shape(sample).first().copied().unwrap_or(0);
    let context = g.input(
        &format!("{prefix}context"),
        &[batch * tokens, c.cross_attention_dim],
    );
    unet_conditioned(g, c, prefix, sample, context)
}

/// [`unet_on`] with computed text states `context` [B * tokens, cross_attention_dim] (the
/// text encoder's output when both are trained together).
pub fn unet_conditioned(
    g: &mut Graph,
    c: &UNetConfig,
    prefix: &str,
    sample: NodeId,
    context: NodeId,
) -> Result<(NodeId, UNetInputs)> {
    let s = g.shape(sample).to_vec();
    if s.len() != 4 || s[1] != c.in_channels {
        return Err(Error::Config(format!(
            "the UNet takes [B, {}, h, w] latents, got {s:?}",
            c.in_channels
        )));
    }
    let (batch, h, w) = (s[0], s[2], s[3]);
    let levels = c.block_out_channels.len();
    let f = 1 << (levels - 1);
    if h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
        return Err(Error::Config(format!(
            "the latent size {h}x{w} must be a multiple of {f} for a {levels}-level UNet"
        )));
    }
    let p = |n: &str| format!("{prefix}{n}");
    let ch0 = c.block_out_channels[0];
    let tdim = 4 * ch0;
    let time = g.input(&p("time"), &[batch, ch0]);
    let cs = g.shape(context).to_vec();
    if cs.len() != 2 || cs[1] != c.cross_attention_dim || cs[0] == 0 || !cs[0].is_multiple_of(batch)
    {
        return Err(Error::Config(format!(
            "the UNet's text states must be [{batch} * tokens, {}], got {cs:?}",
            c.cross_attention_dim
        )));
    }
    let tokens = cs[0] / batch;
    let t = linear(g, &p("time_embedding.linear_1."), time, ch0, tdim)?;
    let t = g.unary(UnaryOp::Silu, t)?;
    let temb = linear(g, &p("time_embedding.linear_2."), t, tdim, tdim)?;
    let eps = c.norm_eps as f32;
    let res = |cin, cout| Resnet {
        cin,
        cout,
        temb: Some(tdim),
        groups: c.norm_num_groups,
        eps,
    };
    let attn = |ch, i: usize| SpatialTransformer {
        channels: ch,
        heads: c.heads(i),
        context_dim: c.cross_attention_dim,
        groups: c.norm_num_groups,
        layers: 1,
    };
    let mut x = conv(g, &p("conv_in."), sample, c.in_channels, ch0, 3, 1)?;
    let mut skips = vec![(x, ch0)];
    let mut ch = ch0;
    for i in 0..levels {
        let out = c.block_out_channels[i];
        let cross = c.down_block_types[i].starts_with("CrossAttn");
        for j in 0..c.layers_per_block {
            x = resnet_block(
                g,
                &p(&format!("down_blocks.{i}.resnets.{j}.")),
                x,
                Some(temb),
                res(ch, out),
            )?;
            ch = out;
            if cross {
                x = spatial_transformer(
                    g,
                    &p(&format!("down_blocks.{i}.attentions.{j}.")),
                    x,
                    context,
                    tokens,
                    attn(ch, i),
                )?;
            }
            skips.push((x, ch));
        }
        if i + 1 < levels {
            x = conv(
                g,
                &p(&format!("down_blocks.{i}.downsamplers.0.conv.")),
                x,
                ch,
                ch,
                3,
                2,
            )?;
            skips.push((x, ch));
        }
    }
    x = resnet_block(g, &p("mid_block.resnets.0."), x, Some(temb), res(ch, ch))?;
    x = spatial_transformer(
        g,
        &p("mid_block.attentions.0."),
        x,
        context,
        tokens,
        attn(ch, levels - 1),
    )?;
    x = resnet_block(g, &p("mid_block.resnets.1."), x, Some(temb), res(ch, ch))?;
    for i in 0..levels {
        let level = levels - 1 - i;
        let out = c.block_out_channels[level];
        let cross = c.up_block_types[i].starts_with("CrossAttn");
        for j in 0..=c.layers_per_block {
            let (skip, sc) = skips
                .pop()
                .ok_or_else(|| Error::Graph("UNet skip stack ran out".into()))?;
            x = g.concat(&[x, skip], 1)?;
            x = resnet_block(
                g,
                &p(&format!("up_blocks.{i}.resnets.{j}.")),
                x,
                Some(temb),
                res(ch + sc, out),
            )?;
            ch = out;
            if cross {
                x = spatial_transformer(
                    g,
                    &p(&format!("up_blocks.{i}.attentions.{j}.")),
                    x,
                    context,
                    tokens,
                    attn(ch, level),
                )?;
            }
        }
        if i + 1 < levels {
            x = upsample(g, &p(&format!("up_blocks.{i}.upsamplers.0.conv.")), x, ch)?;
        }
    }
    let gm = g.param(&p("conv_norm_out.weight"), &[ch]);
    let bt = g.param(&p("conv_norm_out.bias"), &[ch]);
    let x = g.group_norm(x, gm, bt, c.norm_num_groups, eps, true)?;
    let y = conv(g, &p("conv_out."), x, ch, c.out_channels, 3, 1)?;
    Ok((
        y,
        UNetInputs {
            sample,
            time,
            context,
        },
    ))
}
