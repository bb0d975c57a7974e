//! Shared test helpers: one GPU device per test binary (tests serialize on a lock, since
//! wgpu devices must be polled from one thread at a time), a seeded RNG, GPU and CPU graph
//! runners and tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::graph::{DType, Graph, NodeId, ParamStore, Plan, PlanOptions, Tensor};

pub mod tiny_sd;

static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());

/// The binary's device (created on first use) and the lock serializing GPU tests.
pub fn gpu() -> (Arc<Gpu>, MutexGuard<'static, ()>) {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let g = GPU
        .get_or_init(|| {
            let _ = env_logger::builder().is_test(true).try_init();
            Gpu::new(&GpuOptions::default())
                .expect("a GPU adapter (install mesa-vulkan-drivers for lavapipe)")
        })
        .clone();
    (g, guard)
}

/// Test data from the library's seeded stream (`stablerep::util::rng::Rng`), with helpers for
/// ranges and vectors.
pub struct Rng(pub u64);

impl Rng {
    /// Next raw value.
    pub fn next_u64(&mut self) -> u64 {
        let mut r = stablerep::util::rng::Rng(self.0);
        let v = r.next_u64();
        self.0 = r.0;
        v
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        let mut r = stablerep::util::rng::Rng(self.0);
        let v = r.unit();
        self.0 = r.0;
        v
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// Integer in [lo, hi].
    pub fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    /// `n` values uniform in [lo, hi), rounded to f32 so CPU and GPU see the same data.
    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.range(lo, hi) as f32 as f64).collect()
    }
}

/// Runs `outputs` of `g` on the GPU with `feeds` and `params`; poisoned buffers.
pub fn run_gpu(
    gpu: &Arc<Gpu>,
    g: &Graph,
    feeds: &HashMap<NodeId, Vec<f64>>,
    params: &HashMap<String, Vec<f64>>,
    outputs: &[NodeId],
) -> Vec<Vec<f32>> {
    run_gpu_opts(
        gpu,
        g,
        feeds,
        params,
        outputs,
        PlanOptions {
            reuse: true,
            poison: true,
            updates: true,
            fuse: true,
            multi_update: true,
            colsum: true,
            f16_activations: false,
        },
    )
    .0
}

/// [`run_gpu`] with options; also returns the plan.
pub fn run_gpu_opts(
    gpu: &Arc<Gpu>,
    g: &Graph,
    feeds: &HashMap<NodeId, Vec<f64>>,
    params: &HashMap<String, Vec<f64>>,
    outputs: &[NodeId],
    opts: PlanOptions,
) -> (Vec<Vec<f32>>, Plan) {
    let mut store = ParamStore::new();
    for (name, v) in params {
        let node = g
            .nodes
            .iter()
            .find(|n| n.name.as_deref() == Some(name))
            .expect("param in graph");
        let data: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        // Half through the store's arenas (as models load), half in buffers of their own.
        if name.len() % 2 == 0 {
            let t = if node.dtype == stablerep::graph::DType::F16 {
                Tensor::from_f16(gpu, &node.shape, &data)
            } else {
                Tensor::from_f32(gpu, &node.shape, &data)
            };
            store.insert(name, t.unwrap());
        } else if node.dtype == stablerep::graph::DType::F16 {
            store.set_f16(gpu, name, &node.shape, &data).unwrap();
        } else {
            store.set(gpu, name, &node.shape, &data).unwrap();
        }
    }
    let plan = Plan::compile(gpu, g, outputs, &mut store, opts).expect("compile");
    for (id, v) in feeds {
        if !plan.contains(*id) {
            continue;
        }
        match g.node(*id).dtype {
            DType::F32 => plan
                .write(*id, &v.iter().map(|&x| x as f32).collect::<Vec<_>>())
                .unwrap(),
            DType::U32 => plan
                .write_u32(*id, &v.iter().map(|&x| x as u32).collect::<Vec<_>>())
                .unwrap(),
            DType::F16 => panic!("f16 tensors are parameters, not feeds"),
        }
    }
    let out = plan.run_fetch(outputs).expect("run");
    (out, plan)
}

/// CPU reference values of `outputs`.
pub fn run_cpu(
    g: &Graph,
    feeds: &HashMap<NodeId, Vec<f64>>,
    params: &HashMap<String, Vec<f64>>,
    outputs: &[NodeId],
) -> Vec<Vec<f64>> {
    let mut p = params.clone();
    let v = stablerep::cpu::eval(g, feeds, &mut p).expect("cpu eval");
    outputs
        .iter()
        .map(|o| v[o.0].clone().expect("output evaluated"))
        .collect()
}

/// Random feeds for graph inputs.
pub type Feeds = HashMap<NodeId, Vec<f64>>;

/// A new f32 input of `shape` filled with uniform values in [lo, hi).
pub fn input(
    g: &mut Graph,
    f: &mut Feeds,
    rng: &mut Rng,
    shape: &[usize],
    lo: f64,
    hi: f64,
) -> NodeId {
    let id = g.input(&format!("x{}", g.nodes.len()), shape);
    f.insert(id, rng.vec(shape.iter().product(), lo, hi));
    id
}

/// Asserts |gpu - cpu| <= atol + rtol * |cpu| elementwise, with no NaN.
pub fn assert_close(what: &str, gpu: &[f32], cpu: &[f64], rtol: f64, atol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g} (cpu {c})");
        let err = (g as f64 - c).abs() - (atol + rtol * c.abs());
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= 0.0,
        "{what}: element {} differs: gpu {} vs cpu {} (rtol {rtol}, atol {atol})",
        worst.1,
        gpu[worst.1],
        cpu[worst.1]
    );
}

