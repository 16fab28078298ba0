"""Datasets -> tiny detector -> boxes in original pixels (letterboxed input), flip TTA, COCO + part metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("pycocotools")

from runtime.inference.boxes import BoxPolicy  # noqa: E402
from tests.training.detection.helpers import squares_batch, train_tiny_detector  # noqa: E402
from training.detection.coco_eval import coco_metrics, part_metrics  # noqa: E402
from training.detection.datasets import resolve_detection  # noqa: E402
from training.detection.formats import DetSample, write_coco  # noqa: E402
from training.detection.loader import DetectionDataset  # noqa: E402
from training.detection.predict import predict  # noqa: E402


@pytest.fixture(scope="module")
def squares_coco(tmp_path_factory):
    """10 images at 128x96 (letterboxed to 64x64: scale 0.5, 8 px pads), 2 of them clean."""
    root = tmp_path_factory.mktemp("sq")
    (root / "images").mkdir()
    rng = np.random.default_rng(7)
    samples = []
    images, targets = squares_batch(rng, 8, size=64)
    for i in range(10):
        if i < 8:
            small = (images[i][0].numpy() * 255).round().astype(np.uint8)[8:56]  # 48x64: a 2:3 part
            big = cv2.resize(small, (128, 96), interpolation=cv2.INTER_NEAREST)
            b = targets[i]["boxes"].numpy()
            keep = (b[:, 1] >= 8) & (b[:, 3] <= 56)
            boxes = [
                tuple(float(v) for v in (x0 * 2, (y0 - 8) * 2, x1 * 2, (y1 - 8) * 2)) for x0, y0, x1, y1 in b[keep]
            ]
            labels = tuple(int(v) - 1 for v in targets[i]["labels"].numpy()[keep])
        else:
            big, boxes, labels = np.full((96, 128), 60, np.uint8), [], ()
        path = root / "images" / f"{i}.png"
        cv2.imwrite(str(path), big)
        samples.append(DetSample(str(path), 128, 96, tuple(boxes), labels))
    (root / "train.json").write_text(json.dumps(write_coco(samples, ["square", "bar"], root)))
    return root


def test_predictions_come_back_in_original_pixels(squares_coco):
    model = train_tiny_detector()
    s = resolve_detection({"path": str(squares_coco / "train.json"), "test_fraction": 0.0, "val_fraction": 0.0})
    ds = DetectionDataset(s.train, (64, 64))
    preds = predict(model, ds)
    with torch.no_grad():
        raw = model([ds[0][0]])[0]
    g = ds[0][1]["geometry"]
    assert (g.scale_x, g.pad_y) == (0.5, 8.0)
    np.testing.assert_allclose(preds[0][0], g.to_original(raw["boxes"].numpy()), atol=1e-4)
    assert preds[0][2].tolist() == (raw["labels"].numpy() - 1).tolist()
    for boxes, _, _ in preds:
        assert (boxes[:, [0, 2]] <= 128).all() and (boxes[:, [1, 3]] <= 96).all() and (boxes >= 0).all()
    m = coco_metrics(s.train, preds, s.classes)
    # A 60-step toy model, scored in the original frame: it finds the squares (random boxes score ~0);
    # the exact figure moves with the CPU's float summation order (0.29 on a Xeon, 0.3-0.35 on an EPYC).
    assert m["map50"] > 0.2, m
    part = part_metrics(s.train, preds, s.classes, BoxPolicy(default_threshold=0.5))
    n_def = sum(not x.negative for x in s.train)
    assert part["defective"] == n_def and part["clean"] == 10 - n_def >= 2
    assert part["recall"] > 0.5


def test_flip_tta_merges_views_in_one_call(squares_coco):
    model = train_tiny_detector()
    s = resolve_detection({"path": str(squares_coco / "train.json"), "test_fraction": 0.0, "val_fraction": 0.0})
    pos = [x for x in s.train if not x.negative][:4]
    ds = DetectionDataset(pos, (64, 64))
    calls = []
    h = model.register_forward_pre_hook(lambda mod, args: calls.append(len(args[0])))
    try:
        tta = predict(model, ds, views=("original", "hflip"), batch_size=4)
    finally:
        h.remove()
    assert calls == [8]  # 4 frames x 2 views, one forward
    plain = predict(model, ds)
    m_tta = coco_metrics(pos, tta, s.classes)["map50"]
    m_plain = coco_metrics(pos, plain, s.classes)["map50"]
    assert m_tta > 0.5 * m_plain  # merged boxes still sit on the defects
    with pytest.raises(ValueError, match="tta views"):
        predict(model, ds, views=("rot90",))
