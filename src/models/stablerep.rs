//! StableRep's model and training step graph: ViT CLS features (`visual.*`), the projection
//! head (`image_mlp.*`: Linear-BN-ReLU-Linear-BN-ReLU-Linear, BatchNorm statistics per view
//! group), the multi-positive contrastive loss, BatchNorm running statistics and AdamW with
//! the official weight-decay rule — all in one graph, so a step is one plan and one submit.

use super::text::{self, TextConfig, TextInputs};
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

/// StableRep+'s language supervision: the text tower and the shared embedding width of
/// `image_projection` (applied to the ViT's CLS feature) and `text_projection`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlusConfig {
    /// Text tower.
    pub text: TextConfig,
    /// Image-text embedding width (512 in StableRep+).
    pub embed: usize,
}

/// Upper bound of the logit-scale parameter theta (scale exp(theta) <= 100).
pub const LOGIT_SCALE_MAX: f32 = 4.6052;

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

/// The recipe's AdamW: betas (0.9, 0.98), eps 1e-8, the given decoupled weight decay.
pub fn recipe_adamw(weight_decay: f32) -> AdamW {
    AdamW {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay,
        clamp: None,
    }
}

/// One StableRep training step: the graph and its handles.
pub struct TrainStep {
    /// The graph (forward, backward, BatchNorm running stats, AdamW).
    pub graph: Graph,
    /// Input images [captions * images_per_caption, 3, H, W], normalized, view-major; with
    /// `augment_from`, the source images [.., 3, src_h, src_w] in [0, 1].
    pub images: NodeId,
    /// Augmentation parameters [rows, 16] when the step augments.
    pub aug_params: Option<NodeId>,
    /// The loss ([1]).
    pub loss: NodeId,
    /// AdamW hyper input [lr, 1 - beta1^t, 1 - beta2^t].
    pub hyper: NodeId,
    /// Trainable parameters.
    pub params: Vec<NodeId>,
    /// The loss's gradient with respect to each of `params` (same order).
    pub grads: Vec<NodeId>,
    /// The loss terms by name (`ssl`, and `image_text` for StableRep+), each [1].
    pub terms: Vec<(&'static str, NodeId)>,
    /// StableRep+'s text inputs.
    pub text: Option<TextInputs>,
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
    /// When set, the step starts from source images of this (height, width) in [0, 1] and
    /// per-image augmentation parameters, and augments on the GPU.
    pub augment_from: Option<(usize, usize)>,
    /// StableRep+: add the image-text loss (weights 1 and 1, as the official code).
    pub plus: Option<PlusConfig>,
}

/// StableRep+'s image-text term on CLS features `feats` [n * m, width] (image-major rows of
/// n captions): the text tower over the n captions, both projections and the CLIP loss with
/// the learned logit scale. Returns the loss [1] and the text inputs to write.
pub fn image_text_loss(
    g: &mut Graph,
    plus: &PlusConfig,
    feats: NodeId,
    captions: usize,
) -> Result<(NodeId, TextInputs)> {
    let width = g.shape(feats)[1];
    let (tf, inputs) = text::encoder(g, &plus.text, captions)?;
    let tp = g.param("text_projection", &[plus.text.width, plus.embed]);
    let t = g.matmul(tf, tp)?;
    let ip = g.param("image_projection", &[width, plus.embed]);
    let v = g.matmul(feats, ip)?;
    let theta = g.param("logit_scale", &[1]);
    Ok((super::losses::image_text_loss(g, v, t, theta)?, inputs))
}

/// The recipe's AdamW settings for parameter `name` of `ndim` dimensions: no weight decay
/// where [`decays`] says so, and the logit scale clamped to [0, [`LOGIT_SCALE_MAX`]].
pub fn param_adamw(name: &str, ndim: usize, base: AdamW) -> AdamW {
    let mut c = base;
    if !decays(name, ndim) {
        c.weight_decay = 0.0;
    }
    if name == "logit_scale" {
        c.clamp = Some([0.0, LOGIT_SCALE_MAX]);
    }
    c
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
    let (images, aug_params, pixels) = match cfg.augment_from {
        Some((h, w)) => {
            let src = g.input("images", &[n * m, 3, h, w]);
            let prm = g.input("augment.params", &[n * m, 16]);
            let out = g.augment(src, prm, s)?;
            (src, Some(prm), out)
        }
        None => {
            let x = g.input("images", &[n * m, 3, s, s]);
            (x, None, x)
        }
    };
    let feats = vit::encoder(&mut g, &cfg.vit, "visual.", pixels)?;
    let (h, stats) = head(&mut g, &cfg.head, "image_mlp.", feats, m)?;
    let ssl = super::losses::multi_positive_loss(&mut g, h, n, cfg.temperature)?;
    let mut loss = ssl;
    let mut terms = vec![("ssl", ssl)];
    let mut text_inputs = None;
    if let Some(plus) = &cfg.plus {
        let (it, inputs) = image_text_loss(&mut g, plus, feats, n)?;
        loss = g.add(ssl, it)?;
        terms.push(("image_text", it));
        text_inputs = Some(inputs);
    }
    let params: Vec<NodeId> = (0..g.nodes.len())
        .map(NodeId)
        .filter(|&id| g.node(id).op == Op::Param)
        .collect();
    let grads = g.grad(loss, &params)?;
    for (l, st) in stats.iter().enumerate() {
        g.bn_running_update(&format!("image_mlp.bn{}", l + 1), *st, BN_MOMENTUM, BN_EPS)?;
    }
    let cfgs: Vec<AdamW> = params
        .iter()
        .map(|&p| {
            let name = g.node(p).name.as_deref().unwrap_or_default();
            param_adamw(name, g.shape(p).len(), cfg.adamw)
        })
        .collect();
    let hyper = g.adamw_each(&params, &grads, &cfgs)?;
    Ok(TrainStep {
        graph: g,
        images,
        aug_params,
        loss,
        hyper,
        params,
        grads,
        terms,
        text: text_inputs,
    })
}

/// How a fresh encoder is initialized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The official code's (timm's): transformer matrices, CLS token and positions
    /// normal(0, 0.02), biases 0. Tuned for width 768; at width 96 it starts the matrices
    /// about 3 times smaller than PyTorch's module defaults, and a small encoder learns shape
    /// more slowly from there (docs/results.md, Result 6).
    #[default]
    Official,
    /// PyTorch's module defaults, as `tools/world_reference_torch.py` builds its ViT from
    /// `nn.Linear` and `nn.MultiheadAttention`: MLP weights and biases uniform(+-1/sqrt(fan_in)),
    /// the qkv matrix Xavier-uniform (+-sqrt(6 / (width + 3 width))) with zero bias, the
    /// attention's output matrix uniform(+-1/sqrt(width)) with zero bias, CLS token 0, positions
    /// normal(0, 0.02). Norms, the stem and the projection head as [`Init::Official`].
    Torch,
}

