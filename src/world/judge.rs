//! The fidelity judge: a supervised classifier of mini-world renders (the main object's shape
//! and colour, the background colour) trained by this engine on real renders
//! (`examples/train_world_judge.rs`) and shipped in `assets/world-judge`. Its accuracy on a
//! generator's images of captions measures how faithfully the generator draws what the
//! captions say (fidelity, per attribute); the spread of its features among a caption's
//! images measures the generator's diversity.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::export::{render_caption, LabelKind};
use super::supervised::{class_of, heads_graph, Encoder, SupervisedRun};
use super::World;
use crate::data::augment::AugmentConfig;
use crate::diffusion::model::{GenerateOptions, Generator, SdModel};
use crate::diffusion::sampler::Kind;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, NodeId, ParamStore, Plan, PlanOptions};
use crate::models::cnn::CnnConfig;
use crate::nn::checkpoint::Checkpoint;
use crate::train::checkpoint::CONFIG_KEY;
use crate::util::image::{MEAN, STD};

/// The judge's folder name under `assets/`.
pub const BUILTIN_JUDGE: &str = "world-judge";
/// The judge's file in that folder.
pub const JUDGE_FILE: &str = "judge.safetensors";
/// Images per plan run.
const CHUNK: usize = 64;

/// The recipe of the shipped judge: a 4-layer CNN (32-64-96-128 channels) on 32 x 32 renders
/// of the simple world, three heads, fresh layouts every step (so it never sees a render
/// twice), crops of 50 - 100 % of the image and flips (no colour changes: colours are
/// labels). A CNN, not a ViT: at this size and budget a ViT barely learns shapes (PyTorch:
/// 34 - 37 % after 1,000 supervised steps), the same CNN in PyTorch reached 82 % after 600.
/// The colour and background losses weigh 0.1 each: at full weight they kept shape near 30 %.
pub fn recipe() -> SupervisedRun {
    SupervisedRun {
        world: World::Simple,
        captions: 4096,
        caption_seed: 0,
        renders: 1 << 40,
        layout_seed: 0x1D_6E,
        heads: vec![LabelKind::Shape, LabelKind::Colour, LabelKind::Ground],
        // Colour and background are learned in a few steps either way; at full weight they
        // held shape near 30 % (PyTorch, same CNN and data, 900 steps: 39 % with a colour head
        // at weight 1, 93 % at 0.1, 96 % at 0.05, 98 % with shape alone; docs/world.md). At
        // 0.03 the engine's judge read colour at only 95 %, at 0.1 over 1,200 steps shape at
        // 88.5 %; 0.05 each over 1,600 steps.
        head_weights: vec![1.0, 0.05, 0.05],
        encoder: Encoder::Cnn(CnnConfig {
            img_size: 32,
            channels: vec![32, 64, 96, 128],
        }),
        batch: 64,
        steps: 1600,
        lr: 2e-3,
        weight_decay: 0.05,
        augment: AugmentConfig {
            scale: (0.5, 1.0),
            jitter_p: 0.0,
            gray_p: 0.0,
            blur_p: 0.0,
            ..AugmentConfig::default()
        },
        seed: 0,
        init: crate::models::stablerep::Init::Official,
        checkpoint_every: 100,
        log_every: 25,
    }
}

/// Where the shipped judge is: `assets/world-judge/judge.safetensors`, looked up as
/// [`super::builtin_model`] looks up the model.
pub fn builtin_judge() -> Result<PathBuf> {
    Ok(super::builtin_asset(BUILTIN_JUDGE, JUDGE_FILE)?.join(JUDGE_FILE))
}

/// Writes the parameters of a finished judge run (no optimizer state) with its recipe to
/// `path`, atomically.
pub fn export(run_checkpoint: &Path, path: &Path) -> Result<()> {
    let ck = Checkpoint::load(run_checkpoint)?;
    let mut out = Checkpoint::default();
    for (k, t) in &ck.tensors {
        if !k.starts_with(crate::nn::checkpoint::OPTIMIZER_PREFIX) {
            out.tensors.insert(k.clone(), t.clone());
        }
    }
    out.metadata = ck.metadata.clone();
    out.save(path)
}

