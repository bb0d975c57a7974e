//! Reductions along an axis, row-wise ops (softmax, log-softmax, L2-normalize, LayerNorm
//! statistics) with their gradients, and softmax cross-entropy.

use super::{bind_all, chunks, grid, uniform, Dispatch, View, LOOP_CHUNK, WG_1D};
use crate::error::Result;
use crate::gpu::Caps;

/// Reductions along one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// sum
    Sum,
    /// arithmetic mean
    Mean,
    /// maximum
    Max,
}

/// y[o, i] = reduce_t x[o, t, i] for x viewed as [outer, len, inner].
pub fn reduce(
    op: ReduceOp,
    x: View,
    outer: usize,
    len: usize,
    inner: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "reduce input")?;
    let (by, oy) = bind_all(&y, caps, "reduce output")?;
    // vec4 form (4 adjacent outputs per invocation) when the inner axis and offsets align:
    // a quarter of the loads, which dominate on CPU adapters.
    let vec = super::vec4_ok(inner as u64, &[ox, oy]);
    let (ty, div) = if vec { ("vec4<f32>", 4) } else { ("f32", 1) };
    let (init, step, finish, combine, name) = match op {
        ReduceOp::Sum => (format!("{ty}(0.0)"), "acc + v", "acc", "old + r", "sum"),
        ReduceOp::Mean => (
            format!("{ty}(0.0)"),
            "acc + v",
            "acc / f32(p.len)",
            "old + r",
            "mean",
        ),
        ReduceOp::Max => (
            format!("{ty}(-3.4028235e38)"),
            "max(acc, v)",
            "acc",
            "max(old, r)",
            "max",
        ),
    };
    let inner_units = inner / div;
    let groups = grid(((outer * inner_units) as u64).div_ceil(WG_1D as u64), caps)?;
    Ok(chunks(len, LOOP_CHUNK)
        .map(|(t0, t1)| Dispatch {
            key: format!("reduce_{name}{}", if vec { "_v4" } else { "" }),
            template: "reduce",
            subst: vec![
                ("TY", ty.into()),
                ("INIT", init.clone()),
                ("STEP", step.into()),
                ("FINISH", finish.into()),
                ("COMBINE", combine.into()),
            ],
            uniform: uniform(&[
                outer as u32,
                len as u32,
                inner_units as u32,
                ox / div as u32,
                oy / div as u32,
                t0 as u32,
                t1 as u32,
                u32::from(t0 > 0),
            ]),
            bindings: vec![bx, by],
            groups,
        })
        .collect())
}

/// Row-wise forward ops on a [rows, len] matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowOp {
    /// softmax over each row
    Softmax,
    /// softmax over each row of square [.., T, T] attention scores with a causal mask: row r
    /// (query r mod T) keeps columns 0..=r mod T, the rest are 0 (CLIP's text attention)
    CausalSoftmax,
    /// log-softmax over each row
    LogSoftmax,
    /// x / max(|x|, eps)
    L2Norm(f32),
    /// [mean, 1/sqrt(var + eps)] per row (output [rows, 2])
    LnStats(f32),
}

