"""Reference fixtures for issue 4 (Stable Diffusion), built with diffusers.

Schedulers: each of SD1.5's samplers, created with `from_config` from SD1.5's
scheduler_config.json exactly as diffusers' pipelines do, runs 4 steps on a [1, 4, 8, 8] latent
with a synthetic noise predictor eps(x, t) = 0.5 tanh(x) + 0.1 sin(0.01 t) applied to the
scheduler-scaled input. Saved: the timesteps, init_noise_sigma, the latents after every step,
and the noise the ancestral samplers drew (captured by patching diffusers' randn_tensor).

Usage: .venv-ref/bin/python tools/make_sd_fixtures.py   (writes tests/fixtures/sd_*.safetensors)
"""

import pathlib

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


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    schedulers_fixture()
