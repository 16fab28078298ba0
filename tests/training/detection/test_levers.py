"""Detector training levers (off by default until measured): weight EMA, copy-paste, multi-scale,
gradual unfreezing of the trunk. Mechanics only; whether they help is bench/bench_defaults.py's job."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from tests.training.detection.conftest import TINY, write_squares_coco  # noqa: E402


def test_weight_ema_averages_applies_and_restores():
    from training.ema import WeightEMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, 0.5)
    w0 = model.weight.detach().clone()
    with ema.applied():  # no update yet: nothing to apply
        assert torch.equal(model.weight, w0)
    ema.update()  # first update copies
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # 0.5 * w0 + 0.5 * (w0 + 1)
    live = model.weight.detach().clone()
    with ema.applied():
        torch.testing.assert_close(model.weight, w0 + 0.5)
    assert torch.equal(model.weight, live)
    with pytest.raises(ValueError, match="ema: expected a decay"):
        WeightEMA(model, 1.5)


def test_copy_paste_adds_donor_crops_with_their_boxes(tmp_path):
    from training.detection.copy_paste import CopyPasteDataset
    from training.detection.datasets import DetectionSpec, resolve_detection
    from training.detection.transforms import eval_transform

    root = write_squares_coco(tmp_path / "coco", ("square", "bar"))
    splits = resolve_detection(DetectionSpec(path=str(root / "train.json")))
    torch.manual_seed(0)
    ds = CopyPasteDataset(splits.train, (64, 64), eval_transform(), p=1.0, max_paste=2)
    grew = 0
    for i in range(len(ds)):
        base_img, base_t = ds.load(i)
        img, t = ds[i]
        n0, n = len(base_t["boxes"]), len(t["boxes"])
        assert n >= n0 and len(t["labels"]) == n
        assert torch.equal(t["boxes"][:n0], base_t["boxes"]) and torch.equal(t["labels"][:n0], base_t["labels"])
        for b in t["boxes"][n0:]:  # pasted boxes overlap no box that was there
            x0, y0, x1, y1 = (int(v) for v in b)
            assert img[:, y0:y1, x0:x1].numel() > 0
            for o in base_t["boxes"]:
                ix = min(x1, float(o[2])) - max(x0, float(o[0]))
                iy = min(y1, float(o[3])) - max(y0, float(o[1]))
                assert ix <= 0 or iy <= 0
        grew += n > n0
    assert grew > len(ds) // 2


def test_multiscale_trains_at_several_sizes_and_evaluates_at_the_input():
    from training.detection.model import DetectorSpec, build_detector
    from training.detection.trainer import set_multiscale

    spec = DetectorSpec(
        classes=("a",),
        backbone="tiny_det",
        weights="none",
        image_size=(64, 64),
        fpn_channels=16,
        representation_size=32,
    )
    model = build_detector(spec)
    assert set_multiscale(model, (64, 64), (0.5, 1.0, 1.5)) == (32, 96, 64)
    seen = set()
    for _ in range(20):
        images, _ = model.transform([torch.rand(3, 64, 64)])
        seen.add(tuple(images.tensors.shape[-2:]))
    assert {(32, 32), (96, 96), (64, 64)} <= seen
    model.eval()
    images, _ = model.transform([torch.rand(3, 64, 64)])
    assert tuple(images.tensors.shape[-2:]) == (64, 64)


def test_levers_through_the_cli(tmp_path):
    from defectscope.cli import main as ds_main

    root = write_squares_coco(tmp_path / "coco", ("square", "bar"))
    run = tmp_path / "run"
    argv = ["train", "--data", str(root / "train.json"), "--out", str(run), *TINY, "--panels", "0"]
    argv += ["--epochs", "3", "--max-steps-per-epoch", "1", "--ema", "0.9", "--freeze-trunk-epochs", "1"]
    argv += ["--copy-paste", "0.5", "--multiscale", "0.75,1,1.25"]
    assert ds_main(argv) == 0
    hist = json.loads((run / "metrics.json").read_text())
    assert [h["trunk_trainable_stages"] for h in hist] == [0, 1, 2]  # frozen, then one stage per epoch
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["ema"] == 0.9 and cfg["augment"]["copy_paste"] == 0.5 and cfg["augment"]["multiscale"] == [0.75, 1, 1.25]
    assert ds_main([*argv[:-2], "--multiscale", "9", "--overwrite"]) == 2
