"""PyTorch reference: the judge's CNN (GroupNorm + SiLU, 32-64-96-128, mean pool) trained on shape
alone on the 864 renders of R/oracle (see tools/world_reference_torch.py for R), scored on
R/shape-test every 100 steps (docs/world.md: 82 % after 600 steps). Run from the repository
root: python tools/world_cnn_torch.py R. Not part of the build or CI."""
import sys, os
R = sys.argv[1]
sys.argv = ['x', R]
exec(open(os.path.join(os.path.dirname(__file__), 'world_reference_torch.py')).read().split("if __name__")[0])
torch.set_num_threads(1)
class CNN(nn.Module):
    def __init__(s, ch=(32, 64, 96, 128)):
        super().__init__(); L = []; c = 3
        for i, o in enumerate(ch): L += [nn.Conv2d(c, o, 3, 1 if i == 0 else 2, 1), nn.GroupNorm(8, o), nn.SiLU()]; c = o
        s.f = nn.Sequential(*L)
    def forward(s, x): return s.f(x).mean((2, 3))
oracle = load_pool(f"{R}/oracle", 4)
caps = [l.split(',', 1)[1].strip() for l in open(f"{R}/oracle/captions.csv").read().strip().split("\n")]
shapes = sorted(os.listdir(f"{R}/shape-train")); colours = sorted(os.listdir(f"{R}/colour-train"))
ys = torch.tensor([shapes.index(c.split()[2]) for c in caps]).repeat_interleave(4)
X = oracle.reshape(-1, 3, 32, 32)
te, yte = load_folder(f"{R}/shape-test")
for lr in [2e-3]:
    torch.manual_seed(0); random.seed(0)
    m = CNN(); h = nn.Linear(128, 6); opt = torch.optim.AdamW(list(m.parameters()) + list(h.parameters()), lr=lr, weight_decay=0.05)
    for t in range(600):
        idx = torch.randint(len(X), (64,)); x = augment(X[idx], (0.5, 1), None, jit=False)
        loss = F.cross_entropy(h(m(x)), ys[idx]); opt.zero_grad(); loss.backward(); opt.step()
        if t % 100 == 99:
            with torch.no_grad(): m.eval(); acc = (h(m((te - MEAN) / STD)).argmax(1) == yte).float().mean().item(); m.train()
            print(t + 1, round(loss.item(), 3), round(acc, 3), flush=True)
