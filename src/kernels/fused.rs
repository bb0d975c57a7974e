//! Fused elementwise kernels: a chain of unary and binary ops over a few leaf tensors, run as
//! one dispatch instead of one per op. The chain is a typed [`Program`] (straight-line
//! instructions over leaves and earlier results); the WGSL is generated from it, and the
//! pipeline key is structural (the ops in order plus the launch form), so one pipeline serves
//! every graph that fuses the same chain. Leaves broadcast to the output's shape with NumPy
//! rules. The graph compiler (`graph::fusion`) decides what to fuse.

use super::elementwise::{broadcast_strides, coalesce, pack8, strides, BinaryOp, UnaryOp, HELPERS};
use super::expr::Names;
use super::{bind_all, grid, uniform, Dispatch, View, WG_1D};
use crate::error::{Error, Result};
use crate::gpu::Caps;

/// Most leaf tensors one fused kernel reads (storage bindings: these plus the output stay
/// within WebGPU's default of 8 per stage).
pub const MAX_LEAVES: usize = 6;

/// Most dims left after merging contiguous ones (the uniform's shape slots).
const MAX_RANK: usize = 8;

/// An instruction's operand: a leaf tensor or the result of an earlier instruction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// The k-th leaf.
    Leaf(usize),
    /// The result of instruction t.
    Tmp(usize),
}

/// One elementwise op of a fused chain.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Instr {
    /// y = op(x).
    Unary(UnaryOp, Arg),
    /// y = op(a, b).
    Binary(BinaryOp, Arg, Arg),
}

/// A straight-line elementwise program: `leaves` inputs, instructions in order, the last
/// instruction's result is the output.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Program {
    /// Number of leaf inputs.
    pub leaves: usize,
    /// Instructions; each may read leaves and earlier results.
    pub instrs: Vec<Instr>,
}

/// A unary op's WGSL expression in `x` with its scalars as literals.
fn unary_literal(op: &UnaryOp) -> String {
    let (a, b) = op.scalars();
    op.def().wgsl(&Names {
        x: "x",
        y: "y",
        dy: "dy",
        params: Some([a, b]),
    })
}

fn scalars_finite(i: &Instr) -> bool {
    let (a, b) = match i {
        Instr::Unary(u, _) | Instr::Binary(BinaryOp::UnaryGrad(u), _, _) => u.scalars(),
        Instr::Binary(..) => (0.0, 0.0),
    };
    a.is_finite() && b.is_finite()
}

impl Program {
    /// Whether every instruction's operands exist, every op's scalars can be written as WGSL
    /// literals and the leaves fit one kernel.
    pub fn is_valid(&self) -> bool {
        let ok = |a: &Arg, t: usize| match *a {
            Arg::Leaf(k) => k < self.leaves,
            Arg::Tmp(s) => s < t,
        };
        !self.instrs.is_empty()
            && self.leaves <= MAX_LEAVES
            && self.instrs.iter().enumerate().all(|(t, i)| {
                scalars_finite(i)
                    && match i {
                        Instr::Unary(_, x) => ok(x, t),
                        Instr::Binary(_, a, b) => ok(a, t) && ok(b, t),
                    }
            })
    }

    /// Readable name for profiles: `fused_` and the ops in order.
    pub fn name(&self) -> String {
        let ops: Vec<String> = self
            .instrs
            .iter()
            .map(|i| match i {
                Instr::Unary(u, _) => u.name().to_string(),
                Instr::Binary(BinaryOp::UnaryGrad(u), ..) => format!("d{}", u.name()),
                Instr::Binary(b, ..) => b.key(),
            })
            .collect();
        format!("fused_{}", ops.join("_"))
    }

