//! Data movement: strided copies (permute, expand, slice, concat pieces, pad placement),
//! summing down to a broadcast shape, and embedding gather / its gradient.

use super::elementwise::{pack8, strides};
use super::{bind_all, check_half, grid, half_suffix, storage_ty, uniform, Dispatch, View, WG_1D};
use crate::error::{Error, Result};
use crate::gpu::Caps;

/// Copies the index space `shape` from `x` (element strides `sx`, starting at element `x0`
/// of the view) to `y` (strides `sy`, starting at `y0`).
#[allow(clippy::too_many_arguments)]
pub fn strided_copy(
    shape: &[usize],
    x: View,
    x0: usize,
    sx: &[usize],
    y: View,
    y0: usize,
    sy: &[usize],
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    // Drop unit dims and merge dims contiguous in both operands.
    let mut s: Vec<usize> = Vec::new();
    let (mut a, mut b): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        if let (Some(&la), Some(&lb)) = (a.last(), b.last()) {
            if la == sx[d] * shape[d] && lb == sy[d] * shape[d] {
                let l = s.len() - 1;
                s[l] *= shape[d];
                a[l] = sx[d];
                b[l] = sy[d];
                continue;
            }
        }
        s.push(shape[d]);
        a.push(sx[d]);
        b.push(sy[d]);
    }
    if s.is_empty() {
        s.push(1);
        a.push(0);
        b.push(0);
    }
    if s.len() > 8 {
        return Err(Error::shape(
            "strided copy",
            "more than 8 non-mergeable dims",
        ));
    }
    let n: usize = s.iter().product();
    if n == 0 {
        return Ok(vec![]);
    }
    check_half(&[&x, &y], caps, "strided copy")?;
    let (bx, ox) = bind_all(&x, caps, "copy source")?;
    let (by, oy) = bind_all(&y, caps, "copy destination")?;
    let (mut ox, mut oy) = (ox + x0 as u32, oy + y0 as u32);
    // vec4 copy when the innermost dim is contiguous on both sides and everything aligns.
    let r = s.len() - 1;
    let vec = a[r] == 1
        && b[r] == 1
        && s[r].is_multiple_of(4)
        && a[..r].iter().chain(&b[..r]).all(|v| v.is_multiple_of(4))
        && ox.is_multiple_of(4)
        && oy.is_multiple_of(4);
    let mut units = n;
    if vec {
        s[r] /= 4;
        units /= 4;
        for d in 0..r {
            a[d] /= 4;
            b[d] /= 4;
        }
        ox /= 4;
        oy /= 4;
    }
    let mut w = vec![units as u32, s.len() as u32, ox, oy];
    w.extend(pack8(&s));
    w.extend(pack8(&a));
    w.extend(pack8(&b));
    // The index arithmetic is generated with the shape and strides as constants: division by
    // a constant compiles to a multiply and shift (a runtime u32 division is a scalar loop
    // per lane on CPU adapters). One pipeline per distinct layout.
    let mut index = String::new();
    let mut sig = String::new();
    for d in (0..s.len()).rev() {
        let (dim, ax, by) = (s[d], a[d], b[d]);
        sig += &format!("_{dim}.{ax}.{by}");
        if d == 0 {
            index += &format!("    ix += rem * {ax}u;\n    iy += rem * {by}u;\n");
        } else {
            index += &format!(
                "    {{ let idx = rem % {dim}u; rem = rem / {dim}u; ix += idx * {ax}u; iy += idx * {by}u; }}\n"
            );
        }
    }
    Ok(vec![Dispatch {
        key: format!(
            "permute{}{sig}{}",
            if vec { "_v4" } else { "" },
            half_suffix(&[&x, &y])
        ),
        template: "permute",
        subst: vec![
            ("TX", storage_ty(vec, x.half).into()),
            ("TY", storage_ty(vec, y.half).into()),
            ("INDEX", index),
        ],
        uniform: uniform(&w),
        bindings: vec![bx, by],
        groups: grid((units as u64).div_ceil(WG_1D as u64), caps)?,
    }])
}

/// y = x.permute(perm) written contiguously.
pub fn permute(
    x: View,
    shape: &[usize],
    perm: &[usize],
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let st = strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let sx: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    strided_copy(&out_shape, x, 0, &sx, y, 0, &strides(&out_shape), caps)
}

