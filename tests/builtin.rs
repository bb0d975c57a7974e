//! The shipped mini-world model (assets/world-sd): it is found, it matches diffusers on the
//! same noise (fixture from `tools/make_sd_fixtures.py builtin`), and the shipped judge reads
//! its images as their captions' colours and backgrounds.

use std::path::Path;

mod common;

use stablerep::diffusion::model::{generate, GenerateOptions, SdModel};
use stablerep::diffusion::sampler::Kind;
use stablerep::nn::checkpoint::Checkpoint;
use stablerep::world::builtin_model;

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
        half_activations: None,
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
fn builtin_images_follow_their_captions_as_the_judge_reads_them() {
    use stablerep::world::judge::{builtin_judge, fidelity, FidelitySpec, Judge};
    let (gpu, _lock) = common::gpu();
    let m = SdModel::load(&builtin_model().unwrap()).unwrap();
    let judge = Judge::load(&gpu, &builtin_judge().unwrap()).unwrap();
    let spec = FidelitySpec {
        captions: 12,
        images_per_caption: 2,
        guidance: 2.0,
        steps: 8,
        seed: 3,
    };
    let f = fidelity(&gpu, &m, &judge, &spec, |_, _| {}).unwrap();
    eprintln!("{f:?}");
    // The judge reads the real renders of the same captions (nearly) perfectly, so what it
    // misreads in the samples is the generator's. The shipped model measured 86 / 99 / 21 %
    // (background / colour / shape) on 24 captions x 4 at 20 steps (docs/world.md); the
    // model it replaced drew the caption's colour half the time.
    assert!(
        f.real[1] >= 0.95 && f.real[2] >= 0.95,
        "judge on renders: {:?}",
        f.real
    );
    assert!(
        f.colour >= 0.85,
        "object colour right in {:.1} %",
        100.0 * f.colour
    );
    assert!(
        f.background >= 0.6,
        "background right in {:.1} %",
        100.0 * f.background
    );
    assert!(f.diversity > 0.0);
}

#[test]
fn a_prompts_images_denoised_together_equal_those_made_one_at_a_time() {
    use stablerep::diffusion::model::Generator;
    let (gpu, _lock) = common::gpu();
    let m = SdModel::load(&builtin_model().unwrap()).unwrap();
    let len = 4 * 16 * 16;
    let mut rng = stablerep::util::rng::Rng(11);
    let noise: Vec<f32> = (0..4 * len).map(|_| rng.normal() as f32).collect();
    let prompt = "a green heart on a pink background";
    let o = options(prompt, 4, Some(noise.clone()));
    // A small model takes all four images in one batch.
    assert_eq!(Generator::new(&gpu, &m, &o).unwrap().batch(), 4);
    let mut steps = Vec::new();
    let together = generate(&gpu, &m, &o, |p| {
        steps.push(p.done());
        Ok(())
    })
    .unwrap();
    assert_eq!(steps, (1..=6).map(|i| 4 * i).collect::<Vec<u64>>());
    for k in 0..4 {
        let one = options(prompt, 1, Some(noise[k * len..(k + 1) * len].to_vec()));
        let alone = generate(&gpu, &m, &one, |_| Ok(())).unwrap();
        let worst = together.images[k]
            .iter()
            .zip(&alone.images[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "image {k}: worst pixel difference {worst}");
    }
}
