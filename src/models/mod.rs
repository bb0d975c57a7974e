//! Models built on the graph: the timm-compatible ViT encoder, a small CNN, StableRep's head
//! and training step, a checkpoint's architecture, and feature extraction.

pub mod cnn;
pub mod config;
pub mod features;
pub mod losses;
pub mod stablerep;
pub mod text;
pub mod transformer;
pub mod vit;

/// Uploads every tensor of `ck` into `store` under its name (f32), sharing arena buffers.
pub fn upload(
    gpu: &std::sync::Arc<crate::gpu::Gpu>,
    ck: &crate::nn::checkpoint::Checkpoint,
    store: &mut crate::graph::ParamStore,
) -> crate::error::Result<()> {
    store.set_all(
        gpu,
        ck.tensors
            .iter()
            .map(|(n, t)| (n.as_str(), &t.shape[..], &t.data[..])),
    )
}
