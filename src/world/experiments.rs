//! The three experiments on the mini-world, over several training seeds, at equal
//! numbers of generated images (`budget` per pool) and training steps:
//!
//! 1. StableRep on synthetic images vs SimCLR on the same synthetic images vs SimCLR on the
//!    real renders of the same captions;
//! 2. the guidance scale of generation, for StableRep and SimCLR;
//! 3. images per caption at a fixed budget (`budget / m` captions of `m` images).
//!
//! Pools are generated once (their noise seed is the base seed) and shared by every training
//! seed, so the spreads cover training randomness (initialization, batches, augmentation),
//! not generation. Each finished run appends a line to `OUT/records.jsonl`; running again
//! skips what is recorded and resumes a run that was interrupted.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use super::demo::{eval_sets, real_pool, synthetic_pool, train_arm, Arm, DemoConfig, Outcome};
use super::demo::{PoolSpec, Step};
use crate::diffusion::model::SdModel;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::plot::{bar_chart, line_chart, mean_spread, Canvas, Chart, Series, Value};

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Encoder, training steps, views per step, sampler steps, evaluation sets, and the base
    /// guidance and images per caption (the other experiments vary one of them).
    pub base: DemoConfig,
    /// Training seeds.
    pub seeds: Vec<u64>,
    /// Guidance scales of experiment 2.
    pub guidances: Vec<f64>,
    /// Images per caption of experiment 3.
    pub images_per_caption: Vec<usize>,
    /// Generated images per pool.
    pub budget: usize,
}

impl Plan {
    /// The documented plan (docs/results.md): 3 seeds, guidance 1, 2, 4, 8, m = 1, 2, 4, 8,
    /// 192 images per pool (8 sampler steps), `--quick`'s encoder (2 layers, width 64)
    /// trained 100 steps of 32 views per run, the full demo's evaluation sets and probe.
    pub fn new(model: std::path::PathBuf) -> Plan {
        let quick = DemoConfig::quick(model.clone());
        let mut base = DemoConfig::new(model);
        base.vit = quick.vit;
        base.head = quick.head;
        base.train_steps = 100;
        base.captions = 48;
        base.sampler_steps = 8;
        Plan {
            base,
            seeds: vec![0, 1, 2],
            guidances: vec![1.0, 2.0, 4.0, 8.0],
            images_per_caption: vec![1, 2, 4, 8],
            budget: 192,
        }
    }

    /// Checks the plan's numbers fit together.
    pub fn check(&self) -> Result<()> {
        let b = &self.base;
        for &m in self
            .images_per_caption
            .iter()
            .chain([&b.images_per_caption])
        {
            if m == 0 || !self.budget.is_multiple_of(m) || !b.views_per_step.is_multiple_of(m) {
                return Err(Error::Config(format!(
                    "{m} images per caption must divide the budget ({}) and the views per step \
                     ({})",
                    self.budget, b.views_per_step
                )));
            }
            if b.views_per_step / 2 > self.budget / m.max(2) {
                return Err(Error::Config(format!(
                    "a budget of {} images at {m} per caption has too few captions for {} views \
                     per step",
                    self.budget, b.views_per_step
                )));
            }
        }
        if self.seeds.is_empty() {
            return Err(Error::Config("the plan needs at least one seed".into()));
        }
        Ok(())
    }
}

/// One finished run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The arm's name (method, data, guidance, images per caption).
    pub arm: String,
    /// Training seed.
    pub seed: u64,
    /// Scores.
    #[serde(flatten)]
    pub outcome: Outcome,
}

fn pool_name(guidance: f64, m: usize) -> String {
    format!("w{guidance}-m{m}")
}

