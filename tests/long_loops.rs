//! Kernels whose invocations loop over a long axis, against the f64 CPU reference. llvmpipe
//! (lavapipe) silently ends any loop after 65,535 iterations per invocation (counting nested
//! loops), so a kernel that walks a long axis serially returns a truncated sum there with no
//! error: a conv bias gradient over 32 images of 32 x 32 pixels summed only the first 13,107
//! terms. Every case here loops well past that limit in its naive form.

mod common;

use std::collections::HashMap;

use common::{input, Feeds, Rng};
use stablerep::graph::{Graph, NodeId};
use stablerep::kernels::reduce::ReduceOp;

fn check(what: &str, g: &Graph, feeds: &Feeds, outs: &[NodeId], rtol: f64, atol: f64) {
    common::gpu_matches_cpu(what, g, feeds, &HashMap::new(), outs, rtol, atol);
}

#[test]
fn sum_to_over_many_images_and_pixels() {
    // A conv bias gradient: [N, C, H, W] -> [C, 1, 1] over 45,000 terms per channel, and
    // one whose output is contiguous (vec4 path).
    let mut rng = Rng(1);
    for (shape, to) in [
        (vec![2, 3, 150, 150], vec![3, 1, 1]),
        (vec![70_001, 8], vec![8]),
        (vec![3, 70_001, 8], vec![3, 1, 8]),
    ] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let x = input(&mut g, &mut f, &mut rng, &shape, -1.0, 1.0);
        let y = g.sum_to(x, &to).unwrap();
        check(
            &format!("sum_to {shape:?} -> {to:?}"),
            &g,
            &f,
            &[y],
            1e-4,
            1e-2,
        );
    }
}

#[test]
fn reductions_along_a_long_prime_axis() {
    // 65,537 is prime, so the reduction cannot be split into equal chunks by reshaping.
    let mut rng = Rng(2);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        for (shape, axis) in [
            (vec![3, 65_537], 1),
            (vec![65_537, 4], 0),
            (vec![2, 65_537, 3], 1),
        ] {
            let mut g = Graph::new();
            let mut f = Feeds::new();
            let x = input(&mut g, &mut f, &mut rng, &shape, -1.0, 1.0);
            let y = g.reduce(op, x, axis).unwrap();
            check(&format!("{op:?} over {shape:?}"), &g, &f, &[y], 1e-4, 1e-2);
        }
    }
}

#[test]
fn matmul_with_a_long_contraction() {
    // Weight gradients contract over batch x positions; odd M and N take the checked path.
    let mut rng = Rng(3);
    for (m, n, k, ta) in [
        (3, 5, 70_001, false),
        (8, 8, 280_000, true),
        (5, 27, 65_536, true),
    ] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let a = input(
            &mut g,
            &mut f,
            &mut rng,
            &if ta { [k, m] } else { [m, k] },
            -1.0,
            1.0,
        );
        let b = input(&mut g, &mut f, &mut rng, &[k, n], -1.0, 1.0);
        let c = g.matmul_t(a, b, ta, false).unwrap();
        check(&format!("matmul {m}x{n}x{k}"), &g, &f, &[c], 1e-4, 5e-2);
    }
}

#[test]
fn an_f16_weight_with_a_too_long_contraction_is_refused() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 40_000]);
    let w = g.param_f16("w", &[3, 40_000]);
    let e = g.matmul_t(x, w, false, true).unwrap_err().to_string();
    assert!(e.contains("contraction of 40000"), "{e}");
}

#[test]
fn attention_over_many_keys() {
    // Stable Diffusion's self-attention at 512 x 512 attends over 4,096 latent positions.
    let mut rng = Rng(4);
    for d in [40, 64, 5] {
        let mut g = Graph::new();
        let mut f = Feeds::new();
        let q = input(&mut g, &mut f, &mut rng, &[2, 3, d], -1.0, 1.0);
        let k = input(&mut g, &mut f, &mut rng, &[2, 4096, d], -1.0, 1.0);
        let v = input(&mut g, &mut f, &mut rng, &[2, 4096, d], -1.0, 1.0);
        let y = g.attention(q, k, v, 1.0 / (d as f32).sqrt()).unwrap();
        check(&format!("attention d {d}"), &g, &f, &[y], 1e-4, 1e-4);
    }
}

#[test]
fn serial_ops_over_too_long_rows_are_refused_not_wrong() {
    // Row ops, BatchNorm, cross-entropy and the contrastive losses walk a row serially; past
    // the limit they say so at graph build instead of returning a truncated result.
    let mut g = Graph::new();
    let x = g.input("x", &[2, 40_000]);
    let e = g.softmax(x).unwrap_err().to_string();
    assert!(e.contains("40000 columns"), "{e}");
    let y = g.input("y", &[40_000, 3]);
    let (gm, bt) = (g.input("g", &[3]), g.input("b", &[3]));
    let e = g.batch_norm(y, gm, bt, 1, 1e-5).unwrap_err().to_string();
    assert!(e.contains("40000 rows per group"), "{e}");
    // Just inside the limits they compute the right numbers.
    let mut rng = Rng(5);
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let x = input(&mut g, &mut f, &mut rng, &[2, 16_000], -3.0, 3.0);
    let s = g.softmax(x).unwrap();
    let l = g.log_softmax(x).unwrap();
    let n = g.l2_normalize(x).unwrap();
    let gm = input(&mut g, &mut f, &mut rng, &[16_000], 0.5, 1.5);
    let bt = input(&mut g, &mut f, &mut rng, &[16_000], -0.5, 0.5);
    let ln = g.layer_norm(x, gm, bt, 1e-5).unwrap();
    check(
        "row ops over 16,000 columns",
        &g,
        &f,
        &[s, l, n, ln],
        1e-4,
        1e-6,
    );
    let mut g = Graph::new();
    let mut f = Feeds::new();
    let x = input(&mut g, &mut f, &mut rng, &[24_000, 3], -3.0, 3.0);
    let gm = input(&mut g, &mut f, &mut rng, &[3], 0.5, 1.5);
    let bt = input(&mut g, &mut f, &mut rng, &[3], -0.5, 0.5);
    let (y, _) = g.batch_norm(x, gm, bt, 1, 1e-5).unwrap();
    check("batch norm over 24,000 rows", &g, &f, &[y], 1e-4, 1e-4);
}
