//! The `stablerep` command.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use stablerep::demo::{train_mlp, DemoConfig};
use stablerep::gpu::{adapter, Gpu, GpuOptions};
use stablerep::world::demo::DemoConfig as WorldDemo;

/// StableRep on WebGPU.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Use the adapter whose name, backend or driver contains this text (also STABLEREP_ADAPTER).
    #[arg(long, global = true)]
    adapter: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process, so the size of the `train` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Generate images with a Stable Diffusion 1.x model (a diffusers folder or a single-file
    /// checkpoint): for a prompt, PNGs `00000.png`, `00001.png`, ... in --out; for a captions
    /// file, a training pool.
    Generate {
        /// Model folder: text_encoder/, unet/, vae/ (config.json + safetensors, fp32 or fp16),
        /// optional tokenizer/ and scheduler/. Or a single-file CompVis checkpoint
        /// (`.safetensors`, e.g. v1-5-pruned-emaonly), read with SD 1.5's configs. Default: the
        /// built-in mini-world model (assets/world-sd, 32 x 32 images; docs/world.md).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// For a single-file checkpoint: a diffusers folder whose config.json files (and
        /// tokenizer/scheduler, if present) describe it, instead of SD 1.5's.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// The prompt.
        #[arg(
            long,
            required_unless_present = "captions",
            conflicts_with = "captions"
        )]
        prompt: Option<String>,
        /// A captions file (one caption per line): writes a training pool in the official
        /// layout (docs/formats.md) to --out, --images-per-prompt images per caption.
        #[arg(long)]
        captions: Option<std::path::PathBuf>,
        /// With --captions: generate shard i of N ("i/N"), captions [i*C/N, (i+1)*C/N).
        #[arg(long, default_value = "0/1", allow_hyphen_values = true)]
        shard: String,
        /// With --captions: skip captions whose images all exist already (with --format
        /// webdataset: shards that are complete).
        #[arg(long)]
        resume: bool,
        /// With --captions: the pool's layout: `folder` (the official one) or `webdataset`
        /// (tar shards `pool-000000.tar`, ... of --captions-per-shard captions each; caption k
        /// is the sample `{k:010}` with `KEY.0.png` ... and `KEY.txt`). docs/formats.md.
        #[arg(long, default_value = "folder", value_parser = ["folder", "webdataset"])]
        format: String,
        /// With --format webdataset: captions per shard (--shard i/N then splits shards, not
        /// captions, among machines).
        #[arg(long, default_value_t = 1000, allow_negative_numbers = true, value_parser = count)]
        captions_per_shard: usize,
        /// What to steer away from (the unconditional branch of guidance).
        #[arg(long, default_value = "")]
        negative_prompt: String,
        /// Images per prompt (or per caption).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = count)]
        images_per_prompt: usize,
        /// Classifier-free guidance scale (<= 1 turns guidance off).
        #[arg(long, default_value_t = 7.5, allow_hyphen_values = true, value_parser = non_negative_f64)]
        guidance: f64,
        /// Sampler steps.
        #[arg(long, default_value_t = 50, allow_negative_numbers = true, value_parser = count)]
        steps: usize,
        /// ddim, pndm, euler, euler-a, dpmpp-2m or dpmpp-2m-karras.
        #[arg(long, default_value = "pndm")]
        sampler: String,
        /// DDIM's eta.
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true, value_parser = unit_f64)]
        eta: f64,
        /// Seed: the noise of image k of caption c depends on (seed, c, k) only, so shards and
        /// resumed runs reproduce the same images.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        seed: u64,
        /// Image side in pixels (default: the model's own, 512 for SD 1.x).
        #[arg(long, allow_negative_numbers = true, value_parser = sd_side)]
        size: Option<usize>,
        /// Side of the saved PNGs (bicubic resize; the official pools keep 256); default --size.
        #[arg(long, allow_negative_numbers = true, value_parser = image_side)]
        save_size: Option<usize>,
        /// UNet weights on the GPU: f16 (half the memory; arithmetic stays f32), f32, or auto
        /// (f16 on a GPU when the file is fp16, which is then lossless).
        #[arg(long, default_value = "auto")]
        weights: String,
        /// Activations: f16 (convolution patches and products, queries, keys, values and
        /// attention stored as f16, arithmetic f32; needs shader-f16), f32, or auto (f16 on
        /// GPUs that have shader-f16; f32 on CPU adapters, where f16 gains nothing).
        /// Independent of --weights.
        #[arg(long, default_value = "auto")]
        precision: String,
        /// Output folder.
        #[arg(long)]
        out: std::path::PathBuf,
        /// safetensors with `latents` [images, 4, size/8, size/8] of standard-normal noise,
        /// used instead of the seeded noise (scaled by the sampler's initial sigma, as
        /// diffusers treats `latents=`).
        #[arg(long)]
        init_noise: Option<std::path::PathBuf>,
        /// Write the final latents (before decoding) as `latents` to this safetensors file.
        #[arg(long)]
        save_latents: Option<std::path::PathBuf>,
        /// Write the decoded images in [0, 1] (before 8-bit quantization) as `images`.
        #[arg(long)]
        save_tensor: Option<std::path::PathBuf>,
    },
    /// Open the desktop app: generation, pool building, training and evaluation in one window
    /// (settings are remembered between runs).
    #[cfg(feature = "app")]
    App {
        /// Panel to show first: device, generate, pool, train or evaluate.
        #[arg(long)]
        panel: Option<String>,
        /// Stable Diffusion model to use (a diffusers folder or a single-file checkpoint).
        #[arg(long)]
        model: Option<String>,
        /// Prompt for the Generate panel.
        #[arg(long)]
        prompt: Option<String>,
        /// Start the panel's main action at once (Generate, Build pool, Start, Evaluate).
        #[arg(long)]
        start: bool,
        /// Settings file (default: app.json in the user's config folder).
        #[arg(long)]
        settings: Option<std::path::PathBuf>,
    },
    /// List every GPU adapter, then the chosen one with its limits and features.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Train StableRep (or its SimCLR control) from a synthetic pool with GPU augmentation,
    /// or on a fixed, already augmented batch (`--fixed-batch`, the PyTorch-parity mode).
    Train {
        /// Synthetic pool folder (docs/formats.md).
        #[arg(long, conflicts_with_all = ["fixed_batch", "images"])]
        pool: Option<std::path::PathBuf>,
        /// Real images: a labelled folder (one sub-folder per class); every image is its own
        /// caption, so use --method simclr (the paper's real-image control).
        #[arg(long, conflicts_with = "fixed_batch")]
        images: Option<std::path::PathBuf>,
        /// Resize every training image's shorter side to this size and center-crop a square
        /// before augmentation (default with --images: 8/7 of --img-size; pools keep their size).
        #[arg(long, allow_negative_numbers = true, value_parser = count)]
        source_size: Option<usize>,
        /// safetensors file holding `images` [N*M, 3, H, W], normalized, view-major.
        #[arg(long)]
        fixed_batch: Option<std::path::PathBuf>,
        /// Initial checkpoint (official names: visual.*, image_mlp.*); required with
        /// --fixed-batch, otherwise a fresh model is initialized.
        #[arg(long)]
        init: Option<std::path::PathBuf>,
        /// stablerep (m images of a caption are positives), simclr (one image, m crops) or
        /// stablerep-plus (StableRep plus CLIP-style image-text loss with a text tower).
        #[arg(long, value_enum, default_value_t = Method::Stablerep)]
        method: Method,
        /// StableRep+: text tower width (CLIP: 512).
        #[arg(long, default_value_t = 512, allow_negative_numbers = true, value_parser = count)]
        text_width: usize,
        /// StableRep+: text tower depth (CLIP: 12).
        #[arg(long, default_value_t = 12, allow_negative_numbers = true, value_parser = count)]
        text_layers: usize,
        /// StableRep+: text tower heads (CLIP: 8).
        #[arg(long, default_value_t = 8, allow_negative_numbers = true, value_parser = count)]
        text_heads: usize,
        /// StableRep+: tokens per caption (CLIP: 77; longer captions are truncated).
        #[arg(long, default_value_t = 77, allow_negative_numbers = true, value_parser = count)]
        text_context: usize,
        /// StableRep+: image-text embedding width (512).
        #[arg(long, default_value_t = 512, allow_negative_numbers = true, value_parser = count)]
        embed_dim: usize,
        /// ViT size for a fresh model.
        #[arg(long, value_enum, default_value_t = ModelSize::Tiny)]
        model: ModelSize,
        /// Input resolution of a fresh model.
        #[arg(long, default_value_t = 224, allow_negative_numbers = true, value_parser = count)]
        img_size: usize,
        /// Patch size of a fresh model.
        #[arg(long, default_value_t = 16, allow_negative_numbers = true, value_parser = count)]
        patch: usize,
        /// How a fresh model turns images into tokens (as the other architecture flags, it
        /// does not change a resumed or `--init` checkpoint, whose own config wins).
        #[arg(long, value_enum, default_value_t = StemArg::Patch)]
        stem: StemArg,
        /// Override the preset's width.
        #[arg(long, allow_negative_numbers = true, value_parser = count)]
        width: Option<usize>,
        /// Override the preset's depth.
        #[arg(long, allow_negative_numbers = true, value_parser = count)]
        depth: Option<usize>,
        /// Override the preset's heads.
        #[arg(long, allow_negative_numbers = true, value_parser = count)]
        heads: Option<usize>,
        /// Projection head hidden width.
        #[arg(long, default_value_t = 4096, allow_negative_numbers = true, value_parser = count)]
        head_hidden: usize,
        /// Projection head output width.
        #[arg(long, default_value_t = 256, allow_negative_numbers = true, value_parser = count)]
        head_out: usize,
        /// Seed (initialization, sampling, augmentation).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        seed: u64,
        /// Steps between checkpoints.
        #[arg(long, default_value_t = 500, allow_negative_numbers = true, value_parser = count_u64)]
        checkpoint_every: u64,
        /// Steps between loss readbacks.
        #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = count_u64)]
        log_every: u64,
        /// Continue from OUT/checkpoint-last.safetensors when present.
        #[arg(long)]
        resume: bool,
        /// Captions per batch (N).
        #[arg(long, allow_negative_numbers = true, value_parser = count)]
        captions_per_batch: usize,
        /// Images per caption (M); 2 with two crops of one image is the SimCLR control.
        #[arg(long, allow_negative_numbers = true, value_parser = at_least_2)]
        images_per_caption: usize,
        /// Optimizer steps.
        #[arg(long, default_value_t = 1, conflicts_with = "epochs", allow_negative_numbers = true, value_parser = count_u64)]
        steps: u64,
        /// Train for this many caption epochs instead (each epoch shuffles the pool's captions
        /// and drops the last incomplete batch); sets --steps.
        #[arg(long, allow_hyphen_values = true, value_parser = positive_f64)]
        epochs: Option<f64>,
        /// No augmentation: a fixed batch is used as it is; pool images are only resized and
        /// normalized.
        #[arg(long)]
        no_augment: bool,
        /// Learning-rate schedule.
        #[arg(long, value_enum, default_value_t = LrSchedule::Cosine)]
        lr_schedule: LrSchedule,
        /// Warmup steps of the cosine schedule.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        warmup_steps: u64,
        /// Peak learning rate.
        #[arg(long, default_value_t = 1e-3, conflicts_with = "blr", allow_hyphen_values = true, value_parser = positive_f64)]
        lr: f64,
        /// Base learning rate for the paper's rule instead of --lr: peak = blr x images per
        /// step / 256 x crops per image / 2 (2e-4 in the paper's recipe).
        #[arg(long, allow_hyphen_values = true, value_parser = positive_f64)]
        blr: Option<f64>,
        /// Decoupled weight decay (tensors with ndim >= 2, no bias/norm).
        #[arg(long, default_value_t = 0.1, allow_hyphen_values = true, value_parser = non_negative_f32)]
        weight_decay: f32,
        /// Loss temperature.
        #[arg(long, default_value_t = 0.1, allow_hyphen_values = true, value_parser = positive_f32)]
        temperature: f32,
        /// Head dimension for checkpoints without a config (64 in every timm ViT size).
        #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = count)]
        head_dim: usize,
        /// Gradient caching: run the encoder in chunks of this many images (a divisor of
        /// captions-per-batch x images-per-caption), so GPU memory is bounded by the chunk and
        /// the head over the batch, not by the batch (the paper's 8,256 images on one GPU).
        /// The gradients are the unchunked step's (docs/scale.md).
        #[arg(long, allow_negative_numbers = true, value_parser = count)]
        chunk: Option<usize>,
        /// Output folder (checkpoint-last.safetensors, metrics.jsonl).
        #[arg(long)]
        out: std::path::PathBuf,
        /// With --fixed-batch: write the first step's gradients here (safetensors, f32, under
        /// the parameters' names), to compare with PyTorch's.
        #[arg(long)]
        save_grads: Option<std::path::PathBuf>,
    },
    /// Write the CLS features of normalized images with a checkpoint's encoder.
    Embed {
        /// Checkpoint (official names, visual.*).
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        /// safetensors file holding `images` [N, 3, H, W], normalized.
        #[arg(long, conflicts_with = "images", required_unless_present = "images")]
        input_tensor: Option<std::path::PathBuf>,
        /// Image files (PNG/JPEG): resized, center-cropped and normalized as for evaluation.
        /// Or one labelled folder (`DIR/<class>/<image>`) or one file list (`.txt`, a path per
        /// line): then --out is a feature cache folder of safetensors shards (`features`,
        /// `labels`) that `probe --features` reads (docs/scale.md).
        #[arg(long, num_args = 1..)]
        images: Vec<std::path::PathBuf>,
        /// Output safetensors file (`features` [N, D]), or the cache folder.
        #[arg(long)]
        out: std::path::PathBuf,
        /// With a folder or a list: images per cache shard.
        #[arg(long, default_value_t = stablerep::eval::cache::SHARD_ROWS, allow_negative_numbers = true, value_parser = count)]
        rows_per_shard: usize,
        /// Head dimension for checkpoints without a config.
        #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = count)]
        head_dim: usize,
    },
    /// Evaluate a checkpoint's frozen encoder on labelled image folders (one sub-folder per
    /// class): kNN (cosine, temperature-weighted votes) or N-way K-shot nearest prototype.
    Probe {
        /// Checkpoint (official names, visual.*).
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        /// Labelled training images (kNN's memory bank).
        #[arg(long)]
        train: Option<std::path::PathBuf>,
        /// Labelled test images.
        #[arg(long)]
        test: std::path::PathBuf,
        /// Evaluation.
        #[arg(long, value_enum, default_value_t = ProbeMethod::Knn)]
        method: ProbeMethod,
        /// Neighbours for kNN.
        #[arg(long, default_value_t = 20, allow_negative_numbers = true, value_parser = count)]
        k: usize,
        /// Vote temperature for kNN.
        #[arg(long, default_value_t = 0.07, allow_hyphen_values = true, value_parser = positive_f64)]
        temperature: f64,
        /// Few-shot ways.
        #[arg(long, default_value_t = 5, allow_negative_numbers = true, value_parser = at_least_2)]
        ways: usize,
        /// Few-shot shots.
        #[arg(long, default_value_t = 5, allow_negative_numbers = true, value_parser = count)]
        shots: usize,
        /// Few-shot queries per class.
        #[arg(long, default_value_t = 6, allow_negative_numbers = true, value_parser = count)]
        queries: usize,
        /// Few-shot episodes.
        #[arg(long, default_value_t = 1000, allow_negative_numbers = true, value_parser = count)]
        episodes: usize,
        /// Linear probe epochs.
        #[arg(long, default_value_t = 90, allow_negative_numbers = true, value_parser = count)]
        epochs: usize,
        /// Linear probe batch size.
        #[arg(long, default_value_t = 256, allow_negative_numbers = true, value_parser = count)]
        batch_size: usize,
        /// Linear probe without the BatchNorm in front.
        #[arg(long)]
        no_bn: bool,
        /// Head dimension for checkpoints without a config.
        #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = count)]
        head_dim: usize,
        /// Feature cache folder: `train/` and `test/` in it are read when they hold this
        /// checkpoint's features of the same images, and written otherwise, so a second probe
        /// does not embed again. A cache of another checkpoint is refused.
        #[arg(long)]
        features: Option<std::path::PathBuf>,
    },
    /// Render the built-in mini-world: a pool of captions with their "real" renders (official
    /// layout), or with --labelled a folder per class for evaluation.
    World {
        /// Output folder.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Captions (scenes) to render.
        #[arg(long, default_value_t = 1000, allow_negative_numbers = true, value_parser = count)]
        captions: usize,
        /// Renders per caption (pool only; each lays the caption out anew).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = count)]
        images_per_caption: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = world_side)]
        size: usize,
        /// Seed of the captions.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        seed: u64,
        /// Seed of the layouts (default: the captions' seed).
        #[arg(long, allow_negative_numbers = true)]
        layout_seed: Option<u64>,
        /// Write `<label>/<n>.png` (labelled by the main object's shape or colour, or the
        /// background colour) instead of a pool.
        #[arg(long, value_enum)]
        labelled: Option<WorldLabel>,
        /// Which world: the full one, or the demo's simple one.
        #[arg(long, value_enum, default_value = "full")]
        world: WorldKind,
    },
    /// The StableRep experiment in miniature on the mini-world's simple world: render an
    /// oracle pool (fresh renders per caption) and a real pool, generate a synthetic pool with
    /// the built-in model and measure its fidelity with the judge, train seven arms at equal
    /// views and steps (supervised; StableRep and SimCLR on oracle and synthetic images; SimCLR
    /// on real renders; untrained), score each on held-out real renders (kNN and linear
    /// probe), print a table and write results.json and plots. About 12 - 15 minutes on 2 CPU cores
    /// (software adapter); --quick about 2. Resumes when run again with the same --out and settings
    /// (the folder records them in settings.txt and refuses others).
    Demo {
        /// The small run (about 2 minutes on 2 CPU cores).
        #[arg(long)]
        quick: bool,
        /// Output folder (pools, runs, results.json, results.png).
        #[arg(long, default_value = "demo-out")]
        out: std::path::PathBuf,
        /// Text-to-image model (a diffusers folder); default the built-in one (assets/world-sd).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Guidance scale of the generation.
        #[arg(long, allow_hyphen_values = true, value_parser = non_negative_f64)]
        guidance: Option<f64>,
        /// Images per caption (m).
        #[arg(long, allow_negative_numbers = true, value_parser = at_least_2)]
        images_per_caption: Option<usize>,
        /// Training captions.
        #[arg(long, allow_negative_numbers = true, value_parser = count)]
        captions: Option<usize>,
        /// Training steps per method.
        #[arg(long, allow_negative_numbers = true, value_parser = count_u64)]
        steps: Option<u64>,
        /// Views per training step, the same for every method (32; even, a multiple of the
        /// images per caption, at most twice the captions). Larger batches give the
        /// contrastive losses more negatives (docs/results.md, Result 6).
        #[arg(long, allow_negative_numbers = true, value_parser = count)]
        views: Option<usize>,
        /// The encoder's stem (patch: timm's patch embedding, the default; conv: 3 x 3
        /// stride-2 convolutions, which learn shape far sooner; docs/results.md, Result 6).
        #[arg(long, value_enum)]
        stem: Option<StemArg>,
        /// How each arm's fresh encoder is initialized (official: timm's normal(0, 0.02), the
        /// default; torch: PyTorch's module defaults, with which a small supervised encoder
        /// learns shape far sooner; docs/results.md, Result 6).
        #[arg(long, value_enum)]
        init: Option<InitArg>,
        /// Seed of captions, generation and training.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        seed: u64,
        /// The fidelity judge; default the built-in one (assets/world-judge).
        #[arg(long)]
        judge: Option<std::path::PathBuf>,
    },
    /// Measure a text-to-image model's fidelity and diversity on the mini-world with the
    /// fidelity judge: generate images of the world's captions, read each image's shape,
    /// colour and background with the judge and compare them with what the caption says;
    /// diversity is the mean pairwise distance of the judge's features among a caption's
    /// images (real renders' diversity printed next to it).
    Fidelity {
        /// Text-to-image model (a diffusers folder); default the built-in one.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// The judge; default the built-in one (assets/world-judge).
        #[arg(long)]
        judge: Option<std::path::PathBuf>,
        /// Guidance scale.
        #[arg(long, default_value_t = 2.0, allow_hyphen_values = true, value_parser = non_negative_f64)]
        guidance: f64,
        /// Sampler steps (DPM-Solver++ 2M, Karras sigmas).
        #[arg(long, default_value_t = 20, allow_negative_numbers = true, value_parser = count)]
        steps: usize,
        /// Captions (drawn from the judge's world).
        #[arg(long, default_value_t = 48, allow_negative_numbers = true, value_parser = count)]
        captions: usize,
        /// Images per caption.
        #[arg(long, default_value_t = 4, allow_negative_numbers = true, value_parser = at_least_2)]
        images_per_caption: usize,
        /// Seed of the captions and noise (the built-in model trained on seed 0's captions).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        seed: u64,
        /// Also write the numbers as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Work on training pools.
    Pool {
        /// What to do.
        #[command(subcommand)]
        action: PoolAction,
    },
    /// Train a small MLP on three spirals through the graph executor (an engine smoke test).
    EngineDemo {
        /// Optimizer steps.
        #[arg(long, default_value_t = 300, allow_negative_numbers = true, value_parser = count)]
        steps: usize,
        /// Hidden width.
        #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = count)]
        hidden: usize,
        /// Learning rate.
        #[arg(long, default_value_t = 1e-2, allow_hyphen_values = true, value_parser = positive_f32)]
        lr: f32,
        /// Random seed.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        seed: u64,
    },
}

