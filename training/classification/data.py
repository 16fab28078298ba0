"""Datasets: ImageFolder trees, CSV manifests and the ELPV solar-cell set -> train/val/test splits.

``resolve_splits(DataSpec)`` lists samples, splits them (stratified, seeded), checks
every image decodes (unreadable files are reported by path and skipped, or fatal with
``strict``) and fingerprints the result. Images are read with
``runtime.inference.preprocess.read_image`` (uint8 gray or BGR), the one reader the runtime uses.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from training.classification.data_verify import verify_images
from training.config_io import refuse_unknown
from training.data import (  # noqa: F401  (the classifier's data API names them too)
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    DataError,
    as_rgb,
    cache_dir,
    elpv_root,
    load_rgb,
)

log = logging.getLogger(__name__)

# Folder names read as "no defect" when good_classes is not given.
GOOD_NAMES = ("ok", "good", "pass", "normal", "nodefect", "no_defect", "non_defective", "functional", "negative")
ELPV_CLASSES = {"binary": ("ok", "defect"), "4class": ("ok", "defect_33", "defect_67", "defect_100")}
SOURCES = ("folder", "csv", "elpv")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    group: str | None = None


@dataclass(frozen=True)
class DataSpec:
    """Where the images are and how to split them (saved in model.json to rebuild the splits)."""

    source: str = "elpv"  # "folder" | "csv" | "elpv"
    path: str | None = None  # folder root / manifest CSV; elpv: package data unless given
    labels: str = "binary"  # elpv: "binary" (probability >= 0.5) | "4class"
    cell_types: tuple[str, ...] = ("mono", "poly")  # elpv: which cell types to use
    test_fraction: float = 0.25  # when no test split is given
    val_fraction: float = 0.1  # carved from train when no val split is given
    seed: int = 0
    good_classes: tuple[str, ...] | None = None
    limit: int | None = None  # per-split cap (class-balanced, seeded) for smoke runs
    strict: bool = False  # unreadable images are fatal instead of skipped
    verify: bool = True  # decode every image once while resolving

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"data.source: expected one of {SOURCES}, got {self.source!r}")
        if self.source in ("folder", "csv") and not self.path:
            raise DataError(f"data.path: required for source {self.source!r}")
        if self.labels not in ELPV_CLASSES:
            raise DataError(f"data.labels: expected one of {tuple(ELPV_CLASSES)}, got {self.labels!r}")
        object.__setattr__(self, "cell_types", tuple(self.cell_types))
        bad = [t for t in self.cell_types if t not in ("mono", "poly")]
        if bad or not self.cell_types:
            raise DataError(f"data.cell_types: expected a non-empty subset of ('mono', 'poly'), got {self.cell_types}")
        if self.good_classes is not None:
            object.__setattr__(self, "good_classes", tuple(self.good_classes))
        for key in ("test_fraction", "val_fraction"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise DataError(f"data.{key}: expected a number in [0, 1), got {v!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise DataError(f"data.limit: expected a positive integer, got {self.limit!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "data") -> DataSpec:
        refuse_unknown(d, (f.name for f in fields(cls)), where, DataError)
        d = dict(d)
        for key in ("cell_types", "good_classes"):
            if isinstance(d.get(key), str):
                d[key] = tuple(s.strip() for s in d[key].split(",") if s.strip())
        try:
            return cls(**d)
        except DataError as exc:
            raise DataError(str(exc).replace("data.", f"{where}.", 1)) from None
        except TypeError as exc:
            raise DataError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cell_types"] = list(self.cell_types)
        out["good_classes"] = list(self.good_classes) if self.good_classes is not None else None
        return out


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    classes: list[str]
    good_classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    digests: dict[str, str] = field(default_factory=dict)  # path -> content digest
    fingerprint: str = ""

    def split(self, name: str) -> list[Sample]:
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)

    def split_fingerprint(self, name: str) -> str:
        """Content fingerprint of one split (feature-cache key part)."""
        return _fingerprint(self.classes, {name: self.split(name)}, self.digests)

    def class_counts(self, name: str) -> list[int]:
        c = Counter(s.label for s in self.split(name))
        return [c.get(i, 0) for i in range(len(self.classes))]

    def summary(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "good_classes": self.good_classes,
            "counts": {n: self.class_counts(n) for n in SPLIT_NAMES},
            "skipped": len(self.skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped],
            "fingerprint": self.fingerprint,
        }


# -- listing ------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_class_tree(root: Path) -> dict[str, list[str]]:
    """``{class: [image paths]}`` of ``root/<class>/**/<image>``."""
    out: dict[str, list[str]] = {}
    for d in _class_dirs(root):
        out[d.name] = sorted(str(p) for p in d.rglob("*") if _is_image(p))
    return out


def _folder(spec: DataSpec) -> tuple[dict[str, list[tuple[str, str, str | None]]], list[str]]:
    """Per-split ``[(path, class name, group)]`` (absent splits empty) and the class list."""
    root = Path(spec.path or "")
    if not root.is_dir():
        raise DataError(
            f"{root}: not a directory (expected an ImageFolder tree: <root>/<class>/<image> "
            f"or <root>/{{train,val,test}}/<class>/<image>)"
        )
    has_splits = (root / "train").is_dir()
    trees: dict[str, dict[str, list[str]]] = {}
    if has_splits:
        for name in SPLIT_NAMES:
            if (root / name).is_dir():
                trees[name] = _list_class_tree(root / name)
        class_sets = {n: sorted(t) for n, t in trees.items()}
        ref = class_sets["train"]
        for n, cls in class_sets.items():
            if cls != ref:
                raise DataError(
                    f"{root / n}: class folders {cls} differ from {root / 'train'}: {ref} "
                    f"(every split needs the same class folders)"
                )
    else:
        trees["all"] = _list_class_tree(root)
    classes = sorted(next(iter(trees.values())))
    if len(classes) < 2:
        where = root / "train" if has_splits else root
        raise DataError(f"{where}: found {len(classes)} class folder(s) {classes}; need at least 2")
    for n, tree in trees.items():
        for c, files in tree.items():
            if not files:
                where = (root / n / c) if has_splits else (root / c)
                raise DataError(f"{where}: class {c!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    rows: dict[str, list[tuple[str, str, str | None]]] = {
        n: [(p, c, None) for c in classes for p in tree[c]] for n, tree in trees.items()
    }
    return rows, classes


def _csv(spec: DataSpec) -> tuple[dict[str, list[tuple[str, str, str | None]]], list[str]]:
    """CSV manifest: ``path,label[,group[,split]]`` (header row optional; paths relative to the CSV)."""
    path = Path(spec.path or "")
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (expected a CSV with columns path,label[,group])")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    if not rows:
        raise DataError(f"{path}: empty manifest")
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header and "label" in header:
        cols = {name: header.index(name) for name in ("path", "label", "group", "split") if name in header}
        rows = rows[1:]
        first_line = 2
    else:
        first_line = 1
        cols = {"path": 0, "label": 1}
        if len(rows[0]) > 2:
            cols["group"] = 2
    out: dict[str, list[tuple[str, str, str | None]]] = {}
    for i, r in enumerate(rows, start=first_line):
        try:
            p, label = r[cols["path"]].strip(), r[cols["label"]].strip()
        except IndexError:
            raise DataError(f"{path}:{i}: expected columns path,label[,group], got {r}") from None
        if not p or not label:
            raise DataError(f"{path}:{i}: empty path or label")
        group = (r[cols["group"]].strip() or None) if "group" in cols and cols["group"] < len(r) else None
        split = r[cols["split"]].strip().lower() if "split" in cols and cols["split"] < len(r) else "all"
        if split not in (*SPLIT_NAMES, "all", ""):
            raise DataError(f"{path}:{i}: split {split!r}; expected one of {SPLIT_NAMES} or empty")
        full = Path(p) if os.path.isabs(p) else path.parent / p
        out.setdefault(split or "all", []).append((str(full), label, group))
    if "all" in out and any(n in out for n in SPLIT_NAMES):
        raise DataError(f"{path}: some rows have a split and some do not; give every row a split or none")
    classes = sorted({lab for rs in out.values() for _, lab, _ in rs})
    if len(classes) < 2:
        raise DataError(f"{path}: found {len(classes)} label(s) {classes}; need at least 2")
    if "train" in out:
        train_cls = sorted({lab for _, lab, _ in out["train"]})
        for n, rs in out.items():
            cls = sorted({lab for _, lab, _ in rs})
            missing = sorted(set(classes) - set(cls))
            if n == "train" and missing:
                raise DataError(f"{path}: class(es) {missing} have no train rows")
            extra = sorted(set(cls) - set(train_cls))
            if extra:
                raise DataError(f"{path}: split {n!r} has class(es) {extra} that train lacks")
    return out, classes


def _elpv(spec: DataSpec) -> tuple[dict[str, list[tuple[str, str, str | None]]], list[str]]:
    root = Path(spec.path) if spec.path else elpv_root()
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DataError(
            f"{labels}: ELPV labels file not found (expected <root>/labels.csv with "
            f"'images/cellNNNN.png  probability  type' rows)"
        )
    classes = list(ELPV_CLASSES[spec.labels])
    rows: list[tuple[str, str, str | None]] = []
    for i, line in enumerate(labels.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise DataError(f"{labels}:{i}: expected 'path probability type', got {line!r}")
        rel, prob, kind = parts[0], float(parts[1]), parts[2]
        if kind not in spec.cell_types:
            continue
        if spec.labels == "binary":
            cls = classes[int(prob >= 0.5)]
        else:
            cls = classes[int(round(prob * 3))]  # 0, 1/3, 2/3, 1 -> 0..3
        rows.append((str(root / rel), cls, kind))
    return {"all": rows}, classes


# -- splitting --------------------------------------------------------------------------
def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, held-out) with ``fraction`` held out, stratified by label x group, seeded.

    Uses scikit-learn's ``train_test_split`` (the ELPV reference protocol); strata
    too small for it fall back to label-only, then to a plain seeded shuffle.
    """
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(samples))
    for key in (lambda s: f"{s.label}|{s.group}", lambda s: str(s.label), None):
        strata = [key(s) for s in samples] if key else None
        try:
            a, b = train_test_split(idx, test_size=fraction, random_state=seed, shuffle=True, stratify=strata)
            return [samples[i] for i in a], [samples[i] for i in b]
        except ValueError:
            continue
    raise DataError(f"cannot split {len(samples)} samples with fraction {fraction}")


