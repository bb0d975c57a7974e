// im2col for 2-D convolution, consecutive samples and a range of output pixels of each:
// x [samples, C, H, W] -> cols [samples * count, C * KH * KW], row s * count + j the receptive
// field of output pixel first + j of sample s (zero outside the image), so that the
// convolution of those pixels is W cols^T with W viewed as [O, C * KH * KW]. One invocation
// per element of cols; every size is a compile-time constant (divisions become multiplies);
// the pixel range is in the uniform, so all chunks of a convolution share one pipeline.

struct Params {
    total: u32,
    off_x: u32,
    off_y: u32,
    first: u32,
    // count * R: elements of one sample's patches
    per_sample: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.total) { return; }
    let s = i / p.per_sample;
    let e = i % p.per_sample;
    let r = e % {{R}}u;
    let px = p.first + e / {{R}}u;
    let c = r / {{KK}}u;
    let k = r % {{KK}}u;
    let ky = k / {{KW}}u;
    let kx = k % {{KW}}u;
    let iy = i32((px / {{WO}}u) * {{S}}u + ky) - {{PAD}};
    let ix = i32((px % {{WO}}u) * {{S}}u + kx) - {{PAD}};
    var v = 0.0;
    if (iy >= 0 && iy < {{H}} && ix >= 0 && ix < {{W}}) {
        v = xs[p.off_x + s * {{CHW}}u + (c * {{H}}u + u32(iy)) * {{W}}u + u32(ix)];
    }
    ys[p.off_y + i] = v;
}
