//! Checks a full-size transformer block stack (the `vit-train` benchmark's graph: batch 32,
//! 64 tokens, width 192, 4 layers) on the GPU against the f64 CPU reference: the loss and the
//! gradient of every parameter at step 0. The CPU side takes about a minute.
//!   cargo run --release --example check_stack
use stablerep::demo::{init_params, transformer_stack, StackConfig};
use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::graph::{ParamStore, Plan, PlanOptions};
use std::collections::HashMap;
fn main() {
    env_logger::init();
    let gpu = Gpu::new(&GpuOptions::default()).unwrap();
    let cfg = StackConfig {
        batch: 32,
        tokens: 64,
        width: 192,
        layers: 4,
        heads: 3,
        mlp: 768,
    };
    let (mut g, x0, loss, params, hyper, _) = transformer_stack(&cfg).unwrap();
    let grads = g.grad(loss, &params).unwrap();
    let mut store = ParamStore::new();
    init_params(&gpu, &g, &params, &mut store, 1).unwrap();
    let mut outs = vec![loss];
    outs.extend(&grads);
    let plan = Plan::compile(
        &gpu,
        &g,
        &outs,
        &mut store,
        PlanOptions {
            updates: false,
            ..Default::default()
        },
    )
    .unwrap();
    let n = cfg.batch * cfg.tokens * cfg.width;
    let xs: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
        .collect();
    plan.write(x0, &xs).unwrap();
    let got = plan.run_fetch(&outs).unwrap();
    let mut cp = HashMap::new();
    for &p in &params {
        let name = g.node(p).name.clone().unwrap();
        cp.insert(
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
    feeds.insert(x0, xs.iter().map(|&v| v as f64).collect());
    feeds.insert(hyper, vec![0.0, 1.0, 1.0]);
    let t0 = std::time::Instant::now();
    let v = stablerep::cpu::eval(&g, &feeds, &mut cp).unwrap();
    println!("cpu eval {:.1}s", t0.elapsed().as_secs_f64());
    for (k, o) in outs.iter().enumerate() {
        let w = v[o.0].as_ref().unwrap();
        let mut maxd = 0f64;
        let mut maxv = 0f64;
        for (a, b) in got[k].iter().zip(w) {
            maxd = maxd.max((*a as f64 - b).abs());
            maxv = maxv.max(b.abs());
        }
        let name = if k == 0 {
            "loss".to_string()
        } else {
            format!(
                "d/d {}",
                g.node(params[k - 1]).name.clone().unwrap_or_default()
            )
        };
        let verdict = if maxd > 1e-4 * maxv + 1e-9 {
            "MISMATCH"
        } else {
            "ok"
        };
        println!("{verdict:8} {name:32} max |gpu - cpu| {maxd:.1e}, max |cpu| {maxv:.1e}");
    }
}
