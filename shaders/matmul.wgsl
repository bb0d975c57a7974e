// Batched matmul C[b] = op(A[b]) * op(B[b]), register-blocked: each invocation computes a
// TM x TN block of C held in vec4 registers, reading A and B straight from storage (vec4 loads
// where the layout allows). No workgroup memory and no barriers: on CPU adapters (lavapipe) this
// beats shared-memory tiling by an order of magnitude.
// A is [M, K] (or [K, M] when transposed), B is [K, N] (or [N, K]); batch strides in elements,
// 0 broadcasts an operand over the batch. Invocations whose block lies fully inside C take the
// fast path without bounds checks; edge invocations take a checked scalar path.
// Template parameters (filled by src/kernels/matmul.rs): <TM> <TN> <WX> <WY>,
// <A_TY> <B_TY> <C_TY> (f32 or vec4<f32>), and generated code blocks. With a bias binding the
// stores add bias[off_bias + column] (a fused `x W^T + b`), and with a residual binding
// res at C's position (`x + (h W^T + b)`). With a colsum binding (transposed A, batch 1) every
// invocation also sums its rows of op(A) over K and those at column 0 store
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

// A(m, k) and B(k, n) as scalars, zero outside the matrix (the checked path).
fn a_at(base: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) { return 0.0; }
{{A_SCALAR}}
}

fn b_at(base: u32, k: u32, n: u32) -> f32 {
    if (k >= p.k || n >= p.n) { return 0.0; }
{{B_SCALAR}}
}

@compute @workgroup_size({{WX}}, {{WY}}, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let bi = wg.z;
    let abase = p.off_a + bi * p.batch_a;
    let bbase = p.off_b + bi * p.batch_b;
    let cbase = p.off_c + bi * p.batch_c;
    let col0 = (wg.x * {{WX}}u + lid.x) * {{TN}}u;
    let row0 = (wg.y * {{WY}}u + lid.y) * {{TM}}u;
    if (row0 >= p.m || col0 >= p.n) { return; }
{{ACC_DECL}}
    if (row0 + {{TM}}u <= p.m && col0 + {{TN}}u <= p.n) {
        let k4 = p.k / 4u;
        for (var kq = 0u; kq < k4; kq++) {
            let k = kq * 4u;
{{FAST_STEP}}
        }
        for (var k = k4 * 4u; k < p.k; k++) {
{{TAIL_STEP}}
        }
{{FAST_STORE}}
    } else {
        for (var k = 0u; k < p.k; k++) {
{{CHECKED_STEP}}
        }
{{CHECKED_STORE}}
    }
}
