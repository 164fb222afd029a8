"""Recipe screening on a validation split of the TRAIN folder (the test folder is never read).

How the bundles' default recipes were chosen (bundles/alz_hybrid/docs/README.md, "Choosing the default"): each
candidate (network, image size, EMA, mixup, the plain loop itself) trains for the same CPU-time budget on 80 % of
``train/`` (``Training/``) and is scored on the other 20 % (stratified, seed 123, the same for every candidate).
The learning rate follows warm-up + cosine over the CPU-time budget. One JSON line per run is printed and
appended to ``--log``::

    OMP_NUM_THREADS=1 python benchmarks/screen_recipes.py --data ../shared/data/alzheimer_mri_4class --net r18h --ema 0.99
    OMP_NUM_THREADS=1 python benchmarks/screen_recipes.py --data ../shared/data/alzheimer_mri_4class --recipe plain

Networks: ``r18`` (MONAI ResNet-18), ``r18h`` (half width), ``r10h``, ``hyb`` (3 half-width stages + 2
transformer layers: the hybrid.json overlay), ``hyb4`` (4 stages), ``hyb64`` (full-width stages), ``hybold``
(the 0.1 default: bottleneck 3-4-6 + 4 layers). ``--aspect native`` resizes to 176 x 208 (the Alzheimer slices'
own size) instead of a square.
"""
import argparse, json, math, sys, time
from pathlib import Path
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.evaluation.metrics import evaluate_predictions
from pipelines.io.images import load_grey_2d

SUF = {".jpg", ".jpeg", ".png"}

