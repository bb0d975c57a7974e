//! The pre-norm transformer block shared by the ViT (timm names, erf GELU, LN eps 1e-6) and
//! CLIP's text tower (OpenAI names, QuickGELU, LN eps 1e-5, causal attention).

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::kernels::elementwise::UnaryOp;
use crate::kernels::reduce::RowOp;

/// Parameter names inside one block (after the block's prefix), in the order
/// norm1 weight/bias, fused qkv weight/bias ([3][heads][head_dim] rows), attention output
/// projection weight/bias, norm2 weight/bias, MLP in weight/bias, MLP out weight/bias.
pub type BlockNames = [&'static str; 12];

/// timm's ViT block names.
pub const TIMM_NAMES: BlockNames = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

/// OpenAI CLIP's text `ResidualAttentionBlock` names (as in StableRep+ checkpoints).
pub const CLIP_NAMES: BlockNames = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];

/// What differs between the two block flavours.
#[derive(Clone, Copy, Debug)]
pub struct BlockStyle {
    /// Parameter names.
    pub names: &'static BlockNames,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// MLP activation.
    pub act: UnaryOp,
    /// Causal attention (query t sees keys 0..=t).
    pub causal: bool,
}

/// The ViT block: timm names, eps 1e-6, erf GELU, full attention.
pub const VIT_BLOCK: BlockStyle = BlockStyle {
    names: &TIMM_NAMES,
    eps: 1e-6,
    act: UnaryOp::Gelu,
    causal: false,
};

/// CLIP's text block: OpenAI names, eps 1e-5, QuickGELU, causal attention.
pub const CLIP_TEXT_BLOCK: BlockStyle = BlockStyle {
    names: &CLIP_NAMES,
    eps: 1e-5,
    act: UnaryOp::QuickGelu,
    causal: true,
};

/// Names and shapes of one block's parameters.
pub fn param_shapes(
    style: &BlockStyle,
    prefix: &str,
    width: usize,
    mlp: usize,
) -> Vec<(String, Vec<usize>)> {
    let d = width;
    let shapes = [
        vec![d],
        vec![d],
        vec![3 * d, d],
        vec![3 * d],
        vec![d, d],
        vec![d],
        vec![d],
        vec![d],
        vec![mlp, d],
        vec![mlp],
        vec![d, mlp],
        vec![d],
    ];
    style
        .names
        .iter()
        .zip(shapes)
        .map(|(n, s)| (format!("{prefix}{n}"), s))
        .collect()
}

/// One pre-norm block over x [batch * tokens, width]; parameters named `{prefix}{name}`.
/// Attention is one fused op on the qkv rows ([`Graph::head_attention`]) where the head width
/// and the device call for it, else batched matmuls over (batch * heads).
#[allow(clippy::too_many_arguments)]
pub fn block(
    g: &mut Graph,
    style: &BlockStyle,
    prefix: &str,
    x: NodeId,
    batch: usize,
    tokens: usize,
    heads: usize,
    mlp: usize,
) -> Result<NodeId> {
    let d = *g.shape(x).last().unwrap_or(&0);
    let dh = d / heads;
    let p: Vec<NodeId> = param_shapes(style, prefix, d, mlp)
        .iter()
        .map(|(n, s)| g.param(n, s))
        .collect();
    let h = g.layer_norm(x, p[0], p[1], style.eps)?;
    let qkv = g.matmul_t(h, p[2], false, true)?;
    let qkv = g.add(qkv, p[3])?;
    let scale = 1.0 / (dh as f32).sqrt();
    let o = if fused_attention(dh, tokens) {
        g.head_attention(qkv, tokens, heads, scale, style.causal)?
    } else {
        split_attention(g, style, qkv, batch, tokens, heads, scale)?
    };
    let o = g.matmul_t(o, p[4], false, true)?;
    let o = g.add(o, p[5])?;
    let x = g.add(x, o)?;
    let h = g.layer_norm(x, p[6], p[7], style.eps)?;
    let h = g.matmul_t(h, p[8], false, true)?;
    let h = g.add(h, p[9])?;
    let h = g.unary(style.act, h)?;
    let h = g.matmul_t(h, p[10], false, true)?;
    let h = g.add(h, p[11])?;
    g.add(x, h)
}

/// Whether a block with head width `dh` runs its attention as one fused op
/// ([`Graph::head_attention`]): where the fused kernels take the width and the device
/// prefers them ([`crate::gpu::fused_attention_preferred`]: not on CPU adapters).
fn fused_attention(dh: usize, tokens: usize) -> bool {
    crate::kernels::heads::fits(dh, tokens) && crate::gpu::fused_attention_preferred()
}

/// The unfused attention: heads split by a copy, batched score matmuls, softmax, the value
/// matmul and a merge copy. qkv [batch * tokens, 3 d] -> [batch * tokens, d].
fn split_attention(
    g: &mut Graph,
    style: &BlockStyle,
    qkv: NodeId,
    batch: usize,
    tokens: usize,
    heads: usize,
    scale: f32,
) -> Result<NodeId> {
    let d = g.shape(qkv)[1] / 3;
    let dh = d / heads;
    let qkv = g.reshape(qkv, &[batch, tokens, 3, heads, dh])?;
    let qkv = g.permute(qkv, &[2, 0, 3, 1, 4])?;
    let qkv = g.reshape(qkv, &[3, batch * heads, tokens, dh])?;
    let mut parts = Vec::with_capacity(3);
    for k in 0..3 {
        let s = g.slice(qkv, 0, k, 1)?;
        parts.push(g.reshape(s, &[batch * heads, tokens, dh])?);
    }
    let s = g.matmul_t(parts[0], parts[1], false, true)?;
    let s = g.affine(s, scale, 0.0)?;
    let a = if style.causal {
        g.row(RowOp::CausalSoftmax, s)?
    } else {
        g.softmax(s)?
    };
    let o = g.matmul(a, parts[2])?;
    let o = g.reshape(o, &[batch, heads, tokens, dh])?;
    let o = g.permute(o, &[0, 2, 1, 3])?;
    g.reshape(o, &[batch * tokens, d])
}
