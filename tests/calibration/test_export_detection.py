"""Detector export: opset 17, fixed shapes, onnx.checker, real ONNX Runtime parity with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from calibration.export_detection import (  # noqa: E402
    DetectionExportError,
    check_detection_graph,
    export_detector,
    parity,
    quant_preprocess,
)
from tests.training.detection.helpers import SIZE, squares_batch, train_tiny_detector  # noqa: E402


@pytest.fixture(scope="module")
def detector():
    return train_tiny_detector()


@pytest.fixture(scope="module")
def held_out():
    images, targets = squares_batch(np.random.default_rng(99), 6)
    return [im.numpy() for im in images], targets


@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "model.onnx"
    return path, export_detector(detector, path)


def test_graph_contract(exported):
    path, info = exported
    g = onnx.load(str(path))
    assert info.opset == 17 and info.exporter == "torchscript" and (info.height, info.width) == (SIZE, SIZE)
    assert max(op.version for op in g.opset_import if op.domain in ("", "ai.onnx")) == 17
    check_detection_graph(g, 1, SIZE, SIZE, 20)
    ops: set[str] = set()

    def walk(graph):  # NMS sits inside If/Loop subgraphs
        for n in graph.node:
            ops.add(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(g.graph)
    assert {"NonMaxSuppression", "RoiAlign"} <= ops
    assert info.input["resize_policy"] == "letterbox" and info.input["label_offset"] == 1
    with pytest.raises(DetectionExportError, match="exported inputs"):
        check_detection_graph(g, 2, SIZE, SIZE, 20)


def test_parity_with_pytorch_on_held_out_images(detector, exported, held_out):
    path, _ = exported
    images, _ = held_out
    report = parity(detector, path, images, score_threshold=0.3)
    assert report["detections"] >= 4  # the check compared real boxes
    assert report["min_iou"] >= 0.98 and report["max_score_diff"] <= 1e-3
    # Padded rows: score 0 / label 0, fixed D.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = sess.run(None, {"input": images[0][None]})
    assert boxes.shape == (1, 20, 4) and scores.shape == labels.shape == (1, 20) and labels.dtype == np.int64
    n = int((scores[0] > 0).sum())
    assert n < 20 and (scores[0, n:] == 0).all() and (labels[0, n:] == 0).all()
    assert set(labels[0, :n].tolist()) <= {1, 2}


def test_parity_fails_on_a_different_model(exported, held_out):
    path, _ = exported
    other = train_tiny_detector(steps=3, seed=1)
    with pytest.raises(DetectionExportError, match="image 0"):
        parity(other, path, held_out[0][:1], score_threshold=0.05)


def test_batched_export_and_int8_preprocess(detector, held_out, tmp_path):
    path = tmp_path / "b2.onnx"
    export_detector(detector, path, batch=2)
    images = held_out[0][:3]  # odd count: the last batch is padded
    assert parity(detector, path, images)["images"] == 3
    pre = quant_preprocess(path, tmp_path / "pre.onnx")
    sess_a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess_b = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"])
    x = np.stack(images[:2])
    for a, b in zip(sess_a.run(None, {"input": x}), sess_b.run(None, {"input": x})):
        np.testing.assert_allclose(a, b, atol=1e-4)
