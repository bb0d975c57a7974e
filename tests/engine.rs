//! The engine end to end: an MLP trained through graph + autodiff + AdamW, the memory planner
//! (reuse cuts bytes, results unchanged), one submit per run, and clear errors on bad use.

mod common;

use std::collections::HashMap;

use common::{gpu, run_gpu_opts, Rng};
use stablerep::demo::{train_mlp, DemoConfig};
use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
use stablerep::kernels::elementwise::UnaryOp;

#[test]
fn mlp_learns_the_spirals() {
    let (gpu, _lock) = gpu();
    let cfg = DemoConfig {
        points_per_class: 48,
        hidden: 32,
        steps: 250,
        lr: 2e-2,
        seed: 3,
    };
    let mut losses = Vec::new();
    let r = train_mlp(&gpu, &cfg, 50, |_, l| losses.push(l)).unwrap();
    assert!(
        r.first_loss > 0.9,
        "initial loss {} should be near ln 3",
        r.first_loss
    );
    assert!(
        r.final_loss < 0.35,
        "final loss {} not below 0.35 (losses {losses:?})",
        r.final_loss
    );
    assert!(r.accuracy > 0.85, "training accuracy {}", r.accuracy);
    assert_eq!(r.plan.submits_per_run, 1);
}

#[test]
fn memory_planner_reuses_buffers_without_changing_results() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(21);
    let mut g = Graph::new();
    let x = g.input("x", &[64, 48]);
    let mut h = x;
    for i in 0..40 {
        let op = [UnaryOp::Tanh, UnaryOp::Affine(1.1, 0.01), UnaryOp::Silu][i % 3];
        h = g.unary(op, h).unwrap();
    }
    let y = g.sum_all(h).unwrap();
    let mut feeds = HashMap::new();
    feeds.insert(x, rng.vec(64 * 48, -1.0, 1.0));
    // Unfused, so the chain's 40 tensors are planned (fused, they are one kernel's registers).
    let opts = |reuse| PlanOptions {
        reuse,
        poison: true,
        updates: true,
        fuse: false,
        multi_update: true,
        colsum: true,
        f16_activations: false,
    };
    let (a, pa) = run_gpu_opts(&gpu, &g, &feeds, &HashMap::new(), &[h, y], opts(true));
    let (b, pb) = run_gpu_opts(&gpu, &g, &feeds, &HashMap::new(), &[h, y], opts(false));
    assert_eq!(a, b, "buffer reuse changed the results");
    let (sa, sb) = (pa.stats(), pb.stats());
    assert_eq!(sb.peak_bytes, sb.tensor_bytes);
    assert!(
        sa.peak_bytes * 8 < sb.peak_bytes,
        "reuse should cut memory by far: {} vs {} bytes",
        sa.peak_bytes,
        sb.peak_bytes
    );
    assert!(
        sa.buffers <= 4,
        "a chain needs few buffers, got {}",
        sa.buffers
    );
    assert_eq!(sa.submits_per_run, 1);
    assert_eq!(sa.dispatches, pa.kernel_keys().len());
}

#[test]
fn an_adapter_filter_that_matches_nothing_is_a_clear_error() {
    let _guard = gpu();
    let err = stablerep::gpu::Gpu::new(&stablerep::gpu::GpuOptions {
        adapter: Some("no-such-adapter-xyz".into()),
        ..Default::default()
    })
    .err()
    .expect("no adapter matches");
    let msg = err.to_string();
    assert!(
        msg.contains("no GPU adapter found matching 'no-such-adapter-xyz'"),
        "{msg}"
    );
    assert!(
        msg.contains("available:") && msg.contains("mesa-vulkan-drivers"),
        "{msg}"
    );
}

#[test]
fn pipelines_are_cached_by_readable_key() {
    let (gpu, _lock) = gpu();
    let mut g = Graph::new();
    let x = g.input("x", &[10]);
    let y = g.unary(UnaryOp::Gelu, x).unwrap();
    for _ in 0..2 {
        Plan::compile(
            &gpu,
            &g,
            &[y],
            &mut ParamStore::new(),
            PlanOptions::default(),
        )
        .unwrap();
    }
    let keys = gpu.pipeline_keys();
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("unary_gelu#")).count(),
        1,
        "{keys:?}"
    );
}

