//! `stablerep`: StableRep (Tian et al., NeurIPS 2023) on WebGPU.
//!
//! Layers, bottom up (see ARCHITECTURE.md): [`gpu`] (device, pools, pipeline cache),
//! [`kernels`] (WGSL launchers), [`exec`] (prebuilt dispatches), [`graph`] (tensor IR,
//! autodiff, planner, compiled plans), [`cpu`] (f64 reference implementations for tests).

#![warn(missing_docs)]
// Doc comments write tensor shapes as `[N, D]`, which rustdoc would read as links.
#![allow(rustdoc::broken_intra_doc_links)]

#[cfg(feature = "app")]
pub mod app;
pub mod atomic;
pub mod cpu;
pub mod data;
pub mod demo;
pub mod diffusion;
pub mod error;
pub mod eval;
pub mod exec;
pub mod gpu;
pub mod graph;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod plot;
pub mod progress;
pub mod text;
pub mod train;
pub mod util;
pub mod worker;
pub mod world;

pub use error::{Error, Result};
