//! Training Stable Diffusion's components with the engine (for the built-in mini-world model):
//! fresh parameters by diffusers' names, the VAE's step (reconstruction + KL through the
//! reparameterized posterior), the denoiser's step (text encoder and UNet together, epsilon
//! prediction at random timesteps), and a diffusers model folder written from trained weights.

use std::path::Path;

use super::text_encoder::{self, ClipTextConfig};
use super::unet::{unet_conditioned, UNetConfig};
use super::vae::{self, VaeConfig};
use crate::error::{Error, Result};
use crate::graph::{DType, Graph, NodeId, Op};
use crate::kernels::elementwise::UnaryOp;
use crate::kernels::optim::AdamW;
use crate::nn::checkpoint::{Checkpoint, HostTensor};
use crate::util::rng::Rng;

/// Prefix of the text encoder's parameters in the denoiser's graph (the UNet has none).
pub const TEXT_PREFIX: &str = "text.";

/// Fresh values for every parameter of `g`, by name and shape as PyTorch's defaults give
/// them: conv and linear weights uniform(+-1/sqrt(fan_in)), biases 0, norm scales 1 (every
/// 1-D `*weight`), token embeddings N(0, 0.02), position embeddings N(0, 0.01).
pub fn init_params(g: &Graph, seed: u64) -> Checkpoint {
    let mut rng = Rng(seed ^ 0x0014_175D);
    let mut ck = Checkpoint::default();
    for n in &g.nodes {
        if n.op != Op::Param {
            continue;
        }
        let name = n.name.clone().unwrap_or_default();
        if ck.tensors.contains_key(&name) {
            continue;
        }
        let shape = n.shape.clone();
        let count: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("token_embedding.weight") {
            (0..count).map(|_| (0.02 * rng.normal()) as f32).collect()
        } else if name.ends_with("positional_embedding") {
            (0..count).map(|_| (0.01 * rng.normal()) as f32).collect()
        } else if shape.len() == 1 {
            let one = name.ends_with("weight");
            vec![if one { 1.0 } else { 0.0 }; count]
        } else if name.ends_with("bias") {
            vec![0.0; count]
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let b = 1.0 / (fan_in.max(1) as f64).sqrt();
            (0..count)
                .map(|_| ((2.0 * rng.unit() - 1.0) * b) as f32)
                .collect()
        };
        ck.tensors.insert(name, HostTensor { shape, data });
    }
    ck
}

/// The trainable parameters of `g`.
pub fn params(g: &Graph) -> Vec<NodeId> {
    (0..g.nodes.len())
        .map(NodeId)
        .filter(|&id| g.node(id).op == Op::Param)
        .collect()
}

/// mean((a - b)^2) as a [1] node.
fn mse(g: &mut Graph, a: NodeId, b: NodeId) -> Result<NodeId> {
    let d = g.sub(a, b)?;
    let sq = g.mul(d, d)?;
    let n = g.nodes[sq.0].numel();
    let s = g.sum_all(sq)?;
    g.affine(s, 1.0 / n as f32, 0.0)
}

/// AdamW on every parameter; no weight decay on 1-D tensors (norms, biases) and embeddings.
fn optimizer(g: &mut Graph, loss: NodeId, adamw: &AdamW) -> Result<(Vec<NodeId>, NodeId)> {
    let ps = params(g);
    let grads = g.grad(loss, &ps)?;
    let cfgs: Vec<AdamW> = ps
        .iter()
        .map(|&p| {
            let name = g.node(p).name.as_deref().unwrap_or_default();
            let mut c = *adamw;
            if g.shape(p).len() < 2 || name.contains("embedding") {
                c.weight_decay = 0.0;
            }
            c
        })
        .collect();
    let hyper = g.adamw_each(&ps, &grads, &cfgs)?;
    Ok((ps, hyper))
}

