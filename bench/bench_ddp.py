#!/usr/bin/env python
"""Training throughput of 1 vs N data-parallel processes (torchrun, DDP): images/s per epoch.

Every row is a real ``defectscope train`` subprocess (``--nproc-per-node N``; N=1 runs plain)
on the same data, global batch and seed. Throughput = training images per epoch / the epoch's
training pass (``train_s`` in metrics.json: no validation, no start-up), median over the
fine-tuning epochs after the first. On this 2-core CPU, 2 gloo processes are expected near 1x
(they share the cores); on a GPU node pass ``--device cuda --nprocs 1,2,4,8``.

Usage (idle machine):
  python bench/bench_ddp.py --nprocs 1,2                         # synthetic parts, tiny_cnn, CPU
  python bench/bench_ddp.py --data elpv --backbone efficientnet_lite0 --weights imagenet \\
      --image-size 224 --batch-size 64 --epochs 3 --device cuda --nprocs 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_data(root: Path, per_class: int, size: int) -> Path:
    """Two-class ImageFolder of noise textures with/without a bright crack (as the tests use)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for cls in ("ok", "defect"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(110, 18, (size, size)).clip(0, 255).astype(np.uint8)
            if cls == "defect":
                p = int(rng.integers(4, size - 7))
                img[p : p + 3, :] = 235
            cv2.imwrite(str(root / cls / f"{cls}_{i:04d}.png"), img)
    return root


def run_one(args: argparse.Namespace, data: str, nproc: int, work: Path) -> dict:
    out = work / f"run-n{nproc}"
    cmd = [sys.executable, "-m", "defectscope", "train", "--data", data, "--out", str(out), "--overwrite",
           "--backbone", args.backbone, "--weights", args.weights, "--batch-size", str(args.batch_size),
           "--strategy", "full", "--head-epochs", "0", "--epochs", str(args.epochs), "--patience", "99",
           "--device", args.device, "--threads", str(args.threads), "--quiet", "--seed", "0"]  # fmt: skip
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    if args.max_steps:
        cmd += ["--max-steps-per-epoch", str(args.max_steps)]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nexited {p.returncode}:\n{p.stderr[-2000:]}")
    history = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / "report.json").read_text())
    n_train = sum(report["data"]["counts"]["train"])
    steps = -(-n_train // args.batch_size)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    images = min(n_train, steps * args.batch_size)
    rates = [images / h["train_s"] for h in history if h.get("train_s")]
    timed = rates[1:] if len(rates) > 1 else rates  # the first epoch pays one-off warm-up
    ips = statistics.median(timed)
    return {"nproc": nproc, "images_per_s": ips, "images_per_s_per_proc": ips / nproc, "epochs": len(history),
            "train_images_per_epoch": images, "wall_s": wall, "test_accuracy": report.get("accuracy")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nprocs", default="1,2", help="process counts to compare (1,2)")
    ap.add_argument("--data", help="'elpv', a folder or a CSV (default: synthetic parts in --work)")
    ap.add_argument("--images-per-class", type=int, default=200, help="synthetic data size (200)")
    ap.add_argument("--backbone", default="tiny_cnn")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch (32), as --batch-size of train")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, help="cap steps per epoch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--work", default="/tmp/bench-ddp")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ddp.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DEFECTSCOPE_CACHE", str(work / "cache"))
    data = args.data or str(synthetic_data(work / "parts", args.images_per_class, max(32, args.image_size)))
    rows = [run_one(args, data, int(n), work) for n in args.nprocs.split(",")]
    base = rows[0]["images_per_s"]
    print(f"{'processes':>9} {'images/s':>10} {'per proc':>10} {'speedup':>8} {'wall s':>8}")
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
        print(f"{r['nproc']:>9} {r['images_per_s']:>10.1f} {r['images_per_s_per_proc']:>10.1f} "
              f"{r['speedup']:>7.2f}x {r['wall_s']:>8.1f}")  # fmt: skip
    result = {"config": vars(args), "data": data, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
