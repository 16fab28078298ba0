"""Model card + safetensors round trip, atomic writes, resume state."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from training import checkpoint as ckpt  # noqa: E402
from training.backbones import REGISTRY, build_model, sized_input  # noqa: E402


def _card(**kw):
    d = dict(
        backbone="tiny_cnn",
        num_classes=3,
        classes=("ok", "crack", "stain"),
        good_classes=("ok",),
        input=sized_input(REGISTRY["tiny_cnn"], 40),
        weights="none",
        data={"source": "elpv"},
        dataset_fingerprint="abc",
        config_hash="def",
        metrics={"val": {"accuracy": 0.5}},
    )
    d.update(kw)
    return ckpt.ModelCard(**d)


def test_round_trip_run_dir_and_safetensors_path(tmp_path):
    model = build_model("tiny_cnn", 3, weights="none", input_spec=_card().input)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.body.stem[1].running_mean.add_(1.5)  # buffers travel too
    ckpt.save_model(tmp_path, model, _card())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["best.safetensors", "model.json"]  # no temp files
    x = torch.randn(3, 3, 40, 40)
    model.eval()
    for path in (tmp_path, tmp_path / "best.safetensors"):
        loaded, card = ckpt.load_model(path)
        assert card == _card() and not loaded.training
        assert torch.equal(loaded(x), model(x))
    raw = json.loads((tmp_path / "model.json").read_text())
    assert raw["input"]["height"] == 40 and raw["classes"] == ["ok", "crack", "stain"]
    assert set(raw) >= {
        "backbone",
        "num_classes",
        "classes",
        "good_classes",
        "input",
        "weights",
        "data",
        "dataset_fingerprint",
        "config_hash",
        "metrics",
    }


def test_card_errors_name_the_problem(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="num_classes=2 but 3"):
        _card(num_classes=2)
    with pytest.raises(ckpt.CheckpointError, match="good_classes"):
        _card(good_classes=("fine",))
    (tmp_path / "model.json").write_text(json.dumps({"backbone": "tiny_cnn"}))
    (tmp_path / "best.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="missing key"):
        ckpt.load_model(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.load_model(tmp_path / "nope")


def test_mismatched_weights_are_a_checkpoint_error(tmp_path):
    ckpt.save_model(tmp_path, build_model("tiny_cnn", 2, weights="none"), _card())
    with pytest.raises(ckpt.CheckpointError, match="do not match model.json"):
        ckpt.load_model(tmp_path)


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "best.safetensors"
    ckpt.save_safetensors(target, {"w": torch.ones(2)})
    before = target.read_bytes()
    with pytest.raises(AttributeError):  # safetensors refuses a non-tensor value
        ckpt.save_safetensors(target, {"w": "not a tensor"})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_resume_state_loads_with_weights_only_and_restores_rng(tmp_path):
    import random

    import numpy as np

    state = {
        "model": build_model("tiny_cnn", 2, weights="none").state_dict(),
        "epoch": 4,
        "history": [{"epoch": 1, "val": {"auroc": None, "accuracy": 0.5}}],
        "rng": ckpt.rng_state(),
    }
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.save_resume(tmp_path, state)
    back = torch.load(tmp_path / "last.pt", weights_only=True)  # the contract's loader
    assert back["epoch"] == 4 and back["history"][0]["val"]["auroc"] is None
    ckpt.set_rng_state(ckpt.load_resume(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
