// Row-wise ops on a [rows, len] matrix, one invocation per row (rows on a 2-D grid):
// softmax, causal softmax (row0 = global index of the chunk's first row), log-softmax, L2-normalize (y = x / max(|x|, eps)) and LayerNorm statistics
// (y = [mean, 1/sqrt(var + eps)] per row). <BODY> is the op; <TX>/<TY> are f32, or vec4<f32>
// for the vec4 bodies (len, off_x and, for softmax, off_y and out_len then count vec4s).

struct Params {
    rows: u32,
    len: u32,
    off_x: u32,
    off_y: u32,
    out_len: u32,
    eps: f32,
    row0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TX}}>;
@group(0) @binding(2) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (r >= p.rows) { return; }
    let xb = p.off_x + r * p.len;
    let yb = p.off_y + r * p.out_len;
{{BODY}}
}
