//! Samplers against diffusers (`tools/make_sd_fixtures.py`): SD 1.5's scheduler config, each
//! sampler driven for 4 (and 20) steps by a synthetic noise predictor on a [1, 4, 8, 8] latent,
//! with the ancestral noise diffusers drew. Host execution of the step programs; tolerance
//! 1e-4 * max(1, max |ref|) per step, as issue 4 asks. The same programs then run on the GPU
//! (`GpuSampler`: lincomb dispatches, all coefficients uploaded once) and must agree too.

mod common;

use std::path::Path;

use stablerep::diffusion::gpu_sampler::GpuSampler;
use stablerep::diffusion::sampler::{HostState, Kind, Sampler};
use stablerep::diffusion::schedule::{SchedulerConfig, Tables};
use stablerep::nn::checkpoint::Checkpoint;

fn fixture() -> Checkpoint {
    Checkpoint::load(Path::new("tests/fixtures/sd_schedulers.safetensors")).unwrap()
}

/// The fixture's noise predictor: 0.5 tanh(x) + 0.1 sin(0.01 t).
fn model(x: &[f32], t: f64) -> Vec<f32> {
    let s = (0.01 * t).sin();
    x.iter()
        .map(|&v| (0.5 * (v as f64).tanh() + 0.1 * s) as f32)
        .collect()
}

/// The worst deviation of `got` from `want`, and 1e-4 * max(1, max |want|).
fn deviation(got: &[f32], want: &[f32]) -> (f64, f64) {
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs())) as f64;
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    (worst, 1e-4 * scale)
}

/// Runs the fixture case `name` with the step programs on the GPU.
fn check_gpu(name: &str, kind: Kind, steps: usize) {
    let (gpu, _lock) = common::gpu();
    let fx = fixture();
    let lat = &fx.tensors[&format!("{name}.latents")];
    let n = lat.data.len() / lat.shape[0];
    let sampler = Sampler::new(kind, &SchedulerConfig::default(), steps).unwrap();
    let run = GpuSampler::new(&gpu, sampler.clone(), n).unwrap();
    run.start(&fx.tensors["noise0"].data).unwrap();
    let noise = fx.tensors.get(&format!("{name}.noise"));
    for i in 0..sampler.evaluations() {
        let x = run.read_x(i).unwrap();
        let (worst, tol) = deviation(&x, &lat.data[i * n..(i + 1) * n]);
        assert!(
            worst <= tol,
            "{name} (GPU): latents before evaluation {i} differ by {worst}"
        );
        let inp: Vec<f32> = x
            .iter()
            .map(|&v| (v as f64 * sampler.input_scale(i)) as f32)
            .collect();
        gpu.write(run.eps_buffer(), 0, &model(&inp, sampler.timesteps()[i]));
        if let (true, Some(z)) = (sampler.needs_noise(i), noise) {
            gpu.write(run.noise_buffer(), 0, &z.data[i * n..(i + 1) * n]);
        }
        run.submit(i).unwrap();
    }
    let last = sampler.evaluations();
    let (worst, tol) = deviation(&run.read_x(last).unwrap(), &lat.data[last * n..]);
    assert!(
        worst <= tol,
        "{name} (GPU): final latents differ by {worst}"
    );
}

#[test]
fn every_sampler_runs_on_the_gpu() {
    check_gpu("ddim", Kind::Ddim { eta: 0.0 }, 4);
    check_gpu("ddim_eta", Kind::Ddim { eta: 0.5 }, 4);
    check_gpu("pndm20", Kind::Pndm, 20);
    check_gpu("euler", Kind::Euler, 4);
    check_gpu("euler_a", Kind::EulerAncestral, 4);
    check_gpu("dpmpp_2m", Kind::DpmPP2M { karras: false }, 4);
    check_gpu("dpmpp_2m_karras20", Kind::DpmPP2M { karras: true }, 20);
}

fn check(name: &str, kind: Kind, steps: usize) {
    let fx = fixture();
    let get = |k: &str| &fx.tensors[&format!("{name}.{k}")];
    let sampler = Sampler::new(kind, &SchedulerConfig::default(), steps).unwrap();
    let ts = &get("timesteps").data;
    assert_eq!(
        sampler.timesteps().len(),
        ts.len(),
        "{name}: timesteps {:?} vs {ts:?}",
        sampler.timesteps()
    );
    for (a, b) in sampler.timesteps().iter().zip(ts) {
        assert!(
            (a - *b as f64).abs() < 1e-3,
            "{name}: timesteps {:?} vs {ts:?}",
            sampler.timesteps()
        );
    }
    let init = get("init_sigma").data[0] as f64;
    assert!(
        (sampler.init_noise_sigma() - init).abs() < 1e-5 * init,
        "{name}: init sigma"
    );
    let lat = get("latents");
    let n = lat.data.len() / lat.shape[0];
    let noise0 = &fx.tensors["noise0"].data;
    let mut st = HostState::new(&sampler, noise0);
    let noise = fx.tensors.get(&format!("{name}.noise"));
    for i in 0..sampler.evaluations() {
        let (worst, tol) = deviation(&st.x, &lat.data[i * n..(i + 1) * n]);
        assert!(
            worst <= tol,
            "{name}: latents before evaluation {i} differ by {worst}"
        );
        let inp: Vec<f32> =
            st.x.iter()
                .map(|&v| (v as f64 * sampler.input_scale(i)) as f32)
                .collect();
        let eps = model(&inp, sampler.timesteps()[i]);
        let z = noise.map(|t| &t.data[i * n..(i + 1) * n]);
        st.apply(
            &sampler.program(i),
            &eps,
            if sampler.needs_noise(i) { z } else { None },
        )
        .unwrap();
    }
    let (worst, tol) = deviation(&st.x, &lat.data[lat.data.len() - n..]);
    assert!(worst <= tol, "{name}: final latents differ by {worst}");
}

#[test]
fn ddim_matches_diffusers() {
    check("ddim", Kind::Ddim { eta: 0.0 }, 4);
}

#[test]
fn ddim_with_eta_matches_diffusers() {
    check("ddim_eta", Kind::Ddim { eta: 0.5 }, 4);
}

