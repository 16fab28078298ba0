#!/usr/bin/env python
"""A real detection set nobody here made: the annotated aerial images inside the ``deepforest`` wheel.

The project's two detection benchmarks come from its own generators (synthetic defects on ELPV
cells; procedural surfaces). Defaults are also checked on real photographs with real boxes the
project did not draw: ``deepforest`` (PyPI, MIT; NEON aerial orthophotos, tree crowns boxed by
people) ships four annotated images in ``deepforest/data/``. Small objects on a textured surface,
one class, 30-40 px boxes: not defects, but real data with real label noise.

    pip install --no-deps deepforest==2.1.0          # the data only: no torch/lightning/rasterio pulled in
    python bench/external_deepforest.py --out /data/deepforest-det
    python bench/bench_detection.py --data /data/deepforest-det/train.json --targets unseen --out runs/bench-forest

Splits by whole source image, so no two splits share ground: train = the tiles of
YELL_528000 (2299x2472), val = the tiles of YELL_541000 (1249x1035), test = OSBS_029 and
SOAP_061 (400x400 each). The large images are cut into a grid of ``--tile`` px tiles (a
remainder under half a tile joins the last one); a box is kept in a tile when at least
``--min-visible`` of its area lies inside, then clipped. Writes ``images/*.png`` and
``train.json`` / ``val.json`` / ``test.json`` (COCO, paths relative to the JSON). Never commit
the output: the imagery is NEON's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import cv2

# source image -> (its VOC annotation file, split, cut into tiles)
SOURCES = {
    "2019_YELL_2_528000_4978000_image_crop2.png": ("2019_YELL_2_528000_4978000_image_crop2.xml", "train", True),
    "2019_YELL_2_541000_4977000_image_crop.png": ("2019_YELL_2_541000_4977000_image_crop.xml", "val", True),
    "OSBS_029.png": ("OSBS_029.xml", "test", False),
    "SOAP_061.png": ("SOAP_061.xml", "test", False),
}
INSTALL = "pip install --no-deps deepforest==2.1.0"


def data_dir() -> Path:
    """``deepforest/data`` of the installed package, found without importing it (it imports torch)."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the deepforest package is not installed; `{INSTALL}` installs its data only")
    d = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [n for n in SOURCES if not (d / n).is_file()]
    if missing:
        raise SystemExit(f"error: {d} lacks {missing}; expected deepforest 2.1.0 (`{INSTALL}`)")
    return d


def read_voc(path: Path) -> list[tuple[float, float, float, float]]:
    """xyxy pixel boxes of a Pascal VOC file."""
    boxes = []
    for obj in ET.parse(path).getroot().iter("object"):
        b = obj.find("bndbox")
        if b is not None:
            boxes.append(tuple(float(b.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes  # type: ignore[return-value]


def grid(w: int, h: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping xyxy tiles of tile..1.5*tile px."""

    def cuts(n: int) -> list[int]:
        c = list(range(0, n, tile))
        if len(c) > 1 and n - c[-1] < tile / 2:
            c.pop()
        return [*c, n]

    xs, ys = cuts(w), cuts(h)
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(len(ys) - 1) for i in range(len(xs) - 1)]


def convert(src: Path, out: Path, tile: int = 400, min_visible: float = 0.5) -> dict[str, tuple[int, int]]:
    """Write the COCO splits; returns {split: (images, boxes)}."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    cats = [{"id": 1, "name": "tree"}]
    cocos: dict[str, dict[str, Any]] = {
        s: {"images": [], "annotations": [], "categories": cats} for s in ("train", "val", "test")
    }
    img_id = ann_id = 0
    for name, (xml, split, tiled) in SOURCES.items():
        img = cv2.imread(str(src / name), cv2.IMREAD_COLOR)  # (H,W,3) uint8 BGR
        if img is None:
            raise SystemExit(f"error: cannot read {src / name}")
        h, w = img.shape[:2]
        boxes = read_voc(src / xml)
        for x0, y0, x1, y1 in grid(w, h, tile) if tiled else [(0, 0, w, h)]:
            kept = []
            for bx0, by0, bx1, by1 in boxes:
                cx0, cy0, cx1, cy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
                if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < min_visible * (bx1 - bx0) * (by1 - by0):
                    continue
                kept.append([cx0 - x0, cy0 - y0, cx1 - cx0, cy1 - cy0])  # COCO xywh, tile pixels
            if not kept:
                continue
            img_id += 1
            rel = f"images/{Path(name).stem}_{x0}_{y0}.png"
            cv2.imwrite(str(out / rel), img[y0:y1, x0:x1])
            cocos[split]["images"].append({"id": img_id, "file_name": rel, "width": x1 - x0, "height": y1 - y0})
            for bbox in kept:
                ann_id += 1
                cocos[split]["annotations"].append(
                    {
                        "id": ann_id,
                        "image_id": img_id,
                        "category_id": 1,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": 0,
                    }
                )
    for split, coco in cocos.items():
        (out / f"{split}.json").write_text(json.dumps(coco))
    return {s: (len(c["images"]), len(c["annotations"])) for s, c in cocos.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (train.json, val.json, test.json, images/)")
    p.add_argument("--tile", type=int, default=400, help="tile side of the large images (px)")
    p.add_argument("--min-visible", type=float, default=0.5, help="share of a box's area a tile must hold")
    a = p.parse_args(argv)
    counts = convert(data_dir(), Path(a.out), a.tile, a.min_visible)
    for split, (n_img, n_box) in counts.items():
        print(f"{split}: {n_img} images, {n_box} boxes")
    print(f"-> {Path(a.out) / 'train.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