/// One VAE training step.
pub struct VaeStep {
    /// The graph (forward, backward, AdamW).
    pub graph: Graph,
    /// Images [B, 3, H, W] in [-1, 1].
    pub images: NodeId,
    /// Standard normal noise for the posterior sample [B, latent_channels, H / f, W / f].
    pub noise: NodeId,
    /// rec + kl_weight * kl ([1]).
    pub loss: NodeId,
    /// Mean squared reconstruction error ([1]).
    pub rec: NodeId,
    /// KL divergence to N(0, 1) per latent element ([1]).
    pub kl: NodeId,
    /// The posterior means [B, latent_channels, H / f, W / f] (the latents to cache).
    pub mean: NodeId,
    /// AdamW hyper input.
    pub hyper: NodeId,
    /// Trainable parameters.
    pub params: Vec<NodeId>,
}

/// The VAE's step for `batch` images of `size` pixels: encode, sample z = mean + std * noise,
/// decode, mean squared error to the input plus `kl_weight` times the KL term.
pub fn vae_step(
    c: &VaeConfig,
    batch: usize,
    size: usize,
    kl_weight: f32,
    adamw: &AdamW,
) -> Result<VaeStep> {
    let mut g = Graph::new();
    let images = g.input("images", &[batch, c.in_channels, size, size]);
    let moments = vae::encoder(&mut g, c, "", images)?;
    let l = c.latent_channels;
    let mean = g.slice(moments, 1, 0, l)?;
    let logvar = g.slice(moments, 1, l, l)?;
    let half = g.affine(logvar, 0.5, 0.0)?;
    let std = g.unary(UnaryOp::Exp, half)?;
    let lat = g.shape(mean).to_vec();
    let noise = g.input("noise", &lat);
    let spread = g.mul(std, noise)?;
    let z = g.add(mean, spread)?;
    let out = vae::decoder(&mut g, c, "", z)?;
    let rec = mse(&mut g, out, images)?;
    // KL(N(mean, var) || N(0, 1)) per element: (mean^2 + var - 1 - logvar) / 2.
    let m2 = g.mul(mean, mean)?;
    let var = g.unary(UnaryOp::Exp, logvar)?;
    let t = g.add(m2, var)?;
    let t = g.sub(t, logvar)?;
    let n = g.nodes[t.0].numel();
    let s = g.sum_all(t)?;
    let kl = g.affine(s, 0.5 / n as f32, -0.5)?;
    let weighted = g.affine(kl, kl_weight, 0.0)?;
    let loss = g.add(rec, weighted)?;
    let (params, hyper) = optimizer(&mut g, loss, adamw)?;
    Ok(VaeStep {
        graph: g,
        images,
        noise,
        loss,
        rec,
        kl,
        mean,
        hyper,
        params,
    })
}

/// One denoiser training step (text encoder and UNet).
pub struct DenoiseStep {
    /// The graph.
    pub graph: Graph,
    /// Token ids u32 [B * tokens].
    pub ids: NodeId,
    /// The embedding's backward index (`layout::embedding_index` of the ids): offsets.
    pub offsets: NodeId,
    /// The embedding's backward index: rows.
    pub rows: NodeId,
    /// Clean latents [B, C, h, w] (already multiplied by the scaling factor).
    pub latents: NodeId,
    /// The noise to predict [B, C, h, w].
    pub noise: NodeId,
    /// sqrt(alpha_bar_t) per sample [B, 1, 1, 1].
    pub signal: NodeId,
    /// sqrt(1 - alpha_bar_t) per sample [B, 1, 1, 1].
    pub sigma: NodeId,
    /// Sinusoidal features of each sample's timestep [B, block_out_channels[0]].
    pub time: NodeId,
    /// Mean squared error of the noise prediction ([1]).
    pub loss: NodeId,
    /// AdamW hyper input.
    pub hyper: NodeId,
    /// Trainable parameters.
    pub params: Vec<NodeId>,
}

