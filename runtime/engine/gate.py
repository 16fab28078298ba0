"""The accuracy gate for engines built on the station (INT8 TensorRT), where the workstation cannot run them.

A bundle carries a small held-out sample (``holdout/sample.npz``: preprocessed inputs ``x``
(N,C,H,W float32), the FP32 model's outputs ``reference`` (N,K) and, when known, ``labels``
(N,) class indices), written at bundle time by :func:`pack_holdout` and covered by the
manifest's checksums like any file. After an INT8 engine is built, :func:`gate_backend`
runs it on the sample and compares with the FP32 reference: with labels, the accuracy drop;
without, the top-1 disagreement with FP32 (an upper bound on the drop). Over the bundle's
budget (``metrics.<int8 artifact>.gate.budget_points``, the same budget the ONNX INT8 model
passed on the workstation) the engine is refused and the station keeps serving ONNX. A
bundle without a sample can be gated on calibration images with the FP32 outputs as the
reference (:func:`fp32_reference`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle.load import Bundle, load_bundle
from runtime.bundle.manifest import BundleError, check_member_name
from runtime.bundle.write import write_bundle
from runtime.inference.preprocess import FLOAT_NCHW, UINT8_NHWC, Preprocessor

HOLDOUT_FILE = "holdout/sample.npz"
DEFAULT_BUDGET_POINTS = 1.0  # percentage points; bundles without a recorded INT8 gate budget use this
MAX_HOLDOUT = 512  # images; the sample must stay small (it travels in every bundle)


class EngineRejectedError(BundleError):
    """The engine lost more accuracy on the held-out sample than the bundle's budget allows."""


@dataclass(frozen=True)
class GateReport:
    metric: str  # "accuracy_drop" (labels) or "top1_disagreement" (FP32 as the reference)
    drop_points: float
    budget_points: float
    n: int

    @property
    def passed(self) -> bool:
        return self.drop_points <= self.budget_points + 1e-9  # exactly the budget (1 image in 100) passes

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "metric": self.metric,
            "drop_points": round(self.drop_points, 4),
            "budget_points": self.budget_points,
            "n": self.n,
            "where": "station",
        }


def compare(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, budget_points: float
) -> GateReport:
    """Compare (N,K) outputs; see the module docstring for the metric."""
    if reference.shape != candidate.shape:
        raise BundleError(f"holdout gate: candidate outputs {candidate.shape}, FP32 reference {reference.shape}")
    ref, cand = reference.argmax(axis=1), candidate.argmax(axis=1)
    n = int(ref.shape[0])
    if labels is not None:
        drop = 100.0 * (float(np.mean(ref == labels)) - float(np.mean(cand == labels)))
        return GateReport("accuracy_drop", drop, budget_points, n)
    return GateReport("top1_disagreement", 100.0 * float(np.mean(ref != cand)), budget_points, n)


def budget_for(bundle: Bundle) -> float:
    """The INT8 budget the bundle's ONNX INT8 model was gated with on the workstation, else the default."""
    for metrics in bundle.manifest.metrics.values():
        gate = metrics.get("gate") if isinstance(metrics, Mapping) else None
        if isinstance(gate, Mapping) and isinstance(gate.get("budget_points"), (int, float)):
            return float(gate["budget_points"])
    return DEFAULT_BUDGET_POINTS


def holdout_file(bundle: Bundle) -> str | None:
    info = bundle.manifest.provenance.get("holdout")
    name = info.get("file") if isinstance(info, Mapping) else None
    if name is None:
        return None
    check_member_name(name, str(bundle.path / "manifest.json"), "provenance.holdout.file")
    if name not in bundle.manifest.files:
        raise BundleError(f"{bundle.path / 'manifest.json'}: key 'provenance.holdout.file': {name!r} has no checksum")
    return name


def read_holdout(bundle: Bundle) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(x, reference, labels or None) from the bundle's sample (checksum-verified), or None if it has none."""
    name = holdout_file(bundle)
    if name is None:
        return None
    path = bundle.path / name
    try:
        with np.load(path, allow_pickle=False) as data:  # no pickles: the file came from outside
            x, ref = np.asarray(data["x"], dtype=np.float32), np.asarray(data["reference"], dtype=np.float32)
            labels = np.asarray(data["labels"], dtype=np.int64) if "labels" in data.files else None
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable holdout sample (x, reference[, labels]): {exc}") from None
    spec = bundle.manifest.input
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(spec.shape) or ref.ndim != 2 or ref.shape[0] != x.shape[0]:
        raise BundleError(
            f"{path}: x {x.shape} / reference {ref.shape} do not match the manifest input "
            f"(N,{','.join(map(str, spec.shape))}) and (N,{len(bundle.manifest.classes)})"
        )
    if labels is not None and labels.shape != (x.shape[0],):
        raise BundleError(f"{path}: labels {labels.shape}, expected ({x.shape[0]},)")
    return x, ref, labels


