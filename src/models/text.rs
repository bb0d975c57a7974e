//! CLIP's text tower as StableRep+ uses it (OpenAI names, no prefix): token embedding,
//! learned position embedding, causal pre-norm blocks with QuickGELU and LayerNorm eps 1e-5,
//! a final LayerNorm, and the feature at each caption's end-of-text token.

use crate::error::{Error, Result};
use crate::graph::{DType, Graph, NodeId};
use crate::kernels::layout::embedding_index;
use crate::models::transformer::{self, CLIP_TEXT_BLOCK};
use crate::nn::checkpoint::{Checkpoint, HostTensor};
use crate::text::tokenizer::{Tokenizer, CONTEXT, EOT, VOCAB};
use crate::util::rng::Rng;

/// Text transformer hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextConfig {
    /// Tokens per caption (77 for CLIP).
    pub context: usize,
    /// Vocabulary size (49,408 for CLIP's BPE).
    pub vocab: usize,
    /// Width.
    pub width: usize,
    /// Blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp: usize,
}

impl TextConfig {
    /// StableRep+'s text tower: CLIP's 63M-parameter transformer (12 x 512, 8 heads).
    pub fn clip() -> TextConfig {
        TextConfig {
            context: CONTEXT,
            vocab: VOCAB,
            width: 512,
            layers: 12,
            heads: 8,
            mlp: 2048,
        }
    }

    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        if self.heads == 0 || self.width == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(Error::Config(format!(
                "text width {} (--text-width) is not divisible by {} heads (--text-heads)",
                self.width, self.heads
            )));
        }
        if self.context < 2 || self.vocab < VOCAB {
            return Err(Error::Config(format!(
                "the text tower needs a context of at least 2 tokens and CLIP's {VOCAB}-id vocabulary (got context {}, vocabulary {})",
                self.context, self.vocab
            )));
        }
        Ok(())
    }

    /// Every parameter name and shape, with OpenAI CLIP's names.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.width;
        let mut v = vec![
            ("token_embedding.weight".to_string(), vec![self.vocab, d]),
            ("positional_embedding".to_string(), vec![self.context, d]),
        ];
        for l in 0..self.layers {
            v.extend(transformer::param_shapes(
                &CLIP_TEXT_BLOCK,
                &format!("transformer.resblocks.{l}."),
                d,
                self.mlp,
            ));
        }
        v.push(("ln_final.weight".into(), vec![d]));
        v.push(("ln_final.bias".into(), vec![d]));
        v
    }

    /// Fresh parameters as CLIP initializes them: token embedding N(0, 0.02), position
    /// embedding N(0, 0.01), attention in-projection N(0, d^-1/2), output projections
    /// N(0, d^-1/2 (2L)^-1/2), MLP in N(0, (2d)^-1/2), attention biases 0, MLP biases
    /// uniform(+-1/sqrt(fan_in)) (PyTorch's default), LayerNorms 1/0.
    pub fn init(&self, rng: &mut Rng, ck: &mut Checkpoint) {
        let d = self.width as f64;
        let proj_std = d.powf(-0.5) * (2.0 * self.layers as f64).powf(-0.5);
        for (name, shape) in self.param_shapes() {
            let n: usize = shape.iter().product();
            let normal = |rng: &mut Rng, std: f64| -> Vec<f32> {
                (0..n).map(|_| (std * rng.normal()) as f32).collect()
            };
            let uniform = |rng: &mut Rng, fan: usize| -> Vec<f32> {
                let b = 1.0 / (fan as f64).sqrt();
                (0..n)
                    .map(|_| ((rng.unit() * 2.0 - 1.0) * b) as f32)
                    .collect()
            };
            let data = match name.rsplit_once('.').map_or(name.as_str(), |(_, l)| l) {
                _ if name == "token_embedding.weight" => normal(rng, 0.02),
                _ if name == "positional_embedding" => normal(rng, 0.01),
                "in_proj_weight" => normal(rng, d.powf(-0.5)),
                "weight" if name.ends_with("out_proj.weight") || name.contains("c_proj") => {
                    normal(rng, proj_std)
                }
                "weight" if name.contains("c_fc") => normal(rng, (2.0 * d).powf(-0.5)),
                "bias" if name.contains("c_fc") => uniform(rng, self.width),
                "bias" if name.contains("c_proj") => uniform(rng, self.mlp),
                "weight" => vec![1.0; n],
                _ => vec![0.0; n],
            };
            ck.tensors.insert(name, HostTensor { shape, data });
        }
    }
}

