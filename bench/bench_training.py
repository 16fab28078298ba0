#!/usr/bin/env python
"""ELPV reference protocol: from-scratch vs linear-probe vs partial vs full fine-tuning.

Protocol: ELPV (elpv-dataset, 2,624 cells), stratified 75/25 split by class x cell type
with seed 0, validation (10%) carved from the 75% train part; binary (defect
probability >= 0.5) and 4-class. Every run is a real ``defectscope train`` subprocess
(end-to-end time: imports, image checks, feature extraction, training, test
evaluation); metrics come from its report.json (test split, n=656).

Runs per task (default settings aim at ~10 CPU-minutes per fine-tuning run on 2 cores):
  probe-cold / probe-warm  linear probe, empty then warm feature cache (targets: < 120 s / < 20 s)
  partial                  3 head epochs on cached features + last 4 groups fine-tuned
  full                     3 head epochs on cached features + all groups fine-tuned
  scratch                  same architecture, random init, all groups trained
  tv-<name>                a torchvision backbone (full), only if its weights are cached locally

Usage (idle machine):
  python bench/bench_training.py                      # both tasks, all runs -> bench/results/training.json
  python bench/bench_training.py --tasks binary --runs probe,full
  python bench/bench_training.py --limit 40 --image-size 64 --epochs 1 --max-steps-per-epoch 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TV_CANDIDATES = ("resnet18", "efficientnet_b0", "mobilenet_v3_large", "resnet50")
TARGETS = {"binary": {"full": 0.92}, "4class": {"full": 0.80}}


def cached_torchvision_backbone() -> str | None:
    """First torchvision backbone whose ImageNet weights are in the local torch hub cache."""
    sys.path.insert(0, str(ROOT))
    from torchvision.models import get_weight

    from training.backbones import REGISTRY, hub_checkpoint_path

    for name in TV_CANDIDATES:
        url = get_weight(REGISTRY[name].weights_enum).url
        if hub_checkpoint_path(Path(url).name).is_file():
            return name
    return None


def run_train(args: list[str], env: dict[str, str], log_path: Path) -> tuple[int, float, float]:
    """(return code, wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(
            [sys.executable, "-m", "defectscope", "train", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return rc, wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="binary,4class")
    p.add_argument(
        "--runs",
        default="probe,partial,full,scratch,tv",
        help="comma-separated: probe (cold + warm), partial, full, scratch, tv",
    )
    p.add_argument("--image-size", type=int, default=224, help="input size (ELPV cells are 300 px; cracks are thin)")
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs of the full run")
    p.add_argument("--partial-epochs", type=int, default=8, help="(backward is cheaper: more epochs fit)")
    p.add_argument("--scratch-epochs", type=int, default=6)
    p.add_argument("--probe-epochs", type=int, default=60)
    p.add_argument("--head-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--balance", default="loss", choices=("loss", "sampler", "none"))
    p.add_argument("--monitor", default="auto", help="early-stopping metric passed to train (auto: macro-F1/AUROC)")
    p.add_argument("--lr", type=float, help="fine-tuning LR of the pretrained runs (default: train's)")
    p.add_argument(
        "--bn",
        default="auto",
        choices=("auto", "frozen", "adapt", "train"),
        help="BN statistics of the pretrained runs (train --bn; the scratch run keeps auto)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--limit", type=int, help="images per split (smoke runs)")
    p.add_argument("--max-steps-per-epoch", type=int, help="(smoke runs)")
    p.add_argument("--tv-backbone", help="torchvision backbone for the tv run (default: first cached)")
    p.add_argument("--work", help="run directories + feature cache (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "training.json"))
    a = p.parse_args(argv)

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ds-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    env = {
        **os.environ,
        "DEFECTSCOPE_CACHE": str(cache),
        "DEFECTSCOPE_THREADS": str(a.threads),
        "OMP_NUM_THREADS": str(a.threads),
        "PYTHONPATH": str(ROOT),
    }
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    tv = a.tv_backbone or (cached_torchvision_backbone() if "tv" in runs else None)
    if "tv" in runs and tv is None:
        print("tv: no torchvision weights cached under torch.hub.get_dir()/checkpoints; skipping")

    common = [
        "--data",
        "elpv",
        "--image-size",
        str(a.image_size),
        "--batch-size",
        str(a.batch_size),
        "--threads",
        str(a.threads),
        "--balance",
        a.balance,
        "--monitor",
        a.monitor,
        "--quiet",
        "--overwrite",
    ]
    if a.bn != "auto":
        common += ["--bn", a.bn]
    if a.limit:
        common += ["--limit", str(a.limit)]
    if a.max_steps_per_epoch:
        common += ["--max-steps-per-epoch", str(a.max_steps_per_epoch)]

    def plan(task: str) -> list[tuple[str, list[str]]]:
        out = []
        if "probe" in runs:
            probe = ["--strategy", "linear-probe", "--epochs", str(a.probe_epochs)]
            out += [("probe-cold", probe), ("probe-warm", probe)]
        if "partial" in runs:
            out.append(
                (
                    "partial",
                    [
                        "--strategy",
                        "partial",
                        "--unfreeze-groups",
                        "4",
                        "--head-epochs",
                        str(a.head_epochs),
                        "--epochs",
                        str(a.partial_epochs),
                    ],
                )
            )
        if "full" in runs:
            out.append(
                (
                    "full",
                    ["--strategy", "two-phase", "--head-epochs", str(a.head_epochs), "--epochs", str(a.epochs)]
                    + (["--lr", str(a.lr)] if a.lr else []),
                )
            )
        if "scratch" in runs:
            out.append(
                (
                    "scratch",
                    [
                        "--strategy",
                        "full",
                        "--weights",
                        "none",
                        "--head-epochs",
                        "0",
                        "--epochs",
                        str(a.scratch_epochs),
                        "--lr",
                        "3e-3",
                        "--lr-decay",
                        "1.0",
                        "--bn",
                        "auto",
                    ],
                )
            )
        if tv:
            out.append(
                (
                    f"tv-{tv}",
                    [
                        "--backbone",
                        tv,
                        "--strategy",
                        "two-phase",
                        "--head-epochs",
                        str(a.head_epochs),
                        "--epochs",
                        str(a.epochs),
                    ],
                )
            )
        return out

    results = []
    for task in [t.strip() for t in a.tasks.split(",") if t.strip()]:
        if "probe" in runs and cache.exists():
            shutil.rmtree(cache)  # cold: no features and no image-verification cache
        for name, extra in plan(task):
            run_dir = work / f"{task}-{name}"
            args = common + ["--labels", task, "--out", str(run_dir)] + extra
            print(f"[{task}] {name}: defectscope train {' '.join(args)}", flush=True)
            rc, wall, cpu = run_train(args, env, work / f"{task}-{name}.log")
            row = {"task": task, "run": name, "rc": rc, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "args": args}
            report = run_dir / "report.json"
            if rc == 0 and report.is_file():
                r = json.loads(report.read_text())
                row.update(
                    {
                        k: r.get(k)
                        for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "best_epoch", "epochs_run")
                    }
                )
                row["train_wall_s"] = round(r.get("wall_s", 0.0), 1)
            else:
                row["error"] = (work / f"{task}-{name}.log").read_text()[-2000:]
            results.append(row)
            print(f"    rc={rc} acc={row.get('accuracy')} wall={wall:.0f}s cpu={cpu:.0f}s", flush=True)

    print()
    hdr = f"{'task':<8}{'run':<22}{'acc':>7}{'bal.acc':>9}{'macroF1':>9}{'AUROC':>8}{'epochs':>8}{'wall s':>9}{'CPU s':>9}"
    print(hdr)
    print("-" * len(hdr))
    fmt = lambda v: "   n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for r in results:
        print(
            f"{r['task']:<8}{r['run']:<22}{fmt(r.get('accuracy')):>7}{fmt(r.get('balanced_accuracy')):>9}"
            f"{fmt(r.get('macro_f1')):>9}{fmt(r.get('auroc')):>8}{str(r.get('epochs_run', '-')):>8}"
            f"{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}" + ("" if r["rc"] == 0 else f"  FAILED rc={r['rc']}")
        )
    checks = []
    for r in results:
        target = TARGETS.get(r["task"], {}).get(r["run"])
        if target is not None and r.get("accuracy") is not None:
            checks.append(
                {
                    "what": f"{r['task']} {r['run']} accuracy >= {target}",
                    "value": r["accuracy"],
                    "ok": r["accuracy"] >= target,
                }
            )
        if r["run"] == "probe-cold":
            checks.append(
                {
                    "what": f"{r['task']} linear probe cold end-to-end < 120 s",
                    "value": r["wall_s"],
                    "ok": r["wall_s"] < 120,
                }
            )
        if r["run"] == "probe-warm":
            checks.append(
                {
                    "what": f"{r['task']} linear probe warm end-to-end < 20 s",
                    "value": r["wall_s"],
                    "ok": r["wall_s"] < 20,
                }
            )
    if checks:
        print()
        for c in checks:
            print(f"{'PASS' if c['ok'] else 'MISS'}  {c['what']}  ({c['value']})")
    import torch

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    smoke = bool(a.limit or a.max_steps_per_epoch)
    out.write_text(
        json.dumps(
            {
                "benchmark": "training",
                "protocol": "ELPV stratified 75/25 by class x cell type, seed 0; val 10% of train",
                "smoke": smoke,
                "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "threads": a.threads,
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "settings": {k: v for k, v in vars(a).items() if k not in ("out", "work")},
                "results": results,
                "checks": checks,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    if not a.keep and not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
