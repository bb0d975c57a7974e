//! The tensor IR: a graph of nodes with shapes, built through small methods that check and
//! infer shapes. Reverse-mode autodiff ([`Graph::grad`]) appends gradient nodes to the same
//! graph, so forward, backward and optimizer updates compile into one [`plan::Plan`].

pub mod autodiff;
mod fusion;
mod lower;
mod memory;
pub mod plan;
mod precision;
pub mod store;
mod updates;

use crate::error::{Error, Result};
use crate::kernels::elementwise::{broadcast_shape, BinaryOp, UnaryOp};
use crate::kernels::optim::AdamW;
use crate::kernels::reduce::{ReduceOp, RowOp};

pub use plan::{Plan, PlanOptions, PlanStats};
pub use store::{ParamStore, Tensor};

/// Element type of a tensor (both are 4 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DType {
    /// 32-bit float
    F32,
    /// 32-bit unsigned integer (indices, labels)
    U32,
    /// 16-bit float, two to a word: weights stored at half size and read by the matmul
    /// kernels, and activations a plan stores as f16 (`PlanOptions::f16_activations`); the
    /// kernels widen them to f32 (inference only).
    F16,
}

/// Handle to a node of a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

/// Which statistics a normalization node uses (mirrors the kernels).
pub use crate::kernels::norm::Stats;

/// The geometry of a [`Op::HeadAttention`] node and its gradient nodes (mirrors the kernels).
pub use crate::kernels::heads::Heads;

/// Graph operations. Inputs are listed per variant; the node's shape is its output shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Host-provided tensor, written before each run.
    Input,
    /// Trainable parameter living in a [`ParamStore`] under the node's name.
    Param,
    /// Persistent non-trainable state in the store (optimizer moments, running stats),
    /// created with this value when missing.
    State(f32),
    /// A tensor filled with a constant.
    Const(f32),
    /// (a, b): batched matmul with either operand transposed.
    Matmul {
        /// a is stored [.., K, M]
        ta: bool,
        /// b is stored [.., N, K]
        tb: bool,
    },
    /// (x): elementwise unary or scalar op.
    Unary(UnaryOp),
    /// (a, b): elementwise binary op with broadcasting.
    Binary(BinaryOp),
    /// (x): reduction that removes `axis`.
    Reduce {
        /// sum, mean or max
        op: ReduceOp,
        /// the reduced axis
        axis: usize,
    },
    /// (x): sum down to this node's (broadcast-compatible, same-rank) shape.
    SumTo,
    /// (x): broadcast up to this node's shape (same rank).
    Expand,
    /// (x): same data, new shape (no kernel; shares the input's buffer).
    Reshape,
    /// (x): permutation of axes.
    Permute(Vec<usize>),
    /// (x): the range `start..start + len` along `axis` (len from the node's shape).
    Slice {
        /// axis
        axis: usize,
        /// first index
        start: usize,
    },
    /// (x): x placed at `start` along `axis` inside zeros of this node's shape.
    Pad {
        /// axis
        axis: usize,
        /// offset along the axis
        start: usize,
    },
    /// (xs...): concatenation along `axis`.
    Concat {
        /// axis
        axis: usize,
    },
    /// (table [V, D], idx u32 [N]) -> [N, D].
    Gather,
    /// (x [N, C, H, W]) -> [samples * count, C * KH * KW]: the convolution patches of output
    /// pixels first..first + count of samples sample..sample + samples (sample-major).
    Im2col {
        /// Kernel geometry.
        geom: crate::kernels::layout::Conv2d,
        /// First sample of the batch.
        sample: usize,
        /// Consecutive samples.
        samples: usize,
        /// First output pixel (row-major over Ho x Wo).
        first: usize,
    },
    /// (patch gradient [samples * count, C * KH * KW]) -> [samples, C, H, W]: the adjoint of
    /// `Im2col` (its input gradient for those samples).
    Col2im {
        /// Kernel geometry.
        geom: crate::kernels::layout::Conv2d,
        /// First output pixel of the patches.
        first: usize,
    },
    /// (q [BH, Tq, D], k [BH, Tk, D], v [BH, Tk, D]) -> softmax(q k^T * scale) v, fused with an
    /// online softmax; its gradient recomputes the probabilities (a [Tq, Tk] matrix then).
    Attention {
        /// Score scale (usually D^-1/2).
        scale: f32,
    },
    /// (qkv [B * T, 3 * H * Dh]) -> [B * T, H * Dh]: multi-head self-attention straight from
    /// the fused projection's rows (columns `[3][H][Dh]`, as timm's and CLIP's `qkv`), its
    /// output in the rows the output projection reads: no head split or merge copies, no
    /// score matrix (online softmax).
    HeadAttention(Heads),
    /// (qkv, y, dy) -> [B * H * T, 2]: per query row its log-sum-exp of the scaled scores and
    /// `dy . y` (the gradient's row statistics).
    HeadAttentionStats(Heads),
    /// (qkv, dy, stats) -> [B * T, 3 * H * Dh]: the gradient of `HeadAttention` with
    /// respect to qkv, in qkv's layout (each query row writes its dq, each key row its dk, dv).
    HeadAttentionGrad(Heads),
    /// (x [N, C, H, W]) -> [N * groups, 2]: GroupNorm statistics (mean, 1 / std); their
    /// gradient flows through `GroupApply`'s rule.
    GroupStats {
        /// Channel groups.
        groups: usize,
        /// Variance epsilon.
        eps: f32,
    },
    /// (x [N, C, H, W], stats, gamma [C], beta [C]) -> GroupNorm output, then SiLU when
    /// `silu`.
    GroupApply {
        /// Channel groups.
        groups: usize,
        /// Fused SiLU.
        silu: bool,
    },
    /// (idx u32 [N], dy [N, D]) -> [vocab, D].
    GatherGrad,
    /// (x): a row-wise op over the last axis.
    Row(RowOp),
    /// (a, dy): backward of a row op (a = y for softmax/log-softmax, x for L2-normalize).
    RowGrad(RowOp),
    /// (x, stats, gamma, beta): normalization apply over the last axis; x viewed as
    /// [groups, rows, cols].
    NormApply {
        /// row (LayerNorm) or column (BatchNorm) statistics
        stats: Stats,
        /// BatchNorm groups (1 for LayerNorm)
        groups: usize,
    },
    /// (x) -> [groups, 2, cols]: BatchNorm batch statistics.
    BnStats {
        /// groups of rows normalized separately
        groups: usize,
        /// variance epsilon
        eps: f32,
    },
    /// (x, stats, dy) -> [groups, 2, cols]: column sums of dy*xhat and dy.
    ColGrad {
        /// statistics layout
        stats: Stats,
        /// groups
        groups: usize,
    },
    /// (x, stats, gamma, dy): LayerNorm input gradient.
    LnGrad,
    /// (x, stats, gamma, sums, dy): BatchNorm input gradient.
    BnGrad {
        /// groups
        groups: usize,
    },
    /// (logits [R, C], labels u32 [R]) -> per-row loss [R].
    CrossEntropy,
    /// (logits, labels, g [R]) -> dlogits.
    CrossEntropyGrad,
    /// (s [R, C]) -> per-row multi-positive contrastive loss [R]: softmax of s / tau over the
    /// columns (without column k in row k when `mask_self`), cross-entropy against the uniform
    /// distribution over the positive columns j, those with j mod captions == k mod captions.
    /// StableRep: s [N, N], rows view-major, `mask_self`. StableRep+'s image-to-text
    /// ([N, n]) and text-to-image ([n, N]) terms keep self.
    MultiPos {
        /// captions in the batch (n)
        captions: usize,
        /// temperature
        tau: f32,
        /// leave column k out of row k's softmax
        mask_self: bool,
        /// global index of the first row (the matrix may be a block of rows)
        row0: usize,
    },
    /// (s, g [R]) -> dL/ds [R, C].
    MultiPosGrad {
        /// captions in the batch
        captions: usize,
        /// temperature
        tau: f32,
        /// as in MultiPos
        mask_self: bool,
        /// as in MultiPos
        row0: usize,
    },
    /// (param, grad, m, v, hyper[3]): in-place AdamW step (no output).
    AdamW(AdamW),
    /// (running_mean, running_var, stats [groups, 2, cols]): in-place BatchNorm running
    /// statistics update (no output); `rows` per group.
    BnRunning {
        /// rows per group (for the unbiased variance)
        rows: usize,
        /// PyTorch momentum (0.1 by default)
        momentum: f32,
        /// the epsilon the statistics were computed with
        eps: f32,
    },
    /// One stage of the GPU augmentation pipeline (no gradient): Pre (src [B,3,Hs,Ws],
    /// params [B,16]), Mean (image, params) -> [B], Post (image, params, means), BlurH and
    /// BlurV (image, params); images are [B, 3, S, S].
    Augment(crate::kernels::augment::Stage),
    /// (acc, grad, hyper[1]): in-place `acc = hyper[0] * acc + grad` (no output), for
    /// gradients summed over chunks on the device.
    Accumulate,
    /// (param, grad, momentum, hyper[1]): in-place SGD step (no output).
    Sgd {
        /// momentum
        momentum: f32,
        /// coupled weight decay
        weight_decay: f32,
    },
}

