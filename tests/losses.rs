//! The multi-positive contrastive loss against a direct transcription of the official
//! PyTorch loss (tools/make_fixtures.py), and its known floor.

mod common;

use std::path::Path;

use common::{assert_close, gpu};
use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
use stablerep::models::losses::{
    image_text_loss, multi_positive_loss, multi_positive_loss_blocked,
};
use stablerep::nn::checkpoint::Checkpoint;

fn run_loss(h: &[f32], rows: usize, dim: usize, captions: usize) -> (f32, Vec<f32>) {
    run_loss_blocked(h, rows, dim, captions, stablerep::graph::MULTIPOS_BLOCK)
}

fn run_loss_blocked(
    h: &[f32],
    rows: usize,
    dim: usize,
    captions: usize,
    block: usize,
) -> (f32, Vec<f32>) {
    let (gpu, _lock) = gpu();
    let mut g = Graph::new();
    let x = g.input("h", &[rows, dim]);
    let loss = multi_positive_loss_blocked(&mut g, x, captions, 0.1, block).unwrap();
    let grad = g.grad(loss, &[x]).unwrap()[0];
    let plan = Plan::compile(
        &gpu,
        &g,
        &[loss, grad],
        &mut ParamStore::new(),
        PlanOptions {
            poison: true,
            ..Default::default()
        },
    )
    .unwrap();
    plan.write(x, h).unwrap();
    let out = plan.run_fetch(&[loss, grad]).unwrap();
    (out[0][0], out[1].clone())
}

#[test]
fn loss_and_gradient_match_the_official_pytorch_loss() {
    let ck = Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/multipos_loss.safetensors"),
    )
    .unwrap();
    for case in ["a", "b", "simclr"] {
        let meta: serde_json::Value = serde_json::from_str(&ck.metadata[case]).unwrap();
        let (n, m, d) = (
            meta["captions"].as_u64().unwrap() as usize,
            meta["images_per_caption"].as_u64().unwrap() as usize,
            meta["dim"].as_u64().unwrap() as usize,
        );
        let h = ck.get(&format!("{case}.h"), Some(&[n * m, d])).unwrap();
        let (loss, grad) = run_loss(&h.data, n * m, d, n);
        // Anchors in blocks of 4 and 7 rows (so no block holds the whole similarity matrix)
        // give the same loss and gradient.
        for block in [4, 7] {
            let (bl, bg) = run_loss_blocked(&h.data, n * m, d, n, block);
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            assert_close(
                &format!("{case}: blocked loss"),
                &[bl],
                &[loss as f64],
                1e-6,
                1e-6,
            );
            assert_close(
                &format!("{case}: blocked gradient"),
                &bg,
                &f64s(&grad),
                1e-5,
                1e-6,
            );
        }
        let want_loss = ck.get(&format!("{case}.loss"), None).unwrap().data[0] as f64;
        assert_close(&format!("{case}: loss"), &[loss], &[want_loss], 1e-5, 1e-6);
        let want: Vec<f64> = ck
            .get(&format!("{case}.grad"), None)
            .unwrap()
            .data
            .iter()
            .map(|&v| v as f64)
            .collect();
        let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert_close(
            &format!("{case}: gradient"),
            &grad,
            &want,
            1e-4,
            1e-4 * scale,
        );
    }
}

#[test]
fn loss_reaches_its_floor_log_m_minus_1() {
    // Each caption's m images identical and captions orthogonal: q spreads over the m - 1
    // positives, so the loss is log(m - 1) up to the tiny weight of the negatives.
    let (n, m, d) = (4, 6, 8);
    let mut h = vec![0.0f32; n * m * d];
    for v in 0..m {
        for i in 0..n {
            h[(v * n + i) * d + i] = 3.0;
        }
    }
    let (loss, _) = run_loss(&h, n * m, d, n);
    let floor = ((m - 1) as f32).ln();
    assert!((loss - floor).abs() < 1e-3, "loss {loss} vs floor {floor}");
}

#[test]
fn bad_loss_settings_are_rejected() {
    let mut g = Graph::new();
    let x = g.input("h", &[10, 4]);
    assert!(multi_positive_loss(&mut g, x, 3, 0.1)
        .unwrap_err()
        .to_string()
        .contains("3 captions"));
    assert!(multi_positive_loss(&mut g, x, 5, 0.0)
        .unwrap_err()
        .to_string()
        .contains("temperature"));
}

#[test]
fn image_text_loss_matches_the_stablerep_plus_transcription() {
    let ck = Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stablerep_plus.safetensors"),
    )
    .unwrap();
    let (gpu, _lock) = gpu();
    for case in ["loss_a", "loss_b"] {
        let meta: serde_json::Value = serde_json::from_str(&ck.metadata[case]).unwrap();
        let (n, m, d) = (
            meta["captions"].as_u64().unwrap() as usize,
            meta["images_per_caption"].as_u64().unwrap() as usize,
            meta["dim"].as_u64().unwrap() as usize,
        );
        let get = |k: &str| ck.get(&format!("{case}.{k}"), None).unwrap().data.clone();
        let mut g = Graph::new();
        let v = g.input("v", &[n * m, d]);
        let t = g.input("t", &[n, d]);
        let theta = g.input("theta", &[1]);
        let loss = image_text_loss(&mut g, v, t, theta).unwrap();
        let grads = g.grad(loss, &[v, t, theta]).unwrap();
        let mut fetch = vec![loss];
        fetch.extend(&grads);
        let plan = Plan::compile(
            &gpu,
            &g,
            &fetch,
            &mut ParamStore::new(),
            PlanOptions {
                poison: true,
                ..Default::default()
            },
        )
        .unwrap();
        plan.write(v, &get("v")).unwrap();
        plan.write(t, &get("t")).unwrap();
        plan.write(theta, &get("theta")).unwrap();
        let out = plan.run_fetch(&fetch).unwrap();
        let f64s = |x: Vec<f32>| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
        assert_close(
            &format!("{case}: loss"),
            &out[0],
            &f64s(get("loss")),
            1e-5,
            1e-6,
        );
        for (i, k) in ["grad_v", "grad_t", "grad_theta"].iter().enumerate() {
            let want = f64s(get(k));
            let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            assert_close(
                &format!("{case}: {k}"),
                &out[i + 1],
                &want,
                1e-4,
                1e-4 * scale,
            );
        }
    }
}
