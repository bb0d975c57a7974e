//! Building blocks shared by models: safetensors checkpoints (load with dtype conversion,
//! atomic save with metadata).

pub mod checkpoint;
