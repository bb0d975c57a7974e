//! Trains the mini-world's text-to-image model (Stable Diffusion's architecture at a small
//! size) with the engine: the VAE, then the text encoder and UNet together. Resumable: run it
//! again with the same OUT to continue. Writes OUT/model, a diffusers folder.
//!
//!     cargo run --release --example train_world_sd -- OUT [--vae-steps N] [--denoiser-steps N]
//!         [--vae-batch N] [--batch N] [--vae-channels 32,64] [--unet-channels 32,64]
//!         [--latent-channels N] [--world simple|full] [--offset-noise STD]
//!         [--offset-noise-from STEP] [--denoiser-stop-at STEP]
//!
//! `--denoiser-stop-at` ends the denoiser stage (and writes the model) at that step while the
//! learning rate follows the whole `--denoiser-steps` schedule; the built-in model stops at
//! 5,000 of 6,000 (`--denoiser-stop-at 6000` runs the schedule to its end).
//!
//! The defaults are the built-in model's recipe (`world::train_sd::Recipe::builtin`).
//! Then, for example:
//!
//!     cargo run --release -- generate --model OUT/model --prompt "a large red star on a \
//!         gray background" --size 64 --guidance 4 --out OUT/samples

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::world::train_sd::{train, Phase, Recipe};

fn run() -> stablerep::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(args.first().ok_or_else(|| {
        stablerep::Error::Config("usage: train_world_sd OUT [--vae-steps N] ...".into())
    })?);
    let mut r = Recipe::builtin();
    let mut i = 1;
    while i < args.len() {
        if args[i] == "--world" {
            let w = args.get(i + 1).map(String::as_str).unwrap_or_default();
            r.world = stablerep::world::World::parse(w).ok_or_else(|| {
                stablerep::Error::Config(format!("--world '{w}': want full or simple"))
            })?;
            i += 2;
            continue;
        }
        if args[i] == "--vae-channels" || args[i] == "--unet-channels" {
            let list = args.get(i + 1).map(String::as_str).unwrap_or_default();
            let v: Vec<usize> = list
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    stablerep::Error::Config(format!("{} '{list}': want e.g. 16,32,32", args[i]))
                })?;
            if args[i] == "--vae-channels" {
                r.spec.vae_channels = v;
            } else {
                r.spec.unet_attention = vec![true; v.len()];
                r.spec.unet_channels = v;
            }
            i += 2;
            continue;
        }
        if args[i] == "--offset-noise" {
            let v = args.get(i + 1).and_then(|s| s.parse::<f32>().ok());
            r.offset_noise = v.filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| {
                stablerep::Error::Config("--offset-noise wants a number >= 0".into())
            })?;
            i += 2;
            continue;
        }
        let v: u64 = args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| stablerep::Error::Config(format!("{} wants a number", args[i])))?;
        match args[i].as_str() {
            "--vae-steps" => r.vae.steps = v,
            "--denoiser-steps" => r.denoiser.steps = v,
            "--vae-batch" => r.vae.batch = v as usize,
            "--batch" => r.denoiser.batch = v as usize,
            "--latent-channels" => r.spec.latent_channels = v as usize,
            "--offset-noise-from" => r.offset_noise_from = v,
            "--denoiser-stop-at" => r.denoiser_stop = Some(v),
            other => {
                return Err(stablerep::Error::Config(format!("unknown option {other}")));
            }
        }
        i += 2;
    }
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("device: {}", gpu.describe());
    let t0 = Instant::now();
    let mut last = Instant::now() - Duration::from_secs(60);
    // (phase, when its first report of this process came, the step before it)
    let mut phase_start: Option<(Phase, Instant, u64)> = None;
    let model = train(
        &gpu,
        &r,
        &out,
        |rep| {
            let start = match phase_start {
                Some(p) if p.0 == rep.phase => p,
                _ => {
                    let p = (rep.phase, Instant::now(), rep.step.saturating_sub(1));
                    phase_start = Some(p);
                    p
                }
            };
            if let Some(l) = rep.loss {
                if last.elapsed() > Duration::from_secs(10) || rep.step == rep.total {
                    last = Instant::now();
                    let per = start.1.elapsed().as_secs_f64() / (rep.step - start.2).max(1) as f64;
                    println!(
                        "{:?} step {}/{} loss {l:.5} ({per:.2} s/step, {:.0} s elapsed)",
                        rep.phase,
                        rep.step,
                        rep.total,
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
        },
        &|| false,
    )?;
    println!(
        "wrote {} in {:.0} s",
        model.display(),
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
