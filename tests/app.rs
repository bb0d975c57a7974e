//! The desktop app driven headless through egui_kittest on the real app state (its own GPU
//! worker, lavapipe here): the device panel reports the adapter; a bad model path shows its
//! error; a tiny SD model fills the image grid, compares guidance scales and saves PNGs; a
//! pool is built and browsed; training draws its loss plot, pauses and resumes; evaluation
//! shows accuracy, neighbours and the similarity heat map; settings persist. Each panel is
//! compared with a snapshot in `tests/snapshots/` (`UPDATE_SNAPSHOTS=1` rewrites them).
//!
//! Paths are relative to the package root (cargo's working directory for tests), so the
//! snapshots do not depend on where the repository lives.

#![cfg(feature = "app")]

use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions};
use stablerep::app::train::RunState;
use stablerep::app::{App, Launch, Panel, Settings};

const WAIT: Duration = Duration::from_secs(240);

fn harness(app: App) -> Harness<'static, App> {
    Harness::builder()
        .with_size([1100.0, 960.0])
        .wgpu()
        .build_ui_state(|ui, app: &mut App| app.ui(ui), app)
}

/// Lets the worker finish, then draws a few frames so everything it sent is on screen.
fn settle(h: &mut Harness<'static, App>) {
    h.run_steps(1);
    assert!(h.state_mut().wait_idle(WAIT), "the app's jobs did not end");
    h.run_steps(3);
}

/// Clicks the button labelled `label` (exactly one must exist; scrolled out of view is fine)
/// and runs a frame.
fn click(h: &mut Harness<'static, App>, label: &str) {
    h.get_by_role_and_label(egui::accesskit::Role::Button, label)
        .click_accesskit();
    h.run_steps(2);
}

/// Shows panel `title`.
fn tab(h: &mut Harness<'static, App>, title: &str) {
    h.get_by_label(title).click_accesskit();
    h.run_steps(2);
}

