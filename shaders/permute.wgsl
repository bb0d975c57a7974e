// Strided copy: y[off_y + sum_d i_d * sy_d] = x[off_x + sum_d i_d * sx_d] over an index space
// of up to 8 dims. One kernel serves permute/transpose, expand (stride 0), slice, concat
// pieces and pad placement. <TX> and <TY> are the element types of x and y: f32 or f16
// (activations stored in f16; the copy converts), or vec4s of them when the innermost dim is
// contiguous in both tensors and everything is vec4-aligned (shape, strides and offsets then
// count vec4s).
// <INDEX> decomposes i over the shape with the dims and strides as constants (the uniform's
// shape/sx/sy describe the same layout for readers of a dump).

struct Params {
    n: u32,
    rank: u32,
    off_x: u32,
    off_y: u32,
    shape: array<vec4<u32>, 2>,
    sx: array<vec4<u32>, 2>,
    sy: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TX}}>;
@group(0) @binding(2) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    var rem = i;
    var ix = 0u;
    var iy = 0u;
{{INDEX}}
    ys[p.off_y + iy] = {{TY}}(xs[p.off_x + ix]);
}
