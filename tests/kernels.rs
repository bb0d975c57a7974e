//! Every kernel against the f64 CPU reference, through one-op graphs on awkward random shapes
//! (sizes not multiples of any tile), with every planned buffer poisoned with NaN first.

mod common;

use std::collections::HashMap;

use common::{assert_close, gpu, input, run_cpu, run_gpu, Feeds, Rng};
use stablerep::graph::{DType, Graph};
use stablerep::kernels::catalog::{binary_ops, unary_ops};
use stablerep::kernels::elementwise::{BinaryOp, UnaryOp};
use stablerep::kernels::reduce::{ReduceOp, RowOp};

use common::gpu_matches_cpu as check;

#[test]
fn matmul_all_layouts_random_shapes() {
    let mut rng = Rng(1);
    let mut cases: Vec<(usize, usize, usize, usize)> = (0..10)
        .map(|_| {
            (
                rng.int(1, 3),
                rng.int(1, 97),
                rng.int(1, 97),
                rng.int(1, 97),
            )
        })
        .collect();
    // Shapes that take the vec4 / subgroup fast paths, with edges that are not tile multiples.
    cases.extend([
        (1, 36, 44, 20),
        (2, 64, 72, 32),
        (1, 100, 12, 8),
        (3, 4, 4, 4),
        // Attention's per-head products at 17 tokens (the 4 x 4 tile, fast and edge paths).
        (3, 17, 17, 32),
        (2, 17, 32, 17),
        (2, 32, 32, 8),
    ]);
    for (ci, &(b, m, n, k)) in cases.iter().enumerate() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
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
            let bb = input(
                &mut g,
                &mut f,
                &mut rng,
                &if tb { [b, n, k] } else { [b, k, n] },
                -1.0,
                1.0,
            );
            let c = g.matmul_t(a, bb, ta, tb).unwrap();
            let tol = 1e-5 * (k as f64).sqrt();
            check(
                &format!("matmul case {ci} {b}x{m}x{n}x{k} ta={ta} tb={tb}"),
                &g,
                &f,
                &HashMap::new(),
                &[c],
                tol,
                tol,
            );
        }
    }
}

#[test]
fn matmul_with_a_fused_bias() {
    // `x W^T + b` (and `r + (x W^T + b)`) compiles to one matmul dispatch that adds b (and r)
    // in its stores; awkward shapes take
    // the checked scalar path, aligned ones the vec4 / subgroup kernels, a batched x the folded
    // rows; bias on either side of the add.
    let mut rng = Rng(21);
    for &(b, m, n, k, tb, bias_first, residual) in &[
        (1, 37, 29, 13, true, false, false),
        (1, 64, 40, 32, true, true, false),
        (3, 17, 24, 8, false, false, false),
        (2, 64, 96, 64, true, false, false),
        (1, 37, 29, 13, true, false, true),
        (2, 64, 96, 64, true, true, true),
        (3, 17, 24, 8, false, false, true),
    ] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[b, m, k], -1.0, 1.0);
        let w = input(
            &mut g,
            &mut f,
            &mut rng,
            &if tb { [n, k] } else { [k, n] },
            -1.0,
            1.0,
        );
        let bias = input(&mut g, &mut f, &mut rng, &[n], -1.0, 1.0);
        let y = g.matmul_t(x, w, false, tb).unwrap();
        let y = if bias_first {
            g.add(bias, y).unwrap()
        } else {
            g.add(y, bias).unwrap()
        };
        // A residual stream `x + (h W^T + b)` joins the same dispatch.
        let y = if residual {
            let r = input(&mut g, &mut f, &mut rng, &[b, m, n], -1.0, 1.0);
            if bias_first {
                g.add(y, r).unwrap()
            } else {
                g.add(r, y).unwrap()
            }
        } else {
            y
        };
        let (gpu, _lock) = gpu();
        let opts = stablerep::graph::PlanOptions {
            reuse: true,
            poison: true,
            updates: true,
            fuse: true,
            multi_update: true,
            colsum: true,
            f16_activations: false,
        };
        let (got, plan) = common::run_gpu_opts(&gpu, &g, &f, &HashMap::new(), &[y], opts);
        let keys = plan.kernel_keys();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].contains("_bias"), "{keys:?}");
        assert_eq!(keys[0].ends_with("_bias_res"), residual, "{keys:?}");
        let want = run_cpu(&g, &f, &HashMap::new(), &[y]);
        assert_close(
            &format!("matmul + bias {b}x{m}x{n}x{k}"),
            &got[0],
            &want[0],
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn weight_gradient_matmul_writes_the_bias_gradient() {
    // dW = dY^T X and db = sum over rows of dY compile to one matmul dispatch that also
    // writes db (no reduce kernel), on awkward shapes (the blocked kernel's checked and tail
    // paths), aligned ones (the subgroup kernel on CPU adapters) and a sum long enough to be
    // split in two stages; db is also read by a later op. With `colsum` off the sums run
    // separately and give the same values.
    let mut rng = Rng(23);
    for &(k, m, n) in &[
        (37, 13, 29),
        (64, 32, 40),
        (6, 4, 8),
        (2048, 24, 8),
        (1030, 36, 12),
    ] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let dy = input(&mut g, &mut f, &mut rng, &[k, m], -1.0, 1.0);
        let x = input(&mut g, &mut f, &mut rng, &[k, n], -1.0, 1.0);
        let db = g.sum_to(dy, &[m]).unwrap();
        let dw = g.matmul_t(dy, x, true, false).unwrap();
        let later = g.unary(UnaryOp::Tanh, db).unwrap();
        let want = run_cpu(&g, &f, &HashMap::new(), &[dw, db, later]);
        let (gpu, _lock) = gpu();
        for on in [true, false] {
            let opts = stablerep::graph::PlanOptions {
                poison: true,
                colsum: on,
                ..Default::default()
            };
            let (got, plan) =
                common::run_gpu_opts(&gpu, &g, &f, &HashMap::new(), &[dw, db, later], opts);
            let keys = plan.kernel_keys();
            let fused = keys.iter().filter(|k| k.contains("_colsum")).count();
            let sums = keys.iter().filter(|k| k.starts_with("reduce")).count();
            assert_eq!(
                (fused, sums == 0),
                (on as usize, on),
                "colsum {on}: {keys:?}"
            );
            let tol = 1e-5 * (k as f64).sqrt();
            for (name, (a, b)) in ["dW", "db", "tanh(db)"].iter().zip(got.iter().zip(&want)) {
                assert_close(&format!("{name} {k}x{m}x{n} colsum {on}"), a, b, tol, tol);
            }
        }
    }
}

