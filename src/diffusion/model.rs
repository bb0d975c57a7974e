//! A Stable Diffusion 1.x model folder in diffusers' layout: `tokenizer/` (optional: the
//! shipped CLIP vocabulary otherwise), `text_encoder/`, `unet/`, `vae/` (each a `config.json`
//! and a safetensors file, fp32 or fp16), `scheduler/scheduler_config.json` (optional: SD 1.5's
//! otherwise). Every missing or malformed file is an error that names it, before any GPU work.
//! Then `generate`: prompt -> images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::gpu_sampler::GpuSampler;
use super::pipeline::{sample, Denoiser};
use super::sampler::{Kind, Sampler};
use super::schedule::SchedulerConfig;
use super::single_file;
use super::text_encoder::{self, ClipTextConfig};
use super::unet::UNetConfig;
use super::vae::{self, VaeConfig};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::plan::{estimate, MemoryEstimate};
use crate::graph::{Graph, NodeId, ParamStore, Plan, PlanOptions};
use crate::nn::checkpoint::Checkpoint;
use crate::text::tokenizer::{Tokenizer, EOT};
use crate::util::rng::Rng;

/// Weight file names tried in each component folder, in order.
const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];

/// A loaded model folder (weights on the host until `generate` uploads them).
pub struct SdModel {
    /// Where it came from (a folder or a single file).
    pub dir: PathBuf,
    /// The tokenizer (the folder's or the shipped one).
    pub tokenizer: Tokenizer,
    /// Text encoder config.
    pub text: ClipTextConfig,
    /// UNet config.
    pub unet: UNetConfig,
    /// VAE config.
    pub vae: VaeConfig,
    /// Scheduler config.
    pub scheduler: SchedulerConfig,
    text_weights: Checkpoint,
    unet_weights: Checkpoint,
    vae_weights: Checkpoint,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })
}

fn weights(dir: &Path) -> Result<Checkpoint> {
    let found = WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists());
    match found {
        Some(p) => Checkpoint::load(&p),
        None => Err(Error::Config(format!(
            "{}: no weights (looked for {})",
            dir.display(),
            WEIGHT_FILES.join(", ")
        ))),
    }
}

/// The configs, tokenizer and scheduler of a model (from a folder, or SD 1.5's).
struct Configs {
    tokenizer: Tokenizer,
    text: ClipTextConfig,
    unet: UNetConfig,
    vae: VaeConfig,
    scheduler: SchedulerConfig,
}

impl Configs {
    /// Reads `{text_encoder,unet,vae}/config.json` of `dir` (required), its scheduler config
    /// and tokenizer files (optional); with no folder, SD 1.5's shipped configs.
    fn load(dir: Option<&Path>) -> Result<Configs> {
        let cfg = |sub: &str, builtin: &str| -> Result<(String, String)> {
            match dir {
                Some(d) => {
                    let p = d.join(sub).join("config.json");
                    Ok((read(&p)?, p.display().to_string()))
                }
                None => Ok((builtin.to_string(), format!("SD 1.5's {sub}/config.json"))),
            }
        };
        let (t, p) = cfg("text_encoder", single_file::SD15_TEXT)?;
        let text = ClipTextConfig::from_json(&t, &p)?;
        let (t, unet_origin) = cfg("unet", single_file::SD15_UNET)?;
        let unet = UNetConfig::from_json(&t, &unet_origin)?;
        let (t, p) = cfg("vae", single_file::SD15_VAE)?;
        let vae = VaeConfig::from_json(&t, &p)?;
        if unet.cross_attention_dim != text.hidden_size {
            return Err(Error::Config(format!(
                "{unet_origin}: the UNet attends to {}-wide text states but the text encoder is {} wide",
                unet.cross_attention_dim, text.hidden_size
            )));
        }
        let mut scheduler = SchedulerConfig::default();
        let mut tokenizer = None;
        if let Some(d) = dir {
            let sp = d.join("scheduler").join("scheduler_config.json");
            if sp.exists() {
                scheduler = SchedulerConfig::from_json(&read(&sp)?, &sp.display().to_string())?;
            }
            let (vp, mp) = (
                d.join("tokenizer/vocab.json"),
                d.join("tokenizer/merges.txt"),
            );
            if vp.exists() && mp.exists() {
                tokenizer = Some(Tokenizer::from_files(&vp, &mp)?);
            }
        }
        Ok(Configs {
            tokenizer: tokenizer.unwrap_or_else(Tokenizer::from_merges_transformers),
            text,
            unet,
            vae,
            scheduler,
        })
    }
}

impl SdModel {
    /// The image side the model was trained at: the UNet's `sample_size` times the VAE's
    /// downscale (512 for SD 1.x), or 512 when the config does not say.
    pub fn native_size(&self) -> usize {
        self.unet
            .sample_size
            .map_or(512, |s| s * self.vae.downscale())
    }

