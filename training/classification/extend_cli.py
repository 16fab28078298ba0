"""``defectscope extend``: the parser, flags -> ``ExtendConfig``, and ``main``.

Help texts read the defaults from ``ExtendConfig`` / ``EXTEND_OPTIM`` (one definition).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from training.classification.config import BALANCE, ConfigError
from training.classification.data import DataError, DataSpec, source_of
from training.classification.extend_config import BN_MODES, EXTEND_OPTIM, KEEP, METHODS, ExtendConfig

EPILOG = """\
methods (combine freely):
  --method ewc      (default) L = CE_new + lambda * sum_i F_i (theta_i - theta*_i)^2, F the Fisher
                    diagonal of the source model on its own data (fisher.safetensors beside it)
  --method naive    plain fine-tuning on the new data (the baseline that forgets)
  --replay 10%|N    mix a class-balanced buffer of old training images into every epoch

lambda: --lambda {lam:g} (default; F is a per-image mean, CE a per-image mean) or --lambda auto: train
  with each of --lambda-grid and keep the one with the best mean of old and new validation accuracy.

scenarios (from the data): same classes -> new domain; unknown class names -> the head grows,
  old rows copied bit-exact (--freeze-old-rows keeps them so), new rows trained freely.

BN: running statistics stay frozen by default (--bn frozen): EWC protects parameters, and BN
  statistics re-estimated on a new line shift every old-line feature. --bn update lets them adapt.

outputs (--out): model.json, best.safetensors, fisher.safetensors (online EWC: gamma * F_old + F_new,
  for the next line), config.json, metrics.json (per epoch), report.json (old/new accuracy before and
  after, forgetting, penalty share, old-class logits), ewc_report.png

examples:
  defectscope extend --from runs/mono --finalize
  defectscope extend --from runs/mono --data elpv --cell-types poly --out runs/mono+poly
  defectscope extend --from runs/mono --data ./line2 --replay 10% --lambda auto --out runs/line2
  defectscope extend --from runs/line2 --data ./line3 --gamma 0.9 --out runs/line3 --old-data ./line2
