"""The project's one ONNX Runtime session factory (station, export parity, calibration, benchmarks).

Sequential execution with one inter-op thread: the graphs are single chains, so only the intra-op
pool matters, and its size is the one knob callers choose.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

CPU = ("CPUExecutionProvider",)


def ort_session(
    path: str | os.PathLike[str],
    threads: int = 1,
    *,
    optimize: bool = True,
    spin: bool = True,
    providers: Sequence[Any] = CPU,
    profile_prefix: str | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``path``: ``threads`` intra-op threads; ``optimize=False``
    loads the graph as written (checks); ``spin=False`` parks idle pool threads (a station's capture
    threads need those cores); ``profile_prefix`` turns ORT's op profiler on. ORT's own exceptions
    (several types for a corrupt model or a missing provider) pass through for the caller to name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(os.fspath(path), opts, providers=list(providers))
