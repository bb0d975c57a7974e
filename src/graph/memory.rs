//! Memory planning, steps 1-4 of the compiler, with no device: which nodes run, the fused
//! matmul epilogues and elementwise groups, the aliases (reshapes, contiguous slices,
//! concats computed in place), the gradient slabs of multi-tensor updates, and the
//! greedy-by-size assignment of the remaining tensors to reusable slots.

use super::{DType, Graph, NodeId, Op, PlanOptions};
use crate::error::{Error, Result};

/// Steps 1-4 of planning, with no device: which nodes run, the fused matmul epilogues, the
/// aliases and the memory slots.
pub(super) struct Layout {
    pub(super) live: Vec<bool>,
    pub(super) fused_mm: Vec<Option<(usize, usize, Option<usize>)>>,
    /// Per add: the LayerNorm input gradient it took over and the residual it adds.
    pub(super) fused_ln: Vec<Option<(usize, usize)>>,
    pub(super) fused_away: Vec<bool>,
    pub(super) fused_ew: Vec<Option<super::fusion::Group>>,
    pub(super) root: Vec<usize>,
    pub(super) alias: Vec<bool>,
    pub(super) in_place: Vec<bool>,
    /// Per transposed-A matmul: the column sum of its A it also writes (step 2c).
    pub(super) colsum: Vec<Option<usize>>,
    /// Column sums written by a matmul (they keep their buffer, with no dispatch of their own).
    pub(super) by_matmul: Vec<bool>,
    /// Per LayerNorm apply: the row statistics it also computes and writes (step 2d).
    pub(super) ln_forward: Vec<Option<usize>>,
    /// Row statistics written by their LayerNorm apply (no dispatch of their own).
    pub(super) by_apply: Vec<bool>,
    pub(super) off: Vec<u64>,
    pub(super) slots: Vec<(usize, Vec<(usize, usize)>)>,
    pub(super) slot_of: Vec<usize>,
    pub(super) tensor_bytes: u64,
}

/// The largest LayerNorm (elements of x) whose statistics and apply run as one dispatch.
pub(super) const LN_FORWARD_MAX: usize = 1 << 19;

