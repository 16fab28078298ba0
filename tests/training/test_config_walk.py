"""Following the config of train and extend, for both task kinds, through the calls: one pass.

A tiny run of each (``defectscope train`` / ``extend`` through the dispatcher, so argv is read once)
is recorded with ``sys.setprofile``. What is counted:

- a *stop* is a call of a function in training/, calibration/ or defectscope/ that receives the run's
  config (a ``TrainConfig``, ``ExtendConfig``, ``DetTrainConfig`` or ``DetExtendConfig``) as an
  argument other than ``self``. A config's own methods and the calls they make (``resolved``,
  ``hash``, ``__post_init__``'s checks) read the config; they do not carry it anywhere, so they
  are not stops. The entries of the engine's loop (``training.engine.fit_epochs``) are counted
  apart: one per command;
- the stops' files, consecutive repeats collapsed, are the walk;
- a *return* is a file that appears in the walk again after the walk left it. Calls made inside
  the engine's loop (``fit_epochs`` on the stack) are the engine's own loop and are not returns.

The issue's measure before this layout (b434d51, extend_run.run alone): 46 stops in 17 files, 29
returns. Asserted here: no returns, and the engine's loop entered once per command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("training/", "calibration/", "defectscope/")
CONFIGS = {"TrainConfig", "ExtendConfig", "DetTrainConfig", "DetExtendConfig"}
ENGINE = "training/engine.py"
CO_VARARGS, CO_VARKEYWORDS = 0x04, 0x08


def _is_config(v: object) -> bool:
    return type(v).__name__ in CONFIGS


def _args(frame) -> list[object]:
    """The call's arguments but ``self``; ``*args`` and ``**kwargs`` spread."""
    co, loc = frame.f_code, frame.f_locals
    n = co.co_argcount + co.co_kwonlyargcount
    values = [loc.get(name) for name in co.co_varnames[:n] if name != "self"]
    if co.co_flags & CO_VARARGS:
        values.extend(loc.get(co.co_varnames[n], ()))
        n += 1
    if co.co_flags & CO_VARKEYWORDS:
        values.extend(loc.get(co.co_varnames[n], {}).values())
    return values


def _in_engine_loop(frame) -> bool:
    f = frame.f_back
    while f is not None:
        if f.f_code.co_filename.endswith(ENGINE) and f.f_code.co_name == "fit_epochs":
            return True
        f = f.f_back
    return False


def record(command) -> tuple[list[tuple[str, str, bool]], int]:
    """Run ``command()`` (rc 0) under a profiler: its stops as ``(file, function, inside the engine
    loop)`` and how many times it entered the engine's loop."""
    root = str(ROOT) + os.sep
    stops: list[tuple[str, str, bool]] = []
    loops = [0]

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(root):
            return
        rel = frame.f_code.co_filename[len(root) :].replace(os.sep, "/")
        if not rel.startswith(PACKAGES):
            return
        if rel == ENGINE and frame.f_code.co_name == "fit_epochs":
            loops[0] += 1
        if not any(_is_config(v) for v in _args(frame)):
            return
        caller = frame.f_back
        if caller is not None and _is_config(caller.f_locals.get("self")):
            return  # the config checking or deriving itself
        stops.append((rel, frame.f_code.co_name, _in_engine_loop(frame)))

    sys.setprofile(profile)
    try:
        rc = command()
    finally:
        sys.setprofile(None)
    assert rc == 0
    return stops, loops[0]


def walk(stops: list[tuple[str, str, bool]]) -> tuple[list[str], list[str]]:
    """The walk (files, consecutive repeats collapsed) and its returns."""
    files: list[tuple[str, bool]] = []
    for rel, _, in_loop in stops:
        if not files or files[-1][0] != rel:
            files.append((rel, in_loop))
    left: set[str] = set()
    returns = []
    for i, (rel, in_loop) in enumerate(files):
        if i:
            left.add(files[i - 1][0])
        if rel in left and rel != ENGINE and not in_loop:
            returns.append(rel)
    return [f for f, _ in files], returns


CLASSIFIER = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32", "--batch-size", "16"]
CLASSIFIER += ["--threads", "1", "--epochs", "2", "--head-epochs", "1", "--quiet"]
SPLIT = ["--val-fraction", "0.25", "--test-fraction", "0.25"]


@pytest.fixture(scope="module")
def walks(tmp_path_factory):
    from defectscope.cli import main
    from tests.training.conftest import write_folder
    from tests.training.detection.conftest import TINY, write_squares_coco

    tmp = tmp_path_factory.mktemp("walk")
    a = write_folder(tmp / "A", {"ok": 24, "defect": 24}, seed=0)
    b = write_folder(tmp / "B", {"ok": 24, "defect": 24}, seed=1)
    d1 = write_squares_coco(tmp / "coco", ("square", "bar"))
    d2 = write_squares_coco(tmp / "coco2", ("square", "pit"), seed=3)
    commands = {
        "classifier train": ["train", "--data", str(a), "--out", str(tmp / "c1"), *CLASSIFIER, *SPLIT],
        "classifier extend": ["extend", "--from", str(tmp / "c1"), "--data", str(b), "--out", str(tmp / "c2"), *SPLIT]
        + ["--quiet", "--threads", "1", "--epochs", "2", "--batch-size", "8", "--fisher-samples", "16"]
        + ["--lambda", "100"],
        "detector train": ["train", "--data", str(d1 / "train.json"), "--out", str(tmp / "d1"), "--epochs", "2"]
        + ["--max-steps-per-epoch", "2", *TINY],
        "detector extend": ["extend", "--from", str(tmp / "d1"), "--data", str(d2 / "train.json")]
        + ["--out", str(tmp / "d2"), "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "4"]
        + ["--fisher-samples", "3", "--lambda", "100", "--threads", "2", "--quiet"],
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFECTSCOPE_CACHE", str(tmp / "cache"))
        mp.setenv("DEFECTSCOPE_OFFLINE", "1")
        return {name: record(lambda argv=argv: main(argv)) for name, argv in commands.items()}


@pytest.mark.parametrize("command", ["classifier train", "classifier extend", "detector train", "detector extend"])
def test_the_config_makes_one_pass_through_the_engine(walks, command):
    stops, loops = walks[command]
    files, returns = walk(stops)
    assert loops == 1, files
    assert not returns, f"returns to {returns} in the walk {' > '.join(files)}"
    kind = "classification" if command.startswith("classifier") else "detection"
    assert all(f.startswith((f"training/{kind}/", ENGINE)) for f in files), files


def test_a_return_is_counted():
    stops = [("a.py", "f", False), ("b.py", "g", False), ("c.py", "i", True), ("b.py", "h", True)]
    assert walk(stops) == (["a.py", "b.py", "c.py", "b.py"], [])  # inside the engine's loop
    assert walk([*stops, ("a.py", "k", False)])[1] == ["a.py"]