/// Sums `x` (shape `in_shape`) down to `out_shape` (same rank; 1 on reduced dims).
pub fn sum_to(
    x: View,
    in_shape: &[usize],
    y: View,
    out_shape: &[usize],
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    if in_shape.len() != out_shape.len() {
        return Err(Error::shape("sum_to", "ranks differ"));
    }
    let st = strides(in_shape);
    let (mut os, mut ost, mut rs, mut rst): (Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for d in 0..in_shape.len() {
        if out_shape[d] == in_shape[d] {
            os.push(in_shape[d]);
            ost.push(st[d]);
        } else if out_shape[d] == 1 {
            rs.push(in_shape[d]);
            rst.push(st[d]);
        } else {
            return Err(Error::shape(
                "sum_to",
                format!("{in_shape:?} does not reduce to {out_shape:?}"),
            ));
        }
    }
    if os.len() > 8 || rs.len() > 8 {
        return Err(Error::shape("sum_to", "rank above 8"));
    }
    let n: usize = os.iter().product();
    let count: usize = rs.iter().product();
    let (bx, mut ox) = bind_all(&x, caps, "sum_to input")?;
    let (by, mut oy) = bind_all(&y, caps, "sum_to output")?;
    let mut units = n;
    let last = os.len().checked_sub(1);
    let vec = last.is_some_and(|r| {
        ost[r] == 1
            && os[r].is_multiple_of(4)
            && ost[..r].iter().chain(&rst).all(|v| v.is_multiple_of(4))
            && ox.is_multiple_of(4)
            && oy.is_multiple_of(4)
    });
    if let (true, Some(r)) = (vec, last) {
        os[r] /= 4;
        units /= 4;
        for v in ost[..r].iter_mut().chain(rst.iter_mut()) {
            *v /= 4;
        }
        ox /= 4;
        oy /= 4;
    }
    let key = if vec { "sum_to_v4" } else { "sum_to" };
    let groups = grid((units as u64).div_ceil(WG_1D as u64), caps)?;
    // Each reduced index costs one pass of the shader's index loop over the reduced dims.
    let chunk = 4 * super::LOOP_CHUNK / (rs.len() + 1);
    let mut out = Vec::new();
    for (r0, r1) in super::chunks(count, chunk) {
        let mut w = vec![
            units as u32,
            os.len() as u32,
            rs.len() as u32,
            r1 as u32,
            ox,
            oy,
            r0 as u32,
            u32::from(r0 > 0),
        ];
        w.extend(pack8(&os));
        w.extend(pack8(&ost));
        w.extend(pack8(&rs));
        w.extend(pack8(&rst));
        out.push(Dispatch {
            key: key.into(),
            template: "sum_to",
            subst: vec![("TY", super::elem_ty(vec).into())],
            uniform: uniform(&w),
            bindings: vec![bx, by],
            groups,
        });
    }
    Ok(out)
}

/// y[i, :] = table[idx[i], :] for `n` indices into a `[vocab, dim]` table.
pub fn gather(
    table: View,
    vocab: usize,
    dim: usize,
    idx: View,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let n = idx.len as usize;
    let (bt, ot) = bind_all(&table, caps, "embedding table")?;
    let (bi, oi) = bind_all(&idx, caps, "indices")?;
    let (by, oy) = bind_all(&y, caps, "gather output")?;
    Ok(vec![Dispatch {
        key: "gather".into(),
        template: "gather",
        subst: vec![],
        uniform: uniform(&[n as u32, dim as u32, vocab as u32, ot, oi, oy]),
        bindings: vec![bt, bi, by],
        groups: grid(((n * dim) as u64).div_ceil(WG_1D as u64), caps)?,
    }])
}

/// Geometry of a 2-D convolution's input patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub pad: usize,
}

impl Conv2d {
    /// Output height and width for an `h` x `w` input, or None when the kernel does not fit.
    pub fn out_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let (hp, wp) = (h + 2 * self.pad, w + 2 * self.pad);
        if self.stride == 0 || self.kh == 0 || self.kw == 0 || hp < self.kh || wp < self.kw {
            return None;
        }
        Some((
            (hp - self.kh) / self.stride + 1,
            (wp - self.kw) / self.stride + 1,
        ))
    }
}

