//! Supervised training on mini-world renders: the ViT with one linear classifier per label
//! (the main object's shape and colour, the background colour) on its CLS feature, softmax
//! cross-entropy summed over the heads, GPU augmentation and AdamW, all in one plan. Two
//! uses: the demo's supervised ceiling arm (the encoder every method trains, taught with the
//! labels on the same images and budget), and the fidelity judge (`super::judge`), trained
//! longer on fresh renders.
//!
//! Checkpoints hold `visual.*` (so `probe` and `embed` read them like any other encoder),
//! the heads as `classifier.<label>.weight/bias`, the AdamW moments, and the run's config;
//! runs resume exactly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::export::{scene_of, LabelKind};
use super::render::render;
use super::{Description, Labels, World, COLOURS, GROUNDS, SHAPES};
use crate::data::augment::{self, AugmentConfig};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{adam_hyper, DType, Graph, NodeId, Op, ParamStore, Plan, PlanOptions};
use crate::models::cnn::{self, CnnConfig};
use crate::models::config::ModelConfig;
use crate::models::stablerep::{decays, recipe_adamw, HeadConfig, Init};
use crate::models::vit::{self, VitConfig};
use crate::nn::checkpoint::{Checkpoint, HostTensor};
use crate::nn::schedule::Schedule;
use crate::train::checkpoint;
use crate::train::MetricsLog;
use crate::util::rng::Rng;

/// The classes of label `kind` in `world`, in class order (indices into the world's lists).
pub fn classes(world: World, kind: LabelKind) -> Vec<usize> {
    match kind {
        LabelKind::Shape => world.shapes(),
        LabelKind::Colour => world.colours(),
        LabelKind::Ground => (0..GROUNDS.len()).collect(),
    }
}

/// The name of a label kind ("shape", "colour", "ground").
pub fn kind_name(kind: LabelKind) -> &'static str {
    match kind {
        LabelKind::Shape => "shape",
        LabelKind::Colour => "colour",
        LabelKind::Ground => "ground",
    }
}

/// The class names of label `kind` in `world`, in class order.
pub fn class_names(world: World, kind: LabelKind) -> Vec<&'static str> {
    classes(world, kind)
        .into_iter()
        .map(|i| match kind {
            LabelKind::Shape => SHAPES[i],
            LabelKind::Colour => COLOURS[i].0,
            LabelKind::Ground => GROUNDS[i].0,
        })
        .collect()
}

/// The class number of `labels` under `kind` in `world`.
pub fn class_of(world: World, kind: LabelKind, labels: &Labels) -> Result<u32> {
    let v = match kind {
        LabelKind::Shape => labels.shape,
        LabelKind::Colour => labels.colour,
        LabelKind::Ground => labels.ground,
    };
    classes(world, kind)
        .iter()
        .position(|&c| c == v)
        .map(|p| p as u32)
        .ok_or_else(|| {
            Error::Config(format!(
                "label {v} of kind {} does not occur in the {} world",
                kind_name(kind),
                world.name()
            ))
        })
}

/// The network under the heads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Encoder {
    /// The timm-compatible ViT (`visual.*`), as every other arm of the demo trains it.
    Vit(VitConfig),
    /// The small CNN (`cnn.*`), the judge's.
    Cnn(CnnConfig),
}

impl Encoder {
    /// Input side in pixels.
    pub fn img_size(&self) -> usize {
        match self {
            Encoder::Vit(v) => v.img_size,
            Encoder::Cnn(c) => c.img_size,
        }
    }

    /// Feature width.
    pub fn width(&self) -> usize {
        match self {
            Encoder::Vit(v) => v.width,
            Encoder::Cnn(c) => c.width(),
        }
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        match self {
            Encoder::Vit(v) => v.validate(),
            Encoder::Cnn(c) => c.validate(),
        }
    }

    /// Features [N, width] of normalized images `x` [N, 3, S, S].
    pub fn features(&self, g: &mut Graph, x: NodeId) -> Result<NodeId> {
        match self {
            Encoder::Vit(v) => vit::encoder(g, v, "visual.", x),
            Encoder::Cnn(c) => cnn::encoder(g, c, "cnn.", x),
        }
    }

