"""Reference fixtures for issue 4 (Stable Diffusion), built with diffusers.

Schedulers: each of SD1.5's samplers, created with `from_config` from SD1.5's
scheduler_config.json exactly as diffusers' pipelines do, runs 4 steps on a [1, 4, 8, 8] latent
with a synthetic noise predictor eps(x, t) = 0.5 tanh(x) + 0.1 sin(0.01 t) applied to the
scheduler-scaled input. Saved: the timesteps, init_noise_sigma, the latents after every step,
and the noise the ancestral samplers drew (captured by patching diffusers' randn_tensor).

Tokenizer: transformers' CLIPTokenizer on vocab.json / merges.txt rebuilt from the shipped
merge table, over a few hundred varied prompts (tests/fixtures/sd_tokens.json).

Usage: .venv-ref/bin/python tools/make_sd_fixtures.py   (writes tests/fixtures/sd_*)
       .venv-ref/bin/python tools/make_sd_fixtures.py single_file   (only the single-file
       checkpoint, from the committed UNet and VAE fixtures)
       .venv-ref/bin/python tools/make_sd_fixtures.py unet_fp16   (only diffusers' fp16 UNet
       on the committed UNet fixture, tests/fixtures/sd_unet_fp16.safetensors)
       .venv-ref/bin/python tools/make_sd_fixtures.py builtin   (only the built-in model's
       run: assets/world-sd through StableDiffusionPipeline, tests/fixtures/world_sd.safetensors)
"""

import json
import pathlib
import re
import sys

import torch
from safetensors.torch import save_file
import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_mod

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# SD1.5's scheduler/scheduler_config.json (no timestep_spacing key).
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}


def model(x, t):
    return 0.5 * torch.tanh(x) + 0.1 * torch.sin(torch.tensor(0.01 * float(t)))


def run(name, sched, steps, noise0, step_kwargs=None, noises=None):
    sched.set_timesteps(steps)
    x = noise0 * sched.init_noise_sigma
    traj = [x.clone()]
    drawn = []
    if noises is not None:
        it = iter(noises)

        def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
            z = next(it)
            drawn.append(z.clone())
            return z.reshape(shape).to(dtype or torch.float32)

        euler_a_mod.randn_tensor = fake_randn
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        eps = model(inp, t)
        kw = dict(step_kwargs or {})
        if "variance_noise" in kw:
            kw["variance_noise"] = kw["variance_noise"][i]
        x = sched.step(eps, t, x, **kw).prev_sample
        traj.append(x.clone())
    out = {
        f"{name}.timesteps": sched.timesteps.to(torch.float32).clone(),
        f"{name}.init_sigma": torch.tensor([float(sched.init_noise_sigma)]),
        f"{name}.latents": torch.stack(traj),
    }
    if drawn:
        out[f"{name}.noise"] = torch.stack(drawn)
    if "variance_noise" in (step_kwargs or {}):
        out[f"{name}.noise"] = step_kwargs["variance_noise"][: len(sched.timesteps)].clone()
    return out


def schedulers_fixture():
    torch.manual_seed(0)
    shape = (1, 4, 8, 8)
    noise0 = torch.randn(shape)
    extra = torch.randn((8,) + shape)
    t = {"noise0": noise0}
    t.update(run("ddim", DDIMScheduler.from_config(SD15), 4, noise0))
    t.update(run("ddim_eta", DDIMScheduler.from_config(SD15), 4, noise0,
                 step_kwargs={"eta": 0.5, "variance_noise": extra}))
    t.update(run("pndm", PNDMScheduler.from_config(SD15), 4, noise0))
    t.update(run("euler", EulerDiscreteScheduler.from_config(SD15), 4, noise0))
    t.update(run("euler_a", EulerAncestralDiscreteScheduler.from_config(SD15), 4, noise0,
                 noises=list(extra)))
    t.update(run("dpmpp_2m", DPMSolverMultistepScheduler.from_config(SD15), 4, noise0))
    t.update(run("dpmpp_2m_karras",
                 DPMSolverMultistepScheduler.from_config(SD15, use_karras_sigmas=True), 4, noise0))
    # Longer runs: 20 steps exercise the multistep histories (PLMS order 4, DPM 2M).
    t.update(run("pndm20", PNDMScheduler.from_config(SD15), 20, noise0))
    t.update(run("dpmpp_2m_karras20",
                 DPMSolverMultistepScheduler.from_config(SD15, use_karras_sigmas=True), 20, noise0))
    t = {k: v.contiguous() for k, v in t.items()}
    save_file(t, OUT / "sd_schedulers.safetensors",
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__})
    print("sd_schedulers.safetensors", {k: list(v.shape) for k, v in t.items()})