#[test]
fn matmul_shared_right_operand() {
    let mut rng = Rng(2);
    for &(b, m, n, k, tb) in &[
        (3, 5, 7, 9, false),
        (2, 17, 8, 12, true),
        (4, 33, 20, 16, false),
    ] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let a = input(&mut g, &mut f, &mut rng, &[b, m, k], -1.0, 1.0);
        let w = input(
            &mut g,
            &mut f,
            &mut rng,
            &if tb { [n, k] } else { [k, n] },
            -1.0,
            1.0,
        );
        let c = g.matmul_t(a, w, false, tb).unwrap();
        check("matmul shared", &g, &f, &HashMap::new(), &[c], 1e-4, 1e-4);
    }
}

#[test]
fn unary_and_scalar_ops() {
    let mut rng = Rng(3);
    for (k, op) in unary_ops().into_iter().enumerate() {
        // Alternate vec4-aligned and ragged sizes so both kernel forms run.
        let n = if k % 2 == 0 {
            4 * rng.int(1, 40)
        } else {
            4 * rng.int(1, 40) + rng.int(1, 3)
        };
        let (lo, hi) = match op {
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Pow(_) | UnaryOp::Recip => {
                (0.2, 3.0)
            }
            _ => (-4.0, 4.0),
        };
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[n], lo, hi);
        let y = g.unary(op, x).unwrap();
        check(
            &format!("unary {op:?}"),
            &g,
            &f,
            &HashMap::new(),
            &[y],
            2e-5,
            2e-6,
        );
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    let mut rng = Rng(4);
    let shapes: [(&[usize], &[usize]); 9] = [
        (&[7, 13], &[7, 13]),
        (&[4, 8], &[4, 8]),
        (&[3, 8], &[8]),
        (&[3, 8], &[3, 1]),
        (&[2, 1, 12], &[2, 5, 12]),
        (&[3, 5, 11], &[11]),
        (&[3, 1, 11], &[1, 5, 1]),
        (&[2, 9, 1], &[9, 4]),
        (&[1], &[6, 5]),
    ];
    for op in binary_ops() {
        for (sa, sb) in shapes {
            let mut g = Graph::new();
            let mut f = Feeds::new();
            let (lo, hi) = match op {
                BinaryOp::UnaryGrad(
                    UnaryOp::Log
                    | UnaryOp::Sqrt
                    | UnaryOp::Rsqrt
                    | UnaryOp::Pow(_)
                    | UnaryOp::Recip,
                ) => (0.2, 3.0),
                BinaryOp::Div => (0.5, 2.0),
                _ => (-3.0, 3.0),
            };
            let a = input(&mut g, &mut f, &mut rng, sa, lo, hi);
            let b = input(&mut g, &mut f, &mut rng, sb, lo, hi);
            if op == BinaryOp::Eq {
                // Make some entries equal.
                let av = f[&a].clone();
                let bv: Vec<f64> = f[&b]
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| if i % 2 == 0 { av[i % av.len()] } else { v })
                    .collect();
                f.insert(b, bv);
            }
            let c = g.binary(op, a, b).unwrap();
            check(
                &format!("binary {op:?} {sa:?} {sb:?}"),
                &g,
                &f,
                &HashMap::new(),
                &[c],
                2e-5,
                2e-6,
            );
        }
    }
}

