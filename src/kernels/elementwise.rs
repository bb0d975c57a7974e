//! Elementwise kernels: unary and scalar ops, their gradients, binary ops with broadcasting,
//! and fill. Same-shape launches split into chunks when a tensor exceeds one binding.

use super::expr::build::*;
use super::expr::{Cmp, Expr, Names};
use super::{bind, grid, uniform, vec4_ok, Binding, Dispatch, View, WG_1D};
use crate::error::{Error, Result};
use crate::gpu::Caps;

/// The WGSL helpers the expressions' primitives call (`expr::Prim::wgsl`; WGSL has no erf).
pub const HELPERS: &str = r#"
fn erf_approx(x: f32) -> f32 {
    // Abramowitz & Stegun 7.1.26 refined form (|error| < 1.5e-7).
    let s = sign(x);
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-a * a);
    return s * y;
}
fn sigmoid(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }
fn tanh_safe(x: f32) -> f32 { return tanh(clamp(x, -15.0, 15.0)); }
"#;

/// Operand indices of the binary shader when a, b and c have one shape.
const SAME_INDEX: &str = "    let ia = i;\n    let ib = i;";

/// Operand indices of the binary shader under broadcasting: walk the output's dims.
const BROADCAST_INDEX: &str = "    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let dim = p.shape[d / 4][d % 4];
        let idx = rem % dim;
        rem = rem / dim;
        ia += idx * p.sa[d / 4][d % 4];
        ib += idx * p.sb[d / 4][d % 4];
    }";

/// Unary and scalar ops. Scalar parameters travel in the uniform, so one pipeline serves all
/// values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    /// e^x
    Exp,
    /// ln x
    Log,
    /// sqrt x
    Sqrt,
    /// 1 / sqrt x
    Rsqrt,
    /// max(x, 0)
    Relu,
    /// exact (erf) GELU
    Gelu,
    /// x * sigmoid(1.702 x) (CLIP's QuickGELU)
    QuickGelu,
    /// x * sigmoid(x)
    Silu,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// tanh x
    Tanh,
    /// -x
    Neg,
    /// |x|
    Abs,
    /// x^2
    Square,
    /// 1 / x
    Recip,
    /// alpha * x + beta (scalar add, scale, ...)
    Affine(f32, f32),
    /// x^alpha (x > 0 on the GPU, where WGSL's `pow` is undefined for negative bases)
    Pow(f32),
    /// clamp(x, lo, hi)
    Clamp(f32, f32),
}

impl UnaryOp {
    /// Every op, with representative scalars (tests and the kernel catalog).
    pub fn all() -> Vec<UnaryOp> {
        use UnaryOp::*;
        vec![
            Exp,
            Log,
            Sqrt,
            Rsqrt,
            Relu,
            Gelu,
            QuickGelu,
            Silu,
            Sigmoid,
            Tanh,
            Neg,
            Abs,
            Square,
            Recip,
            Affine(2.0, -1.0),
            Pow(3.0),
            Clamp(-0.5, 0.5),
        ]
    }

