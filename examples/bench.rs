//! Benchmarks, one JSON object per line. Usage:
//!   cargo run --release --example bench -- [FILTER...] [--size N] [--reps N]
//! FILTER selects cases by substring: `matmul`, `matmul_variants`, `matmul_small` (the blocked
//! tiles on the demo's attention products; only when asked for), `matmul_anatomy` (the subgroup
//! kernel against probes without most loads or without the multiply-adds, to split its time;
//! 8-lane CPU adapters only, when asked for), `mlp_step`, `vit-train`,
//! `demo-step` (the demo's training step without augmentation), `chunk` (gradient caching:
//! memory and time as the batch grows to `--size N` images, default 2064; only when asked for),
//! `chunk-estimate` (ViT-B/16 at 224 up to the paper's 8,256 images: device bytes from the
//! plans' layouts, nothing run; only when asked for), `chunk-vit-b` (one real chunked step of
//! ViT-B/16 at 224 on 12 images in chunks of `--size N`, default 6, timed per phase and per
//! image, with the 8,256-image step's time that follows at that rate; only when asked for),
//! `chain`, `sd-unet`, `sd-vae` (SD 1.5's real shapes with random weights at `--size`,
//! default 256; not run without a filter); `world-sd` (one training step of each stage of the
//! built-in mini-world model; `WORLD_SD_VAE=32,64 WORLD_SD_UNET=32,64` try other widths).
//! `BENCH_PROFILE=1` adds a per-kernel breakdown of
//! `vit-train` and the SD cases; `BENCH_F16=1` stores the SD UNet's weights in f16, and
//! `BENCH_F16_ACT=1` stores the SD cases' activations in f16 (`generate --precision f16`;
//! needs shader-f16).

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use stablerep::demo::{train_mlp, DemoConfig};
use stablerep::exec::Prepared;
use stablerep::gpu::{Gpu, GpuOptions};
use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
use stablerep::kernels::elementwise::UnaryOp;
use stablerep::kernels::matmul::{self, MatmulShape, SgProbe, SgTile, Tile, Variant};
use stablerep::kernels::View;

struct Args {
    filters: Vec<String>,
    sizes: Vec<u32>,
    reps: usize,
}

fn args() -> Args {
    let mut a = Args {
        filters: vec![],
        sizes: vec![],
        reps: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(s) = it.next() {
        match s.as_str() {
            "--size" => a
                .sizes
                .push(it.next().and_then(|v| v.parse().ok()).expect("--size N")),
            "--reps" => a.reps = it.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--bench" => {}
            f => a.filters.push(f.to_string()),
        }
    }
    a
}

fn wanted(a: &Args, name: &str) -> bool {
    a.filters.is_empty() || a.filters.iter().any(|f| name.contains(f.as_str()))
}

/// A single (batch 1) matmul shape.
fn lin(m: u32, n: u32, k: u32, ta: bool, tb: bool) -> MatmulShape {
    MatmulShape {
        batch: 1,
        m,
        n,
        k,
        ta,
        tb,
        a_shared: false,
        b_shared: false,
    }
}

/// Times `reps` back-to-back runs of one matmul shape (values not checked); returns GFLOP/s
/// and the kernel key.
fn time_shape(
    gpu: &Arc<Gpu>,
    s: &MatmulShape,
    variant: Variant,
    reps: usize,
) -> stablerep::Result<(f64, String)> {
    time_probe(gpu, s, variant, None, reps)
}

/// [`time_shape`] with the kernel replaced by a probe variant (`matmul_anatomy`).
fn time_probe(
    gpu: &Arc<Gpu>,
    s: &MatmulShape,
    variant: Variant,
    probe: Option<SgProbe>,
    reps: usize,
) -> stablerep::Result<(f64, String)> {
    let (na, nb, nc) = matmul::sizes(s);
    let bufs = [
        gpu.alloc(na * 4, "a")?,
        gpu.alloc(nb * 4, "b")?,
        gpu.alloc(nc * 4, "c")?,
    ];
    for (buf, n) in bufs.iter().zip([na, nb]) {
        let v: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32) / 13.0 - 0.5).collect();
        gpu.write(buf, 0, &v);
    }
    let d = matmul::launch_with(
        s,
        View::new(0, na),
        View::new(1, nb),
        View::new(2, nc),
        &gpu.caps,
        variant,
    )?;
    let d = match probe {
        Some(p) => d
            .iter()
            .map(|x| matmul::sg_probe(x, p))
            .collect::<stablerep::Result<Vec<_>>>()?,
        None => d,
    };
    let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
    Prepared::new(gpu, &d, &refs)?.submit(gpu);
    gpu.wait()?;
    let many: Vec<_> = (0..reps).flat_map(|_| d.clone()).collect();
    let p = Prepared::new(gpu, &many, &refs)?;
    let t0 = Instant::now();
    p.submit(gpu);
    gpu.wait()?;
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    let key = d[0].key.clone();
    for buf in bufs {
        gpu.pool.give(buf);
    }
    let flops = 2.0 * s.batch as f64 * s.m as f64 * s.n as f64 * s.k as f64;
    Ok((flops / dt / 1e9, key))
}