#[test]
fn bad_use_gives_clear_errors() {
    let (gpu, _lock) = gpu();
    let mut g = Graph::new();
    let x = g.input("x", &[4, 3]);
    let w = g.param("w", &[5, 3]);
    let y = g.matmul_t(x, w, false, true).unwrap();
    // Missing parameter.
    let mut store = ParamStore::new();
    let err = Plan::compile(&gpu, &g, &[y], &mut store, PlanOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("'w'") && err.to_string().contains("missing"),
        "{err}"
    );
    // Wrong parameter shape.
    store.set(&gpu, "w", &[3, 5], &[0.0; 15]).unwrap();
    let err = Plan::compile(&gpu, &g, &[y], &mut store, PlanOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("[3, 5]") && err.to_string().contains("[5, 3]"),
        "{err}"
    );
    // Shape errors at build time.
    assert!(g
        .matmul(x, x)
        .unwrap_err()
        .to_string()
        .contains("contraction"));
    assert!(g.reshape(x, &[5]).unwrap_err().to_string().contains("size"));
    // Wrong input length at run time; fetching a non-output.
    store.set(&gpu, "w", &[5, 3], &[0.5; 15]).unwrap();
    let plan = Plan::compile(&gpu, &g, &[y], &mut store, PlanOptions::default()).unwrap();
    assert!(plan
        .write(x, &[1.0; 5])
        .unwrap_err()
        .to_string()
        .contains("12"));
    assert!(plan
        .run_fetch(&[x])
        .unwrap_err()
        .to_string()
        .contains("output"));
    plan.write(x, &[1.0; 12]).unwrap();
    let out = plan.run_fetch(&[y]).unwrap();
    assert!(out[0].iter().all(|&v| (v - 1.5).abs() < 1e-6));
}

#[test]
fn transformer_stack_forward_and_gradients_match_cpu() {
    use stablerep::demo::{init_params, transformer_stack, StackConfig};
    let (gpu, _lock) = gpu();
    let cfg = StackConfig {
        batch: 2,
        tokens: 12,
        width: 16,
        layers: 2,
        heads: 2,
        mlp: 32,
    };
    let (mut g, x0, loss, params, hyper, _) = transformer_stack(&cfg).unwrap();
    let grads = g.grad(loss, &params).unwrap();
    let mut store = ParamStore::new();
    init_params(&gpu, &g, &params, &mut store, 5).unwrap();
    let mut outs = vec![loss];
    outs.extend(&grads);
    let opts = PlanOptions {
        updates: false,
        ..PlanOptions::default()
    };
    let plan = Plan::compile(&gpu, &g, &outs, &mut store, opts).unwrap();
    let mut rng = Rng(41);
    let xs = rng.vec(cfg.batch * cfg.tokens * cfg.width, -1.0, 1.0);
    plan.write(x0, &xs.iter().map(|&v| v as f32).collect::<Vec<_>>())
        .unwrap();
    let got = plan.run_fetch(&outs).unwrap();
    let mut cpu_params = HashMap::new();
    for &p in &params {
        let name = g.node(p).name.clone().unwrap();
        cpu_params.insert(
            name.clone(),
            store
                .read(&name)
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<f64>>(),
        );
    }
    let mut feeds = HashMap::new();
    feeds.insert(x0, xs);
    feeds.insert(hyper, vec![0.0, 1.0, 1.0]);
    let want = common::run_cpu(&g, &feeds, &cpu_params, &outs);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        common::assert_close(&format!("transformer output {k}"), a, b, 1e-3, 1e-4 * scale);
    }
}

#[test]
fn contiguous_slices_alias_their_input_without_a_copy() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(5);
    let mut g = Graph::new();
    let x = g.input("x", &[3, 5, 6]);
    let t = g.unary(UnaryOp::Tanh, x).unwrap();
    // Contiguous: a block along axis 0, then a block of that block along axis 1 (leading dim 1).
    let s1 = g.slice(t, 0, 1, 2).unwrap();
    let s2 = g.slice(s1, 0, 1, 1).unwrap();
    let s3 = g.slice(s2, 1, 2, 3).unwrap();
    let y1 = g.unary(UnaryOp::Exp, s3).unwrap();
    // Not contiguous (leading dim 3): stays a strided copy.
    let s4 = g.slice(t, 2, 1, 4).unwrap();
    let y2 = g.unary(UnaryOp::Exp, s4).unwrap();
    let mut feeds = HashMap::new();
    feeds.insert(x, rng.vec(3 * 5 * 6, -1.0, 1.0));
    let outs = [y1, y2, s3, s1];
    let (got, plan) = run_gpu_opts(
        &gpu,
        &g,
        &feeds,
        &HashMap::new(),
        &outs,
        PlanOptions {
            reuse: true,
            poison: true,
            updates: true,
            fuse: true,
            multi_update: true,
            colsum: true,
            f16_activations: false,
        },
    );
    let want = common::run_cpu(&g, &feeds, &HashMap::new(), &outs);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(a.len(), b.len(), "output {k}");
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-5, "output {k}: {x} vs {y}");
        }
    }
    // tanh, two exps and one strided copy: the three contiguous slices cost nothing.
    let keys = plan.kernel_keys();
    assert_eq!(plan.stats().dispatches, 4, "{keys:?}");
    assert_eq!(
        keys.iter().filter(|k| k.contains("permute")).count(),
        1,
        "{keys:?}"
    );
    // A slice fetched as an output reads from its offset.
    assert_eq!(plan.read(s3).unwrap(), got[2]);
}