/// `stablerep pool ...`.
#[derive(Subcommand)]
enum PoolAction {
    /// Rewrite a pool in the other layout: the official folders (captions.csv, seed_*/) or
    /// WebDataset shards. Image bytes are copied as they are; captions keep their order.
    Convert {
        /// The pool to read (either layout).
        #[arg(long)]
        from: std::path::PathBuf,
        /// The folder to write (new or empty).
        #[arg(long)]
        to: std::path::PathBuf,
        /// Layout to write: folder or webdataset.
        #[arg(long, value_parser = ["folder", "webdataset"])]
        format: String,
        /// With --format webdataset: captions per shard.
        #[arg(long, default_value_t = 1000, allow_negative_numbers = true, value_parser = count)]
        captions_per_shard: usize,
    },
}

/// Training methods.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Method {
    /// Multi-positive: the m images of a caption are positives.
    Stablerep,
    /// The control: one image per caption, m augmentations (use m = 2).
    Simclr,
    /// StableRep+ (language supervision): the multi-positive loss plus the image-text loss.
    StablerepPlus,
}

/// The ViT's stem (`models::vit::Stem`).
#[derive(Clone, Copy, ValueEnum)]
enum StemArg {
    /// timm's patch embedding: one p x p convolution at stride p.
    Patch,
    /// log2(p) 3 x 3 convolutions at stride 2 (GroupNorm, SiLU), then a 1 x 1 to the width;
    /// p must be a power of two and width / 4 a multiple of 8 (or the width under 32).
    Conv,
}

