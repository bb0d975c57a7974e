//! The paper's experiments in miniature on the simple world, over several seeds. Each seed
//! draws its own captions, renders and generated pools (so spreads include generation) and
//! trains every arm with its own initialization, batches and augmentation:
//!
//! 1. the demo's seven arms (supervised, StableRep and SimCLR on the oracle pool and on the
//!    synthetic pool, SimCLR on real renders, untrained), and the paired difference StableRep
//!    minus SimCLR per seed, with its standard error, on the oracle and the synthetic pools;
//! 2. the guidance scale of generation, for StableRep and SimCLR, with the judge's fidelity
//!    and diversity of each pool next to the accuracies (the paper's trade-off);
//! 3. images per caption at a fixed number of generated images (`budget / m` captions).
//!
//! Each finished run and each pool's fidelity appends a line to `OUT/records.jsonl`;
//! running again skips what is recorded and resumes a run that was interrupted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::demo::{
    arms, eval_sets, pool_fidelity, rendered_pool, synthetic_pool, train_arm, Arm, DemoConfig,
    Outcome, PoolSpec, Step,
};
use super::judge::{Fidelity, Judge};
use crate::diffusion::model::SdModel;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::plot::{bar_chart, line_chart, mean_spread, Canvas, Chart, Series, Value};

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Encoder, steps, views per step, sampler steps, evaluation sets, captions, and the base
    /// guidance and images per caption (experiments 2 and 3 vary one of them).
    pub base: DemoConfig,
    /// Seeds (captions, renders, generation and training).
    pub seeds: Vec<u64>,
    /// Guidance scales of experiment 2 (empty: skip it).
    pub guidances: Vec<f64>,
    /// Images per caption of experiment 3 (empty: skip it).
    pub images_per_caption: Vec<usize>,
    /// Generated images per pool in experiment 3.
    pub budget: usize,
    /// Whether to generate pools and train the synthetic arms (off: only the oracle, real,
    /// supervised and untrained arms, which need no text-to-image model).
    pub synthetic: bool,
    /// The demo arms to train (names of [`super::demo::ARMS`]; empty: all). The sweeps'
    /// arms are not filtered.
    pub only: Vec<String>,
}

impl Plan {
    /// The documented plan (docs/results.md): 3 seeds, the `--quick` demo's encoder and
    /// steps on 96 captions x 4 images, guidance 1, 2, 4, 8, m = 2, 4, 8 at 384 images.
    pub fn new(model: PathBuf) -> Plan {
        let quick = DemoConfig::quick(model.clone());
        let mut base = DemoConfig::new(model);
        base.vit = quick.vit;
        base.head = quick.head;
        base.train_steps = quick.train_steps;
        base.sampler_steps = quick.sampler_steps;
        base.captions = 96;
        Plan {
            base,
            seeds: vec![0, 1, 2],
            guidances: vec![1.0, 2.0, 4.0, 8.0],
            images_per_caption: vec![2, 4, 8],
            budget: 384,
            synthetic: true,
            only: Vec::new(),
        }
    }

    /// Checks the plan's numbers fit together.
    pub fn check(&self) -> Result<()> {
        let b = &self.base;
        b.check()?;
        for &m in &self.images_per_caption {
            if m < 2 || !self.budget.is_multiple_of(m) || !b.views_per_step.is_multiple_of(m) {
                return Err(Error::Config(format!(
                    "{m} images per caption must be at least 2 and divide the budget ({}) and \
                     the views per step ({})",
                    self.budget, b.views_per_step
                )));
            }
            if b.views_per_step > self.budget {
                return Err(Error::Config(format!(
                    "a budget of {} images at {m} per caption has too few captions for {} views",
                    self.budget, b.views_per_step
                )));
            }
        }
        let sweeps = !(self.guidances.is_empty() && self.images_per_caption.is_empty());
        if !self.synthetic && sweeps {
            return Err(Error::Config(
                "the guidance and images-per-caption sweeps need the synthetic pools".into(),
            ));
        }
        if let Some(w) = self
            .guidances
            .iter()
            .find(|w| !(w.is_finite() && **w >= 0.0))
        {
            return Err(Error::Config(format!(
                "guidance {w} is not a finite number >= 0"
            )));
        }
        if let Some(bad) = self
            .only
            .iter()
            .find(|a| !super::demo::ARMS.contains(&a.as_str()))
        {
            return Err(Error::Config(format!(
                "unknown arm '{bad}': want some of {}",
                super::demo::ARMS.join(", ")
            )));
        }
        if self.seeds.is_empty() {
            return Err(Error::Config("the plan needs at least one seed".into()));
        }
        Ok(())
    }
}

