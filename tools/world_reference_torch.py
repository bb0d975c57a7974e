"""PyTorch reference runs on mini-world renders (docs/results.md, docs/world.md): the demo's
ViT trained supervised, with SimCLR or with StableRep's multi-positive loss on renders written by
`stablerep world --world simple`, scored by a linear probe and kNN. Not part of the build or CI.

Data root R holds oracle/ (216 captions x 4), real/ (216 x 1), shape-train/, shape-test/,
colour-train/, colour-test/ (480 each, --labelled). Usage:
    PATCH=8 WIDTH=96 DEPTH=3 LR=1e-3 python tools/world_reference_torch.py R STEPS ARMS SEEDS
with ARMS a comma list of untrained, sup, simclr-real, stablerep-oracle, simclr-oracle.
More switches (docs/results.md, Result 6): STEM=conv (3 x 3 stride-2 convolutions with
GroupNorm and SiLU, then a 1 x 1, instead of the patch embedding), ENC=cnn (the judge's CNN as
the encoder), POOL=mean (mean of the patch tokens instead of the CLS token), CW (the supervised
colour head's weight, 1), GRAY and JS (grayscale probability 0.2 and colour-jitter strength
0.4), TAU (temperature, 0.1), SMIN (smallest crop scale, 0.35), BLUR (largest blur sigma, 0.3),
VIEWS (32), REAL (the real pool's folder under R, real), INIT=engine (the engine's
initialization: transformer matrices, CLS and positions N(0, 0.02), biases 0, supervised heads
N(0, 0.01); the stem keeps PyTorch's defaults, as the engine does), WD=engine (no decay for
vectors, biases and norms, as the engine's `decays`)."""
import sys, os, glob, math, json, time, random
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
torch.set_num_threads(1)
R = sys.argv[1]  # data root

def load_folder(d):
    xs, ys, names = [], [], sorted(os.listdir(d))
    for i, n in enumerate(names):
        for f in sorted(glob.glob(f"{d}/{n}/*.png")):
            xs.append(np.asarray(Image.open(f).convert('RGB'), np.float32) / 255); ys.append(i)
    return torch.tensor(np.stack(xs)).permute(0, 3, 1, 2), torch.tensor(ys)

def load_pool(d, m):
    caps = open(f"{d}/captions.csv").read().strip().split("\n")
    rel = [c.split(",")[0] for c in caps]
    out = []
    for r in rel:
        out.append(np.stack([np.asarray(Image.open(f"{d}/seed_{j}/{r}").convert('RGB'), np.float32) / 255 for j in range(m)]))
    return torch.tensor(np.stack(out)).permute(0, 1, 4, 2, 3)  # [C, m, 3, H, W]

class Block(nn.Module):
    def __init__(s, d, h):
        super().__init__(); s.n1 = nn.LayerNorm(d); s.a = nn.MultiheadAttention(d, h, batch_first=True); s.n2 = nn.LayerNorm(d)
        s.m = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    def forward(s, x):
        y = s.n1(x); x = x + s.a(y, y, y, need_weights=False)[0]; return x + s.m(s.n2(x))
