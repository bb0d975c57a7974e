#!/usr/bin/env python3
"""Builds the small reference fixtures in tests/fixtures/ with PyTorch and timm.

Python is a tool for fixtures only: neither CI nor any user path needs it.
Set up once (see ../shared/env.md):
    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch timm safetensors numpy
then:
    .venv-ref/bin/python tools/make_fixtures.py
Everything is seeded: rerunning on the same versions reproduces every tensor exactly (the
JSON header may list keys in another order).
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


def train_step_fixture():
    """One StableRep training step of a tiny model on a fixed batch, as the official recipe:
    ViT CLS features, the 3-layer BN head applied separately to each view group (so the
    batch statistics and the running statistics are per view), the multi-positive loss,
    AdamW (betas 0.9/0.98, eps 1e-8, weight decay 0.1 on tensors with ndim >= 2 whose name
    has no 'bias', 'ln' or 'bn')."""
    import timm

    torch.manual_seed(2)
    n, m = 4, 3
    vit_cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=0)
    hidden, out_dim = 64, 16
    visual = timm.models.vision_transformer.VisionTransformer(**vit_cfg)
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(0.02 * torch.randn_like(p))

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = torch.nn.Linear(32, hidden)
            self.bn1 = torch.nn.BatchNorm1d(hidden)
            self.layer2 = torch.nn.Linear(hidden, hidden)
            self.bn2 = torch.nn.BatchNorm1d(hidden)
            self.layer3 = torch.nn.Linear(hidden, out_dim)

        def forward(self, x):
            x = torch.relu(self.bn1(self.layer1(x)))
            x = torch.relu(self.bn2(self.layer2(x)))
            return self.layer3(x)

    head = Head()
    with torch.no_grad():
        for bn in (head.bn1, head.bn2):
            bn.weight.add_(0.1 * torch.randn_like(bn.weight))
            bn.bias.add_(0.1 * torch.randn_like(bn.bias))
    model = torch.nn.ModuleDict({"visual": visual, "image_mlp": head}).train()
    images = torch.randn(n * m, 3, 32, 32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "num_batches" not in k}

    feats = visual.forward_features(images)[:, 0]
    h = torch.cat([head(feats[v * n:(v + 1) * n]) for v in range(m)], dim=0)
    loss = multi_positive_loss(h, n)
    loss.backward()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.98), eps=1e-8,
    )
    grads = {f"grad.{k}": p.grad.detach().clone() for k, p in model.named_parameters()}
    opt.step()
    after = {k: v.detach().clone() for k, v in model.state_dict().items() if "num_batches" not in k}
    tensors = {"images": images, "loss": loss.detach().reshape(1), **grads}
    for k, v in before.items():
        tensors[f"before.{k}"] = v.contiguous()
    for k, v in after.items():
        tensors[f"after.{k}"] = v.contiguous()
    meta = {
        "vit": json.dumps(vit_cfg),
        "head": json.dumps({"hidden": hidden, "out": out_dim}),
        "batch": json.dumps({"captions": n, "images_per_caption": m, "temperature": 0.1}),
        "optimizer": json.dumps({"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.1}),
    }
    save_file(tensors, OUT / "train_step.safetensors", metadata=meta)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    loss_fixture()
    vit_fixture()
    train_step_fixture()
    for f in sorted(OUT.iterdir()):
        print(f.name, f.stat().st_size, "bytes")
