// Backward of the row-wise ops, one invocation per row: softmax (a = y), log-softmax (a = y),
// L2-normalize (a = x); b is the incoming gradient dy. <BODY> writes dx. <TY> is f32, or
// vec4<f32> for the softmax body (len and offsets then count vec4s).

struct Params {
    rows: u32,
    len: u32,
    off_a: u32,
    off_b: u32,
    off_y: u32,
    _p0: u32,
    eps: f32,
    _p1: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> as_: array<{{TY}}>;
@group(0) @binding(2) var<storage, read> bs: array<{{TY}}>;
@group(0) @binding(3) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (r >= p.rows) { return; }
    let ab = p.off_a + r * p.len;
    let bb = p.off_b + r * p.len;
    let yb = p.off_y + r * p.len;
{{BODY}}
}