impl RowOp {
    fn name(&self) -> &'static str {
        match self {
            RowOp::Softmax => "softmax",
            RowOp::CausalSoftmax => "causal_softmax",
            RowOp::LogSoftmax => "log_softmax",
            RowOp::L2Norm(_) => "l2norm",
            RowOp::LnStats(_) => "ln_stats",
        }
    }
    fn eps(&self) -> f32 {
        match *self {
            RowOp::L2Norm(e) | RowOp::LnStats(e) => e,
            _ => 0.0,
        }
    }
    fn body(&self) -> &'static str {
        match self {
            RowOp::Softmax => {
                "    var mx = xs[xb];\n    for (var c = 1u; c < p.len; c++) { mx = max(mx, xs[xb + c]); }\n    var s = 0.0;\n    for (var c = 0u; c < p.len; c++) { s += exp(xs[xb + c] - mx); }\n    let inv = 1.0 / s;\n    for (var c = 0u; c < p.len; c++) { ys[yb + c] = exp(xs[xb + c] - mx) * inv; }"
            }
            RowOp::CausalSoftmax => {
                "    let lim = (p.row0 + r) % p.len + 1u;\n    var mx = xs[xb];\n    for (var c = 1u; c < lim; c++) { mx = max(mx, xs[xb + c]); }\n    var s = 0.0;\n    for (var c = 0u; c < lim; c++) { s += exp(xs[xb + c] - mx); }\n    let inv = 1.0 / s;\n    for (var c = 0u; c < lim; c++) { ys[yb + c] = exp(xs[xb + c] - mx) * inv; }\n    for (var c = lim; c < p.len; c++) { ys[yb + c] = 0.0; }"
            }
            RowOp::LogSoftmax => {
                "    var mx = xs[xb];\n    for (var c = 1u; c < p.len; c++) { mx = max(mx, xs[xb + c]); }\n    var s = 0.0;\n    for (var c = 0u; c < p.len; c++) { s += exp(xs[xb + c] - mx); }\n    let lse = mx + log(s);\n    for (var c = 0u; c < p.len; c++) { ys[yb + c] = xs[xb + c] - lse; }"
            }
            RowOp::L2Norm(_) => {
                "    var s = 0.0;\n    for (var c = 0u; c < p.len; c++) { let v = xs[xb + c]; s += v * v; }\n    let inv = 1.0 / max(sqrt(s), p.eps);\n    for (var c = 0u; c < p.len; c++) { ys[yb + c] = xs[xb + c] * inv; }"
            }
            RowOp::LnStats(_) => {
                "    var s = 0.0;\n    for (var c = 0u; c < p.len; c++) { s += xs[xb + c]; }\n    let mean = s / f32(p.len);\n    var v = 0.0;\n    for (var c = 0u; c < p.len; c++) { let d = xs[xb + c] - mean; v += d * d; }\n    ys[yb] = mean;\n    ys[yb + 1u] = inverseSqrt(v / f32(p.len) + p.eps);"
            }
        }
    }
}

