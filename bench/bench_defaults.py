"""Training levers on/off on two benchmarks side by side: which defaults help on BOTH (issue 27).

Each lever (training/ema.py, copy-paste, multi-scale, gradual unfreezing, the data plan, a longer
schedule with early stopping, the COCO start; classifiers: EMA, TrivialAugment, RandAugment,
MixUp+CutMix, the plan) is one training run per benchmark with everything else at today's
defaults, against a baseline run with nothing changed. Benchmarks: ``elpv`` (detection: synthetic
defects on real ELPV cells; classification: the ELPV cells) and ``surfaces`` (the project's
procedural second benchmark, training.detection.surfaces). A lever "helps both" when it raises
the held-out score over the baseline on both. Prints a table, writes JSON.

Full (one at a time, idle machine; hours):
    python bench/bench_defaults.py --task detection --out runs/bench-defaults-det --threads 2
    python bench/bench_defaults.py --task classification --out runs/bench-defaults-cls --threads 2
Smoke (seconds; tiny models on tiny generated data, numbers mean nothing):
    python bench/bench_defaults.py --task detection --smoke --out /tmp/bench-defaults
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCHMARKS = ("elpv", "surfaces")
COCO_BACKBONE = "fasterrcnn_mobilenet_v3_large_320_fpn"

# lever -> (DetTrainConfig keys, model keys, augment keys); every run starts from today's defaults.
DET_LEVERS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "baseline": ({}, {}, {}),
    "ema": ({"ema": 0.999}, {}, {}),
    "copy_paste": ({}, {}, {"copy_paste": 0.5}),
    "multiscale": ({}, {}, {"multiscale": (0.8, 0.9, 1.0, 1.1, 1.2)}),
    "freeze_trunk": ({"freeze_trunk_epochs": 2}, {}, {}),
    "plan": ({"plan": "auto"}, {}, {}),
    "long_early_stop": ({"epochs_x": 2, "patience": 4}, {}, {}),
    "coco": ({}, {"backbone": COCO_BACKBONE, "det_init": "coco"}, {}),
}
# lever -> (TrainConfig keys, augment keys)
CLS_LEVERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "baseline": ({}, {}),
    "ema": ({"ema": 0.999}, {}),
    "trivial_augment": ({}, {"policy": "trivial"}),
    "rand_augment": ({}, {"policy": "rand"}),
    "mixup_cutmix": ({}, {"mixup": 0.2, "cutmix": 1.0}),
    "plan": ({"plan": "auto"}, {}),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("detection", "classification"), default="detection")
    p.add_argument("--levers", help="comma-separated subset (default: all of the task's)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    p.add_argument("--data-root", default="/tmp/bench-defaults-data", help="generated sets (made when missing)")
    p.add_argument("--epochs", type=int, help="override the default epochs (all runs alike)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-defaults")
    p.add_argument("--json", help="result JSON (default <out>/bench_defaults.json)")
    p.add_argument("--smoke", action="store_true", help="tiny models and data: checks the plumbing only")
    return p.parse_args(argv)


# -- data -----------------------------------------------------------------------------------
def detection_data(bench: str, root: Path, smoke: bool) -> Path:
    """train.json of the benchmark's detection set (generated when missing)."""
    d = root / f"{bench}-det{'-smoke' if smoke else ''}"
    if (d / "train.json").is_file():
        return d / "train.json"
    d.mkdir(parents=True, exist_ok=True)
    if bench == "surfaces":
        from training.detection.surfaces import SurfaceSpec, generate_detection

        generate_detection(d, SurfaceSpec(images=24 if smoke else 400))
    else:
        from training.detection.synth import SynthSpec, elpv_functional_cells, generate

        if smoke:
            import numpy as np

            rng = np.random.default_rng(0)
            sources: list[Any] = [rng.normal(120, 10, (96, 96)).clip(0, 255).astype(np.uint8) for _ in range(12)]
        else:
            sources = list(elpv_functional_cells())
        generate(d, sources, SynthSpec(seed=0))
    return d / "train.json"


def classification_data(bench: str, root: Path, smoke: bool) -> dict[str, Any]:
    """DataSpec keys of the benchmark's classification set."""
    if bench == "elpv" and not smoke:
        return {"source": "elpv"}
    d = root / f"{bench}-cls{'-smoke' if smoke else ''}"
    if not d.is_dir():
        from training.detection.surfaces import SurfaceSpec, generate_classification

        # Smoke: a second seed of the tiny surfaces set stands in for ELPV (no package data read).
        generate_classification(d, SurfaceSpec(images=6 if smoke else 80, seed=1 if bench == "elpv" else 0))
    return {"source": "folder", "path": str(d)}


