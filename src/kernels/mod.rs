//! The kernel library: one thin launcher per kernel family. A launcher checks shapes, picks a
//! variant for the device and shape (the pipeline key carries every specialization), packs the
//! shape uniform and returns [`Dispatch`]es over abstract buffer ids. It never touches wgpu
//! buffers itself, so the same launch can be replayed by a compiled plan or run eagerly.

pub mod augment;
pub mod catalog;
pub mod contrastive;
pub mod elementwise;
pub mod expr;
pub mod fused;
pub mod heads;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod reduce;
pub mod source;

use crate::error::{Error, Result};
use crate::gpu::Caps;

/// Workgroup size of the one-invocation-per-element kernels.
pub const WG_1D: u32 = 256;

/// The most iterations one invocation spends on a serial loop over a long axis. llvmpipe
/// (lavapipe, the software Vulkan driver) silently ends a shader's loops after 65,535
/// iterations per invocation, nested loops included, which truncates a long sum with no
/// error; kernels that walk a long axis split it into chunks of this size, one dispatch each
/// (accumulating), or the graph splits the op.
pub const LOOP_CHUNK: usize = 8192;

/// `0..len` in consecutive `(start, end)` chunks of at most `chunk` (one empty chunk when
/// `len` is 0, so a reduction still writes its output).
pub fn chunks(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = len.div_ceil(chunk.max(1)).max(1);
    (0..n).map(move |i| (i * chunk, ((i + 1) * chunk).min(len)))
}

/// A contiguous range of f32/u32 elements inside a buffer known by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// Buffer id (meaning is up to the caller: plan slot, eager buffer index).
    pub buf: usize,
    /// First element.
    pub offset: u64,
    /// Number of elements.
    pub len: u64,
    /// The elements are f16, two to a 32-bit word (weights read by the matmul kernels; offsets
    /// and lengths still count elements).
    pub half: bool,
}

impl View {
    /// A view of `len` elements at the start of buffer `buf`.
    pub fn new(buf: usize, len: u64) -> Self {
        View {
            buf,
            offset: 0,
            len,
            half: false,
        }
    }
    /// A sub-range of this view.
    pub fn sub(&self, start: u64, len: u64) -> Self {
        debug_assert!(start + len <= self.len);
        View {
            buf: self.buf,
            offset: self.offset + start,
            len,
            half: self.half,
        }
    }
}

/// One byte range of a buffer bound to a storage binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Buffer id.
    pub buf: usize,
    /// Byte offset (aligned to the device's storage offset alignment).
    pub offset: u64,
    /// Byte size.
    pub size: u64,
}

/// One compute dispatch: pipeline key and source, uniform bytes, storage bindings (binding 1..)
/// and the workgroup grid. The uniform is bound at binding 0.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// Readable kernel key (`matmul_nt_v111_8x8_8x8`, `unary_gelu`...), for logs and profiles.
    pub key: String,
    /// Name of the template in `shaders/` and its substitutions.
    pub template: &'static str,
    /// Template substitutions.
    pub subst: Vec<(&'static str, String)>,
    /// Uniform bytes (a multiple of 16).
    pub uniform: Vec<u8>,
    /// Storage bindings in binding order starting at 1.
    pub bindings: Vec<Binding>,
    /// Workgroup counts.
    pub groups: [u32; 3],
}

impl Dispatch {
    /// The WGSL source of this dispatch's pipeline.
    pub fn source(&self) -> Result<String> {
        source::render(self.template, &self.subst)
    }
}

/// Packs u32 words into a uniform block padded to 16 bytes.
pub fn uniform(words: &[u32]) -> Vec<u8> {
    let mut w = words.to_vec();
    while !w.len().is_multiple_of(4) {
        w.push(0);
    }
    bytemuck::cast_slice(&w).to_vec()
}