#[test]
fn reductions_along_each_axis() {
    let mut rng = Rng(5);
    for (op, vec4_inner) in [
        (ReduceOp::Sum, false),
        (ReduceOp::Mean, false),
        (ReduceOp::Max, false),
        (ReduceOp::Sum, true),
        (ReduceOp::Mean, true),
        (ReduceOp::Max, true),
    ] {
        // A last axis of 8 takes the vec4 kernel for axes 0 and 1.
        let shape = if vec4_inner {
            [rng.int(1, 7), rng.int(1, 33), 8]
        } else {
            [rng.int(1, 7), rng.int(1, 33), rng.int(1, 9)]
        };
        for axis in 0..3 {
            let mut g = Graph::new();
            let mut f = Feeds::new();
            let x = input(&mut g, &mut f, &mut rng, &shape, -2.0, 2.0);
            let y = g.reduce(op, x, axis).unwrap();
            check(
                &format!("reduce {op:?} axis {axis} {shape:?}"),
                &g,
                &f,
                &HashMap::new(),
                &[y],
                1e-5,
                1e-5,
            );
        }
    }
}

#[test]
fn layout_ops_permute_slice_pad_concat_expand_sum_to() {
    let mut rng = Rng(6);
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let x = input(&mut g, &mut f, &mut rng, &[3, 5, 7, 2], -1.0, 1.0);
    let p = g.permute(x, &[2, 0, 3, 1]).unwrap();
    let s = g.slice(x, 2, 2, 4).unwrap();
    let pd = g.pad(s, 1, 1, 9).unwrap();
    let y = input(&mut g, &mut f, &mut rng, &[3, 2, 7, 2], -1.0, 1.0);
    let c = g.concat(&[x, y, x], 1).unwrap();
    let z = input(&mut g, &mut f, &mut rng, &[5, 1, 2], -1.0, 1.0);
    let e = g.expand(z, &[3, 5, 7, 2]).unwrap();
    let st = g.sum_to(x, &[5, 1, 2]).unwrap();
    let r = g.reshape(p, &[7 * 3, 2 * 5]).unwrap();
    let t = g.transpose(r).unwrap();
    check(
        "layout",
        &g,
        &f,
        &HashMap::new(),
        &[p, s, pd, c, e, st, t],
        1e-6,
        1e-6,
    );
}

#[test]
fn row_ops_and_their_gradients() {
    let mut rng = Rng(7);
    for case in 0..5 {
        // Cases 3 and 4 have rows of a multiple of 4 (the vec4 bodies).
        let (r, c) = (rng.int(1, 40), rng.int(1, 97));
        let c = if case >= 3 { c / 4 * 4 + 4 } else { c };
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[r, c], -3.0, 3.0);
        let dy = input(&mut g, &mut f, &mut rng, &[r, c], -1.0, 1.0);
        let mut outs = Vec::new();
        for op in [RowOp::Softmax, RowOp::LogSoftmax, RowOp::L2Norm(1e-12)] {
            let y = g.row(op, x).unwrap();
            let a = if matches!(op, RowOp::L2Norm(_)) { x } else { y };
            let gr = g.push(
                stablerep::graph::Op::RowGrad(op),
                vec![a, dy],
                vec![r, c],
                DType::F32,
            );
            outs.extend([y, gr]);
        }
        outs.push(g.row(RowOp::LnStats(1e-6), x).unwrap());
        // Causal softmax over square score blocks [b, t, t].
        let (b, t) = (rng.int(1, 5), rng.int(1, 23));
        let t = if case >= 3 { t / 4 * 4 + 4 } else { t };
        let s = input(&mut g, &mut f, &mut rng, &[b, t, t], -3.0, 3.0);
        let ds = input(&mut g, &mut f, &mut rng, &[b, t, t], -1.0, 1.0);
        let y = g.row(RowOp::CausalSoftmax, s).unwrap();
        let gr = g.push(
            stablerep::graph::Op::RowGrad(RowOp::CausalSoftmax),
            vec![y, ds],
            vec![b, t, t],
            DType::F32,
        );
        outs.extend([y, gr]);
        check(
            &format!("row ops {r}x{c}"),
            &g,
            &f,
            &HashMap::new(),
            &outs,
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn layernorm_and_batchnorm_forward_and_backward_kernels() {
    let mut rng = Rng(8);
    for &(groups, rows, cols) in &[(1, 13, 7), (3, 5, 33), (2, 8, 64)] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[groups * rows, cols], -2.0, 2.0);
        let gamma = input(&mut g, &mut f, &mut rng, &[cols], 0.5, 1.5);
        let beta = input(&mut g, &mut f, &mut rng, &[cols], -0.5, 0.5);
        let dy = input(&mut g, &mut f, &mut rng, &[groups * rows, cols], -1.0, 1.0);
        let ln = g.layer_norm(x, gamma, beta, 1e-6).unwrap();
        let (bn, stats) = g.batch_norm(x, gamma, beta, groups, 1e-5).unwrap();
        let loss_ln = g.mul(ln, dy).unwrap();
        let loss_ln = g.sum_all(loss_ln).unwrap();
        let loss_bn = g.mul(bn, dy).unwrap();
        let loss_bn = g.sum_all(loss_bn).unwrap();
        let gl = g.grad(loss_ln, &[x, gamma, beta]).unwrap();
        let gb = g.grad(loss_bn, &[x, gamma, beta]).unwrap();
        let mut outs = vec![ln, bn, stats];
        outs.extend(gl);
        outs.extend(gb);
        check(
            &format!("norms {groups}x{rows}x{cols}"),
            &g,
            &f,
            &HashMap::new(),
            &outs,
            2e-4,
            2e-5,
        );
    }
}