    /// Reads a model: a diffusers folder (every config and weight file), or a single-file
    /// CompVis checkpoint (`.safetensors`) with SD 1.5's configs.
    pub fn load(path: &Path) -> Result<SdModel> {
        Self::load_with_config(path, None)
    }

    /// [`SdModel::load`], where a single file takes its configs (and tokenizer and scheduler,
    /// when present) from the diffusers folder `config` instead of SD 1.5's.
    pub fn load_with_config(path: &Path, config: Option<&Path>) -> Result<SdModel> {
        if path.is_file() && path.extension().is_some_and(|e| e == "ckpt" || e == "pt") {
            return Err(Error::Config(format!(
                "{}: pickled PyTorch checkpoints are not read (they can run code); use the \
                 .safetensors version of the model",
                path.display()
            )));
        }
        if path.is_file() {
            return Self::load_single_file(path, config);
        }
        if !path.is_dir() {
            return Err(Error::Config(format!(
                "{}: no such model (want a diffusers folder with text_encoder/, unet/, vae/, \
                 or a single-file .safetensors checkpoint)",
                path.display()
            )));
        }
        if config.is_some() {
            return Err(Error::Config(format!(
                "{}: --config is for single-file checkpoints; a model folder has its own configs",
                path.display()
            )));
        }
        let c = Configs::load(Some(path))?;
        let te = path.join("text_encoder");
        let text_weights =
            text_encoder::convert(&weights(&te)?, &c.text, "", &te.display().to_string())?;
        let unet_weights = weights(&path.join("unet"))?;
        let mut vae_weights = weights(&path.join("vae"))?;
        vae::rename_legacy_attention(&mut vae_weights);
        Ok(SdModel::assemble(
            path,
            c,
            text_weights,
            unet_weights,
            vae_weights,
        ))
    }

    fn load_single_file(file: &Path, config: Option<&Path>) -> Result<SdModel> {
        let origin = file.display().to_string();
        let c = Configs::load(config)?;
        let ck = Checkpoint::load(file)?;
        if !single_file::is_single_file(&ck) {
            return Err(Error::Config(format!(
                "{origin}: not a single-file Stable Diffusion checkpoint (no '{}*' tensors)",
                single_file::UNET_PREFIX
            )));
        }
        let parts = single_file::split(
            ck,
            c.unet.layers_per_block,
            c.vae.block_out_channels.len(),
            &origin,
        )?;
        let text_weights = text_encoder::convert(&parts.text, &c.text, "", &origin)?;
        let mut vae_weights = parts.vae;
        vae::rename_legacy_attention(&mut vae_weights);
        Ok(SdModel::assemble(
            file,
            c,
            text_weights,
            parts.unet,
            vae_weights,
        ))
    }

    fn assemble(
        path: &Path,
        c: Configs,
        text_weights: Checkpoint,
        unet_weights: Checkpoint,
        vae_weights: Checkpoint,
    ) -> SdModel {
        SdModel {
            dir: path.to_path_buf(),
            tokenizer: c.tokenizer,
            text: c.text,
            unet: c.unet,
            vae: c.vae,
            scheduler: c.scheduler,
            text_weights,
            unet_weights,
            vae_weights,
        }
    }

    /// The text encoder's weights, converted to the shared transformer block's names.
    pub fn text_weights(&self) -> &Checkpoint {
        &self.text_weights
    }

    /// The UNet's weights under diffusers' names.
    pub fn unet_weights(&self) -> &Checkpoint {
        &self.unet_weights
    }

    /// The VAE's weights under diffusers' names.
    pub fn vae_weights(&self) -> &Checkpoint {
        &self.vae_weights
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt ("" = unconditional).
    pub negative: String,
    /// Images.
    pub images: usize,
    /// Classifier-free guidance scale (guidance off at <= 1).
    pub guidance: f64,
    /// Sampler steps.
    pub steps: usize,
    /// Sampler.
    pub sampler: Kind,
    /// Seed; image k's noise comes from (seed, caption, k).
    pub seed: u64,
    /// Caption index (for the noise seed; 0 for a single prompt).
    pub caption: u64,
    /// Image side in pixels.
    pub size: usize,
    /// Store the UNet's matmul weights in f16 (half the memory, f32 arithmetic); `None`: when
    /// its file is fp16 (then lossless: the results are identical to f32 storage) and the
    /// adapter is a GPU.
    pub half_weights: Option<bool>,
    /// Store activations that convolutions, attention and layout copies read in f16
    /// (`PlanOptions::f16_activations`: f32 arithmetic, half the memory and traffic for those
    /// tensors; needs `shader-f16`); `None`: on GPUs that have the feature. Independent of
    /// `half_weights`.
    pub half_activations: Option<bool>,
    /// Side of the saved PNGs (resized from `size` with a bicubic filter, like PIL's default);
    /// `None` saves at `size`.
    pub save_size: Option<usize>,
    /// Standard-normal initial noise for all images [images * latent] (replaces the seeded
    /// noise; scaled by the sampler's initial sigma as diffusers treats `latents=`).
    pub init_noise: Option<Vec<f32>>,
}

/// Where a generation stands: `step` of `steps` sampler evaluations finished for the `batch`
/// images from `image` (0-based) of `images`, which are denoised together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// First image being generated (0-based).
    pub image: usize,
    /// Images being generated together, from `image` on.
    pub batch: usize,
    /// Images in this run.
    pub images: usize,
    /// Evaluations of this image finished.
    pub step: usize,
    /// Evaluations per image (PNDM makes one more than its step count).
    pub steps: usize,
}

