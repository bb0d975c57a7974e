//! Inputs that used to panic (found by reading the code as a new user would): each is now an
//! error that names the problem.

use std::path::Path;

use stablerep::diffusion::model::shard_range;
use stablerep::diffusion::unet::UNetConfig;
use stablerep::diffusion::vae::VaeConfig;
use stablerep::nn::checkpoint::{Checkpoint, HostTensor};

fn builtin(part: &str) -> serde_json::Value {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("assets/world-sd/{part}/config.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn unet_configs_with_empty_head_lists_or_too_many_levels_are_refused() {
    let good = builtin("unet");
    assert!(UNetConfig::from_json(&good.to_string(), "unet/config.json").is_ok());
    let mut c = good.clone();
    c["attention_head_dim"] = serde_json::json!([]);
    let e = UNetConfig::from_json(&c.to_string(), "unet/config.json")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("attention_head_dim") && e.contains("unet/config.json"),
        "{e}"
    );
    let mut c = good.clone();
    c["num_attention_heads"] = serde_json::json!([2]);
    let e = UNetConfig::from_json(&c.to_string(), "unet/config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_attention_heads"), "{e}");
    let mut c = good.clone();
    let n = 65;
    c["block_out_channels"] = serde_json::json!(vec![32; n]);
    c["down_block_types"] = serde_json::json!(vec!["DownBlock2D"; n]);
    c["up_block_types"] = serde_json::json!(vec!["UpBlock2D"; n]);
    let e = UNetConfig::from_json(&c.to_string(), "unet/config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("65 block_out_channels"), "{e}");
    let mut c = builtin("vae");
    c["block_out_channels"] = serde_json::json!(vec![16; 65]);
    let e = VaeConfig::from_json(&c.to_string(), "vae/config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("vae/config.json"), "{e}");
}

#[test]
fn vit_checkpoints_without_patches_or_with_a_zero_head_dim_are_refused() {
    let t = |shape: Vec<usize>| HostTensor {
        data: vec![0.0; shape.iter().product()],
        shape,
    };
    let mut ck = Checkpoint::default();
    ck.tensors.insert(
        "visual.patch_embed.proj.weight".into(),
        t(vec![32, 3, 8, 8]),
    );
    ck.tensors
        .insert("visual.pos_embed".into(), t(vec![1, 5, 32]));
    ck.tensors
        .insert("visual.blocks.0.mlp.fc1.weight".into(), t(vec![128, 32]));
    let cfg = stablerep::models::vit::infer_config(&ck, "visual.", 16).unwrap();
    assert_eq!((cfg.img_size, cfg.heads), (16, 2));
    let e = stablerep::models::vit::infer_config(&ck, "visual.", 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--head-dim"), "{e}");
    let e = stablerep::models::vit::infer_config(&ck, "visual.", 24)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--head-dim 24"), "{e}");
    ck.tensors
        .insert("visual.pos_embed".into(), t(vec![1, 0, 32]));
    let e = stablerep::models::vit::infer_config(&ck, "visual.", 16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pos_embed"), "{e}");
}

#[test]
fn a_huge_shard_index_is_an_error_or_an_exact_range_never_an_overflow() {
    assert_eq!(shard_range(10, (1, 3)).unwrap(), 3..6);
    let big = usize::MAX - 1;
    let r = shard_range(1000, (big, usize::MAX)).unwrap();
    assert!(r.start <= r.end && r.end <= 1000, "{r:?}");
    assert!(shard_range(10, (usize::MAX, usize::MAX)).is_err());
}