/// A loaded judge.
pub struct Judge {
    /// Its training recipe (world, heads, encoder).
    pub run: SupervisedRun,
    plan: Plan,
    x: NodeId,
    features: NodeId,
    logits: Vec<NodeId>,
}

/// What the judge says of a set of images.
#[derive(Clone, Debug, Default)]
pub struct Judged {
    /// L2-normalized CLS features, one row per image.
    pub features: Vec<Vec<f32>>,
    /// Predicted class per head (in the order of `run.heads`), one per image.
    pub classes: Vec<Vec<u32>>,
}

impl Judge {
    /// Loads a judge written by [`export`] (or a supervised run's checkpoint).
    pub fn load(gpu: &Arc<Gpu>, path: &Path) -> Result<Judge> {
        let (run, ck) = Judge::read(path)?;
        Judge::build(gpu, path, run, &ck)
    }

    /// Reads and checks a judge file without touching the GPU: its recipe and tensors.
    pub fn read(path: &Path) -> Result<(SupervisedRun, Checkpoint)> {
        let ck = Checkpoint::load(path)?;
        let bad = |why: String| Error::Config(format!("{}: not a judge: {why}", path.display()));
        let text = ck
            .metadata
            .get(CONFIG_KEY)
            .ok_or_else(|| bad("no config in its metadata".into()))?;
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("config is not JSON: {e}")))?;
        let run: SupervisedRun = serde_json::from_value(
            v.get("supervised")
                .cloned()
                .ok_or_else(|| bad("its config has no 'supervised' recipe".into()))?,
        )
        .map_err(|e| bad(format!("its recipe does not parse: {e}")))?;
        run.encoder.validate()?;
        Ok((run, ck))
    }

    fn build(gpu: &Arc<Gpu>, path: &Path, run: SupervisedRun, ck: &Checkpoint) -> Result<Judge> {
        let bad = |why: String| Error::Config(format!("{}: not a judge: {why}", path.display()));
        let s = run.encoder.img_size();
        let mut g = Graph::new();
        let x = g.input("images", &[CHUNK, 3, s, s]);
        let f = run.encoder.features(&mut g, x)?;
        let logits = heads_graph(&mut g, run.world, &run.heads, f)?;
        let features = g.l2_normalize(f)?;
        let mut store = ParamStore::new();
        for (i, node) in g.nodes.iter().enumerate() {
            if node.op != crate::graph::Op::Param {
                continue;
            }
            let name = node.name.as_deref().unwrap_or_default();
            let t = ck
                .tensors
                .get(name)
                .ok_or_else(|| bad(format!("tensor '{name}' is missing")))?;
            if t.shape != g.shape(NodeId(i)) {
                return Err(bad(format!(
                    "tensor '{name}' has shape {:?}, the recipe needs another",
                    t.shape
                )));
            }
            store.set(gpu, name, &t.shape, &t.data)?;
        }
        let mut fetch = vec![features];
        fetch.extend(&logits);
        let plan = Plan::compile(gpu, &g, &fetch, &mut store, PlanOptions::default())?;
        Ok(Judge {
            run,
            plan,
            x,
            features,
            logits,
        })
    }

    /// The image side the judge takes.
    pub fn size(&self) -> usize {
        self.run.encoder.img_size()
    }

    /// Judges images [N, 3, S, S] in [0, 1] (S = [`Judge::size`]).
    pub fn judge(&self, images: &[f32]) -> Result<Judged> {
        let s = self.size();
        let per = 3 * s * s;
        if !images.len().is_multiple_of(per) {
            return Err(Error::Config(format!(
                "the judge takes {s} x {s} RGB images; got {} values",
                images.len()
            )));
        }
        let n = images.len() / per;
        let mut out = Judged {
            features: Vec::with_capacity(n),
            classes: vec![Vec::with_capacity(n); self.logits.len()],
        };
        let mut buf = vec![0.0f32; CHUNK * per];
        for start in (0..n).step_by(CHUNK) {
            let b = CHUNK.min(n - start);
            buf.iter_mut().for_each(|v| *v = 0.0);
            for (i, v) in images[start * per..(start + b) * per].iter().enumerate() {
                let c = (i % per) / (s * s);
                buf[i] = (v - MEAN[c]) / STD[c];
            }
            self.plan.write(self.x, &buf)?;
            let mut fetch = vec![self.features];
            fetch.extend(&self.logits);
            let got = self.plan.run_fetch(&fetch)?;
            let width = got[0].len() / CHUNK;
            for i in 0..b {
                out.features
                    .push(got[0][i * width..(i + 1) * width].to_vec());
            }
            for (h, z) in got[1..].iter().enumerate() {
                let c = z.len() / CHUNK;
                for i in 0..b {
                    let row = &z[i * c..(i + 1) * c];
                    let best = (0..c)
                        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                        .unwrap_or(0);
                    out.classes[h].push(best as u32);
                }
            }
        }
        Ok(out)
    }

    /// The head for `kind`, if the judge has one.
    pub fn head(&self, kind: LabelKind) -> Option<usize> {
        self.run.heads.iter().position(|&k| k == kind)
    }
}

