"""Detection annotation readers: COCO JSON, Pascal VOC XML folders (NEU-DET, GC10-DET), YOLO txt.

Each reader returns ``(samples, classes)`` and records every bad annotation in a
:class:`Report` (file, annotation id, reason); bad boxes are skipped, images whose file
is missing are skipped with all their boxes. Boxes are float ``xyxy`` in pixel-edge
coordinates of the original image (runtime.inference.boxes' convention); labels index ``classes``
(0-based, no background).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data import IMAGE_EXTENSIONS, DataError

# Boxes reaching this far (pixels) past the image edge are clipped (rounding in exported
# annotations); further out they are errors.
EDGE_TOLERANCE = 1.0


@dataclass(frozen=True)
class DetSample:
    path: str
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    labels: tuple[int, ...] = ()
    source: str = ""  # annotation file the sample came from
    key: str = ""  # image id inside that file (COCO id, XML name, label file)

    def boxes_array(self) -> np.ndarray:
        return np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)

    def labels_array(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.int64)

    @property
    def negative(self) -> bool:
        return not self.boxes


@dataclass(frozen=True)
class Problem:
    file: str
    ann_id: str
    reason: str  # one of REASONS, then ": detail"

    def __str__(self) -> str:
        return f"{self.file} [{self.ann_id}]: {self.reason}"


REASONS = ("box outside image", "zero area", "unknown category", "missing image", "malformed")


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)

    def add(self, file: Any, ann_id: Any, reason: str) -> None:
        self.problems.append(Problem(str(file), str(ann_id), reason))

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.reason.split(":", 1)[0] for p in self.problems))

    def raise_if_any(self, limit: int = 20) -> None:
        if self.problems:
            lines = [str(p) for p in self.problems[:limit]]
            more = len(self.problems) - limit
            raise DataError(
                f"{len(self.problems)} bad annotation(s) (strict mode):\n  "
                + "\n  ".join(lines)
                + (f"\n  ... and {more} more" if more > 0 else "")
            )

    def summary(self) -> dict[str, Any]:
        return {
            "skipped": len(self.problems),
            "by_reason": self.counts(),
            "problems": [{"file": p.file, "ann_id": p.ann_id, "reason": p.reason} for p in self.problems],
        }


Box = tuple[float, float, float, float]  # xyxy, pixel edges


def check_box(box: Sequence[float], width: int, height: int) -> tuple[Box | None, str | None]:
    """(clipped box, None) or (None, reason)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        return None, f"malformed: non-finite box {list(box)}"
    t = EDGE_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        return None, f"box outside image: {[x0, y0, x1, y1]} in a {width}x{height} image"
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None, f"zero area: {[x0, y0, x1, y1]}"
    return (x0, y0, x1, y1), None


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image file, None when it cannot be read."""
    from runtime.inference.preprocess import ImageReadError, read_image

    try:
        img = read_image(path)
    except ImageReadError:
        return None
    return int(img.shape[1]), int(img.shape[0])


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


# -- COCO --------------------------------------------------------------------------------
def read_coco(path: Path, report: Report, classes: Sequence[str] | None = None) -> tuple[list[DetSample], list[str]]:
    """COCO detection JSON; ``file_name`` relative to the JSON's folder. ``classes`` pins the class
    list (val/test files must name the same categories as train)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable COCO JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: key {key!r} must be a list (COCO detection format)")
    try:
        cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: every category needs an integer 'id' and a 'name'") from None
    names = [cats[i] for i in sorted(cats)]
    if classes is not None and list(classes) != names:
        raise DataError(f"{path}: categories {names} differ from the training set's {list(classes)}")
    index = {cid: names.index(cats[cid]) for cid in cats}
    root = path.parent
    images: dict[Any, dict[str, Any]] = {}
    for im in data["images"]:
        try:
            iid, rel = im["id"], str(im["file_name"])
        except (KeyError, TypeError):
            report.add(
                path, im.get("id", "?") if isinstance(im, dict) else "?", "malformed: image needs 'id' and 'file_name'"
            )
            continue
        p = root / rel
        size: tuple[Any, Any] | None = (im.get("width"), im.get("height"))
        if not p.is_file():
            report.add(path, f"image {iid}", f"missing image: {p}")
            continue
        if size is None or not all(isinstance(v, int) and v > 0 for v in size):
            size = image_size(p)
            if size is None:
                report.add(path, f"image {iid}", f"missing image: {p} does not decode")
                continue
        images[iid] = {"path": str(p), "size": size, "boxes": [], "labels": []}
    missing_ids = {im.get("id") for im in data["images"] if isinstance(im, dict)} - set(images)
    for ann in data["annotations"]:
        aid = ann.get("id", "?") if isinstance(ann, dict) else "?"
        try:
            iid, cid, (x, y, w, h) = ann["image_id"], int(ann["category_id"]), (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            report.add(path, aid, "malformed: annotation needs image_id, category_id and bbox [x,y,w,h]")
            continue
        if iid in missing_ids:
            continue  # the image's problem is reported once
        if iid not in images:
            report.add(path, aid, f"missing image: image_id {iid} is not in 'images'")
            continue
        if cid not in index:
            report.add(path, aid, f"unknown category: category_id {cid}")
            continue
        im = images[iid]
        box, why = check_box((x, y, x + w, y + h), *im["size"])
        if why:
            report.add(path, aid, why)
            continue
        im["boxes"].append(box)
        im["labels"].append(index[cid])
    samples = [
        DetSample(
            im["path"], im["size"][0], im["size"][1], tuple(im["boxes"]), tuple(im["labels"]), str(path), str(iid)
        )
        for iid, im in images.items()
    ]
    return samples, names


# -- Pascal VOC ------------------------------------------------------------------------------
def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text else None


def _image_index(root: Path) -> tuple[dict[str, Path], dict[str, Path], set[str]]:
    """Images under ``root`` by file name and by stem; names found twice (ambiguous)."""
    by_name: dict[str, Path] = {}
    by_stem: dict[str, Path] = {}
    dup: set[str] = set()
    for p in sorted(root.rglob("*")):
        if _is_image(p):
            for d, k in ((by_name, p.name), (by_stem, p.stem)):
                if k in d:
                    dup.add(k)
                d[k] = p
    return by_name, by_stem, dup


def read_voc(root: Path, report: Report, classes: Sequence[str] | None = None) -> tuple[list[DetSample], list[str]]:
    """Every ``*.xml`` under ``root``; images found anywhere under ``root`` by ``<filename>``
    (then by the XML's stem: some NEU-DET files omit the extension). XML without objects = negative.

    VOC coordinates are 1-based inclusive pixels: ``xmin=1, xmax=200`` covers a 200 px wide image,
    i.e. pixel-edge box ``[0, 200]``.
    """
    by_name, by_stem, dup = _image_index(root)
    rows: list[tuple[Path, Path, int, int, list[tuple[str, str, Box]]]] = []
    for xml in sorted(root.rglob("*.xml")):
        try:
            ann = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            report.add(xml, "-", f"malformed: not XML ({exc})")
            continue
        fname = _text(ann, "filename") or xml.stem
        img = by_name.get(Path(fname).name) or by_stem.get(Path(fname).stem) or by_stem.get(xml.stem)
        if img is None:
            report.add(xml, "-", f"missing image: {fname!r} not found under {root}")
            continue
        if img.name in dup or img.stem in dup:
            report.add(xml, "-", f"missing image: {img.name!r} is ambiguous (several files of that name under {root})")
            continue
        size = ann.find("size")
        try:
            w, h = int(float(_text(size, "width") or 0)), int(float(_text(size, "height") or 0))
        except ValueError:
            w = h = 0
        if w <= 0 or h <= 0:
            wh = image_size(img)
            if wh is None:
                report.add(xml, "-", f"missing image: {img} does not decode")
                continue
            w, h = wh
        objs: list[tuple[str, str, Box]] = []
        for i, obj in enumerate(ann.findall("object")):
            name, bb = _text(obj, "name"), obj.find("bndbox")
            try:
                xyxy = tuple(float(_text(bb, k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                report.add(xml, f"object {i}", "malformed: object needs name and bndbox xmin/ymin/xmax/ymax")
                continue
            objs.append((f"object {i}", name or "", (xyxy[0] - 1, xyxy[1] - 1, xyxy[2], xyxy[3])))
        rows.append((xml, img, w, h, objs))
    names = list(classes) if classes is not None else sorted({o[1] for r in rows for o in r[4] if o[1]})
    samples = []
    for xml, img, w, h, objs in rows:
        boxes, labels = [], []
        for aid, name, xyxy in objs:
            if name not in names:
                report.add(xml, aid, f"unknown category: {name!r}")
                continue
            box, why = check_box(xyxy, w, h)
            if box is None:
                report.add(xml, aid, str(why))
                continue
            boxes.append(box)
            labels.append(names.index(name))
        samples.append(DetSample(str(img), w, h, tuple(boxes), tuple(labels), str(xml), xml.stem))
    return samples, names


# -- YOLO ------------------------------------------------------------------------------------
def yolo_classes(root: Path) -> list[str]:
    """Class names from ``classes.txt`` (one per line) or ``data.yaml``/``dataset.yaml`` ``names``."""
    txt = root / "classes.txt"
    if txt.is_file():
        return [ln.strip() for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for name in ("data.yaml", "dataset.yaml"):
        y = root / name
        if y.is_file():
            try:
                import yaml
            except ImportError:
                raise DataError(f"{y}: reading it needs PyYAML (pip install pyyaml), or write classes.txt") from None
            names = (yaml.safe_load(y.read_text(encoding="utf-8")) or {}).get("names")
            if isinstance(names, dict):
                names = [names[k] for k in sorted(names)]
            if isinstance(names, list) and names:
                return [str(n) for n in names]
            raise DataError(f"{y}: key 'names' must be a non-empty list or {{id: name}} mapping")
    raise DataError(f"{root}: YOLO data needs classes.txt or data.yaml with 'names'")


def read_yolo(images: Path, labels: Path, classes: Sequence[str], report: Report) -> list[DetSample]:
    """``images/<x>.<ext>`` with ``labels/<x>.txt`` rows ``class cx cy w h`` (normalised to [0,1]).
    A missing or empty label file makes the image a negative."""
    samples = []
    for img in sorted(p for p in images.rglob("*") if _is_image(p)):
        rel = img.relative_to(images).with_suffix(".txt")
        txt = labels / rel
        size = image_size(img)
        if size is None:
            report.add(img, "-", f"missing image: {img} does not decode")
            continue
        w, h = size
        boxes, labs = [], []
        lines = txt.read_text(encoding="utf-8").splitlines() if txt.is_file() else []
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 5:
                    raise ValueError
                cid = int(parts[0])
                cx, cy, bw, bh = (float(v) for v in parts[1:])
            except ValueError:
                report.add(txt, f"line {n}", f"malformed: expected 'class cx cy w h', got {line.strip()!r}")
                continue
            if not 0 <= cid < len(classes):
                report.add(txt, f"line {n}", f"unknown category: class id {cid} (have {len(classes)} classes)")
                continue
            box, why = check_box(((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h), w, h)
            if box is None:
                report.add(txt, f"line {n}", str(why))
                continue
            boxes.append(box)
            labs.append(cid)
        samples.append(DetSample(str(img), w, h, tuple(boxes), tuple(labs), str(txt), str(rel.with_suffix(""))))
    return samples


def write_coco(samples: Iterable[DetSample], classes: Sequence[str], root: Path) -> dict[str, Any]:
    """Samples -> a COCO detection dict with ``file_name`` relative to ``root`` (ids from 1)."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i, s in enumerate(samples, 1):
        images.append(
            {"id": i, "file_name": Path(s.path).relative_to(root).as_posix(), "width": s.width, "height": s.height}
        )
        for (x0, y0, x1, y1), lab in zip(s.boxes, s.labels):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(lab) + 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round((x1 - x0) * (y1 - y0), 2),
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
    }
