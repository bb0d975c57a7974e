//! LayerNorm and BatchNorm pieces: statistics, apply, and the backward kernels. LayerNorm
//! statistics are per row ([rows, 2]); BatchNorm statistics are per (group, column)
//! ([groups, 2, cols]) so that per-view BatchNorm is one launch.

use super::{bind_all, grid, uniform, Dispatch, View, WG_1D};
use crate::error::Result;
use crate::gpu::Caps;

/// Which statistics layout a kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stats {
    /// LayerNorm: per row.
    Row,
    /// BatchNorm: per (group, column).
    Col,
}

/// BatchNorm batch statistics of x viewed as [groups, rows, cols].
pub fn bn_stats(
    x: View,
    groups: usize,
    rows: usize,
    cols: usize,
    eps: f32,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "batchnorm input")?;
    let (by, oy) = bind_all(&y, caps, "batchnorm statistics")?;
    Ok(vec![Dispatch {
        key: "col_stats".into(),
        template: "col_stats",
        subst: vec![],
        uniform: uniform(&[
            groups as u32,
            rows as u32,
            cols as u32,
            ox,
            oy,
            0,
            eps.to_bits(),
            0,
        ]),
        bindings: vec![bx, by],
        groups: grid(((groups * cols) as u64).div_ceil(64), caps)?,
    }])
}

/// GroupNorm statistics of x [n, c, hw] in `groups` groups: [n * groups, 2] (mean, rstd).
pub fn group_stats(
    x: View,
    dims: [usize; 3],
    groups: usize,
    eps: f32,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let [n, c, hw] = dims;
    let (rows, len) = (n * groups, c / groups * hw);
    let (bx, ox) = bind_all(&x, caps, "groupnorm input")?;
    let (by, oy) = bind_all(&y, caps, "groupnorm statistics")?;
    let vec = super::vec4_ok(len as u64, &[ox]);
    let w = if vec { 4 } else { 1 };
    Ok(vec![Dispatch {
        key: format!("group_stats{}_{}", if vec { "_v4" } else { "" }, len / w),
        template: "group_stats",
        subst: vec![
            ("TY", super::elem_ty(vec).into()),
            ("UNITS", (len / w).to_string()),
            (
                "HSUM",
                if vec {
                    "    return v.x + v.y + v.z + v.w;"
                } else {
                    "    return v;"
                }
                .into(),
            ),
            ("PIVOT", if vec { "xs[base].x" } else { "xs[base]" }.into()),
        ],
        uniform: uniform(&[
            rows as u32,
            len as u32,
            ox / w as u32,
            oy,
            eps.to_bits(),
            0,
            0,
            0,
        ]),
        bindings: vec![bx, by],
        groups: grid(rows as u64, caps)?,
    }])
}

/// GroupNorm apply: y = (x - mean) * rstd * gamma[c] + beta[c] over x [n, c, hw], with the
/// statistics of [`group_stats`], then SiLU when `silu`.
#[allow(clippy::too_many_arguments)]
pub fn group_apply(
    x: View,
    stats: View,
    gamma: View,
    beta: View,
    dims: [usize; 3],
    groups: usize,
    silu: bool,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let [n, c, hw] = dims;
    let (bx, ox) = bind_all(&x, caps, "groupnorm input")?;
    let (bs, os) = bind_all(&stats, caps, "groupnorm statistics")?;
    let (bg, og) = bind_all(&gamma, caps, "groupnorm weight")?;
    let (bb, ob) = bind_all(&beta, caps, "groupnorm bias")?;
    let (by, oy) = bind_all(&y, caps, "groupnorm output")?;
    let vec = super::vec4_ok(hw as u64, &[ox, oy]);
    let w = if vec { 4 } else { 1 };
    let units = n * c * hw / w;
    Ok(vec![Dispatch {
        key: format!(
            "group_apply{}{}_{}x{c}g{groups}",
            if vec { "_v4" } else { "" },
            if silu { "_silu" } else { "" },
            hw / w
        ),
        template: "group_apply",
        subst: vec![
            ("TY", super::elem_ty(vec).into()),
            ("HWU", (hw / w).to_string()),
            ("C", c.to_string()),
            ("CG", (c / groups).to_string()),
            (
                "SILU",
                if silu {
                    "    y = y / (1.0 + exp(-y));".into()
                } else {
                    String::new()
                },
            ),
        ],
        uniform: uniform(&[units as u32, ox / w as u32, os, og, ob, oy / w as u32, 0, 0]),
        bindings: vec![bx, bs, bg, bb, by],
        groups: grid((units as u64).div_ceil(WG_1D as u64), caps)?,
    }])
}

