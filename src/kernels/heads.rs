//! Multi-head self-attention read straight from the fused qkv projection (`[B * T, 3 * H *
//! Dh]`, columns `[3][H][Dh]`) and written in the rows the output projection reads (`[B * T,
//! H * Dh]`): forward, the backward's row statistics, and the backward itself, each one
//! dispatch (see `shaders/head_attention.wgsl`). This replaces, per block, the head split and
//! merge copies, the two score matmuls, the scaling and the softmax of the unfused form, and
//! in the backward their eight gradient kernels.

use super::{bind_all, grid, uniform, vec4_ok, Binding, Dispatch, View, LOOP_CHUNK};
use crate::error::{Error, Result};
use crate::gpu::Caps;

/// The geometry of one multi-head self-attention: sequences of `tokens` rows, `heads` heads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heads {
    /// Tokens per sequence (T); rows are sequence-major.
    pub tokens: usize,
    /// Heads (H).
    pub heads: usize,
    /// Score scale (usually Dh^-1/2).
    pub scale: f32,
    /// Query t sees keys 0..=t only.
    pub causal: bool,
}

/// The most registers of one head row (Dh / 4 vec4s, or Dh scalars when a width or offset
/// is not a multiple of 4) the unrolled kernels hold; wider rows are refused.
pub const MAX_CHUNKS: usize = 64;

/// Whether the fused kernels take a head width of `dh` in either register form (so whatever
/// the offsets: at most [`MAX_CHUNKS`]) and `tokens` per sequence (their loops run at most
/// [`LOOP_CHUNK`] iterations).
pub fn fits(dh: usize, tokens: usize) -> bool {
    dh > 0 && dh <= MAX_CHUNKS && tokens <= LOOP_CHUNK
}

/// (vector width, registers per head row) for head width `dh`, vec4 when `vec_ok`.
fn chunks(dh: usize, vec_ok: bool) -> (usize, usize) {
    if vec_ok && dh.is_multiple_of(4) {
        (4, dh / 4)
    } else {
        (1, dh)
    }
}

/// What one launch computes.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Forward,
    Stats,
    Grad,
}

/// Builds one launch. `views`: forward (qkv, y); stats (qkv, y, dy, stats); grad (qkv, dy,
/// stats, dqkv).
fn launch(
    mode: Mode,
    h: &Heads,
    rows: usize,
    d: usize,
    views: &[View],
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let (t, nh) = (h.tokens, h.heads);
    if t > LOOP_CHUNK {
        return Err(Error::shape(
            "head attention",
            format!("{t} tokens (the fused kernels loop over at most {LOOP_CHUNK})"),
        ));
    }
    if t == 0 || nh == 0 || !rows.is_multiple_of(t) || !d.is_multiple_of(nh) || d == 0 {
        return Err(Error::shape(
            "head attention",
            format!("{rows} rows of width {d} for {t} tokens and {nh} heads"),
        ));
    }
    let dh = d / nh;
    if views.iter().any(|v| v.half) {
        return Err(Error::Config(
            "head attention: f16 activations are not supported by the fused kernels".into(),
        ));
    }
    let what = ["qkv", "second operand", "third operand", "output"];
    let mut binds: Vec<Binding> = Vec::new();
    let mut offs: Vec<u32> = Vec::new();
    for (k, v) in views.iter().enumerate() {
        let (b, o) = bind_all(v, caps, &format!("head attention {}", what[k.min(3)]))?;
        binds.push(b);
        offs.push(o);
    }
    // Statistics are f32 pairs whatever the vector width; every other operand must align.
    let stats_at = match mode {
        Mode::Forward => None,
        Mode::Stats => Some(3),
        Mode::Grad => Some(2),
    };
    let vec_offs: Vec<u32> = offs
        .iter()
        .enumerate()
        .filter(|(k, _)| Some(*k) != stats_at)
        .map(|(_, o)| *o)
        .collect();
    let (w, c) = chunks(dh, vec4_ok(dh as u64, &vec_offs));
    if c > MAX_CHUNKS {
        return Err(Error::shape(
            "head attention",
            format!(
                "head width {dh} at unaligned offsets ({c} scalar registers per head row; the fused kernels hold at most {MAX_CHUNKS})"
            ),
        ));
    }
    let ty = if w == 4 { "vec4<f32>" } else { "f32" };
    let div = |k: usize| {
        if Some(k) == stats_at {
            offs[k]
        } else {
            offs[k] / w as u32
        }
    };
    let n = rows / t * nh * t;
    let groups = n.div_ceil(64) as u64;
    let (body, bindings, nq, total) = match mode {
        Mode::Forward => (
            forward_body(c, w, h.causal),
            bindings_src(&[("qkv", ty, false), ("out", ty, true)]),
            u32::MAX,
            groups,
        ),
        Mode::Stats => (
            stats_body(c, w, h.causal),
            bindings_src(&[
                ("qkv", ty, false),
                ("ys", ty, false),
                ("dys", ty, false),
                ("out", "f32", true),
            ]),
            u32::MAX,
            groups,
        ),
        Mode::Grad => (
            grad_body(c, w, h.causal),
            bindings_src(&[
                ("qkv", ty, false),
                ("dys", ty, false),
                ("sts", "f32", false),
                ("out", ty, true),
            ]),
            groups as u32,
            2 * groups,
        ),
    };
    // Offsets: qkv, then (a, b, out) by mode.
    let (off_a, off_b, off_out) = match mode {
        Mode::Forward => (0, 0, div(1)),
        Mode::Stats => (div(1), div(2), div(3)),
        Mode::Grad => (div(1), div(2), div(3)),
    };
    let name = match mode {
        Mode::Forward => "fwd",
        Mode::Stats => "stats",
        Mode::Grad => "grad",
    };
    let causal = if h.causal { "_causal" } else { "" };
    let v4 = if w == 4 { "_v4" } else { "" };
    Ok(vec![Dispatch {
        key: format!("head_attention_{name}_dh{dh}{causal}{v4}"),
        template: "head_attention",
        subst: vec![("C", c.to_string()), ("BINDINGS", bindings), ("BODY", body)],
        uniform: uniform(&[
            n as u32,
            t as u32,
            nh as u32,
            (3 * d / w) as u32,
            (d / w) as u32,
            div(0),
            off_a,
            off_b,
            off_out,
            nq,
            h.scale.to_bits(),
            0,
        ]),
        bindings: binds,
        groups: grid(total, caps)?,
    }])
}

