//! GPU augmentation stages (`shaders/augment.wgsl`); parameters are sampled on the host by
//! `data::augment`.

use super::{bind_all, grid, uniform, Dispatch, View};
use crate::error::Result;
use crate::gpu::Caps;

/// The stages of the pipeline, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Crop + resize + flip + jitter ops before contrast (input: source images).
    Pre,
    /// Per-image mean gray (output [batch]).
    Mean,
    /// Contrast, later jitter ops, grayscale (inputs: image, params, means).
    Post,
    /// Horizontal Gaussian blur.
    BlurH,
    /// Vertical Gaussian blur and ImageNet normalization.
    BlurV,
}

const PRE: &str = r#"    var xx = x;
    if (par(b, 4u) > 0.5) { xx = p.size - 1u - x; }
    let sy = par(b, 1u) + (f32(y) + 0.5) * par(b, 3u) / f32(p.size) - 0.5;
    let sx = par(b, 0u) + (f32(xx) + 0.5) * par(b, 2u) / f32(p.size) - 0.5;
    let y0 = floor(sy);
    let x0 = floor(sx);
    let fy = sy - y0;
    let fx = sx - x0;
    let iy = i32(y0);
    let ix = i32(x0);
    var c = vec3<f32>(0.0);
    for (var ch = 0u; ch < 3u; ch++) {
        let v = (src(b, ch, iy, ix) * (1.0 - fx) + src(b, ch, iy, ix + 1) * fx) * (1.0 - fy)
              + (src(b, ch, iy + 1, ix) * (1.0 - fx) + src(b, ch, iy + 1, ix + 1) * fx) * fy;
        c[ch] = v;
    }
    let cp = contrast_pos(b);
    if (par(b, 5u) > 0.5) {
        for (var k = 0u; k < min(cp, 4u); k++) { c = jitter(u32(par(b, 10u + k)), c, b); }
    }
    store(b, y, x, c);"#;

// (It touches the parameters so that its binding layout matches the other stages.)
const MEAN: &str = r#"    if (y != 0u || x != 0u || par(b, 2u) < 0.0) { return; }
    var s = 0.0;
    for (var j = 0u; j < plane; j++) { s += gray(px(b, j / p.size, j % p.size)); }
    ys[p.off_y + b] = s / f32(plane);"#;

const POST: &str = r#"    var c = px(b, y, x);
    let cp = contrast_pos(b);
    if (cp < 4u) {
        let cf = par(b, 7u);
        let mean = ms[p.off_m + b];
        c = clamp(c * cf + vec3<f32>(mean * (1.0 - cf)), vec3<f32>(0.0), vec3<f32>(1.0));
        for (var k = cp + 1u; k < 4u; k++) { c = jitter(u32(par(b, 10u + k)), c, b); }
    }
    if (par(b, 14u) > 0.5) { c = vec3<f32>(gray(c)); }
    store(b, y, x, c);"#;

fn blur(vertical: bool) -> String {
    let fetch = if vertical {
        "px(b, u32(reflect(i32(y) + d, i32(p.size))), x)"
    } else {
        "px(b, y, u32(reflect(i32(x) + d, i32(p.size))))"
    };
    let finish = if vertical {
        "    c = (c - vec3<f32>(0.485, 0.456, 0.406)) / vec3<f32>(0.229, 0.224, 0.225);\n"
    } else {
        ""
    };
    format!(
        r#"    let sigma = par(b, 15u);
    var c = px(b, y, x);
    if (sigma > 0.0) {{
        let r = i32(ceil(3.0 * sigma));
        var acc = vec3<f32>(0.0);
        var wsum = 0.0;
        for (var d = -r; d <= r; d++) {{
            let w = exp(-f32(d * d) / (2.0 * sigma * sigma));
            acc += w * {fetch};
            wsum += w;
        }}
        c = acc / wsum;
    }}
{finish}    store(b, y, x, c);"#
    )
}

/// Dispatches of one stage over `batch` images of `size` x `size` (sources `src_h` x `src_w`).
#[allow(clippy::too_many_arguments)]
pub fn stage(
    stage: Stage,
    x: View,
    params: View,
    means: Option<View>,
    batch: usize,
    size: usize,
    src: (usize, usize),
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "augmentation input")?;
    let (bp, op) = bind_all(&params, caps, "augmentation parameters")?;
    let (by, oy) = bind_all(&y, caps, "augmentation output")?;
    let mut bindings = vec![bx, bp];
    let mut om = 0;
    if let Some(m) = means {
        let (bm, o) = bind_all(&m, caps, "image means")?;
        bindings.push(bm);
        om = o;
    }
    bindings.push(by);
    let (name, body) = match stage {
        Stage::Pre => ("pre", PRE.to_string()),
        Stage::Mean => ("mean", MEAN.to_string()),
        Stage::Post => ("post", POST.to_string()),
        Stage::BlurH => ("blur_h", blur(false)),
        Stage::BlurV => ("blur_v", blur(true)),
    };
    let post = stage == Stage::Post;
    Ok(vec![Dispatch {
        key: format!("augment_{name}"),
        template: "augment",
        subst: vec![
            (
                "EXTRA_BINDING",
                if post {
                    "@group(0) @binding(3) var<storage, read> ms: array<f32>;".into()
                } else {
                    String::new()
                },
            ),
            ("OUT_BINDING", if post { "4".into() } else { "3".into() }),
            ("BODY", body),
        ],
        uniform: uniform(&[
            batch as u32,
            size as u32,
            src.0 as u32,
            src.1 as u32,
            ox,
            op,
            om,
            oy,
        ]),
        bindings,
        groups: grid(((batch * size * size) as u64).div_ceil(64), caps)?,
    }])
}
