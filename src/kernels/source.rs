//! WGSL sources: the files in `shaders/`, embedded at build time, and a tiny `{{NAME}}`
//! template filler. Every variant a launcher can produce is listed by [`all_variants`] so a
//! test can validate each one with naga without a GPU.

use crate::error::{Error, Result};

/// (name, text) of every template in `shaders/`.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("matmul_sg", include_str!("../../shaders/matmul_sg.wgsl")),
    ("unary", include_str!("../../shaders/unary.wgsl")),
    ("binary", include_str!("../../shaders/binary.wgsl")),
    ("fused", include_str!("../../shaders/fused.wgsl")),
    ("reduce", include_str!("../../shaders/reduce.wgsl")),
    ("sum_to", include_str!("../../shaders/sum_to.wgsl")),
    ("rows", include_str!("../../shaders/rows.wgsl")),
    ("ln_grad", include_str!("../../shaders/ln_grad.wgsl")),
    ("col_grad", include_str!("../../shaders/col_grad.wgsl")),
    ("bn_grad", include_str!("../../shaders/bn_grad.wgsl")),
    ("row_grad", include_str!("../../shaders/row_grad.wgsl")),
    ("col_stats", include_str!("../../shaders/col_stats.wgsl")),
    ("norm_apply", include_str!("../../shaders/norm_apply.wgsl")),
    ("ln_forward", include_str!("../../shaders/ln_forward.wgsl")),
    ("permute", include_str!("../../shaders/permute.wgsl")),
    ("gather", include_str!("../../shaders/gather.wgsl")),
    (
        "gather_grad",
        include_str!("../../shaders/gather_grad.wgsl"),
    ),
    (
        "gather_grad_csr",
        include_str!("../../shaders/gather_grad_csr.wgsl"),
    ),
    (
        "cross_entropy",
        include_str!("../../shaders/cross_entropy.wgsl"),
    ),
    ("multipos", include_str!("../../shaders/multipos.wgsl")),
    ("augment", include_str!("../../shaders/augment.wgsl")),
    ("bn_running", include_str!("../../shaders/bn_running.wgsl")),
    ("adamw", include_str!("../../shaders/adamw.wgsl")),
    (
        "adamw_multi",
        include_str!("../../shaders/adamw_multi.wgsl"),
    ),
    ("sgd", include_str!("../../shaders/sgd.wgsl")),
    ("accumulate", include_str!("../../shaders/accumulate.wgsl")),
    (
        "accumulate_multi",
        include_str!("../../shaders/accumulate_multi.wgsl"),
    ),
    ("fill", include_str!("../../shaders/fill.wgsl")),
    ("lincomb", include_str!("../../shaders/lincomb.wgsl")),
    ("im2col", include_str!("../../shaders/im2col.wgsl")),
    ("col2im", include_str!("../../shaders/col2im.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    (
        "attention_v4",
        include_str!("../../shaders/attention_v4.wgsl"),
    ),
    (
        "head_attention",
        include_str!("../../shaders/head_attention.wgsl"),
    ),
    (
        "group_stats",
        include_str!("../../shaders/group_stats.wgsl"),
    ),
    (
        "group_apply",
        include_str!("../../shaders/group_apply.wgsl"),
    ),
];

/// Fills `{{KEY}}` placeholders of the template `name`. Fails on unknown templates and on
/// placeholders left unfilled. A variant that stores f16 values (`array<f16>`,
/// `vec4<f16>`: activations in f16, which needs the device's `shader-f16`) gets the
/// `enable f16;` directive.
pub fn render(name: &str, subst: &[(&str, String)]) -> Result<String> {
    let (_, text) = TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| Error::Graph(format!("unknown shader template '{name}'")))?;
    let mut s = text.to_string();
    for (k, v) in subst {
        s = s.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(pos) = s.find("{{") {
        let end = s[pos..].find("}}").map_or(s.len(), |e| pos + e + 2);
        return Err(Error::Graph(format!(
            "shader template '{name}' has an unfilled placeholder {}",
            &s[pos..end]
        )));
    }
    if uses_f16(&s) {
        s.insert_str(0, "enable f16;\n");
    }
    Ok(s)
}

/// Whether WGSL source names the `f16` type (which needs `enable f16;`) outside comments.
pub fn uses_f16(source: &str) -> bool {
    source.lines().any(|line| {
        let code = line.split("//").next().unwrap_or_default();
        code.contains("<f16>") || code.contains("f16(")
    })
}
