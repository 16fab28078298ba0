"""Detector --resume: an interrupted run continues from last.pt and ends where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from defectscope.cli import main as ds_main  # noqa: E402
from tests.training.detection.conftest import TINY, write_squares_coco  # noqa: E402


def _argv(root, out):
    return ["train", "--data", str(root / "train.json"), "--out", str(out), *TINY, "--epochs", "3"]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    from training.detection.trainer import train_detector

    root = write_squares_coco(tmp_path / "coco", ("square", "bar"))
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert ds_main([*_argv(root, full), "--max-steps-per-epoch", "2", "--panels", "0"]) == 0

    def stop_after_second(line: str) -> None:  # the epoch line comes after last.pt is written
        if line.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    from training.detection.cli import build_train_parser, config_from_args

    cfg = config_from_args(build_train_parser().parse_args([*_argv(root, cut)[1:], "--max-steps-per-epoch", "2"]))
    cfg = cfg.with_(panels=0)
    with pytest.raises(KeyboardInterrupt):
        train_detector(cfg, echo=stop_after_second)
    assert len(json.loads((cut / "metrics.json").read_text())) == 2 and (cut / "last.pt").is_file()
    # Without --resume the run is not overwritten; with it, it continues at epoch 3 from its config.json.
    assert ds_main(_argv(root, cut)) == 2
    assert "--resume" in capsys.readouterr().err
    assert ds_main(["train", "--out", str(cut), "--resume", "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    a, b = json.loads((full / "metrics.json").read_text()), json.loads((cut / "metrics.json").read_text())
    assert [h["epoch"] for h in b] == [1, 2, 3]
    assert b[-1]["train_loss"] == pytest.approx(a[-1]["train_loss"], rel=1e-5)
    wa, wb = load_file(str(full / "best.safetensors")), load_file(str(cut / "best.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # Another configuration is refused, not mixed in.
    assert ds_main(["train", "--out", str(cut), "--resume", "--lr", "0.5"]) == 2
    assert "another configuration" in capsys.readouterr().err
