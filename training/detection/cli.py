"""``defectscope train`` / ``extend`` of a detector (``defectscope.tasks`` dispatches here).

Which task a command means is decided once, by ``defectscope.tasks`` (its table says from what).
Option defaults are read from the config dataclasses (``DetTrainConfig``, ``DetectorSpec``,
``DetectionSpec``); the help shows them, nothing restates them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from training.config_io import read_config_file

S = argparse.SUPPRESS
# DetTrainConfig fields set by flags (data/model/augment have their own groups).
OPTIM_KEYS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "grad_clip",
    "max_steps_per_epoch",
    "patience",
    "ema",
    "freeze_trunk_epochs",
    "score_threshold",
    "panels",
    "amp",
    "seed",
    "threads",
    "device",
)
DATA_KEYS = ("format", "val_fraction", "test_fraction", "limit")
# What a default alone does not say (the defaults themselves are read from the dataclasses).
NOTES = {
    "backbone": "a project trunk or a torchvision detector: fasterrcnn_mobilenet_v3_large_320_fpn, "
    "fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn_v2",
    "anchor_sizes": "pixels; None = the architecture's (trunks: 16,32,64,128; torchvision detectors: COCO's)",
    "aspect_ratios": "h/w; None = the architecture's (trunks: 0.25,0.5,1,2,4; torchvision detectors: 0.5,1,2)",
    "det_init": "backbone = trunk pretrained (--weights); coco = the whole torchvision detector from COCO, "
    "box predictor replaced",
    "det_weights": "the COCO checkpoint file for --det-init coco; None = torch hub's cache",
    "ema": "weight EMA decay, e.g. 0.999 (lever, off until measured)",
    "freeze_trunk_epochs": "gradual unfreezing: trunk frozen N epochs, then a stage per epoch (lever, off)",
    "copy_paste": "probability of pasting defect crops of other training images (lever, off until measured)",
    "multiscale": "training input scale factors, e.g. 0.8,0.9,1,1.1,1.2 (lever, off until measured)",
}


def _opt_type(annotation: str, default: Any) -> Any:
    """argparse ``type`` for a dataclass field: tuples comma-separated, ``X | None`` accepts 'none'."""
    base = annotation.replace(" | None", "").strip()
    if base.startswith("tuple"):
        inner = float if "float" in base else int
        return lambda s: tuple(inner(v) for v in s.split(","))
    conv = {"int": int, "float": float, "str": str}.get(base, type(default) if default is not None else str)
    if "None" in annotation:
        return lambda s: None if s.lower() in ("none", "null", "") else conv(s)
    return conv


def _fmt(v: Any) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, tuple) else str(v)


def _add_fields(group: Any, cls: type, keys: Any, dest_prefix: str) -> None:
    from training.detection.config import field_defaults

    d = field_defaults(cls)
    for f in fields(cls):
        if f.name not in keys:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(d.get(f.name), bool):
            group.add_argument(
                flag,
                dest=dest_prefix + f.name,
                type=lambda s: s.lower() in ("1", "true", "yes", "on"),
                metavar="BOOL",
                default=S,
                help=f"({d[f.name]})" + (f" {NOTES[f.name]}" if f.name in NOTES else ""),
            )
        else:
            group.add_argument(
                flag,
                dest=dest_prefix + f.name,
                type=_opt_type(str(f.type), d.get(f.name)),
                default=S,
                help=f"({_fmt(d.get(f.name))})" + (f" {NOTES[f.name]}" if f.name in NOTES else ""),
            )


def build_train_parser() -> argparse.ArgumentParser:
    from training.detection.config import MODEL_KEYS, DetTrainConfig, field_defaults
    from training.detection.datasets import DetectionSpec
    from training.detection.model import DetectorSpec
    from training.detection.transforms import AugmentSpec

    p = argparse.ArgumentParser(
        prog="defectscope train --task detection",
        description="Fine-tune a Faster R-CNN defect detector (torchvision, FPN).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="data (--data): COCO train.json (val.json/test.json beside it, else seeded splits by image),\n"
        "  a Pascal VOC folder (NEU-DET, GC10-DET layouts) or a YOLO folder (images/, labels/, classes.txt)\n"
        "outputs (--out): config.json, metrics.json, best.safetensors, model.json, report.json,\n"
        "  curves.png, pr_curves.png, panels.png\n\nexamples:\n"
        "  defectscope train --data /data/elpv-synth-det/train.json --out runs/det-lite0\n"
        "  defectscope train --data /data/NEU-DET --task detection --fpn-channels 256 --out runs/neu\n",
    )
    D = field_defaults(DetTrainConfig)
    p.add_argument("--task", choices=("classification", "detection"), default=S, help="force the task")
    p.add_argument("--config", default=S, help="TOML/JSON with DetTrainConfig keys ([data], [model], [augment])")
    p.add_argument("--data", default=S, help="COCO .json, VOC folder or YOLO folder")
    p.add_argument("--strict", action="store_true", default=S, help="bad annotations are fatal (else skipped, counted)")
    p.add_argument("--out", default=S, help=f"run directory ({D['out']})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (its config.json unless --config is given)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_fields(p.add_argument_group("data"), DetectionSpec, DATA_KEYS, "data.")
    _add_fields(p.add_argument_group("detector"), DetectorSpec, MODEL_KEYS, "model.")
    _add_fields(p.add_argument_group("optimisation"), DetTrainConfig, OPTIM_KEYS, "")
    p.add_argument(
        "--rot90",
        action="store_true",
        default=S,
        dest="augment.rot90",
        help="random quarter turns (square inputs; defects without a 'down')",
    )
    p.add_argument("--no-augment", action="store_true", default=S, help="no flips, zoom or jitter")
    _add_fields(
        p.add_argument_group("levers (off until measured)"), AugmentSpec, ("copy_paste", "multiscale"), "augment."
    )
    p.add_argument(
        "--plan",
        choices=("off", "auto"),
        default=S,
        help=f"auto: settings left unset (image size, anchors, proposals, NMS, epochs, patience, batch) are planned "
        f"from the training data; your flags win ({D['plan']}; not yet measured on the benchmarks)",
    )
    p.add_argument("--plan-only", action="store_true", help="print the plan from the data and exit (no training)")
    from training.distributed import add_launch_args

    add_launch_args(p, sync_bn=False)  # torchvision detectors use FrozenBatchNorm
    return p


def config_from_args(ns: argparse.Namespace) -> Any:
    from training.detection.config import DetTrainConfig

    v = vars(ns)
    base: dict[str, Any] = read_config_file(v["config"]) if "config" in v else {}
    if v.get("resume") and "config" not in v:
        import json
        from pathlib import Path

        if "out" not in v:
            raise ValueError("--resume: give the run's --out")
        saved = Path(v["out"]) / "config.json"
        if not saved.is_file():
            raise ValueError(f"{saved}: not found; nothing to resume")
        base = json.loads(saved.read_text())
        base.pop("config_hash", None)
    base.pop("task", None)
    data, model, augment = dict(base.pop("data", {})), dict(base.pop("model", {})), dict(base.pop("augment", {}))
    if "data" in v:
        data["path"] = v["data"]
    if "strict" in v:
        data["strict"] = True
    if v.get("no_augment"):
        augment.update(hflip=0.0, vflip=0.0, brightness=0.0, contrast=0.0, scale=(1.0, 1.0))
    for k, val in v.items():
        if k.startswith("data."):
            data[k[5:]] = val
        elif k.startswith("model."):
            model[k[6:]] = val
        elif k.startswith("augment."):
            augment[k[8:]] = val
        elif k in OPTIM_KEYS or k in ("out", "plan"):
            base[k] = val
    base["pinned"] = [k for k in OPTIM_KEYS if k in base]
    if "path" not in data:
        raise ValueError("--data: required (a COCO .json, a VOC folder or a YOLO folder)")
    return DetTrainConfig.from_dict({**base, "data": data, "model": model, "augment": augment}, where="command line")


def train_main(argv: list[str] | None = None) -> int:
    """``defectscope train`` of a detector (``defectscope.tasks`` picks the task)."""
    from training.distributed import launched

    return launched("train", _train_main, argv)


def _train_main(argv: list[str]) -> int:
    ns = build_train_parser().parse_args(argv)
    from training.data import DataError
    from training.detection.model import DetectorConfigError
    from training.detection.trainer import train_detector
    from training.distributed import DistributedError
    from training.run_dir import RunExistsError
    from training.weights import WeightsUnavailableError

    try:
        cfg = config_from_args(ns)
        if ns.plan_only:
            return _print_plan(cfg)
        from training.progress import log_every_for

        tty = sys.stderr.isatty()
        train_detector(
            cfg,
            overwrite=ns.overwrite,
            resume=ns.resume,
            progress=not ns.quiet and tty,
            echo=print,
            log_every=log_every_for(ns.quiet, tty),
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: defectscope train --out {ns.out} --resume", file=sys.stderr)
        return 130
    except (
        DataError,
        DetectorConfigError,
        RunExistsError,
        FileNotFoundError,
        ValueError,
        DistributedError,
        WeightsUnavailableError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _lambda_arg(s: str) -> float | str:
    if s.strip().lower() == "auto":
        return "auto"
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {s!r}") from None


def _grid_arg(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _print_plan(cfg: Any) -> int:
    from training.detection.datasets import resolve_detection
    from training.detection.task import apply_plan, make_plan

    splits = resolve_detection(cfg.data)
    plan = make_plan(cfg, splits.train, splits.classes)
    _, applied = apply_plan(cfg, plan)
    print("\n".join(plan.lines(applied)))
    return 0


def build_extend_parser() -> argparse.ArgumentParser:
    from training.detection.config import (
        EWC_SCOPES,
        SEARCH_EPOCH_SHARE,
        DetExtendConfig,
        DetTrainConfig,
        field_defaults,
    )
    from training.lambda_search import RULES, PickRule

    E, R = field_defaults(DetExtendConfig), PickRule()
    p = argparse.ArgumentParser(
        prog="defectscope extend (detector)",
        description="Extend a detection run to a new line (same classes) or new defect classes: the box "
        "predictor grows with old rows frozen bit-exact, EWC anchors the --ewc-scope parameters, replay optional.",
    )
    p.add_argument("--from", dest="source", required=True, metavar="RUN", help="detection run directory")
    p.add_argument("--data", required=True, help="new data: COCO .json, VOC folder or YOLO folder")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--strict", action="store_true", help="bad annotations are fatal")
    grid = ",".join(f"{v:g}" for v in E["lambda_grid"])
    p.add_argument(
        "--lambda",
        dest="lam",
        type=_lambda_arg,
        default=E["lam"],
        metavar="L|auto",
        help=f"EWC strength: a number (0 = naive fine-tuning) or auto = a short run per --lambda-grid point, "
        f"scored on old- and new-line val mAP@.5, then the full run at the pick (default: {E['lam']})",
    )
    p.add_argument(
        "--lambda-grid", type=_grid_arg, default=E["lambda_grid"], metavar="L,L,...", help=f"auto's grid ({grid})"
    )
    p.add_argument(
        "--search-epochs",
        type=int,
        default=E["search_epochs"],
        help=f"epochs per grid point (default: ceil(--epochs x {SEARCH_EPOCH_SHARE:.3g}); = --epochs keeps the "
        "pick's run, no rerun)",
    )
    p.add_argument(
        "--lambda-rule",
        choices=RULES,
        default=E["lambda_rule"],
        help="how auto picks: mean = best mean of old/new val mAP@.5; retain = best mean, unless naive forgets "
        f"> {100 * R.forget_tol:g} points: then the best mean among points forgetting <= {R.retain_ratio:g}x naive's "
        f"with new-line mAP@.5 within {100 * R.new_tol:g} points of naive's and a mean >= naive's "
        f"(default: {E['lambda_rule']})",
    )
    p.add_argument(
        "--fisher-samples",
        type=int,
        default=E["fisher_samples"],
        help=f"old training images in the Fisher ({E['fisher_samples']})",
    )
    p.add_argument("--replay", default=E["replay"], help="old training images mixed in: a count (50) or share (10%%)")
    p.add_argument(
        "--ewc-scope",
        choices=sorted(EWC_SCOPES),
        default=E["ewc_scope"],
        help="parameters EWC anchors: trunk = backbone, FPN, RPN; all = also the RoI box head and predictor "
        f"(default: {E['ewc_scope']})",
    )
    p.add_argument(
        "--no-freeze-old-rows", action="store_true", help="let the old class rows of the box predictor train"
    )
    p.add_argument("--quiet", action="store_true")
    _add_fields(p.add_argument_group("optimisation"), DetTrainConfig, OPTIM_KEYS, "")
    from training.distributed import add_launch_args

    add_launch_args(p, sync_bn=False)
    return p


def extend_main(argv: list[str] | None = None) -> int:
    """``defectscope extend`` of a detector (``defectscope.tasks`` picks the task)."""
    from training.distributed import launched

    return launched("extend", _extend_main, argv)


def _extend_main(argv: list[str]) -> int:
    ns = build_extend_parser().parse_args(argv)
    from training.checkpoint import CheckpointError
    from training.data import DataError
    from training.detection.config import DetExtendConfig, DetTrainConfig
    from training.detection.extend import extend_detector
    from training.distributed import DistributedError
    from training.ewc_state import EWCError
    from training.run_dir import RunExistsError

    v = vars(ns)
    try:
        train = DetTrainConfig.from_dict(
            {**{k: v[k] for k in OPTIM_KEYS if k in v}, "out": ns.out, "data": {"path": ns.data, "strict": ns.strict}},
            where="command line",
        )
        cfg = DetExtendConfig(
            ns.source,
            train,
            lam=ns.lam,
            lambda_grid=ns.lambda_grid,
            search_epochs=ns.search_epochs,
            lambda_rule=ns.lambda_rule,
            fisher_samples=ns.fisher_samples,
            replay=ns.replay,
            freeze_old_rows=not ns.no_freeze_old_rows,
            ewc_scope=ns.ewc_scope,
        )
        extend_detector(cfg, overwrite=ns.overwrite, progress=not ns.quiet and sys.stderr.isatty())
    except (
        CheckpointError,
        DataError,
        EWCError,
        RunExistsError,
        FileNotFoundError,
        ValueError,
        DistributedError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "build_extend_parser",
    "build_train_parser",
    "config_from_args",
    "extend_main",
    "train_main",
]