impl From<StemArg> for stablerep::models::vit::Stem {
    fn from(s: StemArg) -> Self {
        match s {
            StemArg::Patch => Self::Patch,
            StemArg::Conv => Self::Conv,
        }
    }
}

/// A fresh encoder's initialization (`models::stablerep::Init`).
#[derive(Clone, Copy, ValueEnum)]
enum InitArg {
    /// The official code's (timm's): matrices, CLS token and positions normal(0, 0.02).
    Official,
    /// PyTorch's module defaults (nn.Linear, nn.MultiheadAttention).
    Torch,
}

impl From<InitArg> for stablerep::models::stablerep::Init {
    fn from(s: InitArg) -> Self {
        match s {
            InitArg::Official => Self::Official,
            InitArg::Torch => Self::Torch,
        }
    }
}

/// ViT presets (timm).
#[derive(Clone, Copy, ValueEnum)]
enum ModelSize {
    /// ViT-Ti: 192 wide, 12 deep, 3 heads.
    Tiny,
    /// ViT-S: 384, 12, 6.
    Small,
    /// ViT-B: 768, 12, 12.
    Base,
    /// ViT-L: 1024, 24, 16.
    Large,
}

/// Frozen-feature evaluations.
#[derive(Clone, Copy, ValueEnum)]
enum ProbeMethod {
    /// Weighted k-nearest neighbours on cosine similarity.
    Knn,
    /// N-way K-shot nearest class prototype.
    Fewshot,
    /// Linear classifiers (one per learning rate) on frozen features; best head reported.
    Linear,
}

