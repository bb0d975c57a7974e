//! Every differentiable op's backward rule against central finite differences of the f64
//! CPU reference, then the same gradient graph on the GPU against the CPU.

mod common;

use std::collections::HashMap;

use common::{assert_close, gpu, input, run_cpu, run_gpu, Feeds, Rng};
use stablerep::graph::{DType, Graph, NodeId};
use stablerep::kernels::catalog::unary_ops;
use stablerep::kernels::elementwise::{BinaryOp, UnaryOp};
use stablerep::kernels::reduce::ReduceOp;
use stablerep::kernels::reduce::RowOp;
use stablerep::models::losses::multi_positive_loss;

/// loss = sum(y * r) for a fixed random r, so every output element matters.
fn weighted_loss(g: &mut Graph, f: &mut Feeds, rng: &mut Rng, y: NodeId) -> NodeId {
    let s = g.shape(y).to_vec();
    let r = g.input(&format!("r{}", g.nodes.len()), &s);
    f.insert(r, rng.vec(s.iter().product(), -1.0, 1.0));
    let p = g.mul(y, r).unwrap();
    g.sum_all(p).unwrap()
}

/// Checks d loss / d wrt three ways: analytic (CPU) vs finite differences, and GPU vs CPU.
fn grad_check(what: &str, g: &mut Graph, f: &Feeds, loss: NodeId, wrt: &[NodeId], fd_tol: f64) {
    let grads = g.grad(loss, wrt).unwrap();
    let analytic = run_cpu(g, f, &HashMap::new(), &grads);
    let h = 1e-5;
    for (k, &w) in wrt.iter().enumerate() {
        let n = f[&w].len();
        let step = (n / 12).max(1);
        for i in (0..n).step_by(step) {
            let eval = |delta: f64| {
                let mut ff = f.clone();
                ff.get_mut(&w).unwrap()[i] += delta;
                run_cpu(g, &ff, &HashMap::new(), &[loss])[0][0]
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            let an = analytic[k][i];
            assert!(
                (fd - an).abs() <= fd_tol * (1.0 + fd.abs()),
                "{what}: d/d(input {k})[{i}] analytic {an} vs finite difference {fd}"
            );
        }
    }
    let (gpu, _lock) = gpu();
    let got = run_gpu(&gpu, g, f, &HashMap::new(), &grads);
    for (k, (a, b)) in got.iter().zip(&analytic).enumerate() {
        assert_close(&format!("{what}: GPU gradient {k}"), a, b, 2e-4, 2e-5);
    }
}

#[test]
fn matmul_gradients_all_layouts() {
    let mut rng = Rng(11);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let (b, m, n, k) = (2, 5, 7, 6);
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let a = input(
            &mut g,
            &mut f,
            &mut rng,
            &if ta { [b, k, m] } else { [b, m, k] },
            -1.0,
            1.0,
        );
        let w = input(
            &mut g,
            &mut f,
            &mut rng,
            &if tb { [b, n, k] } else { [b, k, n] },
            -1.0,
            1.0,
        );
        let y = g.matmul_t(a, w, ta, tb).unwrap();
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(
            &format!("matmul ta={ta} tb={tb}"),
            &mut g,
            &f,
            l,
            &[a, w],
            1e-6,
        );
    }
    for tb in [false, true] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let a = input(&mut g, &mut f, &mut rng, &[3, 4, 5], -1.0, 1.0);
        let w = input(
            &mut g,
            &mut f,
            &mut rng,
            &if tb { [6, 5] } else { [5, 6] },
            -1.0,
            1.0,
        );
        let y = g.matmul_t(a, w, false, tb).unwrap();
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(
            &format!("matmul shared weight tb={tb}"),
            &mut g,
            &f,
            l,
            &[a, w],
            1e-6,
        );
    }
}

