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

/// Units (elements, or vec4s in the vec4 form) one workgroup of a multi-tensor update
/// ([`adamw_multi`], [`accumulate_multi`]) works on.
pub const MULTI_GROUP_UNITS: u64 = 1024;

/// Words of one [`adamw_multi`] table entry.
pub const MULTI_ENTRY_WORDS: usize = 16;

/// Words of one [`accumulate_multi`] table entry.
pub const ACC_ENTRY_WORDS: usize = 4;

/// One tensor of an [`adamw_multi`] dispatch: (configuration, param, grad, m, v).
pub type Member = (AdamW, View, View, View, View);

/// How a multi-tensor update binds its operand sets: one binding per set spanning all its
/// members, and each member's offset inside it in units.
struct MultiLayout {
    bindings: Vec<super::Binding>,
    /// Per set: the element that unit 0 of the binding is.
    starts: Vec<u64>,
    /// The vec4 form: every length and offset a multiple of 4.
    vec: bool,
}

impl MultiLayout {
    /// `sets[k][j]` is operand k of member j. Every set must be f32 in one buffer, and every
    /// member's operands one length.
    fn new(sets: &[Vec<View>], caps: &Caps, what: &str) -> Result<MultiLayout> {
        use crate::error::Error;
        let mut bindings = Vec::with_capacity(sets.len());
        let mut starts = Vec::with_capacity(sets.len());
        let mut vec = true;
        for set in sets {
            let first = set
                .first()
                .ok_or_else(|| Error::Graph(format!("{what} with no tensors")))?;
            if set.iter().any(|v| v.buf != first.buf || v.half) {
                return Err(Error::Graph(format!(
                    "{what}: every operand set must be f32 in one buffer"
                )));
            }
            if set.len() != sets[0].len() || set.iter().zip(&sets[0]).any(|(v, w)| v.len != w.len) {
                return Err(Error::Graph(format!(
                    "{what}: a member's operands differ in length"
                )));
            }
            let lo = set.iter().map(|v| v.offset).min().unwrap_or(0);
            let hi = set.iter().map(|v| v.offset + v.len).max().unwrap_or(0);
            let span = View {
                buf: first.buf,
                offset: lo,
                len: hi - lo,
                half: false,
            };
            let (b, at) = super::bind_all(&span, caps, what)?;
            let start = lo - at as u64;
            vec &= start.is_multiple_of(4)
                && set
                    .iter()
                    .all(|v| v.len.is_multiple_of(4) && v.offset.is_multiple_of(4));
            bindings.push(b);
            starts.push(start);
        }
        Ok(MultiLayout {
            bindings,
            starts,
            vec,
        })
    }

    fn unit(&self) -> u64 {
        if self.vec {
            4
        } else {
            1
        }
    }

    /// Member view `v` of set `k` as a unit offset in its binding.
    fn rel(&self, k: usize, v: &View) -> u32 {
        ((v.offset - self.starts[k]) / self.unit()) as u32
    }

    /// The workgroup-to-member map for members of `lens` elements; returns (map, groups).
    fn owners(&self, lens: impl Iterator<Item = u64>) -> (Vec<u32>, Vec<u32>) {
        let mut owner: Vec<u32> = Vec::new();
        let mut first = Vec::new();
        for (j, n) in lens.enumerate() {
            first.push(owner.len() as u32);
            let groups = (n / self.unit()).div_ceil(MULTI_GROUP_UNITS);
            owner.extend(std::iter::repeat_n(j as u32, groups as usize));
        }
        (owner, first)
    }
}