/// One finished run, or one pool's fidelity.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The arm's key: `main/<demo arm>`, `guidance/<w>/<method>`, `m/<m>/stablerep`, or
    /// `fidelity/w<w>-m<m>-c<captions>` for a pool's fidelity.
    pub arm: String,
    /// Seed.
    pub seed: u64,
    /// Scores of a trained arm.
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Fidelity of a pool.
    #[serde(default)]
    pub fidelity: Option<Fidelity>,
}

/// A synthetic pool of one seed.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PoolKey {
    guidance: f64,
    m: usize,
    captions: usize,
}

impl PoolKey {
    fn name(&self) -> String {
        format!("w{}-m{}-c{}", self.guidance, self.m, self.captions)
    }
}

/// Every (key, arm) of one seed, and the synthetic pools they need.
fn plan_arms(plan: &Plan, c: &DemoConfig, dir: &Path) -> (Vec<(String, Arm)>, Vec<PoolKey>) {
    let b = &plan.base;
    let mut list: Vec<(String, Arm)> = arms(c, dir)
        .into_iter()
        .filter(|a| plan.only.is_empty() || plan.only.contains(&a.name))
        .map(|a| (format!("main/{}", a.name), a))
        .collect();
    // The paired arms first, so an interrupted plan has its comparisons early.
    list.sort_by_key(|(_, a)| !(a.method == "StableRep" || a.method == "SimCLR"));
    let base = PoolKey {
        guidance: b.guidance,
        m: b.images_per_caption,
        captions: b.captions,
    };
    if !plan.synthetic {
        list.retain(|(_, a)| a.data != "synthetic");
        return (list, Vec::new());
    }
    let mut pools = vec![base];
    // The main arms' synthetic pool lives under the per-seed pool name too.
    for (_, a) in list.iter_mut() {
        if a.data == "synthetic" {
            a.pool = dir.join("pools").join(base.name());
        }
    }
    let synthetic = |name: String, method: &str, p: PoolKey| Arm {
        name,
        method: method.into(),
        data: "synthetic".into(),
        pool: dir.join("pools").join(p.name()),
        captions: p.captions,
        images_per_caption: p.m,
        guidance: p.guidance,
    };
    for &w in &plan.guidances {
        let p = PoolKey {
            guidance: w,
            ..base
        };
        if !pools.contains(&p) {
            pools.push(p);
        }
        for method in ["StableRep", "SimCLR"] {
            let key = format!("guidance/{w}/{}", method.to_lowercase());
            list.push((key.clone(), synthetic(key, method, p)));
        }
    }
    for &m in &plan.images_per_caption {
        let p = PoolKey {
            m,
            captions: plan.budget / m,
            ..base
        };
        if !pools.contains(&p) {
            pools.push(p);
        }
        let key = format!("m/{m}/stablerep");
        list.push((key.clone(), synthetic(key, "StableRep", p)));
    }
    (list, pools)
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

fn append(path: &Path, r: &Record) -> Result<()> {
    let line = serde_json::to_string(r)
        .map_err(|e| Error::Config(format!("a record does not serialize: {e}")))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io(path, e))?;
    writeln!(f, "{line}")
        .and_then(|_| f.sync_data())
        .map_err(|e| io(path, e))
}

