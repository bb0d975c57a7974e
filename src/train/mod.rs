//! Training policy on top of the models: learning-rate rules and schedules, and checkpoints of
//! the full training state.

pub mod checkpoint;
pub mod embed;
pub mod fixed;
pub mod pool_run;
pub mod schedule;