/// A random elementwise graph for the fusion test: chains of unary and binary ops over a few
/// inputs (some broadcast), with fan-out and intermediate outputs here and there, so groups
/// form, stop at shared nodes and split at the leaf limit.
fn random_elementwise_graph(
    rng: &mut Rng,
    case: usize,
) -> (
    Graph,
    HashMap<stablerep::graph::NodeId, Vec<f64>>,
    Vec<stablerep::graph::NodeId>,
) {
    use stablerep::kernels::elementwise::BinaryOp;
    let mut g = Graph::new();
    let mut feeds = HashMap::new();
    let rank = rng.int(1, 4);
    let mut out: Vec<usize> = (0..rank).map(|_| rng.int(1, 9)).collect();
    if case.is_multiple_of(2) {
        // vec4 forms: an innermost dim that is a multiple of 4.
        out[rank - 1] = 4 * rng.int(1, 3);
    }
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let mut leaf = |g: &mut Graph, rng: &mut Rng| {
        let shape: Vec<usize> = match rng.int(0, 4) {
            // Full, one value per innermost index, one per outer index (splatted along the
            // innermost dim), or fewer leading dims.
            0 | 1 => out.clone(),
            2 => out
                .iter()
                .enumerate()
                .map(|(d, &v)| if d + 1 == rank { v } else { 1 })
                .collect(),
            3 => out
                .iter()
                .enumerate()
                .map(|(d, &v)| if d + 1 == rank { 1 } else { v })
                .collect(),
            _ => out[rng.int(0, rank - 1)..]
                .iter()
                .enumerate()
                .map(|(d, &v)| if d == 0 { 1 } else { v })
                .collect(),
        };
        let x = g.input(&format!("x{}", g.nodes.len()), &shape);
        feeds.insert(x, rng.vec(numel(&shape), -1.5, 1.5));
        x
    };
    let safe = [
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Gelu,
        UnaryOp::QuickGelu,
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Relu,
        UnaryOp::Square,
        UnaryOp::Affine(0.75, -0.25),
        UnaryOp::Clamp(-0.6, 0.8),
    ];
    let positive = [
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Pow(1.5),
        UnaryOp::Exp,
    ];
    // Values with the output's shape that later ops may read.
    let first = leaf(&mut g, rng);
    let mut cur = g.unary(UnaryOp::Tanh, first).unwrap();
    let mut outputs = Vec::new();
    let steps = rng.int(3, 14);
    let mut shared = None;
    for _ in 0..steps {
        cur = match rng.int(0, 9) {
            0..=2 => g.unary(safe[rng.int(0, safe.len() - 1)], cur).unwrap(),
            3 => {
                // A positive argument: 1 + |x| (then a tanh keeps the chain bounded).
                let a = g.unary(UnaryOp::Abs, cur).unwrap();
                let p = g.affine(a, 1.0, 1.0).unwrap();
                let u = g
                    .unary(positive[rng.int(0, positive.len() - 1)], p)
                    .unwrap();
                g.unary(UnaryOp::Tanh, u).unwrap()
            }
            4..=6 => {
                let other = leaf(&mut g, rng);
                let op = [
                    BinaryOp::Add,
                    BinaryOp::Sub,
                    BinaryOp::Mul,
                    BinaryOp::Max,
                    BinaryOp::Min,
                    BinaryOp::UnaryGrad(safe[rng.int(0, safe.len() - 1)]),
                ][rng.int(0, 5)];
                if rng.int(0, 1) == 0 {
                    g.binary(op, cur, other).unwrap()
                } else {
                    g.binary(op, other, cur).unwrap()
                }
            }
            7 => {
                // Division by 1 + |leaf|.
                let other = leaf(&mut g, rng);
                let a = g.unary(UnaryOp::Abs, other).unwrap();
                let d = g.affine(a, 1.0, 1.0).unwrap();
                g.binary(BinaryOp::Div, cur, d).unwrap()
            }
            8 => {
                // Fan-out: this value is read twice (a group boundary), once much later.
                shared = Some(cur);
                g.mul(cur, cur).unwrap()
            }
            _ => {
                if rng.int(0, 1) == 0 {
                    outputs.push(cur);
                }
                match shared {
                    Some(s) if g.shape(s) == g.shape(cur) => g.add(cur, s).unwrap(),
                    _ => g.unary(UnaryOp::Sigmoid, cur).unwrap(),
                }
            }
        };
    }
    outputs.push(cur);
    (g, feeds, outputs)
}

