//! The contrastive losses, built from graph ops: StableRep's multi-positive loss (SimCLR's
//! NT-Xent when every caption has two views) and StableRep+'s image-text loss. The fused
//! kernel they share (`Op::MultiPos`) lives in the graph IR; these builders compose it with
//! normalization and similarity products.

use crate::error::{Error, Result};
use crate::graph::{serial, DType, Graph, NodeId, Op, MULTIPOS_BLOCK};
use crate::kernels::elementwise::UnaryOp;

/// StableRep's multi-positive contrastive loss of embeddings h [n * m, D] laid out
/// view-major (row k = v * n + i, caption k mod n): L2-normalize, cosine similarities,
/// softmax over all other rows at temperature `tau`, cross-entropy against the uniform
/// distribution over the other images of the same caption, mean over anchors. With m = 2
/// and two crops of one image per caption this is SimCLR's NT-Xent. Returns a [1] tensor.
pub fn multi_positive_loss(g: &mut Graph, h: NodeId, captions: usize, tau: f32) -> Result<NodeId> {
    multi_positive_loss_blocked(g, h, captions, tau, MULTIPOS_BLOCK)
}

/// [`multi_positive_loss`] with at most `block` anchors per similarity block.
pub fn multi_positive_loss_blocked(
    g: &mut Graph,
    h: NodeId,
    captions: usize,
    tau: f32,
    block: usize,
) -> Result<NodeId> {
    let s = g.shape(h).to_vec();
    if s.len() != 2 || captions == 0 || !s[0].is_multiple_of(captions) {
        return Err(Error::shape(
            "multi_positive_loss",
            format!(
                "embeddings must be [captions * images, dim] with {captions} captions, got {s:?}"
            ),
        ));
    }
    if tau.is_nan() || tau <= 0.0 {
        return Err(Error::Config(format!(
            "temperature must be positive, got {tau}"
        )));
    }
    let z = g.l2_normalize(h)?;
    // Blocks of at most MULTIPOS_BLOCK anchors: each similarity block [rows, N] is its own
    // tensor, so no buffer holds the whole N x N matrix (8,256 x 8,256 floats at the
    // paper's batch would exceed the 256 MiB many devices allow per buffer).
    let n = s[0];
    serial("multi-positive loss", "views", n, 2)?;
    let mut parts = Vec::new();
    let mut r0 = 0;
    while r0 < n {
        let len = block.max(1).min(n - r0);
        let zb = if len == n { z } else { g.slice(z, 0, r0, len)? };
        let sim = g.matmul_t(zb, z, false, true)?;
        parts.push(g.push(
            Op::MultiPos {
                captions,
                tau,
                mask_self: true,
                row0: r0,
            },
            vec![sim],
            vec![len],
            DType::F32,
        ));
        r0 += len;
    }
    let rows = if parts.len() == 1 {
        parts[0]
    } else {
        g.concat(&parts, 0)?
    };
    g.mean_all(rows)
}

/// StableRep+'s image-text loss: image embeddings v [n * m, D] (view-major, caption of row
/// k is k mod n), text embeddings t [n, D], logit scale parameter theta [1] (scale
/// exp(theta)). Both are L2-normalized; image-to-text is the cross-entropy against the own
/// caption, text-to-image against the uniform distribution over the caption's m images;
/// returns their mean as a [1] tensor.
pub fn image_text_loss(g: &mut Graph, v: NodeId, t: NodeId, theta: NodeId) -> Result<NodeId> {
    let (sv, st, sth) = (
        g.shape(v).to_vec(),
        g.shape(t).to_vec(),
        g.shape(theta).to_vec(),
    );
    if sv.len() != 2
        || st.len() != 2
        || sv[1] != st[1]
        || st[0] == 0
        || !sv[0].is_multiple_of(st[0])
        || sth != [1]
    {
        return Err(Error::shape(
            "image_text_loss",
            format!("needs images [n * m, D], texts [n, D] and a [1] logit scale, got {sv:?}, {st:?} and {sth:?}"),
        ));
    }
    let captions = st[0];
    serial("image-text loss", "images", sv[0].max(captions), 2)?;
    let vn = g.l2_normalize(v)?;
    let tn = g.l2_normalize(t)?;
    let scale = g.unary(UnaryOp::Exp, theta)?;
    let a = g.matmul_t(vn, tn, false, true)?;
    let a = g.mul(a, scale)?;
    let b = g.transpose(a)?;
    let op = Op::MultiPos {
        captions,
        tau: 1.0,
        mask_self: false,
        row0: 0,
    };
    let i2t = g.push(op.clone(), vec![a], vec![sv[0]], DType::F32);
    let t2i = g.push(op, vec![b], vec![captions], DType::F32);
    let i2t = g.mean_all(i2t)?;
    let t2i = g.mean_all(t2i)?;
    let sum = g.add(i2t, t2i)?;
    g.affine(sum, 0.5, 0.0)
}
