//! Training Stable Diffusion's components with the engine, on tiny models: fresh parameters by
//! diffusers' names, VAE and denoiser steps whose loss falls on a fixed batch, the text
//! encoder's names round-tripping to transformers' layout, and a written model folder that the
//! standard loader and sampler run.

mod common;

use stablerep::diffusion::model::{generate, GenerateOptions, SdModel};
use stablerep::diffusion::sampler::Kind;
use stablerep::diffusion::text_encoder::{convert, to_transformers};
use stablerep::diffusion::training::{
    denoise_step, init_params, vae_step, write_folder, SmallSd, TEXT_PREFIX,
};
use stablerep::graph::{adam_hyper, ParamStore, Plan, PlanOptions};
use stablerep::kernels::layout::embedding_index;
use stablerep::kernels::optim::AdamW;
use stablerep::nn::checkpoint::Checkpoint;
use stablerep::text::tokenizer::{Tokenizer, EOT};
use stablerep::world::descriptions;
use stablerep::world::export::render_caption;

fn spec() -> SmallSd {
    SmallSd {
        image_size: 16,
        vae_channels: vec![8, 16],
        latent_channels: 4,
        unet_channels: vec![8, 16],
        unet_attention: vec![false, true],
        unet_heads: 2,
        layers_per_block: 1,
        groups: 4,
        text_width: 16,
        text_layers: 1,
        text_heads: 2,
        text_context: 77,
        scaling_factor: 1.0,
    }
}

fn adamw() -> AdamW {
    AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        clamp: None,
    }
}

fn store_of(gpu: &std::sync::Arc<stablerep::gpu::Gpu>, ck: &Checkpoint) -> ParamStore {
    let mut store = ParamStore::new();
    for (n, t) in &ck.tensors {
        store.set(gpu, n, &t.shape, &t.data).unwrap();
    }
    store
}

