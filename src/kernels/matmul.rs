//! Batched matmul launcher and its WGSL code generator (template `shaders/matmul.wgsl`).

use super::{bind, row_chunks, uniform, Binding, Dispatch, View};
use crate::error::{Error, Result};
use crate::gpu::Caps;

/// Shape and layout of one batched matmul `C[b] = op(A[b]) op(B[b])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulShape {
    /// Batch count.
    pub batch: u32,
    /// Rows of C.
    pub m: u32,
    /// Columns of C.
    pub n: u32,
    /// Contraction length.
    pub k: u32,
    /// A is stored [K, M] (transposed).
    pub ta: bool,
    /// B is stored [N, K] (transposed).
    pub tb: bool,
    /// A is shared by every batch (batch stride 0).
    pub a_shared: bool,
    /// B is shared by every batch (batch stride 0).
    pub b_shared: bool,
}

/// Register-block configuration: each invocation computes `tm x tn` outputs; a workgroup is
/// `wx x wy` invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// Rows per invocation.
    pub tm: u32,
    /// Columns per invocation (multiple of 4).
    pub tn: u32,
    /// Workgroup width (invocations along N).
    pub wx: u32,
    /// Workgroup height (invocations along M).
    pub wy: u32,
}

/// The tile used on this device: 8x8 outputs per invocation in 8x8 workgroups, a good choice on
/// lavapipe and on discrete GPUs alike (see `examples/bench.rs` for the sweep).
pub fn default_tile(_caps: &Caps) -> Tile {
    Tile {
        tm: 8,
        tn: 8,
        wx: 8,
        wy: 8,
    }
}

/// The blocked kernel's tile for `s`: [`default_tile`], or 4 x 4 outputs per invocation
/// (32 x 32 per workgroup) when each product's output fits 32 x 32, as attention's per-head
/// products at small token counts do. There a 64 x 64 workgroup leaves most invocations idle
/// and the few active ones run long serial blocks; `bench matmul_small` measured the demo's
/// attention products (96 x 17 x 17 x 32 and the like) 1.6 - 1.9x faster on lavapipe.
pub fn tile_for(s: &MatmulShape, caps: &Caps) -> Tile {
    if s.m <= 32 && s.n <= 32 {
        Tile {
            tm: 4,
            tn: 4,
            wx: 8,
            wy: 8,
        }
    } else {
        default_tile(caps)
    }
}

/// Which operands can use vec4 loads/stores (the "fits" specializations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VecFlags {
    /// A loads as vec4 (along K when A is [M,K], along M when transposed).
    pub a: bool,
    /// B loads as vec4 (along N when B is [K,N], along K when transposed).
    pub b: bool,
    /// C stores as vec4 (N multiple of 4).
    pub c: bool,
}

