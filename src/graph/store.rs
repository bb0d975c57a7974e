//! Persistent GPU tensors (parameters, optimizer state, running statistics) by name. They
//! outlive plans: a training step plan and an evaluation plan can share one store.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::DType;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// A GPU tensor: a byte range of a buffer, shape and element type. Its buffer is not pooled:
/// compiled plans may still hold it after the tensor is dropped, and wgpu frees it when the
/// last user goes. A [`ParamStore`] packs its tensors into shared arena buffers (so one
/// dispatch can update many of them, see `kernels::optim::adamw_multi`); a tensor made with
/// [`Tensor::empty`] has a buffer of its own.
pub struct Tensor {
    gpu: Arc<Gpu>,
    buffer: wgpu::Buffer,
    /// Byte offset of the first element in `buffer` (a multiple of 16).
    offset: u64,
    /// The arena this tensor lives in (`None`: the buffer is its own).
    arena: Option<u64>,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

/// Bytes a tensor of `n` elements takes (f16: two to a word, in whole words).
fn tensor_bytes(n: usize, dtype: DType) -> u64 {
    let bytes = match dtype {
        DType::F16 => n.max(1).div_ceil(2) * 4,
        _ => n.max(1) * 4,
    };
    bytes as u64
}

impl Tensor {
    /// Uploads f32 data as a new tensor.
    pub fn from_f32(gpu: &Arc<Gpu>, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let t = Tensor::empty(gpu, shape, DType::F32)?;
        t.write_f32(data)?;
        Ok(t)
    }

    /// Uploads f32 data rounded to f16 (round to nearest even; exact for values that came
    /// from an fp16 file), two values to a word.
    pub fn from_f16(gpu: &Arc<Gpu>, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let t = Tensor::empty(gpu, shape, DType::F16)?;
        let words = f16_words(data, t.numel())?;
        t.write_f16_words(&words)?;
        Ok(t)
    }

    fn write_f16_words(&self, words: &[u32]) -> Result<()> {
        self.gpu.write(self.buffer(), self.offset, words);
        Ok(())
    }

    /// An uninitialized tensor with a buffer of its own.
    pub fn empty(gpu: &Arc<Gpu>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = tensor_bytes(n, dtype);
        gpu.check_buffer_size("tensor", bytes)?;
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tensor"),
            size: bytes.div_ceil(16) * 16,
            usage: crate::gpu::pool::STORAGE_USAGE,
            mapped_at_creation: false,
        });
        Ok(Tensor {
            gpu: gpu.clone(),
            buffer,
            offset: 0,
            arena: None,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// The tensor's byte offset in [`Tensor::buffer`] (a multiple of 16; 0 unless it lives in
    /// a store's arena).
    pub fn byte_offset(&self) -> u64 {
        self.offset
    }

    /// The id of the store arena this tensor lives in (`None`: its buffer is its own). Tensors
    /// with the same arena share one buffer.
    pub fn arena(&self) -> Option<u64> {
        self.arena
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The underlying buffer (the tensor starts at [`Tensor::byte_offset`] in it).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Overwrites the contents with f32 data of the right length.
    pub fn write_f32(&self, data: &[f32]) -> Result<()> {
        if self.dtype == DType::F16 {
            return Err(Error::Graph(
                "an f16 tensor is written with Tensor::from_f16".into(),
            ));
        }
        if data.len() != self.numel() {
            return Err(Error::shape(
                "tensor write",
                format!("{} values for shape {:?}", data.len(), self.shape),
            ));
        }
        self.gpu.write(self.buffer(), self.offset, data);
        Ok(())
    }

    /// Reads the contents as f32.
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        if self.dtype == DType::F16 {
            let words: Vec<u32> = self.gpu.read(
                self.buffer(),
                self.offset,
                (self.numel().div_ceil(2) * 4) as u64,
            )?;
            return Ok(words
                .iter()
                .flat_map(|w| [*w as u16, (*w >> 16) as u16])
                .take(self.numel())
                .map(crate::util::f16::f16_to_f32)
                .collect());
        }
        self.gpu
            .read(self.buffer(), self.offset, (self.numel() * 4) as u64)
    }
}

/// `data` rounded to f16 (round to nearest even), two values to a word; `n` is the tensor's
/// element count, which `data` must match.
fn f16_words(data: &[f32], n: usize) -> Result<Vec<u32>> {
    if data.len() != n {
        return Err(Error::shape(
            "tensor write",
            format!("{} values for {n} elements", data.len()),
        ));
    }
    Ok(data
        .chunks(2)
        .map(|p| {
            let lo = crate::util::f16::f32_to_f16(p[0]) as u32;
            let hi = p
                .get(1)
                .map_or(0, |&v| crate::util::f16::f32_to_f16(v) as u32);
            lo | (hi << 16)
        })
        .collect())
}

/// Arena buffers start at this size and double up to [`ARENA_MAX`].
const ARENA_FIRST: u64 = 1 << 20;
/// The largest arena buffer (or the device's binding limit, if lower): tensors larger than
/// this get a buffer of their own.
const ARENA_MAX: u64 = 128 << 20;

/// One arena buffer: a bump allocator.
struct Arena {
    id: u64,
    buffer: wgpu::Buffer,
    size: u64,
    used: u64,
}

/// Arena ids, unique in the process (plans key shared buffers by them).
static NEXT_ARENA: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The arena class of a tensor name: optimizer state (`optimizer.`), gradient sums
/// (`scratch.`) and everything else (parameters, running statistics) never share a buffer.
/// An update dispatch writes some store tensors and reads others (AdamW writes a parameter and
/// its moments and may read a gradient sum kept in the store), and WebGPU forbids binding one
/// buffer both read-only and writable in one dispatch.
pub(crate) fn arena_class(name: &str) -> &'static str {
    if name.starts_with("optimizer.") {
        "optimizer"
    } else if name.starts_with(super::SCRATCH_PREFIX) {
        "scratch"
    } else {
        "params"
    }
}

/// A tensor name of `class` (for [`ParamStore::reserve`]).
pub(crate) fn class_name(class: &str) -> &'static str {
    match class {
        "optimizer" => "optimizer.",
        "scratch" => super::SCRATCH_PREFIX,
        _ => "",
    }
}

