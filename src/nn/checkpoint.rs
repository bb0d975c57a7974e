//! safetensors files: reading tensors as f32 (from f32, f16 or bf16), writing f32 tensors with
//! metadata atomically (temporary file + rename), with errors that name the file and tensor.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::util::f16::{f16_to_f32, f32_to_f16};

/// A host tensor: shape and f32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

/// Metadata key holding the JSON configuration.
pub const CONFIG_KEY: &str = "config";
/// Prefix of the optimizer's state (`optimizer.<param>.exp_avg`, ...), kept apart from the
/// model's own names.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// The current name of an optimizer-state tensor saved under the old naming
/// (`<param>.adam_m`, `<param>.adam_v`, `<param>.sgd_momentum`), if `name` is one.
pub fn legacy_state_name(name: &str) -> Option<String> {
    [
        (".adam_m", "exp_avg"),
        (".adam_v", "exp_avg_sq"),
        (".sgd_momentum", "momentum_buffer"),
    ]
    .iter()
    .find_map(|(old, new)| {
        name.strip_suffix(old)
            .map(|p| format!("{OPTIMIZER_PREFIX}{p}.{new}"))
    })
}

/// Metadata key holding the optimizer step count.
pub const STEP_KEY: &str = "step";

/// The tensors and metadata of one safetensors file.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    /// Tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// The file's `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    /// Where it was read from (the path, for errors); empty for one built in memory.
    pub origin: String,
    /// The tensors the file stored as f16 (for them f16 storage on the GPU is lossless).
    pub f16_names: std::collections::BTreeSet<String>,
}

impl Checkpoint {
    /// Reads every tensor of a safetensors file.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses safetensors bytes; `origin` names the source in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Checkpoint> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Config(format!("{origin} is not a valid safetensors file: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Config(format!("{origin}: unreadable safetensors header: {e}")))?;
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut tensors = BTreeMap::new();
        let mut f16_names = std::collections::BTreeSet::new();
        for (name, view) in st.tensors() {
            let raw = view.data();
            if view.dtype() == safetensors::Dtype::F16 {
                f16_names.insert(name.to_string());
            }
            let data: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                safetensors::Dtype::F16 => raw
                    .chunks_exact(2)
                    .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
                safetensors::Dtype::BF16 => raw
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
                safetensors::Dtype::F64 => raw
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
                // Integer tensors (token ids, BatchNorm's num_batches_tracked) as f32, exact
                // below 2^24.
                safetensors::Dtype::I32 => raw
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                    .collect(),
                safetensors::Dtype::I64 => raw
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
                other => {
                    return Err(Error::Config(format!(
                    "{origin}: tensor '{name}' has dtype {other:?}; expected f32, f16, bf16, f64, i32 or i64"
                )))
                }
            };
            // Optimizer state saved under the old naming gets its current name.
            let name = legacy_state_name(&name).unwrap_or(name);
            tensors.insert(
                name,
                HostTensor {
                    // A 0-d tensor (PyTorch's scalar logit_scale) is read as shape [1].
                    shape: if view.shape().is_empty() {
                        vec![1]
                    } else {
                        view.shape().to_vec()
                    },
                    data,
                },
            );
        }
        Ok(Checkpoint {
            tensors,
            metadata,
            origin: origin.to_string(),
            f16_names,
        })
    }

    /// Every tensor was stored as f16 in its file (so f16 storage is lossless); false for an
    /// empty checkpoint.
    pub fn all_f16(&self) -> bool {
        !self.tensors.is_empty() && self.tensors.keys().all(|k| self.f16_names.contains(k))
    }

    /// The tensor `name`, checking its shape when `shape` is given.
    pub fn get(&self, name: &str, shape: Option<&[usize]>) -> Result<&HostTensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            let near: Vec<&str> = self
                .tensors
                .keys()
                .filter(|k| k.rsplit('.').next() == name.rsplit('.').next())
                .take(3)
                .map(String::as_str)
                .collect();
            Error::Config(format!(
                "{}checkpoint has no tensor '{name}'{}",
                if self.origin.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", self.origin)
                },
                if near.is_empty() {
                    String::new()
                } else {
                    format!(" (similar: {})", near.join(", "))
                }
            ))
        })?;
        if let Some(s) = shape {
            if t.shape != s {
                return Err(Error::Config(format!(
                    "{}checkpoint tensor '{name}' has shape {:?}, expected {s:?}",
                    if self.origin.is_empty() {
                        String::new()
                    } else {
                        format!("{}: ", self.origin)
                    },
                    t.shape
                )));
            }
        }
        Ok(t)
    }

    /// Writes the tensors with the metadata, atomically: a temporary file in the same folder,
    /// then a rename, so a crash never leaves a half-written checkpoint. Tensors named in
    /// `f16_names` are stored as f16 (rounded to nearest even), the rest as f32.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                if self.f16_names.contains(k) {
                    let b = t
                        .data
                        .iter()
                        .flat_map(|&v| f32_to_f16(v).to_le_bytes())
                        .collect();
                    (k.clone(), b, t.shape.clone(), safetensors::Dtype::F16)
                } else {
                    let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (k.clone(), b, t.shape.clone(), safetensors::Dtype::F32)
                }
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(k, b, s, dt)| {
                safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::Config(format!("tensor '{k}': {e}")))
            })
            .collect::<Result<_>>()?;
        let meta: std::collections::HashMap<String, String> =
            self.metadata.clone().into_iter().collect();
        let data = safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| Error::Config(format!("cannot serialize {}: {e}", path.display())))?;
        write_atomic(path, &data)
    }
}

