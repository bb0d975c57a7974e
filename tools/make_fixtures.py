#!/usr/bin/env python3
"""Builds the small reference fixtures in tests/fixtures/ with PyTorch and timm.

Python is a tool for fixtures only: neither CI nor any user path needs it.
Set up once (see ../shared/env.md):
    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch timm safetensors numpy
then:
    .venv-ref/bin/python tools/make_fixtures.py
Everything is seeded, so rerunning reproduces the files bit for bit on the same versions.
"""
import json
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def multi_positive_loss(feats, n_captions, temperature=0.1):
    """Direct transcription of StableRep's MultiPosConLoss (models/losses.py) on one device.

    Rows are view-major (row k = v * n + i), so the caption of row k is k mod n; all rows of
    the same caption are positives; self is masked out of the softmax with -1e9; the row max is
    subtracted (detached); the target is uniform over the positives.
    """
    feats = F.normalize(feats, dim=-1, p=2)
    n_rows = feats.shape[0]
    labels = torch.arange(n_rows) % n_captions
    logits = feats @ feats.T / temperature
    logits_mask = 1.0 - torch.eye(n_rows)
    logits = logits - (1.0 - logits_mask) * 1e9
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    mask = (labels[:, None] == labels[None, :]).float() * logits_mask
    p = mask / mask.sum(1, keepdim=True).clamp(min=1.0)
    log_q = F.log_softmax(logits, dim=-1)
    return -(p * log_q).sum(1).mean()


def loss_fixture():
    torch.manual_seed(0)
    tensors = {}
    meta = {}
    for name, (n, m, d) in {"a": (5, 3, 16), "b": (4, 6, 32), "simclr": (7, 2, 8)}.items():
        h = torch.randn(n * m, d, dtype=torch.float64, requires_grad=True)
        loss = multi_positive_loss(h, n)
        (grad,) = torch.autograd.grad(loss, h)
        tensors[f"{name}.h"] = h.detach().float()
        tensors[f"{name}.loss"] = loss.detach().float().reshape(1)
        tensors[f"{name}.grad"] = grad.float()
        meta[name] = json.dumps({"captions": n, "images_per_caption": m, "dim": d, "temperature": 0.1})
    save_file(tensors, OUT / "multipos_loss.safetensors", metadata=meta)


def vit_fixture():
    import timm

    torch.manual_seed(1)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=0)
    model = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    # timm initializes pos_embed / cls_token with small values; make every tensor non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
    tensors = {f"visual.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["input"] = x
    tensors["features"] = tokens[:, 0].contiguous()
    meta = {"config": json.dumps(cfg), "timm": timm.__version__, "torch": torch.__version__}
    save_file(tensors, OUT / "vit_tiny.safetensors", metadata=meta)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    loss_fixture()
    vit_fixture()
    for f in sorted(OUT.iterdir()):
        print(f.name, f.stat().st_size, "bytes")
