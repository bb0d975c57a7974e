//! The graph compiler: picks the nodes an output or update needs, plans memory (liveness over
//! the topological order, buffers shared greedy-by-size), lowers every node to kernel
//! dispatches with prebuilt bind groups, and replays them with one encoder and one submit.

use std::collections::HashMap;
use std::sync::Arc;

use super::lower::{lower, lower_ln_forward, lower_ln_grad_res, lower_matmul, lower_matmul_colsum};
use super::memory::{layout, Layout};
use super::{DType, Graph, NodeId, Op, ParamStore};
use crate::error::{Error, Result};
use crate::exec::Prepared;
use crate::gpu::Gpu;
use crate::kernels::elementwise;
use crate::kernels::{fused, Dispatch, View};

/// Compile options.
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    /// Share buffers between tensors whose lifetimes do not overlap (off: one buffer each).
    pub reuse: bool,
    /// Fill every planned buffer with NaN once at compile time (tests: catches unwritten
    /// outputs).
    pub poison: bool,
    /// Include the graph's optimizer updates (off: an evaluation plan over the same graph).
    pub updates: bool,
    /// Fuse chains of elementwise ops into one generated kernel each (`graph::fusion`), a
    /// residual add into the LayerNorm gradient kernel before it, and a LayerNorm's
    /// statistics into its apply (up to 2^19 elements); off: one dispatch per op,
    /// for comparisons. The default is on unless the environment sets `STABLEREP_FUSE=0` (an
    /// escape hatch, and the A/B switch of the benchmarks).
    pub fuse: bool,
    /// Update the parameters of a run of AdamW steps in one dispatch per group of shared
    /// buffers (`kernels::optim::adamw_multi`), with their gradients packed into one slab
    /// buffer; off: one dispatch per parameter. Both give the same values. The default is on
    /// unless the environment sets `STABLEREP_MULTI_UPDATE=0`.
    pub multi_update: bool,
    /// Let a transposed-A matmul also write a sum over all rows of its A that the graph asks
    /// for (a bias gradient beside its weight gradient, `matmul::launch_colsum`), so the sum
    /// costs no dispatch. The default is on unless the environment sets `STABLEREP_COLSUM=0`.
    pub colsum: bool,
    /// Store the activations that only convolutions' matmuls, attention and layout copies
    /// read as f16 (`graph::precision`; f32 arithmetic, half the memory for those tensors).
    /// Inference only; needs the device's `shader-f16`. Off by default.
    pub f16_activations: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            reuse: true,
            poison: false,
            updates: true,
            fuse: std::env::var("STABLEREP_FUSE").map_or(true, |v| v != "0"),
            multi_update: std::env::var("STABLEREP_MULTI_UPDATE").map_or(true, |v| v != "0"),
            colsum: std::env::var("STABLEREP_COLSUM").map_or(true, |v| v != "0"),
            f16_activations: false,
        }
    }
}

/// What a compiled plan costs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PlanStats {
    /// Nodes executed per run.
    pub nodes: usize,
    /// Compute dispatches per run.
    pub dispatches: usize,
    /// Queue submits per run.
    pub submits_per_run: usize,
    /// Bytes of the planned (intermediate) buffers.
    pub peak_bytes: u64,
    /// Bytes the intermediates would need with one buffer each.
    pub tensor_bytes: u64,
    /// Planned buffers.
    pub buffers: usize,
    /// Bytes of inputs, constants and store tensors the plan binds.
    pub persistent_bytes: u64,
}

/// Where a node's data lives.
#[derive(Clone, Copy, Debug)]
enum Loc {
    /// Buffer table index.
    Buf(usize),
    /// No data (update ops).
    None,
}