    /// Name used in pipeline keys.
    pub fn name(&self) -> &'static str {
        match self {
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::QuickGelu => "quick_gelu",
            UnaryOp::Silu => "silu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Square => "square",
            UnaryOp::Recip => "recip",
            UnaryOp::Affine(..) => "affine",
            UnaryOp::Pow(_) => "pow",
            UnaryOp::Clamp(..) => "clamp",
        }
    }

    /// (alpha, beta) uniform values.
    pub fn scalars(&self) -> (f32, f32) {
        match *self {
            UnaryOp::Affine(a, b) | UnaryOp::Clamp(a, b) => (a, b),
            UnaryOp::Pow(a) => (a, 0.0),
            _ => (0.0, 0.0),
        }
    }

    /// The op's definition: y as an expression in x and the scalars alpha (`Param(0)`) and
    /// beta (`Param(1)`). The kernels' WGSL, the CPU reference and the gradient all come
    /// from it (`expr`).
    pub fn def(&self) -> Expr {
        use super::expr::Prim::*;
        let sig = |u: Expr| call(Sigmoid, u);
        match self {
            UnaryOp::Exp => call(Exp, x()),
            UnaryOp::Log => call(Log, x()),
            UnaryOp::Sqrt => call(Sqrt, x()),
            UnaryOp::Rsqrt => call(Rsqrt, x()),
            UnaryOp::Relu => max(x(), lit(0.0)),
            UnaryOp::Gelu => mul(
                mul(lit(0.5), x()),
                add(
                    lit(1.0),
                    call(Erf, mul(x(), lit(std::f64::consts::FRAC_1_SQRT_2))),
                ),
            ),
            UnaryOp::QuickGelu => mul(x(), sig(mul(lit(1.702), x()))),
            UnaryOp::Silu => mul(x(), sig(x())),
            UnaryOp::Sigmoid => sig(x()),
            UnaryOp::Tanh => call(Tanh, x()),
            UnaryOp::Neg => neg(x()),
            UnaryOp::Abs => call(Abs, x()),
            UnaryOp::Square => mul(x(), x()),
            UnaryOp::Recip => div(lit(1.0), x()),
            UnaryOp::Affine(..) => add(mul(param(0), x()), param(1)),
            UnaryOp::Pow(_) => pow(x(), param(0)),
            UnaryOp::Clamp(..) => min(max(x(), param(0)), param(1)),
        }
    }

    /// WGSL expression of y in terms of x, with the scalars read from the uniform as
    /// `p.alpha`, `p.beta` (one pipeline serves every value).
    pub fn expr(&self) -> String {
        self.def().wgsl(&Names {
            x: "x",
            y: "y",
            dy: "dy",
            params: None,
        })
    }

    /// WGSL expression of dx in terms of a = x and b = dy, derived from [`UnaryOp::def`]
    /// (the scalars are spliced in as literals since the binary uniform has no scalar slots).
    pub fn grad_expr(&self) -> String {
        let (al, be) = self.scalars();
        self.def().grad().wgsl(&Names {
            x: "a",
            y: "b",
            dy: "b",
            params: Some([al, be]),
        })
    }
}

/// Binary ops (NumPy broadcasting), including the gradients of unary ops (a = x, b = dy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BinaryOp {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a * b
    Mul,
    /// a / b
    Div,
    /// max(a, b)
    Max,
    /// min(a, b)
    Min,
    /// 1 where a == b, else 0
    Eq,
    /// dy * f'(x) for a unary op (a = x, b = dy)
    UnaryGrad(UnaryOp),
}

impl BinaryOp {
    /// Name used in pipeline keys (gradients carry their scalars since they are literals).
    pub fn key(&self) -> String {
        match self {
            BinaryOp::Add => "add".into(),
            BinaryOp::Sub => "sub".into(),
            BinaryOp::Mul => "mul".into(),
            BinaryOp::Div => "div".into(),
            BinaryOp::Max => "max".into(),
            BinaryOp::Min => "min".into(),
            BinaryOp::Eq => "eq".into(),
            BinaryOp::UnaryGrad(u) => {
                let (a, b) = u.scalars();
                format!("{}_grad_{:08x}_{:08x}", u.name(), a.to_bits(), b.to_bits())
            }
        }
    }

    /// The op's definition in x = a and y = b (a unary op's gradient: in x and dy = b).
    pub fn def(&self) -> Expr {
        match self {
            BinaryOp::Add => add(x(), y()),
            BinaryOp::Sub => sub(x(), y()),
            BinaryOp::Mul => mul(x(), y()),
            BinaryOp::Div => div(x(), y()),
            BinaryOp::Max => max(x(), y()),
            BinaryOp::Min => min(x(), y()),
            BinaryOp::Eq => select(x(), Cmp::Eq, y(), lit(1.0), lit(0.0)),
            BinaryOp::UnaryGrad(u) => u.def().grad(),
        }
    }

    /// The scalars [`BinaryOp::def`] reads (a unary op's, for its gradient; else zeros).
    pub fn params(&self) -> [f64; 2] {
        match self {
            BinaryOp::UnaryGrad(u) => {
                let (a, b) = u.scalars();
                [a as f64, b as f64]
            }
            _ => [0.0; 2],
        }
    }

    /// WGSL expression in a and b (scalars as literals).
    pub fn expr(&self) -> String {
        let [al, be] = self.params();
        self.def().wgsl(&Names {
            x: "a",
            y: "b",
            dy: "b",
            params: Some([al as f32, be as f32]),
        })
    }
}