#[test]
fn unary_gradients() {
    let mut rng = Rng(12);
    for op in unary_ops() {
        let (lo, hi) = match op {
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Pow(_) | UnaryOp::Recip => {
                (0.3, 2.0)
            }
            // Keep away from the kinks of relu/abs/clamp.
            UnaryOp::Relu | UnaryOp::Abs => (0.05, 2.0),
            UnaryOp::Clamp(..) => (-0.4, 0.4),
            _ => (-2.0, 2.0),
        };
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[9], lo, hi);
        if matches!(op, UnaryOp::Relu | UnaryOp::Abs) {
            // Exercise the negative side too, away from zero.
            let v: Vec<f64> = f[&x]
                .iter()
                .enumerate()
                .map(|(i, &v)| if i % 2 == 0 { -v } else { v })
                .collect();
            f.insert(x, v);
        }
        let y = g.unary(op, x).unwrap();
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(&format!("unary {op:?}"), &mut g, &f, l, &[x], 1e-6);
    }
}

/// Every elementwise op's single definition (`kernels::expr`) against PyTorch in float64
/// (`tests/fixtures/elementwise.safetensors`, `tools/make_fixtures.py elementwise`): the CPU
/// reference's values and derived gradients, then the GPU's unary kernel, the fused kernel
/// (the op inside a chain, its scalars as literals) and the gradient kernel (`UnaryGrad`).
#[test]
fn elementwise_ops_match_pytorch_values_and_gradients() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/elementwise.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let get = |k: &str| -> Vec<f64> {
        let t = st.tensor(k).unwrap_or_else(|_| panic!("fixture key {k}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F64, "{k}");
        t.data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (gpu, _lock) = gpu();
    for op in unary_ops() {
        let name = op.name();
        let (x, y, dy, dx) = (
            get(&format!("{name}.x")),
            get(&format!("{name}.y")),
            get(&format!("{name}.dy")),
            get(&format!("{name}.dx")),
        );
        for i in 0..x.len() {
            let (v, g) = (
                stablerep::cpu::unary(op, x[i]),
                stablerep::cpu::unary_grad(op, x[i], dy[i]),
            );
            assert!(
                (v - y[i]).abs() <= 1e-12 + 1e-10 * y[i].abs(),
                "{name}({}) = {v}, PyTorch {}",
                x[i],
                y[i]
            );
            assert!(
                (g - dx[i]).abs() <= 1e-12 + 1e-10 * dx[i].abs(),
                "{name}'({}) * {} = {g}, PyTorch {}",
                x[i],
                dy[i],
                dx[i]
            );
        }
        let n = x.len();
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let xi = g.input("x", &[n]);
        let dyi = g.input("dy", &[n]);
        let zi = g.input("zeros", &[n]);
        f.insert(xi, x.clone());
        f.insert(dyi, dy.clone());
        f.insert(zi, vec![0.0; n]);
        let yo = g.unary(op, xi).unwrap();
        let inner = g.unary(op, xi).unwrap();
        let fused = g.binary(BinaryOp::Add, inner, zi).unwrap();
        let go = g.binary(BinaryOp::UnaryGrad(op), xi, dyi).unwrap();
        let out = run_gpu(&gpu, &g, &f, &HashMap::new(), &[yo, fused, go]);
        // The inputs are rounded to f32 first: their relative error 6e-8 grows by the op's
        // condition number (exp(9): 9x), well inside these bounds.
        assert_close(&format!("gpu {name}"), &out[0], &y, 2e-5, 2e-6);
        assert_close(&format!("gpu fused {name}"), &out[1], &y, 2e-5, 2e-6);
        assert_close(&format!("gpu {name} gradient"), &out[2], &dx, 2e-5, 2e-6);
    }
}

#[test]
fn binary_gradients_with_broadcasting() {
    let mut rng = Rng(13);
    for name in ["add", "sub", "mul", "div"] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let a = input(&mut g, &mut f, &mut rng, &[3, 4, 5], 0.5, 2.0);
        let b = input(&mut g, &mut f, &mut rng, &[4, 1], 0.5, 2.0);
        let y = match name {
            "add" => g.add(a, b),
            "sub" => g.sub(a, b),
            "mul" => g.mul(a, b),
            _ => g.div(a, b),
        }
        .unwrap();
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(&format!("binary {name}"), &mut g, &f, l, &[a, b], 1e-6);
    }
}

#[test]
fn reduction_and_layout_gradients() {
    let mut rng = Rng(14);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        for axis in 0..3 {
            let mut g = Graph::new();
            let mut f = Feeds::new();
            let x = input(&mut g, &mut f, &mut rng, &[3, 4, 5], -1.0, 1.0);
            let y = g.reduce(op, x, axis).unwrap();
            let l = weighted_loss(&mut g, &mut f, &mut rng, y);
            grad_check(
                &format!("reduce {op:?} axis {axis}"),
                &mut g,
                &f,
                l,
                &[x],
                1e-6,
            );
        }
    }
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let x = input(&mut g, &mut f, &mut rng, &[3, 4, 5], -1.0, 1.0);
    let z = input(&mut g, &mut f, &mut rng, &[3, 2, 5], -1.0, 1.0);
    let v = input(&mut g, &mut f, &mut rng, &[4, 1], -1.0, 1.0);
    let p = g.permute(x, &[2, 0, 1]).unwrap();
    let p = g.reshape(p, &[5, 12]).unwrap();
    let s = g.slice(x, 1, 1, 2).unwrap();
    let c = g.concat(&[s, z, x], 1).unwrap();
    let pd = g.pad(z, 2, 3, 9).unwrap();
    let e = g.expand(v, &[3, 4, 5]).unwrap();
    let st = g.sum_to(x, &[4, 1]).unwrap();
    let l1 = weighted_loss(&mut g, &mut f, &mut rng, p);
    let l2 = weighted_loss(&mut g, &mut f, &mut rng, c);
    let l3 = weighted_loss(&mut g, &mut f, &mut rng, pd);
    let l4 = weighted_loss(&mut g, &mut f, &mut rng, e);
    let l5 = weighted_loss(&mut g, &mut f, &mut rng, st);
    let l = g.add(l1, l2).unwrap();
    let l = g.add(l, l3).unwrap();
    let l = g.add(l, l4).unwrap();
    let l = g.add(l, l5).unwrap();
    grad_check("layout ops", &mut g, &f, l, &[x, z, v], 1e-6);
}

