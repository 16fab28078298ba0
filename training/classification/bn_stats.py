"""AdaBN: BatchNorm running statistics re-estimated on the training images (``--bn adapt``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from runtime.inference.preprocess import InputSpec
from training.classification.data import Sample
from training.classifier import Classifier


def adapt_bn(
    model: Classifier,
    samples: Sequence[Sample],
    input_spec: InputSpec,
    *,
    batch_size: int,
    device: torch.device,
    channels_last: bool,
    progress: bool,
) -> int:
    """Replace the model's BN running statistics by those of ``samples``; how many images it read.

    One no-grad pass in train mode with the validation transform (what the model sees at
    inference), cumulative average over all batches. Under torchrun every rank makes the same
    full pass (identical statistics, no communication). The model is left in eval mode.
    """
    from torch.optim.swa_utils import update_bn
    from tqdm import tqdm

    from training.classification.loader import ImageDataset
    from training.classification.transforms import val_pipeline

    ds = ImageDataset(samples, val_pipeline(input_spec), cache=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batches = (
        x.to(device).contiguous(memory_format=fmt)
        for x, _ in tqdm(loader, desc="BN statistics", unit="batch", disable=not progress, leave=False)
    )
    model.freeze_bn_stats, frozen = False, model.frozen
    model.frozen = frozenset()
    try:
        with torch.no_grad():
            update_bn(batches, model)
    finally:
        model.freeze_bn_stats, model.frozen = True, frozen
        model.eval()
    return len(ds)
