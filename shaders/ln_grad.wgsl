// LayerNorm input gradient, one invocation per row, from x, the row statistics
// [mean, rstd], gamma and dy: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma.
// <TY> vec4<f32> processes 4 columns per step (p.len and the x, gamma, dy, y offsets then count
// vec4s; <W> = 4 elements per unit). <RES_BINDING> optionally declares a residual gradient
// that <RES> adds in the store (the backward of `x + f(layer_norm(x))` in one dispatch).

struct Params {
    rows: u32,
    len: u32,
    off_x: u32,
    off_s: u32,
    off_g: u32,
    off_dy: u32,
    off_y: u32,
    off_r: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<{{TY}}>;
@group(0) @binding(4) var<storage, read> dys: array<{{TY}}>;
@group(0) @binding(5) var<storage, read_write> ys: array<{{TY}}>;
{{RES_BINDING}}

fn total(v: {{TY}}) -> f32 {
    return {{TOTAL}};
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (r >= p.rows) { return; }
    let mean = stats[p.off_s + 2u * r];
    let rstd = stats[p.off_s + 2u * r + 1u];
    let xb = p.off_x + r * p.len;
    let db = p.off_dy + r * p.len;
    var s1 = {{TY}}(0.0);
    var s2 = {{TY}}(0.0);
    for (var c = 0u; c < p.len; c++) {
        let g = dys[db + c] * gamma[p.off_g + c];
        let xh = (xs[xb + c] - mean) * rstd;
        s1 += g;
        s2 += g * xh;
    }
    let inv = 1.0 / f32(p.len * {{W}}u);
    let m1 = total(s1) * inv;
    let m2 = total(s2) * inv;
    for (var c = 0u; c < p.len; c++) {
        let g = dys[db + c] * gamma[p.off_g + c];
        let xh = (xs[xb + c] - mean) * rstd;
        ys[p.off_y + r * p.len + c] = rstd * (g - m1 - xh * m2){{RES}};
    }
}