/// Times `reps` back-to-back matmuls recorded in one submit; returns GFLOP/s.
fn time_matmul(
    gpu: &Arc<Gpu>,
    n: u32,
    variant: Variant,
    reps: usize,
) -> stablerep::Result<(f64, String)> {
    let s = MatmulShape {
        batch: 1,
        m: n,
        n,
        k: n,
        ta: false,
        tb: false,
        a_shared: false,
        b_shared: false,
    };
    let (na, nb, nc) = matmul::sizes(&s);
    let a = gpu.alloc(na * 4, "a")?;
    let b = gpu.alloc(nb * 4, "b")?;
    let c = gpu.alloc(nc * 4, "c")?;
    let av: Vec<f32> = (0..na)
        .map(|i| ((i * 7 % 13) as f32) / 13.0 - 0.5)
        .collect();
    let bv: Vec<f32> = (0..nb)
        .map(|i| ((i * 5 % 11) as f32) / 11.0 - 0.5)
        .collect();
    gpu.write(&a, 0, &av);
    gpu.write(&b, 0, &bv);
    let d = matmul::launch_with(
        &s,
        View::new(0, na),
        View::new(1, nb),
        View::new(2, nc),
        &gpu.caps,
        variant,
    )?;
    let key = d[0].key.clone();
    let warm = Prepared::new(gpu, &d, &[&a, &b, &c])?;
    warm.submit(gpu);
    gpu.wait()?;
    let many: Vec<_> = (0..reps).flat_map(|_| d.clone()).collect();
    let p = Prepared::new(gpu, &many, &[&a, &b, &c])?;
    let t0 = Instant::now();
    p.submit(gpu);
    gpu.wait()?;
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    // Spot-check one element against f64.
    let out: Vec<f32> = gpu.read(&c, 0, nc * 4)?;
    let (i, j) = (n as usize / 2, n as usize / 3);
    let r: f64 = (0..n as usize)
        .map(|t| av[i * n as usize + t] as f64 * bv[t * n as usize + j] as f64)
        .sum();
    let err = (out[i * n as usize + j] as f64 - r).abs();
    if err > 1e-3 * (n as f64).sqrt() {
        return Err(stablerep::Error::Gpu(format!(
            "matmul result wrong: {} vs {r}",
            out[i * n as usize + j]
        )));
    }
    for buf in [a, b, c] {
        gpu.pool.give(buf);
    }
    Ok((2.0 * (n as f64).powi(3) / dt / 1e9, key))
}

