"""`defectscope extend` on a detector: new classes grow the box predictor (old rows bit-exact), EWC active."""

from __future__ import annotations

import json

import pytest
import torch

from defectscope.cli import main as ds_main
from tests.training.detection.conftest import write_squares_coco

pytest.importorskip("pycocotools")


def test_extend_new_classes_keeps_old_rows_and_applies_ewc(det_run, tmp_path):
    from training.detection.checkpoint import load_detector

    _, src = det_run
    new = write_squares_coco(tmp_path / "line2", ("square", "pit"), seed=3)
    out = tmp_path / "ext"
    rc = ds_main(
        [
            "extend",
            "--from",
            str(src),
            "--data",
            str(new / "train.json"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.05",
            "--fisher-samples",
            "3",
            "--lambda",
            "1e6",
            "--replay",
            "2",
            "--threads",
            "2",
            "--quiet",
            "--panels",
            "0",
        ]
    )
    assert rc == 0
    old, _ = load_detector(src)
    grown, card = load_detector(out)
    assert card.classes == ("square", "bar", "pit") and card.parent == str(src)
    po, pg = old.roi_heads.box_predictor, grown.roi_heads.box_predictor
    assert pg.cls_score.out_features == 4 and pg.bbox_pred.out_features == 16
    assert torch.equal(pg.cls_score.weight[:3], po.cls_score.weight)
    assert torch.equal(pg.cls_score.bias[:3], po.cls_score.bias)
    assert torch.equal(pg.bbox_pred.weight[:12], po.bbox_pred.weight)
    # the rest did train
    assert not torch.equal(grown.rpn.head.conv[0][0].weight, old.rpn.head.conv[0][0].weight)
    report = json.loads((out / "report.json").read_text())
    assert report["scenario"] == "new classes" and report["new_classes"] == ["pit"] and report["replay"] == 2
    assert report["ewc_penalty_last"] > 0  # the term is in the loss once the weights moved
    assert {"old", "new"} <= set(report["before"]) and "forgetting_map50" in report
    assert (out / "fisher_source.safetensors").is_file()


@pytest.mark.parametrize("scope", ["trunk", "all"])
def test_extend_ewc_scope_decides_what_is_anchored(det_run, tmp_path, scope):
    from training.detection.checkpoint import load_detector
    from training.detection.config import EWC_SCOPES
    from training.ewc_state import EWCState

    _, src = det_run
    new = write_squares_coco(tmp_path / "line", ("square", "bar", "pit"), seed=7)
    out = tmp_path / "ext"
    argv = ["extend", "--from", str(src), "--data", str(new / "train.json"), "--out", str(out), "--epochs", "1"]
    argv += ["--max-steps-per-epoch", "1", "--fisher-samples", "2", "--threads", "2", "--quiet", "--panels", "0"]
    assert ds_main([*argv, "--ewc-scope", scope, "--lambda", "1e5"]) == 0
    covered = set(EWCState.load(out / "fisher_source.safetensors").fisher)
    model, _ = load_detector(src)
    expected = {n for n, _ in model.named_parameters() if n.startswith(EWC_SCOPES[scope])}
    assert covered == expected
    heads = {n for n in covered if n.startswith("roi_heads.")}
    # "all" anchors the box head and the old predictor rows (the predictor grew 3 -> 4 rows: new row free).
    assert (heads == set()) if scope == "trunk" else "roi_heads.box_predictor.cls_score.weight" in heads
    report = json.loads((out / "report.json").read_text())
    assert report["ewc_scope"] == scope and report["scenario"] == "new classes"


def test_extend_refuses_an_unknown_ewc_scope(det_run, tmp_path, capsys):
    from training.detection.config import DetExtendConfig, DetTrainConfig

    _, src = det_run
    with pytest.raises(SystemExit):
        ds_main(
            ["extend", "--from", str(src), "--data", "x.json", "--out", str(tmp_path / "o"), "--ewc-scope", "heads"]
        )
    assert "--ewc-scope" in capsys.readouterr().err
    train = DetTrainConfig.from_dict({"out": str(tmp_path / "o"), "data": {"path": "x.json"}}, where="test")
    with pytest.raises(ValueError, match="ewc_scope: expected one of"):
        DetExtendConfig(str(src), train, ewc_scope="heads")


def test_extend_same_classes_new_line_without_ewc(det_run, tmp_path):
    _, src = det_run
    new = write_squares_coco(tmp_path / "line3", ("bar", "square"), seed=5)  # other order: mapped by name
    out = tmp_path / "ext2"
    rc = ds_main(
        [
            "extend",
            "--from",
            str(src),
            "--data",
            str(new / "train.json"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "1",
            "--lambda",
            "0",
            "--threads",
            "2",
            "--quiet",
            "--panels",
            "0",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scenario"] == "new line" and report["classes"] == ["square", "bar"]
    assert report["ewc_penalty_last"] is None and not (out / "fisher_source.safetensors").exists()
    assert report["ewc_scope"] is None


def _auto_argv(src, new, out, *extra):
    argv = ["extend", "--from", str(src), "--data", str(new / "train.json"), "--out", str(out)]
    argv += ["--max-steps-per-epoch", "1", "--fisher-samples", "2", "--threads", "2", "--quiet", "--panels", "0"]
    return [*argv, *extra]


def test_extend_lambda_auto_is_the_default_and_records_every_grid_point(det_run, tmp_path, capsys):
    from training.detection.checkpoint import load_detector

    _, src = det_run
    new = write_squares_coco(tmp_path / "lineB", ("square", "bar"), seed=11)
    out = tmp_path / "auto"
    # no --lambda: auto; 2 epochs, 1 per grid point -> a full rerun at the pick
    argv = _auto_argv(src, new, out, "--epochs", "2", "--search-epochs", "1", "--lambda-grid", "0,1e3,1e6")
    assert ds_main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    grid = report["lambda_search"]
    assert report["lambda_mode"] == "auto" and [p["lambda"] for p in grid["points"]] == [0.0, 1e3, 1e6]
    assert grid["chosen"] == report["lambda"] and grid["chosen"] in (0.0, 1e3, 1e6)
    assert grid["epochs_per_point"] == 1 and grid["full_budget_points"] is False and report["epochs_run"] == 2
    assert grid["rule"]["kind"] == "retain" and grid["reason"]
    for p in grid["points"]:
        assert p["epochs"] == 1 and p["old_val"] is not None and p["new_val"] is not None
        assert p["mean"] == pytest.approx((p["old_val"] + p["new_val"]) / 2)
    # the EWC term is in the loss of the lambda > 0 points only (1 step: still at the anchor, so 0)
    assert grid["points"][2]["ewc_penalty_last"] is not None and grid["points"][0]["ewc_penalty_last"] is None
    # the naive reference: the lambda-0 point, also on the test splits
    assert report["naive"]["lambda"] == 0.0 and report["naive"]["test"]["old"]["map50"] is not None
    assert "naive reference (lambda 0" in printed and "lambda 1e+06" in printed
    # the run card records the search; the grid points' run folders are gone
    _, card = load_detector(out)
    assert [p["lambda"] for p in card.metrics["lambda_search"]["points"]] == [0.0, 1e3, 1e6]
    assert not (out / "lambda-search").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lam"] == "auto" and cfg["lambda_grid"] == [0.0, 1e3, 1e6]


def test_extend_lambda_auto_at_full_budget_keeps_the_picked_run(det_run, tmp_path):
    from safetensors.torch import load_file

    from training.detection.checkpoint import load_detector

    _, src = det_run
    new = write_squares_coco(tmp_path / "lineB", ("square", "bar"), seed=13)
    out = tmp_path / "auto-full"
    argv = _auto_argv(src, new, out, "--epochs", "1", "--lambda", "auto", "--lambda-grid", "0,1e4")
    assert ds_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lambda_search"]["full_budget_points"] is True and report["epochs_run"] == 1
    model, card = load_detector(out)  # the checksum in the card names the copied weights
    sd = load_file(str(out / "best.safetensors"))
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items() if k in sd)
    assert card.metrics["lambda_search"]["chosen"] == report["lambda"]


def test_extend_fixed_lambda_says_how_to_get_the_naive_reference(det_run, tmp_path, capsys):
    _, src = det_run
    new = write_squares_coco(tmp_path / "lineB", ("square", "bar"), seed=17)
    out = tmp_path / "fixed"
    assert ds_main(_auto_argv(src, new, out, "--epochs", "1", "--lambda", "1e4")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lambda_mode"] == "fixed" and report["lambda_search"] is None and report["naive"] is None
    assert "rerun with --lambda 0" in capsys.readouterr().out


def test_extend_help_shows_lambda_auto_as_the_default(capsys):
    from training.detection.cli import build_extend_parser

    text = build_extend_parser().format_help()
    assert "(default: auto)" in " ".join(text.split()) and "--lambda-grid" in text and "--search-epochs" in text
    with pytest.raises(SystemExit):
        build_extend_parser().parse_args(["--from", "r", "--data", "d", "--out", "o", "--lambda", "strong"])
    assert "expected a number or 'auto'" in capsys.readouterr().err


def test_fisher_estimate_leaves_batchnorm_statistics_unchanged(tmp_path):
    # train-mode forwards update unfrozen BN statistics; --lambda auto's naive point must start from the
    # source model itself, as a --lambda 0 run does
    import cv2
    import numpy as np

    from tests.training.detection.helpers import SIZE, train_tiny_detector
    from training.detection.config import EWC_SCOPES
    from training.detection.ewc import detection_fisher
    from training.detection.formats import DetSample
    from training.detection.loader import DetectionDataset

    model = train_tiny_detector()
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert any("running_mean" in n for n in before)
    samples = []
    for i in range(3):
        img = np.random.default_rng(i).normal(60, 8, (SIZE, SIZE)).clip(0, 255).astype(np.uint8)
        img[10:26, 10:26] = 220
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
        samples.append(DetSample(str(tmp_path / f"{i}.png"), SIZE, SIZE, ((10.0, 10.0, 26.0, 26.0),), (0,)))
    fisher, n = detection_fisher(model, DetectionDataset(samples, (SIZE, SIZE)), 3, EWC_SCOPES["all"])
    assert n == 3 and any(f.abs().sum() > 0 for f in fisher.values())
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
