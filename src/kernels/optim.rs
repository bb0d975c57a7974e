//! In-place optimizer updates. Learning rate and bias corrections come from a small `hyper`
//! tensor the host writes each step, so a compiled plan never needs rebuilding.

use super::elementwise::chunked;
use super::{grid, uniform, Dispatch, View, WG_1D};
use crate::error::Result;
use crate::gpu::Caps;

/// AdamW hyper-parameters baked into the pipeline uniform.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// beta1
    pub beta1: f32,
    /// beta2
    pub beta2: f32,
    /// epsilon
    pub eps: f32,
    /// decoupled weight decay
    pub weight_decay: f32,
    /// bounds the parameter is clamped to after the step (StableRep+'s logit scale)
    pub clamp: Option<[f32; 2]>,
}

/// One AdamW step on `param` with `grad`, moments `m`, `v`; `hyper = [lr, 1-b1^t, 1-b2^t]`.
pub fn adamw(
    cfg: AdamW,
    param: View,
    grad: View,
    m: View,
    v: View,
    hyper: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    chunked(
        param.len,
        &[param, grad, m, v, hyper],
        &[true, true, true, true, false],
        caps,
        "adamw",
        |b, _, count| {
            // vec4 form when the count and the four tensors' offsets align.
            let offs: Vec<u32> = b[..4].iter().map(|x| x.1).collect();
            let vec = super::vec4_ok(count, &offs);
            let d = if vec { 4 } else { 1 };
            Ok(Dispatch {
                key: if vec { "adamw_v4" } else { "adamw" }.into(),
                template: "adamw",
                subst: vec![("TY", super::elem_ty(vec).into())],
                uniform: uniform(&[
                    (count / d as u64) as u32,
                    b[0].1 / d,
                    b[1].1 / d,
                    b[2].1 / d,
                    b[3].1 / d,
                    b[4].1,
                    u32::from(cfg.clamp.is_some()),
                    0,
                    cfg.beta1.to_bits(),
                    cfg.beta2.to_bits(),
                    cfg.eps.to_bits(),
                    cfg.weight_decay.to_bits(),
                    cfg.clamp.map_or(0.0, |c| c[0]).to_bits(),
                    cfg.clamp.map_or(0.0, |c| c[1]).to_bits(),
                    0,
                    0,
                ]),
                bindings: b.iter().map(|x| x.0).collect(),
                groups: grid((count / d as u64).div_ceil(WG_1D as u64), caps)?,
            })
        },
    )
}

/// Gradient accumulation in place: `acc = hyper[0] * acc + grad` (`hyper[0]` is 0 for the
/// first chunk of a step, 1 after; with 0 the old contents are ignored, NaN included).
pub fn accumulate(acc: View, grad: View, hyper: View, caps: &Caps) -> Result<Vec<Dispatch>> {
    chunked(
        acc.len,
        &[acc, grad, hyper],
        &[true, true, false],
        caps,
        "accumulate",
        |b, _, count| {
            Ok(Dispatch {
                key: "accumulate".into(),
                template: "accumulate",
                subst: vec![],
                uniform: uniform(&[count as u32, b[0].1, b[1].1, b[2].1]),
                bindings: b.iter().map(|x| x.0).collect(),
                groups: grid(count.div_ceil(WG_1D as u64), caps)?,
            })
        },
    )
}

/// One SGD-with-momentum step; `hyper = [lr]`.
pub fn sgd(
    momentum: f32,
    weight_decay: f32,
    param: View,
    grad: View,
    mom: View,
    hyper: View,
    caps: &Caps,
) -> Result<Vec<Dispatch>> {
    chunked(
        param.len,
        &[param, grad, mom, hyper],
        &[true, true, true, false],
        caps,
        "sgd",
        |b, _, count| {
            Ok(Dispatch {
                key: "sgd".into(),
                template: "sgd",
                subst: vec![],
                uniform: uniform(&[
                    count as u32,
                    b[0].1,
                    b[1].1,
                    b[2].1,
                    b[3].1,
                    0,
                    momentum.to_bits(),
                    weight_decay.to_bits(),
                ]),
                bindings: b.iter().map(|x| x.0).collect(),
                groups: grid(count.div_ceil(WG_1D as u64), caps)?,
            })
        },
    )
}
