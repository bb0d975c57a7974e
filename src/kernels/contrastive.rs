//! StableRep's multi-positive contrastive loss over a cosine-similarity matrix (see
//! `shaders/multipos.wgsl`): per-anchor losses and their gradient w.r.t. the similarities.
//! Rows are split into chunks when S exceeds one binding, so large batches work.

use super::{bind, grid, row_chunks, uniform, Dispatch, View};
use crate::error::Result;
use crate::gpu::Caps;

const FORWARD: &str = "    if (npos > 0u) {\n        ys[p.off_y + r] = lse - pos / f32(npos);\n    } else {\n        ys[p.off_y + r] = 0.0;\n    }";
const BACKWARD: &str = "    let g = gs[p.off_g + r];\n    let yb = p.off_y + r * p.n;\n    for (var j = 0u; j < p.n; j++) {\n        var d = 0.0;\n        if (j != k && npos > 0u) {\n            let q = exp(ss[sb + j] * p.inv_tau - lse);\n            let t = select(0.0, 1.0 / f32(npos), j % p.captions == cap);\n            d = g * (q - t) * p.inv_tau;\n        }\n        ys[yb + j] = d;\n    }";

fn launch(
    s: View,
    g: Option<View>,
    n: usize,
    captions: usize,
    tau: f32,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let grad = g.is_some();
    let mut out = Vec::new();
    for (r0, nr) in row_chunks(n as u64, n as u64, caps, "multi-positive loss")? {
        if nr == 0 {
            continue;
        }
        let (bs, os) = bind(&s, r0 * n as u64, nr * n as u64, caps, "similarities")?;
        let (by, oy) = if grad {
            bind(
                &y,
                r0 * n as u64,
                nr * n as u64,
                caps,
                "similarity gradient",
            )?
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
                captions as u32,
                r0 as u32,
                os,
                og,
                oy,
                0,
                (1.0 / tau).to_bits(),
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

/// Per-anchor losses y [n] from similarities s [n, n] (z z^T of unit vectors).
pub fn multipos(
    s: View,
    n: usize,
    captions: usize,
    tau: f32,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    launch(s, None, n, captions, tau, y, caps)
}

/// dL/dS [n, n] given the upstream gradient of the per-anchor losses g [n].
pub fn multipos_grad(
    s: View,
    g: View,
    n: usize,
    captions: usize,
    tau: f32,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    launch(s, Some(g), n, captions, tau, y, caps)
}