/// Labels of a labelled mini-world export.
#[derive(Clone, Copy, ValueEnum)]
enum WorldLabel {
    /// The main object's shape.
    Shape,
    /// The main object's colour.
    Colour,
    /// The background colour.
    Ground,
}

/// Which mini-world.
#[derive(Clone, Copy, ValueEnum)]
enum WorldKind {
    /// One or two objects, 12 shapes, 8 colours, captions that name everything.
    Full,
    /// The demo's: one large object, 6 shapes, 6 colours, captions that leave the rest out.
    Simple,
}

impl WorldKind {
    fn world(self) -> stablerep::world::World {
        match self {
            WorldKind::Full => stablerep::world::World::Full,
            WorldKind::Simple => stablerep::world::World::Simple,
        }
    }
}

/// Learning-rate schedules.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LrSchedule {
    /// Linear warmup, then cosine to zero.
    Cosine,
    /// Constant.
    Constant,
}

/// Flag values a command refuses at parse time, so clap's message names the flag.
fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn count_u64(s: &str) -> Result<u64, String> {
    count(s).map(|v| v as u64)
}

fn at_least_2(s: &str) -> Result<usize, String> {
    match count(s)? {
        1 => Err(
            "must be at least 2 (a caption's images or crops are each other's positives)".into(),
        ),
        v => Ok(v),
    }
}

fn finite_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("must be a finite number, not {v}")),
        Err(e) => Err(e.to_string()),
    }
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match finite_f64(s)? {
        v if v > 0.0 => Ok(v),
        v => Err(format!("must be positive, not {v}")),
    }
}

fn positive_f32(s: &str) -> Result<f32, String> {
    positive_f64(s).map(|v| v as f32)
}

fn non_negative_f64(s: &str) -> Result<f64, String> {
    match finite_f64(s)? {
        v if v >= 0.0 => Ok(v),
        v => Err(format!("must not be negative, not {v}")),
    }
}

fn non_negative_f32(s: &str) -> Result<f32, String> {
    non_negative_f64(s).map(|v| v as f32)
}

fn unit_f64(s: &str) -> Result<f64, String> {
    match finite_f64(s)? {
        v if (0.0..=1.0).contains(&v) => Ok(v),
        v => Err(format!("must be in [0, 1], not {v}")),
    }
}

/// A Stable Diffusion image side up to 2,048 (4x SD 1.x's training size; attention over more
/// latent tokens does not fit any device). The model checks its own VAE factor.
fn sd_side(s: &str) -> Result<usize, String> {
    match count(s)? {
        v if v > 2048 => Err(format!("must be at most 2048, not {v}")),
        v => Ok(v),
    }
}

/// A saved image's side: 1 to 8,192 pixels.
fn image_side(s: &str) -> Result<usize, String> {
    match count(s)? {
        v if v > 8192 => Err(format!("must be at most 8192, not {v}")),
        v => Ok(v),
    }
}

/// The mini-world's render size: 8 to 1,024 pixels.
fn world_side(s: &str) -> Result<usize, String> {
    match count(s)? {
        v if !(8..=1024).contains(&v) => Err(format!("must be 8 to 1024 pixels, not {v}")),
        v => Ok(v),
    }
}

