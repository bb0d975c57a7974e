// LayerNorm forward in one pass per row, one invocation per row of x [rows, len]: the row's
// statistics [mean, 1/sqrt(var + eps)] (written to stats [rows, 2], which the backward reads)
// and y = (x - mean) * rstd * gamma + beta. The same expressions, in the same order, as the
// statistics row op and norm_apply, so the result equals the two-kernel form. <TY> is f32, or
// vec4<f32> when len and the offsets of x, gamma, beta and y are multiples of 4 (they then
// count vec4s). <N> is the row's element count (len, or len * 4) and <SUM_S>/<SUM_V> the sums
// of s and v (s, or dot(s, vec4(1.0))).

struct Params {
    rows: u32,
    len: u32,
    off_x: u32,
    off_s: u32,
    off_g: u32,
    off_b: u32,
    off_y: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<{{TY}}>;
@group(0) @binding(4) var<storage, read> beta: array<{{TY}}>;
@group(0) @binding(5) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (r >= p.rows) { return; }
    let xb = p.off_x + r * p.len;
    let yb = p.off_y + r * p.len;
    var s = {{TY}}(0.0);
    for (var c = 0u; c < p.len; c++) { s += xs[xb + c]; }
    let mean = {{SUM_S}} / f32({{N}});
    var v = {{TY}}(0.0);
    for (var c = 0u; c < p.len; c++) { let d = xs[xb + c] - mean; v += d * d; }
    let rstd = inverseSqrt({{SUM_V}} / f32({{N}}) + p.eps);
    stats[p.off_s + 2u * r] = mean;
    stats[p.off_s + 2u * r + 1u] = rstd;
    for (var c = 0u; c < p.len; c++) {
        ys[yb + c] = (xs[xb + c] - mean) * rstd * gamma[p.off_g + c] + beta[p.off_b + c];
    }
}
