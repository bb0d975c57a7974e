//! Models built on the graph: the timm-compatible ViT encoder and StableRep's head and
//! training step.

pub mod stablerep;
pub mod text;
pub mod transformer;
pub mod vit;