"""


def _old_spec(arg: str) -> DataSpec | None:
    """``--old-data``: elpv | DIR | FILE.csv | FILE.json/.toml (DataSpec keys) | none."""
    if arg == "none":
        return None
    p = Path(arg)
    if p.suffix.lower() in (".json", ".toml") and p.is_file():
        from training.config_io import read_config_file

        return DataSpec.from_dict(read_config_file(p), where=str(p))
    src, path = source_of(arg)
    return DataSpec(source=src, path=path)


_D = ExtendConfig(source="", out="", data=DataSpec())  # the defaults the help texts quote
_O = EXTEND_OPTIM


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="defectscope extend",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(lam=_D.lam),
        description="Extend a trained model to a new product line or new defect classes without forgetting "
        "the old ones (Elastic Weight Consolidation, replay, or both).",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="RUN",
        help="source run directory (or .safetensors with model.json beside it)",
    )
    p.add_argument("--out", help="output run directory (required unless --finalize)")
    p.add_argument(
        "--finalize",
        action="store_true",
        help="only compute fisher.safetensors beside the source checkpoint (from its training data, "
        "or --data) and exit",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--config", help="TOML/JSON file with ExtendConfig keys; flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    _data_args(p)
    _method_args(p)
    _optim_args(p)
    from training.distributed import add_launch_args

    add_launch_args(p)
    return p


def _data_args(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    d = p.add_argument_group("new data (as for `defectscope train`)")
    d.add_argument("--data", default=S, help="'elpv', an ImageFolder directory, or a CSV manifest")
    d.add_argument("--data-source", choices=("folder", "csv", "elpv"), default=S, help="force the layout")
    d.add_argument("--labels", choices=("binary", "4class"), default=S, help="ELPV labels")
    d.add_argument("--cell-types", default=S, help="ELPV cell types, comma-separated (mono,poly)")
    d.add_argument("--test-fraction", type=float, default=S)
    d.add_argument("--val-fraction", type=float, default=S)
    d.add_argument("--good-classes", default=S, help="comma-separated 'no defect' classes")
    d.add_argument("--limit", type=int, default=S, help="at most N images per split (smoke runs)")
    d.add_argument(
        "--old-data",
        action="append",
        default=S,
        metavar="SPEC",
        help="old task data for evaluation, replay and a missing Fisher: 'elpv', a folder, a CSV, a "
        ".json/.toml DataSpec file, or 'none' (repeatable; default: the source model card's data)",
    )


def _method_args(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, default=S, help=f"({_D.method})")
    m.add_argument("--lambda", dest="lam", default=S, metavar="L|auto", help=f"penalty strength ({_D.lam:g}) or 'auto'")
    m.add_argument(
        "--lambda-grid", default=S, help=f"candidates for --lambda auto ({','.join(f'{v:g}' for v in _D.lambda_grid)})"
    )
    m.add_argument("--gamma", type=float, default=S, help=f"online-EWC decay of the old Fisher ({_D.gamma})")
    m.add_argument("--fisher", default=S, help="Fisher file (default: fisher.safetensors beside --from)")
    m.add_argument("--fisher-samples", type=int, default=S, help=f"images per Fisher estimate ({_D.fisher_samples})")
    m.add_argument(
        "--fisher-draws", type=int, default=S, help=f"labels sampled from the model per image ({_D.fisher_draws})"
    )
    m.add_argument("--replay", default=S, help="replay buffer: share of old train images (10%%) or a count (200)")
    share = f"repeat the buffer to make this share of each epoch ({_D.replay_share}; 0: seen once, its natural share)"
    m.add_argument("--replay-share", type=float, default=S, help=share)
    m.add_argument("--bn", choices=BN_MODES, default=S, help=f"BN running statistics ({_D.bn})")
    m.add_argument(
        "--freeze-old-rows",
        action="store_true",
        default=S,
        help="new classes: keep the old head rows bit-exact during training",
    )
    m.add_argument(
        "--keep",
        choices=KEEP,
        default=S,
        help=f"weights kept per lambda: the last epoch's or the best by mean old/new val accuracy ({_D.keep})",
    )
    m.add_argument(
        "--no-fisher",
        action="store_true",
        default=S,
        help="do not write the consolidated fisher.safetensors into --out",
    )


def _optim_args(p: argparse.ArgumentParser) -> None:
    from training.classification.cli import batch_help

    S = argparse.SUPPRESS
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=S, help=f"({_O.epochs})")
    o.add_argument("--batch-size", type=int, default=S, help=batch_help(_O.batch_size))
    o.add_argument("--lr", type=float, default=S, help=f"head LR ({_O.lr:g}); lower groups lr * lr_decay**k")
    o.add_argument("--lr-decay", type=float, default=S, help=f"({_O.lr_decay})")
    decay = f"AdamW decay ({_O.weight_decay:g}: it pulls away from the anchors)"
    o.add_argument("--weight-decay", type=float, default=S, help=decay)
    o.add_argument("--warmup-epochs", type=float, default=S, help=f"({_O.warmup_epochs})")
    o.add_argument("--label-smoothing", type=float, default=S, help=f"({_O.label_smoothing})")
    o.add_argument("--grad-clip", type=float, default=S, help=f"max gradient norm, 0 = off ({_O.grad_clip})")
    o.add_argument("--balance", choices=BALANCE, default=S, help=f"({_O.balance})")
    o.add_argument("--no-augment", action="store_true", default=S, help="disable augmentation")
    o.add_argument("--seed", type=int, default=S, help=f"({_O.seed})")
    o.add_argument("--threads", type=int, default=S)
    o.add_argument("--device", default=S, help="auto | cpu | cuda[:N]")
    o.add_argument("--no-amp", action="store_true", default=S, help="no float16 autocast on CUDA")
    o.add_argument("--no-channels-last", action="store_true", default=S, help="NCHW instead of NHWC convolutions")
    o.add_argument("--max-steps-per-epoch", type=int, default=S, help="cap batches per epoch (smoke runs)")


def config_from_args(ns: argparse.Namespace) -> ExtendConfig:
    """Defaults < ``--config`` file < flags."""
    a = vars(ns)
    base: dict[str, Any] = {}
    if a.get("config"):
        from training.config_io import read_config_file

        base = read_config_file(a["config"])
    d: dict[str, Any] = dict(base)
    d["source"] = a["source"]
    if a.get("out"):
        d["out"] = a["out"]
    d.setdefault("out", "")
    data = dict(d.get("data") or {})
    if "data" in a:
        data["source"], data["path"] = source_of(a["data"])
    if "data_source" in a:
        data["source"] = a["data_source"]
    for k in ("labels", "cell_types", "test_fraction", "val_fraction", "good_classes", "limit"):
        if k in a:
            data[k] = a[k]
    if "seed" in a:
        data.setdefault("seed", a["seed"])
    d["data"] = data
    if "old_data" in a:
        specs = [_old_spec(s) for s in a["old_data"]]
        d["old_data"] = tuple(s for s in specs if s is not None)
    if "lam" in a:
        v = str(a["lam"]).strip().lower()
        try:
            d["lam"] = "auto" if v == "auto" else float(v)
        except ValueError:
            raise ConfigError(f"--lambda: expected a number or 'auto', got {a['lam']!r}") from None
    if "lambda_grid" in a:
        try:
            d["lambda_grid"] = tuple(float(x) for x in str(a["lambda_grid"]).split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--lambda-grid: expected comma-separated numbers, got {a['lambda_grid']!r}") from None
    for k in (
        "method",
        "gamma",
        "fisher",
        "fisher_samples",
        "fisher_draws",
        "replay",
        "replay_share",
        "bn",
        "freeze_old_rows",
        "keep",
        "epochs",
        "batch_size",
        "lr",
        "lr_decay",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "balance",
        "seed",
        "threads",
        "device",
        "max_steps_per_epoch",
    ):
        if k in a:
            d[k] = a[k]
    if "grad_clip" in a:
        d["grad_clip"] = a["grad_clip"] or None
    if a.get("no_augment"):
        d["augment"] = "none"
    if a.get("no_amp"):
        d["amp"] = False
    if a.get("no_channels_last"):
        d["channels_last"] = False
    if a.get("no_fisher"):
        d["write_fisher"] = False
    if "data" not in a and not base.get("data") and not a.get("finalize"):
        raise ConfigError("--data: required (the new product line's images)")
    return ExtendConfig.from_dict(d, where=a.get("config") or "command line")


def main(argv: list[str] | None = None) -> int:
    """``defectscope extend`` of a classifier (``defectscope.tasks`` picks the task)."""
    from training.distributed import launched

    return launched("extend", _main, argv)


def _main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    progress = not ns.quiet and sys.stderr.isatty()
    try:
        cfg = config_from_args(ns)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from training.checkpoint import CheckpointError
    from training.classification.extend_run import finalize_run, run
    from training.distributed import DistributedError, main_echo
    from training.ewc_state import EWCError

    try:
        if ns.finalize:
            from training.engine import setup_runtime

            setup_runtime(cfg.optim.threads, cfg.optim.seed)
            data = cfg.data if "data" in vars(ns) else None
            finalize_run(cfg.source, data=data, **cfg.fisher_options, device=cfg.optim.device, progress=progress)
            return 0
        if not cfg.out:
            raise ConfigError("--out: required (the extended model's run directory)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*vmap.*")
            run(
                cfg,
                overwrite=ns.overwrite,
                progress=progress,
                sync_bn=getattr(ns, "sync_bn", False),
                echo=main_echo(print),
            )
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written to --out unless it says so above", file=sys.stderr)
        return 130
    except (ConfigError, DataError, CheckpointError, EWCError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
