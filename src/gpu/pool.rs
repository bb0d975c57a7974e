//! A pool of storage buffers, bucketed by size, so that repeated allocations of the same sizes
//! (tensors of a training step, sampler scratch) reuse GPU memory instead of creating buffers.

use std::collections::HashMap;
use std::sync::Mutex;

/// Usage of every pooled buffer: storage, copy source and destination.
pub const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Rounds a byte size up to its pool bucket: multiples of 256 bytes below 64 KiB, otherwise the
/// next multiple of 1/8 of the enclosing power of two (at most 12.5 % waste).
pub fn bucket(bytes: u64) -> u64 {
    let b = bytes.max(16);
    if b <= 65536 {
        return b.div_ceil(256) * 256;
    }
    let p = 1u64 << (63 - b.leading_zeros());
    let step = p / 8;
    b.div_ceil(step) * step
}

/// Free buffers by bucket size, plus counters.
#[derive(Default)]
pub struct BufferPool {
    free: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    stats: Mutex<PoolStats>,
}

/// Pool counters, for benchmarks and the UI.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PoolStats {
    /// Buffers created by the pool.
    pub created: u64,
    /// Allocations served from the free lists.
    pub reused: u64,
    /// Bytes in buffers currently handed out.
    pub live_bytes: u64,
    /// Bytes held in free lists.
    pub free_bytes: u64,
}

impl BufferPool {
    /// Takes a buffer of at least `bytes` bytes (its size is the bucket size).
    pub fn take(&self, device: &wgpu::Device, bytes: u64, label: &str) -> wgpu::Buffer {
        let size = bucket(bytes);
        let reused = self
            .free
            .lock()
            .expect("pool lock")
            .get_mut(&size)
            .and_then(Vec::pop);
        let mut stats = self.stats.lock().expect("pool lock");
        stats.live_bytes += size;
        match reused {
            Some(b) => {
                stats.reused += 1;
                stats.free_bytes -= size;
                b
            }
            None => {
                stats.created += 1;
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage: STORAGE_USAGE,
                    mapped_at_creation: false,
                })
            }
        }
    }

    /// Returns a buffer to the pool.
    pub fn give(&self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        let mut stats = self.stats.lock().expect("pool lock");
        stats.live_bytes = stats.live_bytes.saturating_sub(size);
        stats.free_bytes += size;
        self.free
            .lock()
            .expect("pool lock")
            .entry(size)
            .or_default()
            .push(buffer);
    }

    /// Drops every free buffer (memory goes back to the driver).
    pub fn trim(&self) {
        self.free.lock().expect("pool lock").clear();
        self.stats.lock().expect("pool lock").free_bytes = 0;
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        *self.stats.lock().expect("pool lock")
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_cover_the_request_with_bounded_waste() {
        for bytes in [
            1u64,
            255,
            256,
            257,
            65536,
            65537,
            1 << 20,
            (1 << 20) + 1,
            3_000_000,
        ] {
            let b = bucket(bytes);
            assert!(b >= bytes, "{bytes} -> {b}");
            assert!(b.is_multiple_of(16));
            if bytes > 65536 {
                assert!(b as f64 <= bytes as f64 * 1.125 + 1.0, "{bytes} -> {b}");
            }
        }
    }
}
