//! Activations split along channels, for tensors larger than one storage binding (the VAE
//! decoder at 512x512 has a [1, 256, 512, 512] f32 tensor: 256 MiB, twice WebGPU's default
//! 128 MiB binding limit). A [`Parts`] holds an activation as channel chunks, each its own
//! graph node. Chunks are whole GroupNorm groups, so GroupNorm stays exact per chunk; a
//! convolution sums the partial convolutions of its input chunks for each output chunk;
//! upsampling and residual additions are per chunk. When everything fits, every tensor is one
//! chunk and the graph is the plain one.

use super::blocks::Resnet;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};

/// WebGPU's default `maxStorageBufferBindingSize` (128 MiB).
pub const DEFAULT_LIMIT: usize = 128 << 20;

/// An activation [N, C, H, W] as channel chunks [N, C_i, H, W], in channel order.
#[derive(Clone, Debug)]
pub struct Parts {
    /// The chunks.
    pub nodes: Vec<NodeId>,
    /// Channels of each chunk.
    pub sizes: Vec<usize>,
}

impl Parts {
    /// A tensor as one chunk.
    pub fn whole(g: &Graph, x: NodeId) -> Parts {
        Parts {
            nodes: vec![x],
            sizes: vec![g.shape(x)[1]],
        }
    }

    /// Total channels.
    pub fn channels(&self) -> usize {
        self.sizes.iter().sum()
    }

    /// The chunks concatenated into one tensor (which must fit a binding).
    pub fn join(&self, g: &mut Graph) -> Result<NodeId> {
        match self.nodes[..] {
            [one] => Ok(one),
            _ => g.concat(&self.nodes, 1),
        }
    }
}

/// The channel chunks for a tensor of `c` channels whose single channel takes
/// `channel_bytes`: the fewest equal chunks of whole groups (`groups` divides `c`) under
/// `limit` bytes each. An error when even one group is too large.
pub fn partition(
    c: usize,
    channel_bytes: usize,
    groups: usize,
    limit: usize,
) -> Result<Vec<usize>> {
    let limit = if limit == 0 { DEFAULT_LIMIT } else { limit };
    (1..=groups)
        .filter(|p| groups.is_multiple_of(*p))
        .find(|p| c / p * channel_bytes <= limit)
        .map(|p| vec![c / p; p])
        .ok_or_else(|| {
            Error::Config(format!(
                "a [{c} channels x {channel_bytes} bytes] activation cannot be split into chunks \
                 of at most {limit} bytes along its {groups} groups: use a smaller image size"
            ))
        })
}

/// The chunks of a `c`-channel tensor shaped like `like` (with `hw_scale` times its pixels)
/// under the graph's tensor limit.
fn plan_sizes(
    g: &Graph,
    like: &Parts,
    c: usize,
    hw_scale: usize,
    groups: usize,
) -> Result<Vec<usize>> {
    let s = g.shape(like.nodes[0]);
    let channel_bytes = 4 * s[0] * s[2] * s[3] * hw_scale;
    partition(c, channel_bytes, groups, g.max_tensor_bytes)
}

/// Channel ranges (start, len) of chunk sizes.
fn ranges(sizes: &[usize]) -> Vec<(usize, usize)> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&s| {
            at += s;
            (at - s, s)
        })
        .collect()
}

/// A `k` x `k` convolution `{prefix}weight` [cout, cin, k, k] / `{prefix}bias` (stride 1,
/// padding `pad`) from chunked input to output chunks `out_sizes`.
pub fn conv(
    g: &mut Graph,
    prefix: &str,
    x: &Parts,
    cout: usize,
    k: usize,
    pad: usize,
    out_sizes: Vec<usize>,
) -> Result<Parts> {
    let cin = x.channels();
    let w = g.param(&format!("{prefix}weight"), &[cout, cin, k, k]);
    let b = g.param(&format!("{prefix}bias"), &[cout]);
    if x.nodes.len() == 1 && out_sizes.len() == 1 {
        let y = g.conv2d(x.nodes[0], w, Some(b), 1, pad)?;
        return Ok(Parts::whole(g, y));
    }
    let mut nodes = Vec::with_capacity(out_sizes.len());
    for (o0, olen) in ranges(&out_sizes) {
        let wo = g.slice(w, 0, o0, olen)?;
        let mut acc: Option<NodeId> = None;
        for ((c0, clen), &xi) in ranges(&x.sizes).into_iter().zip(&x.nodes) {
            let wi = if x.nodes.len() == 1 {
                wo
            } else {
                g.slice(wo, 1, c0, clen)?
            };
            let y = g.conv2d(xi, wi, None, 1, pad)?;
            acc = Some(match acc {
                None => y,
                Some(a) => g.add(a, y)?,
            });
        }
        let bo = g.slice(b, 0, o0, olen)?;
        let bo = g.reshape(bo, &[olen, 1, 1])?;
        let acc = acc.ok_or_else(|| Error::Graph(format!("{prefix}: no input chunks")))?;
        nodes.push(g.add(acc, bo)?);
    }
    Ok(Parts {
        nodes,
        sizes: out_sizes,
    })
}

