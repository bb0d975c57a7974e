#!/usr/bin/env python3
"""Builds the small reference fixtures in tests/fixtures/ with PyTorch and timm.

Python is a tool for fixtures only: neither CI nor any user path needs it.
Set up once (see ../shared/env.md):
    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch timm safetensors numpy open-clip-torch
then:
    .venv-ref/bin/python tools/make_fixtures.py [resize loss vit train_step tokens plus cnn handoff vit_conv_stem elementwise torch_init]
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


class Head(torch.nn.Module):
    """StableRep's projection head (image_mlp): Linear-BN-ReLU-Linear-BN-ReLU-Linear."""

    def __init__(self, width, hidden, out_dim):
        super().__init__()
        self.layer1 = torch.nn.Linear(width, hidden)
        self.bn1 = torch.nn.BatchNorm1d(hidden)
        self.layer2 = torch.nn.Linear(hidden, hidden)
        self.bn2 = torch.nn.BatchNorm1d(hidden)
        self.layer3 = torch.nn.Linear(hidden, out_dim)

    def forward(self, x):
        x = torch.relu(self.bn1(self.layer1(x)))
        x = torch.relu(self.bn2(self.layer2(x)))
        return self.layer3(x)


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

    head = Head(32, hidden, out_dim)
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
    # Two more steps on the same batch: after three AdamW steps the update is no longer about
    # -lr * sign(g), so the weights check the gradients' magnitudes too.
    losses = [loss.detach()]
    for _ in range(2):
        opt.zero_grad()
        feats = visual.forward_features(images)[:, 0]
        h = torch.cat([head(feats[v * n:(v + 1) * n]) for v in range(m)], dim=0)
        step_loss = multi_positive_loss(h, n)
        step_loss.backward()
        opt.step()
        losses.append(step_loss.detach())
    after3 = {k: v.detach().clone() for k, v in model.state_dict().items() if "num_batches" not in k}
    tensors = {"images": images, "loss": loss.detach().reshape(1), "losses3": torch.stack(losses), **grads}
    for k, v in before.items():
        tensors[f"before.{k}"] = v.contiguous()
    for k, v in after.items():
        tensors[f"after.{k}"] = v.contiguous()
    for k, v in after3.items():
        tensors[f"after3.{k}"] = v.contiguous()
    meta = {
        "vit": json.dumps(vit_cfg),
        "head": json.dumps({"hidden": hidden, "out": out_dim}),
        "batch": json.dumps({"captions": n, "images_per_caption": m, "temperature": 0.1}),
        "optimizer": json.dumps({"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.1}),
    }
    save_file(tensors, OUT / "train_step.safetensors", metadata=meta)


CAPTIONS = [
    "a photo of a cat",
    "a photo of an astronaut riding a horse on mars",
    "A Photo   OF\ta  CAT!!",
    "it\u2019s a dog's life, isn't it? we'll see; they'd've...",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve r\u00e9sum\u00e9",
    "cafe\u0301 (decomposed accent)",
    "\u6771\u4eac\u30bf\u30ef\u30fc\u306e\u591c\u666f",
    "\U0001f436\U0001f431 emoji party \U0001f389",
    "123 apples and 4.5 oranges, \u216b roman",
    "Tom &amp; Jerry &lt;3 &amp;amp;",
    "\ufb01ne ligatures and \uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28 text",
    "hello...world??? --- ok",
    "\u00c7A VA? \u03a3\u039f\u03a6\u039f\u03a3",
    "",
    " ".join(["a red bicycle leaning against a wooden fence at sunset"] * 8),
]


def tokens_fixture():
    """Token ids of tricky captions from open_clip's SimpleTokenizer (the real CLIP BPE, the
    same cleaning and pattern as OpenAI's clip.tokenize), context 77, zero padding."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    ids = tok(CAPTIONS, context_length=77)
    cases = [{"text": t, "ids": row.tolist()} for t, row in zip(CAPTIONS, ids)]
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases)
    (OUT / "clip_tokens.json").write_text("[\n" + lines + "\n]\n")


def clip_loss(v, t, logit_scale, n_captions):
    """StableRep+'s image-text loss (models/losses.py, MultiPosConLossMM's image-text part) on
    one device: L2-normalized image embeddings v [n*m, D] (view-major, caption of row k is
    k mod n) and text embeddings t [n, D]; image->text cross-entropy against the own caption,
    text->image cross-entropy against the uniform distribution over the caption's m images."""
    v = F.normalize(v, dim=-1, p=2)
    t = F.normalize(t, dim=-1, p=2)
    s = logit_scale.exp()
    n_rows = v.shape[0]
    labels = torch.arange(n_rows) % n_captions
    logits_i2t = s * v @ t.T
    loss_i2t = F.cross_entropy(logits_i2t, labels)
    logits_t2i = s * t @ v.T
    p = (torch.arange(n_captions)[:, None] == labels[None, :]).float()
    p = p / p.sum(1, keepdim=True)
    loss_t2i = -(p * F.log_softmax(logits_t2i, dim=-1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def plus_fixture():
    """StableRep+ (language supervision): the image-text loss alone on random embeddings, and
    one full training step of a tiny model: ViT + BN head (multi-positive loss) plus a causal
    CLIP text tower (QuickGELU, LN eps 1e-5, EOT feature), image and text projections and the
    logit scale, AdamW as the recipe, then the logit scale clamped to [0, ln 100].
    The token embedding is zero except for the rows the batch uses; only those rows are stored
    (before, gradient, after) with their ids, to keep the file small."""
    import timm
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import TextTransformer, QuickGELU

    torch.manual_seed(3)
    tensors, meta = {}, {}
    for name, (n, m, d) in {"a": (5, 3, 16), "b": (3, 4, 8)}.items():
        v = torch.randn(n * m, d, dtype=torch.float64, requires_grad=True)
        t = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
        theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        loss = clip_loss(v, t, theta, n)
        gv, gt, gth = torch.autograd.grad(loss, (v, t, theta))
        tensors.update({f"loss_{name}.v": v.detach().float(), f"loss_{name}.t": t.detach().float(),
                        f"loss_{name}.theta": theta.detach().float().reshape(1),
                        f"loss_{name}.loss": loss.detach().float().reshape(1),
                        f"loss_{name}.grad_v": gv.float(), f"loss_{name}.grad_t": gt.float(),
                        f"loss_{name}.grad_theta": gth.float().reshape(1)})
        meta[f"loss_{name}"] = json.dumps({"captions": n, "images_per_caption": m, "dim": d})

    n, m, ctx = 3, 2, 12
    vit_cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=0)
    text_cfg = dict(context_length=ctx, vocab_size=49408, width=16, heads=2, layers=2, mlp_ratio=4.0, output_dim=8)
    hidden, out_dim, proj = 24, 8, 8
    visual = timm.models.vision_transformer.VisionTransformer(**vit_cfg)
    text = TextTransformer(**text_cfg, act_layer=QuickGELU)
    captions = ["a photo of a cat", "two dogs playing in the snow", "a bowl of fruit on a table"]
    ids = SimpleTokenizer()(captions, context_length=ctx)
    used = torch.unique(ids)

    head = Head(32, hidden, out_dim)
    model = torch.nn.Module()
    model.visual = visual
    model.image_mlp = head
    model.token_embedding = text.token_embedding
    model.positional_embedding = text.positional_embedding
    model.transformer = text.transformer
    model.ln_final = text.ln_final
    model.text_projection = text.text_projection
    model.image_projection = torch.nn.Parameter(torch.randn(32, proj) * 32 ** -0.5)
    model.logit_scale = torch.nn.Parameter(torch.tensor(4.55))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
        keep = torch.zeros(49408, dtype=torch.bool)
        keep[used] = True
        model.token_embedding.weight[~keep] = 0.0
    model.train()
    images = torch.randn(n * m, 3, 32, 32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "num_batches" not in k}

    feats = visual.forward_features(images)[:, 0]
    h = torch.cat([head(feats[v * n:(v + 1) * n]) for v in range(m)], dim=0)
    ssl = multi_positive_loss(h, n)
    t_emb = text(ids)
    v_emb = feats @ model.image_projection
    it = clip_loss(v_emb, t_emb, model.logit_scale, n)
    loss = ssl + it
    loss.backward()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.98), eps=1e-8,
    )
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, 4.6052)
    after = {k: v.detach().clone() for k, v in model.state_dict().items() if "num_batches" not in k}
    tensors.update({"images": images, "token_ids": ids.to(torch.int32), "used_ids": used.to(torch.int32),
                    "loss": loss.detach().reshape(1), "loss_ssl": ssl.detach().reshape(1),
                    "loss_it": it.detach().reshape(1)})
    for prefix, d in (("before.", before), ("after.", after), ("grad.", grads)):
        for k, v in d.items():
            if k == "token_embedding.weight":
                v = v[used]
            tensors[prefix + k] = v.reshape(-1).clone() if v.ndim == 0 else v.contiguous()
    meta.update({
        "vit": json.dumps(vit_cfg),
        "text": json.dumps(text_cfg),
        "head": json.dumps({"hidden": hidden, "out": out_dim}),
        "projection": str(proj),
        "batch": json.dumps({"captions": n, "images_per_caption": m, "temperature": 0.1}),
        "optimizer": json.dumps({"lr": 1e-2, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.1}),
        "captions": json.dumps(captions),
    })
    save_file(tensors, OUT / "stablerep_plus.safetensors", metadata=meta)