/// A fidelity measurement's settings.
#[derive(Clone, Copy, Debug)]
pub struct FidelitySpec {
    /// Captions (the first of the world's under `seed`).
    pub captions: usize,
    /// Images per caption.
    pub images_per_caption: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Sampler steps (DPM-Solver++ 2M, Karras sigmas).
    pub steps: usize,
    /// Seed of the captions and the noise.
    pub seed: u64,
}

impl FidelitySpec {
    /// Checks the settings before any work.
    pub fn check(&self) -> Result<()> {
        if self.captions == 0 || self.images_per_caption == 0 || self.steps == 0 {
            return Err(Error::Config(
                "fidelity needs at least 1 caption, 1 image per caption and 1 sampler step".into(),
            ));
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return Err(Error::Config(format!(
                "--guidance must be a finite number >= 0, got {}",
                self.guidance
            )));
        }
        Ok(())
    }
}

/// A generator's fidelity and diversity as the judge sees them.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Fidelity {
    /// Fraction of images whose background the judge reads as the caption's, over the
    /// captions that name one.
    pub background: f64,
    /// Fraction whose main object's colour is the caption's.
    pub colour: f64,
    /// Fraction whose main object's shape is the caption's.
    pub shape: f64,
    /// Mean pairwise distance of the judge's (unit) features among a caption's images.
    pub diversity: f64,
    /// The same for real renders of the same captions (the renderer's own diversity).
    pub real_diversity: f64,
    /// The judge's accuracy on those real renders (shape, colour, background), its own
    /// error floor.
    pub real: [f64; 3],
    /// Images judged.
    pub images: usize,
}

/// Mean over captions of the mean pairwise Euclidean distance of their images' features
/// (`per` consecutive rows per caption).
fn diversity(features: &[Vec<f32>], per: usize) -> f64 {
    if per < 2 {
        return 0.0;
    }
    let mut total = 0.0;
    let mut groups = 0;
    for g in features.chunks(per) {
        let mut sum = 0.0;
        let mut pairs = 0;
        for i in 0..g.len() {
            for j in i + 1..g.len() {
                let d: f64 = g[i]
                    .iter()
                    .zip(&g[j])
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                sum += d.sqrt();
                pairs += 1;
            }
        }
        if pairs > 0 {
            total += sum / pairs as f64;
            groups += 1;
        }
    }
    total / groups.max(1) as f64
}

/// Scores of images of `descriptions` (`per` consecutive images each) against what each
/// caption names: (shape, colour, background) accuracy, the background over the captions
/// that name one.
fn score(
    judge: &Judge,
    world: &[super::Description],
    per: usize,
    judged: &Judged,
) -> Result<[f64; 3]> {
    let mut hits = [0usize; 3];
    let mut counts = [0usize; 3];
    for (h, kind) in [LabelKind::Shape, LabelKind::Colour, LabelKind::Ground]
        .into_iter()
        .enumerate()
    {
        let Some(head) = judge.head(kind) else {
            continue;
        };
        for (c, d) in world.iter().enumerate() {
            if kind == LabelKind::Ground && !d.names_ground {
                continue;
            }
            let want = class_of(judge.run.world, kind, &d.labels())?;
            for k in 0..per {
                counts[h] += 1;
                hits[h] += (judged.classes[head][c * per + k] == want) as usize;
            }
        }
    }
    Ok([0, 1, 2].map(|h| hits[h] as f64 / counts[h].max(1) as f64))
}