/// Graph handles of the text tower's per-batch inputs.
#[derive(Clone, Copy, Debug)]
pub struct TextInputs {
    /// Token ids [captions * context], u32.
    pub ids: NodeId,
    /// Row of each caption's end-of-text token in the flattened tokens [captions], u32.
    pub eot: NodeId,
    /// Embedding backward index: offsets [vocab + 1].
    pub offsets: NodeId,
    /// Embedding backward index: positions sorted by id [captions * context].
    pub rows: NodeId,
}

/// The text tower for `captions` captions: returns the end-of-text features
/// [captions, width] (after the final LayerNorm, before the text projection) and the inputs
/// the host fills with [`TextBatch`].
pub fn encoder(g: &mut Graph, cfg: &TextConfig, captions: usize) -> Result<(NodeId, TextInputs)> {
    cfg.validate()?;
    let (t, d) = (cfg.context, cfg.width);
    let ids = g.input_typed("text.ids", &[captions * t], DType::U32);
    let eot = g.input_typed("text.eot", &[captions], DType::U32);
    let table = g.param("token_embedding.weight", &[cfg.vocab, d]);
    let (x, offsets, rows) = g.embedding("text.embedding", table, ids)?;
    let x = g.reshape(x, &[captions, t, d])?;
    let pos = g.param("positional_embedding", &[t, d]);
    let x = g.add(x, pos)?;
    let mut x = g.reshape(x, &[captions * t, d])?;
    for l in 0..cfg.layers {
        x = transformer::block(
            g,
            &CLIP_TEXT_BLOCK,
            &format!("transformer.resblocks.{l}."),
            x,
            captions,
            t,
            cfg.heads,
            cfg.mlp,
        )?;
    }
    let w = g.param("ln_final.weight", &[d]);
    let b = g.param("ln_final.bias", &[d]);
    let x = g.layer_norm(x, w, b, CLIP_TEXT_BLOCK.eps)?;
    let feats = g.gather(x, eot)?;
    Ok((
        feats,
        TextInputs {
            ids,
            eot,
            offsets,
            rows,
        },
    ))
}

/// Host-side values of [`TextInputs`] for one batch of captions.
#[derive(Clone, Debug, PartialEq)]
pub struct TextBatch {
    /// Token ids, `context` per caption, zero-padded.
    pub ids: Vec<u32>,
    /// End-of-text rows.
    pub eot: Vec<u32>,
    /// Embedding index offsets.
    pub offsets: Vec<u32>,
    /// Embedding index positions.
    pub rows: Vec<u32>,
}

impl TextBatch {
    /// Tokenizes `captions` with CLIP's BPE (zero padding, as `clip.tokenize`).
    pub fn from_captions(captions: &[&str], cfg: &TextConfig) -> TextBatch {
        let tok = Tokenizer::clip();
        let ids: Vec<u32> = captions
            .iter()
            .flat_map(|c| tok.tokenize(c, cfg.context, 0))
            .collect();
        TextBatch::from_ids(ids, cfg)
    }

    /// From token ids already laid out `context` per caption; the feature row of a caption
    /// is its first end-of-text token (the argmax id, as CLIP takes it).
    pub fn from_ids(ids: Vec<u32>, cfg: &TextConfig) -> TextBatch {
        let t = cfg.context;
        let eot = ids
            .chunks(t)
            .enumerate()
            .map(|(c, row)| {
                let at = row.iter().position(|&i| i == EOT).unwrap_or_else(|| {
                    // No end-of-text token: CLIP's argmax picks the largest id.
                    row.iter()
                        .enumerate()
                        .max_by_key(|&(j, &i)| (i, std::cmp::Reverse(j)))
                        .map_or(0, |(j, _)| j)
                });
                (c * t + at) as u32
            })
            .collect();
        let (offsets, rows) = embedding_index(&ids, cfg.vocab);
        TextBatch {
            ids,
            eot,
            offsets,
            rows,
        }
    }
}
