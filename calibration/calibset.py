"""The calibration set: a stratified, seeded sample of training images.

Images go through ``runtime.inference.preprocess.Preprocessor`` (the daemon's own code), so
INT8 ranges are measured on exactly the tensors the device will see. The set's
fingerprint (image contents + labels + input spec) goes into the manifest; the
list itself is written into the bundle as ``calibration.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.provenance import sha256_json
from runtime.fsio import atomic_write, atomic_write_json, sha256_file
from runtime.inference.preprocess import InputSpec, Preprocessor

DEFAULT_SIZE = 300
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class CalibrationSetError(ValueError):
    """A calibration set that cannot be built or does not match; the message says what and where."""


@dataclass(frozen=True)
class CalibItem:
    path: str
    label: int  # class index; -1 when the images came unlabelled (a plain directory)
    sha256: str


@dataclass(frozen=True)
class CalibrationSet:
    """Which images calibrate the model, and the fingerprint that identifies the resulting tensors."""

    items: tuple[CalibItem, ...]
    classes: tuple[str, ...]
    input: InputSpec
    seed: int
    source: str  # "train split" or "directory <path>"
    fingerprint: str

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[str]:
        return [i.path for i in self.items]

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for item in self.items:
            if 0 <= item.label < len(self.classes):
                counts[self.classes[item.label]] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "size": len(self.items),
            "seed": self.seed,
            "source": self.source,
            "classes": list(self.classes),
            "class_counts": self.class_counts(),
            "input": self.input.to_dict(),
            "images": [{"path": i.path, "label": i.label, "sha256": i.sha256} for i in self.items],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "calibration.json") -> CalibrationSet:
        try:
            items = tuple(CalibItem(str(d["path"]), int(d["label"]), str(d["sha256"])) for d in data["images"])
            out = cls(
                items=items,
                classes=tuple(data["classes"]),
                input=InputSpec.from_dict(data["input"]),
                seed=int(data["seed"]),
                source=str(data["source"]),
                fingerprint=str(data["fingerprint"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationSetError(f"{where}: not a calibration set description ({exc})") from None
        if out.fingerprint != fingerprint_of(out.items, out.input):
            raise CalibrationSetError(f"{where}: key 'fingerprint' does not match the listed images")
        return out

    def tensor(self, threads: int = 1, progress: bool = False) -> np.ndarray:
        """(N,C,H,W) float32 through the runtime preprocessing; files must still hash as recorded."""
        for item in self.items:
            if not os.path.isfile(item.path):
                raise CalibrationSetError(f"{item.path}: calibration image missing")
        x = preprocess_paths(self.paths, self.input, threads=threads, progress=progress, desc="calibration set")
        return x

    def verify_files(self) -> None:
        """Raise CalibrationSetError when an image changed since the set was drawn."""
        for item in self.items:
            if not os.path.isfile(item.path):
                raise CalibrationSetError(f"{item.path}: calibration image missing")
            if sha256_file(item.path) != item.sha256:
                raise CalibrationSetError(f"{item.path}: calibration image changed since the set was drawn")


def fingerprint_of(items: Sequence[CalibItem], spec: InputSpec) -> str:
    """Identifies the calibration tensors: image contents, labels, order, and the preprocessing."""
    return sha256_json({"images": [[i.sha256, i.label] for i in items], "input": spec.to_dict()})[:16]


def stratified_sample(samples: Sequence[Any], size: int, seed: int) -> list[Any]:
    """Pick ``size`` samples (objects with ``.path`` and ``.label``) stratified by label.

    Per-class quotas are proportional to the class frequencies (largest remainder),
    with at least one image of every class when ``size`` allows. The result depends
    only on the set of samples, ``size`` and ``seed`` (not on input order) and is
    shuffled so every calibration batch mixes classes.
    """
    if size < 1:
        raise CalibrationSetError(f"calibration size must be >= 1, got {size}")
    by_label: dict[int, list[Any]] = {}
    for s in sorted(samples, key=lambda s: (s.path, s.label)):
        by_label.setdefault(int(s.label), []).append(s)
    if not by_label:
        raise CalibrationSetError("no images to draw a calibration set from")
    total = sum(len(v) for v in by_label.values())
    labels = sorted(by_label)
    rng = np.random.default_rng(seed)
    if size >= total:
        quotas = {lab: len(by_label[lab]) for lab in labels}
    else:
        exact = {lab: size * len(by_label[lab]) / total for lab in labels}
        quotas = {lab: int(exact[lab]) for lab in labels}
        for lab in sorted(labels, key=lambda lab: (-(exact[lab] - quotas[lab]), lab))[: size - sum(quotas.values())]:
            quotas[lab] += 1
        if size >= len(labels):
            # Rare classes get at least one image, taken from the largest quota.
            for lab in labels:
                if quotas[lab] == 0:
                    donor = max(labels, key=lambda k: (quotas[k], -k))
                    quotas[donor] -= 1
                    quotas[lab] = 1
    picked: list[Any] = []
    for lab in labels:
        pool = by_label[lab]
        idx = rng.permutation(len(pool))[: quotas[lab]]
        picked.extend(pool[i] for i in sorted(idx))
    order = rng.permutation(len(picked))
    return [picked[i] for i in order]


def build_calibration_set(
    samples: Sequence[Any],
    classes: Sequence[str],
    spec: InputSpec,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    source: str = "train split",
) -> CalibrationSet:
    """Draw a stratified calibration set from ``samples`` (e.g. ``Splits.train``) and fingerprint it."""
    chosen = stratified_sample(samples, size, seed)
    items = tuple(CalibItem(str(s.path), int(s.label), sha256_file(s.path)) for s in chosen)
    return CalibrationSet(
        items=items,
        classes=tuple(classes),
        input=spec,
        seed=seed,
        source=source,
        fingerprint=fingerprint_of(items, spec),
    )


@dataclass(frozen=True)
class _Unlabelled:
    path: str
    label: int = -1


def images_in(directory: str | os.PathLike[str]) -> list[str]:
    """Image files under ``directory`` (recursive, sorted)."""
    root = Path(directory)
    if not root.is_dir():
        raise CalibrationSetError(f"{root}: not a directory of calibration images")
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise CalibrationSetError(f"{root}: no images found (looked for {', '.join(_IMAGE_SUFFIXES)})")
    return paths


def calibration_set_from_directory(
    directory: str | os.PathLike[str], classes: Sequence[str], spec: InputSpec, size: int = DEFAULT_SIZE, seed: int = 0
) -> CalibrationSet:
    """Calibration set from a folder of unlabelled images (a seeded random sample of ``size``)."""
    samples = [_Unlabelled(p) for p in images_in(directory)]
    return build_calibration_set(samples, classes, spec, size, seed, source=f"directory {directory}")


def _load_one(args: tuple[str, Preprocessor]) -> np.ndarray:
    path, pre = args
    return pre.load(path)


def preprocess_paths(
    paths: Sequence[str], spec: InputSpec, threads: int = 1, progress: bool = False, desc: str = "images"
) -> np.ndarray:
    """Read + preprocess image files with the runtime preprocessing -> (N,C,H,W) float32."""
    pre = Preprocessor(spec)
    out = np.empty((len(paths), *spec.shape), dtype=np.float32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False, disable=None)
    # OpenCV releases the GIL while decoding/resizing, so threads help.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, chw in enumerate(pool.map(_load_one, [(p, pre) for p in paths])):
            out[i] = chw
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


def batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive (B,C,H,W) slices; the last may be shorter."""
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


