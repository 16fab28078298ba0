"""Tiny synthetic image datasets for the training tests (made in fixtures, 32-48 px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")


def synth_image(cls: str, rng: np.random.Generator, size: int = 40, color: bool = False) -> np.ndarray:
    """Noise texture; "defect" adds a bright 3-px crack (horizontal or vertical), "stain" a dark blob."""
    img = rng.normal(110, 18, (size, size)).clip(0, 255).astype(np.uint8)
    if cls == "defect":
        p = int(rng.integers(4, size - 7))
        if rng.random() < 0.5:
            img[p : p + 3, :] = 235
        else:
            img[:, p : p + 3] = 235
    elif cls == "stain":
        c = rng.integers(8, size - 8, 2)
        cv2.circle(img, (int(c[0]), int(c[1])), 6, 20, -1)
    if color:
        img = np.stack([img, (img * 0.8).astype(np.uint8), img], axis=2)  # BGR
    return img


def write_folder(
    root: Path, counts: dict[str, int], size: int = 40, seed: int = 0, color: bool = False, ext: str = ".png"
) -> Path:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / cls / f"{cls}_{i:03d}{ext}"), synth_image(cls, rng, size, color))
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Feature / verification caches and torch hub under the test's tmp dir; never download."""
    monkeypatch.setenv("DEFECTSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DEFECTSCOPE_OFFLINE", "1")


@pytest.fixture
def folder_data(tmp_path) -> Path:
    """Learnable 2-class ImageFolder (one folder, split automatically): 40 ok + 40 defect, 40 px gray."""
    return write_folder(tmp_path / "parts", {"ok": 40, "defect": 40})


@pytest.fixture
def tiny_cfg(folder_data, tmp_path):
    """A TrainConfig factory for tiny_cnn on ``folder_data``."""
    from training.classification.config import TrainConfig
    from training.classification.data import DataSpec

    def make(**kw):
        base = dict(
            out=str(tmp_path / "run"),
            data=DataSpec(source="folder", path=str(folder_data), val_fraction=0.25, test_fraction=0.2),
            backbone="tiny_cnn",
            weights="none",
            image_size=32,
            batch_size=16,
            threads=1,
            epochs=2,
            head_epochs=1,
            lr=5e-3,
            head_lr=1e-2,
        )
        base.update(kw)
        return TrainConfig(**base)

    return make