    /// Fresh parameters (`init` chooses the ViT's scheme; the CNN has one).
    pub fn init(&self, seed: u64, init: Init) -> Checkpoint {
        match self {
            Encoder::Vit(v) => {
                let mut ck = crate::models::stablerep::init_params_with(
                    v,
                    &HeadConfig { hidden: 1, out: 1 },
                    None,
                    seed,
                    init,
                );
                ck.tensors.retain(|k, _| k.starts_with("visual."));
                ck
            }
            Encoder::Cnn(c) => c.init("cnn.", seed),
        }
    }
}

/// Settings of a supervised run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SupervisedRun {
    /// The world of the captions.
    pub world: World,
    /// Training captions (by their index in `World::descriptions(captions, caption_seed)`).
    pub captions: usize,
    /// Seed of the captions.
    pub caption_seed: u64,
    /// Renders per caption the run draws from (layouts 0..renders of each caption); a pool of
    /// the same captions, seed and count holds exactly these images.
    pub renders: u64,
    /// Seed of the layouts.
    pub layout_seed: u64,
    /// The labels, one head each.
    pub heads: Vec<LabelKind>,
    /// Each head's weight in the summed loss (empty: 1 each). An easy label at full weight
    /// can keep a hard one from being learned: with shape and colour heads at equal weight
    /// the judge's shape stayed near 30 %, in the engine and in PyTorch alike.
    #[serde(default)]
    pub head_weights: Vec<f32>,
    /// The encoder.
    pub encoder: Encoder,
    /// Images per step.
    pub batch: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate (10 % warmup, then cosine).
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Augmentation.
    pub augment: AugmentConfig,
    /// Seed of initialization, batches and augmentation.
    pub seed: u64,
    /// How the fresh ViT and heads are initialized.
    #[serde(default)]
    pub init: Init,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Steps between loss readbacks (metric lines).
    pub log_every: u64,
}

/// The supervised step graph and its handles.
struct Step {
    graph: Graph,
    images: NodeId,
    params_in: NodeId,
    labels: Vec<NodeId>,
    loss: NodeId,
    hyper: NodeId,
}

fn head_names(kind: LabelKind) -> (String, String) {
    let k = kind_name(kind);
    (
        format!("classifier.{k}.weight"),
        format!("classifier.{k}.bias"),
    )
}

/// Logits [B, classes] of each head over CLS features `f` [B, width].
pub fn heads_graph(
    g: &mut Graph,
    world: World,
    heads: &[LabelKind],
    f: NodeId,
) -> Result<Vec<NodeId>> {
    let width = *g.shape(f).last().unwrap_or(&0);
    heads
        .iter()
        .map(|&kind| {
            let (wn, bn) = head_names(kind);
            let c = classes(world, kind).len();
            let w = g.param(&wn, &[c, width]);
            let b = g.param(&bn, &[c]);
            let z = g.matmul_t(f, w, false, true)?;
            g.add(z, b)
        })
        .collect()
}

