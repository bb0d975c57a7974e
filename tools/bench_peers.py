#!/usr/bin/env python3
"""One command for the side-by-side table (docs/benchmarks.md): this project's benchmark cases
and the same work in PyTorch on the CPU (and burn where it is built), run alternately on the
same machine in the same minutes, one JSON line per case with both times and the ratio.

Cases:
  vit-train  the block stack of `bench vit-train` (batch 32, 64 tokens, width 192, 4 layers):
             forward, backward, AdamW. PyTorch: tools/bench_vit_torch.py's model. burn:
             tools/burn-bench, if `cargo build --release` was run there.
  demo-step  the demo's StableRep step without augmentation (`bench demo-step`): ViT 32 px,
             patch 8, width 96, depth 3, head 256/64, 8 captions x 4 images, multi-positive
             loss, AdamW. PyTorch: timm's VisionTransformer, the same head and loss.
  sd-unet    one guided SD 1.5 UNet step at 256 x 256 (batch 2, random weights).
             PyTorch: diffusers' UNet2DConditionModel with SD 1.5's config.
  world-sd-denoiser
             one training step of the built-in mini-world model's second stage (`bench
             world-sd`): text encoder + UNet (assets/world-sd's configs) on 32 latents of
             4 x 16 x 16 with 16 tokens, epsilon MSE, backward, AdamW. PyTorch: diffusers'
             UNet2DConditionModel and transformers' CLIPTextModel from the same configs.
  world-sd-vae
             one training step of its first stage: the VAE on 16 images of 32 x 32,
             reconstruction MSE + 1e-4 x KL, backward, AdamW. PyTorch: diffusers' AutoencoderKL.

Usage (after `cargo build --release --example bench`):
    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch timm diffusers
    .venv-ref/bin/python tools/bench_peers.py [--rounds 3] [--cases vit-train,demo-step,sd-unet]
        [--raw FILE]
Each round runs every case on both sides, alternating which goes first. Times are medians of
the per-step times within a run, then the median over rounds. Our side's process is started
per run (its setup is not timed); PyTorch threads = the CPU count, as our adapter uses.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BENCH = os.path.join(ROOT, "target", "release", "examples", "bench")
BURN = os.path.join(ROOT, "tools", "burn-bench", "target", "release", "burn-bench")


def timed(step, warmup, reps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_vit_train(reps):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_vit_torch as b

    torch.manual_seed(0)
    model = nn.Sequential(*[b.Block() for _ in range(b.L)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    x = torch.randn(b.B, b.T, b.D)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    return timed(step, 2, reps)


def multi_positive_loss(feats, n_captions, temperature=0.1):
    """The official multi-positive loss (as tools/make_fixtures.py): view-major rows."""
    z = F.normalize(feats, dim=-1)
    n = z.shape[0]
    logits = z @ z.t() / temperature
    logits = logits - torch.eye(n) * 1e9
    ids = torch.arange(n) % n_captions
    p = (ids[:, None] == ids[None, :]).float() - torch.eye(n)
    p = p / p.sum(1, keepdim=True)
    return -(p * F.log_softmax(logits, dim=-1)).sum(1).mean()


class Head(nn.Module):
    def __init__(self, width, hidden, out, groups):
        super().__init__()
        self.groups = groups
        self.layer1, self.bn1 = nn.Linear(width, hidden), nn.BatchNorm1d(hidden)
        self.layer2, self.bn2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)
        self.layer3 = nn.Linear(hidden, out)

    def forward(self, x):
        # BatchNorm statistics per view group, as the official head.
        outs = []
        for chunk in x.chunk(self.groups):
            h = F.relu(self.bn1(self.layer1(chunk)))
            h = F.relu(self.bn2(self.layer2(h)))
            outs.append(self.layer3(h))
        return torch.cat(outs)


def torch_demo_step(reps):
    import timm

    captions, m = 8, 4
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3, mlp_ratio=4.0, num_classes=0)
    head = Head(96, 256, 64, m)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    x = torch.randn(captions * m, 3, 32, 32)

    def step():
        opt.zero_grad(set_to_none=True)
        multi_positive_loss(head(vit(x)), captions).backward()
        opt.step()

    return timed(step, 2, reps)


def torch_sd_unet(reps):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32).eval()
    lat = torch.randn(2, 4, 32, 32)
    ctx = torch.randn(2, 77, 768)
    t = torch.tensor([500, 500])

    def step():
        with torch.no_grad():
            unet(lat, t, encoder_hidden_states=ctx)

    return timed(step, 1, reps)


WORLD_SD = os.path.join(ROOT, "assets", "world-sd")


def torch_world_sd_denoiser(reps):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(WORLD_SD, subfolder="unet"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(WORLD_SD, subfolder="text_encoder"))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    b, tokens = 32, text.config.max_position_embeddings
    ids = torch.arange(b * tokens).remainder(300).reshape(b, tokens)
    x0 = torch.randn(b, 4, 16, 16)
    noise = torch.randn_like(x0)
    ts = torch.randint(0, 1000, (b,))

    def step():
        opt.zero_grad(set_to_none=True)
        pred = unet(x0 * 0.7 + noise * 0.7, ts, text(ids).last_hidden_state).sample
        (pred - noise).pow(2).mean().backward()
        opt.step()

    return timed(step, 2, reps)


def torch_world_sd_vae(reps):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(WORLD_SD, subfolder="vae"))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    x = torch.rand(16, 3, 32, 32) * 2 - 1

    def step():
        opt.zero_grad(set_to_none=True)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).pow(2).mean() + 1e-4 * post.kl().mean() / post.mean[0].numel()
        loss.backward()
        opt.step()

    return timed(step, 2, reps)


def ours(case, reps, raw):
    args = {"vit-train": ["vit-train"], "demo-step": ["demo-step", "--reps", str(reps)],
            "sd-unet": ["sd-unet", "--size", "256", "--reps", str(reps)],
            "world-sd-denoiser": ["world-sd", "--reps", str(reps)],
            "world-sd-vae": ["world-sd", "--reps", str(reps)]}[case]
    env = dict(os.environ, XDG_RUNTIME_DIR=os.environ.get("XDG_RUNTIME_DIR", "/tmp"))
    out = subprocess.run([BENCH, *args], capture_output=True, text=True, env=env, check=True).stdout
    for line in out.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            raw.append(rec)
            if rec.get("bench") == case:
                return rec["ms_median"], rec.get("dispatches_per_submit", rec.get("dispatches"))
    raise RuntimeError(f"bench {case} printed no result:\n{out}")


def burn(steps, raw):
    out = subprocess.run([BURN, str(steps)], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(BURN)).stdout
    recs = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    raw.extend(recs)
    # The first steps compile and autotune.
    return statistics.median(r["ms_per_step"] for r in recs[2:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="vit-train,demo-step,sd-unet")
    ap.add_argument("--raw", help="append every raw line (ours and theirs) to this file")
    a = ap.parse_args()
    if not os.path.exists(BENCH):
        sys.exit(f"{BENCH} is missing: run `cargo build --release --example bench` first")
    torch.set_num_threads(os.cpu_count() or 1)
    peers = {"vit-train": torch_vit_train, "demo-step": torch_demo_step, "sd-unet": torch_sd_unet,
             "world-sd-denoiser": torch_world_sd_denoiser, "world-sd-vae": torch_world_sd_vae}
    reps = {"vit-train": 5, "demo-step": 10, "sd-unet": 2, "world-sd-denoiser": 5,
            "world-sd-vae": 5}
    cases = [c for c in a.cases.split(",") if c]
    for c in cases:
        if c not in peers:
            sys.exit(f"--cases: unknown case '{c}' (want one of {', '.join(peers)})")
    raw = []
    res = {c: {"ours": [], "torch": [], "burn": [], "dispatches": None} for c in cases}
    for r in range(a.rounds):
        for c in cases:
            sides = ["ours", "torch"] if r % 2 == 0 else ["torch", "ours"]
            for side in sides:
                if side == "ours":
                    ms, disp = ours(c, reps[c], raw)
                    res[c]["ours"].append(ms)
                    res[c]["dispatches"] = disp
                else:
                    ms = peers[c](reps[c])
                    raw.append({"bench": f"{c}-torch", "round": r, "ms_median": round(ms, 1),
                                "threads": torch.get_num_threads(), "torch": torch.__version__})
                    res[c]["torch"].append(ms)
            if c == "vit-train" and os.path.exists(BURN):
                res[c]["burn"].append(burn(7, raw))
    for c in cases:
        o, t = statistics.median(res[c]["ours"]), statistics.median(res[c]["torch"])
        line = {"case": c, "stablerep_ms": round(o, 1), "torch_cpu_ms": round(t, 1),
                "ratio_vs_torch": round(o / t, 2), "rounds": a.rounds,
                "stablerep_runs": [round(x, 1) for x in res[c]["ours"]],
                "torch_runs": [round(x, 1) for x in res[c]["torch"]],
                "dispatches": res[c]["dispatches"], "torch_threads": torch.get_num_threads()}
        if res[c]["burn"]:
            b = statistics.median(res[c]["burn"])
            line.update(burn_ms=round(b, 1), burn_over_stablerep=round(b / o, 2))
        print(json.dumps(line), flush=True)
    if a.raw:
        with open(a.raw, "a") as f:
            for rec in raw:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
