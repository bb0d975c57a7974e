//! Trains the mini-world's fidelity judge (`world::judge::recipe`): a small CNN with shape, colour
//! and background heads on fresh renders of the simple world. Resumable: run it again with
//! the same OUT to continue. Then it measures the judge on 1,000 held-out renders and writes
//! OUT/judge.safetensors (parameters and recipe, no optimizer state); copy that to
//! `assets/world-judge/` to ship it.
//!
//!     cargo run --release --example train_world_judge -- OUT [--steps N]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::world::judge::{accuracy, export, recipe, Judge, JUDGE_FILE};
use stablerep::world::supervised::{self, checkpoint_path, kind_name};

fn run() -> stablerep::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(args.first().ok_or_else(|| {
        stablerep::Error::Config("usage: train_world_judge OUT [--steps N]".into())
    })?);
    let mut r = recipe();
    let mut i = 1;
    while i < args.len() {
        let v: u64 = args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| stablerep::Error::Config(format!("{} wants a number", args[i])))?;
        match args[i].as_str() {
            "--steps" => r.steps = v,
            other => return Err(stablerep::Error::Config(format!("unknown option {other}"))),
        }
        i += 2;
    }
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("device: {}", gpu.describe());
    let t0 = Instant::now();
    let total = r.steps;
    supervised::run(
        &gpu,
        &r,
        &out.join("run"),
        |step, loss| {
            if step % 100 == 0 || step == total {
                println!(
                    "step {step}/{total} loss {loss:.4} ({:.0} s)",
                    t0.elapsed().as_secs_f64()
                );
            }
        },
        &|| false,
    )?;
    let file = out.join(JUDGE_FILE);
    export(&checkpoint_path(&out.join("run")), &file)?;
    let judge = Judge::load(&gpu, &file)?;
    for (kind, acc) in accuracy(&judge, 1000, 12_345)? {
        println!("held-out {}: {:.1}%", kind_name(kind), 100.0 * acc);
    }
    println!(
        "wrote {} in {:.0} s",
        file.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
