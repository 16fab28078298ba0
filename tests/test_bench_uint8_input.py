"""bench/bench_uint8_input.py on a tiny bundle: the uint8 twin and its float twin give the same verdicts."""

from __future__ import annotations

import json

import cv2
import numpy as np

from tests.bench_scripts import load_bench
from tests.runtime.test_uint8_input import _u8_bundle


def _bench():
    return load_bench("bench_uint8_input")


def test_twins_compared_on_an_image_folder(tmp_path, capsys):
    bundle = _u8_bundle(tmp_path)
    rng = np.random.default_rng(0)
    for cls in ("ok", "defect"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / "imgs" / cls / f"{i}.png"), img)
    out = tmp_path / "u8.json"
    argv = ["--bundle", str(bundle), "--images", str(tmp_path / "imgs"), "--backends", "onnxruntime-cpu"]
    assert _bench().main([*argv, "--out", str(out), "--threads", "1"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["float"], row["uint8"], row["n"]) == ("fp32", "fp32-u8", 8)
    assert row["differing_verdicts"] == 0 and row["max_abs_logit_diff"] < 1e-4
    assert row["accuracy_float"] == row["accuracy_uint8"]
    assert "fp32 -> fp32-u8" in capsys.readouterr().out