/// The denoiser's step for `batch` latents of `lat` x `lat` and prompts of `tokens` ids:
/// x_t = signal * latents + sigma * noise, predicted noise = UNet(x_t, t, text(ids)), loss
/// mean((prediction - noise)^2). The text encoder's parameters carry [`TEXT_PREFIX`].
pub fn denoise_step(
    unet: &UNetConfig,
    text: &ClipTextConfig,
    batch: usize,
    lat: usize,
    tokens: usize,
    adamw: &AdamW,
) -> Result<DenoiseStep> {
    if text.hidden_size != unet.cross_attention_dim {
        return Err(Error::Config(format!(
            "the text encoder's width {} differs from the UNet's cross_attention_dim {}",
            text.hidden_size, unet.cross_attention_dim
        )));
    }
    let mut g = Graph::new();
    let ids = g.input_typed("ids", &[batch * tokens], DType::U32);
    let table = g.param(
        &format!("{TEXT_PREFIX}{}", text_encoder::TOKEN_TABLE),
        &[text.vocab_size, text.hidden_size],
    );
    let (x, offsets, rows) = g.embedding("text.embedding", table, ids)?;
    let context = text_encoder::encoder_embedded(&mut g, text, TEXT_PREFIX, x, batch, tokens)?;
    let latents = g.input("latents", &[batch, unet.in_channels, lat, lat]);
    let noise = g.input("noise", &[batch, unet.in_channels, lat, lat]);
    let signal = g.input("signal", &[batch, 1, 1, 1]);
    let sigma = g.input("sigma", &[batch, 1, 1, 1]);
    let a = g.mul(latents, signal)?;
    let b = g.mul(noise, sigma)?;
    let noisy = g.add(a, b)?;
    let (pred, inputs) = unet_conditioned(&mut g, unet, "", noisy, context)?;
    let loss = mse(&mut g, pred, noise)?;
    let (params, hyper) = optimizer(&mut g, loss, adamw)?;
    Ok(DenoiseStep {
        graph: g,
        ids,
        offsets,
        rows,
        latents,
        noise,
        signal,
        sigma,
        time: inputs.time,
        loss,
        hyper,
        params,
    })
}

/// Writes a diffusers model folder: `unet/`, `vae/`, `text_encoder/` (each `config.json` and
/// weights stored as f16), `scheduler/scheduler_config.json` (SD 1.x's), `tokenizer/` (CLIP's
/// vocabulary and merges, padding to the text encoder's context) and `model_index.json`. `unet` and `vae`
/// hold diffusers' names; `text` the internal names under [`TEXT_PREFIX`].
pub fn write_folder(
    dir: &Path,
    configs: &FolderConfigs,
    unet: &Checkpoint,
    vae: &Checkpoint,
    text: &Checkpoint,
) -> Result<()> {
    let text_cfg = ClipTextConfig::from_json(&configs.text_encoder.to_string(), "text config")?;
    let hf = text_encoder::to_transformers(text, &text_cfg, TEXT_PREFIX)?;
    for (sub, file, ck, config) in [
        (
            "unet",
            "diffusion_pytorch_model.safetensors",
            unet,
            &configs.unet,
        ),
        (
            "vae",
            "diffusion_pytorch_model.safetensors",
            vae,
            &configs.vae,
        ),
        (
            "text_encoder",
            "model.safetensors",
            &hf,
            &configs.text_encoder,
        ),
    ] {
        let d = dir.join(sub);
        create(&d)?;
        let mut out = Checkpoint {
            tensors: ck.tensors.clone(),
            ..Checkpoint::default()
        };
        out.f16_names = out.tensors.keys().cloned().collect();
        out.metadata.insert("format".into(), "pt".into());
        out.save(&d.join(file))?;
        write_json(&d.join("config.json"), config)?;
    }
    let sched = serde_json::json!({
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "clip_sample": false,
    });
    let d = dir.join("scheduler");
    create(&d)?;
    write_json(&d.join("scheduler_config.json"), &sched)?;
    // The tokenizer (CLIP's, padding to the text encoder's context) and the pipeline index,
    // so diffusers' StableDiffusionPipeline loads the folder as it is.
    let d = dir.join("tokenizer");
    create(&d)?;
    let tok = crate::text::tokenizer::Tokenizer::clip_transformers();
    write_text(&d.join("vocab.json"), &tok.vocab_json())?;
    write_text(
        &d.join("merges.txt"),
        crate::text::tokenizer::Tokenizer::merges_text(),
    )?;
    write_json(
        &d.join("tokenizer_config.json"),
        &serde_json::json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": text_cfg.max_position_embeddings,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "do_lower_case": true,
        }),
    )?;
    write_json(
        &d.join("special_tokens_map.json"),
        &serde_json::json!({
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        }),
    )?;
    write_json(
        &dir.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )
}

