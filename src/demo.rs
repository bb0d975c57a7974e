//! A small end-to-end exercise of the engine: a 2-layer MLP trained with AdamW on three
//! interleaved spirals, forward + backward + optimizer compiled into one plan and replayed
//! with one submit per step. Used by `stablerep demo` and by the tests.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::graph::{adam_hyper, DType, Graph, ParamStore, Plan, PlanOptions, PlanStats};
use crate::kernels::elementwise::UnaryOp;
use crate::kernels::optim::AdamW;
use crate::util::rng::Rng;

/// Settings of the demo run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Points per spiral arm.
    pub points_per_class: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Learning rate.
    pub lr: f32,
    /// Seed for data and initialization.
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            points_per_class: 64,
            hidden: 64,
            steps: 300,
            lr: 1e-2,
            seed: 0,
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoReport {
    /// Loss before the first update.
    pub first_loss: f32,
    /// Loss after the last update.
    pub final_loss: f32,
    /// Training accuracy after the last update.
    pub accuracy: f32,
    /// Plan statistics of the training step.
    pub plan: PlanStats,
    /// Wall-clock milliseconds per step (including the loss readback every `log_every`).
    pub ms_per_step: f64,
}

/// Three spiral arms: (points [3n, 2], labels [3n]).
pub fn spirals(n: usize, rng: &mut Rng) -> (Vec<f32>, Vec<u32>) {
    let mut x = Vec::with_capacity(6 * n);
    let mut y = Vec::with_capacity(3 * n);
    for c in 0..3 {
        for i in 0..n {
            let r = i as f64 / n as f64;
            let t = c as f64 * 2.094 + 4.0 * r + 0.15 * rng.normal();
            x.push((r * t.sin()) as f32);
            x.push((r * t.cos()) as f32);
            y.push(c as u32);
        }
    }
    (x, y)
}

/// Trains the MLP; `on_step(step, loss)` is called every `log_every` steps.
pub fn train_mlp(
    gpu: &Arc<Gpu>,
    cfg: &DemoConfig,
    log_every: usize,
    mut on_step: impl FnMut(usize, f32),
) -> Result<DemoReport> {
    let mut rng = Rng(cfg.seed);
    let (xs, ys) = spirals(cfg.points_per_class, &mut rng);
    let n = ys.len();
    let h = cfg.hidden;
    let mut g = Graph::new();
    let x = g.input("x", &[n, 2]);
    let labels = g.input_typed("labels", &[n], DType::U32);
    let w1 = g.param("fc1.weight", &[h, 2]);
    let b1 = g.param("fc1.bias", &[h]);
    let w2 = g.param("fc2.weight", &[h, h]);
    let b2 = g.param("fc2.bias", &[h]);
    let w3 = g.param("fc3.weight", &[3, h]);
    let b3 = g.param("fc3.bias", &[3]);
    let z = g.matmul_t(x, w1, false, true)?;
    let z = g.add(z, b1)?;
    let z = g.unary(UnaryOp::Gelu, z)?;
    let z = g.matmul_t(z, w2, false, true)?;
    let z = g.add(z, b2)?;
    let z = g.unary(UnaryOp::Gelu, z)?;
    let logits = g.matmul_t(z, w3, false, true)?;
    let logits = g.add(logits, b3)?;
    let ce = g.cross_entropy(logits, labels)?;
    let loss = g.mean_all(ce)?;
    let params = [w1, b1, w2, b2, w3, b3];
    let grads = g.grad(loss, &params)?;
    let adam = AdamW {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: 1e-4,
        clamp: None,
    };
    let hyper = g.adamw(
        &params,
        &grads,
        adam,
        &[true, false, true, false, true, false],
    )?;

    let mut store = ParamStore::new();
    for &p in &params {
        let node = g.node(p);
        let fan_in = *node.shape.last().unwrap_or(&1) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let data: Vec<f32> = (0..node.numel())
            .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
            .collect();
        store.set(
            gpu,
            node.name.as_deref().unwrap_or_default(),
            &node.shape,
            &data,
        )?;
    }
    let plan = Plan::compile(gpu, &g, &[loss, logits], &mut store, PlanOptions::default())?;
    plan.write(x, &xs)?;
    plan.write_u32(labels, &ys)?;
    let mut first_loss = f32::NAN;
    let start = std::time::Instant::now();
    for step in 1..=cfg.steps {
        plan.write(hyper, &adam_hyper(cfg.lr, &adam, step as u32))?;
        if step == 1 || step % log_every.max(1) == 0 || step == cfg.steps {
            let out = plan.run_fetch(&[loss])?;
            let last_loss = out[0][0];
            if step == 1 {
                first_loss = last_loss;
            }
            if !last_loss.is_finite() {
                return Err(crate::Error::Graph(format!(
                    "loss became {last_loss} at step {step}"
                )));
            }
            on_step(step, last_loss);
        } else {
            plan.run()?;
        }
    }
    gpu.wait()?;
    let ms_per_step = start.elapsed().as_secs_f64() * 1e3 / cfg.steps.max(1) as f64;
    // Evaluate the trained weights with a second plan over the same store, without updates.
    let eval_opts = PlanOptions {
        updates: false,
        ..PlanOptions::default()
    };
    let eval = Plan::compile(gpu, &g, &[logits, loss], &mut store, eval_opts)?;
    eval.write(x, &xs)?;
    eval.write_u32(labels, &ys)?;
    let out = eval.run_fetch(&[logits, loss])?;
    let correct = out[0]
        .chunks(3)
        .zip(&ys)
        .filter(|(row, &y)| {
            let arg = (0..3)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap_or(0);
            arg as u32 == y
        })
        .count();
    Ok(DemoReport {
        first_loss,
        final_loss: out[1][0],
        accuracy: correct as f32 / n as f32,
        plan: plan.stats(),
        ms_per_step,
    })
}

