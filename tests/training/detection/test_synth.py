"""Synthetic benchmark data: exact boxes, seeded split by cell, COCO output the loader reads back, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from training.detection.datasets import resolve_detection  # noqa: E402
from training.detection.synth import DEFECT_CLASSES, RENDERERS, SynthSpec, composite, generate, main  # noqa: E402


def backgrounds(n: int, size: int = 96, color: bool = False, seed: int = 0) -> list[np.ndarray]:
    """Smooth mid-gray textures standing in for ELPV cells (fast; no ELPV in tests)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = cv2.resize(rng.integers(110, 190, (6, 6)).astype(np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
        out.append(np.stack([img, img, img], 2) if color else img)
    return out


@pytest.mark.parametrize("color", [False, True], ids=["gray", "bgr"])
def test_every_changed_pixel_is_inside_a_box_and_boxes_are_tight(color):
    for seed in range(6):
        bg = backgrounds(1, 128, color, seed)[0]
        img, boxes, labels = composite(bg, np.random.default_rng(seed), 3)
        assert img.shape == bg.shape and img.dtype == np.uint8 and len(boxes) == len(labels) >= 1
        diff = np.abs(img.astype(int) - bg.astype(int))
        diff = diff.max(axis=2) if color else diff
        inside = np.zeros(diff.shape, bool)
        for x0, y0, x1, y1 in boxes:
            inside[y0:y1, x0:x1] = True
            assert diff[y0:y1, x0:x1].max() >= 10  # a visible defect in every box
            ys, xs = np.nonzero(diff[y0:y1, x0:x1] >= 1)
            assert xs.min() <= 2 and ys.min() <= 2 and xs.max() >= x1 - x0 - 3 and ys.max() >= y1 - y0 - 3
        assert diff[~inside].max(initial=0) == 0  # nothing changed outside the boxes
        if color:
            assert (img[..., 0] == img[..., 1]).all()  # gray stays gray in BGR


def test_each_renderer_draws_something_small_enough():
    rng = np.random.default_rng(0)
    for name, render in RENDERERS.items():
        mask, depth = render(rng, 300, 300)
        assert mask.shape == (300, 300) and 0 < depth < 1 and 0 < mask.max() <= 1.0001, name
        assert (mask > 0.05).mean() < 0.1, name


def test_generate_writes_coco_the_loader_reads(tmp_path):
    bgs = backgrounds(20)
    summary = generate(tmp_path / "set", bgs, SynthSpec(seed=1, repeats=2, negative_fraction=0.25))
    assert {k: v["images"] for k, v in summary["splits"].items()} == {"train": 28, "val": 4, "test": 8}
    s = resolve_detection({"path": str(tmp_path / "set" / "train.json")})
    assert s.given == ("train", "val", "test") and s.classes == list(DEFECT_CLASSES) and not s.report.problems
    assert len(s.train) == 28 and any(x.negative for x in s.train) and any(not x.negative for x in s.train)
    test_json = json.loads((tmp_path / "set" / "test.json").read_text())
    train_cells = {im["source_cell"] for im in json.loads((tmp_path / "set" / "train.json").read_text())["images"]}
    assert not train_cells & {im["source_cell"] for im in test_json["images"]}  # split by cell
    assert test_json["images"][0]["file_name"].startswith("images/test/")
    # Seeded: the same settings give the same pixels and boxes.
    generate(tmp_path / "again", bgs, SynthSpec(seed=1, repeats=2, negative_fraction=0.25))
    a = cv2.imread(str(tmp_path / "set/images/val/val_00001.png"), -1)
    b = cv2.imread(str(tmp_path / "again/images/val/val_00001.png"), -1)
    assert np.array_equal(a, b)
    assert (tmp_path / "set/val.json").read_text() == (tmp_path / "again/val.json").read_text()
    with pytest.raises(FileExistsError, match="--force"):
        generate(tmp_path / "set", bgs)


def test_cli_from_a_folder_of_backgrounds(tmp_path, capsys):
    src = tmp_path / "cells"
    src.mkdir()
    for i, img in enumerate(backgrounds(6)):
        cv2.imwrite(str(src / f"c{i}.png"), img)
    assert main(["--out", str(tmp_path / "out"), "--source", str(src), "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["images"] == 4
    assert main(["--out", str(tmp_path / "out"), "--source", str(src)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--source", str(tmp_path / "nothing")]) == 2
