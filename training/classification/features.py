"""Frozen-backbone features, computed once and cached on disk for linear probes and head warm-up.

Cache file: ``<cache_dir>/features/<key>.safetensors`` holding ``features`` ``(N, D)``
float32 and ``labels`` ``(N,)`` int64; ``key`` hashes the backbone, its weights
identity, the input transform (InputSpec) and the split's content fingerprint, so
any change of these misses the cache and anything else hits it.

Under torchrun the extraction is sharded: each rank runs its contiguous shard of the split,
the shards are all-gathered (every rank needs all features for the head epochs) and rank 0
writes the cache file. Chosen over "rank 0 extracts while the others wait at a barrier":
extraction is the slow part of a head warm-up or linear probe (a full forward per image,
the head epochs after it take seconds), it scales with the ranks when sharded, the gather
is small (N x D float32: ELPV at D=1280 is ~13 MB), and no rank idles in a barrier
long enough to meet the collective timeout on a big split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from runtime.inference.preprocess import InputSpec
from training.checkpoint import save_safetensors
from training.classification.data import Sample, Splits, cache_dir
from training.classifier import Classifier

if TYPE_CHECKING:
    from training.classification.config import TrainConfig

log = logging.getLogger(__name__)


def feature_key(backbone: str, weights_id: str, input_spec: InputSpec, split_fingerprint: str, extra: str = "") -> str:
    """Cache key of one split's features (``extra``: e.g. the init seed of random weights)."""
    parts = {
        "backbone": backbone,
        "weights": weights_id,
        "input": input_spec.to_dict(),
        "data": split_fingerprint,
        "extra": extra,
        "format": 2,
    }  # 2: OpenCV resize
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(key: str, root: str | Path | None = None) -> Path:
    return Path(root or cache_dir()) / "features" / f"{key}.safetensors"


@torch.no_grad()
def extract_features(
    model: Classifier,
    samples: Sequence[Sample],
    input_spec: InputSpec,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    desc: str = "features",
    progress: bool = True,
    threads: int = 2,
    channels_last: bool = False,
) -> torch.Tensor:
    """``model.forward_features`` over samples with the validation transform -> ``(N, D)`` float32."""
    from tqdm import tqdm

    from training.classification.loader import ImageDataset
    from training.classification.transforms import val_pipeline

    was_training = model.training
    model.eval()
    pipeline = val_pipeline(input_spec)
    # Decode a chunk in threads, then run the model over it: chunks keep RAM bounded.
    # Small batches: on CPU, lite0 runs faster per image at 8-16 than at 64 (cache effects).
    out = []
    bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, leave=False)
    chunk = batch_size * 8
    for start in range(0, len(samples), chunk):
        sub = ImageDataset(samples[start : start + chunk], pipeline, cache=True)
        sub.prefill(threads=threads, progress=False)
        for b in range(0, len(sub), batch_size):
            x = torch.stack([sub[i][0] for i in range(b, min(b + batch_size, len(sub)))]).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model.forward_features(x).float().cpu())
            bar.update(len(x))
    bar.close()
    model.train(was_training)
    dim = getattr(model, "feature_dim", 0)
    return torch.cat(out) if out else torch.empty(0, dim)


def cached_features(
    model: Classifier,
    samples: Sequence[Sample],
    input_spec: InputSpec,
    key: str,
    *,
    root: str | Path | None = None,
    **kw,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(features (N,D), labels (N,), cache_hit)``; computes and stores on a miss (atomic write)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from training import distributed as dist

    path = cache_path(key, root)
    labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
    hit = None
    if path.is_file():
        try:
            d = load_file(str(path))
            if d["features"].shape[0] == len(samples) and torch.equal(d["labels"], labels):
                hit = d["features"]
            else:
                log.warning("feature cache %s does not match the split; recomputing", path)
        except (SafetensorError, OSError, KeyError) as exc:
            log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
    # Every rank must agree (a node without the file, e.g. multi-node without a shared cache).
    if int(dist.all_reduce_min(torch.tensor([int(hit is not None)]))) == 1:
        return hit, labels, True  # type: ignore[return-value]
    lo, hi = dist.shard_bounds(len(samples), dist.rank(), dist.world())
    part = extract_features(model, list(samples)[lo:hi], input_spec, **kw)
    feats = torch.cat(dist.all_gather_objects(part)) if dist.active() else part
    if dist.is_main():
        save_safetensors(path, {"features": feats, "labels": labels}, metadata={"key": key})
    return feats, labels, False


def split_features(
    cfg: TrainConfig,
    model: Classifier,
    splits: Splits,
    split: str,
    input_spec: InputSpec,
    device: torch.device,
    *,
    progress: bool,
    echo: Callable[[str], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's body features of one split, cached under a key of everything they depend on."""
    from training.backbones import weights_id

    samples = splits.split(split)
    extra = f"seed={cfg.seed}" if cfg.weights == "none" else ""
    if cfg.bn == "adapt":  # the features depend on the statistics, hence on the training split
        extra += f"bn=adapt:{splits.split_fingerprint('train')}"
    key = feature_key(
        cfg.backbone, weights_id(cfg.weights, cfg.backbone), input_spec, splits.split_fingerprint(split), extra
    )
    t = time.perf_counter()
    # Features come from the body alone: the head is untouched by extraction.
    f, y, hit = cached_features(
        model,
        samples,
        input_spec,
        key,
        device=device,
        channels_last=cfg.channels_last,
        desc=f"features {split}",
        progress=progress,
        threads=max(1, torch.get_num_threads()),
    )
    echo(f"features {split}: {tuple(f.shape)} {'from cache' if hit else 'computed'} in {time.perf_counter() - t:.1f}s")
    return f, y