#[test]
fn pndm_matches_diffusers() {
    check("pndm", Kind::Pndm, 4);
    check("pndm20", Kind::Pndm, 20);
}

#[test]
fn euler_matches_diffusers() {
    check("euler", Kind::Euler, 4);
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check("euler_a", Kind::EulerAncestral, 4);
}

#[test]
fn dpm_solver_2m_matches_diffusers() {
    check("dpmpp_2m", Kind::DpmPP2M { karras: false }, 4);
    check("dpmpp_2m_karras", Kind::DpmPP2M { karras: true }, 4);
    check("dpmpp_2m_karras20", Kind::DpmPP2M { karras: true }, 20);
}

#[test]
fn schedule_tables_match_the_spec() {
    // shared/spec/stable-diffusion.md section 3.1.
    let t = Tables::new(&SchedulerConfig::default());
    for (i, want) in [
        (0, 0.99914998),
        (1, 0.99829602),
        (499, 0.27766943),
        (999, 0.00466010),
    ] {
        assert!(
            (t.acp(i) - want).abs() < 2e-7,
            "alphas_cumprod[{i}] = {}",
            t.acp(i)
        );
    }
    assert!((t.sigmas[0] as f64 - 0.0291675).abs() < 1e-6);
    assert!((t.sigmas[999] as f64 - 14.6146469).abs() < 1e-4);
}

