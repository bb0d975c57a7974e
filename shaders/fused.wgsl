// Generated elementwise kernel: a fused chain of unary and binary ops (kernels::fused). The
// program, the leaf bindings, their index code and the loads are generated from a typed
// program; this file is the fixed frame. Leaves broadcast to the output with NumPy rules: the
// uniform holds the merged output shape, each leaf's offset and, per leaf, its strides (0 on
// broadcast dims). In the vec4 form (<OUT_TY> = vec4<f32>) each invocation writes 4 consecutive
// outputs along the innermost dim; shapes, strides and offsets are in units of each binding's
// element type.

struct Params {
    n: u32,
    rank: u32,
    off_y: u32,
    _p0: u32,
    shape: array<vec4<u32>, 2>,
    offs: array<vec4<u32>, 2>,
    st: array<vec4<u32>, {{STRIDE_VECS}}>,
}

@group(0) @binding(0) var<uniform> p: Params;
{{LEAVES}}
@group(0) @binding({{OUT_BINDING}}) var<storage, read_write> ys: array<{{OUT_TY}}>;

{{HELPERS}}

{{PROGRAM}}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
{{INDEX}}
{{LOADS}}
    ys[p.off_y + i] = {{RESULT}};
}
