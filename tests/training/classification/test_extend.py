"""`defectscope extend` end to end on tiny synthetic lines with tiny_cnn (seconds in all)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from tests.training.conftest import synth_image, write_folder  # noqa: E402
from training import ewc_state  # noqa: E402
from training.checkpoint import ModelCard, load_model, save_model  # noqa: E402
from training.classification.config import AugmentConfig  # noqa: E402
from training.classification.data import DataSpec, resolve_splits  # noqa: E402
from training.classification.extend_cli import main  # noqa: E402
from training.classification.task import ClassificationTask  # noqa: E402
from training.classification.taskset import TaskSet, accuracy  # noqa: E402
from training.engine import Engine  # noqa: E402

SPLIT = dict(val_fraction=0.25, test_fraction=0.25)
SPLIT_FLAGS = ["--val-fraction", "0.25", "--test-fraction", "0.25"]
FAST = ["--quiet", "--threads", "1", "--epochs", "2", "--lr", "5e-3", "--batch-size", "8", "--fisher-samples", "16"]


def _write_inverted(root: Path, counts: dict[str, int], seed: int) -> Path:
    """Line B: the same defects under another camera polarity (a domain shift)."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / cls / f"{cls}_{i:03d}.png"), 255 - synth_image(cls, rng, 40))
    return root


