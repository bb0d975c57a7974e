//! Stable Diffusion's text encoder: transformers' `CLIPTextModel` (causal pre-norm blocks,
//! QuickGELU or GELU, learned positions, final LayerNorm), configured from the model folder's
//! `text_encoder/config.json` and loaded from transformers' key names, with or without the
//! `text_model.` prefix (and under any outer prefix, as in single-file checkpoints). Its output
//! is the last hidden state [batch * tokens, width] that the UNet cross-attends to.
//!
//! Weights are renamed to the OpenAI block layout of [`crate::models::transformer`] (q, k and
//! v fused row-wise into one `in_proj` matrix), so the same graph block serves StableRep+ and SD.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::graph::{DType, Graph, NodeId};
use crate::kernels::elementwise::UnaryOp;
use crate::models::transformer::{self, BlockStyle, CLIP_NAMES};
use crate::nn::checkpoint::{Checkpoint, HostTensor};

/// The fields of transformers' `CLIPTextConfig` the encoder needs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ClipTextConfig {
    /// Token table rows.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// Positions (77).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (SD 1.x) or `gelu` (OpenCLIP text towers).
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}

fn ln_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// Parses `config.json` text; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<ClipTextConfig> {
        let c: ClipTextConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: not a CLIP text config: {e}")))?;
        super::check_sizes(
            origin,
            &[
                ("vocab_size", c.vocab_size, 1 << 20),
                ("hidden_size", c.hidden_size, 16384),
                ("intermediate_size", c.intermediate_size, 65536),
                ("num_attention_heads", c.num_attention_heads, 256),
                ("num_hidden_layers", c.num_hidden_layers, 256),
                ("max_position_embeddings", c.max_position_embeddings, 65536),
            ],
        )?;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::Config(format!(
                "{origin}: hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        c.style()?;
        Ok(c)
    }

    /// The block flavour.
    pub fn style(&self) -> Result<BlockStyle> {
        let act = match self.hidden_act.as_str() {
            "quick_gelu" => UnaryOp::QuickGelu,
            "gelu" => UnaryOp::Gelu,
            other => {
                return Err(Error::Config(format!(
                    "text encoder hidden_act '{other}' is not supported (quick_gelu or gelu)"
                )))
            }
        };
        Ok(BlockStyle {
            names: &CLIP_NAMES,
            eps: self.layer_norm_eps as f32,
            act,
            causal: true,
        })
    }

    /// Parameter names and shapes in the internal (OpenAI) layout, under `prefix`.
    pub fn param_shapes(&self, prefix: &str) -> Result<Vec<(String, Vec<usize>)>> {
        let d = self.hidden_size;
        let style = self.style()?;
        let mut v = vec![
            (
                format!("{prefix}token_embedding.weight"),
                vec![self.vocab_size, d],
            ),
            (
                format!("{prefix}positional_embedding"),
                vec![self.max_position_embeddings, d],
            ),
        ];
        for l in 0..self.num_hidden_layers {
            v.extend(transformer::param_shapes(
                &style,
                &format!("{prefix}transformer.resblocks.{l}."),
                d,
                self.intermediate_size,
            ));
        }
        v.push((format!("{prefix}ln_final.weight"), vec![d]));
        v.push((format!("{prefix}ln_final.bias"), vec![d]));
        Ok(v)
    }
}