/// Launches over `n` same-shaped elements in chunks that fit one binding: `views[i]` is
/// bound at `[start, start + count)` of itself when `split[i]`, whole otherwise.
pub fn chunked(
    n: u64,
    views: &[View],
    split: &[bool],
    caps: &Caps,
    what: &str,
    mut build: impl FnMut(&[(Binding, u32)], u64, u64) -> Result<Dispatch>,
) -> Result<Vec<Dispatch>> {
    let whole: u64 = views
        .iter()
        .zip(split)
        .filter(|(_, s)| !**s)
        .map(|(v, _)| v.len)
        .max()
        .unwrap_or(0);
    if whole * 4 > caps.max_binding {
        return Err(Error::TooLarge {
            what: format!("{what}: an operand that cannot be split"),
            bytes: whole * 4,
            limit: caps.max_binding,
            limit_name: "max_storage_buffer_binding_size",
        });
    }
    let per = (super::max_bind_elems(caps) / 4 * 4).max(4);
    let mut out = Vec::new();
    let mut start = 0;
    while start < n || (n == 0 && out.is_empty()) {
        let count = per.min(n - start);
        let mut binds = Vec::with_capacity(views.len());
        for (v, &s) in views.iter().zip(split) {
            binds.push(if s {
                bind(v, start, count, caps, what)?
            } else {
                super::bind_all(v, caps, what)?
            });
        }
        if count > 0 {
            out.push(build(&binds, start, count)?);
        }
        start += count;
        if n == 0 {
            break;
        }
    }
    Ok(out)
}

fn f32w(v: f32) -> u32 {
    v.to_bits()
}

/// Type name, apply function and unit divisor for a scalar or vec4 launch.
fn vec_parts(vec: bool) -> (&'static str, &'static str, u32) {
    if vec {
        ("vec4<f32>", "apply4", 4)
    } else {
        ("f32", "apply", 1)
    }
}

/// y = op(x) over `x.len` elements.
pub fn unary(op: UnaryOp, x: View, y: View, caps: &Caps) -> Result<Vec<Dispatch>> {
    if y.len < x.len {
        return Err(Error::shape(op.name(), "output smaller than input"));
    }
    let (al, be) = op.scalars();
    chunked(
        x.len,
        &[x, y],
        &[true, true],
        caps,
        op.name(),
        |b, _, count| {
            let vec = vec4_ok(count, &[b[0].1, b[1].1]);
            let (ty, apply, w) = vec_parts(vec);
            Ok(Dispatch {
                key: format!("unary_{}{}", op.name(), if vec { "_v4" } else { "" }),
                template: "unary",
                subst: vec![
                    ("EXPR", op.expr().to_string()),
                    ("HELPERS", HELPERS.to_string()),
                    ("TY", ty.into()),
                    ("APPLY", apply.into()),
                ],
                uniform: uniform(&[
                    (count / w as u64) as u32,
                    b[0].1 / w,
                    b[1].1 / w,
                    0,
                    f32w(al),
                    f32w(be),
                    0,
                    0,
                ]),
                bindings: vec![b[0].0, b[1].0],
                groups: grid((count / w as u64).div_ceil(WG_1D as u64), caps)?,
            })
        },
    )
}

/// Fills `y` with `value`.
pub fn fill(value: f32, y: View, caps: &Caps) -> Result<Vec<Dispatch>> {
    chunked(y.len, &[y], &[true], caps, "fill", |b, _, count| {
        let vec = vec4_ok(count, &[b[0].1]);
        let (ty, _, w) = vec_parts(vec);
        Ok(Dispatch {
            key: format!("fill{}", if vec { "_v4" } else { "" }),
            template: "fill",
            subst: vec![("TY", ty.into())],
            uniform: uniform(&[
                (count / w as u64) as u32,
                b[0].1 / w,
                0,
                0,
                f32w(value),
                0,
                0,
                0,
            ]),
            bindings: vec![b[0].0],
            groups: grid((count / w as u64).div_ceil(WG_1D as u64), caps)?,
        })
    })
}

/// Most inputs of one [`lincomb`] dispatch.
pub const LINCOMB_MAX: usize = 8;

