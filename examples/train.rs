//! StableRep training from a pool, headless: a small ViT with the multi-positive contrastive
//! loss, GPU augmentation, checkpoints every 50 steps and exact resume (run it again to
//! continue). The library call behind `stablerep train --pool` and the app's Train panel.
//!
//!     cargo run --release --example train -- POOL OUT [STEPS]
//!
//! For example on the pool of `examples/build_pool.rs`:
//!
//!     cargo run --release --example train -- target/pool target/run 100

use std::path::PathBuf;
use std::process::ExitCode;

use stablerep::data::pool::Pool;
use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::models::config::ModelConfig;
use stablerep::models::stablerep::HeadConfig;
use stablerep::models::vit::{Stem, VitConfig};
use stablerep::nn::schedule::Schedule;
use stablerep::train::pool_run::{run as train, PoolRun};

fn run() -> stablerep::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (Some(pool), Some(out)) = (a.first(), a.get(1)) else {
        return Err(stablerep::Error::Config(
            "usage: train POOL OUT [STEPS]".into(),
        ));
    };
    let steps: u64 = match a.get(2) {
        Some(s) => s
            .parse()
            .map_err(|_| stablerep::Error::Config(format!("STEPS '{s}' is not a number")))?,
        None => 100,
    };
    let pool = PathBuf::from(pool);
    let p = Pool::open(&pool)?;
    let run = PoolRun {
        pool,
        model: ModelConfig {
            vit: VitConfig {
                img_size: 32,
                patch: 8,
                width: 96,
                depth: 4,
                heads: 3,
                mlp: 384,
                stem: Stem::Patch,
            },
            head: HeadConfig {
                hidden: 256,
                out: 64,
            },
            plus: None,
        },
        init: None,
        fresh_init: stablerep::models::stablerep::Init::Official,
        captions: p.captions.len().min(8),
        images_per_caption: p.images_per_caption().min(4),
        steps,
        lr: 1e-3,
        schedule: Schedule::Cosine {
            warmup: steps / 10,
            total: steps,
        },
        weight_decay: 0.1,
        temperature: 0.1,
        augment: true,
        augment_config: None,
        simclr: false,
        seed: 0,
        checkpoint_every: 50,
        log_every: 10,
        out: PathBuf::from(out),
        resume: true,
        labelled_folder: false,
        source_size: None,
        head_dim: 64,
        chunk: None,
    };
    let gpu = Gpu::new(&GpuOptions::default())?;
    train(
        &gpu,
        &run,
        |step, loss, lr| println!("step {step}/{steps}  loss {loss:.4}  lr {lr:.2e}"),
        &|| false,
    )?;
    println!("wrote {}/checkpoint-last.safetensors", run.out.display());
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
