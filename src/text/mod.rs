//! Text side of StableRep+: caption cleaning and CLIP's BPE tokenizer.

pub mod clean;
pub mod tokenizer;

pub use tokenizer::Tokenizer;