impl std::fmt::Display for Progress {
    /// "image 2/4, step 17/51", or "images 1-4/4, step 17/51" for a batch.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = (self.image + 1).min(self.images);
        let last = (self.image + self.batch).min(self.images);
        if last > first {
            write!(f, "images {first}-{last}/{}", self.images)?;
        } else {
            write!(f, "image {first}/{}", self.images)?;
        }
        write!(f, ", step {}/{}", self.step, self.steps)
    }
}

impl Progress {
    /// Evaluations finished in this run.
    pub fn done(&self) -> u64 {
        (self.image * self.steps + self.step * self.batch.max(1)) as u64
    }

    /// Evaluations of the whole run.
    pub fn total(&self) -> u64 {
        (self.images * self.steps) as u64
    }
}

/// Writes an image [3, size, size] in [0, 1] as a PNG of side `save` (bicubic resize when it
/// differs), atomically: written beside and renamed, so an interrupted run never leaves a
/// partial PNG that `--resume` would take for a finished one.
pub fn save_image(path: &Path, size: usize, save: Option<usize>, img: &[f32]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::Io {
            path: parent.display().to_string(),
            source: e,
        })?;
    }
    let png = image_png(size, save, img)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    crate::atomic::write_atomic(path, &png)
}

/// PNG bytes of a generated image [3, size, size], resized to `save` pixels when that differs
/// (bicubic, as [`save_image`]).
pub fn image_png(
    size: usize,
    save: Option<usize>,
    img: &[f32],
) -> std::result::Result<Vec<u8>, String> {
    use crate::util::image::encode_png;
    match save.filter(|&s| s != size) {
        None => encode_png(size, size, img),
        Some(s) => {
            let mut rgb = image::Rgb32FImage::new(size as u32, size as u32);
            for (x, y, p) in rgb.enumerate_pixels_mut() {
                for c in 0..3 {
                    p[c] = img[(c * size + y as usize) * size + x as usize];
                }
            }
            let small = image::imageops::resize(
                &rgb,
                s as u32,
                s as u32,
                image::imageops::FilterType::CatmullRom,
            );
            let mut planar = vec![0.0; 3 * s * s];
            for (x, y, p) in small.enumerate_pixels() {
                for c in 0..3 {
                    planar[(c * s + y as usize) * s + x as usize] = p[c];
                }
            }
            encode_png(s, s, &planar)
        }
    }
}

/// What `generate` returns.
pub struct Generated {
    /// Images [3, size, size] in [0, 1], before 8-bit quantization.
    pub images: Vec<Vec<f32>>,
    /// Final latents [latent_channels, size / f, size / f] before decoding.
    pub latents: Vec<Vec<f32>>,
}

impl GenerateOptions {
    /// Whether the UNet's weights go to the GPU as f16 for model `m` on a device with `caps`:
    /// by default when its file is fp16 (lossless) and the adapter is a GPU (on CPU adapters
    /// widening costs 10-25 % of a step, docs/benchmarks.md, and memory is the host's).
    pub fn half_weights(&self, m: &SdModel, caps: &crate::gpu::Caps) -> bool {
        self.half_weights
            .unwrap_or(m.unet_weights.all_f16() && !caps.is_cpu)
    }

    /// Whether activations are stored in f16 on a device with `caps`: by default on GPUs with
    /// `shader-f16` (on CPU adapters the conversions cost time and memory is the host's,
    /// docs/benchmarks.md). Fails when f16 is asked for and the device lacks the feature.
    pub fn half_activations(&self, caps: &crate::gpu::Caps) -> Result<bool> {
        match self.half_activations {
            None => Ok(caps.f16 && !caps.is_cpu),
            Some(true) if !caps.f16 => Err(Error::Config(
                "--precision f16: this device lacks the feature shader-f16 (use f32 or auto)"
                    .into(),
            )),
            Some(h) => Ok(h),
        }
    }

