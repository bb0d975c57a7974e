// Multi-head self-attention on the fused qkv projection's rows, forward and backward, with no
// head split or merge copies and no score matrix. One invocation per (sequence b, head h,
// token t), t fastest; rows of qkv hold [3][H][Dh] columns (timm's and CLIP's layout), the
// output's rows [H][Dh] (what the output projection reads). The launcher unrolls each head
// row into <C> registers of <TY> (f32, or vec4<f32> when the head width and offsets allow),
// so nothing sits in an indexed private array.
//   forward: y = softmax(q k^T * scale) v with an online softmax (running max m, sum l).
//   stats:   per query row, lse = log sum_j exp(s_j) and D = dy . y (FlashAttention's).
//   grad:    workgroups below nq own query rows and write dq = scale * sum_j ds_j k_j;
//            the rest own key rows and write dk = scale * sum_i ds_i q_i, dv = sum_i p_i dy_i,
//            with p = exp(s - lse) and ds = p (dy . v - D), all in qkv's layout.
// Offsets and row lengths count <TY> elements, except the statistics' (f32).

struct Params {
    n: u32,
    tokens: u32,
    heads: u32,
    row: u32,
    d: u32,
    off_qkv: u32,
    off_a: u32,
    off_b: u32,
    off_out: u32,
    nq: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
{{BINDINGS}}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let g = wg.x + wg.y * nwg.x;
    var i = g * 64u + lid.x;
    var key_side = false;
    if (g >= p.nq) {
        i = (g - p.nq) * 64u + lid.x;
        key_side = true;
    }
    if (i >= p.n) { return; }
    let t = i % p.tokens;
    let bh = i / p.tokens;
    let hd = bh % p.heads;
    let b = bh / p.heads;
    // q of token 0 of this sequence and head; token j's q, k, v at + j * row (+ d, + 2 d).
    let seq = p.off_qkv + b * p.tokens * p.row + hd * {{C}}u;
    // This token's output row (y, dy) for this head.
    let orow = (b * p.tokens + t) * p.d + hd * {{C}}u;
{{BODY}}
}