pub use crate::atomic::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_covers_normals_subnormals_and_specials() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!((f16_to_f32(0x0001) - 5.960464e-8).abs() < 1e-12);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn f32_to_f16_inverts_every_half_and_rounds_to_nearest_even() {
        for bits in 0..=u16::MAX {
            let v = f16_to_f32(bits);
            if !v.is_nan() {
                assert_eq!(f32_to_f16(v), bits, "{bits:#06x} ({v})");
            }
        }
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        // 1 + 2^-11 is halfway between 1 and the next half: ties go to the even mantissa.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0);
        assert_eq!(f32_to_f16(1.5 * 2f32.powi(-25)), 1);
    }

    #[test]
    fn save_and_load_round_trip_with_metadata() {
        let dir = std::env::temp_dir().join(format!("stablerep-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let mut c = Checkpoint::default();
        c.tensors.insert(
            "a.weight".into(),
            HostTensor {
                shape: vec![2, 3],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
        );
        c.metadata.insert("config".into(), "{\"width\": 3}".into());
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.tensors, c.tensors);
        assert_eq!(
            back.metadata.get("config").map(String::as_str),
            Some("{\"width\": 3}")
        );
        let err = back.get("b.weight", None).unwrap_err().to_string();
        assert!(
            err.contains("no tensor 'b.weight'") && err.contains("a.weight"),
            "{err}"
        );
        let err = back.get("a.weight", Some(&[3, 2])).unwrap_err().to_string();
        assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
        std::fs::write(&path, b"not a checkpoint").unwrap();
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors"), "{err}");
        let err = Checkpoint::load(&dir.join("missing.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn old_optimizer_state_names_load_under_the_new_ones() {
        let dir = std::env::temp_dir().join(format!("ck-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ck = Checkpoint::default();
        for name in [
            "visual.norm.weight",
            "visual.norm.weight.adam_m",
            "w.adam_v",
            "v.sgd_momentum",
        ] {
            ck.tensors.insert(
                name.into(),
                HostTensor {
                    shape: vec![2],
                    data: vec![1.0, 2.0],
                },
            );
        }
        let path = dir.join("old.safetensors");
        ck.save(&path).unwrap();
        let names: Vec<String> = Checkpoint::load(&path)
            .unwrap()
            .tensors
            .into_keys()
            .collect();
        assert_eq!(
            names,
            [
                "optimizer.v.momentum_buffer",
                "optimizer.visual.norm.weight.exp_avg",
                "optimizer.w.exp_avg_sq",
                "visual.norm.weight"
            ]
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