/// A compiled graph: buffers, bind groups and dispatches, ready to replay.
pub struct Plan {
    gpu: Arc<Gpu>,
    prepared: Prepared,
    buffers: Vec<wgpu::Buffer>,
    pooled: usize,
    loc: Vec<Option<Loc>>,
    /// Element offset of each node inside its buffer (non-zero for aliased slices).
    off: Vec<u64>,
    shapes: Vec<Vec<usize>>,
    dtypes: Vec<DType>,
    inputs: HashMap<String, NodeId>,
    outputs: Vec<NodeId>,
    stats: PlanStats,
    /// Exclusive upper bounds of u32 inputs used as indices (embedding ids: the table's rows;
    /// labels: the classes) with what they index; [`Plan::write_u32`] checks them, since the
    /// kernels clamp out-of-range values (a wrong number, not an error).
    index_bounds: HashMap<usize, (u32, &'static str)>,
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// The u32 inputs that index something, with their bounds (see `Plan::index_bounds`).
fn index_bounds(graph: &Graph) -> HashMap<usize, (u32, &'static str)> {
    let mut b: HashMap<usize, (u32, &'static str)> = HashMap::new();
    for node in &graph.nodes {
        let (idx, bound, what) = match node.op {
            Op::Gather => (
                node.inputs[1].0,
                graph.nodes[node.inputs[0].0].shape[0],
                "an embedding id (token id) for a table of this many rows",
            ),
            Op::CrossEntropy => (
                node.inputs[1].0,
                graph.nodes[node.inputs[0].0].shape[1],
                "a class label for this many classes",
            ),
            _ => continue,
        };
        if graph.nodes[idx].op != Op::Input {
            continue;
        }
        let bound = u32::try_from(bound).unwrap_or(u32::MAX);
        let e = b.entry(idx).or_insert((bound, what));
        if bound < e.0 {
            *e = (bound, what);
        }
    }
    b
}

/// Bytes of a node's data (f16 weights take two per element, in whole words).
fn node_bytes(node: &super::Node) -> u64 {
    match node.dtype {
        DType::F16 => (node.numel().max(1).div_ceil(2) * 4) as u64,
        _ => (node.numel().max(1) * 4) as u64,
    }
}

/// What a plan of a graph would hold on the device, computed without one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Bytes of the planned intermediate buffers.
    pub planned_bytes: u64,
    /// Bytes of the parameters the plan reads.
    pub param_bytes: u64,
    /// Bytes of inputs and constants.
    pub input_bytes: u64,
    /// The largest single tensor, in bytes (must fit one binding).
    pub largest_tensor_bytes: u64,
}

impl MemoryEstimate {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.planned_bytes + self.param_bytes + self.input_bytes
    }
}

/// The memory a [`Plan`] of `graph` for `outputs` would use (slot reuse as `opts`), for a
/// device with `max_binding`-byte bindings, without a device: for checking that a model fits
/// before allocating anything.
pub fn estimate(
    graph: &Graph,
    outputs: &[NodeId],
    opts: PlanOptions,
    max_binding: u64,
) -> Result<MemoryEstimate> {
    let graph = &*super::precision::planned(graph, outputs, opts.f16_activations)?;
    let l = layout(graph, outputs, opts, max_binding)?;
    let mut e = MemoryEstimate {
        planned_bytes: l.slots.iter().map(|(s, _)| *s as u64 * 4).sum(),
        ..Default::default()
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        if !l.live[i] {
            continue;
        }
        let bytes = node_bytes(node);
        e.largest_tensor_bytes = e.largest_tensor_bytes.max(bytes);
        match node.op {
            Op::Input | Op::Const(_) => e.input_bytes += bytes,
            Op::Param | Op::State(_) => e.param_bytes += bytes,
            _ => {}
        }
    }
    Ok(e)
}

impl Plan {
    /// Compiles the part of `graph` that `outputs` and the update ops need. Parameters and
    /// state come from `store` (state is created there when missing).
    pub fn compile(
        gpu: &Arc<Gpu>,
        graph: &Graph,
        outputs: &[NodeId],
        store: &mut ParamStore,
        opts: PlanOptions,
    ) -> Result<Plan> {
        if opts.f16_activations && !gpu.caps.f16 {
            return Err(Error::Config(
                "f16 activations need the device feature shader-f16, which this device lacks"
                    .into(),
            ));
        }
        let graph = &*super::precision::planned(graph, outputs, opts.f16_activations)?;
        let n = graph.nodes.len();
        let Layout {
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
        } = layout(graph, outputs, opts, gpu.caps.max_binding)?;
        // 5. The buffer table: planned slots, then plan-owned inputs/constants, then store tensors.
        let mut buffers: Vec<wgpu::Buffer> = Vec::new();
        let mut peak = 0u64;
        for (size, _) in &slots {
            let bytes = *size as u64 * 4;
            peak += bytes;
            buffers.push(gpu.alloc(bytes, "plan slot")?);
        }
        let pooled = buffers.len();
        let mut loc: Vec<Option<Loc>> = vec![None; n];
        let mut inputs = HashMap::new();
        let mut once: Vec<Dispatch> = Vec::new();
        let mut persistent = 0u64;
        // Optimizer state made by this plan shares arenas (see `ParamStore::reserve`).
        let mut fresh: HashMap<&'static str, u64> = HashMap::new();
        for (i, node) in graph.nodes.iter().enumerate() {
            if let (true, Op::State(_), Some(name)) = (live[i], &node.op, &node.name) {
                if store.get(name).is_none() {
                    *fresh.entry(super::store::arena_class(name)).or_default() +=
                        (node.numel().max(1) as u64 * 4).div_ceil(16) * 16;
                }
            }
        }
        for (class, bytes) in fresh {
            store.reserve(gpu, super::store::class_name(class), bytes)?;
        }
        let mut arena_slot: HashMap<u64, usize> = HashMap::new();
        let mut store_off = vec![0u64; n];
        for i in 0..n {
            if !live[i] {
                continue;
            }
            let node = &graph.nodes[i];
            let bytes = (node.numel().max(1) * 4) as u64;
            match &node.op {
                Op::Input | Op::Const(_) => {
                    gpu.check_buffer_size("input", bytes)?;
                    buffers.push(gpu.device.create_buffer(&wgpu::BufferDescriptor {
                        label: node.name.as_deref(),
                        size: bytes.div_ceil(16) * 16,
                        usage: crate::gpu::pool::STORAGE_USAGE,
                        mapped_at_creation: false,
                    }));
                    persistent += bytes;
                    let b = buffers.len() - 1;
                    loc[i] = Some(Loc::Buf(b));
                    if let Op::Const(v) = node.op {
                        once.extend(elementwise::fill(
                            v,
                            View::new(b, node.numel() as u64),
                            &gpu.caps,
                        )?);
                    } else if let Some(name) = &node.name {
                        inputs.insert(name.clone(), NodeId(i));
                    }
                }
                Op::Param | Op::State(_) => {
                    let name = node.name.clone().ok_or_else(|| {
                        Error::Graph(format!("node {i} is a parameter without a name"))
                    })?;
                    if store.get(&name).is_none() {
                        match node.op {
                            Op::State(v) => store.set_fill(gpu, &name, &node.shape, v)?,
                            _ => {
                                return Err(Error::Graph(format!(
                                    "parameter '{name}' {:?} is missing from the store",
                                    node.shape
                                )))
                            }
                        }
                    }
                    let t = store.get(&name).expect("checked above");
                    if t.dtype != node.dtype {
                        return Err(Error::Graph(format!(
                            "parameter '{name}' is {:?} in the store but {:?} in the graph",
                            t.dtype, node.dtype
                        )));
                    }
                    if t.shape != node.shape {
                        return Err(Error::shape(
                            "parameter",
                            format!(
                                "'{name}' has shape {:?} in the store but {:?} in the graph",
                                t.shape, node.shape
                            ),
                        ));
                    }
                    persistent += node_bytes(node);
                    // Tensors of one store arena share one buffer-table entry.
                    let b = match t.arena().and_then(|a| arena_slot.get(&a)) {
                        Some(&b) => b,
                        None => {
                            buffers.push(t.buffer().clone());
                            if let Some(a) = t.arena() {
                                arena_slot.insert(a, buffers.len() - 1);
                            }
                            buffers.len() - 1
                        }
                    };
                    let elem = if node.dtype == DType::F16 { 2 } else { 4 };
                    store_off[i] = t.byte_offset() / elem;
                    loc[i] = Some(Loc::Buf(b));
                }
                op if op.is_update() => loc[i] = Some(Loc::None),
                _ if fused_away[i] => loc[i] = Some(Loc::None),
                _ => {
                    if root[i] == i {
                        loc[i] = Some(Loc::Buf(slot_of[i]));
                    }
                }
            }
        }
        let mut off = off;
        for (i, &r) in root.iter().enumerate() {
            if live[i] {
                off[i] += store_off[r];
                if r != i {
                    loc[i] = loc[r];
                }
            }
        }
        if opts.poison {
            for (s, (size, _)) in slots.iter().enumerate() {
                once.extend(elementwise::fill(
                    f32::NAN,
                    View::new(s, *size as u64),
                    &gpu.caps,
                )?);
            }
        }
        // 6. Lowering.
        let view = |id: NodeId| -> Result<View> {
            match loc[id.0] {
                Some(Loc::Buf(b)) => Ok(View {
                    buf: b,
                    offset: off[id.0],
                    len: graph.nodes[id.0].numel() as u64,
                    half: graph.nodes[id.0].dtype == DType::F16,
                }),
                _ => Err(Error::Graph(format!(
                    "node {} ({:?}) has no storage",
                    id.0, graph.nodes[id.0].op
                ))),
            }
        };
        let mut dispatches = Vec::new();
        let mut executed = 0;
        let runs = if opts.multi_update {
            super::updates::runs(graph, |i| {
                live[i]
                    && !graph.nodes[i].op.is_leaf()
                    && !alias[i]
                    && !fused_away[i]
                    && !in_place[i]
            })
        } else {
            HashMap::new()
        };
        for (i, node) in graph.nodes.iter().enumerate() {
            // Aliases (reshapes, contiguous slices) have no work of their own.
            // and a concat whose inputs were computed in place.
            // A column sum written by a later matmul (step 2c) has no dispatch of its own.
            if !live[i]
                || node.op.is_leaf()
                || alias[i]
                || fused_away[i]
                || in_place[i]
                || by_matmul[i]
                || by_apply[i]
            {
                continue;
            }
            executed += 1;
            match runs.get(&i) {
                Some(Some(run)) => {
                    dispatches.extend(super::updates::lower_run(
                        gpu,
                        graph,
                        run,
                        &view,
                        &mut buffers,
                    )?);
                    continue;
                }
                // A later member of a run lowered with its first.
                Some(None) => continue,
                None => {}
            }
            let lowered = match (fused_mm[i], &fused_ew[i]) {
                (_, Some((prog, leaves))) => leaves
                    .iter()
                    .map(|&l| Ok((view(NodeId(l))?, &graph.nodes[l].shape[..])))
                    .collect::<Result<Vec<_>>>()
                    .and_then(|ls| {
                        fused::fused(prog, &ls, view(NodeId(i))?, &node.shape, &gpu.caps)
                    }),
                (Some((m, b, r)), None) => lower_matmul(
                    graph,
                    NodeId(m),
                    &view,
                    view(NodeId(i)),
                    Some(view(NodeId(b))?),
                    r.map(|r| view(NodeId(r))).transpose()?,
                    &gpu.caps,
                ),
                (None, None) => match (colsum[i], fused_ln[i], ln_forward[i]) {
                    (Some(r), _, _) => {
                        lower_matmul_colsum(graph, NodeId(i), &view, NodeId(r), &gpu.caps)
                    }
                    (None, Some((j, r)), _) => view(NodeId(i)).and_then(|y| {
                        lower_ln_grad_res(graph, NodeId(j), &view, y, NodeId(r), &gpu.caps)
                    }),
                    (None, None, Some(s)) => {
                        lower_ln_forward(graph, NodeId(i), NodeId(s), &view, &gpu.caps)
                    }
                    (None, None, None) => lower(gpu, graph, NodeId(i), &view),
                },
            };
            dispatches.extend(lowered.map_err(|e| match e {
                Error::TooLarge { .. } | Error::Shape { .. } => {
                    Error::Graph(format!("node {i} ({:?}): {e}", node.op))
                }
                other => other,
            })?);
        }
        let refs: Vec<&wgpu::Buffer> = buffers.iter().collect();
        if !once.is_empty() {
            Prepared::new(gpu, &once, &refs)?.submit(gpu);
        }
        let prepared = Prepared::new(gpu, &dispatches, &refs)?;
        let stats = PlanStats {
            nodes: executed,
            dispatches: prepared.steps.len(),
            submits_per_run: 1,
            peak_bytes: peak,
            tensor_bytes,
            buffers: slots.len(),
            persistent_bytes: persistent,
        };
        log::debug!("compiled plan: {stats:?}");
        Ok(Plan {
            gpu: gpu.clone(),
            prepared,
            buffers,
            pooled,
            loc,
            off,
            shapes: graph.nodes.iter().map(|x| x.shape.clone()).collect(),
            dtypes: graph.nodes.iter().map(|x| x.dtype).collect(),
            inputs,
            outputs: outputs.to_vec(),
            stats,
            index_bounds: index_bounds(graph),
        })
    }