    /// The program as WGSL: one function per instruction and `f(v0, v1, ..) -> f32`.
    fn wgsl(&self) -> String {
        let arg = |a: &Arg| match *a {
            Arg::Leaf(k) => format!("v{k}"),
            Arg::Tmp(t) => format!("t{t}"),
        };
        let mut s = String::new();
        let mut body = String::new();
        for (t, i) in self.instrs.iter().enumerate() {
            match i {
                Instr::Unary(u, x) => {
                    s += &format!(
                        "fn op{t}(x: f32) -> f32 {{ return {}; }}\n",
                        unary_literal(u)
                    );
                    body += &format!("    let t{t} = op{t}({});\n", arg(x));
                }
                Instr::Binary(b, x, y) => {
                    s += &format!(
                        "fn op{t}(a: f32, b: f32) -> f32 {{ return {}; }}\n",
                        b.expr()
                    );
                    body += &format!("    let t{t} = op{t}({}, {});\n", arg(x), arg(y));
                }
            }
        }
        let params: Vec<String> = (0..self.leaves).map(|k| format!("v{k}: f32")).collect();
        s += &format!(
            "fn f({}) -> f32 {{\n{body}    return t{};\n}}\n",
            params.join(", "),
            self.instrs.len() - 1
        );
        s
    }
}

/// How a leaf is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// Same shape as the output: index i.
    Same,
    /// Broadcast: index from the output coordinates and the leaf's strides.
    Strided,
}

/// Merged output shape and per-leaf strides (the output's strides last), or `None` when the
/// leaves do not broadcast to `out` or too many dims remain.
fn geometry(leaves: &[&[usize]], out: &[usize]) -> Option<(Vec<usize>, Vec<Vec<usize>>)> {
    let mut st = Vec::with_capacity(leaves.len() + 1);
    for l in leaves {
        if l.len() > out.len()
            || l.iter()
                .rev()
                .zip(out.iter().rev())
                .any(|(&a, &o)| a != o && a != 1)
        {
            return None;
        }
        st.push(broadcast_strides(l, out));
    }
    st.push(strides(out));
    let (shape, st) = coalesce(out, &st);
    (shape.len() <= MAX_RANK).then_some((shape, st))
}

/// Whether [`fused`] can launch a program over leaves of these shapes into `out`.
pub fn supported(prog: &Program, leaves: &[&[usize]], out: &[usize]) -> bool {
    prog.is_valid() && leaves.len() == prog.leaves && geometry(leaves, out).is_some()
}