/// im2col of `samples` consecutive samples x [samples, c, h, w] for output pixels
/// [first, first + count) of each: y [samples * count, c * kh * kw] (zeros outside the image).
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    x: View,
    dims: [usize; 3],
    g: Conv2d,
    first: usize,
    count: usize,
    samples: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let [c, h, w] = dims;
    let (ho, wo) = g.out_size(h, w).ok_or_else(|| {
        crate::Error::shape(
            "im2col",
            format!("kernel {g:?} does not fit a {h}x{w} input"),
        )
    })?;
    if first + count > ho * wo || samples == 0 {
        return Err(crate::Error::shape(
            "im2col",
            format!(
                "pixels {first}..{} of {} in {samples} samples",
                first + count,
                ho * wo
            ),
        ));
    }
    let r = c * g.kh * g.kw;
    let total = (samples * count * r) as u64;
    // One invocation per run of kw elements (one kernel row of one channel).
    let runs = total / g.kw as u64;
    check_half(&[&x, &y], caps, "im2col")?;
    let (bx, ox) = bind_all(&x, caps, "convolution input")?;
    let (by, oy) = super::bind(&y, 0, total, caps, "im2col output")?;
    let k = |v: usize| v.to_string();
    Ok(vec![Dispatch {
        key: format!(
            "im2col_{c}x{h}x{w}_k{}x{}_s{}_p{}{}",
            g.kh,
            g.kw,
            g.stride,
            g.pad,
            half_suffix(&[&x, &y])
        ),
        template: "im2col",
        subst: vec![
            ("CKH", k(c * g.kh)),
            ("KH", k(g.kh)),
            ("KW", k(g.kw)),
            ("WO", k(wo)),
            ("S", k(g.stride)),
            ("PAD", k(g.pad)),
            ("H", k(h)),
            ("W", k(w)),
            ("CHW", k(c * h * w)),
            ("XTY", storage_ty(false, x.half).into()),
            ("YTY", storage_ty(false, y.half).into()),
        ],
        uniform: uniform(&[runs as u32, ox, oy, first as u32, (count * c * g.kh) as u32]),
        bindings: vec![bx, by],
        groups: grid(runs.div_ceil(WG_1D as u64), caps)?,
    }])
}

/// col2im, the adjoint of [`im2col`]: the gradient y [samples, c, h, w] of the images from
/// the gradient x [samples * count, c * kh * kw] of their patches for output pixels
/// [first, first + count).
#[allow(clippy::too_many_arguments)]
pub fn col2im(
    x: View,
    dims: [usize; 3],
    g: Conv2d,
    first: usize,
    count: usize,
    samples: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let [c, h, w] = dims;
    let (ho, wo) = g.out_size(h, w).ok_or_else(|| {
        crate::Error::shape(
            "col2im",
            format!("kernel {g:?} does not fit a {h}x{w} input"),
        )
    })?;
    if count == 0 || samples == 0 || first + count > ho * wo {
        return Err(crate::Error::shape(
            "col2im",
            format!(
                "pixels {first}..{} of {} in {samples} samples",
                first + count,
                ho * wo
            ),
        ));
    }
    let total = (samples * c * h * w) as u64;
    let (bx, ox) = bind_all(&x, caps, "patch gradient")?;
    let (by, oy) = super::bind(&y, 0, total, caps, "col2im output")?;
    let k = |v: usize| v.to_string();
    Ok(vec![Dispatch {
        key: format!(
            "col2im_{c}x{h}x{w}_k{}x{}_s{}_p{}",
            g.kh, g.kw, g.stride, g.pad
        ),
        template: "col2im",
        subst: vec![
            ("R", k(c * g.kh * g.kw)),
            ("KK", k(g.kh * g.kw)),
            ("KH", k(g.kh)),
            ("KW", k(g.kw)),
            ("HO", k(ho)),
            ("WO", k(wo)),
            ("S", k(g.stride)),
            ("PAD", k(g.pad)),
            ("H", k(h)),
            ("W", k(w)),
            ("CHW", k(c * h * w)),
            ("XTY", storage_ty(false, x.half).into()),
            ("YTY", storage_ty(false, y.half).into()),
        ],
        uniform: uniform(&[total as u32, ox, oy, first as u32, count as u32]),
        bindings: vec![bx, by],
        groups: grid(total.div_ceil(WG_1D as u64), caps)?,
    }])
}