/// Binds elements `[start, start + len)` of `view`: returns the aligned binding and the element
/// offset of `start` inside it. Fails when the range cannot fit one binding.
pub fn bind(view: &View, start: u64, len: u64, caps: &Caps, what: &str) -> Result<(Binding, u32)> {
    let elem = if view.half { 2 } else { 4 };
    let first = (view.offset + start) * elem;
    let aligned = first / caps.storage_align * caps.storage_align;
    // Whole 32-bit words (an f16 view may end mid-word).
    let end = ((view.offset + start + len.max(1)) * elem).div_ceil(4) * 4;
    let size = end - aligned;
    if size > caps.max_binding {
        return Err(Error::TooLarge {
            what: format!("{what} ({} elements in one binding)", len),
            bytes: size,
            limit: caps.max_binding,
            limit_name: "max_storage_buffer_binding_size",
        });
    }
    Ok((
        Binding {
            buf: view.buf,
            offset: aligned,
            size,
        },
        ((first - aligned) / elem) as u32,
    ))
}

/// Binds a whole view (see [`bind`]).
pub fn bind_all(view: &View, caps: &Caps, what: &str) -> Result<(Binding, u32)> {
    bind(view, 0, view.len, caps, what)
}

/// The largest number of elements that can safely be bound at any offset: the binding limit
/// minus one alignment unit, in elements.
pub fn max_bind_elems(caps: &Caps) -> u64 {
    (caps.max_binding - caps.storage_align) / 4
}

/// A 1-D grid of `groups` workgroups folded into 2-D when it exceeds the per-dimension limit.
pub fn grid(groups: u64, caps: &Caps) -> Result<[u32; 3]> {
    crate::gpu::grid_2d(groups, caps.max_workgroups)
}

/// Row chunks `[(start, count)]` over `rows` rows of `row_elems` elements each, so that every
/// chunk binds within the limit. With several operands of different row widths, pass the
/// widest.
pub fn row_chunks(rows: u64, row_elems: u64, caps: &Caps, what: &str) -> Result<Vec<(u64, u64)>> {
    let max_elems = max_bind_elems(caps);
    let row_elems = row_elems.max(1);
    if row_elems > max_elems {
        return Err(Error::TooLarge {
            what: format!("{what}: one row of {row_elems} elements"),
            bytes: row_elems * 4,
            limit: caps.max_binding,
            limit_name: "max_storage_buffer_binding_size",
        });
    }
    let per = (max_elems / row_elems).max(1);
    let mut out = Vec::new();
    let mut s = 0;
    while s < rows {
        let n = per.min(rows - s);
        out.push((s, n));
        s += n;
    }
    if out.is_empty() {
        out.push((0, 0));
    }
    Ok(out)
}

/// Whether a launch can take its vec4 form: the count of elements (per row, or in all) and
/// every offset are multiples of 4.
pub(crate) fn vec4_ok(count: u64, offsets: &[u32]) -> bool {
    count.is_multiple_of(4) && offsets.iter().all(|o| o.is_multiple_of(4))
}

/// The WGSL storage type of a scalar or vec4 launch over f32 or (`half`) f16 elements.
pub(crate) fn storage_ty(vec: bool, half: bool) -> &'static str {
    match (vec, half) {
        (false, false) => "f32",
        (true, false) => "vec4<f32>",
        (false, true) => "f16",
        (true, true) => "vec4<f16>",
    }
}

/// Fails unless the device can store f16 values (`shader-f16`) when any of `views` holds
/// f16 activations.
pub(crate) fn check_half(views: &[&View], caps: &Caps, what: &str) -> Result<()> {
    if views.iter().any(|v| v.half) && !caps.f16 {
        return Err(Error::Config(format!(
            "{what}: f16 activations need the device feature shader-f16, which this device lacks"
        )));
    }
    Ok(())
}

/// A key suffix naming which operands are f16 (`_h` and one digit per operand), empty when
/// none is.
pub(crate) fn half_suffix(views: &[&View]) -> String {
    if views.iter().any(|v| v.half) {
        let d: String = views
            .iter()
            .map(|v| if v.half { '1' } else { '0' })
            .collect();
        format!("_h{d}")
    } else {
        String::new()
    }
}

/// The WGSL element type of a scalar or vec4 launch.
pub(crate) fn elem_ty(vec: bool) -> &'static str {
    if vec {
        "vec4<f32>"
    } else {
        "f32"
    }
}