#[test]
fn fused_elementwise_chains_match_unfused_plans_and_the_cpu() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(77);
    let (mut fused_dispatches, mut plain_dispatches) = (0, 0);
    let mut keys = Vec::new();
    for case in 0..40 {
        let (g, feeds, outs) = random_elementwise_graph(&mut rng, case);
        let opts = |fuse| PlanOptions {
            reuse: true,
            poison: true,
            updates: true,
            fuse,
            multi_update: true,
            colsum: true,
            f16_activations: false,
        };
        let (a, pa) = run_gpu_opts(&gpu, &g, &feeds, &HashMap::new(), &outs, opts(true));
        let (b, pb) = run_gpu_opts(&gpu, &g, &feeds, &HashMap::new(), &outs, opts(false));
        let want = common::run_cpu(&g, &feeds, &HashMap::new(), &outs);
        for k in 0..outs.len() {
            common::assert_close(
                &format!("case {case} output {k}"),
                &a[k],
                &want[k],
                1e-5,
                1e-5,
            );
            let plain: Vec<f64> = b[k].iter().map(|&v| v as f64).collect();
            common::assert_close(
                &format!("case {case} output {k} vs unfused"),
                &a[k],
                &plain,
                1e-6,
                1e-6,
            );
        }
        fused_dispatches += pa.stats().dispatches;
        plain_dispatches += pb.stats().dispatches;
        assert!(pa.stats().dispatches <= pb.stats().dispatches);
        assert!(pb.kernel_keys().iter().all(|k| !k.starts_with("fused_")));
        keys.extend(pa.kernel_keys().iter().map(|k| k.to_string()));
    }
    // The groups formed, in both launch forms, with broadcast leaves.
    assert!(
        fused_dispatches * 2 < plain_dispatches,
        "{fused_dispatches} vs {plain_dispatches}"
    );
    let fused: Vec<&String> = keys.iter().filter(|k| k.starts_with("fused_")).collect();
    assert!(fused.iter().any(|k| k.ends_with("_v4")), "{fused:?}");
    assert!(fused.iter().any(|k| !k.ends_with("_v4")), "{fused:?}");
    // A key ends with one letter per leaf (s: same shape, v: broadcast read as vec4, b:
    // broadcast scalar), then `_v4` for the vec4 form.
    let pattern = |k: &str| {
        let k = k.strip_suffix("_v4").unwrap_or(k);
        k.rsplit('_').next().unwrap_or("").to_string()
    };
    assert!(fused.iter().any(|k| pattern(k).contains('b')), "{fused:?}");
    assert!(fused.iter().any(|k| pattern(k).contains('v')), "{fused:?}");
}

#[test]
fn a_fused_group_splits_at_the_leaf_limit() {
    use stablerep::kernels::fused::MAX_LEAVES;
    let (gpu, _lock) = gpu();
    let mut rng = Rng(78);
    let mut g = Graph::new();
    let mut feeds = HashMap::new();
    // x0 + x1 + ... + x9: a chain with 10 leaves, more than one kernel may read.
    let xs: Vec<_> = (0..10)
        .map(|k| {
            let x = g.input(&format!("x{k}"), &[3, 5]);
            feeds.insert(x, rng.vec(15, -1.0, 1.0));
            x
        })
        .collect();
    let mut y = g.unary(UnaryOp::Tanh, xs[0]).unwrap();
    for &x in &xs[1..] {
        y = g.add(y, x).unwrap();
    }
    let opts = PlanOptions::default();
    let (got, plan) = run_gpu_opts(&gpu, &g, &feeds, &HashMap::new(), &[y], opts);
    let want = common::run_cpu(&g, &feeds, &HashMap::new(), &[y]);
    common::assert_close("sum of 10", &got[0], &want[0], 1e-6, 1e-6);
    let keys = plan.kernel_keys();
    // The first kernel reads x0..x5; the second reads its result and x6..x9.
    assert_eq!(MAX_LEAVES, 6);
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("fused_")), "{keys:?}");
}