#[test]
fn row_norm_gather_and_cross_entropy_gradients() {
    let mut rng = Rng(15);
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let x = input(&mut g, &mut f, &mut rng, &[6, 7], -2.0, 2.0);
    let gamma = input(&mut g, &mut f, &mut rng, &[7], 0.5, 1.5);
    let beta = input(&mut g, &mut f, &mut rng, &[7], -0.5, 0.5);
    let sm = g.softmax(x).unwrap();
    let ls = g.log_softmax(x).unwrap();
    let l2 = g.l2_normalize(x).unwrap();
    let ln = g.layer_norm(x, gamma, beta, 1e-6).unwrap();
    let (bn, _) = g.batch_norm(x, gamma, beta, 2, 1e-5).unwrap();
    let sq = g.reshape(x, &[1, 6, 7]).unwrap();
    let sq = g.slice(sq, 2, 0, 6).unwrap();
    let cs = g.row(RowOp::CausalSoftmax, sq).unwrap();
    let mut total = None;
    for y in [sm, ls, l2, ln, bn, cs] {
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        total = Some(match total {
            None => l,
            Some(t) => g.add(t, l).unwrap(),
        });
    }
    grad_check(
        "row and norm ops",
        &mut g,
        &f,
        total.unwrap(),
        &[x, gamma, beta],
        1e-5,
    );

    let mut g = Graph::new();
    let mut f = Feeds::new();
    let table = input(&mut g, &mut f, &mut rng, &[5, 4], -1.0, 1.0);
    let idx = g.input_typed("idx", &[9], DType::U32);
    f.insert(idx, (0..9).map(|i| ((i * 3) % 5) as f64).collect());
    let e = g.gather(table, idx).unwrap();
    let labels = g.input_typed("labels", &[9], DType::U32);
    f.insert(labels, (0..9).map(|i| (i % 4) as f64).collect());
    let ce = g.cross_entropy(e, labels).unwrap();
    let l = g.mean_all(ce).unwrap();
    grad_check("gather + cross-entropy", &mut g, &f, l, &[table], 1e-6);

    // The embedding form (host-built index for the backward pass), ids repeated and missing
    // (an id past the table is refused when written: tests/kernels.rs).
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let table = input(&mut g, &mut f, &mut rng, &[7, 3], -1.0, 1.0);
    let idx = g.input_typed("ids", &[11], DType::U32);
    let ids: Vec<u32> = vec![4, 0, 4, 6, 5, 2, 4, 0, 6, 1, 4];
    f.insert(idx, ids.iter().map(|&i| i as f64).collect());
    let (e, offsets, rows) = g.embedding("emb", table, idx).unwrap();
    let (o, r) = stablerep::kernels::layout::embedding_index(&ids, 7);
    f.insert(offsets, o.iter().map(|&i| i as f64).collect());
    f.insert(rows, r.iter().map(|&i| i as f64).collect());
    let l = weighted_loss(&mut g, &mut f, &mut rng, e);
    grad_check("embedding", &mut g, &f, l, &[table], 1e-6);
}