impl Op {
    /// True for ops that update persistent tensors instead of producing an output.
    pub fn is_update(&self) -> bool {
        matches!(
            self,
            Op::AdamW(_) | Op::Sgd { .. } | Op::BnRunning { .. } | Op::Accumulate
        )
    }
    /// True for leaves whose storage lives outside the plan's planner.
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input | Op::Param | Op::State(_) | Op::Const(_))
    }
}

/// One node: op, inputs, output shape and type, optional name.
#[derive(Clone, Debug)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// Input nodes.
    pub inputs: Vec<NodeId>,
    /// Output shape.
    pub shape: Vec<usize>,
    /// Output element type.
    pub dtype: DType,
    /// Name (required for parameters and state, which are looked up by it).
    pub name: Option<String>,
}

impl Node {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A computation graph. Nodes are appended in topological order.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// All nodes, inputs before their users.
    pub nodes: Vec<Node>,
    /// The largest patch matrix a convolution materializes at once, in bytes (0: the default,
    /// [`CONV_PATCH_BYTES`]); larger convolutions run in chunks of output pixels.
    pub conv_patch_bytes: usize,
    /// The largest activation a builder that can split its tensors (the VAE decoder, see
    /// `diffusion::split`) may create, in bytes (0: WebGPU's default binding limit, 128 MiB).
    pub max_tensor_bytes: usize,
    /// Builders that support it (`diffusion::blocks::weight`) store matmul weights as f16
    /// ([`Graph::param_f16`]): half the memory, f32 arithmetic. Inference only.
    pub half_weights: bool,
}

/// Default bound on one convolution's im2col patch matrix (32 MiB).
pub const CONV_PATCH_BYTES: usize = 32 << 20;

