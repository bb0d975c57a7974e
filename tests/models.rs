//! Models against fixtures from the reference implementations (tools/make_fixtures.py).

mod common;

use std::path::Path;

use common::{assert_close, gpu};
use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
use stablerep::models::vit::{self, VitConfig};
use stablerep::nn::checkpoint::Checkpoint;

fn fixture(name: &str) -> Checkpoint {
    Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture")
}

#[test]
fn vit_features_match_timm() {
    let ck = fixture("vit_tiny.safetensors");
    let meta: serde_json::Value = serde_json::from_str(&ck.metadata["config"]).unwrap();
    let cfg = vit::infer_config(&ck, "visual.", 16).unwrap();
    assert_eq!(
        cfg,
        VitConfig {
            img_size: meta["img_size"].as_u64().unwrap() as usize,
            patch: meta["patch_size"].as_u64().unwrap() as usize,
            width: meta["embed_dim"].as_u64().unwrap() as usize,
            depth: meta["depth"].as_u64().unwrap() as usize,
            heads: meta["num_heads"].as_u64().unwrap() as usize,
            mlp: 128,
        }
    );
    let (gpu, _lock) = gpu();
    let input = ck.get("input", None).unwrap();
    let mut g = Graph::new();
    let images = g.input("images", &input.shape);
    let feats = vit::encoder(&mut g, &cfg, "visual.", images).unwrap();
    let mut store = ParamStore::new();
    vit::load_params(&gpu, &cfg, "visual.", &ck, &mut store).unwrap();
    let plan = Plan::compile(
        &gpu,
        &g,
        &[feats],
        &mut store,
        PlanOptions {
            poison: true,
            ..Default::default()
        },
    )
    .unwrap();
    plan.write(images, &input.data).unwrap();
    let got = plan.run_fetch(&[feats]).unwrap();
    let want: Vec<f64> = ck
        .get("features", Some(&[3, 32]))
        .unwrap()
        .data
        .iter()
        .map(|&v| v as f64)
        .collect();
    assert_close("ViT CLS features vs timm", &got[0], &want, 1e-4, 1e-4);
}

#[test]
fn vit_rejects_wrong_checkpoints_clearly() {
    let mut ck = fixture("vit_tiny.safetensors");
    let cfg = vit::infer_config(&ck, "visual.", 16).unwrap();
    let (gpu, _lock) = gpu();
    let mut store = ParamStore::new();
    ck.tensors.remove("visual.blocks.1.mlp.fc2.bias");
    let err = vit::load_params(&gpu, &cfg, "visual.", &ck, &mut store)
        .unwrap_err()
        .to_string();
    assert!(err.contains("visual.blocks.1.mlp.fc2.bias"), "{err}");
    let bad = VitConfig { width: 48, ..cfg };
    let err = vit::load_params(
        &gpu,
        &bad,
        "visual.",
        &fixture("vit_tiny.safetensors"),
        &mut store,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("shape"), "{err}");
}