#[test]
fn non_differentiable_ops_are_reported() {
    let mut g = Graph::new();
    let a = g.input("a", &[3]);
    let b = g.input("b", &[3]);
    let m = g
        .binary(stablerep::kernels::elementwise::BinaryOp::Max, a, b)
        .unwrap();
    let l = g.sum_all(m).unwrap();
    let err = g.grad(l, &[a]).unwrap_err();
    assert!(err.to_string().contains("not differentiable"), "{err}");
}

#[test]
fn gradients_of_disjoint_slices_become_one_concat() {
    let mut rng = Rng(16);
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let x = input(&mut g, &mut f, &mut rng, &[3, 7, 2], -1.0, 1.0);
    // Pieces 0..2, 2..3 and 5..7 along axis 1 (a gap at 3..5), like a fused qkv split.
    let a = g.slice(x, 1, 0, 2).unwrap();
    let b = g.slice(x, 1, 2, 1).unwrap();
    let c = g.slice(x, 1, 5, 2).unwrap();
    let la = weighted_loss(&mut g, &mut f, &mut rng, a);
    let lb = weighted_loss(&mut g, &mut f, &mut rng, b);
    let lc = weighted_loss(&mut g, &mut f, &mut rng, c);
    let l = g.add(la, lb).unwrap();
    let l = g.add(l, lc).unwrap();
    let before = g.nodes.len();
    grad_check("disjoint slices", &mut g, &f, l, &[x], 1e-6);
    let concat_used = g.nodes[before..]
        .iter()
        .any(|n| matches!(n.op, stablerep::graph::Op::Concat { .. }));
    assert!(
        concat_used,
        "slice gradients should be combined by a concat"
    );
}

#[test]
fn long_reduction_gradients_through_the_two_stage_split() {
    let mut rng = Rng(18);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[2, 4800], -1.0, 1.0);
        let y = g.reduce(op, x, 1).unwrap();
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(&format!("long reduce {op:?}"), &mut g, &f, l, &[x], 1e-6);
    }
}

#[test]
fn layernorm_parameter_gradients_over_many_rows() {
    // More than 4,096 rows: the column sums for gamma/beta run over row chunks.
    let mut rng = Rng(19);
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let x = input(&mut g, &mut f, &mut rng, &[4608, 6], -2.0, 2.0);
    let gamma = input(&mut g, &mut f, &mut rng, &[6], 0.5, 1.5);
    let beta = input(&mut g, &mut f, &mut rng, &[6], -0.5, 0.5);
    let y = g.layer_norm(x, gamma, beta, 1e-6).unwrap();
    let l = weighted_loss(&mut g, &mut f, &mut rng, y);
    let before = g.nodes.len();
    grad_check(
        "layernorm over 4608 rows",
        &mut g,
        &f,
        l,
        &[x, gamma, beta],
        1e-5,
    );
    let chunked = g.nodes[before..]
        .iter()
        .any(|n| matches!(n.op, stablerep::graph::Op::ColGrad { groups, .. } if groups > 1));
    assert!(chunked, "column sums over 4608 rows should be chunked");
}