def save_tensor(path: str | os.PathLike[str], x: np.ndarray, calib: CalibrationSet) -> Path:
    """Write the preprocessed calibration tensor (``.npy``) and a ``.json`` sidecar (atomic)."""
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_suffix(".npy")
    arr = np.ascontiguousarray(x, dtype=np.float32)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to a path
            np.save(fh, arr)

    atomic_write(path, write)
    meta = {
        "fingerprint": calib.fingerprint,
        "shape": list(x.shape),
        "dtype": "float32",
        "input": calib.input.to_dict(),
        "size": len(calib),
    }
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def load_tensor(path: str | os.PathLike[str], spec: InputSpec | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a tensor written by :func:`save_tensor` -> (x, sidecar metadata); shape checked against ``spec``."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationSetError(f"{path}: no such calibration tensor file")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CalibrationSetError(f"{path}: not a .npy calibration tensor ({exc})") from None
    side = path.with_suffix(".json")
    meta: dict[str, Any] = {}
    if side.is_file():
        meta = json.loads(side.read_text(encoding="utf-8"))
    if x.dtype != np.float32 or x.ndim != 4:
        raise CalibrationSetError(f"{path}: expected (N,C,H,W) float32, got {x.dtype} {x.shape}")
    if spec is not None and tuple(x.shape[1:]) != spec.shape:
        raise CalibrationSetError(f"{path}: images are {tuple(x.shape[1:])}, the model takes {spec.shape} (C,H,W)")
    return x, meta
