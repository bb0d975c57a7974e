// im2col for 2-D convolution, consecutive samples and a range of output pixels of each:
// x [samples, C, H, W] -> cols [samples * count, C * KH * KW], row s * count + j the receptive
// field of output pixel first + j of sample s (zero outside the image), so that the
// convolution of those pixels is W cols^T with W viewed as [O, C * KH * KW]. One invocation
// per run of KW consecutive elements of cols (one kernel row ky of one channel: its index
// math is shared by the run, and the run reads KW neighbouring input pixels); every size is a
// compile-time constant (divisions become multiplies); the pixel range is in the uniform, so
// all chunks of a convolution share one pipeline. <XTY> and <YTY> are the storage types of x
// and the patches (f32, or f16 for activations stored in f16).

struct Params {
    // runs of KW elements in all
    runs: u32,
    off_x: u32,
    off_y: u32,
    first: u32,
    // count * C * KH: runs of one sample's patches
    per_sample: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<{{XTY}}>;
@group(0) @binding(2) var<storage, read_write> ys: array<{{YTY}}>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let q = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (q >= p.runs) { return; }
    let s = q / p.per_sample;
    let e = q % p.per_sample;
    // C * KH runs per output pixel.
    let px = p.first + e / {{CKH}}u;
    let r = e % {{CKH}}u;
    let c = r / {{KH}}u;
    let ky = r % {{KH}}u;
    let iy = i32((px / {{WO}}u) * {{S}}u + ky) - {{PAD}};
    let ix0 = i32((px % {{WO}}u) * {{S}}u) - {{PAD}};
    let out = p.off_y + q * {{KW}}u;
    let row_ok = iy >= 0 && iy < {{H}};
    let base = i32(p.off_x + s * {{CHW}}u + c * {{H}}u * {{W}}u) + iy * {{W}};
    for (var kx = 0; kx < {{KW}}; kx++) {
        let ix = ix0 + kx;
        var v = 0.0;
        if (row_ok && ix >= 0 && ix < {{W}}) {
            v = f32(xs[u32(base + ix)]);
        }
        ys[out + u32(kx)] = {{YTY}}(v);
    }
}
