// SGD with momentum and (coupled) weight decay, in place, PyTorch semantics:
// d = g + wd * p; buf = mu * buf + d; p -= lr * buf. hyper = [lr] is written by the host.

struct Params {
    n: u32,
    off_p: u32,
    off_g: u32,
    off_m: u32,
    off_h: u32,
    _p0: u32,
    mu: f32,
    wd: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> params: array<f32>;
@group(0) @binding(2) var<storage, read> grads: array<f32>;
@group(0) @binding(3) var<storage, read_write> mom: array<f32>;
@group(0) @binding(4) var<storage, read> hyper: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    let lr = hyper[p.off_h];
    let w = params[p.off_p + i];
    let d = grads[p.off_g + i] + p.wd * w;
    let b = p.mu * mom[p.off_m + i] + d;
    mom[p.off_m + i] = b;
    params[p.off_p + i] = w - lr * b;
}