/// Forward + backward + AdamW of a pre-norm transformer block stack (batch 32, 64 tokens,
/// width 192, 4 layers, 3 heads, MLP 768), built from the engine's generic ops.
fn vit_train(gpu: &Arc<Gpu>, adapter: &str) -> stablerep::Result<()> {
    use stablerep::demo::{transformer_stack, StackConfig};
    use stablerep::graph::adam_hyper;
    let cfg = StackConfig {
        batch: 32,
        tokens: 64,
        width: 192,
        layers: 4,
        heads: 3,
        mlp: 768,
    };
    let (g, x0, loss, params, hyper, adam) = transformer_stack(&cfg)?;
    let mut store = ParamStore::new();
    stablerep::demo::init_params(gpu, &g, &params, &mut store, 1)?;
    let plan = Plan::compile(gpu, &g, &[loss], &mut store, PlanOptions::default())?;
    let n = cfg.batch * cfg.tokens * cfg.width;
    let xs: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
        .collect();
    plan.write(x0, &xs)?;
    plan.write(hyper, &adam_hyper(1e-3, &adam, 1))?;
    plan.run_fetch(&[loss])?;
    // Each step is timed on its own (submit + wait), so that the minimum and median show what
    // the kernels reach when a shared machine's load comes and goes.
    let steps = if gpu.caps.is_cpu { 5 } else { 20 };
    let mut times = Vec::with_capacity(steps);
    for s in 0..steps {
        let t0 = Instant::now();
        plan.write(hyper, &adam_hyper(1e-3, &adam, s as u32 + 2))?;
        plan.run()?;
        gpu.wait()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let l = plan.run_fetch(&[loss])?[0][0];
    let ms = times.iter().sum::<f64>() / steps as f64;
    times.sort_by(f64::total_cmp);
    let (ms_min, ms_median) = (times[0], times[steps / 2]);
    let st = plan.stats();
    if std::env::var("BENCH_PROFILE").is_ok() {
        for (key, secs, count) in plan.profile()? {
            println!(
                "{}",
                json!({"bench": "vit-train_profile", "kernel": key, "ms": (secs * 1e4).round() / 10.0, "dispatches": count})
            );
        }
    }
    println!(
        "{}",
        json!({
            "bench": "vit-train", "adapter": adapter, "batch": cfg.batch, "tokens": cfg.tokens, "width": cfg.width,
            "layers": cfg.layers, "heads": cfg.heads, "mlp": cfg.mlp, "ms_per_step": (ms * 10.0).round() / 10.0,
            "ms_min": (ms_min * 10.0).round() / 10.0, "ms_median": (ms_median * 10.0).round() / 10.0, "loss": l,
            "dispatches_per_submit": st.dispatches, "plan_peak_bytes": st.peak_bytes, "sum_tensor_bytes": st.tensor_bytes,
        })
    );
    Ok(())
}

/// The demo's StableRep training step (`stablerep::world::demo::DemoConfig::new`: ViT 32 px,
/// patch 8, width 96, depth 3; head 256/64; 8 captions x 4 images = 32 views; multi-positive
/// loss; BatchNorm running statistics; AdamW), without augmentation, as
/// `tools/bench_peers.py` runs it in PyTorch.
fn demo_step(gpu: &Arc<Gpu>, adapter: &str, reps: usize) -> stablerep::Result<()> {
    use stablerep::graph::adam_hyper;
    use stablerep::models::stablerep::{init_params, recipe_adamw, train_step, StepConfig};
    let d = stablerep::world::demo::DemoConfig::new(std::path::PathBuf::new());
    let m = d.images_per_caption;
    let cfg = StepConfig {
        vit: d.vit,
        head: d.head,
        captions: d.views_per_step / m,
        images_per_caption: m,
        temperature: 0.1,
        adamw: recipe_adamw(0.1),
        augment_from: None,
        plus: None,
    };
    let step = train_step(&cfg)?;
    let mut store = ParamStore::new();
    for (name, t) in &init_params(&d.vit, &d.head, None, 1).tensors {
        store.set(gpu, name, &t.shape, &t.data)?;
    }
    let plan = Plan::compile(
        gpu,
        &step.graph,
        &[step.loss],
        &mut store,
        PlanOptions::default(),
    )?;
    let s = d.vit.img_size;
    let px: Vec<f32> = (0..d.views_per_step * 3 * s * s)
        .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
        .collect();
    plan.write(step.images, &px)?;
    let adam = recipe_adamw(0.1);
    plan.write(step.hyper, &adam_hyper(1e-3, &adam, 1))?;
    plan.run_fetch(&[step.loss])?;
    let mut times = Vec::with_capacity(reps);
    for r in 0..reps {
        let t0 = Instant::now();
        plan.write(step.hyper, &adam_hyper(1e-3, &adam, r as u32 + 2))?;
        plan.run()?;
        gpu.wait()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let loss = plan.run_fetch(&[step.loss])?[0][0];
    times.sort_by(f64::total_cmp);
    let st = plan.stats();
    if std::env::var("BENCH_PROFILE").is_ok() {
        for (key, secs, count) in plan.profile()? {
            println!(
                "{}",
                json!({"bench": "demo-step_profile", "kernel": key, "ms": (secs * 1e4).round() / 10.0, "dispatches": count})
            );
        }
    }
    println!(
        "{}",
        json!({
            "bench": "demo-step", "adapter": adapter, "views": d.views_per_step, "img_size": s,
            "patch": d.vit.patch, "width": d.vit.width, "depth": d.vit.depth,
            "head": [d.head.hidden, d.head.out], "augment": false,
            "ms_median": (times[reps / 2] * 10.0).round() / 10.0, "ms_min": (times[0] * 10.0).round() / 10.0,
            "runs": reps, "loss": loss, "dispatches_per_submit": st.dispatches,
        })
    );
    Ok(())
}

/// The paper's StableRep step: ViT-B/16 at 224, head 4096/256, 6 images per caption,
/// temperature 0.1, the recipe's AdamW, GPU augmentation from 256 x 256; `rows` images.
fn paper_step(rows: usize) -> stablerep::models::stablerep::StepConfig {
    use stablerep::models::stablerep::{recipe_adamw, HeadConfig, StepConfig};
    use stablerep::models::vit::{Stem, VitConfig};
    StepConfig {
        vit: VitConfig {
            img_size: 224,
            patch: 16,
            width: 768,
            depth: 12,
            heads: 12,
            mlp: 3072,
            stem: Stem::Patch,
        },
        head: HeadConfig {
            hidden: 4096,
            out: 256,
        },
        captions: rows / 6,
        images_per_caption: 6,
        temperature: 0.1,
        adamw: recipe_adamw(0.1),
        augment_from: Some((256, 256)),
        plus: None,
    }
}

/// The paper's model and batch without running them: ViT-B/16 at 224 with the official head
/// (4096/256), device bytes of the chunked step (chunks of 258 = 43 captions x 6) and of one
/// unchunked pass for batches of 258 .. 8,256, from the plans' layouts for this adapter's
/// binding limit; then the largest unchunked batch (in steps of 6) under 23 GB (this machine),
/// 80 GB and 139 GB (an H200).
fn chunk_estimate(gpu: &Arc<Gpu>, adapter: &str) -> stablerep::Result<()> {
    use stablerep::models::stablerep::train_step;
    use stablerep::train::chunked::estimate;
    let cfg = paper_step;
    let mb = gpu.caps.max_binding;
    let unchunked = |rows: usize| -> stablerep::Result<(u64, u64)> {
        let step = train_step(&cfg(rows))?;
        let e = stablerep::graph::plan::estimate(
            &step.graph,
            &[step.loss],
            PlanOptions::default(),
            mb,
        )?;
        Ok((e.total(), e.largest_tensor_bytes))
    };
    let mut rows = 258;
    while rows <= 8256 {
        let chunked = estimate(&cfg(rows), 258, mb)?;
        let (full, largest) = unchunked(rows)?;
        println!(
            "{}",
            json!({"bench": "chunk-estimate", "adapter": adapter, "model": "vit-b/16 224px, head 4096/256",
                "images_per_step": rows, "chunk": 258, "chunked_device_bytes": chunked,
                "unchunked_device_bytes": full, "unchunked_largest_tensor_bytes": largest,
                "max_binding": mb})
        );
        rows *= 2;
        if rows > 8256 && rows / 2 < 8256 {
            rows = 8256;
        }
    }
    for budget in [23u64 << 30, 80 << 30, 139 << 30] {
        // Bisection over captions (6 images each): the estimate grows with the batch.
        let (mut lo, mut hi) = (1usize, 8256 / 6 + 1);
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if unchunked(mid * 6)?.0 <= budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        println!(
            "{}",
            json!({"bench": "chunk-estimate-largest-unchunked", "model": "vit-b/16 224px, head 4096/256",
                "budget_bytes": budget, "largest_images_per_step": lo * 6,
                "device_bytes": unchunked(lo * 6)?.0})
        );
    }
    Ok(())
}

/// Gradient caching (`train --chunk`): ViT-Ti/16 at 64 px (head 4096/256, GPU augmentation),
/// batches of 258 .. `max_rows` images (43 captions x 6 images per 258) in chunks of 258: the
/// device memory of the chunked step and of one unchunked pass (estimated from the plans'
/// layouts), the chunked step's time, and the process's peak RSS so far (lavapipe's device
/// memory is host memory).
fn chunk_bench(gpu: &Arc<Gpu>, adapter: &str, max_rows: usize) -> stablerep::Result<()> {
    use stablerep::data::augment::{sample, AugmentConfig};
    use stablerep::models::stablerep::{
        init_params, recipe_adamw, train_step, HeadConfig, StepConfig,
    };
    use stablerep::models::vit::{Stem, VitConfig};
    use stablerep::train::chunked::{estimate, ChunkedStep};
    let vit = VitConfig {
        img_size: 64,
        patch: 16,
        width: 192,
        depth: 12,
        heads: 3,
        mlp: 768,
        stem: Stem::Patch,
    };
    let head = HeadConfig {
        hidden: 4096,
        out: 256,
    };
    let chunk = 258;
    let init = init_params(&vit, &head, None, 1);
    let mut rows = chunk;
    while rows <= max_rows {
        let cfg = StepConfig {
            vit,
            head,
            captions: rows / 6,
            images_per_caption: 6,
            temperature: 0.1,
            adamw: recipe_adamw(0.1),
            augment_from: Some((64, 64)),
            plus: None,
        };
        let full = train_step(&cfg)?;
        let unchunked = stablerep::graph::plan::estimate(
            &full.graph,
            &[full.loss],
            PlanOptions::default(),
            gpu.caps.max_binding,
        )?;
        let chunked = estimate(&cfg, chunk, gpu.caps.max_binding)?;
        let mut store = ParamStore::new();
        for (name, t) in &init.tensors {
            store.set(gpu, name, &t.shape, &t.data)?;
        }
        let cs = ChunkedStep::new(gpu, &cfg, chunk, &mut store)?;
        let mut rng = stablerep::util::rng::Rng(7);
        let images: Vec<f32> = (0..rows * 3 * 64 * 64).map(|_| rng.unit() as f32).collect();
        let acfg = AugmentConfig::default();
        let aug: Vec<f32> = (0..rows)
            .flat_map(|_| sample(&acfg, 64, 64, &mut rng))
            .collect();
        let t0 = Instant::now();
        let out = cs.step(&images, Some(&aug), None, 1e-3, 1, false)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            });
        println!(
            "{}",
            json!({
                "bench": "chunk", "adapter": adapter, "model": "vit-ti/16 64px, head 4096/256",
                "images_per_step": rows, "chunk": chunk, "unchunked_device_bytes": unchunked.total(),
                "chunked_device_bytes": chunked, "chunked_ms_per_step": ms.round(), "loss": out.loss,
                "peak_rss_kib": rss_kib,
            })
        );
        rows *= 2;
    }
    Ok(())
}