/// Runs the plan into `out` (resuming), seed by seed; returns all records.
pub fn run(
    gpu: &Arc<Gpu>,
    plan: &Plan,
    out: &Path,
    mut progress: impl FnMut(&Step),
) -> Result<Vec<Record>> {
    plan.check()?;
    let b = &plan.base;
    let judge_path = match &b.judge {
        Some(p) => p.clone(),
        None if plan.synthetic => super::judge::builtin_judge()?,
        None => PathBuf::new(),
    };
    let model = if plan.synthetic {
        Some(SdModel::load(&b.model)?)
    } else {
        None
    };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let path = out.join("records.jsonl");
    let mut records = read_records(out)?;
    let done = |records: &[Record], key: &str, seed: u64| {
        records.iter().any(|r| r.arm == key && r.seed == seed)
    };
    for &seed in &plan.seeds {
        let c = DemoConfig { seed, ..b.clone() };
        let dir = out.join(format!("seed-{seed}"));
        let (list, pools) = plan_arms(plan, &c, &dir);
        eval_sets(&dir, c.world, c.eval_images, c.size, seed, &mut progress)?;
        rendered_pool(
            &dir.join("real-pool"),
            c.world,
            c.captions,
            1,
            c.size,
            seed,
            &mut progress,
        )?;
        rendered_pool(
            &dir.join("oracle-pool"),
            c.world,
            c.captions,
            c.images_per_caption,
            c.size,
            seed,
            &mut progress,
        )?;
        for p in &pools {
            let spec = PoolSpec {
                world: c.world,
                captions: p.captions,
                images_per_caption: p.m,
                guidance: p.guidance,
                sampler_steps: c.sampler_steps,
                size: c.size,
                seed,
            };
            let pool = dir.join("pools").join(p.name());
            let model = model
                .as_ref()
                .ok_or_else(|| Error::Config("synthetic pools need a model".into()))?;
            synthetic_pool(gpu, model, &spec, &pool, &mut progress)?;
            let key = format!("fidelity/{}", p.name());
            if !done(&records, &key, seed) {
                let judge = Judge::load(gpu, &judge_path)?;
                let r = Record {
                    arm: key,
                    seed,
                    outcome: None,
                    fidelity: Some(pool_fidelity(&judge, &spec, &pool)?),
                };
                append(&path, &r)?;
                records.push(r);
            }
        }
        for (key, a) in &list {
            if done(&records, key, seed) {
                continue;
            }
            let c = DemoConfig {
                captions: a.captions,
                ..c.clone()
            };
            let run_dir = dir.join("runs").join(key.replace('/', "-"));
            let outcome = train_arm(gpu, &c, a, &run_dir, &dir, &mut progress)?;
            let r = Record {
                arm: key.clone(),
                seed,
                outcome: Some(outcome),
                fidelity: None,
            };
            append(&path, &r)?;
            records.push(r);
        }
    }
    Ok(records)
}

/// The four scores of an outcome in percent: colour kNN, colour linear, shape kNN, shape
/// linear.
fn four(o: &Outcome) -> [f64; 4] {
    [o.colour_knn, o.colour_linear, o.knn, o.linear].map(|v| 100.0 * v)
}

/// Per-seed scores of an arm, in seed order.
fn per_seed(records: &[Record], key: &str) -> Vec<(u64, [f64; 4])> {
    let mut v: Vec<(u64, [f64; 4])> = records
        .iter()
        .filter(|r| r.arm == key)
        .filter_map(|r| r.outcome.as_ref().map(|o| (r.seed, four(o))))
        .collect();
    v.sort_by_key(|p| p.0);
    v.dedup_by_key(|p| p.0);
    v
}

/// Mean and sample sd over an arm's seeds (in percent), and the number of seeds.
fn scores(records: &[Record], key: &str) -> Option<([Value; 4], usize)> {
    let v = per_seed(records, key);
    if v.is_empty() {
        return None;
    }
    let pick = |i: usize| mean_spread(&v.iter().map(|p| p.1[i]).collect::<Vec<_>>());
    Some(([0, 1, 2, 3].map(pick), v.len()))
}

