// Linear combination y = sum_k coef[off_c + k] * x_k, one invocation per element (or per 4
// with <TY> = vec4<f32>; n and the offsets then count vec4s). The coefficients live in a
// storage buffer written once for a whole run (a sampler's step table), so one prepared
// dispatch serves every run. <INPUTS> declares x0..x{K-1} at bindings 3.., <TERMS> sums them.

struct Params {
    n: u32,
    off_c: u32,
    off_y: u32,
    _p0: u32,
    offs: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> coef: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<{{TY}}>;
{{INPUTS}}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    var acc = {{TY}}(0.0);
{{TERMS}}
    y[p.off_y + i] = acc;
}