fn build(r: &SupervisedRun) -> Result<Step> {
    let (b, s) = (r.batch, r.encoder.img_size());
    let mut g = Graph::new();
    let src = g.input("images", &[b, 3, s, s]);
    let prm = g.input("augment.params", &[b, 16]);
    let x = g.augment(src, prm, s)?;
    let f = r.encoder.features(&mut g, x)?;
    let logits = heads_graph(&mut g, r.world, &r.heads, f)?;
    let mut labels = Vec::new();
    let mut loss: Option<NodeId> = None;
    for (h, (kind, z)) in r.heads.iter().zip(logits).enumerate() {
        let l = g.input_typed(&format!("labels.{}", kind_name(*kind)), &[b], DType::U32);
        let ce = g.cross_entropy(z, l)?;
        let ce = g.mean_all(ce)?;
        let ce = match r.head_weights.get(h) {
            Some(&w) if w != 1.0 => g.affine(ce, w, 0.0)?,
            _ => ce,
        };
        loss = Some(match loss {
            Some(acc) => g.add(acc, ce)?,
            None => ce,
        });
        labels.push(l);
    }
    let loss = loss.ok_or_else(|| Error::Config("a supervised run needs a label".into()))?;
    let params: Vec<NodeId> = (0..g.nodes.len())
        .map(NodeId)
        .filter(|&id| g.node(id).op == Op::Param)
        .collect();
    let grads = g.grad(loss, &params)?;
    let base = recipe_adamw(r.weight_decay);
    let cfgs: Vec<_> = params
        .iter()
        .map(|&p| {
            let name = g.node(p).name.as_deref().unwrap_or_default();
            let mut c = base;
            if !decays(name, g.shape(p).len()) {
                c.weight_decay = 0.0;
            }
            c
        })
        .collect();
    let hyper = g.adamw_each(&params, &grads, &cfgs)?;
    Ok(Step {
        graph: g,
        images: src,
        params_in: prm,
        labels,
        loss,
        hyper,
    })
}

/// Fresh parameters: the encoder (the ViT as StableRep initializes it, by `r.init`), the
/// heads N(0, 0.01) with zero bias ([`Init::Official`]) or as `nn.Linear`'s defaults,
/// uniform(+-1/sqrt(width)) for weight and bias ([`Init::Torch`]).
pub fn init(r: &SupervisedRun) -> Checkpoint {
    let mut ck = r.encoder.init(r.seed, r.init);
    let width = r.encoder.width();
    let bound = 1.0 / (width as f64).sqrt();
    let mut rng = Rng(r.seed ^ 0xC1A5);
    let draw = |rng: &mut Rng| match r.init {
        Init::Official => (0.01 * rng.normal()) as f32,
        Init::Torch => ((rng.unit() * 2.0 - 1.0) * bound) as f32,
    };
    for &kind in &r.heads {
        let c = classes(r.world, kind).len();
        let (wn, bn) = head_names(kind);
        let w = (0..c * width).map(|_| draw(&mut rng)).collect();
        let b = match r.init {
            Init::Official => vec![0.0; c],
            Init::Torch => (0..c).map(|_| draw(&mut rng)).collect(),
        };
        ck.tensors.insert(
            wn,
            HostTensor {
                shape: vec![c, width],
                data: w,
            },
        );
        ck.tensors.insert(
            bn,
            HostTensor {
                shape: vec![c],
                data: b,
            },
        );
    }
    ck
}

/// Checks the settings before any work.
pub fn check(r: &SupervisedRun) -> Result<()> {
    if !r.head_weights.is_empty()
        && (r.head_weights.len() != r.heads.len()
            || r.head_weights.iter().any(|w| !(w.is_finite() && *w > 0.0)))
    {
        return Err(Error::Config(format!(
            "a supervised run's head weights {:?} must be one positive number per head ({})",
            r.head_weights,
            r.heads.len()
        )));
    }
    if r.captions == 0 || r.renders == 0 || r.batch == 0 || r.steps == 0 || r.heads.is_empty() {
        return Err(Error::Config(
            "a supervised run needs captions, renders, a batch, steps and at least one label"
                .into(),
        ));
    }
    if !(r.lr.is_finite() && r.lr >= 0.0) {
        return Err(Error::Config(format!(
            "the learning rate must be finite and not negative, got {}",
            r.lr
        )));
    }
    r.encoder.validate()
}

/// One batch: rendered images [B, 3, S, S], augmentation parameters and labels per head.
type Batch = (Vec<f32>, Vec<f32>, Vec<Vec<u32>>);