#[test]
fn fusion_does_not_move_a_read_past_an_in_place_update() {
    let (gpu, _lock) = gpu();
    let mut g = Graph::new();
    // m = tanh(acc) is computed before `accumulate` adds the gradient into acc in place; the
    // reader 2 m comes after. Fused, the read of acc would move past the update.
    let w = g.param("w", &[8]);
    let grad = g.input("grad", &[8]);
    let acc = g.state(&stablerep::graph::accumulator_name("w"), &[8], 0.0);
    let m = g.unary(UnaryOp::Tanh, acc).unwrap();
    let hyper = g.accumulate(&[w], &[grad]).unwrap();
    let y = g.affine(m, 2.0, 0.0).unwrap();
    let mut feeds = HashMap::new();
    feeds.insert(
        grad,
        (0..8).map(|i| 0.1 * (i as f64 + 1.0)).collect::<Vec<_>>(),
    );
    feeds.insert(hyper, vec![1.0]);
    let params = HashMap::from([("w".to_string(), vec![0.5; 8])]);
    let (got, plan) = run_gpu_opts(&gpu, &g, &feeds, &params, &[y], PlanOptions::default());
    let want = common::run_cpu(&g, &feeds, &params, &[y]);
    common::assert_close(
        "2 tanh(acc) before the update",
        &got[0],
        &want[0],
        1e-6,
        1e-6,
    );
    assert!(got[0].iter().all(|&v| v == 0.0), "{:?}", got[0]);
    assert!(
        plan.kernel_keys().iter().all(|k| !k.starts_with("fused_")),
        "{:?}",
        plan.kernel_keys()
    );
}