/// Named persistent tensors. New tensors are packed into arena buffers (16-byte aligned
/// ranges, first fit; space of a replaced tensor is not reused until the store is dropped),
/// one set of arenas per [`arena_class`].
#[derive(Default)]
pub struct ParamStore {
    tensors: BTreeMap<String, Tensor>,
    arenas: BTreeMap<String, Vec<Arena>>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts (or replaces) a tensor.
    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), t);
    }

    /// Uploads f32 values under `name`.
    pub fn set(&mut self, gpu: &Arc<Gpu>, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        if let Some(t) = self.tensors.get(name) {
            if t.shape == shape && t.dtype == DType::F32 {
                return t.write_f32(data);
            }
        }
        let t = self.alloc(gpu, name, shape, DType::F32)?;
        t.write_f32(data)?;
        self.insert(name, t);
        Ok(())
    }

    /// Uploads many f32 tensors, making room for the new ones first so that they share
    /// arena buffers (see [`ParamStore::reserve`]).
    pub fn set_all<'a>(
        &mut self,
        gpu: &Arc<Gpu>,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
    ) -> Result<()> {
        let list: Vec<_> = tensors.into_iter().collect();
        let mut need: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (name, shape, _) in &list {
            let n: usize = shape.iter().product();
            let fresh = self
                .get(name)
                .is_none_or(|t| t.shape != *shape || t.dtype != DType::F32);
            if fresh {
                *need.entry(arena_class(name)).or_default() +=
                    tensor_bytes(n, DType::F32).div_ceil(16) * 16;
            }
        }
        for (class, bytes) in need {
            self.reserve(gpu, class_name(class), bytes)?;
        }
        for (name, shape, data) in list {
            self.set(gpu, name, shape, data)?;
        }
        Ok(())
    }

    /// Sets `name` to a new f32 tensor of `shape` filled with `value` (optimizer state).
    pub fn set_fill(
        &mut self,
        gpu: &Arc<Gpu>,
        name: &str,
        shape: &[usize],
        value: f32,
    ) -> Result<()> {
        let n: usize = shape.iter().product();
        self.set(gpu, name, shape, &vec![value; n])
    }

    /// A new uninitialized tensor for `name` in one of the arenas of its prefix (or in a buffer
    /// of its own when it is larger than an arena may be).
    fn alloc(
        &mut self,
        gpu: &Arc<Gpu>,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = tensor_bytes(n, dtype).div_ceil(16) * 16;
        let max = ARENA_MAX.min(gpu.caps.max_binding / 16 * 16);
        if bytes > max / 2 {
            return Tensor::empty(gpu, shape, dtype);
        }
        let a = self.arena_with(gpu, name, bytes)?;
        let arenas = self.arenas.get_mut(arena_class(name)).expect("made above");
        let arena = &mut arenas[a];
        let offset = arena.used;
        arena.used += bytes;
        Ok(Tensor {
            gpu: gpu.clone(),
            buffer: arena.buffer.clone(),
            offset,
            arena: Some(arena.id),
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Makes room for `bytes` more bytes of tensors named like `name` in one arena, so that
    /// tensors created together (a model's parameters, their optimizer state) share a buffer
    /// and one dispatch can update them all. Has no effect beyond the arena size limit.
    /// The new arenas are sized to the request (in pieces of at most the arena limit), so a
    /// reservation that is used up wastes nothing.
    pub fn reserve(&mut self, gpu: &Arc<Gpu>, name: &str, bytes: u64) -> Result<()> {
        let max = ARENA_MAX.min(gpu.caps.max_binding / 16 * 16);
        let free: u64 = self
            .arenas
            .get(arena_class(name))
            .map_or(0, |v| v.iter().map(|a| a.size - a.used).sum());
        let mut left = (bytes.div_ceil(16) * 16).saturating_sub(free);
        while left > 0 {
            let size = left.min(max);
            self.new_arena(gpu, name, size)?;
            left -= size;
        }
        Ok(())
    }

    /// Adds an arena of `size` bytes to `name`'s class.
    fn new_arena(&mut self, gpu: &Arc<Gpu>, name: &str, size: u64) -> Result<usize> {
        gpu.check_buffer_size("parameter arena", size)?;
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("parameter arena"),
            size,
            usage: crate::gpu::pool::STORAGE_USAGE,
            mapped_at_creation: false,
        });
        let arenas = self
            .arenas
            .entry(arena_class(name).to_string())
            .or_default();
        arenas.push(Arena {
            id: NEXT_ARENA.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            buffer,
            size,
            used: 0,
        });
        Ok(arenas.len() - 1)
    }

    /// The index of an arena of `name`'s class with `need` bytes free, made (doubling the
    /// last one's size, at least `need`) if there is none.
    fn arena_with(&mut self, gpu: &Arc<Gpu>, name: &str, need: u64) -> Result<usize> {
        let max = ARENA_MAX.min(gpu.caps.max_binding / 16 * 16);
        let arenas = self
            .arenas
            .entry(arena_class(name).to_string())
            .or_default();
        if let Some(a) = arenas.iter().position(|a| a.size - a.used >= need) {
            return Ok(a);
        }
        let last = arenas.last().map_or(0, |a| a.size);
        self.new_arena(gpu, name, (last * 2).clamp(ARENA_FIRST, max).max(need))
    }

    /// Sets `name` to `data` stored as f16 (for [`crate::graph::Graph::param_f16`] weights),
    /// in a buffer of its own.
    pub fn set_f16(
        &mut self,
        gpu: &Arc<Gpu>,
        name: &str,
        shape: &[usize],
        data: &[f32],
    ) -> Result<()> {
        // A buffer of its own: f16 weights are only read (no optimizer updates them), and a
        // model's worth of them would leave up to an arena's size unused at the end.
        let t = Tensor::from_f16(gpu, shape, data)?;
        self.insert(name, t);
        Ok(())
    }

    /// The tensor under `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Reads a tensor back.
    pub fn read(&self, name: &str) -> Result<Vec<f32>> {
        self.get(name)
            .ok_or_else(|| Error::Graph(format!("no tensor named '{name}' in the store")))?
            .read_f32()
    }

    /// Names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Total bytes held.
    pub fn bytes(&self) -> u64 {
        self.tensors.values().map(|t| (t.numel() * 4) as u64).sum()
    }
}
