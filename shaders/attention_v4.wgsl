// Fused attention forward with an online softmax, the vec4 variant for head widths that are a
// multiple of 4 (SD's 40, 80, 160 and the VAE's 512): o = softmax(q k^T * scale) v per
// (batch-head, query) without a score matrix. Each invocation owns <R> consecutive query rows
// of one batch-head (wg.y), held with their accumulators in vec4 registers (the launcher
// unrolls the code, so nothing sits in an indexed private array); every key and value vec4
// it loads serves all <R> rows, and its address is the same in the whole workgroup. The
// running max m, denominator l and accumulator a of each row are rescaled as keys arrive.
// Offsets count vec4s. <Q_TY>.. <O_TY> are vec4<f32> or vec4<f16> (activations stored in f16;
// the arithmetic is f32).

struct Params {
    bh: u32,
    tq: u32,
    tk: u32,
    off_q: u32,
    off_k: u32,
    off_v: u32,
    off_o: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qs: array<{{Q_TY}}>;
@group(0) @binding(2) var<storage, read> ks: array<{{K_TY}}>;
@group(0) @binding(3) var<storage, read> vs: array<{{V_TY}}>;
@group(0) @binding(4) var<storage, read_write> os: array<{{O_TY}}>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let b = wg.y;
    let row0 = (wg.x * 64u + lid.x) * {{R}}u;
    if (row0 >= p.tq) { return; }
    let kb = p.off_k + b * p.tk * {{N4}}u;
    let vb = p.off_v + b * p.tk * {{N4}}u;
    // Rows past the end repeat the last one (computed, not stored).
{{LOAD_Q}}
    for (var j = 0u; j < p.tk; j++) {
        let kr = kb + j * {{N4}}u;
        let vr = vb + j * {{N4}}u;
{{STEP}}
    }
{{STORE}}
}
