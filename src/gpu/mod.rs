//! The device layer: adapter choice, granted limits and features, a pipeline cache keyed by a
//! readable kernel key, a buffer pool, upload and readback. Knows nothing of graphs or models.

pub mod adapter;
pub mod pool;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
pub use adapter::{AdapterSummary, ADAPTER_ENV};
pub use pool::{BufferPool, PoolStats};

/// The kind of the last device opened in this process: 0 none yet, 1 a GPU, 2 a CPU adapter.
static LAST_ADAPTER: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// A choice of attention form made by [`with_fused_attention`] on this thread.
    static ATTENTION_CHOICE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether graph builders should run multi-head attention as the fused kernels
/// (`kernels::heads`) rather than as batched matmuls: yes, unless the last device this
/// process opened is a CPU adapter. On lavapipe the fused kernels (one invocation per query
/// or key row, every row's registers live at once) ran `bench vit-train` 1.7x slower than
/// the matmuls, docs/benchmarks.md. Before any device is opened the answer is yes, and
/// with several devices the last one opened decides: build graphs after opening the device.
/// `STABLEREP_HEAD_ATTENTION=1` or `=0` overrides that, and [`with_fused_attention`]
/// overrides both on its thread.
pub fn fused_attention_preferred() -> bool {
    if let Some(c) = ATTENTION_CHOICE.with(|c| c.get()) {
        return c;
    }
    match std::env::var("STABLEREP_HEAD_ATTENTION").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => LAST_ADAPTER.load(Ordering::Relaxed) != 2,
    }
}

/// Runs `f` (a graph builder) with the attention form fixed to fused or not on this thread,
/// whatever the device or environment prefer (tests of both forms, A/B measurements).
pub fn with_fused_attention<T>(fused: bool, f: impl FnOnce() -> T) -> T {
    /// Restores the previous choice when dropped (also when `f` panics).
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ATTENTION_CHOICE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ATTENTION_CHOICE.with(|c| c.replace(Some(fused))));
    f()
}

/// How to open a device. `Default` picks the best adapter with its own limits.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Substring of the adapter to use (name, backend or driver); `STABLEREP_ADAPTER` otherwise.
    pub adapter: Option<String>,
    /// Pretend the largest storage binding is this many bytes (tests of buffer splitting).
    pub max_binding_override: Option<u64>,
    /// Pretend at most this many workgroups fit in one grid dimension (tests of 2-D grids).
    pub max_workgroups_override: Option<u32>,
}

/// The limits kernels plan against (the granted limits, possibly lowered for tests).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Caps {
    /// Largest storage-buffer binding in bytes.
    pub max_binding: u64,
    /// Largest buffer in bytes.
    pub max_buffer: u64,
    /// Workgroups per grid dimension.
    pub max_workgroups: u32,
    /// Required alignment of storage binding offsets in bytes.
    pub storage_align: u64,
    /// Required alignment of uniform binding offsets in bytes.
    pub uniform_align: u64,
    /// The adapter is a CPU (software rasterizer such as lavapipe).
    pub is_cpu: bool,
    /// `shader-f16` was granted.
    pub f16: bool,
    /// Subgroup operations were granted.
    pub subgroups: bool,
    /// The subgroup size when subgroups are granted and the size is fixed.
    pub subgroup_size: Option<u32>,
}

/// A snapshot of an open device: [`Gpu::report`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceReport {
    /// The adapter.
    pub adapter: AdapterSummary,
    /// The limits that matter here, as (name, value) for display.
    pub limits: Vec<(String, String)>,
    /// Granted features.
    pub features: Vec<String>,
    /// Bytes the driver's allocator has handed out (`None` where the backend does not say).
    pub allocated_bytes: Option<u64>,
    /// Bytes the allocator has reserved from the driver.
    pub reserved_bytes: Option<u64>,
    /// The buffer pool's counters.
    pub pool: PoolStats,
}

/// An open device with its queue, caches and pool. Share one per process (tests: one per binary).
pub struct Gpu {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter the device came from.
    pub info: wgpu::AdapterInfo,
    /// Limits granted by the device.
    pub limits: wgpu::Limits,
    /// Features granted by the device.
    pub features: wgpu::Features,
    /// Limits the kernels plan against.
    pub caps: Caps,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Reusable storage buffers.
    pub pool: BufferPool,
    errors: Arc<Mutex<Vec<String>>>,
}

/// Features worth having when present; none is required.
fn wanted_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY
}

