//! Leaves every layer may use: the seeded random stream, f16 conversions, image files and the
//! evaluation preprocessing. Nothing here imports another module of the crate but `error` and
//! `atomic`.

pub mod f16;
pub mod image;
pub mod rng;
