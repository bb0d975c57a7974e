//! Text-to-image with a Stable Diffusion 1.x model, headless: the library calls behind
//! `stablerep generate` and the app's Generate panel.
//!
//!     cargo run --release --example generate -- MODEL "a photo of a cat" [OUT] [STEPS] [SIZE]
//!
//! MODEL is a diffusers folder or a single-file `.safetensors` checkpoint (SD 1.5 layout). Without
//! one at hand, the tiny untrained model shows the mechanics in seconds:
//!
//!     cargo run --release --example tiny_sd -- target/tiny-sd
//!     cargo run --release --example generate -- target/tiny-sd "a red cube" target/generated 10 64

use std::path::PathBuf;
use std::process::ExitCode;

use stablerep::diffusion::model::{generate, save_image, GenerateOptions, SdModel};
use stablerep::diffusion::sampler::Kind;
use stablerep::gpu::{Gpu, GpuOptions};

fn arg<T: std::str::FromStr>(n: usize, default: T) -> stablerep::Result<T> {
    match std::env::args().nth(n) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| stablerep::Error::Config(format!("argument {n} '{s}' is not a number"))),
    }
}

fn run() -> stablerep::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt)) = (args.next(), args.next()) else {
        return Err(stablerep::Error::Config(
            "usage: generate MODEL PROMPT [OUT] [STEPS] [SIZE]".into(),
        ));
    };
    let out = PathBuf::from(args.next().unwrap_or_else(|| "generated".into()));
    let m = SdModel::load_with_config(&PathBuf::from(model), None)?;
    let o = GenerateOptions {
        prompt,
        negative: String::new(),
        images: 2,
        guidance: 7.5,
        steps: arg(4, 30)?,
        sampler: Kind::DpmPP2M { karras: true },
        seed: 0,
        caption: 0,
        size: arg(5, 512)?,
        half_weights: None,
        half_activations: None,
        save_size: None,
        init_noise: None,
    };
    o.check(&m)?;
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("device: {}", gpu.describe());
    let result = generate(&gpu, &m, &o, |p| {
        eprint!("\r{p}   ");
        Ok(())
    })?;
    eprintln!();
    for (k, img) in result.images.iter().enumerate() {
        let path = out.join(format!("{k:05}.png"));
        save_image(&path, o.size, None, img)?;
        println!("{}", path.display());
    }
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
