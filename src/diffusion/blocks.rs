//! Building blocks of Stable Diffusion's UNet and VAE on the graph, with diffusers' parameter
//! names: GroupNorm, nearest 2x upsampling, and `ResnetBlock2D`.

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::kernels::elementwise::UnaryOp;

/// GroupNorm over x [N, C, H, W] with per-channel `gamma` and `beta` [C]: statistics per
/// (sample, group of C / groups channels), as `torch.nn.GroupNorm`.
pub fn group_norm(
    g: &mut Graph,
    x: NodeId,
    gamma: NodeId,
    beta: NodeId,
    groups: usize,
    eps: f32,
) -> Result<NodeId> {
    let s = g.shape(x).to_vec();
    if s.len() != 4 || groups == 0 || !s[1].is_multiple_of(groups) {
        return Err(Error::shape(
            "group_norm",
            format!(
                "{groups} groups over an input of shape {s:?} (want [N, C, H, W], C divisible)"
            ),
        ));
    }
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let len = c / groups * h * w;
    let rows = g.reshape(x, &[n * groups, len])?;
    let one = g.constant(1.0, &[len]);
    let zero = g.constant(0.0, &[len]);
    let y = g.layer_norm(rows, one, zero, eps)?;
    let y = g.reshape(y, &[n, c, h, w])?;
    let gm = g.reshape(gamma, &[c, 1, 1])?;
    let bt = g.reshape(beta, &[c, 1, 1])?;
    let y = g.mul(y, gm)?;
    g.add(y, bt)
}

/// Nearest-neighbour 2x upsampling of x [N, C, H, W] (`F.interpolate(scale_factor=2)`).
pub fn upsample_nearest2x(g: &mut Graph, x: NodeId) -> Result<NodeId> {
    let s = g.shape(x).to_vec();
    if s.len() != 4 {
        return Err(Error::shape(
            "upsample",
            format!("input {s:?} is not [N, C, H, W]"),
        ));
    }
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let x = g.reshape(x, &[n * c, h, 1, w, 1])?;
    let x = g.expand(x, &[n * c, h, 2, w, 2])?;
    g.reshape(x, &[n, c, 2 * h, 2 * w])
}

/// `y = x W^T + b` over the last axis, with diffusers' `{prefix}weight` [out, in] and
/// `{prefix}bias` [out].
pub fn linear(g: &mut Graph, prefix: &str, x: NodeId, cin: usize, cout: usize) -> Result<NodeId> {
    let w = g.param(&format!("{prefix}weight"), &[cout, cin]);
    let b = g.param(&format!("{prefix}bias"), &[cout]);
    let y = g.matmul_t(x, w, false, true)?;
    g.add(y, b)
}

/// A conv2d with diffusers' `{prefix}weight` [out, in, k, k] and `{prefix}bias` [out].
pub fn conv(
    g: &mut Graph,
    prefix: &str,
    x: NodeId,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
) -> Result<NodeId> {
    let w = g.param(&format!("{prefix}weight"), &[cout, cin, k, k]);
    let b = g.param(&format!("{prefix}bias"), &[cout]);
    g.conv2d(x, w, Some(b), stride, k / 2)
}

/// Settings of a `ResnetBlock2D`.
#[derive(Clone, Copy, Debug)]
pub struct Resnet {
    /// Input channels.
    pub cin: usize,
    /// Output channels (a 1x1 `conv_shortcut` when they differ).
    pub cout: usize,
    /// Width of the time embedding (`time_emb_proj`), None for the VAE's blocks.
    pub temb: Option<usize>,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f32,
}

/// diffusers' `ResnetBlock2D` (default settings: SiLU, time embedding added after conv1,
/// output scale 1): `x + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))`.
pub fn resnet_block(
    g: &mut Graph,
    prefix: &str,
    x: NodeId,
    temb: Option<NodeId>,
    r: Resnet,
) -> Result<NodeId> {
    let p = |n: &str| format!("{prefix}{n}");
    let norm = |g: &mut Graph, name: &str, x: NodeId, c: usize| -> Result<NodeId> {
        let gm = g.param(&p(&format!("{name}.weight")), &[c]);
        let bt = g.param(&p(&format!("{name}.bias")), &[c]);
        let y = group_norm(g, x, gm, bt, r.groups, r.eps)?;
        g.unary(UnaryOp::Silu, y)
    };
    let h = norm(g, "norm1", x, r.cin)?;
    let mut h = conv(g, &p("conv1."), h, r.cin, r.cout, 3, 1)?;
    match (temb, r.temb) {
        (Some(t), Some(tc)) => {
            let n = g.shape(t)[0];
            let t = g.unary(UnaryOp::Silu, t)?;
            let t = linear(g, &p("time_emb_proj."), t, tc, r.cout)?;
            let t = g.reshape(t, &[n, r.cout, 1, 1])?;
            h = g.add(h, t)?;
        }
        (None, None) => {}
        _ => {
            return Err(Error::Graph(format!(
                "{prefix}: the time embedding and its width must be given together"
            )))
        }
    }
    let h = norm(g, "norm2", h, r.cout)?;
    let h = conv(g, &p("conv2."), h, r.cout, r.cout, 3, 1)?;
    let skip = if r.cin != r.cout {
        conv(g, &p("conv_shortcut."), x, r.cin, r.cout, 1, 1)?
    } else {
        x
    };
    g.add(skip, h)
}

/// diffusers' `get_timestep_embedding` for one timestep (max period 10,000, scale 1), in
/// the same f32 steps as torch: frequencies exp(-ln(10^4) i / (dim/2 - shift)), then
/// [sin, cos] of t * freq, swapped to [cos, sin] when `flip` (SD's UNet), zero-padded to an
/// odd `dim`. The UNet's time MLP takes these features as a per-step input.
pub fn timestep_features(t: f64, dim: usize, flip: bool, shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let ln = -(10_000f64.ln()) as f32;
    let args: Vec<f32> = (0..half)
        .map(|i| {
            let e = ln * i as f32 / (half as f64 - shift) as f32;
            (t as f32) * e.exp()
        })
        .collect();
    let sin = args.iter().map(|&a| (a as f64).sin() as f32);
    let cos = args.iter().map(|&a| (a as f64).cos() as f32);
    let mut out: Vec<f32> = if flip {
        cos.chain(sin).collect()
    } else {
        sin.chain(cos).collect()
    };
    out.resize(dim, 0.0);
    out
}
