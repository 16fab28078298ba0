"""``defectscope extend`` on disk: the source run's Fisher state, the old tasks, the output
run directory (``extend_model`` in ``training.classification.extend`` does the training)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.classification.config import ConfigError
from training.classification.data import DataError, DataSpec
from training.classification.extend import extend_model
from training.classification.extend_config import ExtendConfig, task_name
from training.classification.extend_report import summary_text, write_run
from training.classification.taskset import TaskSet, concat_loader


def fisher_path(source: str | Path) -> Path:
    """Where a checkpoint's ``fisher.safetensors`` lives (beside its weights)."""
    from training.ewc_state import FISHER_FILE

    p = Path(source)
    return (p if p.is_dir() else p.parent) / FISHER_FILE


def compute_state(
    model,
    card,
    tasks: Sequence[TaskSet],
    *,
    n_samples: int,
    draws: int = 1,
    seed: int = 0,
    gamma: float = 1.0,
    batch_size: int = 32,
    progress: bool = False,
):
    """Fisher + anchors of ``model`` on the train splits of ``tasks`` (the data it was trained on)."""
    from training import ewc, ewc_state

    pool = [t for t in tasks if t.samples["train"]]
    if not pool:
        raise DataError("no training images to estimate the Fisher from")
    n = min(n_samples, sum(len(t.samples["train"]) for t in pool))
    fisher = ewc.estimate_fisher(
        model, concat_loader(pool, "train", batch_size, seed), n_samples=n, draws=draws, seed=seed, progress=progress
    )
    name = "+".join(t.name for t in pool)
    return ewc_state.EWCState.from_model(
        model,
        fisher,
        backbone=card.backbone,
        classes=card.classes,
        task=ewc_state.TaskRecord(name, n, "sampled", draws, tuple(card.classes)),
        gamma=gamma,
    )


def _old_tasks(
    specs: Sequence[DataSpec],
    classes: Sequence[str],
    card,
    cfg: ExtendConfig,
    *,
    required: bool,
    echo: Callable[[str], None],
) -> list[TaskSet]:
    from training.classification.data import resolve_splits

    out = []
    for spec in specs:
        try:
            splits = resolve_splits(spec)
        except (DataError, OSError) as exc:
            if required:
                raise DataError(f"old data {task_name(spec)}: {exc}") from None
            echo(f"note: old data {task_name(spec)} unavailable ({exc}); old-task accuracy is not measured")
            continue
        out.append(
            TaskSet.from_splits(
                task_name(spec), splits, classes, card.input, cfg.optim.augment, spec=spec, cache=cfg.optim.cache_images
            )
        )
    return out