/// `y = sum_k coef[k] * xs[k]` elementwise, the coefficients read from the first `xs.len()`
/// values of `coef` (a GPU buffer, so they can change without re-preparing). Every view has
/// `y`'s length; `y` must not overlap an input. Splits tensors larger than one binding.
pub fn lincomb(coef: View, xs: &[View], y: View, caps: &Caps) -> Result<Vec<Dispatch>> {
    if xs.is_empty() || xs.len() > LINCOMB_MAX || coef.len < xs.len() as u64 {
        return Err(Error::shape(
            "lincomb",
            format!(
                "{} inputs with {} coefficients (1..={LINCOMB_MAX} inputs)",
                xs.len(),
                coef.len
            ),
        ));
    }
    if let Some(x) = xs.iter().find(|x| x.len != y.len) {
        return Err(Error::shape(
            "lincomb",
            format!("an input has {} values, the output {}", x.len, y.len),
        ));
    }
    let mut views = vec![coef, y];
    views.extend_from_slice(xs);
    let mut split = vec![false, true];
    split.extend(xs.iter().map(|_| true));
    let k = xs.len();
    chunked(y.len, &views, &split, caps, "lincomb", |b, _, count| {
        let offs: Vec<u32> = b[2..].iter().map(|x| x.1).collect();
        let vec = vec4_ok(count, &[&[b[1].1], &offs[..]].concat());
        let (ty, _, w) = vec_parts(vec);
        let inputs: String = (0..k)
            .map(|j| {
                format!(
                    "@group(0) @binding({}) var<storage, read> x{j}: array<{ty}>;\n",
                    3 + j
                )
            })
            .collect();
        let terms: String = (0..k)
            .map(|j| {
                format!(
                    "    acc += coef[p.off_c + {j}u] * x{j}[p.offs[{}][{}] + i];\n",
                    j / 4,
                    j % 4
                )
            })
            .collect();
        let mut words = vec![(count / w as u64) as u32, b[0].1, b[1].1 / w, 0];
        let mut o: Vec<u32> = offs.iter().map(|x| x / w).collect();
        o.resize(8, 0);
        words.extend(o);
        Ok(Dispatch {
            key: format!("lincomb_{k}{}", if vec { "_v4" } else { "" }),
            template: "lincomb",
            subst: vec![("TY", ty.into()), ("INPUTS", inputs), ("TERMS", terms)],
            uniform: uniform(&words),
            bindings: b.iter().map(|x| x.0).collect(),
            groups: grid((count / w as u64).div_ceil(WG_1D as u64), caps)?,
        })
    })
}

/// Row-major element strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Output shape of broadcasting `a` with `b` (NumPy rules), or `None` if incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Strides of `src` as seen from the broadcast output shape `out` (0 on broadcast dims).
pub fn broadcast_strides(src: &[usize], out: &[usize]) -> Vec<usize> {
    let st = strides(src);
    let r = out.len();
    (0..r)
        .map(|i| {
            if i + src.len() < r {
                0
            } else {
                let j = i + src.len() - r;
                if src[j] == 1 && out[i] != 1 {
                    0
                } else {
                    st[j]
                }
            }
        })
        .collect()
}

/// Packs up to 8 dims into two `vec4<u32>` worth of words.
pub fn pack8(v: &[usize]) -> [u32; 8] {
    let mut w = [1u32; 8];
    for (i, &x) in v.iter().enumerate() {
        w[i] = x as u32;
    }
    w
}

/// Merges adjacent dims that are contiguous in every operand, so ranks stay small.
pub(crate) fn coalesce(shape: &[usize], ops: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut s: Vec<usize> = Vec::new();
    let mut o: Vec<Vec<usize>> = vec![Vec::new(); ops.len()];
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        let can_merge = !s.is_empty()
            && ops
                .iter()
                .enumerate()
                .all(|(k, st)| o[k].last().copied() == Some(st[d] * shape[d]));
        if can_merge {
            let last = s.len() - 1;
            s[last] *= shape[d];
            for (k, st) in ops.iter().enumerate() {
                o[k][last] = st[d];
            }
        } else {
            s.push(shape[d]);
            for (k, st) in ops.iter().enumerate() {
                o[k].push(st[d]);
            }
        }
    }
    if s.is_empty() {
        s.push(1);
        for ok in o.iter_mut() {
            ok.push(0);
        }
    }
    (s, o)
}