/// Generates `spec.images_per_caption` images of each of `spec.captions` captions of the
/// judge's world with `model` and measures fidelity and diversity; `progress(done, total)`
/// after each image.
pub fn fidelity(
    gpu: &Arc<Gpu>,
    model: &SdModel,
    judge: &Judge,
    spec: &FidelitySpec,
    mut progress: impl FnMut(usize, usize),
) -> Result<Fidelity> {
    spec.check()?;
    let size = judge.size();
    let world = judge.run.world.descriptions(spec.captions, spec.seed);
    let o = GenerateOptions {
        prompt: String::new(),
        negative: String::new(),
        images: spec.images_per_caption,
        guidance: spec.guidance,
        steps: spec.steps,
        sampler: Kind::DpmPP2M { karras: true },
        seed: spec.seed,
        caption: 0,
        size,
        half_weights: None,
        half_activations: None,
        save_size: None,
        init_noise: None,
    };
    let generator = Generator::new(gpu, model, &o)?;
    let total = world.len() * spec.images_per_caption;
    let mut images = Vec::with_capacity(total * 3 * size * size);
    for (c, d) in world.iter().enumerate() {
        generator.run_each(
            &d.caption(),
            c as u64,
            |_| Ok(()),
            |k, img, _| {
                images.extend(img);
                progress(c * spec.images_per_caption + k + 1, total);
                Ok(())
            },
        )?;
    }
    drop(generator);
    fidelity_of(judge, &world, spec.images_per_caption, &images, spec.seed)
}

/// Fidelity and diversity of generated `images` ([N, 3, S, S] in [0, 1], `per` consecutive
/// images for each of `world`'s captions), next to the judge's accuracy and the diversity
/// on real renders of the same captions (layouts of `seed`).
pub fn fidelity_of(
    judge: &Judge,
    world: &[super::Description],
    per: usize,
    images: &[f32],
    seed: u64,
) -> Result<Fidelity> {
    let size = judge.size();
    let judged = judge.judge(images)?;
    if judged.features.len() != world.len() * per {
        return Err(Error::Config(format!(
            "{} images for {} captions x {per}",
            judged.features.len(),
            world.len()
        )));
    }
    let s = score(judge, world, per, &judged)?;
    let real_images: Vec<f32> = world
        .iter()
        .enumerate()
        .flat_map(|(c, d)| (0..per).flat_map(move |k| render_caption(d, c, k, size, seed ^ 0xF1DE)))
        .collect();
    let real = judge.judge(&real_images)?;
    let r = score(judge, world, per, &real)?;
    Ok(Fidelity {
        shape: s[0],
        colour: s[1],
        background: s[2],
        diversity: diversity(&judged.features, per),
        real_diversity: diversity(&real.features, per),
        real: r,
        images: world.len() * per,
    })
}

/// The judge's held-out accuracy per head on `count` fresh real renders (layouts it never
/// trained on), as fractions in the order of its heads.
pub fn accuracy(judge: &Judge, count: usize, seed: u64) -> Result<Vec<(LabelKind, f64)>> {
    let size = judge.size();
    let world = judge.run.world.descriptions(count, seed);
    let mut images = Vec::with_capacity(count * 3 * size * size);
    let mut labels = Vec::with_capacity(count);
    for (c, d) in world.iter().enumerate() {
        let scene = super::export::scene_of(d, c, 0, seed ^ 0xE7A1);
        images.extend(super::render::render(&scene, size));
        labels.push(scene.labels());
    }
    let judged = judge.judge(&images)?;
    judge
        .run
        .heads
        .iter()
        .enumerate()
        .map(|(h, &kind)| {
            let mut hits = 0;
            for (i, l) in labels.iter().enumerate() {
                hits += (judged.classes[h][i] == class_of(judge.run.world, kind, l)?) as usize;
            }
            Ok((kind, hits as f64 / count.max(1) as f64))
        })
        .collect()
}