/// Snapshot with toasts (they expire on a timer) cleared, nodes whose label contains one of
/// `masked` hidden, and what `extra` returns (rects found after the last frame) hidden too.
fn snapshot(
    h: &mut Harness<'static, App>,
    name: &str,
    masked: &[&str],
    extra: impl Fn(&Harness<'static, App>) -> Vec<egui::Rect>,
) {
    h.state_mut().notes.toasts.clear();
    h.run_steps(2);
    let mut rects: Vec<egui::Rect> = masked
        .iter()
        .flat_map(|m| {
            h.query_all_by_label_contains(m)
                .map(|n| n.rect())
                .collect::<Vec<_>>()
        })
        .collect();
    rects.extend(extra(h));
    for r in rects {
        h.mask(r);
    }
    h.snapshot_options(name, &SnapshotOptions::new().output_path("tests/snapshots"));
}

fn labels(h: &Harness<'static, App>, text: &str) -> usize {
    h.query_all_by_label_contains(text).count()
}

#[test]
fn app_generates_builds_pools_trains_evaluates_and_shows_errors() {
    let dir = PathBuf::from("target/app-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model");
    common::tiny_sd_folder(&model);
    let pool = dir.join("pool");
    common::make_pool(&pool);
    let labelled = dir.join("labelled");
    common::make_labelled(&labelled);
    let settings_path = dir.join("settings.json");

    let app = App::new(Launch {
        settings_path: Some(settings_path.clone()),
        panel: Some(Panel::Device),
        ..Launch::default()
    });
    let mut h = harness(app);

    // Device: the adapter list and the worker's device with its limits and memory.
    settle(&mut h);
    assert!(h.state().device.report.is_some(), "no device report");
    assert_eq!(labels(&h, "max storage binding"), 1);
    assert_eq!(labels(&h, "allocated by the driver"), 1);
    snapshot(
        &mut h,
        "device",
        &["llvmpipe", "LLVM", "MiB", "KiB"],
        |_| vec![],
    );
    // Choosing an adapter restarts the worker on it; the choice is remembered.
    let first = h.state().device.adapters.clone().expect("adapters listed")[0].clone();
    let filter = stablerep::app::device::filter_for(&first);
    h.state_mut().use_adapter(filter.clone());
    assert!(h.state().device.report.is_none());
    settle(&mut h);
    assert_eq!(h.state().settings.adapter, filter);
    let report = h
        .state()
        .device
        .report
        .clone()
        .expect("a report from the new worker");
    assert_eq!(stablerep::app::device::filter_for(&report.adapter), filter);
    assert_eq!(labels(&h, "Use the best adapter"), 1);
    h.state_mut().use_adapter(String::new());
    settle(&mut h);
    assert!(h.state().settings.adapter.is_empty());

    // Generate with a model that does not exist: the reason appears in a toast and the log.
    tab(&mut h, "Generate");
    {
        let s = &mut h.state_mut().settings;
        s.model = dir.join("no-such-model").display().to_string();
        s.generate.prompt = "a red cube on a table".into();
        s.generate.images = 2;
        s.generate.sampling.steps = 3;
        s.generate.sampling.size = 64;
        s.generate.sampling.sampler = "ddim".into();
        s.generate.sweep = "1 4".into();
        s.generate.save_dir = dir.join("saved").display().to_string();
    }
    h.run_steps(1);
    click(&mut h, "Generate images");
    settle(&mut h);
    assert!(
        labels(&h, "generation failed") >= 1 && labels(&h, "no such model") >= 1,
        "the error is not on screen"
    );
    assert!(h.state().generate.gallery.shots.is_empty());

    // The tiny model: two images in the grid, then the guidance comparison (one per scale).
    h.state_mut().settings.model = model.display().to_string();
    h.run_steps(1);
    click(&mut h, "Generate images");
    assert!(h.state().generate.running.is_some(), "no job started");
    settle(&mut h);
    let shots: Vec<String> = h
        .state()
        .generate
        .gallery
        .shots
        .iter()
        .map(|s| s.label.clone())
        .collect();
    assert_eq!(shots, ["seed 0, image 1", "seed 0, image 2"]);
    assert!(h.state().generate.gallery.shots[0].rgb.len() == 64 * 64 * 3);
    assert_eq!(labels(&h, "seed 0, image"), 2, "images not in the grid");
    assert_eq!(
        h.state().settings.recent_models,
        [model.display().to_string()],
        "the model is remembered"
    );
    click(&mut h, "Save all");
    for i in 0..2 {
        let p = dir.join(format!("saved/a-red-cube-on-a-table-seed0-{i:02}.png"));
        assert!(p.is_file(), "{} not saved", p.display());
    }
    click(&mut h, "Compare guidance");
    settle(&mut h);
    assert_eq!(labels(&h, "w = 1, image 1"), 1);
    assert_eq!(labels(&h, "w = 4, image 1"), 1);
    snapshot(&mut h, "generate", &[], |_| vec![]);

    // Pool: three captions, two images each, then browsed caption by caption.
    let captions = dir.join("captions.txt");
    std::fs::write(&captions, "a red cube\na blue ball\n\na green star\n").unwrap();
    tab(&mut h, "Pool");
    {
        let p = &mut h.state_mut().settings.pool;
        p.captions = captions.display().to_string();
        p.out = dir.join("generated-pool").display().to_string();
        p.images = 2;
        p.sampling.steps = 2;
        p.sampling.size = 64;
    }
    h.run_steps(1);
    click(&mut h, "Build pool");
    settle(&mut h);
    let browsed = h.state().pool.browsing.as_ref().expect("pool opened");
    assert_eq!(browsed.captions.len(), 3);
    assert_eq!(browsed.images_per_caption(), 2);
    assert_eq!(labels(&h, "2. a blue ball"), 1);
    snapshot(&mut h, "pool", &[], |_| vec![]);

    // Train a tiny ViT on the test pool: points on the loss plot; pause and resume.
    tab(&mut h, "Train");
    {
        let t = &mut h.state_mut().settings.train;
        t.pool = pool.display().to_string();
        t.out = dir.join("run").display().to_string();
        (t.img_size, t.patch, t.width, t.depth, t.heads) = (16, 8, 32, 1, 4);
        (t.head_hidden, t.head_out) = (64, 16);
        (t.captions, t.images, t.steps, t.warmup) = (4, 3, 30, 3);
        (t.lr, t.log_every, t.checkpoint_every) = (2e-3, 1, 10);
    }
    h.run_steps(1);
    click(&mut h, "Start training");
    // Pause once the first points arrived.
    let deadline = std::time::Instant::now() + WAIT;
    while h.state().train.metrics.len() < 2 && std::time::Instant::now() < deadline {
        h.state_mut().pump();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.run_steps(1);
    click(&mut h, "Pause");
    settle(&mut h);
    let paused = h.state().train.metrics.len();
    assert_eq!(h.state().train.state, RunState::Paused, "not paused");
    assert!(paused < 30, "paused after {paused} of 30 steps");
    click(&mut h, "Resume");
    settle(&mut h);
    let t = &h.state().train;
    assert_eq!(t.state, RunState::Finished);
    let steps: Vec<u64> = t.metrics.iter().map(|m| m.step).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<u64>>(), "one point per step");
    assert!(t.metrics.iter().all(|m| m.loss.is_finite()));
    assert!(t
        .checkpoints
        .iter()
        .any(|(n, _)| n == "checkpoint-last.safetensors"));
    assert_eq!(labels(&h, "Loss (30 points)"), 1);
    // The throughput plot depends on the machine's speed: hidden.
    snapshot(&mut h, "train", &[], |h| {
        let r = h.get_by_label("Images / s").rect();
        vec![egui::Rect::from_min_max(
            r.min,
            egui::pos2(1100.0, r.max.y + 160.0),
        )]
    });
    // Starting over a finished run asks first; "Keep it" starts nothing.
    click(&mut h, "Start training");
    assert_eq!(labels(&h, "starting over replaces its checkpoints"), 1);
    assert!(h.state().train.running.is_none());
    click(&mut h, "Keep it");
    assert_eq!(labels(&h, "starting over replaces"), 0);
    assert!(h.state().train.running.is_none());

    // Evaluate that checkpoint: kNN accuracy, neighbours, the similarity heat map.
    click(&mut h, "Evaluate this");
    tab(&mut h, "Evaluate");
    {
        let e = &mut h.state_mut().settings.evaluate;
        assert!(e.checkpoint.ends_with("checkpoint-last.safetensors"));
        // The ViT's width per attention head (32 / 4), not the projection's output (16).
        assert_eq!(e.head_dim, 8);
        e.train = labelled.display().to_string();
        e.test = labelled.display().to_string();
        e.k = 3;
        e.matches = 4;
        e.pool = pool.display().to_string();
        (e.batch_captions, e.batch_images) = (3, 4);
    }
    h.run_steps(1);
    click(&mut h, "Run evaluation");
    settle(&mut h);
    let (_, acc, _) = h.state().evaluate.accuracy.clone().expect("accuracy");
    assert!((0.0..=1.0).contains(&acc));
    let shown = format!("knn: top-1 {:.2} %", 100.0 * acc);
    assert_eq!(labels(&h, &shown), 1, "{shown} not on the panel");
    click(&mut h, "Search");
    settle(&mut h);
    let (query, matches) = h.state().evaluate.neighbours.clone().expect("neighbours");
    assert!(query.ends_with("class0/0.png"));
    assert_eq!(matches.len(), 4);
    click(&mut h, "Show matrix");
    settle(&mut h);
    let (names, matrix, block) = h.state().evaluate.similarity.clone().expect("matrix");
    assert_eq!((names.len(), matrix.len(), block), (12, 144, 4));
    assert_eq!(labels(&h, "blocks of 4 share a caption"), 1);
    snapshot(&mut h, "evaluate", &["colour:", "top-1"], |_| vec![]);

    // An impossible setting is refused on the spot, naming the problem.
    h.state_mut().settings.evaluate.test.clear();
    h.run_steps(1);
    click(&mut h, "Run evaluation");
    assert!(labels(&h, "choose a labelled test folder") >= 1);

    // Settings persist: a new app reads what this one used.
    h.state_mut().save_settings();
    let (saved, warning) = Settings::load(&settings_path);
    assert!(warning.is_none());
    assert_eq!(saved.model, model.display().to_string());
    assert_eq!(saved.train.steps, 30);
    assert_eq!(saved.panel, "Evaluate");
    assert!(Path::new(&saved.evaluate.checkpoint).is_file());
    drop(h);
    // A corrupt settings file: the defaults and a visible warning, not a failure.
    std::fs::write(&settings_path, "{ not json").unwrap();
    let app = App::new(Launch {
        settings_path: Some(settings_path),
        ..Launch::default()
    });
    assert_eq!(app.settings, Settings::default());
    assert!(app.notes.log[0].text.contains("not valid settings"));
}

#[test]
fn builtin_model_button_sets_forms_that_suit_it() {
    use stablerep::app::generate::{model_path, use_builtin, SIZES};
    use stablerep::app::settings::Settings;
    let mut s = Settings::default();
    assert!(model_path(&s).unwrap_err().contains("built-in model"));
    let dir = stablerep::world::builtin_model().unwrap();
    use_builtin(&mut s, &dir.display().to_string());
    assert_eq!(model_path(&s).unwrap().0, dir);
    assert_eq!(s.recent_models[0], dir.display().to_string());
    for sampling in [&s.generate.sampling, &s.pool.sampling] {
        assert_eq!((sampling.size, sampling.guidance), (32, 2.0));
        assert!(SIZES.contains(&sampling.size));
        assert!(stablerep::diffusion::sampler::Kind::parse(&sampling.sampler, 0.0).is_ok());
    }
}

#[test]
fn mini_world_buttons_fill_the_pool_train_and_evaluate_forms() {
    use stablerep::app::miniworld::{use_world_captions, use_world_eval_sets, CAPTIONS};
    use stablerep::app::settings::Settings;
    let dir = std::env::temp_dir().join(format!("stablerep-miniworld-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut s = Settings::default();
    s.pool.out = dir.join("pool").display().to_string();
    let model = stablerep::world::builtin_model().unwrap();
    let file = use_world_captions(&mut s, &model).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), CAPTIONS);
    assert!(lines.iter().all(|l| l.starts_with("a ")), "{lines:?}");
    assert_eq!(s.pool.captions, file.display().to_string());
    assert_eq!(s.model, model.display().to_string());
    assert_eq!((s.pool.images, s.pool.sampling.size), (4, 32));
    assert_eq!(s.train.pool, s.pool.out);
    assert_eq!((s.train.img_size, s.train.images), (32, 4));
    let (train, test) = use_world_eval_sets(&mut s).unwrap();
    for d in [&train, &test] {
        let classes = std::fs::read_dir(d).unwrap().count();
        assert_eq!(classes, 6, "{} has a folder per shape", d.display());
    }
    assert_eq!(s.evaluate.test, test.display().to_string());
    assert!(s
        .evaluate
        .checkpoint
        .ends_with("checkpoint-last.safetensors"));
    let _ = std::fs::remove_dir_all(&dir);
}
