"""The second benchmark's generator (training.detection.surfaces): seeded, exact boxes, readable as COCO / ImageFolder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.detection.surfaces import CLASSIFICATION_CLASSES, DEFECT_CLASSES, SURFACES, main, render


@pytest.mark.parametrize("surface", SURFACES)
def test_every_changed_pixel_lies_in_a_box(surface):
    rng = np.random.default_rng(3)
    clean, img, boxes = render(rng, surface, (240, 320), list(DEFECT_CLASSES))
    assert img.shape == (240, 320, 3) and img.dtype == np.uint8
    assert len(boxes) >= 3 and {c for c, _ in boxes} <= set(DEFECT_CLASSES)
    changed = np.abs(img.astype(int) - (np.clip(clean, 0, 1) * 255).round().astype(int)).max(-1) > 0
    inside = np.zeros_like(changed)
    for _, (x0, y0, x1, y1) in boxes:
        inside[y0:y1, x0:x1] = True
    assert changed.any() and not (changed & ~inside).any()


def test_shapes_differ_by_class():
    rng = np.random.default_rng(0)
    ratios, areas = {}, {}
    for name in DEFECT_CLASSES:
        bs = [render(rng, "painted_plastic", (256, 256), [name])[2][0][1] for _ in range(12)]
        wh = np.array([(b[2] - b[0], b[3] - b[1]) for b in bs], float)
        ratios[name] = float(np.max(np.maximum(wh[:, 0], wh[:, 1]) / np.minimum(wh[:, 0], wh[:, 1])))
        areas[name] = float(np.median(wh[:, 0] * wh[:, 1]))
    assert areas["hole"] < areas["dent"] < areas["stain"]
    assert ratios["scratch"] >= 4 and ratios["hole"] < 1.5  # near-axis scratches give thin boxes; holes are round
    assert areas["hole"] < 20 * 20


def test_detection_set_is_seeded_and_reads_as_coco(tmp_path):
    pytest.importorskip("pycocotools")
    from training.detection.datasets import DetectionSpec, resolve_detection

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--out", str(a), "--images", "20", "--seed", "5"]) == 0
    assert main(["--out", str(b), "--images", "20", "--seed", "5"]) == 0
    assert (a / "train.json").read_text() == (b / "train.json").read_text()
    first = sorted((a / "images/train").iterdir())[0]
    assert first.read_bytes() == (b / "images/train" / first.name).read_bytes()
    splits = resolve_detection(DetectionSpec(path=str(a / "train.json"), strict=True))
    assert tuple(splits.classes) == DEFECT_CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (14, 3, 3)
    assert json.loads((a / "surfaces.json").read_text())["seed"] == 5
    assert main(["--out", str(a), "--images", "20"]) == 2  # not empty: refused without --force


def test_classification_set_has_five_classes(tmp_path):
    from training.classification.data import DataSpec, resolve_splits

    out = tmp_path / "cls"
    assert main(["--out", str(out), "--task", "classification", "--images", "6"]) == 0
    splits = resolve_splits(DataSpec(source="folder", path=str(out)))
    assert sorted(splits.classes) == sorted(CLASSIFICATION_CLASSES)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30


def test_a_product_line_uses_only_its_surfaces(tmp_path, capsys):
    out = tmp_path / "line-b"
    assert main(["--out", str(out), "--images", "12", "--surfaces", "woven_fabric,painted_plastic"]) == 0
    names = {p.stem.split("_", 1)[1] for p in (out / "images").rglob("*.png")}
    assert names and names <= {"woven_fabric", "painted_plastic"}
    assert main(["--out", str(tmp_path / "bad"), "--surfaces", "marble"]) == 2
    assert "marble" in capsys.readouterr().err
