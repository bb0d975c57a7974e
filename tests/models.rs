//! Models against fixtures from the reference implementations (tools/make_fixtures.py).

mod common;

use std::path::Path;

use common::{assert_close, gpu};
use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
use stablerep::models::vit::{self, Stem, VitConfig};
use stablerep::nn::checkpoint::Checkpoint;

fn fixture(name: &str) -> Checkpoint {
    Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture")
}

/// Runs a fixture test with the attention built both ways: the fused kernels
/// (`kernels::heads`) and the batched matmuls, whichever the device would pick.
fn both_attention_forms(test: impl Fn(&str)) {
    for fused in [true, false] {
        stablerep::gpu::with_fused_attention(fused, || {
            test(if fused {
                " (fused attention)"
            } else {
                " (matmul attention)"
            })
        });
    }
}

#[test]
fn vit_features_match_timm() {
    both_attention_forms(vit_features_match_timm_with);
}

fn vit_features_match_timm_with(form: &str) {
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
            stem: Stem::Patch,
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
    assert_close(
        &format!("ViT CLS features vs timm{form}"),
        &got[0],
        &want,
        1e-4,
        1e-4,
    );
}

#[test]
fn vit_with_conv_stem_matches_timm_features_and_gradients() {
    use stablerep::graph::{NodeId, Op};
    let ck = fixture("vit_conv_stem.safetensors");
    let cfg = vit::infer_config(&ck, "visual.", 16).unwrap();
    assert_eq!(
        cfg,
        VitConfig {
            img_size: 16,
            patch: 4,
            width: 32,
            depth: 1,
            heads: 2,
            mlp: 64,
            stem: Stem::Conv,
        }
    );
    assert_eq!(cfg.stem_channels(), vec![8, 16]);
    // Another implementation's stem (BatchNorm after the convolutions) is not taken for this one.
    let mut bn = fixture("vit_conv_stem.safetensors");
    let t = bn.tensors["visual.patch_embed.proj.1.bias"].clone();
    bn.tensors
        .insert("visual.patch_embed.proj.1.running_mean".into(), t);
    let err = vit::infer_config(&bn, "visual.", 16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("visual.patch_embed.proj.0.weight"), "{err}");
    // Settings the stem cannot take are refused by name.
    let err = VitConfig { width: 40, ..cfg }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("--width"), "{err}");
    let err = VitConfig {
        patch: 6,
        img_size: 18,
        ..cfg
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("--patch"), "{err}");
    // Configs written before the stem existed read as the patch embedding.
    let old: VitConfig = serde_json::from_str(
        r#"{"img_size":16,"patch":4,"width":32,"depth":1,"heads":2,"mlp":64}"#,
    )
    .unwrap();
    assert_eq!(old.stem, Stem::Patch);
    let (gpu, _lock) = gpu();
    let input = ck.get("input", None).unwrap();
    let r = ck.get("r", Some(&[3, 32])).unwrap();
    let mut g = Graph::new();
    let images = g.input("images", &input.shape);
    let rn = g.input("r", &[3, 32]);
    let feats = vit::encoder(&mut g, &cfg, "visual.", images).unwrap();
    let prod = g.mul(feats, rn).unwrap();
    let loss = g.sum_all(prod).unwrap();
    let params: Vec<NodeId> = (0..g.nodes.len())
        .map(NodeId)
        .filter(|&id| g.node(id).op == Op::Param)
        .collect();
    let grads = g.grad(loss, &params).unwrap();
    let mut store = ParamStore::new();
    vit::load_params(&gpu, &cfg, "visual.", &ck, &mut store).unwrap();
    let mut outs = vec![feats];
    outs.extend(&grads);
    let plan = Plan::compile(
        &gpu,
        &g,
        &outs,
        &mut store,
        PlanOptions {
            poison: true,
            ..Default::default()
        },
    )
    .unwrap();
    plan.write(images, &input.data).unwrap();
    plan.write(rn, &r.data).unwrap();
    let got = plan.run_fetch(&outs).unwrap();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let want = ck.get("features", Some(&[3, 32])).unwrap();
    assert_close(
        "conv-stem ViT features vs timm",
        &got[0],
        &f64s(&want.data),
        1e-4,
        1e-4,
    );
    // Every parameter's gradient, the stem's convolutions and GroupNorms included.
    let mut stem = 0;
    for (k, &p) in params.iter().enumerate() {
        let name = g.node(p).name.clone().unwrap();
        stem += name.starts_with("visual.patch_embed.proj.") as usize;
        let want = ck.get(&format!("grad.{name}"), None).unwrap();
        assert_close(
            &format!("d {name} vs PyTorch"),
            &got[1 + k],
            &f64s(&want.data),
            1e-3,
            1e-4,
        );
    }
    assert_eq!(stem, 10, "the stem's parameters");
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