/// GroupNorm `{prefix}weight` / `{prefix}bias` over chunked channels (each chunk whole
/// groups), then SiLU when `silu`.
pub fn group_norm(
    g: &mut Graph,
    prefix: &str,
    x: &Parts,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Parts> {
    let c = x.channels();
    let per = c / groups;
    let gm = g.param(&format!("{prefix}weight"), &[c]);
    let bt = g.param(&format!("{prefix}bias"), &[c]);
    if x.nodes.len() == 1 {
        let y = g.group_norm(x.nodes[0], gm, bt, groups, eps, silu)?;
        return Ok(Parts::whole(g, y));
    }
    let mut nodes = Vec::with_capacity(x.nodes.len());
    for ((c0, len), &xi) in ranges(&x.sizes).into_iter().zip(&x.nodes) {
        if !len.is_multiple_of(per) || !c0.is_multiple_of(per) {
            return Err(Error::Graph(format!(
                "{prefix}: a chunk of {len} channels at {c0} splits a group of {per}"
            )));
        }
        let gi = g.slice(gm, 0, c0, len)?;
        let bi = g.slice(bt, 0, c0, len)?;
        nodes.push(g.group_norm(xi, gi, bi, len / per, eps, silu)?);
    }
    Ok(Parts {
        nodes,
        sizes: x.sizes.clone(),
    })
}

/// Chunk-wise sum of two activations chunked alike.
pub fn add(g: &mut Graph, a: &Parts, b: &Parts) -> Result<Parts> {
    if a.sizes != b.sizes {
        return Err(Error::Graph(format!(
            "adding channel chunks {:?} and {:?}",
            a.sizes, b.sizes
        )));
    }
    let nodes = a
        .nodes
        .iter()
        .zip(&b.nodes)
        .map(|(&x, &y)| g.add(x, y))
        .collect::<Result<_>>()?;
    Ok(Parts {
        nodes,
        sizes: a.sizes.clone(),
    })
}

/// [`super::blocks::resnet_block`] without a time embedding, on chunked channels; the output
/// is chunked to fit the graph's tensor limit.
pub fn resnet_block(g: &mut Graph, prefix: &str, x: &Parts, r: Resnet) -> Result<Parts> {
    let p = |n: &str| format!("{prefix}{n}");
    let out = plan_sizes(g, x, r.cout, 1, r.groups)?;
    let h = group_norm(g, &p("norm1."), x, r.groups, r.eps, true)?;
    let h = conv(g, &p("conv1."), &h, r.cout, 3, 1, out.clone())?;
    let h = group_norm(g, &p("norm2."), &h, r.groups, r.eps, true)?;
    let h = conv(g, &p("conv2."), &h, r.cout, 3, 1, out.clone())?;
    let skip = if r.cin != r.cout {
        conv(g, &p("conv_shortcut."), x, r.cout, 1, 0, out)?
    } else if x.sizes == out {
        x.clone()
    } else {
        return Err(Error::Graph(format!(
            "{prefix}: input chunks {:?} differ from output chunks {out:?}",
            x.sizes
        )));
    };
    add(g, &skip, &h)
}

/// diffusers' `Upsample2D` on chunked channels: nearest 2x per chunk, then the 3x3 conv
/// `{prefix}weight` / `{prefix}bias`; chunks are re-planned for the 4x larger tensor first.
pub fn upsample(g: &mut Graph, prefix: &str, x: &Parts, groups: usize) -> Result<Parts> {
    let c = x.channels();
    let sizes = plan_sizes(g, x, c, 4, groups)?;
    let x = rechunk(g, x, &sizes)?;
    let nodes = x
        .nodes
        .iter()
        .map(|&xi| super::blocks::upsample_nearest2x(g, xi))
        .collect::<Result<Vec<_>>>()?;
    let up = Parts {
        nodes,
        sizes: x.sizes.clone(),
    };
    conv(g, prefix, &up, c, 3, 1, sizes)
}

/// The same channels in other chunks (slices of the current ones; only splits, which is all
/// the decoder needs as tensors grow).
fn rechunk(g: &mut Graph, x: &Parts, sizes: &[usize]) -> Result<Parts> {
    if x.sizes == sizes {
        return Ok(x.clone());
    }
    let mut nodes = Vec::with_capacity(sizes.len());
    let src = ranges(&x.sizes);
    for (c0, len) in ranges(sizes) {
        let (i, &(s0, slen)) = src
            .iter()
            .enumerate()
            .find(|(_, &(s0, slen))| c0 >= s0 && c0 + len <= s0 + slen)
            .ok_or_else(|| {
                Error::Graph(format!(
                    "channel chunks {:?} cannot be re-cut into {sizes:?}",
                    x.sizes
                ))
            })?;
        nodes.push(if c0 == s0 && len == slen {
            x.nodes[i]
        } else {
            g.slice(x.nodes[i], 1, c0 - s0, len)?
        });
    }
    Ok(Parts {
        nodes,
        sizes: sizes.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_whole_groups_under_the_limit() {
        // SD's VAE at 512^2: 256 channels of 1 MiB in 32 groups -> two 128 MiB chunks.
        assert_eq!(partition(256, 1 << 20, 32, 0).unwrap(), vec![128, 128]);
        assert_eq!(partition(128, 1 << 20, 32, 0).unwrap(), vec![128]);
        assert_eq!(partition(12, 10, 4, 35).unwrap(), vec![3, 3, 3, 3]);
        let e = partition(8, 100, 2, 50).unwrap_err().to_string();
        assert!(e.contains("smaller image"), "{e}");
    }
}