impl Gpu {
    /// Opens the best (or the requested) adapter with its own limits; falls back to WebGPU's
    /// defaults when the full limits are refused. Logs what was granted.
    pub fn new(opts: &GpuOptions) -> Result<Arc<Gpu>> {
        let adapter = adapter::choose(opts.adapter.as_deref())?;
        let info = adapter.get_info();
        if info.device_type == wgpu::DeviceType::Cpu {
            log::warn!(
                "using the software adapter '{}' ({:?}): correct but slow; a GPU driver gives far more speed",
                info.name,
                info.backend
            );
        }
        let features = adapter.features() & wanted_features();
        let attempts = [
            adapter.limits(),
            wgpu::Limits::default(),
            wgpu::Limits::downlevel_defaults(),
        ];
        let mut last_err = String::new();
        for limits in attempts {
            let desc = wgpu::DeviceDescriptor {
                label: Some("stablerep"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            };
            match pollster::block_on(adapter.request_device(&desc)) {
                Ok((device, queue)) => return Ok(Self::finish(device, queue, info, opts)),
                Err(e) => {
                    log::warn!(
                        "device request with {} MiB bindings failed: {e}",
                        limits.max_storage_buffer_binding_size >> 20
                    );
                    last_err = e.to_string();
                }
            }
        }
        Err(Error::DeviceRequest {
            adapter: info.name,
            reason: last_err,
        })
    }

    fn finish(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        opts: &GpuOptions,
    ) -> Arc<Gpu> {
        let limits = device.limits();
        let features = device.features();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("GPU error: {e}");
            sink.lock().expect("error sink").push(e.to_string());
        }));
        let mut caps = Caps {
            max_binding: limits.max_storage_buffer_binding_size,
            max_buffer: limits.max_buffer_size,
            max_workgroups: limits.max_compute_workgroups_per_dimension,
            storage_align: limits.min_storage_buffer_offset_alignment as u64,
            uniform_align: limits.min_uniform_buffer_offset_alignment as u64,
            is_cpu: info.device_type == wgpu::DeviceType::Cpu,
            f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_size: (features.contains(wgpu::Features::SUBGROUP)
                && info.subgroup_min_size == info.subgroup_max_size
                && info.subgroup_min_size > 0)
                .then_some(info.subgroup_min_size),
        };
        if let Some(b) = opts.max_binding_override {
            caps.max_binding = caps.max_binding.min(b);
        }
        if let Some(w) = opts.max_workgroups_override {
            caps.max_workgroups = caps.max_workgroups.min(w);
        }
        log::info!(
            "device '{}' ({:?}, {:?}): max binding {} MiB, max buffer {} MiB, {} workgroups/dim, f16 {}, subgroups {}",
            info.name,
            info.backend,
            info.device_type,
            caps.max_binding >> 20,
            caps.max_buffer >> 20,
            caps.max_workgroups,
            caps.f16,
            caps.subgroups
        );
        LAST_ADAPTER.store(if caps.is_cpu { 2 } else { 1 }, Ordering::Relaxed);
        Arc::new(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            caps,
            pipelines: Mutex::new(HashMap::new()),
            pool: BufferPool::default(),
            errors,
        })
    }

    /// The pipeline for a WGSL source, compiled on first use and cached under
    /// `"<label>#<hash of source>"`: the readable kernel key plus a digest, so two variants
    /// can never share a pipeline by accident. The entry point is `main`; the layout is
    /// derived from the shader.
    pub fn pipeline(&self, label: &str, source: &str) -> Result<Arc<wgpu::ComputePipeline>> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        source.hash(&mut h);
        let key = format!("{label}#{:016x}", h.finish());
        if let Some(p) = self.pipelines.lock().expect("pipeline cache").get(&key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[],
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!(
                "kernel '{label}' failed to compile: {e}"
            )));
        }
        let p = Arc::new(pipeline);
        self.pipelines
            .lock()
            .expect("pipeline cache")
            .insert(key, p.clone());
        Ok(p)
    }

    /// Keys of the compiled pipelines, sorted.
    pub fn pipeline_keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .pipelines
            .lock()
            .expect("pipeline cache")
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    }

    /// Checks that a buffer of `bytes` can exist on this device.
    pub fn check_buffer_size(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.caps.max_buffer {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit: self.caps.max_buffer,
                limit_name: "max_buffer_size",
            });
        }
        Ok(())
    }

    /// Takes a pooled storage buffer of at least `bytes` bytes.
    pub fn alloc(&self, bytes: u64, label: &str) -> Result<wgpu::Buffer> {
        self.check_buffer_size(label, bytes)?;
        Ok(self.pool.take(&self.device, bytes, label))
    }

    /// Uploads `data` into `buffer` at `offset`.
    pub fn write<T: bytemuck::Pod>(&self, buffer: &wgpu::Buffer, offset: u64, data: &[T]) {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if !bytes.is_empty() {
            self.queue.write_buffer(buffer, offset, bytes);
        }
    }

    /// Reads `bytes` bytes of `buffer` starting at `offset` (blocks until the GPU is done).
    pub fn read<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<T>> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        let staging = self.staging(bytes);
        enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, bytes.div_ceil(4) * 4);
        self.queue.submit([enc.finish()]);
        self.map_staging(&staging, bytes)
    }

    /// A mappable staging buffer for readback.
    pub fn staging(&self, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.div_ceil(4).max(1) * 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Maps a staging buffer that a submitted copy fills, and returns its first `bytes` bytes.
    pub fn map_staging<T: bytemuck::Pod>(
        &self,
        staging: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<Vec<T>> {
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::Gpu(format!("readback map failed: {e}")))?;
            bytemuck::pod_collect_to_vec(&view[..bytes as usize])
        };
        staging.unmap();
        Ok(out)
    }

    /// Blocks until all submitted work is done; reports any GPU error raised meanwhile.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        self.take_error()
    }

    /// Returns (and clears) the first uncaptured GPU error since the last call.
    pub fn take_error(&self) -> Result<()> {
        let mut errs = self.errors.lock().expect("error sink");
        if errs.is_empty() {
            return Ok(());
        }
        let msg = errs.join("; ");
        errs.clear();
        Err(Error::Gpu(msg))
    }

    /// A human-readable name: adapter name, backend and device type.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    /// What the device is, what it allows and how much memory it holds now (the app's Device
    /// panel).
    pub fn report(&self) -> DeviceReport {
        let l = &self.limits;
        let limits = vec![
            (
                "max storage binding",
                format!("{} MiB", self.caps.max_binding >> 20),
            ),
            ("max buffer", format!("{} MiB", self.caps.max_buffer >> 20)),
            (
                "workgroups / dimension",
                self.caps.max_workgroups.to_string(),
            ),
            (
                "invocations / workgroup",
                l.max_compute_invocations_per_workgroup.to_string(),
            ),
            (
                "workgroup memory",
                format!("{} KiB", l.max_compute_workgroup_storage_size >> 10),
            ),
            (
                "storage buffers / stage",
                l.max_storage_buffers_per_shader_stage.to_string(),
            ),
            (
                "storage offset align",
                format!("{} B", self.caps.storage_align),
            ),
            (
                "subgroup size",
                self.caps
                    .subgroup_size
                    .map_or("varies or none".into(), |s| s.to_string()),
            ),
        ];
        let allocator = self.device.generate_allocator_report();
        DeviceReport {
            adapter: adapter::summarize(&self.info),
            limits: limits
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            features: self
                .features
                .iter_names()
                .map(|(n, _)| n.to_string())
                .collect(),
            allocated_bytes: allocator.as_ref().map(|r| r.total_allocated_bytes),
            reserved_bytes: allocator.as_ref().map(|r| r.total_reserved_bytes),
            pool: self.pool.stats(),
        }
    }

    /// A grid of at least `groups` workgroups that respects the per-dimension limit:
    /// `[x, y, 1]` with `x * y >= groups`. Kernels rebuild the linear id as `wg.x + wg.y * nwg.x`.
    pub fn grid(&self, groups: u64) -> Result<[u32; 3]> {
        grid_2d(groups, self.caps.max_workgroups)
    }
}

/// Splits `groups` workgroups over a 2-D grid with at most `max` per dimension.
pub fn grid_2d(groups: u64, max: u32) -> Result<[u32; 3]> {
    let groups = groups.max(1);
    let max = max as u64;
    if groups <= max {
        return Ok([groups as u32, 1, 1]);
    }
    let y = groups.div_ceil(max);
    if y > max {
        return Err(Error::TooLarge {
            what: format!("a dispatch of {groups} workgroups"),
            bytes: groups,
            limit: max * max,
            limit_name: "max_compute_workgroups_per_dimension squared",
        });
    }
    let x = groups.div_ceil(y);
    Ok([x as u32, y as u32, 1])
}

#[cfg(test)]
mod tests {
    use super::grid_2d;

    #[test]
    fn grids_cover_and_respect_the_limit() {
        for (g, max) in [
            (1u64, 65535u32),
            (65535, 65535),
            (65536, 65535),
            (1_000_000, 65535),
            (49, 7),
            (45, 7),
        ] {
            let [x, y, _] = grid_2d(g, max).unwrap();
            assert!(x <= max && y <= max);
            assert!(x as u64 * y as u64 >= g);
        }
        assert!(grid_2d(50, 7).is_err());
    }
}
