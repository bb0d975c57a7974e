//! Benchmarks, one JSON object per line. Usage:
//!   cargo run --release --example bench -- [FILTER...] [--size N] [--reps N]
//! FILTER selects cases by substring: `matmul`, `matmul_variants`, `mlp_step`, `vit-train`,
//! `chain`. `BENCH_PROFILE=1` adds a per-kernel breakdown of `vit-train`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use stablerep::demo::{train_mlp, DemoConfig};
use stablerep::exec::Prepared;
use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
use stablerep::kernels::elementwise::UnaryOp;
use stablerep::kernels::matmul::{self, MatmulShape, SgTile, Tile, Variant};
use stablerep::kernels::View;

struct Args {
    filters: Vec<String>,
    sizes: Vec<u32>,
    reps: usize,
}

fn args() -> Args {
    let mut a = Args {
        filters: vec![],
        sizes: vec![],
        reps: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(s) = it.next() {
        match s.as_str() {
            "--size" => a
                .sizes
                .push(it.next().and_then(|v| v.parse().ok()).expect("--size N")),
            "--reps" => a.reps = it.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--bench" => {}
            f => a.filters.push(f.to_string()),
        }
    }
    a
}

fn wanted(a: &Args, name: &str) -> bool {
    a.filters.is_empty() || a.filters.iter().any(|f| name.contains(f.as_str()))
}

/// Times `reps` back-to-back runs of one matmul shape (values not checked); returns GFLOP/s
/// and the kernel key.
fn time_shape(
    gpu: &Arc<Gpu>,
    s: &MatmulShape,
    variant: Variant,
    reps: usize,
) -> stablerep::Result<(f64, String)> {
    let (na, nb, nc) = matmul::sizes(s);
    let bufs = [
        gpu.alloc(na * 4, "a")?,
        gpu.alloc(nb * 4, "b")?,
        gpu.alloc(nc * 4, "c")?,
    ];
    for (buf, n) in bufs.iter().zip([na, nb]) {
        let v: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32) / 13.0 - 0.5).collect();
        gpu.write(buf, 0, &v);
    }
    let d = matmul::launch_with(
        s,
        View::new(0, na),
        View::new(1, nb),
        View::new(2, nc),
        &gpu.caps,
        variant,
    )?;
    let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
    Prepared::new(gpu, &d, &refs)?.submit(gpu);
    gpu.wait()?;
    let many: Vec<_> = (0..reps).flat_map(|_| d.clone()).collect();
    let p = Prepared::new(gpu, &many, &refs)?;
    let t0 = Instant::now();
    p.submit(gpu);
    gpu.wait()?;
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    let key = d[0].key.clone();
    for buf in bufs {
        gpu.pool.give(buf);
    }
    let flops = 2.0 * s.batch as f64 * s.m as f64 * s.n as f64 * s.k as f64;
    Ok((flops / dt / 1e9, key))
}

/// Times `reps` back-to-back matmuls recorded in one submit; returns GFLOP/s.
fn time_matmul(
    gpu: &Arc<Gpu>,
    n: u32,
    variant: Variant,
    reps: usize,
) -> stablerep::Result<(f64, String)> {
    let s = MatmulShape {
        batch: 1,
        m: n,
        n,
        k: n,
        ta: false,
        tb: false,
        a_shared: false,
        b_shared: false,
    };
    let (na, nb, nc) = matmul::sizes(&s);
    let a = gpu.alloc(na * 4, "a")?;
    let b = gpu.alloc(nb * 4, "b")?;
    let c = gpu.alloc(nc * 4, "c")?;
    let av: Vec<f32> = (0..na)
        .map(|i| ((i * 7 % 13) as f32) / 13.0 - 0.5)
        .collect();
    let bv: Vec<f32> = (0..nb)
        .map(|i| ((i * 5 % 11) as f32) / 11.0 - 0.5)
        .collect();
    gpu.write(&a, 0, &av);
    gpu.write(&b, 0, &bv);
    let d = matmul::launch_with(
        &s,
        View::new(0, na),
        View::new(1, nb),
        View::new(2, nc),
        &gpu.caps,
        variant,
    )?;
    let key = d[0].key.clone();
    let warm = Prepared::new(gpu, &d, &[&a, &b, &c])?;
    warm.submit(gpu);
    gpu.wait()?;
    let many: Vec<_> = (0..reps).flat_map(|_| d.clone()).collect();
    let p = Prepared::new(gpu, &many, &[&a, &b, &c])?;
    let t0 = Instant::now();
    p.submit(gpu);
    gpu.wait()?;
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    // Spot-check one element against f64.
    let out: Vec<f32> = gpu.read(&c, 0, nc * 4)?;
    let (i, j) = (n as usize / 2, n as usize / 3);
    let r: f64 = (0..n as usize)
        .map(|t| av[i * n as usize + t] as f64 * bv[t * n as usize + j] as f64)
        .sum();
    let err = (out[i * n as usize + j] as f64 - r).abs();
    if err > 1e-3 * (n as f64).sqrt() {
        return Err(stablerep::Error::Gpu(format!(
            "matmul result wrong: {} vs {r}",
            out[i * n as usize + j]
        )));
    }
    for buf in [a, b, c] {
        gpu.pool.give(buf);
    }
    Ok((2.0 * (n as f64).powi(3) / dt / 1e9, key))
}