fn create(d: &Path) -> Result<()> {
    std::fs::create_dir_all(d).map_err(|e| Error::Io {
        path: d.display().to_string(),
        source: e,
    })
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    write_text(path, &serde_json::to_string_pretty(v).unwrap_or_default())
}

/// The three `config.json` files of a model folder, in diffusers' and transformers' format.
#[derive(Clone, Debug)]
pub struct FolderConfigs {
    /// `unet/config.json`.
    pub unet: serde_json::Value,
    /// `vae/config.json`.
    pub vae: serde_json::Value,
    /// `text_encoder/config.json`.
    pub text_encoder: serde_json::Value,
}

/// The sizes of a small SD 1.x-style model.
#[derive(Clone, Debug)]
pub struct SmallSd {
    /// Image side in pixels.
    pub image_size: usize,
    /// VAE channels per level (downscale 2^(levels - 1)).
    pub vae_channels: Vec<usize>,
    /// Latent channels (the VAE's `latent_channels`, the UNet's in and out channels).
    pub latent_channels: usize,
    /// UNet channels per level.
    pub unet_channels: Vec<usize>,
    /// Which UNet levels have cross-attention (same length as `unet_channels`).
    pub unet_attention: Vec<bool>,
    /// Attention heads in the UNet.
    pub unet_heads: usize,
    /// Resnets per block (VAE and UNet).
    pub layers_per_block: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Text encoder width (= the UNet's cross_attention_dim).
    pub text_width: usize,
    /// Text encoder layers.
    pub text_layers: usize,
    /// Text encoder heads.
    pub text_heads: usize,
    /// Tokens per prompt (`max_position_embeddings`; the tokenizer pads and truncates to it).
    pub text_context: usize,
    /// Latent scaling factor (measured after the VAE is trained).
    pub scaling_factor: f64,
}

impl SmallSd {
    /// The configs in diffusers' and transformers' format (readable by this crate's loader and
    /// by diffusers).
    pub fn configs(&self) -> FolderConfigs {
        let down: Vec<&str> = self
            .unet_attention
            .iter()
            .map(|&a| {
                if a {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
            })
            .collect();
        let up: Vec<&str> = self
            .unet_attention
            .iter()
            .rev()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
            .collect();
        let vf = 1 << (self.vae_channels.len() - 1);
        let unet = serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.image_size / vf,
            "in_channels": self.latent_channels,
            "out_channels": self.latent_channels,
            "center_input_sample": false,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "down_block_types": down,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": up,
            "only_cross_attention": false,
            "block_out_channels": self.unet_channels,
            "layers_per_block": self.layers_per_block,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "act_fn": "silu",
            "norm_num_groups": self.groups,
            "norm_eps": 1e-5,
            "cross_attention_dim": self.text_width,
            "attention_head_dim": self.unet_heads,
            "use_linear_projection": false,
            "upcast_attention": false,
            "resnet_time_scale_shift": "default",
        });
        let vae = serde_json::json!({
            "_class_name": "AutoencoderKL",
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": vec!["DownEncoderBlock2D"; self.vae_channels.len()],
            "up_block_types": vec!["UpDecoderBlock2D"; self.vae_channels.len()],
            "block_out_channels": self.vae_channels,
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.groups,
            "sample_size": self.image_size,
            "scaling_factor": self.scaling_factor,
        });
        let text_encoder = serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": crate::text::tokenizer::VOCAB,
            "hidden_size": self.text_width,
            "intermediate_size": 4 * self.text_width,
            "num_attention_heads": self.text_heads,
            "num_hidden_layers": self.text_layers,
            "max_position_embeddings": self.text_context,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
            "projection_dim": self.text_width,
        });
        FolderConfigs {
            unet,
            vae,
            text_encoder,
        }
    }

    /// The parsed configs.
    pub fn parsed(&self) -> Result<(UNetConfig, VaeConfig, ClipTextConfig)> {
        let c = self.configs();
        Ok((
            UNetConfig::from_json(&c.unet.to_string(), "unet config")?,
            VaeConfig::from_json(&c.vae.to_string(), "vae config")?,
            ClipTextConfig::from_json(&c.text_encoder.to_string(), "text config")?,
        ))
    }
}
