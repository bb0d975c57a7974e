// Fused attention forward with an online softmax (inference): o = softmax(q k^T * scale) v per
// (batch-head, query), never materializing the score matrix. One invocation per query row;
// q, o [BH, Tq, DH], k, v [BH, Tk, DH]; the running max m, denominator l and accumulator acc
// are rescaled as each key arrives. <DH> is the head width (a compile-time constant).
// A workgroup's queries share one batch-head (wg.y), so every key and value load has the same
// address in all invocations: a GPU broadcasts it from cache, and lavapipe turns it into one
// scalar load instead of a per-lane loop.

struct Params {
    bh: u32,
    tq: u32,
    tk: u32,
    off_q: u32,
    off_k: u32,
    off_v: u32,
    off_o: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qs: array<{{Q_TY}}>;
@group(0) @binding(2) var<storage, read> ks: array<{{K_TY}}>;
@group(0) @binding(3) var<storage, read> vs: array<{{V_TY}}>;
@group(0) @binding(4) var<storage, read_write> os: array<{{O_TY}}>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = wg.y;
    let row = wg.x * 64u + lid.x;
    if (row >= p.tq) { return; }
    let i = b * p.tq + row;
    let qb = p.off_q + i * {{DH}}u;
    let kb = p.off_k + b * p.tk * {{DH}}u;
    let vb = p.off_v + b * p.tk * {{DH}}u;
    var q: array<f32, {{DH}}>;
    var acc: array<f32, {{DH}}>;
    for (var d = 0u; d < {{DH}}u; d++) {
        q[d] = f32(qs[qb + d]) * p.scale;
        acc[d] = 0.0;
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j < p.tk; j++) {
        var s = 0.0;
        for (var d = 0u; d < {{DH}}u; d++) {
            s += q[d] * f32(ks[kb + j * {{DH}}u + d]);
        }
        let mn = max(m, s);
        let c = exp(m - mn);
        let e = exp(s - mn);
        l = l * c + e;
        for (var d = 0u; d < {{DH}}u; d++) {
            acc[d] = acc[d] * c + e * f32(vs[vb + j * {{DH}}u + d]);
        }
        m = mn;
    }
    let inv = 1.0 / l;
    for (var d = 0u; d < {{DH}}u; d++) {
        os[p.off_o + i * {{DH}}u + d] = {{O_TY}}(acc[d] * inv);
    }
}
