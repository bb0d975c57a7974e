//! A synthetic training pool from a captions file (one caption per line): several images per
//! caption at the paper's low guidance scale (2), in the official layout, resumable. The
//! library calls behind `stablerep generate --captions` and the app's Pool panel.
//!
//!     cargo run --release --example build_pool -- MODEL CAPTIONS OUT [IMAGES] [STEPS] [SIZE]
//!
//! With the tiny untrained model (see `examples/tiny_sd.rs`):
//!
//!     printf 'a red cube\na blue ball\n' > target/captions.txt
//!     cargo run --release --example build_pool -- target/tiny-sd target/captions.txt target/pool 4 10 64

use std::path::PathBuf;
use std::process::ExitCode;

use stablerep::data::pool::read_captions;
use stablerep::diffusion::model::{generate_pool, GenerateOptions, SdModel};
use stablerep::diffusion::sampler::Kind;
use stablerep::gpu::{Gpu, GpuOptions};

fn arg(n: usize, default: usize) -> stablerep::Result<usize> {
    match std::env::args().nth(n) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| stablerep::Error::Config(format!("argument {n} '{s}' is not a number"))),
    }
}

fn run() -> stablerep::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).take(3).collect();
    let [model, captions, out] = a.as_slice() else {
        return Err(stablerep::Error::Config(
            "usage: build_pool MODEL CAPTIONS OUT [IMAGES] [STEPS] [SIZE]".into(),
        ));
    };
    let m = SdModel::load_with_config(&PathBuf::from(model), None)?;
    let caps = read_captions(&PathBuf::from(captions))?;
    let o = GenerateOptions {
        prompt: String::new(),
        negative: String::new(),
        images: arg(4, 4)?,
        guidance: 2.0,
        steps: arg(5, 30)?,
        sampler: Kind::DpmPP2M { karras: true },
        seed: 0,
        caption: 0,
        size: arg(6, 512)?,
        half_weights: None,
        half_activations: None,
        save_size: None,
        init_noise: None,
    };
    o.check(&m)?;
    let gpu = Gpu::new(&GpuOptions::default())?;
    let out = PathBuf::from(out);
    let written = generate_pool(&gpu, &m, &o, &caps, (0, 1), true, &out, |p| {
        eprint!("\r{p}   ");
        Ok(())
    })?;
    eprintln!();
    println!("{written} images in {}", out.display());
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
