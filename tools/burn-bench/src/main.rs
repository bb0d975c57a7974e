//! `vit-train` on burn's wgpu backend (burn's default features: fusion and autotune): a pre-norm
//! transformer block stack (batch 32, 64 tokens, width 192, 4 layers, 3 heads, MLP 768, erf
//! GELU, LayerNorm eps 1e-6), loss mean(x^2), backward, AdamW (betas 0.9/0.98, eps 1e-8,
//! weight decay 0.1). Prints one JSON line per step; the first steps include compilation and
//! autotuning. Usage: cargo run --release -- [STEPS]

use std::time::Instant;

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Distribution, Tensor};

const BATCH: usize = 32;
const TOKENS: usize = 64;
const WIDTH: usize = 192;
const LAYERS: usize = 4;
const HEADS: usize = 3;
const MLP: usize = 768;

#[derive(Module, Debug)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(device: &Device) -> Self {
        let ln = || LayerNormConfig::new(WIDTH).with_epsilon(1e-6).init(device);
        Block {
            norm1: ln(),
            qkv: LinearConfig::new(WIDTH, 3 * WIDTH).init(device),
            proj: LinearConfig::new(WIDTH, WIDTH).init(device),
            norm2: ln(),
            fc1: LinearConfig::new(WIDTH, MLP).init(device),
            fc2: LinearConfig::new(MLP, WIDTH).init(device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let hd = WIDTH / HEADS;
        let qkv = self.qkv.forward(self.norm1.forward(x.clone()));
        // [b, t, 3, h, d] -> [3, b, h, t, d]
        let qkv = qkv
            .reshape([BATCH, TOKENS, 3, HEADS, hd])
            .permute([2, 0, 3, 1, 4]);
        let part = |i| {
            qkv.clone()
                .narrow(0, i, 1)
                .reshape([BATCH, HEADS, TOKENS, hd])
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let att = softmax(q.matmul(k.swap_dims(2, 3)) * (1.0 / (hd as f64).sqrt()), 3);
        let o = att
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([BATCH, TOKENS, WIDTH]);
        let x = x + self.proj.forward(o);
        let h = gelu(self.fc1.forward(self.norm2.forward(x.clone())));
        x + self.fc2.forward(h)
    }
}

#[derive(Module, Debug)]
struct Stack {
    blocks: Vec<Block>,
}

fn main() {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let device = Device::wgpu(Default::default()).autodiff();
    let mut model = Stack {
        blocks: (0..LAYERS).map(|_| Block::new(&device)).collect(),
    };
    let mut opt = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.98)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init();
    let x = Tensor::<3>::random(
        [BATCH, TOKENS, WIDTH],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    for step in 0..steps {
        let t0 = Instant::now();
        let mut h = x.clone();
        for b in &model.blocks {
            h = b.forward(h);
        }
        let loss = (h.clone() * h).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(1e-4, model, grads);
        let l: f32 = loss.into_scalar();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        println!(
            "{{\"bench\":\"vit-train-burn\",\"step\":{step},\"ms_per_step\":{ms:.1},\"loss\":{l}}}"
        );
    }
}
