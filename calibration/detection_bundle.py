"""``defectscope export`` of a detection run: ONNX (calibration.export_detection), parity enforced,
FP32 metrics measured with ONNX Runtime, and a ``"task": "detection"`` bundle manifest.

Manifest (schema_version 1, docs/contracts.md): ``model.task = "detection"``;
``classes = ["ok", *defect classes]`` and ``good_classes = ["ok"]`` so a graph label (1-based,
0 = background/padding) indexes ``classes`` directly; ``input`` = the InputSpec keys with
``resize_policy = "letterbox"``, ``pad_value``, mean 0 / std 1 (pixels scaled to [0, 1]);
``output = {"kind": "detections", "names": ["boxes", "scores", "labels"], "box_format": "xyxy",
"score_threshold", "max_detections"}``; boxes are model-input pixels (the runtime maps them back).

The bundle is written by ``runtime.bundle.write.write_bundle`` (temp directory beside ``--out``,
``manifest.json`` last, verified by the station's own loader before the rename: schema, checksums,
graph output shapes against ``max_detections``); a bundle the runtime would refuse is never written.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

PARITY_SCORE_THRESHOLD = 0.05  # parity counts every detection the model reports (its box_score_thresh)
PARITY_SCORE_TOL = 1e-3


def ort_predict(onnx_path: str | Path, ds: Any, threads: int = 1) -> tuple[list, list[float]]:
    """ONNX Runtime over a ``DetectionDataset`` (eval transform): per image ``(boxes original px, scores,
    labels 0-based)`` with padding rows (score 0) dropped; also per-image latency in ms."""
    from calibration.export_detection import OUTPUT_NAMES
    from runtime.inference.ort_session import ort_session

    sess = ort_session(onnx_path, threads)
    name = sess.get_inputs()[0].name
    return predict_with(lambda x: sess.run(list(OUTPUT_NAMES), {name: x}), ds)


def predict_with(run: Any, ds: Any) -> tuple[list, list[float]]:
    """Any engine's ``run((1,3,H,W) float32) -> (boxes, scores, labels)`` over a ``DetectionDataset``:
    per image ``(boxes original px, scores, labels 0-based)`` without padding rows; per-image ms."""
    out, ms = [], []
    for i in range(len(ds)):
        image, target = ds[i]
        x = image.numpy()[None].astype(np.float32)
        t0 = time.perf_counter()
        b, s, lab = run(x)
        ms.append((time.perf_counter() - t0) * 1e3)
        keep = s[0] > 0
        out.append(
            (
                target["geometry"].to_original(b[0][keep]),
                s[0][keep].astype(np.float32),
                lab[0][keep].astype(np.int64) - 1,
            )
        )
    return out, ms


def held_out_samples(card: Any, split: str, limit: int | None) -> list[Any]:
    from training.detection.datasets import DetectionSpec, resolve_detection

    splits = resolve_detection(DetectionSpec.from_dict(card.data, where="model.json: data"))
    samples = splits.split(split) or splits.val
    if not samples:
        raise ValueError(f"{card.data.get('path')}: split {split!r} and val are empty; nothing to check parity on")
    idx = [list(card.classes).index(c) for c in splits.classes]
    samples = [replace(s, labels=tuple(idx[i] for i in s.labels)) for s in samples]
    return samples[:limit] if limit else samples


def manifest_dict(
    card: Any,
    info: Any,
    *,
    name: str,
    version: str,
    score_threshold: float,
    provenance: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The detection manifest (without ``files``, filled in by the writer)."""
    from calibration.provenance import utc_now

    h, w = card.detector.image_size
    inp = info.input
    return {
        "schema_version": 1,
        "model": {
            "name": name,
            "version": version,
            "task": "detection",
            "architecture": card.detector.backbone,
            "created": utc_now(),
        },
        "classes": ["ok", *card.classes],
        "good_classes": ["ok"],
        "input": {
            "name": "input",
            "height": h,
            "width": w,
            "resize_size": max(h, w),
            "mean": inp["mean"],
            "std": inp["std"],
            "layout": "NCHW",
            "dtype": "float32",
            "channels": 3,
            "color_order": inp["color_order"],
            "resize_policy": inp["resize_policy"],
            "interpolation": "bilinear",
            "pad_value": inp["pad_value"],
        },
        "output": {
            "kind": "detections",
            "names": ["boxes", "scores", "labels"],
            "box_format": inp["box_format"],
            "score_threshold": score_threshold,
            "max_detections": info.max_detections,
            "fusion_iou": card.detector.fusion_iou,
        },
        "artifacts": {"fp32": {"file": "model.onnx", "format": "onnx", "precision": "fp32"}},
        "default_artifact": "fp32",
        "provenance": provenance,
        "metrics": metrics,
    }


def write_detection_bundle(
    dest: Path, manifest: dict[str, Any], onnx_path: Path, extra_files: dict[str, Path] | None = None
) -> dict[str, Any]:
    """The bundle through ``runtime.bundle.write.write_bundle``: checksums, the station's own validation (manifest
    keys, letterbox input, detection outputs against the graph), temp directory + rename."""
    from runtime.bundle.manifest import Manifest
    from runtime.bundle.write import write_bundle

    m = Manifest.from_dict({**manifest, "files": {}}, where=f"{dest}/manifest.json")
    return write_bundle(dest, m, {"model.onnx": onnx_path, **(extra_files or {})}).manifest.to_dict()


# Boxes are in model-input pixels, scores in [0, 1]: the in-graph normalisation moves them by float rounding only.
UINT8_PARITY_ATOL = 1e-3


