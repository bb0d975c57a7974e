//! Gradient caching: a StableRep step over a batch larger than what one pass can hold in
//! memory, split into chunks of images (`train --chunk N`).
//!
//! The contrastive loss couples every image of the batch, so the batch cannot simply be split.
//! The encoder, though, treats images independently, and the loss reaches it only through the
//! CLS features (N x D, small). So the step caches the gradient at the features:
//!
//! 1. **Features** (plan `encode`, no activations kept): the ViT's CLS feature of each chunk,
//!    read back to the host.
//! 2. **Head and loss** (plan `head`, the whole batch at once): the projection head with its
//!    BatchNorm statistics per view group over the *whole* batch (the official SyncBatchNorm
//!    semantics, exactly as the unchunked step), the multi-positive loss, the head's gradients
//!    and AdamW update, the BatchNorm running statistics, and the loss's gradient with respect
//!    to the features.
//! 3. **Encoder backward** (plan `backward`, per chunk): each chunk's features are recomputed
//!    with activations and backpropagated from its slice of that gradient (the gradient of
//!    sum(F_c * dF_c)); the encoder's gradients are summed over chunks on the device, in
//!    place, into store tensors `scratch.grad.<name>` (`Op::Accumulate`; checkpoints leave
//!    them out).
//! 4. **Encoder update** (plan `update`): AdamW on the summed gradients, read in place.
//!
//! GPU memory is bounded by one chunk of the encoder plus the head over the whole batch (whose
//! activations are N x hidden); the gradients equal the unchunked step's up to float rounding
//! (`tests/train.rs`). The price: the encoder's forward runs twice, and one more copy of the
//! encoder's parameters (the accumulators) lives on the device. Only the features and their
//! gradient (rows x width) cross to the host.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{
    accumulator_name, adam_hyper, Graph, NodeId, Op, ParamStore, Plan, PlanOptions,
};
use crate::kernels::optim::AdamW;
use crate::models::stablerep::{
    head, image_text_loss, param_adamw, StepConfig, BN_EPS, BN_MOMENTUM,
};
use crate::models::text::{TextBatch, TextInputs};
use crate::models::vit;

/// The encoder's input for one chunk: (pixels or source images, augmentation parameters).
struct EncoderInput {
    images: NodeId,
    aug: Option<NodeId>,
}

fn encoder_graph(cfg: &StepConfig, rows: usize) -> Result<(Graph, EncoderInput, NodeId)> {
    let mut g = Graph::new();
    let s = cfg.vit.img_size;
    let (images, aug, pixels) = match cfg.augment_from {
        Some((h, w)) => {
            let src = g.input("images", &[rows, 3, h, w]);
            let prm = g.input("augment.params", &[rows, 16]);
            let out = g.augment(src, prm, s)?;
            (src, Some(prm), out)
        }
        None => {
            let x = g.input("images", &[rows, 3, s, s]);
            (x, None, x)
        }
    };
    let feats = vit::encoder(&mut g, &cfg.vit, "visual.", pixels)?;
    Ok((g, EncoderInput { images, aug }, feats))
}

fn params_of(g: &Graph) -> Vec<NodeId> {
    (0..g.nodes.len())
        .map(NodeId)
        .filter(|&id| g.node(id).op == Op::Param)
        .collect()
}

/// AdamW settings per parameter under the recipe's weight-decay rule.
fn adamw_cfgs(g: &Graph, params: &[NodeId], adamw: AdamW) -> Vec<AdamW> {
    params
        .iter()
        .map(|&p| {
            let name = g.node(p).name.as_deref().unwrap_or_default();
            param_adamw(name, g.shape(p).len(), adamw)
        })
        .collect()
}

/// One chunked StableRep training step, compiled.
pub struct ChunkedStep {
    /// Images per chunk.
    pub chunk: usize,
    rows: usize,
    image_len: usize,
    width: usize,
    encode: (Plan, EncoderInput, NodeId),
    head: Plan,
    head_features: NodeId,
    head_loss: NodeId,
    head_dfeatures: NodeId,
    head_hyper: NodeId,
    /// StableRep+'s text inputs of the head plan.
    head_text: Option<TextInputs>,
    /// The head's gradients by parameter name, when kept ([`ChunkedStep::new_keeping_gradients`]).
    head_grads: Vec<(String, NodeId)>,
    /// The backward plan, its chunk input and its feature-gradient input.
    backward: (Plan, EncoderInput, NodeId),
    /// The accumulation's `beta` input (0 for a step's first chunk, 1 after).
    backward_hyper: NodeId,
    /// The gradient accumulators (store tensors `scratch.grad.<name>`), in parameter order.
    backward_accs: Vec<NodeId>,
    /// (name, element count) of each encoder parameter, in `backward_accs` order.
    pub encoder_params: Vec<(String, usize)>,
    update: Plan,
    update_hyper: NodeId,
    adamw: AdamW,
}

