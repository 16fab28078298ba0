"""Classifier training levers (off by default until measured): EMA, TrivialAugment / RandAugment,
MixUp / CutMix. Mechanics only; bench/bench_defaults.py measures whether they help."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from training.classification.config import AugmentConfig, ConfigError  # noqa: E402


@pytest.mark.parametrize("policy", ["trivial", "rand"])
def test_policies_keep_the_pipeline_contract(policy):
    from runtime.inference.preprocess import InputSpec
    from training.classification.transforms import train_pipeline

    spec = InputSpec(height=32, width=32, resize_size=32)
    pipe = train_pipeline(spec, AugmentConfig(policy=policy))
    assert any(type(t).__name__ in ("TrivialAugmentWide", "RandAugment") for t in pipe.tail.transforms)
    out = pipe.tail(torch.randint(0, 255, (1, 32, 32), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    with pytest.raises(ConfigError, match="augment.policy"):
        AugmentConfig(policy="auto")


def test_mixup_cutmix_soft_labels_reach_the_loss():
    from training.classification.task import ClassificationTask
    from training.classification.transforms import batch_mix
    from training.engine import Engine

    assert batch_mix(AugmentConfig(), 3) is None
    mix = batch_mix(AugmentConfig(mixup=0.4, cutmix=1.0), 3)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    mx, my = mix(x, y)
    assert my.shape == (6, 3) and torch.allclose(my.sum(1), torch.ones(6))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    task = ClassificationTask(torch.nn.CrossEntropyLoss(label_smoothing=0.1), mix=mix)
    r = task.step(model, (x, y), Engine(task=task))
    r.loss.backward()
    assert r.n == 6 and 0 <= r.correct <= 6 and model[1].weight.grad is not None
    with pytest.raises(ConfigError, match="augment.mixup"):
        AugmentConfig(mixup=-1.0)


def test_levers_through_the_classifier_cli(folder_data, tmp_path):
    from training.classification.cli import train_main

    run = tmp_path / "run"
    argv = ["--data", str(folder_data), "--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32"]
    argv += ["--epochs", "2", "--head-epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(run)]
    argv += ["--quiet", "--ema", "0.9", "--augment", "policy=trivial", "--augment", "mixup=0.2"]
    assert train_main([*argv, "--augment", "cutmix=1.0", "--max-steps-per-epoch", "2"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["ema"] == 0.9 and cfg["augment"]["policy"] == "trivial" and cfg["augment"]["cutmix"] == 1.0
    assert len(json.loads((run / "metrics.json").read_text())) == 3
    assert train_main([*argv[:-6], "--ema", "1.0", "--overwrite"]) == 2


def test_levers_off_leave_the_config_hash_of_older_runs_unchanged():
    from training.classification.config import TrainConfig
    from training.classification.data import DataSpec
    from training.config_io import drop_when_off
    from training.detection.config import DetTrainConfig
    from training.detection.datasets import DetectionSpec
    from training.detection.transforms import AugmentSpec

    d = {"a": 1, "plan": "off", "augment": {"mixup": 0.0, "hflip": True}}
    assert drop_when_off(d, {"plan": "off", "augment.mixup": 0.0}) == {"a": 1, "augment": {"hflip": True}}
    base = TrainConfig(data=DataSpec(source="folder", path="/x"))
    older = base.to_dict()
    for k in ("plan", "ema"):
        older.pop(k)
    for k in ("policy", "mixup", "cutmix"):
        older["augment"].pop(k)
    import hashlib
    import json as _json

    for k in ("out", "threads", "workers", "device"):
        older.pop(k, None)
    assert base.hash() == hashlib.sha256(_json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    assert TrainConfig(data=base.data, ema=0.9).hash() != base.hash()
    det = DetTrainConfig(DetectionSpec("/x/train.json"))
    assert det.with_(augment=AugmentSpec(copy_paste=0.5)).hash() != det.hash()
    assert det.with_(pinned=("epochs",)).hash() == det.hash()  # what the user typed is not what runs
