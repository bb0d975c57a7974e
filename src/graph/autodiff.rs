//! Reverse-mode autodiff: walks the graph backwards from a scalar loss and appends, for every
//! node on a path to the requested leaves, the nodes computing its inputs' gradients.

use std::collections::HashMap;

use super::{Graph, NodeId, Op, Stats};
use crate::error::{Error, Result};
use crate::kernels::elementwise::{BinaryOp, UnaryOp};
use crate::kernels::reduce::{ReduceOp, RowOp};

impl Graph {
    /// Gradients of `loss` (a single-element tensor) with respect to `wrt`, as new nodes of
    /// this graph. A `wrt` node the loss does not depend on gets a zero constant.
    pub fn grad(&mut self, loss: NodeId, wrt: &[NodeId]) -> Result<Vec<NodeId>> {
        if self.nodes[loss.0].numel() != 1 {
            return Err(Error::Graph(format!(
                "loss must have one element, has shape {:?}",
                self.shape(loss)
            )));
        }
        // Nodes on a path from any wrt node to the loss.
        let mut needs = vec![false; loss.0 + 1];
        for &w in wrt {
            if w.0 <= loss.0 {
                needs[w.0] = true;
            }
        }
        for i in 0..=loss.0 {
            if !needs[i]
                && self.nodes[i]
                    .inputs
                    .iter()
                    .any(|x| x.0 <= loss.0 && needs[x.0])
            {
                needs[i] = true;
            }
        }
        // Contributions are collected per node and combined when the node is reached (all
        // of its users come later in the order, so by then every contribution is in).
        let mut pending: HashMap<usize, Vec<NodeId>> = HashMap::new();
        let shape = self.shape(loss).to_vec();
        let seed = self.constant(1.0, &shape);
        pending.insert(loss.0, vec![seed]);
        let mut grads: HashMap<usize, NodeId> = HashMap::new();
        for i in (0..=loss.0).rev() {
            let Some(parts) = pending.remove(&i) else {
                continue;
            };
            let dy = self.combine(parts)?;
            grads.insert(i, dy);
            let node = self.nodes[i].clone();
            let contribs = self.backward_of(NodeId(i), &node.op, &node.inputs, dy)?;
            for (inp, g) in contribs {
                if needs[inp.0] {
                    pending.entry(inp.0).or_default().push(g);
                }
            }
        }
        wrt.iter()
            .map(|w| match grads.get(&w.0) {
                Some(&g) => Ok(g),
                None => {
                    let shape = self.shape(*w).to_vec();
                    Ok(self.constant(0.0, &shape))
                }
            })
            .collect()
    }

    /// Sums gradient contributions. Contributions that are all zero-padded slices along one
    /// axis with disjoint ranges (the gradients of slicing a tensor into pieces, as in a fused
    /// qkv split) become one concatenation instead of full-size zero tensors added together.
    fn combine(&mut self, mut parts: Vec<NodeId>) -> Result<NodeId> {
        if parts.len() == 1 {
            return Ok(parts[0]);
        }
        let pads: Option<Vec<(usize, usize, NodeId)>> = parts
            .iter()
            .map(|&p| match self.nodes[p.0].op {
                Op::Pad { axis, start } => Some((axis, start, self.nodes[p.0].inputs[0])),
                _ => None,
            })
            .collect();
        if let Some(mut pads) = pads {
            // Pieces placed at the same spot (e.g. the chunks of one sample's convolution
            // patches) are summed first.
            pads.sort_by_key(|p| (p.0, p.1));
            let mut merged: Vec<(usize, usize, NodeId)> = Vec::new();
            for p in pads {
                match merged.last_mut() {
                    Some(m) if m.0 == p.0 && m.1 == p.1 && self.shape(m.2) == self.shape(p.2) => {
                        m.2 = self.add(m.2, p.2)?;
                    }
                    _ => merged.push(p),
                }
            }
            let mut pads = merged;
            let axis = pads[0].0;
            let full = self.shape(parts[0]).to_vec();
            pads.sort_by_key(|p| p.1);
            let same_axis = pads.iter().all(|p| p.0 == axis)
                && parts.iter().all(|&p| self.shape(p) == &full[..]);
            let disjoint = pads
                .windows(2)
                .all(|w| w[0].1 + self.shape(w[0].2)[axis] <= w[1].1);
            if same_axis && disjoint {
                let mut pieces = Vec::new();
                let mut at = 0;
                for &(_, start, x) in &pads {
                    if start > at {
                        let mut s = full.clone();
                        s[axis] = start - at;
                        pieces.push(self.constant(0.0, &s));
                    }
                    pieces.push(x);
                    at = start + self.shape(x)[axis];
                }
                if at < full[axis] {
                    let mut s = full.clone();
                    s[axis] = full[axis] - at;
                    pieces.push(self.constant(0.0, &s));
                }
                return self.concat(&pieces, axis);
            }
        }
        // Pairwise sum, balanced.
        while parts.len() > 1 {
            let mut next = Vec::with_capacity(parts.len().div_ceil(2));
            for pair in parts.chunks(2) {
                next.push(if pair.len() == 2 {
                    self.add(pair[0], pair[1])?
                } else {
                    pair[0]
                });
            }
            parts = next;
        }
        Ok(parts[0])
    }

