// Batched matmul for CPU adapters (lavapipe), where every storage load is a per-lane scalar
// loop and so costs far more than arithmetic. One workgroup is one subgroup of <S> lanes
// computing a <R> x (<S> * <TN>) block of C. Each lane loads a different slice of the A
// panel and the lanes share it with subgroupBroadcast (a register shuffle), so a lane issues
// R/S + TN vec4 loads per 4 steps of K for R * TN * 4 multiply-adds. Lane l owns the column
// groups 4l + 4Sj. Loads are clamped into the matrix; stores are guarded.
// Requires vec4-aligned operands (the launcher checks) and subgroups of exactly <S> lanes.
// With a bias binding the stores add bias[off_bias + column] (a fused `x W^T + b`), and with a residual binding
// res at C's position (`x + (h W^T + b)`). With a colsum binding (transposed A, batch 1) each
// lane also sums its A slices over K and the workgroups of the first column block store
// colsum[off_s + m] = sum_k A[k, m] (a bias gradient beside its weight gradient).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch_a: u32,
    batch_b: u32,
    batch_c: u32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    off_bias: u32,
    off_res: u32,
    off_s: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<{{A_TY}}>;
@group(0) @binding(2) var<storage, read> b: array<{{B_TY}}>;
@group(0) @binding(3) var<storage, read_write> c: array<{{C_TY}}>;
{{BIAS_BINDING}}

// Four f16 values packed in two words (weights stored at half size), widened to f32.
fn unpack4(w: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

@compute @workgroup_size({{S}}, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let bi = wg.z;
    let abase = p.off_a + bi * p.batch_a;
    let bbase = p.off_b + bi * p.batch_b;
    let cbase = p.off_c + bi * p.batch_c;
    let row0 = wg.y * {{R}}u;
    let colbase = wg.x * ({{S}}u * {{TN}}u) + 4u * lane;
{{ACC_DECL}}
    let k4 = p.k / 4u;
    for (var kq = 0u; kq < k4; kq++) {
        let k = kq * 4u;
{{STEP}}
    }
{{STORE}}
}
