"""PyTorch reference for the mini-world text-to-image recipe (docs/world.md): trains the same
text encoder + UNet (configs read from a model folder written by examples/train_world_sd.rs)
with diffusers and transformers on renders of the simple world, so that what the engine's run
learns can be told apart from what the recipe can learn. Not part of the build or CI.

The same: architecture (the folder's configs), the VAE (the folder's, frozen, encoded means
times its scaling factor), SD's scaled-linear schedule with uniform timesteps, epsilon loss,
AdamW (0.9, 0.999, eps 1e-8, weight decay 0.01), lr 7e-4 with 200 warmup steps then cosine to
--steps, batch 32, caption dropout 0.1, offset noise from --offset-from (std --offset).
Different: diffusers' default initialization, and a fixed set of renders (`stablerep world
--world simple --captions 25000 --images-per-caption 2`, 50,000 images) instead of fresh
layouts every step.

Resumable (OUT/state.pt every 250 steps). Every --export-every steps it writes OUT/model-STEP,
a copy of the folder with the trained UNet and text encoder, for `stablerep fidelity --model`.

    python tools/world_sd_reference_torch.py MODEL_DIR POOL_DIR OUT [--steps 6000]
        [--offset 0.2] [--offset-from 0] [--export-every 1000] [--lr 7e-4] [--warmup 200]
        [--init-from STATE]

--init-from continues another run as a fine-tune: the weights and AdamW moments of that run's
state.pt, then a fresh warmup-cosine schedule of --steps steps peaking at --lr.
"""
import csv
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def arg(name, default, cast):
    return cast(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model, pool, out = sys.argv[1:4]
    steps = arg("--steps", 6000, int)
    offset = arg("--offset", 0.2, float)
    offset_from = arg("--offset-from", 0, int)
    export_every = arg("--export-every", 1000, int)
    lr = arg("--lr", 7e-4, float)
    warmup = arg("--warmup", 200, int)
    init_from = arg("--init-from", None, str)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lat_path = os.path.join(out, "latents.pt")
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    if os.path.exists(lat_path):
        latents, ids = torch.load(lat_path)
    else:
        rows = list(csv.reader(open(os.path.join(pool, "captions.csv"))))
        seeds = sorted(d for d in os.listdir(pool) if d.startswith("seed_"))
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
        scale = vae.config.scaling_factor
        lats, caps = [], []
        for s in seeds:
            for i in range(0, len(rows), 512):
                chunk = rows[i:i + 512]
                x = np.stack([np.asarray(Image.open(os.path.join(pool, s, r[0])).convert("RGB"),
                                         np.float32) / 127.5 - 1 for r in chunk])
                with torch.no_grad():
                    m = vae.encode(torch.tensor(x).permute(0, 3, 1, 2)).latent_dist.mean
                lats.append(m * scale)
                caps += [r[1] for r in chunk]
        latents = torch.cat(lats)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        torch.save((latents, ids), lat_path)
        print(f"encoded {len(latents)} renders, latent std {latents.std():.3f}", flush=True)
    empty = tok([""], padding="max_length", max_length=tok.model_max_length,
                return_tensors="pt").input_ids[0]
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model, subfolder="unet"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(model, subfolder="text_encoder"))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warmup if t < warmup
        else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup))))
    noise_sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    state_path = os.path.join(out, "state.pt")
    start = 0
    if init_from and not os.path.exists(state_path):
        st = torch.load(init_from, weights_only=False)
        unet.load_state_dict(st["unet"]); text.load_state_dict(st["text"])
        opt.load_state_dict(st["opt"])
        for g in opt.param_groups:
            g["lr"] = lr / warmup
            g["initial_lr"] = lr
        rng = np.random.default_rng(st["step"])
        print(f"initialized from {init_from} (step {st['step']})", flush=True)
    if os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        unet.load_state_dict(st["unet"]); text.load_state_dict(st["text"])
        opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"])
        start = st["step"]; rng = st["rng"]; torch.set_rng_state(st["torch_rng"])
        print(f"resumed at step {start}", flush=True)
    log = open(os.path.join(out, "log.jsonl"), "a")
    t0 = time.time()
    for t in range(start, steps):
        pick = rng.integers(0, len(latents), 32)
        x0 = latents[pick]
        b_ids = ids[pick].clone()
        drop = torch.tensor(rng.random(32) < 0.1)
        b_ids[drop] = empty
        noise = torch.randn_like(x0)
        if offset > 0 and t >= offset_from:
            noise = noise + offset * torch.randn(32, x0.shape[1], 1, 1)
        ts = torch.randint(0, noise_sched.config.num_train_timesteps, (32,))
        xt = noise_sched.add_noise(x0, noise, ts)
        pred = unet(xt, ts, text(b_ids).last_hidden_state).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (t + 1) % 50 == 0:
            rec = {"step": t + 1, "loss": loss.item(), "s_per_step": (time.time() - t0) / (t + 1 - start)}
            log.write(json.dumps(rec) + "\n"); log.flush()
            print(rec, flush=True)
        if (t + 1) % 250 == 0 or t + 1 == steps:
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": t + 1, "rng": rng,
                        "torch_rng": torch.get_rng_state()}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
        if (t + 1) % export_every == 0 or t + 1 == steps:
            dst = os.path.join(out, f"model-{t + 1}")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(model, dst)
            for sub in ["unet", "text_encoder"]:
                for f in os.listdir(os.path.join(dst, sub)):
                    if f.endswith(".safetensors"):
                        os.remove(os.path.join(dst, sub, f))
            unet.save_pretrained(os.path.join(dst, "unet"))
            text.save_pretrained(os.path.join(dst, "text_encoder"))
            print(f"wrote {dst}", flush=True)


if __name__ == "__main__":
    main()