/// The architecture and recipe of `train_step.safetensors` (see tools/make_fixtures.py).
fn fixture_step_config(ck: &Checkpoint) -> stablerep::models::stablerep::StepConfig {
    use stablerep::models::stablerep::{recipe_adamw, HeadConfig, StepConfig};
    StepConfig {
        vit: vit::infer_config(ck, "before.visual.", 16).unwrap(),
        head: HeadConfig {
            hidden: 64,
            out: 16,
        },
        captions: 4,
        images_per_caption: 3,
        temperature: 0.1,
        adamw: recipe_adamw(0.1),
        augment_from: None,
        plus: None,
    }
}

#[test]
fn one_training_step_matches_pytorch() {
    both_attention_forms(one_training_step_matches_pytorch_with);
}

fn one_training_step_matches_pytorch_with(form: &str) {
    use stablerep::graph::adam_hyper;
    use stablerep::models::stablerep::train_step;
    let ck = fixture("train_step.safetensors");
    let cfg = fixture_step_config(&ck);
    let step = train_step(&cfg).unwrap();
    let (gpu, _lock) = gpu();
    let mut store = ParamStore::new();
    for (name, t) in &ck.tensors {
        if let Some(key) = name.strip_prefix("before.") {
            store.set(&gpu, key, &t.shape, &t.data).unwrap();
        }
    }
    let plan = Plan::compile(
        &gpu,
        &step.graph,
        &[step.loss],
        &mut store,
        PlanOptions::default(),
    )
    .unwrap();
    plan.write(step.images, &ck.get("images", None).unwrap().data)
        .unwrap();
    plan.write(step.hyper, &adam_hyper(1e-3, &cfg.adamw, 1))
        .unwrap();
    let loss = plan.run_fetch(&[step.loss]).unwrap()[0][0];
    let want_loss = ck.get("loss", None).unwrap().data[0] as f64;
    assert_close(&format!("loss{form}"), &[loss], &[want_loss], 1e-5, 1e-6);
    let checked = compare_updates(&ck, 1e-3, form, |key| {
        store.read(key).unwrap_or_else(|e| panic!("{key}: {e}"))
    });
    assert!(checked >= 40, "only {checked} tensors compared");
}

/// Compares every `after.*` tensor of a training-step fixture with what `read` returns (in the
/// fixture's layout), as updates (after - before) so the tolerance is relative to what
/// changed. Returns how many tensors were compared.
fn compare_updates(ck: &Checkpoint, lr: f32, form: &str, read: impl Fn(&str) -> Vec<f32>) -> usize {
    let global = ck
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .flat_map(|(_, t)| t.data.iter())
        .fold(0.0f32, |a, v| a.max(v.abs()));
    let mut checked = 0;
    for (name, t) in &ck.tensors {
        let Some(key) = name.strip_prefix("after.") else {
            continue;
        };
        // Some gradients are zero in exact arithmetic (a bias right before BatchNorm, the key
        // bias of attention): both sides hold rounding noise there, which AdamW's first step
        // turns into +-lr. Where PyTorch's gradient is noise-sized only the update size is
        // checked; everywhere else the updates must match.
        let noise: Vec<bool> = match ck.tensors.get(&format!("grad.{key}")) {
            Some(gr) => gr.data.iter().map(|v| v.abs() <= 1e-5 * global).collect(),
            None => vec![false; t.data.len()],
        };
        let got = read(key);
        let want: Vec<f64> = t.data.iter().map(|&v| v as f64).collect();
        let before = &ck.get(&format!("before.{key}"), None).unwrap().data;
        // Compare the update (after - before) so the tolerance is relative to what changed.
        let du: Vec<f32> = got.iter().zip(before).map(|(a, b)| a - b).collect();
        let dw: Vec<f64> = want
            .iter()
            .zip(before)
            .map(|(a, &b)| a - b as f64)
            .collect();
        if ck.tensors.contains_key(&format!("grad.{key}")) {
            let bound = |d: &f32, b: &f32| d.abs() <= 1.01 * lr * (1.0 + 0.1 * b.abs());
            assert!(
                du.iter().zip(before).all(|(d, b)| bound(d, b)),
                "{key}{form}: an update larger than AdamW allows"
            );
        }
        let (du, dw): (Vec<f32>, Vec<f64>) = du
            .iter()
            .zip(&dw)
            .zip(&noise)
            .filter(|(_, &nz)| !nz)
            .map(|((a, b), _)| (*a, *b))
            .unzip();
        assert_close(&format!("update of {key}{form}"), &du, &dw, 2e-3, 2e-6);
        checked += 1;
    }
    checked
}

