// col2im, the adjoint of im2col: the gradient of consecutive samples' images [samples, C, H, W]
// from the gradient of their patches cols [samples * count, C * KH * KW] for output pixels
// first..first+count of each.
// Gather form (no atomics): one invocation per image element sums the patch entries that read
// it, i.e. every kernel offset (ky, kx) whose output pixel ((iy + PAD - ky) / S, (ix + PAD -
// kx) / S) divides evenly, lies in the output and in the pixel range.

struct Params {
    total: u32,
    off_x: u32,
    off_y: u32,
    first: u32,
    count: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 256u + lid.x;
    if (i >= p.total) { return; }
    let s = i / {{CHW}}u;
    let c = (i % {{CHW}}u) / ({{H}}u * {{W}}u);
    let iy = i32((i / {{W}}u) % {{H}}u);
    let ix = i32(i % {{W}}u);
    var acc = 0.0;
    for (var ky = 0; ky < {{KH}}; ky++) {
        let ny = iy + {{PAD}} - ky;
        if (ny < 0 || ny % {{S}} != 0) { continue; }
        let oy = ny / {{S}};
        if (oy >= {{HO}}) { continue; }
        for (var kx = 0; kx < {{KW}}; kx++) {
            let nx = ix + {{PAD}} - kx;
            if (nx < 0 || nx % {{S}} != 0) { continue; }
            let ox = nx / {{S}};
            if (ox >= {{WO}}) { continue; }
            let px = u32(oy * {{WO}} + ox);
            if (px < p.first || px >= p.first + p.count) { continue; }
            let r = c * {{KK}}u + u32(ky * {{KW}} + kx);
            acc += xs[p.off_x + (s * p.count + px - p.first) * {{R}}u + r];
        }
    }
    ys[p.off_y + i] = acc;
}
