"""The one config reader and the one strict key check behind every ``from_dict``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training.config_io import ConfigError, read_config_file, refuse_unknown

ROOT = Path(__file__).resolve().parents[2]


def test_toml_and_json_files_read_and_bad_ones_named(tmp_path):
    (tmp_path / "a.toml").write_text('epochs = 3\n[data]\npath = "x"\n')
    (tmp_path / "a.json").write_text('{"epochs": 3}')
    (tmp_path / "bad.toml").write_text("epochs = = 3\n")
    (tmp_path / "list.json").write_text("[1]")
    assert read_config_file(tmp_path / "a.toml") == {"epochs": 3, "data": {"path": "x"}}
    assert read_config_file(tmp_path / "a.json") == {"epochs": 3}
    with pytest.raises(ConfigError, match=r"bad\.toml: cannot parse"):
        read_config_file(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match=r"list\.json: expected a table"):
        read_config_file(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="config file not found"):
        read_config_file(tmp_path / "missing.toml")


def test_unknown_keys_are_named_with_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['pth'\]; expected some of \['path'\]"):
        refuse_unknown({"pth": 1}, ["path"], "data", ConfigError)


def test_every_task_reads_a_toml_config_without_tomllib(tmp_path):
    """Python 3.10 (JetPack 6) has no tomllib: train, extend and detection configs read through tomli."""
    pytest.importorskip("tomli")
    cfg = tmp_path / "det.toml"
    cfg.write_text('task = "detection"\n[data]\npath = "coco.json"\n')
    code = (
        "import sys; sys.modules['tomllib'] = None\n"  # as on Python 3.10: `import tomllib` fails
        "from defectscope.tasks import kind_of\n"
        "from training.classification.config import load_config\n"
        f"assert kind_of('train', ['--config', {str(cfg)!r}]) == 'detection'\n"
        f"open({str(tmp_path / 'c.toml')!r}, 'w').write('epochs = 2\\n[data]\\npath = \"elpv\"\\n')\n"
        f"print(load_config({str(tmp_path / 'c.toml')!r}).epochs)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "2"