/// c = op(a, b) with broadcasting; `a_shape`/`b_shape` are the operands' shapes.
pub fn binary(
    op: BinaryOp,
    a: View,
    a_shape: &[usize],
    b: View,
    b_shape: &[usize],
    c: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let out = broadcast_shape(a_shape, b_shape).ok_or_else(|| {
        Error::shape(
            op.key(),
            format!("cannot broadcast {a_shape:?} with {b_shape:?}"),
        )
    })?;
    let n: usize = out.iter().product();
    if c.len < n as u64
        || a.len < a_shape.iter().product::<usize>() as u64
        || b.len < b_shape.iter().product::<usize>() as u64
    {
        return Err(Error::shape(op.key(), "buffer smaller than its shape"));
    }
    let same = a_shape == b_shape;
    let key = format!("binary_{}", op.key());
    let subst = |ta: &str, tb: &str, tc: &str, apply: &str, la: &str, lb: &str| {
        let index = if same { SAME_INDEX } else { BROADCAST_INDEX };
        vec![
            ("INDEX", index.to_string()),
            ("EXPR", op.expr()),
            ("HELPERS", HELPERS.to_string()),
            ("A_TY", ta.to_string()),
            ("B_TY", tb.to_string()),
            ("C_TY", tc.to_string()),
            ("APPLY", apply.to_string()),
            ("LOAD_A", la.to_string()),
            ("LOAD_B", lb.to_string()),
        ]
    };
    if same {
        return chunked(
            n as u64,
            &[a, b, c],
            &[true, true, true],
            caps,
            "binary op",
            |bd, _, count| {
                let vec = vec4_ok(count, &[bd[0].1, bd[1].1, bd[2].1]);
                let (ty, apply, w) = vec_parts(vec);
                let mut words = vec![
                    (count / w as u64) as u32,
                    1,
                    bd[0].1 / w,
                    bd[1].1 / w,
                    bd[2].1 / w,
                    0,
                    0,
                    0,
                ];
                words.extend(pack8(&[(count / w as u64) as usize]));
                words.extend(pack8(&[1]));
                words.extend(pack8(&[1]));
                Ok(Dispatch {
                    key: format!("{key}{}", if vec { "_v4" } else { "" }),
                    template: "binary",
                    subst: subst(ty, ty, ty, apply, "", ""),
                    uniform: uniform(&words),
                    bindings: vec![bd[0].0, bd[1].0, bd[2].0],
                    groups: grid((count / w as u64).div_ceil(WG_1D as u64), caps)?,
                })
            },
        );
    }
    let sa = broadcast_strides(a_shape, &out);
    let sb = broadcast_strides(b_shape, &out);
    let sc = strides(&out);
    let (mut shape, mut st) = coalesce(&out, &[sa, sb, sc]);
    if shape.len() > 8 {
        return Err(Error::shape(op.key(), "more than 8 non-mergeable dims"));
    }
    let (ba, mut oa) = super::bind_all(&a, caps, "binary operand a")?;
    let (bb, mut ob) = super::bind_all(&b, caps, "binary operand b")?;
    let (bc, mut oc) = super::bind_all(&c, caps, "binary output")?;
    // Vectorize along the innermost dim when every operand either runs along it (then read
    // as vec4) or is broadcast over it (then read as a scalar and splatted).
    let r = shape.len() - 1;
    let runs = |k: usize, off: u32| {
        st[k][r] == 1 && st[k][..r].iter().all(|s| s.is_multiple_of(4)) && off.is_multiple_of(4)
    };
    let (va, vb) = (runs(0, oa), runs(1, ob));
    let vec = shape[r].is_multiple_of(4)
        && oc.is_multiple_of(4)
        && (va || st[0][r] == 0)
        && (vb || st[1][r] == 0)
        && (va || vb);
    let mut units = n as u64;
    if vec {
        shape[r] /= 4;
        units /= 4;
        oc /= 4;
        for (k, v) in [(0, va), (1, vb)] {
            if v {
                for s in st[k][..r].iter_mut() {
                    *s /= 4;
                }
            }
        }
        if va {
            oa /= 4;
        }
        if vb {
            ob /= 4;
        }
    }
    let ty = super::elem_ty;
    let load = |v: bool| if vec && !v { "vec4<f32>" } else { "" };
    let mut w = vec![units as u32, shape.len() as u32, oa, ob, oc, 0, 0, 0];
    w.extend(pack8(&shape));
    w.extend(pack8(&st[0]));
    w.extend(pack8(&st[1]));
    Ok(vec![Dispatch {
        key: if vec {
            format!("{key}_bv{}{}", va as u8, vb as u8)
        } else {
            key.clone()
        },
        template: "binary",
        subst: subst(
            ty(vec && va),
            ty(vec && vb),
            ty(vec),
            if vec { "apply4" } else { "apply" },
            load(va),
            load(vb),
        ),
        uniform: uniform(&w),
        bindings: vec![ba, bb, bc],
        groups: grid(units.div_ceil(WG_1D as u64), caps)?,
    }])
}