/// Applies a row op to `rows` rows of `len` elements, splitting rows to fit bindings.
pub fn rows(
    op: RowOp,
    x: View,
    rows: usize,
    len: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let out_len = if matches!(op, RowOp::LnStats(_)) {
        2
    } else {
        len
    };
    let per_row = len.max(out_len) as u64;
    let chunks = super::row_chunks(rows as u64, per_row, caps, op.name())?;
    let vec_body = match op {
        RowOp::Softmax => Some(
            "    var mv = xs[xb];\n    for (var c = 1u; c < p.len; c++) { mv = max(mv, xs[xb + c]); }\n    let mx = max(max(mv.x, mv.y), max(mv.z, mv.w));\n    var s = vec4<f32>(0.0);\n    for (var c = 0u; c < p.len; c++) { s += exp(xs[xb + c] - mx); }\n    let inv = 1.0 / dot(s, vec4<f32>(1.0));\n    for (var c = 0u; c < p.len; c++) { ys[yb + c] = exp(xs[xb + c] - mx) * inv; }",
        ),
        RowOp::LnStats(_) => Some(
            "    var s = vec4<f32>(0.0);\n    for (var c = 0u; c < p.len; c++) { s += xs[xb + c]; }\n    let n = f32(p.len * 4u);\n    let mean = dot(s, vec4<f32>(1.0)) / n;\n    var v = vec4<f32>(0.0);\n    for (var c = 0u; c < p.len; c++) { let d = xs[xb + c] - mean; v += d * d; }\n    ys[yb] = mean;\n    ys[yb + 1u] = inverseSqrt(dot(v, vec4<f32>(1.0)) / n + p.eps);",
        ),
        _ => None,
    }
    .filter(|_| len.is_multiple_of(4));
    let mut out = Vec::new();
    for (r0, nr) in chunks {
        if nr == 0 {
            continue;
        }
        let (bx, ox) = super::bind(&x, r0 * len as u64, nr * len as u64, caps, "row op input")?;
        let (by, oy) = super::bind(
            &y,
            r0 * out_len as u64,
            nr * out_len as u64,
            caps,
            "row op output",
        )?;
        // vec4 form: x always, y too unless the output is the [rows, 2] statistics.
        let y_vec = !matches!(op, RowOp::LnStats(_));
        let vec = vec_body.is_some()
            && ox.is_multiple_of(4)
            && (!y_vec || (oy.is_multiple_of(4) && out_len.is_multiple_of(4)));
        let (body, xd, yd) = match vec_body {
            Some(b) if vec => (b, 4, if y_vec { 4 } else { 1 }),
            _ => (op.body(), 1, 1),
        };
        let ty = |d: u32| super::elem_ty(d == 4).to_string();
        out.push(Dispatch {
            key: format!("rows_{}{}", op.name(), if xd == 4 { "_v4" } else { "" }),
            template: "rows",
            subst: vec![("BODY", body.into()), ("TX", ty(xd)), ("TY", ty(yd))],
            uniform: uniform(&[
                nr as u32,
                len as u32 / xd,
                ox / xd,
                oy / yd,
                out_len as u32 / yd,
                op.eps().to_bits(),
                r0 as u32,
                0,
            ]),
            bindings: vec![bx, by],
            groups: grid(nr.div_ceil(64), caps)?,
        });
    }
    Ok(out)
}

/// Backward of a row op: `a` is y (softmax, log-softmax) or x (L2-normalize), `dy` the
/// upstream gradient; writes dx.
pub fn row_grad(
    op: RowOp,
    a: View,
    dy: View,
    rows: usize,
    len: usize,
    dx: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let body = match op {
        // Masked probabilities are 0, so the plain softmax rule gives them 0 gradient.
        RowOp::Softmax | RowOp::CausalSoftmax => {
            "    var s = 0.0;\n    for (var c = 0u; c < p.len; c++) { s += as_[ab + c] * bs[bb + c]; }\n    for (var c = 0u; c < p.len; c++) { ys[yb + c] = as_[ab + c] * (bs[bb + c] - s); }"
        }
        RowOp::LogSoftmax => {
            "    var s = 0.0;\n    for (var c = 0u; c < p.len; c++) { s += bs[bb + c]; }\n    for (var c = 0u; c < p.len; c++) { ys[yb + c] = bs[bb + c] - exp(as_[ab + c]) * s; }"
        }
        RowOp::L2Norm(_) => {
            "    var s = 0.0;\n    for (var c = 0u; c < p.len; c++) { let v = as_[ab + c]; s += v * v; }\n    let nrm = sqrt(s);\n    if (nrm > p.eps) {\n        var d = 0.0;\n        for (var c = 0u; c < p.len; c++) { d += as_[ab + c] * bs[bb + c]; }\n        let inv = 1.0 / nrm;\n        for (var c = 0u; c < p.len; c++) { ys[yb + c] = (bs[bb + c] - as_[ab + c] * d * inv * inv) * inv; }\n    } else {\n        for (var c = 0u; c < p.len; c++) { ys[yb + c] = bs[bb + c] / p.eps; }\n    }"
        }
        RowOp::LnStats(_) => {
            return Err(crate::Error::Graph("LayerNorm statistics have no row gradient kernel; use ln_grad".into()))
        }
    };
    let chunks = super::row_chunks(rows as u64, len as u64, caps, "row gradient")?;
    let mut out = Vec::new();
    for (r0, nr) in chunks {
        if nr == 0 {
            continue;
        }
        let s = r0 * len as u64;
        let c = nr * len as u64;
        let (ba, oa) = super::bind(&a, s, c, caps, "row gradient input")?;
        let (bb, ob) = super::bind(&dy, s, c, caps, "row gradient dy")?;
        let (by, oy) = super::bind(&dx, s, c, caps, "row gradient output")?;
        // Softmax rows of a multiple of 4 (attention scores) take a vec4 body.
        let vec = matches!(op, RowOp::Softmax | RowOp::CausalSoftmax)
            && super::vec4_ok(len as u64, &[oa, ob, oy]);
        let d = if vec { 4 } else { 1 };
        let body = if vec {
            "    var s4 = vec4<f32>(0.0);\n    for (var c = 0u; c < p.len; c++) { s4 += as_[ab + c] * bs[bb + c]; }\n    let s = dot(s4, vec4<f32>(1.0));\n    for (var c = 0u; c < p.len; c++) { ys[yb + c] = as_[ab + c] * (bs[bb + c] - s); }"
        } else {
            body
        };
        out.push(Dispatch {
            key: format!("row_grad_{}{}", op.name(), if vec { "_v4" } else { "" }),
            template: "row_grad",
            subst: vec![("BODY", body.into()), ("TY", super::elem_ty(vec).into())],
            uniform: uniform(&[
                nr as u32,
                len as u32 / d,
                oa / d,
                ob / d,
                oy / d,
                0,
                op.eps().to_bits(),
                0,
            ]),
            bindings: vec![ba, bb, by],
            groups: grid(nr.div_ceil(64), caps)?,
        });
    }
    Ok(out)
}

