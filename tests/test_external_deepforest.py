"""bench/external_deepforest.py: tiles cut without overlap, boxes clipped and kept by visible share."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from tests.bench_scripts import load_bench


def _mod():
    return load_bench("external_deepforest")


def test_grid_covers_the_image_once():
    tiles = _mod().grid(900, 500, 400)  # x cuts 0,400,900 and y 0,500: a rest under 200 px joins the last tile
    assert tiles == [(0, 0, 400, 500), (400, 0, 900, 500)]


def _voc(path: Path, boxes) -> None:
    objs = "".join(
        f"<object><name>Tree</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for a, b, c, d in boxes
    )
    path.write_text(f"<annotation>{objs}</annotation>")


def test_convert_splits_by_source_and_clips_boxes(tmp_path):
    mod = _mod()
    src = tmp_path / "src"
    src.mkdir()
    for name, (xml, _split, tiled) in mod.SOURCES.items():
        size = (800, 400) if tiled else (100, 100)  # (W, H)
        cv2.imwrite(str(src / name), np.zeros((size[1], size[0], 3), np.uint8))
        # one box inside tile 1, one straddling the cut at x=400 (75 % left of it), one in tile 2
        _voc(src / xml, [(10, 10, 40, 40), (370, 10, 410, 30), (500, 50, 530, 80)] if tiled else [(5, 5, 20, 20)])
    counts = mod.convert(src, tmp_path / "out", tile=400, min_visible=0.5)
    assert counts == {"train": (2, 3), "val": (2, 3), "test": (2, 2)}
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    boxes = sorted(a["bbox"] for a in train["annotations"])
    assert [370.0, 10.0, 30.0, 20.0] in boxes  # clipped at the tile's right edge, kept (75 % visible)
    assert all((tmp_path / "out" / im["file_name"]).is_file() for im in train["images"])