def tokenizer_files(folder):
    """vocab.json and merges.txt of CLIP's tokenizer, rebuilt from the shipped merge table
    (assets/clip/merges.txt) exactly as shared/spec/stable-diffusion.md section 1.2 describes."""
    import json

    merges_text = (OUT.parent.parent / "assets" / "clip" / "merges.txt").read_text(encoding="utf-8")
    merges = merges_text.split("\n")[1 : 49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = [chr(c) for c in cs]
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def prompts():
    """A few hundred varied prompts: words, digits, punctuation runs, contractions, unicode
    scripts and emoji, odd whitespace, literal special tokens, and prompts past 77 tokens."""
    import random

    rng = random.Random(7)
    words = ("a photo of the cat dog astronaut riding horse on mars painting by greg rutkowski "
             "trending artstation 4k highly detailed portrait sunset over mountains lake castle "
             "cyberpunk city night neon rain oil canvas watercolor golden hour bokeh macro").split()
    extras = ["café", "naïve", "Ærøskøbing", "東京タワー", "富士山", "😀", "🐱‍👤", "Привет", "Ελλάδα",
              "مرحبا", "हिन्दी", "ß", "ﬁne", "Ｆｕｌｌ", "e\u0301", "x²", "½", "№5", "…", "—", "«quote»",
              "it's", "don't", "we're", "I've", "you'll", "he'd", "I'm", "O'Neil", "rock'n'roll",
              "3.14159", "1,000,000", "2024-01-01", "#hashtag", "@user", "C++", "a/b\\c", "!!!", "?!",
              "((masterpiece))", "[best quality]", "{x:1}", "<|endoftext|>", "<|startoftext|>",
              "&amp;", "Tom & Jerry", "UPPER lower MiXeD", "tab\tsep", "line\nbreak", "  spaces  "]
    out = ["", " ", "a photo of a cat", "a photo of an astronaut riding a horse on mars",
           "A Photo Of A CAT", "a" * 300, "word " * 80, "1234567890" * 10]
    for _ in range(300):
        n = rng.randint(1, 30)
        toks = [rng.choice(words) if rng.random() < 0.7 else rng.choice(extras) for _ in range(n)]
        sep = rng.choice([" ", " ", " ", ", ", "  ", "\t", "\n"])
        out.append(sep.join(toks))
    return out


def tokens_fixture():
    """Token ids of `prompts()` through transformers' CLIPTokenizer built on those files, as
    Stable Diffusion pipelines call it (max_length 77, padding, truncation)."""
    import json
    import tempfile

    import transformers
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        folder = pathlib.Path(d)
        tokenizer_files(folder)
        tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                            pad_token="<|endoftext|>")
        ps = prompts()
        ids = tok(ps, padding="max_length", max_length=77, truncation=True).input_ids
    cases = [{"text": p, "ids": i} for p, i in zip(ps, ids)]
    meta = {"transformers": transformers.__version__, "tokenizer": type(tok).__name__}
    (OUT / "sd_tokens.json").write_text(json.dumps({"meta": meta, "cases": cases}, ensure_ascii=False), encoding="utf-8")
    print("sd_tokens.json", len(cases), "cases", meta)


def text_encoder_fixture():
    """A tiny random CLIPTextModel (SD's text encoder class; vocabulary 1,000, width 32, 2 layers,
    4 heads, MLP 37, QuickGELU) in transformers' key names, its config.json in the metadata,
    and last_hidden_state for two rows of 77 token ids."""
    import json

    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, projection_dim=32)
    model = CLIPTextModel(cfg).eval()
    # Random LayerNorm parameters too, so their loading is tested.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 1000, (2, 77))
    ids[:, 0] = 998
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    t = {k: v.contiguous() for k, v in model.state_dict().items()}
    t["ref.ids"] = ids.to(torch.int32)
    t["ref.last_hidden_state"] = hidden.contiguous()
    meta = {"config": json.dumps(cfg.to_dict()), "transformers": transformers.__version__}
    save_file(t, OUT / "sd_text_encoder.safetensors", metadata=meta)
    print("sd_text_encoder.safetensors", len(t), "tensors", float(hidden.abs().max()))


