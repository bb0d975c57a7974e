//! A small convolutional encoder: 3 x 3 convolutions (the first at stride 1, the others at
//! stride 2), each followed by GroupNorm and SiLU, then the mean over positions. Its
//! inductive bias learns the shapes of small synthetic scenes in far fewer steps than a ViT,
//! which is what the mini-world's fidelity judge needs.

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::kernels::reduce::ReduceOp;
use crate::nn::checkpoint::{Checkpoint, HostTensor};
use crate::util::rng::Rng;

/// GroupNorm groups of every layer.
pub const GROUPS: usize = 8;

/// The encoder's sizes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CnnConfig {
    /// Input side in pixels.
    pub img_size: usize,
    /// Output channels per layer (each a multiple of [`GROUPS`]).
    pub channels: Vec<usize>,
}

impl CnnConfig {
    /// Feature width (the last layer's channels).
    pub fn width(&self) -> usize {
        self.channels.last().copied().unwrap_or(0)
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        if self.channels.is_empty() || self.channels.iter().any(|&c| c == 0 || c % GROUPS != 0) {
            return Err(Error::Config(format!(
                "CNN channels {:?}: want at least one layer, each a positive multiple of {GROUPS}",
                self.channels
            )));
        }
        let down = 1usize << (self.channels.len() - 1).min(16);
        if self.img_size == 0 || !self.img_size.is_multiple_of(down) {
            return Err(Error::Config(format!(
                "CNN input size {} is not a multiple of {down} ({} layers)",
                self.img_size,
                self.channels.len()
            )));
        }
        Ok(())
    }

    /// Every parameter name (with `prefix`) and shape.
    pub fn param_shapes(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        let mut cin = 3;
        for (l, &c) in self.channels.iter().enumerate() {
            v.push((format!("{prefix}{l}.conv.weight"), vec![c, cin, 3, 3]));
            v.push((format!("{prefix}{l}.conv.bias"), vec![c]));
            v.push((format!("{prefix}{l}.norm.weight"), vec![c]));
            v.push((format!("{prefix}{l}.norm.bias"), vec![c]));
            cin = c;
        }
        v
    }

    /// Fresh parameters: convolutions uniform(+-1/sqrt(fan_in)) as PyTorch, norms 1/0.
    pub fn init(&self, prefix: &str, seed: u64) -> Checkpoint {
        let mut rng = Rng(seed ^ 0xC0_4E);
        let mut ck = Checkpoint::default();
        let mut fan = 27.0f64;
        for (name, shape) in self.param_shapes(prefix) {
            let n: usize = shape.iter().product();
            if shape.len() == 4 {
                fan = (shape[1] * 9) as f64;
            }
            let data = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with("norm.bias") {
                vec![0.0; n]
            } else {
                let b = 1.0 / fan.sqrt();
                (0..n)
                    .map(|_| ((rng.unit() * 2.0 - 1.0) * b) as f32)
                    .collect()
            };
            ck.tensors.insert(name, HostTensor { shape, data });
        }
        ck
    }
}

/// Features [N, width] of normalized images x [N, 3, S, S].
pub fn encoder(g: &mut Graph, cfg: &CnnConfig, prefix: &str, x: NodeId) -> Result<NodeId> {
    cfg.validate()?;
    let mut h = x;
    let mut cin = 3;
    for (l, &c) in cfg.channels.iter().enumerate() {
        let w = g.param(&format!("{prefix}{l}.conv.weight"), &[c, cin, 3, 3]);
        let b = g.param(&format!("{prefix}{l}.conv.bias"), &[c]);
        h = g.conv2d(h, w, Some(b), if l == 0 { 1 } else { 2 }, 1)?;
        let gw = g.param(&format!("{prefix}{l}.norm.weight"), &[c]);
        let gb = g.param(&format!("{prefix}{l}.norm.bias"), &[c]);
        h = g.group_norm(h, gw, gb, GROUPS, 1e-5, true)?;
        cin = c;
    }
    let s = g.shape(h).to_vec();
    let flat = g.reshape(h, &[s[0], s[1], s[2] * s[3]])?;
    g.reduce(ReduceOp::Mean, flat, 2)
}