/// Three AdamW steps on parameters of `sizes` with per-parameter settings (no decay on every
/// third, a clamp on the second), with `multi` on or off: every parameter and moment after
/// the steps, and the plan's kernel keys.
fn adamw_steps(
    gpu: &std::sync::Arc<stablerep::gpu::Gpu>,
    sizes: &[usize],
    multi: bool,
    accumulate: bool,
) -> (Vec<Vec<f32>>, Vec<String>, usize) {
    use stablerep::kernels::optim::AdamW;
    let mut g = Graph::new();
    let x = g.input("x", &[1]);
    let mut params = Vec::new();
    let mut loss = None;
    for (k, &n) in sizes.iter().enumerate() {
        let p = g.param(&format!("p{k}"), &[n]);
        // loss += sum(tanh(p * x) * p): a gradient that is a planned node, not a leaf.
        let px = g.mul(p, x).unwrap();
        let t = g.unary(UnaryOp::Tanh, px).unwrap();
        let tp = g.mul(t, p).unwrap();
        let s = g.sum_all(tp).unwrap();
        loss = Some(match loss {
            None => s,
            Some(l) => g.add(l, s).unwrap(),
        });
        params.push(p);
    }
    let loss = loss.unwrap();
    let grads = g.grad(loss, &params).unwrap();
    let cfgs: Vec<AdamW> = (0..sizes.len())
        .map(|k| AdamW {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: if k % 3 == 2 { 0.0 } else { 0.1 },
            clamp: (k == 1).then_some([-0.3, 0.25]),
        })
        .collect();
    let hyper = if accumulate {
        g.accumulate(&params, &grads).unwrap()
    } else {
        g.adamw_each(&params, &grads, &cfgs).unwrap()
    };
    let mut store = ParamStore::new();
    let mut rng = Rng(5);
    for (k, &n) in sizes.iter().enumerate() {
        store
            .set(
                gpu,
                &format!("p{k}"),
                &[n],
                &rng.vec(n, -1.0, 1.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
    }
    let opts = PlanOptions {
        multi_update: multi,
        colsum: true,
        f16_activations: false,
        ..PlanOptions::default()
    };
    let plan = Plan::compile(gpu, &g, &[loss], &mut store, opts).unwrap();
    plan.write(plan.input("x").unwrap(), &[1.3]).unwrap();
    for t in 1..=3 {
        if accumulate {
            // A NaN left in an accumulator must not survive the first chunk (beta 0).
            for k in (0..sizes.len()).filter(|_| t == 1) {
                let name = stablerep::graph::accumulator_name(&format!("p{k}"));
                if let Some(acc) = store.get(&name) {
                    acc.write_f32(&vec![f32::NAN; sizes[k]]).unwrap();
                }
            }
            plan.write(hyper, &[if t == 1 { 0.0 } else { 1.0 }])
                .unwrap();
            plan.write(plan.input("x").unwrap(), &[1.3 + 0.1 * t as f32])
                .unwrap();
        } else {
            let h = stablerep::graph::adam_hyper(0.05, &cfgs[0], t);
            plan.write(hyper, &h).unwrap();
        }
        plan.run().unwrap();
    }
    let mut out = Vec::new();
    for k in 0..sizes.len() {
        let names = if accumulate {
            vec![stablerep::graph::accumulator_name(&format!("p{k}"))]
        } else {
            vec![
                format!("p{k}"),
                format!("optimizer.p{k}.exp_avg"),
                format!("optimizer.p{k}.exp_avg_sq"),
            ]
        };
        for name in names {
            out.push(store.read(&name).unwrap());
        }
    }
    let keys = plan.kernel_keys().iter().map(|k| k.to_string()).collect();
    (out, keys, plan.stats().dispatches)
}

#[test]
fn one_adamw_dispatch_for_many_parameters_gives_the_same_values() {
    let (gpu, _lock) = gpu();
    // All lengths multiples of 4 (the vec4 form), then some not (the scalar form); 4,100 and
    // 3,000 elements span several workgroups.
    for (sizes, key) in [
        (vec![4, 8, 4100, 12, 64, 256, 1024], "adamw_multi_v4"),
        (vec![1, 3, 5, 3000, 17, 64, 2], "adamw_multi"),
    ] {
        let (one, keys_one, d_one) = adamw_steps(&gpu, &sizes, false, false);
        let (multi, keys_multi, d_multi) = adamw_steps(&gpu, &sizes, true, false);
        assert_eq!(
            keys_multi
                .iter()
                .filter(|k| k.starts_with("adamw"))
                .collect::<Vec<_>>(),
            vec![key],
            "{sizes:?}: one update dispatch for all parameters"
        );
        assert_eq!(
            keys_one.iter().filter(|k| k.starts_with("adamw")).count(),
            sizes.len()
        );
        assert_eq!(d_one - d_multi, sizes.len() - 1);
        for (k, (a, b)) in one.iter().zip(&multi).enumerate() {
            assert_eq!(
                a,
                b,
                "{sizes:?}: tensor {k} (parameter {}, 0 p, 1 m, 2 v: {})",
                k / 3,
                k % 3
            );
        }
        // The clamp held, and the steps moved every parameter.
        assert!(multi[3].iter().all(|&v| (-0.3..=0.25).contains(&v)));
        assert!(multi[0].iter().all(|v| v.is_finite()));
    }
}

#[test]
fn a_concat_of_blocks_is_computed_in_place() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(9);
    let mut g = Graph::new();
    let a = g.input("a", &[6, 5]);
    let b = g.input("b", &[5, 7]);
    let c = g.input("c", &[1, 3, 7]);
    // Three inputs of [1, 6, 7] blocks: a matmul (through a reshape), a fused elementwise
    // chain and a plain unary op; then the same concat again with an input that another node
    // also reads, which must be copied.
    let m = g.matmul(a, b).unwrap();
    let m = g.reshape(m, &[1, 6, 7]).unwrap();
    let t = g.unary(UnaryOp::Tanh, m).unwrap();
    let t = g.affine(t, 2.0, 0.5).unwrap();
    let s = g.unary(UnaryOp::Silu, c).unwrap();
    let cat = g.concat(&[m, t, s], 1).unwrap();
    let y = g.unary(UnaryOp::Affine(0.5, 1.0), cat).unwrap();
    let u = g.unary(UnaryOp::Silu, c).unwrap();
    let cat2 = g.concat(&[u, t], 1).unwrap();
    let also = g.sum_all(u).unwrap();
    let mut feeds = HashMap::new();
    feeds.insert(a, rng.vec(30, -1.0, 1.0));
    feeds.insert(b, rng.vec(35, -1.0, 1.0));
    feeds.insert(c, rng.vec(21, -1.0, 1.0));
    let outs = [y, cat2, also];
    let want = common::run_cpu(&g, &feeds, &HashMap::new(), &outs);
    let (got, plan) = run_gpu_opts(&gpu, &g, &feeds, &HashMap::new(), &outs, Default::default());
    for (k, name) in ["in place", "copied", "the other reader"]
        .iter()
        .enumerate()
    {
        common::assert_close(name, &got[k], &want[k], 1e-5, 1e-6);
    }
    // Neither concat is in place (m is read by tanh too, u by sum_all): 3 + 2 copies.
    let keys = plan.kernel_keys();
    let copies = keys.iter().filter(|k| k.starts_with("permute")).count();
    assert_eq!(copies, 5, "{keys:?}");
    // A graph where every input is read only by the concat: no copy at all.
    let mut g = Graph::new();
    let a = g.input("a", &[6, 5]);
    let b = g.input("b", &[5, 7]);
    let x = g.input("x", &[1, 4, 7]);
    let m = g.matmul(a, b).unwrap();
    let m = g.reshape(m, &[1, 6, 7]).unwrap();
    let e = g.unary(UnaryOp::Exp, x).unwrap();
    let e = g.affine(e, 2.0, 0.5).unwrap();
    let cat = g.concat(&[e, m], 1).unwrap();
    let y = g.unary(UnaryOp::Tanh, cat).unwrap();
    let mut feeds = HashMap::new();
    feeds.insert(a, rng.vec(30, -1.0, 1.0));
    feeds.insert(b, rng.vec(35, -1.0, 1.0));
    feeds.insert(x, rng.vec(28, -1.0, 1.0));
    let want = common::run_cpu(&g, &feeds, &HashMap::new(), &[y, cat]);
    let (got, plan) = run_gpu_opts(
        &gpu,
        &g,
        &feeds,
        &HashMap::new(),
        &[y, cat],
        Default::default(),
    );
    common::assert_close("in place", &got[0], &want[0], 1e-5, 1e-6);
    common::assert_close("the concat itself", &got[1], &want[1], 1e-5, 1e-6);
    let keys = plan.kernel_keys();
    assert!(keys.iter().all(|k| !k.starts_with("permute")), "{keys:?}");
    assert_eq!(keys.len(), 3, "matmul, the fused exp chain, tanh: {keys:?}");
}

#[test]
fn one_accumulation_dispatch_for_many_gradients_gives_the_same_values() {
    let (gpu, _lock) = gpu();
    for (sizes, key) in [
        (vec![4, 8, 4100, 12, 64], "accumulate_multi_v4"),
        (vec![1, 3, 5, 3000, 17], "accumulate_multi"),
    ] {
        let (one, keys_one, d_one) = adamw_steps(&gpu, &sizes, false, true);
        let (multi, keys_multi, d_multi) = adamw_steps(&gpu, &sizes, true, true);
        assert_eq!(
            keys_multi
                .iter()
                .filter(|k| k.starts_with("accumulate"))
                .collect::<Vec<_>>(),
            vec![key],
            "{sizes:?}"
        );
        assert_eq!(
            keys_one
                .iter()
                .filter(|k| k.starts_with("accumulate"))
                .count(),
            sizes.len()
        );
        assert_eq!(d_one - d_multi, sizes.len() - 1);
        for (k, (a, b)) in one.iter().zip(&multi).enumerate() {
            assert_eq!(a, b, "{sizes:?}: accumulator {k}");
            assert!(
                b.iter().all(|v| v.is_finite()),
                "{sizes:?}: accumulator {k}"
            );
        }
    }
}

#[test]
fn an_update_run_whose_tensors_overlap_is_lowered_one_by_one() {
    use stablerep::kernels::optim::AdamW;
    let (gpu, _lock) = gpu();
    // Two parameters stepped with one gradient: the run's read ranges overlap, so it must
    // not become one multi-tensor dispatch; every parameter is still updated.
    let mut g = Graph::new();
    let x = g.input("x", &[1]);
    let p1 = g.param("p1", &[8]);
    let p2 = g.param("p2", &[8]);
    let t = g.mul(p1, x).unwrap();
    let t = g.unary(UnaryOp::Tanh, t).unwrap();
    let loss = g.sum_all(t).unwrap();
    let grad = g.grad(loss, &[p1]).unwrap()[0];
    let cfg = AdamW {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.0,
        clamp: None,
    };
    let hyper = g.adamw_each(&[p1, p2], &[grad, grad], &[cfg, cfg]).unwrap();
    let mut store = ParamStore::new();
    store.set(&gpu, "p1", &[8], &[0.5; 8]).unwrap();
    store.set(&gpu, "p2", &[8], &[0.5; 8]).unwrap();
    let plan = Plan::compile(&gpu, &g, &[loss], &mut store, PlanOptions::default()).unwrap();
    plan.write(plan.input("x").unwrap(), &[1.0]).unwrap();
    plan.write(hyper, &stablerep::graph::adam_hyper(0.1, &cfg, 1))
        .unwrap();
    plan.run().unwrap();
    let keys = plan.kernel_keys();
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("adamw")).count(),
        2,
        "{keys:?}"
    );
    // Same gradient, same start: both parameters moved by the same step (Adam's first step
    // is lr * sign(g)).
    let (a, b) = (store.read("p1").unwrap(), store.read("p2").unwrap());
    assert_eq!(a, b);
    assert!(a.iter().all(|&v| (v - 0.4).abs() < 1e-5), "{a:?}");
}