def resnet_fixture():
    """diffusers' ResnetBlock2D (8 -> 12 channels, so with its 1x1 shortcut; 4 groups; a 10-wide
    time embedding) and the same block upsampling-free with equal channels, on random inputs.
    Weights under `a.` and `b.`; inputs and outputs under `ref.`."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(5)
    t = {}
    for name, cin, cout in [("a", 8, 12), ("b", 12, 12)]:
        blk = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=10, groups=4, eps=1e-5).eval()
        with torch.no_grad():
            for n, p in blk.named_parameters():
                if "norm" in n:
                    p.add_(0.2 * torch.randn_like(p))
        x = torch.randn(2, cin, 5, 7)
        temb = torch.randn(2, 10)
        with torch.no_grad():
            y = blk(x, temb)
        t.update({f"{name}.{k}": v.contiguous() for k, v in blk.state_dict().items()})
        t[f"ref.{name}.x"] = x
        t[f"ref.{name}.temb"] = temb
        t[f"ref.{name}.y"] = y.contiguous()
    save_file(t, OUT / "sd_resnet.safetensors", metadata={"diffusers": diffusers.__version__})
    print("sd_resnet.safetensors", len(t), "tensors")


def timestep_fixture():
    """diffusers' sinusoidal timestep features as SD's UNet computes them (flip_sin_to_cos=True,
    downscale_freq_shift=0) for float and integer timesteps, widths 320 and 33 (odd: zero pad)."""
    from diffusers.models.embeddings import get_timestep_embedding

    ts = torch.tensor([0.0, 1.0, 500.5, 946.4211, 999.0])
    t = {"timesteps": ts}
    for dim in (320, 33):
        t[f"emb{dim}"] = get_timestep_embedding(ts, dim, flip_sin_to_cos=True, downscale_freq_shift=0).contiguous()
    save_file(t, OUT / "sd_timesteps.safetensors", metadata={"diffusers": diffusers.__version__})
    print("sd_timesteps.safetensors")


def transformer_fixture():
    """diffusers' Transformer2DModel as SD 1.x uses it (GroupNorm, 1x1 conv projections, one
    BasicTransformerBlock: self-attention, cross-attention to the text states, GEGLU
    feed-forward): 2 heads of 8, 16 channels, 4 groups, text states [2, 7, 12]."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(11)
    m = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=1,
                           cross_attention_dim=12, norm_num_groups=4, use_linear_projection=False).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 16, 4, 5)
    ctx = torch.randn(2, 7, 12)
    with torch.no_grad():
        y = m(x, encoder_hidden_states=ctx).sample
    t = {f"m.{k}": v.contiguous() for k, v in m.state_dict().items()}
    t.update({"ref.x": x, "ref.ctx": ctx, "ref.y": y.contiguous()})
    save_file(t, OUT / "sd_transformer.safetensors", metadata={"diffusers": diffusers.__version__})
    print("sd_transformer.safetensors", len(t), "tensors")


def unet_fixture():
    """A UNet2DConditionModel with SD 1.5's 4-level topology at tiny widths (block_out_channels
    8, 16, 16, 16; 2 layers per block; SD 1.5's block types; attention_head_dim 2 = 2 heads;
    cross_attention_dim 16; 4 groups), every parameter perturbed, weights stored in fp16 (the
    reference runs on the fp16-rounded weights in f32), config.json in the metadata, outputs
    for a [2, 4, 8, 8] latent at timesteps 981 and 1 with text states [2, 5, 16]."""
    import json

    from diffusers import UNet2DConditionModel

    torch.manual_seed(13)
    m = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16, 16, 16), layers_per_block=2,
                             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                             attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, 16)
    t = {f"unet.{k}": v.half().contiguous() for k, v in m.state_dict().items()}
    t.update({"ref.x": x, "ref.ctx": ctx})
    with torch.no_grad():
        for ts in (981, 1):
            t[f"ref.eps{ts}"] = m(x, ts, encoder_hidden_states=ctx).sample.contiguous()
    cfg = {k: v for k, v in dict(m.config).items() if not k.startswith("_")}
    meta = {"config": json.dumps(cfg), "diffusers": diffusers.__version__}
    save_file(t, OUT / "sd_unet.safetensors", metadata=meta)
    print("sd_unet.safetensors", sum(p.numel() for p in m.parameters()), "parameters")


