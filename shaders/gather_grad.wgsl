// Embedding backward without atomics: dtable[v, c] = sum of dy[i, c] over all i with
// idx[i] == v, one invocation per table element. One dispatch reads positions j0..n; more
// positions than a chunk run as several dispatches adding to the table (`accumulate`), so no
// invocation loops past llvmpipe's 65,535 iterations.

struct Params {
    n: u32,
    dim: u32,
    vocab: u32,
    off_i: u32,
    off_dy: u32,
    off_y: u32,
    j0: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read> dys: array<f32>;
@group(0) @binding(3) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.vocab * p.dim) { return; }
    let v = i / p.dim;
    let c = i % p.dim;
    var acc = 0.0;
    for (var j = p.j0; j < p.n; j++) {
        if (min(idx[p.off_i + j], p.vocab - 1u) == v) { acc += dys[p.off_dy + j * p.dim + c]; }
    }
    if (p.accumulate != 0u) {
        ys[p.off_y + i] = ys[p.off_y + i] + acc;
    } else {
        ys[p.off_y + i] = acc;
    }
}