/// The backward of `x + f(layer_norm(x))` adds the residual gradient inside the LayerNorm
/// gradient kernel (planner step 1b): one dispatch fewer, the same values as the CPU, and
/// the add stays a kernel of its own when the option to fuse is off.
#[test]
fn layernorm_gradient_takes_the_residual_add() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(41);
    // vec4 rows and scalar rows.
    for (rows, cols) in [(9usize, 8usize), (7, 5)] {
        let mut g = Graph::new();
        let x = g.input("x", &[rows, cols]);
        let gamma = g.input("gamma", &[cols]);
        let beta = g.input("beta", &[cols]);
        let w = g.input("w", &[rows, cols]);
        let h = g.layer_norm(x, gamma, beta, 1e-5).unwrap();
        let h = g.unary(UnaryOp::Tanh, h).unwrap();
        let y = g.add(x, h).unwrap();
        let p = g.mul(y, w).unwrap();
        let l = g.sum_all(p).unwrap();
        let dx = g.grad(l, &[x]).unwrap()[0];
        let mut feeds = HashMap::new();
        feeds.insert(x, rng.vec(rows * cols, -2.0, 2.0));
        feeds.insert(gamma, rng.vec(cols, 0.5, 1.5));
        feeds.insert(beta, rng.vec(cols, -0.5, 0.5));
        feeds.insert(w, rng.vec(rows * cols, -1.0, 1.0));
        let want = common::run_cpu(&g, &feeds, &HashMap::new(), &[dx]);
        let mut dispatches = Vec::new();
        for fuse in [true, false] {
            let (got, plan) = run_gpu_opts(
                &gpu,
                &g,
                &feeds,
                &HashMap::new(),
                &[dx],
                PlanOptions {
                    reuse: true,
                    poison: true,
                    updates: true,
                    fuse,
                    multi_update: true,
                    colsum: true,
                    f16_activations: false,
                },
            );
            common::assert_close(
                &format!("{rows}x{cols} dx, fuse {fuse}"),
                &got[0],
                &want[0],
                1e-4,
                1e-5,
            );
            let keys = plan.kernel_keys();
            let fused = keys
                .iter()
                .any(|k| k.starts_with("ln_grad") && k.ends_with("_res"));
            assert_eq!(fused, fuse, "{keys:?}");
            dispatches.push(plan.stats().dispatches);
        }
        assert!(dispatches[0] < dispatches[1], "{dispatches:?}");
    }
}