#[test]
fn multi_positive_loss_gradient() {
    let mut rng = Rng(20);
    for (n, m) in [(3, 4), (5, 2), (2, 1)] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let h = input(&mut g, &mut f, &mut rng, &[n * m, 6], -1.0, 1.0);
        let l = multi_positive_loss(&mut g, h, n, 0.1).unwrap();
        grad_check(
            &format!("multi-positive loss n={n} m={m}"),
            &mut g,
            &f,
            l,
            &[h],
            1e-5,
        );
    }
}

#[test]
fn convolution_gradients_through_im2col_and_its_chunks() {
    let mut rng = Rng(31);
    // Strides, padding, 1x1 and a 3x3 on a non-square input. The patch limit picks the path:
    // 0 (32 MiB) batches all samples in one im2col, 4400 bytes groups two of three samples,
    // 200 splits each sample's patches into single-pixel chunks whose gradients meet in one
    // image.
    for (k, stride, pad, limit) in [
        (3, 1, 1, 0),
        (3, 2, 1, 0),
        (3, 1, 1, 200),
        (3, 1, 1, 4400),
        (1, 1, 0, 0),
        (2, 2, 0, 96),
    ] {
        let mut g = Graph::new();
        g.conv_patch_bytes = limit;
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[3, 3, 5, 4], -1.0, 1.0);
        let w = input(&mut g, &mut f, &mut rng, &[4, 3, k, k], -0.5, 0.5);
        let b = input(&mut g, &mut f, &mut rng, &[4], -0.5, 0.5);
        let y = g.conv2d(x, w, Some(b), stride, pad).unwrap();
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(
            &format!("conv2d k{k} s{stride} p{pad} limit {limit}"),
            &mut g,
            &f,
            l,
            &[x, w, b],
            1e-6,
        );
    }
}

#[test]
fn col2im_is_the_adjoint_of_im2col() {
    // <im2col(x), p> = <x, col2im(p)> for random x and p, on the CPU and the GPU.
    let mut rng = Rng(32);
    let geom = stablerep::kernels::layout::Conv2d {
        kh: 3,
        kw: 2,
        stride: 2,
        pad: 1,
    };
    let mut g = Graph::new();
    let mut f = Feeds::new();
    // Samples 1 and 2 of three, pixels 3..12 of each.
    let x = input(&mut g, &mut f, &mut rng, &[3, 3, 7, 6], -1.0, 1.0);
    let cols = g.im2col(x, geom, 1, 2, 3, 9).unwrap();
    let p = input(&mut g, &mut f, &mut rng, &[18, 18], -1.0, 1.0);
    let back = g.col2im(p, geom, 3, 2, [3, 7, 6]).unwrap();
    let cpu = run_cpu(&g, &f, &HashMap::new(), &[cols, back]);
    let lhs: f64 = cpu[0].iter().zip(&f[&p]).map(|(a, b)| a * b).sum();
    let rhs: f64 = cpu[1]
        .iter()
        .zip(&f[&x][3 * 7 * 6..])
        .map(|(a, b)| a * b)
        .sum();
    assert!((lhs - rhs).abs() < 1e-9, "{lhs} vs {rhs}");
    let (gpu, _lock) = gpu();
    let got = run_gpu(&gpu, &g, &f, &HashMap::new(), &[back]);
    assert_close("col2im on the GPU", &got[0], &cpu[1], 1e-5, 1e-6);
}

#[test]
fn group_norm_gradients_with_and_without_silu() {
    let mut rng = Rng(33);
    for (groups, silu) in [(2, false), (3, true), (1, true)] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[2, 6, 3, 5], -2.0, 3.0);
        let gamma = input(&mut g, &mut f, &mut rng, &[6], 0.5, 1.5);
        let beta = input(&mut g, &mut f, &mut rng, &[6], -0.5, 0.5);
        let y = g.group_norm(x, gamma, beta, groups, 1e-5, silu).unwrap();
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(
            &format!("group_norm {groups} groups silu {silu}"),
            &mut g,
            &f,
            l,
            &[x, gamma, beta],
            1e-5,
        );
    }
}