    /// Memory and dispatch figures.
    pub fn stats(&self) -> PlanStats {
        self.stats
    }

    /// The input node called `name`.
    pub fn input(&self, name: &str) -> Result<NodeId> {
        self.inputs
            .get(name)
            .copied()
            .ok_or_else(|| Error::Graph(format!("the plan has no input named '{name}'")))
    }

    /// True when the node has storage in this plan (inputs the outputs do not need do not).
    pub fn contains(&self, id: NodeId) -> bool {
        matches!(self.loc.get(id.0).copied().flatten(), Some(Loc::Buf(_)))
    }

    /// The buffer and byte offset holding a node's data: for filling an input or reading an
    /// output with GPU copies recorded around [`Plan::record`] (no host round trip).
    pub fn storage(&self, id: NodeId) -> Result<(&wgpu::Buffer, u64)> {
        self.buffer_of(id)
    }

    /// Records the plan's dispatches into a compute pass (for callers that chain plans and
    /// copies in one submit).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.prepared.record(pass);
    }

    /// The node's buffer and the byte offset of its data there.
    fn buffer_of(&self, id: NodeId) -> Result<(&wgpu::Buffer, u64)> {
        match self.loc.get(id.0).copied().flatten() {
            Some(Loc::Buf(b)) => {
                let elem = if self.dtypes[id.0] == DType::F16 {
                    2
                } else {
                    4
                };
                Ok((&self.buffers[b], self.off[id.0] * elem))
            }
            _ => Err(Error::Graph(format!(
                "node {} is not part of this plan",
                id.0
            ))),
        }
    }