fn main() -> ExitCode {
    quiet_wayland_probe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = given_flags(&matches);
    match run(cli, &given) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Without a Wayland session (no `WAYLAND_DISPLAY`) and without `XDG_RUNTIME_DIR`, probing
/// the Vulkan drivers makes libwayland print "error: XDG_RUNTIME_DIR is invalid or not set"
/// once per driver: errors that are not errors, on every headless run. Pointing the variable
/// at the temporary folder (where no Wayland socket is) keeps the probe quiet; a Wayland
/// session always has both variables set, so nothing changes there.
fn quiet_wayland_probe() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && std::env::var_os("WAYLAND_DISPLAY").is_none()
    {
        // Single-threaded here: first thing in main.
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}

/// The flags given on the command line to the subcommand, by clap id (`fixed_batch`).
type Given = std::collections::BTreeSet<String>;

fn given_flags(m: &clap::ArgMatches) -> Given {
    let Some((name, sub)) = m.subcommand() else {
        return Given::new();
    };
    // Arguments only (clap also reports the variant's argument group).
    let cmd = Cli::command();
    let mut found = cmd.find_subcommand(name);
    let mut sub = sub;
    // A nested action (`pool convert`): its own flags.
    if let Some((inner, m)) = sub.subcommand() {
        found = found.and_then(|c| c.find_subcommand(inner));
        sub = m;
    }
    let args: Vec<String> = found
        .map(|c| c.get_arguments().map(|a| a.get_id().to_string()).collect())
        .unwrap_or_default();
    sub.ids()
        .map(|id| id.as_str())
        .filter(|id| args.iter().any(|a| a == id))
        .filter(|id| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .map(str::to_string)
        .collect()
}

fn flag(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

/// Refuses any of `flags` that was given: `why` says why it would have no effect.
fn refuse(given: &Given, flags: &[&str], why: &str) -> stablerep::Result<()> {
    match flags.iter().find(|f| given.contains(**f)) {
        Some(f) => Err(stablerep::Error::Config(format!("{} {why}", flag(f)))),
        None => Ok(()),
    }
}

/// Refuses every given flag outside `allowed` (and the global `--adapter`): a flag a mode
/// does not read is an error, never silently ignored.
fn only(given: &Given, allowed: &[&str], mode: &str) -> stablerep::Result<()> {
    match given
        .iter()
        .find(|g| g.as_str() != "adapter" && !allowed.contains(&g.as_str()))
    {
        Some(g) => Err(stablerep::Error::Config(format!(
            "{} has no effect {mode}; leave it out",
            flag(g)
        ))),
        None => Ok(()),
    }
}

/// What `train --fixed-batch` reads; the model, its sizes and the start come from `--init`.
const FIXED_BATCH_FLAGS: &[&str] = &[
    "fixed_batch",
    "init",
    "method",
    "captions_per_batch",
    "images_per_caption",
    "steps",
    "lr",
    "blr",
    "lr_schedule",
    "warmup_steps",
    "weight_decay",
    "temperature",
    "head_dim",
    "no_augment",
    "out",
    "save_grads",
    "chunk",
];

/// StableRep+'s text tower flags.
const TEXT_FLAGS: &[&str] = &[
    "text_width",
    "text_layers",
    "text_heads",
    "text_context",
    "embed_dim",
];

fn run(cli: Cli, given: &Given) -> stablerep::Result<()> {
    let opts = GpuOptions {
        adapter: cli.adapter.clone(),
        ..Default::default()
    };
    match cli.cmd {
        Cmd::Info { json } => info(&opts, json),
        #[cfg(feature = "app")]
        Cmd::App {
            panel,
            model,
            prompt,
            start,
            settings,
        } => {
            let panel = match panel {
                Some(p) => Some(stablerep::app::Panel::parse(&p).ok_or_else(|| {
                    stablerep::Error::Config(format!(
                        "--panel {p}: want device, generate, pool, train or evaluate"
                    ))
                })?),
                None => None,
            };
            stablerep::app::run(stablerep::app::Launch {
                settings_path: settings,
                panel,
                model,
                prompt,
                start,
                gpu: opts,
            })
        }
        Cmd::Generate {
            model,
            config,
            prompt,
            captions,
            shard,
            resume,
            format,
            captions_per_shard,
            negative_prompt,
            images_per_prompt,
            guidance,
            steps,
            sampler,
            eta,
            seed,
            size,
            save_size,
            weights,
            precision,
            out,
            init_noise,
            save_latents,
            save_tensor,
        } => {
            use stablerep::diffusion::model::{generate, GenerateOptions, SdModel};
            use stablerep::diffusion::sampler::Kind;
            use stablerep::progress::{Bar, Stream};
            use std::time::Duration;
            if captions.is_some() {
                refuse(
                    given,
                    &["prompt", "save_latents", "save_tensor"],
                    "is for a single --prompt; with --captions every caption is a prompt and the pool holds only PNGs",
                )?;
            } else {
                refuse(
                    given,
                    &["shard", "resume", "format", "captions_per_shard"],
                    "applies only to a pool (--captions FILE)",
                )?;
            }
            if format != "webdataset" {
                refuse(
                    given,
                    &["captions_per_shard"],
                    "applies only to --format webdataset",
                )?;
            }
            if !sampler.eq_ignore_ascii_case("ddim") {
                refuse(given, &["eta"], "applies only to --sampler ddim")?;
            }
            let kind = Kind::parse(&sampler, eta)?;
            use stablerep::nn::checkpoint::{Checkpoint, HostTensor};
            let model = match model {
                Some(m) => m,
                None => stablerep::world::builtin_model()?,
            };
            let m = SdModel::load_with_config(&model, config.as_deref())?;
            let size = size.unwrap_or_else(|| m.native_size());
            let init_noise = match init_noise {
                Some(p) => Some(Checkpoint::load(&p)?.get("latents", None)?.data.clone()),
                None => None,
            };
            let o = GenerateOptions {
                prompt: prompt.clone().unwrap_or_default(),
                negative: negative_prompt,
                images: images_per_prompt,
                guidance,
                steps,
                sampler: kind,
                seed,
                caption: 0,
                size,
                save_size,
                half_weights: match weights.as_str() {
                    "auto" => None,
                    "f16" => Some(true),
                    "f32" => Some(false),
                    other => {
                        return Err(stablerep::Error::Config(format!(
                            "--weights '{other}': want auto, f16 or f32"
                        )))
                    }
                },
                half_activations: match precision.as_str() {
                    "auto" => None,
                    "f16" => Some(true),
                    "f32" => Some(false),
                    other => {
                        return Err(stablerep::Error::Config(format!(
                            "--precision '{other}': want auto, f16 or f32"
                        )))
                    }
                },
                init_noise,
            };
            o.check(&m)?;
            if let Some(file) = captions {
                use stablerep::diffusion::model::{generate_pool, shard_range};
                let caps = stablerep::data::pool::read_captions(&file)?;
                let sh = shard
                    .split_once('/')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                    .ok_or_else(|| {
                        stablerep::Error::Config(format!("--shard '{shard}': want i/N"))
                    })?;
                let webdataset = format == "webdataset";
                let n = if webdataset {
                    stablerep::diffusion::model::shards_of(caps.len(), captions_per_shard, sh)?
                        .len()
                } else {
                    shard_range(caps.len(), sh)?.len()
                };
                if n == 0 {
                    return Err(stablerep::Error::Config(format!(
                        "{}: no {} in shard {shard}",
                        file.display(),
                        if webdataset { "tar shards" } else { "captions" }
                    )));
                }
                let gpu = Gpu::new(&opts)?;
                let mut bar = Bar::new(0, Stream::Stderr, Duration::from_secs(10));
                let report = |p: &stablerep::diffusion::model::PoolProgress| {
                    bar.set_total(p.total());
                    if p.skipped {
                        bar.skip(p.image.total());
                    }
                    bar.update(p.done(), &p.to_string());
                    Ok(())
                };
                let written = if webdataset {
                    stablerep::diffusion::model::generate_shards(
                        &gpu,
                        &m,
                        &o,
                        &caps,
                        sh,
                        captions_per_shard,
                        resume,
                        &out,
                        report,
                    )?
                } else {
                    generate_pool(&gpu, &m, &o, &caps, sh, resume, &out, report)?
                };
                println!("{written} images in {}", out.display());
                return Ok(());
            }
            let gpu = Gpu::new(&opts)?;
            let mut bar = Bar::new(0, Stream::Stderr, Duration::from_secs(10));
            let images = generate(&gpu, &m, &o, |p| {
                bar.set_total(p.total());
                bar.update(p.done(), &p.to_string());
                Ok(())
            })?;
            for (k, img) in images.images.iter().enumerate() {
                let p = out.join(format!("{k:05}.png"));
                stablerep::diffusion::model::save_image(&p, size, save_size, img)?;
                println!("{}", p.display());
            }
            let save =
                |path: &std::path::Path, name: &str, rows: &[Vec<f32>], shape: Vec<usize>| {
                    let mut ck = Checkpoint::default();
                    let data = rows.concat();
                    ck.tensors.insert(name.into(), HostTensor { shape, data });
                    ck.save(path)
                };
            let lat = size / m.vae.downscale();
            let n = images.images.len();
            if let Some(p) = save_latents {
                save(
                    &p,
                    "latents",
                    &images.latents,
                    vec![n, m.unet.in_channels, lat, lat],
                )?;
            }
            if let Some(p) = save_tensor {
                save(&p, "images", &images.images, vec![n, 3, size, size])?;
            }
            Ok(())
        }
        Cmd::Probe {
            checkpoint,
            train,
            test,
            method,
            k,
            temperature,
            ways,
            shots,
            queries,
            episodes,
            epochs,
            batch_size,
            no_bn,
            head_dim,
            features,
        } => {
            use stablerep::eval::{knn, linear, probe};
            let method = match method {
                ProbeMethod::Knn => probe::Method::Knn { k, temperature },
                ProbeMethod::Linear => probe::Method::Linear(linear::ProbeConfig {
                    epochs,
                    batch: batch_size,
                    batch_norm: !no_bn,
                    ..Default::default()
                }),
                ProbeMethod::Fewshot => probe::Method::FewShot(knn::FewShot {
                    ways,
                    shots,
                    queries,
                    episodes,
                    seed: 0,
                }),
            };
            let gpu = Gpu::new(&opts)?;
            let out = probe::run(
                &gpu,
                &probe::Request {
                    checkpoint,
                    head_dim,
                    train,
                    test,
                    method,
                    features,
                },
            )?;
            if out.cached > 0 {
                eprintln!("features of {} images read from the cache", out.cached);
            }
            if out.embedded.0 > 0 {
                eprintln!(
                    "embedded {} images in {:.1} s ({:.1} images/s)",
                    out.embedded.0,
                    out.embedded.1,
                    out.embedded.0 as f64 / out.embedded.1.max(1e-9)
                );
            }
            for (lr, a) in &out.per_lr {
                eprintln!("  base lr {lr}: {:.2}%", a * 100.0);
            }
            let acc = out.accuracy;
            println!("top-1 accuracy: {:.2}%", acc * 100.0);
            Ok(())
        }
        Cmd::Embed {
            checkpoint,
            input_tensor,
            images,
            out,
            head_dim,
            rows_per_shard,
        } => {
            use stablerep::models::features;
            let cache_mode = input_tensor.is_none()
                && images.len() == 1
                && (images[0].is_dir() || images[0].extension().is_some_and(|x| x == "txt"));
            if !cache_mode {
                refuse(
                    given,
                    &["rows_per_shard"],
                    "applies only to a feature cache (--images DIR or a .txt list)",
                )?;
            }
            let gpu = Gpu::new(&opts)?;
            let n = match input_tensor {
                Some(input) => features::embed_files(&gpu, &checkpoint, &input, &out, head_dim)?,
                None if cache_mode => {
                    use stablerep::eval::cache;
                    let src = cache::Source::open(&images[0])?;
                    let ck = stablerep::nn::checkpoint::Checkpoint::load(&checkpoint)?;
                    let mut bar = stablerep::progress::Bar::new(
                        src.paths.len() as u64,
                        stablerep::progress::Stream::Stderr,
                        std::time::Duration::from_secs(5),
                    );
                    let t0 = std::time::Instant::now();
                    cache::write(
                        &gpu,
                        &ck,
                        head_dim,
                        &src,
                        &images[0].display().to_string(),
                        &out,
                        rows_per_shard,
                        false,
                        |done, total| {
                            bar.update(done as u64, &format!("embedded {done}/{total} images"));
                        },
                    )?;
                    let s = t0.elapsed().as_secs_f64();
                    eprintln!(
                        "embedded {} images in {s:.1} s ({:.1} images/s)",
                        src.paths.len(),
                        src.paths.len() as f64 / s.max(1e-9)
                    );
                    src.paths.len()
                }
                None => {
                    let mut bar = stablerep::progress::Bar::new(
                        images.len() as u64,
                        stablerep::progress::Stream::Stderr,
                        std::time::Duration::from_secs(5),
                    );
                    features::embed_images(
                        &gpu,
                        &checkpoint,
                        &images,
                        &out,
                        head_dim,
                        |done, total| {
                            bar.update(done as u64, &format!("embedded {done}/{total} images"));
                        },
                    )?
                }
            };
            println!("wrote {n} feature vectors to {}", out.display());
            Ok(())
        }
        Cmd::Train {
            pool,
            images: image_folder,
            source_size,
            fixed_batch,
            init,
            method,
            text_width,
            text_layers,
            text_heads,
            text_context,
            embed_dim,
            model,
            img_size,
            patch,
            stem,
            width,
            depth,
            heads,
            head_hidden,
            head_out,
            seed,
            checkpoint_every,
            log_every,
            resume,
            captions_per_batch,
            images_per_caption,
            steps,
            epochs,
            no_augment,
            lr_schedule,
            warmup_steps,
            lr,
            blr,
            weight_decay,
            temperature,
            head_dim,
            chunk,
            out,
            save_grads,
        } => {
            use stablerep::nn::schedule::Schedule;
            if fixed_batch.is_some() {
                only(
                    given,
                    FIXED_BATCH_FLAGS,
                    "with --fixed-batch (the model and its start come from --init, the images from the batch)",
                )?;
            } else {
                refuse(given, &["save_grads"], "applies only to --fixed-batch")?;
                if method != Method::StablerepPlus {
                    refuse(given, TEXT_FLAGS, "applies only to --method stablerep-plus")?;
                }
                if init.is_none() && !resume {
                    refuse(
                        given,
                        &["head_dim"],
                        "is read only with --init or --resume (to infer a checkpoint's heads)",
                    )?;
                }
            }
            if lr_schedule == LrSchedule::Constant {
                refuse(
                    given,
                    &["warmup_steps"],
                    "has no effect with --lr-schedule constant",
                )?;
            }
            // The paper's rule: StableRep sees m images of a caption once each; the SimCLR
            // control sees one image through m crops.
            let lr = match blr {
                Some(b) => {
                    let (imgs, crops) = if method == Method::Simclr {
                        (1, images_per_caption)
                    } else {
                        (images_per_caption, 1)
                    };
                    let peak = stablerep::nn::schedule::peak_lr(b, captions_per_batch, imgs, crops);
                    println!("peak learning rate {peak:.4e} (base {b:e}, the paper's rule)");
                    peak
                }
                None => lr,
            };
            let labelled = image_folder.is_some();
            if labelled && method != Method::Simclr {
                return Err(stablerep::Error::Config(
                    "--images holds one image per caption: train it with --method simclr (StableRep needs several images per caption, from a pool)".into(),
                ));
            }
            let pool = pool.or(image_folder);
            let steps = match (epochs, &pool) {
                (Some(e), Some(dir)) => {
                    if !(e > 0.0 && e.is_finite()) || captions_per_batch == 0 {
                        return Err(stablerep::Error::Config(format!(
                            "--epochs must be positive (got {e}) and --captions-per-batch at least 1"
                        )));
                    }
                    let captions = if labelled {
                        stablerep::data::pool::Pool::from_labelled_folder(dir)?
                    } else {
                        stablerep::data::pool::Pool::open(dir)?
                    }
                    .captions
                    .len();
                    let per_epoch = captions / captions_per_batch;
                    if per_epoch == 0 {
                        return Err(stablerep::Error::Config(format!(
                            "the pool has {captions} captions, fewer than one batch of {captions_per_batch}"
                        )));
                    }
                    (e * per_epoch as f64).ceil() as u64
                }
                (Some(_), None) => {
                    return Err(stablerep::Error::Config(
                        "--epochs needs --pool (a fixed batch has no epochs)".into(),
                    ))
                }
                (None, _) => steps,
            };
            let schedule = match lr_schedule {
                LrSchedule::Constant => Schedule::Constant,
                LrSchedule::Cosine => Schedule::Cosine {
                    warmup: warmup_steps,
                    total: steps,
                },
            };
            let t0 = std::time::Instant::now();
            let images = (captions_per_batch * images_per_caption) as f64;
            let mut first: Option<u64> = None;
            // On a terminal: one bar redrawn in place; otherwise one line per logged step.
            let mut bar = stablerep::progress::Bar::new(
                steps,
                stablerep::progress::Stream::Stdout,
                std::time::Duration::ZERO,
            );
            let progress = |step: u64, loss: f32, lr: f64| {
                let from = *first.get_or_insert_with(|| {
                    let from = step.saturating_sub(1);
                    bar.skip(from);
                    from
                });
                let done = (step - from) as f64;
                let secs = t0.elapsed().as_secs_f64();
                bar.update(
                    step,
                    &format!(
                        "step {step}/{steps}  loss {loss:.5}  lr {lr:.3e}  {:.1} images/s",
                        images * done / secs
                    ),
                );
            };
            if let Some(c) = chunk {
                // Checked before any GPU work (the step checks it again).
                let rows = captions_per_batch * images_per_caption;
                if !rows.is_multiple_of(c) {
                    return Err(stablerep::Error::Config(format!(
                        "--chunk {c} must divide the batch of {rows} images (--captions-per-batch {captions_per_batch} x --images-per-caption {images_per_caption})"
                    )));
                }
            }
            let gpu = Gpu::new(&opts)?;
            if let Some(batch) = fixed_batch {
                if !no_augment {
                    return Err(stablerep::Error::Config(
                        "a fixed batch is used as it is: pass --no-augment".into(),
                    ));
                }
                let init = init
                    .ok_or_else(|| stablerep::Error::Config("--fixed-batch needs --init".into()))?;
                let run = stablerep::train::fixed::FixedBatchRun {
                    init,
                    batch,
                    captions: captions_per_batch,
                    images_per_caption,
                    steps,
                    lr,
                    schedule,
                    weight_decay,
                    temperature,
                    head_dim,
                    plus: method == Method::StablerepPlus,
                    out,
                    save_grads,
                    chunk,
                };
                let report = stablerep::train::fixed::run(&gpu, &run, progress)?;
                println!("wrote {}", report.checkpoint.display());
                return Ok(());
            }
            let pool = pool.ok_or_else(|| {
                stablerep::Error::Config(
                    "pass --pool DIR (a synthetic pool), --images DIR (a labelled folder of real images) or --fixed-batch BATCH.safetensors".into(),
                )
            })?;
            let (w, d, h) = match model {
                ModelSize::Tiny => (192, 12, 3),
                ModelSize::Small => (384, 12, 6),
                ModelSize::Base => (768, 12, 12),
                ModelSize::Large => (1024, 24, 16),
            };
            let (w, d, h) = (width.unwrap_or(w), depth.unwrap_or(d), heads.unwrap_or(h));
            let vit = stablerep::models::vit::VitConfig {
                img_size,
                patch,
                width: w,
                depth: d,
                heads: h,
                mlp: 4 * w,
                stem: stem.into(),
            };
            vit.validate()?;
            let plus = if method == Method::StablerepPlus {
                let text = stablerep::models::text::TextConfig {
                    context: text_context,
                    vocab: stablerep::text::tokenizer::VOCAB,
                    width: text_width,
                    layers: text_layers,
                    heads: text_heads,
                    mlp: 4 * text_width,
                };
                text.validate()?;
                Some(stablerep::models::stablerep::PlusConfig {
                    text,
                    embed: embed_dim,
                })
            } else {
                None
            };
            let run = stablerep::train::pool_run::PoolRun {
                pool,
                model: stablerep::models::config::ModelConfig {
                    vit,
                    head: stablerep::models::stablerep::HeadConfig {
                        hidden: head_hidden,
                        out: head_out,
                    },
                    plus,
                },
                init,
                fresh_init: stablerep::models::stablerep::Init::Official,
                captions: captions_per_batch,
                images_per_caption,
                steps,
                lr,
                schedule,
                weight_decay,
                temperature,
                augment: !no_augment,
                augment_config: None,
                simclr: method == Method::Simclr,
                seed,
                checkpoint_every,
                log_every,
                out: out.clone(),
                resume,
                labelled_folder: labelled,
                source_size: source_size.or(labelled.then(|| (img_size * 8).div_ceil(7))),
                head_dim,
                chunk,
            };
            stablerep::train::pool_run::run(&gpu, &run, progress, &|| false)?;
            println!(
                "wrote {}",
                out.join("checkpoint-last.safetensors").display()
            );
            Ok(())
        }
        Cmd::World {
            out,
            captions,
            images_per_caption,
            size,
            seed,
            layout_seed,
            labelled,
            world,
        } => {
            use stablerep::progress::{Bar, Stream};
            use stablerep::world::export::{write_labelled, write_pool, LabelKind};
            use std::time::Duration;
            let ds = world.world().descriptions(captions, seed);
            let total = captions
                * if labelled.is_some() {
                    1
                } else {
                    images_per_caption
                };
            let mut bar = Bar::new(total as u64, Stream::Stderr, Duration::from_secs(10));
            let mut tick = |done: usize, _: usize| bar.update(done as u64, "rendering");
            let layout = layout_seed.unwrap_or(seed);
            match labelled {
                Some(l) => {
                    let kind = match l {
                        WorldLabel::Shape => LabelKind::Shape,
                        WorldLabel::Colour => LabelKind::Colour,
                        WorldLabel::Ground => LabelKind::Ground,
                    };
                    write_labelled(&out, &ds, kind, size, layout, &mut tick)?;
                }
                None => write_pool(&out, &ds, images_per_caption, size, layout, &mut tick)?,
            }
            println!("{total} images in {}", out.display());
            Ok(())
        }
        Cmd::Demo {
            quick,
            out,
            model,
            guidance,
            images_per_caption,
            captions,
            steps,
            views,
            stem,
            init,
            seed,
            judge,
        } => {
            let mut c = if quick {
                WorldDemo::quick(Default::default())
            } else {
                WorldDemo::new(Default::default())
            };
            c.seed = seed;
            if let Some(w) = guidance {
                c.guidance = w;
            }
            if let Some(m) = images_per_caption {
                c.images_per_caption = m;
            }
            if let Some(n) = captions {
                c.captions = n;
            }
            if let Some(n) = steps {
                c.train_steps = n;
            }
            if let Some(n) = views {
                c.views_per_step = n;
            }
            if let Some(s) = stem {
                c.vit.stem = s.into();
            }
            if let Some(i) = init {
                c.init = i.into();
            }
            c.check()?;
            c.judge = Some(match judge {
                Some(j) => {
                    if !j.is_file() {
                        return Err(stablerep::Error::Config(format!(
                            "--judge {}: no such file",
                            j.display()
                        )));
                    }
                    j
                }
                None => stablerep::world::judge::builtin_judge()?,
            });
            if let Some(j) = &c.judge {
                stablerep::world::judge::Judge::read(j)?;
            }
            c.model = match model {
                Some(m) => m,
                None => stablerep::world::builtin_model()?,
            };
            let gpu = Gpu::new(&opts)?;
            println!("device: {}", gpu.describe());
            println!(
                "model: {}\n{} captions x {} images at guidance {}, {} training steps per \
                 method of {} views; output in {}",
                c.model.display(),
                c.captions,
                c.images_per_caption,
                c.guidance,
                c.train_steps,
                c.views_per_step,
                out.display()
            );
            let mut bar: Option<(String, stablerep::progress::Bar)> = None;
            let results = stablerep::world::demo::run(&gpu, &c, &out, |s| {
                if bar.as_ref().map(|b| &b.0) != Some(&s.stage) {
                    let mut b = stablerep::progress::Bar::new(
                        s.total,
                        stablerep::progress::Stream::Stdout,
                        std::time::Duration::from_secs(5),
                    );
                    // Work done before a resume does not count toward the rate.
                    b.skip(s.done);
                    bar = Some((s.stage.clone(), b));
                }
                if let Some((_, b)) = bar.as_mut() {
                    b.set_total(s.total);
                    b.update(s.done, &format!("{}: {}/{}", s.stage, s.done, s.total));
                }
            })?;
            let f = &results.fidelity;
            println!(
                "\ngenerator fidelity (the judge on the synthetic pool): background {:.1}%, \
                 colour {:.1}%, shape {:.1}%; diversity {:.3} (real renders {:.3})",
                100.0 * f.background,
                100.0 * f.colour,
                100.0 * f.shape,
                f.diversity,
                f.real_diversity
            );
            println!(
                "top-1 accuracy of frozen features on held-out real renders, by the main \
                 object's colour ({} classes) and shape ({} classes):",
                c.world.colours().len(),
                c.world.shapes().len(),
            );
            print!("{}", stablerep::world::demo::table(&results.outcomes));
            println!(
                "wrote {}, {} and {}",
                out.join("results.json").display(),
                out.join("results.png").display(),
                out.join("losses.png").display()
            );
            Ok(())
        }
        Cmd::Pool {
            action:
                PoolAction::Convert {
                    from,
                    to,
                    format,
                    captions_per_shard,
                },
        } => {
            use stablerep::data::convert::{convert, Format};
            use stablerep::progress::{Bar, Stream};
            let format = Format::parse(&format).ok_or_else(|| {
                stablerep::Error::Config(format!("--format {format}: want folder or webdataset"))
            })?;
            if format != Format::WebDataset {
                refuse(
                    given,
                    &["captions_per_shard"],
                    "applies only to --format webdataset",
                )?;
            }
            let pool = stablerep::data::pool::Pool::open(&from)?;
            let mut bar = Bar::new(
                pool.captions.len() as u64,
                Stream::Stderr,
                std::time::Duration::from_secs(10),
            );
            let written = convert(&pool, &to, format, captions_per_shard, |done, total| {
                bar.update(done as u64, &format!("caption {done}/{total}"));
            })?;
            println!(
                "{written} images of {} captions in {}",
                pool.captions.len(),
                to.display()
            );
            Ok(())
        }
        Cmd::Fidelity {
            model,
            judge,
            guidance,
            steps,
            captions,
            images_per_caption,
            seed,
            json,
        } => {
            use stablerep::world::judge::{fidelity, FidelitySpec, Judge};
            let spec = FidelitySpec {
                captions,
                images_per_caption,
                guidance,
                steps,
                seed,
            };
            spec.check()?;
            let model = match model {
                Some(m) => m,
                None => stablerep::world::builtin_model()?,
            };
            let judge = match judge {
                Some(j) => j,
                None => stablerep::world::judge::builtin_judge()?,
            };
            if !judge.is_file() {
                return Err(stablerep::Error::Config(format!(
                    "--judge {}: no such file",
                    judge.display()
                )));
            }
            if let Some(j) = &json {
                check_output_file(j, "--json")?;
            }
            let sd = stablerep::diffusion::model::SdModel::load(&model)?;
            Judge::read(&judge)?;
            let gpu = Gpu::new(&opts)?;
            println!("device: {}", gpu.describe());
            let judge = Judge::load(&gpu, &judge)?;
            let total = (captions * images_per_caption) as u64;
            let mut bar = stablerep::progress::Bar::new(
                total,
                stablerep::progress::Stream::Stderr,
                std::time::Duration::from_secs(5),
            );
            let f = fidelity(&gpu, &sd, &judge, &spec, |done, _| {
                bar.update(done as u64, "generating")
            })?;
            println!(
                "{} images of {} captions of the {} world at guidance {guidance}, {steps} steps",
                f.images,
                captions,
                judge.run.world.name()
            );
            println!(
                "fidelity: background {:.1}%  colour {:.1}%  shape {:.1}%",
                100.0 * f.background,
                100.0 * f.colour,
                100.0 * f.shape
            );
            println!(
                "the judge on real renders of the same captions: background {:.1}%  colour \
                 {:.1}%  shape {:.1}%",
                100.0 * f.real[2],
                100.0 * f.real[1],
                100.0 * f.real[0]
            );
            println!(
                "diversity: {:.4} (real renders: {:.4})",
                f.diversity, f.real_diversity
            );
            if let Some(j) = json {
                let text = serde_json::to_string_pretty(&f).unwrap_or_default();
                stablerep::nn::checkpoint::write_atomic(&j, text.as_bytes())?;
                println!("wrote {}", j.display());
            }
            Ok(())
        }
        Cmd::EngineDemo {
            steps,
            hidden,
            lr,
            seed,
        } => {
            let gpu = Gpu::new(&opts)?;
            println!("device: {}", gpu.describe());
            let cfg = DemoConfig {
                steps,
                hidden,
                lr,
                seed,
                ..Default::default()
            };
            let r = train_mlp(&gpu, &cfg, (steps / 10).max(1), |step, loss| {
                println!("step {step:>5}  loss {loss:.4}");
            })?;
            println!(
                "trained: loss {:.4} -> {:.4}, training accuracy {:.1}%, {:.2} ms/step",
                r.first_loss,
                r.final_loss,
                r.accuracy * 100.0,
                r.ms_per_step
            );
            println!(
                "plan: {} nodes, {} dispatches in {} submit per step, intermediates {} KiB planned vs {} KiB unplanned",
                r.plan.nodes,
                r.plan.dispatches,
                r.plan.submits_per_run,
                r.plan.peak_bytes / 1024,
                r.plan.tensor_bytes / 1024
            );
            Ok(())
        }
    }
}

fn info(opts: &GpuOptions, json: bool) -> stablerep::Result<()> {
    let all: Vec<_> = adapter::enumerate()
        .iter()
        .map(|a| adapter::summarize(&a.get_info()))
        .collect();
    let gpu = Gpu::new(opts)?;
    let limits = &gpu.limits;
    let features: Vec<String> = gpu
        .features
        .iter_names()
        .map(|(n, _)| n.to_string())
        .collect();
    if json {
        let v = serde_json::json!({
            "adapters": all,
            "chosen": adapter::summarize(&gpu.info),
            "caps": gpu.caps,
            "features": features,
            "limits": format!("{limits:?}"),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("adapters (best first):");
    for a in &all {
        println!(
            "  [{:>2}] {} | {} | {} | {}",
            a.score, a.name, a.backend, a.device_type, a.driver
        );
    }
    println!("chosen: {}", gpu.describe());
    let c = &gpu.caps;
    println!("  max storage binding     {} MiB", c.max_binding >> 20);
    println!("  max buffer              {} MiB", c.max_buffer >> 20);
    println!("  workgroups / dimension  {}", c.max_workgroups);
    println!(
        "  invocations / workgroup {}",
        limits.max_compute_invocations_per_workgroup
    );
    println!(
        "  workgroup memory        {} KiB",
        limits.max_compute_workgroup_storage_size >> 10
    );
    println!(
        "  storage buffers / stage {}",
        limits.max_storage_buffers_per_shader_stage
    );
    println!("  storage offset align    {} B", c.storage_align);
    println!(
        "  subgroup size           {}",
        c.subgroup_size
            .map_or("varies or none".into(), |s| s.to_string())
    );
    println!(
        "  features: {}",
        if features.is_empty() {
            "none".into()
        } else {
            features.join(", ")
        }
    );
    Ok(())
}

/// Refuses an output file path that cannot be written: a folder, or a file in a folder that
/// does not exist.
fn check_output_file(path: &std::path::Path, flag: &str) -> stablerep::Result<()> {
    if path.is_dir() {
        return Err(stablerep::Error::Config(format!(
            "{flag} {}: is a folder, not a file",
            path.display()
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(stablerep::Error::Config(format!(
                "{flag} {}: the folder {} does not exist",
                path.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}
