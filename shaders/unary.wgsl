// Elementwise unary op y = f(x) (also the scalar ops: affine, pow, clamp), one invocation per
// element on a 2-D grid. Template: <EXPR> in terms of x, p.alpha, p.beta.

struct Params {
    n: u32,
    off_x: u32,
    off_y: u32,
    _p0: u32,
    alpha: f32,
    beta: f32,
    _p1: f32,
    _p2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read_write> ys: array<f32>;

{{HELPERS}}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    let x = xs[p.off_x + i];
    ys[p.off_y + i] = {{EXPR}};
}
