"""``defectscope export`` and ``defectscope calibrate`` of a classifier (exit codes: calibration.cli_args)."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibration.cli_args import (  # noqa: F401  (EXIT_*: the commands' exit codes, imported from here)
    EXIT_ERROR,
    EXIT_GATE,
    EXIT_PARITY,
    PARITY_IMAGES,
    calibrate_parser,
    export_parser,
    resolve_threads,
    run_command,
    run_dir_of,
    setup_torch,
)


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


def export_main(argv: list[str] | None = None) -> int:
    """``defectscope export`` of a classifier run (``defectscope.tasks`` picks the task)."""
    return run_command("export", _export, export_parser().parse_args(argv))


def _export(args: argparse.Namespace, console: Any) -> int:
    from calibration.calibset import preprocess_paths, stratified_sample
    from calibration.evaluate import evaluate_onnx
    from calibration.export import check_parity, export_onnx
    from calibration.provenance import git_commit, library_versions, utc_now
    from runtime.bundle.archive import pack
    from runtime.bundle.manifest import Artifact, Manifest, ModelInfo, OutputSpec
    from runtime.bundle.write import write_bundle
    from runtime.fsio import sha256_file
    from training.checkpoint import load_model
    from training.classification.data import resolve_splits

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out}: already exists; pass --force to replace it")
    threads = resolve_threads(args.threads)
    setup_torch(threads)
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
        n_parity = args.parity_images if args.parity_images is not None else PARITY_IMAGES["classification"]
        parity_samples = sorted(stratified_sample(held, min(n_parity, len(held)), 0), key=lambda s: s.path)
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
        files = {"model.onnx": onnx_path}
        if args.uint8_input:
            manifest = _with_uint8_twins(manifest, files, ["fp32"], [s.path for s in parity_samples], tmp, threads)
            console.print(manifest.provenance["export"]["uint8_parity"]["fp32-u8"]["summary"])
        bundle = write_bundle(out, manifest, files)
    console.print(f"[green]bundle written:[/] {bundle.path} ({manifest.model.name} {manifest.model.version})")
    if args.pack:
        archive = pack(bundle.path, args.pack)
        console.print(f"packed: {archive}")
    return 0


def _with_uint8_twins(
    manifest: Any, files: dict[str, Path], keys: list[str], paths: Sequence[Any], tmp: str | Path, threads: int
) -> Any:
    """``manifest`` plus uint8-input twins of ``keys`` (written under ``tmp``, added to ``files``), each
    parity-checked on the images at ``paths``; the parity reports go to provenance.export.uint8_parity."""
    from calibration.graph_input import add_uint8_twins
    from runtime.inference.preprocess import read_image

    artifacts = dict(manifest.artifacts)
    frames = [read_image(p) for p in paths]
    reports = add_uint8_twins(artifacts, files, keys, manifest.input, frames, Path(tmp), threads=threads)
    export = dict(manifest.provenance.get("export") or {})
    export["uint8_parity"] = {
        **(export.get("uint8_parity") or {}),
        **{k: {**r.to_dict(), "summary": r.summary()} for k, r in reports.items()},
    }
    return manifest.replace(artifacts=artifacts, provenance={**manifest.provenance, "export": export})


def calibrate_main(argv: list[str] | None = None) -> int:
    """``defectscope calibrate`` of a classifier bundle (``defectscope.tasks`` picks the task)."""
    args = calibrate_parser().parse_args(argv)
    if args.size is None:
        from calibration.calibset import DEFAULT_SIZE

        args.size = DEFAULT_SIZE
    return run_command("calibrate", _calibrate, args)


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
    from calibration.graph_input import twin_key
    from calibration.pipeline import EvalData, GateSettings, quantize_and_gate
    from calibration.provenance import library_versions
    from calibration.quantize import QuantConfig, prepare_float_model
    from calibration.speed import SpeedSettings
    from runtime.bundle.load import load_bundle
    from runtime.bundle.manifest import Artifact
    from runtime.bundle.write import write_bundle
    from runtime.inference.preprocess import UINT8_NHWC
    from training.checkpoint import read_card
    from training.classification.data import resolve_splits

    threads = resolve_threads(args.threads)
    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    if args.out and Path(args.out).exists():
        raise ValueError(f"{args.out}: already exists; choose another --out")
    fp32_key = (
        "fp32"
        if "fp32" in manifest.artifacts
        else next(
            (
                k
                for k, a in manifest.artifacts.items()
                if a.format == "onnx" and a.precision == "fp32" and a.input != UINT8_NHWC
            ),
            None,
        )
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

    run_dir = run_dir_of(args, manifest)
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
        if any(a.input == UINT8_NHWC for a in manifest.artifacts.values()):
            # The bundle serves uint8 frames: its INT8 artifacts get uint8-input twins as well.
            new_manifest = _with_uint8_twins(
                new_manifest, src_files, [o.key for o in outcomes], [s.path for s in held[:32]], tmp, threads
            )
            for key in (twin_key(o.key) for o in outcomes):
                console.print(new_manifest.provenance["export"]["uint8_parity"][key]["summary"])
        written = write_bundle(Path(args.out) if args.out else bundle.path, new_manifest, src_files)
    console.print(f"[green]calibrated bundle written:[/] {written.path} (default artifact: {default})")
    return 0
