"""COCO-pretrained start (--det-init coco): key mapping, predictor replacement, offline error, the whole path.

The "COCO" files here are state dicts saved from randomly initialised torchvision detectors of each kind
(no download): the loader must take every tensor but the 91-class predictor, bit-exact.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
tvd = pytest.importorskip("torchvision.models.detection")

from training.detection.model import DetectorConfigError, DetectorSpec, build_detector  # noqa: E402
from training.detection.tv_detectors import COCO_DETECTORS, coco_file_name  # noqa: E402

PRED = "roi_heads.box_predictor."


def coco_file(tmp_path, name: str, prefix: str = "", num_classes: int = 91):
    torch.manual_seed(1)
    ref = getattr(tvd, name)(weights=None, weights_backbone=None, num_classes=num_classes)
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path, ref.state_dict()


def spec(name: str, path, **kw) -> DetectorSpec:
    return DetectorSpec(
        classes=("scratch", "dent"), backbone=name, det_init="coco", det_weights=str(path), image_size=(64, 64), **kw
    )


def assert_loaded(model, ref, fresh=()):
    own = model.state_dict()
    for k, v in ref.items():
        if k.startswith(PRED) or k.endswith("num_batches_tracked") or k.startswith(tuple(fresh)):
            continue
        assert torch.equal(own[k], v), k
    p = model.roi_heads.box_predictor
    assert p.classes == ["scratch", "dent"]
    assert p.cls_score.out_features == 3 and p.bbox_pred.out_features == 12


def train_step(model):
    model.train()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 10.0, 60.0, 16.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()


@pytest.mark.parametrize(
    "name",
    [
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "fasterrcnn_mobilenet_v3_large_fpn",
        pytest.param("fasterrcnn_resnet50_fpn_v2", marks=pytest.mark.slow),
    ],
)
def test_coco_weights_load_everything_but_the_predictor(name, tmp_path):
    path, ref = coco_file(tmp_path, name)
    model = build_detector(spec(name, path))
    assert_loaded(model, ref)
    anchors = model.rpn.anchor_generator
    assert anchors.aspect_ratios[0] == (0.5, 1.0, 2.0)  # COCO's anchors kept: the RPN head fits them
    train_step(model)


def test_key_mapping_prefixes_other_predictors_and_wrong_files(tmp_path):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    # A DDP-saved fine-tuned detector with its own 5-class predictor: prefix stripped, predictor replaced.
    path, ref = coco_file(tmp_path, name, prefix="module.", num_classes=5)
    assert_loaded(build_detector(spec(name, path)), ref)
    # Another architecture's file: refused with the file named, not half-loaded.
    other, _ = coco_file(tmp_path, "fasterrcnn_mobilenet_v3_large_fpn")
    state = torch.load(other, weights_only=True)
    state["backbone.body.0.0.weight"] = torch.zeros(1)
    torch.save(state, other)
    with pytest.raises(ValueError, match=f"{other.name}.*backbone.body.0.0.weight"):
        build_detector(spec(name, other))
    junk = tmp_path / "junk.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, junk)
    with pytest.raises(ValueError, match="junk.pth: not a FasterRCNN checkpoint"):
        build_detector(spec(name, junk))


def test_changed_anchors_start_only_the_rpn_outputs_afresh(tmp_path):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    path, ref = coco_file(tmp_path, name)
    model = build_detector(spec(name, path, aspect_ratios=(0.125, 0.25, 1.0, 4.0, 8.0), anchor_sizes=(8, 16, 32)))
    assert model.rpn.head.cls_logits.out_channels == 15  # 3 sizes x 5 ratios per location
    assert_loaded(model, ref, fresh=("rpn.head.cls_logits.", "rpn.head.bbox_pred."))
    assert torch.equal(model.state_dict()["rpn.head.conv.0.0.weight"], ref["rpn.head.conv.0.0.weight"])
    train_step(model)


def test_offline_without_the_file_names_it_and_where_it_goes(tmp_path, monkeypatch):
    from training.weights import WeightsUnavailableError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DEFECTSCOPE_OFFLINE", "1")
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    s = DetectorSpec(classes=("a",), backbone=name, det_init="coco", image_size=(64, 64))
    with pytest.raises(WeightsUnavailableError) as e:
        build_detector(s)
    msg = str(e.value)
    assert coco_file_name(name) in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "--det-weights" in msg
    # A checkpoint reload never looks for COCO weights (they are in best.safetensors).
    assert build_detector(s, pretrained=False).roi_heads.box_predictor.classes == ["a"]


def test_spec_validation():
    with pytest.raises(DetectorConfigError, match="model.det_init: 'coco' needs a torchvision detector"):
        DetectorSpec(classes=("a",), det_init="coco")
    with pytest.raises(DetectorConfigError, match="model.det_init"):
        DetectorSpec(classes=("a",), backbone="fasterrcnn_mobilenet_v3_large_fpn", det_init="imagenet")
    with pytest.raises(DetectorConfigError, match="model.weights"):
        DetectorSpec(classes=("a",), backbone="fasterrcnn_mobilenet_v3_large_fpn")
    with pytest.raises(DetectorConfigError, match="model.anchor_sizes: expected 5"):
        DetectorSpec(classes=("a",), backbone="fasterrcnn_resnet50_fpn_v2", det_init="coco", anchor_sizes=(8, 16))
    s = DetectorSpec(classes=("a",), backbone="fasterrcnn_resnet50_fpn_v2", det_init="coco")
    assert s.anchor_sizes == COCO_DETECTORS[s.backbone].anchor_sizes
    assert DetectorSpec.from_dict(s.to_dict()) == s
    assert DetectorSpec(classes=("a",)).aspect_ratios == (0.25, 0.5, 1.0, 2.0, 4.0)  # the trunks' thin ratios


COCO_TINY = ["--image-size", "64,64", "--rpn-pre-nms-train", "200", "--rpn-post-nms-train", "100"]


def test_coco_detector_trains_extends_exports_quantizes_and_serves(tmp_path):
    """mobilenet_320 from a COCO file through train -> extend (EWC) -> export (ORT parity) -> INT8 -> serve."""
    import numpy as np

    pytest.importorskip("onnxruntime")
    pytest.importorskip("pycocotools")
    from defectscope.cli import main as ds_main
    from tests.training.detection.conftest import write_squares_coco

    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    weights, _ = coco_file(tmp_path, name)
    root = write_squares_coco(tmp_path / "coco", ("square", "bar"))
    run, ext, bundle = tmp_path / "run", tmp_path / "ext", tmp_path / "bundle"
    common = ["--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "2", "--threads", "2", "--panels", "0"]
    argv = ["train", "--data", str(root / "train.json"), "--out", str(run), "--backbone", name, "--quiet"]
    assert ds_main([*argv, "--det-init", "coco", "--det-weights", str(weights), *COCO_TINY, *common]) == 0
    card = json.loads((run / "model.json").read_text())
    assert card["detector"]["det_init"] == "coco" and card["detector"]["backbone"] == name
    new = write_squares_coco(tmp_path / "line2", ("square", "pit"), seed=3)
    argv = ["extend", "--from", str(run), "--data", str(new / "train.json"), "--out", str(ext), "--quiet"]
    assert ds_main([*argv, "--lambda", "1000", "--fisher-samples", "2", *common]) == 0
    assert (ext / "fisher_source.safetensors").is_file()
    assert ds_main(["export", str(ext), "--out", str(bundle), "--threads", "2", "--parity-images", "2"]) == 0
    assert ds_main(["calibrate", str(bundle), "--run", str(ext), "--size", "4", "--threads", "2"]) == 0
    import time

    from runtime.bundle.load import load_bundle
    from runtime.config.station import from_dict
    from runtime.inference.model import load_model
    from runtime.sources.cameras import Frame

    b = load_bundle(bundle)
    assert list(b.manifest.classes) == ["ok", "square", "bar", "pit"]
    cfg = from_dict(
        {
            "station": "s",
            "cameras": [{"id": "c", "source": str(tmp_path)}],
            "model": {"bundle": str(bundle), "backend": "onnxruntime-cpu", "warmup_runs": 0},
        },
        base=tmp_path,
    )
    served = load_model(cfg)
    raw = np.full((64, 64, 3), 90, np.uint8)
    frame = Frame("c", 0, raw, time.time(), time.monotonic())
    served.prepare(frame)
    (pred,) = served.post(served.backend.run(frame.tensor), 1, 1, [frame.geometry])
    assert served.decider.decide(pred).verdict in ("ok", "defect", "uncertain")
    served.close()


def test_cli_offline_coco_start_is_a_clear_error(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pycocotools")
    from defectscope.cli import main as ds_main
    from tests.training.detection.conftest import write_squares_coco

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DEFECTSCOPE_OFFLINE", "1")
    root = write_squares_coco(tmp_path / "coco", ("square",))
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    argv = ["train", "--data", str(root / "train.json"), "--out", str(tmp_path / "run"), "--backbone", name]
    assert ds_main([*argv, "--det-init", "coco", *COCO_TINY, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pretrained weights for") and coco_file_name(name) in err
    assert "Traceback" not in err