def vae_fixture():
    """An AutoencoderKL with SD's 4-level layout at tiny widths (8, 16, 16, 16; 2 layers per
    block; 4 groups), parameters perturbed and rounded to fp16 (stored fp16), config.json in the
    metadata; decode of a [2, 4, 4, 4] latent and encode (the posterior moments after quant_conv)
    of a [1, 3, 32, 32] image."""
    import json

    from diffusers import AutoencoderKL

    torch.manual_seed(17)
    m = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                      layers_per_block=2, norm_num_groups=4, sample_size=32,
                      down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())
    z = torch.randn(2, 4, 4, 4)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dec = m.decode(z).sample
        moments = m.quant_conv(m.encoder(img))
    t = {f"vae.{k}": v.half().contiguous() for k, v in m.state_dict().items()}
    t.update({"ref.z": z, "ref.decoded": dec.contiguous(), "ref.image": img, "ref.moments": moments.contiguous()})
    cfg = {k: v for k, v in dict(m.config).items() if not k.startswith("_")}
    save_file(t, OUT / "sd_vae.safetensors", metadata={"config": json.dumps(cfg), "diffusers": diffusers.__version__})
    print("sd_vae.safetensors", sum(p.numel() for p in m.parameters()), "parameters", sorted(k for k in t if "mid_block.attentions" in k)[:6])


def guided_run_fixture():
    """Guided sampling end to end with the tiny UNet and VAE above (loaded back from their
    fixtures): uncond/cond text states [2, 5, 16], saved initial noise [1, 4, 8, 8], guidance
    7.5, 4 steps of every sampler (Euler ancestral's step noise captured) with SD 1.5's scheduler config, diffusers'
    explicit pipeline loop; the final latents and the decoded image."""
    from safetensors.torch import load_file
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import json

    def load(name, cls):
        st = load_file(OUT / f"sd_{name}.safetensors")
        from safetensors import safe_open
        with safe_open(OUT / f"sd_{name}.safetensors", "pt") as f:
            cfg = json.loads(f.metadata()["config"])
        m = cls.from_config(cfg).eval()
        m.load_state_dict({k[len(name) + 1:]: v.float() for k, v in st.items() if k.startswith(name + ".")})
        return m

    unet, vae = load("unet", UNet2DConditionModel), load("vae", AutoencoderKL)
    torch.manual_seed(19)
    ctx = torch.randn(2, 5, 16)
    noise = torch.randn(1, 4, 8, 8)
    t = {"ctx": ctx, "noise": noise}
    steps_noise = torch.randn(4, 1, 4, 8, 8)
    drawn = iter(steps_noise)
    euler_a_mod.randn_tensor = lambda shape, generator=None, device=None, dtype=None, layout=None: next(drawn).reshape(shape)
    t["euler_a.noise"] = steps_noise
    for name, sched in [("ddim", DDIMScheduler.from_config(SD15)),
                        ("dpmpp_2m", DPMSolverMultistepScheduler.from_config(SD15)),
                        ("euler", EulerDiscreteScheduler.from_config(SD15)),
                        ("pndm", PNDMScheduler.from_config(SD15)),
                        ("euler_a", EulerAncestralDiscreteScheduler.from_config(SD15)),
                        ("dpmpp_2m_karras", DPMSolverMultistepScheduler.from_config(SD15, use_karras_sigmas=True))]:
        sched.set_timesteps(4)
        lat = noise * sched.init_noise_sigma
        with torch.no_grad():
            for ts in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([lat, lat]), ts)
                e = unet(inp, ts, encoder_hidden_states=ctx).sample
                eu, ec = e.chunk(2)
                lat = sched.step(eu + 7.5 * (ec - eu), ts, lat).prev_sample
            img = vae.decode(lat / 0.18215).sample
        t[f"{name}.latents"] = lat.contiguous()
        t[f"{name}.image"] = img.contiguous()
    save_file(t, OUT / "sd_guided.safetensors", metadata={"diffusers": diffusers.__version__})
    print("sd_guided.safetensors", float(t["ddim.image"].abs().max()))


def _ldm_resnet(name):
    """diffusers ResnetBlock2D parameter names -> LDM's (UNet resnets)."""
    for a, b in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        if name.startswith(a + "."):
            return b + name[len(a):]
    raise KeyError(name)


