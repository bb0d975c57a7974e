#!/usr/bin/env python3
"""Evidence for the running-mean room in tests/cli.rs (fixed_batch_gradients_and_three_steps_match_pytorch).

Some gradients of the train_step fixture are zero in exact arithmetic (the head's biases before
BatchNorm, the final norm's bias): both PyTorch and we hold rounding noise there, and AdamW turns
noise into +-lr steps. This reruns the fixture's three PyTorch steps twice, the second time with
the sign of that noise flipped, and prints how far the results move: the BatchNorm running means
move by about 4.4e-3 (bn1) and 1.3e-3 (bn2); the real parameters do not.
    .venv-ref/bin/python tools/bn_noise_spread.py
"""
import sys
import torch
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
import make_fixtures as mf
import timm
def run(flip):
    torch.manual_seed(2)
    n, m = 4, 3
    vit_cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=0)
    visual = timm.models.vision_transformer.VisionTransformer(**vit_cfg)
    with torch.no_grad():
        for p in visual.parameters(): p.add_(0.02 * torch.randn_like(p))
    head = mf.Head(32, 64, 16)
    with torch.no_grad():
        for bn in (head.bn1, head.bn2):
            bn.weight.add_(0.1 * torch.randn_like(bn.weight)); bn.bias.add_(0.1 * torch.randn_like(bn.bias))
    model = torch.nn.ModuleDict({"visual": visual, "image_mlp": head}).train()
    images = torch.randn(n * m, 3, 32, 32)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
    for s in range(3):
        opt.zero_grad()
        feats = visual.forward_features(images)[:, 0]
        h = torch.cat([head(feats[v * n:(v + 1) * n]) for v in range(m)], dim=0)
        mf.multi_positive_loss(h, n).backward()
        if flip:
            for k,p in model.named_parameters():
                if k in ('image_mlp.layer1.bias','image_mlp.layer2.bias','visual.norm.bias'): p.grad.mul_(-1)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
a=run(False); b=run(True)
for k in ['image_mlp.bn1.running_mean','image_mlp.bn2.running_mean','image_mlp.layer1.bias','image_mlp.layer1.weight','image_mlp.bn1.running_var']:
    print(k,(a[k]-b[k]).abs().max().item())
