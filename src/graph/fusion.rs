//! The elementwise fusion pass: chains of unary and binary nodes become one generated kernel
//! (`kernels::fused`). A node joins the node that reads it when it is that node's input and
//! nothing else reads it (no other node, no output, no alias, no update), both are f32
//! elementwise ops, and its shape is the reader's (so every member computes one value per
//! output element; leaves may broadcast). A group keeps at most [`MAX_LEAVES`] distinct
//! leaves: when a reader would exceed them, its members with the most leaves stay separate.
//! No in-place update may sit between a member and its reader (the member's reads move to
//! the reader's place in the order), and every tensor must fit one binding at any offset.
//! Members get no buffer and no dispatch; the group's last node runs the program.

use super::{DType, Graph, Op};
use crate::kernels::fused::{self, Arg, Instr, Program, MAX_LEAVES};

/// A fused group: its program and its leaf nodes, in the program's leaf order.
pub(super) type Group = (Program, Vec<usize>);

/// What the pass decided: `absorbed[i]` when node i runs inside a later node's kernel, and the
/// program of every group's last node.
pub(super) struct Fusion {
    /// Members computed inside their reader's kernel.
    pub absorbed: Vec<bool>,
    /// Per node: the group it ends, if any.
    pub groups: Vec<Option<Group>>,
}

/// Finds the groups. `live`, `consumers` (readers, outputs and updates counted), and
/// `taken` (nodes another fusion already claimed, e.g. matmul epilogues) come from the
/// compiler; every tensor a kernel binds must fit `max_binding` bytes.
pub(super) fn plan(
    graph: &Graph,
    live: &[bool],
    consumers: &[usize],
    taken: &[bool],
    max_binding: u64,
) -> Fusion {
    let n = graph.nodes.len();
    // Whole tensors bound at any offset (an aliased slice starts mid-buffer).
    let max_elems = max_binding.saturating_sub(256) / 4;
    let f32_fits = |i: usize| {
        let node = &graph.nodes[i];
        node.dtype == DType::F32 && (node.numel() as u64) <= max_elems
    };
    // A member's reads move to its group's last node; an in-place update (AdamW, SGD,
    // running statistics, gradient accumulation) between the two could change what they read.
    let mut updates_before = vec![0usize; n + 1];
    for i in 0..n {
        updates_before[i + 1] =
            updates_before[i] + (live[i] && graph.nodes[i].op.is_update()) as usize;
    }
    let update_between = |a: usize, b: usize| updates_before[b] > updates_before[a + 1];
    let elementwise = |i: usize| {
        let node = &graph.nodes[i];
        live[i]
            && !taken[i]
            && matches!(node.op, Op::Unary(_) | Op::Binary(_))
            && f32_fits(i)
            && node.inputs.iter().all(|x| f32_fits(x.0))
            && Program {
                leaves: node.inputs.len(),
                instrs: vec![instr(&node.op, Arg::Leaf(0), Arg::Leaf(1))],
            }
            .is_valid()
    };
    let mut absorbed = vec![false; n];
    let mut leafset: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut groups: Vec<Option<Group>> = vec![None; n];
    for k in 0..n {
        if !elementwise(k) {
            continue;
        }
        let node = &graph.nodes[k];
        let mut members: Vec<usize> = Vec::new();
        for x in &node.inputs {
            let j = x.0;
            if elementwise(j)
                && consumers[j] == 1
                && graph.nodes[j].shape == node.shape
                && !update_between(j, k)
                && !members.contains(&j)
            {
                members.push(j);
            }
        }
        let leaves = loop {
            let mut leaves: Vec<usize> = Vec::new();
            for x in &node.inputs {
                let from: &[usize] = if members.contains(&x.0) {
                    &leafset[x.0]
                } else {
                    std::slice::from_ref(&x.0)
                };
                for &l in from {
                    if !leaves.contains(&l) {
                        leaves.push(l);
                    }
                }
            }
            if leaves.len() <= MAX_LEAVES || members.is_empty() {
                break leaves;
            }
            let widest = (0..members.len())
                .max_by_key(|&m| leafset[members[m]].len())
                .expect("members is not empty");
            members.remove(widest);
        };
        let shapes: Vec<&[usize]> = leaves.iter().map(|&l| &graph.nodes[l].shape[..]).collect();
        let mut prog = Program {
            leaves: leaves.len(),
            instrs: Vec::new(),
        };
        for &m in &members {
            absorbed[m] = true;
        }
        emit(graph, k, &absorbed, &leaves, &mut prog.instrs);
        if !fused::supported(&prog, &shapes, &node.shape) {
            for &m in &members {
                absorbed[m] = false;
            }
            leafset[k] = node.inputs.iter().map(|x| x.0).collect();
            continue;
        }
        if !members.is_empty() {
            groups[k] = Some((prog, leaves.clone()));
        }
        leafset[k] = leaves;
    }
    // A member's own group ends inside its reader's.
    for (i, g) in groups.iter_mut().enumerate() {
        if absorbed[i] {
            *g = None;
        }
    }
    Fusion { absorbed, groups }
}

fn instr(op: &Op, a: Arg, b: Arg) -> Instr {
    match op {
        Op::Unary(u) => Instr::Unary(*u, a),
        Op::Binary(op) => Instr::Binary(*op, a, b),
        _ => unreachable!("only elementwise nodes are fused"),
    }
}

/// Appends node `i`'s instructions (its absorbed inputs first) and returns its result.
fn emit(graph: &Graph, i: usize, absorbed: &[bool], leaves: &[usize], out: &mut Vec<Instr>) -> Arg {
    let node = &graph.nodes[i];
    let arg = |x: usize, out: &mut Vec<Instr>| {
        if absorbed[x] {
            emit(graph, x, absorbed, leaves, out)
        } else {
            Arg::Leaf(
                leaves
                    .iter()
                    .position(|&l| l == x)
                    .expect("a leaf of the group"),
            )
        }
    };
    let a = arg(node.inputs[0].0, out);
    let b = match node.inputs.get(1) {
        Some(x) => arg(x.0, out),
        None => a,
    };
    out.push(instr(&node.op, a, b));
    Arg::Tmp(out.len() - 1)
}