    /// Checks the settings against the model, before any GPU work.
    pub fn check(&self, m: &SdModel) -> Result<()> {
        let f = m.vae.downscale() << (m.unet.block_out_channels.len() - 1);
        if self.size == 0 || !self.size.is_multiple_of(f) {
            return Err(Error::Config(format!(
                "--size {} must be a positive multiple of {f} for this model",
                self.size
            )));
        }
        if self.steps == 0 {
            return Err(Error::Config("--steps must be at least 1".into()));
        }
        if self.save_size.is_some_and(|s| s == 0 || s > 8192) {
            return Err(Error::Config(format!(
                "--save-size {} must be between 1 and 8192",
                self.save_size.unwrap_or(0)
            )));
        }
        if self.guidance.is_nan() || self.guidance < 0.0 {
            return Err(Error::Config(format!(
                "--guidance must be >= 0, got {}",
                self.guidance
            )));
        }
        if self.images == 0 {
            return Err(Error::Config(
                "--images-per-prompt must be at least 1".into(),
            ));
        }
        if let Some(n) = &self.init_noise {
            let lat = self.size / m.vae.downscale();
            let want = self.images * m.unet.in_channels * lat * lat;
            if n.len() != want {
                return Err(Error::Config(format!(
                    "the initial noise `latents` has {} values; {} images of [{}, {lat}, {lat}] need {want}",
                    n.len(),
                    self.images,
                    m.unet.in_channels
                )));
            }
        }
        Sampler::new(self.sampler, &m.scheduler, self.steps).map(|_| ())
    }
}

/// Standard-normal noise of image `k` of caption `caption` under `seed`.
pub fn image_noise(seed: u64, caption: u64, k: u64, len: usize) -> Vec<f32> {
    let mut r = Rng(seed
        ^ caption.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ k.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
    (0..len).map(|_| r.normal() as f32).collect()
}

/// Compiled plans for one model and one set of options, reused across prompts: the text
/// encoder, the (guided) UNet denoiser and the VAE decoder.
pub struct Generator<'a> {
    gpu: Arc<Gpu>,
    m: &'a SdModel,
    o: GenerateOptions,
    run: GpuSampler,
    text: Plan,
    embedded: NodeId,
    hidden: NodeId,
    den: Denoiser,
    vae: Plan,
    z: NodeId,
    image: NodeId,
    batch: usize,
}

/// Bytes of intermediates that denoising several images of a prompt together may add to the
/// UNet plan's one-image need. Small models (the mini-world's) then run all of a prompt's
/// images in one batch, with the same dispatches as one image; SD at 512 stays at one.
const BATCH_EXTRA_BYTES: u64 = 256 << 20;

/// The graphs for the largest batch of images (a divisor of `o.images`) whose UNet plan
/// needs at most [`BATCH_EXTRA_BYTES`] more than one image's, with their memory and batch.
fn batched_graphs(
    m: &SdModel,
    o: &GenerateOptions,
    limit: u64,
    half: bool,
    half_act: bool,
) -> Result<(SdGraphs, SdMemory, usize)> {
    let build = |b| {
        graphs(
            &m.text,
            &m.unet,
            &m.vae,
            o.size,
            o.guidance,
            limit as usize,
            half,
            b,
        )
    };
    let one = build(1)?;
    let one_need = one.memory_with(limit, half_act)?;
    let mut best = (one, one_need, 1);
    for b in (2..=o.images).filter(|b| o.images.is_multiple_of(*b)) {
        let g = build(b)?;
        let need = g.memory_with(limit, half_act)?;
        if need.unet.total() > one_need.unet.total() + BATCH_EXTRA_BYTES
            || need.largest_tensor() > limit
        {
            break;
        }
        best = (g, need, b);
    }
    Ok(best)
}