/// Per-row softmax cross-entropy loss `y[r]` of logits [rows, len] against u32 labels.
pub fn cross_entropy(
    x: View,
    labels: View,
    rows: usize,
    len: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "logits")?;
    let (bl, ol) = bind_all(&labels, caps, "labels")?;
    let (by, oy) = bind_all(&y, caps, "loss")?;
    Ok(vec![Dispatch {
        key: "cross_entropy".into(),
        template: "cross_entropy",
        subst: vec![
            ("EXTRA_BINDING", String::new()),
            ("OUT_BINDING", "3".into()),
            (
                "BODY",
                "    ys[p.off_y + r] = mx + log(s) - xs[xb + label];".into(),
            ),
        ],
        uniform: uniform(&[rows as u32, len as u32, ox, ol, 0, oy]),
        bindings: vec![bx, bl, by],
        groups: grid((rows as u64).div_ceil(64), caps)?,
    }])
}

/// Gradient of the per-row cross-entropy w.r.t. the logits, scaled by the upstream `g[r]`.
pub fn cross_entropy_grad(
    x: View,
    labels: View,
    g: View,
    rows: usize,
    len: usize,
    dx: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "logits")?;
    let (bl, ol) = bind_all(&labels, caps, "labels")?;
    let (bg, og) = bind_all(&g, caps, "loss gradient")?;
    let (by, oy) = bind_all(&dx, caps, "logit gradient")?;
    Ok(vec![Dispatch {
        key: "cross_entropy_grad".into(),
        template: "cross_entropy",
        subst: vec![
            ("EXTRA_BINDING", "@group(0) @binding(3) var<storage, read> gs: array<f32>;".into()),
            ("OUT_BINDING", "4".into()),
            (
                "BODY",
                "    for (var c = 0u; c < p.len; c++) {\n        let onehot = select(0.0, 1.0, c == label);\n        ys[p.off_y + r * p.len + c] = gs[p.off_g + r] * (exp(xs[xb + c] - mx) / s - onehot);\n    }"
                    .into(),
            ),
        ],
        uniform: uniform(&[rows as u32, len as u32, ox, ol, og, oy]),
        bindings: vec![bx, bl, bg, by],
        groups: grid((rows as u64).div_ceil(64), caps)?,
    }])
}