/// Fresh parameters for `vit` + `head` as the official code initializes them: ViT linear
/// weights, position embedding and CLS token normal(0, 0.02) (timm 0.5.4's truncation at +-2
/// never triggers), biases 0, norms 1/0, patch embedding (or the convolutional stem's
/// convolutions) and head linears uniform(+-1/sqrt(fan_in)),
/// BatchNorm 1/0 with running statistics 0/1.
///
/// With `plus`, also the text tower ([`TextConfig::init`]), `image_projection`
/// N(0, vit width^-1/2), `text_projection` N(0, text width^-1/2) and `logit_scale` ln(1/0.07).
pub fn init_params(
    vit: &VitConfig,
    head: &HeadConfig,
    plus: Option<&PlusConfig>,
    seed: u64,
) -> crate::nn::checkpoint::Checkpoint {
    init_params_with(vit, head, plus, seed, Init::Official)
}

/// [`init_params`] with the encoder initialized by `init`.
pub fn init_params_with(
    vit: &VitConfig,
    head: &HeadConfig,
    plus: Option<&PlusConfig>,
    seed: u64,
    init: Init,
) -> crate::nn::checkpoint::Checkpoint {
    use crate::nn::checkpoint::{Checkpoint, HostTensor};
    use crate::util::rng::Rng;
    let mut rng = Rng(seed);
    let mut ck = Checkpoint::default();
    let mut shapes = vit.param_shapes("visual.");
    let (d, hd) = (vit.width, head.hidden);
    for (l, fan) in [(1, d), (2, hd)] {
        shapes.push((format!("image_mlp.layer{l}.weight"), vec![hd, fan]));
        shapes.push((format!("image_mlp.layer{l}.bias"), vec![hd]));
        shapes.push((format!("image_mlp.bn{l}.weight"), vec![hd]));
        shapes.push((format!("image_mlp.bn{l}.bias"), vec![hd]));
        shapes.push((format!("image_mlp.bn{l}.running_mean"), vec![hd]));
        shapes.push((format!("image_mlp.bn{l}.running_var"), vec![hd]));
    }
    shapes.push(("image_mlp.layer3.weight".into(), vec![head.out, hd]));
    shapes.push(("image_mlp.layer3.bias".into(), vec![head.out]));
    // Fan-in of every matrix or convolution weight, which its bias's bound uses too.
    let weight_fan: std::collections::HashMap<String, usize> = shapes
        .iter()
        .filter(|(_, s)| s.len() >= 2)
        .map(|(n, s)| (n.clone(), s[1..].iter().product()))
        .collect();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let uniform_init =
            name.starts_with("image_mlp.layer") || name.starts_with("visual.patch_embed");
        // PyTorch's bias bound uses the weight's fan-in; the convolutional stem's GroupNorm
        // parameters (no weight matrix of their own) are norms.
        let fan = match name.strip_suffix("bias") {
            Some(stem) => weight_fan.get(&format!("{stem}weight")),
            None => weight_fan.get(&name),
        };
        let torch = if init == Init::Torch && name.starts_with("visual.blocks.") {
            torch_default_bound(&name, &shape, fan.copied())
        } else {
            None
        };
        let data: Vec<f32> = if let Some(b) = torch {
            (0..n)
                .map(|_| ((rng.unit() * 2.0 - 1.0) * b) as f32)
                .collect()
        } else if init == Init::Torch && name.ends_with("cls_token") {
            vec![0.0; n]
        } else if let (true, Some(&fan)) = (uniform_init, fan) {
            let b = 1.0 / (fan as f64).sqrt();
            (0..n)
                .map(|_| ((rng.unit() * 2.0 - 1.0) * b) as f32)
                .collect()
        } else if name.ends_with("running_var") || (name.ends_with("weight") && shape.len() == 1) {
            vec![1.0; n]
        } else if name.ends_with("bias") || name.ends_with("running_mean") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (0.02 * rng.normal()) as f32).collect()
        };
        ck.tensors.insert(name, HostTensor { shape, data });
    }
    if let Some(p) = plus {
        p.text.init(&mut rng, &mut ck);
        for (name, rows) in [
            ("image_projection", vit.width),
            ("text_projection", p.text.width),
        ] {
            let std = (rows as f64).powf(-0.5);
            let data = (0..rows * p.embed)
                .map(|_| (std * rng.normal()) as f32)
                .collect();
            ck.tensors.insert(
                name.into(),
                HostTensor {
                    shape: vec![rows, p.embed],
                    data,
                },
            );
        }
        ck.tensors.insert(
            "logit_scale".into(),
            HostTensor {
                shape: vec![1],
                data: vec![(1.0f64 / 0.07).ln() as f32],
            },
        );
    }
    ck
}

/// The uniform bound PyTorch's modules give a transformer block's parameter under
/// [`Init::Torch`], or `None` for a parameter they set to a constant (norms; the attention's
/// biases, which `nn.MultiheadAttention` zeroes). `fan` is the fan-in of the weight the
/// parameter belongs to.
fn torch_default_bound(name: &str, shape: &[usize], fan: Option<usize>) -> Option<f64> {
    let fan = fan? as f64;
    if name.contains(".norm") || (name.contains(".attn.") && name.ends_with("bias")) {
        None
    } else if name.ends_with("attn.qkv.weight") {
        // Xavier-uniform over the [3d, d] in-projection: fan_in d, fan_out 3d.
        Some((6.0 / (fan + shape[0] as f64)).sqrt())
    } else {
        // nn.Linear: kaiming_uniform(a = sqrt(5)) for the weight, the same bound for the bias.
        Some(1.0 / fan.sqrt())
    }
}
