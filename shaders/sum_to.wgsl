// Sums a tensor down to a broadcast-compatible shape (the backward of broadcasting): each
// output element adds every input element that broadcast to it. The uniform gives the output
// dims with their input strides, and the reduced dims with theirs. <TY> is vec4<f32> when the
// innermost output dim is contiguous in the input and everything is vec4-aligned (then all
// counts, strides and offsets are in vec4s). One dispatch sums the reduced indices
// r0..r1; a long reduction runs as several dispatches, each adding to what the previous
// ones wrote (`accumulate`), so no invocation loops past llvmpipe's 65,535 iterations.

struct Params {
    n: u32,
    rank_out: u32,
    rank_red: u32,
    r1: u32,
    off_x: u32,
    off_y: u32,
    r0: u32,
    accumulate: u32,
    out_shape: array<vec4<u32>, 2>,
    out_stride: array<vec4<u32>, 2>,
    red_shape: array<vec4<u32>, 2>,
    red_stride: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    var rem = i;
    var base = p.off_x;
    for (var d = i32(p.rank_out) - 1; d >= 0; d--) {
        let dim = p.out_shape[d / 4][d % 4];
        base += (rem % dim) * p.out_stride[d / 4][d % 4];
        rem = rem / dim;
    }
    var acc = {{TY}}(0.0);
    for (var r = p.r0; r < p.r1; r++) {
        var rr = r;
        var off = base;
        for (var d = i32(p.rank_red) - 1; d >= 0; d--) {
            let dim = p.red_shape[d / 4][d % 4];
            off += (rr % dim) * p.red_stride[d / 4][d % 4];
            rr = rr / dim;
        }
        acc += xs[off];
    }
    if (p.accumulate != 0u) {
        ys[p.off_y + i] = ys[p.off_y + i] + acc;
    } else {
        ys[p.off_y + i] = acc;
    }
}
