// Multi-positive contrastive loss, one invocation per anchor row of a logit matrix S [rows, n]
// (rows may be a chunk starting at global row p.row0). Logits are S / tau; with mask_self the
// anchor's own column k is left out of the softmax (StableRep); the positives of row k are the
// columns j (other than a masked k) with j mod captions == k mod captions; the target is
// uniform over them.
// Forward: y[k] = logsumexp_j l_kj - mean_{j in P(k)} l_kj (0 without positives).
// Backward (upstream g [rows]): y[k, j] = g_k (q_kj - p_kj) / tau, 0 at a masked column.
// <BODY> selects the direction.

struct Params {
    rows: u32,
    n: u32,
    captions: u32,
    row0: u32,
    off_s: u32,
    off_g: u32,
    off_y: u32,
    mask_self: u32,
    inv_tau: f32,
    _p1: f32,
    _p2: f32,
    _p3: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ss: array<f32>;
{{EXTRA_BINDING}}
@group(0) @binding({{OUT_BINDING}}) var<storage, read_write> ys: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = (wg.x + wg.y * nwg.x) * 64u + lid.x;
    if (r >= p.rows) { return; }
    let k = p.row0 + r;
    let cap = k % p.captions;
    let sb = p.off_s + r * p.n;
    var mx = -3.4028235e38;
    for (var j = 0u; j < p.n; j++) {
        if (j != k || p.mask_self == 0u) { mx = max(mx, ss[sb + j] * p.inv_tau); }
    }
    var sum = 0.0;
    var pos = 0.0;
    var npos = 0u;
    for (var j = 0u; j < p.n; j++) {
        if (j != k || p.mask_self == 0u) {
            let l = ss[sb + j] * p.inv_tau;
            sum += exp(l - mx);
            if (j % p.captions == cap) {
                pos += l;
                npos += 1u;
            }
        }
    }
    let lse = mx + log(sum);
{{BODY}}
}
