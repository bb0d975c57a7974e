// BatchNorm batch statistics: x is [groups, rows, cols]; for every (group, col) writes
// mean and 1/sqrt(biased var + eps) to y[group, 0, col] and y[group, 1, col].

struct Params {
    groups: u32,
    rows: u32,
    cols: u32,
    off_x: u32,
    off_y: u32,
    _p0: u32,
    eps: f32,
    _p1: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (i >= p.groups * p.cols) { return; }
    let g = i / p.cols;
    let c = i % p.cols;
    let base = p.off_x + g * p.rows * p.cols + c;
    var s = 0.0;
    for (var r = 0u; r < p.rows; r++) { s += xs[base + r * p.cols]; }
    let mean = s / f32(p.rows);
    var v = 0.0;
    for (var r = 0u; r < p.rows; r++) { let d = xs[base + r * p.cols] - mean; v += d * d; }
    v = v / f32(p.rows);
    ys[p.off_y + g * 2u * p.cols + c] = mean;
    ys[p.off_y + g * 2u * p.cols + p.cols + c] = inverseSqrt(v + p.eps);
}