# -- runs -----------------------------------------------------------------------------------
def detection_run(ns: argparse.Namespace, bench: str, lever: str, out: Path) -> dict[str, Any]:
    from training.detection.config import DetTrainConfig
    from training.detection.datasets import DetectionSpec
    from training.detection.trainer import train_detector
    from training.detection.transforms import AugmentSpec

    run_kw, model, aug = (dict(x) for x in DET_LEVERS[lever])
    base_epochs = ns.epochs or (1 if ns.smoke else DetTrainConfig.__dataclass_fields__["epochs"].default)
    run_kw["epochs"] = base_epochs * run_kw.pop("epochs_x", 1)
    if ns.smoke:
        model = {"weights": "none", "image_size": (64, 64), "fpn_channels": 16, "representation_size": 64, **model}
        model.setdefault("backbone", "tiny_det")
        if model["backbone"] != "tiny_det":
            model["image_size"] = (64, 64)
        run_kw.update(max_steps_per_epoch=2)
        if lever == "coco":  # no COCO file on a smoke machine: a random start exercises the path
            model.update(det_init="backbone")
    cfg = DetTrainConfig(
        DetectionSpec(str(detection_data(bench, Path(ns.data_root), ns.smoke))),
        model=model,
        augment=AugmentSpec(**aug),
        threads=ns.threads,
        seed=ns.seed,
        out=str(out),
        panels=0,
        **run_kw,
    )
    t0 = time.perf_counter()
    r = train_detector(cfg, overwrite=True, echo=print)
    return {"score": r["map50"], "map": r["map"], "train_s": time.perf_counter() - t0, "epochs_run": r["epochs_run"]}


def classification_run(ns: argparse.Namespace, bench: str, lever: str, out: Path) -> dict[str, Any]:
    from training.classification.config import AugmentConfig, TrainConfig
    from training.classification.data import DataSpec
    from training.classification.trainer import train

    kw, aug = (dict(x) for x in CLS_LEVERS[lever])
    if ns.epochs:
        kw["epochs"] = ns.epochs
    if ns.smoke:
        kw.update(backbone="tiny_cnn", weights="none", image_size=32, epochs=1, head_epochs=1, max_steps_per_epoch=2)
        if lever == "plan":
            kw.pop("image_size")
    cfg = TrainConfig(
        out=str(out),
        data=DataSpec(**classification_data(bench, Path(ns.data_root), ns.smoke)),
        augment=AugmentConfig(**aug),
        threads=ns.threads,
        seed=ns.seed,
        **kw,
    )
    t0 = time.perf_counter()
    r = train(cfg, overwrite=True, progress=False, echo=print).report
    return {"score": r.get("macro_f1"), "train_s": time.perf_counter() - t0, "epochs_run": r.get("epochs_run")}


def run_all(ns: argparse.Namespace) -> dict[str, Any]:
    levers_all = DET_LEVERS if ns.task == "detection" else CLS_LEVERS
    levers = ns.levers.split(",") if ns.levers else list(levers_all)
    unknown = [x for x in levers if x not in levers_all]
    if unknown:
        raise SystemExit(f"--levers: unknown {unknown}; available: {list(levers_all)}")
    if "baseline" not in levers:
        levers = ["baseline", *levers]
    benches = ns.benchmarks.split(",")
    fn: Callable[..., dict[str, Any]] = detection_run if ns.task == "detection" else classification_run
    rows: list[dict[str, Any]] = []
    for lever in levers:
        for bench in benches:
            try:
                res = fn(ns, bench, lever, Path(ns.out) / f"{bench}-{lever}")
            except Exception as exc:  # a lever that cannot run (e.g. COCO weights absent) is reported, not fatal
                res = {"score": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            rows.append({"lever": lever, "benchmark": bench, **res})
    base = {r["benchmark"]: r["score"] for r in rows if r["lever"] == "baseline"}
    for r in rows:
        b = base.get(r["benchmark"])
        r["delta"] = None if r["score"] is None or b is None else r["score"] - b
    verdict = {}
    for lever in levers:
        ds = [r["delta"] for r in rows if r["lever"] == lever]
        verdict[lever] = lever != "baseline" and all(d is not None and d > 0 for d in ds) and len(ds) == len(benches)
    return {
        "task": ns.task,
        "metric": "mAP@.5 (test)" if ns.task == "detection" else "macro-F1 (test)",
        "benchmarks": benches,
        "threads": ns.threads,
        "seed": ns.seed,
        "smoke": ns.smoke,
        "rows": rows,
        "helps_both": verdict,
    }


def table(res: dict[str, Any]) -> str:
    benches = res["benchmarks"]
    cells = {(r["lever"], r["benchmark"]): r for r in res["rows"]}
    levers = list(dict.fromkeys(r["lever"] for r in res["rows"]))

    def cell(r: dict[str, Any]) -> str:
        if r.get("score") is None:
            return "error"
        d = "" if r["lever"] == "baseline" else f" ({r['delta']:+.3f})"
        return f"{r['score']:.3f}{d} {r['train_s']:.0f}s"

    head = f"{'lever':<16}" + "".join(f"{b:>26}" for b in benches) + "  helps both"
    lines = [f"{res['task']}: {res['metric']}{' [smoke]' if res['smoke'] else ''}", head]
    for lv in levers:
        row = f"{lv:<16}" + "".join(f"{cell(cells[(lv, b)]):>26}" for b in benches)
        lines.append(row + ("  yes" if res["helps_both"][lv] else ("" if lv == "baseline" else "  no")))
    errs = [f"  {r['lever']}/{r['benchmark']}: {r['error']}" for r in res["rows"] if r.get("error")]
    return "\n".join(lines + (["errors:", *errs] if errs else []))


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    import torch

    torch.set_num_threads(ns.threads)
    res = run_all(ns)
    from runtime.fsio import atomic_write_json

    out = Path(ns.json) if ns.json else Path(ns.out) / "bench_defaults.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    print(table(res))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
