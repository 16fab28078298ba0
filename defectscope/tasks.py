"""The one table of task kinds: a classifier and a detector, side by side.

Each kind holds its training Task (``training.<kind>.task:TASK``: config, data, model, the
engine's hooks and the train / evaluate / extend commands) and its export and calibrate
commands (calibration/). ``defectscope <verb>`` picks the kind once, from what the verb is
given, and calls that kind's command with the argv untouched:

| verb | the kind comes from |
| --- | --- |
| train | ``--task``, else the ``--config`` file's ``task``, else (``--resume``) the ``--out`` run's ``config.json`` ``task``, else ``--data`` (a COCO JSON or a folder the detection readers recognise) |
| evaluate, export | the run's ``model.json`` (``"task": "detection"``) |
| extend | the ``--from`` run's ``model.json`` |
| calibrate | the bundle's ``manifest.json`` ``model.task`` |

Anything unreadable picks the classifier, whose command then names the problem.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

VERBS = ("train", "evaluate", "extend", "export", "calibrate")
TRAINING_VERBS = ("train", "evaluate", "extend")  # the training Task's own commands
DEFAULT = "classification"


class Task:
    """One kind: its name, its training Task and its export and calibrate commands.

    ``training`` is the ``"module:attribute"`` of the kind's ``training.engine.TaskKind`` (config
    type, data, model, the engine's step and eval hooks, and its train / evaluate / extend
    commands); export and calibrate live in calibration/, which imports training, never the
    reverse. All are strings: the table is read without importing torch.
    """

    name: str = ""
    training: str = ""
    export: str = ""
    calibrate: str = ""

    def training_task(self) -> Any:
        """The kind's ``TaskKind`` (imports its training package, and so torch)."""
        module, attr = self.training.split(":")
        return getattr(importlib.import_module(module), attr)

    def command(self, verb: str) -> str:
        """``"module:function"`` taking the argv of ``defectscope <verb>`` for this kind."""
        if verb in TRAINING_VERBS:
            return str(self.training_task().commands[verb])
        return str(getattr(self, verb))


TASKS: dict[str, Task] = {}
T = TypeVar("T", bound=type[Task])


def register(cls: T) -> T:
    """Class decorator: add the kind to ``TASKS``; refuses a name twice or a missing part."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} registered twice")
    missing = [k for k in ("training", "export", "calibrate") if not getattr(cls, k)]
    if missing:
        raise ValueError(f"task {cls.name!r}: no {missing}")
    TASKS[cls.name] = cls()
    return cls


@register
class Classification(Task):
    name = "classification"
    training = "training.classification.task:TASK"
    export = "calibration.cli:export_main"
    calibrate = "calibration.cli:calibrate_main"


@register
class Detection(Task):
    name = "detection"
    training = "training.detection.task:TASK"
    export = "calibration.detection_cli:export_main"
    calibrate = "calibration.detection_cli:calibrate_main"


# -- which kind --------------------------------------------------------------------------------
def _json_field(path: Path, *keys: str) -> Any:
    try:
        value: Any = json.loads(path.read_text(encoding="utf-8"))
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return value
    except (OSError, ValueError):
        return None


def run_kind(path: str | None) -> str | None:
    """The kind in a run directory's (or a weights file's) ``model.json``; None when there is none."""
    p = Path(path or "")
    if not path or not (p.is_dir() or p.is_file()):
        return None
    card = (p if p.is_dir() else p.parent) / "model.json"
    if not card.is_file():
        return None
    task = _json_field(card, "task")
    return task if isinstance(task, str) else DEFAULT


def bundle_kind(path: str | None) -> str | None:
    """The kind in a bundle's ``manifest.json`` (``model.task``, classification when absent)."""
    if not path or not (Path(path) / "manifest.json").is_file():
        return None
    task = _json_field(Path(path) / "manifest.json", "model", "task")
    return task if isinstance(task, str) else DEFAULT


def data_kind(data: str | None) -> str | None:
    """``detection`` for a COCO JSON or a folder the detection readers recognise (VOC XML, YOLO)."""
    if not data or data == "elpv" or data.lower().endswith(".csv"):
        return None
    from training.data import DataError
    from training.detection.datasets import infer_format

    try:
        infer_format(Path(data))
    except DataError:
        return None
    return "detection"


def _first(argv: list[str], kind_of: Callable[[str], str | None]) -> str | None:
    """The kind of the first argument that has one (the run or bundle; option values have none)."""
    for a in argv:
        if not a.startswith("-") and (kind := kind_of(a)) is not None:
            return kind
    return None


def _train_kind(argv: list[str]) -> str | None:
    from training.config_io import read_config_file

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=tuple(TASKS))
    pre.add_argument("--data")
    pre.add_argument("--config")
    pre.add_argument("--out")
    pre.add_argument("--resume", action="store_true")
    ns, _ = pre.parse_known_args(argv)
    if ns.task:
        return str(ns.task)
    if ns.resume and ns.out and not ns.config:
        task = _json_field(Path(ns.out) / "config.json", "task")
        if task in TASKS:
            return str(task)
    if ns.config and Path(ns.config).is_file():
        try:
            task = read_config_file(ns.config).get("task")
        except ValueError:
            task = None
        if task in TASKS:
            return str(task)
    return data_kind(ns.data)


def _extend_kind(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from", dest="source")
    ns, _ = pre.parse_known_args(argv)
    return run_kind(ns.source)


SELECT: dict[str, Callable[[list[str]], str | None]] = {
    "train": _train_kind,
    "evaluate": lambda argv: _first(argv, run_kind),
    "export": lambda argv: _first(argv, run_kind),
    "extend": _extend_kind,
    "calibrate": lambda argv: _first(argv, bundle_kind),
}


def kind_of(verb: str, argv: list[str]) -> str:
    """The task kind ``defectscope <verb> argv`` is about (the classifier when nothing says)."""
    kind = SELECT[verb](argv)
    return kind if kind in TASKS else DEFAULT


# How each verb picks its kind, for the help of a verb that nothing has decided yet.
CHOSEN_BY = {
    "train": "--task, the --config file's task, or what --data is (a COCO .json, VOC or YOLO folder: detection)",
    "evaluate": "the run's model.json",
    "extend": "the --from run's model.json",
    "export": "the run's model.json",
    "calibrate": "the bundle's manifest.json",
}


def both_helps(verb: str) -> int:
    """``defectscope <verb> --help`` before anything picks a kind: every kind's options, each under a header;
    exits 0 as argparse's help does."""
    from defectscope.cli import load

    print(f"defectscope {verb}: the task kind comes from {CHOSEN_BY[verb]}; the options of each kind follow.\n")
    for name, task in TASKS.items():
        print(f"=== {verb} of a {name} model ===")
        sys.stdout.flush()
        try:
            load(task.command(verb), f"{verb} ({name})")(["--help"])
        except SystemExit:
            pass
        print()
    raise SystemExit(0)


def dispatch(verb: str, argv: list[str] | None) -> int:
    from defectscope.cli import load

    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args) and SELECT[verb](args) is None:
        return both_helps(verb)
    kind = kind_of(verb, args)
    return int(load(TASKS[kind].command(verb), f"{verb} ({kind})")(args))


def train(argv: list[str] | None = None) -> int:
    return dispatch("train", argv)


def evaluate(argv: list[str] | None = None) -> int:
    return dispatch("evaluate", argv)


def extend(argv: list[str] | None = None) -> int:
    return dispatch("extend", argv)


def export(argv: list[str] | None = None) -> int:
    return dispatch("export", argv)


def calibrate(argv: list[str] | None = None) -> int:
    return dispatch("calibrate", argv)
