"""The one epoch loop: its extension points change the result as they should; the package has one loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from training.classification.task import ClassificationTask  # noqa: E402
from training.engine import Engine, EpochSelector  # noqa: E402

PKG = Path(__file__).resolve().parents[2] / "training"


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    return [(x[i : i + 16], (x[i : i + 16, 0] > 0).long()) for i in range(0, 64, 16)]


def _model():
    torch.manual_seed(0)
    return nn.Linear(4, 2)


class WeightNorm:
    """A dummy extra loss term: ``lam * ||W||^2``."""

    name = "l2"

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.lam * model.weight.pow(2).sum()


def _train(engine: Engine, epochs: int = 5) -> nn.Linear:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        engine.run_epoch(model, _data(), opt)
    return model


def test_extra_loss_term_is_added_and_recorded():
    plain = _train(Engine(task=ClassificationTask()))
    eng = Engine(task=ClassificationTask(), terms=[WeightNorm(1.0)])
    model = _model()
    stats = eng.run_epoch(model, _data(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(stats.terms["l2"]) == len(stats.task_loss) == 4 and all(v > 0 for v in stats.terms["l2"])
    shrunk = _train(Engine(task=ClassificationTask(), terms=[WeightNorm(1.0)]))
    assert float(shrunk.weight.detach().norm()) < 0.5 * float(plain.weight.detach().norm())


def test_after_step_hook_runs_after_every_step():
    model = _model()
    calls = []

    def pin_bias() -> None:  # keep the bias at zero whatever the optimizer does
        calls.append(1)
        with torch.no_grad():
            model.bias.zero_()

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    Engine(task=ClassificationTask(), after_step=[pin_bias]).run_epoch(model, _data(), opt)
    assert len(calls) == 4 and torch.equal(model.bias, torch.zeros(2))
    assert not torch.equal(_train(Engine(task=ClassificationTask()), 1).bias, torch.zeros(2))


def test_steps_cap_task_loss_and_predict():
    model = _model()
    eng = Engine(task=ClassificationTask(nn.CrossEntropyLoss(label_smoothing=0.2)))
    stats = eng.run_epoch(model, _data(), torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    assert len(stats.task_loss) == 2
    preds = eng.predict(model, _data())
    assert preds.logits.shape == (64, 2) and preds.labels.shape == (64,) and preds.loss > 0
    metrics = eng.task.evaluate(preds, ["neg", "pos"])
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_epoch_selector_keeps_the_best_and_counts_patience():
    sel = EpochSelector()
    assert sel.update(1, 0.5) and not sel.update(2, 0.4) and not sel.update(3, 0.5)
    assert sel.best_epoch == 1 and sel.bad_epochs == 2 and sel.exhausted(2) and not sel.exhausted(3)


def _functions():
    for path in sorted(PKG.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node


def test_training_has_one_epoch_loop():
    # An epoch loop is a function that both back-propagates and steps an optimizer.
    loops = []
    for name, fn in _functions():
        calls = {n.func.attr for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        if "backward" in calls and "step" in calls:
            loops.append(f"{name}:{fn.name}")
    assert loops == ["engine.py:run_epoch"], loops


def test_every_task_and_command_runs_the_one_epoch_loop():
    # The best-epoch bookkeeping (EpochSelector.update) happens in one loop: engine.fit_epochs.
    # train, extend and the detector's fit hand it their step, gate and done hooks.
    owners = []
    for path in sorted(PKG.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and not any(
                isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)) and inner is not fn for inner in ast.walk(fn)
            ):
                calls = [n.func for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
                if any(f.attr == "update" and isinstance(f.value, ast.Name) and f.value.id == "sel" for f in calls):
                    owners.append(f"{path.relative_to(PKG)}:{fn.name}")
    assert owners == ["engine.py:fit_epochs"], owners
    users = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if "fit_epochs(" in p.read_text()}
    assert {"classification/trainer.py", "classification/extend.py", "detection/epochs.py"} <= users


def test_no_function_in_training_is_over_80_lines():
    long = [
        f"{name}:{fn.name} ({fn.end_lineno - fn.lineno + 1})"
        for name, fn in _functions()
        if fn.end_lineno - fn.lineno + 1 > 80
    ]
    assert not long, long


def test_parameter_group_rule_changes_what_trains():
    from training.backbones import build_model
    from training.schedule import build_optimizer

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [(x, torch.tensor([0, 1] * 4))]

    def run(rules):
        torch.manual_seed(0)
        model = build_model("tiny_cnn", 2, weights="none")
        head0 = model.head[1].weight.detach().clone()
        body0 = next(model.body.parameters()).detach().clone()
        opt, sched = build_optimizer(
            model, len(model.groups), 1e-2, 1.0, 0.0, total_steps=1, warmup_steps=0, rules=rules
        )
        Engine(task=ClassificationTask()).run_epoch(model, batches, opt, scheduler=sched)
        return (torch.equal(model.head[1].weight, head0), torch.equal(next(model.body.parameters()), body0))

    def freeze_head(group: dict) -> dict:
        return {**group, "lr": 0.0} if group["name"].startswith("head") else group

    assert run(()) == (False, False)
    assert run([freeze_head]) == (True, False)