/// y = (x - mean) * rstd * gamma + beta with row or column statistics.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    stats_kind: Stats,
    x: View,
    stats: View,
    gamma: View,
    beta: View,
    groups: usize,
    rows: usize,
    cols: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "norm input")?;
    let (bs, os) = bind_all(&stats, caps, "norm statistics")?;
    let (bg, og) = bind_all(&gamma, caps, "norm weight")?;
    let (bb, ob) = bind_all(&beta, caps, "norm bias")?;
    let (by, oy) = bind_all(&y, caps, "norm output")?;
    // vec4 form (4 columns per invocation) when rows and the offsets align.
    let vec = super::vec4_ok(cols as u64, &[ox, og, ob, oy]);
    let w = if vec { 4 } else { 1 };
    let col_stat = |k: &str| {
        if vec {
            let e: Vec<String> = (0..4)
                .map(|q| format!("stats[p.off_s + g * 2u * p.cols + {k}c + {q}u]"))
                .collect();
            format!("vec4<f32>({})", e.join(", "))
        } else {
            format!("stats[p.off_s + g * 2u * p.cols + {k}c]")
        }
    };
    let code = match stats_kind {
        Stats::Row => "    let mean = stats[p.off_s + 2u * row];\n    let rstd = stats[p.off_s + 2u * row + 1u];".to_string(),
        Stats::Col => format!(
            "    let mean = {};\n    let rstd = {};",
            col_stat(""),
            col_stat("p.cols + ")
        ),
    };
    let units = cols / w;
    Ok(vec![Dispatch {
        // Sizes as constants: the per-element divisions become multiply-shifts.
        key: format!(
            "norm_apply_{stats_kind:?}{}_{rows}x{cols}",
            if vec { "_v4" } else { "" }
        )
        .to_lowercase(),
        template: "norm_apply",
        subst: vec![
            ("STATS", code),
            ("ROWS", rows.to_string()),
            ("UNITS", units.to_string()),
            ("W", w.to_string()),
            ("TY", super::elem_ty(vec).into()),
        ],
        uniform: uniform(&[
            groups as u32,
            rows as u32,
            cols as u32,
            ox / w as u32,
            os,
            og / w as u32,
            ob / w as u32,
            oy / w as u32,
        ]),
        bindings: vec![bx, bs, bg, bb, by],
        groups: grid(
            ((groups * rows * units) as u64).div_ceil(WG_1D as u64),
            caps,
        )?,
    }])
}

