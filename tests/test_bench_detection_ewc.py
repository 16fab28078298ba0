"""bench/bench_detection_ewc.py's pairs: the surfaces pair is two lines on different surfaces, same classes."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.bench_scripts import load_bench


def _bench():
    return load_bench("bench_detection_ewc")


def test_surfaces_pair_is_two_lines_on_other_surfaces(tmp_path):
    bench = _bench()
    ns = argparse.Namespace(surface_images=12, smoke=False)
    name, a, b = bench._pair_data("surfaces", ns, tmp_path)
    assert name == "surfaces"
    surfaces = []
    for line in (a, b):
        coco = json.loads((line / "train.json").read_text())
        assert [c["name"] for c in coco["categories"]] == ["scratch", "dent", "stain", "hole"]
        surfaces.append(
            {
                im["file_name"].rsplit("_", 2)[-2] + "_" + im["file_name"].rsplit("_", 1)[-1][:-4]
                for im in coco["images"]
            }
        )
    assert surfaces[0] and surfaces[1] and not surfaces[0] & surfaces[1]


def test_unknown_pair_is_refused_with_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="surfaces"):
        _bench()._pair_data("marble", argparse.Namespace(smoke=False), tmp_path)
