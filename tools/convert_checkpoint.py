#!/usr/bin/env python3
"""Moves StableRep weights between this project and PyTorch (docs/scale.md).

    # ours -> a torch file the official main_linear.py / main_stablerep.py reads ({'model': ...})
    python tools/convert_checkpoint.py to-torch run/checkpoint-last.safetensors model.pth
    # a torch checkpoint (official epoch_last.pth, a DDP or timm state dict) -> ours
    python tools/convert_checkpoint.py from-torch epoch_last.pth model.safetensors [--prefix visual.]

Needs torch and safetensors (python3 -m venv .venv-ref && .venv-ref/bin/pip install torch
safetensors). Neither the project nor its tests need Python; this is for the hand-off.
"""
import argparse
import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def to_torch(src, dst):
    with safe_open(src, framework="pt") as f:
        meta = f.metadata() or {}
        # The model only: the optimizer's moments (optimizer.*) are not part of a state dict.
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optimizer.")}
    step = int(meta.get("step", "0") or 0)
    # PyTorch's BatchNorm also stores how many batches it has seen; the official model (and
    # load_state_dict(strict=True)) expects it.
    for k in list(state):
        if k.endswith(".running_mean"):
            nbt = k[: -len("running_mean")] + "num_batches_tracked"
            state.setdefault(nbt, torch.tensor(step, dtype=torch.long))
    config = json.loads(meta["config"]) if "config" in meta else None
    torch.save({"model": state, "epoch": None, "args": None, "stablerep_config": config}, dst)
    print(f"{len(state)} tensors -> {dst}")


def from_torch(src, dst, prefix):
    ck = torch.load(src, map_location="cpu", weights_only=False)
    config = ck.get("stablerep_config") if isinstance(ck, dict) else None
    if isinstance(ck, dict):
        for key in ("model", "state_dict", "model_ema"):
            if key in ck and isinstance(ck[key], dict):
                ck = ck[key]
                break
    out = {}
    for k, v in ck.items():
        if not torch.is_tensor(v) or not v.is_floating_point():
            continue  # num_batches_tracked and other counters
        k = k[len("module."):] if k.startswith("module.") else k
        if prefix and not k.startswith(("visual.", "image_mlp.")):
            k = prefix + k
        out[k] = v.float().contiguous()
    # A file that came from here keeps its architecture; others have it inferred from shapes.
    save_file(out, dst, metadata={"config": json.dumps(config)} if config else None)
    print(f"{len(out)} tensors -> {dst}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-torch")
    a.add_argument("src")
    a.add_argument("dst")
    b = sub.add_parser("from-torch")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--prefix", default="", help="prepend to every key (visual. for a bare timm ViT)")
    args = ap.parse_args()
    if args.cmd == "to-torch":
        to_torch(args.src, args.dst)
    else:
        from_torch(args.src, args.dst, args.prefix)


if __name__ == "__main__":
    main()