def finalize_run(
    source: str | Path,
    *,
    data: DataSpec | None = None,
    n_samples: int = 512,
    draws: int = 1,
    seed: int = 0,
    gamma: float = 1.0,
    device: str = "auto",
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Compute ``fisher.safetensors`` beside a trained checkpoint from its training data.

    ``data`` defaults to the model card's data spec. Returns the file's path.
    """
    from training import distributed as dist
    from training.checkpoint import load_model

    dev = dist.setup(device)
    echo, progress = dist.main_echo(echo), progress and dist.is_main()
    model, card = load_model(source, device=dev)
    spec = data or (DataSpec.from_dict(card.data, where="model.json: data") if card.data else None)
    if spec is None:
        raise DataError(f"{source}: model.json has no data spec; pass --data")
    tasks = _old_tasks(
        [spec], card.classes, card, ExtendConfig(source=str(source), out=".", data=spec), required=True, echo=echo
    )
    t0 = time.perf_counter()
    state = compute_state(
        model, card, tasks, n_samples=n_samples, draws=draws, seed=seed, gamma=gamma, progress=progress
    )
    path = fisher_path(source)
    if dist.is_main():
        state.save(path)
    dist.barrier()  # the file exists for every rank once this returns
    echo(
        f"Fisher diagonal + anchors of {card.backbone} on {state.tasks[0].n_samples} {tasks[0].name} "
        f"images ({time.perf_counter() - t0:.1f}s) -> {path}"
    )
    return path


def _load_state(cfg: ExtendConfig, model, card, echo: Callable[[str], None]):
    """``(path, EWCState or None)``: the source model's Fisher/anchors, checked against its weights."""
    from training import ewc_state

    fpath = Path(cfg.fisher) if cfg.fisher else fisher_path(cfg.source)
    state = None
    if fpath.is_file():
        state = ewc_state.EWCState.load(fpath)
        state.check_model(model, backbone=card.backbone, source=str(fpath))
        echo(f"Fisher/anchors: {fpath} (tasks {[t.name for t in state.tasks]})")
    elif cfg.fisher:
        raise ewc_state.EWCError(f"{fpath}: no such Fisher file")
    return fpath, state


def _compute_missing_state(
    cfg: ExtendConfig, model, card, olds: Sequence[TaskSet], fpath: Path, progress: bool, echo: Callable[[str], None]
):
    """No Fisher file beside the source: estimate it from the old data and save it there."""
    from training import ewc_state

    if not olds:
        raise ewc_state.EWCError(
            f"{fpath}: no Fisher/anchor file, and no old data to compute it from; run "
            f"`defectscope extend --from {cfg.source} --finalize` where the old images are, or pass --old-data"
        )
    from training.distributed import is_main

    echo(f"no {fpath.name} beside the checkpoint: computing it from {[t.name for t in olds]} ...")
    state = compute_state(model, card, olds, **cfg.fisher_options, batch_size=cfg.optim.batch_size, progress=progress)
    if not is_main():
        return state
    try:
        state.save(fpath)
        echo(f"saved {fpath} (reused by later extensions of this model)")
    except OSError as exc:
        echo(f"note: cannot write {fpath} ({exc}); it is used for this run only")
    return state


def run(
    cfg: ExtendConfig,
    *,
    overwrite: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] = print,
    sync_bn: bool = False,
) -> dict[str, Any]:
    """``defectscope extend`` without the parser: load, extend, write the output run directory.

    Under torchrun every rank trains (its slice of each global batch) and evaluates the whole
    old/new splits itself (identical results, no gather); rank 0 alone writes ``--out``.
    """
    from training import checkpoint as ckpt
    from training import distributed as dist
    from training.classification.data import resolve_splits
    from training.engine import setup_runtime

    setup_runtime(cfg.optim.threads, cfg.optim.seed)
    device = dist.setup(cfg.optim.device)
    dist.per_rank_batch(cfg.optim.batch_size, dist.world())
    dist.check_sync_bn(sync_bn, device)
    echo, progress = dist.main_echo(echo), progress and dist.is_main()
    out = Path(cfg.out)
    if (out / ckpt.BEST).exists() and not overwrite:
        raise FileExistsError(f"{out}: holds a model already; pass --overwrite or another --out")
    if (
        Path(cfg.out).resolve()
        == (Path(cfg.source) if Path(cfg.source).is_dir() else Path(cfg.source).parent).resolve()
    ):
        raise ConfigError("out: must differ from the source run directory")
    model, card = ckpt.load_model(cfg.source, device=device)
    model = dist.convert_sync_bn(model, sync_bn)
    old_classes = list(card.classes)

    fpath, state = _load_state(cfg, model, card, echo)

    # -- data
    new_splits = resolve_splits(cfg.data)
    classes = old_classes + [c for c in new_splits.classes if c not in old_classes]
    new = TaskSet.from_splits(
        task_name(cfg.data),
        new_splits,
        classes,
        card.input,
        cfg.optim.augment,
        spec=cfg.data,
        cache=cfg.optim.cache_images,
    )
    if cfg.old_data is None:
        old_specs = [DataSpec.from_dict(card.data, where=f"{cfg.source}: model.json: data")] if card.data else []
    else:
        old_specs = list(cfg.old_data)
    need_old = bool(cfg.replay) or cfg.lam == "auto" or (cfg.method == "ewc" and state is None)
    olds = _old_tasks(old_specs, classes, card, cfg, required=need_old and cfg.old_data is not None, echo=echo)
    echo(
        f"new task {new.name}: {len(new.samples['train'])}/{len(new.samples['val'])}/{len(new.samples['test'])} "
        f"train/val/test, classes {[classes[c] for c in new.present_classes()]}; old tasks "
        f"{[t.name for t in olds] or 'none'}"
    )
    _warn_small_data([new_splits.classes[smp.label] for smp in new_splits.train], echo)

    if state is None and cfg.method == "ewc":
        state = _compute_missing_state(cfg, model, card, olds, fpath, progress, echo)

    outcome = extend_model(
        model, old_classes, new, olds, state, cfg, backbone=card.backbone, device=device, progress=progress, echo=echo
    )
    report = outcome.report
    report.update(source=str(cfg.source), config_hash=cfg.hash())
    report["distributed"] = {"world_size": dist.world(), "sync_bn": sync_bn and dist.active()}

    if dist.is_main():
        write_run(out, cfg, card, model, classes, new, outcome)
    dist.barrier()
    echo(summary_text(report))
    echo(f"-> {out}")
    return report


def _warn_small_data(names: list[str], echo: Callable[[str], None]) -> None:
    """The same too-small-to-learn-from warning as train (counts only: image sizes unread)."""
    from training.plan import classification_fingerprint, small_data_warnings

    if names:
        for w in small_data_warnings(classification_fingerprint([(1, 1)] * len(names), names), "images"):
            echo(f"warning: {w}")