/// The longest contraction one matmul dispatch runs; a longer K is split into a sum of
/// matmuls (the kernel loops over K serially, and llvmpipe ends loops after 65,535
/// iterations per invocation).
pub const MATMUL_K_CHUNK: usize = 32768;

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// The node behind a handle.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    /// Shape of a node.
    pub fn shape(&self, id: NodeId) -> &[usize] {
        &self.nodes[id.0].shape
    }

    /// Appends a node without checks (builders below check first).
    pub fn push(&mut self, op: Op, inputs: Vec<NodeId>, shape: Vec<usize>, dtype: DType) -> NodeId {
        self.nodes.push(Node {
            op,
            inputs,
            shape,
            dtype,
            name: None,
        });
        NodeId(self.nodes.len() - 1)
    }

    fn expect_f32(&self, op: &str, ids: &[NodeId]) -> Result<()> {
        for &i in ids {
            if self.nodes[i.0].dtype != DType::F32 {
                return Err(Error::shape(op, format!("input {} must be f32", i.0)));
            }
        }
        Ok(())
    }

    /// A host-written f32 input.
    pub fn input(&mut self, name: &str, shape: &[usize]) -> NodeId {
        self.input_typed(name, shape, DType::F32)
    }

    /// A host-written input of the given type.
    pub fn input_typed(&mut self, name: &str, shape: &[usize], dtype: DType) -> NodeId {
        let id = self.push(Op::Input, vec![], shape.to_vec(), dtype);
        self.nodes[id.0].name = Some(name.to_string());
        id
    }

    /// A trainable parameter named `name` (looked up in the [`ParamStore`]).
    pub fn param(&mut self, name: &str, shape: &[usize]) -> NodeId {
        let id = self.push(Op::Param, vec![], shape.to_vec(), DType::F32);
        self.nodes[id.0].name = Some(name.to_string());
        id
    }

    /// A weight named `name` stored as f16 (half the memory), for use as a matmul operand
    /// contiguous along K (`x W^T`'s W, or a convolution's weight); the store must hold it as
    /// f16 ([`crate::graph::ParamStore::set_f16`]). Inference only.
    pub fn param_f16(&mut self, name: &str, shape: &[usize]) -> NodeId {
        let id = self.push(Op::Param, vec![], shape.to_vec(), DType::F16);
        self.nodes[id.0].name = Some(name.to_string());
        id
    }

    /// Persistent state named `name`, created filled with `init` when missing.
    pub fn state(&mut self, name: &str, shape: &[usize], init: f32) -> NodeId {
        let id = self.push(Op::State(init), vec![], shape.to_vec(), DType::F32);
        self.nodes[id.0].name = Some(name.to_string());
        id
    }

    /// A constant tensor.
    pub fn constant(&mut self, value: f32, shape: &[usize]) -> NodeId {
        self.push(Op::Const(value), vec![], shape.to_vec(), DType::F32)
    }

    /// Batched matmul `op(a) @ op(b)`: a is [.., M, K] ([.., K, M] if `ta`), b is [.., K, N]
    /// ([.., N, K] if `tb`) with the same leading dims, or 2-D (shared) when `ta` is false.
    pub fn matmul_t(&mut self, a: NodeId, b: NodeId, ta: bool, tb: bool) -> Result<NodeId> {
        // An f16 weight may be A ([M, K]) or B ([N, K]): contiguous along K.
        let half = |g: &Self, x: NodeId| g.nodes[x.0].dtype == DType::F16;
        if (half(self, a) && ta) || (half(self, b) && !tb) {
            return Err(Error::shape(
                "matmul",
                "an f16 operand must be contiguous along K (A not transposed, B transposed)",
            ));
        }
        let f32s: Vec<NodeId> = [a, b].into_iter().filter(|&x| !half(self, x)).collect();
        self.expect_f32("matmul", &f32s)?;
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() < 2 || sb.len() < 2 {
            return Err(Error::shape(
                "matmul",
                format!("operands must be at least 2-D, got {sa:?} and {sb:?}"),
            ));
        }
        let (m, ka) = if ta {
            (sa[sa.len() - 1], sa[sa.len() - 2])
        } else {
            (sa[sa.len() - 2], sa[sa.len() - 1])
        };
        let (kb, n) = if tb {
            (sb[sb.len() - 1], sb[sb.len() - 2])
        } else {
            (sb[sb.len() - 2], sb[sb.len() - 1])
        };
        if ka != kb {
            return Err(Error::shape(
                "matmul",
                format!("contraction mismatch: {sa:?} (ta={ta}) x {sb:?} (tb={tb})"),
            ));
        }
        let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
        if !(ba == bb || (bb.is_empty() && !ta)) {
            return Err(Error::shape(
                "matmul",
                format!("batch dims must match ({ba:?} vs {bb:?}); a 2-D right operand is shared only when the left one is not transposed"),
            ));
        }
        if ka > MATMUL_K_CHUNK && f32s.len() != 2 {
            // f16 weights are never this long in K (SD's longest is 11,520); splitting them
            // would need f16 slices, so refuse rather than risk a truncated sum.
            return Err(Error::shape(
                "matmul",
                format!("an f16 operand with a contraction of {ka} (at most {MATMUL_K_CHUNK})"),
            ));
        }
        if ka > MATMUL_K_CHUNK {
            // A long contraction (weight gradients over batch x positions) runs as a sum of
            // matmuls over K chunks: the kernel loops over K serially in each invocation,
            // and llvmpipe ends loops after 65,535 iterations (see `kernels::LOOP_CHUNK`).
            let (axa, axb) = (
                sa.len() - if ta { 2 } else { 1 },
                sb.len() - if tb { 1 } else { 2 },
            );
            let mut sum: Option<NodeId> = None;
            for (k0, k1) in crate::kernels::chunks(ka, MATMUL_K_CHUNK) {
                let ac = self.slice(a, axa, k0, k1 - k0)?;
                let bc = self.slice(b, axb, k0, k1 - k0)?;
                let part = self.matmul_t(ac, bc, ta, tb)?;
                sum = Some(match sum {
                    Some(acc) => self.add(acc, part)?,
                    None => part,
                });
            }
            return sum.ok_or_else(|| Error::shape("matmul", "empty contraction"));
        }
        let mut shape = ba.to_vec();
        shape.extend([m, n]);
        Ok(self.push(Op::Matmul { ta, tb }, vec![a, b], shape, DType::F32))
    }

    /// `a @ b`.
    pub fn matmul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.matmul_t(a, b, false, false)
    }

    /// Elementwise unary op.
    pub fn unary(&mut self, op: UnaryOp, x: NodeId) -> Result<NodeId> {
        self.expect_f32(op.name(), &[x])?;
        let s = self.shape(x).to_vec();
        Ok(self.push(Op::Unary(op), vec![x], s, DType::F32))
    }

    /// Elementwise binary op with broadcasting.
    pub fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.expect_f32(&op.key(), &[a, b])?;
        let s = broadcast_shape(self.shape(a), self.shape(b)).ok_or_else(|| {
            Error::shape(
                op.key(),
                format!(
                    "cannot broadcast {:?} with {:?}",
                    self.shape(a),
                    self.shape(b)
                ),
            )
        })?;
        Ok(self.push(Op::Binary(op), vec![a, b], s, DType::F32))
    }

    /// a + b
    pub fn add(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Add, a, b)
    }
    /// a - b
    pub fn sub(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Sub, a, b)
    }
    /// a * b
    pub fn mul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Mul, a, b)
    }
    /// a / b
    pub fn div(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Div, a, b)
    }
    /// alpha * x + beta
    pub fn affine(&mut self, x: NodeId, alpha: f32, beta: f32) -> Result<NodeId> {
        self.unary(UnaryOp::Affine(alpha, beta), x)
    }

    /// Reduction removing `axis`.
    pub fn reduce(&mut self, op: ReduceOp, x: NodeId, axis: usize) -> Result<NodeId> {
        self.expect_f32("reduce", &[x])?;
        let mut s = self.shape(x).to_vec();
        if axis >= s.len() {
            return Err(Error::shape(
                "reduce",
                format!("axis {axis} out of range for {s:?}"),
            ));
        }
        s.remove(axis);
        // A long reduction into few outputs runs as two: one invocation per output would
        // loop over the whole axis serially (slow on GPUs). [.., len, ..] becomes
        // [.., c, len / c, ..], reduced over len / c and then over c (exact for sum and max,
        // and for mean since the chunks have equal size).
        let full = self.shape(x).to_vec();
        let (outer, len, inner) = (numel(&full[..axis]), full[axis], numel(&full[axis + 1..]));
        if outer * inner <= 16384 && len >= 1024 {
            if let Some(c) = split_factor(len) {
                let mut split = full.clone();
                split[axis] = len / c;
                split.insert(axis, c);
                let r = self.reshape(x, &split)?;
                let mut s1 = split.clone();
                s1.remove(axis + 1);
                let partial = self.push(Op::Reduce { op, axis: axis + 1 }, vec![r], s1, DType::F32);
                return Ok(self.push(Op::Reduce { op, axis }, vec![partial], s, DType::F32));
            }
        }
        Ok(self.push(Op::Reduce { op, axis }, vec![x], s, DType::F32))
    }

    /// Sum of all elements as a [1] tensor.
    pub fn sum_all(&mut self, x: NodeId) -> Result<NodeId> {
        let n = self.nodes[x.0].numel();
        let r = self.reshape(x, &[n])?;
        let s = self.reduce(ReduceOp::Sum, r, 0)?;
        self.reshape(s, &[1])
    }

    /// Mean of all elements as a [1] tensor.
    pub fn mean_all(&mut self, x: NodeId) -> Result<NodeId> {
        let n = self.nodes[x.0].numel();
        let r = self.reshape(x, &[n])?;
        let s = self.reduce(ReduceOp::Mean, r, 0)?;
        self.reshape(s, &[1])
    }

    /// Same data with a new shape of equal size.
    pub fn reshape(&mut self, x: NodeId, shape: &[usize]) -> Result<NodeId> {
        if numel(shape) != self.nodes[x.0].numel() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} -> {shape:?} changes the size", self.shape(x)),
            ));
        }
        let dt = self.nodes[x.0].dtype;
        Ok(self.push(Op::Reshape, vec![x], shape.to_vec(), dt))
    }

    /// Broadcast to `shape` (NumPy rules; lower-rank inputs gain leading dims).
    pub fn expand(&mut self, x: NodeId, shape: &[usize]) -> Result<NodeId> {
        self.expect_f32("expand", &[x])?;
        let s = self.shape(x).to_vec();
        if broadcast_shape(&s, shape).as_deref() != Some(shape) {
            return Err(Error::shape(
                "expand",
                format!("{s:?} does not broadcast to {shape:?}"),
            ));
        }
        let x = if s.len() < shape.len() {
            let mut full = vec![1; shape.len() - s.len()];
            full.extend(&s);
            self.reshape(x, &full)?
        } else {
            x
        };
        if self.shape(x) == shape {
            return Ok(x);
        }
        Ok(self.push(Op::Expand, vec![x], shape.to_vec(), DType::F32))
    }

    /// Sum down to `shape` (the reverse of [`Graph::expand`]).
    pub fn sum_to(&mut self, x: NodeId, shape: &[usize]) -> Result<NodeId> {
        let s = self.shape(x).to_vec();
        if s == shape {
            return Ok(x);
        }
        if broadcast_shape(shape, &s).as_deref() != Some(&s[..]) {
            return Err(Error::shape(
                "sum_to",
                format!("{s:?} does not reduce to {shape:?}"),
            ));
        }
        let mut full = vec![1; s.len() - shape.len()];
        full.extend(shape);
        // Summing away leading dims only (bias gradients: [rows, C] -> [C]) is a reduction
        // over one flattened axis, which `reduce` splits when it is long.
        let lead = full.iter().take_while(|&&d| d == 1).count();
        if full[lead..] == s[lead..] && lead > 0 {
            let rows = numel(&s[..lead]);
            let flat = self.reshape(x, &[rows, numel(&s[lead..])])?;
            let y = self.reduce(ReduceOp::Sum, flat, 0)?;
            return self.reshape(y, shape);
        }
        // Summing away trailing dims only ([N, C, H, W] -> [N, C, 1, 1]) is a row reduction.
        let trail = full.iter().rev().take_while(|&&d| d == 1).count();
        let keep = s.len() - trail;
        if full[..keep] == s[..keep] && trail > 0 {
            let flat = self.reshape(x, &[numel(&s[..keep]), numel(&s[keep..])])?;
            let y = self.reduce(ReduceOp::Sum, flat, 1)?;
            return self.reshape(y, shape);
        }
        // Few outputs over a long reduction (a convolution's bias gradient: [N, C, H, W] ->
        // [C]) would leave most of the device idle, one invocation per output walking N*H*W
        // values: sum every reduced dim but the first one, then that one.
        let red: Vec<usize> = (0..s.len()).filter(|&d| full[d] == 1 && s[d] > 1).collect();
        if red.len() >= 2 && numel(&full) < 1024 && s[red[0]] >= 4 {
            let mut inter = full.clone();
            inter[red[0]] = s[red[0]];
            let y = self.sum_to(x, &inter)?;
            return self.sum_to(y, shape);
        }
        let y = self.push(Op::SumTo, vec![x], full, DType::F32);
        self.reshape(y, shape)
    }

    /// Permutes axes: output axis i is input axis `perm[i]`.
    pub fn permute(&mut self, x: NodeId, perm: &[usize]) -> Result<NodeId> {
        let s = self.shape(x).to_vec();
        let mut seen = vec![false; s.len()];
        if perm.len() != s.len()
            || perm
                .iter()
                .any(|&p| p >= s.len() || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::shape(
                "permute",
                format!("{perm:?} is not a permutation of {} axes", s.len()),
            ));
        }
        let shape = perm.iter().map(|&p| s[p]).collect();
        let dt = self.nodes[x.0].dtype;
        Ok(self.push(Op::Permute(perm.to_vec()), vec![x], shape, dt))
    }

    /// Swaps the last two axes.
    pub fn transpose(&mut self, x: NodeId) -> Result<NodeId> {
        let r = self.shape(x).len();
        if r < 2 {
            return Err(Error::shape("transpose", "needs at least 2 axes"));
        }
        let mut p: Vec<usize> = (0..r).collect();
        p.swap(r - 1, r - 2);
        self.permute(x, &p)
    }

    /// `len` entries from `start` along `axis`.
    pub fn slice(&mut self, x: NodeId, axis: usize, start: usize, len: usize) -> Result<NodeId> {
        let mut s = self.shape(x).to_vec();
        if axis >= s.len() || start + len > s[axis] {
            return Err(Error::shape(
                "slice",
                format!("{start}..{} on axis {axis} of {s:?}", start + len),
            ));
        }
        s[axis] = len;
        let dt = self.nodes[x.0].dtype;
        Ok(self.push(Op::Slice { axis, start }, vec![x], s, dt))
    }

    /// x placed at `start` along `axis` in zeros of size `total` there.
    pub fn pad(&mut self, x: NodeId, axis: usize, start: usize, total: usize) -> Result<NodeId> {
        self.expect_f32("pad", &[x])?;
        let mut s = self.shape(x).to_vec();
        if axis >= s.len() || start + s[axis] > total {
            return Err(Error::shape(
                "pad",
                format!("{:?} at {start} of {total} on axis {axis}", s),
            ));
        }
        s[axis] = total;
        Ok(self.push(Op::Pad { axis, start }, vec![x], s, DType::F32))
    }

    /// Convolution patches of samples `sample..sample + samples` of x [N, C, H, W] for `count`
    /// output pixels from `first` (row-major over Ho x Wo): [samples * count, C * KH * KW],
    /// sample-major.
    pub fn im2col(
        &mut self,
        x: NodeId,
        geom: crate::kernels::layout::Conv2d,
        sample: usize,
        samples: usize,
        first: usize,
        count: usize,
    ) -> Result<NodeId> {
        self.expect_f32("im2col", &[x])?;
        let s = self.shape(x).to_vec();
        let bad = || {
            Error::shape(
                "im2col",
                format!(
                    "{geom:?}, samples {sample}..+{samples}, pixels {first}..+{count} on an \
                     input of shape {s:?} (want [N, C, H, W])"
                ),
            )
        };
        if s.len() != 4 || samples == 0 || sample + samples > s[0] {
            return Err(bad());
        }
        let (ho, wo) = geom.out_size(s[2], s[3]).ok_or_else(bad)?;
        if count == 0 || first + count > ho * wo {
            return Err(bad());
        }
        let out = vec![samples * count, s[1] * geom.kh * geom.kw];
        Ok(self.push(
            Op::Im2col {
                geom,
                sample,
                samples,
                first,
            },
            vec![x],
            out,
            DType::F32,
        ))
    }

    /// The adjoint of [`Graph::im2col`]: the gradient [samples, C, H, W] of the images of
    /// `dims` [C, H, W] from their patches' gradient `dy` [samples * count, C * KH * KW]
    /// (pixels from `first`).
    pub fn col2im(
        &mut self,
        dy: NodeId,
        geom: crate::kernels::layout::Conv2d,
        first: usize,
        samples: usize,
        dims: [usize; 3],
    ) -> Result<NodeId> {
        self.expect_f32("col2im", &[dy])?;
        let s = self.shape(dy).to_vec();
        let [c, h, w] = dims;
        let bad = || {
            Error::shape(
                "col2im",
                format!(
                    "{geom:?}, patches {s:?} of {samples} samples from pixel {first} into \
                     [{c}, {h}, {w}]"
                ),
            )
        };
        let (ho, wo) = geom.out_size(h, w).ok_or_else(bad)?;
        if s.len() != 2
            || samples == 0
            || s[0] == 0
            || !s[0].is_multiple_of(samples)
            || s[1] != c * geom.kh * geom.kw
            || first + s[0] / samples > ho * wo
        {
            return Err(bad());
        }
        Ok(self.push(
            Op::Col2im { geom, first },
            vec![dy],
            vec![samples, c, h, w],
            DType::F32,
        ))
    }

    /// GroupNorm over x [N, C, H, W] (statistics per sample and group of C / groups channels,
    /// biased variance, as `torch.nn.GroupNorm`) with per-channel `gamma` and `beta`, then
    /// SiLU when `silu`. Two kernels: a workgroup reduction per group, and the apply. Its
    /// gradient recomputes the normalized input and uses LayerNorm's row rule per group.
    pub fn group_norm(
        &mut self,
        x: NodeId,
        gamma: NodeId,
        beta: NodeId,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<NodeId> {
        self.expect_f32("group_norm", &[x, gamma, beta])?;
        let s = self.shape(x).to_vec();
        if s.len() != 4 || groups == 0 || !s[1].is_multiple_of(groups) {
            return Err(Error::shape(
                "group_norm",
                format!(
                    "{groups} groups over an input of shape {s:?} (want [N, C, H, W], C divisible)"
                ),
            ));
        }
        if self.shape(gamma) != [s[1]] || self.shape(beta) != [s[1]] {
            return Err(Error::shape(
                "group_norm",
                format!("weight and bias must be [{}]", s[1]),
            ));
        }
        let stats = self.push(
            Op::GroupStats { groups, eps },
            vec![x],
            vec![s[0] * groups, 2],
            DType::F32,
        );
        Ok(self.push(
            Op::GroupApply { groups, silu },
            vec![x, stats, gamma, beta],
            s,
            DType::F32,
        ))
    }

    /// Fused scaled dot-product attention (differentiable; the backward recomputes the scores): q [BH, Tq, D], k and v [BH, Tk, D]
    /// -> [BH, Tq, D], without a [Tq, Tk] score matrix in memory.
    pub fn attention(&mut self, q: NodeId, k: NodeId, v: NodeId, scale: f32) -> Result<NodeId> {
        self.expect_f32("attention", &[q, k, v])?;
        let (sq, sk, sv) = (
            self.shape(q).to_vec(),
            self.shape(k).to_vec(),
            self.shape(v).to_vec(),
        );
        if sq.len() != 3
            || sk != sv
            || sk.len() != 3
            || sq[0] != sk[0]
            || sq[2] != sk[2]
            || sk[1] == 0
        {
            return Err(Error::shape(
                "attention",
                format!("q {sq:?}, k {sk:?}, v {sv:?} (want [BH, Tq, D], [BH, Tk, D] twice)"),
            ));
        }
        Ok(self.push(Op::Attention { scale }, vec![q, k, v], sq, DType::F32))
    }

    /// Multi-head self-attention on the fused projection's output (see [`Op::HeadAttention`]):
    /// qkv [B * T, 3 * heads * Dh] -> [B * T, heads * Dh], differentiable (two backward
    /// kernels, no score matrix).
    pub fn head_attention(
        &mut self,
        qkv: NodeId,
        tokens: usize,
        heads: usize,
        scale: f32,
        causal: bool,
    ) -> Result<NodeId> {
        self.expect_f32("head attention", &[qkv])?;
        let s = self.shape(qkv).to_vec();
        if s.len() != 2
            || tokens == 0
            || heads == 0
            || !s[0].is_multiple_of(tokens)
            || !s[1].is_multiple_of(3 * heads)
            || s[1] == 0
        {
            return Err(Error::shape(
                "head attention",
                format!(
                    "qkv {s:?} with {tokens} tokens and {heads} heads (want [B * tokens, 3 * heads * head width])"
                ),
            ));
        }
        let h = Heads {
            tokens,
            heads,
            scale,
            causal,
        };
        Ok(self.push(
            Op::HeadAttention(h),
            vec![qkv],
            vec![s[0], s[1] / 3],
            DType::F32,
        ))
    }

    /// 2-D convolution, PyTorch's `conv2d`: x [N, C, H, W], w [O, C, KH, KW], optional bias
    /// [O] -> [N, O, Ho, Wo]. Per sample, `W [O, C*KH*KW]` times the im2col patches
    /// transposed, which is channels-first already; the patches are built in chunks of output
    /// pixels no larger than [`Graph::conv_patch_bytes`], so memory stays bounded at any image
    /// size. A 1x1 convolution with stride 1 and no padding is one matmul on the input itself.
    pub fn conv2d(
        &mut self,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        stride: usize,
        pad: usize,
    ) -> Result<NodeId> {
        let (sx, sw) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        if sw.len() != 4 || sx.len() != 4 || sw[1] != sx[1] {
            return Err(Error::shape(
                "conv2d",
                format!("input {sx:?} and weight {sw:?} (want [N, C, H, W] and [O, C, KH, KW])"),
            ));
        }
        let geom = crate::kernels::layout::Conv2d {
            kh: sw[2],
            kw: sw[3],
            stride,
            pad,
        };
        let (ho, wo) = geom.out_size(sx[2], sx[3]).ok_or_else(|| {
            Error::shape(
                "conv2d",
                format!("{geom:?} does not fit an input of shape {sx:?}"),
            )
        })?;
        let (n, c, o) = (sx[0], sx[1], sw[0]);
        let (k, pixels) = (c * geom.kh * geom.kw, ho * wo);
        let w2 = self.reshape(w, &[o, k])?;
        let pointwise = geom.kh == 1 && geom.kw == 1 && stride == 1 && pad == 0;
        let limit = match self.conv_patch_bytes {
            0 => CONV_PATCH_BYTES,
            b => b,
        };
        let per_sample = 4 * k * pixels;
        let group = if pointwise { 0 } else { limit / per_sample };
        let y = if pointwise && n >= 2 {
            // A 1x1 convolution of a batch: tokens-major, one matmul with the shared weight.
            let xs = self.reshape(x, &[n, c, pixels])?;
            let xs = self.permute(xs, &[0, 2, 1])?;
            let y = self.matmul_t(xs, w2, false, true)?;
            let y = self.permute(y, &[0, 2, 1])?;
            self.reshape(y, &[n, o, ho, wo])?
        } else if group >= 2 {
            // Whole samples, several at a time: one im2col, one matmul with the shared weight
            // and one permute per group (few dispatches, which is what small images need).
            let mut groups = Vec::new();
            for s0 in (0..n).step_by(group) {
                let ns = group.min(n - s0);
                let cols = self.im2col(x, geom, s0, ns, 0, pixels)?;
                let cols = self.reshape(cols, &[ns, pixels, k])?;
                let y = self.matmul_t(cols, w2, false, true)?;
                let y = self.permute(y, &[0, 2, 1])?;
                groups.push(self.reshape(y, &[ns, o, ho, wo])?);
            }
            match groups[..] {
                [one] => one,
                _ => self.concat(&groups, 0)?,
            }
        } else {
            // Chunks of a multiple of 64 pixels keep the matmul's output rows vec4-aligned.
            let mut chunk = (limit / (4 * k)).clamp(1, pixels);
            if chunk < pixels && chunk >= 64 {
                chunk -= chunk % 64;
            }
            let mut samples = Vec::with_capacity(n);
            for s in 0..n {
                let y = if pointwise {
                    let xs = self.slice(x, 0, s, 1)?;
                    let xs = self.reshape(xs, &[c, pixels])?;
                    self.matmul(w2, xs)?
                } else {
                    let mut parts = Vec::new();
                    for first in (0..pixels).step_by(chunk) {
                        let cols = self.im2col(x, geom, s, 1, first, chunk.min(pixels - first))?;
                        parts.push(self.matmul_t(w2, cols, false, true)?);
                    }
                    match parts[..] {
                        [one] => one,
                        _ => self.concat(&parts, 1)?,
                    }
                };
                samples.push(self.reshape(y, &[1, o, ho, wo])?);
            }
            match samples[..] {
                [one] => one,
                _ => self.concat(&samples, 0)?,
            }
        };
        match bias {
            Some(b) => {
                let b = self.reshape(b, &[o, 1, 1])?;
                self.add(y, b)
            }
            None => Ok(y),
        }
    }

    /// Concatenation along `axis`.
    pub fn concat(&mut self, xs: &[NodeId], axis: usize) -> Result<NodeId> {
        let first = self
            .shape(
                *xs.first()
                    .ok_or_else(|| Error::shape("concat", "no inputs"))?,
            )
            .to_vec();
        if axis >= first.len() {
            return Err(Error::shape(
                "concat",
                format!("axis {axis} out of range for {first:?}"),
            ));
        }
        let mut total = 0;
        for &x in xs {
            let s = self.shape(x);
            if s.len() != first.len()
                || s.iter()
                    .enumerate()
                    .any(|(d, &v)| d != axis && v != first[d])
            {
                return Err(Error::shape(
                    "concat",
                    format!("{s:?} does not match {first:?} off axis {axis}"),
                ));
            }
            total += s[axis];
        }
        self.expect_f32("concat", xs)?;
        let mut s = first;
        s[axis] = total;
        Ok(self.push(Op::Concat { axis }, xs.to_vec(), s, DType::F32))
    }

    /// Embedding lookup: table [V, D], idx u32 [N] -> [N, D].
    pub fn gather(&mut self, table: NodeId, idx: NodeId) -> Result<NodeId> {
        self.gather_checked(table, idx)?;
        let s = vec![self.shape(idx)[0], self.shape(table)[1]];
        Ok(self.push(Op::Gather, vec![table, idx], s, DType::F32))
    }

    /// An embedding lookup for large tables: like [`Graph::gather`], plus u32 inputs
    /// `{name}.offsets` [V + 1] and `{name}.rows` [N] that the host fills each run with
    /// [`crate::kernels::layout::embedding_index`] of the ids, so the backward pass costs
    /// O(V D + N D). Returns (rows [N, D], offsets input, rows input).
    pub fn embedding(
        &mut self,
        name: &str,
        table: NodeId,
        idx: NodeId,
    ) -> Result<(NodeId, NodeId, NodeId)> {
        self.gather_checked(table, idx)?;
        let (v, n, d) = (
            self.shape(table)[0],
            self.shape(idx)[0],
            self.shape(table)[1],
        );
        let offsets = self.input_typed(&format!("{name}.offsets"), &[v + 1], DType::U32);
        let rows = self.input_typed(&format!("{name}.rows"), &[n], DType::U32);
        let y = self.push(
            Op::Gather,
            vec![table, idx, offsets, rows],
            vec![n, d],
            DType::F32,
        );
        Ok((y, offsets, rows))
    }

    fn gather_checked(&self, table: NodeId, idx: NodeId) -> Result<()> {
        let (ts, is) = (self.shape(table).to_vec(), self.shape(idx).to_vec());
        if ts.len() != 2 || is.len() != 1 || self.nodes[idx.0].dtype != DType::U32 {
            return Err(Error::shape(
                "gather",
                format!("needs table [V, D] and u32 indices [N], got {ts:?} and {is:?}"),
            ));
        }
        Ok(())
    }

    fn rows_of(&self, x: NodeId) -> (usize, usize) {
        let s = self.shape(x);
        let c = *s.last().unwrap_or(&1);
        (numel(s) / c.max(1), c)
    }

    /// Row-wise op over the last axis.
    pub fn row(&mut self, op: RowOp, x: NodeId) -> Result<NodeId> {
        self.expect_f32("row op", &[x])?;
        let mut s = self.shape(x).to_vec();
        if s.is_empty() {
            return Err(Error::shape("row op", "needs at least one axis"));
        }
        if let RowOp::LnStats(_) = op {
            let (r, _) = self.rows_of(x);
            s = vec![r, 2];
        }
        if op == RowOp::CausalSoftmax && (s.len() < 2 || s[s.len() - 1] != s[s.len() - 2]) {
            return Err(Error::shape(
                "causal softmax",
                format!("needs square [.., T, T] scores, got {s:?}"),
            ));
        }
        let (_, len) = self.rows_of(x);
        serial("row op", "columns", len, 3)?;
        Ok(self.push(Op::Row(op), vec![x], s, DType::F32))
    }

    /// Softmax over the last axis.
    pub fn softmax(&mut self, x: NodeId) -> Result<NodeId> {
        self.row(RowOp::Softmax, x)
    }

    /// Log-softmax over the last axis.
    pub fn log_softmax(&mut self, x: NodeId) -> Result<NodeId> {
        self.row(RowOp::LogSoftmax, x)
    }

    /// Rows divided by max(L2 norm, 1e-12) (PyTorch's F.normalize).
    pub fn l2_normalize(&mut self, x: NodeId) -> Result<NodeId> {
        self.row(RowOp::L2Norm(1e-12), x)
    }

    /// LayerNorm over the last axis with affine weight and bias.
    pub fn layer_norm(
        &mut self,
        x: NodeId,
        gamma: NodeId,
        beta: NodeId,
        eps: f32,
    ) -> Result<NodeId> {
        let (_, c) = self.rows_of(x);
        if self.shape(gamma) != [c] || self.shape(beta) != [c] {
            return Err(Error::shape(
                "layer_norm",
                format!("weight and bias must be [{c}]"),
            ));
        }
        let stats = self.row(RowOp::LnStats(eps), x)?;
        let s = self.shape(x).to_vec();
        Ok(self.push(
            Op::NormApply {
                stats: Stats::Row,
                groups: 1,
            },
            vec![x, stats, gamma, beta],
            s,
            DType::F32,
        ))
    }

    /// BatchNorm with batch statistics over x [groups * rows, C] (each group of rows has its
    /// own statistics, as in StableRep's per-view head). Returns (y, stats [groups, 2, C]).
    pub fn batch_norm(
        &mut self,
        x: NodeId,
        gamma: NodeId,
        beta: NodeId,
        groups: usize,
        eps: f32,
    ) -> Result<(NodeId, NodeId)> {
        let s = self.shape(x).to_vec();
        if s.len() != 2 || groups == 0 || !s[0].is_multiple_of(groups) {
            return Err(Error::shape(
                "batch_norm",
                format!("x must be [groups * rows, C], got {s:?} with {groups} groups"),
            ));
        }
        if self.shape(gamma) != [s[1]] || self.shape(beta) != [s[1]] {
            return Err(Error::shape(
                "batch_norm",
                format!("weight and bias must be [{}]", s[1]),
            ));
        }
        serial("batch_norm", "rows per group", s[0] / groups, 2)?;
        let stats = self.push(
            Op::BnStats { groups, eps },
            vec![x],
            vec![groups, 2, s[1]],
            DType::F32,
        );
        let y = self.push(
            Op::NormApply {
                stats: Stats::Col,
                groups,
            },
            vec![x, stats, gamma, beta],
            s,
            DType::F32,
        );
        Ok((y, stats))
    }

    /// Appends the in-place update of running statistics `{name}.running_mean` and
    /// `{name}.running_var` (created as 0 and 1) from the batch statistics of
    /// [`Graph::batch_norm`] (PyTorch semantics, groups applied in turn).
    pub fn bn_running_update(
        &mut self,
        name: &str,
        stats: NodeId,
        momentum: f32,
        eps: f32,
    ) -> Result<()> {
        let ss = self.shape(stats).to_vec();
        let x = self.nodes[stats.0].inputs.first().copied();
        let rows = match (x, &self.nodes[stats.0].op) {
            (Some(x), Op::BnStats { groups, .. }) => self.shape(x)[0] / groups,
            _ => {
                return Err(Error::Graph(
                    "bn_running_update needs the statistics node of batch_norm".into(),
                ))
            }
        };
        let c = ss[2];
        let rm = self.state(&format!("{name}.running_mean"), &[c], 0.0);
        let rv = self.state(&format!("{name}.running_var"), &[c], 1.0);
        self.push(
            Op::BnRunning {
                rows,
                momentum,
                eps,
            },
            vec![rm, rv, stats],
            vec![],
            DType::F32,
        );
        Ok(())
    }

    /// Applies the augmentation pipeline: source images [B, 3, Hs, Ws] in [0, 1] and
    /// per-image parameters [B, 16] (from `data::augment`) -> normalized [B, 3, size, size].
    pub fn augment(&mut self, src: NodeId, params: NodeId, size: usize) -> Result<NodeId> {
        use crate::kernels::augment::Stage;
        let (s, ps) = (self.shape(src).to_vec(), self.shape(params).to_vec());
        if s.len() != 4 || s[1] != 3 || ps != [s[0], 16] {
            return Err(Error::shape(
                "augment",
                format!("needs images [B, 3, H, W] and params [B, 16], got {s:?} and {ps:?}"),
            ));
        }
        let out = vec![s[0], 3, size, size];
        let pre = self.push(
            Op::Augment(Stage::Pre),
            vec![src, params],
            out.clone(),
            DType::F32,
        );
        let mean = self.push(
            Op::Augment(Stage::Mean),
            vec![pre, params],
            vec![s[0]],
            DType::F32,
        );
        let post = self.push(
            Op::Augment(Stage::Post),
            vec![pre, params, mean],
            out.clone(),
            DType::F32,
        );
        let bh = self.push(
            Op::Augment(Stage::BlurH),
            vec![post, params],
            out.clone(),
            DType::F32,
        );
        Ok(self.push(Op::Augment(Stage::BlurV), vec![bh, params], out, DType::F32))
    }

    /// Per-row softmax cross-entropy of logits [R, C] against u32 labels [R] -> [R].
    pub fn cross_entropy(&mut self, logits: NodeId, labels: NodeId) -> Result<NodeId> {
        let (ls, bs) = (self.shape(logits).to_vec(), self.shape(labels).to_vec());
        if ls.len() != 2 || bs != [ls[0]] || self.nodes[labels.0].dtype != DType::U32 {
            return Err(Error::shape(
                "cross_entropy",
                format!("needs logits [R, C] and u32 labels [R], got {ls:?} and {bs:?}"),
            ));
        }
        serial("cross_entropy", "classes", ls[1], 2)?;
        Ok(self.push(
            Op::CrossEntropy,
            vec![logits, labels],
            vec![ls[0]],
            DType::F32,
        ))
    }

    /// Appends AdamW updates for `params` given their gradients. Creates the moment state
    /// (`optimizer.<name>.exp_avg`, `optimizer.<name>.exp_avg_sq`, PyTorch's names, under a
    /// prefix of their own so a model's parameters load without them) and returns the `hyper` input [lr, 1-b1^t, 1-b2^t]
    /// that the host writes each step (see [`adam_hyper`]).
    pub fn adamw(
        &mut self,
        params: &[NodeId],
        grads: &[NodeId],
        cfg: AdamW,
        decay: &[bool],
    ) -> Result<NodeId> {
        let cfgs: Vec<AdamW> = (0..params.len())
            .map(|i| {
                let mut c = cfg;
                if !decay.get(i).copied().unwrap_or(true) {
                    c.weight_decay = 0.0;
                }
                c
            })
            .collect();
        self.adamw_each(params, grads, &cfgs)
    }

    /// [`Graph::adamw`] with one configuration per parameter (weight decay, clamp).
    pub fn adamw_each(
        &mut self,
        params: &[NodeId],
        grads: &[NodeId],
        cfgs: &[AdamW],
    ) -> Result<NodeId> {
        if params.len() != grads.len() || params.len() != cfgs.len() {
            return Err(Error::Graph(format!(
                "AdamW needs one gradient and one configuration per parameter ({} parameters, {} gradients, {} configurations)",
                params.len(),
                grads.len(),
                cfgs.len()
            )));
        }
        let hyper = self.input("adamw.hyper", &[3]);
        for ((&p, &g), &c) in params.iter().zip(grads).zip(cfgs) {
            let name = self.nodes[p.0]
                .name
                .clone()
                .ok_or_else(|| Error::Graph("optimizer parameter without a name".into()))?;
            if self.nodes[p.0].op != Op::Param {
                return Err(Error::Graph(format!("'{name}' is not a parameter")));
            }
            let s = self.shape(p).to_vec();
            let m = self.state(&format!("optimizer.{name}.exp_avg"), &s, 0.0);
            let v = self.state(&format!("optimizer.{name}.exp_avg_sq"), &s, 0.0);
            self.push(Op::AdamW(c), vec![p, g, m, v, hyper], vec![], DType::F32);
        }
        Ok(hyper)
    }

    /// Appends in-place accumulations of `grads` into persistent tensors named
    /// [`accumulator_name`] of `params`' names: `acc = beta * acc + grad` with `beta` the
    /// returned `hyper` input [1] (0 for a step's first chunk, 1 after). Another plan reads
    /// the sums as `state(accumulator_name(..))`.
    pub fn accumulate(&mut self, params: &[NodeId], grads: &[NodeId]) -> Result<NodeId> {
        if params.len() != grads.len() {
            return Err(Error::Graph(format!(
                "accumulate: {} parameters but {} gradients",
                params.len(),
                grads.len()
            )));
        }
        let hyper = self.input("accumulate.hyper", &[1]);
        for (&p, &g) in params.iter().zip(grads) {
            let name = self.nodes[p.0]
                .name
                .clone()
                .ok_or_else(|| Error::Graph("accumulated parameter without a name".into()))?;
            let s = self.shape(p).to_vec();
            if self.shape(g) != s.as_slice() {
                return Err(Error::Graph(format!(
                    "accumulate: gradient of '{name}' has shape {:?}, the parameter {s:?}",
                    self.shape(g)
                )));
            }
            let acc = self.state(&accumulator_name(&name), &s, 0.0);
            self.push(Op::Accumulate, vec![acc, g, hyper], vec![], DType::F32);
        }
        Ok(hyper)
    }

    /// Appends SGD-with-momentum updates; returns the `hyper` input [lr].
    pub fn sgd(
        &mut self,
        params: &[NodeId],
        grads: &[NodeId],
        momentum: f32,
        weight_decay: f32,
    ) -> Result<NodeId> {
        let hyper = self.input("sgd.hyper", &[1]);
        for (&p, &g) in params.iter().zip(grads) {
            let name = self.nodes[p.0]
                .name
                .clone()
                .ok_or_else(|| Error::Graph("optimizer parameter without a name".into()))?;
            let s = self.shape(p).to_vec();
            let m = self.state(&format!("optimizer.{name}.momentum_buffer"), &s, 0.0);
            self.push(
                Op::Sgd {
                    momentum,
                    weight_decay,
                },
                vec![p, g, m, hyper],
                vec![],
                DType::F32,
            );
        }
        Ok(hyper)
    }
}

