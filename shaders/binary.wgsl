// Elementwise binary op c = f(a, b) with NumPy broadcasting (up to 8 dims): the uniform holds
// the output shape and each operand's strides (0 on broadcast dims). Template: <EXPR> is f in
// terms of scalars a and b. Vectorized form (<C_TY> = vec4<f32>): each invocation computes 4
// consecutive outputs along the innermost dim; an operand is read as vec4 when it runs along
// that dim (<A_TY>/<B_TY> = vec4<f32>) or as a broadcast scalar when its innermost stride is 0.
// Shapes, strides and offsets are in units of each binding's element type. <INDEX> computes the
// operand indices ia, ib: the broadcasting loop, or the identity when both shapes equal the output
// (no per-element integer division, which CPU adapters scalarize).

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
@group(0) @binding(1) var<storage, read> as_: array<{{A_TY}}>;
@group(0) @binding(2) var<storage, read> bs: array<{{B_TY}}>;
@group(0) @binding(3) var<storage, read_write> cs: array<{{C_TY}}>;

{{HELPERS}}

fn f(a: f32, b: f32) -> f32 {
    return {{EXPR}};
}

fn apply(a: f32, b: f32) -> f32 { return f(a, b); }
fn apply4(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(f(a.x, b.x), f(a.y, b.y), f(a.z, b.z), f(a.w, b.w));
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
{{INDEX}}
    cs[p.off_c + i] = {{APPLY}}({{LOAD_A}}(as_[p.off_a + ia]), {{LOAD_B}}(bs[p.off_b + ib]));
}
