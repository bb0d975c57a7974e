// AdamW steps on many tensors in one dispatch, in place. `table` holds one 16-word entry per
// tensor (its offsets in the four buffers, its length, its own configuration), then one word
// per workgroup: the entry that workgroup works on. A workgroup updates 1,024 consecutive
// units of one tensor (invocation k takes units k, k + 256, k + 512 and k + 768), a unit being
// one element or, in the vec4 form (<TY> vec4<f32>, every offset and length a multiple of 4),
// four; offsets and lengths count units. The arithmetic is the one of adamw.wgsl, value for
// value: p -= lr * wd * p; p -= lr * mhat / (sqrt(vhat) + eps); then the clamp if the entry
// has one. hyper = [lr, 1 - beta1^t, 1 - beta2^t]. (On llvmpipe, reading the entry once per
// invocation for 4 units instead of once per unit made the kernel faster than one adamw.wgsl
// dispatch per tensor, not slower.)
//
// Entry words: 0 off_p, 1 off_g, 2 off_m, 3 off_v, 4 n, 5 first workgroup, 6 clamp, 7 -,
// 8 beta1, 9 beta2, 10 eps, 11 wd, 12 lo, 13 hi (f32 bits), 14-15 -.

struct Params {
    count: u32,
    groups: u32,
    off_h: u32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> params: array<{{TY}}>;
@group(0) @binding(2) var<storage, read> grads: array<{{TY}}>;
@group(0) @binding(3) var<storage, read_write> m1: array<{{TY}}>;
@group(0) @binding(4) var<storage, read_write> m2: array<{{TY}}>;
@group(0) @binding(5) var<storage, read> hyper: array<f32>;
@group(0) @binding(6) var<storage, read> table: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = wg.x + wg.y * nwg.x;
    if (w >= p.groups) { return; }
    let e = table[p.count * 16u + w] * 16u;
    let n = table[e + 4u];
    let base = (w - table[e + 5u]) * 1024u + lid.x;
    let beta1 = bitcast<f32>(table[e + 8u]);
    let beta2 = bitcast<f32>(table[e + 9u]);
    let eps = bitcast<f32>(table[e + 10u]);
    let wd = bitcast<f32>(table[e + 11u]);
    let lr = hyper[p.off_h];
    let bc1 = hyper[p.off_h + 1u];
    let bc2 = hyper[p.off_h + 2u];
    let op = table[e];
    let og = table[e + 1u];
    let om = table[e + 2u];
    let ov = table[e + 3u];
    let cl = table[e + 6u] != 0u;
    let lo = {{TY}}(bitcast<f32>(table[e + 12u]));
    let hi = {{TY}}(bitcast<f32>(table[e + 13u]));
    for (var k = 0u; k < 4u; k = k + 1u) {
        let i = base + k * 256u;
        if (i >= n) { return; }
        let g = grads[og + i];
        let m = beta1 * m1[om + i] + (1.0 - beta1) * g;
        let v = beta2 * m2[ov + i] + (1.0 - beta2) * g * g;
        m1[om + i] = m;
        m2[ov + i] = v;
        var x = params[op + i];
        x = x - lr * wd * x;
        x = x - lr * (m / bc1) / (sqrt(v / bc2) + eps);
        if (cl) { x = clamp(x, lo, hi); }
        params[op + i] = x;
    }
}