/// Renames transformers' text-encoder tensors in `ck` (found by their
/// `embeddings.token_embedding.weight` key under any prefix) to the internal layout under
/// `prefix`, checking every shape against `cfg`. `origin` names the file in errors.
pub fn convert(
    ck: &Checkpoint,
    cfg: &ClipTextConfig,
    prefix: &str,
    origin: &str,
) -> Result<Checkpoint> {
    const ANCHOR: &str = "embeddings.token_embedding.weight";
    let src = ck
        .tensors
        .keys()
        .find_map(|k| k.strip_suffix(ANCHOR))
        .ok_or_else(|| {
            Error::Config(format!(
                "{origin}: no text encoder tensors (no '*{ANCHOR}')"
            ))
        })?
        .to_string();
    let d = cfg.hidden_size;
    let get = |name: &str, shape: &[usize]| -> Result<&HostTensor> {
        let full = format!("{src}{name}");
        let t = ck
            .tensors
            .get(&full)
            .ok_or_else(|| Error::Config(format!("{origin}: tensor '{full}' is missing")))?;
        if t.shape != shape {
            return Err(Error::Config(format!(
                "{origin}: tensor '{full}' has shape {:?}, the config wants {shape:?}",
                t.shape
            )));
        }
        Ok(t)
    };
    let mut out = Checkpoint::default();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        out.tensors
            .insert(format!("{prefix}{name}"), HostTensor { shape, data });
    };
    let tok = get(ANCHOR, &[cfg.vocab_size, d])?;
    put(
        "token_embedding.weight".into(),
        tok.shape.clone(),
        tok.data.clone(),
    );
    let pos = get(
        "embeddings.position_embedding.weight",
        &[cfg.max_position_embeddings, d],
    )?;
    put(
        "positional_embedding".into(),
        pos.shape.clone(),
        pos.data.clone(),
    );
    let m = cfg.intermediate_size;
    for l in 0..cfg.num_hidden_layers {
        let hf = |n: &str| format!("encoder.layers.{l}.{n}");
        let ours = |n: &str| format!("transformer.resblocks.{l}.{n}");
        let mut w = Vec::with_capacity(3 * d * d);
        let mut b = Vec::with_capacity(3 * d);
        for p in ["q_proj", "k_proj", "v_proj"] {
            w.extend_from_slice(&get(&hf(&format!("self_attn.{p}.weight")), &[d, d])?.data);
            b.extend_from_slice(&get(&hf(&format!("self_attn.{p}.bias")), &[d])?.data);
        }
        put(ours("attn.in_proj_weight"), vec![3 * d, d], w);
        put(ours("attn.in_proj_bias"), vec![3 * d], b);
        for (h, o, shape) in [
            (
                "self_attn.out_proj.weight",
                "attn.out_proj.weight",
                vec![d, d],
            ),
            ("self_attn.out_proj.bias", "attn.out_proj.bias", vec![d]),
            ("layer_norm1.weight", "ln_1.weight", vec![d]),
            ("layer_norm1.bias", "ln_1.bias", vec![d]),
            ("layer_norm2.weight", "ln_2.weight", vec![d]),
            ("layer_norm2.bias", "ln_2.bias", vec![d]),
            ("mlp.fc1.weight", "mlp.c_fc.weight", vec![m, d]),
            ("mlp.fc1.bias", "mlp.c_fc.bias", vec![m]),
            ("mlp.fc2.weight", "mlp.c_proj.weight", vec![d, m]),
            ("mlp.fc2.bias", "mlp.c_proj.bias", vec![d]),
        ] {
            let t = get(&hf(h), &shape)?;
            put(ours(o), shape, t.data.clone());
        }
    }
    for (h, o) in [
        ("final_layer_norm.weight", "ln_final.weight"),
        ("final_layer_norm.bias", "ln_final.bias"),
    ] {
        let t = get(h, &[d])?;
        put(o.into(), vec![d], t.data.clone());
    }
    Ok(out)
}

/// The inverse of [`convert`]: internal tensors under `prefix` -> transformers' names
/// (`text_model.*`, q/k/v split), for writing a `text_encoder/` folder.
pub fn to_transformers(ck: &Checkpoint, cfg: &ClipTextConfig, prefix: &str) -> Result<Checkpoint> {
    let d = cfg.hidden_size;
    let get = |name: &str| -> Result<&HostTensor> {
        let full = format!("{prefix}{name}");
        ck.tensors
            .get(&full)
            .ok_or_else(|| Error::Config(format!("text encoder: tensor '{full}' is missing")))
    };
    let mut out = Checkpoint::default();
    let mut put = |name: String, t: HostTensor| {
        out.tensors.insert(format!("text_model.{name}"), t);
    };
    put(
        "embeddings.token_embedding.weight".into(),
        get("token_embedding.weight")?.clone(),
    );
    put(
        "embeddings.position_embedding.weight".into(),
        get("positional_embedding")?.clone(),
    );
    for l in 0..cfg.num_hidden_layers {
        let hf = |n: &str| format!("encoder.layers.{l}.{n}");
        let ours = |n: &str| format!("transformer.resblocks.{l}.{n}");
        let w = get(&ours("attn.in_proj_weight"))?;
        let b = get(&ours("attn.in_proj_bias"))?;
        for (k, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            put(
                hf(&format!("self_attn.{p}.weight")),
                HostTensor {
                    shape: vec![d, d],
                    data: w.data[k * d * d..(k + 1) * d * d].to_vec(),
                },
            );
            put(
                hf(&format!("self_attn.{p}.bias")),
                HostTensor {
                    shape: vec![d],
                    data: b.data[k * d..(k + 1) * d].to_vec(),
                },
            );
        }
        for (h, o) in [
            ("self_attn.out_proj.weight", "attn.out_proj.weight"),
            ("self_attn.out_proj.bias", "attn.out_proj.bias"),
            ("layer_norm1.weight", "ln_1.weight"),
            ("layer_norm1.bias", "ln_1.bias"),
            ("layer_norm2.weight", "ln_2.weight"),
            ("layer_norm2.bias", "ln_2.bias"),
            ("mlp.fc1.weight", "mlp.c_fc.weight"),
            ("mlp.fc1.bias", "mlp.c_fc.bias"),
            ("mlp.fc2.weight", "mlp.c_proj.weight"),
            ("mlp.fc2.bias", "mlp.c_proj.bias"),
        ] {
            put(hf(h), get(&ours(o))?.clone());
        }
    }
    put(
        "final_layer_norm.weight".into(),
        get("ln_final.weight")?.clone(),
    );
    put(
        "final_layer_norm.bias".into(),
        get("ln_final.bias")?.clone(),
    );
    Ok(out)
}

