//! Activations stored in f16 (`PlanOptions::f16_activations`, Stable Diffusion's
//! `--precision f16`): a plan-time pass that chooses which intermediate tensors are kept as
//! f16 instead of f32. The arithmetic stays f32 everywhere (the kernels widen what they load
//! and round what they store), so this halves the memory and traffic of those tensors and
//! rounds them once, as an fp16 pipeline does.
//!
//! A tensor is stored in f16 when its producer can round its stores and every reader can
//! widen its loads:
//! - producers: `Im2col` (a convolution's patches), `Permute` (which then converts),
//!   `Attention` (its output) and `Matmul` (its stores round; not the K-split form with A
//!   transposed and B not, which accumulates into C, and not a matmul whose bias add joins its
//!   dispatch: that add is the tensor, and it is not a producer);
//! - readers: a matmul's A operand (not transposed, K a multiple of 4) or B operand
//!   (transposed, K a multiple of 4), `Attention`'s queries, keys and values, and `Permute`;
//!   a `Reshape` passes its readers through (it shares its input's buffer and type).
//!
//! So a convolution's patches, the bias-free projections to queries, keys and values, the
//! attention heads and the attention output (up to the output projection) live in f16, and
//! everything else (normalizations, residual sums, biased linear layers, elementwise chains,
//! the graph's outputs) stays f32. The transformer blocks' fused `HeadAttention` reads and
//! writes f32 (its qkv is a biased layer's output anyway). Inference only: a graph with
//! optimizer updates is refused.

use std::borrow::Cow;

use super::{DType, Graph, NodeId, Op};
use crate::error::{Error, Result};

/// The graph a plan is laid out from: `graph` itself, or with `half` its copy from [`halve`].
pub(super) fn planned<'g>(
    graph: &'g Graph,
    outputs: &[NodeId],
    half: bool,
) -> Result<Cow<'g, Graph>> {
    Ok(if half {
        Cow::Owned(halve(graph, outputs)?)
    } else {
        Cow::Borrowed(graph)
    })
}

/// Whether node `r`'s readers (through reshapes) all widen f16 loads.
fn readers_take_f16(graph: &Graph, readers: &[Vec<usize>], is_output: &[bool], r: usize) -> bool {
    let mut stack = vec![r];
    while let Some(x) = stack.pop() {
        if is_output[x] {
            return false;
        }
        for &u in &readers[x] {
            let node = &graph.nodes[u];
            let ok = match node.op {
                Op::Reshape => {
                    stack.push(u);
                    true
                }
                Op::Permute(_) | Op::Attention { .. } => true,
                Op::Matmul { ta, tb } => {
                    let sa = &graph.nodes[node.inputs[0].0].shape;
                    let k = if ta {
                        sa[sa.len() - 2]
                    } else {
                        sa[sa.len() - 1]
                    };
                    node.inputs.iter().enumerate().all(|(i, id)| {
                        id.0 != x || (k.is_multiple_of(4) && if i == 0 { !ta } else { tb })
                    })
                }
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

/// A copy of `graph` whose chosen intermediates (see the module doc) have dtype F16.
fn halve(graph: &Graph, outputs: &[NodeId]) -> Result<Graph> {
    let n = graph.nodes.len();
    if graph.nodes.iter().any(|x| x.op.is_update()) {
        return Err(Error::Config(
            "f16 activations are for inference; this graph has optimizer updates".into(),
        ));
    }
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in graph.nodes.iter().enumerate() {
        for x in &node.inputs {
            if !readers[x.0].contains(&i) {
                readers[x.0].push(i);
            }
        }
    }
    let mut is_output = vec![false; n];
    for o in outputs {
        if o.0 >= n {
            return Err(Error::Graph(format!(
                "output node {} is not in the graph",
                o.0
            )));
        }
        is_output[o.0] = true;
    }
    let mut g = graph.clone();
    for i in 0..n {
        let node = &graph.nodes[i];
        // A matmul with A transposed and B not may split K and accumulate into C.
        let producer = match node.op {
            Op::Im2col { .. } | Op::Permute(_) | Op::Attention { .. } => true,
            Op::Matmul { ta, tb } => !ta || tb,
            _ => false,
        };
        if producer
            && node.dtype == DType::F32
            && !readers[i].is_empty()
            && readers_take_f16(graph, &readers, &is_output, i)
        {
            g.nodes[i].dtype = DType::F16;
        }
    }
    // A reshape has its input's type (it is the same buffer).
    for i in 0..n {
        if g.nodes[i].op == Op::Reshape {
            g.nodes[i].dtype = g.nodes[g.nodes[i].inputs[0].0].dtype;
        }
    }
    Ok(g)
}