/// Generates the WGSL of one variant.
#[allow(clippy::too_many_arguments)]
pub fn subst(
    s: &MatmulShape,
    t: Tile,
    v: VecFlags,
    accumulate: bool,
    bias: bool,
    res: bool,
    half_c: bool,
    colsum: bool,
) -> Vec<(&'static str, String)> {
    let (tm, tn) = (t.tm as usize, t.tn as usize);
    let nj = tn / 4;
    let ty = |vec: bool| super::elem_ty(vec).to_string();
    let a_idx = |m: &str, k: &str| {
        if s.ta {
            format!("abase + ({k}) * p.m + ({m})")
        } else {
            format!("abase + ({m}) * p.k + ({k})")
        }
    };
    let b_idx = |k: &str, n: &str| {
        if s.tb {
            format!("bbase + ({n}) * p.k + ({k})")
        } else {
            format!("bbase + ({k}) * p.n + ({n})")
        }
    };
    let scalar = |arr: &str, vec: bool, idx: String| {
        if vec {
            format!("{arr}[({idx}) >> 2u][({idx}) & 3u]")
        } else {
            format!("{arr}[{idx}]")
        }
    };
    let a_scalar = format!(
        "    let i = {};\n    return {};",
        if s.ta {
            "base + k * p.m + m"
        } else {
            "base + m * p.k + k"
        },
        if v.a { "a[i >> 2u][i & 3u]" } else { "a[i]" }
    );
    let b_scalar = format!(
        "    let i = {};\n    return {};",
        if s.tb {
            "base + n * p.k + k"
        } else {
            "base + k * p.n + n"
        },
        if v.b { "b[i >> 2u][i & 3u]" } else { "b[i]" }
    );
    let mut acc = String::new();
    for i in 0..tm {
        for j in 0..nj {
            acc += &format!("    var acc_{i}_{j} = vec4<f32>(0.0);\n");
        }
        if colsum {
            acc += &format!("    var rs_{i} = 0.0;\n");
        }
    }
    // Fast step over k..k+4: scalars a_i_t, vectors b_t_j, then FMAs.
    let mut fast = String::new();
    let ind = "            ";
    if v.a && !s.ta {
        for i in 0..tm {
            fast += &format!(
                "{ind}let av_{i} = a[({}) >> 2u];\n",
                a_idx(&format!("row0 + {i}u"), "k")
            );
            for tt in 0..4 {
                fast += &format!("{ind}let a_{i}_{tt} = av_{i}[{tt}];\n");
            }
        }
    } else if v.a && s.ta {
        for tt in 0..4 {
            for i4 in 0..tm / 4 {
                fast += &format!(
                    "{ind}let av_{tt}_{i4} = a[({}) >> 2u];\n",
                    a_idx(&format!("row0 + {}u", 4 * i4), &format!("k + {tt}u"))
                );
                for r in 0..4 {
                    fast += &format!("{ind}let a_{}_{tt} = av_{tt}_{i4}[{r}];\n", 4 * i4 + r);
                }
            }
        }
    } else {
        for i in 0..tm {
            for tt in 0..4 {
                let idx = a_idx(&format!("row0 + {i}u"), &format!("k + {tt}u"));
                fast += &format!("{ind}let a_{i}_{tt} = {};\n", scalar("a", false, idx));
            }
        }
    }
    if v.b && !s.tb {
        for tt in 0..4 {
            for j in 0..nj {
                fast += &format!(
                    "{ind}let b_{tt}_{j} = b[({}) >> 2u];\n",
                    b_idx(&format!("k + {tt}u"), &format!("col0 + {}u", 4 * j))
                );
            }
        }
    } else if v.b && s.tb {
        for n in 0..tn {
            fast += &format!(
                "{ind}let bv_{n} = b[({}) >> 2u];\n",
                b_idx("k", &format!("col0 + {n}u"))
            );
        }
        for tt in 0..4 {
            for j in 0..nj {
                fast += &format!(
                    "{ind}let b_{tt}_{j} = vec4<f32>(bv_{}[{tt}], bv_{}[{tt}], bv_{}[{tt}], bv_{}[{tt}]);\n",
                    4 * j,
                    4 * j + 1,
                    4 * j + 2,
                    4 * j + 3
                );
            }
        }
    } else {
        for tt in 0..4 {
            for j in 0..nj {
                let e: Vec<String> = (0..4)
                    .map(|r| {
                        scalar(
                            "b",
                            false,
                            b_idx(&format!("k + {tt}u"), &format!("col0 + {}u", 4 * j + r)),
                        )
                    })
                    .collect();
                fast += &format!("{ind}let b_{tt}_{j} = vec4<f32>({});\n", e.join(", "));
            }
        }
    }
    for tt in 0..4 {
        for i in 0..tm {
            for j in 0..nj {
                fast += &format!("{ind}acc_{i}_{j} = acc_{i}_{j} + a_{i}_{tt} * b_{tt}_{j};\n");
            }
        }
    }
    // Column sums of the stored A (row sums of op(A)): every invocation keeps its rows'
    // sums; the one at column 0 stores them.
    let sum_rows = |code: &mut String, one: bool| {
        if colsum {
            for i in 0..tm {
                if one {
                    *code += &format!("{ind}rs_{i} += a_{i};\n");
                } else {
                    *code += &format!("{ind}rs_{i} += a_{i}_0 + a_{i}_1 + a_{i}_2 + a_{i}_3;\n");
                }
            }
        }
    };
    sum_rows(&mut fast, false);
    // Tail step (single k, block in range): scalar loads without checks.
    let mut tail = String::new();
    for i in 0..tm {
        tail += &format!(
            "{ind}let a_{i} = {};\n",
            scalar("a", v.a, a_idx(&format!("row0 + {i}u"), "k"))
        );
    }
    for j in 0..nj {
        let e: Vec<String> = (0..4)
            .map(|r| scalar("b", v.b, b_idx("k", &format!("col0 + {}u", 4 * j + r))))
            .collect();
        tail += &format!("{ind}let b_{j} = vec4<f32>({});\n", e.join(", "));
    }
    for i in 0..tm {
        for j in 0..nj {
            tail += &format!("{ind}acc_{i}_{j} = fma(vec4<f32>(a_{i}), b_{j}, acc_{i}_{j});\n");
        }
    }
    sum_rows(&mut tail, true);
    // Checked step: everything through the bounds-checked accessors.
    let mut checked = String::new();
    for i in 0..tm {
        checked += &format!("{ind}let a_{i} = a_at(abase, row0 + {i}u, k);\n");
    }
    for j in 0..nj {
        let e: Vec<String> = (0..4)
            .map(|r| format!("b_at(bbase, k, col0 + {}u)", 4 * j + r))
            .collect();
        checked += &format!("{ind}let b_{j} = vec4<f32>({});\n", e.join(", "));
    }
    for i in 0..tm {
        for j in 0..nj {
            checked += &format!("{ind}acc_{i}_{j} = fma(vec4<f32>(a_{i}), b_{j}, acc_{i}_{j});\n");
        }
    }
    sum_rows(&mut checked, true);
    let ind2 = "        ";
    let mut fast_store = String::new();
    let mut checked_store = String::new();
    if bias {
        for j in 0..nj {
            let e: Vec<String> = (0..4)
                .map(|r| format!("bias[p.off_bias + min(col0 + {}u, p.n - 1u)]", 4 * j + r))
                .collect();
            fast_store += &format!("{ind2}let bias_{j} = vec4<f32>({});\n", e.join(", "));
            checked_store += &format!("{ind2}let bias_{j} = vec4<f32>({});\n", e.join(", "));
        }
        for i in 0..tm {
            for j in 0..nj {
                fast_store += &format!("{ind2}acc_{i}_{j} += bias_{j};\n");
                checked_store += &format!("{ind2}acc_{i}_{j} += bias_{j};\n");
            }
        }
    }
    // The residual element at C's (row, col), read only where C is written.
    let res_at = |row: String, col: String| {
        if res {
            format!(" + res[p.off_res + bi * p.batch_c + ({row}) * p.n + {col}]")
        } else {
            String::new()
        }
    };
    for i in 0..tm {
        for j in 0..nj {
            let ci = format!("cbase + (row0 + {i}u) * p.n + col0 + {}u", 4 * j);
            if v.c {
                let old = if accumulate {
                    format!(" + c[({ci}) >> 2u]")
                } else {
                    String::new()
                };
                let rv = if res {
                    let e: Vec<String> = (0..4)
                        .map(|r| {
                            res_at(format!("row0 + {i}u"), format!("col0 + {}u", 4 * j + r))
                                .trim_start_matches(" + ")
                                .to_string()
                        })
                        .collect();
                    format!(" + vec4<f32>({})", e.join(", "))
                } else {
                    String::new()
                };
                fast_store += &format!(
                    "{ind2}c[({ci}) >> 2u] = {};\n",
                    round_c(format!("acc_{i}_{j}{rv}{old}"), true, half_c)
                );
            } else {
                for r in 0..4 {
                    let old = if accumulate {
                        format!(" + c[{ci} + {r}u]")
                    } else {
                        String::new()
                    };
                    let rv = res_at(format!("row0 + {i}u"), format!("col0 + {}u", 4 * j + r));
                    fast_store += &format!(
                        "{ind2}c[{ci} + {r}u] = {};\n",
                        round_c(format!("acc_{i}_{j}[{r}]{rv}{old}"), false, half_c)
                    );
                }
            }
            for r in 0..4 {
                let target = if v.c {
                    "c[(ci) >> 2u][(ci) & 3u]".to_string()
                } else {
                    "c[ci]".to_string()
                };
                let old = if accumulate {
                    format!(" + {target}")
                } else {
                    String::new()
                };
                let value = round_c(
                    format!(
                        "acc_{i}_{j}[{r}]{}{old}",
                        res_at(format!("row0 + {i}u"), format!("col0 + {}u", 4 * j + r))
                    ),
                    false,
                    half_c,
                );
                checked_store += &format!(
                    "{ind2}if (row0 + {i}u < p.m && col0 + {cc}u < p.n) {{ let ci = cbase + (row0 + {i}u) * p.n + col0 + {cc}u; {target} = {value}; }}\n",
                    cc = 4 * j + r,
                );
            }
        }
    }
    if colsum {
        for i in 0..tm {
            let si = format!("p.off_s + row0 + {i}u");
            let old = if accumulate {
                format!(" + colsum[{si}]")
            } else {
                String::new()
            };
            let line = format!(
                "{ind2}if (col0 == 0u && row0 + {i}u < p.m) {{ colsum[{si}] = rs_{i}{old}; }}\n"
            );
            fast_store += &line;
            checked_store += &line;
        }
    }
    vec![
        ("TM", t.tm.to_string()),
        ("TN", t.tn.to_string()),
        ("WX", t.wx.to_string()),
        ("WY", t.wy.to_string()),
        ("A_TY", ty(v.a)),
        ("B_TY", ty(v.b)),
        ("C_TY", super::storage_ty(v.c, half_c).to_string()),
        ("A_SCALAR", a_scalar),
        ("B_SCALAR", b_scalar),
        ("ACC_DECL", acc),
        ("FAST_STEP", fast),
        ("TAIL_STEP", tail),
        ("CHECKED_STEP", checked),
        ("FAST_STORE", fast_store),
        ("CHECKED_STORE", checked_store),
        ("BIAS_BINDING", epilogue_bindings(bias, res, colsum)),
    ]
}

