// AdamW step, in place, one invocation per parameter element. hyper = [lr, 1 - beta1^t,
// 1 - beta2^t] is written by the host each step; betas, eps and weight decay are baked into
// the uniform. PyTorch semantics: p -= lr * wd * p; p -= lr * mhat / (sqrt(vhat) + eps);
// then, if clamp is set, p = clamp(p, lo, hi). <TY> vec4<f32> updates 4 elements per
// invocation (n and the offsets then count vec4s).

struct Params {
    n: u32,
    off_p: u32,
    off_g: u32,
    off_m: u32,
    off_v: u32,
    off_h: u32,
    clamp: u32,
    _p1: u32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    lo: f32,
    hi: f32,
    _p2: f32,
    _p3: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> params: array<{{TY}}>;
@group(0) @binding(2) var<storage, read> grads: array<{{TY}}>;
@group(0) @binding(3) var<storage, read_write> m1: array<{{TY}}>;
@group(0) @binding(4) var<storage, read_write> m2: array<{{TY}}>;
@group(0) @binding(5) var<storage, read> hyper: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    let lr = hyper[p.off_h];
    let bc1 = hyper[p.off_h + 1u];
    let bc2 = hyper[p.off_h + 2u];
    let g = grads[p.off_g + i];
    let m = p.beta1 * m1[p.off_m + i] + (1.0 - p.beta1) * g;
    let v = p.beta2 * m2[p.off_v + i] + (1.0 - p.beta2) * g * g;
    m1[p.off_m + i] = m;
    m2[p.off_v + i] = v;
    var w = params[p.off_p + i];
    w = w - lr * p.wd * w;
    w = w - lr * (m / bc1) / (sqrt(v / bc2) + p.eps);
    if (p.clamp != 0u) { w = clamp(w, {{TY}}(p.lo), {{TY}}(p.hi)); }
    params[p.off_p + i] = w;
}