def _limit(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """At most ``n`` samples, round-robin over classes (seeded), original order kept."""
    if n is None or len(samples) <= n:
        return samples
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    queues = {c: list(rng.permutation(ix)) for c, ix in sorted(by_class.items())}
    keep: list[int] = []
    while len(keep) < n:
        for c in list(queues):
            if queues[c] and len(keep) < n:
                keep.append(int(queues[c].pop()))
    return [samples[i] for i in sorted(keep)]


def _fingerprint(classes: Sequence[str], splits: Mapping[str, Sequence[Sample]], digests: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    h.update(("\x1f".join(classes) + "\n").encode())
    for name in sorted(splits):
        for s in splits[name]:
            h.update(f"{name}\x1f{s.label}\x1f{s.group}\x1f{digests.get(s.path, s.path)}\n".encode())
    return h.hexdigest()[:16]


# -- entry point --------------------------------------------------------------------------
_LISTERS = {"folder": _folder, "csv": _csv, "elpv": _elpv}


def source_of(data: str) -> tuple[str, str | None]:
    """``(source, path)`` of a ``--data`` argument: ``elpv``, a ``.csv`` manifest, else a folder."""
    if data == "elpv":
        return "elpv", None
    if data.lower().endswith(".csv"):
        return "csv", data
    return "folder", data


def resolve_splits(spec: DataSpec | Mapping[str, Any], threads: int | None = None) -> Splits:
    """List, split, verify and fingerprint a dataset (see :class:`DataSpec`)."""
    if not isinstance(spec, DataSpec):
        spec = DataSpec.from_dict(spec)
    rows, classes = _LISTERS[spec.source](spec)
    index = {c: i for i, c in enumerate(classes)}

    # Unreadable files are dropped before splitting: the split is of what can be trained on.
    all_paths = sorted({p for rs in rows.values() for p, _, _ in rs})
    digests, bad = verify_images(all_paths, spec.verify, threads or min(4, os.cpu_count() or 1))
    if bad:
        for p, reason in sorted(bad.items()):
            log.warning("skipping unreadable image %s: %s", p, reason)
        if spec.strict:
            listing = "\n  ".join(f"{p}: {r}" for p, r in sorted(bad.items()))
            raise DataError(f"{len(bad)} unreadable image(s) (strict mode):\n  {listing}")

    samples = {n: [Sample(p, index[c], g) for p, c, g in rs if p not in bad] for n, rs in rows.items()}
    if "all" in samples:
        rest, test = stratified_split(samples["all"], spec.test_fraction, spec.seed)
        samples = {"train": rest, "test": test}
    if "train" not in samples:
        raise DataError(f"{spec.path}: no train split")
    if "val" not in samples:
        samples["train"], samples["val"] = stratified_split(samples["train"], spec.val_fraction, spec.seed)
    samples.setdefault("test", [])
    samples = {n: _limit(samples[n], spec.limit, spec.seed) for n in SPLIT_NAMES}

    counts = Counter(s.label for s in samples["train"])
    empty = [classes[i] for i in range(len(classes)) if counts.get(i, 0) == 0]
    if empty:
        raise DataError(f"{spec.path or 'elpv'}: class(es) {empty} have no readable training images")

    good = list(spec.good_classes) if spec.good_classes is not None else [c for c in classes if c.lower() in GOOD_NAMES]
    unknown_good = [c for c in good if c not in classes]
    if unknown_good:
        raise DataError(f"data.good_classes: {unknown_good} are not classes of this dataset {classes}")
    splits = Splits(
        train=samples["train"],
        val=samples["val"],
        test=samples["test"],
        classes=classes,
        good_classes=good,
        skipped=sorted(bad.items()),
        digests=digests,
    )
    splits.fingerprint = _fingerprint(classes, samples, digests)
    return splits


def iter_paths(samples: Iterable[Sample]) -> list[str]:
    return [s.path for s in samples]
