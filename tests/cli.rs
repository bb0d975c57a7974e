//! The `stablerep` command end to end: the parity training mode against the PyTorch step,
//! and clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use stablerep::nn::checkpoint::Checkpoint;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stablerep"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stablerep-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `train_step` fixture, and a folder holding its starting weights (`init.safetensors`)
/// and its batch (`batch.safetensors`) as `train --fixed-batch` reads them.
fn fixed_batch_inputs(name: &str) -> (Checkpoint, PathBuf) {
    let fx = Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train_step.safetensors"),
    )
    .unwrap();
    let dir = tmp(name);
    let mut init = Checkpoint::default();
    let mut batch = Checkpoint::default();
    for (name, t) in &fx.tensors {
        if let Some(k) = name.strip_prefix("before.") {
            init.tensors.insert(k.to_string(), t.clone());
        }
    }
    batch
        .tensors
        .insert("images".into(), fx.get("images", None).unwrap().clone());
    init.save(&dir.join("init.safetensors")).unwrap();
    batch.save(&dir.join("batch.safetensors")).unwrap();
    (fx, dir)
}

/// Writes the encoder of the tiny timm ViT fixture (32 px, width 32, head dim 16) to `path`, as
/// a timm user would convert one; returns the fixture.
fn tiny_encoder(path: &Path) -> Checkpoint {
    let fx = Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit_tiny.safetensors"),
    )
    .unwrap();
    let mut ck = Checkpoint::default();
    for (k, t) in &fx.tensors {
        if k.starts_with("visual.") {
            ck.tensors.insert(k.clone(), t.clone());
        }
    }
    ck.save(path).unwrap();
    fx
}

