//! Evaluation of a frozen encoder: kNN, few-shot, linear probes and retrieval on CLS features.

pub mod cache;
pub mod knn;
pub mod linear;
pub mod probe;
pub mod retrieval;
