// Elementwise unary op y = f(x) (also the scalar ops: affine, pow, clamp) on a 2-D grid.
// Template: <EXPR> is f in terms of x, p.alpha, p.beta; <TY> is f32, or vec4<f32> when the
// launcher found the tensor vec4-aligned (each invocation then handles 4 elements, which
// quarters the per-lane load loops on CPU adapters). n and offsets are in units of TY.

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
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read_write> ys: array<{{TY}}>;

{{HELPERS}}

fn f(x: f32) -> f32 {
    return {{EXPR}};
}

fn apply(v: f32) -> f32 { return f(v); }
fn apply4(v: vec4<f32>) -> vec4<f32> { return vec4<f32>(f(v.x), f(v.y), f(v.z), f(v.w)); }

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    ys[p.off_y + i] = {{APPLY}}(xs[p.off_x + i]);
}