def unet_to_ldm(sd, cfg):
    """The inverse of shared/spec section 2.3's UNet table, for any number of levels and layers."""
    L, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    out = {}
    for k, v in sd.items():
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
        u = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if k.startswith("time_embedding.linear_"):
            new = "time_embed." + ("0" if k[22] == "1" else "2") + k[23:]
        elif k.startswith("conv_in."):
            new = "input_blocks.0.0." + k[8:]
        elif k.startswith("conv_norm_out."):
            new = "out.0." + k[14:]
        elif k.startswith("conv_out."):
            new = "out.2." + k[9:]
        elif m:
            l, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + l * (L + 1) + j
            new = f"input_blocks.{idx}.0.{_ldm_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif re.match(r"down_blocks\.\d+\.downsamplers\.0\.conv\.", k):
            l = int(k.split(".")[1])
            new = f"input_blocks.{(l + 1) * (L + 1)}.0.op." + k.split("conv.", 1)[1]
        elif k.startswith("mid_block.resnets."):
            j = int(k.split(".")[2])
            new = f"middle_block.{2 * j}." + _ldm_resnet(k.split(".", 3)[3])
        elif k.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + k[len("mid_block.attentions.0."):]
        elif u:
            l, kind, j, rest = int(u[1]), u[2], int(u[3]), u[4]
            idx = l * (L + 1) + j
            new = f"output_blocks.{idx}.0.{_ldm_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif re.match(r"up_blocks\.\d+\.upsamplers\.0\.conv\.", k):
            l = int(k.split(".")[1])
            slot = 2 if cfg["up_block_types"][l].startswith("CrossAttn") else 1
            new = f"output_blocks.{l * (L + 1) + L}.{slot}.conv." + k.split("conv.", 1)[1]
        else:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd, cfg):
    """The inverse of shared/spec section 2.3's VAE table (decoder levels reversed; attention
    projections stored as 1x1 convolutions, as in CompVis files)."""
    n = len(cfg["block_out_channels"])
    att = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        side, rest = k.split(".", 1)
        if side not in ("encoder", "decoder"):
            new = k
        elif m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            i = int(m[2]) if m[1] == "down" else n - 1 - int(m[2])
            new = f"{side}.{m[1]}.{i}.block.{m[3]}." + m[4].replace("conv_shortcut", "nin_shortcut")
        elif m := re.match(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(.*)", rest):
            i = int(m[2]) if m[1] == "down" else n - 1 - int(m[2])
            new = f"{side}.{m[1]}.{i}.{m[3]}sample.conv.{m[4]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            new = f"{side}.mid.block_{int(m[1]) + 1}.{m[2]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", rest):
            new = f"{side}.mid.attn_1.{att[m[1]]}.{m[2]}"
            if m[1] != "group_norm" and v.dim() == 2:
                v = v[:, :, None, None]
        elif rest.startswith("conv_norm_out."):
            new = f"{side}.norm_out." + rest[len("conv_norm_out."):]
        else:
            new = k
        out["first_stage_model." + new] = v.contiguous()
    return out


def single_file_fixture():
    """The tiny UNet and VAE of the fixtures above and a tiny text encoder of the UNet's width as
    one CompVis/LDM-layout file (tests/fixtures/sd_single_file.safetensors, fp16, plus a DDPM
    buffer as real files carry; the three configs in the metadata), checked by converting it back with diffusers' own single-file converters:
    every tensor must come back under its diffusers name, bit for bit."""
    import json

    from safetensors import safe_open
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    def read(name, prefix):
        with safe_open(OUT / name, "pt") as f:
            meta = f.metadata()
            sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix) and not k.startswith("ref.")}
        return sd, json.loads(meta["config"])

    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, ucfg = read("sd_unet.safetensors", "unet.")
    vae, vcfg = read("sd_vae.safetensors", "vae.")
    # A text encoder as wide as the UNet's cross-attention (the text fixture is wider).
    torch.manual_seed(23)
    tcfg = CLIPTextConfig(vocab_size=1000, hidden_size=ucfg["cross_attention_dim"], intermediate_size=24,
                          num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=77,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)
    text = {k: v.half() for k, v in CLIPTextModel(tcfg).state_dict().items()}
    ck = {}
    ck.update(unet_to_ldm(unet, ucfg))
    ck.update(vae_to_ldm(vae, vcfg))
    ck.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()})
    ck["alphas_cumprod"] = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    back_u = convert_ldm_unet_checkpoint(ck, ucfg)
    back_v = convert_ldm_vae_checkpoint(ck, vcfg)
    back_t = convert_ldm_clip_checkpoint(ck)
    for name, src, back, pre in (("unet", unet, back_u, ""), ("vae", vae, back_v, ""), ("text", text, back_t, "text_model.")):
        assert len(back) == len(src), (name, len(back), len(src))
        for k, v in src.items():
            w = back[pre + k]
            assert w.shape == v.shape or w.squeeze().shape == v.squeeze().shape, (name, k)
            assert torch.equal(w.reshape(v.shape), v), (name, k)
    ck = {k: v.contiguous() for k, v in ck.items()}
    meta = {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "unet_config": json.dumps(ucfg), "vae_config": json.dumps(vcfg),
            "text_encoder_config": json.dumps(tcfg.to_dict())}
    save_file(ck, OUT / "sd_single_file.safetensors", metadata=meta)
    print("sd_single_file.safetensors", len(ck), "tensors; diffusers' converters give back every tensor")


