"""Provenance for the manifest: library versions, git commit, content hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = (
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "onnxslim",
    "numpy",
    "opencv-python-headless",
    "scikit-learn",
    "defectscope",
)


def utc_now() -> str:
    """ISO-8601 UTC timestamp, seconds resolution."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """Installed distribution versions (absent ones are left out) plus the Python version."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """HEAD commit of the source tree (``-dirty`` when it has local changes), None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def sha256_json(data: Any) -> str:
    """Hash of a JSON-able value, key order independent."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