    fn check_write(&self, id: NodeId, len: usize, dtype: DType) -> Result<()> {
        let want = numel(&self.shapes[id.0]);
        if len != want || self.dtypes[id.0] != dtype {
            return Err(Error::shape(
                "plan input",
                format!(
                    "node {} wants {want} {:?} values, got {len} {dtype:?}",
                    id.0, self.dtypes[id.0]
                ),
            ));
        }
        Ok(())
    }

    /// Writes f32 data into an input node (queued before the next run).
    pub fn write(&self, id: NodeId, data: &[f32]) -> Result<()> {
        self.check_write(id, data.len(), DType::F32)?;
        let (buf, at) = self.buffer_of(id)?;
        self.gpu.write(buf, at, data);
        Ok(())
    }

    /// Writes u32 data (indices, labels) into an input node. Ids and labels must be in range
    /// for the embedding table or classifier they feed.
    pub fn write_u32(&self, id: NodeId, data: &[u32]) -> Result<()> {
        self.check_write(id, data.len(), DType::U32)?;
        if let Some(&(bound, what)) = self.index_bounds.get(&id.0) {
            if let Some((i, &v)) = data.iter().enumerate().find(|(_, &v)| v >= bound) {
                return Err(Error::Config(format!(
                    "{what}: value {v} at position {i} is out of range (must be below {bound})"
                )));
            }
        }
        let (buf, at) = self.buffer_of(id)?;
        self.gpu.write(buf, at, data);
        Ok(())
    }

