//! Lowering of in-place update runs: consecutive AdamW steps, or consecutive gradient
//! accumulations, whose tensors share buffers (store arenas, the plan's gradient slab) become
//! one multi-tensor dispatch per group (`kernels::optim::adamw_multi`, `accumulate_multi`)
//! instead of one dispatch per tensor. Both give the same values.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Graph, NodeId, Op};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::{optim, Dispatch, View};

/// Whether `op` is an update whose input 1 is a gradient the plan may pack into a slab.
pub(super) fn reads_gradient(op: &Op) -> bool {
    matches!(op, Op::AdamW(_) | Op::Accumulate)
}

/// The kind of update a run is made of.
fn kind(op: &Op) -> Option<u8> {
    match op {
        Op::AdamW(_) => Some(0),
        Op::Accumulate => Some(1),
        _ => None,
    }
}

/// Runs of two or more updates of one kind that execute one after another (nothing else
/// runs between them): the first member maps to the run, the others to `None`.
pub(super) fn runs(
    graph: &Graph,
    executes: impl Fn(usize) -> bool,
) -> HashMap<usize, Option<Vec<usize>>> {
    let mut out = HashMap::new();
    let mut run: Vec<usize> = Vec::new();
    let mut flush = |run: &mut Vec<usize>| {
        if run.len() > 1 {
            for &j in &run[1..] {
                out.insert(j, None);
            }
            out.insert(run[0], Some(std::mem::take(run)));
        }
        run.clear();
    };
    let mut current = None;
    for i in (0..graph.nodes.len()).filter(|&i| executes(i)) {
        let k = kind(&graph.nodes[i].op);
        if k.is_none() || k != current {
            flush(&mut run);
        }
        current = k;
        if k.is_some() {
            run.push(i);
        }
    }
    flush(&mut run);
    out
}

/// One member of a run: its operand views (AdamW: param, grad, m, v; accumulation: acc,
/// grad), its `hyper` view and AdamW's settings.
struct Member {
    ops: Vec<View>,
    hyper: View,
    cfg: Option<optim::AdamW>,
}

/// Lowers a run (see [`runs`]): members whose operand sets each share a buffer and fit one
/// binding go to one multi-tensor dispatch per group, its table in a new plan buffer; the
/// rest get one dispatch each. The members touch disjoint tensors (checked; otherwise every
/// member is lowered alone, in order), so the order of their updates does not matter.
pub(super) fn lower_run(
    gpu: &Arc<Gpu>,
    graph: &Graph,
    run: &[usize],
    view: &dyn Fn(NodeId) -> Result<View>,
    buffers: &mut Vec<wgpu::Buffer>,
) -> Result<Vec<Dispatch>> {
    let caps = &gpu.caps;
    let mut members = Vec::new();
    for &j in run {
        let node = &graph.nodes[j];
        let x = |k: usize| view(node.inputs[k]);
        members.push(match node.op {
            Op::AdamW(cfg) => Member {
                ops: vec![x(0)?, x(1)?, x(2)?, x(3)?],
                hyper: x(4)?,
                cfg: Some(cfg),
            },
            Op::Accumulate => Member {
                ops: vec![x(0)?, x(1)?],
                hyper: x(2)?,
                cfg: None,
            },
            _ => return Err(Error::Graph(format!("node {j} is not an update"))),
        });
    }
    let single = |m: &Member| -> Result<Vec<Dispatch>> {
        let o = &m.ops;
        match m.cfg {
            Some(c) => optim::adamw(c, o[0], o[1], o[2], o[3], m.hyper, caps),
            None => optim::accumulate(o[0], o[1], m.hyper, caps),
        }
    };
    // No two operand ranges may overlap (a sweep per buffer in order of start, against the
    // furthest end so far).
    let mut ranges: Vec<(usize, u64, u64)> = members
        .iter()
        .flat_map(|m| m.ops.iter().map(|r| (r.buf, r.offset, r.offset + r.len)))
        .filter(|r| r.2 > r.1)
        .collect();
    ranges.sort();
    let mut disjoint = true;
    let mut reach: Option<(usize, u64)> = None;
    for &(buf, start, end) in &ranges {
        match reach {
            Some((b, e)) if b == buf => {
                disjoint &= start >= e;
                reach = Some((b, e.max(end)));
            }
            _ => reach = Some((buf, end)),
        }
    }
    let mut out = Vec::new();
    if !disjoint {
        for m in &members {
            out.extend(single(m)?);
        }
        return Ok(out);
    }
    // Groups by the operands' buffers and the hyper view, in order of first appearance.
    let max = crate::kernels::max_bind_elems(caps);
    type Key = (Vec<usize>, View);
    let mut groups: Vec<(Key, Vec<Member>)> = Vec::new();
    for m in members {
        if m.ops[0].len == 0 {
            continue;
        }
        let fits = m.ops.iter().all(|v| v.len <= max && !v.half);
        let key = (m.ops.iter().map(|v| v.buf).collect(), m.hyper);
        match groups.iter_mut().find(|g| g.0 == key && fits) {
            Some(g) => g.1.push(m),
            None => groups.push((key, vec![m])),
        }
    }
    let span_ok = |g: &[Member]| {
        (0..g[0].ops.len()).all(|k| {
            let lo = g.iter().map(|m| m.ops[k].offset).min().unwrap_or(0);
            let hi = g
                .iter()
                .map(|m| m.ops[k].offset + m.ops[k].len)
                .max()
                .unwrap_or(0);
            hi - lo <= max
        })
    };
    for (_, group) in groups {
        // Split where an operand set's span would outgrow one binding.
        let mut parts: Vec<Vec<Member>> = Vec::new();
        for m in group {
            let mut moved = None;
            match parts.last_mut() {
                Some(p) => {
                    p.push(m);
                    if !span_ok(p) {
                        moved = p.pop();
                    }
                }
                None => moved = Some(m),
            }
            if let Some(m) = moved {
                parts.push(vec![m]);
            }
        }
        for part in parts {
            if part.len() == 1 {
                out.extend(single(&part[0])?);
                continue;
            }
            let hyper = part[0].hyper;
            let table = buffers.len();
            let (d, words) = if part[0].cfg.is_some() {
                // A run is of one kind: every member has its settings.
                let ms: Vec<optim::Member> = part
                    .iter()
                    .filter_map(|m| m.cfg.map(|c| (c, m.ops[0], m.ops[1], m.ops[2], m.ops[3])))
                    .collect();
                optim::adamw_multi(&ms, hyper, table, caps)?
            } else {
                let ms: Vec<(View, View)> = part.iter().map(|m| (m.ops[0], m.ops[1])).collect();
                optim::accumulate_multi(&ms, hyper, table, caps)?
            };
            let bytes = (words.len() * 4) as u64;
            gpu.check_buffer_size("update table", bytes)?;
            let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("update table"),
                size: bytes.div_ceil(16) * 16,
                usage: crate::gpu::pool::STORAGE_USAGE,
                mapped_at_creation: false,
            });
            gpu.write(&buf, 0, &words);
            buffers.push(buf);
            out.push(d);
        }
    }
    Ok(out)
}