pub(super) fn layout(
    graph: &Graph,
    outputs: &[NodeId],
    opts: PlanOptions,
    max_binding: u64,
) -> Result<Layout> {
    let n = graph.nodes.len();
    // 1. Nodes to execute.
    let mut live = vec![false; n];
    let mut stack: Vec<usize> = outputs.iter().map(|o| o.0).collect();
    if opts.updates {
        stack.extend((0..n).filter(|&i| graph.nodes[i].op.is_update()));
    }
    while let Some(i) = stack.pop() {
        if i >= n {
            return Err(Error::Graph(format!("output node {i} is not in the graph")));
        }
        if !live[i] {
            live[i] = true;
            stack.extend(graph.nodes[i].inputs.iter().map(|x| x.0));
        }
    }
    // 1b. Fusion: a matmul read only by an `add` of a bias along its last axis becomes one
    // dispatch that adds the bias in its stores (`x W^T + b`); the matmul gets no buffer.
    let mut consumers = vec![0usize; n];
    for i in (0..n).filter(|&i| live[i]) {
        for x in &graph.nodes[i].inputs {
            consumers[x.0] += 1;
        }
    }
    for o in outputs {
        consumers[o.0] += 1;
    }
    let mut fused_mm: Vec<Option<(usize, usize, Option<usize>)>> = vec![None; n];
    let mut fused_away = vec![false; n];
    for j in (0..n).filter(|&j| live[j]) {
        let node = &graph.nodes[j];
        if node.op != Op::Binary(crate::kernels::elementwise::BinaryOp::Add) {
            continue;
        }
        for (mi, bi) in [(0, 1), (1, 0)] {
            let (m, b) = (node.inputs[mi].0, node.inputs[bi].0);
            let mm = &graph.nodes[m];
            let cols = *mm.shape.last().unwrap_or(&0);
            if matches!(mm.op, Op::Matmul { .. })
                && consumers[m] == 1
                && !fused_away[m]
                && mm.shape == node.shape
                && graph.nodes[b].shape == [cols]
                && m != b
            {
                fused_mm[j] = Some((m, b, None));
                fused_away[m] = true;
                break;
            }
        }
    }
    // A residual add of such a fused result (`x + (h W^T + b)`) joins the same dispatch
    // when the residual fits one binding.
    for k in (0..n).filter(|&k| live[k]) {
        let node = &graph.nodes[k];
        if node.op != Op::Binary(crate::kernels::elementwise::BinaryOp::Add) {
            continue;
        }
        for (ji, ri) in [(0, 1), (1, 0)] {
            let (j, r) = (node.inputs[ji].0, node.inputs[ri].0);
            let fits = (graph.nodes[r].numel() as u64 * 4) <= max_binding;
            if let Some((m, b, None)) = fused_mm[j] {
                if consumers[j] == 1
                    && !fused_away[j]
                    && graph.nodes[r].shape == node.shape
                    && graph.nodes[j].shape == node.shape
                    && r != j
                    && r != m
                    && fits
                {
                    fused_mm[k] = Some((m, b, Some(r)));
                    fused_mm[j] = None;
                    fused_away[j] = true;
                    break;
                }
            }
        }
    }
    // A residual add of a LayerNorm input gradient (`d x` of `x + f(layer_norm(x))`, the
    // two contributions autodiff combines) is added in the gradient kernel's stores.
    // Not when an update runs between the gradient and the add (the add would read the
    // gradient's operands after it), nor when an update reads the add, the residual or the
    // gradient's dy, through reshapes or slices (they may share one gradient slab, which a
    // dispatch cannot bind both read-only and writable).
    let mut fused_ln: Vec<Option<(usize, usize)>> = vec![None; n];
    let mut updates_before = vec![0usize; n + 1];
    let mut update_read = vec![false; n];
    for i in 0..n {
        let upd = live[i] && graph.nodes[i].op.is_update();
        updates_before[i + 1] = updates_before[i] + upd as usize;
        if upd {
            for x in &graph.nodes[i].inputs {
                let mut q = x.0;
                update_read[q] = true;
                while matches!(graph.nodes[q].op, Op::Reshape | Op::Slice { .. }) {
                    q = graph.nodes[q].inputs[0].0;
                    update_read[q] = true;
                }
            }
        }
    }
    for k in (0..n).filter(|&k| live[k] && opts.fuse && !update_read[k]) {
        let node = &graph.nodes[k];
        if node.op != Op::Binary(crate::kernels::elementwise::BinaryOp::Add)
            || fused_mm[k].is_some()
            || fused_away[k]
        {
            continue;
        }
        for (ji, ri) in [(0, 1), (1, 0)] {
            let (j, r) = (node.inputs[ji].0, node.inputs[ri].0);
            if graph.nodes[j].op == Op::LnGrad
                && consumers[j] == 1
                && updates_before[k] == updates_before[j + 1]
                && !update_read[r]
                && !update_read[graph.nodes[j].inputs[3].0]
                && !fused_away[j]
                && graph.nodes[j].shape == node.shape
                && graph.nodes[r].shape == node.shape
                && r != j
                && (graph.nodes[r].numel() as u64 * 4) <= max_binding
            {
                fused_ln[k] = Some((j, r));
                fused_away[j] = true;
                break;
            }
        }
    }
    // 1c. Chains of elementwise ops become one generated kernel (`graph::fusion`).
    let fused_ew = if opts.fuse {
        // Nodes the matmul epilogues took stay out.
        let mut taken = fused_away.clone();
        for (i, g) in fused_mm.iter().enumerate() {
            taken[i] |= g.is_some() || fused_ln[i].is_some();
        }
        let f = super::fusion::plan(graph, &live, &consumers, &taken, max_binding);
        for (i, a) in f.absorbed.iter().enumerate() {
            fused_away[i] |= *a;
        }
        f.groups
    } else {
        vec![None; n]
    };
    // 2. Alias roots: a reshape shares its input's buffer, and so does a slice that is one
    // contiguous block of its input (every dim before the axis is 1), at an element offset.
    let mut root: Vec<usize> = (0..n).collect();
    let mut off = vec![0u64; n];
    for i in 0..n {
        if !live[i] {
            continue;
        }
        let node = &graph.nodes[i];
        let j = node.inputs.first().map(|x| x.0);
        match (&node.op, j) {
            (Op::Reshape, Some(j)) => {
                root[i] = root[j];
                off[i] = off[j];
            }
            (Op::Slice { axis, start }, Some(j))
                if node.shape[..*axis].iter().all(|&d| d == 1) && !fused_away[j] =>
            {
                let inner: usize = graph.nodes[j].shape[axis + 1..].iter().product();
                root[i] = root[j];
                off[i] = off[j] + (start * inner) as u64;
            }
            _ => {}
        }
    }
    // Nodes that share another's buffer and do no work of their own.
    let alias: Vec<bool> = (0..n).map(|i| root[i] != i).collect();
    // 2b. A concatenation along an axis with only 1s before it is a row of contiguous blocks.
    // When nothing but the concat reads an input (with its reshapes), the input is computed
    // straight into its block of the concat's buffer and the concat costs no dispatch (the
    // gradients of attention's q, k and v become the gradient of the fused qkv this way).
    let mut in_place = vec![false; n];
    {
        let mut class: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
        for i in (0..n).filter(|&i| live[i]) {
            class[root[i]].push(i);
            for x in &graph.nodes[i].inputs {
                if root[i] != root[x.0] {
                    readers[root[x.0]].push(i);
                }
            }
        }
        for o in outputs {
            readers[root[o.0]].push(usize::MAX);
        }
        for c in 0..n {
            let node = &graph.nodes[c];
            let Op::Concat { axis } = node.op else {
                continue;
            };
            if !live[c]
                || fused_away[c]
                || root[c] != c
                || node.dtype != DType::F32
                || !node.shape[..axis].iter().all(|&d| d == 1)
            {
                continue;
            }
            let roots: Vec<usize> = node.inputs.iter().map(|x| root[x.0]).collect();
            let ok = node.inputs.iter().zip(&roots).all(|(x, &r)| {
                let rn = &graph.nodes[r];
                live[r]
                    && !fused_away[r]
                    && !rn.op.is_leaf()
                    && !rn.op.is_update()
                    && rn.dtype == DType::F32
                    && off[x.0] == 0
                    && rn.numel() == graph.nodes[x.0].numel()
                    && readers[r] == [c]
            }) && (1..roots.len()).all(|k| !roots[..k].contains(&roots[k]));
            if !ok {
                continue;
            }
            let mut at = 0u64;
            for (x, &r) in node.inputs.iter().zip(&roots) {
                for &i in &std::mem::take(&mut class[r]) {
                    root[i] = c;
                    off[i] += at;
                    class[c].push(i);
                }
                at += graph.nodes[x.0].numel() as u64;
            }
            in_place[c] = true;
        }
    }
    // 2c. A sum over all rows of a tensor that a transposed-A matmul also reads as its A
    // ([K, M] -> [M]: a linear layer's bias gradient beside its weight gradient dY^T X) is
    // written by the matmul from the A values it loads anyway (`matmul::launch_colsum`); the
    // sum (and its first stage, when split in two) costs no dispatch. Everything that reads
    // the sum must come after the matmul.
    let mut colsum: Vec<Option<usize>> = vec![None; n];
    let mut by_matmul = vec![false; n];
    if opts.colsum {
        let strip = |mut i: usize| {
            while graph.nodes[i].op == Op::Reshape {
                i = graph.nodes[i].inputs[0].0;
            }
            i
        };
        let sum = |axis: usize| Op::Reduce {
            op: crate::kernels::reduce::ReduceOp::Sum,
            axis,
        };
        // The first node reading each buffer (aliases excluded; fused members count at their
        // own place, which is no later than where their reads run), and the first update.
        let mut first_reader = vec![usize::MAX; n];
        let mut first_update = usize::MAX;
        for j in (0..n).filter(|&j| live[j]) {
            if graph.nodes[j].op.is_update() {
                first_update = first_update.min(j);
            }
            for x in &graph.nodes[j].inputs {
                if root[x.0] != root[j] {
                    first_reader[root[x.0]] = first_reader[root[x.0]].min(j);
                }
            }
        }
        // What the sum read must not change before the matmul reads it.
        let mut updates_upto = vec![0usize; n + 1];
        for i in 0..n {
            updates_upto[i + 1] =
                updates_upto[i] + (live[i] && graph.nodes[i].op.is_update()) as usize;
        }
        let mut read_by_update = vec![false; n];
        for j in (0..n).filter(|&j| live[j] && graph.nodes[j].op.is_update()) {
            for x in &graph.nodes[j].inputs {
                read_by_update[root[x.0]] = true;
            }
        }
        // Candidate sums: (source, rows, columns, the sum, its first stage).
        let mut sums: Vec<(usize, usize, usize, usize, Option<usize>)> = Vec::new();
        for r in (0..n).filter(|&r| live[r] && !fused_away[r] && root[r] == r) {
            let node = &graph.nodes[r];
            if node.op != sum(0) || node.dtype != DType::F32 || node.shape.len() != 1 {
                continue;
            }
            let m = node.shape[0];
            let p = node.inputs[0].0;
            let pn = &graph.nodes[p];
            if pn.shape.len() != 2 || pn.shape[1] != m {
                continue;
            }
            if pn.op == sum(1) {
                // The two-stage form of a long sum: [c, K / c, M] -> [c, M] -> [M].
                let q = pn.inputs[0].0;
                let qs = &graph.nodes[q].shape;
                if consumers[p] == 1
                    && !fused_away[p]
                    && graph.nodes[q].op == Op::Reshape
                    && qs.len() == 3
                    && qs[0] == pn.shape[0]
                    && qs[2] == m
                {
                    sums.push((strip(q), qs[0] * qs[1], m, r, Some(p)));
                }
            } else {
                sums.push((strip(p), pn.shape[0], m, r, None));
            }
        }
        for w in 0..n {
            let wn = &graph.nodes[w];
            if !live[w]
                || fused_away[w]
                || sums.is_empty()
                || wn.op
                    != (Op::Matmul {
                        ta: true,
                        tb: false,
                    })
                || wn.shape.len() != 2
                || wn.shape[1] == 0
            {
                continue;
            }
            let a = wn.inputs[0].0;
            let an = &graph.nodes[a];
            if an.shape.len() != 2 || an.dtype != DType::F32 {
                continue;
            }
            let d = strip(a);
            // A tensor an update reads may sit in a gradient slab beside the sum, and one
            // dispatch cannot bind a buffer both read-only and writable.
            if read_by_update[root[d]] {
                continue;
            }
            let found = sums.iter().position(|&(sd, k, m, r, _)| {
                sd == d
                    && k == an.shape[0]
                    && m == an.shape[1]
                    && r < w
                    && updates_upto[w] == updates_upto[r]
                    && first_reader[r] > w
                    && (!read_by_update[r] || first_update > w)
            });
            if let Some(pos) = found {
                let (_, _, _, r, p) = sums.remove(pos);
                colsum[w] = Some(r);
                by_matmul[r] = true;
                if let Some(p) = p {
                    fused_away[p] = true;
                }
            }
        }
    }
    // 2d. A LayerNorm's row statistics and its apply become one dispatch
    // (`norm::ln_forward`), which writes both where the apply runs; the statistics keep their
    // buffer (the backward reads them) but have no dispatch of their own. Only for rows of at
    // most `LN_FORWARD_MAX` elements in all, where the dispatch costs more than the apply's
    // lost parallelism (one invocation per row instead of one per element); not when anything
    // else reads the statistics, or an update runs, between the two.
    let mut ln_forward: Vec<Option<usize>> = vec![None; n];
    let mut by_apply = vec![false; n];
    if opts.fuse {
        let mut updates_upto = vec![0usize; n + 1];
        for i in 0..n {
            updates_upto[i + 1] =
                updates_upto[i] + (live[i] && graph.nodes[i].op.is_update()) as usize;
        }
        for k in (0..n).filter(|&k| live[k]) {
            let node = &graph.nodes[k];
            if node.op
                != (Op::NormApply {
                    stats: crate::kernels::norm::Stats::Row,
                    groups: 1,
                })
                || fused_away[k]
                || node.numel() > LN_FORWARD_MAX
                || node.dtype != DType::F32
                || graph.nodes[node.inputs[0].0].dtype != DType::F32
            {
                continue;
            }
            let (x, st) = (node.inputs[0].0, node.inputs[1].0);
            let sn = &graph.nodes[st];
            if !matches!(sn.op, Op::Row(crate::kernels::reduce::RowOp::LnStats(_)))
                || sn.inputs[0].0 != x
                || !live[st]
                || fused_away[st]
                || by_matmul[st]
                || root[st] != st
                || updates_upto[k] != updates_upto[st + 1]
            {
                continue;
            }
            let early_reader = (st + 1..k)
                .any(|j| live[j] && graph.nodes[j].inputs.iter().any(|i| root[i.0] == st));
            if !early_reader {
                ln_forward[k] = Some(st);
                by_apply[st] = true;
            }
        }
    }
    // 3. Lifetimes of planned roots.
    let planned = |i: usize| {
        live[i]
            && !fused_away[i]
            && !graph.nodes[i].op.is_leaf()
            && !graph.nodes[i].op.is_update()
            && root[i] == i
    };
    let mut last = vec![0usize; n];
    for i in 0..n {
        if !live[i] {
            continue;
        }
        last[root[i]] = last[root[i]].max(i);
        for x in &graph.nodes[i].inputs {
            let r = root[x.0];
            last[r] = last[r].max(i);
        }
        // A fused add reads the matmul's operands.
        if let Some((m, b, _)) = fused_mm[i] {
            for x in graph.nodes[m].inputs.iter().map(|x| x.0).chain([b]) {
                let r = root[x];
                last[r] = last[r].max(i);
            }
        }
        // A fused LayerNorm gradient reads the gradient node's operands.
        if let Some((j, _)) = fused_ln[i] {
            for x in &graph.nodes[j].inputs {
                let r = root[x.0];
                last[r] = last[r].max(i);
            }
        }
        // A matmul writes the column sum it took over.
        if let Some(r) = colsum[i] {
            last[root[r]] = last[root[r]].max(i);
        }
        // A fused chain reads its leaves.
        if let Some((_, leaves)) = &fused_ew[i] {
            for &x in leaves {
                let r = root[x];
                last[r] = last[r].max(i);
            }
        }
    }
    for o in outputs {
        last[root[o.0]] = usize::MAX;
    }
    // A buffer is in use from the first node that writes it (an in-place concat's first
    // input).
    let mut first: Vec<usize> = (0..n).collect();
    for i in (0..n).filter(|&i| live[i]) {
        first[root[i]] = first[root[i]].min(i);
    }
    // 3b. The gradients AdamW and accumulation read are packed into slabs, each one buffer
    // that fits one binding (4-element aligned offsets), so that one dispatch updates many
    // tensors (`graph::updates`).
    // (They are all live until the update anyway; a slab lives from its first gradient.)
    let mut slab_of: Vec<Option<(usize, u64)>> = vec![None; n];
    // (elements, first node, last use, members)
    let mut slabs: Vec<(usize, usize, usize, Vec<usize>)> = Vec::new();
    if opts.multi_update {
        let max = (max_binding.saturating_sub(256) / 4) as usize;
        let mut seen = vec![false; n];
        for j in (0..n).filter(|&j| live[j] && super::updates::reads_gradient(&graph.nodes[j].op)) {
            // The gradient's root (a gradient is often a reshape of a sum).
            let g = root[graph.nodes[j].inputs[1].0];
            if !planned(g) || seen[g] || graph.nodes[g].dtype != DType::F32 {
                continue;
            }
            seen[g] = true;
            let size = graph.nodes[g].numel().max(1).div_ceil(4) * 4;
            if size > max {
                continue;
            }
            if slabs.last().is_none_or(|s| s.0 + size > max) {
                slabs.push((0, usize::MAX, 0, Vec::new()));
            }
            let k = slabs.len() - 1;
            let s = &mut slabs[k];
            slab_of[g] = Some((k, s.0 as u64));
            s.0 += size;
            s.1 = s.1.min(first[g]);
            s.2 = s.2.max(last[g]);
            s.3.push(g);
        }
        for i in 0..n {
            if live[i] {
                if let Some((_, o)) = slab_of[root[i]] {
                    off[i] += o;
                }
            }
        }
    }
    // 4. Greedy-by-size slot assignment: (elements, first, last use, nodes) per item.
    let mut items: Vec<(usize, usize, usize, Vec<usize>)> = (0..n)
        .filter(|&i| planned(i) && slab_of[i].is_none())
        .map(|i| (words(&graph.nodes[i]), first[i], last[i], vec![i]))
        .collect();
    items.extend(slabs);
    items.sort_by_key(|it| std::cmp::Reverse((it.0, usize::MAX - it.1)));
    let mut slots: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
    let mut slot_of = vec![usize::MAX; n];
    let mut tensor_bytes = 0u64;
    for (size, first, end, members) in items {
        tensor_bytes += members
            .iter()
            .map(|&i| words(&graph.nodes[i]) as u64 * 4)
            .sum::<u64>();
        let iv = (first, end);
        let fit = if opts.reuse {
            slots
                .iter()
                .position(|(_, ivs)| ivs.iter().all(|&(a, b)| iv.1 < a || b < iv.0))
        } else {
            None
        };
        let s = match fit {
            Some(s) => {
                slots[s].1.push(iv);
                s
            }
            None => {
                slots.push((size, vec![iv]));
                slots.len() - 1
            }
        };
        for i in members {
            slot_of[i] = s;
        }
    }
    Ok(Layout {
        live,
        fused_mm,
        fused_ln,
        fused_away,
        fused_ew,
        root,
        alias,
        in_place,
        colsum,
        by_matmul,
        ln_forward,
        by_apply,
        off,
        slots,
        slot_of,
        tensor_bytes,
    })
}

/// 32-bit words of a planned tensor (at least one): f16 tensors take half, rounded up to
/// whole 8-byte units so that their vec4 loads stay inside.
fn words(node: &super::Node) -> usize {
    match node.dtype {
        DType::F16 => node.numel().div_ceil(4).max(1) * 2,
        _ => node.numel().max(1),
    }
}