/// Shape of a pre-norm transformer block stack (the ViT encoder's core).
#[derive(Clone, Copy, Debug)]
pub struct StackConfig {
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Model width.
    pub width: usize,
    /// Blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp: usize,
}

/// Builds `x -> ViT blocks -> mean(x^2)` with gradients and AdamW updates for every
/// parameter. Returns (graph, input x [batch*tokens, width], loss, parameters, AdamW hyper
/// input, AdamW settings). Blocks are [`crate::models::vit::block`] (parameters `b{l}.*`).
#[allow(clippy::type_complexity)]
pub fn transformer_stack(
    c: &StackConfig,
) -> Result<(
    Graph,
    crate::graph::NodeId,
    crate::graph::NodeId,
    Vec<crate::graph::NodeId>,
    crate::graph::NodeId,
    AdamW,
)> {
    let mut g = Graph::new();
    let x0 = g.input("x", &[c.batch * c.tokens, c.width]);
    let mut x = x0;
    for l in 0..c.layers {
        x = crate::models::vit::block(
            &mut g,
            &format!("b{l}."),
            x,
            c.batch,
            c.tokens,
            c.heads,
            c.mlp,
        )?;
    }
    let params: Vec<crate::graph::NodeId> = (0..g.nodes.len())
        .map(crate::graph::NodeId)
        .filter(|&id| g.node(id).op == crate::graph::Op::Param)
        .collect();
    let sq = g.unary(UnaryOp::Square, x)?;
    let loss = g.mean_all(sq)?;
    let grads = g.grad(loss, &params)?;
    let adam = AdamW {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: 0.1,
        clamp: None,
    };
    let hyper = g.adamw(&params, &grads, adam, &[])?;
    Ok((g, x0, loss, params, hyper, adam))
}

/// Fills `params` in `store` with small deterministic values (uniform in +-0.02; norm weights 1).
pub fn init_params(
    gpu: &Arc<Gpu>,
    g: &Graph,
    params: &[crate::graph::NodeId],
    store: &mut ParamStore,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng(seed);
    let bytes: usize = params.iter().map(|&id| g.node(id).numel() * 4).sum();
    store.reserve(gpu, "", bytes as u64)?;
    for &id in params {
        let node = g.node(id);
        let name = node.name.as_deref().unwrap_or_default();
        let data: Vec<f32> = if name.contains("norm") && name.ends_with("weight") {
            vec![1.0; node.numel()]
        } else {
            (0..node.numel())
                .map(|_| ((rng.unit() - 0.5) * 0.04) as f32)
                .collect()
        };
        store.set(gpu, name, &node.shape, &data)?;
    }
    Ok(())
}
