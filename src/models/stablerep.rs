//! StableRep's model and training step graph: ViT CLS features (`visual.*`), the projection
//! head (`image_mlp.*`: Linear-BN-ReLU-Linear-BN-ReLU-Linear, BatchNorm statistics per view
//! group), the multi-positive contrastive loss, BatchNorm running statistics and AdamW with
//! the official weight-decay rule — all in one graph, so a step is one plan and one submit.

use super::vit::{self, VitConfig};
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId, Op};
use crate::kernels::elementwise::UnaryOp;
use crate::kernels::optim::AdamW;

/// Projection head sizes (the paper: 4096 hidden, 256 out).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadConfig {
    /// Hidden width of layers 1 and 2.
    pub hidden: usize,
    /// Embedding width fed to the loss.
    pub out: usize,
}

/// BatchNorm settings of the head (PyTorch defaults).
pub const BN_EPS: f32 = 1e-5;
/// BatchNorm running-statistics momentum (PyTorch default).
pub const BN_MOMENTUM: f32 = 0.1;

/// The head over x [groups * n, width]; BatchNorm statistics per group of n rows. Returns
/// the embeddings and the two BatchNorm statistics nodes (for the running-stat updates).
pub fn head(
    g: &mut Graph,
    cfg: &HeadConfig,
    prefix: &str,
    x: NodeId,
    groups: usize,
) -> Result<(NodeId, [NodeId; 2])> {
    let d = *g.shape(x).last().unwrap_or(&0);
    let mut h = x;
    let mut stats = Vec::new();
    let mut fan_in = d;
    for l in 1..=2 {
        let w = g.param(&format!("{prefix}layer{l}.weight"), &[cfg.hidden, fan_in]);
        let b = g.param(&format!("{prefix}layer{l}.bias"), &[cfg.hidden]);
        h = g.matmul_t(h, w, false, true)?;
        h = g.add(h, b)?;
        let gw = g.param(&format!("{prefix}bn{l}.weight"), &[cfg.hidden]);
        let gb = g.param(&format!("{prefix}bn{l}.bias"), &[cfg.hidden]);
        let (y, st) = g.batch_norm(h, gw, gb, groups, BN_EPS)?;
        stats.push(st);
        h = g.unary(UnaryOp::Relu, y)?;
        fan_in = cfg.hidden;
    }
    let w = g.param(&format!("{prefix}layer3.weight"), &[cfg.out, cfg.hidden]);
    let b = g.param(&format!("{prefix}layer3.bias"), &[cfg.out]);
    h = g.matmul_t(h, w, false, true)?;
    h = g.add(h, b)?;
    Ok((h, [stats[0], stats[1]]))
}

/// Whether the official recipe decays a parameter: ndim >= 2 and no 'bias', 'ln' or 'bn' in
/// its name (so pos_embed and cls_token are decayed, norms and biases are not).
pub fn decays(name: &str, ndim: usize) -> bool {
    ndim >= 2 && !(name.contains("bias") || name.contains("ln") || name.contains("bn"))
}

/// One StableRep training step: the graph and its handles.
pub struct TrainStep {
    /// The graph (forward, backward, BatchNorm running stats, AdamW).
    pub graph: Graph,
    /// Input images [captions * images_per_caption, 3, H, W], normalized, view-major.
    pub images: NodeId,
    /// The loss ([1]).
    pub loss: NodeId,
    /// AdamW hyper input [lr, 1 - beta1^t, 1 - beta2^t].
    pub hyper: NodeId,
    /// Trainable parameters.
    pub params: Vec<NodeId>,
}

/// Settings of a StableRep training step.
#[derive(Clone, Copy, Debug)]
pub struct StepConfig {
    /// Encoder.
    pub vit: VitConfig,
    /// Head.
    pub head: HeadConfig,
    /// Captions per batch (n).
    pub captions: usize,
    /// Images per caption (m); 2 with two crops of one image is SimCLR.
    pub images_per_caption: usize,
    /// Loss temperature.
    pub temperature: f32,
    /// Optimizer (its weight decay applies where [`decays`] says so).
    pub adamw: AdamW,
}

/// Builds the training step graph.
pub fn train_step(cfg: &StepConfig) -> Result<TrainStep> {
    let (n, m) = (cfg.captions, cfg.images_per_caption);
    if n == 0 || m == 0 {
        return Err(Error::Config(
            "captions per batch and images per caption must be positive".into(),
        ));
    }
    let mut g = Graph::new();
    let s = cfg.vit.img_size;
    let images = g.input("images", &[n * m, 3, s, s]);
    let feats = vit::encoder(&mut g, &cfg.vit, "visual.", images)?;
    let (h, stats) = head(&mut g, &cfg.head, "image_mlp.", feats, m)?;
    let loss = g.multi_positive_loss(h, n, cfg.temperature)?;
    let params: Vec<NodeId> = (0..g.nodes.len())
        .map(NodeId)
        .filter(|&id| g.node(id).op == Op::Param)
        .collect();
    let grads = g.grad(loss, &params)?;
    for (l, st) in stats.iter().enumerate() {
        g.bn_running_update(&format!("image_mlp.bn{}", l + 1), *st, BN_MOMENTUM, BN_EPS)?;
    }
    let decay: Vec<bool> = params
        .iter()
        .map(|&p| {
            decays(
                g.node(p).name.as_deref().unwrap_or_default(),
                g.shape(p).len(),
            )
        })
        .collect();
    let hyper = g.adamw(&params, &grads, cfg.adamw, &decay)?;
    Ok(TrainStep {
        graph: g,
        images,
        loss,
        hyper,
        params,
    })
}
