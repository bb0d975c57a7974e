//! Persistent GPU tensors (parameters, optimizer state, running statistics) by name. They
//! outlive plans: a training step plan and an evaluation plan can share one store.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::DType;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// A GPU tensor: buffer, shape and element type. Its buffer is not pooled: compiled plans may
/// still hold it after the tensor is dropped, and wgpu frees it when the last user goes.
pub struct Tensor {
    gpu: Arc<Gpu>,
    buffer: wgpu::Buffer,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
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
        if data.len() != t.numel() {
            return Err(Error::shape(
                "tensor write",
                format!("{} values for shape {:?}", data.len(), shape),
            ));
        }
        let words: Vec<u32> = data
            .chunks(2)
            .map(|p| {
                let lo = crate::util::f16::f32_to_f16(p[0]) as u32;
                let hi = p
                    .get(1)
                    .map_or(0, |&v| crate::util::f16::f32_to_f16(v) as u32);
                lo | (hi << 16)
            })
            .collect();
        gpu.write(t.buffer(), 0, &words);
        Ok(t)
    }

    /// An uninitialized tensor.
    pub fn empty(gpu: &Arc<Gpu>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = match dtype {
            DType::F16 => n.max(1).div_ceil(2) * 4,
            _ => n.max(1) * 4,
        } as u64;
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
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The underlying buffer.
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
        self.gpu.write(self.buffer(), 0, data);
        Ok(())
    }

    /// Reads the contents as f32.
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        if self.dtype == DType::F16 {
            let words: Vec<u32> =
                self.gpu
                    .read(self.buffer(), 0, (self.numel().div_ceil(2) * 4) as u64)?;
            return Ok(words
                .iter()
                .flat_map(|w| [*w as u16, (*w >> 16) as u16])
                .take(self.numel())
                .map(crate::util::f16::f16_to_f32)
                .collect());
        }
        self.gpu.read(self.buffer(), 0, (self.numel() * 4) as u64)
    }
}

/// Named persistent tensors.
#[derive(Default)]
pub struct ParamStore {
    tensors: BTreeMap<String, Tensor>,
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
        let t = Tensor::from_f32(gpu, shape, data)?;
        self.insert(name, t);
        Ok(())
    }

    /// Sets `name` to `data` stored as f16 (for [`crate::graph::Graph::param_f16`] weights).
    pub fn set_f16(
        &mut self,
        gpu: &Arc<Gpu>,
        name: &str,
        shape: &[usize],
        data: &[f32],
    ) -> Result<()> {
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
