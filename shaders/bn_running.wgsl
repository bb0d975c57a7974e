// BatchNorm running statistics, updated in place after a training step as PyTorch does when
// one BatchNorm module is applied to each of `groups` row groups in turn:
// for each group g: mean_r = (1 - mom) mean_r + mom mean_g,
//                   var_r = (1 - mom) var_r + mom var_g * rows / (rows - 1) (unbiased).
// stats is [groups, 2, cols] (mean, 1/sqrt(var + eps)); one invocation per column.

struct Params {
    groups: u32,
    rows: u32,
    cols: u32,
    off_m: u32,
    off_v: u32,
    off_s: u32,
    momentum: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> rmean: array<f32>;
@group(0) @binding(2) var<storage, read_write> rvar: array<f32>;
@group(0) @binding(3) var<storage, read> stats: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let c = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (c >= p.cols) { return; }
    var m = rmean[p.off_m + c];
    var v = rvar[p.off_v + c];
    let unbias = f32(p.rows) / f32(max(p.rows, 2u) - 1u);
    for (var g = 0u; g < p.groups; g++) {
        let mean = stats[p.off_s + g * 2u * p.cols + c];
        let rstd = stats[p.off_s + g * 2u * p.cols + p.cols + c];
        let var_b = 1.0 / (rstd * rstd) - p.eps;
        m = (1.0 - p.momentum) * m + p.momentum * mean;
        v = (1.0 - p.momentum) * v + p.momentum * var_b * unbias;
    }
    rmean[p.off_m + c] = m;
    rvar[p.off_v + c] = v;
}
