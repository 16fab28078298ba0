#!/usr/bin/env python
"""EWC on detectors: forgetting of a new product line, naive fine-tuning vs EWC (issue 16 target: <= half).

Line A = synthetic defects (training.detection.synth) on the functional monocrystalline ELPV cells,
line B = the same four defect classes on the polycrystalline cells (a new product line, same classes).
With ``--base RUN`` an existing detector is line A (its own test split is the old test set) and
line B is the same defects on other functional cells seen through another camera (``--camera``:
gamma 0.6 and a 3x3 blur, as a second station's EL camera would differ).
A Faster R-CNN is trained on line A (or taken from --base), then extended to line B with
`defectscope extend` three ways:
naive fine-tuning (--lambda 0), EWC (the default lambda), EWC + replay. Forgetting = line-A test
mAP@.5 before - after, in points (training.detection.extend's report). The defects are synthetic; the
cells are real (ELPV, CC BY-NC-SA: never commit the data). Prints a table and writes JSON.

Usage (one at a time, idle machine; ~40 min on 2 cores at the defaults):
    python bench/bench_detection_ewc.py --out runs/bench-det-ewc
    python bench/bench_detection_ewc.py --out /tmp/det-ewc-smoke --smoke      # seconds, tiny_det
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_RATIO = 0.5  # EWC forgetting <= this x naive forgetting
TINY = [
    "--weights",
    "none",
    "--representation-size",
    "64",
    "--fpn-channels",
    "16",
    "--rpn-pre-nms-train",
    "200",
    "--rpn-post-nms-train",
    "100",
    "--box-batch-size-per-image",
    "64",
    "--quiet",
    "--panels",
    "1",
]


def _camera_cells(out: Path, skip: set[str], n: int, only: set[str] | None = None) -> list[Any]:
    """Functional cells not in ``skip`` (and in ``only`` when given), as another camera sees them:
    gamma 0.6, 3x3 blur (uint8)."""
    import cv2
    import numpy as np

    from runtime.inference.preprocess import read_image
    from training.detection.synth import elpv_functional_cells

    lut = (255.0 * (np.arange(256) / 255.0) ** 0.6).astype(np.uint8)
    cells = [p for p in elpv_functional_cells() if Path(p).name not in skip and (only is None or Path(p).name in only)]
    if not cells:
        raise SystemExit("no functional cells left for line B: line A used them all; pass --line-b-cells train")
    cells = cells[-n:]
    return [cv2.blur(cv2.LUT(read_image(p), lut), (3, 3)) for p in cells]


def _data(ns: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    from training.detection.synth import SynthSpec, generate

    a, b = out / "line-a", out / "line-b"
    if ns.base:
        used: dict[str, set[str]] = {}
        data_json = Path(json.loads((Path(ns.base) / "model.json").read_text())["data"]["path"])
        for split in ("train", "val", "test"):
            f = data_json.parent / f"{split}.json"
            if f.is_file():
                used[split] = {im.get("source_cell", "") for im in json.loads(f.read_text())["images"]}
        if not (b / "train.json").is_file():
            if ns.line_b_cells == "train":
                # Line A's training cells with new defects through the other camera: line A's val/test
                # cells stay unseen, so the old test set still measures forgetting.
                skip, only = used.get("val", set()) | used.get("test", set()), used.get("train", set())
            else:
                skip, only = set().union(*used.values()), None
            generate(b, _camera_cells(out, skip, ns.cells, only), SynthSpec(seed=1))
        return data_json.parent, b
    if ns.smoke:
        import numpy as np

        rng = np.random.default_rng(0)
        src_a: list[Any] = [rng.normal(90, 8, (80, 80)).clip(0, 255).astype(np.uint8) for _ in range(14)]
        src_b: list[Any] = [rng.normal(170, 20, (80, 80)).clip(0, 255).astype(np.uint8) for _ in range(14)]
    else:
        from training.detection.synth import elpv_functional_cells_by_type

        cells = elpv_functional_cells_by_type()
        src_a, src_b = cells["mono"], cells["poly"]
    for d, src, seed in ((a, src_a, 0), (b, src_b, 1)):
        if not (d / "train.json").is_file():
            generate(d, src, SynthSpec(seed=seed, limit=ns.cells))
    return a, b


def _run(name: str, argv: list[str]) -> None:
    from defectscope.cli import resolve

    rc = resolve(name)(argv)
    if rc:
        raise SystemExit(f"`defectscope {name} {' '.join(argv)}` failed with exit code {rc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench-det-ewc")
    p.add_argument("--cells", type=int, default=160, help="cells per line (default 160)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--base-epochs", type=int, default=5)
    p.add_argument("--extend-epochs", type=int, default=3)
    p.add_argument("--lambdas", default="0,default", help="extend lambdas: numbers or 'default' (comma list)")
    p.add_argument("--replay", default="10%", help="replay share for the EWC + replay run ('' = skip)")
    p.add_argument(
        "--ewc-scopes",
        default="default",
        help="EWC runs per scope: 'default' or extend's --ewc-scope values (comma list; naive runs once)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--base", help="an existing detector run as line A (skip base training); line B = other cells, another camera"
    )
    p.add_argument(
        "--line-b-cells",
        choices=("unused", "train"),
        default="unused",
        help="with --base: line B on cells line A never used, or on line A's training cells (when A "
        "used them all; its val/test cells stay unseen)",
    )
    p.add_argument("--seeds", default="0", help="extension seeds (comma list): order, augmentation, replay pick")
    p.add_argument("--smoke", action="store_true")
    ns = p.parse_args(argv)
    if ns.smoke:
        ns.backbone, ns.size, ns.base_epochs, ns.extend_epochs, ns.cells = "tiny_det", 64, 1, 1, 14
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    a, b = _data(ns, out)
    common = [
        "--backbone",
        ns.backbone,
        "--image-size",
        f"{ns.size},{ns.size}",
        "--threads",
        str(ns.threads),
        *(TINY if ns.smoke else ["--quiet"]),
    ]
    base = Path(ns.base) if ns.base else out / "base"
    t0 = time.perf_counter()
    if not (base / "best.safetensors").is_file():
        _run(
            "train",
            [
                "--data",
                str(a / "train.json"),
                "--out",
                str(base),
                "--overwrite",
                "--epochs",
                str(ns.base_epochs),
                *common,
                *(["--max-steps-per-epoch", "2"] if ns.smoke else []),
            ],
        )
    base_s = time.perf_counter() - t0
    runs: list[tuple[str, list[str]]] = []
    for lam in ns.lambdas.split(","):
        lam_args = [] if lam == "default" else ["--lambda", lam]
        for scope in ["default"] if float(lam if lam != "default" else 1) == 0 else ns.ewc_scopes.split(","):
            scoped = [] if scope == "default" else ["--ewc-scope", scope]
            runs.append((f"lambda={lam}" + (f" scope={scope}" if scoped else ""), lam_args + scoped))
    if ns.replay:
        runs.append((f"lambda=default+replay {ns.replay}", ["--replay", ns.replay]))
    seeds = [int(x) for x in ns.seeds.split(",") if x.strip()]
    rows = []
    for seed in seeds:
        for label, extra in runs:
            slug = label.replace("=", "").replace(" ", "-").replace("%", "pct").replace("+", "-")
            dest = out / (f"extend-{slug}" + (f"-s{seed}" if len(seeds) > 1 else ""))
            t0 = time.perf_counter()
            if not (dest / "report.json").is_file():
                smoke = ["--max-steps-per-epoch", "2"] if ns.smoke else []
                _run(
                    "extend",
                    [
                        "--from",
                        str(base),
                        "--data",
                        str(b / "train.json"),
                        "--out",
                        str(dest),
                        "--overwrite",
                        "--epochs",
                        str(ns.extend_epochs),
                        "--threads",
                        str(ns.threads),
                        "--seed",
                        str(seed),
                        "--quiet",
                        *smoke,
                        *extra,
                    ],
                )
            rep = json.loads((dest / "report.json").read_text())
            rows.append(
                {
                    "run": label,
                    "seed": seed,
                    "seconds": time.perf_counter() - t0,
                    "forgetting_map50": rep["forgetting_map50"],
                    "before": rep["before"],
                    "after": rep["after"],
                    "lambda": rep.get("lambda"),
                }
            )
    lines = (
        f"line A = {base}, line B = {ns.cells} {'of its training' if ns.line_b_cells == 'train' else 'other'} cells through another camera"
        if ns.base
        else f"line A = mono cells, line B = poly cells ({ns.cells} cells each); base {ns.base_epochs} epochs"
    )
    print(f"\n{ns.backbone} @ {ns.size}px; {lines}; extends {ns.extend_epochs} epochs; seeds {seeds}")
    summary = summarize(rows, [label for label, _ in runs])
    print(f"{'run':32} {'old mAP@.5 after':>18} {'forgetting (pts)':>18} {'new mAP@.5 after':>18} {'vs naive':>8}")
    for r in summary:
        ratio = r["forgetting_vs_naive"]
        print(
            f"{r['run']:32} {_ms(r['old_after'], 4):>18} {_ms(r['forgetting_points'], 2):>18} "
            f"{_ms(r['new_after'], 4):>18} {'' if ratio is None else f'{ratio:.2f}x':>8}"
        )
    # The target is the product default's (extend's lambda and scope, mean over seeds); the other
    # lambdas/scopes and EWC + replay are reported beside it.
    from training.detection.extend import DEFAULT_EWC_SCOPE, DEFAULT_LAMBDA

    defaults = {"lambda=default", f"lambda=default scope={DEFAULT_EWC_SCOPE}"}
    ewc = [r for r in summary if r["run"] in defaults and r["forgetting_vs_naive"] is not None]
    passed = bool(ewc) and all(r["forgetting_vs_naive"] <= TARGET_RATIO for r in ewc)
    print(
        f"target: EWC at extend's defaults (lambda {DEFAULT_LAMBDA:g}, scope {DEFAULT_EWC_SCOPE}) forgets <= "
        f"{TARGET_RATIO} x naive (means over seeds) -> {'PASS' if passed else 'FAIL'}"
    )
    from runtime.fsio import atomic_write_json

    atomic_write_json(
        out / "bench_detection_ewc.json",
        {
            "settings": vars(ns),
            "base_seconds": base_s,
            "runs": rows,
            "summary": summary,
            "target_ratio": TARGET_RATIO,
            "pass": passed,
        },
    )
    print(f"-> {out / 'bench_detection_ewc.json'}")
    return 0


def summarize(rows: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per run label over seeds: mean and sample sd of old/new mAP@.5 after and forgetting (points)."""
    import statistics

    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

    out = []
    for label in labels:
        rs = [r for r in rows if r["run"] == label]
        out.append(
            {
                "run": label,
                "seeds": [r["seed"] for r in rs],
                "forgetting_points": ms([100.0 * r["forgetting_map50"] for r in rs]),
                "old_after": ms([r["after"]["old"]["map50"] for r in rs]),
                "new_after": ms([r["after"]["new"]["map50"] for r in rs]),
                "old_before": rs[0]["before"]["old"]["map50"],
                "new_before": rs[0]["before"]["new"]["map50"],
            }
        )
    naive = next((r for r in out if r["run"] == "lambda=0"), None)
    for r in out:
        f0 = naive["forgetting_points"]["mean"] if naive else 0.0
        r["forgetting_vs_naive"] = r["forgetting_points"]["mean"] / f0 if naive and f0 > 0 and r is not naive else None
    return out


def _ms(x: dict[str, float], digits: int) -> str:
    return f"{x['mean']:.{digits}f} ± {x['sd']:.{digits}f}" if x["n"] > 1 else f"{x['mean']:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