#[test]
fn gather_cross_entropy_and_their_gradients() {
    let mut rng = Rng(9);
    let (vocab, dim, n) = (11, 13, 29);
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let table = input(&mut g, &mut f, &mut rng, &[vocab, dim], -1.0, 1.0);
    let idx = g.input_typed("idx", &[n], DType::U32);
    f.insert(idx, (0..n).map(|_| rng.int(0, vocab - 1) as f64).collect());
    let emb = g.gather(table, idx).unwrap();
    let labels = g.input_typed("labels", &[n], DType::U32);
    f.insert(labels, (0..n).map(|_| rng.int(0, dim - 1) as f64).collect());
    let ce = g.cross_entropy(emb, labels).unwrap();
    let loss = g.mean_all(ce).unwrap();
    let gt = g.grad(loss, &[table]).unwrap();
    check(
        "gather + cross-entropy",
        &g,
        &f,
        &HashMap::new(),
        &[emb, ce, loss, gt[0]],
        1e-4,
        1e-6,
    );
}

#[test]
fn optimizer_updates_match_reference() {
    // 77 elements take the scalar kernels, 80 the vec4 ones.
    for n in [77, 80] {
        optimizer_case(n);
    }
}

fn optimizer_case(n: usize) {
    use stablerep::kernels::optim::AdamW;
    let mut rng = Rng(10 + n as u64);
    let (gpu, lock) = gpu();
    let mut g = Graph::new();
    let p = g.param("w", &[n]);
    let q = g.param("v", &[n]);
    let u = g.param("u", &[n]);
    let x = g.input("x", &[n]);
    let a = g.mul(p, x).unwrap();
    let b = g.mul(q, x).unwrap();
    let c = g.mul(u, x).unwrap();
    let c = g.mul(c, x).unwrap();
    let loss = g.add(a, b).unwrap();
    let loss = g.add(loss, c).unwrap();
    let loss = g.sum_all(loss).unwrap();
    let grads = g.grad(loss, &[p, q, u]).unwrap();
    let cfg = AdamW {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: 0.1,
        clamp: Some([-0.3, 0.4]),
    };
    let hyper = g.adamw(&[p], &[grads[0]], cfg, &[true]).unwrap();
    let hs = g.sgd(&[q], &[grads[1]], 0.9, 0.01).unwrap();
    let ha = g.accumulate(&[u], &[grads[2]]).unwrap();
    let mut params = HashMap::new();
    params.insert("w".to_string(), rng.vec(n, -1.0, 1.0));
    params.insert("v".to_string(), rng.vec(n, -1.0, 1.0));
    params.insert("u".to_string(), rng.vec(n, -1.0, 1.0));
    let mut store = stablerep::graph::ParamStore::new();
    for (k, v) in &params {
        store
            .set(
                &gpu,
                k,
                &[n],
                &v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            )
            .unwrap();
    }
    let plan =
        stablerep::graph::Plan::compile(&gpu, &g, &[loss], &mut store, Default::default()).unwrap();
    // A NaN left in the accumulator: the first accumulation (beta 0) must overwrite it.
    let acc = stablerep::graph::accumulator_name("u");
    store.set(&gpu, &acc, &[n], &vec![f32::NAN; n]).unwrap();
    let mut cpu_params = params.clone();
    cpu_params.insert(acc.clone(), vec![f64::NAN; n]);
    let mut sum = vec![0.0f64; n];
    for step in 1..=3u32 {
        let xv = rng.vec(n, -1.0, 1.0);
        let h = stablerep::graph::adam_hyper(1e-2, &cfg, step);
        plan.write(x, &xv.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .unwrap();
        plan.write(hyper, &h).unwrap();
        plan.write(hs, &[0.05]).unwrap();
        // beta: 0 starts a sum (the first step), 1 adds to it.
        let beta = if step == 1 { 0.0 } else { 1.0 };
        plan.write(ha, &[beta]).unwrap();
        plan.run().unwrap();
        // The sum of d/du of sum(u x^2) = x^2 over the steps, by hand.
        for (s, v) in sum.iter_mut().zip(&xv) {
            *s += v * v;
        }
        let mut feeds = HashMap::new();
        feeds.insert(x, xv);
        feeds.insert(hyper, h.iter().map(|&v| v as f64).collect());
        feeds.insert(hs, vec![0.05f32 as f64]);
        feeds.insert(ha, vec![beta as f64]);
        stablerep::cpu::eval(&g, &feeds, &mut cpu_params).unwrap();
    }
    for name in [
        "w",
        "v",
        "optimizer.w.exp_avg",
        "optimizer.w.exp_avg_sq",
        "optimizer.v.momentum_buffer",
        acc.as_str(),
    ] {
        let got = store.read(name).unwrap();
        assert_close(name, &got, &cpu_params[name], 1e-4, 1e-6);
    }
    assert_close(
        "the accumulated sum",
        &store.read(&acc).unwrap(),
        &sum,
        1e-4,
        1e-6,
    );
    drop(lock);
}

#[test]
fn long_reductions_run_in_two_stages() {
    let mut rng = Rng(17);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &[3, 4800], -1.0, 1.0);
        let before = g.nodes.len();
        let y = g.reduce(op, x, 1).unwrap();
        let reduces = g.nodes[before..]
            .iter()
            .filter(|n| matches!(n.op, stablerep::graph::Op::Reduce { .. }))
            .count();
        assert_eq!(
            reduces, 2,
            "{op:?}: a 4800-long reduction into 3 outputs should split"
        );
        check(
            &format!("long reduce {op:?}"),
            &g,
            &f,
            &HashMap::new(),
            &[y],
            1e-5,
            1e-4,
        );
    }
    // Bias-gradient shape: [rows, C] summed to [C].
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let x = input(&mut g, &mut f, &mut rng, &[4096, 12], -1.0, 1.0);
    let y = g.sum_to(x, &[12]).unwrap();
    check("long sum_to", &g, &f, &HashMap::new(), &[y], 1e-5, 1e-4);
    // A convolution's bias-gradient shape: [N, C, H, W] to [C, 1, 1], in two stages (the
    // inner dims, then the batch), and a vec4-aligned one.
    for shape in [[6usize, 5, 7, 9], [8, 3, 4, 16]] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &shape, -1.0, 1.0);
        let y = g.sum_to(x, &[shape[1], 1, 1]).unwrap();
        assert_eq!(
            g.nodes
                .iter()
                .filter(|n| n.op == stablerep::graph::Op::SumTo)
                .count(),
            0,
            "both stages are row reductions (the inner dims, then the batch)"
        );
        check(
            &format!("two-stage sum_to {shape:?}"),
            &g,
            &f,
            &HashMap::new(),
            &[y],
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn augmentation_pipeline_matches_the_reference() {
    use stablerep::data::augment::{sample, AugmentConfig};
    use stablerep::util::rng::Rng as SRng;
    let mut rng = Rng(23);
    let (b, h, w, size) = (6, 20, 24, 12);
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let src = input(&mut g, &mut f, &mut rng, &[b, 3, h, w], 0.0, 1.0);
    let prm = g.input("params", &[b, 16]);
    let mut srng = SRng(9);
    let cfg = AugmentConfig {
        jitter_p: 1.0,
        gray_p: 0.3,
        blur_p: 0.7,
        ..AugmentConfig::default()
    };
    let mut params: Vec<f64> = Vec::new();
    for i in 0..b {
        let mut p = sample(&cfg, h, w, &mut srng);
        if i == 0 {
            p[14] = 0.0; // keep colour on one image so hue and saturation show
            p[15] = 0.0;
        }
        params.extend(p.iter().map(|&v| v as f64));
    }
    f.insert(prm, params);
    let y = g.augment(src, prm, size).unwrap();
    check("augmentation", &g, &f, &HashMap::new(), &[y], 1e-4, 1e-4);
}

#[test]
fn conv2d_matches_a_direct_convolution() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(77);
    for case in 0..14 {
        let (n, c, o) = (rng.int(1, 2), rng.int(1, 5), rng.int(1, 6));
        let k = [1, 3][rng.int(0, 1)];
        let (stride, pad) = (rng.int(1, 2), rng.int(0, 1));
        let (h, w) = (rng.int(k.max(2), 9), rng.int(k.max(2), 9));
        let mut g = Graph::new();
        // Half the cases build their patches in chunks of a few output pixels.
        if case % 2 == 1 {
            g.conv_patch_bytes = 4 * c * k * k * rng.int(1, 7);
        }
        let x = g.input("x", &[n, c, h, w]);
        let wt = g.param("w", &[o, c, k, k]);
        let b = g.param("b", &[o]);
        let y = g.conv2d(x, wt, Some(b), stride, pad).unwrap();
        let xv = rng.vec(n * c * h * w, -1.0, 1.0);
        let wv = rng.vec(o * c * k * k, -1.0, 1.0);
        let bv = rng.vec(o, -1.0, 1.0);
        let mut feeds = HashMap::new();
        feeds.insert(x, xv.clone());
        let params = HashMap::from([("w".to_string(), wv.clone()), ("b".to_string(), bv.clone())]);
        let got = &run_gpu(&gpu, &g, &feeds, &params, &[y])[0];
        let cpu = &run_cpu(&g, &feeds, &params, &[y])[0];
        // Direct convolution in f64, PyTorch's definition.
        let (ho, wo) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        assert_eq!(g.shape(y), &[n, o, ho, wo]);
        let mut want = vec![0.0f64; n * o * ho * wo];
        for nn in 0..n {
            for oo in 0..o {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = bv[oo];
                        for cc in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride + ky) as isize - pad as isize;
                                    let ix = (ox * stride + kx) as isize - pad as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w
                                    {
                                        s += xv
                                            [((nn * c + cc) * h + iy as usize) * w + ix as usize]
                                            * wv[((oo * c + cc) * k + ky) * k + kx];
                                    }
                                }
                            }
                        }
                        want[((nn * o + oo) * ho + oy) * wo + ox] = s;
                    }
                }
            }
        }
        let what = format!(
            "case {case}: n{n} c{c} {h}x{w} o{o} k{k} s{stride} p{pad} patches {}",
            g.conv_patch_bytes
        );
        assert_close(&what, got, &want, 1e-4, 1e-5);
        for (a, b) in cpu.iter().zip(&want) {
            assert!((a - b).abs() < 1e-9, "{what}: CPU reference");
        }
    }
    // Shapes that do not fit are clear errors.
    let mut g = Graph::new();
    let x = g.input("x", &[1, 2, 2, 2]);
    let w = g.param("w", &[1, 2, 3, 3]);
    let e = g.conv2d(x, w, None, 1, 0).unwrap_err().to_string();
    assert!(e.contains("conv2d") && e.contains("[1, 2, 2, 2]"), "{e}");
    let w2 = g.param("w2", &[1, 3, 1, 1]);
    assert!(g.conv2d(x, w2, None, 1, 0).is_err());
    let y = g.conv2d(x, w, None, 1, 1).unwrap();
    let l = g.sum_all(y).unwrap();
    // Both gradients exist (checked numerically in tests/autodiff.rs).
    assert!(g.grad(l, &[w, x]).is_ok());
}