def cnn_wave(n, a, b, scale):
    """scale * sin(a * i + b) for i in 0..n, in float64 (the test computes the same)."""
    i = torch.arange(n, dtype=torch.float64)
    return scale * torch.sin(a * i + b)


def cnn_fixture():
    """The judge's CNN (models::cnn: 3x3 convs, stride 1 then 2, GroupNorm(8) + SiLU, mean
    pool) with a linear head and cross-entropy, on 16 images of 32 x 32: loss and the gradient
    of every parameter. Inputs and parameters are sine waves both sides compute, so only the
    results are stored. 16 x 32 x 32 = 16,384 terms per first-layer bias gradient: more than
    llvmpipe's loop limit lets one invocation sum (the bug this caught)."""
    b, chans, classes = 16, [16, 24], 6
    x = cnn_wave(b * 3 * 32 * 32, 0.37, 0.0, 1.0).reshape(b, 3, 32, 32)
    params, cin = {}, 3
    for l, c in enumerate(chans):
        k = l * 10
        params[f"cnn.{l}.conv.weight"] = cnn_wave(c * cin * 9, 0.71, k + 1, 0.3).reshape(c, cin, 3, 3)
        params[f"cnn.{l}.conv.bias"] = cnn_wave(c, 1.3, k + 2, 0.1)
        params[f"cnn.{l}.norm.weight"] = 1.0 + cnn_wave(c, 0.9, k + 3, 0.2)
        params[f"cnn.{l}.norm.bias"] = cnn_wave(c, 1.1, k + 4, 0.1)
        cin = c
    params["classifier.shape.weight"] = cnn_wave(classes * cin, 0.53, 7.0, 0.5).reshape(classes, cin)
    params["classifier.shape.bias"] = cnn_wave(classes, 0.29, 8.0, 0.1)
    for v in params.values():
        v.requires_grad_(True)
    h = x
    for l in range(len(chans)):
        h = F.conv2d(h, params[f"cnn.{l}.conv.weight"], params[f"cnn.{l}.conv.bias"],
                     stride=1 if l == 0 else 2, padding=1)
        h = F.silu(F.group_norm(h, 8, params[f"cnn.{l}.norm.weight"], params[f"cnn.{l}.norm.bias"], 1e-5))
    z = h.mean((2, 3)) @ params["classifier.shape.weight"].T + params["classifier.shape.bias"]
    y = torch.arange(b) % classes
    loss = F.cross_entropy(z, y)
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1).float()}
    for k, v in params.items():
        tensors[f"grad.{k}"] = v.grad.float().contiguous()
    meta = {"what": "models::cnn [16, 24] on 16 x 3 x 32 x 32 sine images, labels i % 6",
            "torch": torch.__version__}
    save_file(tensors, OUT / "cnn_grads.safetensors", metadata=meta)