def load(root, classes, size, aspect):
    X, Y = [], []
    for k, c in enumerate(classes):
        for p in sorted(q for q in (root / c).iterdir() if q.suffix.lower() in SUF):
            a = load_grey_2d(p)
            lo, hi = np.percentile(a, [0.5, 99.5]) if aspect != "plain" else (a.min(), a.max())
            a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
            if aspect == "pad":  # keep aspect, longer side -> size, pad to square
                s = size / max(t.shape[-2:])
                h, w = round(t.shape[-2] * s), round(t.shape[-1] * s)
                t = F.interpolate(t, size=(h, w), mode="area")
                t = F.pad(t, ((size - w) // 2, size - w - (size - w) // 2, (size - h) // 2, size - h - (size - h) // 2))
            elif aspect == "native":
                t = F.interpolate(t, size=tuple(size_native), mode="area")
            else:
                t = F.interpolate(t, size=(size, size), mode="area" if aspect != "plain" else "bilinear", align_corners=None if aspect != "plain" else False)
            X.append(t[0]); Y.append(k)
    return torch.stack(X), torch.tensor(Y)

def batch_aug(x, g, rot=0.15, scale=0.1, trans=0.06, flip_dim=-2, gamma=True):
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(flip_dim), x)
    th = (torch.rand(n, generator=g) * 2 - 1) * rot
    sc = 1 + (torch.rand(n, generator=g) * 2 - 1) * scale
    tr = (torch.rand(n, 2, generator=g) * 2 - 1) * trans * 2
    A = torch.zeros(n, 2, 3)
    A[:, 0, 0] = torch.cos(th) / sc; A[:, 0, 1] = -torch.sin(th) / sc
    A[:, 1, 0] = torch.sin(th) / sc; A[:, 1, 1] = torch.cos(th) / sc
    A[:, :, 2] = tr
    grid = F.affine_grid(A, x.shape, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if gamma:
        gm = torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(1.25))
        x = x.clamp_min(0) ** gm[:, None, None, None]
        x = x * (1 + (torch.rand(n, generator=g)[:, None, None, None] - 0.5) * 0.2)
    return x

def build(name, nc, size):
    from monai.networks.nets import resnet18, ResNet
    if name == "r18":
        return resnet18(spatial_dims=2, n_input_channels=1, num_classes=nc, conv1_t_stride=2)
    if name == "r18h":
        return ResNet("basic", [2, 2, 2, 2], [32, 64, 128, 256], spatial_dims=2, n_input_channels=1, num_classes=nc, conv1_t_stride=2)
    if name == "r10h":
        return ResNet("basic", [1, 1, 1, 1], [32, 64, 128, 256], spatial_dims=2, n_input_channels=1, num_classes=nc, conv1_t_stride=2)
    if name.startswith("hyb"):
        from pipelines.networks.hybrid import CNNViTHybrid
        cfg = dict(hyb=dict(cnn_block="basic", cnn_layers=[2, 2, 2], cnn_inplanes=[32, 64, 128], hidden_size=128, num_layers=2, num_heads=4, mlp_dim=256),
                   hyb64=dict(cnn_block="basic", cnn_layers=[2, 2, 2], cnn_inplanes=[64, 128, 256], hidden_size=192, num_layers=2, num_heads=6, mlp_dim=384),
                   hyb4=dict(cnn_block="basic", cnn_layers=[2, 2, 2, 2], cnn_inplanes=[32, 64, 128, 256], hidden_size=128, num_layers=2, num_heads=4, mlp_dim=256),
                   hybold=dict(cnn_block="bottleneck", cnn_layers=[3, 4, 6], cnn_inplanes=[32, 64, 128], hidden_size=192, num_layers=4, num_heads=6, mlp_dim=384))[name]
        return CNNViTHybrid(1, nc, img_size=size, dropout=0.1, save_attn=False, **cfg)
    raise ValueError(name)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--net", default="r18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--aspect", default="square")
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--recipe", default="ours")  # plain | ours
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--ls", type=float, default=0.1)
    ap.add_argument("--balanced", type=int, default=1)
    ap.add_argument("--mixup", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--log", default="screen_recipes.jsonl", help="append each result line here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    root = Path(a.data)
    tr = root / ("train" if (root / "train").is_dir() else "Training")
    classes = sorted(p.name for p in tr.iterdir() if p.is_dir())
    X, Y = load(tr, classes, a.size, "plain" if a.recipe == "plain" else a.aspect)
    # stratified 80/20 validation split of the TRAIN folder (seed 123, fixed across recipes)
    rng = np.random.default_rng(123)
    val = np.zeros(len(Y), bool)
    for k in range(len(classes)):
        idx = np.flatnonzero(Y.numpy() == k); rng.shuffle(idx); val[idx[: max(1, round(0.2 * len(idx)))]] = True
    xt, yt, xv, yv = X[~val], Y[~val], X[val], Y[val]
    net = build(a.net, len(classes), a.size)
    g = torch.Generator().manual_seed(a.seed)
    if a.recipe == "plain":
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    else:
        decay = [p for n, p in net.named_parameters() if p.ndim > 1]
        nodecay = [p for n, p in net.named_parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0.0}], lr=a.lr)
    ema = None
    if a.ema > 0:
        from pipelines.training.ema import ModelEMA
        ema = ModelEMA(net, a.ema)
    counts = torch.bincount(yt, minlength=len(classes)).double()
    budget = a.budget * 60
    cpu0, ep, step = time.process_time(), 0, 0
    while time.process_time() - cpu0 < budget:
        net.train()
        if a.recipe != "plain" and a.balanced:
            order = torch.multinomial((1.0 / counts)[yt], len(yt), replacement=True, generator=g)
        else:
            order = torch.randperm(len(yt), generator=g)
        tot = 0.0
        nb = len(order) // a.bs if a.recipe != "plain" else math.ceil(len(order) / a.bs)
        for i in range(nb):
            idx = order[i * a.bs:(i + 1) * a.bs]
            x, y = xt[idx], yt[idx]
            if a.recipe == "plain":
                flip = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                loss = F.cross_entropy(net(x), y)
            else:
                frac = (time.process_time() - cpu0) / budget
                warm = 0.05
                lr = a.lr * (frac / warm if frac < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm)))))
                for pg in opt.param_groups: pg["lr"] = lr
                x = batch_aug(x, g)
                if a.mixup > 0 and torch.rand(1, generator=g).item() < 0.5:
                    lam = float(np.random.default_rng(step).beta(a.mixup, a.mixup))
                    perm = torch.randperm(len(idx), generator=g)
                    x = lam * x + (1 - lam) * x[perm]
                    out = net(x)
                    loss = lam * F.cross_entropy(out, y, label_smoothing=a.ls) + (1 - lam) * F.cross_entropy(out, y[perm], label_smoothing=a.ls)
                else:
                    loss = F.cross_entropy(net(x), y, label_smoothing=a.ls)
            opt.zero_grad(); loss.backward(); opt.step(); step += 1
            if ema is not None: ema.update(net)
            tot += loss.item() * len(idx)
        ep += 1
    cpu = time.process_time() - cpu0
    model = ema.module if ema is not None else net
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(xv[i:i + 64]).softmax(1) for i in range(0, len(yv), 64)]).numpy()
    r = evaluate_predictions(yv.numpy(), probs, classes, n_resamples=200, seed=0)
    m = r["metrics"]
    line = dict(tag=a.tag or f"{a.recipe}-{a.net}-{a.size}-{a.aspect}", epochs=ep, steps=step, cpu_min=round(cpu / 60, 2),
                img_s=round(step * a.bs / cpu, 1), acc=round(m["accuracy"], 3), f1=round(m["macro_f1"], 3), auc=round(m["macro_auc"], 3),
                args=vars(a))
    print(json.dumps(line), flush=True)
    with open(a.log, "a") as f: f.write(json.dumps(line) + "\n")

size_native = (176, 208)
if __name__ == "__main__":
    main()
