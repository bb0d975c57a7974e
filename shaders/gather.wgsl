// Embedding lookup: y[i, :] = table[idx[i], :] (indices clamped into the table; the host
// validates them on upload).

struct Params {
    n: u32,
    dim: u32,
    vocab: u32,
    off_t: u32,
    off_i: u32,
    off_y: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n * p.dim) { return; }
    let row = i / p.dim;
    let c = i % p.dim;
    let t = min(idx[p.off_i + row], p.vocab - 1u);
    ys[p.off_y + i] = table[p.off_t + t * p.dim + c];
}