#[test]
fn fused_attention_matches_the_cpu_and_the_unfused_graph() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(91);
    for case in 0..12 {
        let (bh, tq, tk, d) = (
            rng.int(1, 3),
            rng.int(1, 37),
            rng.int(1, 41),
            [1, 3, 4, 8, 40, 96, 68][case % 7],
        );
        let mut g = Graph::new();
        let q = g.input("q", &[bh, tq, d]);
        let k = g.input("k", &[bh, tk, d]);
        let v = g.input("v", &[bh, tk, d]);
        let scale = 1.0 / (d as f32).sqrt();
        let fused = g.attention(q, k, v, scale).unwrap();
        let s = g.matmul_t(q, k, false, true).unwrap();
        let s = g.affine(s, scale, 0.0).unwrap();
        let p = g.softmax(s).unwrap();
        let plain = g.matmul(p, v).unwrap();
        let mut feeds = HashMap::new();
        // Large logits too, so the online rescaling matters.
        feeds.insert(q, rng.vec(bh * tq * d, -6.0, 6.0));
        feeds.insert(k, rng.vec(bh * tk * d, -6.0, 6.0));
        feeds.insert(v, rng.vec(bh * tk * d, -1.0, 1.0));
        let got = run_gpu(&gpu, &g, &feeds, &HashMap::new(), &[fused, plain]);
        let cpu = run_cpu(&g, &feeds, &HashMap::new(), &[fused, plain]);
        let what = format!("case {case}: bh{bh} tq{tq} tk{tk} d{d}");
        assert_close(&what, &got[0], &cpu[0], 1e-4, 1e-5);
        assert_close(&what, &got[0], &cpu[1], 1e-4, 1e-5);
    }
    let mut g = Graph::new();
    let q = g.input("q", &[2, 3, 4]);
    let k = g.input("k", &[2, 5, 3]);
    let e = g.attention(q, k, k, 1.0).unwrap_err().to_string();
    assert!(e.contains("attention"), "{e}");
    let k = g.input("k2", &[2, 5, 4]);
    let y = g.attention(q, k, k, 1.0).unwrap();
    let l = g.sum_all(y).unwrap();
    // Differentiable (checked numerically in tests/autodiff.rs).
    assert!(g.grad(l, &[q, k]).is_ok());
}

