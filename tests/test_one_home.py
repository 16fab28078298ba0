"""One home per idea: each shared routine is defined once and every package uses that one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.fsio import replace_dir

ROOT = Path(__file__).resolve().parents[1]
ALL = ("training", "calibration", "runtime", "deploy", "defectscope", "bench")
WORKSTATION = ("training", "calibration", "defectscope", "bench")

UNKNOWN_KEY = r"unknown key\(s\) \{|unknown key; expected|: unknown \(expected|unknown section \["
# pattern -> (the one file allowed to contain it, the packages searched)
HOMES = {
    r"InferenceSession\(": ("runtime/inference/ort_session.py", ALL),  # the ONNX Runtime session factory
    r"SessionOptions\(": ("runtime/inference/ort_session.py", ALL),
    r"os\.rename\(": ("runtime/fsio.py", ALL),  # the directory swap
    r"def (classification|label)_metrics": ("training/metrics.py", ALL),
    # The workstation's config-file reader (the station side's TOML files are read where they are parsed).
    r"import tomllib|import tomli": ("training/config_io.py", WORKSTATION),
    # The strict unknown-key check behind every from_dict and config table, and the wordings its
    # copies used.
    UNKNOWN_KEY: ("runtime/config/strict.py", ALL),
}
# Known exceptions, each with its reason.
ALLOWED = {
    (r"os\.rename\(", "deploy/store.py"),  # prune renames a version aside before removing it: not a swap
}
MAX_LINES = 450  # a file longer than this is split by role into modules named for it


def _sources(packages):
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


@pytest.mark.parametrize("pattern", sorted(HOMES))
def test_each_routine_has_one_home(pattern):
    home, packages = HOMES[pattern]
    found = {rel for rel, text in _sources(packages) if re.search(pattern, text)}
    extra = sorted(rel for rel in found - {home} if (pattern, rel) not in ALLOWED)
    assert home in found and not extra, extra


def test_no_source_file_is_over_the_line_limit():
    lines = {rel: len(text.splitlines()) for rel, text in _sources(ALL)}
    assert not {rel: n for rel, n in lines.items() if n > MAX_LINES}


def test_replace_dir_swaps_a_tree_and_leaves_nothing_aside(tmp_path):
    dest, new = tmp_path / "v1", tmp_path / "staged"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    assert replace_dir(new, dest) == dest
    assert [p.name for p in dest.iterdir()] == ["new.txt"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_replace_dir_replaces_a_symlink_without_touching_its_target(tmp_path):
    target, link, new = tmp_path / "target", tmp_path / "link", tmp_path / "staged"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link.symlink_to(target)
    new.mkdir()
    replace_dir(new, link)
    assert link.is_dir() and not link.is_symlink() and (target / "keep.txt").read_text() == "keep"


def test_replace_dir_with_no_source_leaves_dest_as_it_was(tmp_path):
    dest = tmp_path / "v1"
    dest.mkdir()
    (dest / "a").write_text("a")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "missing", dest)
    # the old tree was renamed aside before the failed rename: it must not be lost
    kept = [p for p in tmp_path.iterdir()]
    assert any((p / "a").exists() for p in kept)