/// A value stored into C: as is, or rounded to f16 (`vec4<f16>(..)` or `f16(..)`) when C holds
/// f16 activations.
fn round_c(value: String, vec: bool, half_c: bool) -> String {
    match (half_c, vec) {
        (false, _) => value,
        (true, true) => format!("vec4<f16>({value})"),
        (true, false) => format!("f16({value})"),
    }
}

/// The optional bias, residual and column-sum bindings of both matmul templates, numbered
/// after C in that order.
fn epilogue_bindings(bias: bool, res: bool, colsum: bool) -> String {
    let mut s = String::new();
    if bias {
        s += "@group(0) @binding(4) var<storage, read> bias: array<f32>;\n";
    }
    if res {
        s += "@group(0) @binding(5) var<storage, read> res: array<f32>;\n";
    }
    if colsum {
        s += &format!(
            "@group(0) @binding({}) var<storage, read_write> colsum: array<f32>;\n",
            4 + bias as u32 + res as u32
        );
    }
    s
}

/// Pipeline key of a variant.
pub fn key(s: &MatmulShape, t: Tile, v: VecFlags) -> String {
    format!(
        "matmul_{}{}_v{}{}{}_{}x{}_{}x{}",
        if s.ta { "t" } else { "n" },
        if s.tb { "t" } else { "n" },
        v.a as u8,
        v.b as u8,
        v.c as u8,
        t.tm,
        t.tn,
        t.wx,
        t.wy
    )
}

/// Element counts of A, B and C (all batches).
pub fn sizes(s: &MatmulShape) -> (u64, u64, u64) {
    let (b, m, n, k) = (s.batch as u64, s.m as u64, s.n as u64, s.k as u64);
    let ab = if s.a_shared { 1 } else { b };
    let bb = if s.b_shared { 1 } else { b };
    (ab * m * k, bb * k * n, b * m * n)
}

