"""``defectscope export`` and ``defectscope calibrate``.

Exit status: 0 ok; 1 bad input (bundle, run directory, data); 2 usage;
3 the INT8 accuracy gate failed (report printed, bundle unchanged);
4 the ONNX export failed its parity check against PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_ERROR, EXIT_GATE, EXIT_PARITY = 1, 3, 4


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def run_command(name: str, body, args: argparse.Namespace) -> int:
    """Run ``body(args, console)``; a failure is one clear line and EXIT_ERROR, not a traceback.

    ``DEFECTSCOPE_DEBUG=1`` re-raises for the traceback.
    """
    console = _console()
    try:
        return body(args, console)
    except Exception as exc:  # noqa: BLE001 - KeyboardInterrupt/SystemExit are not Exceptions
        if os.environ.get("DEFECTSCOPE_DEBUG"):
            raise
        console.print(f"[bold red]{name} failed:[/] {exc}")
        return EXIT_ERROR


def _threads(value: int | None) -> int:
    from calibration.evaluate import default_threads

    return value or default_threads()


def _setup_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals stall CPU convolutions


def _heldout(splits: Any, split: str, limit: int | None, seed: int) -> list[Any]:
    from calibration.calibset import stratified_sample

    samples = list(splits.split(split))
    if not samples:
        raise ValueError(f"split {split!r} of the dataset is empty; choose another with --split")
    if limit is not None and limit < len(samples):
        samples = stratified_sample(samples, limit, seed)
    return sorted(samples, key=lambda s: s.path)


def _check_classes(where: str, got: Sequence[str], want: Sequence[str]) -> None:
    if list(got) != list(want):
        raise ValueError(f"{where}: dataset classes {list(got)} differ from the model's {list(want)}")


def _metrics_table(title: str, rows: list[tuple[str, ...]], headers: Sequence[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        style = "bold red" if r[-1] == "FAIL" else None
        table.add_row(*r, style=style)
    return table


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
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
        "--parity-images", type=int, default=64, help="held-out images for the parity check (default: %(default)s)"
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
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    from training.detection.checkpoint import card_task

    if card_task(args.run) == "detection":  # a detector run (model.json task=detection)
        return run_command("export", _export_detection, args)
    return run_command("export", _export, args)


def _export_detection(args: argparse.Namespace, console: Any) -> int:
    from calibration.detection_bundle import export_run
    from calibration.export_detection import DetectionExportError

    threads = _threads(args.threads)
    _setup_torch(threads)
    try:
        export_run(
            args.run,
            args.out,
            name=args.name,
            version=str(args.version),
            split=args.split,
            parity_images=min(args.parity_images, 16),
            eval_limit=args.eval_limit,
            threads=threads,
            force=args.force,
            echo=console.print,
        )
    except DetectionExportError as exc:
        console.print(f"[bold red]export refused:[/] the ONNX detector does not reproduce PyTorch: {exc}")
        return EXIT_PARITY
    return 0


def _export(args: argparse.Namespace, console: Any) -> int:
    from calibration.calibset import preprocess_paths, stratified_sample
    from calibration.evaluate import evaluate_onnx
    from calibration.export import check_parity, export_onnx
    from calibration.provenance import git_commit, library_versions, utc_now
    from runtime.bundle import Artifact, Manifest, ModelInfo, OutputSpec, pack, write_bundle
    from runtime.fsio import sha256_file
    from training.checkpoint import load_model
    from training.data import resolve_splits

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out}: already exists; pass --force to replace it")
    threads = _threads(args.threads)
    _setup_torch(threads)
    model, card = load_model(args.run)
    spec = card.input
    run_path = Path(args.run).resolve()
    run_dir = run_path if run_path.is_dir() else run_path.parent
    weights_file = run_path / "best.safetensors" if run_path.is_dir() else run_path

    with console.status("resolving the dataset splits"):
        splits = resolve_splits(card.data)
    _check_classes(str(run_dir / "model.json"), splits.classes, card.classes)
    if card.dataset_fingerprint and splits.fingerprint != card.dataset_fingerprint:
        console.print(
            f"[yellow]warning:[/] dataset fingerprint {splits.fingerprint} differs from the one at "
            f"training time ({card.dataset_fingerprint}): the images changed since training"
        )

    with tempfile.TemporaryDirectory(prefix="defectscope-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        with console.status("exporting to ONNX"):
            info = export_onnx(
                model, spec, onnx_path, card.num_classes, opset=args.opset, simplify=not args.no_simplify
            )
        console.print(
            f"exported opset {info.opset}, {info.nodes} nodes"
            + (f" (simplified from {info.nodes_before_simplify})" if info.simplified else "")
        )
        if info.simplify_error:
            console.print(f"[yellow]warning:[/] onnxslim failed ({info.simplify_error}); kept the unsimplified graph")

        held = _heldout(splits, args.split, None, 0)
        parity_samples = sorted(stratified_sample(held, min(args.parity_images, len(held)), 0), key=lambda s: s.path)
        x_par = preprocess_paths([s.path for s in parity_samples], spec, threads=threads)
        parity = check_parity(
            model, onnx_path, x_par, atol=args.parity_atol, min_agreement=args.parity_min_agreement, threads=threads
        )
        console.print(parity.summary())
        if not parity.passed:
            console.print("[bold red]export refused:[/] the ONNX model does not reproduce PyTorch within tolerance")
            return EXIT_PARITY

        metrics: dict[str, Any] = {}
        if not args.no_eval:
            eval_samples = _heldout(splits, args.split, args.eval_limit, 0)
            x = preprocess_paths(
                [s.path for s in eval_samples], spec, threads=threads, progress=True, desc=f"{args.split} split"
            )
            m, _ = evaluate_onnx(onnx_path, x, [s.label for s in eval_samples], card.classes, args.split, threads)
            metrics["fp32"] = m.to_dict()
            console.print(
                f"FP32 (ONNX Runtime) on {args.split} (n={m.n}): accuracy {m.accuracy:.4f}, macro-F1 {m.macro_f1:.4f}"
            )

        name = args.name or f"{card.backbone}-{run_dir.name}".replace("_", "-")
        manifest = Manifest(
            model=ModelInfo(
                name=name,
                version=str(args.version),
                task="classification",
                architecture=card.backbone,
                created=utc_now(),
            ),
            classes=tuple(card.classes),
            good_classes=tuple(card.good_classes),
            input=spec,
            output=OutputSpec(kind="logits", names=("logits",)),
            artifacts={"fp32": Artifact(file="model.onnx", format="onnx", precision="fp32")},
            default_artifact="fp32",
            provenance={
                "config_hash": card.config_hash,
                "dataset_fingerprint": card.dataset_fingerprint or splits.fingerprint,
                "git_commit": git_commit(),
                "libraries": library_versions(),
                "training": {
                    "run_dir": str(run_dir),
                    "weights_sha256": sha256_file(weights_file),
                    "backbone": card.backbone,
                    "weights": card.weights,
                    "data": card.data,
                    "dataset_fingerprint_at_export": splits.fingerprint,
                },
                "export": {**info.to_dict(), "parity": parity.to_dict()},
            },
            metrics=metrics,
        )
        bundle = write_bundle(out, manifest, {"model.onnx": onnx_path})
    console.print(f"[green]bundle written:[/] {bundle.path} ({manifest.model.name} {manifest.model.version})")
    if args.pack:
        archive = pack(bundle.path, args.pack)
        console.print(f"packed: {archive}")
    return 0


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


def calibrate_main(argv: list[str] | None = None) -> int:
    args = calibrate_parser().parse_args(argv)
    from calibration.detection_cli import bundle_task, calibrate_detection

    if bundle_task(args.bundle) == "detection":
        return run_command("calibrate", calibrate_detection, args)
    if args.size is None:
        from calibration.calibset import DEFAULT_SIZE

        args.size = DEFAULT_SIZE
    return run_command("calibrate", _calibrate, args)


def _run_dir(args: argparse.Namespace, manifest: Any) -> Path:
    if args.run:
        return Path(args.run)
    recorded = (manifest.provenance.get("training") or {}).get("run_dir")
    if not recorded:
        raise ValueError("the bundle records no training run directory; pass --run RUN_DIR")
    if not Path(recorded).is_dir():
        raise ValueError(f"{recorded}: training run directory recorded at export is gone; pass --run RUN_DIR")
    return Path(recorded)


def _gate_backends(
    args: argparse.Namespace, console: Any, models: dict, ref: Any, data: Any, settings: Any, known: dict, output: str
) -> dict:
    """Per-backend accuracy records ({artifact: {backend id: record}}) for --gate-backends."""
    from calibration.gate import backend_rows, gate_backends

    ids = args.gate_backends
    if ids == ("onnxruntime",):
        return {}
    with console.status(f"gating through {', '.join(ids)}"):
        records = gate_backends(ids, models, ref, data, output, settings.budget, settings.metrics, known)
    rows = backend_rows(records)
    console.print(
        _metrics_table(
            "per-backend accuracy gate", rows, ("artifact", "backend", "accuracy", "macro_f1", "max drop pts", "status")
        )
    )
    if any(r[-1] == "FAIL" for r in rows):
        console.print(
            "[yellow]recorded: the runtime's auto selection refuses the engines marked FAIL for those artifacts[/]"
        )
    return records


def _calibrate(args: argparse.Namespace, console: Any) -> int:
    from calibration.calibset import (
        build_calibration_set,
        calibration_set_from_directory,
        preprocess_paths,
        save_tensor,
    )
    from calibration.gate import DEFAULT_METRICS
    from calibration.pipeline import EvalData, GateSettings, quantize_and_gate
    from calibration.provenance import library_versions
    from calibration.quantize import QuantConfig, prepare_float_model
    from calibration.speed import SpeedSettings
    from runtime.bundle import Artifact, load_bundle, write_bundle
    from training.checkpoint import read_card
    from training.data import resolve_splits

    threads = _threads(args.threads)
    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    if args.out and Path(args.out).exists():
        raise ValueError(f"{args.out}: already exists; choose another --out")
    fp32_key = (
        "fp32"
        if "fp32" in manifest.artifacts
        else next((k for k, a in manifest.artifacts.items() if a.format == "onnx" and a.precision == "fp32"), None)
    )
    if fp32_key is None:
        raise ValueError(f"{bundle.path}: no FP32 ONNX artifact to quantize")
    fp32_path = bundle.artifact_path(fp32_key)
    spec = manifest.input
    classes = list(manifest.classes)
    split = args.split or (manifest.metrics.get("fp32") or {}).get("split", "test")
    settings = GateSettings(
        budget=args.budget,
        metrics=tuple(args.gate_metric or DEFAULT_METRICS),
        fallback=not args.no_fallback,
        max_float_nodes=args.max_float_nodes,
        sensitivity_images=args.sensitivity_images,
    )
    speed = SpeedSettings.parse(args.float_prefix)

    run_dir = _run_dir(args, manifest)
    card = read_card(run_dir / "model.json" if run_dir.is_dir() else run_dir.parent / "model.json")
    with console.status("resolving the dataset splits"):
        splits = resolve_splits(card.data)
    _check_classes(str(run_dir), splits.classes, classes)

    if args.calibration_data:
        calib = calibration_set_from_directory(args.calibration_data, classes, spec, args.size, args.seed)
    else:
        calib = build_calibration_set(splits.train, classes, spec, args.size, args.seed)
    counts = ", ".join(f"{c}: {n}" for c, n in calib.class_counts().items())
    console.print(
        f"calibration set: {len(calib)} images from {calib.source} (seed {calib.seed}; {counts}), "
        f"fingerprint {calib.fingerprint}"
    )
    x_cal = calib.tensor(threads=threads, progress=True)
    if args.save_calibration_tensor:
        saved = save_tensor(args.save_calibration_tensor, x_cal, calib)
        console.print(f"calibration tensor saved: {saved}")

    held = _heldout(splits, split, args.limit, args.seed)
    data = EvalData(
        x=preprocess_paths([s.path for s in held], spec, threads=threads, progress=True, desc=f"{split} split"),
        y=[s.label for s in held],
        classes=classes,
        split=split,
        threads=threads,
        batch_size=args.batch_size,
    )
    targets = ("cpu", "tensorrt") if args.target == "both" else (args.target,)
    calib_summary = {k: v for k, v in calib.to_dict().items() if k != "images"}
    report: dict[str, Any] = {"bundle": str(bundle.path), "calibration": calib_summary, "targets": {}}

    def show(title: str, gate: Any) -> None:
        console.print(_metrics_table(title, gate.rows(), ("metric", "fp32", "int8", "drop pts", "status")))

    with tempfile.TemporaryDirectory(prefix="defectscope-calibrate-") as tmpdir:
        tmp = Path(tmpdir)
        with console.status("preparing the float model (shape inference, fusions)"):
            prepared = prepare_float_model(fp32_path, tmp / "float.prep.onnx")
        ref = data.evaluate(fp32_path)
        report["fp32"] = ref.to_dict()
        ranges = tmp / f"ranges.{args.method}.json"
        outcomes = []
        for target in targets:
            cfg = QuantConfig(
                method=args.method,
                target=target,
                per_channel=not args.per_tensor,
                reduce_range=args.reduce_range,
                percentile=args.percentile,
                batch_size=args.batch_size,
            )
            outcome = quantize_and_gate(
                prepared,
                ref,
                x_cal,
                data,
                cfg,
                ranges,
                tmp / f"{target}.onnx",
                settings,
                log=console.print,
                show=show,
                speed=speed,
            )
            report["targets"][target] = outcome.report()
            outcomes.append(outcome)

        per_backend = _gate_backends(
            args,
            console,
            {fp32_key: fp32_path, **{o.key: o.path for o in outcomes}},
            ref,
            data,
            settings,
            {fp32_key: ref, **{o.key: o.metrics for o in outcomes}},
            manifest.output.names[0],
        )
        report["backends"] = per_backend
        if args.report:
            rpath = Path(args.report)
            rpath.parent.mkdir(parents=True, exist_ok=True)
            rpath.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            console.print(f"report: {rpath}")
        failed = [o.key for o in outcomes if not o.passed]
        if failed:
            console.print(
                f"[bold red]accuracy gate failed[/] for {failed}: INT8 loses more than {args.budget:g} "
                f"points on {', '.join(settings.metrics)}; the bundle was not changed. Try another "
                "--method, a larger --size, --max-float-nodes, or a larger --budget if the loss is "
                "acceptable."
            )
            return EXIT_GATE

        calib_json = tmp / "calibration.json"
        calib_json.write_text(json.dumps(calib.to_dict(), indent=2) + "\n", encoding="utf-8")
        artifacts = dict(manifest.artifacts)
        metrics = {**manifest.metrics, "fp32": ref.to_dict()}
        src_files = {name: bundle.path / name for name in manifest.files}
        for o in outcomes:
            old = artifacts.get(o.key)
            if old is not None and old.file != o.file:
                src_files.pop(old.file, None)
            artifacts[o.key] = Artifact(
                file=o.file,
                format="onnx",
                precision="int8",
                quantization=o.quantization_record(calib.fingerprint, len(calib)),
            )
            metrics[o.key] = {**o.metrics.to_dict(), "gate": o.gate.to_dict()}
            src_files[o.file] = o.path
        for key, records in per_backend.items():
            metrics[key] = {**metrics.get(key, {}), "backends": records}
        src_files["calibration.json"] = calib_json
        provenance = {
            **manifest.provenance,
            "calibration": {
                "fingerprint": calib.fingerprint,
                "method": args.method,
                "size": len(calib),
                "seed": calib.seed,
                "source": calib.source,
                "file": "calibration.json",
            },
            "libraries": {**(manifest.provenance.get("libraries") or {}), **library_versions()},
        }
        default = manifest.default_artifact
        if not args.keep_default and "cpu" in targets:
            default = "int8"
        new_manifest = manifest.replace(
            artifacts=artifacts, metrics=metrics, provenance=provenance, default_artifact=default
        )
        written = write_bundle(Path(args.out) if args.out else bundle.path, new_manifest, src_files)
    console.print(f"[green]calibrated bundle written:[/] {written.path} (default artifact: {default})")
    return 0
