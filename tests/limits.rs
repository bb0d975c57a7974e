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
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
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
    // Transposed A larger than a binding: K is split and partial products accumulate.
    let at = input(&mut g, &mut f, &mut rng, &[300, 16], -1.0, 1.0);
    let bk = input(&mut g, &mut f, &mut rng, &[300, 12], -1.0, 1.0);
    let ck = g.matmul_t(at, bk, true, false).unwrap();
    let outs = [u, s, c, ct, sm, ck];
    let got = run_gpu(&gpu, &g, &f, &HashMap::new(), &outs);
    let want = run_cpu(&g, &f, &HashMap::new(), &outs);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("split output {k}"), a, b, 1e-4, 1e-5);
    }
}

#[test]
fn a_k_split_weight_gradient_writes_its_column_sums_across_chunks() {
    // dY [300, 16] is larger than a 4 KiB binding: dY^T X runs in K chunks that add into C,
    // and the column sums of dY (a bias gradient, whose separate reduce could not bind dY at
    // all) add up across the same chunks.
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = tiny();
    let mut rng = Rng(37);
    let mut g = Graph::new();
    let mut f = HashMap::new();
    let dy = input(&mut g, &mut f, &mut rng, &[300, 16], -1.0, 1.0);
    let x = input(&mut g, &mut f, &mut rng, &[300, 12], -1.0, 1.0);
    let db = g.sum_to(dy, &[16]).unwrap();
    let dw = g.matmul_t(dy, x, true, false).unwrap();
    let mut store = ParamStore::new();
    let plan =
        Plan::compile(&gpu, &g, &[dw, db], &mut store, PlanOptions::default()).expect("compile");
    let keys = plan.kernel_keys();
    assert!(
        keys.len() > 1 && keys.iter().all(|k| k.contains("_colsum")),
        "{keys:?}"
    );
    assert!(keys.iter().any(|k| k.contains("_acc_colsum")), "{keys:?}");
    drop(plan);
    let outs = [dw, db];
    let got = run_gpu(&gpu, &g, &f, &HashMap::new(), &outs);
    let want = run_cpu(&g, &f, &HashMap::new(), &outs);
    for (name, (a, b)) in ["dW", "db"].iter().zip(got.iter().zip(&want)) {
        assert_close(&format!("K-split {name}"), a, b, 1e-4, 1e-5);
    }
}

#[test]
fn unsplittable_ops_refuse_with_a_clear_error() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
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

#[test]
fn contrastive_loss_on_a_similarity_matrix_larger_than_one_binding() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = tiny();
    let mut rng = Rng(32);
    let mut g = Graph::new();
    let mut f = HashMap::new();
    // 48 x 48 similarities = 9 KiB > 4 KiB bindings: rows are processed in chunks.
    let h = input(&mut g, &mut f, &mut rng, &[48, 8], -1.0, 1.0);
    let l = stablerep::models::losses::multi_positive_loss(&mut g, h, 12, 0.1).unwrap();
    let gr = g.grad(l, &[h]).unwrap()[0];
    let got = run_gpu(&gpu, &g, &f, &HashMap::new(), &[l, gr]);
    let want = run_cpu(&g, &f, &HashMap::new(), &[l, gr]);
    assert_close("chunked loss", &got[0], &want[0], 1e-5, 1e-6);
    assert_close("chunked gradient", &got[1], &want[1], 1e-4, 1e-6);
}
