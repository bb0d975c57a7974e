//! Evaluation of a frozen encoder: labelled image folders, preprocessing, kNN and few-shot
//! classification on CLS features.

pub mod folder;
pub mod knn;
pub mod linear;
pub mod probe;
pub mod retrieval;