def _uint8_twin(
    manifest: dict[str, Any], onnx_path: Path, paths: list[str], tmp: Path, files: dict[str, Path]
) -> dict[str, Any]:
    """``manifest`` plus the parity-checked uint8-input twin ``fp32-u8`` of ``model.onnx`` (file added to ``files``)."""
    from calibration.graph_input import add_uint8_twins
    from runtime.bundle.manifest import Manifest
    from runtime.inference.preprocess import read_image

    m = Manifest.from_dict({**manifest, "files": {}})
    artifacts = dict(m.artifacts)
    sources = {"model.onnx": onnx_path}
    frames = [read_image(p) for p in paths]
    reports = add_uint8_twins(artifacts, sources, ["fp32"], m.input, frames, tmp, atol=UINT8_PARITY_ATOL, top1=False)
    files.update({k: v for k, v in sources.items() if k != "model.onnx"})
    export = dict(manifest["provenance"].get("export") or {})
    export["uint8_parity"] = {k: {**r.to_dict(), "summary": r.summary()} for k, r in reports.items()}
    return {
        **manifest,
        "artifacts": {k: a.to_dict() for k, a in artifacts.items()},
        "provenance": {**manifest["provenance"], "export": export},
    }


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    version: str = "1.0.0",
    split: str = "test",
    parity_images: int = 16,
    eval_limit: int | None = None,
    score_threshold: float | None = None,
    parity_score_tol: float = PARITY_SCORE_TOL,
    opset: int | None = None,
    threads: int = 1,
    force: bool = False,
    echo: Any = print,
    uint8_input: bool = False,
) -> dict[str, Any]:
    """Export ``run`` to a bundle at ``out``; raises ``DetectionExportError`` when parity fails (nothing written)."""
    from calibration.export_detection import export_detector, parity
    from calibration.provenance import git_commit, library_versions
    from runtime.fsio import sha256_file
    from training.checkpoint import BEST
    from training.detection.checkpoint import load_detector
    from training.detection.loader import DetectionDataset
    from training.detection.task import DetectionTask, DetPredictions

    out, run = Path(out), Path(run)
    if out.exists() and not force:
        raise ValueError(f"{out}: already exists; pass --force to replace it")
    model, card = load_detector(run)
    run_dir = run if run.is_dir() else run.parent
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    thr = float(score_threshold if score_threshold is not None else cfg.get("score_threshold", 0.5))
    samples = held_out_samples(card, split, eval_limit)
    ds = DetectionDataset(samples, card.detector.image_size)
    with tempfile.TemporaryDirectory(prefix="defectscope-export-det-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        info = export_detector(model, onnx_path, **({"opset": opset} if opset is not None else {}))
        echo(f"exported opset {info.opset} ({info.exporter}), {info.nodes} nodes, input {info.height}x{info.width}")
        images = [ds[i][0].numpy() for i in range(min(parity_images, len(ds)))]
        par = parity(model, onnx_path, images, score_threshold=PARITY_SCORE_THRESHOLD, score_tol=parity_score_tol)
        echo(
            f"parity ok on {par['images']} images, {par['detections']} detections: min IoU {par['min_iou']:.5f}, "
            f"max score diff {par['max_score_diff']:.2e}, max box diff {par['max_box_diff_px']:.2e} px"
        )
        preds, ms = ort_predict(onnx_path, ds, threads)
        m = DetectionTask(thr).evaluate(DetPredictions(samples, preds), card.classes)
        metrics = {
            "fp32": {
                "split": split,
                "n": len(samples),
                "map": m["map"],
                "map50": m["map50"],
                "map75": m["map75"],
                "part": m["part"],
                "per_class": {c: {k: v[k] for k in ("ap", "ap50", "recall50")} for c, v in m["per_class"].items()},
                "latency_ms_median": float(np.median(ms)) if ms else None,
                "threads": threads,
            }
        }
        prov = {
            "config_hash": card.config_hash,
            "git_commit": git_commit(),
            "libraries": library_versions(),
            "training": {
                "run_dir": str(run_dir),
                "weights_sha256": sha256_file(run_dir / BEST),
                "backbone": card.detector.backbone,
                "detector": card.detector.to_dict(),
                "data": dict(card.data),
                "parent": card.parent,
            },
            "export": {
                **info.to_dict(),
                "parity": {
                    **par,
                    "score_threshold": PARITY_SCORE_THRESHOLD,
                    "score_tol": parity_score_tol,
                    "min_iou_required": 0.98,
                },
            },
        }
        name = name or f"{card.detector.backbone}-{run_dir.name}".replace("_", "-")
        manifest = manifest_dict(
            card, info, name=name, version=version, score_threshold=thr, provenance=prov, metrics=metrics
        )
        twins: dict[str, Path] = {}
        if uint8_input:
            manifest = _uint8_twin(manifest, onnx_path, [s.path for s in samples[:parity_images]], Path(tmp), twins)
            echo(manifest["provenance"]["export"]["uint8_parity"]["fp32-u8"]["summary"])
        manifest = write_detection_bundle(out, manifest, onnx_path, twins)
    echo(
        f"bundle written: {out} (FP32 ONNX Runtime on {split}: mAP@.5 {m['map50']}, part recall "
        f"{m['part']['recall']}, false alarms {m['part']['false_alarm_rate']})"
    )
    return manifest


__all__ = ["export_run", "manifest_dict", "ort_predict", "predict_with", "write_detection_bundle"]