#[test]
fn fixed_batch_training_matches_the_pytorch_step() {
    let (fx, dir) = fixed_batch_inputs("train");
    let out = bin()
        .args(["train", "--init"])
        .arg(dir.join("init.safetensors"))
        .arg("--fixed-batch")
        .arg(dir.join("batch.safetensors"))
        .args([
            "--captions-per-batch",
            "4",
            "--images-per-caption",
            "3",
            "--steps",
            "1",
            "--no-augment",
        ])
        .args([
            "--lr-schedule",
            "constant",
            "--lr",
            "1e-3",
            "--weight-decay",
            "0.1",
            "--head-dim",
            "16",
            "--out",
        ])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("step 1/1") && stdout.contains("images/s"),
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let m: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let want = fx.get("loss", None).unwrap().data[0] as f64;
    assert!(
        (m["loss"].as_f64().unwrap() - want).abs() < 1e-5 * want.abs().max(1.0),
        "{m} vs {want}"
    );
    let after = Checkpoint::load(&dir.join("run/checkpoint-last.safetensors")).unwrap();
    assert_eq!(after.metadata.get("step").map(String::as_str), Some("1"));
    for key in [
        "visual.blocks.1.mlp.fc1.weight",
        "image_mlp.layer3.weight",
        "image_mlp.bn2.running_var",
    ] {
        let got = &after.get(key, None).unwrap().data;
        let want = &fx.get(&format!("after.{key}"), None).unwrap().data;
        let before = &fx.get(&format!("before.{key}"), None).unwrap().data;
        for i in 0..got.len() {
            let (du, dw) = (got[i] - before[i], want[i] - before[i]);
            assert!(
                (du - dw).abs() <= 2e-3 * dw.abs() + 2e-6,
                "{key}[{i}]: update {du} vs {dw}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `train --fixed-batch --save-grads`: the first step's gradients match PyTorch's element by
/// element (1e-4 of the tensor's largest gradient), and the weights after three AdamW steps
/// match too (after one step an update is about -lr * sign(g); after three, the moments carry
/// the gradients' sizes).
#[test]
fn fixed_batch_gradients_and_three_steps_match_pytorch() {
    let (fx, dir) = fixed_batch_inputs("grads");
    let out = bin()
        .args(["train", "--init"])
        .arg(dir.join("init.safetensors"))
        .arg("--fixed-batch")
        .arg(dir.join("batch.safetensors"))
        .args(["--captions-per-batch", "4", "--images-per-caption", "3"])
        .args(["--steps", "3", "--no-augment", "--lr-schedule", "constant"])
        .args(["--lr", "1e-3", "--weight-decay", "0.1", "--head-dim", "16"])
        .arg("--save-grads")
        .arg(dir.join("grads.safetensors"))
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The losses of the three steps.
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let want_losses = &fx.get("losses3", None).unwrap().data;
    for (line, want) in metrics.lines().zip(want_losses) {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let got = m["loss"].as_f64().unwrap();
        assert!(
            (got - *want as f64).abs() < 1e-5 * (*want as f64).abs().max(1.0),
            "{m} vs {want}"
        );
    }
    assert_eq!(metrics.lines().count(), 3);
    // Gradients, element by element.
    let global = check_grads(&fx, &dir.join("grads.safetensors"));
    check_three_steps(&fx, &dir.join("run"), global);
    // The same three steps with gradient caching in chunks of 3 images (4 chunks) match
    // PyTorch's unchunked run alike, and so do the first step's gradients: the encoder's
    // summed over the chunks on the device, the head's from the whole-batch plan.
    let out = bin()
        .args(["train", "--init"])
        .arg(dir.join("init.safetensors"))
        .arg("--fixed-batch")
        .arg(dir.join("batch.safetensors"))
        .args([
            "--captions-per-batch",
            "4",
            "--images-per-caption",
            "3",
            "--chunk",
            "3",
        ])
        .args(["--steps", "3", "--no-augment", "--lr-schedule", "constant"])
        .args(["--lr", "1e-3", "--weight-decay", "0.1", "--head-dim", "16"])
        .arg("--save-grads")
        .arg(dir.join("grads-chunked.safetensors"))
        .arg("--out")
        .arg(dir.join("chunked"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_grads(&fx, &dir.join("grads-chunked.safetensors"));
    check_three_steps(&fx, &dir.join("chunked"), global);
    std::fs::remove_dir_all(&dir).ok();
}

/// A `--save-grads` file against PyTorch's first-step gradients (`grad.*`), element by
/// element; returns the largest gradient anywhere.
fn check_grads(fx: &Checkpoint, path: &Path) -> f32 {
    let grads = Checkpoint::load(path).unwrap();
    let global = fx
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .flat_map(|(_, t)| t.data.iter())
        .fold(0.0f32, |a, v| a.max(v.abs()));
    let mut compared = 0;
    for (name, want) in &fx.tensors {
        let Some(key) = name.strip_prefix("grad.") else {
            continue;
        };
        let got = grads
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("no gradient for {key} in the --save-grads file"));
        assert_eq!(got.shape, want.shape, "{key}: shape");
        // A gradient that is zero in exact arithmetic (a bias right before BatchNorm, the final
        // norm's bias, whose shift BatchNorm removes) is rounding noise on both sides: there
        // both must stay noise-sized (1e-5 of the largest gradient anywhere).
        let largest = want.data.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let noise = 1e-5 * global;
        for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
            if largest <= noise {
                assert!(
                    g.abs() <= noise,
                    "{key}[{i}]: gradient {g}, PyTorch's is noise ({w})"
                );
            } else {
                assert!(
                    (g - w).abs() <= 1e-4 * largest,
                    "{key}[{i}]: gradient {g} vs PyTorch {w} (largest {largest})"
                );
            }
        }
        compared += 1;
    }
    assert_eq!(
        compared,
        grads.tensors.len(),
        "gradients PyTorch does not have"
    );
    assert!(compared >= 40, "only {compared} gradients compared");
    global
}

/// The losses and the weights (and BatchNorm running statistics) of a three-step fixed-batch
/// run in `run` against PyTorch's (`losses3`, `after3.*`); `global` is the largest gradient.
fn check_three_steps(fx: &Checkpoint, run: &Path, global: f32) {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let want_losses = &fx.get("losses3", None).unwrap().data;
    assert_eq!(metrics.lines().count(), 3);
    for (line, want) in metrics.lines().zip(want_losses) {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let got = m["loss"].as_f64().unwrap();
        assert!(
            (got - *want as f64).abs() < 1e-5 * (*want as f64).abs().max(1.0),
            "{}: {m} vs {want}",
            run.display()
        );
    }
    let after = Checkpoint::load(&run.join("checkpoint-last.safetensors")).unwrap();
    assert_eq!(after.metadata.get("step").map(String::as_str), Some("3"));
    let mut compared = 0;
    for (name, want) in &fx.tensors {
        let Some(key) = name.strip_prefix("after3.") else {
            continue;
        };
        let before = &fx.get(&format!("before.{key}"), None).unwrap().data;
        let got = &after.get(key, None).unwrap().data;
        // Elements whose gradient is noise (see above) take noise-driven steps: only their size
        // is bounded (three steps of at most lr each, plus weight decay).
        let noise: Vec<bool> = match fx.tensors.get(&format!("grad.{key}")) {
            Some(gr) => gr.data.iter().map(|v| v.abs() <= 1e-5 * global).collect(),
            None => vec![false; want.data.len()],
        };
        // BatchNorm's running means sum the batch means of what follows those noise-driven
        // parameters (the head's biases; the final norm's bias through layer1): PyTorch's own
        // three-step running means move by 4.4e-3 (bn1) and 1.3e-3 (bn2) when the signs of that
        // rounding noise are flipped, so they get that much room.
        let room = if key.ends_with("running_mean") {
            5e-3
        } else {
            0.0
        };
        for i in 0..got.len() {
            let (du, dw) = (got[i] - before[i], want.data[i] - before[i]);
            if noise[i] {
                assert!(
                    du.abs() <= 3.03e-3 * (1.0 + 0.1 * before[i].abs()),
                    "{key}[{i}]"
                );
                continue;
            }
            assert!(
                (du - dw).abs() <= 3e-3 * dw.abs() + 3e-6 + room,
                "{key}[{i}]: update after three steps {du} vs PyTorch {dw}"
            );
        }
        compared += 1;
    }
    assert!(compared >= 40, "only {compared} tensors compared");
}

/// A gradient step that overflows while the loss is still finite (here a learning rate that is
/// infinite in f32) stops the run before a non-finite checkpoint is written.
#[test]
fn a_non_finite_update_is_never_checkpointed() {
    let (_, dir) = fixed_batch_inputs("nonfinite");
    let out = bin()
        .args(["train", "--init"])
        .arg(dir.join("init.safetensors"))
        .arg("--fixed-batch")
        .arg(dir.join("batch.safetensors"))
        .args(["--captions-per-batch", "4", "--images-per-caption", "3"])
        .args(["--steps", "1", "--no-augment", "--lr-schedule", "constant"])
        .args(["--lr", "1e39", "--head-dim", "16", "--out"])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("after step 1") && err.contains("stopped without saving"),
        "{err}"
    );
    assert!(!dir.join("run/checkpoint-last.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_errors_name_the_problem() {
    let dir = tmp("errors");
    let out = bin()
        .args(["train", "--init"])
        .arg(dir.join("missing.safetensors"))
        .args([
            "--fixed-batch",
            "x.safetensors",
            "--no-augment",
            "--captions-per-batch",
            "2",
            "--images-per-caption",
            "2",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.safetensors"), "{err}");
    let out = bin()
        .args([
            "train",
            "--init",
            "a",
            "--captions-per-batch",
            "2",
            "--images-per-caption",
            "2",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fixed-batch"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn embed_writes_the_timm_features() {
    let fx = Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit_tiny.safetensors"),
    )
    .unwrap();
    let dir = tmp("embed");
    let mut input = Checkpoint::default();
    input
        .tensors
        .insert("images".into(), fx.get("input", None).unwrap().clone());
    input.save(&dir.join("x.safetensors")).unwrap();
    // The checkpoint holds only the encoder (as a timm user would convert one).
    let mut ck = Checkpoint::default();
    for (k, t) in &fx.tensors {
        if k.starts_with("visual.") {
            ck.tensors.insert(k.clone(), t.clone());
        }
    }
    ck.save(&dir.join("ck.safetensors")).unwrap();
    let out = bin()
        .arg("embed")
        .arg("--checkpoint")
        .arg(dir.join("ck.safetensors"))
        .arg("--input-tensor")
        .arg(dir.join("x.safetensors"))
        .arg("--out")
        .arg(dir.join("f.safetensors"))
        .args(["--head-dim", "16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = Checkpoint::load(&dir.join("f.safetensors")).unwrap();
    let got = &f.get("features", Some(&[3, 32])).unwrap().data;
    let want = &fx.get("features", None).unwrap().data;
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() <= 1e-4 + 1e-4 * b.abs(), "{a} vs {b}");
    }
    // Image files go through the evaluation transform; two files give two feature rows.
    let img: Vec<f32> = (0..3 * 40 * 40).map(|i| (i % 97) as f32 / 96.0).collect();
    stablerep::util::image::save_rgb(&dir.join("a.png"), 40, 40, &img).unwrap();
    stablerep::util::image::save_rgb(
        &dir.join("b.png"),
        40,
        40,
        &img.iter().map(|v| 1.0 - v).collect::<Vec<_>>(),
    )
    .unwrap();
    let out = bin()
        .arg("embed")
        .arg("--checkpoint")
        .arg(dir.join("ck.safetensors"))
        .arg("--images")
        .arg(dir.join("a.png"))
        .arg(dir.join("b.png"))
        .arg("--out")
        .arg(dir.join("g.safetensors"))
        .args(["--head-dim", "16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = Checkpoint::load(&dir.join("g.safetensors")).unwrap();
    let rows = &g.get("features", Some(&[2, 32])).unwrap().data;
    assert!(rows.iter().all(|v| v.is_finite()) && rows[..32] != rows[32..]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_trained_checkpoint_hands_off_to_timm_strictly() {
    // tools/make_fixtures.py handoff: the `visual.*` of a checkpoint `train` wrote, as timm's
    // VisionTransformer loaded it with strict=True, and timm's CLS features on a fixed input.
    let fx = Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/handoff.safetensors"),
    )
    .unwrap();
    let dir = tmp("handoff");
    // What `train` writes today for that architecture has exactly timm's keys and shapes, so
    // `load_state_dict(strict=True)` keeps working.
    let o = bin()
        .args(["world", "--world", "simple", "--captions", "8"])
        .args(["--images-per-caption", "2", "--size", "16", "--out"])
        .arg(dir.join("pool"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bin()
        .args(["train", "--pool"])
        .arg(dir.join("pool"))
        .args([
            "--img-size",
            "16",
            "--patch",
            "8",
            "--width",
            "32",
            "--depth",
            "2",
        ])
        .args(["--heads", "2", "--head-hidden", "32", "--head-out", "16"])
        .args([
            "--captions-per-batch",
            "4",
            "--images-per-caption",
            "2",
            "--steps",
            "1",
        ])
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = Checkpoint::load(&dir.join("run/checkpoint-last.safetensors")).unwrap();
    let visual = |c: &Checkpoint| -> std::collections::BTreeMap<String, Vec<usize>> {
        c.tensors
            .iter()
            .filter(|(k, _)| k.starts_with("visual."))
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect()
    };
    assert_eq!(visual(&ck), visual(&fx));
    // Our features from the trained weights are timm's.
    let mut weights = Checkpoint::default();
    for (k, t) in &fx.tensors {
        if k.starts_with("visual.") {
            weights.tensors.insert(k.clone(), t.clone());
        }
    }
    weights.save(&dir.join("ck.safetensors")).unwrap();
    let mut input = Checkpoint::default();
    input
        .tensors
        .insert("images".into(), fx.get("input", None).unwrap().clone());
    input.save(&dir.join("x.safetensors")).unwrap();
    let o = bin()
        .arg("embed")
        .arg("--checkpoint")
        .arg(dir.join("ck.safetensors"))
        .arg("--input-tensor")
        .arg(dir.join("x.safetensors"))
        .arg("--out")
        .arg(dir.join("f.safetensors"))
        .args(["--head-dim", "16"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = Checkpoint::load(&dir.join("f.safetensors")).unwrap();
    let got = &f.get("features", Some(&[4, 32])).unwrap().data;
    let want = &fx.get("features", Some(&[4, 32])).unwrap().data;
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() <= 1e-4 + 1e-4 * b.abs(), "{a} vs {b}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn probe_knn_and_fewshot_on_labelled_folders() {
    use stablerep::util::image::save_rgb;
    let dir = tmp("probe");
    tiny_encoder(&dir.join("ck.safetensors"));
    // Three visually distinct classes (colours and stripes) with per-image variation.
    for (split, count) in [("train", 6usize), ("test", 11)] {
        for class in 0..3 {
            for i in 0..count {
                let s = 20;
                let img: Vec<f32> = (0..3 * s * s)
                    .map(|p| {
                        let (c, y, x) = (p / (s * s), (p / s) % s, p % s);
                        let base = if c == class { 0.8 } else { 0.1 };
                        let stripe = if (x + y * class) % 4 < 2 { 0.1 } else { 0.0 };
                        base + stripe + 0.01 * ((i * 7 + p) % 5) as f32
                    })
                    .collect();
                save_rgb(
                    &dir.join(split)
                        .join(format!("class{class}"))
                        .join(format!("{i}.png")),
                    s,
                    s,
                    &img,
                )
                .unwrap();
            }
        }
    }
    let run = |extra: &[&str]| {
        let out = bin()
            .arg("probe")
            .arg("--checkpoint")
            .arg(dir.join("ck.safetensors"))
            .arg("--test")
            .arg(dir.join("test"))
            .args(["--head-dim", "16"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let pct: f64 = text
            .trim()
            .trim_start_matches("top-1 accuracy: ")
            .trim_end_matches('%')
            .parse()
            .unwrap();
        pct
    };
    let train = dir.join("train").display().to_string();
    let knn = run(&["--method", "knn", "--k", "5", "--train", &train]);
    assert!(knn > 90.0, "kNN accuracy {knn}");
    let few = run(&[
        "--method",
        "fewshot",
        "--ways",
        "3",
        "--shots",
        "5",
        "--queries",
        "6",
        "--episodes",
        "20",
    ]);
    assert!(few > 90.0, "few-shot accuracy {few}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The StableRep+ fixture as CLI inputs: an init checkpoint (full token table, architecture in
/// the metadata) and a batch with `images` and `token_ids`.
fn plus_inputs(dir: &Path, with_tokens: bool) -> Checkpoint {
    let fx = Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stablerep_plus.safetensors"),
    )
    .unwrap();
    let mut init = Checkpoint::default();
    for (name, t) in &fx.tensors {
        if let Some(k) = name.strip_prefix("before.") {
            let t = if k == "token_embedding.weight" {
                common::expand_token_table(&fx, t, 49408)
            } else {
                t.clone()
            };
            init.tensors.insert(k.to_string(), t);
        }
    }
    let model = serde_json::json!({"model": {
        "vit": {"img_size": 32, "patch": 8, "width": 32, "depth": 1, "heads": 2, "mlp": 64},
        "head": {"hidden": 24, "out": 8},
        "plus": {"text": {"context": 12, "vocab": 49408, "width": 16, "layers": 2, "heads": 2, "mlp": 64}, "embed": 8}
    }});
    init.metadata.insert("config".into(), model.to_string());
    init.save(&dir.join("init.safetensors")).unwrap();
    let mut batch = Checkpoint::default();
    batch
        .tensors
        .insert("images".into(), fx.get("images", None).unwrap().clone());
    if with_tokens {
        batch.tensors.insert(
            "token_ids".into(),
            fx.get("token_ids", None).unwrap().clone(),
        );
    }
    batch.save(&dir.join("batch.safetensors")).unwrap();
    fx
}

fn plus_command(dir: &Path) -> Command {
    plus_command_to(dir, "run")
}

fn plus_command_to(dir: &Path, out: &str) -> Command {
    let mut c = bin();
    c.args(["train", "--method", "stablerep-plus", "--init"])
        .arg(dir.join("init.safetensors"))
        .arg("--fixed-batch")
        .arg(dir.join("batch.safetensors"))
        .args(["--captions-per-batch", "3", "--images-per-caption", "2"])
        .args(["--steps", "1", "--no-augment", "--lr-schedule", "constant"])
        .args(["--lr", "1e-2", "--weight-decay", "0.1", "--out"])
        .arg(dir.join(out));
    c
}

#[test]
fn stablerep_plus_fixed_batch_matches_pytorch_and_errors_are_clear() {
    let dir = tmp("plus");
    let fx = plus_inputs(&dir, true);
    let out = plus_command(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let m: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let want = fx.get("loss", None).unwrap().data[0] as f64;
    assert!(
        (m["loss"].as_f64().unwrap() - want).abs() < 1e-4 * want.abs(),
        "{m} vs {want}"
    );
    let after = Checkpoint::load(&dir.join("run/checkpoint-last.safetensors")).unwrap();
    let theta = after.get("logit_scale", Some(&[1])).unwrap().data[0];
    let want_theta = fx.get("after.logit_scale", None).unwrap().data[0];
    assert!((theta - want_theta).abs() < 1e-4, "{theta} vs {want_theta}");
    // Chunked (gradient caching, two images per chunk): the same loss and logit scale.
    let out = plus_command_to(&dir, "run-chunked")
        .args(["--chunk", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(dir.join("run-chunked/metrics.jsonl")).unwrap();
    let m: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(
        (m["loss"].as_f64().unwrap() - want).abs() < 1e-4 * want.abs(),
        "chunked: {m} vs {want}"
    );
    let after = Checkpoint::load(&dir.join("run-chunked/checkpoint-last.safetensors")).unwrap();
    let theta = after.get("logit_scale", Some(&[1])).unwrap().data[0];
    assert!(
        (theta - want_theta).abs() < 1e-4,
        "chunked: {theta} vs {want_theta}"
    );
    // A batch without the captions' tokens.
    plus_inputs(&dir, false);
    let out = plus_command(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token_ids"), "{err}");
    // A checkpoint without a text tower.
    let mut init = Checkpoint::load(&dir.join("init.safetensors")).unwrap();
    init.tensors
        .retain(|k, _| k.starts_with("visual.") || k.starts_with("image_mlp."));
    init.metadata.clear();
    init.save(&dir.join("init.safetensors")).unwrap();
    let out = plus_command(&dir)
        .arg("--head-dim")
        .arg("16")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("text tower"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn generate_writes_reproducible_images_from_a_model_folder() {
    let dir = tmp("sd");
    let model = dir.join("model");
    common::tiny_sd_folder(&model);
    let gen = |out: &str, extra: &[&str]| {
        let mut c = bin();
        c.args(["generate", "--model"]).arg(&model);
        c.args([
            "--prompt",
            "a red cube on a table",
            "--images-per-prompt",
            "2",
            "--out",
        ]);
        c.arg(dir.join(out));
        // Defaults unless the case sets them.
        for (flag, value) in [
            ("--steps", "2"),
            ("--size", "64"),
            ("--sampler", "dpmpp-2m"),
        ] {
            if !extra.contains(&flag) {
                c.args([flag, value]);
            }
        }
        c.args(extra);
        c.output().unwrap()
    };
    let o = gen("a", &["--seed", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    for k in 0..2 {
        let img = image::open(dir.join(format!("a/{k:05}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    assert_ne!(read(dir.join("a/00000.png")), read(dir.join("a/00001.png")));
    let o = gen("b", &["--seed", "3"]);
    assert!(o.status.success());
    assert_eq!(
        read(dir.join("a/00000.png")),
        read(dir.join("b/00000.png")),
        "same seed, same image"
    );
    // The same model as one CompVis-layout file (the fixture's UNet and VAE, this folder's text
    // encoder), configured by the folder: the same images, byte for byte.
    let mut single = Checkpoint::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd_single_file.safetensors"),
    )
    .unwrap();
    single
        .tensors
        .retain(|k, _| !k.starts_with("cond_stage_model."));
    let te = Checkpoint::load(&model.join("text_encoder/model.safetensors")).unwrap();
    for (k, t) in te.tensors {
        single
            .tensors
            .insert(format!("cond_stage_model.transformer.{k}"), t);
    }
    let file = dir.join("tiny-sd.safetensors");
    single.save(&file).unwrap();
    let single_gen = |out: &str, extra: &[&str]| {
        bin()
            .args(["generate", "--model"])
            .arg(&file)
            .arg("--config")
            .arg(&model)
            .args([
                "--prompt",
                "a red cube on a table",
                "--images-per-prompt",
                "2",
            ])
            .args([
                "--steps",
                "2",
                "--size",
                "64",
                "--sampler",
                "dpmpp-2m",
                "--seed",
                "3",
            ])
            .args(extra)
            .arg("--out")
            .arg(dir.join(out))
            .output()
            .unwrap()
    };
    let o = single_gen("s", &["--save-size", "32"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Progress: steps, images (this small model denoises both together) and an ETA (plain
    // lines off a terminal).
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains("images 1-2/2, step 2/2") && log.contains("ETA"),
        "{log}"
    );
    // --save-size: a bicubic 2x reduction of the same image.
    let small = image::open(dir.join("s/00000.png")).unwrap().to_rgb8();
    assert_eq!(small.dimensions(), (32, 32));
    let big = image::open(dir.join("a/00000.png")).unwrap().to_rgb8();
    let want = image::imageops::resize(&big, 32, 32, image::imageops::FilterType::CatmullRom);
    let worst = small
        .pixels()
        .zip(want.pixels())
        .flat_map(|(a, b)| (0..3).map(move |c| (a[c] as i32 - b[c] as i32).abs()))
        .max()
        .unwrap();
    assert!(worst <= 2, "resized image differs by {worst} levels");
    let o = single_gen("s3", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        read(dir.join("a/00001.png")),
        read(dir.join("s3/00001.png")),
        "single file and folder give the same image"
    );
    // The fixture UNet is fp16, so storing its weights as f16 on the GPU is lossless: the same
    // bytes as f32 storage (the default on a CPU adapter).
    let o = gen("w32", &["--seed", "3", "--weights", "f16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        read(dir.join("a/00001.png")),
        read(dir.join("w32/00001.png"))
    );
    let o = gen("w", &["--weights", "f8"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--weights 'f8'"));
    // f16 activations (lavapipe has shader-f16): the same picture within a few levels.
    let o = gen("h16", &["--seed", "3", "--precision", "f16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, h) = (
        image::open(dir.join("a/00001.png")).unwrap().to_rgb8(),
        image::open(dir.join("h16/00001.png")).unwrap().to_rgb8(),
    );
    let worst = a
        .pixels()
        .zip(h.pixels())
        .flat_map(|(a, b)| (0..3).map(move |c| (a[c] as i32 - b[c] as i32).abs()))
        .max()
        .unwrap();
    assert!(
        worst <= 8,
        "f16 activations change a pixel by {worst} levels"
    );
    let o = gen("p", &["--precision", "f8"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--precision 'f8'"));
    let o = gen("c", &["--seed", "4"]);
    assert!(o.status.success());
    assert_ne!(read(dir.join("a/00000.png")), read(dir.join("c/00000.png")));
    // Reproducibility files: the decoded tensor behind the PNGs, the latents, and initial
    // noise from a file (which makes the seed irrelevant for a deterministic sampler).
    let (lat, ten) = (dir.join("lat.safetensors"), dir.join("img.safetensors"));
    let o = gen(
        "e",
        &[
            "--save-latents",
            lat.to_str().unwrap(),
            "--save-tensor",
            ten.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Checkpoint::load(&ten).unwrap();
    let imgs = &t.tensors["images"];
    assert_eq!(imgs.shape, vec![2, 3, 64, 64]);
    let png = image::open(dir.join("e/00001.png")).unwrap().to_rgb8();
    let off = 3 * 64 * 64;
    assert_eq!(
        png.get_pixel(5, 7)[1],
        (imgs.data[off + 64 * 64 + 7 * 64 + 5] * 255.0).round() as u8
    );
    assert_eq!(
        Checkpoint::load(&lat).unwrap().tensors["latents"].shape,
        vec![2, 4, 8, 8]
    );
    let noise = dir.join("noise.safetensors");
    let mut ck = Checkpoint::default();
    let mut rng = common::Rng(8);
    let data = rng
        .vec(2 * 4 * 8 * 8, -2.0, 2.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    ck.tensors.insert(
        "latents".into(),
        stablerep::nn::checkpoint::HostTensor {
            shape: vec![2, 4, 8, 8],
            data,
        },
    );
    ck.save(&noise).unwrap();
    let nz = noise.to_str().unwrap();
    assert!(gen("f", &["--init-noise", nz, "--seed", "1"])
        .status
        .success());
    assert!(gen("g", &["--init-noise", nz, "--seed", "2"])
        .status
        .success());
    assert_eq!(read(dir.join("f/00001.png")), read(dir.join("g/00001.png")));
    assert_ne!(read(dir.join("f/00001.png")), read(dir.join("a/00001.png")));
    // Bad settings and files fail before any GPU work, with the reason.
    let e = String::from_utf8_lossy(&gen("d", &["--init-noise", nz, "--size", "128"]).stderr)
        .to_string();
    assert!(e.contains("initial noise"), "{e}");
    let err = |o: std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();
    let e = err(gen("d", &["--size", "60"]));
    assert!(e.contains("--size 60") && e.contains("64"), "{e}");
    let e = err(gen("d", &["--steps", "0"]));
    assert!(e.contains("--steps"), "{e}");
    let e = err(gen("d", &["--sampler", "heun"]));
    assert!(e.contains("heun"), "{e}");
    // A pool from a captions file, in the official layout; resume skips finished captions.
    let caps = dir.join("captions.txt");
    std::fs::write(
        &caps,
        "a red cube\n\na blue sphere, on grass\na green cone\n",
    )
    .unwrap();
    let pool = |extra: &[&str]| {
        let mut c = bin();
        c.args(["generate", "--model"])
            .arg(&model)
            .arg("--captions")
            .arg(&caps);
        c.args([
            "--images-per-prompt",
            "2",
            "--steps",
            "1",
            "--size",
            "64",
            "--out",
        ])
        .arg(dir.join("pool"));
        c.args(extra);
        c.output().unwrap()
    };
    let o = pool(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("6 images"));
    let p = stablerep::data::pool::Pool::open(&dir.join("pool")).unwrap();
    assert_eq!((p.captions.len(), p.images_per_caption()), (3, 2));
    assert_eq!(p.captions[1].text, "a blue sphere, on grass");
    assert!(image::open(p.image_path(2, 1).unwrap()).is_ok());
    let leftovers = std::fs::read_dir(p.image_path(2, 1).unwrap().parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp")
        })
        .count();
    assert_eq!(leftovers, 0, "temporary files left behind");
    let o = pool(&["--resume"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("0 images"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Damaged images (truncated, empty, not a PNG) are generated again on resume, with the
    // same bytes as before (seeded per caption and image).
    let good = std::fs::read(p.image_path(0, 0).unwrap()).unwrap();
    let png = std::fs::read(p.image_path(1, 1).unwrap()).unwrap();
    std::fs::write(p.image_path(0, 0).unwrap(), &good[..good.len() / 2]).unwrap();
    std::fs::write(p.image_path(1, 1).unwrap(), b"").unwrap();
    std::fs::write(p.image_path(2, 0).unwrap(), b"not a png").unwrap();
    let o = pool(&["--resume"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("6 images"),
        "three damaged captions of 2 images each: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(std::fs::read(p.image_path(0, 0).unwrap()).unwrap(), good);
    assert_eq!(std::fs::read(p.image_path(1, 1).unwrap()).unwrap(), png);
    assert!(image::open(p.image_path(2, 0).unwrap()).is_ok());
    let o = pool(&["--shard", "1/2"]);
    assert!(o.status.success());
    let csv = std::fs::read_to_string(dir.join("pool/captions.1-of-2.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    let e = String::from_utf8_lossy(&pool(&["--shard", "2/2"]).stderr).to_string();
    assert!(e.contains("--shard 2/2"), "{e}");
    std::fs::remove_file(model.join("unet/config.json")).unwrap();
    let e = err(gen("d", &[]));
    assert!(e.contains("unet/config.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn world_writes_pools_and_labelled_folders() {
    let dir = tmp("world");
    let out = bin()
        .args([
            "world",
            "--captions",
            "5",
            "--images-per-caption",
            "2",
            "--size",
            "16",
            "--out",
        ])
        .arg(dir.join("pool"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = stablerep::data::pool::Pool::open(&dir.join("pool")).unwrap();
    assert_eq!((pool.captions.len(), pool.images_per_caption()), (5, 2));
    let (h, w, _) = stablerep::util::image::load_rgb(&pool.image_path(4, 1).unwrap()).unwrap();
    assert_eq!((h, w), (16, 16));
    let first = &pool.captions[0].text;
    assert_eq!(first, &stablerep::world::descriptions(5, 0)[0].caption());
    let out = bin()
        .args([
            "world",
            "--captions",
            "20",
            "--labelled",
            "colour",
            "--seed",
            "3",
            "--out",
        ])
        .arg(dir.join("labelled"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = stablerep::data::folder::LabelledFolder::open(&dir.join("labelled")).unwrap();
    assert_eq!(f.items.len(), 20);
    assert!(f
        .classes
        .iter()
        .all(|c| stablerep::world::COLOURS.iter().any(|k| k.0 == c)));
    // Impossible settings are refused with the reason.
    let out = bin()
        .args([
            "world",
            "--captions",
            "2",
            "--images-per-caption",
            "0",
            "--out",
        ])
        .arg(dir.join("bad"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--images-per-caption"));
}

#[test]
fn demo_refuses_impossible_settings_and_missing_models() {
    let dir = tmp("demo");
    let run = |args: &[&str]| {
        let out = bin()
            .arg("demo")
            .args(args)
            .arg("--out")
            .arg(dir.join("out"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "demo {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--quick", "--images-per-caption", "3"]);
    assert!(e.contains("multiple of the images per caption (3)"), "{e}");
    let e = run(&["--quick", "--captions", "4"]);
    assert!(e.contains("4 captions (--captions) are too few"), "{e}");
    let missing = dir.join("no-such-model");
    let e = run(&["--quick", "--model", missing.to_str().unwrap()]);
    assert!(e.contains("no-such-model"), "{e}");
    // Nothing was rendered before the model failed to load.
    assert!(!dir.join("out").join("eval-train").exists());
    let e = run(&["--quick", "--images-per-caption", "1"]);
    assert!(e.contains("at least 2"), "{e}");
    let e = run(&["--quick", "--views", "6"]);
    assert!(e.contains("--views 6 must be even and a multiple"), "{e}");
    let e = run(&["--quick", "--views", "128"]);
    assert!(
        e.contains("too few for batches of 128 views (--views"),
        "{e}"
    );
    let e = run(&["--quick", "--guidance", "nan"]);
    assert!(e.contains("--guidance"), "{e}");
    let e = run(&[
        "--quick",
        "--judge",
        dir.join("no-judge.safetensors").to_str().unwrap(),
    ]);
    assert!(e.contains("no-judge.safetensors"), "{e}");
}

#[test]
fn fidelity_refuses_bad_settings_before_any_gpu_work() {
    let dir = tmp("fidelity");
    let run = |args: &[&str]| {
        let out = bin().arg("fidelity").args(args).output().unwrap();
        assert!(!out.status.success(), "fidelity {args:?} should fail");
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    let e = run(&["--captions", "0"]);
    assert!(e.contains("--captions"), "{e}");
    let e = run(&["--guidance=-1"]);
    assert!(e.contains("--guidance"), "{e}");
    let e = run(&["--model", dir.join("no-model").to_str().unwrap()]);
    assert!(e.contains("no-model"), "{e}");
    let e = run(&["--judge", dir.join("no-judge").to_str().unwrap()]);
    assert!(e.contains("no-judge"), "{e}");
    // A model that is not one: a folder without configs.
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let e = run(&["--model", dir.join("empty").to_str().unwrap()]);
    assert!(e.contains("empty"), "{e}");
    // A judge that is not one.
    std::fs::write(dir.join("junk.safetensors"), b"not a safetensors file").unwrap();
    let e = run(&["--judge", dir.join("junk.safetensors").to_str().unwrap()]);
    assert!(e.contains("junk.safetensors"), "{e}");
    let e = run(&["--json", dir.to_str().unwrap()]);
    assert!(e.contains("--json") && e.contains("folder"), "{e}");
}

#[test]
fn engine_demo_trains_the_mlp() {
    let out = bin()
        .args(["engine-demo", "--steps", "40"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("trained: loss"), "{text}");
}

#[test]
fn a_headless_run_without_xdg_runtime_dir_prints_no_spurious_errors() {
    // libwayland complained once per Vulkan driver probed when the variable was unset.
    let out = Command::new(env!("CARGO_BIN_EXE_stablerep"))
        .arg("info")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
    assert!(!err.contains("error"), "{err}");
}

/// Files whose name marks them temporary (a write cut short), anywhere under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(temporaries(&p));
        } else if p.to_string_lossy().contains(".tmp") {
            found.push(p);
        }
    }
    found
}

/// Starts `cmd`, waits until `ready()` holds (polling), then kills the process with SIGKILL
/// while it is still running.
fn kill_when(mut cmd: Command, ready: impl Fn() -> bool) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        assert!(t0.elapsed().as_secs() < 300, "the run never got going");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished before the kill"
    );
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
}

#[test]
fn training_killed_with_sigkill_resumes_to_the_same_weights() {
    let dir = tmp("sigkill-train");
    let o = bin()
        .args(["world", "--world", "simple", "--captions", "8"])
        .args(["--images-per-caption", "2", "--size", "16", "--out"])
        .arg(dir.join("pool"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let train = |out: &str, resume: bool| {
        let mut c = bin();
        c.args(["train", "--pool"]).arg(dir.join("pool"));
        c.args([
            "--img-size",
            "16",
            "--patch",
            "8",
            "--width",
            "32",
            "--depth",
            "1",
        ]);
        c.args(["--heads", "2", "--head-hidden", "32", "--head-out", "16"]);
        c.args(["--captions-per-batch", "4", "--images-per-caption", "2"]);
        c.args([
            "--steps",
            "60",
            "--checkpoint-every",
            "1",
            "--log-every",
            "1",
        ]);
        c.arg("--out").arg(dir.join(out));
        if resume {
            c.arg("--resume");
        }
        c
    };
    let o = train("straight", false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = dir.join("killed/metrics.jsonl");
    kill_when(train("killed", false), || {
        std::fs::read_to_string(&metrics).is_ok_and(|s| s.lines().count() >= 10)
    });
    let o = train("killed", true).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = Checkpoint::load(&dir.join("straight/checkpoint-last.safetensors")).unwrap();
    let b = Checkpoint::load(&dir.join("killed/checkpoint-last.safetensors")).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &a.tensors {
        assert!(
            t.data == b.tensors[k].data,
            "{k} differs after kill -9 and resume"
        );
    }
    assert_eq!(temporaries(&dir), Vec::<PathBuf>::new());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pool_generation_killed_with_sigkill_resumes_to_the_same_images() {
    let dir = tmp("sigkill-pool");
    let model = dir.join("model");
    common::tiny_sd_folder(&model);
    let caps = dir.join("captions.txt");
    let lines: Vec<String> = (0..12).map(|i| format!("caption number {i}")).collect();
    std::fs::write(&caps, lines.join("\n")).unwrap();
    let gen = |out: &str, resume: bool| {
        let mut c = bin();
        c.args(["generate", "--model"]).arg(&model);
        c.arg("--captions").arg(&caps);
        c.args(["--images-per-prompt", "2", "--steps", "2", "--size", "64"]);
        c.arg("--out").arg(dir.join(out));
        if resume {
            c.arg("--resume");
        }
        c
    };
    let o = gen("straight", false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    fn pngs(d: &Path) -> usize {
        std::fs::read_dir(d).map_or(0, |r| {
            r.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        pngs(&p)
                    } else {
                        usize::from(p.extension().is_some_and(|x| x == "png"))
                    }
                })
                .sum()
        })
    }
    let killed = dir.join("killed");
    kill_when(gen("killed", false), || pngs(&killed) >= 6);
    let o = gen("killed", true).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = stablerep::data::pool::Pool::open(&dir.join("straight")).unwrap();
    let b = stablerep::data::pool::Pool::open(&dir.join("killed")).unwrap();
    assert_eq!(a.captions.len(), 12);
    for c in 0..12 {
        for j in 0..2 {
            assert_eq!(
                std::fs::read(a.image_path(c, j).unwrap()).unwrap(),
                std::fs::read(b.image_path(c, j).unwrap()).unwrap(),
                "caption {c} image {j}"
            );
        }
    }
    assert_eq!(temporaries(&dir), Vec::<PathBuf>::new());
    std::fs::remove_dir_all(&dir).ok();
}

/// The long flags `stablerep <cmd> --help` lists (without --help and --adapter).
fn flags_of(cmd: &str) -> Vec<String> {
    let o = bin().args([cmd, "--help"]).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("-h, ").unwrap_or(l);
            l.starts_with("--")
                .then(|| l.split_whitespace().next().unwrap().to_string())
        })
        .filter(|f| f != "--help" && f != "--adapter" && f != "--version")
        .collect()
}

/// A valid value for `flag` (None: a switch).
fn value_for(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "--resume" | "--no-augment" => return None,
        "--method" => "simclr",
        "--model" => "small",
        "--lr-schedule" => "cosine",
        "--pool" | "--images" | "--init" | "--fixed-batch" | "--out" => "somewhere",
        "--lr" | "--blr" | "--weight-decay" | "--temperature" | "--epochs" => "0.5",
        _ => "8",
    })
}

#[test]
fn every_train_flag_works_in_fixed_batch_mode_or_is_refused_by_name() {
    // What `train --fixed-batch` reads; the rest must be refused, so a flag added later is
    // refused here too until the mode really uses it.
    let reads = [
        "--fixed-batch",
        "--init",
        "--method",
        "--captions-per-batch",
        "--images-per-caption",
        "--steps",
        "--lr",
        "--blr",
        "--lr-schedule",
        "--warmup-steps",
        "--weight-decay",
        "--temperature",
        "--head-dim",
        "--no-augment",
        "--out",
        "--save-grads",
    ];
    let flags = flags_of("train");
    assert!(flags.len() >= 30, "{flags:?}");
    let mut refused = 0;
    for f in flags.iter().filter(|f| !reads.contains(&f.as_str())) {
        let mut c = bin();
        c.args([
            "train",
            "--fixed-batch",
            "b.safetensors",
            "--init",
            "i.safetensors",
        ]);
        c.args(["--no-augment", "--out", "o", "--captions-per-batch", "2"]);
        c.args(["--images-per-caption", "2", f]);
        if let Some(v) = value_for(f) {
            c.arg(v);
        }
        let o = c.output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{f} was accepted with --fixed-batch");
        assert!(e.contains(f.as_str()), "{f}: {e}");
        refused += 1;
    }
    assert!(refused >= 15, "only {refused} flags refused");
    // In the pool mode, flags of other modes are refused the same way.
    let pool = |extra: &[&str]| {
        let o = bin()
            .args([
                "train",
                "--pool",
                "p",
                "--out",
                "o",
                "--captions-per-batch",
                "2",
            ])
            .args(["--images-per-caption", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    for f in [
        "--text-width",
        "--text-layers",
        "--text-heads",
        "--text-context",
        "--embed-dim",
    ] {
        assert!(pool(&[f, "64"]).contains(f), "{f}");
    }
    assert!(pool(&["--head-dim", "32"]).contains("--head-dim"));
    assert!(pool(&["--save-grads", "g.safetensors"]).contains("--save-grads"));
    let e = pool(&["--lr-schedule", "constant", "--warmup-steps", "5"]);
    assert!(e.contains("--warmup-steps"), "{e}");
}

#[test]
fn generate_refuses_flags_of_the_other_mode() {
    let gen = |extra: &[&str]| {
        let o = bin()
            .args(["generate", "--model", "nowhere", "--out", "o"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    for (f, v) in [
        ("--save-latents", "l"),
        ("--save-tensor", "t"),
        ("--prompt", "p"),
    ] {
        let e = gen(&["--captions", "c.txt", f, v]);
        assert!(e.contains(f) && e.contains("--captions"), "{e}");
    }
    assert!(gen(&["--prompt", "p", "--resume"]).contains("--resume"));
    assert!(gen(&["--prompt", "p", "--shard", "0/2"]).contains("--shard"));
    let e = gen(&["--prompt", "p", "--sampler", "euler", "--eta", "0.5"]);
    assert!(e.contains("--eta") && e.contains("ddim"), "{e}");
}

/// Runs `c` to the end and returns (success, peak resident memory in KiB, stderr), reading the
/// child's `VmHWM` from /proc while it runs.
fn run_with_peak_rss(mut c: Command) -> (bool, u64, String) {
    let mut child = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_file) {
            if let Some(kb) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kb);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    (status.success(), peak, err)
}

/// `embed --images` streams: embedding ten times as many images does not raise the peak
/// resident memory by more than a fraction of what their pixels would take (4,000 images at
/// 32 x 32 are 49 MB as f32 tensors; the features are 0.5 MB).
#[test]
fn embedding_many_images_keeps_memory_bounded() {
    if !Path::new("/proc/self/status").exists() {
        return; // VmHWM is Linux's
    }
    let dir = tmp("rss");
    tiny_encoder(&dir.join("ck.safetensors"));
    let n = 4000;
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| {
            // Two classes, so the folder is also a labelled folder.
            let p = dir.join(format!("img/c{}/{i:05}.png", i % 2));
            let img: Vec<f32> = (0..3 * 40 * 40)
                .map(|j| ((i * 7 + j) % 101) as f32 / 100.0)
                .collect();
            stablerep::util::image::save_rgb(&p, 40, 40, &img).unwrap();
            p
        })
        .collect();
    let embed = |count: usize, out: &str| {
        let mut c = bin();
        c.arg("embed")
            .arg("--checkpoint")
            .arg(dir.join("ck.safetensors"))
            .args(["--head-dim", "16", "--out"])
            .arg(dir.join(out))
            .arg("--images")
            .args(&paths[..count]);
        let (ok, peak, err) = run_with_peak_rss(c);
        assert!(ok, "{err}");
        peak
    };
    let small = embed(n / 10, "small.safetensors");
    let large = embed(n, "large.safetensors");
    let f = Checkpoint::load(&dir.join("large.safetensors")).unwrap();
    let feats = f.get("features", Some(&[n, 32])).unwrap();
    // The first rows are the small run's (same images, same order; the last chunk's batch
    // size differs, so allow rounding).
    let s = Checkpoint::load(&dir.join("small.safetensors")).unwrap();
    let fs = &s.get("features", Some(&[n / 10, 32])).unwrap().data;
    for (i, (a, b)) in feats.data.iter().zip(fs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "feature {i}: {a} vs {b}"
        );
    }
    assert!(
        large <= small + 16 * 1024,
        "peak RSS {small} KiB for {} images, {large} KiB for {n}",
        n / 10
    );
    // The same folder into a feature cache: shards written as rows arrive, the same features
    // (class c0's images first), memory no larger than one shard's worth beyond the run above.
    let mut c = bin();
    c.arg("embed")
        .arg("--checkpoint")
        .arg(dir.join("ck.safetensors"))
        .args(["--head-dim", "16", "--rows-per-shard", "1500", "--out"])
        .arg(dir.join("cache"))
        .arg("--images")
        .arg(dir.join("img"));
    let (ok, cached, err) = run_with_peak_rss(c);
    assert!(ok, "{err}");
    assert!(err.contains("images/s"), "{err}");
    assert!(
        cached <= large + 4 * 1024,
        "peak RSS {cached} KiB into the cache, {large} KiB into one file"
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cache/index.json")).unwrap())
            .unwrap();
    assert_eq!(index["images"], n);
    assert_eq!(index["classes"], serde_json::json!(["c0", "c1"]));
    assert_eq!(index["shards"].as_array().unwrap().len(), 3);
    let mut row = 0;
    for s in index["shards"].as_array().unwrap() {
        let ck = Checkpoint::load(&dir.join("cache").join(s.as_str().unwrap())).unwrap();
        let f = ck.get("features", None).unwrap();
        let l = ck.get("labels", None).unwrap();
        for r in 0..f.shape[0] {
            let (class, i) = if row < n / 2 {
                (0, 2 * row)
            } else {
                (1, 2 * (row - n / 2) + 1)
            };
            assert_eq!(l.data[r], class as f32);
            for d in 0..32 {
                let (a, b) = (f.data[r * 32 + d], feats.data[i * 32 + d]);
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "row {row}: {a} vs {b}"
                );
            }
            row += 1;
        }
    }
    assert_eq!(row, n);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn probes_reuse_cached_features_of_their_own_checkpoint_only() {
    let dir = tmp("feature-cache");
    tiny_encoder(&dir.join("ck.safetensors"));
    common::make_labelled(&dir.join("lab"));
    let probe = |ck: &str, method: &str| {
        bin()
            .args(["probe", "--method", method, "--head-dim", "16", "--k", "3"])
            .arg("--checkpoint")
            .arg(dir.join(ck))
            .arg("--train")
            .arg(dir.join("lab"))
            .arg("--test")
            .arg(dir.join("lab"))
            .arg("--features")
            .arg(dir.join("cache"))
            .output()
            .unwrap()
    };
    let first = probe("ck.safetensors", "knn");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let e1 = String::from_utf8_lossy(&first.stderr);
    assert!(
        e1.contains("embedded 24 images") && !e1.contains("cache"),
        "{e1}"
    );
    assert!(
        dir.join("cache/train/index.json").exists() && dir.join("cache/test/index.json").exists()
    );
    // The second probe reads the features instead of embedding, and finds the same answer.
    let second = probe("ck.safetensors", "knn");
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let e2 = String::from_utf8_lossy(&second.stderr);
    assert!(
        e2.contains("features of 24 images read from the cache") && !e2.contains("embedded"),
        "{e2}"
    );
    assert_eq!(first.stdout, second.stdout);
    // The linear probe runs from the same cache.
    let linear = probe("ck.safetensors", "linear");
    assert!(
        linear.status.success(),
        "{}",
        String::from_utf8_lossy(&linear.stderr)
    );
    assert!(String::from_utf8_lossy(&linear.stderr).contains("read from the cache"));
    // Another checkpoint's probe is refused, naming the folder.
    let mut other = Checkpoint::load(&dir.join("ck.safetensors")).unwrap();
    other.tensors.get_mut("visual.norm.bias").unwrap().data[0] += 0.5;
    other.save(&dir.join("other.safetensors")).unwrap();
    let o = probe("other.safetensors", "knn");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("another checkpoint") && e.contains("cache"),
        "{e}"
    );
    // A file list embeds into a cache too; --rows-per-shard only applies to caches.
    std::fs::write(
        dir.join("list.txt"),
        "lab/class0/0.png\n# a comment\n\nlab/class2/3.png\n",
    )
    .unwrap();
    let o = bin()
        .args(["embed", "--head-dim", "16", "--checkpoint"])
        .arg(dir.join("ck.safetensors"))
        .arg("--images")
        .arg(dir.join("list.txt"))
        .arg("--out")
        .arg(dir.join("list-cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ix: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("list-cache/index.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            ix["images"].as_u64(),
            ix["classes"].as_array().map(Vec::len)
        ),
        (Some(2), Some(0))
    );
    let o = bin()
        .args([
            "embed",
            "--head-dim",
            "16",
            "--rows-per-shard",
            "5",
            "--checkpoint",
        ])
        .arg(dir.join("ck.safetensors"))
        .arg("--images")
        .arg(dir.join("lab/class0/0.png"))
        .arg("--out")
        .arg(dir.join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rows-per-shard"));
    std::fs::remove_dir_all(&dir).ok();
}