/// Prefix of store tensors that are working memory, not training state: checkpoints leave
/// them out.
pub const SCRATCH_PREFIX: &str = "scratch.";

/// The store name of the gradient accumulator of parameter `name` ([`Graph::accumulate`]).
pub fn accumulator_name(name: &str) -> String {
    format!("{SCRATCH_PREFIX}grad.{name}")
}

/// Anchors per similarity block of `models::losses::multi_positive_loss` (a block of 4,096
/// rows of an 8,256-image batch is 135 MB).
pub const MULTIPOS_BLOCK: usize = 4096;

/// The most loop iterations an op may give one invocation: llvmpipe (lavapipe) ends a
/// shader's loops after 65,535 iterations per invocation with no error, so an op whose
/// kernel walks `len` elements `passes` times in one invocation is refused above this
/// rather than computed wrong. (Long sums and contractions are split instead; see
/// [`crate::kernels::LOOP_CHUNK`] and [`MATMUL_K_CHUNK`].)
pub const SERIAL_LIMIT: usize = 49_152;

/// Refuses an op whose kernel would walk `len` elements `passes` times in one invocation
/// beyond [`SERIAL_LIMIT`], with an error naming `op` and `what` it counts.
pub fn serial(op: &str, what: &str, len: usize, passes: usize) -> Result<()> {
    if len.saturating_mul(passes) > SERIAL_LIMIT {
        return Err(Error::shape(
            op,
            format!(
                "{len} {what} is more than this kernel handles in one invocation (at most {}; \
                 software Vulkan drivers end longer loops early)",
                SERIAL_LIMIT / passes
            ),
        ));
    }
    Ok(())
}

/// A divisor of `len` near its square root (at least 16), to split a long reduction in two.
pub(crate) fn split_factor(len: usize) -> Option<usize> {
    let root = (len as f64).sqrt() as usize;
    (16..=root.max(16))
        .rev()
        .find(|c| len.is_multiple_of(*c) && len / c >= 16)
}

/// The AdamW `hyper` values for step `t` (1-based): [lr, 1 - beta1^t, 1 - beta2^t].
pub fn adam_hyper(lr: f32, cfg: &AdamW, t: u32) -> [f32; 3] {
    [
        lr,
        1.0 - cfg.beta1.powi(t as i32),
        1.0 - cfg.beta2.powi(t as i32),
    ]
}
