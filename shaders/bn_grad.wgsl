// BatchNorm input gradient (batch statistics), one invocation per element of x viewed as
// [groups, rows, cols]: dx = rstd * gamma * (dy - S_dy / n - xhat * S_dyxh / n), with the
// column sums from col_grad ([groups, 2, cols]: sum dy*xhat, sum dy) and n = rows.

struct Params {
    groups: u32,
    rows: u32,
    cols: u32,
    off_x: u32,
    off_s: u32,
    off_g: u32,
    off_sum: u32,
    off_dy: u32,
    off_y: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> sums: array<f32>;
@group(0) @binding(5) var<storage, read> dys: array<f32>;
@group(0) @binding(6) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.groups * p.rows * p.cols) { return; }
    let c = i % p.cols;
    let g = (i / p.cols) / p.rows;
    let sb = p.off_s + g * 2u * p.cols;
    let mean = stats[sb + c];
    let rstd = stats[sb + p.cols + c];
    let ub = p.off_sum + g * 2u * p.cols;
    let s_xh = sums[ub + c];
    let s_dy = sums[ub + p.cols + c];
    let inv = 1.0 / f32(p.rows);
    let xh = (xs[p.off_x + i] - mean) * rstd;
    ys[p.off_y + i] = rstd * gamma[p.off_g + c] * (dys[p.off_dy + i] - s_dy * inv - xh * s_xh * inv);
}
