"""The signal-leak check for a mini-world text-to-image model (docs/world.md): does the model
take the background from the caption, or from the mean of the initial noise?

SD's schedule keeps sqrt(alpha_bar_999) = 0.068 of the clean latent at the last timestep. With
16 x 16 latents the spatial mean of a noise channel has standard deviation 1/16 = 0.0625, about
as large as the leak, so a model can learn to read the background's colour from the noisy
latent's channel means instead of from the text. Sampling then starts from pure noise whose
means are random, and the background follows them.

For each of the simple world's five backgrounds, the caption "a red star on a <ground>
background" is sampled 8 times (diffusers' pipeline, DPM-Solver++ 2M with Karras sigmas, 20
steps, guidance 2, 32 x 32) from (a) standard-normal latents and (b) the same latents with each
channel's spatial mean removed. The background is read as the nearest ground colour to the
median border pixel. A model that reads the caption gets the background right in both; a model
that reads the noise's means is random in (a) and collapses to one background in (b).

Not part of the build or CI. Needs torch, diffusers and transformers:
    python tools/world_signal_leak.py MODEL_DIR [--json OUT.json]
"""
import json
import sys

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

# src/world/mod.rs GROUNDS
GROUNDS = {
    "gray": [0.55, 0.55, 0.57],
    "beige": [0.88, 0.80, 0.64],
    "sky blue": [0.55, 0.75, 0.92],
    "pink": [0.94, 0.70, 0.76],
    "dark": [0.22, 0.24, 0.28],
}
NAMES = list(GROUNDS)


def background(img):
    a = np.asarray(img).astype(np.float32) / 255
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    c = np.median(border, 0)
    return NAMES[int(np.argmin([np.sum((c - np.array(GROUNDS[n])) ** 2) for n in NAMES]))]


def main():
    torch.set_num_threads(1)
    model = sys.argv[1]
    out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    p = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config, use_karras_sigmas=True)
    p.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    report = {"model": model}
    for mode in ["normal", "zero-mean"]:
        hits, n, seen = 0, 0, {}
        for name in NAMES:
            side = 32 // p.vae_scale_factor
            lat = torch.randn(8, p.unet.config.in_channels, side, side, generator=g)
            if mode == "zero-mean":
                lat = lat - lat.mean(dim=(2, 3), keepdim=True)
            images = p(
                [f"a red star on a {name} background"] * 8,
                height=32,
                width=32,
                num_inference_steps=20,
                guidance_scale=2.0,
                latents=lat,
            ).images
            got = [background(i) for i in images]
            hits += sum(x == name for x in got)
            n += len(got)
            seen[name] = got
            print(mode, name, got, flush=True)
        report[mode] = {"background_hit_rate": hits / n, "read": seen}
        print(f"{mode}: background right {hits}/{n} ({100 * hits / n:.1f} %)", flush=True)
    if out:
        json.dump(report, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
