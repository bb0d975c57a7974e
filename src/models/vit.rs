//! Vision Transformer encoder with timm's layout and parameter names (as in the official
//! StableRep checkpoints, under `visual.`): patch embedding, CLS token, learned absolute
//! position embedding, pre-norm blocks with a fused qkv laid out [3][heads][head_dim], erf
//! GELU MLP, LayerNorm eps 1e-6, feature = CLS token after the final norm.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, NodeId, ParamStore};
use crate::models::transformer::{self, VIT_BLOCK};
use crate::nn::checkpoint::Checkpoint;

/// How the encoder turns an image into tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// timm's patch embedding: one p x p convolution at stride p (`patch_embed.proj`).
    #[default]
    Patch,
    /// A convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see
    /// better"): log2(p) 3 x 3 convolutions at stride 2, each followed by GroupNorm (8 groups)
    /// and SiLU, with [`STEM_GROUPS`]-aligned channels width/4 doubling per layer, then a 1 x 1
    /// convolution to the width. Parameters are named as the `nn.Sequential` that replaces
    /// timm's `patch_embed.proj`: `patch_embed.proj.{3i}` (convolution i), `.{3i + 1}` (its
    /// norm) and `.{3k}` (the 1 x 1).
    Conv,
}

/// GroupNorm groups in the convolutional stem.
pub const STEM_GROUPS: usize = 8;

/// ViT hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    /// Input resolution (square).
    pub img_size: usize,
    /// Patch size.
    pub patch: usize,
    /// Width.
    pub width: usize,
    /// Blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp: usize,
    /// Patch embedding or convolutional stem (configs written before the stem existed read
    /// as the patch embedding).
    #[serde(default)]
    pub stem: Stem,
}

impl VitConfig {
    /// Output channels of the convolutional stem's 3 x 3 layers (empty for the patch
    /// embedding): max(width / 4, 8), doubling per layer, log2(patch) layers.
    pub fn stem_channels(&self) -> Vec<usize> {
        match self.stem {
            Stem::Patch => Vec::new(),
            Stem::Conv => {
                let layers = self.patch.max(1).trailing_zeros() as usize;
                let first = (self.width / 4).max(STEM_GROUPS);
                (0..layers).map(|i| first << i).collect()
            }
        }
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.img_size / self.patch).pow(2)
    }

    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        if self.patch == 0 || !self.img_size.is_multiple_of(self.patch) {
            return Err(Error::Config(format!(
                "image size {} (--img-size) is not a multiple of patch size {} (--patch)",
                self.img_size, self.patch
            )));
        }
        if self.stem == Stem::Conv {
            if self.patch < 2 || !self.patch.is_power_of_two() {
                return Err(Error::Config(format!(
                    "the convolutional stem (--stem conv) needs a patch size (--patch) that is a \
                     power of two, at least 2; got {}",
                    self.patch
                )));
            }
            if !(self.width / 4)
                .max(STEM_GROUPS)
                .is_multiple_of(STEM_GROUPS)
            {
                return Err(Error::Config(format!(
                    "the convolutional stem (--stem conv) needs a width (--width) under 32 or \
                     whose quarter is a multiple of {STEM_GROUPS} (its GroupNorm groups); got {}",
                    self.width
                )));
            }
        }
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(Error::Config(format!(
                "width {} (--width) is not divisible by {} heads (--heads)",
                self.width, self.heads
            )));
        }
        Ok(())
    }

    /// Every parameter name (with `prefix`) and shape, in timm order.
    pub fn param_shapes(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let (d, p) = (self.width, self.patch);
        let mut v = vec![
            (format!("{prefix}cls_token"), vec![1, 1, d]),
            (format!("{prefix}pos_embed"), vec![1, self.patches() + 1, d]),
        ];
        match self.stem {
            Stem::Patch => {
                v.push((format!("{prefix}patch_embed.proj.weight"), vec![d, 3, p, p]));
                v.push((format!("{prefix}patch_embed.proj.bias"), vec![d]));
            }
            Stem::Conv => {
                let mut cin = 3;
                let channels = self.stem_channels();
                for (i, &c) in channels.iter().enumerate() {
                    let (conv, norm) = (3 * i, 3 * i + 1);
                    let pe = format!("{prefix}patch_embed.proj");
                    v.push((format!("{pe}.{conv}.weight"), vec![c, cin, 3, 3]));
                    v.push((format!("{pe}.{conv}.bias"), vec![c]));
                    v.push((format!("{pe}.{norm}.weight"), vec![c]));
                    v.push((format!("{pe}.{norm}.bias"), vec![c]));
                    cin = c;
                }
                let last = 3 * channels.len();
                v.push((
                    format!("{prefix}patch_embed.proj.{last}.weight"),
                    vec![d, cin, 1, 1],
                ));
                v.push((format!("{prefix}patch_embed.proj.{last}.bias"), vec![d]));
            }
        }
        for l in 0..self.depth {
            v.extend(transformer::param_shapes(
                &VIT_BLOCK,
                &format!("{prefix}blocks.{l}."),
                d,
                self.mlp,
            ));
        }
        v.push((format!("{prefix}norm.weight"), vec![d]));
        v.push((format!("{prefix}norm.bias"), vec![d]));
        v
    }
}