/// LayerNorm forward in one dispatch (per row chunk that fits the bindings): the row
/// statistics [rows, 2] (as `reduce::rows` with `RowOp::LnStats` writes them, for the
/// backward) and y = (x - mean) * rstd * gamma + beta, one invocation per row. The same
/// expressions in the same order as the statistics row op followed by [`apply`], so the
/// result equals the two-kernel form; the planner uses it where dispatches, not the apply's
/// parallelism, are the cost (`graph::memory`, step 2d). Where x's rows are vec4-aligned but
/// y's, gamma's or beta's are not, it returns the two kernels instead (the row op would sum
/// in vec4 order, this kernel could not).
#[allow(clippy::too_many_arguments)]
pub fn ln_forward(
    x: View,
    stats: View,
    gamma: View,
    beta: View,
    rows: usize,
    len: usize,
    eps: f32,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bg, og) = bind_all(&gamma, caps, "layer norm weight")?;
    let (bb, ob) = bind_all(&beta, caps, "layer norm bias")?;
    // Rows per chunk as `reduce::rows` splits them (the statistics need 2 per row).
    let chunks = super::row_chunks(rows as u64, len.max(2) as u64, caps, "layer norm")?;
    let mut out = Vec::new();
    for (r0, nr) in chunks {
        if nr == 0 {
            continue;
        }
        let (bx, ox) = super::bind(
            &x,
            r0 * len as u64,
            nr * len as u64,
            caps,
            "layer norm input",
        )?;
        let (bs, os) = super::bind(&stats, r0 * 2, nr * 2, caps, "layer norm statistics")?;
        let (by, oy) = super::bind(
            &y,
            r0 * len as u64,
            nr * len as u64,
            caps,
            "layer norm output",
        )?;
        let vec = super::vec4_ok(len as u64, &[ox, og, ob, oy]);
        // The statistics row op sums in vec4 order whenever x alone is aligned; where the
        // others are not, one kernel cannot do both, and the two-kernel form keeps the sums.
        if !vec && super::vec4_ok(len as u64, &[ox]) {
            let mut two = super::reduce::rows(
                super::reduce::RowOp::LnStats(eps),
                x,
                rows,
                len,
                stats,
                caps,
            )?;
            two.extend(apply(
                Stats::Row,
                x,
                stats,
                gamma,
                beta,
                1,
                rows,
                len,
                y,
                caps,
            )?);
            return Ok(two);
        }
        let w = if vec { 4 } else { 1 };
        let sum = |k: &str| {
            if vec {
                format!("dot({k}, vec4<f32>(1.0))")
            } else {
                k.to_string()
            }
        };
        out.push(Dispatch {
            key: format!("ln_forward{}", if vec { "_v4" } else { "" }),
            template: "ln_forward",
            subst: vec![
                ("TY", super::elem_ty(vec).into()),
                ("N", if vec { "p.len * 4u" } else { "p.len" }.into()),
                ("SUM_S", sum("s")),
                ("SUM_V", sum("v")),
            ],
            uniform: uniform(&[
                nr as u32,
                (len / w) as u32,
                ox / w as u32,
                os,
                og / w as u32,
                ob / w as u32,
                oy / w as u32,
                eps.to_bits(),
            ]),
            bindings: vec![bx, bs, bg, bb, by],
            groups: grid(nr.div_ceil(64), caps)?,
        });
    }
    Ok(out)
}

/// Column sums [groups, 2, cols] of dy * xhat and dy (LayerNorm gamma/beta gradients with row
/// statistics, BatchNorm backward sums with column statistics).
#[allow(clippy::too_many_arguments)]
pub fn col_grad(
    stats_kind: Stats,
    x: View,
    stats: View,
    dy: View,
    groups: usize,
    rows: usize,
    cols: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "norm input")?;
    let (bs, os) = bind_all(&stats, caps, "norm statistics")?;
    let (bd, od) = bind_all(&dy, caps, "norm gradient")?;
    let (by, oy) = bind_all(&y, caps, "norm column sums")?;
    // vec4 form (4 columns per invocation) when the columns and offsets align.
    let vec = super::vec4_ok(cols as u64, &[ox, od, oy]);
    let w = if vec { 4 } else { 1 };
    let col_stat = |k: usize| {
        let at = |q: usize| format!("stats[p.off_s + g * {} + {k} + c + {q}u]", 2 * cols);
        if vec {
            format!("vec4<f32>({}, {}, {}, {})", at(0), at(1), at(2), at(3))
        } else {
            at(0)
        }
    };
    let xhat = match stats_kind {
        Stats::Row => {
            "(x - stats[p.off_s + 2u * row]) * stats[p.off_s + 2u * row + 1u]".to_string()
        }
        Stats::Col => format!("(x - {}) * {}", col_stat(0), col_stat(cols)),
    };
    Ok(vec![Dispatch {
        key: format!(
            "col_grad_{stats_kind:?}{}_{cols}",
            if vec { "_v4" } else { "" }
        )
        .to_lowercase(),
        template: "col_grad",
        subst: vec![
            ("XHAT", xhat),
            ("TY", super::elem_ty(vec).into()),
            ("W", w.to_string()),
        ],
        uniform: uniform(&[
            groups as u32,
            rows as u32,
            (cols / w) as u32,
            ox / w as u32,
            os,
            od / w as u32,
            oy / w as u32,
            0,
        ]),
        bindings: vec![bx, bs, bd, by],
        groups: grid(((groups * cols / w) as u64).div_ceil(64), caps)?,
    }])
}