def pack_holdout(
    bundle_dir: str | os.PathLike[str], x: np.ndarray, labels: np.ndarray | None = None, limit: int = 256, seed: int = 0
) -> Bundle:
    """Add a held-out sample to a bundle (at bundle time): FP32 references from its FP32 ONNX artifact.

    ``x``: preprocessed (N,C,H,W) float32 images the model did not train or calibrate on.
    """
    from runtime.inference.backends import OrtBackend

    bundle = load_bundle(bundle_dir, check_graph=False)
    limit = min(int(limit), MAX_HOLDOUT)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(bundle.manifest.input.shape):
        raise BundleError(
            f"holdout: x has shape {x.shape}, the bundle takes (N,{','.join(map(str, bundle.manifest.input.shape))})"
        )
    pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:limit])
    x = x[pick]
    fp32 = [k for k, a in bundle.manifest.artifacts.items() if a.format == "onnx" and a.precision == "fp32"]
    if not fp32:
        raise BundleError(f"{bundle.path}: no FP32 ONNX artifact to compute the holdout references with")
    backend = OrtBackend(bundle, fp32[0], cuda=False, threads=1)
    try:
        reference = backend.run(x)[0].astype(np.float32)
    finally:
        backend.close()
    # Any values: a typed dict[str, ndarray] cannot be **-unpacked past savez's allow_pickle: bool.
    arrays: dict[str, Any] = {"x": x, "reference": reference}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)[pick]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = bundle.path.parent / f".{bundle.path.name}.holdout.npz"
    tmp.write_bytes(buf.getvalue())
    try:
        files: dict[str, Any] = {n: bundle.path / n for n in bundle.manifest.files}
        files[HOLDOUT_FILE] = tmp
        prov = {
            **bundle.manifest.provenance,
            "holdout": {"file": HOLDOUT_FILE, "n": int(len(x)), "labels": labels is not None, "reference": fp32[0]},
        }
        return write_bundle(bundle.path, bundle.manifest.replace(provenance=prov), files, check_graph=False)
    finally:
        tmp.unlink(missing_ok=True)


def fp32_reference(bundle: Bundle, x: np.ndarray, limit: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(subsample of ``x``, the FP32 ONNX artifact's outputs on it): a reference where no sample was packed."""
    from runtime.inference.backends import OrtBackend

    fp32 = [k for k, a in bundle.manifest.artifacts.items() if a.format == "onnx" and a.precision == "fp32"]
    if not fp32:
        raise EngineRejectedError(f"{bundle.path}: no FP32 ONNX artifact to compute reference outputs with")
    x = np.asarray(x, dtype=np.float32)
    x = x[np.sort(np.random.default_rng(seed).permutation(len(x))[: min(limit, MAX_HOLDOUT)])]
    backend = OrtBackend(bundle, fp32[0], cuda=False, threads=1)
    try:
        return x, np.asarray(backend.run(x)[0], dtype=np.float32)
    finally:
        backend.close()


def gate_backend(
    bundle: Bundle, backend: Any, budget_points: float | None = None, fallback_x: np.ndarray | None = None
) -> GateReport:
    """Run ``backend`` (a runtime Backend: the new engine, or ORT standing in for it) on the bundle's sample.

    Without a packed sample, ``fallback_x`` (e.g. calibration images) with the FP32 model's
    outputs as the reference; that sample was seen by calibration, so it catches gross
    failures (a broken engine) rather than a fine accuracy loss.
    """
    sample = read_holdout(bundle)
    if sample is None and fallback_x is not None and len(fallback_x):
        x, ref = fp32_reference(bundle, fallback_x)
        sample = (x, ref, None)
    if sample is None:
        raise EngineRejectedError(
            f"{bundle.path}: carries no held-out sample (provenance.holdout), so an INT8 engine cannot be checked "
            "against the accuracy budget here; add one at bundle time (runtime.engine.gate.pack_holdout / "
            "`defectscope bundle holdout`), or pass --skip-accuracy-gate to accept the risk"
        )
    x, reference, labels = sample
    if getattr(backend, "input_kind", FLOAT_NCHW) == UINT8_NHWC:
        x = Preprocessor(bundle.manifest.input).uint8_from_tensor(x)  # the same frames, as the engine takes them
    candidate = np.asarray(backend.run(x)[0], dtype=np.float32)
    return compare(reference, candidate, labels, budget_for(bundle) if budget_points is None else budget_points)


def require_pass(report: GateReport, where: str | Path) -> None:
    if not report.passed:
        raise EngineRejectedError(
            f"{where}: INT8 engine refused: {report.metric} {report.drop_points:.2f} points on the bundle's "
            f"{report.n}-image held-out sample exceeds the budget of {report.budget_points:g} points; "
            "the station keeps serving the ONNX model"
        )


def gate_candidate(
    manifest: Any,
    files: Mapping[str, Any],
    key: str,
    make_backend: Any,
    workdir: str | os.PathLike[str],
    fallback_x: np.ndarray | None = None,
) -> GateReport:
    """Write the bundle-to-be in ``workdir``, run artifact ``key`` on its sample, refuse it over budget.

    ``make_backend(bundle, key)`` opens the engine (TensorRT on the device; ONNX Runtime in tests).
    Nothing is written to the real bundle here: on refusal the caller keeps the bundle as it was.
    """
    candidate = write_bundle(Path(workdir) / "candidate", manifest, files, check_graph=False)
    backend = make_backend(candidate, key)
    try:
        report = gate_backend(candidate, backend, fallback_x=fallback_x)
    finally:
        backend.close()
    require_pass(report, candidate.path / candidate.manifest.artifacts[key].file)
    return report
