#!/usr/bin/env python
"""EWC on detectors: extend's default (``--lambda auto``) vs naive fine-tuning on pairs of lines (issue 31).

Each pair is line A -> line B with the same defect classes. A Faster R-CNN is trained on line A (or
taken from --base), then extended to line B with `defectscope extend` at its defaults and with
``--lambda 0`` (naive), plus any other --lambdas / --replay runs. Pairs (``--pair``, repeatable):

- ``elpv``: synthetic defects (training.detection.synth) on the functional monocrystalline ELPV
  cells -> the same defects on the polycrystalline cells.
- ``camera`` (needs --base): line A = the --base run's data; line B = the same defects on other
  functional cells seen through another camera (gamma 0.6, 3x3 blur).
- ``surfaces``: the second benchmark's generator (training.detection.surfaces), the same four
  classes on brushed metal + wood grain (line A) -> woven fabric + painted plastic (line B),
  ``--surface-images`` per line (seeds 0 and 1): a pair the ELPV generator did not make.
- ``[NAME=]coco:A.json,B.json``: any two COCO sets (train.json, val.json/test.json beside): the
  pair not made by the ELPV generator (e.g. the second benchmark generator's lines).

Forgetting = line-A test mAP@.5 before - after, in points (training.detection.extend's report).
Targets per pair (means over seeds): default mean of old/new mAP@.5 >= naive's; where naive forgets
> 2 points, default forgetting <= 1/2 naive's with new-line mAP@.5 within 3 points of naive's.
ELPV cells are CC BY-NC-SA: never commit the data. Prints a table per pair and writes JSON.

Usage (one at a time, idle machine; ~40 min per pair on 2 cores at the defaults):
    python bench/bench_detection_ewc.py --out runs/bench-det-ewc --pair elpv \\
        --pair other=coco:/data/other-a/train.json,/data/other-b/train.json
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

# Issue 31's targets (points of mAP@.5 as fractions).
FORGET_TOL = 0.02  # naive "forgets" above this
TARGET_RATIO = 0.5  # then default forgetting <= this x naive's
NEW_TOL = 0.03  # ... with new-line mAP@.5 within this of naive's
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


def _noise_cells(mean: float, sd: float, seed: int, n: int = 14) -> list[Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.normal(mean, sd, (80, 80)).clip(0, 255).astype(np.uint8) for _ in range(n)]


def _camera_pair(ns: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """Line A = the --base run's data; line B = other functional cells through another camera."""
    from training.detection.synth import SynthSpec, generate

    if not ns.base:
        raise SystemExit("--pair camera needs --base RUN (line A = that run's data)")
    b = out / "line-b"
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


def _generated_pair(ns: argparse.Namespace, out: Path, src_a: list[Any], src_b: list[Any]) -> tuple[Path, Path]:
    from training.detection.synth import SynthSpec, generate

    a, b = out / "line-a", out / "line-b"
    for d, src, seed in ((a, src_a, 0), (b, src_b, 1)):
        if not (d / "train.json").is_file():
            generate(d, src, SynthSpec(seed=seed, limit=ns.cells))
    return a, b


SURFACE_LINES = (("brushed_metal", "wood_grain"), ("woven_fabric", "painted_plastic"))