#[test]
fn fused_attention_gradients() {
    let mut rng = Rng(34);
    // Head widths for both kernels (vec4 and scalar), more keys than queries and fewer.
    for (bh, tq, tk, d) in [(3, 5, 7, 4), (2, 6, 3, 6), (1, 9, 9, 8)] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let q = input(&mut g, &mut f, &mut rng, &[bh, tq, d], -1.0, 1.0);
        let k = input(&mut g, &mut f, &mut rng, &[bh, tk, d], -1.0, 1.0);
        let v = input(&mut g, &mut f, &mut rng, &[bh, tk, d], -1.0, 1.0);
        let y = g.attention(q, k, v, 1.0 / (d as f32).sqrt()).unwrap();
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(
            &format!("attention {bh}x{tq}x{tk}x{d}"),
            &mut g,
            &f,
            l,
            &[q, k, v],
            1e-6,
        );
    }
}

#[test]
fn head_attention_on_qkv_rows_forward_and_gradients() {
    let mut rng = Rng(35);
    // (sequences, tokens, heads, head width, causal): vec4 and scalar head rows, one token,
    // causal and not, more workgroups than one (2 x 40 x 2 query rows) for the grad kernel's
    // split between query-row and key-row workgroups.
    for (b, t, nh, dh, causal) in [
        (2, 5, 3, 4, false),
        (1, 7, 2, 5, true),
        (3, 1, 1, 8, false),
        (2, 40, 2, 4, true),
        (2, 6, 2, 3, false),
    ] {
        let what = format!("head attention b{b} t{t} h{nh} dh{dh} causal {causal}");
        let d = nh * dh;
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let qkv = input(&mut g, &mut f, &mut rng, &[b * t, 3 * d], -1.5, 1.5);
        let y = g
            .head_attention(qkv, t, nh, 1.0 / (dh as f32).sqrt(), causal)
            .unwrap();
        // The forward on the GPU against the f64 reference, and the reference against the
        // unfused composition (split heads, score matmul, softmax, value matmul, merge).
        let want = run_cpu(&g, &f, &HashMap::new(), &[y]);
        {
            let (gpu, _lock) = gpu();
            let got = run_gpu(&gpu, &g, &f, &HashMap::new(), &[y]);
            assert_close(&format!("{what}: forward"), &got[0], &want[0], 2e-5, 2e-6);
        }
        let mut u = g.clone();
        let x = u.reshape(qkv, &[b, t, 3, nh, dh]).unwrap();
        let x = u.permute(x, &[2, 0, 3, 1, 4]).unwrap();
        let x = u.reshape(x, &[3, b * nh, t, dh]).unwrap();
        let parts: Vec<NodeId> = (0..3)
            .map(|k| {
                let s = u.slice(x, 0, k, 1).unwrap();
                u.reshape(s, &[b * nh, t, dh]).unwrap()
            })
            .collect();
        let s = u.matmul_t(parts[0], parts[1], false, true).unwrap();
        let s = u.affine(s, 1.0 / (dh as f32).sqrt(), 0.0).unwrap();
        let a = if causal {
            u.row(RowOp::CausalSoftmax, s).unwrap()
        } else {
            u.softmax(s).unwrap()
        };
        let o = u.matmul(a, parts[2]).unwrap();
        let o = u.reshape(o, &[b, nh, t, dh]).unwrap();
        let o = u.permute(o, &[0, 2, 1, 3]).unwrap();
        let o = u.reshape(o, &[b * t, d]).unwrap();
        let unfused = run_cpu(&u, &f, &HashMap::new(), &[o]);
        for (a, c) in unfused[0].iter().zip(&want[0]) {
            assert!((a - c).abs() < 1e-12, "{what}: reference vs unfused");
        }
        let l = weighted_loss(&mut g, &mut f, &mut rng, y);
        grad_check(&what, &mut g, &f, l, &[qkv], 1e-6);
    }
}

#[test]
fn head_attention_rejects_bad_geometry() {
    let mut g = Graph::new();
    let x = g.input("qkv", &[10, 18]);
    for (t, h) in [(3, 1), (5, 4), (0, 1), (5, 0)] {
        let err = g
            .head_attention(x, t, h, 1.0, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("head attention"), "{err}");
    }
    assert!(g.head_attention(x, 5, 3, 1.0, false).is_ok());
}
