// Embedding backward from a host-built index (CSR by table row): rows[offs[v] .. offs[v + 1]]
// are the positions i with idx[i] == v. dtable[v, c] = sum of dy[i, c] over them, one
// invocation per table element; no atomics, deterministic, O(vocab * dim + n * dim).

struct Params {
    n: u32,
    dim: u32,
    vocab: u32,
    off_o: u32,
    off_r: u32,
    off_dy: u32,
    off_y: u32,
    _p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> offs: array<u32>;
@group(0) @binding(2) var<storage, read> rows: array<u32>;
@group(0) @binding(3) var<storage, read> dys: array<f32>;
@group(0) @binding(4) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.vocab * p.dim) { return; }
    let v = i / p.dim;
    let c = i % p.dim;
    let end = min(offs[p.off_o + v + 1u], p.n);
    var acc = 0.0;
    for (var q = offs[p.off_o + v]; q < end; q++) {
        acc += dys[p.off_dy + min(rows[p.off_r + q], p.n - 1u) * p.dim + c];
    }
    ys[p.off_y + i] = acc;
}
