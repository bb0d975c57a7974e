// Softmax cross-entropy against integer labels, one invocation per row of logits [rows, len].
// Forward: y[r] = logsumexp(x[r]) - x[r, label[r]]. Backward (with the upstream per-row
// gradient g): y[r, c] = g[r] * (softmax(x[r])[c] - [c == label[r]]). <BODY> selects.

struct Params {
    rows: u32,
    len: u32,
    off_x: u32,
    off_l: u32,
    off_g: u32,
    off_y: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
{{EXTRA_BINDING}}
@group(0) @binding({{OUT_BINDING}}) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (r >= p.rows) { return; }
    let xb = p.off_x + r * p.len;
    let label = min(labels[p.off_l + r], p.len - 1u);
    var mx = xs[xb];
    for (var c = 1u; c < p.len; c++) { mx = max(mx, xs[xb + c]); }
    var s = 0.0;
    for (var c = 0u; c < p.len; c++) { s += exp(xs[xb + c] - mx); }
{{BODY}}
}
