"""Shared test setup: thread limits, RNG isolation, markers, tool checks."""

from __future__ import annotations

import os
import random
import shutil

# 2-core machines: a second busy process slows torch/ORT 30-100x through thread
# spin, so every test process runs single-threaded unless it says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("DEFECTSCOPE_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


@pytest.fixture(autouse=True)
def rng_guard():
    """Seed python/numpy/torch RNGs per test and restore the previous states after."""
    torch = _torch()
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.random.get_rng_state() if torch is not None else None
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
    yield
    random.setstate(py_state)
    np.random.set_state(np_state)
    if torch is not None:
        torch.random.set_rng_state(torch_state)


def require_tool(name: str) -> str:
    """Path of an external tool that .ci/run installs; skip with the reason if absent.

    In CI (CI=true) a missing tool is a failure, not a skip: .ci/run installs it.
    """
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} not found on PATH although .ci/run installs it")
        pytest.skip(f"{name} not installed (bash .ci/run installs it)")
    return path
