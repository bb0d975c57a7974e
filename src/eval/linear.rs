//! The linear probe of the official evaluation on frozen features: optional BatchNorm without
//! affine (batch statistics while training, running statistics at test), one linear classifier
//! per learning rate trained in parallel in one graph (the summed cross-entropies), SGD with
//! momentum 0.9 and no weight decay, cosine learning rate per iteration; the reported accuracy
//! is the best head on the test set (as the official script reports).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{DType, Graph, NodeId, ParamStore, Plan, PlanOptions};
use crate::kernels::elementwise::UnaryOp;
use crate::nn::schedule::Schedule;
use crate::util::rng::Rng;

/// Linear-probe settings.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Base learning rates (one head each); lr = blr * batch / 256.
    pub base_lrs: Vec<f64>,
    /// Epochs over the training features.
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// Prepend BatchNorm without affine (eps 1e-6).
    pub batch_norm: bool,
    /// Seed (initialization and shuffling).
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            base_lrs: vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
            epochs: 90,
            batch: 256,
            batch_norm: true,
            seed: 0,
        }
    }
}

const BN_EPS: f32 = 1e-6;

/// Normalizes with BatchNorm (no affine): batch statistics when `running` is None, otherwise
/// the running mean and variance.
fn bn(
    g: &mut Graph,
    x: NodeId,
    running: Option<(NodeId, NodeId)>,
) -> Result<(NodeId, Option<NodeId>)> {
    let c = g.shape(x)[1];
    let ones = g.constant(1.0, &[c]);
    let zeros = g.constant(0.0, &[c]);
    match running {
        None => {
            let (y, stats) = g.batch_norm(x, ones, zeros, 1, BN_EPS)?;
            Ok((y, Some(stats)))
        }
        Some((mean, var)) => {
            let rstd = g.unary(UnaryOp::Affine(1.0, BN_EPS), var)?;
            let rstd = g.unary(UnaryOp::Rsqrt, rstd)?;
            let m = g.reshape(mean, &[1, 1, c])?;
            let r = g.reshape(rstd, &[1, 1, c])?;
            let stats = g.concat(&[m, r], 1)?;
            let s = g.shape(x).to_vec();
            let y = g.push(
                crate::graph::Op::NormApply {
                    stats: crate::graph::Stats::Col,
                    groups: 1,
                },
                vec![x, stats, ones, zeros],
                s,
                DType::F32,
            );
            Ok((y, None))
        }
    }
}

/// Trains the heads on (train, train_labels) and returns the best head's top-1 accuracy on
/// (test, test_labels), with each head's accuracy.
#[allow(clippy::too_many_arguments)]
pub fn linear_probe(
    gpu: &Arc<Gpu>,
    train: &[f32],
    train_labels: &[usize],
    test: &[f32],
    test_labels: &[usize],
    dim: usize,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<(f64, Vec<f64>)> {
    let n = train_labels.len();
    let b = cfg.batch.min(n);
    if b == 0
        || train.len() != n * dim
        || test.len() != test_labels.len() * dim
        || cfg.base_lrs.is_empty()
    {
        return Err(Error::Config(
            "linear probe: empty or inconsistent features".into(),
        ));
    }
    let heads = cfg.base_lrs.len();
    // Training graph.
    let mut g = Graph::new();
    let x = g.input("features", &[b, dim]);
    let y = g.input_typed("labels", &[b], DType::U32);
    let (h, stats) = if cfg.batch_norm {
        bn(&mut g, x, None)?
    } else {
        (x, None)
    };
    let mut total = None;
    let mut hypers = Vec::new();
    for l in 0..heads {
        let w = g.param(&format!("head{l}.weight"), &[classes, dim]);
        let bias = g.param(&format!("head{l}.bias"), &[classes]);
        let logits = g.matmul_t(h, w, false, true)?;
        let logits = g.add(logits, bias)?;
        let ce = g.cross_entropy(logits, y)?;
        let loss = g.mean_all(ce)?;
        total = Some(match total {
            None => loss,
            Some(t) => g.add(t, loss)?,
        });
        let grads = g.grad(loss, &[w, bias])?;
        hypers.push(g.sgd(&[w, bias], &grads, 0.9, 0.0)?);
    }
    let total = total.expect("at least one head");
    if let Some(st) = stats {
        g.bn_running_update("probe.bn", st, 0.1, BN_EPS)?;
    }
    let mut store = ParamStore::new();
    let mut rng = Rng(cfg.seed);
    for l in 0..heads {
        let wdata: Vec<f32> = (0..classes * dim)
            .map(|_| (0.01 * rng.normal()) as f32)
            .collect();
        store.set(gpu, &format!("head{l}.weight"), &[classes, dim], &wdata)?;
        store.set(
            gpu,
            &format!("head{l}.bias"),
            &[classes],
            &vec![0.0; classes],
        )?;
    }
    let plan = Plan::compile(gpu, &g, &[total], &mut store, PlanOptions::default())?;
    let steps_per_epoch = n / b;
    let total_steps = (steps_per_epoch * cfg.epochs) as u64;
    let schedule = Schedule::Cosine {
        warmup: 0,
        total: total_steps,
    };
    let mut order: Vec<usize> = (0..n).collect();
    let mut step = 0u64;
    for _ in 0..cfg.epochs {
        rng.shuffle(&mut order);
        for s in 0..steps_per_epoch {
            let idx = &order[s * b..(s + 1) * b];
            let xb: Vec<f32> = idx
                .iter()
                .flat_map(|&i| train[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            let yb: Vec<u32> = idx.iter().map(|&i| train_labels[i] as u32).collect();
            plan.write(x, &xb)?;
            plan.write_u32(y, &yb)?;
            for (l, &hp) in hypers.iter().enumerate() {
                let lr = schedule.lr(cfg.base_lrs[l] * b as f64 / 256.0, step);
                plan.write(hp, &[lr as f32])?;
            }
            plan.run()?;
            step += 1;
        }
    }
    gpu.wait()?;
    // Test graph: running statistics, every head's logits.
    let nt = test_labels.len();
    let mut tg = Graph::new();
    let tx = tg.input("features", &[nt, dim]);
    let th = if cfg.batch_norm {
        let mean = tg.state("probe.bn.running_mean", &[dim], 0.0);
        let var = tg.state("probe.bn.running_var", &[dim], 1.0);
        bn(&mut tg, tx, Some((mean, var)))?.0
    } else {
        tx
    };
    let mut outs = Vec::new();
    for l in 0..heads {
        let w = tg.param(&format!("head{l}.weight"), &[classes, dim]);
        let bias = tg.param(&format!("head{l}.bias"), &[classes]);
        let logits = tg.matmul_t(th, w, false, true)?;
        outs.push(tg.add(logits, bias)?);
    }
    let tplan = Plan::compile(gpu, &tg, &outs, &mut store, PlanOptions::default())?;
    tplan.write(tx, test)?;
    let logits = tplan.run_fetch(&outs)?;
    let accs: Vec<f64> = logits
        .iter()
        .map(|lg| {
            let correct = lg
                .chunks(classes)
                .zip(test_labels)
                .filter(|(row, &t)| {
                    (0..classes).max_by(|&a, &c| row[a].total_cmp(&row[c])) == Some(t)
                })
                .count();
            correct as f64 / nt as f64
        })
        .collect();
    let best = accs.iter().cloned().fold(0.0, f64::max);
    Ok((best, accs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_sweep_matches_the_official_lrs() {
        let c = super::ProbeConfig::default();
        assert_eq!(c.base_lrs.len(), 10);
        assert_eq!((c.epochs, c.batch_norm), (90, true));
    }
}
