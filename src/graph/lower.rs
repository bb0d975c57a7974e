//! Lowering: one graph node to the kernel dispatches that compute it (the plan compiler in
//! `plan.rs` decides memory and fusion, then calls these per node).

use super::{Graph, NodeId, Op};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::elementwise::{self, broadcast_strides, strides};
use crate::kernels::matmul::{self, MatmulShape};
use crate::kernels::{contrastive, heads, layout, norm, optim, reduce, Dispatch, View};

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// Lowers one node to dispatches.
pub(super) fn lower(
    gpu: &Gpu,
    g: &Graph,
    id: NodeId,
    view: &dyn Fn(NodeId) -> Result<View>,
) -> Result<Vec<Dispatch>> {
    let caps = &gpu.caps;
    let node = g.node(id);
    let ins = &node.inputs;
    let y = if node.op.is_update() {
        View::new(usize::MAX, 0)
    } else {
        view(id)?
    };
    let x = |k: usize| view(ins[k]);
    let sh = |k: usize| g.shape(ins[k]).to_vec();
    let rows_cols = |s: &[usize]| {
        let c = *s.last().unwrap_or(&1);
        (numel(s) / c.max(1), c)
    };
    Ok(match &node.op {
        Op::Matmul { .. } => lower_matmul(g, id, view, Ok(y), None, None, caps)?,
        Op::Unary(u) => elementwise::unary(*u, x(0)?, y, caps)?,
        Op::Binary(b) => elementwise::binary(*b, x(0)?, &sh(0), x(1)?, &sh(1), y, caps)?,
        Op::Reduce { op, axis } => {
            let s = sh(0);
            reduce::reduce(
                *op,
                x(0)?,
                numel(&s[..*axis]),
                s[*axis],
                numel(&s[axis + 1..]),
                y,
                caps,
            )?
        }
        Op::SumTo => layout::sum_to(x(0)?, &sh(0), y, &node.shape, caps)?,
        Op::Expand => {
            let sx = broadcast_strides(&sh(0), &node.shape);
            layout::strided_copy(
                &node.shape,
                x(0)?,
                0,
                &sx,
                y,
                0,
                &strides(&node.shape),
                caps,
            )?
        }
        Op::Reshape => vec![],
        Op::Permute(p) => layout::permute(x(0)?, &sh(0), p, y, caps)?,
        Op::Slice { axis, start } => {
            let st = strides(&sh(0));
            layout::strided_copy(
                &node.shape,
                x(0)?,
                start * st[*axis],
                &st,
                y,
                0,
                &strides(&node.shape),
                caps,
            )?
        }
        Op::Pad { axis, start } => {
            let sy = strides(&node.shape);
            let mut d = elementwise::fill(0.0, y, caps)?;
            d.extend(layout::strided_copy(
                &sh(0),
                x(0)?,
                0,
                &strides(&sh(0)),
                y,
                start * sy[*axis],
                &sy,
                caps,
            )?);
            d
        }
        Op::Concat { axis } => {
            let sy = strides(&node.shape);
            let mut d = Vec::new();
            let mut off = 0;
            for k in 0..ins.len() {
                let s = sh(k);
                d.extend(layout::strided_copy(
                    &s,
                    x(k)?,
                    0,
                    &strides(&s),
                    y,
                    off * sy[*axis],
                    &sy,
                    caps,
                )?);
                off += s[*axis];
            }
            d
        }
        Op::Attention { scale } => {
            let (s, sk) = (sh(0), sh(1));
            layout::attention(
                x(0)?,
                x(1)?,
                x(2)?,
                y,
                [s[0], s[1], sk[1], s[2]],
                *scale,
                caps,
            )?
        }
        Op::HeadAttention(h) => heads::forward(h, x(0)?, y, sh(0)[0], caps)?,
        Op::HeadAttentionStats(h) => heads::stats(h, x(0)?, x(1)?, x(2)?, y, sh(0)[0], caps)?,
        Op::HeadAttentionGrad(h) => heads::grad(h, x(0)?, x(1)?, x(2)?, y, sh(0)[0], caps)?,
        Op::GroupStats { groups, eps } => {
            let s = sh(0);
            norm::group_stats(x(0)?, [s[0], s[1], s[2] * s[3]], *groups, *eps, y, caps)?
        }
        Op::GroupApply { groups, silu } => {
            let s = sh(0);
            norm::group_apply(
                x(0)?,
                x(1)?,
                x(2)?,
                x(3)?,
                [s[0], s[1], s[2] * s[3]],
                *groups,
                *silu,
                y,
                caps,
            )?
        }
        Op::Im2col {
            geom,
            sample,
            samples,
            first,
        } => {
            let s = sh(0);
            let chw = (s[1] * s[2] * s[3]) as u64;
            let xs = x(0)?.sub(*sample as u64 * chw, *samples as u64 * chw);
            let count = node.shape[0] / samples;
            layout::im2col(
                xs,
                [s[1], s[2], s[3]],
                *geom,
                *first,
                count,
                *samples,
                y,
                caps,
            )?
        }
        Op::Col2im { geom, first } => {
            let s = &node.shape;
            layout::col2im(
                x(0)?,
                [s[1], s[2], s[3]],
                *geom,
                *first,
                sh(0)[0] / s[0],
                s[0],
                y,
                caps,
            )?
        }
        Op::Gather => {
            let t = sh(0);
            layout::gather(x(0)?, t[0], t[1], x(1)?, y, caps)?
        }
        Op::GatherGrad if node.inputs.len() == 4 => {
            layout::gather_grad_csr(x(2)?, x(3)?, x(1)?, node.shape[0], node.shape[1], y, caps)?
        }
        Op::GatherGrad => layout::gather_grad(x(0)?, x(1)?, node.shape[0], node.shape[1], y, caps)?,
        Op::Row(r) => {
            let (rows, len) = rows_cols(&sh(0));
            reduce::rows(*r, x(0)?, rows, len, y, caps)?
        }
        Op::RowGrad(r) => {
            let (rows, len) = rows_cols(&node.shape);
            reduce::row_grad(*r, x(0)?, x(1)?, rows, len, y, caps)?
        }
        Op::NormApply { stats, groups } => {
            let (rows, cols) = rows_cols(&node.shape);
            norm::apply(
                *stats,
                x(0)?,
                x(1)?,
                x(2)?,
                x(3)?,
                *groups,
                rows / groups,
                cols,
                y,
                caps,
            )?
        }
        Op::BnStats { groups, eps } => {
            let (rows, cols) = rows_cols(&sh(0));
            norm::bn_stats(x(0)?, *groups, rows / groups, cols, *eps, y, caps)?
        }
        Op::ColGrad { stats, groups } => {
            let (rows, cols) = rows_cols(&sh(0));
            norm::col_grad(
                *stats,
                x(0)?,
                x(1)?,
                x(2)?,
                *groups,
                rows / groups,
                cols,
                y,
                caps,
            )?
        }
        Op::LnGrad => {
            let (rows, cols) = rows_cols(&node.shape);
            norm::ln_grad(x(0)?, x(1)?, x(2)?, x(3)?, rows, cols, y, None, caps)?
        }
        Op::BnGrad { groups } => {
            let (rows, cols) = rows_cols(&node.shape);
            norm::bn_grad(
                x(0)?,
                x(1)?,
                x(2)?,
                x(3)?,
                x(4)?,
                *groups,
                rows / groups,
                cols,
                y,
                caps,
            )?
        }
        Op::CrossEntropy => {
            let s = sh(0);
            reduce::cross_entropy(x(0)?, x(1)?, s[0], s[1], y, caps)?
        }
        Op::CrossEntropyGrad => {
            let s = sh(0);
            reduce::cross_entropy_grad(x(0)?, x(1)?, x(2)?, s[0], s[1], y, caps)?
        }
        Op::Augment(stage) => {
            use crate::kernels::augment::{self, Stage};
            let s0 = sh(0);
            let (batch, size) = (s0[0], s0[2]);
            let size = if *stage == Stage::Pre {
                node.shape[2]
            } else {
                size
            };
            let means = if *stage == Stage::Post {
                Some(x(2)?)
            } else {
                None
            };
            augment::stage(
                *stage,
                x(0)?,
                x(1)?,
                means,
                batch,
                size,
                (s0[2], s0[3]),
                y,
                caps,
            )?
        }
        Op::MultiPos {
            captions,
            tau,
            mask_self,
            row0,
        }
        | Op::MultiPosGrad {
            captions,
            tau,
            mask_self,
            row0,
        } => {
            let s0 = sh(0);
            let c = contrastive::Contrast {
                rows: s0[0],
                cols: s0[1],
                captions: *captions,
                tau: *tau,
                mask_self: *mask_self,
                row0: *row0,
            };
            if matches!(node.op, Op::MultiPosGrad { .. }) {
                contrastive::multipos_grad(x(0)?, x(1)?, &c, y, caps)?
            } else {
                contrastive::multipos(x(0)?, &c, y, caps)?
            }
        }
        Op::BnRunning {
            rows,
            momentum,
            eps,
        } => {
            let st = sh(2);
            norm::bn_running(
                x(0)?,
                x(1)?,
                x(2)?,
                st[0],
                *rows,
                st[2],
                *momentum,
                *eps,
                caps,
            )?
        }
        Op::AdamW(cfg) => optim::adamw(*cfg, x(0)?, x(1)?, x(2)?, x(3)?, x(4)?, caps)?,
        Op::Sgd {
            momentum,
            weight_decay,
        } => optim::sgd(*momentum, *weight_decay, x(0)?, x(1)?, x(2)?, x(3)?, caps)?,
        Op::Accumulate => optim::accumulate(x(0)?, x(1)?, x(2)?, caps)?,
        Op::Input | Op::Param | Op::State(_) | Op::Const(_) => vec![],
    })
}

