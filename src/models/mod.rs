//! Models built on the graph: the timm-compatible ViT encoder, a small CNN, and StableRep's
//! head and training step.

pub mod cnn;
pub mod stablerep;
pub mod text;
pub mod transformer;
pub mod vit;