/// One chunked StableRep step of ViT-B/16 at 224 (head 4096/256, GPU augmentation from 256 x
/// 256) on 12 images (2 captions x 6) in chunks of `chunk`, after one untimed step (pipeline
/// compilation, first-use allocation): ms per step and per image, and the paper's 8,256-image
/// step at that per-image rate. A chunked step's work grows linearly with the batch (every
/// chunk is encoded twice, once with activations kept; the head and loss over the batch are
/// about 0.1 % of it), so the per-image rate carries over; device bytes are the plans'.
fn chunk_vit_b(gpu: &Arc<Gpu>, adapter: &str, chunk: usize) -> stablerep::Result<()> {
    use stablerep::data::augment::{sample, AugmentConfig};
    use stablerep::models::stablerep::init_params;
    use stablerep::train::chunked::{estimate, ChunkedStep};
    let rows = 12;
    let cfg = paper_step(rows);
    let init = init_params(&cfg.vit, &cfg.head, None, 1);
    let mut store = ParamStore::new();
    for (name, t) in &init.tensors {
        store.set(gpu, name, &t.shape, &t.data)?;
    }
    let t0 = Instant::now();
    let cs = ChunkedStep::new(gpu, &cfg, chunk, &mut store)?;
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut rng = stablerep::util::rng::Rng(7);
    let images: Vec<f32> = (0..rows * 3 * 256 * 256)
        .map(|_| rng.unit() as f32)
        .collect();
    let acfg = AugmentConfig::default();
    let mut ms = Vec::new();
    let mut loss = 0.0;
    for step in 1..=2u32 {
        let aug: Vec<f32> = (0..rows)
            .flat_map(|_| sample(&acfg, 256, 256, &mut rng))
            .collect();
        let t = Instant::now();
        loss = cs.step(&images, Some(&aug), None, 1e-4, step, false)?.loss;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let per_image = ms[1] / rows as f64;
    println!(
        "{}",
        json!({
            "bench": "chunk-vit-b", "adapter": adapter, "model": "vit-b/16 224px, head 4096/256",
            "images_per_step": rows, "chunk": chunk, "compile_ms": compile_ms.round(),
            "first_step_ms": ms[0].round(), "ms_per_step": ms[1].round(),
            "ms_per_image": per_image.round(),
            "chunked_device_bytes": estimate(&cfg, chunk, gpu.caps.max_binding)?,
            "paper_step_8256_images_s_at_this_rate": (per_image * 8256.0 / 1e3).round(),
            "loss": loss,
        })
    );
    Ok(())
}

/// Random weights for every parameter of `g`: GroupNorm/LayerNorm scales 1, biases 0, other
/// tensors uniform with variance 1/fan_in (activations stay in range, no denormals).
fn random_weights(gpu: &Arc<Gpu>, g: &Graph, store: &mut ParamStore) -> stablerep::Result<()> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for node in &g.nodes {
        if node.op != stablerep::graph::Op::Param {
            continue;
        }
        let name = node.name.as_deref().unwrap_or_default();
        if store.get(name).is_some() {
            continue;
        }
        let n = node.numel();
        let data: Vec<f32> = if name.ends_with("bias") {
            vec![0.0; n]
        } else if node.shape.len() == 1 {
            vec![1.0; n]
        } else {
            let a = (3.0 / (n / node.shape[0]) as f64).sqrt() as f32;
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
                })
                .collect()
        };
        if node.dtype == stablerep::graph::DType::F16 {
            store.set_f16(gpu, name, &node.shape, &data)?;
        } else {
            store.set(gpu, name, &node.shape, &data)?;
        }
    }
    Ok(())
}