/// Forward: qkv [rows, 3 d] -> y [rows, d].
pub fn forward(h: &Heads, qkv: View, y: View, rows: usize, caps: &Caps) -> Result<Vec<Dispatch>> {
    let d = width(&qkv, rows)?;
    launch(Mode::Forward, h, rows, d, &[qkv, y], caps)
}

/// The backward's row statistics: (qkv, y, dy) -> [rows * heads, 2] of (lse, dy . y).
pub fn stats(
    h: &Heads,
    qkv: View,
    y: View,
    dy: View,
    st: View,
    rows: usize,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let d = width(&qkv, rows)?;
    launch(Mode::Stats, h, rows, d, &[qkv, y, dy, st], caps)
}

/// The backward: (qkv, dy, stats) -> dqkv [rows, 3 d].
pub fn grad(
    h: &Heads,
    qkv: View,
    dy: View,
    st: View,
    dqkv: View,
    rows: usize,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let d = width(&qkv, rows)?;
    launch(Mode::Grad, h, rows, d, &[qkv, dy, st, dqkv], caps)
}

/// The model width d from qkv's `rows x 3 d` elements.
fn width(qkv: &View, rows: usize) -> Result<usize> {
    let n = qkv.len as usize;
    if rows == 0 || !n.is_multiple_of(rows) || !(n / rows).is_multiple_of(3) {
        return Err(Error::shape(
            "head attention",
            format!("{n} qkv elements are not {rows} rows of 3 x width"),
        ));
    }
    Ok(n / rows / 3)
}

fn bindings_src(list: &[(&str, &str, bool)]) -> String {
    list.iter()
        .enumerate()
        .map(|(k, (name, ty, rw))| {
            let access = if *rw { "read_write" } else { "read" };
            format!(
                "@group(0) @binding({}) var<storage, {access}> {name}: array<{ty}>;\n",
                k + 1
            )
        })
        .collect()
}

