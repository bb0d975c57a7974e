// Column sums for normalization backward, with x viewed as [groups, rows, cols]:
// y[group, 0, col] = sum dy * xhat and y[group, 1, col] = sum dy over the group's rows.
// xhat uses per-row statistics (LayerNorm: gamma/beta gradients) or per-(group, col)
// statistics (BatchNorm), chosen by <XHAT>. <TY> vec4<f32> sums 4 columns per invocation
// (cols and offsets then count vec4s; <W> elements per unit, c the first element's column).

struct Params {
    groups: u32,
    rows: u32,
    cols: u32,
    off_x: u32,
    off_s: u32,
    off_dy: u32,
    off_y: u32,
    _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> dys: array<{{TY}}>;
@group(0) @binding(4) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (i >= p.groups * p.cols) { return; }
    let g = i / p.cols;
    let cu = i % p.cols;
    let c = cu * {{W}}u;
    var s_xh = {{TY}}(0.0);
    var s_dy = {{TY}}(0.0);
    for (var r = 0u; r < p.rows; r++) {
        let row = g * p.rows + r;
        let x = xs[p.off_x + row * p.cols + cu];
        let dy = dys[p.off_dy + row * p.cols + cu];
        let xh = {{XHAT}};
        s_xh += dy * xh;
        s_dy += dy;
    }
    ys[p.off_y + g * 2u * p.cols + cu] = s_xh;
    ys[p.off_y + g * 2u * p.cols + p.cols + cu] = s_dy;
}