/// SD 1.5's guided UNet step or VAE decode at `size`^2 with random weights: ms per run,
/// TFLOP/s against the FLOP counts of shared/spec (section 4.1), and plan memory.
fn sd_bench(
    gpu: &Arc<Gpu>,
    adapter: &str,
    which: &str,
    size: usize,
    reps: usize,
) -> stablerep::Result<()> {
    use stablerep::diffusion::model::graphs;
    use stablerep::diffusion::single_file::{SD15_TEXT, SD15_UNET, SD15_VAE};
    use stablerep::diffusion::text_encoder::ClipTextConfig;
    use stablerep::diffusion::unet::UNetConfig;
    use stablerep::diffusion::vae::VaeConfig;
    let text = ClipTextConfig::from_json(SD15_TEXT, "sd15")?;
    let unet = UNetConfig::from_json(SD15_UNET, "sd15")?;
    let vae = VaeConfig::from_json(SD15_VAE, "sd15")?;
    let max_tensor = gpu.caps.max_binding.min(gpu.caps.max_buffer) as usize;
    let half = std::env::var("BENCH_F16").is_ok();
    let gr = graphs(&text, &unet, &vae, size, 7.5, max_tensor, half, 1)?;
    let (g, out, inputs) = if which == "sd-unet" {
        let d = &gr.unet;
        (
            &d.graph,
            d.out,
            vec![d.latent_in, d.scale, d.inputs.time, d.inputs.context],
        )
    } else {
        (&gr.vae, gr.image, vec![gr.z])
    };
    let mut store = ParamStore::new();
    let t0 = Instant::now();
    random_weights(gpu, g, &mut store)?;
    let half_act = std::env::var("BENCH_F16_ACT").is_ok_and(|v| v != "0");
    let opts = PlanOptions {
        f16_activations: half_act,
        ..PlanOptions::default()
    };
    let plan = Plan::compile(gpu, g, &[out], &mut store, opts)?;
    let setup_s = t0.elapsed().as_secs_f64();
    for &i in &inputs {
        let n: usize = g.shape(i).iter().product();
        let v: Vec<f32> = (0..n)
            .map(|k| ((k * 37 % 101) as f32 / 101.0) - 0.5)
            .collect();
        plan.write(i, &v)?;
    }
    plan.run_fetch(&[out])?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        plan.run()?;
        gpu.wait()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let y = plan.run_fetch(&[out])?.remove(0);
    let finite = y.iter().all(|v| v.is_finite());
    times.sort_by(f64::total_cmp);
    let ms_median = times[reps / 2];
    // FLOP (2 x MAC) measured with torch's FlopCounterMode on these configs (shared/spec 4.1).
    let gflop = match (which, size) {
        ("sd-unet", 256) => Some(360.2),
        ("sd-unet", 512) => Some(1606.5),
        ("sd-unet", 768) => Some(4296.0),
        (_, 256) => Some(622.0),
        (_, 512) => Some(2514.0),
        (_, 768) => Some(5754.0),
        _ => None,
    };
    let st = plan.stats();
    if std::env::var("BENCH_PROFILE").is_ok() {
        let mut prof = plan.profile()?;
        prof.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (key, secs, count) in prof.into_iter().take(25) {
            println!(
                "{}",
                json!({"bench": format!("{which}_profile"), "kernel": key, "ms": (secs * 1e4).round() / 10.0, "dispatches": count})
            );
        }
    }
    println!(
        "{}",
        json!({
            "bench": which, "adapter": adapter, "size": size, "guided_batch": if which == "sd-unet" { 2 } else { 1 },
            "f16_weights": half && which == "sd-unet", "f16_activations": half_act,
            "ms_median": ms_median.round(), "ms_min": times[0].round(), "runs": reps,
            "tflops": gflop.map(|f| (f / ms_median * 1e3).round() / 1e3),
            "gflop": gflop, "dispatches": st.dispatches, "planned_bytes": st.peak_bytes,
            "weights_and_inputs_bytes": st.persistent_bytes, "finite": finite, "setup_s": setup_s.round(),
        })
    );
    Ok(())
}

