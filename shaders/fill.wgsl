// Fills n elements of type <TY> (f32 or vec4<f32>) with a constant (also used to poison
// buffers in tests).

struct Params {
    n: u32,
    off: u32,
    _p0: u32,
    _p1: u32,
    value: f32,
    _p2: f32,
    _p3: f32,
    _p4: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    ys[p.off + i] = {{TY}}(p.value);
}
