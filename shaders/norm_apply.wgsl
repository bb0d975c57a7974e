// Normalization apply, one invocation per element of x viewed as [groups, rows, cols]:
// y = (x - mean) * rstd * gamma[col] + beta[col]. The statistics are per row (LayerNorm,
// stats [groups*rows, 2]) or per (group, col) (BatchNorm, stats [groups, 2, cols]): <STATS>.
// <ROWS> repeats p.rows and <UNITS> the row length in units of <TY> (f32, or vec4<f32> with
// <W> = 4 elements per invocation; x, y, gamma and beta offsets then count vec4s), as
// constants so the divisions are cheap.

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
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<{{TY}}>;
@group(0) @binding(4) var<storage, read> beta: array<{{TY}}>;
@group(0) @binding(5) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.groups * p.rows * {{UNITS}}u) { return; }
    let ci = i % {{UNITS}}u;
    let c = ci * {{W}}u;
    let row = i / {{UNITS}}u;
    let g = row / {{ROWS}}u;
{{STATS}}
    ys[p.off_y + i] = (xs[p.off_x + i] - mean) * rstd * gamma[p.off_g + ci] + beta[p.off_b + ci];
}
