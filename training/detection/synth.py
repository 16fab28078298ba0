"""Benchmark data for detectors: synthetic defects with exact boxes on real ELPV solar cells.

No public defect-detection set with boxes can be downloaded on the project's machines,
so the benchmark composites synthetic defects (scratches, cracks, dark spots, finger
interruptions: dark in electroluminescence) onto the *functional* ELPV cells (defect
probability 0). The cells are real, the defects are synthetic. Cells are split
train/val/test first (seeded), so a cell never appears in two splits.

A defect is a darkening mask in [0, 1]; the image is ``cell * (1 - depth * mask)`` and
the box is the bounding box of ``mask > 0``, so every changed pixel lies inside a box
(exact by construction). Gray and BGR backgrounds work the same (per channel).

    python -m training.detection.synth --out /data/elpv-synth-det   # COCO JSON + PNGs

Writes ``images/<split>/*.png``, ``train.json``/``val.json``/``test.json`` (COCO, paths
relative to the JSON) and ``synth.json`` (settings). Never commit the output (ELPV is
CC BY-NC-SA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DEFECT_CLASSES = ("scratch", "crack", "dark_spot", "finger_interruption")
SPLITS = ("train", "val", "test")
MASK_FLOOR = 0.05  # mask values below this are cut to 0: a darkening under ~1 gray level is not drawn


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # of the background cells per split
    repeats: int = 1  # images per background cell
    negative_fraction: float = 0.3  # images without any defect (clean parts)
    max_defects: int = 3
    limit: int | None = None  # use at most this many background cells (smoke runs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"synth.fractions: expected 3 non-negative numbers summing to 1, got {self.fractions}")
        if not 0 <= self.negative_fraction < 1:
            raise ValueError(f"synth.negative_fraction: expected [0, 1), got {self.negative_fraction}")
        if self.max_defects < 1 or self.repeats < 1:
            raise ValueError("synth.max_defects and synth.repeats must be >= 1")


# -- defect renderers: (rng, h, w) -> float32 mask (H,W) in [0,1] and a depth --------------------
def _canvas(h: int, w: int) -> np.ndarray:
    return np.zeros((h, w), np.float32)


def _pts(p: np.ndarray) -> np.ndarray:
    """Points for cv2 with 4 fractional bits (sub-pixel anti-aliased lines)."""
    return np.round(p * 16).astype(np.int32).reshape(-1, 1, 2)


def scratch(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float]:
    """Thin, nearly straight line (1 px, slight bow), long."""
    m = _canvas(h, w)
    length = rng.uniform(0.15, 0.5) * min(h, w)
    a = rng.uniform(0, np.pi)
    c = rng.uniform([0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
    d = np.array([np.cos(a), np.sin(a)]) * length / 2
    bow = np.array([-d[1], d[0]]) / max(np.linalg.norm(d), 1e-6) * rng.uniform(-0.05, 0.05) * length
    t = np.linspace(-1, 1, 24)[:, None]
    pts = c + t * d + (1 - t**2) * bow
    cv2.polylines(m, [_pts(pts)], False, 1.0, 1, cv2.LINE_AA, shift=4)
    return m, float(rng.uniform(0.35, 0.6))


def crack(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float]:
    """Dark branching random walk, 1-2 px."""
    m = _canvas(h, w)
    thick = int(rng.integers(1, 3))

    def walk(p: np.ndarray, heading: float, steps: int) -> list[np.ndarray]:
        pts = [p]
        for _ in range(steps):
            heading += rng.normal(0, 0.35)
            p = np.clip(p + 4.0 * np.array([np.cos(heading), np.sin(heading)]), 0, [w - 1, h - 1])
            pts.append(p)
        return pts

    heading = rng.uniform(0, 2 * np.pi)
    main = walk(rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h]), heading, int(rng.integers(8, 20)))
    cv2.polylines(m, [_pts(np.array(main))], False, 1.0, thick, cv2.LINE_AA, shift=4)
    for _ in range(int(rng.integers(0, 3))):
        start = main[int(rng.integers(1, len(main)))]
        branch = walk(start, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), int(rng.integers(3, 8)))
        cv2.polylines(m, [_pts(np.array(branch))], False, 1.0, 1, cv2.LINE_AA, shift=4)
    return m, float(rng.uniform(0.5, 0.85))


def dark_spot(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float]:
    """Soft dark ellipse, 4-14 px radii."""
    m = _canvas(h, w)
    r = rng.uniform(4, 14, 2) * min(h, w) / 300
    r = np.maximum(r, 2.5)
    c = rng.uniform([r[0] + 2, r[1] + 2], [w - r[0] - 2, h - r[1] - 2])
    cv2.ellipse(
        m, (int(c[0]), int(c[1])), (int(r[0]), int(r[1])), float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA
    )
    m = cv2.GaussianBlur(m, (0, 0), float(max(r.min() / 3, 0.8)))
    return m / max(float(m.max()), 1e-6), float(rng.uniform(0.4, 0.8))


def finger_interruption(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float]:
    """Dark axis-aligned band along a finger (12-40 x 3-6 px at 300 px), soft edges."""
    m = _canvas(h, w)
    s = min(h, w) / 300
    long_, short = max(6.0, rng.uniform(12, 40) * s), max(2.0, rng.uniform(3, 6) * s)
    bw, bh = (long_, short) if rng.random() < 0.5 else (short, long_)
    x, y = rng.uniform(2, w - bw - 2), rng.uniform(2, h - bh - 2)
    cv2.rectangle(m, (int(x), int(y)), (int(x + bw), int(y + bh)), 1.0, -1)
    m = cv2.GaussianBlur(m, (0, 0), 0.8)
    return m, float(rng.uniform(0.3, 0.6))


RENDERERS: dict[str, Callable[[np.random.Generator, int, int], tuple[np.ndarray, float]]] = {
    "scratch": scratch,
    "crack": crack,
    "dark_spot": dark_spot,
    "finger_interruption": finger_interruption,
}


def mask_box(mask: np.ndarray) -> list[int] | None:
    """Pixel-edge xyxy of ``mask > 0``."""
    ys, xs = np.nonzero(mask > 0)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def composite(
    background: np.ndarray, rng: np.random.Generator, n_defects: int, max_tries: int = 50
) -> tuple[np.ndarray, list[list[int]], list[int]]:
    """uint8 gray/BGR cell -> (image, boxes xyxy, labels as DEFECT_CLASSES indices); boxes never touch."""
    h, w = background.shape[:2]
    dark = np.zeros((h, w), np.float32)  # total darkening fraction
    boxes: list[list[int]] = []
    labels: list[int] = []
    for _ in range(n_defects):
        cls = int(rng.integers(len(DEFECT_CLASSES)))
        for _ in range(max_tries):
            mask, depth = RENDERERS[DEFECT_CLASSES[cls]](rng, h, w)
            mask[mask < MASK_FLOOR] = 0
            box = mask_box(mask)
            if box is None or (box[2] - box[0]) * (box[3] - box[1]) < 6:
                continue
            if any(box[0] < b[2] + 2 and b[0] < box[2] + 2 and box[1] < b[3] + 2 and b[1] < box[3] + 2 for b in boxes):
                continue
            dark = np.maximum(dark, depth * mask)
            boxes.append(box)
            labels.append(cls)
            break
    keep, hit = 1.0 - dark, dark > 0
    if background.ndim == 3:
        keep, hit = keep[:, :, None], hit[:, :, None]
    out = np.where(hit, np.clip(background.astype(np.float32) * keep + 0.5, 0, 255), background).astype(np.uint8)
    return out, boxes, labels


# -- dataset ---------------------------------------------------------------------------------
def elpv_functional_cells() -> list[str]:
    """Paths of the ELPV cells graded functional (defect probability 0), sorted."""
    return sorted(p for paths in elpv_functional_cells_by_type().values() for p in paths)


def elpv_functional_cells_by_type() -> dict[str, list[str]]:
    """The functional ELPV cells by cell type (``mono`` / ``poly``), each list sorted."""
    from training.data import elpv_root

    root = elpv_root()
    out: dict[str, list[str]] = {}
    for line in (root / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and float(parts[1]) == 0.0:
            out.setdefault(parts[2], []).append(str(root / parts[0]))
    return {k: sorted(v) for k, v in out.items()}


def _load(source: str | np.ndarray) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    from runtime.inference.preprocess import read_image

    return read_image(source)


def generate(
    out: str | os.PathLike[str], sources: Sequence[str | np.ndarray], spec: SynthSpec = SynthSpec(), force: bool = False
) -> dict[str, Any]:
    """Write the dataset under ``out`` from background cells (paths or uint8 arrays); returns its summary."""
    from runtime.fsio import atomic_write_json
    from training.detection.formats import DetSample, write_coco

    out = Path(out)
    if (out / "train.json").exists() and not force:
        raise FileExistsError(f"{out}/train.json exists; pass --force to overwrite")
    src = list(sources)
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(src))[: spec.limit or len(src)]
    n = len(order)
    n_train, n_val = int(round(n * spec.fractions[0])), int(round(n * spec.fractions[1]))
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    summary: dict[str, Any] = {"spec": asdict(spec), "classes": list(DEFECT_CLASSES), "splits": {}}
    for si, split in enumerate(SPLITS):
        d = out / "images" / split
        d.mkdir(parents=True, exist_ok=True)
        samples, origins = [], []
        for j, k in enumerate(np.repeat(cuts[split], spec.repeats)):
            r = np.random.default_rng([spec.seed, si, j])  # per image: independent of the other images
            bg = _load(src[int(k)])
            n_def = 0 if r.random() < spec.negative_fraction else int(r.integers(1, spec.max_defects + 1))
            img, boxes, labels = composite(bg, r, n_def)
            path = d / f"{split}_{j:05d}.png"
            # Images are plain writes; the JSONs (atomic, written last) are what makes the set exist.
            if not cv2.imwrite(str(path), img):
                raise OSError(f"{path}: could not write the image")
            xyxy = tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes)
            samples.append(DetSample(str(path), img.shape[1], img.shape[0], xyxy, tuple(labels)))
            origin = src[int(k)]
            origins.append(Path(origin).name if isinstance(origin, str) else f"array:{int(k)}")
        coco = write_coco(samples, DEFECT_CLASSES, out)
        for im, origin in zip(coco["images"], origins):
            im["source_cell"] = origin
        atomic_write_json(out / f"{split}.json", coco)
        summary["splits"][split] = {
            "images": len(samples),
            "negatives": sum(s.negative for s in samples),
            "boxes": len(coco["annotations"]),
        }
    summary["note"] = "defects are synthetic; background cells are real ELPV cells (CC BY-NC-SA) when source=elpv"
    atomic_write_json(out / "synth.json", summary)
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m training.detection.synth", description=__doc__.split("\n")[0])
    d = SynthSpec()
    p.add_argument("--out", required=True, help="output folder (never commit it)")
    p.add_argument("--source", default="elpv", help="'elpv' (functional ELPV cells) or a folder of background images")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"images per cell (default {d.repeats})")
    p.add_argument(
        "--negatives",
        type=float,
        default=d.negative_fraction,
        help=f"fraction of clean images (default {d.negative_fraction})",
    )
    p.add_argument("--max-defects", type=int, default=d.max_defects)
    p.add_argument("--limit", type=int, default=None, help="use at most N cells (smoke runs)")
    p.add_argument("--force", action="store_true", help="overwrite an existing dataset in --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.source == "elpv":
        sources = elpv_functional_cells()
    else:
        from training.data import IMAGE_EXTENSIONS

        sources = sorted(str(p) for p in Path(args.source).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not sources:
            print(f"error: {args.source}: no images found", file=sys.stderr)
            return 2
    try:
        spec = SynthSpec(
            seed=args.seed,
            repeats=args.repeats,
            negative_fraction=args.negatives,
            max_defects=args.max_defects,
            limit=args.limit,
        )
        summary = generate(args.out, sources, spec, force=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary["splits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
