// Normalization apply, one invocation per element of x viewed as [groups, rows, cols]:
// y = (x - mean) * rstd * gamma[col] + beta[col]. The statistics are per row (LayerNorm,
// stats [groups*rows, 2]) or per (group, col) (BatchNorm, stats [groups, 2, cols]): <STATS>.
// <ROWS> and <COLS> repeat p.rows and p.cols as constants, so the divisions are cheap.

struct Params {
    groups: u32,
    rows: u32,
    cols: u32,
    off_x: u32,
    off_s: u32,
    off_g: u32,
    off_b: u32,
    off_y: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.groups * p.rows * p.cols) { return; }
    let c = i % {{COLS}}u;
    let row = i / {{COLS}}u;
    let g = row / {{ROWS}}u;
{{STATS}}
    ys[p.off_y + i] = (xs[p.off_x + i] - mean) * rstd * gamma[p.off_g + c] + beta[p.off_b + c];
}