/// LayerNorm epsilon used throughout timm's ViT.
pub const LN_EPS: f32 = 1e-6;

/// One timm ViT block over x [batch * tokens, width]; parameters named `{prefix}...` as timm's
/// `blocks.{l}.` (see [`transformer::block`]).
pub fn block(
    g: &mut Graph,
    prefix: &str,
    x: NodeId,
    batch: usize,
    tokens: usize,
    heads: usize,
    mlp: usize,
) -> Result<NodeId> {
    transformer::block(g, &VIT_BLOCK, prefix, x, batch, tokens, heads, mlp)
}

/// The encoder: images [batch, 3, H, W] (normalized) -> CLS features [batch, width].
/// Parameters are named `{prefix}...` with timm's names (prefix `visual.` for StableRep).
pub fn encoder(g: &mut Graph, cfg: &VitConfig, prefix: &str, images: NodeId) -> Result<NodeId> {
    cfg.validate()?;
    let s = g.shape(images).to_vec();
    if s.len() != 4 || s[1] != 3 || s[2] != cfg.img_size || s[3] != cfg.img_size {
        return Err(Error::shape(
            "vit",
            format!(
                "images must be [batch, 3, {0}, {0}], got {s:?}",
                cfg.img_size
            ),
        ));
    }
    let (b, d, p) = (s[0], cfg.width, cfg.patch);
    let gp = cfg.img_size / p;
    let t = cfg.patches();
    let x = match cfg.stem {
        Stem::Patch => {
            // Patch embedding as a matmul: [B, 3, gp, p, gp, p] -> [B, gp, gp, 3, p, p] ->
            // [B*T, 3*p*p].
            let x = g.reshape(images, &[b, 3, gp, p, gp, p])?;
            let x = g.permute(x, &[0, 2, 4, 1, 3, 5])?;
            let x = g.reshape(x, &[b * t, 3 * p * p])?;
            let w = g.param(&format!("{prefix}patch_embed.proj.weight"), &[d, 3, p, p]);
            let w = g.reshape(w, &[d, 3 * p * p])?;
            let bias = g.param(&format!("{prefix}patch_embed.proj.bias"), &[d]);
            let x = g.matmul_t(x, w, false, true)?;
            g.add(x, bias)?
        }
        Stem::Conv => {
            let pe = format!("{prefix}patch_embed.proj");
            let mut h = images;
            let mut cin = 3;
            let channels = cfg.stem_channels();
            for (i, &c) in channels.iter().enumerate() {
                let (conv, norm) = (3 * i, 3 * i + 1);
                let w = g.param(&format!("{pe}.{conv}.weight"), &[c, cin, 3, 3]);
                let bias = g.param(&format!("{pe}.{conv}.bias"), &[c]);
                h = g.conv2d(h, w, Some(bias), 2, 1)?;
                let nw = g.param(&format!("{pe}.{norm}.weight"), &[c]);
                let nb = g.param(&format!("{pe}.{norm}.bias"), &[c]);
                h = g.group_norm(h, nw, nb, STEM_GROUPS, 1e-5, true)?;
                cin = c;
            }
            // The 1 x 1 convolution as a matmul over the grid's positions:
            // [B, C, gp, gp] -> [B, gp, gp, C] -> [B*T, C].
            let last = 3 * channels.len();
            let x = g.permute(h, &[0, 2, 3, 1])?;
            let x = g.reshape(x, &[b * t, cin])?;
            let w = g.param(&format!("{pe}.{last}.weight"), &[d, cin, 1, 1]);
            let w = g.reshape(w, &[d, cin])?;
            let bias = g.param(&format!("{pe}.{last}.bias"), &[d]);
            let x = g.matmul_t(x, w, false, true)?;
            g.add(x, bias)?
        }
    };
    let x = g.reshape(x, &[b, t, d])?;
    let cls = g.param(&format!("{prefix}cls_token"), &[1, 1, d]);
    let cls = g.expand(cls, &[b, 1, d])?;
    let x = g.concat(&[cls, x], 1)?;
    let pos = g.param(&format!("{prefix}pos_embed"), &[1, t + 1, d]);
    let x = g.add(x, pos)?;
    let mut x = g.reshape(x, &[b * (t + 1), d])?;
    for l in 0..cfg.depth {
        x = block(
            g,
            &format!("{prefix}blocks.{l}."),
            x,
            b,
            t + 1,
            cfg.heads,
            cfg.mlp,
        )?;
    }
    let nw = g.param(&format!("{prefix}norm.weight"), &[d]);
    let nb = g.param(&format!("{prefix}norm.bias"), &[d]);
    let x = g.layer_norm(x, nw, nb, LN_EPS)?;
    let x = g.reshape(x, &[b, t + 1, d])?;
    let x = g.slice(x, 1, 0, 1)?;
    g.reshape(x, &[b, d])
}