/// The arms the plan needs, each once, with their pools' (guidance, images per caption).
fn arms(plan: &Plan, out: &Path) -> Vec<(String, Arm)> {
    let b = &plan.base;
    let (bw, bm) = (b.guidance, b.images_per_caption);
    let synthetic = |method: &str, w: f64, m: usize| {
        let name = pool_name(w, m);
        (
            format!("{}-{name}", method.to_lowercase()),
            Arm {
                method: method.into(),
                data: "synthetic".into(),
                pool: out.join("pools").join(&name),
                captions: plan.budget / m,
                images_per_caption: m,
                guidance: w,
            },
        )
    };
    // SimCLR on the real renders, and the untrained encoder (its pool only feeds one step at
    // learning rate 0).
    let real = |key: &str, method: &str| {
        (
            key.to_string(),
            Arm {
                method: method.into(),
                data: "real".into(),
                pool: out.join("pools").join("real"),
                captions: plan.budget / bm,
                images_per_caption: 1,
                guidance: 0.0,
            },
        )
    };
    let mut list = vec![
        synthetic("StableRep", bw, bm),
        synthetic("SimCLR", bw, bm),
        real("simclr-real", "SimCLR"),
        real("untrained", "untrained"),
    ];
    for &w in &plan.guidances {
        list.push(synthetic("StableRep", w, bm));
        list.push(synthetic("SimCLR", w, bm));
    }
    for &m in &plan.images_per_caption {
        list.push(synthetic("StableRep", bw, m));
    }
    let mut seen = BTreeSet::new();
    list.retain(|(k, _)| seen.insert(k.clone()));
    list
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Reads `OUT/records.jsonl` (empty when absent).
pub fn read_records(out: &Path) -> Result<Vec<Record>> {
    let path = out.join("records.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&path, e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::Config(format!("{} line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// Runs the plan into `out` (resuming), seed by seed so that every experiment has its first
/// seeds early; returns all records.
pub fn run(
    gpu: &Arc<Gpu>,
    plan: &Plan,
    out: &Path,
    mut progress: impl FnMut(&Step),
) -> Result<Vec<Record>> {
    plan.check()?;
    let b = &plan.base;
    let model = SdModel::load(&b.model)?;
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    eval_sets(out, b.eval_images, b.size, b.seed, &mut progress)?;
    let arms = arms(plan, out);
    // Pools first: the real one, then each synthetic (guidance, m) once.
    real_pool(
        &out.join("pools").join("real"),
        plan.budget / b.images_per_caption,
        b.size,
        b.seed,
        &mut progress,
    )?;
    let mut made = BTreeSet::new();
    for (_, a) in arms.iter().filter(|(_, a)| a.data == "synthetic") {
        if made.insert(a.pool.clone()) {
            let spec = PoolSpec {
                captions: a.captions,
                images_per_caption: a.images_per_caption,
                guidance: a.guidance,
                sampler_steps: b.sampler_steps,
                size: b.size,
                seed: b.seed,
            };
            synthetic_pool(gpu, &model, &spec, &a.pool, &mut progress)?;
        }
    }
    drop(model);

    let mut records = read_records(out)?;
    let path = out.join("records.jsonl");
    for &seed in &plan.seeds {
        for (key, a) in &arms {
            if records.iter().any(|r| &r.arm == key && r.seed == seed) {
                continue;
            }
            let c = DemoConfig {
                seed,
                captions: a.captions,
                ..b.clone()
            };
            let dir = out.join("runs").join(format!("{key}-s{seed}"));
            let outcome = train_arm(gpu, &c, a, &dir, out, &mut progress)?;
            let r = Record {
                arm: key.clone(),
                seed,
                outcome,
            };
            let line = serde_json::to_string(&r).unwrap_or_default();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io(&path, e))?;
            writeln!(f, "{line}").map_err(|e| io(&path, e))?;
            records.push(r);
        }
    }
    Ok(records)
}

/// Mean and spread over an arm's seeds (in percent) of colour kNN, colour linear, shape kNN
/// and shape linear accuracy, and the number of seeds.
fn scores(records: &[Record], key: &str) -> Option<([Value; 4], usize)> {
    let rs: Vec<&Record> = records.iter().filter(|r| r.arm == key).collect();
    if rs.is_empty() {
        return None;
    }
    let pick = |f: fn(&Outcome) -> f64| {
        let v: Vec<f64> = rs.iter().map(|r| 100.0 * f(&r.outcome)).collect();
        mean_spread(&v)
    };
    Some((
        [
            pick(|o| o.colour_knn),
            pick(|o| o.colour_linear),
            pick(|o| o.knn),
            pick(|o| o.linear),
        ],
        rs.len(),
    ))
}

fn cell(v: Value) -> String {
    format!("{:.1} ± {:.1}", v.mean, v.spread)
}

fn cells(v: &[Value]) -> String {
    v.iter().map(|&v| cell(v)).collect::<Vec<_>>().join(" | ")
}

/// The key of the StableRep or SimCLR arm on the synthetic pool at (guidance, m).
fn key(method: &str, guidance: f64, m: usize) -> String {
    format!("{}-{}", method.to_lowercase(), pool_name(guidance, m))
}

const SCORE_HEADER: &str = "colour kNN | colour linear | shape kNN | shape linear";

/// The results as Markdown tables (top-1 accuracy in percent on held-out real renders, mean ±
/// sample standard deviation over seeds).
pub fn report(plan: &Plan, records: &[Record]) -> String {
    let b = &plan.base;
    let (bw, bm) = (b.guidance, b.images_per_caption);
    let mut s = String::new();
    s += &format!(
        "### 1. StableRep vs SimCLR (guidance {bw}, {} captions x {bm} images)\n\n",
        plan.budget / bm
    );
    s += &format!(
        "| encoder | training images | seeds | {SCORE_HEADER} |\n|---|---|---|---|---|---|---|\n"
    );
    for (name, k, images) in [
        (
            "StableRep",
            key("StableRep", bw, bm),
            format!("{} synthetic", plan.budget),
        ),
        (
            "SimCLR",
            key("SimCLR", bw, bm),
            format!("{} synthetic", plan.budget),
        ),
        (
            "SimCLR",
            "simclr-real".to_string(),
            format!("{} real", plan.budget / bm),
        ),
        ("untrained", "untrained".to_string(), "none".to_string()),
    ] {
        if let Some((v, n)) = scores(records, &k) {
            s += &format!("| {name} | {images} | {n} | {} |\n", cells(&v));
        }
    }
    s += &format!("\n### 2. Guidance scale ({bm} images per caption)\n\n");
    s += "| guidance | method | colour kNN | colour linear | shape kNN | shape linear |\n|---|---|---|---|---|---|\n";
    for &w in &plan.guidances {
        for method in ["StableRep", "SimCLR"] {
            if let Some((v, _)) = scores(records, &key(method, w, bm)) {
                s += &format!("| {w} | {method} | {} |\n", cells(&v));
            }
        }
    }
    s += &format!(
        "\n### 3. Images per caption at {} generated images (guidance {bw}, StableRep)\n\n",
        plan.budget
    );
    s += &format!("| m | captions | {SCORE_HEADER} |\n|---|---|---|---|---|---|\n");
    for &m in &plan.images_per_caption {
        if let Some((v, _)) = scores(records, &key("StableRep", bw, m)) {
            s += &format!("| {m} | {} | {} |\n", plan.budget / m, cells(&v));
        }
    }
    s
}

/// The three plots: `main.png`, `guidance.png`, `images-per-caption.png`.
pub fn plots(plan: &Plan, records: &[Record]) -> Result<Vec<(String, Canvas)>> {
    let b = &plan.base;
    let (bw, bm) = (b.guidance, b.images_per_caption);
    let seeds = plan.seeds.len();
    let names = ["colour kNN", "colour linear", "shape kNN", "shape linear"];
    let main_keys = [
        key("StableRep", bw, bm),
        key("SimCLR", bw, bm),
        "simclr-real".to_string(),
        "untrained".to_string(),
    ];
    let s: Vec<_> = main_keys.iter().map(|k| scores(records, k)).collect();
    let main = bar_chart(&Chart {
        title: format!(
            "Held-out accuracy, mean and sd over {seeds} seeds ({} generated images)",
            plan.budget
        ),
        categories: vec![
            "StableRep synthetic".into(),
            "SimCLR synthetic".into(),
            "SimCLR real".into(),
            "untrained".into(),
        ],
        x_label: format!("encoder (guidance {bw}, {bm} images per caption for synthetic)"),
        y_label: "top-1 accuracy, % (chance: shape 8.3, colour 12.5)".into(),
        y_range: (0.0, 100.0),
        series: (0..4)
            .map(|i| Series {
                name: names[i].into(),
                values: s.iter().map(|v| v.map(|v| v.0[i])).collect(),
            })
            .collect(),
    })?;
    let mut guidance_series = Vec::new();
    for (probe, i) in [("colour linear", 1), ("colour kNN", 0)] {
        for method in ["StableRep", "SimCLR"] {
            guidance_series.push(Series {
                name: format!("{method} {probe}"),
                values: plan
                    .guidances
                    .iter()
                    .map(|&w| scores(records, &key(method, w, bm)).map(|v| v.0[i]))
                    .collect(),
            });
        }
    }
    let guidance = line_chart(&Chart {
        title: format!("Guidance scale of the synthetic pool ({bm} images per caption)"),
        categories: plan.guidances.iter().map(|w| format!("{w}")).collect(),
        x_label: "guidance scale w".into(),
        y_label: "top-1 accuracy on colour, %".into(),
        y_range: (0.0, 100.0),
        series: guidance_series,
    })?;
    let per: Vec<_> = plan
        .images_per_caption
        .iter()
        .map(|&m| scores(records, &key("StableRep", bw, m)))
        .collect();
    let images = line_chart(&Chart {
        title: format!(
            "StableRep: images per caption at {} generated images",
            plan.budget
        ),
        categories: plan
            .images_per_caption
            .iter()
            .map(|m| format!("{m} ({} capt.)", plan.budget / m))
            .collect(),
        x_label: "images per caption m (captions)".into(),
        y_label: "top-1 accuracy, %".into(),
        y_range: (0.0, 100.0),
        series: [1, 0, 3, 2]
            .iter()
            .map(|&i| Series {
                name: names[i].into(),
                values: per.iter().map(|v| v.map(|v| v.0[i])).collect(),
            })
            .collect(),
    })?;
    Ok(vec![
        ("main.png".into(), main),
        ("guidance.png".into(), guidance),
        ("images-per-caption.png".into(), images),
    ])
}
