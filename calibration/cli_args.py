"""What ``defectscope export`` and ``calibrate`` share across the two tasks: the argument parsers
(one per verb, the detector refuses the classifier-only options it is given), exit codes, the
one-line error wrapper and the thread setup.

Exit status: 0 ok; 1 bad input (bundle, run directory, data); 2 usage;
3 the INT8 accuracy gate failed (report printed, bundle unchanged);
4 the ONNX export failed its parity check against PyTorch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

EXIT_ERROR, EXIT_GATE, EXIT_PARITY = 1, 3, 4


def make_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def run_command(name: str, body, args: argparse.Namespace) -> int:
    """Run ``body(args, console)``; a failure is one clear line and EXIT_ERROR, not a traceback.

    ``DEFECTSCOPE_DEBUG=1`` re-raises for the traceback.
    """
    console = make_console()
    try:
        return body(args, console)
    except Exception as exc:  # noqa: BLE001 - KeyboardInterrupt/SystemExit are not Exceptions
        if os.environ.get("DEFECTSCOPE_DEBUG"):
            raise
        console.print(f"[bold red]{name} failed:[/] {exc}")
        return EXIT_ERROR


def resolve_threads(value: int | None) -> int:
    from calibration.evaluate import default_threads

    return value or default_threads()


def setup_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals stall CPU convolutions


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
# Parity images by task: a detector's parity runs torch and ONNX Runtime per image with NMS (~10x a classifier's cost).
PARITY_IMAGES = {"classification": 64, "detection": 16}


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="defectscope export",
        description="Export a trained checkpoint to an ONNX model bundle (opset 17, dynamic batch, "
        "input 'input' / output 'logits'), check parity with PyTorch on held-out images and "
        "record FP32 metrics, preprocessing and provenance in manifest.json.",
    )
    p.add_argument("run", help="training run directory (model.json + best.safetensors) or a .safetensors file")
    p.add_argument("--out", "-o", required=True, help="bundle directory to write (atomically)")
    p.add_argument("--name", help="model name in the manifest (default: <backbone>-<run dir name>)")
    p.add_argument("--version", default="1.0.0", help="model version in the manifest (default: %(default)s)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim graph simplification")
    p.add_argument("--split", default="test", choices=("test", "val"), help="held-out split (default: %(default)s)")
    p.add_argument(
        "--parity-images",
        type=int,
        help=f"held-out images for the parity check (default: {PARITY_IMAGES['classification']} for classifiers, "
        f"{PARITY_IMAGES['detection']} for detectors)",
    )
    p.add_argument(
        "--parity-atol",
        type=float,
        default=1e-3,
        help="max allowed |logit difference| ONNX Runtime vs PyTorch (default: %(default)s)",
    )
    p.add_argument(
        "--parity-min-agreement",
        type=float,
        default=0.99,
        help="min top-1 agreement ONNX Runtime vs PyTorch (default: %(default)s)",
    )
    p.add_argument("--eval-limit", type=int, help="evaluate FP32 on at most this many held-out images (stratified)")
    p.add_argument("--no-eval", action="store_true", help="skip the FP32 held-out evaluation")
    p.add_argument(
        "--threads", type=int, help="CPU threads for torch / ONNX Runtime (default: DEFECTSCOPE_THREADS or all)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--pack", metavar="ARCHIVE", help="also write the bundle as a .tar.gz archive")
    p.add_argument(
        "--uint8-input",
        action="store_true",
        help="also write 'fp32-u8': the same model taking resized uint8 NHWC BGR frames, normalised inside "
        "the graph (calibrate then adds INT8 twins too); checked for parity against the float path",
    )
    return p


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------
def calibrate_parser() -> argparse.ArgumentParser:
    from calibration.calibset import DEFAULT_SIZE
    from calibration.gate import DEFAULT_BUDGET, DEFAULT_GATE_BACKENDS, gate_backends_arg
    from calibration.quantize_detection import DEFAULT_CALIBRATION_IMAGES

    p = argparse.ArgumentParser(
        prog="defectscope calibrate",
        description="Quantize a bundle's FP32 ONNX model to INT8 (ONNX Runtime static QDQ, per-channel "
        "weights) with a stratified calibration set from the training data, gate it against "
        "FP32 on the held-out split and, when the gate fails, search for the fewest layers to "
        f"keep in float. Exit status {EXIT_GATE} when the gate still fails (bundle unchanged). "
        "Detection bundles: quantized by scope (backbone, FPN, RPN head, box head), gated on mAP@.5, "
        "the fastest passing scope kept (calibration/quantize_detection.py).",
    )
    p.add_argument("bundle", help="bundle directory written by `defectscope export`")
    p.add_argument("--run", help="training run directory (default: the one recorded at export)")
    p.add_argument(
        "--method",
        default="entropy",
        choices=("minmax", "entropy", "percentile"),
        help="activation range calibration (default: %(default)s)",
    )
    p.add_argument(
        "--target",
        default="cpu",
        choices=("cpu", "tensorrt", "both"),
        help="cpu: uint8 activations, fast ONNX Runtime kernels (artifact 'int8'); tensorrt: "
        "symmetric int8 activations for TensorRT explicit quantization (artifact 'int8-trt'); "
        "both (default: %(default)s)",
    )
    p.add_argument(
        "--size",
        type=int,
        help=f"calibration images (default: {DEFAULT_SIZE} for classifiers, "
        f"{DEFAULT_CALIBRATION_IMAGES} for detectors)",
    )
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: %(default)s)")
    p.add_argument(
        "--calibration-data", metavar="DIR", help="calibrate on images from this folder instead of the training split"
    )
    p.add_argument(
        "--percentile", type=float, default=99.999, help="percentile method: kept percent (default: %(default)s)"
    )
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales instead of per-channel")
    p.add_argument(
        "--reduce-range", action="store_true", help="7-bit weights (for x86 CPUs without VNNI, where U8S8 may saturate)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help=f"max allowed drop in percentage points (default: {DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--gate-metric",
        action="append",
        metavar="METRIC",
        help="gated metric: accuracy, macro_f1 or recall:<class>; repeatable (default: accuracy and macro_f1)",
    )
    p.add_argument(
        "--gate-backends",
        type=gate_backends_arg,
        default=DEFAULT_GATE_BACKENDS,
        metavar="LIST",
        help="also gate every artifact through these engines and record the results in the manifest "
        "(auto refuses a failed one): onnxruntime, openvino (= f32, plus bf16 where the CPU has "
        f"it), openvino:f32, openvino:bf16; comma-separated (default: {DEFAULT_GATE_BACKENDS})",
    )
    p.add_argument("--split", choices=("test", "val"), help="held-out split for the gate (default: the export's)")
    p.add_argument("--limit", type=int, help="gate on at most this many held-out images (stratified; smoke runs)")
    p.add_argument("--no-fallback", action="store_true", help="do not search for float layers when the gate fails")
    p.add_argument(
        "--max-float-nodes",
        type=int,
        default=16,
        help="give up when more than this many layers would stay in float (default: %(default)s)",
    )
    p.add_argument(
        "--sensitivity-images",
        type=int,
        default=32,
        help="calibration images used to rank per-layer sensitivity (default: %(default)s)",
    )
    p.add_argument(
        "--float-prefix",
        default="auto",
        metavar="auto|auto:N|N",
        help="cpu target: leading layers kept in float because FP32 runs them faster (the 3-channel "
        "stem, the first full-resolution depthwise conv). auto: time prefixes of 0..4 layers on "
        "this machine and keep the fastest; auto:N: try up to N; N: exactly N, untimed; 0: all "
        "INT8 (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per inference (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: DEFECTSCOPE_THREADS or all)")
    p.add_argument("--report", metavar="JSON", help="write the full calibration report (gate, search trials) here")
    p.add_argument(
        "--save-calibration-tensor",
        metavar="NPY",
        help="also save the preprocessed calibration tensor (for TensorRT 8.x build-engine on a device)",
    )
    p.add_argument("--keep-default", action="store_true", help="leave the bundle's default artifact unchanged")
    p.add_argument("--out", help="write the calibrated bundle here instead of updating BUNDLE in place")
    return p


def run_dir_of(args: argparse.Namespace, manifest: Any) -> Path:
    if args.run:
        return Path(args.run)
    recorded = (manifest.provenance.get("training") or {}).get("run_dir")
    if not recorded:
        raise ValueError("the bundle records no training run directory; pass --run RUN_DIR")
    if not Path(recorded).is_dir():
        raise ValueError(f"{recorded}: training run directory recorded at export is gone; pass --run RUN_DIR")
    return Path(recorded)
