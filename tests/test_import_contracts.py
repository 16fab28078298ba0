"""docs/contracts.md's import rules are the import-linter contracts `make lint` enforces."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _doc_rules() -> dict[str, tuple[str, list[str], list[str]]]:
    text = (ROOT / "docs" / "contracts.md").read_text(encoding="utf-8")
    section = text.split("## Import direction", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("contract", "---"):
            continue
        rid, kind, modules, forbidden = cells
        rules[rid] = (kind, re.findall(r"`([\w.]+)`", modules), re.findall(r"`([\w.]+)`", forbidden))
    return rules


def _linter_rules() -> dict[str, tuple[str, list[str], list[str]]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    rules = {}
    for c in config["contracts"]:
        if c["type"] == "layers":
            rules[c["id"]] = ("layers", list(c["layers"]), [])
        elif c["type"] == "acyclic_siblings":
            rules[c["id"]] = ("acyclic_siblings", list(c["ancestors"]), [])
        else:
            rules[c["id"]] = (c["type"], list(c["source_modules"]), list(c["forbidden_modules"]))
    return rules


def test_contracts_doc_states_the_enforced_import_rules():
    doc = _doc_rules()
    assert doc, "docs/contracts.md: no import-rule table under '## Import direction'"
    assert doc == _linter_rules()


def test_import_linter_covers_every_first_party_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    packages = set(config["importlinter"]["root_packages"])
    wanted = {p.split("*")[0] for p in config["setuptools"]["packages"]["find"]["include"]}
    assert packages == wanted


def test_lint_imports_passes_on_the_tree():
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (the dev extra)")
    proc = subprocess.run(
        [str(exe), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