/// Fused attention forward: o = softmax(q k^T * scale) v with q, o [bh, tq, dh] and k, v
/// [bh, tk, dh], one invocation per query row with an online softmax (no score matrix).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: View,
    k: View,
    v: View,
    o: View,
    dims: [usize; 4],
    scale: f32,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let [bh, tq, tk, dh] = dims;
    check_half(&[&q, &k, &v, &o], caps, "attention")?;
    let halves = half_suffix(&[&q, &k, &v, &o]);
    let types = |vec: bool| {
        vec![
            ("Q_TY", storage_ty(vec, q.half).to_string()),
            ("K_TY", storage_ty(vec, k.half).to_string()),
            ("V_TY", storage_ty(vec, v.half).to_string()),
            ("O_TY", storage_ty(vec, o.half).to_string()),
        ]
    };
    let (bq, oq) = bind_all(&q, caps, "attention queries")?;
    let (bk, ok) = bind_all(&k, caps, "attention keys")?;
    let (bv, ov) = bind_all(&v, caps, "attention values")?;
    let (bo, oo) = bind_all(&o, caps, "attention output")?;
    // The unrolled vec4 kernel when rows and offsets align (every SD head width).
    if super::vec4_ok(dh as u64, &[oq, ok, ov, oo]) && dh <= 512 {
        let n4 = dh / 4;
        // Query rows per invocation: on CPU adapters more rows share each loaded key (every
        // storage load is a per-lane loop there; 2-5x faster at SD's widths, docs/benchmarks.md).
        // GPUs keep one row, so the query and accumulator stay in registers.
        let r = match (caps.is_cpu, dh) {
            (false, _) => 1,
            (true, 0..=48) => 8,
            (true, 49..=80) => 4,
            (true, 81..=160) => 2,
            _ => 1,
        };
        let mut load_q = String::new();
        let mut step = String::new();
        let mut store = String::new();
        for row in 0..r {
            load_q += &format!(
                "    let qb{row} = p.off_q + (b * p.tq + min(row0 + {row}u, p.tq - 1u)) * {n4}u;\n    var m{row} = -3.0e38;\n    var l{row} = 0.0;\n"
            );
            for i in 0..n4 {
                load_q += &format!(
                    "    let q{row}_{i} = vec4<f32>(qs[qb{row} + {i}u]) * p.scale;\n    var a{row}_{i} = vec4<f32>(0.0);\n"
                );
            }
            store += &format!(
                "    if (row0 + {row}u < p.tq) {{\n        let ob = p.off_o + (b * p.tq + row0 + {row}u) * {n4}u;\n        let inv = 1.0 / l{row};\n"
            );
            for i in 0..n4 {
                store += &format!(
                    "        os[ob + {i}u] = {}(a{row}_{i} * inv);\n",
                    storage_ty(true, o.half)
                );
            }
            store += "    }\n";
        }
        for i in 0..n4 {
            step += &format!("        let k{i} = vec4<f32>(ks[kr + {i}u]);\n");
        }
        for row in 0..r {
            let dot: Vec<String> = (0..n4).map(|i| format!("dot(q{row}_{i}, k{i})")).collect();
            step += &format!(
                "        let s{row} = {};\n        let mn{row} = max(m{row}, s{row});\n        let c{row} = exp(m{row} - mn{row});\n        let e{row} = exp(s{row} - mn{row});\n        l{row} = l{row} * c{row} + e{row};\n        m{row} = mn{row};\n",
                dot.join(" + ")
            );
        }
        for i in 0..n4 {
            step += &format!("        let v{i} = vec4<f32>(vs[vr + {i}u]);\n");
            for row in 0..r {
                step += &format!("        a{row}_{i} = a{row}_{i} * c{row} + e{row} * v{i};\n");
            }
        }
        return Ok(vec![Dispatch {
            key: format!("attention_v4_dh{dh}_r{r}{halves}"),
            template: "attention_v4",
            subst: [
                ("N4", n4.to_string()),
                ("R", r.to_string()),
                ("LOAD_Q", load_q),
                ("STEP", step),
                ("STORE", store),
            ]
            .into_iter()
            .chain(types(true))
            .collect(),
            uniform: uniform(&[
                bh as u32,
                tq as u32,
                tk as u32,
                oq / 4,
                ok / 4,
                ov / 4,
                oo / 4,
                scale.to_bits(),
            ]),
            bindings: vec![bq, bk, bv, bo],
            groups: attention_grid(bh, tq.div_ceil(r), caps)?,
        }]);
    }
    Ok(vec![Dispatch {
        key: format!("attention_dh{dh}{halves}"),
        template: "attention",
        subst: [("DH", dh.to_string())]
            .into_iter()
            .chain(types(false))
            .collect(),
        uniform: uniform(&[
            bh as u32,
            tq as u32,
            tk as u32,
            oq,
            ok,
            ov,
            oo,
            scale.to_bits(),
        ]),
        bindings: vec![bq, bk, bv, bo],
        groups: attention_grid(bh, tq, caps)?,
    }])
}