def resize_pattern(h, w):
    """The procedural RGB u8 image [h, w, 3] that tests/data.rs rebuilds: high-frequency
    stripes and a ramp, so antialiasing changes the result."""
    import numpy as np
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 37 + y * 11) % 256
    g = ((x // 3 + y // 2) % 2) * 255
    b = (x * 255) // max(w - 1, 1)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def resize_fixture():
    """The evaluation transform's resize and crop as torchvision does it on PIL images:
    Resize(37) (shorter side, bilinear, antialiased) then CenterCrop(32), before normalization,
    for a landscape 120 x 200 and a portrait 90 x 41 pattern."""
    from PIL import Image
    import torchvision.transforms as T
    import torchvision
    tf = T.Compose([T.Resize(37, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32), T.ToTensor()])
    tensors = {}
    for name, (h, w) in {"landscape": (120, 200), "portrait": (90, 41)}.items():
        tensors[name] = tf(Image.fromarray(resize_pattern(h, w))).contiguous()
    meta = {"what": "torchvision Resize(37) + CenterCrop(32) + ToTensor of resize_pattern(h, w)",
            "torchvision": torchvision.__version__}
    save_file(tensors, OUT / "eval_resize.safetensors", metadata=meta)


def handoff_fixture():
    """The hand-off to PyTorch: a tiny StableRep model trained by this project's CLI (5 steps
    on the mini-world; the release binary is built by cargo), its `visual.*` loaded into
    timm's VisionTransformer with strict=True, and timm's CLS features on a fixed input."""
    import subprocess
    import tempfile

    import timm
    from safetensors import safe_open

    root = OUT.parent.parent
    tmp = pathlib.Path(tempfile.mkdtemp())

    def cli(*args):
        subprocess.run(["cargo", "run", "--release", "--quiet", "--", *args], check=True, cwd=root)

    cli("world", "--world", "simple", "--captions", "8", "--images-per-caption", "2",
        "--size", "16", "--out", str(tmp / "pool"))
    cli("train", "--pool", str(tmp / "pool"), "--img-size", "16", "--patch", "8", "--width", "32",
        "--depth", "2", "--heads", "2", "--head-hidden", "32", "--head-out", "16",
        "--captions-per-batch", "4", "--images-per-caption", "2", "--steps", "5",
        "--out", str(tmp / "run"))
    path = tmp / "run" / "checkpoint-last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        ck = {k: f.get_tensor(k) for k in f.keys()}
    vit = json.loads(meta["config"])["model"]["vit"]
    cfg = dict(img_size=vit["img_size"], patch_size=vit["patch"], embed_dim=vit["width"],
               depth=vit["depth"], num_heads=vit["heads"], mlp_ratio=vit["mlp"] / vit["width"],
               num_classes=0)
    model = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    visual = {k[len("visual."):]: v for k, v in ck.items() if k.startswith("visual.")}
    model.load_state_dict(visual, strict=True)  # raises on any missing or unexpected key
    torch.manual_seed(3)
    x = torch.randn(4, 3, cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        feats = model.forward_features(x)[:, 0]
    tensors = {f"visual.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["input"] = x
    tensors["features"] = feats.contiguous()
    save_file(tensors, OUT / "handoff.safetensors", metadata={
        "config": json.dumps(cfg), "stablerep_config": meta["config"],
        "timm": timm.__version__, "torch": torch.__version__,
        "what": "visual.* of a checkpoint trained by `stablerep train`, loaded into timm strict=True"})


def vit_conv_stem_fixture():
    """models::vit with the convolutional stem (Stem::Conv): timm's VisionTransformer with
    patch_embed.proj replaced by 3x3 stride-2 convolutions (GroupNorm(8) + SiLU; channels
    width/4 doubling) and a 1x1 convolution, on 16 x 16 images with patch 4. Stores the
    parameters, the input, the CLS features and the gradient of sum(features * r) for every
    parameter."""
    import timm
    import torch.nn as nn

    torch.manual_seed(5)
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=0)
    model = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    layers, c, o, p = [], 3, max(32 // 4, 8), 4
    while p > 1:
        layers += [nn.Conv2d(c, o, 3, 2, 1), nn.GroupNorm(8, o), nn.SiLU()]
        c, o, p = o, o * 2, p // 2
    model.patch_embed.proj = nn.Sequential(*layers, nn.Conv2d(c, 32, 1))
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    x = torch.randn(3, 3, 16, 16)
    r = torch.randn(3, 32)
    feats = model.forward_features(x)[:, 0]
    (feats * r).sum().backward()
    tensors = {f"visual.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for k, v in model.named_parameters():
        tensors[f"grad.visual.{k}"] = v.grad.contiguous()
    tensors["input"] = x
    tensors["r"] = r
    tensors["features"] = feats.detach().contiguous()
    meta = {"config": json.dumps(cfg), "stem": "conv", "timm": timm.__version__, "torch": torch.__version__}
    save_file(tensors, OUT / "vit_conv_stem.safetensors", metadata=meta)


def elementwise_fixture():
    """Every UnaryOp (kernels::elementwise, with UnaryOp::all()'s scalars) in float64 through
    PyTorch autograd: for each op its inputs x (kinks at 0 included where PyTorch defines the
    gradient there: relu, abs), y = f(x) and dx = dy * f'(x) for a random dy."""
    torch.manual_seed(11)
    pos = torch.tensor([0.05, 0.3, 0.7, 1.0, 1.9, 3.5, 7.0], dtype=torch.float64)
    gen = torch.tensor([-6.0, -2.5, -1.1, -0.4, -0.07, 0.0, 0.07, 0.3, 0.9, 1.6, 3.2, 9.0], dtype=torch.float64)
    clamp_x = torch.tensor([-2.0, -0.7, -0.49, -0.2, 0.0, 0.15, 0.49, 0.8, 3.0], dtype=torch.float64)
    ops = {
        "exp": (lambda x: torch.exp(x), gen),
        "log": (lambda x: torch.log(x), pos),
        "sqrt": (lambda x: torch.sqrt(x), pos),
        "rsqrt": (lambda x: torch.rsqrt(x), pos),
        "relu": (lambda x: torch.relu(x), gen),
        "gelu": (lambda x: F.gelu(x), gen),
        "quick_gelu": (lambda x: x * torch.sigmoid(1.702 * x), gen),
        "silu": (lambda x: F.silu(x), gen),
        "sigmoid": (lambda x: torch.sigmoid(x), gen),
        "tanh": (lambda x: torch.tanh(x), gen),
        "neg": (lambda x: -x, gen),
        "abs": (lambda x: torch.abs(x), gen),
        "square": (lambda x: torch.square(x), gen),
        "recip": (lambda x: torch.reciprocal(x), pos),
        "affine": (lambda x: 2.0 * x - 1.0, gen),
        "pow": (lambda x: torch.pow(x, 3.0), pos),
        "clamp": (lambda x: torch.clamp(x, -0.5, 0.5), clamp_x),
    }
    tensors = {}
    for name, (f, xs) in ops.items():
        x = xs.clone().requires_grad_(True)
        dy = torch.randn(len(xs), dtype=torch.float64)
        y = f(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        tensors[f"{name}.x"] = xs.clone()
        tensors[f"{name}.y"] = y.detach()
        tensors[f"{name}.dy"] = dy
        tensors[f"{name}.dx"] = dx
    save_file(tensors, OUT / "elementwise.safetensors", metadata={"torch": torch.__version__})


def torch_init_fixture():
    """PyTorch's module defaults at the mini-world encoder's width (96, MLP 384, 3 heads) and
    the supervised heads (96 -> 6): the standard deviation and largest magnitude of each
    parameter over 50 fresh modules, named as the engine names them, for `Init::Torch`."""
    import torch.nn as nn
    d, mlp, h, classes, draws = 96, 384, 3, 6, 50
    acc = {}
    for seed in range(draws):
        torch.manual_seed(seed)
        a = nn.MultiheadAttention(d, h, batch_first=True)
        fc1, fc2, head = nn.Linear(d, mlp), nn.Linear(mlp, d), nn.Linear(d, classes)
        for name, t in [("attn.qkv.weight", a.in_proj_weight), ("attn.qkv.bias", a.in_proj_bias),
                        ("attn.proj.weight", a.out_proj.weight), ("attn.proj.bias", a.out_proj.bias),
                        ("mlp.fc1.weight", fc1.weight), ("mlp.fc1.bias", fc1.bias),
                        ("mlp.fc2.weight", fc2.weight), ("mlp.fc2.bias", fc2.bias),
                        ("classifier.weight", head.weight), ("classifier.bias", head.bias)]:
            acc.setdefault(name, []).append(t.detach().double().flatten())
    params = {}
    for name, ts in acc.items():
        x = torch.cat(ts)
        params[name] = {"std": round(float(x.std()), 6), "max_abs": round(float(x.abs().max()), 6), "count": x.numel()}
    doc = {"width": d, "mlp": mlp, "heads": h, "classes": classes, "draws": draws,
           "torch": torch.__version__, "params": params}
    (OUT / "torch_init.json").write_text(json.dumps(doc, indent=1) + "\n")


FIXTURES = {
    "handoff": handoff_fixture,
    "resize": resize_fixture,
    "loss": loss_fixture,
    "vit": vit_fixture,
    "train_step": train_step_fixture,
    "tokens": tokens_fixture,
    "plus": plus_fixture,
    "cnn": cnn_fixture,
    "vit_conv_stem": vit_conv_stem_fixture,
    "elementwise": elementwise_fixture,
    "torch_init": torch_init_fixture,
}

if __name__ == "__main__":
    import sys
    OUT.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[1:] or list(FIXTURES):
        FIXTURES[name]()
    for f in sorted(OUT.iterdir()):
        print(f.name, f.stat().st_size, "bytes")