#[test]
fn group_norm_kernels_match_the_cpu_on_awkward_shapes() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(123);
    // (n, c, groups, h, w, offset): odd planes (scalar path), planes of 4k (vec4 path), rows
    // longer than a workgroup's share, and a large common offset (the shifted sums matter).
    let cases = [
        (2, 6, 3, 5, 7, 0.0),
        (1, 8, 4, 4, 4, 0.0),
        (3, 4, 2, 33, 33, 100.0),
        (1, 12, 12, 1, 3, -5.0),
        (2, 16, 4, 20, 12, 30.0),
    ];
    for (case, &(n, c, groups, h, w, offset)) in cases.iter().enumerate() {
        for silu in [false, true] {
            let mut g = Graph::new();
            let x = g.input("x", &[n, c, h, w]);
            let gm = g.input("gamma", &[c]);
            let bt = g.input("beta", &[c]);
            let y = g.group_norm(x, gm, bt, groups, 1e-5, silu).unwrap();
            let mut feeds = HashMap::new();
            let xv: Vec<f64> = rng
                .vec(n * c * h * w, -2.0, 2.0)
                .iter()
                .map(|v| v + offset)
                .collect();
            feeds.insert(x, xv);
            feeds.insert(gm, rng.vec(c, -1.5, 1.5));
            feeds.insert(bt, rng.vec(c, -1.0, 1.0));
            let got = &run_gpu(&gpu, &g, &feeds, &HashMap::new(), &[y])[0];
            let want = &run_cpu(&g, &feeds, &HashMap::new(), &[y])[0];
            let what = format!("case {case}: [{n}, {c}, {h}, {w}] / {groups} silu {silu}");
            assert_close(&what, got, want, 1e-4, 1e-4);
        }
    }
    let mut g = Graph::new();
    let x = g.input("x", &[1, 6, 2, 2]);
    let gm = g.input("gamma", &[6]);
    let e = g
        .group_norm(x, gm, gm, 4, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 groups") && e.contains("[1, 6, 2, 2]"), "{e}");
    let y = g.group_norm(x, gm, gm, 3, 1e-5, true).unwrap();
    let l = g.sum_all(y).unwrap();
    // Differentiable (checked numerically in tests/autodiff.rs).
    assert!(g.grad(l, &[x, gm]).is_ok());
}