def _surfaces_pair(ns: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    from training.detection.surfaces import SurfaceSpec, generate_detection

    a, b = out / "line-a", out / "line-b"
    for d, surfaces, seed in ((a, SURFACE_LINES[0], 0), (b, SURFACE_LINES[1], 1)):
        if not (d / "train.json").is_file():
            generate_detection(d, SurfaceSpec(images=ns.surface_images, seed=seed, surfaces=surfaces))
    return a, b


def _pair_data(pair: str, ns: argparse.Namespace, out: Path) -> tuple[str, Path, Path]:
    """``(name, line A folder, line B folder)`` of a --pair spec (see the module docstring)."""
    name, _, spec = pair.rpartition("=")
    if spec.startswith("coco:"):
        parts = [Path(x) for x in spec[5:].split(",") if x.strip()]
        if len(parts) != 2 or not all(x.is_file() for x in parts):
            raise SystemExit(f"--pair {pair}: expected coco:A/train.json,B/train.json (two existing files)")
        return name or f"{parts[0].parent.name}->{parts[1].parent.name}", parts[0].parent, parts[1].parent
    if spec == "camera":
        return name or "camera", *_camera_pair(ns, out)
    if spec == "surfaces":
        return name or "surfaces", *_surfaces_pair(ns, out)
    if spec != "elpv":
        raise SystemExit(f"--pair {pair}: expected elpv, camera, surfaces or [NAME=]coco:A.json,B.json")
    if ns.smoke:
        return name or "elpv", *_generated_pair(ns, out, _noise_cells(90, 8, 0), _noise_cells(170, 20, 1))
    from training.detection.synth import elpv_functional_cells_by_type

    cells = elpv_functional_cells_by_type()
    return name or "elpv", *_generated_pair(ns, out, cells["mono"], cells["poly"])


def _run(name: str, argv: list[str]) -> None:
    from defectscope.cli import resolve

    rc = resolve(name)(argv)
    if rc:
        raise SystemExit(f"`defectscope {name} {' '.join(argv)}` failed with exit code {rc}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[1])
    p.add_argument("--out", default="runs/bench-det-ewc")
    p.add_argument(
        "--pair",
        action="append",
        help="a pair of lines: elpv | camera | surfaces | [NAME=]coco:A/train.json,B/train.json (repeatable; "
        "default: elpv, or camera with --base; --smoke: elpv + a coco pair it generates)",
    )
    p.add_argument("--cells", type=int, default=160, help="cells per generated line (default 160)")
    p.add_argument("--surface-images", type=int, default=400, help="images per line of the surfaces pair (70/15/15)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--base-epochs", type=int, default=5)
    p.add_argument("--extend-epochs", type=int, default=3)
    p.add_argument(
        "--lambdas", default="default,0", help="extend lambdas: numbers, 'auto' or 'default' (extend's) (comma list)"
    )
    p.add_argument("--replay", default="", help="replay share for an extra default + replay run ('' = skip)")
    p.add_argument(
        "--ewc-scopes",
        default="default",
        help="EWC runs per scope: 'default' or extend's --ewc-scope values (comma list; naive runs once)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", help="an existing detector run as line A of the camera pair (skips its base training)")
    p.add_argument(
        "--line-b-cells",
        choices=("unused", "train"),
        default="unused",
        help="camera pair: line B on cells line A never used, or on line A's training cells (when A "
        "used them all; its val/test cells stay unseen)",
    )
    p.add_argument("--seeds", default="0", help="extension seeds (comma list): order, augmentation, replay pick")
    p.add_argument("--smoke", action="store_true")
    return p


def _runs(ns: argparse.Namespace) -> list[tuple[str, list[str]]]:
    runs: list[tuple[str, list[str]]] = []
    for lam in ns.lambdas.split(","):
        lam_args = [] if lam == "default" else ["--lambda", lam]
        naive = lam not in ("default", "auto") and float(lam) == 0
        for scope in ["default"] if naive else ns.ewc_scopes.split(","):
            scoped = [] if scope == "default" else ["--ewc-scope", scope]
            runs.append((f"lambda={lam}" + (f" scope={scope}" if scoped else ""), lam_args + scoped))
    if ns.replay:
        runs.append((f"lambda=default+replay {ns.replay}", ["--replay", ns.replay]))
    return runs


def _smoke_coco_pair(ns: argparse.Namespace, out: Path) -> str:
    """A second generated pair on other backgrounds, given as a coco: pair (exercises that path)."""
    a, b = _generated_pair(ns, out / "smoke-coco", _noise_cells(60, 30, 2), _noise_cells(120, 5, 3))
    return f"smoke-coco=coco:{a / 'train.json'},{b / 'train.json'}"


def run_pair(pair: str, ns: argparse.Namespace, out: Path, seeds: list[int]) -> dict[str, Any]:
    """Base training (unless given) and every extension of one pair; its rows, summary and targets."""
    name, a, b = _pair_data(pair, ns, out)
    common = [
        "--backbone",
        ns.backbone,
        "--image-size",
        f"{ns.size},{ns.size}",
        "--threads",
        str(ns.threads),
        *(TINY if ns.smoke else ["--quiet"]),
    ]
    smoke = ["--max-steps-per-epoch", "2"] if ns.smoke else []
    base = Path(ns.base) if ns.base and pair.endswith("camera") else out / "base"
    t0 = time.perf_counter()
    if not (base / "best.safetensors").is_file():
        argv = ["--data", str(a / "train.json"), "--out", str(base), "--overwrite", "--epochs", str(ns.base_epochs)]
        _run("train", [*argv, *common, *smoke])
    base_s = time.perf_counter() - t0
    runs, rows = _runs(ns), []
    for seed in seeds:
        for label, extra in runs:
            slug = label.replace("=", "").replace(" ", "-").replace("%", "pct").replace("+", "-")
            dest = out / (f"extend-{slug}" + (f"-s{seed}" if len(seeds) > 1 else ""))
            t0 = time.perf_counter()
            if not (dest / "report.json").is_file():
                argv = ["--from", str(base), "--data", str(b / "train.json"), "--out", str(dest), "--overwrite"]
                argv += ["--epochs", str(ns.extend_epochs), "--threads", str(ns.threads), "--seed", str(seed)]
                _run("extend", [*argv, "--quiet", *smoke, *extra])
            rep = json.loads((dest / "report.json").read_text())
            rows.append(
                {
                    "run": label,
                    "seed": seed,
                    "seconds": time.perf_counter() - t0,
                    "search_seconds": rep.get("search_s"),
                    "forgetting_map50": rep["forgetting_map50"],
                    "before": rep["before"],
                    "after": rep["after"],
                    "lambda": rep.get("lambda"),
                    "lambda_mode": rep.get("lambda_mode"),
                    "lambda_search": rep.get("lambda_search"),
                }
            )
    summary = summarize(rows, [label for label, _ in runs])
    return {
        "pair": name,
        "line_a": str(a),
        "line_b": str(b),
        "base": str(base),
        "base_seconds": base_s,
        "runs": rows,
        "summary": summary,
        "targets": targets(summary),
    }


def targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 31's targets for the default row against the naive row (means over seeds)."""
    d = next((r for r in summary if r["run"] == "lambda=default"), None)
    n = next((r for r in summary if r["run"] == "lambda=0"), None)
    if d is None or n is None:
        return {"checked": False, "why": "needs the lambda=default and lambda=0 runs"}
    mean_ok = d["mean_after"]["mean"] >= n["mean_after"]["mean"] - 1e-9
    f_naive, f_def = n["forgetting_points"]["mean"] / 100, d["forgetting_points"]["mean"] / 100
    forgets = f_naive > FORGET_TOL
    retain_ok = (not forgets) or (
        f_def <= TARGET_RATIO * f_naive and d["new_after"]["mean"] >= n["new_after"]["mean"] - NEW_TOL
    )
    return {
        "checked": True,
        "mean_ge_naive": mean_ok,
        "naive_forgets": forgets,
        "retention": retain_ok,
        "pass": mean_ok and retain_ok,
    }


def _arrow(before: float | None, after: dict[str, float]) -> str:
    return f"{'n/a' if before is None else f'{before:.3f}'} -> {_ms(after, 3)}"


def print_pair(res: dict[str, Any]) -> None:
    """The issue's table: method | old line before -> after | new line before -> after | mean."""
    print(f"\npair {res['pair']}: line A {res['line_a']} -> line B {res['line_b']}")
    print(
        "| method | old line mAP@.5 (before -> after) | new line mAP@.5 (before -> after) | mean "
        "| forgetting (pts) | lambda |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in res["summary"]:
        lam = ",".join(sorted({f"{x:g}" for x in r["lambdas"]}))
        label = {"lambda=default": "default (`--lambda auto`)", "lambda=0": "naive (`--lambda 0`)"}.get(
            r["run"], r["run"]
        )
        print(
            f"| {label} | {_arrow(r['old_before'], r['old_after'])} | {_arrow(r['new_before'], r['new_after'])} | "
            f"{_ms(r['mean_after'], 3)} | {_ms(r['forgetting_points'], 2)} | {lam} |"
        )
    t = res["targets"]
    if t["checked"]:
        print(
            f"targets: mean >= naive {'yes' if t['mean_ge_naive'] else 'NO'}; naive forgets > "
            f"{100 * FORGET_TOL:g} points: {'yes' if t['naive_forgets'] else 'no'}"
            + (
                f"; forgetting <= {TARGET_RATIO}x naive, new within {100 * NEW_TOL:g}: {'yes' if t['retention'] else 'NO'}"
                if t["naive_forgets"]
                else ""
            )
            + f" -> {'PASS' if t['pass'] else 'FAIL'}"
        )


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.smoke:
        ns.backbone, ns.size, ns.base_epochs, ns.extend_epochs, ns.cells = "tiny_det", 64, 1, 1, 14
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = ns.pair or (["elpv", _smoke_coco_pair(ns, out)] if ns.smoke else ["camera" if ns.base else "elpv"])
    seeds = [int(x) for x in ns.seeds.split(",") if x.strip()]
    results = []
    for pair in pairs:
        name = pair.rpartition("=")[0] or pair.split(":")[0]
        results.append(run_pair(pair, ns, out / name.replace("/", "_"), seeds))
    print(f"\n{ns.backbone} @ {ns.size}px; base {ns.base_epochs} epochs, extends {ns.extend_epochs}; seeds {seeds}")
    for res in results:
        print_pair(res)
    passed = all(r["targets"].get("pass", False) for r in results)
    from runtime.fsio import atomic_write_json

    atomic_write_json(
        out / "bench_detection_ewc.json",
        {
            "settings": vars(ns),
            "pairs": results,
            "targets": {"forget_tol": FORGET_TOL, "ratio": TARGET_RATIO, "new_tol": NEW_TOL},
            "pass": passed,
        },
    )
    print(f"all pairs: {'PASS' if passed else 'FAIL'} -> {out / 'bench_detection_ewc.json'}")
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
                "mean_after": ms([(r["after"]["old"]["map50"] + r["after"]["new"]["map50"]) / 2 for r in rs]),
                "lambdas": [r["lambda"] for r in rs],
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
