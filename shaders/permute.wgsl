// Strided copy: y[off_y + sum_d i_d * sy_d] = x[off_x + sum_d i_d * sx_d] over an index space
// of up to 8 dims. One kernel serves permute/transpose, expand (stride 0), slice, concat
// pieces and pad placement. <TY> is vec4<f32> when the innermost dim is contiguous in both
// tensors and everything is vec4-aligned (shape, strides and offsets then count vec4s).

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
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    var rem = i;
    var ix = 0u;
    var iy = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let dim = p.shape[d / 4][d % 4];
        let idx = rem % dim;
        rem = rem / dim;
        ix += idx * p.sx[d / 4][d % 4];
        iy += idx * p.sy[d / 4][d % 4];
    }
    ys[p.off_y + iy] = xs[p.off_x + ix];
}
