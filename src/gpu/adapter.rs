//! Adapter discovery and choice: discrete > integrated > other > virtual > CPU, native backends
//! before GL, overridable by a name filter (`--adapter` or `STABLEREP_ADAPTER`) and `WGPU_BACKEND`.

use crate::error::{Error, Result};

/// Environment variable holding a substring of the adapter to use (name, backend or driver).
pub const ADAPTER_ENV: &str = "STABLEREP_ADAPTER";

/// A short, printable description of one adapter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    /// Adapter name as the driver reports it.
    pub name: String,
    /// Backend (Vulkan, Metal, Dx12, Gl).
    pub backend: String,
    /// Device type (DiscreteGpu, IntegratedGpu, Cpu, ...).
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Preference score used for the automatic choice (higher wins).
    pub score: u32,
}

/// Preference score: device type first, then native backends over GL.
pub fn score(info: &wgpu::AdapterInfo) -> u32 {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 50,
        wgpu::DeviceType::IntegratedGpu => 40,
        wgpu::DeviceType::Other => 30,
        wgpu::DeviceType::VirtualGpu => 20,
        wgpu::DeviceType::Cpu => 10,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 0,
        _ => 1,
    };
    ty + backend
}

/// Summarises an adapter for printing.
pub fn summarize(info: &wgpu::AdapterInfo) -> AdapterSummary {
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        score: score(info),
    }
}

/// True when `filter` (case-insensitive substring) matches the adapter's name, backend or driver.
pub fn matches(info: &wgpu::AdapterInfo, filter: &str) -> bool {
    let f = filter.to_lowercase();
    let hay = format!(
        "{} {:?} {} {}",
        info.name, info.backend, info.driver, info.driver_info
    )
    .to_lowercase();
    hay.contains(&f)
}

/// An instance over `backends`, honouring `WGPU_BACKEND` (e.g. `vulkan`, `metal`, `dx12`, `gl`).
pub fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var("WGPU_BACKEND").is_err() {
        desc.backends = backends;
    }
    wgpu::Instance::new(desc)
}

/// All adapters, best first. Native backends (Vulkan, Metal, DX12) are probed first; GL only
/// when they offer nothing (probing GL needs a display and is noisy on headless machines).
pub fn enumerate() -> Vec<wgpu::Adapter> {
    let mut adapters = list(&instance(wgpu::Backends::PRIMARY));
    if adapters.is_empty() {
        adapters = list(&instance(wgpu::Backends::all()));
    }
    adapters
}

fn list(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters.sort_by_key(|a| std::cmp::Reverse(score(&a.get_info())));
    adapters
}

/// Chooses an adapter: the best-scoring one matching `filter` (or `STABLEREP_ADAPTER`).
pub fn choose(filter: Option<&str>) -> Result<wgpu::Adapter> {
    let env_filter = std::env::var(ADAPTER_ENV).ok().filter(|s| !s.is_empty());
    let filter = filter.map(str::to_string).or(env_filter);
    let mut adapters = enumerate();
    if let Some(f) = &filter {
        if !adapters.iter().any(|a| matches(&a.get_info(), f))
            && std::env::var("WGPU_BACKEND").is_err()
        {
            // The filter may name a GL adapter, which the first probe skipped.
            adapters = list(&instance(wgpu::Backends::all()));
        }
    }
    let names: Vec<String> = adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("{} ({:?})", i.name, i.backend)
        })
        .collect();
    let chosen = adapters
        .into_iter()
        .find(|a| filter.as_deref().is_none_or(|f| matches(&a.get_info(), f)));
    chosen.ok_or_else(|| {
        let detail = match (&filter, names.is_empty()) {
            (Some(f), false) => format!(
                " matching '{f}' (available: {}; change --adapter or {ADAPTER_ENV})",
                names.join(", ")
            ),
            (Some(f), true) => format!(" (and none matching '{f}')"),
            (None, _) => String::new(),
        };
        let backend = std::env::var("WGPU_BACKEND")
            .map(|b| format!(" WGPU_BACKEND is set to '{b}'; unset it to try every backend."))
            .unwrap_or_default();
        Error::NoAdapter {
            detail,
            hint: format!(
                "Install a GPU driver with Vulkan, Metal or DX12 support. On Linux without a GPU, \
                 Mesa's software Vulkan driver works: `sudo apt-get install mesa-vulkan-drivers \
                 libvulkan1` (Debian/Ubuntu) or `sudo dnf install mesa-vulkan-drivers` (Fedora).{backend}"
            ),
        }
    })
}