/// The dispatches of matmul node `id` writing `y`, optionally adding `bias` along rows and
/// then `residual` (C's layout).
pub(super) fn lower_matmul(
    g: &Graph,
    id: NodeId,
    view: &dyn Fn(NodeId) -> Result<View>,
    y: Result<View>,
    bias: Option<View>,
    residual: Option<View>,
    caps: &crate::gpu::Caps,
) -> Result<Vec<Dispatch>> {
    let node = g.node(id);
    let Op::Matmul { ta, tb } = node.op else {
        return Err(Error::Graph(format!("node {} is not a matmul", id.0)));
    };
    let (sa, sb) = (g.shape(node.inputs[0]), g.shape(node.inputs[1]));
    let out = &node.shape;
    let batch = numel(&out[..out.len() - 2]);
    let (m, nn) = (out[out.len() - 2], out[out.len() - 1]);
    let k = if ta {
        sa[sa.len() - 2]
    } else {
        sa[sa.len() - 1]
    };
    let s = MatmulShape {
        batch: batch as u32,
        m: m as u32,
        n: nn as u32,
        k: k as u32,
        ta,
        tb,
        a_shared: false,
        b_shared: sb.len() == 2 && batch > 1,
    };
    let (a, b, y) = (view(node.inputs[0])?, view(node.inputs[1])?, y?);
    match bias {
        Some(bv) => matmul::launch_epilogue(&s, a, b, y, bv, residual, caps),
        None => matmul::launch(&s, a, b, y, caps),
    }
}

