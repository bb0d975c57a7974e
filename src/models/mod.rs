//! Models built on the graph: the ViT encoder.
/// The timm-compatible Vision Transformer.
pub mod vit;
