"""INT8 for detection bundles: ONNX Runtime static QDQ by scope, gated on mAP@.5, fastest passing scope kept.

A Faster R-CNN graph is a few dozen compute nodes (backbone + FPN + RPN head convolutions, the box
head's fc6/fc7 Gemms, the box predictor) inside a large float control graph (anchors, NMS, RoiAlign,
box decoding) that must stay float. Scopes, largest first (the calibration ranges are collected
once, on the largest, and reused):

- ``all``:          backbone, FPN, RPN head, box head fc6/fc7
- ``convs``:        backbone, FPN, RPN head
- ``backbone_fpn``: backbone, FPN
- ``backbone``:     backbone only

The box predictor (class scores, box regression) is never quantized: it is tiny and its outputs
are the scores the station thresholds. Each scope is also tried with a float prefix (the first
trunk nodes kept in float, ``DEFAULT_FLOAT_PREFIXES``). Every trial is quantized, run on the held-out split with ONNX
Runtime and timed; the accuracy gate is the mAP@.5 drop vs the FP32 artifact in points (budget
``DEFAULT_BUDGET_POINTS``, the one definition shared with classifiers); among passing scopes the
fastest is written as the bundle's ``int8`` artifact (default artifact). None passing: the bundle
is left unchanged (the float artifact keeps serving) and the report says by how much each missed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.detection_trials import (  # noqa: F401  (re-exported: the command and tests import them here)
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_FLOAT_PREFIXES,
    GATE_METRIC,
    NEAR_TIE,
    NEAR_TIE_GAIN,
    PARTS,
    QUANTIZABLE_OPS,
    SCOPES,
    DetectionCalibration,
    DetectionQuantizationError,
    ScopeTrial,
    choose_trial,
    scope_nodes,
)
from runtime.engine.gate import DEFAULT_BUDGET_POINTS


def _calibration_tensor(card: Any, size: int, seed: int) -> np.ndarray:
    """(N,3,H,W) float32 letterboxed training images (defects and negatives alike), seeded sample."""
    from training.detection.datasets import DetectionSpec, resolve_detection
    from training.detection.loader import DetectionDataset

    splits = resolve_detection(DetectionSpec.from_dict(card.data, where="model.json: data"))
    pool = list(splits.train)
    if not pool:
        raise DetectionQuantizationError("the run's training split is empty: no calibration images")
    rng = np.random.default_rng(seed)
    pick = [pool[i] for i in sorted(rng.permutation(len(pool))[: min(size, len(pool))])]
    ds = DetectionDataset(pick, card.detector.image_size)
    return np.stack([ds[i][0].numpy().astype(np.float32) for i in range(len(ds))])


def _evaluate(
    onnx_path: Path, ds: Any, samples: Sequence[Any], classes: Sequence[str], threshold: float, threads: int
) -> tuple[dict[str, Any], float]:
    from calibration.detection_bundle import ort_predict
    from training.detection.task import DetectionTask, DetPredictions

    preds, ms = ort_predict(onnx_path, ds, threads)
    m = DetectionTask(threshold).evaluate(DetPredictions(list(samples), preds), classes)
    return m, float(np.median(ms)) if ms else float("nan")


def _openvino_evaluate(
    onnx_path: Path,
    ds: Any,
    samples: Sequence[Any],
    classes: Sequence[str],
    threshold: float,
    threads: int,
    precision: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """mAP through OpenVINO at ``precision`` (f32 | bf16): the station's other CPU engine, same images."""
    from calibration.detection_bundle import predict_with
    from calibration.export_detection import OUTPUT_NAMES
    from runtime.inference.openvino import OpenVINOModel
    from training.detection.task import DetectionTask, DetPredictions

    engine = OpenVINOModel(onnx_path, list(OUTPUT_NAMES), threads=threads, precision=precision)
    try:
        preds, _ = predict_with(engine.run, ds)
    finally:
        engine.close()
    m = DetectionTask(threshold).evaluate(DetPredictions(list(samples), preds), classes)
    return m, {"openvino": engine.version, "inference_precision": engine.inference_precision}


