//! The mini-world experiments of docs/results.md (`world::experiments`): the demo's seven
//! arms with paired differences, a guidance sweep with fidelity and diversity, and an
//! images-per-caption sweep, over several seeds. Resumable: run it again with the same OUT to
//! continue. Writes OUT/records.jsonl, OUT/report.md and the plots OUT/*.png.
//!
//!     cargo run --release --example world_experiments -- OUT [--model DIR] [--seeds N]
//!         [--steps N] [--views N] [--budget N] [--captions N] [--main-only] [--oracle-only]
//!         [--guidance-only] [--demo-encoder] [--conv-stem] [--init official|torch]
//!         [--arms NAME,NAME]
//!
//! `--main-only` skips the guidance and images-per-caption sweeps; `--oracle-only` also the
//! synthetic arms (no text-to-image model needed); `--guidance-only` skips the
//! images-per-caption sweep. `--demo-encoder` trains the full demo's
//! encoder for 400 steps (default: the `--quick` demo's, cheaper for the sweeps).
//! `--conv-stem` gives the encoder the convolutional stem (`models::vit::Stem::Conv`) instead
//! of the patch embedding. `--views N` sets the images per training step of every arm
//! (default 32; StableRep N / m captions of m images, SimCLR N / 2 images of 2 crops,
//! supervised N images). `--init torch` starts every arm's encoder (and the supervised heads)
//! from PyTorch's module defaults instead of the official code's normal(0, 0.02)
//! (`models::stablerep::Init`). `--arms` trains only the named demo arms (for example
//! `supervised,stablerep-oracle`); the others can be added later in the same OUT. It filters
//! the demo's seven arms only: the sweeps still run unless `--main-only` or `--oracle-only`
//! skips them. OUT remembers the model, encoder, head, steps, captions, views and
//! budget it was started with (OUT/settings.txt) and refuses others, so one folder's records
//! never mix settings.
//!
//! The model defaults to the built-in one (assets/world-sd).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::models::stablerep::Init;
use stablerep::world::experiments::{plots, report, run, Plan};

fn go() -> stablerep::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        return Err(stablerep::Error::Config(
            "usage: world_experiments OUT [--model DIR] [--seeds N] [--steps N] [--views N] [--budget N]"
                .into(),
        ));
    };
    let mut model = None;
    let mut numbers = Vec::new();
    let mut main_only = false;
    let mut oracle_only = false;
    let mut demo_encoder = false;
    let mut guidance_only = false;
    let mut conv_stem = false;
    let mut init = Init::Official;
    let mut only = Vec::new();
    let mut i = 1;
    while i < args.len() {
        if args[i] == "--conv-stem" {
            conv_stem = true;
            i += 1;
            continue;
        }
        if args[i] == "--guidance-only" {
            guidance_only = true;
            i += 1;
            continue;
        }
        if args[i] == "--demo-encoder" {
            demo_encoder = true;
            i += 1;
            continue;
        }
        if args[i] == "--main-only" || args[i] == "--oracle-only" {
            main_only = true;
            oracle_only |= args[i] == "--oracle-only";
            i += 1;
            continue;
        }
        let value = args
            .get(i + 1)
            .ok_or_else(|| stablerep::Error::Config(format!("{} wants a value", args[i])))?;
        if args[i] == "--model" {
            model = Some(PathBuf::from(value));
        } else if args[i] == "--arms" {
            only = value.split(',').map(|a| a.trim().to_string()).collect();
        } else if args[i] == "--init" {
            init = match value.as_str() {
                "official" => Init::Official,
                "torch" => Init::Torch,
                other => {
                    return Err(stablerep::Error::Config(format!(
                        "--init '{other}': want official or torch"
                    )))
                }
            };
        } else {
            let v: u64 = value.parse().map_err(|_| {
                stablerep::Error::Config(format!("{} wants a number, not '{value}'", args[i]))
            })?;
            numbers.push((args[i].clone(), v));
        }
        i += 2;
    }
    let model = match model {
        Some(m) => m,
        None if oracle_only => PathBuf::new(),
        None => stablerep::world::builtin_model()?,
    };
    let mut plan = Plan::new(model.clone());
    if demo_encoder {
        let full = stablerep::world::demo::DemoConfig::new(model);
        (plan.base.vit, plan.base.head) = (full.vit, full.head);
        plan.base.train_steps = 400;
    }
    for (name, v) in numbers {
        match name.as_str() {
            "--seeds" => plan.seeds = (0..v).collect(),
            "--steps" => plan.base.train_steps = v,
            "--views" => plan.base.views_per_step = v as usize,
            "--budget" => plan.budget = v as usize,
            "--captions" => plan.base.captions = v as usize,
            other => return Err(stablerep::Error::Config(format!("unknown option {other}"))),
        }
    }
    if main_only {
        plan.guidances.clear();
        plan.images_per_caption.clear();
    }
    if guidance_only {
        plan.images_per_caption.clear();
    }
    if conv_stem {
        plan.base.vit.stem = stablerep::models::vit::Stem::Conv;
        plan.base.vit.validate()?;
    }
    plan.base.init = init;
    plan.only = only;
    plan.synthetic = !oracle_only;
    plan.check()?;
    // A folder holds the records of one set of settings: resuming with others would mix them.
    let mut settings = format!(
        "model {}\nencoder {:?}\nhead {:?}\nsteps {}\ncaptions {}\nviews {}\nbudget {}\n",
        plan.base.model.display(),
        plan.base.vit,
        plan.base.head,
        plan.base.train_steps,
        plan.base.captions,
        plan.base.views_per_step,
        plan.budget
    );
    // Written only when not the default, so folders started before the option stay valid.
    if init != Init::Official {
        settings += &format!("init {init:?}\n");
    }
    let settings_file = out.join("settings.txt");
    match std::fs::read_to_string(&settings_file) {
        Ok(old) if old != settings => {
            return Err(stablerep::Error::Config(format!(
                "{} was started with other settings:\n{old}not these:\n{settings}use a new \
                 output folder",
                out.display()
            )))
        }
        Ok(_) => {}
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && out.join("records.jsonl").exists() =>
        {
            return Err(stablerep::Error::Config(format!(
                "{} holds records from before the folder remembered its settings: use a new \
                 output folder, or, if these are its settings, write them to {}:\n{settings}",
                out.display(),
                settings_file.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&out).map_err(|source| stablerep::Error::Io {
                path: out.display().to_string(),
                source,
            })?;
            stablerep::atomic::write_atomic(&settings_file, settings.as_bytes())?;
        }
        Err(source) => {
            return Err(stablerep::Error::Io {
                path: settings_file.display().to_string(),
                source,
            })
        }
    }
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("device: {}", gpu.describe());
    let t0 = Instant::now();
    let mut last = String::new();
    let records = run(&gpu, &plan, &out, |s| {
        if s.stage != last || s.done == s.total {
            eprintln!(
                "[{:>6.0} s] {}: {}/{}",
                t0.elapsed().as_secs_f64(),
                s.stage,
                s.done,
                s.total
            );
            last = s.stage.clone();
        }
    })?;
    let text = report(&plan, &records);
    print!("{text}");
    let path = out.join("report.md");
    std::fs::write(&path, &text).map_err(|e| stablerep::Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    for (name, canvas) in plots(&plan, &records)? {
        canvas.save(&out.join(&name))?;
    }
    eprintln!("done in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    match go() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
