"""Tiny detection data made in fixtures: gray images with bright squares, in COCO / VOC (NEU-DET) / YOLO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

TINY = [
    "--backbone",
    "tiny_det",
    "--weights",
    "none",
    "--image-size",
    "64,64",
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
    "--batch-size",
    "4",
    "--threads",
    "2",
    "--quiet",
    "--panels",
    "2",
]
NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def squares_image(
    rng: np.random.Generator, size: tuple[int, int], n: int, side: tuple[int, int] = (8, 16)
) -> tuple[np.ndarray, list[list[int]]]:
    """Dark noisy (H,W) uint8 image with ``n`` bright non-overlapping squares; their pixel-edge xyxy boxes."""
    h, w = size
    img = rng.normal(60, 8, (h, w)).clip(0, 255).astype(np.uint8)
    boxes: list[list[int]] = []
    for _ in range(200):
        if len(boxes) == n:
            break
        s = int(rng.integers(side[0], side[1] + 1))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        if any(x < b[2] + 2 and b[0] < x + s + 2 and y < b[3] + 2 and b[1] < y + s + 2 for b in boxes):
            continue
        img[y : y + s, x : x + s] = 220
        boxes.append([x, y, x + s, y + s])
    return img, boxes


def voc_xml(filename: str, folder: str, w: int, h: int, objects: list[tuple[str, list[int]]]) -> str:
    """A Pascal VOC file as NEU-DET ships them (1-based inclusive bndbox, depth 1)."""
    objs = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{b[0] + 1}</xmin>\n\t\t\t<ymin>{b[1] + 1}</ymin>\n"
        f"\t\t\t<xmax>{b[2]}</xmax>\n\t\t\t<ymax>{b[3]}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for name, b in objects
    )
    return (
        f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{filename}</filename>\n"
        f"\t<source>\n\t\t<database>NEU-DET</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>1</depth>\n\t</size>\n"
        f"\t<segmented>0</segmented>\n{objs}</annotation>\n"
    )


@pytest.fixture
def coco_dir(tmp_path) -> Path:
    """train.json (12 images, 2 negatives) + val.json (4) + images/; classes square, bar."""
    rng = np.random.default_rng(0)
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    for split, n in (("train", 12), ("val", 4)):
        images, anns = [], []
        for i in range(n):
            img, boxes = squares_image(rng, (48, 64), 0 if i < 2 else 2)
            name = f"images/{split}_{i}.png"
            cv2.imwrite(str(root / name), img)
            images.append({"id": i + 1, "file_name": name, "width": 64, "height": 48})
            for j, b in enumerate(boxes):
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": 1 + j % 2,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "area": (b[2] - b[0]) * (b[3] - b[1]),
                        "iscrowd": 0,
                    }
                )
        (root / f"{split}.json").write_text(
            json.dumps(
                {
                    "images": images,
                    "annotations": anns,
                    "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}],
                }
            )
        )
    return root


@pytest.fixture
def neu_det(tmp_path) -> Path:
    """NEU-DET's Kaggle layout: NEU-DET/{train,validation}/annotations/*.xml + images/<class>/*.jpg (200x200 gray)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "NEU-DET"
    for split, n in (("train", 2), ("validation", 1)):
        for cls in NEU_CLASSES[:3]:
            for i in range(1, n + 1):
                stem = f"{cls}_{i if split == 'train' else 100 + i}"
                img, boxes = squares_image(rng, (200, 200), 1 + i % 2, side=(20, 40))
                (root / split / "images" / cls).mkdir(parents=True, exist_ok=True)
                (root / split / "annotations").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / split / "images" / cls / f"{stem}.jpg"), img)
                (root / split / "annotations" / f"{stem}.xml").write_text(
                    voc_xml(f"{stem}.jpg", cls[:2], 200, 200, [(cls, b) for b in boxes])
                )
    return root


def write_squares_coco(
    root: Path,
    classes: tuple[str, ...],
    counts: tuple[tuple[str, int], ...] = (("train", 10), ("val", 4), ("test", 4)),
    seed: int = 0,
    bad: bool = False,
) -> Path:
    """COCO splits of 64x48 gray images with 2 squares each (1 negative per split), labels cycling over
    ``classes``; ``bad`` adds one box outside the image (annotation id 999) to train.json."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in counts:
        images, anns = [], []
        for i in range(n):
            img, boxes = squares_image(rng, (48, 64), 0 if i < 1 else 2)
            name = f"images/{split}_{i}.png"
            cv2.imwrite(str(root / name), img)
            images.append({"id": i + 1, "file_name": name, "width": 64, "height": 48})
            for j, b in enumerate(boxes):
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i + 1,
                        "category_id": 1 + (i + j) % len(classes),
                        "iscrowd": 0,
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "area": (b[2] - b[0]) * (b[3] - b[1]),
                    }
                )
        if bad and split == "train":
            anns.append({"id": 999, "image_id": 2, "category_id": 1, "bbox": [60, 40, 30, 30], "iscrowd": 0})
        (root / f"{split}.json").write_text(
            json.dumps(
                {
                    "images": images,
                    "annotations": anns,
                    "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
                }
            )
        )
    return root


@pytest.fixture(scope="session")
def det_run(tmp_path_factory):
    """One tiny detector run (COCO data, task inferred from the .json), shared by the detection tests."""
    from defectscope.cli import main as ds_main

    root = write_squares_coco(tmp_path_factory.mktemp("det") / "coco", ("square", "bar"), bad=True)
    out = root.parent / "run"
    rc = ds_main(
        [
            "train",
            "--data",
            str(root / "train.json"),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--max-steps-per-epoch",
            "2",
            *TINY,
        ]
    )
    assert rc == 0
    return root, out
