//! Frozen-feature evaluation of a checkpoint, headless: kNN accuracy and 5-way 1-shot accuracy
//! on labelled image folders (`<class>/<image>`). The library call behind `stablerep probe` and
//! the app's Evaluate panel.
//!
//!     cargo run --release --example probe -- CHECKPOINT TRAIN_DIR TEST_DIR [HEAD_DIM]
//!
//! HEAD_DIM is the projection head's output width of the checkpoint (64 for
//! `examples/train.rs`; it is read from the checkpoint's config when it has one).

use std::path::PathBuf;
use std::process::ExitCode;

use stablerep::eval::knn::FewShot;
use stablerep::eval::probe::{run as probe, Method, Request};
use stablerep::gpu::{Gpu, GpuOptions};

fn run() -> stablerep::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (Some(ck), Some(train), Some(test)) = (a.first(), a.get(1), a.get(2)) else {
        return Err(stablerep::Error::Config(
            "usage: probe CHECKPOINT TRAIN_DIR TEST_DIR [HEAD_DIM]".into(),
        ));
    };
    let head_dim = match a.get(3) {
        Some(s) => s
            .parse()
            .map_err(|_| stablerep::Error::Config(format!("HEAD_DIM '{s}' is not a number")))?,
        None => 64,
    };
    let gpu = Gpu::new(&GpuOptions::default())?;
    let request = |method| Request {
        checkpoint: PathBuf::from(ck),
        head_dim,
        train: Some(PathBuf::from(train)),
        test: PathBuf::from(test),
        method,
        features: None,
    };
    let knn = probe(
        &gpu,
        &request(Method::Knn {
            k: 20,
            temperature: 0.07,
        }),
    )?;
    println!("kNN (k = 20) top-1: {:.2} %", 100.0 * knn.accuracy);
    let few = probe(
        &gpu,
        &request(Method::FewShot(FewShot {
            ways: 5,
            shots: 1,
            queries: 5,
            episodes: 200,
            seed: 0,
        })),
    );
    match few {
        Ok(f) => println!("5-way 1-shot: {:.2} %", 100.0 * f.accuracy),
        Err(e) => println!("5-way 1-shot: not run ({e})"),
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