/// What one chunked step returns.
pub struct ChunkedOutcome {
    /// The loss.
    pub loss: f32,
    /// The encoder's gradients (summed over chunks), by parameter, when asked for.
    pub encoder_grads: Option<Vec<Vec<f32>>>,
    /// The head's (and text tower's) gradients by parameter name, when asked for of a step
    /// compiled with [`ChunkedStep::new_keeping_gradients`].
    pub head_grads: Option<Vec<(String, Vec<f32>)>>,
}

/// The head-and-loss graph of a chunked step.
struct HeadGraph {
    graph: Graph,
    /// [features, loss, dLoss/dFeatures, hyper]
    nodes: [NodeId; 4],
    /// StableRep+'s text inputs.
    text: Option<TextInputs>,
    /// The head's (and text tower's) gradients by parameter name.
    grads: Vec<(String, NodeId)>,
}

/// The four graphs of a chunked step.
struct Graphs {
    encode: (Graph, EncoderInput, NodeId),
    head: HeadGraph,
    /// (graph, input, the feature gradient, the accumulation's hyper, the accumulators)
    backward: (Graph, EncoderInput, NodeId, NodeId, Vec<NodeId>),
    shapes: Vec<(String, Vec<usize>)>,
    update: (Graph, NodeId),
}

fn build(cfg: &StepConfig, chunk: usize) -> Result<Graphs> {
    let (n, m) = (cfg.captions, cfg.images_per_caption);
    let rows = n * m;
    if chunk == 0 || !rows.is_multiple_of(chunk) {
        return Err(Error::Config(format!(
            "--chunk {chunk} must divide the batch of {rows} images (--captions-per-batch {n} x --images-per-caption {m})"
        )));
    }
    let width = cfg.vit.width;
    // 1. Features of a chunk.
    let encode = encoder_graph(cfg, chunk)?;
    // 2. Head, loss, head update, gradient at the features.
    let mut g = Graph::new();
    let f = g.input("features", &[rows, width]);
    let (h, stats) = head(&mut g, &cfg.head, "image_mlp.", f, m)?;
    let mut loss = crate::models::losses::multi_positive_loss(&mut g, h, n, cfg.temperature)?;
    // StableRep+: the text tower and the image-text loss, over the whole batch too (they see
    // the encoder only through its features).
    let mut text = None;
    if let Some(plus) = &cfg.plus {
        let (it, inputs) = image_text_loss(&mut g, plus, f, n)?;
        loss = g.add(loss, it)?;
        text = Some(inputs);
    }
    let hp = params_of(&g);
    let mut wrt = hp.clone();
    wrt.push(f);
    let mut grads = g.grad(loss, &wrt)?;
    let df = grads
        .pop()
        .ok_or_else(|| Error::Graph("no feature gradient".into()))?;
    for (l, st) in stats.iter().enumerate() {
        g.bn_running_update(&format!("image_mlp.bn{}", l + 1), *st, BN_MOMENTUM, BN_EPS)?;
    }
    let cfgs = adamw_cfgs(&g, &hp, cfg.adamw);
    let head_hyper = g.adamw_each(&hp, &grads, &cfgs)?;
    let head_grads: Vec<(String, NodeId)> = hp
        .iter()
        .zip(&grads)
        .map(|(&p, &gr)| (g.node(p).name.clone().unwrap_or_default(), gr))
        .collect();
    let head = HeadGraph {
        graph: g,
        nodes: [f, loss, df, head_hyper],
        text,
        grads: head_grads,
    };
    // 3. Encoder backward of a chunk from its feature gradient.
    let (mut g, input, feats) = encoder_graph(cfg, chunk)?;
    let dfc = g.input("features.grad", &[chunk, width]);
    let prod = g.mul(feats, dfc)?;
    let s = g.sum_all(prod)?;
    let vp = params_of(&g);
    let backward_grads = g.grad(s, &vp)?;
    let acc_hyper = g.accumulate(&vp, &backward_grads)?;
    let accs: Vec<NodeId> = vp
        .iter()
        .map(|&p| {
            let name = accumulator_name(g.node(p).name.as_deref().unwrap_or_default());
            g.nodes
                .iter()
                .position(|n| n.name.as_deref() == Some(name.as_str()))
                .map(NodeId)
                .ok_or_else(|| Error::Graph(format!("no accumulator {name}")))
        })
        .collect::<Result<_>>()?;
    let shapes: Vec<(String, Vec<usize>)> = vp
        .iter()
        .map(|&p| {
            (
                g.node(p).name.clone().unwrap_or_default(),
                g.shape(p).to_vec(),
            )
        })
        .collect();
    let backward = (g, input, dfc, acc_hyper, accs);
    // 4. Encoder update from the summed gradients, read in place.
    let mut g = Graph::new();
    let mut ps = Vec::new();
    let mut update_grads = Vec::new();
    for (name, shape) in &shapes {
        ps.push(g.param(name, shape));
        update_grads.push(g.state(&accumulator_name(name), shape, 0.0));
    }
    let cfgs = adamw_cfgs(&g, &ps, cfg.adamw);
    let update_hyper = g.adamw_each(&ps, &update_grads, &cfgs)?;
    Ok(Graphs {
        encode,
        head,
        backward,
        shapes,
        update: (g, update_hyper),
    })
}