/// Which kernel family computes a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Pick per device and shape: the subgroup kernel on CPU adapters with 8-lane subgroups
    /// when the operands are vec4-aligned, the register-blocked kernel otherwise.
    Auto,
    /// The register-blocked kernel with this tile.
    Blocked(Tile),
    /// The subgroup-sharing kernel with this tile when the shape allows (else blocked).
    Subgroup(SgTile),
}

/// Dispatches computing `c = op(a) op(b)`. Splits over batches and rows of C (and A when it is
/// not transposed) so that every binding fits the device; B must fit one binding.
pub fn launch(s: &MatmulShape, a: View, b: View, c: View, caps: &Caps) -> Result<Vec<Dispatch>> {
    launch_full(s, a, b, c, None, None, None, caps, Variant::Auto)
}

/// C = op(A) op(B) for a transposed A ([K, M], batch 1) that also writes the column sums of
/// the stored A, `colsum[m] = sum_k A[k, m]`, from the A values the product loads anyway: a
/// linear layer's bias gradient next to its weight gradient (`dY^T X` and `sum_rows dY`) in
/// one dispatch.
pub fn launch_colsum(
    s: &MatmulShape,
    a: View,
    b: View,
    c: View,
    colsum: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    if !s.ta || s.tb || s.batch != 1 || a.half || colsum.half {
        return Err(Error::shape(
            "matmul",
            format!("column sums need an f32 transposed A and a plain B, batch 1: {s:?}"),
        ));
    }
    if colsum.len < s.m as u64 {
        return Err(Error::shape(
            "matmul",
            format!(
                "column sums of {} elements for {} columns of A",
                colsum.len, s.m
            ),
        ));
    }
    launch_full(s, a, b, c, None, None, Some(colsum), caps, Variant::Auto)
}

/// C = op(A) op(B) + bias (+ residual), added in the kernel's stores: the bias [N] along
/// rows (the fused `x W^T + b` of linear layers), the residual with C's layout (a
/// transformer's `x + (h W^T + b)`). The residual needs a bias and must fit one binding.
pub fn launch_epilogue(
    s: &MatmulShape,
    a: View,
    b: View,
    c: View,
    bias: View,
    residual: Option<View>,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    if bias.len < s.n as u64 {
        return Err(Error::shape(
            "matmul",
            format!("bias of {} elements for {} columns", bias.len, s.n),
        ));
    }
    if let Some(r) = residual {
        if r.len < sizes(s).2 {
            return Err(Error::shape(
                "matmul",
                format!(
                    "residual of {} elements for an output of {}",
                    r.len,
                    sizes(s).2
                ),
            ));
        }
    }
    launch_full(s, a, b, c, Some(bias), residual, None, caps, Variant::Auto)
}

/// [`launch`] with an explicit variant (benchmarks compare them).
pub fn launch_with(
    s: &MatmulShape,
    a: View,
    b: View,
    c: View,
    caps: &Caps,
    variant: Variant,
) -> Result<Vec<Dispatch>> {
    launch_full(s, a, b, c, None, None, None, caps, variant)
}

/// Bias, residual and column-sum bindings of a dispatch (the residual offset follows C's).
#[derive(Clone, Copy, Debug, Default)]
struct Epi {
    bias: Option<(Binding, u64)>,
    res: Option<(Binding, u64)>,
    colsum: Option<(Binding, u64)>,
}