/// `y = prog(leaves...)` elementwise over `out_shape`, each leaf broadcast to it. Every view
/// must fit one binding (the compiler fuses only such tensors); `y` must not overlap a leaf.
pub fn fused(
    prog: &Program,
    leaves: &[(View, &[usize])],
    y: View,
    out_shape: &[usize],
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let name = prog.name();
    if !prog.is_valid() || leaves.len() != prog.leaves {
        return Err(Error::shape(
            &name,
            format!(
                "invalid program for {} leaves ({} expected, at most {MAX_LEAVES})",
                leaves.len(),
                prog.leaves
            ),
        ));
    }
    let n: usize = out_shape.iter().product();
    if y.len < n as u64
        || leaves
            .iter()
            .any(|(v, s)| v.len < s.iter().product::<usize>() as u64 || v.half)
    {
        return Err(Error::shape(&name, "a buffer is smaller than its shape"));
    }
    let shapes: Vec<&[usize]> = leaves.iter().map(|(_, s)| *s).collect();
    let (mut shape, mut st) = geometry(&shapes, out_shape).ok_or_else(|| {
        Error::shape(
            &name,
            format!("leaves {shapes:?} do not broadcast to {out_shape:?} in {MAX_RANK} dims"),
        )
    })?;
    let reads: Vec<Read> = shapes
        .iter()
        .map(|s| {
            if *s == out_shape {
                Read::Same
            } else {
                Read::Strided
            }
        })
        .collect();
    let mut binds = Vec::with_capacity(leaves.len() + 1);
    let mut offs = Vec::with_capacity(leaves.len());
    for (v, _) in leaves {
        let (b, o) = bind_all(v, caps, "fused elementwise input")?;
        binds.push(b);
        offs.push(o as usize);
    }
    let (by, mut oy) = bind_all(&y, caps, "fused elementwise output")?;
    binds.push(by);
    // The vec4 form: 4 consecutive outputs along the innermost dim per invocation; a leaf is
    // read as vec4 when it runs along that dim, as a splatted scalar when broadcast over it.
    let r = shape.len() - 1;
    let runs: Vec<bool> = (0..leaves.len())
        .map(|k| st[k][r] == 1 && st[k][..r].iter().all(|s| s % 4 == 0) && offs[k] % 4 == 0)
        .collect();
    let vec =
        shape[r] % 4 == 0 && oy % 4 == 0 && (0..leaves.len()).all(|k| runs[k] || st[k][r] == 0);
    let mut units = n as u64;
    let mut as_vec = vec![false; leaves.len()];
    if vec {
        shape[r] /= 4;
        units /= 4;
        oy /= 4;
        for k in 0..leaves.len() {
            if runs[k] {
                as_vec[k] = true;
                for s in st[k][..r].iter_mut() {
                    *s /= 4;
                }
                offs[k] /= 4;
            }
        }
    }
    let ty = |v: bool| if v { "vec4<f32>" } else { "f32" };
    let mut decl = String::new();
    let mut index = String::new();
    let mut loads = String::new();
    let strided: Vec<usize> = (0..leaves.len())
        .filter(|&k| reads[k] == Read::Strided)
        .collect();
    for k in 0..leaves.len() {
        decl += &format!(
            "@group(0) @binding({}) var<storage, read> x{k}: array<{}>;\n",
            k + 1,
            ty(as_vec[k])
        );
        if reads[k] == Read::Same {
            index += &format!("    let i{k} = i;\n");
        } else {
            index += &format!("    var i{k} = 0u;\n");
        }
        let load = format!("x{k}[p.offs[{}][{}] + i{k}]", k / 4, k % 4);
        loads += &if vec && !as_vec[k] {
            format!("    let v{k} = vec4<f32>({load});\n")
        } else {
            format!("    let v{k} = {load};\n")
        };
    }
    if !strided.is_empty() {
        index += "    var rem = i;\n    for (var d = i32(p.rank) - 1; d >= 0; d--) {\n";
        index += "        let dim = p.shape[d / 4][d % 4];\n        let idx = rem % dim;\n";
        index += "        rem = rem / dim;\n";
        for &k in &strided {
            index += &format!("        i{k} += idx * p.st[{} + d / 4][d % 4];\n", 2 * k);
        }
        index += "    }\n";
    }
    let call = |lane: &str| {
        let a: Vec<String> = (0..leaves.len()).map(|k| format!("v{k}{lane}")).collect();
        format!("f({})", a.join(", "))
    };
    let result = if vec {
        format!(
            "vec4<f32>({}, {}, {}, {})",
            call(".x"),
            call(".y"),
            call(".z"),
            call(".w")
        )
    } else {
        call("")
    };
    let pattern: String = (0..leaves.len())
        .map(|k| match (reads[k], as_vec[k]) {
            (Read::Same, _) => 's',
            (Read::Strided, true) => 'v',
            (Read::Strided, false) => 'b',
        })
        .collect();
    let mut w = vec![units as u32, shape.len() as u32, oy, 0];
    w.extend(pack8(&shape));
    w.extend(pack8(&offs));
    for s in st.iter().take(leaves.len()) {
        w.extend(pack8(s));
    }
    Ok(vec![Dispatch {
        key: format!("{name}_{pattern}{}", if vec { "_v4" } else { "" }),
        template: "fused",
        subst: vec![
            ("STRIDE_VECS", (2 * leaves.len()).to_string()),
            ("LEAVES", decl),
            ("OUT_BINDING", (leaves.len() + 1).to_string()),
            ("OUT_TY", ty(vec).into()),
            ("HELPERS", HELPERS.to_string()),
            ("PROGRAM", prog.wgsl()),
            ("INDEX", index),
            ("LOADS", loads),
            ("RESULT", result),
        ],
        uniform: uniform(&w),
        bindings: binds,
        groups: grid(units.div_ceil(WG_1D as u64), caps)?,
    }])
}