/// One training step of each stage of the built-in mini-world model (the VAE, then the text
/// encoder and UNet) at the recipe's batch sizes, with random inputs: ms per step, and with
/// `BENCH_PROFILE=1` the 15 costliest kernels.
fn world_sd_bench(gpu: &Arc<Gpu>, adapter: &str, reps: usize) -> stablerep::Result<()> {
    use stablerep::diffusion::training::{denoise_step, init_params, vae_step};
    use stablerep::graph::adam_hyper;
    let mut r = stablerep::world::train_sd::Recipe::builtin();
    // Other sizes to weigh against the recipe's: WORLD_SD_VAE=32,64 WORLD_SD_UNET=32,64.
    let list = |var: &str| -> Option<Vec<usize>> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
    };
    if let Some(v) = list("WORLD_SD_VAE") {
        r.spec.vae_channels = v;
    }
    if let Some(v) = list("WORLD_SD_UNET") {
        r.spec.unet_attention = vec![true; v.len()];
        r.spec.unet_channels = v;
    }
    let (ucfg, vcfg, tcfg) = r.spec.parsed()?;
    let adamw = stablerep::kernels::optim::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        clamp: None,
    };
    let size = r.spec.image_size;
    let lat = size / vcfg.downscale();
    let vs = vae_step(&vcfg, r.vae.batch, size, r.kl_weight, &adamw)?;
    let tokens = tcfg.max_position_embeddings;
    let ds = denoise_step(&ucfg, &tcfg, r.denoiser.batch, lat, tokens, &adamw)?;
    for (name, g, loss, hyper) in [
        ("world-sd-vae", &vs.graph, vs.loss, vs.hyper),
        ("world-sd-denoiser", &ds.graph, ds.loss, ds.hyper),
    ] {
        let mut store = ParamStore::new();
        for (n, t) in init_params(g, 0).tensors {
            store.set(gpu, &n, &t.shape, &t.data)?;
        }
        let plan = Plan::compile(gpu, g, &[loss], &mut store, PlanOptions::default())?;
        for node in 0..g.nodes.len() {
            let id = stablerep::graph::NodeId(node);
            if g.node(id).op != stablerep::graph::Op::Input || id == hyper {
                continue;
            }
            let n: usize = g.shape(id).iter().product();
            if g.node(id).dtype == stablerep::graph::DType::U32 {
                continue;
            } else {
                let v: Vec<f32> = (0..n)
                    .map(|k| ((k * 37 % 101) as f32 / 101.0) - 0.5)
                    .collect();
                plan.write(id, &v)?;
            }
        }
        if name == "world-sd-denoiser" {
            let ids: Vec<u32> = (0..r.denoiser.batch * tokens)
                .map(|i| (i % 300) as u32)
                .collect();
            let (offsets, rows) =
                stablerep::kernels::layout::embedding_index(&ids, tcfg.vocab_size);
            plan.write_u32(ds.ids, &ids)?;
            plan.write_u32(ds.offsets, &offsets)?;
            plan.write_u32(ds.rows, &rows)?;
        }
        plan.write(hyper, &adam_hyper(1e-4, &adamw, 1))?;
        plan.run_fetch(&[loss])?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            plan.run()?;
            gpu.wait()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        if std::env::var("BENCH_PROFILE").is_ok() {
            let mut prof = plan.profile()?;
            prof.sort_by(|a, b| b.1.total_cmp(&a.1));
            // BENCH_PROFILE_TOP=N prints more of the kernels (15 by default).
            let top = std::env::var("BENCH_PROFILE_TOP")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(15);
            for (key, secs, count) in prof.into_iter().take(top) {
                println!(
                    "{}",
                    json!({"bench": format!("{name}_profile"), "kernel": key, "ms": (secs * 1e4).round() / 10.0, "dispatches": count})
                );
            }
        }
        let st = plan.stats();
        println!(
            "{}",
            json!({"bench": name, "adapter": adapter, "ms_median": times[reps / 2].round(), "ms_min": times[0].round(),
                   "runs": reps, "dispatches": st.dispatches, "planned_bytes": st.peak_bytes})
        );
    }
    Ok(())
}