    /// Gradient contributions of one node to its inputs.
    fn backward_of(
        &mut self,
        y: NodeId,
        op: &Op,
        ins: &[NodeId],
        dy: NodeId,
    ) -> Result<Vec<(NodeId, NodeId)>> {
        let shape = |g: &Graph, n: NodeId| g.shape(n).to_vec();
        Ok(match op {
            Op::Input | Op::Param | Op::State(_) | Op::Const(_) => vec![],
            Op::Matmul { ta, tb } => {
                let (a, b) = (ins[0], ins[1]);
                let (sa, sb) = (shape(self, a), shape(self, b));
                let shared_b = sb.len() == 2 && sa.len() > 2;
                let (a2, dy2) = if shared_b {
                    // Fold the batch into rows: [B.., M, K] -> [B*M, K].
                    let k = sa[sa.len() - 1];
                    let n = *self.shape(dy).last().unwrap_or(&1);
                    let rows = self.nodes[a.0].numel() / k;
                    (self.reshape(a, &[rows, k])?, self.reshape(dy, &[rows, n])?)
                } else {
                    (a, dy)
                };
                let da = if *ta {
                    self.matmul_t(b, dy, *tb, true)?
                } else {
                    self.matmul_t(dy, b, false, !tb)?
                };
                let db = if *tb {
                    self.matmul_t(dy2, a2, true, *ta)?
                } else {
                    self.matmul_t(a2, dy2, !ta, false)?
                };
                vec![(a, da), (b, db)]
            }
            Op::Unary(u) => vec![(ins[0], self.binary(BinaryOp::UnaryGrad(*u), ins[0], dy)?)],
            Op::Binary(b) => {
                let (a, c) = (ins[0], ins[1]);
                let (sa, sc) = (shape(self, a), shape(self, c));
                match b {
                    BinaryOp::Add => {
                        let ga = self.sum_to(dy, &sa)?;
                        let gc = self.sum_to(dy, &sc)?;
                        vec![(a, ga), (c, gc)]
                    }
                    BinaryOp::Sub => {
                        let ga = self.sum_to(dy, &sa)?;
                        let n = self.unary(UnaryOp::Neg, dy)?;
                        let gc = self.sum_to(n, &sc)?;
                        vec![(a, ga), (c, gc)]
                    }
                    BinaryOp::Mul => {
                        let t = self.mul(dy, c)?;
                        let ga = self.sum_to(t, &sa)?;
                        let t = self.mul(dy, a)?;
                        let gc = self.sum_to(t, &sc)?;
                        vec![(a, ga), (c, gc)]
                    }
                    BinaryOp::Div => {
                        let t = self.div(dy, c)?;
                        let ga = self.sum_to(t, &sa)?;
                        let t = self.mul(dy, y)?;
                        let t = self.div(t, c)?;
                        let t = self.unary(UnaryOp::Neg, t)?;
                        let gc = self.sum_to(t, &sc)?;
                        vec![(a, ga), (c, gc)]
                    }
                    other => {
                        return Err(Error::Graph(format!(
                            "binary op '{}' is not differentiable",
                            other.key()
                        )))
                    }
                }
            }
            Op::Reduce { op: r, axis } => {
                let x = ins[0];
                let sx = shape(self, x);
                let mut keep = sx.clone();
                keep[*axis] = 1;
                let d = self.reshape(dy, &keep)?;
                let d = self.expand(d, &sx)?;
                match r {
                    ReduceOp::Sum => vec![(x, d)],
                    ReduceOp::Mean => vec![(x, self.affine(d, 1.0 / sx[*axis] as f32, 0.0)?)],
                    ReduceOp::Max => {
                        let yk = self.reshape(y, &keep)?;
                        let yk = self.expand(yk, &sx)?;
                        let mask = self.binary(BinaryOp::Eq, x, yk)?;
                        vec![(x, self.mul(mask, d)?)]
                    }
                }
            }
            Op::SumTo => {
                let sx = shape(self, ins[0]);
                vec![(ins[0], self.expand(dy, &sx)?)]
            }
            Op::Expand => {
                let sx = shape(self, ins[0]);
                vec![(ins[0], self.sum_to(dy, &sx)?)]
            }
            Op::Reshape => {
                let sx = shape(self, ins[0]);
                vec![(ins[0], self.reshape(dy, &sx)?)]
            }
            Op::Permute(p) => {
                let mut inv = vec![0; p.len()];
                for (i, &v) in p.iter().enumerate() {
                    inv[v] = i;
                }
                vec![(ins[0], self.permute(dy, &inv)?)]
            }
            Op::Slice { axis, start } => {
                let total = self.shape(ins[0])[*axis];
                vec![(ins[0], self.pad(dy, *axis, *start, total)?)]
            }
            Op::Pad { axis, start } => {
                let len = self.shape(ins[0])[*axis];
                vec![(ins[0], self.slice(dy, *axis, *start, len)?)]
            }
            Op::Concat { axis } => {
                let mut off = 0;
                let mut out = Vec::new();
                for &x in ins {
                    let len = self.shape(x)[*axis];
                    out.push((x, self.slice(dy, *axis, off, len)?));
                    off += len;
                }
                out
            }
            Op::Gather => {
                let (table, idx) = (ins[0], ins[1]);
                let ts = shape(self, table);
                let mut gi = vec![idx, dy];
                // An embedding (gather with a host-built index) keeps the index for backward.
                gi.extend(ins.get(2..4).unwrap_or(&[]));
                let g = self.push(Op::GatherGrad, gi, ts, super::DType::F32);
                vec![(table, g)]
            }
            Op::Row(r) => match r {
                RowOp::Softmax | RowOp::CausalSoftmax | RowOp::LogSoftmax => {
                    let s = shape(self, ins[0]);
                    vec![(
                        ins[0],
                        self.push(Op::RowGrad(*r), vec![y, dy], s, super::DType::F32),
                    )]
                }
                RowOp::L2Norm(_) => {
                    let s = shape(self, ins[0]);
                    vec![(
                        ins[0],
                        self.push(Op::RowGrad(*r), vec![ins[0], dy], s, super::DType::F32),
                    )]
                }
                // LayerNorm statistics are differentiated through NormApply's rule.
                RowOp::LnStats(_) => vec![],
            },
            Op::NormApply {
                stats: kind,
                groups,
            } => {
                let (x, st, gamma, beta) = (ins[0], ins[1], ins[2], ins[3]);
                let sx = shape(self, x);
                let cols = *sx.last().unwrap_or(&1);
                let rows = self.nodes[x.0].numel() / cols.max(1);
                // LayerNorm's column sums may partition rows freely: past 4,096 rows, chunks
                // keep each invocation's loop short; the chunks are summed below with the
                // groups. Up to there one pass saves a dispatch per norm (bench vit-train,
                // 2,048 rows: 8 fewer; on lavapipe the one-pass sums take 35 ms a step where
                // the two stages took 29; not timed on a GPU, where one pass has fewer
                // workgroups to spread over).
                let g = match kind {
                    Stats::Row if rows > 4096 => super::split_factor(rows).unwrap_or(1),
                    _ => *groups,
                };
                let sums = self.push(
                    Op::ColGrad {
                        stats: *kind,
                        groups: g,
                    },
                    vec![x, st, dy],
                    vec![g, 2, cols],
                    super::DType::F32,
                );
                let dx = match kind {
                    Stats::Row => self.push(
                        Op::LnGrad,
                        vec![x, st, gamma, dy],
                        sx.clone(),
                        super::DType::F32,
                    ),
                    Stats::Col => self.push(
                        Op::BnGrad { groups: g },
                        vec![x, st, gamma, sums, dy],
                        sx.clone(),
                        super::DType::F32,
                    ),
                };
                // One sum over the groups gives [2, cols]; its rows are contiguous slices,
                // which the plan aliases (no copies).
                let both = if g == 1 {
                    self.reshape(sums, &[2, cols])?
                } else {
                    self.reduce(ReduceOp::Sum, sums, 0)?
                };
                let dg = self.slice(both, 0, 0, 1)?;
                let dg = self.reshape(dg, &[cols])?;
                let db = self.slice(both, 0, 1, 1)?;
                let db = self.reshape(db, &[cols])?;
                vec![(x, dx), (gamma, dg), (beta, db)]
            }
            // Batch statistics are differentiated through NormApply's rule.
            Op::BnStats { .. } => vec![],
            Op::CrossEntropy => {
                let s = shape(self, ins[0]);
                vec![(
                    ins[0],
                    self.push(
                        Op::CrossEntropyGrad,
                        vec![ins[0], ins[1], dy],
                        s,
                        super::DType::F32,
                    ),
                )]
            }
            Op::MultiPos {
                captions,
                tau,
                mask_self,
                row0,
            } => {
                let sh = shape(self, ins[0]);
                let g = self.push(
                    Op::MultiPosGrad {
                        captions: *captions,
                        tau: *tau,
                        mask_self: *mask_self,
                        row0: *row0,
                    },
                    vec![ins[0], dy],
                    sh,
                    super::DType::F32,
                );
                vec![(ins[0], g)]
            }
            Op::Attention { scale } => {
                // The forward keeps no score matrix: recompute the probabilities, then the
                // unfused attention's rules (softmax(s) with s = q k^T * scale, y = p v).
                // The scale goes where it touches the fewest values: on the [Tq, Tk] scores
                // and their gradient, or, when Tk > D, on q and dq ([Tq, D]): with qs = q *
                // scale, s = qs k^T, dq = (ds k) * scale and dk = ds^T qs.
                let (q, k, v) = (ins[0], ins[1], ins[2]);
                let (tk, d) = (shape(self, k)[1], shape(self, k)[2]);
                let on_q = tk > d;
                let qs = if on_q {
                    self.affine(q, *scale, 0.0)?
                } else {
                    q
                };
                let s = self.matmul_t(qs, k, false, true)?;
                let s = if on_q {
                    s
                } else {
                    self.affine(s, *scale, 0.0)?
                };
                let p = self.softmax(s)?;
                let dv = self.matmul_t(p, dy, true, false)?;
                let dp = self.matmul_t(dy, v, false, true)?;
                let ps = shape(self, p);
                let ds = self.push(
                    Op::RowGrad(RowOp::Softmax),
                    vec![p, dp],
                    ps,
                    super::DType::F32,
                );
                let (dq, dk) = if on_q {
                    let dq = self.matmul(ds, k)?;
                    (
                        self.affine(dq, *scale, 0.0)?,
                        self.matmul_t(ds, qs, true, false)?,
                    )
                } else {
                    let ds = self.affine(ds, *scale, 0.0)?;
                    (self.matmul(ds, k)?, self.matmul_t(ds, q, true, false)?)
                };
                vec![(q, dq), (k, dk), (v, dv)]
            }
            Op::HeadAttention(h) => {
                // FlashAttention's backward: the row statistics (log-sum-exp, dy . y), then
                // one kernel for dq (query rows) and dk, dv (key rows).
                let qkv = ins[0];
                let sq = shape(self, qkv);
                let rows = sq[0] * h.heads;
                let st = self.push(
                    Op::HeadAttentionStats(*h),
                    vec![qkv, y, dy],
                    vec![rows, 2],
                    super::DType::F32,
                );
                let g = self.push(
                    Op::HeadAttentionGrad(*h),
                    vec![qkv, dy, st],
                    sq,
                    super::DType::F32,
                );
                vec![(qkv, g)]
            }
            // GroupNorm statistics are differentiated through GroupApply's rule.
            Op::GroupStats { .. } => vec![],
            Op::GroupApply { groups, silu } => {
                let (x, st, gamma, beta) = (ins[0], ins[1], ins[2], ins[3]);
                let sx = shape(self, x);
                let (n, c, hw) = (sx[0], sx[1], sx[2] * sx[3]);
                let g = *groups;
                // Before the SiLU: recompute the affine output and take SiLU's derivative.
                let dpre = if *silu {
                    let pre = self.push(
                        Op::GroupApply {
                            groups: g,
                            silu: false,
                        },
                        vec![x, st, gamma, beta],
                        sx.clone(),
                        super::DType::F32,
                    );
                    self.binary(BinaryOp::UnaryGrad(UnaryOp::Silu), pre, dy)?
                } else {
                    dy
                };
                // The normalized input, by the same kernel with unit scale and zero shift.
                let ones = self.constant(1.0, &[c]);
                let zeros = self.constant(0.0, &[c]);
                let xhat = self.push(
                    Op::GroupApply {
                        groups: g,
                        silu: false,
                    },
                    vec![x, st, ones, zeros],
                    sx.clone(),
                    super::DType::F32,
                );
                let per_channel = |me: &mut Graph, t: NodeId| -> Result<NodeId> {
                    let t = me.reshape(t, &[n, c, hw])?;
                    let t = me.reduce(ReduceOp::Sum, t, 2)?;
                    let t = me.reduce(ReduceOp::Sum, t, 0)?;
                    me.reshape(t, &[c])
                };
                let prod = self.mul(dpre, xhat)?;
                let dgamma = per_channel(self, prod)?;
                let dbeta = per_channel(self, dpre)?;
                // dx per group row: LayerNorm's rule on [N * groups, C / groups * H * W] with
                // the channel scale applied first (unit scale inside the rule).
                let gcol = self.reshape(gamma, &[1, c, 1, 1])?;
                let scaled = self.mul(dpre, gcol)?;
                let k = c / g * hw;
                let xr = self.reshape(x, &[n * g, k])?;
                let dr = self.reshape(scaled, &[n * g, k])?;
                let unit = self.constant(1.0, &[k]);
                let dxr = self.push(
                    Op::LnGrad,
                    vec![xr, st, unit, dr],
                    vec![n * g, k],
                    super::DType::F32,
                );
                let dx = self.reshape(dxr, &sx)?;
                vec![(x, dx), (gamma, dgamma), (beta, dbeta)]
            }
            Op::Im2col {
                geom,
                sample,
                samples,
                first,
            } => {
                let sx = shape(self, ins[0]);
                let d = self.col2im(dy, *geom, *first, *samples, [sx[1], sx[2], sx[3]])?;
                vec![(ins[0], self.pad(d, 0, *sample, sx[0])?)]
            }
            Op::Col2im { geom, first } => {
                let rows = shape(self, ins[0])[0];
                let ns = shape(self, y)[0];
                vec![(ins[0], self.im2col(dy, *geom, 0, ns, *first, rows / ns)?)]
            }
            Op::GatherGrad
            | Op::MultiPosGrad { .. }
            | Op::RowGrad(_)
            | Op::ColGrad { .. }
            | Op::LnGrad
            | Op::HeadAttentionStats(_)
            | Op::HeadAttentionGrad(_)
            | Op::BnGrad { .. }
            | Op::CrossEntropyGrad
            | Op::AdamW(_)
            | Op::BnRunning { .. }
            | Op::Augment(_)
            | Op::Sgd { .. }
            | Op::Accumulate => {
                return Err(Error::Graph(format!(
                    "{op:?} cannot be differentiated (no second-order gradients)"
                )))
            }
        })
    }
}