/// Infers the configuration from a checkpoint's tensor shapes (head dimension 64 as in every
/// timm ViT size unless `head_dim` says otherwise), for checkpoints without metadata.
pub fn infer_config(ckpt: &Checkpoint, prefix: &str, head_dim: usize) -> Result<VitConfig> {
    // A convolutional stem's layers are `patch_embed.proj.{3i}` (3 x 3) and the 1 x 1 last.
    let conv_layers = (0..)
        .take_while(|i| {
            ckpt.tensors
                .get(&format!("{prefix}patch_embed.proj.{}.weight", 3 * i))
                .is_some_and(|t| t.shape.len() == 4 && t.shape[2] == 3)
        })
        .count();
    let (pe, stem) = if ckpt
        .tensors
        .contains_key(&format!("{prefix}patch_embed.proj.weight"))
        || conv_layers == 0
    {
        (
            ckpt.get(&format!("{prefix}patch_embed.proj.weight"), None)?,
            Stem::Patch,
        )
    } else {
        (
            ckpt.get(
                &format!("{prefix}patch_embed.proj.{}.weight", 3 * conv_layers),
                None,
            )?,
            Stem::Conv,
        )
    };
    let pos = ckpt.get(&format!("{prefix}pos_embed"), None)?;
    let fc1 = ckpt.get(&format!("{prefix}blocks.0.mlp.fc1.weight"), None)?;
    if pe.shape.len() != 4 || pos.shape.len() != 3 {
        return Err(Error::Config(
            "unexpected patch or position embedding shape".into(),
        ));
    }
    if head_dim == 0 {
        return Err(Error::Config(
            "--head-dim must be at least 1 (64 in every timm ViT size)".into(),
        ));
    }
    let (width, patch) = match stem {
        Stem::Patch => (pe.shape[0], pe.shape[2]),
        Stem::Conv => (pe.shape[0], 1usize << conv_layers.min(16)),
    };
    if pos.shape[1] < 2 || width == 0 || patch == 0 {
        return Err(Error::Config(format!(
            "{prefix}pos_embed {:?} and patch_embed {:?}: want a class token and at least one patch",
            pos.shape, pe.shape
        )));
    }
    if !width.is_multiple_of(head_dim) {
        return Err(Error::Config(format!(
            "width {width} is not a multiple of --head-dim {head_dim}"
        )));
    }
    let tokens = pos.shape[1] - 1;
    let side = (tokens as f64).sqrt().round() as usize;
    if side * side != tokens {
        return Err(Error::Config(format!(
            "{tokens} position embeddings do not form a square grid"
        )));
    }
    let depth = (0..)
        .take_while(|l| {
            ckpt.tensors
                .contains_key(&format!("{prefix}blocks.{l}.attn.qkv.weight"))
        })
        .count();
    let cfg = VitConfig {
        img_size: side * patch,
        patch,
        width,
        depth,
        heads: width / head_dim,
        mlp: fc1.shape[0],
        stem,
    };
    if stem == Stem::Conv {
        // Another implementation's convolutional stem (BatchNorm, other widths) must not load
        // as this one.
        let pe = format!("{prefix}patch_embed.proj");
        let mut cin = 3;
        for (i, &c) in cfg.stem_channels().iter().enumerate() {
            let w = &ckpt.tensors[&format!("{pe}.{}.weight", 3 * i)];
            if w.shape != [c, cin, 3, 3]
                || ckpt
                    .tensors
                    .contains_key(&format!("{pe}.{}.running_mean", 3 * i + 1))
            {
                return Err(Error::Config(format!(
                    "{pe}.{}.weight {:?}: not this engine's convolutional stem (3 x 3 \
                     convolutions of [{c}, {cin}, 3, 3] at this width, each followed by a \
                     GroupNorm)",
                    3 * i,
                    w.shape
                )));
            }
            cin = c;
        }
        cfg.validate()?;
    }
    Ok(cfg)
}

/// Uploads every encoder parameter from `ckpt` into `store`, checking names and shapes.
pub fn load_params(
    gpu: &Arc<Gpu>,
    cfg: &VitConfig,
    prefix: &str,
    ckpt: &Checkpoint,
    store: &mut ParamStore,
) -> Result<()> {
    let shapes = cfg.param_shapes(prefix);
    let mut list = Vec::with_capacity(shapes.len());
    for (name, shape) in &shapes {
        list.push((
            name.as_str(),
            &shape[..],
            &ckpt.get(name, Some(shape))?.data[..],
        ));
    }
    store.set_all(gpu, list)
}