#[test]
fn layernorm_forward_runs_as_one_dispatch() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(43);
    // vec4 rows, scalar rows, vec4-length rows at an unaligned offset, aligned rows with an
    // unaligned weight (the row op would sum in vec4 order: the two kernels are kept), and a
    // LayerNorm above the one-dispatch limit (2^19 elements), which keeps its two kernels.
    for (rows, cols, shift, gshift, one) in [
        (9usize, 8usize, 0usize, 0usize, true),
        (7, 5, 0, 0, true),
        (6, 8, 1, 0, true),
        (6, 8, 0, 1, false),
        (1025, 512, 0, 0, false),
    ] {
        let mut g = Graph::new();
        let z = g.input("z", &[rows * cols + shift]);
        let x = g.slice(z, 0, shift, rows * cols).unwrap();
        let x = g.reshape(x, &[rows, cols]).unwrap();
        let gamma_in = g.input("gamma", &[cols + gshift]);
        let gamma = g.slice(gamma_in, 0, gshift, cols).unwrap();
        let beta = g.input("beta", &[cols]);
        let w = g.input("w", &[rows, cols]);
        let y = g.layer_norm(x, gamma, beta, 1e-5).unwrap();
        let p = g.mul(y, w).unwrap();
        let l = g.sum_all(p).unwrap();
        // The gradient reads the statistics the fused kernel wrote.
        let grads = g.grad(l, &[z, gamma_in]).unwrap();
        let outs = [y, grads[0], grads[1]];
        let mut feeds = HashMap::new();
        feeds.insert(z, rng.vec(rows * cols + shift, -2.0, 2.0));
        feeds.insert(gamma_in, rng.vec(cols + gshift, 0.5, 1.5));
        feeds.insert(beta, rng.vec(cols, -0.5, 0.5));
        feeds.insert(w, rng.vec(rows * cols, -1.0, 1.0));
        let want = common::run_cpu(&g, &feeds, &HashMap::new(), &outs);
        let mut got_by = Vec::new();
        for fuse in [true, false] {
            let (got, plan) = run_gpu_opts(
                &gpu,
                &g,
                &feeds,
                &HashMap::new(),
                &outs,
                PlanOptions {
                    reuse: true,
                    poison: true,
                    updates: true,
                    fuse,
                    multi_update: true,
                    colsum: true,
                    f16_activations: false,
                },
            );
            for (k, name) in ["y", "dz", "dgamma"].iter().enumerate() {
                // dgamma sums 1,025 rows in f32 in the large case.
                let atol = if k == 2 && !one { 2e-4 } else { 1e-5 };
                common::assert_close(
                    &format!("{rows}x{cols}+{shift}/{gshift} {name}, fuse {fuse}"),
                    &got[k],
                    &want[k],
                    1e-4,
                    atol,
                );
            }
            let keys = plan.kernel_keys();
            let fused = keys.iter().any(|k| k.starts_with("ln_forward"));
            let stats = keys.iter().any(|k| k.starts_with("rows_ln_stats"));
            assert_eq!(fused, fuse && one, "{keys:?}");
            assert_eq!(stats, !(fuse && one), "{keys:?}");
            got_by.push(got);
        }
        // The same expressions in the same order as the two-kernel form.
        common::assert_close(
            &format!("{rows}x{cols}+{shift}/{gshift} y, fused against two kernels"),
            &got_by[0][0],
            &got_by[1][0].iter().map(|&v| v as f64).collect::<Vec<_>>(),
            1e-6,
            1e-7,
        );
    }
}
