// GroupNorm statistics: x is [rows, len] (rows = N * groups, each row one group of one sample,
// contiguous); writes [mean, 1/sqrt(biased var + eps)] per row. One workgroup of 256 per row:
// each invocation sums a strided share of the row, shifted by the row's first element (so a
// large mean does not cancel the variance away), then a tree reduction in workgroup memory.
// <TY> is f32 or vec4<f32>; <UNITS> is the row length in <TY> units (len / 4 for vec4).

struct Params {
    rows: u32,
    len: u32,
    off_x: u32,
    off_y: u32,
    eps: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read_write> ys: array<f32>;

var<workgroup> s1: array<f32, 256>;
var<workgroup> s2: array<f32, 256>;

fn hsum(v: {{TY}}) -> f32 {
{{HSUM}}
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg.x + wg.y * nwg.x;
    // Uniform control flow: every invocation of a workgroup shares r.
    let live = r < p.rows;
    let base = p.off_x + min(r, p.rows - 1u) * {{UNITS}}u;
    let pivot = {{PIVOT}};
    var a = 0.0;
    var b = 0.0;
    for (var i = lid.x; i < {{UNITS}}u; i += 256u) {
        let d = xs[base + i] - {{TY}}(pivot);
        a += hsum(d);
        b += hsum(d * d);
    }
    s1[lid.x] = a;
    s2[lid.x] = b;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid.x < w) {
            s1[lid.x] += s1[lid.x + w];
            s2[lid.x] += s2[lid.x + w];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u && live) {
        let n = f32(p.len);
        let m = s1[0] / n;
        let var_ = max(s2[0] / n - m * m, 0.0);
        ys[p.off_y + 2u * r] = pivot + m;
        ys[p.off_y + 2u * r + 1u] = inverseSqrt(var_ + p.eps);
    }
}