impl<'a> Generator<'a> {
    /// Checks `o` against `m`, uploads the weights and compiles the three plans.
    pub fn new(gpu: &Arc<Gpu>, m: &'a SdModel, o: &GenerateOptions) -> Result<Generator<'a>> {
        o.check(m)?;
        let sampler = Sampler::new(o.sampler, &m.scheduler, o.steps)?;
        let lat = o.size / m.vae.downscale();
        let limit = max_tensor(gpu) as u64;
        let half_act = o.half_activations(&gpu.caps)?;
        let plan_opts = PlanOptions {
            f16_activations: half_act,
            ..PlanOptions::default()
        };
        let (gr, need, batch) =
            batched_graphs(m, o, limit, o.half_weights(m, &gpu.caps), half_act)?;
        let run = GpuSampler::new(gpu, sampler, batch * m.unet.in_channels * lat * lat)?;
        // Each graph's parameters, in the dtype it asks for (f16 weights when half_weights);
        // token embeddings stay on the host (see `text_encoder::embed_tokens`).
        let upload = |ck: &Checkpoint, g: &Graph| -> Result<ParamStore> {
            let mut store = ParamStore::new();
            // f32 weights share arenas sized to them (f16 ones get buffers of their own).
            let f32_bytes: usize = g
                .nodes
                .iter()
                .filter(|n| n.op == crate::graph::Op::Param && n.dtype == crate::graph::DType::F32)
                .map(|n| n.numel().max(1).div_ceil(4) * 16)
                .sum();
            store.reserve(gpu, "", f32_bytes as u64)?;
            for node in g.nodes.iter().filter(|n| n.op == crate::graph::Op::Param) {
                let name = node.name.as_deref().unwrap_or_default();
                let Some(t) = ck.tensors.get(name) else {
                    continue; // Plan::compile names it
                };
                if node.dtype == crate::graph::DType::F16 {
                    store.set_f16(gpu, name, &t.shape, &t.data)?;
                } else {
                    store.set(gpu, name, &t.shape, &t.data)?;
                }
            }
            Ok(store)
        };
        // Sizes the device cannot hold fail here, before any weight is uploaded.
        need.check(o.size, limit)?;
        let oom = |e: Error| out_of_memory(e, need.total(), o, gpu);
        let text = Plan::compile(
            gpu,
            &gr.text,
            &[gr.hidden],
            &mut upload(&m.text_weights, &gr.text).map_err(oom)?,
            plan_opts,
        )
        .map_err(oom)?;
        let mut unet_store = upload(&m.unet_weights, &gr.unet.graph).map_err(oom)?;
        let den = Denoiser::compile_with(
            gpu,
            gr.unet,
            &m.unet,
            &mut unet_store,
            o.guidance,
            plan_opts,
        )
        .map_err(oom)?;
        let vae = Plan::compile(
            gpu,
            &gr.vae,
            &[gr.image],
            &mut upload(&m.vae_weights, &gr.vae).map_err(oom)?,
            plan_opts,
        )
        .map_err(oom)?;
        gpu.take_error().map_err(oom)?;
        let (embedded, hidden, z, image) = (gr.embedded, gr.hidden, gr.z, gr.image);
        Ok(Generator {
            gpu: gpu.clone(),
            m,
            o: o.clone(),
            run,
            text,
            embedded,
            hidden,
            den,
            vae,
            z,
            image,
            batch,
        })
    }

    /// Images denoised together (a divisor of the options' image count).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Images of `prompt` (the options' negative prompt, count, sampler and seed), with the
    /// noise of caption index `caption`; `progress` after each sampler evaluation (an error it
    /// returns, such as [`Error::Cancelled`], stops the run).
    pub fn run(
        &self,
        prompt: &str,
        caption: u64,
        progress: impl FnMut(Progress) -> Result<()>,
    ) -> Result<Generated> {
        let mut out = Generated {
            images: Vec::with_capacity(self.o.images),
            latents: Vec::with_capacity(self.o.images),
        };
        self.run_each(prompt, caption, progress, |_, image, latent| {
            out.images.push(image);
            out.latents.push(latent);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Generator::run`] handing each image to `done(k, image [3, size, size] in [0, 1],
    /// latent)` as soon as it is decoded (an error it returns stops the run).
    pub fn run_each(
        &self,
        prompt: &str,
        caption: u64,
        mut progress: impl FnMut(Progress) -> Result<()>,
        mut done: impl FnMut(usize, Vec<f32>, Vec<f32>) -> Result<()>,
    ) -> Result<()> {
        let (m, o) = (self.m, &self.o);
        let tokens = m.text.max_position_embeddings;
        let guided = o.guidance > 1.0;
        let prompts: Vec<&str> = if guided {
            vec![&o.negative, prompt]
        } else {
            vec![prompt]
        };
        let mut ids = Vec::new();
        for p in &prompts {
            let (t, cut) = m.tokenizer.tokenize_checked(p, tokens, EOT);
            if cut {
                log::warn!("prompt longer than {tokens} tokens was truncated: {p:?}");
            }
            ids.extend(t);
        }
        let x = text_encoder::embed_tokens(&m.text_weights, "", &ids)?;
        self.text.write(self.embedded, &x)?;
        let states = self.text.run_fetch(&[self.hidden])?.remove(0);
        let per = tokens * m.text.hidden_size;
        if guided {
            self.den.set_context(Some(&states[..per]), &states[per..])?;
        } else {
            self.den.set_context(None, &states)?;
        }
        let lat = o.size / m.vae.downscale();
        let len = m.unet.in_channels * lat * lat;
        let (b, steps) = (self.batch, self.run.sampler().evaluations());
        for k0 in (0..o.images).step_by(b) {
            // Image k's noise and step noise are its own whatever the batch.
            let mut noise = Vec::with_capacity(b * len);
            let mut rngs = Vec::with_capacity(b);
            for k in k0..k0 + b {
                match &o.init_noise {
                    Some(n) => noise.extend_from_slice(&n[k * len..(k + 1) * len]),
                    None => noise.extend(image_noise(o.seed, caption, k as u64, len)),
                }
                rngs.push(Rng(o.seed ^ 0x5EED ^ ((k as u64) << 32) ^ caption));
            }
            let latents = sample(
                &self.gpu,
                &self.den,
                &self.run,
                &noise,
                |_| {
                    let mut v = Vec::with_capacity(b * len);
                    for r in rngs.iter_mut() {
                        v.extend((0..len).map(|_| r.normal() as f32));
                    }
                    v
                },
                |i| {
                    progress(Progress {
                        image: k0,
                        batch: b,
                        images: o.images,
                        step: i + 1,
                        steps,
                    })
                },
            )?;
            for (j, latent) in latents.chunks(len).enumerate() {
                let zs: Vec<f32> = latent
                    .iter()
                    .map(|&v| (v as f64 / m.vae.scaling_factor) as f32)
                    .collect();
                self.vae.write(self.z, &zs)?;
                let img = self.vae.run_fetch(&[self.image])?.remove(0);
                let image = img
                    .iter()
                    .map(|&v| (v * 0.5 + 0.5).clamp(0.0, 1.0))
                    .collect();
                done(k0 + j, image, latent.to_vec())?;
            }
        }
        Ok(())
    }
}

/// The largest tensor the graphs may make on this device (the VAE decoder splits above it).
fn max_tensor(gpu: &Gpu) -> usize {
    gpu.caps.max_binding.min(gpu.caps.max_buffer) as usize
}

/// An allocation failure while setting up, as an error that says what was asked and what it
/// needs (`need`, the plans' estimate); other errors pass through.
fn out_of_memory(e: Error, need: u64, o: &GenerateOptions, gpu: &Gpu) -> Error {
    let text = e.to_string();
    if !text.to_lowercase().contains("memory") {
        return e;
    }
    let need = format!("about {:.1} GiB", need as f64 / (1u64 << 30) as f64);
    Error::Gpu(format!(
        "the adapter '{}' ran out of memory setting up {}x{} generation ({need} needed): \
         try a smaller --size ({text})",
        gpu.info.name, o.size, o.size
    ))
}

/// The three graphs of generation: text encoder (on host-embedded tokens), guided UNet, and
/// VAE decoder (its activations split under `max_tensor` bytes).
pub struct SdGraphs {
    /// Text encoder graph.
    pub text: Graph,
    /// Its input: token embeddings [rows * tokens, width].
    pub embedded: NodeId,
    /// Its output: the last hidden state.
    pub hidden: NodeId,
    /// The guided UNet.
    pub unet: super::pipeline::DenoiserGraph,
    /// VAE decoder graph.
    pub vae: Graph,
    /// Its input latent [1, C, h, w] (divided by the scaling factor).
    pub z: NodeId,
    /// Its output image.
    pub image: NodeId,
}

/// Builds the [`SdGraphs`] for `size`^2 images at guidance scale `guidance`, `batch` images
/// of a prompt denoised together, the UNet's matmul weights in f16 when `half_weights`.
#[allow(clippy::too_many_arguments)]
pub fn graphs(
    text: &ClipTextConfig,
    unet: &UNetConfig,
    vae_cfg: &VaeConfig,
    size: usize,
    guidance: f64,
    max_tensor: usize,
    half_weights: bool,
    batch: usize,
) -> Result<SdGraphs> {
    let tokens = text.max_position_embeddings;
    let rows = if guidance > 1.0 { 2 } else { 1 };
    let lat = size / vae_cfg.downscale();
    let mut g = Graph::new();
    let embedded = g.input("embedded", &[rows * tokens, text.hidden_size]);
    let hidden = text_encoder::encoder_embedded(&mut g, text, "", embedded, rows, tokens)?;
    let den =
        super::pipeline::denoiser_graph(unet, batch, lat, lat, tokens, guidance, half_weights)?;
    let mut vg = Graph::new();
    vg.max_tensor_bytes = max_tensor;
    let z = vg.input("z", &[1, vae_cfg.latent_channels, lat, lat]);
    let image = vae::decoder(&mut vg, vae_cfg, "", z)?;
    Ok(SdGraphs {
        text: g,
        embedded,
        hidden,
        unet: den,
        vae: vg,
        z,
        image,
    })
}

/// Device memory of generation by component (their plans coexist).
#[derive(Clone, Copy, Debug)]
pub struct SdMemory {
    /// Text encoder plan.
    pub text: MemoryEstimate,
    /// Guided UNet plan.
    pub unet: MemoryEstimate,
    /// VAE decoder plan.
    pub vae: MemoryEstimate,
}

impl SdMemory {
    /// All three plans (weights, planned intermediates, inputs).
    pub fn total(&self) -> u64 {
        self.text.total() + self.unet.total() + self.vae.total()
    }

    /// The largest single tensor.
    pub fn largest_tensor(&self) -> u64 {
        [self.text, self.unet, self.vae]
            .iter()
            .map(|e| e.largest_tensor_bytes)
            .max()
            .unwrap_or(0)
    }

    /// An error naming the component, when a tensor of `size`^2 generation would not fit a
    /// binding of `limit` bytes.
    pub fn check(&self, size: usize, limit: u64) -> Result<()> {
        for (what, e) in [
            ("text encoder", self.text),
            ("UNet", self.unet),
            ("VAE decoder", self.vae),
        ] {
            if e.largest_tensor_bytes > limit {
                return Err(Error::Config(format!(
                    "at --size {size} the {what} needs a {} MiB tensor, more than this adapter's \
                     {} MiB per buffer: use a smaller --size",
                    e.largest_tensor_bytes >> 20,
                    limit >> 20
                )));
            }
        }
        Ok(())
    }
}

/// What generation at `size`^2 needs on a device whose bindings take `max_tensor` bytes,
/// one image at a time, without a device or weights (the f32 weights the graphs read, the
/// planned intermediates).
pub fn estimate_memory(
    text: &ClipTextConfig,
    unet: &UNetConfig,
    vae_cfg: &VaeConfig,
    size: usize,
    guidance: f64,
    max_tensor: usize,
    half_weights: bool,
) -> Result<SdMemory> {
    graphs(
        text,
        unet,
        vae_cfg,
        size,
        guidance,
        max_tensor,
        half_weights,
        1,
    )?
    .memory(max_tensor as u64)
}

impl SdGraphs {
    /// What the three plans of these graphs need (bindings of `limit` bytes).
    pub fn memory(&self, limit: u64) -> Result<SdMemory> {
        self.memory_with(limit, false)
    }

    /// [`SdGraphs::memory`] with activations in f16 when `half_activations`.
    pub fn memory_with(&self, limit: u64, half_activations: bool) -> Result<SdMemory> {
        let o = PlanOptions {
            f16_activations: half_activations,
            ..PlanOptions::default()
        };
        Ok(SdMemory {
            text: estimate(&self.text, &[self.hidden], o, limit)?,
            unet: estimate(&self.unet.graph, &[self.unet.out], o, limit)?,
            vae: estimate(&self.vae, &[self.image], o, limit)?,
        })
    }
}

/// Generates `o.images` images of `o.prompt` [3, size, size] in [0, 1]; `progress` is called
/// after each sampler evaluation (an error it returns stops the run).
pub fn generate(
    gpu: &Arc<Gpu>,
    m: &SdModel,
    o: &GenerateOptions,
    progress: impl FnMut(Progress) -> Result<()>,
) -> Result<Generated> {
    Generator::new(gpu, m, o)?.run(&o.prompt, o.caption, progress)
}

/// Which captions of a captions file one shard generates: shard `i` of `n` holds
/// [i * C / n, (i + 1) * C / n).
pub fn shard_range(captions: usize, shard: (usize, usize)) -> Result<std::ops::Range<usize>> {
    let (i, n) = shard;
    if n == 0 || i >= n {
        return Err(Error::Config(format!(
            "--shard {i}/{n}: want i/N with 0 <= i < N"
        )));
    }
    // In 128 bits: i * captions overflows usize for a huge shard index.
    let at = |k: usize| (k as u128 * captions as u128 / n as u128) as usize;
    Ok(at(i)..at(i + 1))
}

/// Where pool generation stands.
#[derive(Clone, Copy, Debug)]
pub struct PoolProgress {
    /// Caption being generated (0-based, within the shard).
    pub caption: usize,
    /// Captions in the shard.
    pub captions: usize,
    /// Images written so far.
    pub written: usize,
    /// The caption's images all existed (`--resume`): nothing was generated for it.
    pub skipped: bool,
    /// Progress within the caption (all done when skipped).
    pub image: Progress,
}

impl std::fmt::Display for PoolProgress {
    /// "caption 3/10, image 2/4, step 17/51, 8 written".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "caption {}/{}, {}, {} written",
            self.caption + 1,
            self.captions,
            self.image,
            self.written
        )
    }
}

impl PoolProgress {
    /// Evaluations finished in the shard (skipped captions count as finished).
    pub fn done(&self) -> u64 {
        self.caption as u64 * self.image.total() + self.image.done()
    }

    /// Evaluations of the whole shard.
    pub fn total(&self) -> u64 {
        self.captions as u64 * self.image.total()
    }
}

/// Generates a pool in the official layout (docs/formats.md) under `out`: image j of caption k
/// at `seed_j/<relpath(k)>`, for the captions of the shard; with `resume`, captions whose
/// images all exist are skipped. Writes `captions.csv` (unsharded) or
/// `captions.{i}-of-{n}.csv` (to concatenate after merging shards). `progress` follows every
/// sampler evaluation (an error it returns stops the run; finished images stay, so `resume`
/// continues). Returns images written.
#[allow(clippy::too_many_arguments)]
pub fn generate_pool(
    gpu: &Arc<Gpu>,
    m: &SdModel,
    o: &GenerateOptions,
    captions: &[String],
    shard: (usize, usize),
    resume: bool,
    out: &Path,
    mut progress: impl FnMut(&PoolProgress) -> Result<()>,
) -> Result<usize> {
    use crate::data::pool::relpath;
    let range = shard_range(captions.len(), shard)?;
    let gen = Generator::new(gpu, m, o)?;
    let mut rows = String::new();
    let mut written = 0;
    let total = range.len();
    for (done, c) in range.clone().enumerate() {
        let rel = relpath(c as u64);
        rows += &crate::data::csv::row(&[&rel, &captions[c]]);
        let paths: Vec<PathBuf> = (0..o.images)
            .map(|j| out.join(format!("seed_{j}")).join(&rel))
            .collect();
        let mut report = PoolProgress {
            caption: done,
            captions: total,
            written,
            skipped: true,
            image: Progress {
                image: o.images,
                batch: 1,
                images: o.images,
                step: 0,
                steps: gen.run.sampler().evaluations(),
            },
        };
        // A damaged image (truncated, empty, not a PNG, the wrong size) is generated again.
        let side = o.save_size.unwrap_or(o.size);
        if resume
            && paths
                .iter()
                .all(|p| crate::util::image::image_is_complete(p, side))
        {
            progress(&report)?;
            continue;
        }
        report.skipped = false;
        let g = gen.run(&captions[c], c as u64, |p| {
            report.image = p;
            progress(&report)
        })?;
        for (p, img) in paths.iter().zip(&g.images) {
            save_image(p, o.size, o.save_size, img)?;
            written += 1;
        }
    }
    let name = if shard.1 == 1 {
        "captions.csv".to_string()
    } else {
        format!("captions.{}-of-{}.csv", shard.0, shard.1)
    };
    let index = out.join(name);
    std::fs::create_dir_all(out).map_err(|e| Error::Io {
        path: out.display().to_string(),
        source: e,
    })?;
    crate::atomic::write_atomic(&index, rows.as_bytes())?;
    Ok(written)
}

/// The WebDataset shards of `captions` (shard s holds captions [s * per_shard, (s + 1) *
/// per_shard)) that machine `i` of `n` writes: shards [i * S / n, (i + 1) * S / n) of S.
pub fn shards_of(
    captions: usize,
    per_shard: usize,
    machine: (usize, usize),
) -> Result<std::ops::Range<usize>> {
    if per_shard == 0 {
        return Err(Error::Config(
            "--captions-per-shard must be positive".into(),
        ));
    }
    shard_range(captions.div_ceil(per_shard), machine)
}

/// Generates a pool as WebDataset shards under `out` (docs/formats.md): `pool-{s:06}.tar`
/// with `per_shard` captions each, caption k as the sample `{k:010}` with members
/// `KEY.0.png` ... and `KEY.txt`. The image noise is seeded exactly as [`generate_pool`]'s,
/// so both layouts hold the same images. Machine `shard` = (i, n) writes its share of the
/// shards ([`shards_of`]). A shard is written to `NAME.tmp` and renamed when complete, so it
/// is either complete or absent; with `resume`, complete shards are skipped. Returns images
/// written.
#[allow(clippy::too_many_arguments)]
pub fn generate_shards(
    gpu: &Arc<Gpu>,
    m: &SdModel,
    o: &GenerateOptions,
    captions: &[String],
    shard: (usize, usize),
    per_shard: usize,
    resume: bool,
    out: &Path,
    mut progress: impl FnMut(&PoolProgress) -> Result<()>,
) -> Result<usize> {
    use crate::data::webdataset::{shard_is_complete, ShardSink};
    let shards = shards_of(captions.len(), per_shard, shard)?;
    let range_of = |s: usize| s * per_shard..((s + 1) * per_shard).min(captions.len());
    let total: usize = shards.clone().map(|s| range_of(s).len()).sum();
    let gen = Generator::new(gpu, m, o)?;
    let mut sink = ShardSink::new(out);
    let mut written = 0;
    let mut done = 0;
    for s in shards {
        let skip = resume && shard_is_complete(&sink.path(s), range_of(s), o.images);
        for c in range_of(s) {
            let mut report = PoolProgress {
                caption: done,
                captions: total,
                written,
                skipped: skip,
                image: Progress {
                    image: o.images,
                    batch: 1,
                    images: o.images,
                    step: 0,
                    steps: gen.run.sampler().evaluations(),
                },
            };
            done += 1;
            if skip {
                progress(&report)?;
                continue;
            }
            let g = gen.run(&captions[c], c as u64, |p| {
                report.image = p;
                progress(&report)
            })?;
            let side = o.size;
            let images = g
                .images
                .iter()
                .map(|img| {
                    image_png(side, o.save_size, img)
                        .map(|b| (b, "png".to_string()))
                        .map_err(|e| Error::Config(format!("caption {c}: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            sink.push(s, c as u64, &images, &captions[c])?;
            written += images.len();
        }
        sink.finish()?;
    }
    Ok(written)
}
