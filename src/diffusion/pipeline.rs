//! Guided sampling in one submit per step and no readback until the end: the UNet plan
//! takes the sampler's latent by a GPU copy, scales it by a per-step input (`scale_model_input`),
//! runs the batch [uncond, cond] and applies classifier-free guidance
//! `eps_u + w (eps_c - eps_u)` in the graph; its output is copied into the sampler's model
//! output buffer and the sampler step ([`GpuSampler`]) is recorded after it. The host only
//! writes the step's scale, time features and (for ancestral samplers) noise.

use std::sync::Arc;

use super::blocks::timestep_features;
use super::gpu_sampler::GpuSampler;
use super::unet::{unet_on, UNetConfig, UNetInputs};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, NodeId, ParamStore, Plan, PlanOptions};

/// The guided UNet graph of a [`Denoiser`] (also used to estimate its memory).
pub struct DenoiserGraph {
    /// The graph.
    pub graph: Graph,
    /// The guided noise prediction [B, C, h, w].
    pub out: NodeId,
    /// The sampler's latents [B, C, h, w] (B images of one prompt, denoised together).
    pub latent_in: NodeId,
    /// The per-step input scale [1].
    pub scale: NodeId,
    /// The UNet's time and text inputs.
    pub inputs: UNetInputs,
}

/// Builds the UNet for `batch` latents of `channels x h x w` and `tokens` text states on the
/// scaled latents, batch [uncond x B, cond x B] with guidance `w` in the graph when
/// `guidance` > 1; matmul weights in f16 when `half_weights`.
pub fn denoiser_graph(
    config: &UNetConfig,
    batch: usize,
    h: usize,
    w: usize,
    tokens: usize,
    guidance: f64,
    half_weights: bool,
) -> Result<DenoiserGraph> {
    if batch == 0 {
        return Err(Error::Config(
            "the denoiser needs a batch of at least 1".into(),
        ));
    }
    let guided = guidance > 1.0;
    let c = config.in_channels;
    let mut g = Graph::new();
    g.half_weights = half_weights;
    let latent_in = g.input("latent", &[batch, c, h, w]);
    let scale = g.input("scale", &[1]);
    let scaled = g.mul(latent_in, scale)?;
    // The UNet runs on [scaled] or [scaled, scaled] (unconditional, conditional).
    let sample = if guided {
        g.concat(&[scaled, scaled], 0)?
    } else {
        scaled
    };
    let (eps, inputs) = unet_on(&mut g, config, "", sample, tokens)?;
    debug_assert_eq!(g.shape(eps)[0], if guided { 2 * batch } else { batch });
    let out = if guided {
        let u = g.slice(eps, 0, 0, batch)?;
        let cnd = g.slice(eps, 0, batch, batch)?;
        let d = g.sub(cnd, u)?;
        let d = g.affine(d, guidance as f32, 0.0)?;
        g.add(u, d)?
    } else {
        eps
    };
    Ok(DenoiserGraph {
        graph: g,
        out,
        latent_in,
        scale,
        inputs,
    })
}

/// A compiled UNet for one latent size, with or without classifier-free guidance.
pub struct Denoiser {
    plan: Plan,
    inputs: UNetInputs,
    latent_in: NodeId,
    scale: NodeId,
    eps: NodeId,
    config: UNetConfig,
    guided: bool,
    batch: usize,
    latent: usize,
}