#[test]
fn matmul_reads_f16_weights_on_awkward_shapes() {
    use stablerep::util::f16::{f16_to_f32, f32_to_f16};
    let (gpu, _lock) = gpu();
    let mut rng = Rng(404);
    // (m, n, k, weight is A): N a multiple of 4 takes the subgroup kernel on lavapipe, an odd
    // N the register-blocked one; batches share the weight.
    let cases = [
        (7, 12, 8, false, 1),
        (5, 9, 12, false, 3),
        (33, 40, 36, true, 1),
        (6, 13, 20, true, 1),
        (70, 64, 64, false, 2),
    ];
    let mut keys = Vec::new();
    for (case, &(m, n, k, weight_is_a, batch)) in cases.iter().enumerate() {
        let mut g = Graph::new();
        let round = |v: Vec<f64>| -> Vec<f64> {
            v.iter()
                .map(|&x| f16_to_f32(f32_to_f16(x as f32)) as f64)
                .collect()
        };
        let mut feeds = HashMap::new();
        let mut params = HashMap::new();
        let y = if weight_is_a {
            // A convolution's layout: W [M, K] times patches [N, K] transposed.
            let w = g.param_f16("w", &[m, k]);
            let x = g.input("x", &[n, k]);
            feeds.insert(x, rng.vec(n * k, -1.0, 1.0));
            params.insert("w".to_string(), round(rng.vec(m * k, -1.0, 1.0)));
            g.matmul_t(w, x, false, true).unwrap()
        } else {
            // A linear layer: x [batch, M, K] times W [N, K] transposed, plus a bias.
            let w = g.param_f16("w", &[n, k]);
            let b = g.param("b", &[n]);
            let x = g.input("x", &[batch, m, k]);
            feeds.insert(x, rng.vec(batch * m * k, -1.0, 1.0));
            params.insert("w".to_string(), round(rng.vec(n * k, -1.0, 1.0)));
            params.insert("b".to_string(), rng.vec(n, -1.0, 1.0));
            let y = g.matmul_t(x, w, false, true).unwrap();
            g.add(y, b).unwrap()
        };
        let (got, plan) = common::run_gpu_opts(&gpu, &g, &feeds, &params, &[y], Default::default());
        keys.extend(plan.kernel_keys().iter().map(|k| k.to_string()));
        let want = &run_cpu(&g, &feeds, &params, &[y])[0];
        assert_close(
            &format!("case {case}: {m}x{n}x{k}"),
            &got[0],
            want,
            1e-4,
            1e-5,
        );
    }
    // Both kernel families read f16 (on lavapipe; other adapters use the blocked one only).
    assert!(
        keys.iter()
            .any(|k| k.starts_with("matmul_n") && k.contains("_f16")),
        "{keys:?}"
    );
    if gpu.caps.is_cpu {
        assert!(
            keys.iter()
                .any(|k| k.starts_with("matmul_sg") && k.contains("_f16a")),
            "{keys:?}"
        );
        assert!(
            keys.iter()
                .any(|k| k.starts_with("matmul_sg") && k.contains("_f16b")),
            "{keys:?}"
        );
    }
    // Layouts that are not contiguous along K are refused by name.
    let mut g = Graph::new();
    let w = g.param_f16("w", &[8, 4]);
    let x = g.input("x", &[8, 4]);
    let e = g.matmul_t(w, x, true, false).unwrap_err().to_string();
    assert!(e.contains("f16"), "{e}");
    let e = g.add(w, x).unwrap_err().to_string();
    assert!(e.contains("must be f32"), "{e}");
}

