"""Detector builder: trunks and their taps, configurable heads, trainable stages, grow_classes bit-exact."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from training.detection.model import BoxPredictor, DetectorConfigError, DetectorSpec, build_detector  # noqa: E402


def tiny(**kw) -> DetectorSpec:
    base = dict(
        classes=("square", "bar"),
        backbone="tiny_det",
        weights="none",
        image_size=(64, 64),
        fpn_channels=16,
        representation_size=32,
        anchor_sizes=(8, 16, 32, 64),
    )
    base.update(kw)
    return DetectorSpec(**base)


def test_tiny_detector_trains_and_predicts():
    torch.manual_seed(0)
    model = build_detector(tiny())
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # a negative
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert model.rpn._pre_nms_top_n["testing"] == 150 and model.rpn._post_nms_top_n["testing"] == 150
    assert model.rpn.anchor_generator.num_anchors_per_location() == [5] * 4
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.transform.min_size == (64,) and model.transform.max_size == 64


def test_trainable_stages_and_frozen_bn():
    model = build_detector(tiny(trainable_stages=2))
    body = model.backbone.body
    grads = [all(p.requires_grad for p in s.parameters()) for s in body.stages]
    assert grads == [False, False, False, True, True]
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    model.train()
    assert not body.stages[0].training and body.stages[4].training
    frozen = build_detector(tiny(trainable_stages=0, frozen_bn=False)).backbone.body
    assert not any(p.requires_grad for p in frozen.parameters())


def test_grow_classes_keeps_old_rows_bit_exact():
    torch.manual_seed(0)
    model = build_detector(tiny())
    pred: BoxPredictor = model.roi_heads.box_predictor
    old_cls_w, old_cls_b = pred.cls_score.weight.clone(), pred.cls_score.bias.clone()
    old_box_w, old_box_b = pred.bbox_pred.weight.clone(), pred.bbox_pred.bias.clone()
    x = torch.randn(5, 32)
    old_scores, old_deltas = (t.detach() for t in pred(x))
    assert pred.grow_classes(["blob", "line"]) == [3, 4]
    assert pred.classes == ["square", "bar", "blob", "line"]
    assert pred.cls_score.weight.shape == (5, 32) and pred.bbox_pred.weight.shape == (20, 32)
    assert torch.equal(pred.cls_score.weight[:3], old_cls_w) and torch.equal(pred.cls_score.bias[:3], old_cls_b)
    assert torch.equal(pred.bbox_pred.weight[:12], old_box_w) and torch.equal(pred.bbox_pred.bias[:12], old_box_b)
    scores, deltas = pred(x)
    # Weights are bit-exact; a wider matmul may sum in another order (BLAS blocking): ulp-level.
    torch.testing.assert_close(scores[:, :3], old_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(deltas[:, :12], old_deltas, rtol=0, atol=1e-6)
    with pytest.raises(DetectorConfigError, match="new distinct names"):
        pred.grow_classes(["bar"])
    model.eval()
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])  # the grown model still runs


def test_efficientnet_lite0_trunk_taps_blocks_4_10_15():
    spec = DetectorSpec(classes=("crack",), image_size=(128, 128))  # ImageNet weights from the pip package
    model = build_detector(spec)
    body = model.backbone.body
    assert body.out_channels == [40, 112, 320] and body.taps == (3, 5, 7)
    assert body.mean == [0.5, 0.5, 0.5]
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 128, 128))
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {
        "0": (16, 16),
        "1": (8, 8),
        "2": (4, 4),
        "pool": (2, 2),
    }
    assert all(v.shape[1] == 128 for v in feats.values())


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "resnet50"])
def test_torchvision_trunks_offline_error_and_random_init(name, tmp_path, monkeypatch):
    from training.backbones import WeightsUnavailableError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError, match="expected cached file"):
        build_detector(DetectorSpec(classes=("crack",), backbone=name))
    body = build_detector(DetectorSpec(classes=("crack",), backbone=name, weights="none")).backbone.body
    assert body.out_channels == ([40, 112, 960] if name == "mobilenet_v3_large" else [512, 1024, 2048])


def test_spec_validation_and_roundtrip():
    with pytest.raises(DetectorConfigError, match="model.backbone"):
        DetectorSpec(classes=("a",), backbone="vgg")
    with pytest.raises(DetectorConfigError, match="model.image_size"):
        DetectorSpec(classes=("a",), image_size=(300, 300))
    with pytest.raises(DetectorConfigError, match="model.classes"):
        DetectorSpec(classes=("a", "a"))
    with pytest.raises(DetectorConfigError, match="model.rpn_post_nms_test"):
        DetectorSpec(classes=("a",), rpn_post_nms_test=0)
    with pytest.raises(DetectorConfigError, match="tiny_det has no pretrained"):
        build_detector(DetectorSpec(classes=("a",), backbone="tiny_det"))
    s = tiny()
    assert DetectorSpec.from_dict(s.to_dict()) == s
