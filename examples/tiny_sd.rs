//! Writes a tiny, untrained Stable Diffusion 1.x model folder (SD 1.5's topology at toy widths,
//! from the test fixtures) so the app and the other examples can be tried without downloading
//! a checkpoint. Its images are noise: it only shows that everything runs.
//!
//!     cargo run --release --example tiny_sd -- target/tiny-sd
//!     cargo run --release -- app --model target/tiny-sd

#[path = "../tests/common/tiny_sd.rs"]
mod tiny_sd;

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: tiny_sd OUT_DIR");
        return ExitCode::FAILURE;
    };
    match tiny_sd::write(std::path::Path::new(&out)) {
        Ok(()) => {
            println!("wrote {out} (text_encoder/, unet/, vae/)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