/// LayerNorm input gradient.
#[allow(clippy::too_many_arguments)]
pub fn ln_grad(
    x: View,
    stats: View,
    gamma: View,
    dy: View,
    rows: usize,
    cols: usize,
    dx: View,
    res: Option<View>,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "layernorm input")?;
    let (bs, os) = bind_all(&stats, caps, "layernorm statistics")?;
    let (bg, og) = bind_all(&gamma, caps, "layernorm weight")?;
    let (bd, od) = bind_all(&dy, caps, "layernorm gradient")?;
    let (by, oy) = bind_all(&dx, caps, "layernorm input gradient")?;
    let r = res
        .map(|v| bind_all(&v, caps, "layernorm residual gradient"))
        .transpose()?;
    let mut offs = vec![ox, og, od, oy];
    offs.extend(r.map(|(_, o)| o));
    let vec = super::vec4_ok(cols as u64, &offs);
    let w = if vec { 4 } else { 1 };
    let ty = super::elem_ty(vec);
    let mut bindings = vec![bx, bs, bg, bd, by];
    let (res_binding, res_expr) = match r {
        Some((b, _)) => {
            bindings.push(b);
            (
                format!("@group(0) @binding(6) var<storage, read> res: array<{ty}>;"),
                " + res[p.off_r + r * p.len + c]".to_string(),
            )
        }
        None => (String::new(), String::new()),
    };
    Ok(vec![Dispatch {
        key: format!(
            "ln_grad{}{}",
            if vec { "_v4" } else { "" },
            if r.is_some() { "_res" } else { "" }
        ),
        template: "ln_grad",
        subst: vec![
            ("TY", ty.into()),
            ("W", w.to_string()),
            (
                "TOTAL",
                if vec { "dot(v, vec4<f32>(1.0))" } else { "v" }.into(),
            ),
            ("RES_BINDING", res_binding),
            ("RES", res_expr),
        ],
        uniform: uniform(&[
            rows as u32,
            (cols / w) as u32,
            ox / w as u32,
            os,
            og / w as u32,
            od / w as u32,
            oy / w as u32,
            r.map_or(0, |(_, o)| o / w as u32),
        ]),
        bindings,
        groups: grid((rows as u64).div_ceil(64), caps)?,
    }])
}

/// BatchNorm input gradient from the column sums of [`col_grad`].
#[allow(clippy::too_many_arguments)]
pub fn bn_grad(
    x: View,
    stats: View,
    gamma: View,
    sums: View,
    dy: View,
    groups: usize,
    rows: usize,
    cols: usize,
    dx: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bx, ox) = bind_all(&x, caps, "batchnorm input")?;
    let (bs, os) = bind_all(&stats, caps, "batchnorm statistics")?;
    let (bg, og) = bind_all(&gamma, caps, "batchnorm weight")?;
    let (bu, ou) = bind_all(&sums, caps, "batchnorm sums")?;
    let (bd, od) = bind_all(&dy, caps, "batchnorm gradient")?;
    let (by, oy) = bind_all(&dx, caps, "batchnorm input gradient")?;
    Ok(vec![Dispatch {
        key: "bn_grad".into(),
        template: "bn_grad",
        subst: vec![],
        uniform: uniform(&[
            groups as u32,
            rows as u32,
            cols as u32,
            ox,
            os,
            og,
            ou,
            od,
            oy,
        ]),
        bindings: vec![bx, bs, bg, bu, bd, by],
        groups: grid(((groups * rows * cols) as u64).div_ceil(WG_1D as u64), caps)?,
    }])
}

/// In-place update of BatchNorm running mean/var from batch statistics [groups, 2, cols]
/// (applied group after group, unbiased variance, PyTorch's momentum convention).
#[allow(clippy::too_many_arguments)]
pub fn bn_running(
    rmean: View,
    rvar: View,
    stats: View,
    groups: usize,
    rows: usize,
    cols: usize,
    momentum: f32,
    eps: f32,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (bm, om) = bind_all(&rmean, caps, "running mean")?;
    let (bv, ov) = bind_all(&rvar, caps, "running var")?;
    let (bs, os) = bind_all(&stats, caps, "batchnorm statistics")?;
    Ok(vec![Dispatch {
        key: "bn_running".into(),
        template: "bn_running",
        subst: vec![],
        uniform: uniform(&[
            groups as u32,
            rows as u32,
            cols as u32,
            om,
            ov,
            os,
            momentum.to_bits(),
            eps.to_bits(),
        ]),
        bindings: vec![bm, bv, bs],
        groups: grid((cols as u64).div_ceil(64), caps)?,
    }])
}
