// Gradient accumulation in place: acc = beta * acc + grad, with beta = hyper[0] written by the
// host (0 for a step's first chunk, 1 after), so chunked training sums gradients on the device.

struct Params {
    n: u32,
    off_a: u32,
    off_g: u32,
    off_h: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> acc: array<f32>;
@group(0) @binding(2) var<storage, read> grads: array<f32>;
@group(0) @binding(3) var<storage, read> hyper: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.n) { return; }
    let beta = hyper[p.off_h];
    // beta = 0 must not keep a NaN or infinity left in the buffer.
    var a = 0.0;
    if (beta != 0.0) { a = beta * acc[p.off_a + i]; }
    acc[p.off_a + i] = a + grads[p.off_g + i];
}
