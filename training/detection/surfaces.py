"""A second benchmark, not from the ELPV generator: procedural surfaces with procedural defects.

Project-generated, seeded, no downloads (numpy + OpenCV noise). Four surfaces: brushed metal,
wood grain, woven fabric, painted plastic (RGB, image sizes 256x256, 240x320 and 320x240).
Four defect classes of other shapes and sizes than the ELPV set's: ``scratch`` (thin, long, any
angle, bright or dark), ``dent`` (a lit/shadowed elliptical bowl), ``stain`` (a soft irregular
colour blot, large), ``hole`` (a small dark disc with a bright rim). A defect is a mask in [0, 1]
blended into the surface; its box is the bounding box of ``mask >= MASK_FLOOR``, so every changed
pixel lies inside a box (exact by construction).

    python -m training.detection.surfaces --out /data/surfaces-det                   # COCO JSON + PNGs
    python -m training.detection.surfaces --out /data/surfaces-cls --task classification  # ImageFolder

Detection: ``images/<split>/*.png``, ``train.json``/``val.json``/``test.json`` (COCO, paths relative
to the JSON), ``surfaces.json`` (settings). Classification: ``<split>/<class>/*.png`` with five
classes (``ok`` and the four defects, one defect per image). What it does not prove: the data come
from the project's own generator, like the ELPV set's defects; a default tuned on both still has
to carry over to real photographs of real parts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

DEFECT_CLASSES = ("scratch", "dent", "stain", "hole")
SURFACES = ("brushed_metal", "wood_grain", "woven_fabric", "painted_plastic")
SIZES = ((256, 256), (240, 320), (320, 240))  # (H, W)
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
MASK_FLOOR = 0.05


@dataclass(frozen=True)
class SurfaceSpec:
    images: int = 400  # detection images over all splits; classification: per class
    seed: int = 0
    max_defects: int = 3  # per detection image (0..max; about one in six images is clean)
    # A product line's surfaces: two lines on different surfaces with the same classes make an
    # EWC pair (``extend``) whose line B is new to line A's model.
    surfaces: tuple[str, ...] = SURFACES

    def __post_init__(self) -> None:
        unknown = [s for s in self.surfaces if s not in SURFACES]
        if unknown or not self.surfaces:
            raise ValueError(f"surfaces: expected some of {list(SURFACES)}, got {list(self.surfaces)}")


def _noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a cells x cells random grid upsampled bicubically."""
    small = rng.random((cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def brushed_metal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    streaks = cv2.blur(rng.random((h, w)).astype(np.float32), (int(rng.integers(25, 60)), 1))
    base = 0.55 + 0.25 * (streaks - 0.5) * 4 + 0.1 * (_noise(rng, h, w, 3) - 0.5)
    tint = np.array([1.0, 1.0, 1.03], np.float32) * rng.uniform(0.85, 1.05)
    return np.clip(base[..., None] * tint, 0, 1)


def wood_grain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = 25 * (_noise(rng, h, w, 4) - 0.5)
    rings = 0.5 + 0.5 * np.sin((y + warp) * rng.uniform(0.08, 0.2) + 3 * _noise(rng, h, w, 6))
    light = 0.45 + 0.3 * rings + 0.08 * (rng.random((h, w)).astype(np.float32) - 0.5)
    brown = np.array([0.35, 0.55, 0.8], np.float32)  # BGR
    return np.clip(light[..., None] * brown * rng.uniform(0.9, 1.2), 0, 1)


def woven_fabric(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    p = rng.uniform(5, 9)
    warp, weft = np.sin(2 * np.pi * x / p), np.sin(2 * np.pi * y / p)
    over = np.where(((x // p).astype(int) + (y // p).astype(int)) % 2 == 0, warp, weft)
    light = 0.5 + 0.15 * over + 0.1 * (_noise(rng, h, w, 8) - 0.5)
    colour = rng.uniform(0.3, 0.9, 3).astype(np.float32)
    return np.clip(light[..., None] * colour * 1.3, 0, 1)


def painted_plastic(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    peel = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 1.2)
    light = 0.7 + 0.1 * (_noise(rng, h, w, 3) - 0.5) + 0.12 * (peel - 0.5)
    colour = rng.uniform(0.2, 0.95, 3).astype(np.float32)
    return np.clip(light[..., None] * colour, 0, 1)


SURFACE_FNS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "brushed_metal": brushed_metal,
    "wood_grain": wood_grain,
    "woven_fabric": woven_fabric,
    "painted_plastic": painted_plastic,
}


# A defect: (mask in [0, 1] (H, W), target colour BGR (3,) or per-pixel (H, W, 3)); the image becomes
# image * (1 - mask) + target * mask.
Defect = tuple[np.ndarray, np.ndarray]


def scratch(rng: np.random.Generator, img: np.ndarray) -> Defect:
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    length = rng.uniform(0.25, 0.7) * min(h, w)
    a = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
    p0, p1 = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
    cv2.line(mask, p0, p1, 1.0, int(rng.integers(1, 3)), cv2.LINE_AA)
    tone = rng.choice([0.05, 0.95])
    return mask * rng.uniform(0.6, 0.9), np.full(3, tone, np.float32)


def dent(rng: np.random.Generator, img: np.ndarray) -> Defect:
    h, w = img.shape[:2]
    r = rng.uniform(0.06, 0.14) * min(h, w)
    ax, ay = r, r * rng.uniform(0.6, 1.0)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = ((x - cx) * np.cos(a) + (y - cy) * np.sin(a)) / ax
    v = (-(x - cx) * np.sin(a) + (y - cy) * np.cos(a)) / ay
    d = np.clip(1 - (u**2 + v**2), 0, 1)
    mask = np.where(d > 0, 0.6 * d**0.5, 0).astype(np.float32)
    shade = 0.5 + 0.45 * np.clip(u, -1, 1)  # lit on one side, shadowed on the other
    target = np.clip(img * (shade[..., None] * 1.2), 0, 1)
    return mask, target


def stain(rng: np.random.Generator, img: np.ndarray) -> Defect:
    h, w = img.shape[:2]
    r = rng.uniform(0.12, 0.25) * min(h, w)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    blob = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(3, 7))):
        c = (int(cx + rng.normal(0, r / 3)), int(cy + rng.normal(0, r / 3)))
        ax = (int(r * rng.uniform(0.3, 0.6)), int(r * rng.uniform(0.3, 0.6)))
        cv2.ellipse(blob, c, ax, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    soft = cv2.GaussianBlur(blob, (0, 0), r / 6)
    mask = np.clip(soft, 0, 1) * rng.uniform(0.35, 0.6)
    colour = rng.choice([np.array([0.1, 0.25, 0.35]), np.array([0.45, 0.4, 0.2]), np.array([0.2, 0.2, 0.2])])
    return mask.astype(np.float32), colour.astype(np.float32)


def hole(rng: np.random.Generator, img: np.ndarray) -> Defect:
    h, w = img.shape[:2]
    r = rng.uniform(2.5, 6.0)
    cx, cy = rng.uniform(r + 3, w - r - 3), rng.uniform(r + 3, h - r - 3)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    core = np.clip(r - d + 0.5, 0, 1)
    rim = np.clip(1 - np.abs(d - r - 1.2), 0, 1) * 0.7
    mask = np.maximum(core, rim).astype(np.float32)
    target = np.where((core >= rim)[..., None], 0.03, 0.95).astype(np.float32) * np.ones(3, np.float32)
    return mask, target


DEFECT_FNS: dict[str, Callable[[np.random.Generator, np.ndarray], Defect]] = {
    "scratch": scratch,
    "dent": dent,
    "stain": stain,
    "hole": hole,
}


def mask_box(mask: np.ndarray) -> list[int] | None:
    """Pixel-edge xyxy box of ``mask >= MASK_FLOOR`` (None when nothing is left)."""
    ys, xs = np.nonzero(mask >= MASK_FLOOR)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def render(
    rng: np.random.Generator, surface: str, size: tuple[int, int], defects: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, list[int]]]]:
    """(clean float image, uint8 BGR image with defects, [(class, box)]); masks below the floor are cut."""
    h, w = size
    clean = SURFACE_FNS[surface](rng, h, w).astype(np.float32)
    img = clean.copy()
    boxes: list[tuple[str, list[int]]] = []
    taken = np.zeros((h, w), bool)
    for name in defects:
        for _ in range(5):  # a place that does not touch an earlier defect's box
            mask, target = DEFECT_FNS[name](rng, img)
            mask = np.where(mask >= MASK_FLOOR, mask, 0).astype(np.float32)
            box = mask_box(mask)
            if box is None or taken[box[1] : box[3], box[0] : box[2]].any():
                continue
            img = (img * (1 - mask[..., None]) + target * mask[..., None]).astype(np.float32)
            taken[box[1] : box[3], box[0] : box[2]] = True
            boxes.append((name, box))
            break
    return clean, (np.clip(img, 0, 1) * 255).round().astype(np.uint8), boxes


def _split_of(i: int, n: int) -> str:
    edge = 0.0
    for name, share in SPLITS:
        edge += share
        if i < round(edge * n):
            return name
    return SPLITS[-1][0]


def generate_detection(out: Path, spec: SurfaceSpec) -> dict[str, int]:
    rng = np.random.default_rng(spec.seed)
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(DEFECT_CLASSES)]
    cocos = {s: {"images": [], "annotations": [], "categories": cats} for s, _ in SPLITS}
    ann_id = 0
    for i in range(spec.images):
        split = _split_of(i, spec.images)
        surface = spec.surfaces[int(rng.integers(len(spec.surfaces)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        k = 0 if rng.random() < 1 / 6 else int(rng.integers(1, spec.max_defects + 1))
        names = [DEFECT_CLASSES[int(rng.integers(len(DEFECT_CLASSES)))] for _ in range(k)]
        _, img, boxes = render(rng, surface, size, names)
        rel = f"images/{split}/{i:05d}_{surface}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / rel), img)
        coco = cocos[split]
        coco["images"].append({"id": i, "file_name": rel, "width": size[1], "height": size[0]})
        for name, (x0, y0, x1, y1) in boxes:
            ann_id += 1
            coco["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": i,
                    "category_id": DEFECT_CLASSES.index(name) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    for split, coco in cocos.items():
        (out / f"{split}.json").write_text(json.dumps(coco))
    return {s: len(c["images"]) for s, c in cocos.items()}


CLASSIFICATION_CLASSES = ("ok", *DEFECT_CLASSES)


def generate_classification(out: Path, spec: SurfaceSpec) -> dict[str, int]:
    """``spec.images`` images per class, split 70/15/15 within each class."""
    rng = np.random.default_rng(spec.seed)
    counts: dict[str, int] = {}
    for cls in CLASSIFICATION_CLASSES:
        for i in range(spec.images):
            split = _split_of(i, spec.images)
            surface = spec.surfaces[int(rng.integers(len(spec.surfaces)))]
            _, img, boxes = render(rng, surface, (224, 224), [] if cls == "ok" else [cls])
            d = out / split / cls
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{cls}_{i:05d}_{surface}.png"), img)
            counts[split] = counts.get(split, 0) + 1
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.detection.surfaces", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (created; refused when it holds files, unless --force)")
    p.add_argument("--task", choices=("detection", "classification"), default="detection")
    p.add_argument("--images", type=int, help="detection: images in all (400); classification: per class (80)")
    p.add_argument("--seed", type=int, default=SurfaceSpec.seed)
    p.add_argument(
        "--surfaces", help=f"comma list of surfaces, one product line's (default: all of {', '.join(SURFACES)})"
    )
    p.add_argument("--force", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        print(f"error: {out} is not empty (pass --force to write into it)", file=sys.stderr)
        return 2
    n = a.images if a.images is not None else (400 if a.task == "detection" else 80)
    if n < 3:
        print("error: --images: expected at least 3 (one per split)", file=sys.stderr)
        return 2
    try:
        surfaces = tuple(x.strip() for x in a.surfaces.split(",")) if a.surfaces else SURFACES
        spec = SurfaceSpec(images=n, seed=a.seed, surfaces=surfaces)
    except ValueError as e:
        print(f"error: --{e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    gen = generate_detection if a.task == "detection" else generate_classification
    counts = gen(out, spec)
    (out / "surfaces.json").write_text(json.dumps({"task": a.task, **asdict(spec), "splits": counts}, indent=1))
    print(f"{a.task} set written to {out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CLASSIFICATION_CLASSES",
    "DEFECT_CLASSES",
    "SURFACES",
    "SurfaceSpec",
    "generate_classification",
    "generate_detection",
    "main",
    "mask_box",
    "render",
]
