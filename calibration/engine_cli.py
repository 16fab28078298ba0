"""``defectscope build-engine``: build a TensorRT engine into a bundle, on the device.

Exit status: 0 ok; 1 cannot build (no TensorRT/GPU, missing artifact or
calibration data, builder failure); 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="defectscope build-engine",
        description="Build a TensorRT engine from a bundle's ONNX model on this device and add it to the bundle "
        "(artifact 'trt-<precision>') with the TensorRT version, GPU and batch range it was built for. "
        "INT8: TensorRT 10+ imports the symmetric QDQ model from `defectscope calibrate --target "
        "tensorrt` (explicit quantization); TensorRT 8.x calibrates the FP32 model with an entropy "
        "calibrator on the same calibration tensors (--calibration-data) and caches the result.",
    )
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "int8"), help="default: fp16")
    p.add_argument(
        "--batch",
        nargs=2,
        type=int,
        default=(1, 8),
        metavar=("MIN", "MAX"),
        help="batch range of the optimisation profile: what the runtime sends (default: 1 8)",
    )
    p.add_argument("--opt-batch", type=int, help="batch size the kernels are tuned for (default: MAX)")
    p.add_argument(
        "--input",
        default="float",
        choices=("float", "uint8"),
        help="engine input: float NCHW (default), or uint8 NHWC frames normalised inside the engine "
        "(built from the bundle's -u8 twin: export --uint8-input)",
    )
    p.add_argument(
        "--dla-core",
        type=int,
        metavar="N",
        help="build for DLA core N (Jetson; INT8 / FP16) with GPU fallback for layers the DLA cannot run; "
        "a device without it gets a GPU engine and the reason is logged and recorded",
    )
    p.add_argument(
        "--int8-mode",
        default="auto",
        choices=("auto", "explicit", "implicit"),
        help="explicit: QDQ model; implicit: calibrator on the FP32 model; auto: explicit on "
        "TensorRT >= 10, implicit on 8.x (default: auto)",
    )
    typed = p.add_mutually_exclusive_group()
    typed.add_argument(
        "--strongly-typed",
        dest="strongly_typed",
        action="store_const",
        const=True,
        help="TensorRT 10: follow the graph's types (no precision flags)",
    )
    typed.add_argument(
        "--weakly-typed",
        dest="strongly_typed",
        action="store_const",
        const=False,
        help="TensorRT 10: let the builder choose precisions (default on 10.x)",
    )
    p.add_argument(
        "--calibration-data",
        metavar="PATH",
        help="implicit INT8: the .npy from `calibrate --save-calibration-tensor`, or a folder holding "
        "the calibration images (the bundle's calibration.json picks the same files)",
    )
    p.add_argument(
        "--calibration-cache",
        metavar="FILE",
        help="implicit INT8: calibration cache to read/write (default: beside the bundle; a valid cache "
        "shipped inside the bundle is read too)",
    )
    p.add_argument("--recalibrate", action="store_true", help="ignore existing calibration caches")
    p.add_argument("--calib-batch-size", type=int, default=8, help="implicit INT8 calibration batch (default: 8)")
    p.add_argument(
        "--timing-cache",
        metavar="FILE",
        help="timing cache to reuse and update (default: ~/.cache/defectscope/tensorrt/, per TensorRT version and GPU)",
    )
    p.add_argument("--no-timing-cache", action="store_true", help="build without a timing cache")
    p.add_argument(
        "--skip-accuracy-gate",
        action="store_true",
        help="keep an INT8 engine without checking it on the bundle's held-out sample (not recommended)",
    )
    p.add_argument("--workspace-mib", type=int, default=2048, help="builder workspace limit in MiB (default: 2048)")
    p.add_argument("--key", help="artifact name in the manifest (default: trt-<precision>)")
    p.add_argument("--make-default", action="store_true", help="make the engine the bundle's default artifact")
    p.add_argument("--out", help="write the bundle with the engine here instead of updating BUNDLE in place")
    p.add_argument("--dry-run", action="store_true", help="print the build plan and exit")
    p.add_argument(
        "--tensorrt-version",
        help="with --dry-run: plan for this TensorRT version (e.g. 8.5.2) instead of the installed one",
    )
    p.add_argument("--verbose", action="store_true", help="TensorRT builder log at VERBOSE")
    return p


def match_calibration_images(calib: Any, found: list[str]) -> list[str] | None:
    """Paths in ``found`` holding exactly calibration.json's images (matched by <class dir>/<name>,
    then by name, verified by sha256), in the recorded order; None when any is missing or differs."""
    from runtime.fsio import sha256_file

    by_two: dict[tuple[str, str], list[str]] = {}
    by_name: dict[str, list[str]] = {}
    for p in found:
        q = Path(p)
        by_two.setdefault((q.parent.name, q.name), []).append(p)
        by_name.setdefault(q.name, []).append(p)
    out = []
    for item in calib.items:
        q = Path(item.path)
        candidates = by_two.get((q.parent.name, q.name)) or by_name.get(q.name) or []
        match = next((c for c in candidates if sha256_file(c) == item.sha256), None)
        if match is None:
            return None
        out.append(match)
    return out


def _calibration_stream(args: argparse.Namespace, bundle: Any, plan: Any, log: Any) -> tuple[Any, dict[str, Any]]:
    """BatchStream from --calibration-data (or the recorded image paths when they exist here)."""
    import numpy as np

    from calibration.calibrator import BatchStream
    from calibration.calibset import CalibrationSet, images_in, load_tensor, preprocess_paths

    manifest = bundle.manifest
    recorded = (manifest.provenance.get("calibration") or {}).get("fingerprint")
    calib_file = bundle.path / "calibration.json"
    calib = None
    if calib_file.is_file():
        calib = CalibrationSet.from_dict(json.loads(calib_file.read_text()), str(calib_file))
    src = args.calibration_data
    info: dict[str, Any] = {}
    if src and Path(src).is_file():
        x, meta = load_tensor(src, manifest.input)
        fp = meta.get("fingerprint")
        info = {"source": str(src), "fingerprint": fp, "images": int(len(x))}
        if recorded and fp != recorded:
            log(f"warning: {src} has calibration fingerprint {fp}, the bundle was calibrated with {recorded}")
        return BatchStream(np.asarray(x), plan.calib_batch), info
    if src:
        found = images_in(src)
        paths = found
        if calib is not None:
            wanted = match_calibration_images(calib, found)
            if wanted is not None:
                paths = wanted
                info["fingerprint"] = calib.fingerprint
            else:
                log(
                    f"warning: {src} does not hold calibration.json's images (same names and contents); "
                    f"calibrating on all {len(found)} images found there, a different calibration set than "
                    "the ONNX Runtime INT8 model's"
                )
        info.update({"source": str(src), "images": len(paths)})
        return BatchStream(preprocess_paths(paths, manifest.input), plan.calib_batch), info
    if calib is not None and all(os.path.isfile(i.path) for i in calib.items):
        calib.verify_files()
        log(f"calibrating on the {len(calib)} images listed in calibration.json")
        info = {"source": "calibration.json", "fingerprint": calib.fingerprint, "images": len(calib)}
        return BatchStream(calib.tensor(), plan.calib_batch), info
    return None, {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from calibration.cli import run_command

    return run_command("build-engine", _main, args)


def _main(args: argparse.Namespace, console: Any) -> int:
    from calibration.calibrator import CacheFile
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import Artifact
    from runtime.bundle.write import write_bundle
    from runtime.engine.build import BuildError, artifact_fields, build_engine
    from runtime.engine.meta import EngineUnavailableError, current_platform
    from runtime.engine.plan import calibration_cache_name, default_timing_cache, engine_file_name, plan_build
    from runtime.inference.preprocess import FLOAT_NCHW, UINT8_NHWC

    def log(msg: str) -> None:
        console.print(msg)

    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    platform = None
    if args.tensorrt_version:
        if not args.dry_run:
            raise BuildError("--tensorrt-version only plans (--dry-run); a build uses the installed TensorRT")
        trt_version = args.tensorrt_version
    else:
        try:
            platform = current_platform()
        except EngineUnavailableError as exc:
            raise BuildError(f"{exc}. To only see the plan here, add --dry-run --tensorrt-version X.Y.Z") from None
        trt_version = platform.tensorrt_version
    plan = plan_build(
        manifest,
        trt_version,
        args.precision,
        int8_mode=args.int8_mode,
        batch=tuple(args.batch),
        opt_batch=args.opt_batch,
        calib_batch=args.calib_batch_size,
        strongly_typed=args.strongly_typed,
        bundle_hint=str(bundle.path),
        input_kind=UINT8_NHWC if args.input == "uint8" else FLOAT_NCHW,
        dla_core=args.dla_core,
    )
    key = args.key or f"trt-{args.precision}"
    if args.dry_run:
        console.print_json(
            json.dumps(
                {
                    "bundle": str(bundle.path),
                    "key": key,
                    "file": engine_file_name(key, args.precision),
                    "plan": plan.to_dict(),
                }
            )
        )
        return 0
    assert platform is not None
    for note in plan.notes:
        log(f"note: {note}")
    log(
        f"building {key} on {platform.gpu} (sm {platform.compute_capability}), TensorRT {platform.tensorrt_version}: "
        f"{plan.source_file} -> {plan.precision}"
        + (f" ({plan.int8_mode} INT8)" if plan.int8_mode else "")
        + f", batch {plan.batch[0]}..{plan.batch[1]} (opt {plan.opt_batch})"
    )

    stream, cache = None, None
    calib_info: dict[str, Any] = {}
    in_bundle_cache = bundle.path / calibration_cache_name(platform.tensorrt_version)
    cache_path = (
        Path(args.calibration_cache)
        if args.calibration_cache
        else bundle.path.parent / f".{bundle.path.name}.{Path(calibration_cache_name(platform.tensorrt_version)).name}"
    )
    if plan.int8_mode == "implicit":
        if args.recalibrate and cache_path.exists():
            cache_path.unlink()
        cache = CacheFile(
            cache_path, platform.tensorrt_version, log=log, read_from=None if args.recalibrate else in_bundle_cache
        )
        stream, calib_info = _calibration_stream(args, bundle, plan, log)
        if stream is None and cache.read() is None:
            raise BuildError(
                "implicit INT8 on this TensorRT needs the calibration images: pass --calibration-data with the .npy "
                "written by `defectscope calibrate --save-calibration-tensor`, or a folder holding the images of the "
                "bundle's calibration.json (or a valid --calibration-cache)"
            )
    timing = None
    if not args.no_timing_cache:
        timing = Path(args.timing_cache) if args.timing_cache else default_timing_cache(platform)

    from calibration.calibrator import make_entropy_calibrator

    result = build_engine(
        plan,
        bundle.path / plan.source_file,
        manifest,
        calibration=stream,
        calibration_cache=cache,
        timing_cache=timing,
        workspace_mib=args.workspace_mib,
        verbose=args.verbose,
        log=log,
        make_calibrator=make_entropy_calibrator,
    )
    log(f"built in {result.seconds:.1f} s, {len(result.engine) / 1e6:.1f} MB")

    fields = artifact_fields(
        plan, result.platform, result.seconds, args.workspace_mib, calib_info or None, dla=result.dla
    )
    file_name = engine_file_name(key, args.precision)
    with tempfile.TemporaryDirectory(prefix="defectscope-engine-") as tmp:
        engine_tmp = Path(tmp) / "model.engine"
        engine_tmp.write_bytes(result.engine)
        files = {name: bundle.path / name for name in manifest.files}
        old = manifest.artifacts.get(key)
        if old is not None and old.file != file_name:
            files.pop(old.file, None)
        files[file_name] = engine_tmp
        if cache is not None and cache.path.is_file():
            files[calibration_cache_name(platform.tensorrt_version)] = cache.path
            fields["calibration_cache"] = calibration_cache_name(platform.tensorrt_version)
        artifact = Artifact(
            file=file_name,
            format="tensorrt",
            precision=args.precision,
            tensorrt_version=result.platform.tensorrt_version,
            gpu=result.platform.gpu,
            compute_capability=result.platform.compute_capability,
            batch=plan.batch,
            extra=fields,
            input=plan.input_kind,
        )
        new = manifest.replace(
            artifacts={**manifest.artifacts, key: artifact},
            default_artifact=key if args.make_default else manifest.default_artifact,
        )
        if args.precision == "int8" and not args.skip_accuracy_gate:
            from runtime.engine.gate import EngineRejectedError, gate_candidate, holdout_file
            from runtime.inference.tensorrt import TensorRTBackend

            fallback_x = None
            if holdout_file(bundle) is None:
                # No packed sample: a calibration-set subsample, FP32 outputs as the reference.
                calib = stream if stream is not None else _calibration_stream(args, bundle, plan, log)[0]
                fallback_x = getattr(calib, "x", None)
            try:
                report = gate_candidate(new, files, key, TensorRTBackend, Path(tmp), fallback_x=fallback_x)
            except EngineRejectedError as exc:
                raise BuildError(str(exc)) from None
            log(
                f"accuracy gate on the device: {report.metric} {report.drop_points:.2f} points "
                f"(budget {report.budget_points:g}, n={report.n}): passed"
            )
            new = new.replace(metrics={**new.metrics, key: {**new.metrics.get(key, {}), "gate": report.to_dict()}})
        dest = Path(args.out) if args.out else bundle.path
        written = write_bundle(dest, new, files)
    log(
        f"[green]engine added:[/] {written.path / file_name} as '{key}'"
        + (" (default artifact)" if args.make_default else "")
    )
    return 0