def backend_records(
    ids: Sequence[str],
    models: dict[str, Path],
    known: dict[str, dict[str, Any]],
    card: Any,
    held_out: Sequence[Any],
    *,
    reference_map50: float,
    budget: float,
    split: str,
    score_threshold: float,
    threads: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{artifact: {record id: mAP + engine facts + gate vs the ONNX Runtime FP32 mAP@.5}} (calibrate
    --gate-backends): ``auto`` refuses a backend whose record fails (runtime.inference.selection.accuracy_record)."""
    from training.detection.loader import DetectionDataset

    ds = DetectionDataset(list(held_out), card.detector.image_size)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, path in models.items():
        out[key] = {}
        for rid in ids:
            if rid == "onnxruntime":
                import onnxruntime

                m, facts = known[key], {"onnxruntime": onnxruntime.__version__, "inference_precision": "f32"}
            else:
                m, facts = _openvino_evaluate(
                    path, ds, held_out, card.classes, score_threshold, threads, rid.partition(":")[2]
                )
                rid = f"openvino:{facts['inference_precision']}"  # what the plugin actually ran
            drop = 100.0 * (reference_map50 - (m.get(GATE_METRIC) or 0.0))
            passed = drop <= budget + 1e-9
            out[key][rid] = {
                "map50": m.get(GATE_METRIC),
                "map": m.get("map"),
                **facts,
                "gate": {
                    "passed": passed,
                    "metric": GATE_METRIC,
                    "budget_points": budget,
                    "metrics": [GATE_METRIC],
                    "drops_points": {GATE_METRIC: round(drop, 4)},
                    "failed": [] if passed else [GATE_METRIC],
                    "split": split,
                    "n": len(held_out),
                    "reference": "onnxruntime fp32",
                },
            }
    return out


def calibrate_detector(
    fp32_model: str | Path,
    card: Any,
    held_out: Sequence[Any],
    dest: str | Path,
    *,
    score_threshold: float,
    size: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = 0,
    method: str = "entropy",
    budget: float = DEFAULT_BUDGET_POINTS,
    scopes: Sequence[str] = tuple(SCOPES),
    float_prefixes: Sequence[int] = DEFAULT_FLOAT_PREFIXES,
    threads: int = 1,
    echo: Callable[[str], Any] = print,
    report_on: Sequence[Any] = (),
    report_split: str = "test",
) -> DetectionCalibration:
    """Quantize ``fp32_model`` per scope, gate each on ``held_out`` (DetSamples), choose one (``choose_trial``:
    the fastest passing, or a more accurate near-tie) and write it to ``dest``. ``report_on``: the chosen trial
    and FP32 are then measured on these samples (the split that is reported, not the one that chose), and the
    budget must hold there too."""
    import shutil

    from calibration.export_detection import quant_preprocess
    from calibration.quantize import QuantConfig, quantize_model
    from training.detection.loader import DetectionDataset

    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise DetectionQuantizationError(f"scopes {unknown}: expected some of {list(SCOPES)}")
    if not held_out:
        raise DetectionQuantizationError("no held-out images to gate INT8 on")
    classes = card.classes
    ds = DetectionDataset(list(held_out), card.detector.image_size)
    ref, ref_ms = _evaluate(Path(fp32_model), ds, held_out, classes, score_threshold, threads)
    ref_map50 = ref[GATE_METRIC] or 0.0
    echo(f"FP32: mAP@.5 {ref_map50:.4f}, {ref_ms:.2f} ms/image on {len(held_out)} held-out images")
    # batch_size 1: the exported graph has a fixed batch (docs/contracts.md: detection bundles)
    config = QuantConfig(method=method, target="cpu", per_channel=True, batch_size=1)
    trials: list[ScopeTrial] = []
    with tempfile.TemporaryDirectory(prefix="defectscope-detq-") as tmp_dir:
        tmp = Path(tmp_dir)
        prep = quant_preprocess(fp32_model, tmp / "prep.onnx")
        x = _calibration_tensor(card, size, seed)
        cache = tmp / "ranges.cache"
        # Largest scope first: its calibration covers every smaller scope's tensors.
        order = sorted(scopes, key=lambda s: -len(SCOPES[s]))
        trunk = scope_nodes(prep, "backbone")  # graph order: the stem first
        for scope in order:
            for prefix in sorted(set(float_prefixes)):
                kept = set(trunk[:prefix])
                nodes = [n for n in scope_nodes(prep, scope) if n not in kept]
                if not nodes:
                    echo(f"scope {scope}: no compute nodes in this graph; skipped")
                    continue
                label = scope if not prefix else f"{scope}-f{prefix}"
                out = tmp / f"int8-{label}.onnx"
                quantize_model(prep, out, config, cache, x, nodes_to_quantize=nodes)
                m, ms = _evaluate(out, ds, held_out, classes, score_threshold, threads)
                drop = 100.0 * (ref_map50 - (m[GATE_METRIC] or 0.0))
                trial = ScopeTrial(
                    scope,
                    len(nodes),
                    m[GATE_METRIC],
                    m["map"],
                    drop,
                    ms,
                    drop <= budget + 1e-9,
                    dict(m.get("part") or {}),
                    prefix,
                )
                trials.append(trial)
                echo(
                    f"INT8 scope {label:15} ({len(nodes):3} nodes): mAP@.5 {trial.map50 or 0.0:.4f} "
                    f"(drop {drop:+.2f} pts, budget {budget:g}) {ms:.2f} ms/image -> "
                    f"{'pass' if trial.passed else 'FAIL'}"
                )
        chosen, note = choose_trial(trials)
        report: dict[str, Any] = {}
        if chosen is not None and report_on:
            rep_ds = DetectionDataset(list(report_on), card.detector.image_size)
            r_ref, _ = _evaluate(Path(fp32_model), rep_ds, report_on, classes, score_threshold, threads)
            r_int8, _ = _evaluate(
                tmp / f"int8-{chosen.label}.onnx", rep_ds, report_on, classes, score_threshold, threads
            )
            r_drop = 100.0 * ((r_ref[GATE_METRIC] or 0.0) - (r_int8[GATE_METRIC] or 0.0))
            report = {
                "split": report_split,
                "n": len(report_on),
                "fp32": {k: r_ref.get(k) for k in ("map", "map50", "part")},
                "int8": {k: r_int8.get(k) for k in ("map", "map50", "part")},
                "drop_points": r_drop,
            }
            echo(
                f"{chosen.label} on {report_split} ({len(report_on)} images): mAP@.5 {r_int8[GATE_METRIC] or 0.0:.4f} "
                f"vs FP32 {r_ref[GATE_METRIC] or 0.0:.4f} (drop {r_drop:+.2f} pts)"
            )
            if r_drop > budget + 1e-9:
                note = f"{chosen.label} passed on the selection split but drops {r_drop:+.2f} points on {report_split}"
                chosen = None
        artifact = None
        if chosen is not None:
            artifact = Path(dest)
            artifact.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp / f"int8-{chosen.label}.onnx", artifact)
    return DetectionCalibration(chosen, tuple(trials), ref, budget, ref_ms, artifact, note, report)


def calibrate_bundle(
    bundle_dir: str | Path,
    run_dir: str | Path,
    *,
    split: str = "test",
    select_split: str = "val",
    limit: int | None = None,
    gate_backends: Sequence[str] = ("onnxruntime",),
    echo: Callable[[str], Any] = print,
    **kwargs: Any,
) -> DetectionCalibration:
    """``defectscope calibrate`` on a detection bundle: the gated INT8 artifact added atomically, made default.
    The scope is chosen on ``select_split`` and the chosen artifact reported (and gated again) on ``split``."""
    from calibration.detection_bundle import held_out_samples
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import Artifact
    from runtime.bundle.write import add_artifact
    from runtime.inference.preprocess import FLOAT_NCHW, UINT8_NHWC
    from training.detection.checkpoint import DetCard

    bundle = load_bundle(bundle_dir)  # checksums verified before the FP32 graph is used
    m = bundle.manifest
    if m.model.task != "detection":
        raise DetectionQuantizationError(f"{bundle_dir}: model.task is {m.model.task!r}, not 'detection'")
    fp32_key = next(
        (k for k, a in m.artifacts.items() if a.precision == "fp32" and a.format == "onnx" and a.input == FLOAT_NCHW),
        None,
    )
    if fp32_key is None:
        raise DetectionQuantizationError(f"{bundle_dir}/manifest.json: artifacts: no FP32 ONNX artifact to quantize")
    card_path = Path(run_dir) / "model.json"
    try:
        card = DetCard.from_dict(json.loads(card_path.read_text(encoding="utf-8")), where=str(card_path))
    except (OSError, ValueError) as exc:  # ValueError includes CheckpointError: a forged or invalid card
        raise DetectionQuantizationError(f"{card_path}: cannot read the detection card ({exc})") from None
    if ["ok", *card.classes] != list(m.classes):
        raise DetectionQuantizationError(
            f"{card_path}: classes {list(card.classes)} are not the bundle's "
            f"{list(m.classes[1:])}; pass the run the bundle was exported from"
        )
    held_out = held_out_samples(card, split, limit)
    chooser = held_out if select_split == split else held_out_samples(card, select_split, limit)
    if not chooser:  # a run without that split: choose on the reported one (said in the record)
        chooser, select_split = held_out, split
    score = getattr(m.output, "score_threshold", None)
    threshold = float(score) if score is not None else 0.5
    with tempfile.TemporaryDirectory(prefix="defectscope-detq-out-") as tmp:
        dest = Path(tmp) / "model.int8.onnx"
        result = calibrate_detector(
            bundle.artifact_path(fp32_key),
            card,
            chooser,
            dest,
            score_threshold=threshold,
            echo=echo,
            report_on=held_out if chooser is not held_out else (),
            report_split=split,
            **kwargs,
        )
        if result.chosen is None:
            return result
        c = result.chosen
        rep = result.report
        drop = rep["drop_points"] if rep else c.drop_points
        gate = {
            "passed": True,
            "metric": GATE_METRIC,
            "budget_points": result.budget_points,
            "drops_points": {GATE_METRIC: round(drop, 4)},
            "split": split,
            "n": len(held_out),
            "where": "calibration",
            "chosen_on": {"split": select_split, "n": len(chooser), "drop_points": round(c.drop_points, 4)},
        }
        quant = {
            "method": kwargs.get("method", "entropy"),
            "per_channel": True,
            "format": "qdq",
            "scope": c.scope,
            "float_prefix": c.float_prefix,
            "trial": c.label,  # scope and float prefix as the trials name it
            "chosen_on": select_split,
            **({"choice": result.note} if result.note else {}),
            "quantized_nodes": c.nodes,
            "float_parts": sorted(set(PARTS) - set(SCOPES[c.scope])) + ["box_predictor", "postprocess"],
            "scope_trials": [t.to_dict() for t in result.trials],
            "fp32_ms_per_image": round(result.fp32_ms_per_image, 3),
        }
        metrics: dict[str, Any] = {
            "split": split,
            "n": len(held_out),
            "map": rep["int8"]["map"] if rep else c.map,
            "map50": rep["int8"]["map50"] if rep else c.map50,
            "part": rep["int8"]["part"] if rep else c.part,
            "latency_ms_median": c.ms_per_image,
            "gate": gate,
        }
        records: dict[str, dict[str, dict[str, Any]]] = {}
        if any(r != "onnxruntime" for r in gate_backends):
            ref = rep["fp32"] if rep else result.reference
            records = backend_records(
                gate_backends,
                {fp32_key: bundle.artifact_path(fp32_key), "int8": dest},
                {fp32_key: ref, "int8": {"map50": metrics["map50"], "map": metrics["map"]}},
                card,
                held_out,
                reference_map50=ref.get(GATE_METRIC) or 0.0,
                budget=result.budget_points,
                split=split,
                score_threshold=threshold,
                threads=kwargs.get("threads", 1),
            )
            for key, per in records.items():
                for rid, r in per.items():
                    echo(
                        f"gate through {rid:14} {key:5}: mAP@.5 {r['map50'] or 0.0:.4f} (drop "
                        f"{r['gate']['drops_points'][GATE_METRIC]:+.2f} pts) -> "
                        f"{'ok' if r['gate']['passed'] else 'FAIL: auto will refuse it'}"
                    )
            metrics["backends"] = records["int8"]
        add_artifact(
            bundle_dir,
            "int8",
            Artifact(file="model.int8.onnx", format="onnx", precision="int8", quantization=quant),
            dest,
            metrics=metrics,
            make_default=True,
        )
        if any(a.input == UINT8_NHWC for a in m.artifacts.values()):
            _add_uint8_twin(bundle_dir, dest, m.input, [s.path for s in held_out[:8]], Path(tmp), echo)
        if records:
            fresh = load_bundle(bundle_dir)
            fp32_metrics = {**dict(fresh.manifest.metrics.get(fp32_key) or {}), "backends": records[fp32_key]}
            add_artifact(
                bundle_dir,
                fp32_key,
                fresh.manifest.artifacts[fp32_key],
                fresh.artifact_path(fp32_key),
                metrics=fp32_metrics,
            )
        return DetectionCalibration(
            c,
            result.trials,
            result.reference,
            result.budget_points,
            result.fp32_ms_per_image,
            Path(bundle_dir) / "model.int8.onnx",
            result.note,
            result.report,
        )


def _add_uint8_twin(
    bundle_dir: str | Path, int8_path: Path, spec: Any, paths: list[str], tmp: Path, echo: Callable[[str], Any]
) -> None:
    """The bundle serves uint8 frames: add ``int8-u8``, the INT8 graph behind the in-graph normalisation."""
    from calibration.detection_bundle import UINT8_PARITY_ATOL
    from calibration.graph_input import GraphInputError, add_uint8_twins
    from runtime.bundle.manifest import Artifact
    from runtime.bundle.write import add_artifact
    from runtime.inference.preprocess import read_image

    arts: dict[str, Any] = {"int8": Artifact(file="model.int8.onnx", format="onnx", precision="int8")}
    files = {"model.int8.onnx": int8_path}
    frames = [read_image(p) for p in paths]
    try:
        reports = add_uint8_twins(arts, files, ["int8"], spec, frames, tmp, atol=UINT8_PARITY_ATOL, top1=False)
    except GraphInputError as exc:
        raise DetectionQuantizationError(str(exc)) from None
    echo(reports["int8-u8"].summary())
    twin = arts["int8-u8"]
    add_artifact(bundle_dir, "int8-u8", twin, files[twin.file], metrics={"uint8_parity": reports["int8-u8"].to_dict()})


__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "DetectionCalibration",
    "DetectionQuantizationError",
    "GATE_METRIC",
    "PARTS",
    "SCOPES",
    "ScopeTrial",
    "calibrate_bundle",
    "calibrate_detector",
    "choose_trial",
    "NEAR_TIE",
    "scope_nodes",
]
