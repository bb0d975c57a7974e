//! Guided sampling: the UNet plan (batch [uncond, cond] when guidance > 1), classifier-free
//! guidance `eps_u + w (eps_c - eps_u)`, and a [`GpuSampler`] run.
//!
//! Each step currently reads the latent back to scale it and reads the UNet output to guide
//! it on the host (64 KiB per 512^2 image per step); moving both into the step plan is the
//! next step for issue 4's "no readback between steps".

use std::sync::Arc;

use super::blocks::timestep_features;
use super::gpu_sampler::GpuSampler;
use super::sampler::Sampler;
use super::unet::{unet, UNetConfig, UNetInputs};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, NodeId, ParamStore, Plan, PlanOptions};

/// A compiled UNet for one latent size, with or without classifier-free guidance.
pub struct Denoiser {
    plan: Plan,
    inputs: UNetInputs,
    eps: NodeId,
    config: UNetConfig,
    guided: bool,
    latent: usize,
}

impl Denoiser {
    /// Compiles the UNet for one latent of `channels x h x w` and `tokens` text states, batch 2
    /// when `guided`. Parameters come from `store` under diffusers' names.
    pub fn new(
        gpu: &Arc<Gpu>,
        config: &UNetConfig,
        store: &mut ParamStore,
        h: usize,
        w: usize,
        tokens: usize,
        guided: bool,
    ) -> Result<Denoiser> {
        let batch = if guided { 2 } else { 1 };
        let mut g = Graph::new();
        let (eps, inputs) = unet(&mut g, config, "", batch, h, w, tokens)?;
        let plan = Plan::compile(gpu, &g, &[eps], store, PlanOptions::default())?;
        Ok(Denoiser {
            plan,
            inputs,
            eps,
            config: config.clone(),
            guided,
            latent: config.in_channels * h * w,
        })
    }

    /// Sets the text states: `cond` [tokens, dim], and `uncond` the same size when guided.
    pub fn set_context(&self, uncond: Option<&[f32]>, cond: &[f32]) -> Result<()> {
        let ctx: Vec<f32> = match (self.guided, uncond) {
            (true, Some(u)) => u.iter().chain(cond).copied().collect(),
            (false, None) => cond.to_vec(),
            _ => {
                return Err(Error::Config(
                    "unconditional text states are needed exactly when guiding".into(),
                ))
            }
        };
        self.plan.write(self.inputs.context, &ctx)
    }

    /// The guided noise prediction for the (already scaled) latent at timestep `t`.
    pub fn predict(&self, x: &[f32], t: f64, guidance: f64) -> Result<Vec<f32>> {
        if x.len() != self.latent {
            return Err(Error::shape(
                "denoiser",
                format!(
                    "latent of {} values, the UNet takes {}",
                    x.len(),
                    self.latent
                ),
            ));
        }
        let c0 = self.config.block_out_channels[0];
        let f = timestep_features(t, c0, self.config.flip_sin_to_cos, self.config.freq_shift);
        let reps = if self.guided { 2 } else { 1 };
        let sample: Vec<f32> = (0..reps).flat_map(|_| x.iter().copied()).collect();
        let time: Vec<f32> = (0..reps).flat_map(|_| f.iter().copied()).collect();
        self.plan.write(self.inputs.sample, &sample)?;
        self.plan.write(self.inputs.time, &time)?;
        let e = self.plan.run_fetch(&[self.eps])?.remove(0);
        if !self.guided {
            return Ok(e);
        }
        let (u, c) = e.split_at(self.latent);
        Ok(u.iter()
            .zip(c)
            .map(|(&u, &c)| (u as f64 + guidance * (c as f64 - u as f64)) as f32)
            .collect())
    }
}

/// Runs `sampler` from standard-normal `noise` with `denoiser`, guidance `w` (ignored when the
/// denoiser is unguided); `step_noise(i)` supplies fresh noise for samplers that need it.
/// Returns the final latent.
pub fn sample(
    gpu: &Arc<Gpu>,
    denoiser: &Denoiser,
    sampler: Sampler,
    noise: &[f32],
    guidance: f64,
    mut step_noise: impl FnMut(usize) -> Vec<f32>,
) -> Result<Vec<f32>> {
    let run = GpuSampler::new(gpu, sampler.clone(), noise.len())?;
    run.start(noise)?;
    for i in 0..sampler.evaluations() {
        let x = run.read_x(i)?;
        let s = sampler.input_scale(i);
        let scaled: Vec<f32> = x.iter().map(|&v| (v as f64 * s) as f32).collect();
        let eps = denoiser.predict(&scaled, sampler.timesteps()[i], guidance)?;
        gpu.write(run.eps_buffer(), 0, &eps);
        if sampler.needs_noise(i) {
            gpu.write(run.noise_buffer(), 0, &step_noise(i));
        }
        run.submit(i)?;
    }
    run.read_x(sampler.evaluations())
}
