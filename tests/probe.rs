//! The linear probe on synthetic features: separable clusters are learned by the best head,
//! with and without the BatchNorm in front.

mod common;

use common::{gpu, Rng};
use stablerep::eval::linear::{linear_probe, ProbeConfig};

fn clusters(per: usize, rng: &mut Rng, centers: &[Vec<f64>]) -> (Vec<f32>, Vec<usize>) {
    let mut f = Vec::new();
    let mut l = Vec::new();
    for (c, center) in centers.iter().enumerate() {
        for _ in 0..per {
            f.extend(
                center
                    .iter()
                    .map(|x| (x + 0.6 * rng.range(-1.0, 1.0)) as f32 * 3.0 + 5.0),
            );
            l.push(c);
        }
    }
    (f, l)
}

#[test]
fn linear_probe_learns_separable_features() {
    let (gpu, _lock) = gpu();
    let mut rng = Rng(51);
    let (classes, dim) = (4, 12);
    let centers: Vec<Vec<f64>> = (0..classes)
        .map(|_| (0..dim).map(|_| rng.range(-1.0, 1.0)).collect())
        .collect();
    let (tr, trl) = clusters(40, &mut rng, &centers);
    let (te, tel) = clusters(15, &mut rng, &centers);
    for batch_norm in [true, false] {
        let cfg = ProbeConfig {
            base_lrs: vec![0.0, 0.5, 2.0],
            epochs: 15,
            batch: 32,
            batch_norm,
            seed: 3,
        };
        let (best, accs) = linear_probe(&gpu, &tr, &trl, &te, &tel, dim, classes, &cfg).unwrap();
        assert!(best > 0.9, "bn={batch_norm}: best {best}, heads {accs:?}");
        // The lr = 0 head never moves from its tiny random init: near chance.
        assert!(accs[0] < 0.7, "bn={batch_norm}: untrained head {accs:?}");
    }
}
