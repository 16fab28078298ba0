"""``defectscope demo --task detection``: the detector path end to end on embedded defaults.

Synthetic defects with exact boxes composited onto real functional ELPV cells
(``training.detection.synth``) -> Faster R-CNN (efficientnet_lite0 + FPN, 320 px) trained on the one
engine -> ONNX bundle (parity enforced) -> INT8 by scope behind the mAP@.5 gate -> a real
``defectscope serve`` daemon replaying the held-out images, a ZeroMQ subscriber receiving every
verdict with its boxes in original pixels, ``/metrics`` scraped, SIGTERM drain. The defects are
synthetic; the cells are real (ELPV, CC BY-NC-SA: never commit the data).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

# Demo-sized defaults (the full benchmark is bench/bench_detection.py): about 25 minutes on 2 CPU cores.
DEMO_CELLS = 240
DEMO_EPOCHS = 4
DEMO_IMAGE_SIZE = 320
DEMO_BACKBONE = "efficientnet_lite0"
CAMERA = "cam1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detection (--task detection)")
    g.add_argument(
        "--cells",
        type=int,
        default=DEMO_CELLS,
        help=f"functional ELPV cells the synthetic defects are drawn on (default {DEMO_CELLS})",
    )
    g.add_argument("--det-epochs", type=int, default=DEMO_EPOCHS, help=f"detector epochs (default {DEMO_EPOCHS})")
    g.add_argument("--det-backbone", default=DEMO_BACKBONE, help=f"detector backbone (default {DEMO_BACKBONE})")
    g.add_argument(
        "--det-image-size",
        type=int,
        default=DEMO_IMAGE_SIZE,
        help=f"detector input, square, multiple of 32 (default {DEMO_IMAGE_SIZE})",
    )
    g.add_argument("--source", default="elpv", help="background cells: 'elpv' or a folder of images (tests)")
    g.add_argument(
        "--det-train-args", default="", help="extra `defectscope train` options for the detector (space-separated)"
    )


def _replay_dir(data: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """The test split linked into one replay folder; {file name: ground-truth box count}."""
    coco = json.loads((data / "test.json").read_text())
    counts: dict[int, int] = {}
    for a in coco["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    d = out / "holdout" / CAMERA
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    truth = {}
    for j, im in enumerate(coco["images"]):
        src = (data / im["file_name"]).resolve()
        link = d / f"{j:05d}_{src.name}"
        os.symlink(src, link)
        truth[link.name] = counts.get(im["id"], 0)
    return d, truth


def _serve(station: Path, zmq_port: int, metrics_port: int, truth: dict[str, int], out: Path) -> dict[str, Any]:
    from defectscope.demo_steps import metric_sum, stream_first_verdicts

    seen, _, metrics = stream_first_verdicts(
        station, zmq_port, metrics_port, len(truth), lambda m: Path(m.get("source") or "").name, out, timeout_s=900.0
    )
    msgs = list(seen.values())
    tp = sum(1 for m in msgs if m["verdict"] == "defect" and truth.get(m["source"], 0) > 0)
    defective = sum(1 for m in msgs if truth.get(m["source"], 0) > 0)
    clean = len(msgs) - defective
    fa = sum(1 for m in msgs if m["verdict"] == "defect" and truth.get(m["source"], 0) == 0)
    boxes = sum(len(m.get("detections") or ()) for m in msgs)
    lat = sorted(m["latency_ms"]["total"] for m in msgs) or [0.0]
    (out / "stream.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs))
    return {
        "frames": len(truth),
        "verdicts_received": len(msgs),
        "schema_versions": sorted({m["schema_version"] for m in msgs}),
        "part_recall": tp / max(defective, 1),
        "false_alarm_rate": fa / max(clean, 1),
        "boxes_streamed": boxes,
        "latency_ms_p50": lat[len(lat) // 2],
        "metrics_frames_inferred": metric_sum(metrics, "defectscope_frames_inferred_total"),
    }


def run(args: argparse.Namespace) -> int:
    from defectscope.demo_steps import done, free_port, run_cli, station_toml, step

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, run_dir, bundle = out / "data", out / "run", out / "bundle"
    t0 = step("1/5 synthetic defects with exact boxes on real ELPV cells")
    if args.keep and (data / "test.json").is_file():
        print(f"reusing {data}")
    else:
        from training.detection.synth import main as synth_main

        rc = synth_main(["--out", str(data), "--source", args.source, "--limit", str(args.cells), "--force"])
        if rc:
            raise SystemExit(f"demo: synthetic data generation failed ({rc})")
    done(t0, "data ready")

    t0 = step("2/5 train a Faster R-CNN (FPN) on the one training engine")
    if args.keep and (run_dir / "best.safetensors").is_file():
        print(f"reusing {run_dir}")
    else:
        size = f"{args.det_image_size},{args.det_image_size}"
        train = [
            "--data",
            str(data / "train.json"),
            "--out",
            str(run_dir),
            "--overwrite",
            "--backbone",
            args.det_backbone,
            "--image-size",
            size,
            "--epochs",
            str(args.det_epochs),
            "--threads",
            str(args.threads),
            *args.det_train_args.split(),
        ]
        if args.max_steps_per_epoch:
            train += ["--max-steps-per-epoch", str(args.max_steps_per_epoch)]
        run_cli("train", train)
    done(t0, "trained")

    t0 = step("3/5 export to an ONNX detection bundle (parity vs PyTorch)")
    run_cli("export", [str(run_dir), "--out", str(bundle), "--force", "--threads", str(args.threads)])
    done(t0, "exported")

    t0 = step("4/5 INT8 by scope behind the mAP@.5 gate")
    import importlib.util

    from defectscope.cli import resolve

    # Gate OpenVINO too when it is installed: `auto` prefers it on x86 and refuses it where it loses mAP.
    gate = "onnxruntime,openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    rc = resolve("calibrate")(
        [str(bundle), "--run", str(run_dir), "--threads", str(args.threads), "--gate-backends", gate]
    )
    if rc not in (0, 3):  # 3: no scope passed the gate, FP32 keeps serving (said above)
        raise SystemExit(f"demo: calibrate failed with exit code {rc}")
    done(t0, "calibrated" if rc == 0 else "INT8 refused by the gate; serving FP32")

    t0 = step("5/5 serve: a real daemon, boxes over ZeroMQ, metrics, SIGTERM")
    _, truth = _replay_dir(data, out)
    zmq_port, metrics_port = args.zmq_port or free_port(), args.metrics_port or free_port()
    # Batch 1: the exported detector has a fixed batch; the bundle's score_threshold decides.
    station = station_toml(
        out,
        bundle,
        zmq_port,
        metrics_port,
        [CAMERA],
        args.threads,
        station="demo-det",
        max_batch=1,
        max_wait_ms=0.0,
        decision="",
        comment="one camera replays the held-out synthetic-defect cells in a loop",
    )
    served = _serve(station, zmq_port, metrics_port, truth, out)
    done(t0, "served")
    manifest = json.loads((bundle / "manifest.json").read_text())
    summary = {
        "task": "detection",
        "bundle": str(bundle),
        "default_artifact": manifest["default_artifact"],
        "metrics": manifest.get("metrics", {}),
        "stream": served,
        "note": "defects are synthetic; the cells are real ELPV cells (CC BY-NC-SA)",
    }
    from runtime.fsio import atomic_write_json

    atomic_write_json(out / "demo-summary.json", summary)
    fp32 = manifest.get("metrics", {}).get("fp32", {})
    int8 = manifest.get("metrics", {}).get("int8", {})
    print(
        f"\nheld-out mAP@.5: FP32 {fp32.get('map50')}, INT8 {int8.get('map50', '-')}; served "
        f"{served['verdicts_received']}/{served['frames']} frames, {served['boxes_streamed']} boxes, part recall "
        f"{served['part_recall']:.3f}, false alarms {served['false_alarm_rate']:.3f}"
    )
    print(f"everything is in {out} (demo-summary.json, run/, bundle/, stream.jsonl, snapshots/)")
    return 0 if served["verdicts_received"] == served["frames"] else 1