/// The encoder for `batch` prompts of `tokens` ids (at most `max_position_embeddings`):
/// returns the last hidden state [batch * tokens, width] and the u32 ids input
/// `"{prefix}ids"` [batch * tokens]. Parameters are read under `prefix`.
pub fn encoder(
    g: &mut Graph,
    cfg: &ClipTextConfig,
    prefix: &str,
    batch: usize,
    tokens: usize,
) -> Result<(NodeId, NodeId)> {
    check_tokens(cfg, tokens)?;
    let ids = g.input_typed(&format!("{prefix}ids"), &[batch * tokens], DType::U32);
    let table = g.param(
        &format!("{prefix}{TOKEN_TABLE}"),
        &[cfg.vocab_size, cfg.hidden_size],
    );
    let x = g.gather(table, ids)?;
    Ok((encoder_embedded(g, cfg, prefix, x, batch, tokens)?, ids))
}

/// The token table's name (after the prefix) in converted weights.
pub const TOKEN_TABLE: &str = "token_embedding.weight";

/// Token embeddings [ids.len(), width] looked up on the host from converted weights `ck`
/// (SD's table is 145 MiB in f32, more than WebGPU's default 128 MiB binding; a prompt needs
/// 77 of its 49,408 rows).
pub fn embed_tokens(ck: &Checkpoint, prefix: &str, ids: &[u32]) -> Result<Vec<f32>> {
    let name = format!("{prefix}{TOKEN_TABLE}");
    let t = ck
        .tensors
        .get(&name)
        .ok_or_else(|| Error::Config(format!("text encoder: tensor '{name}' is missing")))?;
    let (vocab, d) = (t.shape[0], t.shape[1]);
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::Config(format!(
                "token id {id} is outside the text encoder's {vocab}-token vocabulary \
                 (does the tokenizer belong to this model?)"
            )));
        }
        out.extend_from_slice(&t.data[id * d..(id + 1) * d]);
    }
    Ok(out)
}

fn check_tokens(cfg: &ClipTextConfig, tokens: usize) -> Result<()> {
    if tokens == 0 || tokens > cfg.max_position_embeddings {
        return Err(Error::Config(format!(
            "the text encoder takes 1..={} tokens, got {tokens}",
            cfg.max_position_embeddings
        )));
    }
    Ok(())
}

/// The encoder after the token lookup: token embeddings x [batch * tokens, width] -> the last
/// hidden state [batch * tokens, width].
pub fn encoder_embedded(
    g: &mut Graph,
    cfg: &ClipTextConfig,
    prefix: &str,
    x: NodeId,
    batch: usize,
    tokens: usize,
) -> Result<NodeId> {
    check_tokens(cfg, tokens)?;
    let style = cfg.style()?;
    let d = cfg.hidden_size;
    let x = g.reshape(x, &[batch, tokens, d])?;
    let pos = g.param(
        &format!("{prefix}positional_embedding"),
        &[cfg.max_position_embeddings, d],
    );
    let pos = if tokens < cfg.max_position_embeddings {
        g.slice(pos, 0, 0, tokens)?
    } else {
        pos
    };
    let x = g.add(x, pos)?;
    let mut x = g.reshape(x, &[batch * tokens, d])?;
    for l in 0..cfg.num_hidden_layers {
        x = transformer::block(
            g,
            &style,
            &format!("{prefix}transformer.resblocks.{l}."),
            x,
            batch,
            tokens,
            cfg.num_attention_heads,
            cfg.intermediate_size,
        )?;
    }
    let w = g.param(&format!("{prefix}ln_final.weight"), &[d]);
    let b = g.param(&format!("{prefix}ln_final.bias"), &[d]);
    g.layer_norm(x, w, b, style.eps)
}
