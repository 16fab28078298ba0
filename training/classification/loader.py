"""torch Datasets / DataLoaders over resolved samples, with an in-RAM cache of resized images."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from training.classification.data import Sample
from training.classification.transforms import Pipeline, to_chw_uint8


class ImageDataset(Dataset):
    """``(image, label)`` pairs; image = ``pipeline.tail(pipeline.resize(uint8 (C,H,W)))``.

    With ``cache=True`` the output of the resize stage (uint8, gray kept 1-channel)
    is kept in RAM: ELPV at 224 px is ~130 MB, and decoding + resizing stops being
    repeated every epoch.
    """

    def __init__(self, samples: Sequence[Sample], pipeline: Pipeline, cache: bool = False) -> None:
        self.samples = list(samples)
        self.pipeline = pipeline
        self._cache: list[torch.Tensor | None] | None = [None] * len(self.samples) if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def _resized(self, i: int) -> torch.Tensor:
        cached = self._cache[i] if self._cache is not None else None
        if cached is not None:
            return cached
        from runtime.inference.preprocess import read_image

        x = self.pipeline.resize(to_chw_uint8(read_image(self.samples[i].path)))
        if self._cache is not None:
            self._cache[i] = x
        return x

    def prefill(self, threads: int = 2, progress: bool = True) -> None:
        """Decode + resize every image once (threads: OpenCV and torch resize release the GIL)."""
        if self._cache is None:
            return
        todo = [i for i, x in enumerate(self._cache) if x is None]
        if not todo:
            return
        from tqdm import tqdm

        with ThreadPoolExecutor(max(1, threads)) as pool:
            for _ in tqdm(
                pool.map(self._resized, todo),
                total=len(todo),
                desc="decoding images",
                unit="img",
                disable=not progress,
                leave=False,
            ):
                pass

    def with_pipeline(self, pipeline: Pipeline) -> ImageDataset:
        """Same samples and cache (valid when the resize stage is the same), another tail."""
        other = ImageDataset(self.samples, pipeline, cache=False)
        other._cache = self._cache
        return other

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.pipeline.tail(self._resized(i)), self.samples[i].label

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``N / (C * count)`` (1.0 for balanced data; absent classes 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def make_loader(
    dataset: Dataset,
    labels: np.ndarray,
    num_classes: int,
    batch_size: int,
    *,
    train: bool,
    balance: str = "none",
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    shard: tuple[int, int] | None = None,
    collate_fn=None,
) -> DataLoader:
    """Seeded DataLoader; ``balance="sampler"`` draws classes equally often (with replacement).

    ``shard=(rank, world)`` with world > 1 (a training loader under torchrun): ``batch_size``
    is the global batch; every rank draws the same seeded order and takes its slice of each
    global batch (``training.distributed.ShardedBatchSampler``), the class-balanced sampler too.
    """
    g = torch.Generator().manual_seed(seed)
    sampler, shuffle = None, train
    if train and balance == "sampler":
        w = class_weights(labels, num_classes)[torch.as_tensor(labels)]
        sampler = WeightedRandomSampler(w.double(), num_samples=len(labels), replacement=True, generator=g)  # type: ignore[arg-type]
        shuffle = False
    # A trailing training batch of 1 breaks BatchNorm statistics: drop only that case.
    drop_last = train and len(labels) > 1 and len(labels) % batch_size == 1
    if train and shard is not None and shard[1] > 1:
        from training.distributed import ShardedBatchSampler

        base = sampler if sampler is not None else RandomSampler(dataset, generator=g)  # type: ignore[arg-type]
        batches = ShardedBatchSampler(base, batch_size, shard[0], shard[1], drop_last=drop_last, generator=g, seed=seed)
        # generator=g as well: the iterator draws its base seed from it first, as one process does.
        return DataLoader(
            dataset,
            batch_sampler=batches,
            generator=g,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            collate_fn=collate_fn,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=g,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        collate_fn=collate_fn,
    )


class TensorPairs(Dataset):
    """Cached feature rows ``(N, D)`` + labels as a Dataset (linear probe / head warm-up)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self._labels = features, labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int):
        return self.features[i], int(self._labels[i])