def conv_stem(p, d):
    # 3 x 3 convolutions at stride 2 (GroupNorm, SiLU) down to the patch grid, then a 1 x 1 to
    # the width (Xiao et al. 2021, "Early convolutions help transformers see better").
    L, c, o = [], 3, max(d // 4, 8)
    while p > 1:
        L += [nn.Conv2d(c, o, 3, 2, 1), nn.GroupNorm(8, o), nn.SiLU()]; c, o, p = o, o * 2, p // 2
    return nn.Sequential(*L, nn.Conv2d(c, d, 1))
class ViT(nn.Module):
    def __init__(s, img=32, p=4, d=96, L=3, h=3):
        super().__init__(); s.pe = conv_stem(p, d) if os.environ.get('STEM') == 'conv' else nn.Conv2d(3, d, p, p); n = (img // p) ** 2
        s.pool = os.environ.get('POOL', 'cls')
        s.cls = nn.Parameter(torch.zeros(1, 1, d)); s.pos = nn.Parameter(torch.randn(1, n + 1, d) * .02)
        s.b = nn.Sequential(*[Block(d, h) for _ in range(L)]); s.n = nn.LayerNorm(d); s.d = d
    def forward(s, x):
        x = s.pe(x).flatten(2).transpose(1, 2); x = torch.cat([s.cls.expand(len(x), -1, -1), x], 1) + s.pos
        y = s.n(s.b(x)); return y[:, 1:].mean(1) if s.pool == 'mean' else y[:, 0]
class CNN(nn.Module):
    # The judge's CNN (3 x 3 convolutions, GroupNorm, SiLU, mean pool), width = last channels.
    def __init__(s, ch=(32, 64, 96, 128)):
        super().__init__(); L = []; c = 3
        for i, o in enumerate(ch): L += [nn.Conv2d(c, o, 3, 1 if i == 0 else 2, 1), nn.GroupNorm(8, o), nn.SiLU()]; c = o
        s.f = nn.Sequential(*L)
    def forward(s, x): return s.f(x).mean((2, 3))
def headm(d, hid=256, out=64):
    return nn.Sequential(nn.Linear(d, hid), nn.BatchNorm1d(hid), nn.ReLU(), nn.Linear(hid, hid), nn.BatchNorm1d(hid), nn.ReLU(), nn.Linear(hid, out))

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1); STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
def augment(x, scale, blur, jit=True):
    B, _, H, W = x.shape
    out = []
    for i in range(B):
        area = random.uniform(*scale); ar = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(1.0, math.sqrt(area * ar)); h = min(1.0, math.sqrt(area / ar))
        x0 = random.uniform(0, 1 - w); y0 = random.uniform(0, 1 - h)
        theta = torch.tensor([[w, 0, 2 * x0 + w - 1], [0, h, 2 * y0 + h - 1]], dtype=torch.float32)
        if random.random() < .5: theta[0, 0] *= -1
        g = F.affine_grid(theta[None], (1, 3, H, W), align_corners=False)
        y = F.grid_sample(x[i:i + 1], g, align_corners=False)
        if jit and random.random() < .8:
            js = float(os.environ.get('JS', .4)); b = random.uniform(1 - js, 1 + js); c = random.uniform(1 - js, 1 + js); s = random.uniform(1 - js, 1 + js)
            y = y * b; m = y.mean(); y = (y - m) * c + m; gr = (0.299 * y[:, 0] + .587 * y[:, 1] + .114 * y[:, 2])[:, None]; y = (y - gr) * s + gr
            # hue: rotate channels a little (approximation)
            hh = random.uniform(-.1, .1) * 2 * math.pi; cs, sn = math.cos(hh), math.sin(hh)
            k = 1 / 3; sq = math.sqrt(k)
            M = torch.tensor([[cs + (1 - cs) * k, k * (1 - cs) - sq * sn, k * (1 - cs) + sq * sn], [k * (1 - cs) + sq * sn, cs + k * (1 - cs), k * (1 - cs) - sq * sn], [k * (1 - cs) - sq * sn, k * (1 - cs) + sq * sn, cs + k * (1 - cs)]])
            y = torch.einsum('ij,bjhw->bihw', M, y).clamp(0, 1)
        if jit and random.random() < float(os.environ.get('GRAY', .2)): gr = (0.299 * y[:, 0] + .587 * y[:, 1] + .114 * y[:, 2])[:, None]; y = gr.expand(-1, 3, -1, -1)
        if blur and random.random() < .5:
            sg = random.uniform(*blur); r = max(1, int(math.ceil(2 * sg))); t = torch.arange(-r, r + 1, dtype=torch.float32); k1 = torch.exp(-t ** 2 / (2 * sg * sg)); k1 /= k1.sum()
            y = F.conv2d(F.pad(y, (r, r, 0, 0), mode='reflect'), k1.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
            y = F.conv2d(F.pad(y, (0, 0, r, r), mode='reflect'), k1.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        out.append(y)
    return (torch.cat(out) - MEAN) / STD

def mp_loss(z, labels, tau=.1):
    z = F.normalize(z, dim=1); logits = z @ z.t() / tau; n = len(z)
    mask = torch.eye(n, dtype=torch.bool); logits = logits.masked_fill(mask, -1e9)
    p = (labels[:, None] == labels[None]).float().masked_fill(mask, 0); p = p / p.sum(1, keepdim=True)
    return -(p * F.log_softmax(logits, 1)).sum(1).mean()

@torch.no_grad()
def engine_init(enc, heads):
    # As the engine's models::stablerep::init_params: transformer matrices N(0, 0.02), biases 0,
    # LayerNorms 1 / 0, CLS and positions N(0, 0.02); the stem keeps PyTorch's defaults.
    enc.cls.normal_(0, .02); enc.pos.normal_(0, .02)
    for n, p in enc.b.named_parameters():
        if p.dim() >= 2: p.normal_(0, .02)
        elif 'n1' in n or 'n2' in n: p.fill_(1.0 if n.endswith('weight') else 0.0)
        else: p.zero_()
    for h in heads or []: h.weight.normal_(0, .01); h.bias.zero_()

def train(method, data, steps, views, cfg, seed):
    torch.manual_seed(seed); random.seed(seed)
    enc = CNN() if os.environ.get('ENC') == 'cnn' else ViT(p=cfg['patch'], d=cfg['width'], L=cfg['depth'], h=cfg['width'] // 32)
    if os.environ.get('ENC') == 'cnn': cfg = dict(cfg, width=128)
    if method == 'sup':
        hd = nn.ModuleList([nn.Linear(cfg['width'], 12), nn.Linear(cfg['width'], 8)])
    else: hd = headm(cfg['width'])
    if os.environ.get('INIT') == 'engine' and isinstance(enc, ViT): engine_init(enc, hd if method == 'sup' else None)
    named = list(enc.named_parameters()) + list(hd.named_parameters())
    if os.environ.get('WD') == 'engine':
        dec = [p for n, p in named if p.dim() >= 2]; nodec = [p for n, p in named if p.dim() < 2]
        groups = [dict(params=dec, weight_decay=0.1), dict(params=nodec, weight_decay=0.0)]
    else: groups = [dict(params=[p for _, p in named], weight_decay=0.1)]
    opt = torch.optim.AdamW(groups, lr=cfg['lr'], betas=(.9, .98))
    for t in range(steps):
        lr = cfg['lr'] * min((t + 1) / (steps / 10), 0.5 * (1 + math.cos(math.pi * t / steps)))
        for g in opt.param_groups: g['lr'] = lr
        if method == 'sup':
            X, Ys, Yc = data
            idx = torch.randint(len(X), (views,)); x = augment(X[idx], cfg['scale'], cfg['blur'], jit=False)
            f = enc(x); loss = F.cross_entropy(hd[0](f), Ys[idx]) + cfg['cw'] * F.cross_entropy(hd[1](f), Yc[idx])
        else:
            P = data  # [C, m, 3, H, W]
            C, m = P.shape[:2]
            if method == 'stablerep':
                mm = 4 if m >= 4 else m; n = views // mm; cs = torch.randperm(C)[:n]
                imgs = torch.stack([P[c, torch.randperm(m)[:mm]] for c in cs])  # n, mm
                x = imgs.transpose(0, 1).reshape(-1, *P.shape[2:]); lab = torch.arange(n).repeat(mm)
            else:
                n = views // 2; cs = torch.randperm(C)[:n]; j = torch.randint(m, (n,))
                im = P[cs, j]; x = torch.cat([im, im]); lab = torch.arange(n).repeat(2)
            x = augment(x, cfg['scale'], cfg['blur'])
            loss = mp_loss(hd(enc(x)), lab, float(os.environ.get('TAU', .1)))
        opt.zero_grad(); loss.backward(); opt.step()
    return enc, (float(loss.detach()) if steps else 0.0)

@torch.no_grad()
def feats(enc, X):
    enc.eval(); f = torch.cat([enc((X[i:i + 256] - MEAN) / STD) for i in range(0, len(X), 256)]); enc.train(); return f

def linear_probe(ftr, ytr, fte, yte):
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6; ftr = (ftr - mu) / sd; fte = (fte - mu) / sd
    best = 0
    for lr in [.01, .05, .1, .3]:
        torch.manual_seed(0); W = nn.Linear(ftr.shape[1], int(ytr.max()) + 1); o = torch.optim.SGD(W.parameters(), lr=lr, momentum=.9)
        for e in range(30):
            for i in torch.randperm(len(ftr)).split(64):
                l = F.cross_entropy(W(ftr[i]), ytr[i]); o.zero_grad(); l.backward(); o.step()
        best = max(best, (W(fte).argmax(1) == yte).float().mean().item())
    return best

def knn(ftr, ytr, fte, yte, k=20, T=.07):
    a = F.normalize(ftr, dim=1); b = F.normalize(fte, dim=1); s = b @ a.t(); v, i = s.topk(k, dim=1)
    w = (v / T).exp(); C = int(ytr.max()) + 1; votes = torch.zeros(len(b), C).scatter_add_(1, ytr[i], w)
    return (votes.argmax(1) == yte).float().mean().item()

def evaluate(enc, ev):
    r = {}
    for k, (Xtr, ytr, Xte, yte) in ev.items():
        a, b = feats(enc, Xtr), feats(enc, Xte); r[k] = round(100 * linear_probe(a, ytr, b, yte), 1); r[k + '_knn'] = round(100 * knn(a, ytr, b, yte), 1)
    return r

if __name__ == '__main__':
    steps = int(sys.argv[2]); which = sys.argv[3].split(','); seeds = [int(x) for x in sys.argv[4].split(',')]
    cfg = dict(patch=int(os.environ.get('PATCH', 4)), width=int(os.environ.get('WIDTH', 96)), depth=int(os.environ.get('DEPTH', 3)), lr=float(os.environ.get('LR', 1e-3)), cw=float(os.environ.get('CW', 1.0)),
               scale=(float(os.environ.get('SMIN', .35)), 1.0), blur=(0.1, float(os.environ.get('BLUR', .3))) if float(os.environ.get('BLUR', .3)) > 0 else None)
    views = int(os.environ.get('VIEWS', 32))
    oracle = load_pool(f"{R}/oracle", 4); real = load_pool(f"{R}/" + os.environ.get("REAL", "real"), 1)
    ev = {}
    for k in ['shape', 'colour']:
        tr = os.environ.get('SHAPE_TRAIN', 'shape-train') if k == 'shape' else f"{k}-train"  # SHAPE_TRAIN: a larger probe training set
        a, b = load_folder(f"{R}/{tr}"); c, d = load_folder(f"{R}/{k}-test"); ev[k] = (a, b, c, d)
    # supervised data: oracle images with labels from the eval folder names? use captions
    caps = [l.split(',', 1)[1].strip().strip('"') for l in open(f"{R}/oracle/captions.csv").read().strip().split("\n")]
    shapes = sorted(os.listdir(f"{R}/shape-train")); colours = sorted(os.listdir(f"{R}/colour-train"))
    ys = torch.tensor([shapes.index(c.split()[2]) for c in caps]); yc = torch.tensor([colours.index(c.split()[1]) for c in caps])
    X = oracle.reshape(-1, *oracle.shape[2:]); Ys = ys.repeat_interleave(4); Yc = yc.repeat_interleave(4)
    print(json.dumps(dict(cfg=str(cfg), views=views, steps=steps)), flush=True)
    for seed in seeds:
        for w in which:
            t = time.time()
            if w == 'sup': enc, l = train('sup', (X, Ys, Yc), steps, views, cfg, seed)
            elif w == 'simclr-real': enc, l = train('simclr', real, steps, views, cfg, seed)
            elif w == 'stablerep-oracle': enc, l = train('stablerep', oracle, steps, views, cfg, seed)
            elif w == 'simclr-oracle': enc, l = train('simclr', oracle, steps, views, cfg, seed)
            elif w == 'untrained': enc, l = train('simclr', real, 0, views, cfg, seed)
            r = evaluate(enc, ev); r.update(arm=w, seed=seed, loss=round(l, 3), s=round(time.time() - t))
            print(json.dumps(r), flush=True)