#[test]
fn small_sd_trains_and_writes_a_loadable_folder() {
    let (gpu, _lock) = common::gpu();
    let sd = spec();
    let (ucfg, vcfg, tcfg) = sd.parsed().unwrap();
    let batch = 4;
    let size = sd.image_size;
    let world = descriptions(batch, 3);
    let images: Vec<f32> = world
        .iter()
        .enumerate()
        .flat_map(|(c, d)| render_caption(d, c, 0, size, 0))
        .map(|v| 2.0 * v - 1.0)
        .collect();

    // VAE: 40 steps on one batch with fixed noise cut the loss.
    let step = vae_step(&vcfg, batch, size, 1e-4, &adamw()).unwrap();
    let vae_init = init_params(&step.graph, 1);
    assert!(vae_init.tensors.contains_key("encoder.conv_in.weight"));
    assert!(vae_init.tensors.contains_key("decoder.conv_out.bias"));
    assert_eq!(
        vae_init.tensors["decoder.mid_block.resnets.0.norm1.weight"].data[0],
        1.0
    );
    let mut store = store_of(&gpu, &vae_init);
    let plan = Plan::compile(
        &gpu,
        &step.graph,
        &[step.loss, step.mean],
        &mut store,
        PlanOptions::default(),
    )
    .unwrap();
    let lat = size / 2;
    let noise: Vec<f32> = {
        let mut r = common::Rng(9);
        (0..batch * 4 * lat * lat)
            .map(|_| r.range(-1.0, 1.0) as f32)
            .collect()
    };
    plan.write(step.images, &images).unwrap();
    plan.write(step.noise, &noise).unwrap();
    let mut losses = Vec::new();
    for t in 0..40u32 {
        plan.write(step.hyper, &adam_hyper(3e-3, &adamw(), t + 1))
            .unwrap();
        losses.push(plan.run_fetch(&[step.loss]).unwrap()[0][0]);
    }
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(
        losses[39] < 0.5 * losses[0],
        "VAE loss {} -> {}",
        losses[0],
        losses[39]
    );
    let vae_weights =
        stablerep::train::checkpoint::tensors(&store, vae_init.tensors.keys()).unwrap();

    // Denoiser (text encoder + UNet): 40 steps on fixed latents, noise and timesteps.
    let tokens = 77;
    let step = denoise_step(&ucfg, &tcfg, batch, lat, tokens, &adamw()).unwrap();
    let den_init = init_params(&step.graph, 2);
    assert!(den_init.tensors.contains_key("conv_in.weight"));
    assert!(den_init
        .tensors
        .contains_key(&format!("{TEXT_PREFIX}token_embedding.weight")));
    let mut store = store_of(&gpu, &den_init);
    let plan = Plan::compile(
        &gpu,
        &step.graph,
        &[step.loss],
        &mut store,
        PlanOptions::default(),
    )
    .unwrap();
    let tok = Tokenizer::clip_transformers();
    let ids: Vec<u32> = world
        .iter()
        .flat_map(|d| tok.tokenize(&d.caption(), tokens, EOT))
        .collect();
    let (offsets, rows) = embedding_index(&ids, tcfg.vocab_size);
    plan.write_u32(step.ids, &ids).unwrap();
    plan.write_u32(step.offsets, &offsets).unwrap();
    plan.write_u32(step.rows, &rows).unwrap();
    let mut r = common::Rng(10);
    let n = batch * 4 * lat * lat;
    let latents: Vec<f32> = (0..n).map(|_| r.range(-1.0, 1.0) as f32).collect();
    let eps: Vec<f32> = (0..n).map(|_| r.range(-1.5, 1.5) as f32).collect();
    plan.write(step.latents, &latents).unwrap();
    plan.write(step.noise, &eps).unwrap();
    let acp = [0.9f32, 0.5, 0.2, 0.05];
    plan.write(step.signal, &acp.map(|a| a.sqrt())).unwrap();
    plan.write(step.sigma, &acp.map(|a| (1.0 - a).sqrt()))
        .unwrap();
    let time: Vec<f32> = [50.0, 300.0, 600.0, 900.0]
        .iter()
        .flat_map(|&t| stablerep::diffusion::blocks::timestep_features(t, 8, true, 0.0))
        .collect();
    plan.write(step.time, &time).unwrap();
    let mut losses = Vec::new();
    for t in 0..40u32 {
        plan.write(step.hyper, &adam_hyper(3e-3, &adamw(), t + 1))
            .unwrap();
        losses.push(plan.run_fetch(&[step.loss]).unwrap()[0][0]);
    }
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(
        losses[39] < 0.7 * losses[0],
        "denoiser loss {} -> {}",
        losses[0],
        losses[39]
    );
    let den = stablerep::train::checkpoint::tensors(&store, den_init.tensors.keys()).unwrap();

    // The text encoder's names go to transformers' layout and back unchanged.
    let mut text = Checkpoint::default();
    let mut unet = Checkpoint::default();
    for (k, t) in &den.tensors {
        if let Some(n) = k.strip_prefix(TEXT_PREFIX) {
            text.tensors.insert(format!("{TEXT_PREFIX}{n}"), t.clone());
        } else {
            unet.tensors.insert(k.clone(), t.clone());
        }
    }
    let hf = to_transformers(&text, &tcfg, TEXT_PREFIX).unwrap();
    assert!(hf
        .tensors
        .contains_key("text_model.encoder.layers.0.self_attn.k_proj.weight"));
    let back = convert(&hf, &tcfg, TEXT_PREFIX, "round trip").unwrap();
    assert_eq!(back.tensors, text.tensors);

    // The folder loads with the standard loader (f16 files) and generates.
    let dir = std::env::temp_dir().join(format!("stablerep-sdtrain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_folder(&dir, &sd.configs(), &unet, &vae_weights, &text).unwrap();
    let m = SdModel::load(&dir).unwrap();
    assert_eq!(m.unet.block_out_channels, vec![8, 16]);
    // The folder's own tokenizer files (written for diffusers) read back to the same tokens.
    assert!(dir.join("model_index.json").is_file());
    assert!(dir.join("tokenizer/vocab.json").is_file());
    let cap = world[0].caption();
    assert_eq!(
        m.tokenizer.tokenize(&cap, tokens, EOT),
        tok.tokenize(&cap, tokens, EOT)
    );
    let o = GenerateOptions {
        prompt: world[0].caption(),
        negative: String::new(),
        images: 1,
        guidance: 2.0,
        steps: 3,
        sampler: Kind::Ddim { eta: 0.0 },
        seed: 0,
        caption: 0,
        size,
        half_weights: None,
        half_activations: None,
        save_size: None,
        init_noise: None,
    };
    let out = generate(&gpu, &m, &o, |_| Ok(())).unwrap();
    assert_eq!(out.images[0].len(), 3 * size * size);
    assert!(out.images[0].iter().all(|v| v.is_finite()));
}

#[test]
fn mini_world_training_resumes_exactly_after_a_cancel() {
    use stablerep::world::train_sd::{train, Recipe, Stage};
    let (gpu, _lock) = common::gpu();
    let mut r = Recipe::builtin();
    r.spec = spec();
    r.captions = 50;
    let stage = |steps| Stage {
        steps,
        batch: 2,
        lr: 1e-3,
        warmup: 1,
    };
    (r.vae, r.denoiser, r.checkpoint_every) = (stage(4), stage(4), 2);
    // Offset noise starts after the cancel at denoiser step 2, so resuming crosses it.
    (r.offset_noise, r.offset_noise_from) = (0.2, 3);
    let base = std::env::temp_dir().join(format!("stablerep-worldsd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // Straight through.
    let straight = train(&gpu, &r, &base.join("a"), |_| {}, &|| false).unwrap();
    // Cancelled after 3 VAE steps, then (resumed) after the last VAE step and 2 denoiser
    // steps, then resumed to the end.
    let calls = std::cell::Cell::new(0);
    let out = base.join("b");
    for stop_at in [3, 3] {
        calls.set(0);
        let e = train(&gpu, &r, &out, |_| {}, &|| {
            calls.set(calls.get() + 1);
            calls.get() > stop_at
        })
        .unwrap_err();
        assert!(matches!(e, stablerep::Error::Cancelled), "{e}");
    }
    let resumed = train(&gpu, &r, &out, |_| {}, &|| false).unwrap();
    for sub in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let a = Checkpoint::load(&straight.join(sub)).unwrap();
        let b = Checkpoint::load(&resumed.join(sub)).unwrap();
        assert_eq!(a.tensors, b.tensors, "{sub} differs after resuming");
    }
    assert!(out.join("vae-check.png").is_file());
    // A stop before the schedule's end keeps the schedule: stopped at denoiser step 3, the
    // model differs from the end's; continued, the run ends where the straight one did. A
    // folder already past a stop is refused by name.
    let sub = "unet/diffusion_pytorch_model.safetensors";
    let want = Checkpoint::load(&straight.join(sub)).unwrap();
    let d = base.join("d");
    r.denoiser_stop = Some(3);
    let stopped = train(&gpu, &r, &d, |_| {}, &|| false).unwrap();
    assert_ne!(
        Checkpoint::load(&stopped.join(sub)).unwrap().tensors,
        want.tensors
    );
    r.denoiser_stop = None;
    let continued = train(&gpu, &r, &d, |_| {}, &|| false).unwrap();
    assert_eq!(
        Checkpoint::load(&continued.join(sub)).unwrap().tensors,
        want.tensors,
        "stopping at step 3 and continuing changed the result"
    );
    r.denoiser_stop = Some(2);
    let e = train(&gpu, &r, &d, |_| {}, &|| false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("past the stop") && e.contains("denoiser-training"),
        "{e}"
    );
    r.denoiser_stop = None;
    // The offset is not ignored: without it the last step's update differs.
    r.offset_noise = 0.0;
    let plain = train(&gpu, &r, &base.join("c"), |_| {}, &|| false).unwrap();
    let a = Checkpoint::load(&straight.join(sub)).unwrap();
    let c = Checkpoint::load(&plain.join(sub)).unwrap();
    assert_ne!(a.tensors, c.tensors, "offset noise changed nothing");
    let m = SdModel::load(&resumed).unwrap();
    assert!(m.vae.scaling_factor > 0.0 && m.vae.scaling_factor.is_finite());
}

/// A judge trained a few steps at 16 x 16 (the mechanics, not the accuracy), written as the
/// demo reads it.
fn tiny_judge(
    gpu: &std::sync::Arc<stablerep::gpu::Gpu>,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    use stablerep::models::cnn::CnnConfig;
    use stablerep::world::judge::{export, recipe, JUDGE_FILE};
    use stablerep::world::supervised::{checkpoint_path, run, Encoder};
    let mut r = recipe();
    r.encoder = Encoder::Cnn(CnnConfig {
        img_size: 16,
        channels: vec![8, 16],
    });
    (r.batch, r.steps, r.checkpoint_every) = (8, 2, 2);
    run(gpu, &r, &dir.join("judge-run"), |_, _| {}, &|| false).unwrap();
    let file = dir.join(JUDGE_FILE);
    export(&checkpoint_path(&dir.join("judge-run")), &file).unwrap();
    file
}

#[test]
fn demo_pipeline_generates_trains_seven_arms_and_scores_on_real_renders() {
    use stablerep::world::demo::{run, table, DemoConfig, DemoResults, ARMS};
    use stablerep::world::train_sd::{train, Recipe, Stage};
    let (gpu, _lock) = common::gpu();
    // A barely trained 16 x 16 model: the mechanics, not the quality.
    let mut r = Recipe::builtin();
    r.spec = spec();
    r.captions = 20;
    let one = Stage {
        steps: 1,
        batch: 2,
        lr: 1e-3,
        warmup: 0,
    };
    (r.vae, r.denoiser) = (one, one);
    let base = std::env::temp_dir().join(format!("stablerep-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model = train(&gpu, &r, &base.join("sd"), |_| {}, &|| false).unwrap();
    let mut c = DemoConfig::new(model);
    c.judge = Some(tiny_judge(&gpu, &base));
    c.captions = 6;
    c.images_per_caption = 2;
    c.sampler_steps = 2;
    c.size = 16;
    c.views_per_step = 4;
    c.train_steps = 3;
    c.vit = stablerep::models::vit::VitConfig {
        img_size: 16,
        patch: 8,
        width: 32,
        depth: 1,
        heads: 2,
        mlp: 64,
        stem: stablerep::models::vit::Stem::Patch,
    };
    c.head = stablerep::models::stablerep::HeadConfig {
        hidden: 32,
        out: 16,
    };
    c.eval_images = 24;
    c.probe_epochs = 2;
    let out = base.join("demo");
    let mut stages = Vec::new();
    let results = run(&gpu, &c, &out, |s| {
        if stages.last() != Some(&s.stage) {
            stages.push(s.stage.clone());
        }
    })
    .unwrap();
    let names: Vec<&str> = results.outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ARMS);
    assert!(results.outcomes.iter().all(|o| o.views_per_step == 4));
    assert!(results.outcomes.iter().all(|o| o.final_loss.is_finite()
        && (0.0..=1.0).contains(&o.knn)
        && (0.0..=1.0).contains(&o.linear)
        && (0.0..=1.0).contains(&o.colour_knn)
        && (0.0..=1.0).contains(&o.colour_linear)));
    for dir in ["synthetic-pool", "oracle-pool"] {
        let pool = stablerep::data::pool::Pool::open(&out.join(dir)).unwrap();
        assert_eq!((pool.captions.len(), pool.images_per_caption()), (6, 2));
    }
    // The oracle pool holds m fresh renders of the real pool's captions, the first of them
    // the real render itself.
    let real = stablerep::data::pool::Pool::open(&out.join("real-pool")).unwrap();
    let oracle = stablerep::data::pool::Pool::open(&out.join("oracle-pool")).unwrap();
    let texts = |p: &stablerep::data::pool::Pool| -> Vec<String> {
        p.captions.iter().map(|c| c.text.clone()).collect()
    };
    assert_eq!(texts(&real), texts(&oracle));
    assert_eq!(
        std::fs::read(real.image_path(3, 0).unwrap()).unwrap(),
        std::fs::read(oracle.image_path(3, 0).unwrap()).unwrap()
    );
    assert_ne!(
        std::fs::read(oracle.image_path(3, 0).unwrap()).unwrap(),
        std::fs::read(oracle.image_path(3, 1).unwrap()).unwrap()
    );
    assert!(
        stages.iter().any(|s| s.contains("generating")),
        "{stages:?}"
    );
    // results.json: seconds, fidelity fractions, the seven arms by name with fractions.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert!(json["seconds"].as_f64().unwrap() > 0.0);
    for k in ["background", "colour", "shape"] {
        let v = json["fidelity"][k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "fidelity {k} = {v}");
    }
    let arms = json["arms"].as_array().unwrap();
    let listed: Vec<&str> = arms.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(listed, ARMS);
    for a in arms {
        for k in ["colour_knn", "colour_linear", "shape_knn", "shape_linear"] {
            let v = a[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{k} = {v}");
        }
        assert!(a["final_loss"].as_f64().unwrap().is_finite());
    }
    let parsed: DemoResults =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(parsed.arms.len(), 7);
    assert!(table(&results.outcomes).contains("stablerep-oracle"));
    assert!(out.join("results.png").is_file() && out.join("losses.png").is_file());
    // A second run finds every stage done and gives the same scores.
    let again = run(&gpu, &c, &out, |s| {
        assert!(!s.stage.starts_with("training"), "{}", s.stage)
    })
    .unwrap();
    for (a, b) in results.outcomes.iter().zip(&again.outcomes) {
        assert_eq!(
            (a.knn, a.linear, a.final_loss),
            (b.knn, b.linear, b.final_loss)
        );
    }
    assert_eq!(results.fidelity.shape, again.fidelity.shape);
    // The folder remembers its settings and refuses a run with others.
    let other = DemoConfig {
        train_steps: 4,
        ..c.clone()
    };
    let e = run(&gpu, &other, &out, |_| {}).unwrap_err().to_string();
    assert!(
        e.contains("settings.txt")
            && e.contains("train_steps: 4")
            && e.contains("was train_steps: 3"),
        "{e}"
    );
    // The default initialization is not written, so older folders stay valid; another is.
    let settings = std::fs::read_to_string(out.join("settings.txt")).unwrap();
    assert!(!settings.contains("init"), "{settings}");
    let torch = DemoConfig {
        init: stablerep::models::stablerep::Init::Torch,
        ..c.clone()
    };
    let e = run(&gpu, &torch, &out, |_| {}).unwrap_err().to_string();
    assert!(e.contains("init: Torch"), "{e}");
    // A folder that holds work but no record of its settings is refused too.
    let old = base.join("old-demo");
    std::fs::create_dir_all(old.join("real-pool")).unwrap();
    let e = run(&gpu, &c, &old, |_| {}).unwrap_err().to_string();
    assert!(e.contains("before its settings were recorded"), "{e}");

    // The experiments on the same model: 2 seeds, guidance 1 and 2, m = 2 at 8 images.
    use stablerep::world::experiments::{paired, plots, read_records, report, Plan};
    let plan = Plan {
        base: c.clone(),
        seeds: vec![0, 1],
        guidances: vec![1.0, 2.0],
        images_per_caption: vec![2],
        budget: 8,
        synthetic: true,
        only: Vec::new(),
    };
    let ex = base.join("experiments");
    let records = stablerep::world::experiments::run(&gpu, &plan, &ex, |_| {}).unwrap();
    // Per seed: 7 main arms, 2 x 2 guidance arms, 1 m arm, and the fidelity of 3 pools
    // (w 2 m 2 c 6, w 1 m 2 c 6, w 2 m 2 c 4).
    assert_eq!(records.len(), (7 + 4 + 1 + 3) * 2);
    let mut keys: Vec<&str> = records.iter().map(|r| r.arm.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 15, "{keys:?}");
    // Pools are per seed: other captions, other images.
    let p0 = stablerep::data::pool::Pool::open(&ex.join("seed-0/oracle-pool")).unwrap();
    let p1 = stablerep::data::pool::Pool::open(&ex.join("seed-1/oracle-pool")).unwrap();
    assert_ne!(
        std::fs::read(p0.image_path(0, 0).unwrap()).unwrap(),
        std::fs::read(p1.image_path(0, 0).unwrap()).unwrap()
    );
    let m2 = records.iter().find(|r| r.arm == "m/2/stablerep").unwrap();
    let o = m2.outcome.as_ref().unwrap();
    assert_eq!((o.captions, o.images_per_caption), (4, 2));
    let (d, n) = paired(&records, "main/stablerep-oracle", "main/simclr-oracle").unwrap();
    assert_eq!(n, 2);
    assert!(d.iter().all(|(m, se)| m.is_finite() && se.is_finite()));
    // Resuming trains nothing new and reads back the same records.
    let again = stablerep::world::experiments::run(&gpu, &plan, &ex, |s| {
        assert!(!s.stage.starts_with("training"), "{}", s.stage)
    })
    .unwrap();
    assert_eq!(again.len(), records.len());
    assert_eq!(read_records(&ex).unwrap().len(), records.len());
    let text = report(&plan, &records);
    for row in [
        "| stablerep-oracle | 2 |",
        "| oracle | 2 |",
        "| 2 | 4 |",
        "| 1 |",
    ] {
        assert!(text.contains(row), "{row} missing from\n{text}");
    }
    let charts = plots(&plan, &records).unwrap();
    assert_eq!(charts.len(), 3);

    // Only the named arms, from PyTorch's initialization; an unknown name is refused first.
    let only = Plan {
        base: stablerep::world::demo::DemoConfig {
            init: stablerep::models::stablerep::Init::Torch,
            ..c.clone()
        },
        seeds: vec![0],
        guidances: vec![],
        images_per_caption: vec![],
        synthetic: false,
        only: vec!["supervised".into()],
        ..plan.clone()
    };
    let recs = stablerep::world::experiments::run(&gpu, &only, &base.join("only"), |_| {}).unwrap();
    let arms: Vec<&str> = recs.iter().map(|r| r.arm.as_str()).collect();
    assert_eq!(arms, ["main/supervised"]);
    let torch = recs[0].outcome.as_ref().unwrap();
    let official = records
        .iter()
        .find(|r| r.arm == "main/supervised" && r.seed == 0)
        .and_then(|r| r.outcome.as_ref())
        .unwrap();
    assert!(torch.final_loss.is_finite());
    assert_ne!(
        torch.final_loss, official.final_loss,
        "the initialization changed nothing"
    );
    let bad = Plan {
        only: vec!["simclr".into()],
        ..only.clone()
    };
    let e = stablerep::world::experiments::run(&gpu, &bad, &base.join("bad"), |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown arm 'simclr'"), "{e}");
    assert!(
        !base.join("bad").exists(),
        "a refused plan wrote its folder"
    );
    let _ = std::fs::remove_dir_all(&base);
}
