"""The one task table: each verb picks classifier or detector once, from what it is given."""

from __future__ import annotations

import json

import pytest

from defectscope.cli import load
from defectscope.tasks import TASKS, VERBS, Task, kind_of, register


def test_a_task_kind_registered_twice_is_refused():
    class Again(Task):
        name = "detection"
        training, export, calibrate = "x:y", "x:y", "x:y"

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)


def test_a_task_kind_missing_a_verb_is_refused():
    class Half(Task):
        name = "half"
        training = "x:y"

    with pytest.raises(ValueError, match="no \\['export', 'calibrate'\\]"):
        register(Half)
    assert "half" not in TASKS


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_every_command_of_every_kind_exists(kind):
    pytest.importorskip("torch")
    for verb in VERBS:
        assert callable(load(TASKS[kind].command(verb), verb))


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_every_kind_has_one_training_task_of_the_same_shape(kind):
    pytest.importorskip("torch")
    from training.engine import TaskKind

    task = TASKS[kind].training_task()
    assert isinstance(task, TaskKind) and task.name == kind
    assert sorted(task.commands) == ["evaluate", "extend", "train"]
    assert callable(task.load_data) and callable(task.build_model) and hasattr(task.hooks, "step")


def test_the_kind_comes_from_the_data_the_run_card_or_the_bundle(tmp_path):
    coco = tmp_path / "train.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    det_run, cls_run, det_bundle = tmp_path / "det", tmp_path / "cls", tmp_path / "bundle"
    for d in (det_run, cls_run, det_bundle):
        d.mkdir()
    (det_run / "model.json").write_text(json.dumps({"task": "detection"}))
    (cls_run / "model.json").write_text(json.dumps({"backbone": "tiny_cnn"}))
    (det_bundle / "manifest.json").write_text(json.dumps({"model": {"task": "detection"}}))

    assert kind_of("train", ["--data", str(coco), "--out", "o"]) == "detection"
    assert kind_of("train", ["--data", "elpv"]) == "classification"
    assert kind_of("train", ["--task", "detection", "--data", "elpv"]) == "detection"
    assert kind_of("evaluate", [str(det_run), "--tta", "flips"]) == "detection"
    assert kind_of("export", ["--out", str(tmp_path / "new"), str(det_run)]) == "detection"
    assert kind_of("export", [str(cls_run), "--out", "o"]) == "classification"
    assert kind_of("extend", ["--from", str(det_run), "--data", "d"]) == "detection"
    assert kind_of("calibrate", [str(det_bundle), "--threads", "1"]) == "detection"
    assert kind_of("calibrate", ["--help"]) == "classification"


@pytest.mark.parametrize("verb", ["train", "evaluate"])
def test_help_before_a_kind_is_chosen_shows_both_kinds(verb, capsys):
    from defectscope.cli import main as ds_main

    with pytest.raises(SystemExit) as exc:
        ds_main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"=== {verb} of a classification model ===" in out and f"=== {verb} of a detection model ===" in out
    if verb == "train":
        assert "--det-init" in out and "--strategy" in out
        # A kind the arguments decide: that kind's help only.
        with pytest.raises(SystemExit):
            ds_main([verb, "--help", "--task", "detection"])
        assert "===" not in capsys.readouterr().out