/// Device memory of a chunked step, without a device: the training state (parameters, AdamW
/// moments, BatchNorm statistics) plus the largest of the four plans' intermediates and inputs
/// (they run one at a time). For comparison, [`crate::graph::estimate`] of the unchunked
/// step's graph gives the same for one pass over the batch.
pub fn estimate(cfg: &StepConfig, chunk: usize, max_binding: u64) -> Result<u64> {
    use crate::graph::plan::estimate as plan_estimate;
    let g = build(cfg, chunk)?;
    let o = PlanOptions::default();
    let enc = plan_estimate(&g.encode.0, &[g.encode.2], o, max_binding)?;
    let head = plan_estimate(
        &g.head.graph,
        &[g.head.nodes[1], g.head.nodes[2]],
        o,
        max_binding,
    )?;
    let bwd = plan_estimate(&g.backward.0, &[], o, max_binding)?;
    let upd = plan_estimate(&g.update.0, &[], o, max_binding)?;
    let state = head.param_bytes + upd.param_bytes;
    let work = [enc, head, bwd, upd]
        .iter()
        .map(|e| e.planned_bytes + e.input_bytes)
        .max()
        .unwrap_or(0);
    Ok(state + work)
}

impl ChunkedStep {
    /// Compiles the four plans of a step of `cfg` in chunks of `chunk` images against `store`
    /// (which must hold the model; optimizer state is created in it). StableRep+ is not
    /// supported chunked.
    pub fn new(
        gpu: &Arc<Gpu>,
        cfg: &StepConfig,
        chunk: usize,
        store: &mut ParamStore,
    ) -> Result<ChunkedStep> {
        Self::compile(gpu, cfg, chunk, store, false)
    }

    /// As [`ChunkedStep::new`], keeping the head's (and text tower's) gradients readable, so
    /// that a step asked for gradients returns every parameter's (`train --save-grads`). They
    /// then hold their buffers for the whole step.
    pub fn new_keeping_gradients(
        gpu: &Arc<Gpu>,
        cfg: &StepConfig,
        chunk: usize,
        store: &mut ParamStore,
    ) -> Result<ChunkedStep> {
        Self::compile(gpu, cfg, chunk, store, true)
    }

    fn compile(
        gpu: &Arc<Gpu>,
        cfg: &StepConfig,
        chunk: usize,
        store: &mut ParamStore,
        keep_head_grads: bool,
    ) -> Result<ChunkedStep> {
        let g = build(cfg, chunk)?;
        let o = PlanOptions::default();
        let encode = Plan::compile(gpu, &g.encode.0, &[g.encode.2], store, o)?;
        let [f, loss, df, head_hyper] = g.head.nodes;
        let head_text = g.head.text;
        let head_grads = if keep_head_grads {
            g.head.grads
        } else {
            Vec::new()
        };
        let mut head_outputs = vec![loss, df];
        head_outputs.extend(head_grads.iter().map(|(_, n)| *n));
        let head = Plan::compile(gpu, &g.head.graph, &head_outputs, store, o)?;
        let backward = Plan::compile(gpu, &g.backward.0, &g.backward.4, store, o)?;
        let update = Plan::compile(gpu, &g.update.0, &[], store, o)?;
        Ok(ChunkedStep {
            chunk,
            rows: cfg.captions * cfg.images_per_caption,
            image_len: match cfg.augment_from {
                Some((h, w)) => 3 * h * w,
                None => 3 * cfg.vit.img_size * cfg.vit.img_size,
            },
            width: cfg.vit.width,
            encode: (encode, g.encode.1, g.encode.2),
            head,
            head_features: f,
            head_loss: loss,
            head_dfeatures: df,
            head_hyper,
            head_text,
            head_grads,
            backward: (backward, g.backward.1, g.backward.2),
            backward_hyper: g.backward.3,
            backward_accs: g.backward.4,
            encoder_params: g
                .shapes
                .iter()
                .map(|(n, s)| (n.clone(), s.iter().product()))
                .collect(),
            update,
            update_hyper: g.update.1,
            adamw: cfg.adamw,
        })
    }