/// Forward + backward + AdamW of a pre-norm transformer block stack (batch 32, 64 tokens,
/// width 192, 4 layers, 3 heads, MLP 768), built from the engine's generic ops.
fn vit_train(gpu: &Arc<Gpu>, adapter: &str) -> stablerep::Result<()> {
    use stablerep::demo::{transformer_stack, StackConfig};
    use stablerep::graph::adam_hyper;
    let cfg = StackConfig {
        batch: 32,
        tokens: 64,
        width: 192,
        layers: 4,
        heads: 3,
        mlp: 768,
    };
    let (g, x0, loss, params, hyper, adam) = transformer_stack(&cfg)?;
    let mut store = ParamStore::new();
    stablerep::demo::init_params(gpu, &g, &params, &mut store, 1)?;
    let plan = Plan::compile(gpu, &g, &[loss], &mut store, PlanOptions::default())?;
    let n = cfg.batch * cfg.tokens * cfg.width;
    let xs: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
        .collect();
    plan.write(x0, &xs)?;
    plan.write(hyper, &adam_hyper(1e-3, &adam, 1))?;
    plan.run_fetch(&[loss])?;
    // Each step is timed on its own (submit + wait), so that the minimum and median show what
    // the kernels reach when a shared machine's load comes and goes.
    let steps = if gpu.caps.is_cpu { 5 } else { 20 };
    let mut times = Vec::with_capacity(steps);
    for s in 0..steps {
        let t0 = Instant::now();
        plan.write(hyper, &adam_hyper(1e-3, &adam, s as u32 + 2))?;
        plan.run()?;
        gpu.wait()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let l = plan.run_fetch(&[loss])?[0][0];
    let ms = times.iter().sum::<f64>() / steps as f64;
    times.sort_by(f64::total_cmp);
    let (ms_min, ms_median) = (times[0], times[steps / 2]);
    let st = plan.stats();
    if std::env::var("BENCH_PROFILE").is_ok() {
        for (key, secs, count) in plan.profile()? {
            println!(
                "{}",
                json!({"bench": "vit-train_profile", "kernel": key, "ms": (secs * 1e4).round() / 10.0, "dispatches": count})
            );
        }
    }
    println!(
        "{}",
        json!({
            "bench": "vit-train", "adapter": adapter, "batch": cfg.batch, "tokens": cfg.tokens, "width": cfg.width,
            "layers": cfg.layers, "heads": cfg.heads, "mlp": cfg.mlp, "ms_per_step": (ms * 10.0).round() / 10.0,
            "ms_min": (ms_min * 10.0).round() / 10.0, "ms_median": (ms_median * 10.0).round() / 10.0, "loss": l,
            "dispatches_per_submit": st.dispatches, "plan_peak_bytes": st.peak_bytes, "sum_tensor_bytes": st.tensor_bytes,
        })
    );
    Ok(())
}

fn main() -> stablerep::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let a = args();
    let gpu = Gpu::new(&GpuOptions::default())?;
    let adapter = gpu.info.name.clone();
    let sizes = if a.sizes.is_empty() {
        vec![1024]
    } else {
        a.sizes.clone()
    };
    if wanted(&a, "matmul")
        && !a
            .filters
            .iter()
            .any(|f| f == "matmul_variants" || f == "matmul_shapes")
    {
        for &n in &sizes {
            let reps = if a.reps > 0 {
                a.reps
            } else if gpu.caps.is_cpu {
                3
            } else {
                50
            };
            let (gflops, kernel) = time_matmul(&gpu, n, Variant::Auto, reps)?;
            println!(
                "{}",
                json!({"bench": "matmul", "adapter": adapter, "m": n, "n": n, "k": n, "kernel": kernel, "reps": reps, "gflops": (gflops * 10.0).round() / 10.0})
            );
        }
    }
    if a.filters.iter().any(|f| f == "matmul_shapes") {
        // The matmuls of one vit-train step (batch 32 x 64 tokens, width 192, MLP 768, 3 heads):
        // forward x W^T, input gradients dY W, weight gradients dY^T X, and attention.
        let lin = |m, n, k, ta, tb| MatmulShape {
            batch: 1,
            m,
            n,
            k,
            ta,
            tb,
            a_shared: false,
            b_shared: false,
        };
        let att = |ta, tb| MatmulShape {
            batch: 96,
            m: 64,
            n: 64,
            k: 64,
            ta,
            tb,
            a_shared: false,
            b_shared: false,
        };
        let cases = [
            ("fwd qkv", lin(2048, 576, 192, false, true)),
            ("fwd fc1", lin(2048, 768, 192, false, true)),
            ("fwd fc2", lin(2048, 192, 768, false, true)),
            ("dx qkv", lin(2048, 192, 576, false, false)),
            ("dx fc2", lin(2048, 768, 192, false, false)),
            ("dW qkv", lin(576, 192, 2048, true, false)),
            ("dW fc2", lin(192, 768, 2048, true, false)),
            ("attn QK^T", att(false, true)),
            ("attn PV", att(false, false)),
            ("attn dK", att(true, false)),
        ];
        for (name, s) in cases {
            let reps = if a.reps > 0 { a.reps } else { 5 };
            let (gflops, kernel) = time_shape(&gpu, &s, Variant::Auto, reps)?;
            println!(
                "{}",
                json!({"bench": "matmul_shape", "case": name, "adapter": adapter, "batch": s.batch, "m": s.m, "n": s.n, "k": s.k, "kernel": kernel, "gflops": (gflops * 10.0).round() / 10.0})
            );
        }
    }
    if a.filters.iter().any(|f| f == "matmul_variants") {
        let mut variants = vec![
            Variant::Blocked(Tile {
                tm: 4,
                tn: 4,
                wx: 8,
                wy: 8,
            }),
            Variant::Blocked(Tile {
                tm: 8,
                tn: 8,
                wx: 8,
                wy: 8,
            }),
            Variant::Blocked(Tile {
                tm: 8,
                tn: 8,
                wx: 16,
                wy: 16,
            }),
        ];
        if gpu.caps.subgroup_size == Some(8) {
            for (r, tn) in [(32, 4), (32, 8), (32, 12), (64, 4), (64, 8), (96, 4)] {
                variants.push(Variant::Subgroup(SgTile { s: 8, r, tn }));
            }
        }
        for &n in &sizes {
            for v in &variants {
                let reps = if a.reps > 0 {
                    a.reps
                } else if gpu.caps.is_cpu {
                    3
                } else {
                    50
                };
                let (gflops, kernel) = time_matmul(&gpu, n, *v, reps)?;
                println!(
                    "{}",
                    json!({"bench": "matmul_variant", "adapter": adapter, "m": n, "n": n, "k": n, "kernel": kernel, "gflops": (gflops * 10.0).round() / 10.0})
                );
            }
        }
    }
    if wanted(&a, "mlp_step") {
        let cfg = DemoConfig {
            steps: 50,
            ..Default::default()
        };
        let r = train_mlp(&gpu, &cfg, 1000, |_, _| {})?;
        println!(
            "{}",
            json!({
                "bench": "mlp_step", "adapter": adapter, "hidden": cfg.hidden, "batch": 3 * cfg.points_per_class,
                "ms_per_step": (r.ms_per_step * 100.0).round() / 100.0,
                "dispatches_per_submit": r.plan.dispatches, "submits_per_step": r.plan.submits_per_run,
                "plan_peak_bytes": r.plan.peak_bytes, "sum_tensor_bytes": r.plan.tensor_bytes,
                "persistent_bytes": r.plan.persistent_bytes,
            })
        );
    }
    if wanted(&a, "vit-train") {
        vit_train(&gpu, &adapter)?;
    }
    if wanted(&a, "chain") {
        let mut g = Graph::new();
        let x = g.input("x", &[256, 256]);
        let mut h = x;
        for i in 0..64 {
            h = g.unary([UnaryOp::Tanh, UnaryOp::Affine(1.01, 0.0)][i % 2], h)?;
        }
        let y = g.sum_all(h)?;
        for reuse in [true, false] {
            let plan = Plan::compile(
                &gpu,
                &g,
                &[y],
                &mut ParamStore::new(),
                PlanOptions {
                    reuse,
                    ..Default::default()
                },
            )?;
            let s = plan.stats();
            println!(
                "{}",
                json!({"bench": "chain", "adapter": adapter, "ops": 64, "reuse": reuse, "plan_peak_bytes": s.peak_bytes, "sum_tensor_bytes": s.tensor_bytes, "buffers": s.buffers})
            );
        }
    }
    Ok(())
}
