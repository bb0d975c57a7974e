//! Building blocks shared by models and training: safetensors checkpoints (load with dtype
//! conversion, atomic save with metadata) and learning-rate schedules.

pub mod checkpoint;
pub mod schedule;
