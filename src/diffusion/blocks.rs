//! Building blocks of Stable Diffusion's UNet and VAE on the graph, with diffusers' parameter
//! names: nearest 2x upsampling, `ResnetBlock2D`, attention and `Transformer2DModel`
//! (GroupNorm is [`Graph::group_norm`]).

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::kernels::elementwise::UnaryOp;

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

/// diffusers' `Upsample2D`: nearest 2x, then a 3x3 conv `{prefix}weight` / `{prefix}bias`.
pub fn upsample(g: &mut Graph, prefix: &str, x: NodeId, ch: usize) -> Result<NodeId> {
    let x = upsample_nearest2x(g, x)?;
    conv(g, prefix, x, ch, ch, 3, 1)
}

/// A matmul weight [out, ...] contracted over its other dims: f16 when the graph asks for
/// half weights and the contraction length is a multiple of 4 (the f16 kernels read runs of
/// 4), f32 otherwise.
pub fn weight(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    let k: usize = shape[1..].iter().product();
    if g.half_weights && k.is_multiple_of(4) {
        g.param_f16(name, shape)
    } else {
        g.param(name, shape)
    }
}

/// `y = x W^T + b` over the last axis, with diffusers' `{prefix}weight` [out, in] and
/// `{prefix}bias` [out].
pub fn linear(g: &mut Graph, prefix: &str, x: NodeId, cin: usize, cout: usize) -> Result<NodeId> {
    let w = weight(g, &format!("{prefix}weight"), &[cout, cin]);
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
    let w = weight(g, &format!("{prefix}weight"), &[cout, cin, k, k]);
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
        g.group_norm(x, gm, bt, r.groups, r.eps, true)
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

/// Multi-head scaled dot-product attention: q [B * Tq, heads * dh], k and v [B * Tk,
/// heads * dh] -> [B * Tq, heads * dh], through the fused online-softmax kernel (no
/// [Tq, Tk] score matrix in memory; differentiable: the backward recomputes the scores).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    g: &mut Graph,
    q: NodeId,
    k: NodeId,
    v: NodeId,
    batch: usize,
    tq: usize,
    tk: usize,
    heads: usize,
) -> Result<NodeId> {
    let inner = g.shape(q)[1];
    if heads == 0 || !inner.is_multiple_of(heads) {
        return Err(Error::shape(
            "attention",
            format!("width {inner} is not divisible by {heads} heads"),
        ));
    }
    let dh = inner / heads;
    let split = |g: &mut Graph, x: NodeId, t: usize| -> Result<NodeId> {
        let x = g.reshape(x, &[batch, t, heads, dh])?;
        let x = g.permute(x, &[0, 2, 1, 3])?;
        g.reshape(x, &[batch * heads, t, dh])
    };
    let (q, k, v) = (split(g, q, tq)?, split(g, k, tk)?, split(g, v, tk)?);
    let o = g.attention(q, k, v, 1.0 / (dh as f32).sqrt())?;
    let o = g.reshape(o, &[batch, heads, tq, dh])?;
    let o = g.permute(o, &[0, 2, 1, 3])?;
    g.reshape(o, &[batch * tq, inner])
}

/// LayerNorm over the last axis with `{prefix}weight` / `{prefix}bias` [d].
fn layer_norm(g: &mut Graph, prefix: &str, x: NodeId, d: usize, eps: f32) -> Result<NodeId> {
    let w = g.param(&format!("{prefix}weight"), &[d]);
    let b = g.param(&format!("{prefix}bias"), &[d]);
    g.layer_norm(x, w, b, eps)
}

/// Settings of a `Transformer2DModel` (SD 1.x: 1x1 conv projections, one block).
#[derive(Clone, Copy, Debug)]
pub struct SpatialTransformer {
    /// Channels (= heads * head width in SD 1.x).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the text states attended to (768 for SD 1.x).
    pub context_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Blocks.
    pub layers: usize,
}

/// diffusers' `Transformer2DModel` with SD 1.x's settings: GroupNorm (eps 1e-6), 1x1 conv
/// `proj_in`, `BasicTransformerBlock`s (LayerNorm eps 1e-5; self-attention; cross-attention to
/// `context` [B * T, context_dim]; GEGLU feed-forward 4x wide), 1x1 conv `proj_out`, residual.
pub fn spatial_transformer(
    g: &mut Graph,
    prefix: &str,
    x: NodeId,
    context: NodeId,
    ctx_tokens: usize,
    s: SpatialTransformer,
) -> Result<NodeId> {
    let p = |n: &str| format!("{prefix}{n}");
    let sh = g.shape(x).to_vec();
    let (b, c, h, w) = (sh[0], sh[1], sh[2], sh[3]);
    if c != s.channels {
        return Err(Error::shape(
            "spatial transformer",
            format!(
                "{prefix}: input {sh:?} has {c} channels, the block {}",
                s.channels
            ),
        ));
    }
    let gm = g.param(&p("norm.weight"), &[c]);
    let bt = g.param(&p("norm.bias"), &[c]);
    let hdn = g.group_norm(x, gm, bt, s.groups, 1e-6, false)?;
    let hdn = conv(g, &p("proj_in."), hdn, c, c, 1, 1)?;
    let hdn = g.permute(hdn, &[0, 2, 3, 1])?;
    let mut t = g.reshape(hdn, &[b * h * w, c])?;
    let nobias = |g: &mut Graph, name: String, x: NodeId, cin: usize| -> Result<NodeId> {
        let wt = weight(g, &name, &[c, cin]);
        g.matmul_t(x, wt, false, true)
    };
    for l in 0..s.layers {
        let q = |n: &str| p(&format!("transformer_blocks.{l}.{n}"));
        for (attn, norm, cross) in [("attn1", "norm1.", false), ("attn2", "norm2.", true)] {
            let n = layer_norm(g, &q(norm), t, c, 1e-5)?;
            let (kv, tk, kd) = if cross {
                (context, ctx_tokens, s.context_dim)
            } else {
                (n, h * w, c)
            };
            let qq = nobias(g, q(&format!("{attn}.to_q.weight")), n, c)?;
            let kk = nobias(g, q(&format!("{attn}.to_k.weight")), kv, kd)?;
            let vv = nobias(g, q(&format!("{attn}.to_v.weight")), kv, kd)?;
            let o = attention(g, qq, kk, vv, b, h * w, tk, s.heads)?;
            let o = linear(g, &q(&format!("{attn}.to_out.0.")), o, c, c)?;
            t = g.add(t, o)?;
        }
        let n = layer_norm(g, &q("norm3."), t, c, 1e-5)?;
        let inner = 4 * c;
        let hg = linear(g, &q("ff.net.0.proj."), n, c, 2 * inner)?;
        let hg = g.reshape(hg, &[b * h * w, 2, inner])?;
        let hid = g.slice(hg, 1, 0, 1)?;
        let gate = g.slice(hg, 1, 1, 1)?;
        let gate = g.unary(UnaryOp::Gelu, gate)?;
        let ff = g.mul(hid, gate)?;
        let ff = g.reshape(ff, &[b * h * w, inner])?;
        let ff = linear(g, &q("ff.net.2."), ff, inner, c)?;
        t = g.add(t, ff)?;
    }
    let t = g.reshape(t, &[b, h, w, c])?;
    let t = g.permute(t, &[0, 3, 1, 2])?;
    let t = conv(g, &p("proj_out."), t, c, c, 1, 1)?;
    g.add(t, x)
}