/// Lowers the LayerNorm input gradient `ln` with a residual gradient `res` added in its
/// stores, writing `y` (the add it took over; planner step 1b).
pub(super) fn lower_ln_grad_res(
    g: &Graph,
    ln: NodeId,
    view: &dyn Fn(NodeId) -> Result<View>,
    y: View,
    res: NodeId,
    caps: &crate::gpu::Caps,
) -> Result<Vec<Dispatch>> {
    let node = g.node(ln);
    let x = |k: usize| view(node.inputs[k]);
    let cols = *node.shape.last().unwrap_or(&1);
    let rows = numel(&node.shape) / cols.max(1);
    norm::ln_grad(
        x(0)?,
        x(1)?,
        x(2)?,
        x(3)?,
        rows,
        cols,
        y,
        Some(view(res)?),
        caps,
    )
}

/// The one dispatch of a LayerNorm apply node `apply` that also computes and writes its row
/// statistics node `stats` (memory planning's step 2d).
pub(super) fn lower_ln_forward(
    g: &Graph,
    apply: NodeId,
    stats: NodeId,
    view: &dyn Fn(NodeId) -> Result<View>,
    caps: &crate::gpu::Caps,
) -> Result<Vec<Dispatch>> {
    let node = g.node(apply);
    let eps = match g.node(stats).op {
        Op::Row(crate::kernels::reduce::RowOp::LnStats(eps)) => eps,
        ref other => {
            return Err(Error::Graph(format!(
                "node {} ({other:?}) is not LayerNorm statistics",
                stats.0
            )))
        }
    };
    let x = |k: usize| view(node.inputs[k]);
    let cols = *node.shape.last().unwrap_or(&1);
    let rows = numel(&node.shape) / cols.max(1);
    norm::ln_forward(
        x(0)?,
        view(stats)?,
        x(2)?,
        x(3)?,
        rows,
        cols,
        eps,
        view(apply)?,
        caps,
    )
}

/// The dispatches of a transposed-A matmul node `id` that also writes the column sums of its
/// A into node `sum`'s buffer (memory planning's step 2c).
pub(super) fn lower_matmul_colsum(
    g: &Graph,
    id: NodeId,
    view: &dyn Fn(NodeId) -> Result<View>,
    sum: NodeId,
    caps: &crate::gpu::Caps,
) -> Result<Vec<Dispatch>> {
    let node = g.node(id);
    let sa = g.shape(node.inputs[0]);
    if node.op
        != (Op::Matmul {
            ta: true,
            tb: false,
        })
        || sa.len() != 2
        || node.shape.len() != 2
    {
        return Err(Error::Graph(format!(
            "node {} is not a 2-D matmul with a transposed A",
            id.0
        )));
    }
    let s = MatmulShape {
        batch: 1,
        m: node.shape[0] as u32,
        n: node.shape[1] as u32,
        k: sa[0] as u32,
        ta: true,
        tb: false,
        a_shared: false,
        b_shared: false,
    };
    matmul::launch_colsum(
        &s,
        view(node.inputs[0])?,
        view(node.inputs[1])?,
        view(id)?,
        view(sum)?,
        caps,
    )
}