impl Epi {
    /// The same epilogue for a dispatch whose C starts `by` elements further.
    fn shifted(self, by: u64) -> Epi {
        Epi {
            res: self.res.map(|(b, o)| (b, o + by)),
            ..self
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_full(
    s: &MatmulShape,
    a: View,
    b: View,
    c: View,
    bias: Option<View>,
    residual: Option<View>,
    colsum: Option<View>,
    caps: &Caps,
    variant: Variant,
) -> Result<Vec<Dispatch>> {
    let t = match variant {
        Variant::Blocked(t) => t,
        _ => tile_for(s, caps),
    };
    let (na, nb, nc) = sizes(s);
    if a.len < na || b.len < nb || c.len < nc {
        return Err(Error::shape(
            "matmul",
            format!(
                "buffers too small for {s:?}: a {} < {na}, b {} < {nb} or c {} < {nc}",
                a.len, b.len, c.len
            ),
        ));
    }
    let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
    if m == 0 || n == 0 {
        return Ok(vec![]);
    }
    // Packed f16 operands are read as vec4 runs along K: A as [M, K], B as [N, K].
    if (a.half && (s.ta || !k.is_multiple_of(4))) || (b.half && (!s.tb || !k.is_multiple_of(4))) {
        return Err(Error::shape(
            "matmul",
            format!("an f16 operand must be contiguous along K with K a multiple of 4: {s:?}"),
        ));
    }
    // An f16 C (activations stored in f16) is written once, with f32 arithmetic.
    super::check_half(&[&c], caps, "matmul")?;
    let max_elems = super::max_bind_elems(caps);
    let bound = |v: Option<View>, what: &str| -> Result<Option<(Binding, u64)>> {
        match v {
            Some(v) => {
                let (bb, off) = super::bind_all(&v, caps, what)?;
                Ok(Some((bb, off as u64)))
            }
            None => Ok(None),
        }
    };
    let epi = Epi {
        bias: bound(bias, "matmul bias")?,
        res: bound(residual, "matmul residual")?,
        colsum: bound(colsum, "matmul column sums")?,
    };
    if s.ta && !s.tb && !s.a_shared && !s.b_shared && (m * k).max(k * n) > max_elems {
        if c.half {
            return Err(Error::shape(
                "matmul",
                "a K-split product accumulates into C, which must then be f32",
            ));
        }
        return split_k(s, a, b, c, epi, caps, t, variant);
    }
    let (bb, b_off) = bind(&b, 0, nb, caps, "matmul operand B")?;
    // Work units: (batch, row range). Rows of C are contiguous per batch; A rows are contiguous
    // only when A is not transposed, so a transposed A forces whole batches.
    let a_row = if s.ta { 0 } else { k };
    let mut units: Vec<(u64, u64, u64)> = Vec::new();
    let a_batch_elems = if s.a_shared { 0 } else { m * k };
    // Fold the batch into rows when A is a plain [B*M, K] matrix and B is shared.
    let folded = s.b_shared && !s.ta && !s.a_shared && s.batch > 1;
    let (batches, rows) = if folded {
        (1, m * s.batch as u64)
    } else {
        (s.batch as u64, m)
    };
    let widest = n.max(a_row);
    let chunk = if s.ta {
        vec![(0, rows)]
    } else {
        row_chunks(rows, widest, caps, "matmul")?
    };
    for bi in 0..batches {
        for &(r0, nr) in &chunk {
            units.push((bi, r0, nr));
        }
    }
    let mut out = Vec::new();
    // Group consecutive batches into one dispatch (grid z) when nothing needs splitting.
    let whole = !folded && chunk.len() == 1 && (s.ta || chunk[0].1 == rows);
    if whole {
        let (ba, a_off) = bind(&a, 0, na, caps, "matmul operand A")?;
        let (bc, c_off) = bind(&c, 0, nc, caps, "matmul output C")?;
        let max_z = caps.max_workgroups as u64;
        let mut b0 = 0u64;
        while b0 < s.batch as u64 {
            let nbat = (s.batch as u64 - b0).min(max_z);
            let offs = [
                a_off as u64 + if s.a_shared { 0 } else { b0 * m * k },
                b_off as u64 + if s.b_shared { 0 } else { b0 * k * n },
                c_off as u64 + b0 * m * n,
            ];
            out.push(one(
                s,
                t,
                variant,
                false,
                [a.half, b.half, c.half],
                [ba, bb, bc],
                offs,
                epi.shifted(b0 * m * n),
                m,
                nbat,
                caps,
            )?);
            b0 += nbat;
        }
        return Ok(out);
    }
    for (bi, r0, nr) in units {
        let a_start = if folded {
            r0 * k
        } else {
            bi * a_batch_elems + r0 * k
        };
        let (ba, a_off) = bind(&a, a_start, nr * k, caps, "matmul operand A")?;
        let c_start = if folded { r0 * n } else { bi * m * n + r0 * n };
        let (bc, c_off) = bind(&c, c_start, nr * n, caps, "matmul operand C")?;
        let b_base = b_off as u64 + if s.b_shared { 0 } else { bi * k * n };
        out.push(one(
            s,
            t,
            variant,
            false,
            [a.half, b.half, c.half],
            [ba, bb, bc],
            [a_off as u64, b_base, c_off as u64],
            epi.shifted(c_start),
            nr,
            1,
            caps,
        )?);
    }
    Ok(out)
}

/// A transposed A ([K, M]) too large for one binding: its rows (and B's) are contiguous
/// along K, so K is split into chunks and every chunk after the first adds into C (the first
/// adds the bias, if any).
#[allow(clippy::too_many_arguments)]
fn split_k(
    s: &MatmulShape,
    a: View,
    b: View,
    c: View,
    epi: Epi,
    caps: &Caps,
    t: Tile,
    variant: Variant,
) -> Result<Vec<Dispatch>> {
    let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
    let per = super::max_bind_elems(caps) / m.max(n).max(1);
    let kc = if per >= 8 { per / 8 * 8 } else { per };
    if kc == 0 {
        return Err(Error::TooLarge {
            what: format!("matmul with transposed A: one row of {} elements", m.max(n)),
            bytes: m.max(n) * 4,
            limit: caps.max_binding,
            limit_name: "max_storage_buffer_binding_size",
        });
    }
    let mut out = Vec::new();
    for bi in 0..s.batch as u64 {
        let (bc, c_off) = bind(&c, bi * m * n, m * n, caps, "matmul output C")?;
        let mut k0 = 0;
        while k0 < k {
            let len = kc.min(k - k0);
            let (ba, a_off) = bind(&a, bi * m * k + k0 * m, len * m, caps, "matmul operand A")?;
            let (bb, b_off) = bind(&b, bi * k * n + k0 * n, len * n, caps, "matmul operand B")?;
            let part = MatmulShape {
                batch: 1,
                k: len as u32,
                ..*s
            };
            out.push(one(
                &part,
                t,
                variant,
                k0 > 0,
                [false, false, false],
                [ba, bb, bc],
                [a_off as u64, b_off as u64, c_off as u64],
                if k0 == 0 {
                    epi.shifted(bi * m * n)
                } else {
                    // Later chunks add their column sums too.
                    Epi {
                        colsum: epi.colsum,
                        ..Epi::default()
                    }
                },
                m,
                1,
                caps,
            )?);
            k0 += len;
        }
    }
    Ok(out)
}

/// The subgroup kernel's tile on CPU adapters with 8-lane subgroups.
pub const SG_TILE: SgTile = SgTile { s: 8, r: 32, tn: 8 };

/// One dispatch over `rows` rows of C and `nbat` batches, choosing the variant.
#[allow(clippy::too_many_arguments)]
fn one(
    s: &MatmulShape,
    t: Tile,
    variant: Variant,
    accumulate: bool,
    half: [bool; 3],
    bindings: [Binding; 3],
    offs: [u64; 3],
    epi: Epi,
    rows: u64,
    nbat: u64,
    caps: &Caps,
) -> Result<Dispatch> {
    let (m, n, k) = (rows, s.n as u64, s.k as u64);
    let batch_a = if s.a_shared { 0 } else { m * k };
    let batch_b = if s.b_shared { 0 } else { k * n };
    let batch_c = m * n;
    let even = |x: u64| x.is_multiple_of(4);
    let v = VecFlags {
        a: even(offs[0])
            && even(batch_a)
            && if s.ta {
                even(m) && t.tm.is_multiple_of(4)
            } else {
                even(k)
            },
        b: even(offs[1]) && even(batch_b) && if s.tb { even(k) } else { even(n) },
        c: even(offs[2]) && even(batch_c) && even(n),
    };
    // Column sums are of a transposed A's stored columns (`launch_colsum`); the kernels
    // generate them for that layout only.
    if epi.colsum.is_some() && (!s.ta || s.tb || nbat != 1) {
        return Err(Error::shape(
            "matmul",
            format!("column sums need a transposed A and a plain B, batch 1: {s:?}"),
        ));
    }
    if (half[0] && !v.a) || (half[1] && !v.b) {
        return Err(Error::shape(
            "matmul",
            format!("an f16 operand at an offset that is not a multiple of 4: {offs:?}"),
        ));
    }
    let uniform = uniform(&[
        m as u32,
        n as u32,
        k as u32,
        batch_a as u32,
        batch_b as u32,
        batch_c as u32,
        offs[0] as u32,
        offs[1] as u32,
        offs[2] as u32,
        epi.bias.map_or(0, |b| b.1 as u32),
        epi.res.map_or(0, |b| b.1 as u32),
        epi.colsum.map_or(0, |b| b.1 as u32),
    ]);
    let (sg, wanted) = match variant {
        Variant::Auto => (SG_TILE, caps.is_cpu),
        Variant::Blocked(_) => (SG_TILE, false),
        Variant::Subgroup(sg) => (sg, true),
    };
    let use_sg = wanted
        && caps.subgroup_size == Some(sg.s)
        && sg.r.is_multiple_of(4 * sg.s)
        && sg.tn.is_multiple_of(4)
        && even(k)
        && v.c
        && even(offs[0])
        && even(batch_a)
        && (!s.ta || even(m))
        && v.b;
    let (key, template, subst, groups) = if use_sg {
        (
            format!(
                "matmul_sg_{}{}_{}x{}_s{}",
                if s.ta { "t" } else { "n" },
                if s.tb { "t" } else { "n" },
                sg.r,
                sg.tn,
                sg.s
            ),
            "matmul_sg",
            sg_subst(
                s,
                sg,
                accumulate,
                epi.bias.is_some(),
                epi.res.is_some(),
                half[2],
                epi.colsum.is_some(),
            ),
            [
                n.div_ceil((sg.s * sg.tn) as u64),
                m.div_ceil(sg.r as u64),
                nbat,
            ],
        )
    } else {
        (
            key(s, t, v),
            "matmul",
            subst(
                s,
                t,
                v,
                accumulate,
                epi.bias.is_some(),
                epi.res.is_some(),
                half[2],
                epi.colsum.is_some(),
            ),
            [
                n.div_ceil((t.tn * t.wx) as u64),
                m.div_ceil((t.tm * t.wy) as u64),
                nbat,
            ],
        )
    };
    let key = match (accumulate, epi.bias.is_some(), epi.res.is_some()) {
        (true, _, _) => format!("{key}_acc"),
        (false, true, true) => format!("{key}_bias_res"),
        (false, true, false) => format!("{key}_bias"),
        _ => key,
    };
    let key = if epi.colsum.is_some() {
        format!("{key}_colsum")
    } else {
        key
    };
    let key = match half {
        [false, false, false] => key,
        [a, b, c] => format!(
            "{key}_f16{}{}{}",
            if a { "a" } else { "" },
            if b { "b" } else { "" },
            if c { "c" } else { "" }
        ),
    };
    let subst = widen_f16(subst, [half[0], half[1]]);
    if groups.iter().any(|&g| g > caps.max_workgroups as u64) {
        return Err(Error::TooLarge {
            what: format!("matmul grid {groups:?}"),
            bytes: *groups.iter().max().unwrap_or(&0),
            limit: caps.max_workgroups as u64,
            limit_name: "max_compute_workgroups_per_dimension",
        });
    }
    Ok(Dispatch {
        key,
        template,
        subst,
        uniform,
        bindings: bindings
            .iter()
            .copied()
            .chain(epi.bias.map(|b| b.0))
            .chain(epi.res.map(|b| b.0))
            .chain(epi.colsum.map(|b| b.0))
            .collect(),
        groups: [groups[0] as u32, groups[1] as u32, groups[2] as u32],
    })
}

/// Adapts a generated variant to packed f16 operands: the operand's binding becomes an array
/// of `vec2<u32>` (four halves) and each of its loads `x[i]` becomes `unpack4(x[i])` (the
/// templates define `unpack4`), so the arithmetic stays f32.
fn widen_f16(subst: Vec<(&'static str, String)>, half: [bool; 2]) -> Vec<(&'static str, String)> {
    if half == [false, false] {
        return subst;
    }
    let mut subst: Vec<(&'static str, String)> = subst
        .into_iter()
        .map(|(k, mut code)| {
            for (on, op) in half.iter().zip(['a', 'b']) {
                if *on {
                    code = widen_loads(&code, op);
                }
            }
            (k, code)
        })
        .collect();
    for (on, key) in half.iter().zip(["A_TY", "B_TY"]) {
        if *on {
            subst.retain(|(k, _)| k != &key);
            subst.push((key, "vec2<u32>".into()));
        }
    }
    subst
}

/// `op[...]` -> `unpack4(op[...])` wherever `op` stands alone (not the end of a longer name).
fn widen_loads(code: &str, op: char) -> String {
    let chars: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len() + 64);
    let mut i = 0;
    while i < chars.len() {
        let standalone = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if chars[i] == op && standalone && chars.get(i + 1) == Some(&'[') {
            let mut depth = 0;
            let mut j = i + 1;
            while j < chars.len() {
                match chars[j] {
                    '[' => depth += 1,
                    ']' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            out.push_str("unpack4(");
            out.extend(&chars[i..=j.min(chars.len() - 1)]);
            out.push(')');
            i = j + 1;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// Configuration of the subgroup-sharing kernel for CPU adapters (`shaders/matmul_sg.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgTile {
    /// Subgroup (and workgroup) size.
    pub s: u32,
    /// Rows of C per workgroup (multiple of 4 * s).
    pub r: u32,
    /// Columns per lane (multiple of 4).
    pub tn: u32,
}

/// Generates the subgroup kernel's code blocks.
pub fn sg_subst(
    s: &MatmulShape,
    t: SgTile,
    accumulate: bool,
    bias: bool,
    res: bool,
    half_c: bool,
    colsum: bool,
) -> Vec<(&'static str, String)> {
    let (sz, r, tn) = (t.s as usize, t.r as usize, t.tn as usize);
    let nj = tn / 4;
    let ind = "        ";
    let mut acc = String::new();
    for i in 0..r {
        for j in 0..nj {
            acc += &format!("    var acc_{i}_{j} = vec4<f32>(0.0);\n");
        }
    }
    let mut st = String::new();
    // A panel: a_i_t for rows i < r and t < 4, shared through broadcasts.
    if !s.ta {
        for q in 0..r / sz {
            st += &format!(
                "{ind}let av_{q} = a[(abase + min(row0 + lane + {}u, p.m - 1u) * p.k + k) >> 2u];\n",
                sz * q
            );
        }
        for i in 0..r {
            st += &format!(
                "{ind}let ar_{i} = subgroupBroadcast(av_{}, {}u);\n",
                i / sz,
                i % sz
            );
        }
        let _ = ind;
    } else {
        for q in 0..r / (4 * sz) {
            for tt in 0..4 {
                st += &format!(
                    "{ind}let av_{q}_{tt} = a[(abase + (k + {tt}u) * p.m + min(row0 + 4u * (lane + {}u), p.m - 4u)) >> 2u];\n",
                    sz * q
                );
            }
        }
        // Column sums of the stored A: lane l sums its own 4-row slices over k.
        if colsum {
            for q in 0..r / (4 * sz) {
                acc += &format!("    var rs_{q} = vec4<f32>(0.0);\n");
                st += &format!("{ind}rs_{q} += av_{q}_0 + av_{q}_1 + av_{q}_2 + av_{q}_3;\n");
            }
        }
        for i in 0..r {
            let (q, rem) = (i / (4 * sz), i % (4 * sz));
            let (l, rr) = (rem / 4, rem % 4);
            let comps: Vec<String> = (0..4)
                .map(|tt| format!("subgroupBroadcast(av_{q}_{tt}[{rr}], {l}u)"))
                .collect();
            st += &format!("{ind}let ar_{i} = vec4<f32>({});\n", comps.join(", "));
        }
    }
    // B rows k..k+4 for the lane's column groups.
    if !s.tb {
        for tt in 0..4 {
            for j in 0..nj {
                st += &format!(
                    "{ind}let b_{tt}_{j} = b[(bbase + (k + {tt}u) * p.n + min(colbase + {}u, p.n - 4u)) >> 2u];\n",
                    4 * sz * j
                );
            }
        }
    } else {
        for j in 0..nj {
            for cc in 0..4 {
                st += &format!(
                    "{ind}let bv_{j}_{cc} = b[(bbase + min(colbase + {}u, p.n - 1u) * p.k + k) >> 2u];\n",
                    4 * sz * j + cc
                );
            }
        }
        for tt in 0..4 {
            for j in 0..nj {
                st += &format!(
                    "{ind}let b_{tt}_{j} = vec4<f32>(bv_{j}_0[{tt}], bv_{j}_1[{tt}], bv_{j}_2[{tt}], bv_{j}_3[{tt}]);\n"
                );
            }
        }
    }
    for j in 0..nj {
        for i in 0..r {
            let e: Vec<String> = (0..4)
                .map(|tt| format!("vec4<f32>(ar_{i}[{tt}]) * b_{tt}_{j}"))
                .collect();
            st += &format!("{ind}acc_{i}_{j} += {};\n", e.join(" + "));
        }
    }
    let mut store = String::new();
    if bias {
        for j in 0..nj {
            let e: Vec<String> = (0..4)
                .map(|cc| {
                    format!(
                        "bias[p.off_bias + min(colbase + {}u, p.n - 1u)]",
                        4 * sz * j + cc
                    )
                })
                .collect();
            store += &format!("    let bias_{j} = vec4<f32>({});\n", e.join(", "));
        }
    }
    let plus_bias = |j: usize| {
        if bias {
            format!(" + bias_{j}")
        } else {
            String::new()
        }
    };
    for i in 0..r {
        for j in 0..nj {
            let ci = format!(
                "(cbase + (row0 + {i}u) * p.n + colbase + {}u) >> 2u",
                4 * sz * j
            );
            let old = if accumulate {
                format!(" + c[{ci}]")
            } else {
                String::new()
            };
            let rv = if res {
                let e: Vec<String> = (0..4)
                    .map(|cc| {
                        format!(
                            "res[p.off_res + bi * p.batch_c + (row0 + {i}u) * p.n + colbase + {}u]",
                            4 * sz * j + cc
                        )
                    })
                    .collect();
                format!(" + vec4<f32>({})", e.join(", "))
            } else {
                String::new()
            };
            store += &format!(
                "    if (row0 + {i}u < p.m && colbase + {col}u < p.n) {{ c[{ci}] = {}; }}\n",
                round_c(
                    format!("acc_{i}_{j}{}{rv}{old}", plus_bias(j)),
                    true,
                    half_c
                ),
                col = 4 * sz * j,
            );
        }
    }
    if colsum && s.ta {
        for q in 0..r / (4 * sz) {
            let row = format!("row0 + 4u * (lane + {}u)", sz * q);
            for cc in 0..4 {
                let si = format!("p.off_s + {row} + {cc}u");
                let old = if accumulate {
                    format!(" + colsum[{si}]")
                } else {
                    String::new()
                };
                store += &format!(
                    "    if (wg.x == 0u && {row} < p.m) {{ colsum[{si}] = rs_{q}[{cc}]{old}; }}\n"
                );
            }
        }
    }
    vec![
        ("A_TY", "vec4<f32>".into()),
        ("B_TY", "vec4<f32>".into()),
        ("C_TY", super::storage_ty(true, half_c).into()),
        ("S", t.s.to_string()),
        ("R", t.r.to_string()),
        ("TN", t.tn.to_string()),
        ("ACC_DECL", acc),
        ("STEP", st),
        ("STORE", store),
        ("BIAS_BINDING", epilogue_bindings(bias, res, colsum)),
    ]
}

/// What a probe variant of the subgroup kernel keeps, to split its time between storage
/// loads and arithmetic (`bench matmul_anatomy`). Probes compute wrong values: timing only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SgProbe {
    /// The kernel itself.
    Full,
    /// Every load in the K loop but the first of A and the first of B replaced by a value
    /// computed from the lane and k: the multiply-adds and register traffic, almost no loads.
    FewLoads,
    /// Every load kept; the multiply-adds replaced by one accumulator summing what was loaded.
    LoadsOnly,
}

/// The probe variant of a subgroup-kernel dispatch (f32 operands), or an error for any other
/// dispatch.
pub fn sg_probe(d: &Dispatch, probe: SgProbe) -> Result<Dispatch> {
    let is_load = |l: &str| l.contains(" = a[") || l.contains(" = b[");
    let mut out = d.clone();
    let step = out
        .subst
        .iter_mut()
        .find(|(k, _)| *k == "STEP")
        .filter(|_| d.template == "matmul_sg" && !d.key.contains("_f16"))
        .ok_or_else(|| {
            Error::shape("sg_probe", format!("not an f32 subgroup matmul: {}", d.key))
        })?;
    let name = |l: &str| {
        l.trim()
            .strip_prefix("let ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or("")
            .to_string()
    };
    let lines: Vec<String> = step.1.lines().map(str::to_string).collect();
    let new: Vec<String> = match probe {
        SgProbe::Full => lines,
        SgProbe::FewLoads => {
            let (mut kept_a, mut kept_b) = (false, false);
            lines
                .iter()
                .map(|l| {
                    let keep = |seen: &mut bool| !std::mem::replace(seen, true);
                    let keep = if l.contains(" = a[") {
                        keep(&mut kept_a)
                    } else if l.contains(" = b[") {
                        keep(&mut kept_b)
                    } else {
                        true
                    };
                    if keep {
                        l.clone()
                    } else {
                        format!(
                            "        let {} = vec4<f32>(f32(k + lane) * 0.001);",
                            name(l)
                        )
                    }
                })
                .collect()
        }
        SgProbe::LoadsOnly => {
            let mut kept: Vec<String> = lines.iter().filter(|l| is_load(l)).cloned().collect();
            let sums: Vec<String> = kept.iter().map(|l| name(l)).collect();
            kept.push(format!("        acc_0_0 += {};", sums.join(" + ")));
            kept
        }
    };
    step.1 = new.join("\n") + "\n";
    out.key = format!("{}_probe_{probe:?}", d.key);
    Ok(out)
}
