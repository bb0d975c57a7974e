//! Multi-positive contrastive losses over a logit matrix (see `shaders/multipos.wgsl`):
//! StableRep's loss on cosine similarities, and StableRep+'s image-to-text and text-to-image
//! terms. Per-anchor losses and their gradient w.r.t. the logits.
//! Rows are split into chunks when S exceeds one binding, so large batches work.

use super::{bind, grid, row_chunks, uniform, Dispatch, View};
use crate::error::Result;
use crate::gpu::Caps;

const FORWARD: &str = "    if (npos > 0u) {\n        ys[p.off_y + r] = lse - pos / f32(npos);\n    } else {\n        ys[p.off_y + r] = 0.0;\n    }";
const BACKWARD: &str = "    let g = gs[p.off_g + r];\n    let yb = p.off_y + r * p.n;\n    for (var j = 0u; j < p.n; j++) {\n        var d = 0.0;\n        if ((j != k || p.mask_self == 0u) && npos > 0u) {\n            let q = exp(ss[sb + j] * p.inv_tau - lse);\n            let t = select(0.0, 1.0 / f32(npos), j % p.captions == cap);\n            d = g * (q - t) * p.inv_tau;\n        }\n        ys[yb + j] = d;\n    }";

/// Shape and settings of one contrastive loss over a logit matrix s [rows, cols].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Contrast {
    /// anchor rows
    pub rows: usize,
    /// columns (candidates)
    pub cols: usize,
    /// captions: column j is a positive of row k when j mod captions == k mod captions
    pub captions: usize,
    /// temperature (logits are s / tau)
    pub tau: f32,
    /// leave column k out of row k's softmax (StableRep's self-exclusion)
    pub mask_self: bool,
    /// global index of the first row (the matrix may be a block of rows of a larger one)
    pub row0: usize,
}

fn launch(s: View, g: Option<View>, c: &Contrast, y: View, caps: &Caps) -> Result<Vec<Dispatch>> {
    let grad = g.is_some();
    let (n, mut out) = (c.cols as u64, Vec::new());
    for (r0, nr) in row_chunks(c.rows as u64, n, caps, "multi-positive loss")? {
        if nr == 0 {
            continue;
        }
        let (bs, os) = bind(&s, r0 * n, nr * n, caps, "similarities")?;
        let (by, oy) = if grad {
            bind(&y, r0 * n, nr * n, caps, "similarity gradient")?
        } else {
            bind(&y, r0, nr, caps, "per-anchor loss")?
        };
        let mut bindings = vec![bs];
        let mut og = 0;
        if let Some(gv) = g {
            let (bg, o) = bind(&gv, r0, nr, caps, "loss gradient")?;
            bindings.push(bg);
            og = o;
        }
        bindings.push(by);
        out.push(Dispatch {
            key: if grad {
                "multipos_grad".into()
            } else {
                "multipos".into()
            },
            template: "multipos",
            subst: vec![
                (
                    "EXTRA_BINDING",
                    if grad {
                        "@group(0) @binding(2) var<storage, read> gs: array<f32>;".into()
                    } else {
                        String::new()
                    },
                ),
                ("OUT_BINDING", if grad { "3".into() } else { "2".into() }),
                ("BODY", if grad { BACKWARD } else { FORWARD }.into()),
            ],
            uniform: uniform(&[
                nr as u32,
                n as u32,
                c.captions as u32,
                (c.row0 as u64 + r0) as u32,
                os,
                og,
                oy,
                u32::from(c.mask_self),
                (1.0 / c.tau).to_bits(),
                0,
                0,
                0,
            ]),
            bindings,
            groups: grid(nr.div_ceil(64), caps)?,
        });
    }
    Ok(out)
}

/// Per-anchor losses y [rows] from logits s [rows, cols].
pub fn multipos(s: View, c: &Contrast, y: View, caps: &Caps) -> Result<Vec<Dispatch>> {
    launch(s, None, c, y, caps)
}

/// dL/dS [rows, cols] given the upstream gradient of the per-anchor losses g [rows].
pub fn multipos_grad(
    s: View,
    g: View,
    c: &Contrast,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    launch(s, Some(g), c, y, caps)
}
