//! A sheet of the built-in model's samples: for each of the first captions of a mini-world
//! seed, one real render and a row of generated images, at each of several guidance scales.
//!
//!     cargo run --release --example world_samples -- OUT.png [--captions N] [--images N]
//!         [--guidance 2,6] [--seed S] [--model DIR]
//!
//! Row by row: caption c's real render, a gap, then its samples at each guidance scale. The
//! captions are printed in row order.

use std::path::PathBuf;
use std::process::ExitCode;

use stablerep::diffusion::model::{generate, GenerateOptions, SdModel};
use stablerep::diffusion::sampler::Kind;
use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::world::export::render_caption;
use stablerep::world::World;

fn go() -> stablerep::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bad = |m: String| stablerep::Error::Config(m);
    let out = PathBuf::from(args.first().ok_or_else(|| {
        bad("usage: world_samples OUT.png [--captions N] [--images N] [--guidance 2,6]".into())
    })?);
    let (mut captions, mut images, mut seed) = (6usize, 4usize, 5u64);
    let mut guidance = vec![2.0f64, 6.0];
    let mut model = None;
    let mut i = 1;
    while i < args.len() {
        let v = args
            .get(i + 1)
            .ok_or_else(|| bad(format!("{} wants a value", args[i])))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("{} wants a number, not '{v}'", args[i])))
        };
        match args[i].as_str() {
            "--captions" => captions = num(v)? as usize,
            "--images" => images = num(v)? as usize,
            "--seed" => seed = num(v)?,
            "--model" => model = Some(PathBuf::from(v)),
            "--guidance" => {
                guidance = v
                    .split(',')
                    .map(|s| s.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad(format!("--guidance '{v}': want e.g. 2,6")))?
            }
            other => return Err(bad(format!("unknown option {other}"))),
        }
        i += 2;
    }
    let model = match model {
        Some(m) => m,
        None => stablerep::world::builtin_model()?,
    };
    let m = SdModel::load(&model)?;
    let size = m.native_size();
    let gpu = Gpu::new(&GpuOptions::default())?;
    let world = World::Simple.descriptions(captions, seed);
    let gap = 4;
    let cols = 1 + guidance.len() * images;
    let width = cols * size + gap * (1 + guidance.len());
    let height = captions * (size + gap);
    let mut sheet = image::RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255; 3]));
    let mut paste = |img: &[f32], x0: usize, y0: usize| {
        for y in 0..size {
            for x in 0..size {
                let px = |c: usize| {
                    (img[c * size * size + y * size + x].clamp(0.0, 1.0) * 255.0).round() as u8
                };
                sheet.put_pixel(
                    (x0 + x) as u32,
                    (y0 + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    };
    for (c, d) in world.iter().enumerate() {
        let text = d.caption();
        println!("{c}: {text}");
        let y0 = c * (size + gap);
        paste(&render_caption(d, c, 0, size, seed), 0, y0);
        for (g, &w) in guidance.iter().enumerate() {
            let o = GenerateOptions {
                prompt: text.clone(),
                negative: String::new(),
                images,
                guidance: w,
                steps: 20,
                sampler: Kind::DpmPP2M { karras: true },
                seed,
                caption: c as u64,
                size,
                half_weights: None,
                half_activations: None,
                save_size: None,
                init_noise: None,
            };
            let got = generate(&gpu, &m, &o, |_| Ok(()))?;
            for (k, img) in got.images.iter().enumerate() {
                let x0 = size + gap * (g + 1) + (g * images + k) * size;
                paste(img, x0, y0);
            }
        }
    }
    sheet
        .save(&out)
        .map_err(|e| bad(format!("{}: cannot write PNG: {e}", out.display())))?;
    println!(
        "wrote {} (real render, then guidance {guidance:?})",
        out.display()
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