#[test]
fn one_stablerep_plus_step_matches_pytorch() {
    both_attention_forms(one_stablerep_plus_step_matches_pytorch_with);
}

fn one_stablerep_plus_step_matches_pytorch_with(form: &str) {
    use stablerep::graph::adam_hyper;
    use stablerep::models::stablerep::{
        recipe_adamw, train_step, HeadConfig, PlusConfig, StepConfig,
    };
    use stablerep::models::text::{TextBatch, TextConfig};
    let ck = fixture("stablerep_plus.safetensors");
    let meta = |k: &str| -> serde_json::Value { serde_json::from_str(&ck.metadata[k]).unwrap() };
    let (tm, bm) = (meta("text"), meta("batch"));
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let text = TextConfig {
        context: u(&tm["context_length"]),
        vocab: u(&tm["vocab_size"]),
        width: u(&tm["width"]),
        layers: u(&tm["layers"]),
        heads: u(&tm["heads"]),
        mlp: u(&tm["width"]) * 4,
    };
    let (n, m) = (u(&bm["captions"]), u(&bm["images_per_caption"]));
    let cfg = StepConfig {
        vit: vit::infer_config(&ck, "before.visual.", 16).unwrap(),
        head: HeadConfig { hidden: 24, out: 8 },
        captions: n,
        images_per_caption: m,
        temperature: 0.1,
        adamw: recipe_adamw(0.1),
        augment_from: None,
        plus: Some(PlusConfig {
            text,
            embed: u(&tm["output_dim"]),
        }),
    };
    let step = train_step(&cfg).unwrap();
    let used = common::used_token_ids(&ck);
    let d = text.width;
    let (gpu, _lock) = gpu();
    let mut store = ParamStore::new();
    for (name, t) in &ck.tensors {
        let Some(key) = name.strip_prefix("before.") else {
            continue;
        };
        if key == "token_embedding.weight" {
            let table = common::expand_token_table(&ck, t, text.vocab);
            store.set(&gpu, key, &table.shape, &table.data).unwrap();
        } else {
            store.set(&gpu, key, &t.shape, &t.data).unwrap();
        }
    }
    let mut fetch = vec![step.loss];
    fetch.extend(step.terms.iter().map(|t| t.1));
    let plan = Plan::compile(
        &gpu,
        &step.graph,
        &fetch,
        &mut store,
        PlanOptions::default(),
    )
    .unwrap();
    plan.write(step.images, &ck.get("images", None).unwrap().data)
        .unwrap();
    let ids = ck.get("token_ids", Some(&[n, text.context])).unwrap();
    let batch = TextBatch::from_ids(ids.data.iter().map(|&v| v as u32).collect(), &text);
    // The tokenizer gives the same ids from the captions.
    let captions: Vec<String> = serde_json::from_str(&ck.metadata["captions"]).unwrap();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    assert_eq!(TextBatch::from_captions(&refs, &text), batch);
    stablerep::train::fixed::write_text(&plan, step.text.as_ref().unwrap(), &batch).unwrap();
    plan.write(step.hyper, &adam_hyper(1e-2, &cfg.adamw, 1))
        .unwrap();
    let out = plan.run_fetch(&fetch).unwrap();
    for (i, key) in ["loss", "loss_ssl", "loss_it"].iter().enumerate() {
        let want = ck.get(key, None).unwrap().data[0] as f64;
        assert_close(&format!("{key}{form}"), &out[i], &[want], 1e-4, 1e-6);
    }
    let table = store.read("token_embedding.weight").unwrap();
    for (id, row) in table.chunks(d).enumerate() {
        if !used.contains(&id) {
            assert!(
                row.iter().all(|&v| v == 0.0),
                "unused token row {id} changed"
            );
        }
    }
    let checked = compare_updates(&ck, 1e-2, form, |key| {
        let got = store.read(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        if key == "token_embedding.weight" {
            used.iter()
                .flat_map(|&id| got[id * d..(id + 1) * d].to_vec())
                .collect()
        } else {
            got
        }
    });
    assert!(checked >= 50, "only {checked} tensors compared");
}

#[test]
fn training_resumes_exactly_from_a_checkpoint() {
    use stablerep::graph::adam_hyper;
    use stablerep::models::stablerep::train_step;
    use stablerep::train::checkpoint;
    let ck = fixture("train_step.safetensors");
    let cfg = fixture_step_config(&ck);
    let step = train_step(&cfg).unwrap();
    let images = &ck.get("images", None).unwrap().data;
    let (gpu, _lock) = gpu();
    let fresh = || {
        let mut store = ParamStore::new();
        for (name, t) in &ck.tensors {
            if let Some(key) = name.strip_prefix("before.") {
                store.set(&gpu, key, &t.shape, &t.data).unwrap();
            }
        }
        store
    };
    let run = |store: &mut ParamStore, from: u32, to: u32| {
        let plan = Plan::compile(
            &gpu,
            &step.graph,
            &[step.loss],
            store,
            PlanOptions::default(),
        )
        .unwrap();
        plan.write(step.images, images).unwrap();
        for t in from..to {
            plan.write(step.hyper, &adam_hyper(1e-3, &cfg.adamw, t + 1))
                .unwrap();
            plan.run().unwrap();
        }
        gpu.wait().unwrap();
    };
    // Three steps straight.
    let mut a = fresh();
    run(&mut a, 0, 3);
    // Two steps, save, load into a new store, one more step.
    let mut b = fresh();
    run(&mut b, 0, 2);
    let dir = std::env::temp_dir().join(format!("stablerep-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("last.safetensors");
    checkpoint::save(&b, &serde_json::json!({"captions": 4}), 2, &path).unwrap();
    let mut c = ParamStore::new();
    let (config, at) = checkpoint::load(&gpu, &path, &mut c).unwrap();
    assert_eq!((config["captions"].as_u64(), at), (Some(4), 2));
    run(&mut c, 2, 3);
    let names: Vec<String> = a.names().map(str::to_string).collect();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("optimizer.") && n.ends_with(".exp_avg"))
            && names.iter().any(|n| n.ends_with("running_var"))
    );
    for name in names {
        assert_eq!(
            a.read(&name).unwrap(),
            c.read(&name).unwrap(),
            "{name} differs after resuming"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `scale * sin(a * i + b)` for i in 0..n, as tools/make_fixtures.py's `cnn_wave`.
fn wave(n: usize, a: f64, b: f64, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|i| (scale * (a * i as f64 + b).sin()) as f32)
        .collect()
}

#[test]
fn cnn_gradients_match_pytorch_elementwise() {
    use stablerep::graph::{DType, NodeId, Op};
    use stablerep::models::cnn::{self, CnnConfig};
    let fx = fixture("cnn_grads.safetensors");
    let (b, classes) = (16, 6);
    let cfg = CnnConfig {
        img_size: 32,
        channels: vec![16, 24],
    };
    let mut g = Graph::new();
    let x = g.input("x", &[b, 3, 32, 32]);
    let f = cnn::encoder(&mut g, &cfg, "cnn.", x).unwrap();
    let w = g.param("classifier.shape.weight", &[classes, 24]);
    let bias = g.param("classifier.shape.bias", &[classes]);
    let z = g.matmul_t(f, w, false, true).unwrap();
    let z = g.add(z, bias).unwrap();
    let labels = g.input_typed("labels", &[b], DType::U32);
    let ce = g.cross_entropy(z, labels).unwrap();
    let loss = g.mean_all(ce).unwrap();
    let params: Vec<NodeId> = (0..g.nodes.len())
        .map(NodeId)
        .filter(|&id| g.node(id).op == Op::Param)
        .collect();
    let grads = g.grad(loss, &params).unwrap();
    let (gpu, _lock) = gpu();
    let mut store = ParamStore::new();
    let mut cin = 3;
    for (l, &c) in cfg.channels.iter().enumerate() {
        let k = (l * 10) as f64;
        let vals = [
            (
                "conv.weight",
                vec![c, cin, 3, 3],
                wave(c * cin * 9, 0.71, k + 1.0, 0.3),
            ),
            ("conv.bias", vec![c], wave(c, 1.3, k + 2.0, 0.1)),
            (
                "norm.weight",
                vec![c],
                wave(c, 0.9, k + 3.0, 0.2).iter().map(|v| 1.0 + v).collect(),
            ),
            ("norm.bias", vec![c], wave(c, 1.1, k + 4.0, 0.1)),
        ];
        for (name, shape, data) in vals {
            store
                .set(&gpu, &format!("cnn.{l}.{name}"), &shape, &data)
                .unwrap();
        }
        cin = c;
    }
    store
        .set(
            &gpu,
            "classifier.shape.weight",
            &[classes, 24],
            &wave(classes * 24, 0.53, 7.0, 0.5),
        )
        .unwrap();
    store
        .set(
            &gpu,
            "classifier.shape.bias",
            &[classes],
            &wave(classes, 0.29, 8.0, 0.1),
        )
        .unwrap();
    let mut outs = vec![loss];
    outs.extend(&grads);
    let plan = Plan::compile(&gpu, &g, &outs, &mut store, PlanOptions::default()).unwrap();
    plan.write(x, &wave(b * 3 * 32 * 32, 0.37, 0.0, 1.0))
        .unwrap();
    let y: Vec<u32> = (0..b as u32).map(|i| i % classes as u32).collect();
    plan.write_u32(labels, &y).unwrap();
    let got = plan.run_fetch(&outs).unwrap();
    let want_loss = fx.tensors["loss"].data[0];
    assert!(
        (got[0][0] - want_loss).abs() < 1e-5,
        "loss {} vs {want_loss}",
        got[0][0]
    );
    for (i, &p) in params.iter().enumerate() {
        let name = g.node(p).name.clone().unwrap();
        let want = &fx.tensors[&format!("grad.{name}")].data;
        let peak = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        // 1e-4 of the tensor's largest gradient, element by element.
        assert_close(
            &format!("gradient of {name}"),
            &got[1 + i],
            &want,
            0.0,
            1e-4 * peak,
        );
    }
}

#[test]
fn conv_stem_starts_as_pytorch_initializes_it() {
    use stablerep::models::stablerep::{init_params, HeadConfig};
    let cfg = VitConfig {
        img_size: 16,
        patch: 4,
        width: 32,
        depth: 1,
        heads: 2,
        mlp: 64,
        stem: Stem::Conv,
    };
    let head = HeadConfig { hidden: 16, out: 8 };
    let ck = init_params(&cfg, &head, None, 3);
    let t = |n: &str| ck.tensors[&format!("visual.patch_embed.proj.{n}")].clone();
    // Convolutions and their biases: uniform(+-1/sqrt(fan_in)) of the weight's fan-in.
    for (name, fan) in [("0", 27.0f32), ("3", 72.0), ("6", 16.0)] {
        for part in ["weight", "bias"] {
            let v = t(&format!("{name}.{part}")).data;
            let bound = 1.0 / fan.sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound), "{name}.{part}");
            let spread = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(spread > 0.5 * bound, "{name}.{part}: {spread} of {bound}");
        }
    }
    // The GroupNorms: weight 1, bias 0.
    for name in ["1", "4"] {
        assert!(t(&format!("{name}.weight")).data.iter().all(|&x| x == 1.0));
        assert!(t(&format!("{name}.bias")).data.iter().all(|&x| x == 0.0));
    }
}

/// Standard deviation and largest magnitude of the values of `names` pooled.
fn spread(tensors: &[&[f32]]) -> (f64, f64) {
    let n: usize = tensors.iter().map(|t| t.len()).sum();
    let mean = tensors
        .iter()
        .flat_map(|t| t.iter())
        .map(|&v| v as f64)
        .sum::<f64>()
        / n as f64;
    let var = tensors
        .iter()
        .flat_map(|t| t.iter())
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let max = tensors
        .iter()
        .flat_map(|t| t.iter())
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    (var.sqrt(), max)
}

/// `Init::Torch` gives the ViT's blocks and the supervised heads PyTorch's module defaults:
/// each parameter's spread and bound match those measured on `nn.MultiheadAttention` and
/// `nn.Linear` (`tools/make_fixtures.py torch_init`), while `Init::Official` keeps timm's
/// normal(0, 0.02).
#[test]
fn torch_init_matches_pytorch_module_defaults() {
    use stablerep::models::stablerep::{init_params_with, HeadConfig, Init};
    use stablerep::world::export::LabelKind;
    use stablerep::world::supervised::{self, Encoder};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_init.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (width, mlp) = (
        doc["width"].as_u64().unwrap() as usize,
        doc["mlp"].as_u64().unwrap() as usize,
    );
    let vit = VitConfig {
        img_size: 32,
        patch: 8,
        width,
        depth: 3,
        heads: doc["heads"].as_u64().unwrap() as usize,
        mlp,
        stem: Stem::Conv,
    };
    let head = HeadConfig {
        hidden: 64,
        out: 32,
    };
    let seeds = 0..8u64;
    let torch: Vec<_> = seeds
        .clone()
        .map(|s| init_params_with(&vit, &head, None, s, Init::Torch))
        .collect();
    let mut run = stablerep::world::judge::recipe();
    run.encoder = Encoder::Vit(vit);
    run.heads = vec![LabelKind::Shape, LabelKind::Colour];
    run.head_weights = vec![];
    run.init = Init::Torch;
    let heads: Vec<_> = seeds
        .clone()
        .map(|s| {
            supervised::init(&supervised::SupervisedRun {
                seed: s,
                ..run.clone()
            })
        })
        .collect();
    for (name, want) in doc["params"].as_object().unwrap() {
        let (std, max) = (
            want["std"].as_f64().unwrap(),
            want["max_abs"].as_f64().unwrap(),
        );
        let tensors: Vec<&[f32]> = if let Some(kind) = name.strip_prefix("classifier.") {
            heads
                .iter()
                .flat_map(|ck| {
                    ["shape", "colour"].map(|h| {
                        ck.tensors[&format!("classifier.{h}.{kind}")]
                            .data
                            .as_slice()
                    })
                })
                .collect()
        } else {
            torch
                .iter()
                .flat_map(|ck| {
                    (0..vit.depth).map(move |l| {
                        ck.tensors[&format!("visual.blocks.{l}.{name}")]
                            .data
                            .as_slice()
                    })
                })
                .collect()
        };
        let (got_std, got_max) = spread(&tensors);
        if std == 0.0 {
            assert_eq!(got_max, 0.0, "{name} should be zero");
            continue;
        }
        // Matrices pool 10^4 - 10^5 values (spread known to about 1 %), biases 10^2 - 10^3.
        let tol = if name.ends_with("weight") { 0.03 } else { 0.12 };
        assert!(
            (got_std / std - 1.0).abs() < tol,
            "{name}: std {got_std} against PyTorch's {std}"
        );
        assert!(
            got_max <= max * 1.02 && got_max >= max * 0.9,
            "{name}: largest magnitude {got_max} against PyTorch's {max}"
        );
    }
    let ck = &torch[0];
    assert!(ck.tensors["visual.cls_token"]
        .data
        .iter()
        .all(|&v| v == 0.0));
    let (pos, _) = spread(&[&ck.tensors["visual.pos_embed"].data]);
    assert!((pos / 0.02 - 1.0).abs() < 0.15, "positions: std {pos}");
    assert!(ck.tensors["visual.blocks.1.norm2.weight"]
        .data
        .iter()
        .all(|&v| v == 1.0));
    // The official scheme is unchanged: timm's normal(0, 0.02) for the same matrices.
    let official = init_params_with(&vit, &head, None, 0, Init::Official);
    let (qkv, _) = spread(&[&official.tensors["visual.blocks.0.attn.qkv.weight"].data]);
    assert!((qkv / 0.02 - 1.0).abs() < 0.03, "official qkv std {qkv}");
    assert!(official.tensors["visual.cls_token"]
        .data
        .iter()
        .any(|&v| v != 0.0));
}
