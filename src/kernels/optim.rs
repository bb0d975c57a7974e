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

/// Units (elements, or vec4s in the vec4 form) one workgroup of [`adamw_multi`] updates.
pub const MULTI_GROUP_UNITS: u64 = 1024;

/// One tensor of an [`adamw_multi`] dispatch: (configuration, param, grad, m, v).
pub type Member = (AdamW, View, View, View, View);

/// Words of one [`adamw_multi`] table entry.
pub const MULTI_ENTRY_WORDS: usize = 16;

/// The words of an [`adamw_multi`] table for `members` (see there).
pub fn adamw_multi_table_words(members: &[Member]) -> usize {
    let vec = multi_vec4(members);
    let d = if vec { 4 } else { 1 };
    members.len() * MULTI_ENTRY_WORDS
        + members
            .iter()
            .map(|m| (m.1.len / d).div_ceil(MULTI_GROUP_UNITS) as usize)
            .sum::<usize>()
}

/// Whether every member's length and offsets allow the vec4 form.
fn multi_vec4(members: &[Member]) -> bool {
    members.iter().all(|m| {
        m.1.len.is_multiple_of(4)
            && [m.1, m.2, m.3, m.4]
                .iter()
                .all(|v| v.offset.is_multiple_of(4))
    })
}

/// One AdamW step on many tensors in one dispatch: `members` are (configuration, param, grad,
/// m, v) whose params share one buffer, as do their grads, their m and their v (each set's
/// span must fit one binding); `hyper` is as for [`adamw`]. `table` is the buffer id of a
/// storage buffer of [`adamw_multi_table_words`] words that the caller fills with the
/// returned words before the dispatch runs. Every element gets the arithmetic of [`adamw`],
/// so the result is the same as one [`adamw`] dispatch per member.
pub fn adamw_multi(
    members: &[Member],
    hyper: View,
    table: usize,
    caps: &Caps,
) -> Result<(Dispatch, Vec<u32>)> {
    use crate::error::Error;
    let first = members
        .first()
        .ok_or_else(|| Error::Graph("adamw_multi with no tensors".into()))?;
    let pick = |k: usize, m: &Member| [m.1, m.2, m.3, m.4][k];
    // The span of each operand set over the members, bound once; offsets relative to it.
    let mut binds = Vec::with_capacity(4);
    let mut starts = Vec::with_capacity(4);
    let mut aligned = true;
    for k in 0..4 {
        let buf = pick(k, first).buf;
        if members
            .iter()
            .any(|m| pick(k, m).buf != buf || pick(k, m).half)
        {
            return Err(Error::Graph(
                "adamw_multi: every operand set must be f32 in one buffer".into(),
            ));
        }
        let lo = members.iter().map(|m| pick(k, m).offset).min().unwrap_or(0);
        let hi = members
            .iter()
            .map(|m| pick(k, m).offset + pick(k, m).len)
            .max()
            .unwrap_or(0);
        let span = View {
            buf,
            offset: lo,
            len: hi - lo,
            half: false,
        };
        let (b, at) = super::bind_all(&span, caps, "adamw_multi operand span")?;
        aligned &= (lo - at as u64).is_multiple_of(4);
        binds.push(b);
        starts.push(lo - at as u64);
    }
    let vec = aligned && multi_vec4(members);
    let d: u64 = if vec { 4 } else { 1 };
    let (bh, off_h) = super::bind_all(&hyper, caps, "adamw hyper")?;
    let mut words = Vec::with_capacity(adamw_multi_table_words(members));
    let mut owner: Vec<u32> = Vec::new();
    for (k, m) in members.iter().enumerate() {
        if [m.2.len, m.3.len, m.4.len] != [m.1.len; 3] {
            return Err(Error::Graph(
                "adamw_multi: a member's operands differ in length".into(),
            ));
        }
        let c = m.0;
        let rel = |j: usize| -> u32 { ((pick(j, m).offset - starts[j]) / d) as u32 };
        words.extend_from_slice(&[
            rel(0),
            rel(1),
            rel(2),
            rel(3),
            (m.1.len / d) as u32,
            owner.len() as u32,
            u32::from(c.clamp.is_some()),
            0,
            c.beta1.to_bits(),
            c.beta2.to_bits(),
            c.eps.to_bits(),
            c.weight_decay.to_bits(),
            c.clamp.map_or(0.0, |x| x[0]).to_bits(),
            c.clamp.map_or(0.0, |x| x[1]).to_bits(),
            0,
            0,
        ]);
        let groups = (m.1.len / d).div_ceil(MULTI_GROUP_UNITS);
        owner.extend(std::iter::repeat_n(k as u32, groups as usize));
    }
    let groups = owner.len() as u64;
    words.extend(owner);
    let mut bindings = binds;
    bindings.push(bh);
    bindings.push(super::Binding {
        buf: table,
        offset: 0,
        size: (words.len() * 4) as u64,
    });
    Ok((
        Dispatch {
            key: if vec { "adamw_multi_v4" } else { "adamw_multi" }.into(),
            template: "adamw_multi",
            subst: vec![("TY", super::elem_ty(vec).into())],
            uniform: uniform(&[members.len() as u32, groups as u32, off_h, 0]),
            bindings,
            groups: grid(groups, caps)?,
        },
        words,
    ))
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