/// Workgroups of 64 queries along x, one batch-head per y.
fn attention_grid(bh: usize, tq: usize, caps: &Caps) -> Result<[u32; 3]> {
    let x = tq.div_ceil(64);
    if x > caps.max_workgroups as usize || bh > caps.max_workgroups as usize {
        return Err(crate::Error::shape(
            "attention",
            format!("{bh} batch-heads of {tq} queries exceed the device's workgroup grid"),
        ));
    }
    Ok([x as u32, bh as u32, 1])
}

/// dtable = scatter-add of dy rows into a `[vocab, dim]` table (no atomics).
pub fn gather_grad(
    idx: View,
    dy: View,
    vocab: usize,
    dim: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let n = idx.len as usize;
    let (bi, oi) = bind_all(&idx, caps, "indices")?;
    let (bd, od) = bind_all(&dy, caps, "gradient")?;
    let (by, oy) = bind_all(&y, caps, "table gradient")?;
    let groups = grid(((vocab * dim) as u64).div_ceil(WG_1D as u64), caps)?;
    Ok(super::chunks(n, super::LOOP_CHUNK)
        .map(|(j0, j1)| Dispatch {
            key: "gather_grad".into(),
            template: "gather_grad",
            subst: vec![],
            uniform: uniform(&[
                j1 as u32,
                dim as u32,
                vocab as u32,
                oi,
                od,
                oy,
                j0 as u32,
                u32::from(j0 > 0),
            ]),
            bindings: vec![bi, bd, by],
            groups,
        })
        .collect())
}

/// dtable from a host-built index of the positions per table row (see
/// [`embedding_index`]): O(vocab * dim + n * dim) instead of O(vocab * dim * n).
pub fn gather_grad_csr(
    offsets: View,
    rows: View,
    dy: View,
    vocab: usize,
    dim: usize,
    y: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    let n = rows.len as usize;
    let (bo, oo) = bind_all(&offsets, caps, "index offsets")?;
    let (br, or) = bind_all(&rows, caps, "index rows")?;
    let (bd, od) = bind_all(&dy, caps, "gradient")?;
    let (by, oy) = bind_all(&y, caps, "table gradient")?;
    Ok(vec![Dispatch {
        key: "gather_grad_csr".into(),
        template: "gather_grad_csr",
        subst: vec![],
        uniform: uniform(&[n as u32, dim as u32, vocab as u32, oo, or, od, oy, 0]),
        bindings: vec![bo, br, bd, by],
        groups: grid(((vocab * dim) as u64).div_ceil(WG_1D as u64), caps)?,
    }])
}

/// The index [`gather_grad_csr`] reads for ids `idx` into a table of `vocab` rows: offsets
/// [vocab + 1] and the positions sorted by id [idx.len()]. Ids past the table are clamped
/// to its last row, as the gather does.
pub fn embedding_index(idx: &[u32], vocab: usize) -> (Vec<u32>, Vec<u32>) {
    let row = |i: u32| (i as usize).min(vocab.saturating_sub(1));
    let mut offsets = vec![0u32; vocab + 1];
    for &i in idx {
        offsets[row(i) + 1] += 1;
    }
    for v in 0..vocab {
        offsets[v + 1] += offsets[v];
    }
    let mut fill = offsets.clone();
    let mut rows = vec![0u32; idx.len()];
    for (pos, &i) in idx.iter().enumerate() {
        let r = row(i);
        rows[fill[r] as usize] = pos as u32;
        fill[r] += 1;
    }
    (offsets, rows)
}