#[test]
fn out_of_range_ids_and_labels_are_refused_when_written() {
    // The kernels clamp an index to the table (or class count); the plan refuses such input
    // instead of computing with the wrong row.
    let (gpu, _lock) = gpu();
    let mut g = Graph::new();
    let table = g.input("table", &[5, 3]);
    let ids = g.input_typed("ids", &[4], DType::U32);
    let rows = g.gather(table, ids).unwrap();
    let logits = g.input("logits", &[4, 3]);
    let labels = g.input_typed("labels", &[4], DType::U32);
    let ce = g.cross_entropy(logits, labels).unwrap();
    let mut store = stablerep::graph::ParamStore::new();
    let plan = stablerep::graph::Plan::compile(
        &gpu,
        &g,
        &[rows, ce],
        &mut store,
        stablerep::graph::PlanOptions::default(),
    )
    .unwrap();
    plan.write_u32(ids, &[0, 4, 2, 1]).unwrap();
    let e = plan.write_u32(ids, &[0, 5, 2, 1]).unwrap_err().to_string();
    assert!(
        e.contains("embedding id") && e.contains("value 5 at position 1"),
        "{e}"
    );
    plan.write_u32(labels, &[0, 1, 2, 2]).unwrap();
    let e = plan
        .write_u32(labels, &[0, 1, 3, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("class label") && e.contains("below 3"), "{e}");
}

#[test]
fn f16_activations_match_the_cpu_within_f16_rounding() {
    use common::run_gpu_opts;
    use stablerep::diffusion::blocks::attention;
    use stablerep::graph::PlanOptions;
    let (gpu, _lock) = gpu();
    assert!(
        gpu.caps.f16,
        "lavapipe offers shader-f16; this test needs it"
    );
    let mut rng = Rng(16);
    // (batch, channels, side, heads): patches of 36 and 108 columns in f16 and of 27 in f32
    // (K not a multiple of 4), head widths 4 (vec4 attention) and 3 (scalar).
    for &(n, c, side, heads) in &[
        (2usize, 8usize, 5usize, 2usize),
        (1, 3, 4, 1),
        (2, 12, 3, 4),
    ] {
        let t = side * side;
        let mut g = Graph::new();
        let x = g.input("x", &[n, c, side, side]);
        let w = g.input("w", &[c, c, 3, 3]);
        let y = g.conv2d(x, w, None, 1, 1).unwrap();
        let y = g.permute(y, &[0, 2, 3, 1]).unwrap();
        let tok = g.reshape(y, &[n * t, c]).unwrap();
        let mut proj = Vec::new();
        for name in ["wq", "wk", "wv", "wo"] {
            proj.push(g.input(name, &[c, c]));
        }
        let qkv: Vec<_> = proj[..3]
            .iter()
            .map(|&p| g.matmul_t(tok, p, false, true).unwrap())
            .collect();
        let a = attention(&mut g, qkv[0], qkv[1], qkv[2], n, t, t, heads).unwrap();
        let out = g.matmul_t(a, proj[3], false, true).unwrap();
        let mut feeds = HashMap::new();
        feeds.insert(x, rng.vec(n * c * t, -1.0, 1.0));
        feeds.insert(w, rng.vec(c * c * 9, -0.3, 0.3));
        for &p in &proj {
            feeds.insert(p, rng.vec(c * c, -0.6, 0.6));
        }
        let what = format!("n{n} c{c} side{side} heads{heads}");
        let cpu = run_cpu(&g, &feeds, &HashMap::new(), &[out]).remove(0);
        let opts = |half| PlanOptions {
            reuse: true,
            poison: true,
            updates: false,
            fuse: true,
            multi_update: true,
            colsum: true,
            f16_activations: half,
        };
        let (f32s, p32) = run_gpu_opts(&gpu, &g, &feeds, &HashMap::new(), &[out], opts(false));
        let (f16s, p16) = run_gpu_opts(&gpu, &g, &feeds, &HashMap::new(), &[out], opts(true));
        assert_close(&what, &f32s[0], &cpu, 1e-4, 1e-5);
        // Each f16 store rounds by at most 2^-11 relative; a few of them compound.
        let scale = cpu.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert_close(&what, &f16s[0], &cpu, 4e-3, 4e-3 * scale);
        let keys = p16.kernel_keys();
        let has = |k: &str| keys.iter().any(|x| x.starts_with(k) && x.contains("_h"));
        assert_eq!(has("im2col"), c % 4 == 0, "{what}: {keys:?}");
        assert!(has("attention") && has("permute"), "{what}: {keys:?}");
        // The bias-free projections to q, k and v store f16 (their readers are permutes).
        assert!(
            keys.iter()
                .any(|k| k.starts_with("matmul") && k.contains("_f16") && k.ends_with('c')),
            "{what}: {keys:?}"
        );
        assert!(
            f16s[0] != f32s[0],
            "{what}: f16 storage changed nothing, so it was not used"
        );
        // The patches are the largest tensor; in f32 (c = 3) they set the peak either way.
        assert!(
            c % 4 != 0 || p16.stats().peak_bytes < p32.stats().peak_bytes,
            "{what}: {} >= {} bytes",
            p16.stats().peak_bytes,
            p32.stats().peak_bytes
        );
        assert!(p32.kernel_keys().iter().all(|k| !k.contains("_h")));
    }
    // Training graphs keep f32.
    let mut g = Graph::new();
    let w = g.param("w", &[4, 4]);
    let x = g.input("x", &[2, 4]);
    let y = g.matmul_t(x, w, false, true).unwrap();
    let l = g.sum_all(y).unwrap();
    let gw = g.grad(l, &[w]).unwrap()[0];
    g.sgd(&[w], &[gw], 0.9, 0.0).unwrap();
    let mut store = stablerep::graph::ParamStore::new();
    store.set(&gpu, "w", &[4, 4], &[0.0; 16]).unwrap();
    let e = stablerep::graph::Plan::compile(
        &gpu,
        &g,
        &[l],
        &mut store,
        PlanOptions {
            f16_activations: true,
            ..PlanOptions::default()
        },
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("f16 activations are for inference"), "{e}");
}
