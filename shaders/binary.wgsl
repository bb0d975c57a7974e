// Elementwise binary op c = f(a, b) with NumPy broadcasting (up to 8 dims): the uniform holds
// the output shape and each operand's element strides (0 on broadcast dims). Template:
// <EXPR> in terms of a and b; <HELPERS> for shared math.

struct Params {
    n: u32,
    rank: u32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    shape: array<vec4<u32>, 2>,
    sa: array<vec4<u32>, 2>,
    sb: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> as_: array<f32>;
@group(0) @binding(2) var<storage, read> bs: array<f32>;
@group(0) @binding(3) var<storage, read_write> cs: array<f32>;

{{HELPERS}}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let dim = p.shape[d / 4][d % 4];
        let idx = rem % dim;
        rem = rem / dim;
        ia += idx * p.sa[d / 4][d % 4];
        ib += idx * p.sb[d / 4][d % 4];
    }
    let a = as_[p.off_a + ia];
    let b = bs[p.off_b + ib];
    cs[p.off_c + i] = {{EXPR}};
}
