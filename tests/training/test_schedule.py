"""Strategy plans, discriminative learning rates and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from training.backbones import build_model  # noqa: E402
from training.classification.config import ConfigError, TrainConfig, load_config  # noqa: E402
from training.classification.strategy import make_plan  # noqa: E402
from training.schedule import build_optimizer, warmup_cosine  # noqa: E402


def _plan(**kw):
    cfg = TrainConfig(backbone="tiny_cnn", weights="none", **kw)
    return [(p.phase, p.n_trainable) for p in make_plan(cfg, n_groups=4)]


def test_strategy_plans():
    assert _plan(strategy="linear-probe", epochs=3) == [("head", 1)] * 3
    assert _plan(strategy="two-phase", epochs=2, head_epochs=2) == [("head", 1)] * 2 + [("finetune", 4)] * 2
    assert _plan(strategy="two-phase", epochs=1, head_epochs=1, unfreeze_groups=2) == [("head", 1), ("finetune", 2)]
    assert _plan(strategy="partial", epochs=2) == [("finetune", 3)] * 2  # default: last 3 groups
    assert _plan(strategy="full", epochs=2, head_epochs=1) == [("head", 1), ("finetune", 4), ("finetune", 4)]
    assert _plan(strategy="gradual", epochs=6, gradual_every=2) == [
        ("finetune", 1),
        ("finetune", 1),
        ("finetune", 2),
        ("finetune", 2),
        ("finetune", 3),
        ("finetune", 3),
    ]
    assert _plan(strategy="gradual", epochs=4, head_epochs=1) == [
        ("head", 1),
        ("finetune", 2),
        ("finetune", 3),
        ("finetune", 4),
        ("finetune", 4),
    ]


def test_warmup_cosine_shape():
    f = warmup_cosine(total_steps=20, warmup_steps=4)
    vals = [f(i) for i in range(20)]
    assert vals[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert vals[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))
    assert f(12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_discriminative_lr_per_group_over_the_schedule():
    model = build_model("tiny_cnn", 2, weights="none")
    model.set_trainable(None)
    lr, decay, total, warm = 1e-2, 0.5, 12, 3
    opt, sched = build_optimizer(model, 4, lr, decay, weight_decay=0.05, total_steps=total, warmup_steps=warm)
    names = [g["name"] for g in opt.param_groups]
    assert names[0] == "head" and "stem" in names and "stem.no_decay" in names
    depth = {"head": 0, "stage2": 1, "stage1": 2, "stem": 3}
    f = warmup_cosine(total, warm)
    for step in range(total):
        for g in opt.param_groups:
            k = depth[g["name"].split(".")[0]]
            assert g["lr"] == pytest.approx(lr * decay**k * f(step)), (step, g["name"])
            assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)
        opt.step()
        sched.step()
    # Only trainable groups get optimizer groups; norms/biases never decayed.
    model.set_trainable(2)
    opt2, _ = build_optimizer(model, 2, lr, decay, 0.05, total, warm)
    assert {g["name"].split(".")[0] for g in opt2.param_groups} == {"head", "stage2"}
    assert all(p.ndim <= 1 for g in opt2.param_groups if g["name"].endswith("no_decay") for p in g["params"])


def test_offset_continues_the_schedule_after_rebuild():
    model = build_model("tiny_cnn", 2, weights="none")
    _, s1 = build_optimizer(model, 4, 1.0, 1.0, 0.0, total_steps=10, warmup_steps=2, offset=0)
    opt2, _ = build_optimizer(model, 4, 1.0, 1.0, 0.0, total_steps=10, warmup_steps=2, offset=6)
    assert opt2.param_groups[0]["lr"] == pytest.approx(warmup_cosine(10, 2)(6))


def test_config_file_and_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        'backbone = "tiny_cnn"\nweights = "none"\nstrategy = "gradual"\n'
        '[data]\nsource = "elpv"\nlabels = "4class"\n[augment]\nrot90 = false\n'
    )
    cfg = load_config(p, {"lr": 0.01, "data": {"limit": 8}})
    assert cfg.strategy == "gradual" and cfg.data.labels == "4class" and cfg.data.limit == 8
    assert cfg.augment.rot90 is False and cfg.lr == 0.01
    r = cfg.resolved()
    assert (r.epochs, r.head_epochs) == (10, 0)
    assert TrainConfig.from_dict(r.to_dict()) == r
    p.write_text('strategy = "all-at-once"\n')
    with pytest.raises(ConfigError, match=r"c.toml.*strategy"):
        load_config(p)
    p.write_text('[data]\nsource = "elpv"\nsplit = 3\n')
    with pytest.raises(ConfigError, match=r"c.toml: data: unknown key"):
        load_config(p)
