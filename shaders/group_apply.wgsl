// GroupNorm apply over x [N, C, HW], one invocation per <TY> (f32, or vec4<f32> when HW is a
// multiple of 4): y = (x - mean[n, g]) * rstd[n, g] * gamma[c] + beta[c] with stats [N * G, 2]
// from group_stats, then SiLU when <SILU> (the resnet's GroupNorm -> SiLU, fused).
// <HWU> = HW in units, <C> channels, <CG> channels per group: constants, so the index
// divisions are cheap.

struct Params {
    units: u32,
    off_x: u32,
    off_s: u32,
    off_g: u32,
    off_b: u32,
    off_y: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.units) { return; }
    let nc = i / {{HWU}}u;
    let c = nc % {{C}}u;
    let row = (nc / {{C}}u) * ({{C}}u / {{CG}}u) + c / {{CG}}u;
    let mean = stats[p.off_s + 2u * row];
    let k = stats[p.off_s + 2u * row + 1u] * gamma[p.off_g + c];
    var y = (xs[p.off_x + i] - {{TY}}(mean)) * k + {{TY}}(beta[p.off_b + c]);
{{SILU}}
    ys[p.off_y + i] = y;
}
