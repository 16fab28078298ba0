"""End-to-end training runs on tiny synthetic data with tiny_cnn (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from training.classification.config import AugmentConfig  # noqa: E402
from training.classification.trainer import RunExistsError, Trainer, train  # noqa: E402


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _group_of(model):
    return {n: g.name for g in model.groups for n, _ in model.group_parameters(g.name)}


@pytest.mark.parametrize(
    "strategy,kw,expected",
    [
        ("linear-probe", dict(epochs=2), [{"head"}, {"head"}]),
        ("two-phase", dict(epochs=1, head_epochs=1), [{"head"}, {"head", "stage2", "stage1", "stem"}]),
        ("partial", dict(epochs=1, head_epochs=0, unfreeze_groups=2), [{"head", "stage2"}]),
        (
            "gradual",
            dict(epochs=3, head_epochs=0, gradual_every=1),
            [{"head"}, {"head", "stage2"}, {"head", "stage2", "stage1"}],
        ),
    ],
)
def test_only_trainable_groups_change_and_frozen_bn_stays_fixed(tiny_cfg, strategy, kw, expected):
    """Per epoch: parameters (and BN running stats) of frozen groups are bit-identical."""
    seen = []
    cfg = tiny_cfg(strategy=strategy, patience=99, **kw)
    state = {}

    def on_epoch_end(info):
        model = info.model
        groups = _group_of(model)
        now = _snapshot(model)
        buffers = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
        if state:
            changed = {groups[n] for n, p in now.items() if not torch.equal(p, state["params"][n])}
            bn_moved = {n for n, b in buffers.items() if not torch.equal(b, state["buffers"][n])}
            seen.append((changed, bn_moved))
        else:
            seen.append((None, None))
        state.update(params=now, buffers=buffers)
        # The optimizer holds exactly the trainable parameters.
        in_opt = {id(p) for g in info.optimizer.param_groups for p in g["params"]}
        assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}

    result = Trainer(cfg, overwrite=True, progress=False, on_epoch_end=on_epoch_end).fit()
    assert len(result.history) == len(expected)
    trainable_logged = [set(h["trainable"]) for h in result.history]
    assert trainable_logged == expected
    for (changed, bn_moved), exp in zip(seen[1:], expected[1:]):
        assert changed == exp
        frozen_bn = {n for n in bn_moved if _group_of_buffer(n) not in exp}
        assert not frozen_bn


def _group_of_buffer(name: str) -> str:
    # tiny_cnn buffer names: body.<group>.1.running_mean
    return name.split(".")[1]


def test_first_epoch_changes_only_its_groups(tiny_cfg):
    """The first epoch too (compare with the freshly built model, same seed)."""
    from training.backbones import REGISTRY, build_model, sized_input
    from training.engine import seed_everything

    cfg = tiny_cfg(strategy="partial", epochs=1, head_epochs=0, unfreeze_groups=2).resolved()
    seed_everything(cfg.seed)  # the trainer seeds the same way before building the model
    ref = build_model("tiny_cnn", 2, weights="none", input_spec=sized_input(REGISTRY["tiny_cnn"], 32))
    before = _snapshot(ref)
    result = train(cfg, overwrite=True, progress=False)
    from training.checkpoint import load_resume

    after = load_resume(result.run_dir)["model"]
    groups = _group_of(ref)
    changed = {groups[n] for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"head", "stage2"}


def test_short_run_beats_chance_and_writes_the_run_directory(tiny_cfg):
    cfg = tiny_cfg(
        strategy="full",
        epochs=12,
        head_epochs=0,
        lr=1e-2,
        monitor="macro_f1",
        patience=12,
        augment=AugmentConfig(crop_scale=1.0),
    )
    result = train(cfg, overwrite=True, progress=False)
    run = result.run_dir
    for name in (
        "config.json",
        "metrics.json",
        "best.safetensors",
        "last.pt",
        "model.json",
        "report.json",
        "curves.png",
        "confusion_matrix.png",
    ):
        assert (run / name).is_file(), name
    best_val = max(h["val"]["macro_f1"] for h in result.history)
    assert best_val >= 0.8, result.history  # chance is 0.5 on this balanced 2-class task
    report = json.loads((run / "report.json").read_text())
    assert report["split"] == "test" and report["accuracy"] >= 0.7
    assert set(report) >= {"balanced_accuracy", "macro_f1", "auroc", "per_class", "confusion_matrix"}
    card = json.loads((run / "model.json").read_text())
    assert card["classes"] == ["defect", "ok"] and card["good_classes"] == ["ok"]
    assert card["data"]["path"] == cfg.data.path and card["dataset_fingerprint"]
    assert json.loads((run / "config.json").read_text())["config_hash"] == card["config_hash"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == list(range(1, len(metrics) + 1))
    from training.classification.config import load_config

    assert load_config(run / "config.json") == cfg.resolved()  # the saved config reproduces the run


def test_resume_after_interruption_matches_uninterrupted_run(tiny_cfg, tmp_path):
    from safetensors.torch import load_file

    kw = dict(strategy="two-phase", epochs=2, head_epochs=1, patience=99)
    full = train(tiny_cfg(out=str(tmp_path / "a"), **kw), progress=False)

    class Stop(Exception):
        pass

    def stop_after_two(info):
        if info.plan.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_cfg(out=str(tmp_path / "b"), **kw), progress=False, on_epoch_end=stop_after_two)
    with pytest.raises(RunExistsError, match="--resume"):
        train(tiny_cfg(out=str(tmp_path / "b"), **kw), progress=False)
    with pytest.raises(RunExistsError, match="another configuration"):
        train(tiny_cfg(out=str(tmp_path / "b"), **{**kw, "lr": 0.5}), resume=True, progress=False)
    resumed = train(tiny_cfg(out=str(tmp_path / "b"), **kw), resume=True, progress=False)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    a = load_file(str(tmp_path / "a" / "best.safetensors"))
    b = load_file(str(tmp_path / "b" / "best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_class_balance_options_run(tiny_cfg, folder_data):
    for balance in ("sampler", "loss"):
        r = train(
            tiny_cfg(strategy="linear-probe", epochs=2, balance=balance, out=str(folder_data.parent / balance)),
            progress=False,
        )
        assert len(r.history) == 2


def test_corrupt_images_are_counted_in_the_run_report(tiny_cfg, folder_data):
    (folder_data / "ok" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    r = train(tiny_cfg(strategy="linear-probe", epochs=1), overwrite=True, progress=False)
    assert r.report["data"]["skipped"] == 1
    assert r.report["data"]["skipped_files"][0]["path"].endswith("bad.png")


def test_cli_train_and_evaluate_with_tta(folder_data, tmp_path, capsys):
    from training.classification.cli import train_main
    from training.classification.evaluate_cli import evaluate_main

    run = tmp_path / "cli-run"
    rc = train_main(
        [
            "--data",
            str(folder_data),
            "--backbone",
            "tiny_cnn",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--strategy",
            "two-phase",
            "--epochs",
            "1",
            "--head-epochs",
            "1",
            "--batch-size",
            "16",
            "--threads",
            "1",
            "--out",
            str(run),
            "--quiet",
            "--augment",
            "rot90=false",
            "--val-fraction",
            "0.25",
        ]
    )
    assert rc == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["augment"]["rot90"] is False and cfg["data"]["source"] == "folder"
    rc = evaluate_main([str(run), "--tta", "all", "--scales", "0.9,1.0,1.2", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "balanced_accuracy" in out and "delta" in out
    report = json.loads((run / "eval_test_all.json").read_text())
    assert report["tta"]["views"] == ["original", "hflip", "vflip", "rot180", "scale:0.9", "scale:1.2"]
    assert report["tta"]["per_view"]["original"]["accuracy"] == report["plain"]["accuracy"]
    assert report["n"] == 20 and (run / "eval_test_all.png").is_file()
    assert (
        train_main(
            [
                "--data",
                str(tmp_path / "missing"),
                "--backbone",
                "tiny_cnn",
                "--weights",
                "none",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "not a directory" in capsys.readouterr().err


def test_cli_train_fisher_finalizes_the_run_for_ewc(folder_data, tmp_path):
    from training.checkpoint import load_model
    from training.classification.cli import train_main
    from training.ewc_state import EWCState

    run = tmp_path / "fisher-run"
    rc = train_main(
        [
            "--data",
            str(folder_data),
            "--backbone",
            "tiny_cnn",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--strategy",
            "full",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--threads",
            "1",
            "--out",
            str(run),
            "--quiet",
            "--fisher",
            "16",
        ]
    )
    assert rc == 0
    state = EWCState.load(run / "fisher.safetensors")
    model, _ = load_model(run)
    state.check_model(model)  # anchors belong to exactly this checkpoint
    assert sum(float(f.sum()) for f in state.fisher.values()) > 0


@pytest.mark.parametrize("bn, stats_move", [("frozen", False), ("train", True)])
def test_bn_option_freezes_or_updates_running_statistics(tiny_cfg, bn, stats_move):
    """bn=frozen: every BN keeps its running stats while all weights (BN affine too) still learn."""
    cfg = tiny_cfg(strategy="full", epochs=1, head_epochs=0, bn=bn)
    before = {}

    def on_epoch_end(info):
        before["after"] = {n: b.clone() for n, b in info.model.named_buffers() if "running_mean" in n}
        before["params"] = _snapshot(info.model)

    result = Trainer(cfg, overwrite=True, progress=False, on_epoch_end=on_epoch_end).fit()
    assert result.history
    stats = before["after"]
    # tiny_cnn is built from scratch: BN running means start at exactly 0.
    moved = any(not torch.equal(b, torch.zeros_like(b)) for b in stats.values())
    assert moved is stats_move
    bn_weights = [p for n, p in before["params"].items() if n.endswith(".1.weight")]
    assert bn_weights and any(not torch.equal(p, torch.ones_like(p)) for p in bn_weights)


def test_bn_auto_resolves_by_weights(tiny_cfg):
    assert tiny_cfg(weights="none").resolved().bn == "train"
    from training.classification.config import ConfigError, TrainConfig

    assert TrainConfig(backbone="tiny_cnn").resolved().bn == "frozen"
    with pytest.raises(ConfigError, match="bn: expected one of"):
        tiny_cfg(bn="sometimes")


def test_bn_adapt_reestimates_statistics_on_training_images_then_freezes_them(tiny_cfg, monkeypatch):
    """bn=adapt: one pass over the training split sets every BN's running stats to that data's
    statistics (AdaBN) before any weight moves; fine-tuning then leaves them alone."""
    import training.classification.trainer as tr

    seen = {}
    build = tr.build_model

    def instrumented(*a, **kw):
        model = build(*a, **kw)

        def grab(module, inputs):
            if module.training and "x" not in seen:  # the first train-mode call: the adaptation pass
                seen["x"] = inputs[0].detach().clone()

        model.body.stem[1].register_forward_pre_hook(grab)
        return model

    monkeypatch.setattr(tr, "build_model", instrumented)
    stats = []
    # One batch holds the whole training split, so the running stats are exactly its statistics;
    # 1 head + 2 fine-tuning epochs.
    cfg = tiny_cfg(strategy="full", epochs=2, head_epochs=1, bn="adapt", batch_size=256)
    Trainer(
        cfg,
        overwrite=True,
        progress=False,
        on_epoch_end=lambda info: stats.append(
            {n: b.clone() for n, b in info.model.named_buffers() if n.startswith("body.stem.1.running")}
        ),
    ).fit()
    x = seen["x"]  # (N,8,H,W) float32: stem conv output
    report = json.loads((Path(cfg.out) / "report.json").read_text())
    assert x.shape[0] == sum(report["data"]["counts"]["train"])
    torch.testing.assert_close(stats[0]["body.stem.1.running_mean"], x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats[0]["body.stem.1.running_var"], x.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert len(stats) == 3 and all(torch.equal(stats[0][k], stats[-1][k]) for k in stats[0]), (
        "fine-tuning moved the adapted statistics"
    )
