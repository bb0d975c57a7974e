//! The shipped mini-world model (assets/world-sd): it is found, it matches diffusers on the
//! same noise (fixture from `tools/make_sd_fixtures.py builtin`), and its images follow
//! their captions' colours.

use std::path::Path;

mod common;

use stablerep::diffusion::model::{generate, GenerateOptions, SdModel};
use stablerep::diffusion::sampler::Kind;
use stablerep::nn::checkpoint::Checkpoint;
use stablerep::world::{builtin_model, GROUNDS};

fn options(prompt: &str, images: usize, noise: Option<Vec<f32>>) -> GenerateOptions {
    GenerateOptions {
        prompt: prompt.into(),
        negative: String::new(),
        images,
        guidance: 2.0,
        steps: 6,
        sampler: Kind::DpmPP2M { karras: true },
        seed: 0,
        caption: 0,
        size: 32,
        half_weights: None,
        save_size: None,
        init_noise: noise,
    }
}

#[test]
fn builtin_model_is_found_and_small() {
    let dir = builtin_model().unwrap();
    assert!(dir.ends_with("assets/world-sd"), "{}", dir.display());
    let m = SdModel::load(&dir).unwrap();
    assert_eq!(m.native_size(), 32);
    let mut bytes = 0;
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            bytes += e.unwrap().metadata().unwrap().len();
        }
    }
    assert!(bytes < 20 << 20, "{bytes} bytes");
}

#[test]
fn builtin_model_matches_diffusers() {
    let (gpu, _lock) = common::gpu();
    let m = SdModel::load(&builtin_model().unwrap()).unwrap();
    let fx = Checkpoint::load(Path::new("tests/fixtures/world_sd.safetensors")).unwrap();
    let prompts: Vec<String> = serde_json::from_str(&fx.metadata["prompts"]).unwrap();
    let noise = &fx.tensors["noise"].data;
    let per = noise.len() / prompts.len();
    for (i, p) in prompts.iter().enumerate() {
        let o = options(p, 1, Some(noise[i * per..(i + 1) * per].to_vec()));
        let got = generate(&gpu, &m, &o, |_| Ok(())).unwrap();
        let want = &fx.tensors[&format!("image{i}")].data;
        let worst = got.images[0]
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 2e-3, "'{p}': worst pixel difference {worst}");
    }
}

#[test]
fn builtin_images_show_their_backgrounds() {
    let (gpu, _lock) = common::gpu();
    let m = SdModel::load(&builtin_model().unwrap()).unwrap();
    // One object on each background; the border pixels should be nearest to the named
    // background colour.
    let mut right = 0;
    let mut total = 0;
    for (k, (ground, _)) in GROUNDS.iter().enumerate() {
        let prompt = format!("a small red circle on a {ground} background");
        let got = generate(&gpu, &m, &options(&prompt, 3, None), |_| Ok(())).unwrap();
        for img in &got.images {
            let mut mean = [0.0f32; 3];
            let mut n = 0.0;
            for y in 0..32 {
                for x in 0..32 {
                    if x < 3 || y < 3 || x >= 29 || y >= 29 {
                        for (c, m) in mean.iter_mut().enumerate() {
                            *m += img[c * 1024 + y * 32 + x];
                        }
                        n += 1.0;
                    }
                }
            }
            let dist = |g: &[f32; 3]| (0..3).map(|c| (mean[c] / n - g[c]).powi(2)).sum::<f32>();
            let nearest = (0..GROUNDS.len())
                .min_by(|&a, &b| dist(&GROUNDS[a].1).total_cmp(&dist(&GROUNDS[b].1)))
                .unwrap();
            right += usize::from(nearest == k);
            total += 1;
        }
    }
    assert!(
        right * 10 >= total * 8,
        "{right} of {total} backgrounds right"
    );
}
