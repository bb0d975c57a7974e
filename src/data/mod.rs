//! Training data: synthetic image pools (captions with K generated images each) in the official
//! StableRep layout, a caption sampler, and image decoding.

pub mod augment;
pub mod convert;
pub mod csv;
pub mod folder;
pub mod pool;
pub mod sampler;
pub mod tar;
pub mod webdataset;
