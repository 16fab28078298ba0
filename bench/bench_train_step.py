#!/usr/bin/env python
"""Seconds per CPU training step of efficientnet_lite0, with and without inlined symmetric padding.

The TF port pads every conv with a separate ZeroPad2d; ``training.backbones`` folds the
symmetric (stride-1) ones into the conv. This times a batch through the model both ways:
a full fine-tuning step, a step with only the last 4 layer groups trainable (as
``--strategy partial``), and an eval forward. BN statistics frozen, channels_last, AdamW.
Median of ``--steps`` after one warm-up, the two variants interleaved ``--rounds`` times.

Usage (idle machine): python bench/bench_train_step.py --size 300 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_variant(inline: bool, size: int, batch: int, steps: int) -> dict[str, float]:
    import torch

    import training.backbone_lite as lite  # Lite0Body calls the pad folding from here
    import training.backbones as bb

    real = lite.inline_symmetric_padding
    if not inline:
        lite.inline_symmetric_padding = lambda root: 0
    try:
        model = bb.build_model(
            "efficientnet_lite0", 2, "imagenet", input_spec=bb.sized_input(bb.get_spec("efficientnet_lite0"), size)
        )
    finally:
        lite.inline_symmetric_padding = real
    model.freeze_bn_stats = True
    model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)  # (N,3,H,W)
    y = torch.randint(0, 2, (batch,))
    out = {}
    for name, groups in (("full", None), ("last4", 4)):
        model.set_trainable(groups)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
        ts = []
        for _ in range(steps + 1):
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts[1:])
    model.eval()
    ts = []
    with torch.no_grad():
        for _ in range(steps + 1):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    out["eval"] = statistics.median(ts[1:])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/train-step.json"))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    runs: dict[str, list[dict[str, float]]] = {"ZeroPad2d + conv": [], "inlined padding": []}
    for _ in range(a.rounds):
        runs["ZeroPad2d + conv"].append(time_variant(False, a.size, a.batch, a.steps))
        runs["inlined padding"].append(time_variant(True, a.size, a.batch, a.steps))
    best = {k: {m: min(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    print(f"\nefficientnet_lite0, {a.size} px, batch {a.batch}, {a.threads} threads: seconds per step (best round)")
    print("| variant | full fine-tuning step | last 4 groups step | eval forward |")
    print("| --- | --- | --- | --- |")
    for k, v in best.items():
        print(f"| {k} | {v['full']:.3f} | {v['last4']:.3f} | {v['eval']:.3f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "best": best, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
