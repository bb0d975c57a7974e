//! Sampler steps on the GPU: every step program of a run is lowered once to `lincomb`
//! dispatches over device buffers, with all coefficients of the run in one table, so a step is
//! one prepared submit (or part of a larger one) with no readback between steps.
//!
//! Slots are renamed instead of updated in place: each assignment writes a free buffer, which
//! then becomes the slot's buffer. The mapping is fixed per step index, so the whole run is
//! planned up front ([`GpuSampler::x_buffer`] says where the latent is before each step).

use std::collections::HashMap;
use std::sync::Arc;

use super::sampler::{Sampler, Slot};
use crate::error::{Error, Result};
use crate::exec::Prepared;
use crate::gpu::Gpu;
use crate::kernels::{elementwise, View};

/// Buffer ids in the executor's table.
const COEF: usize = 0;
const EPS: usize = 1;
const NOISE: usize = 2;
const FIRST_STATE: usize = 3;

/// A planned sampling run of one sampler over latents of a fixed size.
pub struct GpuSampler {
    gpu: Arc<Gpu>,
    sampler: Sampler,
    len: usize,
    buffers: Vec<wgpu::Buffer>,
    steps: Vec<Prepared>,
    /// Buffer holding X before evaluation i (and, at index evaluations, after the last).
    x_at: Vec<usize>,
}

impl GpuSampler {
    /// Plans every step of `sampler` for latents of `len` values.
    pub fn new(gpu: &Arc<Gpu>, sampler: Sampler, len: usize) -> Result<GpuSampler> {
        if len == 0 {
            return Err(Error::Config("the latent has no values".into()));
        }
        let evals = sampler.evaluations();
        let programs: Vec<_> = (0..evals).map(|i| sampler.program(i)).collect();
        let mut coefs: Vec<f32> = Vec::new();
        let mut slot_buf: HashMap<Slot, usize> = HashMap::new();
        slot_buf.insert(Slot::X, FIRST_STATE);
        for k in 0..sampler.history_slots() {
            slot_buf.insert(Slot::Hist(k), FIRST_STATE + 1 + k);
        }
        let mut n_state = 1 + sampler.history_slots();
        let mut x_at = Vec::with_capacity(evals + 1);
        let mut per_step = Vec::with_capacity(evals);
        for prog in &programs {
            x_at.push(slot_buf[&Slot::X]);
            let mut dispatches = Vec::new();
            for a in prog {
                let buf_of = |s: &Slot| match s {
                    Slot::Eps => Ok(EPS),
                    Slot::Noise => Ok(NOISE),
                    other => slot_buf.get(other).copied().ok_or_else(|| {
                        Error::Graph(format!("sampler program reads {other:?} before writing it"))
                    }),
                };
                let xs = a
                    .terms
                    .iter()
                    .map(|(_, s)| buf_of(s).map(|b| View::new(b, len as u64)))
                    .collect::<Result<Vec<_>>>()?;
                // A buffer no slot holds now.
                let used: Vec<usize> = slot_buf.values().copied().collect();
                let dst = (FIRST_STATE..FIRST_STATE + n_state)
                    .find(|b| !used.contains(b))
                    .unwrap_or_else(|| {
                        n_state += 1;
                        FIRST_STATE + n_state - 1
                    });
                let coef = View {
                    buf: COEF,
                    offset: coefs.len() as u64,
                    len: a.terms.len() as u64,
                    half: false,
                };
                coefs.extend(a.terms.iter().map(|(c, _)| *c as f32));
                dispatches.extend(elementwise::lincomb(
                    coef,
                    &xs,
                    View::new(dst, len as u64),
                    &gpu.caps,
                )?);
                slot_buf.insert(a.dst, dst);
            }
            per_step.push(dispatches);
        }
        x_at.push(slot_buf[&Slot::X]);
        let bytes = (len * 4) as u64;
        let mut buffers = vec![
            gpu.alloc((coefs.len().max(1) * 4) as u64, "sampler coefficients")?,
            gpu.alloc(bytes, "sampler model output")?,
            gpu.alloc(bytes, "sampler noise")?,
        ];
        for _ in 0..n_state {
            let b = gpu.alloc(bytes, "sampler state")?;
            gpu.write(&b, 0, &vec![0.0f32; len]);
            buffers.push(b);
        }
        gpu.write(&buffers[COEF], 0, &coefs);
        gpu.write(&buffers[NOISE], 0, &vec![0.0f32; len]);
        let refs: Vec<&wgpu::Buffer> = buffers.iter().collect();
        let steps = per_step
            .iter()
            .map(|d| Prepared::new(gpu, d, &refs))
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuSampler {
            gpu: gpu.clone(),
            sampler,
            len,
            buffers,
            steps,
            x_at,
        })
    }

    /// The sampler.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// Starts a run from standard-normal `noise` (scaled by the initial sigma). History
    /// buffers are cleared, so one planned sampler serves any number of runs.
    pub fn start(&self, noise: &[f32]) -> Result<()> {
        self.check_len(noise.len(), "initial noise")?;
        let zeros = vec![0.0f32; self.len];
        for b in &self.buffers[FIRST_STATE..] {
            self.gpu.write(b, 0, &zeros);
        }
        let s = self.sampler.init_noise_sigma();
        let x: Vec<f32> = noise.iter().map(|&v| (v as f64 * s) as f32).collect();
        self.gpu.write(&self.buffers[self.x_at[0]], 0, &x);
        Ok(())
    }

    fn check_len(&self, n: usize, what: &str) -> Result<()> {
        if n != self.len {
            return Err(Error::shape(
                "sampler",
                format!("{what} has {n} values, the latent {}", self.len),
            ));
        }
        Ok(())
    }

    /// The buffer holding the latent before evaluation `i` (`i == evaluations()`: the result).
    pub fn x_buffer(&self, i: usize) -> &wgpu::Buffer {
        &self.buffers[self.x_at[i]]
    }

    /// Where the model output of the current evaluation goes.
    pub fn eps_buffer(&self) -> &wgpu::Buffer {
        &self.buffers[EPS]
    }

    /// Where the current step's noise goes (ancestral samplers, DDIM with eta > 0).
    pub fn noise_buffer(&self) -> &wgpu::Buffer {
        &self.buffers[NOISE]
    }

    /// Records step `i`'s dispatches into a compute pass (after the model's).
    pub fn record(&self, i: usize, pass: &mut wgpu::ComputePass<'_>) {
        self.steps[i].record(pass);
    }

    /// Submits step `i` alone.
    pub fn submit(&self, i: usize) -> Result<()> {
        self.steps[i].submit(&self.gpu);
        self.gpu.take_error()
    }

    /// Reads the latent before evaluation `i` (waits for the GPU).
    pub fn read_x(&self, i: usize) -> Result<Vec<f32>> {
        self.gpu.read(self.x_buffer(i), 0, (self.len * 4) as u64)
    }
}

impl Drop for GpuSampler {
    fn drop(&mut self) {
        for b in self.buffers.drain(..) {
            self.gpu.pool.give(b);
        }
    }
}
