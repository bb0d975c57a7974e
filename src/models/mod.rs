//! Models built on the graph: the timm-compatible ViT encoder, a small CNN, StableRep's head
//! and training step, a checkpoint's architecture, and feature extraction.

pub mod cnn;
pub mod config;
pub mod features;
pub mod stablerep;
pub mod text;
pub mod transformer;
pub mod vit;
