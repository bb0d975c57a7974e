// Reduction along one axis of a tensor viewed as [outer, len, inner]: one invocation per
// output element (<TY> f32), or per 4 adjacent outputs (<TY> vec4<f32>: inner and offsets then
// count vec4s). <INIT>, <STEP> (acc, v) and <FINISH> (acc, p.len) define the op, <COMBINE>
// (old, r) merges a chunk's result into what earlier chunks wrote. One dispatch covers the
// chunk t0..t1 of the axis; a long axis runs as several dispatches (the first with
// `accumulate` 0), so no invocation loops more than a chunk (llvmpipe ends loops after
// 65,535 iterations).

struct Params {
    outer: u32,
    len: u32,
    inner: u32,
    off_x: u32,
    off_y: u32,
    t0: u32,
    t1: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{TY}}>;
@group(0) @binding(2) var<storage, read_write> ys: array<{{TY}}>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.outer * p.inner) { return; }
    let o = i / p.inner;
    let j = i % p.inner;
    let base = p.off_x + o * p.len * p.inner + j;
    var acc = {{INIT}};
    for (var t = p.t0; t < p.t1; t++) {
        let v = xs[base + t * p.inner];
        acc = {{STEP}};
    }
    let r = {{FINISH}};
    if (p.accumulate != 0u) {
        let old = ys[p.off_y + i];
        ys[p.off_y + i] = {{COMBINE}};
    } else {
        ys[p.off_y + i] = r;
    }
}