#[test]
fn bad_sampler_settings_are_clear_errors() {
    let c = SchedulerConfig::default();
    let e = Sampler::new(Kind::Euler, &c, 0).unwrap_err().to_string();
    assert!(e.contains("steps"), "{e}");
    let e = Sampler::new(Kind::Ddim { eta: -1.0 }, &c, 10)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eta"), "{e}");
    let e = Kind::parse("heun", 0.0).unwrap_err().to_string();
    assert!(e.contains("heun") && e.contains("euler-a"), "{e}");
    let e = SchedulerConfig::from_json(r#"{"prediction_type": "v_prediction"}"#, "x.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("v_prediction") && e.contains("x.json"), "{e}");
    let e = SchedulerConfig::from_json("{", "y.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("y.json"), "{e}");
    let mut c2 = c.clone();
    c2.timestep_spacing = Some("odd".into());
    let e = Sampler::new(Kind::Euler, &c2, 10).unwrap_err().to_string();
    assert!(e.contains("odd"), "{e}");
}

#[test]
fn lincomb_kernel_matches_the_cpu_on_awkward_shapes() {
    use stablerep::exec::Prepared;
    use stablerep::kernels::{elementwise, View};
    let (gpu, _lock) = common::gpu();
    let mut rng = common::Rng(41);
    for case in 0..12 {
        let len = rng.int(1, 97);
        let k = rng.int(1, elementwise::LINCOMB_MAX);
        // Inputs packed at odd offsets in one buffer (so the scalar path runs too).
        let pad = rng.int(0, 4);
        let coef: Vec<f32> = rng.vec(k, -2.0, 2.0).iter().map(|&v| v as f32).collect();
        let data: Vec<f32> = rng
            .vec(pad + k * len, -1.0, 1.0)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let bufs = [
            gpu.alloc((k * 4) as u64, "coef").unwrap(),
            gpu.alloc(((pad + k * len) * 4) as u64, "xs").unwrap(),
            gpu.alloc((len * 4) as u64, "y").unwrap(),
        ];
        gpu.write(&bufs[0], 0, &coef);
        gpu.write(&bufs[1], 0, &data);
        let xs: Vec<View> = (0..k)
            .map(|j| View {
                buf: 1,
                offset: (pad + j * len) as u64,
                len: len as u64,
                half: false,
            })
            .collect();
        let d = elementwise::lincomb(
            View::new(0, k as u64),
            &xs,
            View::new(2, len as u64),
            &gpu.caps,
        )
        .unwrap();
        let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
        Prepared::new(&gpu, &d, &refs).unwrap().submit(&gpu);
        let got: Vec<f32> = gpu.read(&bufs[2], 0, (len * 4) as u64).unwrap();
        for (i, g) in got.iter().enumerate() {
            let want: f64 = (0..k)
                .map(|j| coef[j] as f64 * data[pad + j * len + i] as f64)
                .sum();
            assert!(
                (*g as f64 - want).abs() < 1e-5,
                "case {case} (len {len}, k {k}) element {i}: {g} vs {want}"
            );
        }
        for b in bufs {
            gpu.pool.give(b);
        }
    }
    // Misuse is an error, not a panic.
    let e = elementwise::lincomb(View::new(0, 1), &[], View::new(1, 4), &gpu.caps).unwrap_err();
    assert!(e.to_string().contains("inputs"), "{e}");
    let e = elementwise::lincomb(
        View::new(0, 1),
        &[View::new(2, 3)],
        View::new(1, 4),
        &gpu.caps,
    )
    .unwrap_err();
    assert!(e.to_string().contains("3 values"), "{e}");
}

#[test]
fn text_encoder_matches_transformers() {
    use stablerep::diffusion::text_encoder::{
        convert, embed_tokens, encoder, encoder_embedded, ClipTextConfig,
    };
    use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
    let (gpu, _lock) = common::gpu();
    let path = "tests/fixtures/sd_text_encoder.safetensors";
    let ck = Checkpoint::load(Path::new(path)).unwrap();
    let cfg = ClipTextConfig::from_json(&ck.metadata["config"], "config.json").unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size),
        (32, 2, 1000)
    );
    let weights = convert(&ck, &cfg, "te.", path).unwrap();
    let ids = &ck.tensors["ref.ids"];
    let want = &ck.tensors["ref.last_hidden_state"];
    let (batch, tokens) = (ids.shape[0], ids.shape[1]);
    let mut g = Graph::new();
    let (hidden, ids_in) = encoder(&mut g, &cfg, "te.", batch, tokens).unwrap();
    let mut store = ParamStore::new();
    for (name, t) in &weights.tensors {
        store.set(&gpu, name, &t.shape, &t.data).unwrap();
    }
    let plan = Plan::compile(&gpu, &g, &[hidden], &mut store, PlanOptions::default()).unwrap();
    let idv: Vec<u32> = ids.data.iter().map(|&v| v as u32).collect();
    plan.write_u32(ids_in, &idv).unwrap();
    let got = &plan.run_fetch(&[hidden]).unwrap()[0];
    let (worst, tol) = deviation(got, &want.data);
    assert!(
        worst <= tol,
        "last hidden state differs by {worst} (tolerance {tol})"
    );
    // The generator's path: token rows looked up on the host, no table on the GPU.
    let mut g = Graph::new();
    let x = g.input("x", &[batch * tokens, cfg.hidden_size]);
    let hidden = encoder_embedded(&mut g, &cfg, "te.", x, batch, tokens).unwrap();
    let plan = Plan::compile(&gpu, &g, &[hidden], &mut store, PlanOptions::default()).unwrap();
    plan.write(x, &embed_tokens(&weights, "te.", &idv).unwrap())
        .unwrap();
    assert_eq!(&plan.run_fetch(&[hidden]).unwrap()[0], got);
    let e = embed_tokens(&weights, "te.", &[3, 1000])
        .unwrap_err()
        .to_string();
    assert!(e.contains("1000") && e.contains("vocabulary"), "{e}");
    // Older transformers files carry `position_ids` (an integer buffer): ignored.
    let mut with_ids = ck.clone();
    with_ids.tensors.insert(
        "embeddings.position_ids".into(),
        stablerep::nn::checkpoint::HostTensor {
            shape: vec![1, 77],
            data: (0..77).map(|i| i as f32).collect(),
        },
    );
    assert_eq!(
        convert(&with_ids, &cfg, "te.", path).unwrap().tensors,
        weights.tensors
    );
    // Bad weights are clear errors that name the tensor.
    let mut broken = ck.clone();
    broken.tensors.remove("encoder.layers.1.mlp.fc2.bias");
    let e = convert(&broken, &cfg, "te.", path).unwrap_err().to_string();
    assert!(
        e.contains("encoder.layers.1.mlp.fc2.bias") && e.contains(path),
        "{e}"
    );
    let mut wrong = cfg.clone();
    wrong.intermediate_size = 40;
    let e = convert(&ck, &wrong, "te.", path).unwrap_err().to_string();
    assert!(e.contains("mlp.fc1.weight") && e.contains("40"), "{e}");
    let e = ClipTextConfig::from_json(r#"{"vocab_size": 10, "hidden_size": 30, "intermediate_size": 4, "num_attention_heads": 4, "num_hidden_layers": 1, "max_position_embeddings": 7}"#, "c.json").unwrap_err().to_string();
    assert!(e.contains("c.json") && e.contains("divisible"), "{e}");
}

/// Runs `build` on the GPU with `ck`'s tensors under `prefix` as parameters (prefix stripped).
fn run_block(
    gpu: &std::sync::Arc<stablerep::gpu::Gpu>,
    ck: &Checkpoint,
    prefix: &str,
    inputs: &[(&str, &[usize], &[f32])],
    build: impl FnOnce(
        &mut stablerep::graph::Graph,
        &[stablerep::graph::NodeId],
    ) -> stablerep::graph::NodeId,
) -> Vec<f32> {
    run_block_opts(gpu, ck, prefix, inputs, Default::default(), build).0
}

/// [`run_block`] with plan options; also returns the plan's kernel keys.
fn run_block_opts(
    gpu: &std::sync::Arc<stablerep::gpu::Gpu>,
    ck: &Checkpoint,
    prefix: &str,
    inputs: &[(&str, &[usize], &[f32])],
    opts: stablerep::graph::PlanOptions,
    build: impl FnOnce(
        &mut stablerep::graph::Graph,
        &[stablerep::graph::NodeId],
    ) -> stablerep::graph::NodeId,
) -> (Vec<f32>, Vec<String>) {
    use stablerep::graph::{Graph, ParamStore, Plan};
    let mut g = Graph::new();
    let ids: Vec<_> = inputs.iter().map(|(n, s, _)| g.input(n, s)).collect();
    let y = build(&mut g, &ids);
    let mut store = ParamStore::new();
    for (name, t) in &ck.tensors {
        if let Some(n) = name.strip_prefix(prefix) {
            store.set(gpu, n, &t.shape, &t.data).unwrap();
        }
    }
    let plan = Plan::compile(gpu, &g, &[y], &mut store, opts).unwrap();
    for (id, (_, _, data)) in ids.iter().zip(inputs) {
        plan.write(*id, data).unwrap();
    }
    let keys = plan.kernel_keys().iter().map(|k| k.to_string()).collect();
    (plan.run_fetch(&[y]).unwrap().remove(0), keys)
}

#[test]
fn resnet_blocks_match_diffusers() {
    use stablerep::diffusion::blocks::{resnet_block, Resnet};
    let (gpu, _lock) = common::gpu();
    let ck = Checkpoint::load(Path::new("tests/fixtures/sd_resnet.safetensors")).unwrap();
    for (name, cin, cout) in [("a", 8, 12), ("b", 12, 12)] {
        let x = &ck.tensors[&format!("ref.{name}.x")];
        let t = &ck.tensors[&format!("ref.{name}.temb")];
        let want = &ck.tensors[&format!("ref.{name}.y")].data;
        let got = run_block(
            &gpu,
            &ck,
            &format!("{name}."),
            &[("x", &x.shape, &x.data), ("temb", &t.shape, &t.data)],
            |g, i| {
                let r = Resnet {
                    cin,
                    cout,
                    temb: Some(10),
                    groups: 4,
                    eps: 1e-5,
                };
                resnet_block(g, "", i[0], Some(i[1]), r).unwrap()
            },
        );
        let (worst, tol) = deviation(&got, want);
        assert!(worst <= tol, "ResnetBlock2D {name}: differs by {worst}");
    }
}

#[test]
fn group_norm_and_upsampling_match_direct_computation() {
    use stablerep::diffusion::blocks::upsample_nearest2x;
    let (gpu, _lock) = common::gpu();
    let mut rng = common::Rng(9);
    let (n, c, h, w, groups) = (2, 6, 3, 5, 3);
    let x: Vec<f32> = rng
        .vec(n * c * h * w, -2.0, 2.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let gm: Vec<f32> = rng.vec(c, 0.5, 1.5).iter().map(|&v| v as f32).collect();
    let bt: Vec<f32> = rng.vec(c, -0.5, 0.5).iter().map(|&v| v as f32).collect();
    let mut ck = Checkpoint::default();
    for (k, v) in [("gn.weight", &gm), ("gn.bias", &bt)] {
        ck.tensors.insert(
            k.into(),
            stablerep::nn::checkpoint::HostTensor {
                shape: vec![c],
                data: v.clone(),
            },
        );
    }
    let got = run_block(&gpu, &ck, "", &[("x", &[n, c, h, w], &x)], |g, i| {
        let a = g.param("gn.weight", &[c]);
        let b = g.param("gn.bias", &[c]);
        let y = g.group_norm(i[0], a, b, groups, 1e-5, false).unwrap();
        upsample_nearest2x(g, y).unwrap()
    });
    let per = c / groups * h * w;
    let mut norm = vec![0.0f64; x.len()];
    for (k, chunk) in x.chunks(per).enumerate() {
        let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / per as f64;
        let var = chunk
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / per as f64;
        for (j, &v) in chunk.iter().enumerate() {
            let ch = (k * per + j) / (h * w) % c;
            norm[k * per + j] =
                (v as f64 - mean) / (var + 1e-5).sqrt() * gm[ch] as f64 + bt[ch] as f64;
        }
    }
    assert_eq!(got.len(), 4 * x.len());
    for (i, v) in got.iter().enumerate() {
        let (xx, rest) = (i % (2 * w), i / (2 * w));
        let (yy, nc) = (rest % (2 * h), rest / (2 * h));
        let want = norm[(nc * h + yy / 2) * w + xx / 2];
        assert!(
            (*v as f64 - want).abs() < 1e-4,
            "element {i}: {v} vs {want}"
        );
    }
}

#[test]
fn timestep_features_match_diffusers() {
    use stablerep::diffusion::blocks::timestep_features;
    let ck = Checkpoint::load(Path::new("tests/fixtures/sd_timesteps.safetensors")).unwrap();
    let ts = &ck.tensors["timesteps"].data;
    for dim in [320usize, 33] {
        let want = &ck.tensors[&format!("emb{dim}")].data;
        for (k, &t) in ts.iter().enumerate() {
            let got = timestep_features(t as f64, dim, true, 0.0);
            let (worst, tol) = deviation(&got, &want[k * dim..(k + 1) * dim]);
            assert!(worst <= tol, "dim {dim}, t {t}: differs by {worst}");
        }
    }
}

#[test]
fn spatial_transformer_matches_diffusers() {
    use stablerep::diffusion::blocks::{spatial_transformer, SpatialTransformer};
    let (gpu, _lock) = common::gpu();
    let ck = Checkpoint::load(Path::new("tests/fixtures/sd_transformer.safetensors")).unwrap();
    let x = &ck.tensors["ref.x"];
    let ctx = &ck.tensors["ref.ctx"];
    let got = run_block(
        &gpu,
        &ck,
        "m.",
        &[("x", &x.shape, &x.data), ("ctx", &[14, 12], &ctx.data)],
        |g, i| {
            let s = SpatialTransformer {
                channels: 16,
                heads: 2,
                context_dim: 12,
                groups: 4,
                layers: 1,
            };
            spatial_transformer(g, "", i[0], i[1], 7, s).unwrap()
        },
    );
    let (worst, tol) = deviation(&got, &ck.tensors["ref.y"].data);
    assert!(worst <= tol, "Transformer2DModel differs by {worst}");
}

/// The fixture UNet's output at timestep `t` (inputs already written): its time features for
/// each of the `b` latents, then one run.
fn unet_at(
    plan: &stablerep::graph::Plan,
    inp: &stablerep::diffusion::unet::UNetInputs,
    eps: stablerep::graph::NodeId,
    cfg: &stablerep::diffusion::unet::UNetConfig,
    b: usize,
    t: usize,
) -> Vec<f32> {
    let feats = stablerep::diffusion::blocks::timestep_features(
        t as f64,
        cfg.block_out_channels[0],
        cfg.flip_sin_to_cos,
        cfg.freq_shift,
    );
    let time: Vec<f32> = (0..b).flat_map(|_| feats.iter().copied()).collect();
    plan.write(inp.time, &time).unwrap();
    plan.run_fetch(&[eps]).unwrap().remove(0)
}

#[test]
fn unet_with_sd15_topology_matches_diffusers() {
    use stablerep::diffusion::unet::{unet, UNetConfig};
    use stablerep::graph::{Graph, ParamStore, Plan, PlanOptions};
    let (gpu, _lock) = common::gpu();
    let path = "tests/fixtures/sd_unet.safetensors";
    let ck = Checkpoint::load(Path::new(path)).unwrap();
    let cfg = UNetConfig::from_json(&ck.metadata["config"], "unet/config.json").unwrap();
    let x = &ck.tensors["ref.x"];
    let ctx = &ck.tensors["ref.ctx"];
    let (b, h, w, tokens) = (x.shape[0], x.shape[2], x.shape[3], ctx.shape[1]);
    let mut g = Graph::new();
    let (eps, inp) = unet(&mut g, &cfg, "", b, h, w, tokens).unwrap();
    let mut store = ParamStore::new();
    for (name, t) in &ck.tensors {
        if let Some(n) = name.strip_prefix("unet.") {
            store.set(&gpu, n, &t.shape, &t.data).unwrap();
        }
    }
    let plan = Plan::compile(&gpu, &g, &[eps], &mut store, PlanOptions::default()).unwrap();
    plan.write(inp.sample, &x.data).unwrap();
    plan.write(inp.context, &ctx.data).unwrap();
    for t in [981, 1] {
        let got = unet_at(&plan, &inp, eps, &cfg, b, t);
        let (worst, tol) = deviation(&got, &ck.tensors[&format!("ref.eps{t}")].data);
        assert!(
            worst <= tol,
            "UNet at t = {t}: differs by {worst} (tolerance {tol})"
        );
    }
    // Configs the builder cannot honour are refused by name.
    let text = ck.metadata["config"].replace(
        "\"use_linear_projection\": false",
        "\"use_linear_projection\": true",
    );
    let e = UNetConfig::from_json(&text, "u.json")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("use_linear_projection") && e.contains("u.json"),
        "{e}"
    );
    let e = unet(&mut Graph::new(), &cfg, "", 1, 6, 8, 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("6x8") && e.contains("multiple of 8"), "{e}");
}

#[test]
fn unet_with_f16_activations_matches_diffusers_fp16() {
    use stablerep::diffusion::unet::{unet, UNetConfig};
    use stablerep::graph::{DType, Graph, ParamStore, Plan, PlanOptions};
    let (gpu, _lock) = common::gpu();
    let ck = Checkpoint::load(Path::new("tests/fixtures/sd_unet.safetensors")).unwrap();
    let half = Checkpoint::load(Path::new("tests/fixtures/sd_unet_fp16.safetensors")).unwrap();
    let cfg = UNetConfig::from_json(&ck.metadata["config"], "unet/config.json").unwrap();
    let x = &ck.tensors["ref.x"];
    let ctx = &ck.tensors["ref.ctx"];
    let (b, h, w, tokens) = (x.shape[0], x.shape[2], x.shape[3], ctx.shape[1]);
    // As `generate --precision f16` runs it: f16 weights (the fixture's are fp16, so this is
    // lossless) and f16 activations.
    let mut g = Graph::new();
    g.half_weights = true;
    let (eps, inp) = unet(&mut g, &cfg, "", b, h, w, tokens).unwrap();
    let mut store = ParamStore::new();
    for node in g
        .nodes
        .iter()
        .filter(|n| n.op == stablerep::graph::Op::Param)
    {
        let name = node.name.as_deref().unwrap();
        let t = &ck.tensors[&format!("unet.{name}")];
        if node.dtype == DType::F16 {
            store.set_f16(&gpu, name, &t.shape, &t.data).unwrap();
        } else {
            store.set(&gpu, name, &t.shape, &t.data).unwrap();
        }
    }
    let opts = PlanOptions {
        f16_activations: true,
        ..PlanOptions::default()
    };
    let plan = Plan::compile(&gpu, &g, &[eps], &mut store, opts).unwrap();
    let keys = plan.kernel_keys();
    for family in ["im2col", "permute", "attention"] {
        assert!(
            keys.iter()
                .any(|k| k.starts_with(family) && k.contains("_h")),
            "no f16 {family} kernel: {keys:?}"
        );
    }
    plan.write(inp.sample, &x.data).unwrap();
    plan.write(inp.context, &ctx.data).unwrap();
    for t in [981, 1] {
        let got = unet_at(&plan, &inp, eps, &cfg, b, t);
        let want16 = &half.tensors[&format!("ref.eps{t}")].data;
        let want32 = &ck.tensors[&format!("ref.eps{t}")].data;
        // diffusers' fp16 UNet is itself 1.8e-3 (relative to the largest output) from its
        // f32 run on this fixture; ours must be within 4e-3 of both.
        let (d16, tol) = deviation(&got, want16);
        let (d32, _) = deviation(&got, want32);
        let tol = tol * 40.0;
        eprintln!("t = {t}: f16 activations vs diffusers fp16 {d16:.2e}, vs f32 {d32:.2e} (tolerance {tol:.2e})");
        assert!(
            d16 <= tol,
            "t = {t}: {d16} from diffusers' fp16 UNet (tolerance {tol})"
        );
        assert!(
            d32 <= tol,
            "t = {t}: {d32} from diffusers' f32 UNet (tolerance {tol})"
        );
        assert!(d32 > 0.0, "t = {t}: identical to f32, so f16 was not used");
    }
    // Asked for on a device without shader-f16: a clear error before any GPU work.
    let no_f16 = stablerep::kernels::catalog::generic_caps(false);
    let mut o = stablerep::diffusion::model::GenerateOptions {
        prompt: "a".into(),
        negative: String::new(),
        images: 1,
        guidance: 2.0,
        steps: 1,
        sampler: stablerep::diffusion::sampler::Kind::Ddim { eta: 0.0 },
        seed: 0,
        caption: 0,
        size: 64,
        half_weights: None,
        half_activations: Some(true),
        save_size: None,
        init_noise: None,
    };
    let e = o.half_activations(&no_f16).unwrap_err().to_string();
    assert!(
        e.contains("--precision f16") && e.contains("shader-f16"),
        "{e}"
    );
    o.half_activations = None;
    assert!(!o.half_activations(&no_f16).unwrap());
    assert!(!o
        .half_activations(&stablerep::kernels::catalog::generic_caps(true))
        .unwrap());
}

/// Runs the VAE encoder or decoder of the fixture on `input`, with the checkpoint `ck`; with
/// `limit` > 0 the decoder must keep every activation under `limit` bytes.
fn run_vae(
    gpu: &std::sync::Arc<stablerep::gpu::Gpu>,
    ck: &Checkpoint,
    decode: bool,
    input: &stablerep::nn::checkpoint::HostTensor,
    limit: usize,
) -> Vec<f32> {
    run_vae_opts(gpu, ck, decode, input, limit, Default::default()).0
}

/// [`run_vae`] with plan options; also returns the plan's kernel keys.
fn run_vae_opts(
    gpu: &std::sync::Arc<stablerep::gpu::Gpu>,
    ck: &Checkpoint,
    decode: bool,
    input: &stablerep::nn::checkpoint::HostTensor,
    limit: usize,
    opts: stablerep::graph::PlanOptions,
) -> (Vec<f32>, Vec<String>) {
    use stablerep::diffusion::vae::{decoder, encoder, VaeConfig};
    let cfg = VaeConfig::from_json(&ck.metadata["config"], "vae/config.json").unwrap();
    run_block_opts(
        gpu,
        ck,
        "vae.",
        &[("x", &input.shape, &input.data)],
        opts,
        |g, i| {
            if decode {
                g.max_tensor_bytes = limit;
                g.conv_patch_bytes = limit;
                let y = decoder(g, &cfg, "", i[0]).unwrap();
                if limit > 0 {
                    let chunked = g
                        .nodes
                        .iter()
                        .filter(|n| {
                            matches!(n.op, stablerep::graph::Op::GroupApply { .. })
                                && n.shape[1] < 8
                        })
                        .count();
                    assert!(chunked > 0, "nothing was split");
                    for n in &g.nodes {
                        let bytes = 4 * n.shape.iter().product::<usize>();
                        assert!(bytes <= limit, "{:?}: {bytes} bytes", n.shape);
                    }
                }
                y
            } else {
                encoder(g, &cfg, "", i[0]).unwrap()
            }
        },
    )
}

#[test]
fn vae_decoder_and_encoder_match_diffusers() {
    use stablerep::diffusion::vae::rename_legacy_attention;
    let (gpu, _lock) = common::gpu();
    let ck = Checkpoint::load(Path::new("tests/fixtures/sd_vae.safetensors")).unwrap();
    let got = run_vae(&gpu, &ck, true, &ck.tensors["ref.z"], 0);
    let (worst, tol) = deviation(&got, &ck.tensors["ref.decoded"].data);
    assert!(worst <= tol, "VAE decode differs by {worst}");
    // Under a 40,000-byte tensor limit (the [2, 16, 32, 32] activations are 131,072 bytes)
    // the decoder works on channel chunks and still matches.
    let split = run_vae(&gpu, &ck, true, &ck.tensors["ref.z"], 40_000);
    let (worst, tol) = deviation(&split, &ck.tensors["ref.decoded"].data);
    assert!(
        worst <= tol,
        "VAE decode in channel chunks differs by {worst}"
    );
    let got = run_vae(&gpu, &ck, false, &ck.tensors["ref.image"], 0);
    let (worst, tol) = deviation(&got, &ck.tensors["ref.moments"].data);
    assert!(worst <= tol, "VAE encode differs by {worst}");
    // With f16 activations (`--precision f16`: the patches and the mid-block attention in
    // f16), within the UNet test's tolerance (4e-3 of the largest value).
    let half = stablerep::graph::PlanOptions {
        f16_activations: true,
        ..Default::default()
    };
    let (got, keys) = run_vae_opts(&gpu, &ck, true, &ck.tensors["ref.z"], 0, half);
    let (worst, tol) = deviation(&got, &ck.tensors["ref.decoded"].data);
    eprintln!(
        "VAE decode with f16 activations: {worst:.2e} (tolerance {:.2e})",
        tol * 40.0
    );
    assert!(
        worst <= 40.0 * tol && worst > 0.0,
        "VAE decode in f16 differs by {worst}"
    );
    for family in ["im2col", "attention"] {
        assert!(
            keys.iter()
                .any(|k| k.starts_with(family) && k.contains("_h")),
            "no f16 {family} kernel: {keys:?}"
        );
    }
    // The same weights under the legacy attention names, as 1x1 convs, decode the same.
    let mut legacy = ck.clone();
    let names: Vec<String> = legacy
        .tensors
        .keys()
        .filter(|k| k.contains(".to_"))
        .cloned()
        .collect();
    for n in names {
        let mut t = legacy.tensors.remove(&n).unwrap();
        if t.shape.len() == 2 {
            t.shape.extend([1, 1]);
        }
        let old = n
            .replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.");
        legacy.tensors.insert(old, t);
    }
    assert!(legacy.tensors.keys().any(|k| k.contains(".proj_attn.")));
    rename_legacy_attention(&mut legacy);
    let again = run_vae(&gpu, &legacy, true, &ck.tensors["ref.z"], 0);
    assert_eq!(again, run_vae(&gpu, &ck, true, &ck.tensors["ref.z"], 0));
}

#[test]
fn guided_sampling_and_decoding_match_diffusers() {
    use stablerep::diffusion::pipeline::{sample, Denoiser};
    use stablerep::diffusion::unet::UNetConfig;
    use stablerep::graph::ParamStore;
    let (gpu, _lock) = common::gpu();
    let uk = Checkpoint::load(Path::new("tests/fixtures/sd_unet.safetensors")).unwrap();
    let vk = Checkpoint::load(Path::new("tests/fixtures/sd_vae.safetensors")).unwrap();
    let fx = Checkpoint::load(Path::new("tests/fixtures/sd_guided.safetensors")).unwrap();
    let cfg = UNetConfig::from_json(&uk.metadata["config"], "unet/config.json").unwrap();
    let mut store = ParamStore::new();
    for (name, t) in &uk.tensors {
        if let Some(n) = name.strip_prefix("unet.") {
            store.set(&gpu, n, &t.shape, &t.data).unwrap();
        }
    }
    let den = Denoiser::new(&gpu, &cfg, &mut store, 8, 8, 5, 7.5).unwrap();
    let ctx = &fx.tensors["ctx"].data;
    den.set_context(Some(&ctx[..80]), &ctx[80..]).unwrap();
    for (name, kind) in [
        ("ddim", Kind::Ddim { eta: 0.0 }),
        ("dpmpp_2m", Kind::DpmPP2M { karras: false }),
        ("euler", Kind::Euler),
        ("pndm", Kind::Pndm),
        ("euler_a", Kind::EulerAncestral),
        ("dpmpp_2m_karras", Kind::DpmPP2M { karras: true }),
    ] {
        let sampler = Sampler::new(kind, &SchedulerConfig::default(), 4).unwrap();
        let run = GpuSampler::new(&gpu, sampler, 256).unwrap();
        let steps = &fx.tensors["euler_a.noise"].data;
        let mut reported = Vec::new();
        let lat = sample(
            &gpu,
            &den,
            &run,
            &fx.tensors["noise"].data,
            |i| steps[i * 256..(i + 1) * 256].to_vec(),
            |i| {
                reported.push(i);
                Ok(())
            },
        )
        .unwrap();
        let evals = run.sampler().evaluations();
        assert_eq!(
            reported,
            (0..evals).collect::<Vec<_>>(),
            "{name}: step reports"
        );
        let (worst, tol) = deviation(&lat, &fx.tensors[&format!("{name}.latents")].data);
        assert!(worst <= tol, "{name}: final latents differ by {worst}");
        // A planned sampler is reused across images: a second run gives the same latent.
        let again = sample(
            &gpu,
            &den,
            &run,
            &fx.tensors["noise"].data,
            |i| steps[i * 256..(i + 1) * 256].to_vec(),
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(again, lat, "{name}: second run on the same sampler");
        let z: Vec<f32> = lat.iter().map(|&v| v / 0.18215).collect();
        let zt = stablerep::nn::checkpoint::HostTensor {
            shape: vec![1, 4, 8, 8],
            data: z,
        };
        let img = run_vae(&gpu, &vk, true, &zt, 0);
        let (worst, tol) = deviation(&img, &fx.tensors[&format!("{name}.image")].data);
        assert!(worst <= tol, "{name}: decoded image differs by {worst}");
    }
}

/// A folder with the single-file fixture's config.json files (no weights).
fn fixture_configs(ck: &Checkpoint, dir: &Path) {
    for sub in ["unet", "vae", "text_encoder"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        let cfg = &ck.metadata[&format!("{sub}_config")];
        std::fs::write(dir.join(sub).join("config.json"), cfg).unwrap();
    }
}

#[test]
fn single_file_checkpoints_map_to_diffusers_names() {
    use stablerep::diffusion::model::SdModel;
    use stablerep::diffusion::text_encoder::{convert, ClipTextConfig};
    let dir = std::env::temp_dir().join(format!("stablerep-single-{}", std::process::id()));
    // Written by tools/make_sd_fixtures.py and checked there with diffusers' own converters.
    let file = Path::new("tests/fixtures/sd_single_file.safetensors");
    let single = Checkpoint::load(file).unwrap();
    fixture_configs(&single, &dir);
    let m = SdModel::load_with_config(file, Some(&dir)).unwrap();
    // The UNet's tensors were fp16 in the file (its DDPM buffer is f32): storing them as f16 on
    // the GPU is lossless, so --weights auto may.
    assert!(m.unet_weights().all_f16());
    assert!(!single.f16_names.contains("alphas_cumprod"));
    for (fx, prefix, got) in [
        ("sd_unet", "unet.", m.unet_weights()),
        ("sd_vae", "vae.", m.vae_weights()),
    ] {
        let want =
            Checkpoint::load(Path::new(&format!("tests/fixtures/{fx}.safetensors"))).unwrap();
        let want: Vec<(&str, _)> = want
            .tensors
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?, t)))
            .collect();
        assert_eq!(got.tensors.len(), want.len(), "{fx}: tensor count");
        for (k, t) in want {
            assert_eq!(got.tensors.get(k), Some(t), "{fx}: {k}");
        }
    }
    // The text encoder keeps transformers' names after the prefix.
    let cfg =
        ClipTextConfig::from_json(&single.metadata["text_encoder_config"], "fixture").unwrap();
    let want = convert(&single, &cfg, "", "fixture").unwrap();
    assert_eq!(m.text_weights().tensors, want.tensors);
    // Without configs a single file is read as SD 1.5, whose shapes the tiny file does not
    // have: the error names the tensor.
    let e = SdModel::load(file).err().expect("should fail").to_string();
    assert!(e.contains("sd_single_file") && e.contains("shape"), "{e}");
    // Files that are not SD 1.x single files.
    let mut ck = single.clone();
    let t = ck.tensors["model.diffusion_model.out.2.bias"].clone();
    ck.tensors
        .insert("model.diffusion_model.label_emb.0.0.bias".into(), t);
    let odd = dir.join("sdxl.safetensors");
    ck.save(&odd).unwrap();
    let e = SdModel::load_with_config(&odd, Some(&dir))
        .err()
        .expect("should fail")
        .to_string();
    assert!(
        e.contains("label_emb.0.0.bias") && e.contains("SDXL"),
        "{e}"
    );
    let e = SdModel::load(Path::new("tests/fixtures/sd_vae.safetensors"))
        .err()
        .expect("should fail")
        .to_string();
    assert!(e.contains("not a single-file"), "{e}");
    let ckpt = dir.join("v1-5.ckpt");
    std::fs::write(&ckpt, b"PK").unwrap();
    let e = SdModel::load(&ckpt).err().expect("should fail").to_string();
    assert!(e.contains("v1-5.ckpt") && e.contains(".safetensors"), "{e}");
    let e = SdModel::load(&dir.join("missing.safetensors"))
        .err()
        .expect("should fail")
        .to_string();
    assert!(
        e.contains("missing.safetensors") && e.contains("no such model"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn memory_estimates_match_plans_and_sd15_fits_6_gib_at_512() {
    use stablerep::diffusion::model::estimate_memory;
    use stablerep::diffusion::pipeline::denoiser_graph;
    use stablerep::diffusion::single_file::{SD15_TEXT, SD15_UNET, SD15_VAE};
    use stablerep::diffusion::text_encoder::ClipTextConfig;
    use stablerep::diffusion::unet::UNetConfig;
    use stablerep::diffusion::vae::VaeConfig;
    use stablerep::graph::plan::estimate;
    use stablerep::graph::{ParamStore, Plan, PlanOptions};
    // The estimate is what a compiled plan allocates (tiny UNet, guided).
    let (gpu, _lock) = common::gpu();
    let uk = Checkpoint::load(Path::new("tests/fixtures/sd_unet.safetensors")).unwrap();
    let cfg = UNetConfig::from_json(&uk.metadata["config"], "unet").unwrap();
    let d = denoiser_graph(&cfg, 1, 8, 8, 5, 7.5, false).unwrap();
    let e = estimate(
        &d.graph,
        &[d.out],
        PlanOptions::default(),
        gpu.caps.max_binding,
    )
    .unwrap();
    let mut store = ParamStore::new();
    for (k, t) in &uk.tensors {
        if let Some(n) = k.strip_prefix("unet.") {
            store.set(&gpu, n, &t.shape, &t.data).unwrap();
        }
    }
    let plan = Plan::compile(&gpu, &d.graph, &[d.out], &mut store, PlanOptions::default()).unwrap();
    let st = plan.stats();
    assert_eq!(e.planned_bytes, st.peak_bytes);
    assert_eq!(e.param_bytes + e.input_bytes, st.persistent_bytes);
    // The same UNet with f16 weights: the fixture's weights are fp16, so storing them at half
    // size is lossless and the output is the same; the estimate still matches the plan.
    let h = denoiser_graph(&cfg, 1, 8, 8, 5, 7.5, true).unwrap();
    let eh = estimate(
        &h.graph,
        &[h.out],
        PlanOptions::default(),
        gpu.caps.max_binding,
    )
    .unwrap();
    let mut half_store = ParamStore::new();
    let mut halves = 0;
    for n in h
        .graph
        .nodes
        .iter()
        .filter(|n| n.op == stablerep::graph::Op::Param)
    {
        let name = n.name.as_deref().unwrap();
        let t = &uk.tensors[&format!("unet.{name}")];
        if n.dtype == stablerep::graph::DType::F16 {
            half_store.set_f16(&gpu, name, &t.shape, &t.data).unwrap();
            halves += 1;
        } else {
            half_store.set(&gpu, name, &t.shape, &t.data).unwrap();
        }
    }
    assert!(halves > 50, "{halves} f16 weights");
    let hplan = Plan::compile(
        &gpu,
        &h.graph,
        &[h.out],
        &mut half_store,
        PlanOptions::default(),
    )
    .unwrap();
    assert_eq!(
        eh.param_bytes + eh.input_bytes,
        hplan.stats().persistent_bytes
    );
    assert!(eh.param_bytes < e.param_bytes * 6 / 10, "{eh:?} vs {e:?}");
    let mut rng = common::Rng(12);
    let lat = rng
        .vec(4 * 64, -1.0, 1.0)
        .iter()
        .map(|&v| v as f32)
        .collect::<Vec<_>>();
    let time = rng
        .vec(2 * 8, -1.0, 1.0)
        .iter()
        .map(|&v| v as f32)
        .collect::<Vec<_>>();
    let ctx = rng
        .vec(2 * 5 * 16, -1.0, 1.0)
        .iter()
        .map(|&v| v as f32)
        .collect::<Vec<_>>();
    let mut outs = Vec::new();
    for (p, dg) in [(&plan, &d), (&hplan, &h)] {
        p.write(dg.latent_in, &lat).unwrap();
        p.write(dg.scale, &[0.5]).unwrap();
        p.write(dg.inputs.time, &time).unwrap();
        p.write(dg.inputs.context, &ctx).unwrap();
        outs.push(p.run_fetch(&[dg.out]).unwrap().remove(0));
    }
    let (worst, tol) = deviation(&outs[1], &outs[0]);
    eprintln!("f16 weights: largest output difference {worst}");
    assert!(
        worst <= tol * 1e-2,
        "f16 weights change the output by {worst}"
    );
    // SD 1.5 at 512^2 with guidance, f32, under WebGPU's default 128 MiB bindings.
    let text = ClipTextConfig::from_json(SD15_TEXT, "sd15").unwrap();
    let unet = UNetConfig::from_json(SD15_UNET, "sd15").unwrap();
    let vae = VaeConfig::from_json(SD15_VAE, "sd15").unwrap();
    let m = estimate_memory(&text, &unet, &vae, 512, 7.5, 128 << 20, false).unwrap();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    eprintln!(
        "SD 1.5 at 512^2: text {:.2} GiB, UNet {:.2} GiB (weights {:.2}, activations {:.2}), VAE {:.2} GiB (activations {:.2}), total {:.2} GiB, largest tensor {} MiB",
        gib(m.text.total()),
        gib(m.unet.total()),
        gib(m.unet.param_bytes),
        gib(m.unet.planned_bytes),
        gib(m.vae.total()),
        gib(m.vae.planned_bytes),
        gib(m.total()),
        m.largest_tensor() >> 20
    );
    // 859.5 M UNet parameters in f32.
    assert_eq!(m.unet.param_bytes / 4 / 100_000, 8595, "{m:?}");
    // With f16 weights the UNet takes about half (biases and norms stay f32).
    let mh = estimate_memory(&text, &unet, &vae, 512, 7.5, 128 << 20, true).unwrap();
    eprintln!(
        "with f16 UNet weights: UNet {:.2} GiB, total {:.2} GiB",
        gib(mh.unet.total()),
        gib(mh.total())
    );
    assert!(
        mh.unet.param_bytes < m.unet.param_bytes * 51 / 100,
        "{mh:?}"
    );
    // With f16 activations (`--precision f16`) as well: patches and attention in f16.
    let gr = stablerep::diffusion::model::graphs(&text, &unet, &vae, 512, 7.5, 128 << 20, true, 1)
        .unwrap();
    let ma = gr.memory_with(128 << 20, true).unwrap();
    eprintln!(
        "with f16 weights and activations: UNet activations {:.2} GiB, VAE activations {:.2} GiB, total {:.2} GiB",
        gib(ma.unet.planned_bytes),
        gib(ma.vae.planned_bytes),
        gib(ma.total())
    );
    // At 512^2 the peaks are the feed-forward's and the VAE's f32 tensors (matmul outputs,
    // normalizations), which f16 activations do not reach yet: never more, not less either.
    assert!(ma.unet.planned_bytes <= mh.unet.planned_bytes, "{ma:?}");
    assert!(ma.vae.planned_bytes <= mh.vae.planned_bytes, "{ma:?}");
    assert!(m.largest_tensor() <= 128 << 20, "{m:?}");
    assert!(
        m.total() < 6 << 30,
        "SD 1.5 needs {:.2} GiB",
        gib(m.total())
    );
    m.check(512, 128 << 20).unwrap();
    // At 2048^2 the UNet's activations outgrow 128 MiB buffers: a clear error, before
    // anything is uploaded.
    let big = estimate_memory(&text, &unet, &vae, 2048, 7.5, 128 << 20, false).unwrap();
    let e = big.check(2048, 128 << 20).unwrap_err().to_string();
    assert!(e.contains("--size 2048") && e.contains("UNet"), "{e}");
}