fn main() -> stablerep::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let a = args();
    let gpu = Gpu::new(&GpuOptions::default())?;
    let adapter = gpu.info.name.clone();
    let sizes = if a.sizes.is_empty() {
        vec![1024]
    } else {
        a.sizes.clone()
    };
    if wanted(&a, "matmul")
        && !a
            .filters
            .iter()
            .any(|f| f == "matmul_variants" || f == "matmul_shapes")
    {
        for &n in &sizes {
            let reps = if a.reps > 0 {
                a.reps
            } else if gpu.caps.is_cpu {
                3
            } else {
                50
            };
            let (gflops, kernel) = time_matmul(&gpu, n, Variant::Auto, reps)?;
            println!(
                "{}",
                json!({"bench": "matmul", "adapter": adapter, "m": n, "n": n, "k": n, "kernel": kernel, "reps": reps, "gflops": (gflops * 10.0).round() / 10.0})
            );
        }
    }
    if a.filters.iter().any(|f| f == "matmul_shapes") {
        // The matmuls of one vit-train step (batch 32 x 64 tokens, width 192, MLP 768, 3 heads):
        // forward x W^T, input gradients dY W, weight gradients dY^T X, and attention.
        let att = |ta, tb| MatmulShape {
            batch: 96,
            m: 64,
            n: 64,
            k: 64,
            ta,
            tb,
            a_shared: false,
            b_shared: false,
        };
        let cases = [
            ("fwd qkv", lin(2048, 576, 192, false, true)),
            ("fwd fc1", lin(2048, 768, 192, false, true)),
            ("fwd fc2", lin(2048, 192, 768, false, true)),
            ("dx qkv", lin(2048, 192, 576, false, false)),
            ("dx fc2", lin(2048, 768, 192, false, false)),
            ("dW qkv", lin(576, 192, 2048, true, false)),
            ("dW fc2", lin(192, 768, 2048, true, false)),
            ("attn QK^T", att(false, true)),
            ("attn PV", att(false, false)),
            ("attn dK", att(true, false)),
        ];
        for (name, s) in cases {
            let reps = if a.reps > 0 { a.reps } else { 5 };
            let (gflops, kernel) = time_shape(&gpu, &s, Variant::Auto, reps)?;
            println!(
                "{}",
                json!({"bench": "matmul_shape", "case": name, "adapter": adapter, "batch": s.batch, "m": s.m, "n": s.n, "k": s.k, "kernel": kernel, "gflops": (gflops * 10.0).round() / 10.0})
            );
        }
    }
    if a.filters.iter().any(|f| f == "matmul_anatomy") && gpu.caps.subgroup_size == Some(8) {
        // Where the subgroup kernel's time goes on this adapter: the kernel, a probe with
        // almost no storage loads (arithmetic and register traffic) and a probe with the loads
        // and almost no arithmetic, alternating, on shapes of one vit-train step.
        let cases = [
            ("fwd fc1", lin(2048, 768, 192, false, true)),
            ("dx fc2", lin(2048, 768, 192, false, false)),
            ("dW fc2", lin(192, 768, 2048, true, false)),
        ];
        let reps = if a.reps > 0 { a.reps } else { 5 };
        for round in 0..3 {
            for (name, s) in &cases {
                for probe in [SgProbe::Full, SgProbe::FewLoads, SgProbe::LoadsOnly] {
                    let (gflops, kernel) = time_probe(
                        &gpu,
                        s,
                        Variant::Subgroup(matmul::SG_TILE),
                        Some(probe),
                        reps,
                    )?;
                    let ms = 2.0 * (s.m * s.n * s.k) as f64 / gflops / 1e6;
                    println!(
                        "{}",
                        json!({"bench": "matmul_anatomy", "round": round, "case": name, "adapter": adapter, "probe": format!("{probe:?}"), "kernel": kernel, "ms": (ms * 1000.0).round() / 1000.0, "gflops_equiv": (gflops * 10.0).round() / 10.0})
                    );
                }
            }
        }
    }
    if a.filters.iter().any(|f| f == "matmul_colsum") {
        // A weight gradient dY^T X alone and with the bias gradient's column sums of dY in the
        // same kernel (`launch_colsum`), alternating, on vit-train's shapes.
        let reps = if a.reps > 0 { a.reps } else { 5 };
        for round in 0..3 {
            for (name, m, n) in [
                ("dW qkv", 576u32, 192u32),
                ("dW fc2", 192, 768),
                ("dW fc1", 768, 192),
            ] {
                let s = lin(m, n, 2048, true, false);
                let (na, nb, nc) = matmul::sizes(&s);
                let bufs = [
                    gpu.alloc(na * 4, "a")?,
                    gpu.alloc(nb * 4, "b")?,
                    gpu.alloc(nc * 4, "c")?,
                    gpu.alloc(m as u64 * 4, "colsum")?,
                ];
                let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
                for with in [false, true] {
                    let (va, vb, vc) = (View::new(0, na), View::new(1, nb), View::new(2, nc));
                    let d = if with {
                        matmul::launch_colsum(&s, va, vb, vc, View::new(3, m as u64), &gpu.caps)?
                    } else {
                        matmul::launch(&s, va, vb, vc, &gpu.caps)?
                    };
                    Prepared::new(&gpu, &d, &refs)?.submit(&gpu);
                    gpu.wait()?;
                    let many: Vec<_> = (0..reps).flat_map(|_| d.clone()).collect();
                    let p = Prepared::new(&gpu, &many, &refs)?;
                    let t0 = Instant::now();
                    p.submit(&gpu);
                    gpu.wait()?;
                    let ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
                    println!(
                        "{}",
                        json!({"bench": "matmul_colsum", "round": round, "case": name, "adapter": adapter, "colsum": with, "kernel": d[0].key, "ms": (ms * 1000.0).round() / 1000.0})
                    );
                }
                for b in bufs {
                    gpu.pool.give(b);
                }
            }
        }
    }
    if a.filters.iter().any(|f| f == "matmul_small") {
        // The demo step's attention matmuls (32 views x 3 heads, 17 tokens, head width 32)
        // under each blocked tile, alternating, to choose the tile for small batched products.
        let att = |m, n, k, ta, tb| MatmulShape {
            batch: 96,
            m,
            n,
            k,
            ta,
            tb,
            a_shared: false,
            b_shared: false,
        };
        let cases = [
            ("QK^T", att(17, 17, 32, false, true)),
            ("PV", att(17, 32, 17, false, false)),
            ("dV", att(17, 32, 17, true, false)),
        ];
        let tiles = [
            (8, 8, 8, 8),
            (4, 4, 8, 8),
            (4, 4, 4, 8),
            (4, 8, 8, 4),
            (2, 4, 8, 8),
        ];
        let reps = if a.reps > 0 { a.reps } else { 20 };
        for round in 0..3 {
            for (name, s) in &cases {
                for &(tm, tn, wx, wy) in &tiles {
                    let v = Variant::Blocked(Tile { tm, tn, wx, wy });
                    let (gflops, kernel) = time_shape(&gpu, s, v, reps)?;
                    let ms = 2.0 * (s.batch * s.m * s.n * s.k) as f64 / gflops / 1e6;
                    println!(
                        "{}",
                        json!({"bench": "matmul_small", "round": round, "case": name, "adapter": adapter, "tile": [tm, tn, wx, wy], "kernel": kernel, "ms": (ms * 1000.0).round() / 1000.0})
                    );
                }
            }
        }
    }
    if a.filters.iter().any(|f| f == "matmul_variants") {
        let mut variants = vec![
            Variant::Blocked(Tile {
                tm: 4,
                tn: 4,
                wx: 8,
                wy: 8,
            }),
            Variant::Blocked(Tile {
                tm: 8,
                tn: 8,
                wx: 8,
                wy: 8,
            }),
            Variant::Blocked(Tile {
                tm: 8,
                tn: 8,
                wx: 16,
                wy: 16,
            }),
        ];
        if gpu.caps.subgroup_size == Some(8) {
            for (r, tn) in [(32, 4), (32, 8), (32, 12), (64, 4), (64, 8), (96, 4)] {
                variants.push(Variant::Subgroup(SgTile { s: 8, r, tn }));
            }
        }
        for &n in &sizes {
            for v in &variants {
                let reps = if a.reps > 0 {
                    a.reps
                } else if gpu.caps.is_cpu {
                    3
                } else {
                    50
                };
                let (gflops, kernel) = time_matmul(&gpu, n, *v, reps)?;
                println!(
                    "{}",
                    json!({"bench": "matmul_variant", "adapter": adapter, "m": n, "n": n, "k": n, "kernel": kernel, "gflops": (gflops * 10.0).round() / 10.0})
                );
            }
        }
    }
    if wanted(&a, "mlp_step") {
        let cfg = DemoConfig {
            steps: 50,
            ..Default::default()
        };
        let r = train_mlp(&gpu, &cfg, 1000, |_, _| {})?;
        println!(
            "{}",
            json!({
                "bench": "mlp_step", "adapter": adapter, "hidden": cfg.hidden, "batch": 3 * cfg.points_per_class,
                "ms_per_step": (r.ms_per_step * 100.0).round() / 100.0,
                "dispatches_per_submit": r.plan.dispatches, "submits_per_step": r.plan.submits_per_run,
                "plan_peak_bytes": r.plan.peak_bytes, "sum_tensor_bytes": r.plan.tensor_bytes,
                "persistent_bytes": r.plan.persistent_bytes,
            })
        );
    }
    if wanted(&a, "vit-train") {
        vit_train(&gpu, &adapter)?;
    }
    if a.filters.iter().any(|f| f == "chunk") {
        let max_rows = a.sizes.first().map_or(2064, |&s| s as usize);
        chunk_bench(&gpu, &adapter, max_rows)?;
    }
    if a.filters.iter().any(|f| f == "chunk-estimate") {
        chunk_estimate(&gpu, &adapter)?;
    }
    if a.filters.iter().any(|f| f == "chunk-vit-b") {
        let chunk = a.sizes.first().map_or(6, |&s| s as usize);
        chunk_vit_b(&gpu, &adapter, chunk)?;
    }
    if wanted(&a, "demo-step") {
        let reps = if a.reps > 0 { a.reps } else { 10 };
        demo_step(&gpu, &adapter, reps)?;
    }
    if wanted(&a, "attention") && !a.filters.is_empty() {
        // SD 1.5's UNet self-attention at 256^2 (guided: 16 batch-heads), levels 0 and 1.
        for (bh, t, d) in [(16usize, 1024usize, 40usize), (16, 256, 80)] {
            let mut g = Graph::new();
            let q = g.input("q", &[bh, t, d]);
            let k = g.input("k", &[bh, t, d]);
            let v = g.input("v", &[bh, t, d]);
            let y = g.attention(q, k, v, 1.0 / (d as f32).sqrt())?;
            let plan = Plan::compile(
                &gpu,
                &g,
                &[y],
                &mut ParamStore::new(),
                PlanOptions::default(),
            )?;
            for x in [q, k, v] {
                let vals: Vec<f32> = (0..bh * t * d)
                    .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
                    .collect();
                plan.write(x, &vals)?;
            }
            plan.run_fetch(&[y])?;
            let reps = 3;
            let t0 = Instant::now();
            for _ in 0..reps {
                plan.run()?;
            }
            gpu.wait()?;
            let ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let gflop = 4.0 * (bh * t * t * d) as f64 / 1e9;
            println!(
                "{}",
                json!({"bench": "attention", "adapter": adapter, "bh": bh, "tokens": t, "head_dim": d, "ms": ms.round(), "gflops": (gflop / ms * 1e4).round() / 10.0, "kernel": plan.kernel_keys()})
            );
        }
    }
    if a.filters.iter().any(|f| f == "world-sd") {
        let reps = if a.reps > 0 { a.reps } else { 3 };
        world_sd_bench(&gpu, &adapter, reps)?;
    }
    // The SD cases take minutes on a software adapter: only when asked for.
    for which in ["sd-unet", "sd-vae"] {
        if a.filters
            .iter()
            .any(|f| which.contains(f.as_str()) && f.starts_with("sd"))
        {
            let reps = if a.reps > 0 {
                a.reps
            } else if gpu.caps.is_cpu {
                2
            } else {
                10
            };
            for &size in if a.sizes.is_empty() {
                &[256][..]
            } else {
                &a.sizes[..]
            } {
                sd_bench(&gpu, &adapter, which, size as usize, reps)?;
            }
        }
    }
    if wanted(&a, "chain") {
        let mut g = Graph::new();
        let x = g.input("x", &[256, 256]);
        let mut h = x;
        for i in 0..64 {
            h = g.unary([UnaryOp::Tanh, UnaryOp::Affine(1.01, 0.0)][i % 2], h)?;
        }
        let y = g.sum_all(h)?;
        for reuse in [true, false] {
            let plan = Plan::compile(
                &gpu,
                &g,
                &[y],
                &mut ParamStore::new(),
                PlanOptions {
                    reuse,
                    ..Default::default()
                },
            )?;
            let s = plan.stats();
            println!(
                "{}",
                json!({"bench": "chain", "adapter": adapter, "ops": 64, "reuse": reuse, "plan_peak_bytes": s.peak_bytes, "sum_tensor_bytes": s.tensor_bytes, "buffers": s.buffers})
            );
        }
    }
    Ok(())
}