/// The paired difference `a - b` over the seeds both have, per score: mean, standard error
/// of the mean, and the number of pairs.
pub fn paired(records: &[Record], a: &str, b: &str) -> Option<([(f64, f64); 4], usize)> {
    let (va, vb) = (per_seed(records, a), per_seed(records, b));
    let pairs: Vec<([f64; 4], [f64; 4])> = va
        .iter()
        .filter_map(|(s, x)| vb.iter().find(|(t, _)| t == s).map(|(_, y)| (*x, *y)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len();
    let diff = |i: usize| {
        let d: Vec<f64> = pairs.iter().map(|(x, y)| x[i] - y[i]).collect();
        let v = mean_spread(&d);
        (v.mean, v.spread / (n as f64).sqrt())
    };
    Some(([0, 1, 2, 3].map(diff), n))
}

/// Mean fidelity of a pool over seeds: (background, colour, shape, diversity, real
/// diversity) in percent / raw, and the number of seeds.
fn fidelity(records: &[Record], key: &str) -> Option<([Value; 5], usize)> {
    let fs: Vec<&Fidelity> = records
        .iter()
        .filter(|r| r.arm == key)
        .filter_map(|r| r.fidelity.as_ref())
        .collect();
    if fs.is_empty() {
        return None;
    }
    let pick = |f: fn(&Fidelity) -> f64| mean_spread(&fs.iter().map(|x| f(x)).collect::<Vec<_>>());
    Some((
        [
            pick(|f| 100.0 * f.background),
            pick(|f| 100.0 * f.colour),
            pick(|f| 100.0 * f.shape),
            pick(|f| f.diversity),
            pick(|f| f.real_diversity),
        ],
        fs.len(),
    ))
}

fn cell(v: Value) -> String {
    format!("{:.1} ± {:.1}", v.mean, v.spread)
}

fn cells(v: &[Value]) -> String {
    v.iter().map(|&v| cell(v)).collect::<Vec<_>>().join(" | ")
}

const SCORE_HEADER: &str = "colour kNN | colour linear | shape kNN | shape linear";

fn base_pool(plan: &Plan) -> PoolKey {
    PoolKey {
        guidance: plan.base.guidance,
        m: plan.base.images_per_caption,
        captions: plan.base.captions,
    }
}

/// The results as Markdown tables: accuracies in percent on held-out real renders, mean ±
/// sample standard deviation over seeds; paired differences with their standard errors.
pub fn report(plan: &Plan, records: &[Record]) -> String {
    let b = &plan.base;
    let (bw, bm) = (b.guidance, b.images_per_caption);
    let mut s = String::new();
    s += &format!(
        "### 1. The seven arms ({} captions x {bm} images, guidance {bw})\n\n",
        b.captions
    );
    s += &format!("| arm | seeds | {SCORE_HEADER} |\n|---|---|---|---|---|---|\n");
    for name in super::demo::ARMS {
        if let Some((v, n)) = scores(records, &format!("main/{name}")) {
            s += &format!("| {name} | {n} | {} |\n", cells(&v));
        }
    }
    s += "\nPaired difference StableRep minus SimCLR (same seed: same captions, renders, pool \
          and initialization), mean ± standard error; * marks a difference larger than two \
          standard errors:\n\n";
    s += &format!("| pool | pairs | {SCORE_HEADER} |\n|---|---|---|---|---|---|\n");
    for data in ["oracle", "synthetic"] {
        if let Some((d, n)) = paired(
            records,
            &format!("main/stablerep-{data}"),
            &format!("main/simclr-{data}"),
        ) {
            let c: Vec<String> = d
                .iter()
                .map(|(m, se)| {
                    let star = if n > 1 && m.abs() > 2.0 * se {
                        " *"
                    } else {
                        ""
                    };
                    format!("{m:+.1} ± {se:.1}{star}")
                })
                .collect();
            s += &format!("| {data} | {n} | {} |\n", c.join(" | "));
        }
    }
    if let Some((f, n)) = fidelity(records, &format!("fidelity/{}", base_pool(plan).name())) {
        s += &format!(
            "\nThe generator's fidelity on the main synthetic pools (the judge, {n} seeds): \
             background {}, colour {}, shape {} %; diversity {:.3} (real renders {:.3}).\n",
            cell(f[0]),
            cell(f[1]),
            cell(f[2]),
            f[3].mean,
            f[4].mean
        );
    }
    if !plan.guidances.is_empty() {
        s += &format!("\n### 2. Guidance scale ({bm} images per caption)\n\n");
        s += "| guidance | fidelity bg / colour / shape % | diversity (real) | method | \
              colour kNN | colour linear | shape kNN | shape linear |\n\
              |---|---|---|---|---|---|---|---|\n";
        for &w in &plan.guidances {
            let p = PoolKey {
                guidance: w,
                ..base_pool(plan)
            };
            let (fid, div) = match fidelity(records, &format!("fidelity/{}", p.name())) {
                Some((f, _)) => (
                    format!("{:.0} / {:.0} / {:.0}", f[0].mean, f[1].mean, f[2].mean),
                    format!("{:.3} ({:.3})", f[3].mean, f[4].mean),
                ),
                None => ("-".into(), "-".into()),
            };
            for method in ["stablerep", "simclr"] {
                if let Some((v, _)) = scores(records, &format!("guidance/{w}/{method}")) {
                    s += &format!("| {w} | {fid} | {div} | {method} | {} |\n", cells(&v));
                }
            }
        }
    }
    if !plan.images_per_caption.is_empty() {
        s += &format!(
            "\n### 3. Images per caption at {} generated images (guidance {bw}, StableRep)\n\n",
            plan.budget
        );
        s += &format!("| m | captions | {SCORE_HEADER} |\n|---|---|---|---|---|---|\n");
        for &m in &plan.images_per_caption {
            if let Some((v, _)) = scores(records, &format!("m/{m}/stablerep")) {
                s += &format!("| {m} | {} | {} |\n", plan.budget / m, cells(&v));
            }
        }
    }
    s
}

/// The plots: `main.png`, and `guidance.png` and `images-per-caption.png` when the plan has
/// those experiments.
pub fn plots(plan: &Plan, records: &[Record]) -> Result<Vec<(String, Canvas)>> {
    let b = &plan.base;
    let (bw, bm) = (b.guidance, b.images_per_caption);
    let seeds = plan.seeds.len();
    let names = ["colour kNN", "colour linear", "shape kNN", "shape linear"];
    // The arms that have results (an oracle-only plan has no synthetic ones).
    let present: Vec<&str> = super::demo::ARMS
        .iter()
        .copied()
        .filter(|k| scores(records, &format!("main/{k}")).is_some())
        .collect();
    let s: Vec<_> = present
        .iter()
        .map(|k| scores(records, &format!("main/{k}")))
        .collect();
    let mut out = vec![(
        "main.png".to_string(),
        bar_chart(&Chart {
            title: format!("Held-out accuracy, mean and sd over {seeds} seeds"),
            categories: present.iter().map(|s| super::demo::short(s)).collect(),
            x_label: format!(
                "arm (SR StableRep, SC SimCLR; guidance {bw}, {bm} images per caption)"
            ),
            y_label: "top-1 accuracy, %".into(),
            y_range: (0.0, 100.0),
            series: (0..4)
                .map(|i| Series {
                    name: names[i].into(),
                    values: s.iter().map(|v| v.map(|v| v.0[i])).collect(),
                })
                .collect(),
        })?,
    )];
    if !plan.guidances.is_empty() {
        let mut series = Vec::new();
        for (probe, i) in [("shape kNN", 2), ("colour kNN", 0)] {
            for method in ["stablerep", "simclr"] {
                series.push(Series {
                    name: format!("{method} {probe}"),
                    values: plan
                        .guidances
                        .iter()
                        .map(|&w| {
                            scores(records, &format!("guidance/{w}/{method}")).map(|v| v.0[i])
                        })
                        .collect(),
                });
            }
        }
        series.push(Series {
            name: "fidelity: shape".into(),
            values: plan
                .guidances
                .iter()
                .map(|&w| {
                    let p = PoolKey {
                        guidance: w,
                        ..base_pool(plan)
                    };
                    fidelity(records, &format!("fidelity/{}", p.name())).map(|f| f.0[2])
                })
                .collect(),
        });
        out.push((
            "guidance.png".into(),
            line_chart(&Chart {
                title: format!("Guidance scale of the synthetic pool ({bm} images per caption)"),
                categories: plan.guidances.iter().map(|w| format!("{w}")).collect(),
                x_label: "guidance scale w".into(),
                y_label: "%".into(),
                y_range: (0.0, 100.0),
                series,
            })?,
        ));
    }
    if !plan.images_per_caption.is_empty() {
        let per: Vec<_> = plan
            .images_per_caption
            .iter()
            .map(|&m| scores(records, &format!("m/{m}/stablerep")))
            .collect();
        out.push((
            "images-per-caption.png".into(),
            line_chart(&Chart {
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
            })?,
        ));
    }
    Ok(out)
}
