//! Stable Diffusion: model loading (diffusers folders and single files), the text encoder,
//! UNet and VAE graphs, training of those components ([`training`]), and sampling with the
//! noise schedules and samplers of diffusers (DDIM, PNDM/PLMS, Euler, Euler ancestral, DPM-Solver++(2M) with and without Karras
//! sigmas), configured from a `scheduler_config.json`. Each sampler step is expressed as a short
//! program of linear combinations over the latent, the model output, the step's noise and a few
//! history buffers ([`sampler::Assign`]), so that the same program can run on the host (the
//! reference, [`sampler::HostState`]) or inside a GPU step plan without readback.

pub mod blocks;
pub mod gpu_sampler;
pub mod model;
pub mod pipeline;
pub mod sampler;
pub mod schedule;
pub mod single_file;
pub mod split;
pub mod text_encoder;
pub mod training;
pub mod unet;
pub mod vae;

/// Checks that each `(name, value, max)` of a config file lies in `1..=max`: sizes of zero, and
/// sizes far beyond any real model (which would exhaust memory or never finish), are errors
/// that name the file and the key.
pub(crate) fn check_sizes(origin: &str, sizes: &[(&str, usize, usize)]) -> crate::Result<()> {
    for &(name, v, max) in sizes {
        if v == 0 || v > max {
            return Err(crate::Error::Config(format!(
                "{origin}: {name} is {v}; it must be 1 to {max}"
            )));
        }
    }
    Ok(())
}