impl Denoiser {
    /// Compiles the UNet for one latent of `channels x h x w` and `tokens` text states, batch 2
    /// with guidance scale `guidance` when it is above 1. Parameters come from `store` under
    /// diffusers' names.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Arc<Gpu>,
        config: &UNetConfig,
        store: &mut ParamStore,
        h: usize,
        w: usize,
        tokens: usize,
        guidance: f64,
    ) -> Result<Denoiser> {
        let d = denoiser_graph(config, 1, h, w, tokens, guidance, false)?;
        Self::compile(gpu, d, config, store, guidance)
    }

    /// Compiles a graph from [`denoiser_graph`] (built with the same config and guidance).
    pub fn compile(
        gpu: &Arc<Gpu>,
        d: DenoiserGraph,
        config: &UNetConfig,
        store: &mut ParamStore,
        guidance: f64,
    ) -> Result<Denoiser> {
        Self::compile_with(gpu, d, config, store, guidance, PlanOptions::default())
    }

    /// [`Denoiser::compile`] with plan options (f16 activations).
    pub fn compile_with(
        gpu: &Arc<Gpu>,
        d: DenoiserGraph,
        config: &UNetConfig,
        store: &mut ParamStore,
        guidance: f64,
        opts: PlanOptions,
    ) -> Result<Denoiser> {
        let plan = Plan::compile(gpu, &d.graph, &[d.out], store, opts)?;
        let guided = guidance > 1.0;
        let latent = d.graph.shape(d.latent_in).iter().product();
        let batch = d.graph.shape(d.latent_in)[0];
        let (latent_in, scale, inputs, out) = (d.latent_in, d.scale, d.inputs, d.out);
        Ok(Denoiser {
            plan,
            inputs,
            latent_in,
            scale,
            eps: out,
            config: config.clone(),
            guided,
            batch,
            latent,
        })
    }

    /// Sets the text states: `cond` [tokens, dim], and `uncond` the same size when guided
    /// (the same prompt for every latent of the batch).
    pub fn set_context(&self, uncond: Option<&[f32]>, cond: &[f32]) -> Result<()> {
        let b = self.batch;
        let ctx: Vec<f32> = match (self.guided, uncond) {
            (true, Some(u)) => {
                let mut v = Vec::with_capacity(2 * b * cond.len());
                (0..b).for_each(|_| v.extend_from_slice(u));
                (0..b).for_each(|_| v.extend_from_slice(cond));
                v
            }
            (false, None) => cond.repeat(b),
            _ => {
                return Err(Error::Config(
                    "unconditional text states are needed exactly when guiding".into(),
                ))
            }
        };
        self.plan.write(self.inputs.context, &ctx)
    }

    /// Writes the per-step inputs: the latent scale and the time features of `t`.
    fn set_step(&self, scale: f64, t: f64) -> Result<()> {
        let c0 = self.config.block_out_channels[0];
        let f = timestep_features(t, c0, self.config.flip_sin_to_cos, self.config.freq_shift);
        let reps = if self.guided { 2 } else { 1 } * self.batch;
        let time: Vec<f32> = (0..reps).flat_map(|_| f.iter().copied()).collect();
        self.plan.write(self.scale, &[scale as f32])?;
        self.plan.write(self.inputs.time, &time)
    }
}

/// Runs the planned sampler `run` from standard-normal `noise` with `denoiser`;
/// `step_noise(i)` supplies fresh noise for samplers that need it; `done(i)` is called once
/// evaluation i has finished on the GPU, and an error it returns (such as
/// [`Error::Cancelled`]) stops the run. One submit per step, with the next step queued while
/// one runs (no readback between steps); returns the final latent.
pub fn sample(
    gpu: &Arc<Gpu>,
    denoiser: &Denoiser,
    run: &GpuSampler,
    noise: &[f32],
    mut step_noise: impl FnMut(usize) -> Vec<f32>,
    mut done: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f32>> {
    let sampler = run.sampler();
    if noise.len() != denoiser.latent {
        return Err(Error::shape(
            "sampler",
            format!(
                "noise of {} values, the UNet takes {}",
                noise.len(),
                denoiser.latent
            ),
        ));
    }
    run.start(noise)?;
    let bytes = (noise.len() * 4) as u64;
    let (lat_buf, lat_at) = denoiser.plan.storage(denoiser.latent_in)?;
    let (eps_buf, eps_at) = denoiser.plan.storage(denoiser.eps)?;
    let mut in_flight = None;
    for i in 0..sampler.evaluations() {
        denoiser.set_step(sampler.input_scale(i), sampler.timesteps()[i])?;
        if sampler.needs_noise(i) {
            gpu.write(run.noise_buffer(), 0, &step_noise(i));
        }
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(run.x_buffer(i), 0, lat_buf, lat_at, bytes);
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            denoiser.plan.record(&mut pass);
        }
        enc.copy_buffer_to_buffer(eps_buf, eps_at, run.eps_buffer(), 0, bytes);
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            run.record(i, &mut pass);
        }
        let index = gpu.queue.submit([enc.finish()]);
        gpu.take_error()?;
        // Wait for the previous step (this one is queued behind it), then report it.
        if let Some((prev, at)) = in_flight.replace((i, index)) {
            wait_for(gpu, at)?;
            done(prev)?;
        }
    }
    let x = run.read_x(sampler.evaluations())?;
    if let Some((last, _)) = in_flight {
        done(last)?;
    }
    Ok(x)
}

/// Blocks until submission `at` has finished.
fn wait_for(gpu: &Gpu, at: wgpu::SubmissionIndex) -> Result<()> {
    gpu.device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(at),
            timeout: None,
        })
        .map_err(|e| Error::Gpu(format!("waiting for a sampler step failed: {e}")))?;
    gpu.take_error()
}