    /// Runs once: one encoder, one compute pass, one submit; does not wait.
    pub fn run(&self) -> Result<()> {
        self.prepared.submit(&self.gpu);
        self.gpu.take_error()
    }

    /// Runs once and reads back `fetch` (which must be outputs) in the same submit.
    pub fn run_fetch(&self, fetch: &[NodeId]) -> Result<Vec<Vec<f32>>> {
        for f in fetch {
            if !self.outputs.contains(f) {
                return Err(Error::Graph(format!(
                    "node {} was not declared an output of the plan",
                    f.0
                )));
            }
        }
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.prepared.record(&mut pass);
        }
        let mut staging = Vec::new();
        for &f in fetch {
            let bytes = (numel(&self.shapes[f.0]).max(1) * 4) as u64;
            let s = self.gpu.staging(bytes);
            let (buf, at) = self.buffer_of(f)?;
            enc.copy_buffer_to_buffer(buf, at, &s, 0, bytes);
            staging.push((s, bytes));
        }
        self.gpu.queue.submit([enc.finish()]);
        staging
            .iter()
            .map(|(s, b)| self.gpu.map_staging(s, *b))
            .collect()
    }

    /// Reads an output's current contents (after a run).
    pub fn read(&self, id: NodeId) -> Result<Vec<f32>> {
        if !self.outputs.contains(&id) {
            return Err(Error::Graph(format!(
                "node {} was not declared an output of the plan",
                id.0
            )));
        }
        let (buf, at) = self.buffer_of(id)?;
        self.gpu
            .read(buf, at, (numel(&self.shapes[id.0]).max(1) * 4) as u64)
    }

    /// Runs the plan once dispatch by dispatch and returns the wall time per kernel key,
    /// summed and sorted by time (most expensive first). Slower than [`Plan::run`]; for
    /// finding hot spots.
    pub fn profile(&self) -> Result<Vec<(String, f64, usize)>> {
        let mut by_key: HashMap<String, (f64, usize)> = HashMap::new();
        for (k, t) in self.prepared.profile(&self.gpu)? {
            let e = by_key.entry(k).or_default();
            e.0 += t;
            e.1 += 1;
        }
        let mut v: Vec<(String, f64, usize)> =
            by_key.into_iter().map(|(k, (t, n))| (k, t, n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    /// Pipeline keys in execution order (profiling, debugging).
    pub fn kernel_keys(&self) -> Vec<&str> {
        self.prepared.steps.iter().map(|s| s.key.as_str()).collect()
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        for b in self.buffers.drain(..self.pooled) {
            self.gpu.pool.give(b);
        }
    }
}