def unet_fp16_fixture():
    """diffusers' fp16 UNet on the committed UNet fixture (tests/fixtures/sd_unet.safetensors):
    the same fp16 weights, latent and text states, the model cast to float16 as
    `StableDiffusionPipeline(..., torch_dtype=torch.float16)` does, run on the CPU; outputs
    ref.eps981 / ref.eps1 (fp16, widened to f32) in tests/fixtures/sd_unet_fp16.safetensors."""
    import json

    from safetensors import safe_open
    from diffusers import UNet2DConditionModel

    with safe_open(OUT / "sd_unet.safetensors", "pt") as f:
        meta = f.metadata()
        sd = {k[len("unet."):]: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
        x, ctx = f.get_tensor("ref.x"), f.get_tensor("ref.ctx")
    m = UNet2DConditionModel.from_config(json.loads(meta["config"])).eval()
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    m = m.half()
    t = {}
    with torch.no_grad():
        for ts in (981, 1):
            y = m(x.half(), ts, encoder_hidden_states=ctx.half()).sample
            assert y.dtype == torch.float16
            t[f"ref.eps{ts}"] = y.float().contiguous()
    save_file(t, OUT / "sd_unet_fp16.safetensors",
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__})
    print("sd_unet_fp16.safetensors: diffusers' fp16 UNet on the CPU")


def builtin_fixture():
    """The shipped mini-world model (assets/world-sd, fp16 files read as fp32) through
    diffusers' StableDiffusionPipeline: two prompts (batched with the empty prompt for
    guidance 2), saved initial latents [2, C, S, S] (S: 32 over the VAE's downsampling), 6
    steps of DPM-Solver++ 2M with Karras sigmas; the decoded images in [0, 1]."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    folder = OUT.parent.parent / "assets" / "world-sd"
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    prompts = ["a red circle on a sky blue background", "a yellow star"]
    c = pipe.unet.config.in_channels
    side = 32 // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    torch.manual_seed(7)
    noise = torch.randn(2, c, side, side)
    t = {"noise": noise}
    for i, p in enumerate(prompts):
        out = pipe(p, height=32, width=32, num_inference_steps=6, guidance_scale=2.0,
                   latents=noise[i:i + 1].clone(), output_type="np")
        t[f"image{i}"] = torch.from_numpy(out.images[0]).permute(2, 0, 1).contiguous()
    meta = {"diffusers": diffusers.__version__, "prompts": json.dumps(prompts)}
    save_file(t, OUT / "world_sd.safetensors", metadata=meta)
    print("world_sd.safetensors", {k: tuple(v.shape) for k, v in t.items()})


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["builtin"]:
        builtin_fixture()
        sys.exit(0)
    if sys.argv[1:] == ["unet_fp16"]:  # only this one (it reads the committed UNet fixture)
        unet_fp16_fixture()
        sys.exit(0)
    if sys.argv[1:] == ["single_file"]:  # only this one (it reads the committed fixtures)
        single_file_fixture()
        sys.exit(0)
    schedulers_fixture()
    tokens_fixture()
    text_encoder_fixture()
    resnet_fixture()
    timestep_fixture()
    transformer_fixture()
    unet_fixture()
    vae_fixture()
    guided_run_fixture()
    single_file_fixture()
    unet_fp16_fixture()