/// One AdamW step on many tensors in one dispatch: `members` are (configuration, param, grad,
/// m, v) whose params share one buffer, as do their grads, their m and their v (each set's
/// span must fit one binding); `hyper` is as for [`adamw`]. `table` is the buffer id of a
/// storage buffer that the caller fills with the returned words (a table per tensor, then a
/// map from workgroups to tensors) before the dispatch runs. Every element gets the arithmetic of [`adamw`],
/// so the result is the same as one [`adamw`] dispatch per member.
pub fn adamw_multi(
    members: &[Member],
    hyper: View,
    table: usize,
    caps: &Caps,
) -> Result<(Dispatch, Vec<u32>)> {
    let sets: Vec<Vec<View>> = (0..4)
        .map(|k| members.iter().map(|m| [m.1, m.2, m.3, m.4][k]).collect())
        .collect();
    let l = MultiLayout::new(&sets, caps, "adamw_multi")?;
    let (bh, off_h) = super::bind_all(&hyper, caps, "adamw hyper")?;
    let (owner, first) = l.owners(members.iter().map(|m| m.1.len));
    let mut words = Vec::with_capacity(members.len() * MULTI_ENTRY_WORDS + owner.len());
    for (j, m) in members.iter().enumerate() {
        let c = m.0;
        words.extend_from_slice(&[
            l.rel(0, &m.1),
            l.rel(1, &m.2),
            l.rel(2, &m.3),
            l.rel(3, &m.4),
            (m.1.len / l.unit()) as u32,
            first[j],
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
    }
    let groups = owner.len() as u64;
    words.extend(owner);
    multi_dispatch(
        "adamw_multi",
        l,
        bh,
        off_h,
        table,
        members.len(),
        groups,
        words,
        caps,
    )
}

/// Gradient accumulation `acc = hyper[0] * acc + grad` on many tensors in one dispatch:
/// `members` are (acc, grad) whose accs share one buffer, as do their grads; otherwise as
/// [`adamw_multi`] (table included). The result is
/// the same as one [`accumulate`] dispatch per member.
pub fn accumulate_multi(
    members: &[(View, View)],
    hyper: View,
    table: usize,
    caps: &Caps,
) -> Result<(Dispatch, Vec<u32>)> {
    let sets: Vec<Vec<View>> = vec![
        members.iter().map(|m| m.0).collect(),
        members.iter().map(|m| m.1).collect(),
    ];
    let l = MultiLayout::new(&sets, caps, "accumulate_multi")?;
    let (bh, off_h) = super::bind_all(&hyper, caps, "accumulate hyper")?;
    let (owner, first) = l.owners(members.iter().map(|m| m.0.len));
    let mut words = Vec::with_capacity(members.len() * ACC_ENTRY_WORDS + owner.len());
    for (j, m) in members.iter().enumerate() {
        words.extend_from_slice(&[
            l.rel(0, &m.0),
            l.rel(1, &m.1),
            (m.0.len / l.unit()) as u32,
            first[j],
        ]);
    }
    let groups = owner.len() as u64;
    words.extend(owner);
    multi_dispatch(
        "accumulate_multi",
        l,
        bh,
        off_h,
        table,
        members.len(),
        groups,
        words,
        caps,
    )
}

/// The dispatch of a multi-tensor update over its operand bindings, hyper and table.
#[allow(clippy::too_many_arguments)]
fn multi_dispatch(
    template: &'static str,
    l: MultiLayout,
    hyper: super::Binding,
    off_h: u32,
    table: usize,
    count: usize,
    groups: u64,
    words: Vec<u32>,
    caps: &Caps,
) -> Result<(Dispatch, Vec<u32>)> {
    if groups > u32::MAX as u64 {
        return Err(crate::error::Error::Graph(format!(
            "{template}: too many elements"
        )));
    }
    let vec = l.vec;
    let mut bindings = l.bindings;
    bindings.push(hyper);
    bindings.push(super::Binding {
        buf: table,
        offset: 0,
        size: (words.len() * 4) as u64,
    });
    Ok((
        Dispatch {
            key: if vec {
                format!("{template}_v4")
            } else {
                template.to_string()
            },
            template,
            subst: vec![("TY", super::elem_ty(vec).into())],
            uniform: uniform(&[count as u32, groups as u32, off_h, 0]),
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
