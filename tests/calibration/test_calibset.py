"""Calibration sampling: stratified, seeded, reproducible, fingerprinted."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest


@dataclass(frozen=True, order=True)
class S:
    path: str
    label: int


def _pool(counts):
    return [S(f"/data/c{c}/img{i:04d}.png", c) for c, n in enumerate(counts) for i in range(n)]


def test_stratified_proportions_and_rare_class_kept():
    from calibration.calibset import stratified_sample

    pool = _pool([900, 90, 10])
    picked = stratified_sample(pool, 100, seed=0)
    counts = Counter(s.label for s in picked)
    assert len(picked) == 100 and len(set(picked)) == 100
    assert counts == {0: 90, 1: 9, 2: 1}
    # Too few images for proportions to give a rare class one image: it still gets one.
    tiny = Counter(s.label for s in stratified_sample(pool, 5, seed=0))
    assert tiny[2] == 1 and tiny[1] == 1 and sum(tiny.values()) == 5


def test_sampling_is_reproducible_and_order_independent():
    from calibration.calibset import stratified_sample

    pool = _pool([200, 50])
    a = stratified_sample(pool, 40, seed=3)
    shuffled = pool[:]
    random.Random(1).shuffle(shuffled)
    assert stratified_sample(shuffled, 40, seed=3) == a
    b = stratified_sample(pool, 40, seed=4)
    assert set(a) != set(b)
    assert Counter(s.label for s in a) == Counter(s.label for s in b) == {0: 32, 1: 8}
    # Batches mix classes: the result is not sorted by class.
    assert [s.label for s in a] != sorted(s.label for s in a)


def test_size_at_least_pool_takes_everything_and_bad_sizes_are_refused():
    from calibration.calibset import CalibrationSetError, stratified_sample

    pool = _pool([3, 2])
    assert sorted(stratified_sample(pool, 50, seed=0)) == sorted(pool)
    with pytest.raises(CalibrationSetError, match="must be >= 1"):
        stratified_sample(pool, 0, seed=0)
    with pytest.raises(CalibrationSetError, match="no images"):
        stratified_sample([], 10, seed=0)


def test_calibration_set_from_training_split(splits, tmp_path):
    from calibration.calibset import CalibrationSet, CalibrationSetError, build_calibration_set
    from runtime.inference.preprocess import InputSpec, Preprocessor

    spec = InputSpec(height=32, width=32, resize_size=32)
    cs = build_calibration_set(splits.train, splits.classes, spec, size=20, seed=0)
    assert len(cs) == 20 and cs.class_counts() == {"defect": 10, "ok": 10}
    assert {i.path for i in cs.items} <= {s.path for s in splits.train}
    again = build_calibration_set(list(reversed(splits.train)), splits.classes, spec, size=20, seed=0)
    assert again.fingerprint == cs.fingerprint and again.items == cs.items
    assert build_calibration_set(splits.train, splits.classes, spec, 20, seed=1).fingerprint != cs.fingerprint
    # The preprocessing is part of what the tensors are.
    other = InputSpec(height=32, width=32, resize_size=36)
    assert build_calibration_set(splits.train, splits.classes, other, 20, 0).fingerprint != cs.fingerprint

    x = cs.tensor(threads=2)
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x[3], Preprocessor(spec).load(cs.items[3].path))

    restored = CalibrationSet.from_dict(cs.to_dict())
    assert restored == cs
    tampered = cs.to_dict()
    tampered["images"][0]["sha256"] = "0" * 64
    with pytest.raises(CalibrationSetError, match="'fingerprint' does not match"):
        CalibrationSet.from_dict(tampered)


def test_fingerprint_follows_image_content(tmp_path, splits):
    import shutil

    from calibration.calibset import CalibrationSetError, build_calibration_set
    from runtime.inference.preprocess import InputSpec

    spec = InputSpec(height=32, width=32, resize_size=32)
    copy = [type(s)(str(tmp_path / f"{i}.png"), s.label, s.group) for i, s in enumerate(splits.train[:10])]
    for src, dst in zip(splits.train[:10], copy):
        shutil.copy(src.path, dst.path)
    cs = build_calibration_set(copy, splits.classes, spec, 10, 0)
    cs.verify_files()
    target = cs.items[0].path
    data = bytearray(open(target, "rb").read())
    with open(target, "wb") as fh:
        fh.write(bytes(data) + b"\0")  # same pixels, different file
    with pytest.raises(CalibrationSetError, match="changed since the set was drawn"):
        cs.verify_files()
    assert build_calibration_set(copy, splits.classes, spec, 10, 0).fingerprint != cs.fingerprint


def test_directory_source_and_tensor_file(tmp_path, dataset):
    from calibration.calibset import (
        CalibrationSetError,
        calibration_set_from_directory,
        images_in,
        load_tensor,
        save_tensor,
    )
    from runtime.inference.preprocess import InputSpec

    spec = InputSpec(height=32, width=32, resize_size=32)
    folder = dataset / "val"
    cs = calibration_set_from_directory(folder, ["defect", "ok"], spec, size=7, seed=0)
    assert len(cs) == 7 and all(i.label == -1 for i in cs.items) and cs.source.startswith("directory")
    assert {i.path for i in cs.items} <= set(images_in(folder))
    x = cs.tensor()
    path = save_tensor(tmp_path / "calib", x, cs)
    assert path.suffix == ".npy" and path.with_suffix(".json").is_file()
    y, meta = load_tensor(path, spec)
    np.testing.assert_array_equal(np.asarray(y), x)
    assert meta["fingerprint"] == cs.fingerprint and meta["shape"] == [7, 3, 32, 32]
    with pytest.raises(CalibrationSetError, match=r"the model takes \(3, 64, 64\)"):
        load_tensor(path, InputSpec(height=64, width=64, resize_size=64))
    with pytest.raises(CalibrationSetError, match="no images found"):
        images_in(tmp_path)