/// The StableRep+ fixture stores only the token-embedding rows its batch uses (ids in
/// `used_ids`, rows in `table`); this rebuilds the full [vocab, width] table, zero elsewhere.
pub fn expand_token_table(
    fx: &stablerep::nn::checkpoint::Checkpoint,
    table: &stablerep::nn::checkpoint::HostTensor,
    vocab: usize,
) -> stablerep::nn::checkpoint::HostTensor {
    let d = table.shape[1];
    let mut data = vec![0.0f32; vocab * d];
    for (r, &id) in used_token_ids(fx).iter().enumerate() {
        data[id * d..(id + 1) * d].copy_from_slice(&table.data[r * d..(r + 1) * d]);
    }
    stablerep::nn::checkpoint::HostTensor {
        shape: vec![vocab, d],
        data,
    }
}

/// The token ids whose embedding rows the StableRep+ fixture stores.
pub fn used_token_ids(fx: &stablerep::nn::checkpoint::Checkpoint) -> Vec<usize> {
    fx.get("used_ids", None)
        .expect("fixture has used_ids")
        .data
        .iter()
        .map(|&v| v as usize)
        .collect()
}

/// A tiny SD 1.x model folder (shared with `examples/tiny_sd.rs`).
pub fn tiny_sd_folder(dir: &std::path::Path) {
    tiny_sd::write(dir).expect("writing the tiny SD folder");
}

/// 12 captions x 4 images: caption c is a coloured stripe pattern, its images shift it.
pub fn make_pool(dir: &std::path::Path) {
    let (captions, k, s) = (12u64, 4usize, 24usize);
    let mut index = String::new();
    for c in 0..captions {
        index += &stablerep::data::csv::row(&[
            &stablerep::data::pool::relpath(c),
            &format!("pattern {c}"),
        ]);
        for j in 0..k {
            let img: Vec<f32> = (0..3 * s * s)
                .map(|p| {
                    let (ch, y, x) = (p / (s * s), (p / s) % s, p % s);
                    let period = 3 + (c % 4) as usize;
                    let on = ((x + j + y * (c as usize / 4)) / period).is_multiple_of(2);
                    let colour = [
                        (c * 37 % 100) as f32,
                        (c * 59 % 100) as f32,
                        (c * 83 % 100) as f32,
                    ][ch]
                        / 100.0;
                    if on {
                        colour
                    } else {
                        1.0 - colour
                    }
                })
                .collect();
            stablerep::util::image::save_rgb(
                &dir.join(format!("seed_{j}"))
                    .join(stablerep::data::pool::relpath(c)),
                s,
                s,
                &img,
            )
            .unwrap();
        }
    }
    std::fs::write(dir.join("captions.csv"), index).unwrap();
}

/// `steps` to run now; `total` fixes the schedule (an interrupted run stops before it).
pub fn settings(
    pool: &std::path::Path,
    out: std::path::PathBuf,
    steps: u64,
    total: u64,
) -> stablerep::train::pool_run::PoolRun {
    stablerep::train::pool_run::PoolRun {
        pool: pool.to_path_buf(),
        model: stablerep::models::config::ModelConfig {
            vit: stablerep::models::vit::VitConfig {
                img_size: 16,
                patch: 8,
                width: 32,
                depth: 1,
                heads: 2,
                mlp: 64,
                stem: stablerep::models::vit::Stem::Patch,
            },
            head: stablerep::models::stablerep::HeadConfig {
                hidden: 64,
                out: 16,
            },
            plus: None,
        },
        init: None,
        fresh_init: stablerep::models::stablerep::Init::Official,
        captions: 4,
        images_per_caption: 3,
        steps,
        lr: 2e-3,
        schedule: stablerep::nn::schedule::Schedule::Cosine { warmup: 3, total },
        weight_decay: 0.05,
        temperature: 0.1,
        augment: true,
        augment_config: None,
        simclr: false,
        seed: 7,
        checkpoint_every: 5,
        log_every: 1,
        out,
        resume: true,
        labelled_folder: false,
        source_size: None,
        head_dim: 64,
        chunk: None,
    }
}

/// A labelled folder of 3 classes x 4 images (20 px): class c is bright in channel c.
pub fn make_labelled(dir: &std::path::Path) {
    for class in 0..3usize {
        for i in 0..4usize {
            let s = 20;
            let img: Vec<f32> = (0..3 * s * s)
                .map(|p| if p / (s * s) == class { 0.8 } else { 0.1 } + 0.02 * ((i + p) % 3) as f32)
                .collect();
            stablerep::util::image::save_rgb(
                &dir.join(format!("class{class}")).join(format!("{i}.png")),
                s,
                s,
                &img,
            )
            .unwrap();
        }
    }
}

/// Runs `outs` of `g` on the GPU and on the f64 CPU reference and asserts they agree within
/// `rtol`/`atol` (see [`assert_close`]).
pub fn gpu_matches_cpu(
    what: &str,
    g: &Graph,
    feeds: &Feeds,
    params: &HashMap<String, Vec<f64>>,
    outs: &[NodeId],
    rtol: f64,
    atol: f64,
) {
    let (gpu, _lock) = gpu();
    let got = run_gpu(&gpu, g, feeds, params, outs);
    let want = run_cpu(g, feeds, params, outs);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("{what} output {k}"), a, b, rtol, atol);
    }
}
