//! The StableRep experiment in miniature on the mini-world (`world::demo`): a synthetic pool
//! from a text-to-image model, then StableRep and SimCLR on it and SimCLR on the real renders
//! of the same captions, each scored on held-out real renders (kNN and linear probe by shape).
//! Resumable: run it again with the same OUT to continue.
//!
//!     cargo run --release --example world_demo -- MODEL OUT [--steps N] [--captions N]
//!
//! MODEL is a diffusers folder, such as the one `examples/train_world_sd.rs` writes
//! (`OUT/model`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::world::demo::{run, table, DemoConfig};

fn go() -> stablerep::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model), Some(out)) = (args.first(), args.get(1)) else {
        return Err(stablerep::Error::Config(
            "usage: world_demo MODEL OUT [--steps N] [--captions N]".into(),
        ));
    };
    let mut c = DemoConfig::new(PathBuf::from(model));
    let mut i = 2;
    while i < args.len() {
        let v: u64 = args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| stablerep::Error::Config(format!("{} wants a number", args[i])))?;
        match args[i].as_str() {
            "--steps" => c.train_steps = v,
            "--captions" => c.captions = v as usize,
            other => return Err(stablerep::Error::Config(format!("unknown option {other}"))),
        }
        i += 2;
    }
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("device: {}", gpu.describe());
    let t0 = Instant::now();
    let mut last = String::new();
    let results = run(&gpu, &c, &PathBuf::from(out), |s| {
        let line = format!("{}: {}/{}", s.stage, s.done, s.total);
        if s.stage != last || s.done == s.total {
            eprintln!("[{:>5.0} s] {line}", t0.elapsed().as_secs_f64());
            last = s.stage.clone();
        }
    })?;
    print!("{}", table(&results));
    println!(
        "({:.0} s; results.json in {out})",
        t0.elapsed().as_secs_f64()
    );
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