fn batch(r: &SupervisedRun, world: &[Description], t: u64) -> Result<Batch> {
    let s = r.encoder.img_size();
    let mut rng = Rng(r.seed ^ 0x5_0BE7 ^ t.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut images = Vec::with_capacity(r.batch * 3 * s * s);
    let mut params = Vec::with_capacity(r.batch * 16);
    let mut labels = vec![Vec::with_capacity(r.batch); r.heads.len()];
    for _ in 0..r.batch {
        let c = rng.below(world.len());
        let k = (rng.next_u64() % r.renders) as usize;
        let scene = scene_of(&world[c], c, k, r.layout_seed);
        images.extend(render(&scene, s));
        params.extend(augment::sample(&r.augment, s, s, &mut rng));
        let l = scene.labels();
        for (h, &kind) in r.heads.iter().enumerate() {
            labels[h].push(class_of(r.world, kind, &l)?);
        }
    }
    Ok((images, params, labels))
}

/// Trains into `out` (resuming from `out/checkpoint-last.safetensors`); `progress(step, loss)`
/// after each logged step; `cancel()` before every step. Returns the logged losses.
pub fn run(
    gpu: &Arc<Gpu>,
    r: &SupervisedRun,
    out: &Path,
    mut progress: impl FnMut(u64, f32),
    cancel: &dyn Fn() -> bool,
) -> Result<Vec<(u64, f32)>> {
    check(r)?;
    std::fs::create_dir_all(out).map_err(|e| Error::Io {
        path: out.display().to_string(),
        source: e,
    })?;
    let last = out.join("checkpoint-last.safetensors");
    let (ck, start) = if last.exists() {
        let ck = Checkpoint::load(&last)?;
        let step = checkpoint::read_step(&ck, &last)?;
        (ck, step)
    } else {
        (init(r), 0)
    };
    let world = r.world.descriptions(r.captions, r.caption_seed);
    let step = build(r)?;
    let mut store = ParamStore::new();
    crate::models::upload(gpu, &ck, &mut store)?;
    let plan = Plan::compile(
        gpu,
        &step.graph,
        &[step.loss],
        &mut store,
        PlanOptions::default(),
    )?;
    let adamw = recipe_adamw(r.weight_decay);
    let schedule = Schedule::Cosine {
        warmup: r.steps / 10,
        total: r.steps,
    };
    // A ViT's config is also stored as `model`, so `probe` and `embed` read the checkpoint.
    let config = match &r.encoder {
        Encoder::Vit(v) => serde_json::json!({
            "model": ModelConfig { vit: *v, head: HeadConfig { hidden: 0, out: 0 }, plus: None },
            "supervised": r,
        }),
        Encoder::Cnn(_) => serde_json::json!({ "supervised": r }),
    };
    let mut metrics = MetricsLog::resume_at(out, start)?;
    let mut losses = Vec::new();
    for t in start..r.steps {
        if cancel() {
            if t > start {
                checkpoint::save(&store, &config, t, &last)?;
            }
            return Err(Error::Cancelled);
        }
        let (images, params, labels) = batch(r, &world, t)?;
        plan.write(step.images, &images)?;
        plan.write(step.params_in, &params)?;
        for (id, l) in step.labels.iter().zip(&labels) {
            plan.write_u32(*id, l)?;
        }
        let lr = schedule.lr(r.lr, t);
        plan.write(step.hyper, &adam_hyper(lr as f32, &adamw, (t + 1) as u32))?;
        let save = (t + 1) % r.checkpoint_every.max(1) == 0 || t + 1 == r.steps;
        if (t + 1) % r.log_every.max(1) == 0 || save {
            let loss = plan.run_fetch(&[step.loss])?[0][0];
            if !loss.is_finite() {
                return Err(Error::Graph(format!(
                    "supervised loss became {loss} at step {}; the last good checkpoint is {}",
                    t + 1,
                    last.display()
                )));
            }
            metrics.write(&serde_json::json!({"step": t + 1, "loss": loss, "lr": lr}))?;
            losses.push((t + 1, loss));
            progress(t + 1, loss);
        } else {
            plan.run()?;
        }
        if save {
            checkpoint::save(&store, &config, t + 1, &last)?;
        }
    }
    Ok(losses)
}

/// The path of a finished run's checkpoint.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("checkpoint-last.safetensors")
}
