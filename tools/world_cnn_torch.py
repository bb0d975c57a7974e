"""PyTorch reference: the judge's CNN (GroupNorm + SiLU, 32-64-96-128, mean pool) on renders
written by `stablerep world --world simple --size 32`, scored on R/shape-test every 100 steps
(docs/world.md, "Why the head weights"). R holds a pool (POOL, default oracle: 216 captions x
M=4 images; "big": 4,096 x 4), shape-test/ and shape-train/, colour-train/ (--labelled; only
the class names of the last two are read). Settings by environment: STEPS (600), LR (2e-3),
SCHED (const or cos: 10 % warmup then cosine), HEADS (1: shape; 2: plus a colour head of
weight CW), CROP (smallest crop scale, 0.5). Run from the repository root:
    POOL=big HEADS=2 CW=0.1 SCHED=cos STEPS=900 python tools/world_cnn_torch.py R
Not part of the build or CI."""
import sys, os, math
R = sys.argv[1]
sys.argv = ['x', R]
exec(open(os.path.join(os.path.dirname(__file__), 'world_reference_torch.py')).read().split("if __name__")[0])
torch.set_num_threads(1)
E = os.environ
# CNN: the judge's encoder, defined in world_reference_torch.py (executed above).
pool = E.get("POOL", "oracle"); m = int(E.get("M", "4"))
oracle = load_pool(f"{R}/{pool}", m)
caps = [l.split(',', 1)[1].strip() for l in open(f"{R}/{pool}/captions.csv").read().strip().split("\n")]
shapes = sorted(os.listdir(f"{R}/shape-train")); colours = sorted(os.listdir(f"{R}/colour-train"))
ys = torch.tensor([shapes.index(c.split()[2]) for c in caps]).repeat_interleave(m)
yc = torch.tensor([colours.index(c.split()[1]) for c in caps]).repeat_interleave(m)
X = oracle.reshape(-1, 3, 32, 32)
te, yte = load_folder(f"{R}/shape-test")
steps = int(E.get("STEPS", "600")); lr0 = float(E.get("LR", "2e-3")); sched = E.get("SCHED", "const"); heads = int(E.get("HEADS", "1"))
lo = float(E.get("CROP", "0.5"))
torch.manual_seed(0); random.seed(0)
m_ = CNN(); h = nn.Linear(128, 6); hc = nn.Linear(128, 8)
opt = torch.optim.AdamW(list(m_.parameters()) + list(h.parameters()) + list(hc.parameters()), lr=lr0, weight_decay=0.05)
for t in range(steps):
    if sched == "cos":
        w = steps // 10
        lr = lr0 * (t + 1) / w if t < w else lr0 * 0.5 * (1 + math.cos(math.pi * (t - w) / (steps - w)))
        for g in opt.param_groups: g['lr'] = lr
    idx = torch.randint(len(X), (64,)); x = augment(X[idx], (lo, 1), None, jit=False)
    f = m_(x)
    loss = F.cross_entropy(h(f), ys[idx])
    if heads > 1: loss = loss + float(E.get("CW", "1")) * F.cross_entropy(hc(f), yc[idx])
    opt.zero_grad(); loss.backward(); opt.step()
    if t % 100 == 99:
        with torch.no_grad(): m_.eval(); acc = (h(m_((te - MEAN) / STD)).argmax(1) == yte).float().mean().item(); m_.train()
        print(t + 1, round(loss.item(), 3), round(acc, 3), flush=True)
