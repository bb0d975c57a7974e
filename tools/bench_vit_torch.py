"""The issue-3 `vit-train` block stack on PyTorch (CPU), for side-by-side timing against
`cargo run --release --example bench -- vit-train` on the same machine and minutes.

Same graph as `stablerep::demo::transformer_stack`: batch 32, 64 tokens, width 192, 4 pre-norm
layers, 3 heads, MLP 768, erf GELU, LayerNorm eps 1e-6; loss mean(x^2); backward; AdamW
(betas 0.9/0.98, eps 1e-8, weight decay 0.1). Prints one JSON line per timed step.
Usage: .venv-ref/bin/python tools/bench_vit_torch.py [STEPS]
"""

import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

B, T, D, L, H, MLP = 32, 64, 192, 4, 3, 768


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.fc1 = nn.Linear(D, MLP)
        self.fc2 = nn.Linear(MLP, D)

    def forward(self, x):
        hd = D // H
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(L)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    x = torch.randn(B, T, D)
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        ms = (time.perf_counter() - t0) * 1e3
        print(json.dumps({"bench": "vit-train-torch", "step": step, "threads": torch.get_num_threads(),
                          "ms_per_step": round(ms, 1), "loss": loss.item()}))


if __name__ == "__main__":
    main()