def _train_base(run: Path, data: Path) -> None:
    """A working tiny_cnn run directory (model.json + best.safetensors) for line A."""
    from training.backbones import build_model, get_spec, sized_input

    spec = DataSpec(source="folder", path=str(data), **SPLIT)
    splits = resolve_splits(spec)
    inp = sized_input(get_spec("tiny_cnn"), 32)
    torch.manual_seed(0)
    model = build_model("tiny_cnn", len(splits.classes), "none", input_spec=inp)
    task = TaskSet.from_splits("A", splits, splits.classes, inp, AugmentConfig.none())
    loader = torch.utils.data.DataLoader(
        task.dataset("train"), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    eng, opt = Engine(task=ClassificationTask()), torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        eng.run_epoch(model, loader, opt)
    model.eval()
    card = ModelCard(
        backbone="tiny_cnn",
        num_classes=len(splits.classes),
        classes=tuple(splits.classes),
        good_classes=tuple(splits.good_classes),
        input=inp,
        weights="none",
        data=spec.to_dict(),
        dataset_fingerprint=splits.fingerprint,
    )
    save_model(run, model, card)


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    root = tmp_path_factory.mktemp("lines")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFECTSCOPE_CACHE", str(root / "cache"))
        write_folder(root / "A", {"ok": 32, "defect": 32}, seed=0)
        _write_inverted(root / "B", {"ok": 32, "defect": 32}, seed=1)
        write_folder(root / "C", {"ok": 24, "stain": 24}, seed=2)
        _train_base(root / "runA", root / "A")
    return root


@pytest.fixture
def base(lines, tmp_path):
    """A private copy of line A's run (extend may write fisher.safetensors into it)."""
    dst = tmp_path / "runA"
    shutil.copytree(lines / "runA", dst)
    return dst


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_base_model_learned_line_a(base):
    # The tests below measure forgetting: the base model must know line A.
    model, card = load_model(base)
    task = TaskSet.from_splits(
        "A", resolve_splits(DataSpec.from_dict(card.data)), card.classes, card.input, AugmentConfig.none()
    )
    preds = Engine().predict(model, task.loader("test"))
    assert accuracy(preds.logits, preds.labels) >= 0.9


def test_finalize_writes_fisher_that_matches_the_checkpoint(base, capsys):
    assert main(["--from", str(base), "--finalize", "--quiet", "--fisher-samples", "20"]) == 0
    state = ewc_state.EWCState.load(base / ewc_state.FISHER_FILE)
    model, card = load_model(base)
    state.check_model(model, backbone=card.backbone)
    assert state.tasks[0].n_samples == 20 and state.classes == card.classes
    assert sum(float(f.sum()) for f in state.fisher.values()) > 0
    assert "fisher.safetensors" in capsys.readouterr().out


def test_new_domain_extension_writes_a_complete_run(base, lines, tmp_path):
    out = tmp_path / "runB"
    rc = main(["--from", str(base), "--data", str(lines / "B"), "--out", str(out), *SPLIT_FLAGS, *FAST])
    assert rc == 0
    for name in (
        "model.json",
        "best.safetensors",
        "fisher.safetensors",
        "config.json",
        "metrics.json",
        "report.json",
        "ewc_report.png",
    ):
        assert (out / name).is_file(), name
    r = _report(out)
    assert r["scenario"] == "new-domain" and r["method"] == "ewc" and r["lambda"] == 100.0
    assert r["old_tasks"] == ["A"] and r["new_task"] == "B"
    assert r["forgetting"] == pytest.approx(r["old_accuracy_before"] - r["old_accuracy_after"])
    assert 0.0 < r["penalty_share"] < 1.0
    assert len(r["history"]["penalty"]) == len(r["history"]["task_loss"]) > 0
    assert (base / ewc_state.FISHER_FILE).is_file()  # computed once, saved beside the source checkpoint

    model, card = load_model(out)
    src_card = load_model(base)[1]
    assert card.classes == src_card.classes and card.data["path"] == str(lines / "B")
    # online EWC: the extended model's file folds both lines, anchored at its own weights
    state = ewc_state.EWCState.load(out)
    state.check_model(model, backbone="tiny_cnn")
    assert [t.name for t in state.tasks] == ["A", "B"]
    old = ewc_state.EWCState.load(base)
    assert all(bool((state.fisher[n] >= old.fisher[n] - 1e-12).all()) for n in old.fisher)  # gamma = 1

    # a third line extends the second: uses its consolidated file, old data defaults to its card (B)
    out3 = tmp_path / "runC"
    rc = main(
        ["--from", str(out), "--data", str(lines / "A"), "--out", str(out3), *SPLIT_FLAGS, *FAST, "--gamma", "0.5"]
    )
    assert rc == 0
    assert [t.name for t in ewc_state.EWCState.load(out3).tasks] == ["A", "B", "A"]
    assert _report(out3)["old_tasks"] == ["B"]


def test_new_classes_grow_the_head_and_keep_old_rows(base, lines, tmp_path):
    out = tmp_path / "runC"
    rc = main(
        ["--from", str(base), "--data", str(lines / "C"), "--out", str(out), *SPLIT_FLAGS, *FAST, "--freeze-old-rows"]
    )
    assert rc == 0
    r = _report(out)
    assert r["scenario"] == "new-classes" and r["classes"] == ["defect", "ok", "stain"]
    growth = r["head_growth"]
    assert growth["new_classes"] == ["stain"]
    assert growth["old_logits_max_abs_change_at_growth[A]"] == 0.0
    logits = r["old_class_logits"]["A"]
    assert set(logits) >= {
        "old_logits_mean_abs_change",
        "old_argmax_agreement",
        "predicted_as_new_class",
        "old_accuracy_within_old_classes",
    }

    model, card = load_model(out)
    src, _ = load_model(base)
    assert card.num_classes == 3 and card.classes == ("defect", "ok", "stain")
    # --freeze-old-rows: old head rows bit-exact after training; the new row learned
    assert torch.equal(model.head[1].weight[:2], src.head[1].weight)
    assert torch.equal(model.head[1].bias[:2], src.head[1].bias)
    state = ewc_state.EWCState.load(out)
    assert state.fisher["head.1.weight"].shape == (3, src.head[1].weight.shape[1])


def test_lambda_auto_replay_and_naive(base, lines, tmp_path):
    out = tmp_path / "auto"
    rc = main(
        [
            "--from",
            str(base),
            "--data",
            str(lines / "B"),
            "--out",
            str(out),
            *SPLIT_FLAGS,
            *FAST,
            "--lambda",
            "auto",
            "--lambda-grid",
            "1,1000",
            "--replay",
            "8",
        ]
    )
    assert rc == 0
    r = _report(out)
    assert [c["lambda"] for c in r["lambda_search"]] == [1.0, 1000.0]
    best = max(r["lambda_search"], key=lambda c: c["score"])
    assert r["lambda"] == best["lambda"] and r["lambda_mode"] == "auto"
    assert r["method"] == "ewc+replay"
    assert r["replay"]["size"] == 8 and sorted(r["replay"]["per_class"].values()) == [4, 4]

    out_naive = tmp_path / "naive"
    rc = main(
        [
            "--from",
            str(base),
            "--data",
            str(lines / "B"),
            "--out",
            str(out_naive),
            *SPLIT_FLAGS,
            *FAST,
            "--method",
            "naive",
            "--no-fisher",
        ]
    )
    assert rc == 0
    r = _report(out_naive)
    assert r["method"] == "naive" and r["penalty_share"] == 0.0
    assert not (out_naive / "fisher.safetensors").exists()


def test_mismatched_or_missing_fisher_is_refused(base, lines, tmp_path, capsys):
    # a Fisher file of other weights of the same architecture
    model, card = load_model(base)
    other, _ = load_model(base)
    with torch.no_grad():
        other.head[1].bias.add_(0.5)
    fisher = {n: torch.ones_like(p) for n, p in other.named_parameters()}
    ewc_state.EWCState.from_model(
        other, fisher, backbone="tiny_cnn", classes=card.classes, task=ewc_state.TaskRecord("A", 1)
    ).save(base)
    out = tmp_path / "out"
    rc = main(["--from", str(base), "--data", str(lines / "B"), "--out", str(out), *SPLIT_FLAGS, *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "different weights" in err and "--finalize" in err
    assert not out.exists()

    # another backbone's file
    ewc_state.EWCState.from_model(
        model, fisher, backbone="resnet18", classes=card.classes, task=ewc_state.TaskRecord("A", 1)
    ).save(base)
    rc = main(["--from", str(base), "--data", str(lines / "B"), "--out", str(out), *SPLIT_FLAGS, *FAST])
    assert rc == 2 and "backbone 'resnet18'" in capsys.readouterr().err

    # no file and no old data: EWC cannot run, and says how to fix it
    (base / ewc_state.FISHER_FILE).unlink()
    rc = main(
        ["--from", str(base), "--data", str(lines / "B"), "--out", str(out), *SPLIT_FLAGS, *FAST, "--old-data", "none"]
    )
    assert rc == 2 and "--finalize" in capsys.readouterr().err


def test_cli_argument_errors(base, lines, tmp_path, capsys):
    assert main(["--from", str(base), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--data" in capsys.readouterr().err
    assert (
        main(["--from", str(base), "--data", str(lines / "B"), "--out", str(tmp_path / "x"), "--lambda", "lots"]) == 2
    )
    assert "--lambda" in capsys.readouterr().err
    assert (
        main(
            [
                "--from",
                str(base),
                "--data",
                str(lines / "B"),
                "--out",
                str(tmp_path / "x"),
                "--method",
                "naive",
                "--lambda",
                "auto",
            ]
        )
        == 2
    )
    assert "auto" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fisher.safetensors" in capsys.readouterr().out


def test_config_file_spelling_round_trip_and_validation(tmp_path):
    from training.classification.extend_config import ExtendConfig

    ExtendConfig(source="x", out="y", data=DataSpec())  # the defaults validate
    # config files spell it `lambda`; the resolved config round-trips
    f = tmp_path / "extend.toml"
    f.write_text('lambda = "auto"\nreplay = "5%"\n[data]\nsource = "folder"\npath = "line2"\n')
    from training.classification.config import read_config_file

    loaded = ExtendConfig.from_dict({**read_config_file(f), "source": "x", "out": "y"})
    assert loaded.lam == "auto" and loaded.replay == "5%" and loaded.data.path == "line2"
    assert ExtendConfig.from_dict(loaded.to_dict()) == loaded
    with pytest.raises(Exception, match="replay"):
        ExtendConfig(source="x", out="y", data=DataSpec(), replay="lots")
    assert ExtendConfig(source="x", out="y", data=DataSpec(), replay_share=0).replay_share == 0  # natural share
    with pytest.raises(Exception, match="replay_share"):
        ExtendConfig(source="x", out="y", data=DataSpec(), replay_share=1.0)


def test_keep_best_keeps_the_best_epoch_by_mean_old_new_validation(base, lines, tmp_path):
    out = tmp_path / "best"
    rc = main(
        [
            "--from",
            str(base),
            "--data",
            str(lines / "B"),
            "--out",
            str(out),
            *SPLIT_FLAGS,
            *FAST,
            "--epochs",
            "3",
            "--keep",
            "best",
            "--no-fisher",
        ]
    )
    assert rc == 0
    records = json.loads((out / "metrics.json").read_text())
    assert len(records) == 3
    kept = [r for r in records if r.get("kept")]
    assert len(kept) == 1 and kept[0]["score"] == max(r["score"] for r in records)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["keep"] == "best" and cfg["channels_last"] is True


def test_extend_warns_when_the_new_data_is_too_small(base, lines, tmp_path, capsys):
    """Like train: fewer than 50 images of a class in the new data is said, not trained on silently."""
    out = tmp_path / "small"
    assert main(["--from", str(base), "--data", str(lines / "B"), "--out", str(out), *SPLIT_FLAGS, *FAST]) == 0
    assert "warning: too small to learn from:" in capsys.readouterr().out