    fn write_chunk(
        &self,
        plan: &Plan,
        input: &EncoderInput,
        c: usize,
        images: &[f32],
        aug: Option<&[f32]>,
    ) -> Result<()> {
        let k = self.chunk;
        plan.write(
            input.images,
            &images[c * k * self.image_len..(c + 1) * k * self.image_len],
        )?;
        if let (Some(node), Some(a)) = (input.aug, aug) {
            plan.write(node, &a[c * k * 16..(c + 1) * k * 16])?;
        }
        Ok(())
    }

    /// Runs one step on a batch (view-major, as the unchunked step takes it: normalized
    /// images, or source images and augmentation parameters [rows, 16]; for StableRep+ the
    /// captions' tokens) with learning rate `lr` at optimizer step `t` (1-based). With
    /// `want_grads`, also returns the encoder's summed gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        images: &[f32],
        aug: Option<&[f32]>,
        text: Option<&TextBatch>,
        lr: f32,
        t: u32,
        want_grads: bool,
    ) -> Result<ChunkedOutcome> {
        if images.len() != self.rows * self.image_len {
            return Err(Error::Config(format!(
                "a chunked step takes {} image values, got {}",
                self.rows * self.image_len,
                images.len()
            )));
        }
        if self.encode.1.aug.is_some() != aug.is_some()
            || aug.is_some_and(|a| a.len() != self.rows * 16)
        {
            return Err(Error::Config(
                "augmentation parameters must be given exactly when the step augments ([rows, 16])"
                    .into(),
            ));
        }
        let text = match (&self.head_text, text) {
            (Some(inputs), Some(t)) => Some((inputs, t)),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "captions' tokens must be given exactly when the step is StableRep+".into(),
                ))
            }
        };
        let chunks = self.rows / self.chunk;
        // 1. Features, chunk by chunk.
        let mut feats = Vec::with_capacity(self.rows * self.width);
        let (plan, input, f) = &self.encode;
        for c in 0..chunks {
            self.write_chunk(plan, input, c, images, aug)?;
            feats.extend(plan.run_fetch(&[*f])?.swap_remove(0));
        }
        // 2. Head and loss over the whole batch; the head's update.
        let hyper = adam_hyper(lr, &self.adamw, t);
        self.head.write(self.head_features, &feats)?;
        self.head.write(self.head_hyper, &hyper)?;
        if let Some((inputs, t)) = text {
            crate::train::fixed::write_text(&self.head, inputs, t)?;
        }
        let mut out = self
            .head
            .run_fetch(&[self.head_loss, self.head_dfeatures])?;
        let df = out.swap_remove(1);
        let loss = out[0][0];
        let head_grads = if want_grads && !self.head_grads.is_empty() {
            Some(
                self.head_grads
                    .iter()
                    .map(|(name, n)| Ok((name.clone(), self.head.read(*n)?)))
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        // 3. The encoder's gradients, chunk by chunk, summed on the device (the first chunk
        // overwrites what the last step left).
        let (plan, input, dfc) = &self.backward;
        let w = self.chunk * self.width;
        for c in 0..chunks {
            self.write_chunk(plan, input, c, images, aug)?;
            plan.write(*dfc, &df[c * w..(c + 1) * w])?;
            plan.write(self.backward_hyper, &[if c == 0 { 0.0 } else { 1.0 }])?;
            plan.run()?;
        }
        let grads = if want_grads {
            Some(
                self.backward_accs
                    .iter()
                    .map(|&a| plan.read(a))
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        // 4. The encoder's update.
        self.update.write(self.update_hyper, &hyper)?;
        self.update.run()?;
        Ok(ChunkedOutcome {
            loss,
            encoder_grads: grads,
            head_grads,
        })
    }

    /// The four plans: features, head and loss, encoder backward (one chunk), update (for
    /// their stats and kernels).
    pub fn plans(&self) -> [&Plan; 4] {
        [&self.encode.0, &self.head, &self.backward.0, &self.update]
    }

    /// Peak bytes the four plans plan for (the largest of them; they run one at a time).
    pub fn peak_bytes(&self) -> u64 {
        [&self.encode.0, &self.head, &self.backward.0, &self.update]
            .iter()
            .map(|p| p.stats().peak_bytes)
            .max()
            .unwrap_or(0)
    }
}
