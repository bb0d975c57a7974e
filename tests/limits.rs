//! Tensors larger than one storage binding and grids larger than the per-dimension workgroup
//! limit: a device opened with artificially tiny limits (4 KiB bindings, 7 workgroups per
//! dimension) must split work and fold grids and still match the CPU, or refuse clearly.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use common::{assert_close, input, run_cpu, run_gpu, Rng};
use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
use stablerep::kernels::elementwise::UnaryOp;
use stablerep::kernels::reduce::ReduceOp;

static TINY: OnceLock<Arc<Gpu>> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());

fn tiny() -> Arc<Gpu> {
    TINY.get_or_init(|| {
        Gpu::new(&GpuOptions {
            max_binding_override: Some(4096),
            max_workgroups_override: Some(7),
            ..Default::default()
        })
        .expect("GPU adapter")
    })
    .clone()
}

#[test]
fn oversized_tensors_are_split_and_grids_folded() {
    let _l = LOCK.lock().unwrap();
    let gpu = tiny();
    assert_eq!(gpu.caps.max_binding, 4096);
    let mut rng = Rng(31);
    let mut g = Graph::new();
    let mut f = HashMap::new();
    let x = input(&mut g, &mut f, &mut rng, &[5000], -1.0, 1.0);
    let y = input(&mut g, &mut f, &mut rng, &[5000], -1.0, 1.0);
    let u = g.unary(UnaryOp::Tanh, x).unwrap();
    let s = g.add(u, y).unwrap();
    let a = input(&mut g, &mut f, &mut rng, &[300, 40], -1.0, 1.0);
    let b = input(&mut g, &mut f, &mut rng, &[40, 24], -1.0, 1.0);
    let c = g.matmul(a, b).unwrap();
    let bt = input(&mut g, &mut f, &mut rng, &[24, 40], -1.0, 1.0);
    let ct = g.matmul_t(a, bt, false, true).unwrap();
    let r = input(&mut g, &mut f, &mut rng, &[200, 30], -1.0, 1.0);
    let sm = g.softmax(r).unwrap();
    let outs = [u, s, c, ct, sm];
    let got = run_gpu(&gpu, &g, &f, &HashMap::new(), &outs);
    let want = run_cpu(&g, &f, &HashMap::new(), &outs);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("split output {k}"), a, b, 1e-4, 1e-5);
    }
}

#[test]
fn unsplittable_ops_refuse_with_a_clear_error() {
    let _l = LOCK.lock().unwrap();
    let gpu = tiny();
    let mut g = Graph::new();
    let x = g.input("x", &[50, 100]);
    let y = g.reduce(ReduceOp::Sum, x, 1).unwrap();
    let err = Plan::compile(
        &gpu,
        &g,
        &[y],
        &mut ParamStore::new(),
        PlanOptions::default(),
    )
    .err()
    .expect("a 20 KB reduce input cannot bind on a 4 KiB device");
    let msg = err.to_string();
    assert!(
        msg.contains("max_storage_buffer_binding_size") && msg.contains("4096"),
        "{msg}"
    );
}
