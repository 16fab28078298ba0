"""What every task's data readers share: image extensions, split names, the data error, the
ELPV package's folder and the RGB reader. The classifier's datasets are
``training.classification.data``; the detector's ``training.detection.datasets``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
SPLIT_NAMES = ("train", "val", "test")


def cache_dir() -> Path:
    """Feature / verification cache root: ``$DEFECTSCOPE_CACHE`` or ``~/.cache/defectscope``."""
    return Path(os.environ.get("DEFECTSCOPE_CACHE", Path.home() / ".cache" / "defectscope"))


class DataError(ValueError):
    """Bad dataset layout or content; the message names the file/folder and what was expected."""


def elpv_root() -> Path:
    """The ``elpv_dataset`` package's data folder (labels.csv + images/)."""
    try:
        import elpv_dataset
    except ImportError:
        raise DataError("the ELPV dataset needs the elpv-dataset package: pip install elpv-dataset") from None
    return Path(elpv_dataset.__file__).parent / "data"


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 gray ``(H,W)`` or BGR ``(H,W,3)`` -> RGB ``(H,W,3)`` (gray replicated)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, ::-1])


def load_rgb(path: str) -> np.ndarray:
    """Read an image file as uint8 RGB ``(H,W,3)`` via the runtime's reader."""
    from runtime.inference.preprocess import read_image

    return as_rgb(read_image(path))
