//! Turns kernel [`Dispatch`]es into prebuilt GPU work: pipelines from the cache, one uniform
//! arena holding every dispatch's parameters at aligned offsets, and one bind group per
//! dispatch. Recording is then a tight loop of set-pipeline / set-bind-group / dispatch.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::Dispatch;

/// One ready-to-record dispatch.
pub struct Step {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    groups: [u32; 3],
    /// Pipeline key, for profiling and debugging.
    pub key: String,
}

/// A list of ready dispatches and the uniform arena they read.
pub struct Prepared {
    /// The steps in execution order.
    pub steps: Vec<Step>,
    _uniforms: Option<wgpu::Buffer>,
}

impl Prepared {
    /// Compiles (or fetches) pipelines, packs uniforms and builds bind groups. `buffers[id]`
    /// is the buffer that abstract id `id` in the dispatches refers to.
    pub fn new(gpu: &Gpu, dispatches: &[Dispatch], buffers: &[&wgpu::Buffer]) -> Result<Prepared> {
        let align = gpu.caps.uniform_align.max(16) as usize;
        let mut arena: Vec<u8> = Vec::new();
        let mut offsets = Vec::with_capacity(dispatches.len());
        for d in dispatches {
            let off = arena.len().div_ceil(align) * align;
            arena.resize(off, 0);
            arena.extend_from_slice(&d.uniform);
            offsets.push(off);
        }
        let uniforms = if arena.is_empty() {
            None
        } else {
            let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("uniform arena"),
                size: arena.len().div_ceil(16) as u64 * 16,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            gpu.queue.write_buffer(&buf, 0, &arena);
            Some(buf)
        };
        let mut steps = Vec::with_capacity(dispatches.len());
        for (d, off) in dispatches.iter().zip(offsets) {
            let pipeline = gpu.pipeline(&d.key, &d.source()?)?;
            let layout = pipeline.get_bind_group_layout(0);
            let ubuf = uniforms
                .as_ref()
                .expect("uniform arena exists when there are dispatches");
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: ubuf,
                    offset: off as u64,
                    size: wgpu::BufferSize::new(d.uniform.len() as u64),
                }),
            }];
            for (i, b) in d.bindings.iter().enumerate() {
                let buffer = buffers.get(b.buf).ok_or_else(|| {
                    Error::Graph(format!(
                        "dispatch '{}' refers to missing buffer {}",
                        d.key, b.buf
                    ))
                })?;
                if b.offset + b.size > buffer.size() {
                    return Err(Error::Graph(format!(
                        "dispatch '{}' binds bytes {}..{} of a {}-byte buffer",
                        d.key,
                        b.offset,
                        b.offset + b.size,
                        buffer.size()
                    )));
                }
                entries.push(wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset: b.offset,
                        size: wgpu::BufferSize::new(b.size.div_ceil(4) * 4),
                    }),
                });
            }
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&d.key),
                layout: &layout,
                entries: &entries,
            });
            steps.push(Step {
                pipeline,
                bind_group,
                groups: d.groups,
                key: d.key.clone(),
            });
        }
        gpu.take_error()?;
        Ok(Prepared {
            steps,
            _uniforms: uniforms,
        })
    }

    /// Records every step into one compute pass.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for s in &self.steps {
            pass.set_pipeline(&s.pipeline);
            pass.set_bind_group(0, &s.bind_group, &[]);
            pass.dispatch_workgroups(s.groups[0], s.groups[1], s.groups[2]);
        }
    }

    /// Runs every step in its own submit and waits for it, returning (kernel key, seconds)
    /// per step: a coarse profile (wall clock, includes one submit's overhead per step).
    pub fn profile(&self, gpu: &Gpu) -> crate::error::Result<Vec<(String, f64)>> {
        let mut out = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            let t0 = std::time::Instant::now();
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&s.pipeline);
                pass.set_bind_group(0, &s.bind_group, &[]);
                pass.dispatch_workgroups(s.groups[0], s.groups[1], s.groups[2]);
            }
            gpu.queue.submit([enc.finish()]);
            gpu.wait()?;
            out.push((s.key.clone(), t0.elapsed().as_secs_f64()));
        }
        Ok(out)
    }

    /// Records into a fresh encoder and submits once.
    pub fn submit(&self, gpu: &Gpu) -> wgpu::SubmissionIndex {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.record(&mut pass);
        }
        gpu.queue.submit([enc.finish()])
    }
}
