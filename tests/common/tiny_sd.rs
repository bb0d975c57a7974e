//! A tiny Stable Diffusion 1.x model folder in diffusers' layout, for tests, the examples and
//! the app's screenshot: the UNet and VAE fixtures (SD 1.5's topology at toy widths, made by
//! `tools/make_sd_fixtures.py`) and a random one-layer text encoder over CLIP's full vocabulary
//! (so the shipped tokenizer's ids fit). Its images are noise-like: it is untrained.

use std::path::Path;

use stablerep::nn::checkpoint::{Checkpoint, HostTensor};

/// SplitMix64 values uniform in [lo, hi), rounded to f32 (the tests' `Rng::vec`).
fn uniform(state: &mut u64, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state = state.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            (lo + (hi - lo) * u) as f32
        })
        .collect()
}

fn io(path: &Path, e: std::io::Error) -> stablerep::Error {
    stablerep::Error::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Writes the model folder `dir` (text_encoder/, unet/, vae/).
pub fn write(dir: &Path) -> stablerep::Result<()> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["unet", "vae"] {
        let ck = Checkpoint::load(&fixtures.join(format!("sd_{name}.safetensors")))?;
        let mut out = Checkpoint::default();
        for (k, t) in &ck.tensors {
            if let Some(n) = k.strip_prefix(&format!("{name}.")) {
                out.tensors.insert(n.to_string(), t.clone());
            }
        }
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).map_err(|e| io(&sub, e))?;
        out.save(&sub.join("diffusion_pytorch_model.safetensors"))?;
        let config = sub.join("config.json");
        std::fs::write(&config, &ck.metadata["config"]).map_err(|e| io(&config, e))?;
    }
    let (v, d, m) = (49_408usize, 16usize, 24usize);
    let mut state = 5u64;
    let mut te = Checkpoint::default();
    let mut put = |name: &str, shape: Vec<usize>| {
        let data = uniform(&mut state, shape.iter().product(), -0.1, 0.1);
        te.tensors
            .insert(format!("text_model.{name}"), HostTensor { shape, data });
    };
    put("embeddings.token_embedding.weight", vec![v, d]);
    put("embeddings.position_embedding.weight", vec![77, d]);
    for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        put(
            &format!("encoder.layers.0.self_attn.{p}.weight"),
            vec![d, d],
        );
        put(&format!("encoder.layers.0.self_attn.{p}.bias"), vec![d]);
    }
    for n in ["layer_norm1", "layer_norm2"] {
        put(&format!("encoder.layers.0.{n}.weight"), vec![d]);
        put(&format!("encoder.layers.0.{n}.bias"), vec![d]);
    }
    put("encoder.layers.0.mlp.fc1.weight", vec![m, d]);
    put("encoder.layers.0.mlp.fc1.bias", vec![m]);
    put("encoder.layers.0.mlp.fc2.weight", vec![d, m]);
    put("encoder.layers.0.mlp.fc2.bias", vec![d]);
    put("final_layer_norm.weight", vec![d]);
    put("final_layer_norm.bias", vec![d]);
    let sub = dir.join("text_encoder");
    std::fs::create_dir_all(&sub).map_err(|e| io(&sub, e))?;
    te.save(&sub.join("model.safetensors"))?;
    let config = sub.join("config.json");
    std::fs::write(
        &config,
        format!(r#"{{"vocab_size": {v}, "hidden_size": {d}, "intermediate_size": {m}, "num_attention_heads": 2, "num_hidden_layers": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}}"#),
    )
    .map_err(|e| io(&config, e))
}
