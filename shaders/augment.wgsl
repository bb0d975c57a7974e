// GPU image augmentation (StableRep's strong SimCLR pipeline), one invocation per output
// pixel of one image. Per-image parameters (16 floats, see src/data/augment.rs):
//   [x0, y0, crop_w, crop_h, flip, jitter, brightness, contrast, saturation, hue,
//    order0, order1, order2, order3, grayscale, sigma]
// The pipeline runs in stages (<STAGE>):
//   pre:  crop + bilinear resize + flip, then the jitter ops that come before contrast
//   post: contrast (with the per-image gray mean), the jitter ops after it, grayscale
//   blur_h / blur_v: separable Gaussian blur (reflect padding); blur_v also normalizes.
// Jitter op ids: 0 brightness, 1 contrast, 2 saturation, 3 hue; each result is clamped to
// [0, 1] as torchvision does.

struct Params {
    batch: u32,
    size: u32,
    src_h: u32,
    src_w: u32,
    off_x: u32,
    off_p: u32,
    off_m: u32,
    off_y: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> xs: array<f32>;
@group(0) @binding(2) var<storage, read> prm: array<f32>;
{{EXTRA_BINDING}}
@group(0) @binding({{OUT_BINDING}}) var<storage, read_write> ys: array<f32>;

fn par(b: u32, i: u32) -> f32 { return prm[p.off_p + b * 16u + i]; }

fn gray(c: vec3<f32>) -> f32 { return 0.299 * c.x + 0.587 * c.y + 0.114 * c.z; }

fn rgb_to_hsv(c: vec3<f32>) -> vec3<f32> {
    let mx = max(c.x, max(c.y, c.z));
    let mn = min(c.x, min(c.y, c.z));
    let d = mx - mn;
    var h = 0.0;
    if (d > 0.0) {
        if (mx == c.x) { h = (c.y - c.z) / d; }
        else if (mx == c.y) { h = 2.0 + (c.z - c.x) / d; }
        else { h = 4.0 + (c.x - c.y) / d; }
        h = fract(h / 6.0 + 1.0);
    }
    let s = select(0.0, d / mx, mx > 0.0);
    return vec3<f32>(h, s, mx);
}

fn hsv_to_rgb(c: vec3<f32>) -> vec3<f32> {
    let h6 = fract(c.x) * 6.0;
    let i = floor(h6);
    let f = h6 - i;
    let v = c.z;
    let pp = v * (1.0 - c.y);
    let q = v * (1.0 - c.y * f);
    let t = v * (1.0 - c.y * (1.0 - f));
    let k = u32(i) % 6u;
    if (k == 0u) { return vec3<f32>(v, t, pp); }
    if (k == 1u) { return vec3<f32>(q, v, pp); }
    if (k == 2u) { return vec3<f32>(pp, v, t); }
    if (k == 3u) { return vec3<f32>(pp, q, v); }
    if (k == 4u) { return vec3<f32>(t, pp, v); }
    return vec3<f32>(v, pp, q);
}

// One jitter op (not contrast) on a pixel.
fn jitter(op: u32, c: vec3<f32>, b: u32) -> vec3<f32> {
    if (op == 0u) { return clamp(c * par(b, 6u), vec3<f32>(0.0), vec3<f32>(1.0)); }
    if (op == 2u) {
        let s = par(b, 8u);
        return clamp(c * s + vec3<f32>(gray(c) * (1.0 - s)), vec3<f32>(0.0), vec3<f32>(1.0));
    }
    if (op == 3u) {
        var hsv = rgb_to_hsv(c);
        hsv.x = fract(hsv.x + par(b, 9u) + 1.0);
        return clamp(hsv_to_rgb(hsv), vec3<f32>(0.0), vec3<f32>(1.0));
    }
    return c;
}

// Position of contrast (op 1) in this image's order (4 if jitter is off).
fn contrast_pos(b: u32) -> u32 {
    if (par(b, 5u) < 0.5) { return 4u; }
    for (var k = 0u; k < 4u; k++) {
        if (u32(par(b, 10u + k)) == 1u) { return k; }
    }
    return 4u;
}

fn px(b: u32, y: u32, x: u32) -> vec3<f32> {
    let plane = p.size * p.size;
    let base = p.off_x + b * 3u * plane + y * p.size + x;
    return vec3<f32>(xs[base], xs[base + plane], xs[base + 2u * plane]);
}

fn store(b: u32, y: u32, x: u32, c: vec3<f32>) {
    let plane = p.size * p.size;
    let base = p.off_y + b * 3u * plane + y * p.size + x;
    ys[base] = c.x;
    ys[base + plane] = c.y;
    ys[base + 2u * plane] = c.z;
}

fn src(b: u32, c: u32, y: i32, x: i32) -> f32 {
    let yy = u32(clamp(y, 0, i32(p.src_h) - 1));
    let xx = u32(clamp(x, 0, i32(p.src_w) - 1));
    return xs[p.off_x + b * 3u * p.src_h * p.src_w + c * p.src_h * p.src_w + yy * p.src_w + xx];
}

fn reflect(i: i32, n: i32) -> i32 {
    var j = i;
    if (j < 0) { j = -j; }
    if (j >= n) { j = 2 * n - 2 - j; }
    return clamp(j, 0, n - 1);
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    let plane = p.size * p.size;
    if (i >= p.batch * plane) { return; }
    let b = i / plane;
    let y = (i % plane) / p.size;
    let x = i % p.size;
{{BODY}}
}
