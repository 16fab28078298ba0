"""Detection datasets -> train/val/test splits of :class:`DetSample` with a report of bad annotations.

Formats (``format="auto"`` infers them from the path):

* ``coco``: ``--data path/train.json``; ``val.json`` / ``test.json`` beside it are the other
  splits, else they are carved from train (seeded, by image).
* ``voc``: a folder of Pascal VOC XML files, images found under the same folder by
  ``<filename>``. Split folders ``train/``, ``val/`` (or ``validation/``), ``test/`` are used
  when present: the NEU-DET release (``NEU-DET/{train,validation}/{annotations,images/<class>}``)
  and GC10-DET (``lable/*.xml`` next to ``1/``..``10/`` image folders) load unchanged.
* ``yolo``: ``root/images/[split/]*`` + ``root/labels/[split/]*.txt`` + ``classes.txt`` or ``data.yaml``.

Bad annotations (box outside the image, zero area, unknown category, missing image,
malformed) are skipped and counted in ``DetSplits.report`` (file + annotation id);
``strict=True`` makes any of them fatal. Images without boxes are valid negatives.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from training.config_io import refuse_unknown
from training.data import SPLIT_NAMES, DataError
from training.detection.formats import DetSample, Report, read_coco, read_voc, read_yolo, yolo_classes

log = logging.getLogger(__name__)

FORMATS = ("auto", "coco", "voc", "yolo")
# Folder names read as one split (first match wins).
SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


@dataclass(frozen=True)
class DetectionSpec:
    """Where the annotations are and how to split them (saved with a run to rebuild the splits)."""

    path: str
    format: str = "auto"
    val_fraction: float = 0.1  # carved from train when no val split is given
    test_fraction: float = 0.2  # carved from train when no test split is given
    seed: int = 0
    strict: bool = False
    limit: int | None = None  # per-split cap (seeded) for smoke runs

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"data.format: expected one of {FORMATS}, got {self.format!r}")
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise DataError(f"data.{key}: expected a number in [0, 1), got {v!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DataError("data.val_fraction + data.test_fraction must leave training images (< 1)")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise DataError(f"data.limit: expected a positive integer, got {self.limit!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "data") -> DetectionSpec:
        refuse_unknown(d, (f.name for f in fields(cls)), where, DataError)
        try:
            return cls(**dict(d))
        except TypeError as exc:
            raise DataError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DetSplits:
    train: list[DetSample]
    val: list[DetSample]
    test: list[DetSample]
    classes: list[str]
    format: str
    report: Report = field(default_factory=Report)
    given: tuple[str, ...] = ()  # splits read from the data (the rest were carved from train)

    def split(self, name: str) -> list[DetSample]:
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    def summary(self) -> dict[str, Any]:
        def stats(s: list[DetSample]) -> dict[str, Any]:
            per = np.bincount(
                np.concatenate([x.labels_array() for x in s] or [np.zeros(0, np.int64)]), minlength=len(self.classes)
            )
            return {
                "images": len(s),
                "negatives": sum(x.negative for x in s),
                "boxes": dict(zip(self.classes, per.tolist())),
            }

        return {
            "format": self.format,
            "classes": self.classes,
            "given_splits": list(self.given),
            **{n: stats(self.split(n)) for n in SPLIT_NAMES},
            "bad_annotations": self.report.summary(),
        }


def infer_format(path: Path) -> str:
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if path.is_dir():
        if (path / "images").is_dir() and (path / "labels").is_dir() and any((path / "labels").rglob("*.txt")):
            return "yolo"
        if any(path.rglob("*.xml")):
            return "voc"
        if any(path.glob("*.json")):
            raise DataError(f"{path}: a folder with JSON files; pass the COCO file itself (e.g. {path}/train.json)")
    raise DataError(
        f"{path}: cannot tell the detection format (expected a COCO .json file, a folder of VOC "
        f".xml files, or a YOLO folder with images/ and labels/)"
    )


def _split_dirs(root: Path) -> dict[str, Path]:
    out = {}
    for split, names in SPLIT_DIRS.items():
        for n in names:
            if (root / n).is_dir():
                out[split] = root / n
                break
    return out


def _read(spec: DetectionSpec, fmt: str, report: Report) -> tuple[dict[str, list[DetSample]], list[str]]:
    path = Path(spec.path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if fmt == "coco":
        if not path.is_file():
            raise DataError(f"{path}: expected a COCO JSON file")
        train, classes = read_coco(path, report)
        splits = {"train": train}
        for name in ("val", "test"):
            other = path.with_name(f"{name}.json")
            if other.is_file() and other != path:
                splits[name] = read_coco(other, report, classes)[0]
        return splits, classes
    if not path.is_dir():
        raise DataError(f"{path}: expected a folder for {fmt} data")
    dirs = _split_dirs(path)
    if dirs and "train" not in dirs:
        raise DataError(f"{path}: split folders {sorted(dirs)} but no train/ folder")
    if fmt == "voc":
        if not dirs:
            dirs = {"train": path}
        train, classes = read_voc(dirs["train"], report)
        splits = {"train": train}
        for name in ("val", "test"):
            if name in dirs:
                splits[name] = read_voc(dirs[name], report, classes)[0]
        return splits, classes
    classes = yolo_classes(path)
    img_dirs = _split_dirs(path / "images") or {"train": path / "images"}
    splits = {}
    for name, d in img_dirs.items():
        splits[name] = read_yolo(d, path / "labels" / d.relative_to(path / "images"), classes, report)
    return splits, classes


def _carve(samples: list[DetSample], fraction: float, seed: int) -> tuple[list[DetSample], list[DetSample]]:
    """(rest, held-out): a seeded split by image, negatives and positives held out in proportion."""
    rng = np.random.default_rng(seed)
    groups = [[s for s in samples if s.negative], [s for s in samples if not s.negative]]
    n_total = int(round(len(samples) * fraction))
    n_neg = int(round(n_total * len(groups[0]) / max(1, len(samples))))
    rest, held = [], []
    for group, n in zip(groups, (n_neg, n_total - n_neg)):
        idx = rng.permutation(len(group))
        held += [group[i] for i in sorted(idx[:n])]
        rest += [group[i] for i in sorted(idx[n:])]
    return rest, held


def resolve_detection(spec: DetectionSpec | Mapping[str, Any]) -> DetSplits:
    """Read, check and split a detection dataset (see the module doc)."""
    if not isinstance(spec, DetectionSpec):
        spec = DetectionSpec.from_dict(spec)
    path = Path(spec.path)
    fmt = infer_format(path) if spec.format == "auto" else spec.format
    report = Report()
    splits, classes = _read(spec, fmt, report)
    if not classes:
        raise DataError(f"{path}: no object categories found")
    if spec.strict:
        report.raise_if_any()
    for p in report.problems:
        log.warning("skipped: %s", p)
    if not splits.get("train"):
        raise DataError(f"{path}: no usable training images")
    given = tuple(n for n in SPLIT_NAMES if n in splits)
    train = splits["train"]
    test = splits.get("test")
    val_fraction = spec.val_fraction
    if test is None:
        train, test = _carve(train, spec.test_fraction, spec.seed)
        val_fraction /= 1.0 - spec.test_fraction  # of what is left, so val is val_fraction of all
    val = splits.get("val")
    if val is None:
        train, val = _carve(train, val_fraction, spec.seed + 1)
    if spec.limit:
        rng = np.random.default_rng(spec.seed)
        train, val, test = ([s[i] for i in sorted(rng.permutation(len(s))[: spec.limit])] for s in (train, val, test))
    return DetSplits(train, val, test, list(classes), fmt, report, given)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.detection.datasets PATH``: load, check and split a detection set; print the summary."""
    import argparse
    import json
    import sys

    d = DetectionSpec(path=".")
    p = argparse.ArgumentParser(prog="python -m training.detection.datasets", description=main.__doc__)
    p.add_argument("path", help="COCO train.json, a VOC folder (NEU-DET, GC10-DET) or a YOLO folder")
    p.add_argument("--format", default=d.format, choices=FORMATS)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--strict", action="store_true", help="any bad annotation is fatal")
    args = p.parse_args(argv)
    try:
        splits = resolve_detection(
            DetectionSpec(args.path, args.format, args.val_fraction, args.test_fraction, args.seed, args.strict)
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = splits.summary()
    summary["bad_annotations"]["problems"] = summary["bad_annotations"]["problems"][:20]
    print(json.dumps(summary, indent=2))
    return 0


__all__ = ["DetectionSpec", "DetSplits", "FORMATS", "infer_format", "main", "resolve_detection"]


if __name__ == "__main__":
    raise SystemExit(main())
