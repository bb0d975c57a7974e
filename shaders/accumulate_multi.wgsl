// Gradient accumulation on many tensors in one dispatch, in place: acc = beta * acc + grad
// with beta = hyper[0] (0 for a step's first chunk: the old contents, NaN included, are
// ignored), the arithmetic of accumulate.wgsl. `table` holds one 4-word entry per tensor
// (offset in acc, offset in grads, length, first workgroup), then one word per workgroup: the
// entry it works on. A workgroup takes 1,024 consecutive units of one tensor (invocation k:
// units k, k + 256, k + 512, k + 768), a unit being one element or, in the vec4 form
// (<TY> vec4<f32>), four; offsets and lengths count units (see adamw_multi.wgsl).

struct Params {
    count: u32,
    groups: u32,
    off_h: u32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> acc: array<{{TY}}>;
@group(0) @binding(2) var<storage, read> grads: array<{{TY}}>;
@group(0) @binding(3) var<storage, read> hyper: array<f32>;
@group(0) @binding(4) var<storage, read> table: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = wg.x + wg.y * nwg.x;
    if (w >= p.groups) { return; }
    let e = table[p.count * 4u + w] * 4u;
    let oa = table[e];
    let og = table[e + 1u];
    let n = table[e + 2u];
    let base = (w - table[e + 3u]) * 1024u + lid.x;
    let beta = hyper[p.off_h];
    for (var k = 0u; k < 4u; k = k + 1u) {
        let i = base + k * 256u;
        if (i >= n) { return; }
        var a = {{TY}}(0.0);
        if (beta != 0.0) { a = beta * acc[oa + i]; }
        acc[oa + i] = a + grads[og + i];
    }
}