/// `sum_c dot(a{c}, b{c})` (or products for scalars).
fn dot(a: &str, b: &str, c: usize, w: usize) -> String {
    (0..c)
        .map(|i| {
            if w == 4 {
                format!("dot({a}{i}, {b}{i})")
            } else {
                format!("{a}{i} * {b}{i}")
            }
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

/// `let {name}{c} = {arr}[{base} + c];` for every register, times `mul` when given.
fn load(name: &str, arr: &str, base: &str, c: usize, mul: &str) -> String {
    (0..c)
        .map(|i| format!("    let {name}{i} = {arr}[{base} + {i}u]{mul};\n"))
        .collect()
}

/// [`load`] inside a loop body (one more indent).
fn load_in_loop(name: &str, arr: &str, base: &str, c: usize) -> String {
    indent(&load(name, arr, base, c, ""))
}

/// The scaled query, the running max and sum, and the head of the key loop up to the score
/// `sc` and the new max `mn` (shared by the forward and the statistics).
fn online_softmax_head(c: usize, w: usize, causal: bool) -> String {
    let mut s = load("q", "qkv", "seq + t * p.row", c, " * p.scale");
    s += "    var m = -3.0e38;\n    var l = 0.0;\n";
    s += &format!(
        "    for (var j = 0u; j < {}; j++) {{\n        let kr = seq + j * p.row + p.d;\n",
        keys_end(causal)
    );
    s += &load_in_loop("k", "qkv", "kr", c);
    s += &format!(
        "        let sc = {};\n        let mn = max(m, sc);\n",
        dot("q", "k", c, w)
    );
    s
}

fn zeros(name: &str, c: usize, w: usize) -> String {
    let z = if w == 4 { "vec4<f32>(0.0)" } else { "0.0" };
    (0..c)
        .map(|i| format!("    var {name}{i} = {z};\n"))
        .collect()
}

/// The key loop's end for query t.
fn keys_end(causal: bool) -> &'static str {
    if causal {
        "t + 1u"
    } else {
        "p.tokens"
    }
}

fn forward_body(c: usize, w: usize, causal: bool) -> String {
    let mut s = zeros("a", c, w);
    s += &online_softmax_head(c, w, causal);
    s += "        let cf = exp(m - mn);\n        let e = exp(sc - mn);\n        l = l * cf + e;\n        m = mn;\n        let vr = kr + p.d;\n";
    for i in 0..c {
        s += &format!("        a{i} = a{i} * cf + e * qkv[vr + {i}u];\n");
    }
    s += "    }\n    let inv = 1.0 / l;\n    let ob = p.off_out + orow;\n";
    for i in 0..c {
        s += &format!("    out[ob + {i}u] = a{i} * inv;\n");
    }
    s
}

fn stats_body(c: usize, w: usize, causal: bool) -> String {
    let mut s = online_softmax_head(c, w, causal);
    s += "        l = l * exp(m - mn) + exp(sc - mn);\n        m = mn;\n    }\n";
    s += &load("y", "ys", "p.off_a + orow", c, "");
    s += &load("g", "dys", "p.off_b + orow", c, "");
    s += &format!(
        "    out[p.off_out + i * 2u] = m + log(l);\n    out[p.off_out + i * 2u + 1u] = {};\n",
        dot("y", "g", c, w)
    );
    s
}

fn grad_body(c: usize, w: usize, causal: bool) -> String {
    // Query rows: dq.
    let mut s = String::from("    if (!key_side) {\n");
    let mut q = load("q", "qkv", "seq + t * p.row", c, "");
    q += &load("g", "dys", "p.off_a + orow", c, "");
    q += "    let lse = sts[p.off_b + i * 2u];\n    let dd = sts[p.off_b + i * 2u + 1u];\n";
    q += &zeros("dq", c, w);
    q += &format!(
        "    for (var j = 0u; j < {}; j++) {{\n        let kr = seq + j * p.row + p.d;\n        let vr = kr + p.d;\n",
        keys_end(causal)
    );
    q += &load_in_loop("k", "qkv", "kr", c);
    q += &load_in_loop("v", "qkv", "vr", c);
    q += &format!(
        "        let pj = exp(({}) * p.scale - lse);\n        let ds = pj * ({} - dd);\n",
        dot("q", "k", c, w),
        dot("g", "v", c, w)
    );
    for i in 0..c {
        q += &format!("        dq{i} += ds * k{i};\n");
    }
    q += "    }\n    let qo = p.off_out + seq - p.off_qkv + t * p.row;\n";
    for i in 0..c {
        q += &format!("    out[qo + {i}u] = dq{i} * p.scale;\n");
    }
    s += &indent(&q);
    s += "    } else {\n";
    // Key rows: dk, dv.
    let mut k = load("k", "qkv", "seq + t * p.row + p.d", c, "");
    k += &load("v", "qkv", "seq + t * p.row + 2u * p.d", c, "");
    k += &zeros("dk", c, w);
    k += &zeros("dv", c, w);
    k += "    let sb = p.off_b + bh * p.tokens * 2u;\n";
    k += &format!(
        "    for (var r = {}; r < p.tokens; r++) {{\n        let qr = seq + r * p.row;\n        let gr = p.off_a + (b * p.tokens + r) * p.d + hd * {c}u;\n",
        if causal { "t" } else { "0u" }
    );
    k += &load_in_loop("q", "qkv", "qr", c);
    k += &load_in_loop("g", "dys", "gr", c);
    k += &format!(
        "        let pj = exp(({}) * p.scale - sts[sb + r * 2u]);\n        let ds = pj * ({} - sts[sb + r * 2u + 1u]);\n",
        dot("q", "k", c, w),
        dot("g", "v", c, w)
    );
    for i in 0..c {
        k += &format!("        dv{i} += pj * g{i};\n        dk{i} += ds * q{i};\n");
    }
    k += "    }\n    let ko = p.off_out + seq - p.off_qkv + t * p.row + p.d;\n";
    for i in 0..c {
        k += &format!("    out[ko + {i}u] = dk{i} * p.scale;\n    out[ko + p.d + {i}u] = dv{i};\n");
    }
    s += &indent(&k);
    s += "    }\n";
    s
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
