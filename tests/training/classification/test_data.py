"""Dataset layouts, splitting, corrupt-image handling, ELPV adapter."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.training.conftest import synth_image, write_folder  # noqa: E402
from training.classification.data import DataError, DataSpec, resolve_splits  # noqa: E402


def _paths(samples):
    return [s.path for s in samples]


def test_single_folder_is_split_stratified_seeded_and_disjoint(folder_data):
    spec = DataSpec(source="folder", path=str(folder_data), test_fraction=0.25, val_fraction=0.2, seed=3)
    a, b = resolve_splits(spec), resolve_splits(spec)
    assert a.classes == ["defect", "ok"] and a.good_classes == ["ok"]
    assert _paths(a.train) == _paths(b.train) and _paths(a.test) == _paths(b.test)
    sets = [set(_paths(x)) for x in (a.train, a.val, a.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == 80
    assert a.class_counts("test") == [10, 10]  # stratified: 25% of each class
    other = resolve_splits(DataSpec(source="folder", path=str(folder_data), seed=4))
    assert _paths(other.test) != _paths(a.test)
    assert a.fingerprint == b.fingerprint != other.fingerprint


def test_split_folders_are_used_as_given_and_val_carved_when_missing(tmp_path):
    root = tmp_path / "ds"
    write_folder(root / "train", {"good": 12, "defect": 12}, seed=1)
    write_folder(root / "test", {"good": 3, "defect": 3}, seed=2)
    s = resolve_splits(DataSpec(source="folder", path=str(root), val_fraction=0.25))
    assert len(s.test) == 6 and all("/test/" in p for p in _paths(s.test))
    assert len(s.val) == 6 and len(s.train) == 18 and all("/train/" in p for p in _paths(s.val))
    assert s.good_classes == ["good"]


def test_class_mismatch_between_splits_is_an_error(tmp_path):
    root = tmp_path / "ds"
    write_folder(root / "train", {"ok": 4, "defect": 4})
    write_folder(root / "val", {"ok": 2, "scratch": 2})
    with pytest.raises(DataError, match="differ from"):
        resolve_splits(DataSpec(source="folder", path=str(root)))


def test_empty_class_is_an_error(tmp_path):
    root = write_folder(tmp_path / "ds", {"ok": 4, "defect": 4})
    (root / "crack").mkdir()
    with pytest.raises(DataError, match="'crack' has no images"):
        resolve_splits(DataSpec(source="folder", path=str(root)))


def test_corrupt_images_are_skipped_counted_and_fatal_when_strict(tmp_path):
    root = write_folder(tmp_path / "ds", {"ok": 10, "defect": 10})
    (root / "ok" / "truncated.png").write_bytes((root / "ok" / "ok_000.png").read_bytes()[:60])
    (root / "defect" / "empty.jpg").write_bytes(b"")
    s = resolve_splits(DataSpec(source="folder", path=str(root)))
    bad = {p.rsplit("/", 1)[-1] for p, _ in s.skipped}
    assert bad == {"truncated.png", "empty.jpg"}
    assert s.summary()["skipped"] == 2
    assert not any(p.endswith(("truncated.png", "empty.jpg")) for p in _paths(s.train + s.val + s.test))
    assert len(s.train) + len(s.val) + len(s.test) == 20
    with pytest.raises(DataError, match="truncated.png"):
        resolve_splits(DataSpec(source="folder", path=str(root), strict=True))


def test_class_left_without_readable_images_is_an_error(tmp_path):
    root = write_folder(tmp_path / "ds", {"ok": 6})
    (root / "defect").mkdir()
    (root / "defect" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"\['defect'\] have no readable training images"):
        resolve_splits(DataSpec(source="folder", path=str(root)))


def test_csv_manifest_with_header_groups_and_splits(tmp_path):
    write_folder(tmp_path / "img", {"ok": 6, "defect": 6})
    rows = ["path,label,group,split"]
    for cls in ("ok", "defect"):
        for i in range(6):
            split = "test" if i < 2 else "train"
            rows.append(f"img/{cls}/{cls}_{i:03d}.png,{cls},line{i % 2},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    s = resolve_splits(DataSpec(source="csv", path=str(tmp_path / "m.csv"), val_fraction=0.25))
    assert s.classes == ["defect", "ok"]
    assert len(s.test) == 4 and len(s.val) + len(s.train) == 8
    assert {x.group for x in s.train + s.val + s.test} == {"line0", "line1"}


def test_csv_manifest_without_header_and_bad_rows(tmp_path):
    root = write_folder(tmp_path / "img", {"a": 5, "b": 5})
    lines = [f"{p},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (tmp_path / "m.csv").write_text("\n".join(lines))
    s = resolve_splits(DataSpec(source="csv", path=str(tmp_path / "m.csv"), test_fraction=0.2))
    assert s.class_counts("test") == [1, 1]
    (tmp_path / "bad.csv").write_text("path,label\nimg/a/a_000.png,\n")
    with pytest.raises(DataError, match=r"bad.csv:2"):
        resolve_splits(DataSpec(source="csv", path=str(tmp_path / "bad.csv")))


def test_gray_and_rgb_images_load_as_rgb_tensors(tmp_path):
    import cv2

    from training.classification.config import AugmentConfig
    from training.classification.loader import ImageDataset
    from training.classification.transforms import train_pipeline, val_pipeline

    rng = np.random.default_rng(0)
    gray = tmp_path / "g.png"
    color = tmp_path / "c.jpg"
    cv2.imwrite(str(gray), synth_image("defect", rng, 50))
    bgr = synth_image("ok", rng, 50, color=True)
    bgr[:, :, 0] = 255  # blue channel saturated: must end up as RGB channel 2
    cv2.imwrite(str(color), bgr)
    from runtime.inference.preprocess import InputSpec
    from training.classification.data import Sample

    spec = InputSpec(height=32, width=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)
    for pipe in (val_pipeline(spec), train_pipeline(spec, AugmentConfig())):
        ds = ImageDataset([Sample(str(gray), 0), Sample(str(color), 1)], pipe, cache=True)
        xg, _ = ds[0]
        xc, _ = ds[1]
        assert xg.shape == xc.shape == (3, 32, 32) and xg.dtype == torch.float32
        assert torch.equal(xg[0], xg[1]) and torch.equal(xg[1], xg[2])
    xc = ImageDataset([Sample(str(color), 1)], val_pipeline(spec))[0][0]
    assert xc[2].mean() > 0.9 and xc[2].mean() > xc[0].mean()


def test_elpv_adapter_reference_protocol():
    """Real ELPV labels: 2,624 cells, 75/25 stratified by class x cell type, val carved from train."""
    pytest.importorskip("elpv_dataset")
    s = resolve_splits(DataSpec(source="elpv", labels="binary", verify=False))
    assert s.classes == ["ok", "defect"] and s.good_classes == ["ok"]
    total = len(s.train) + len(s.val) + len(s.test)
    assert total == 2624 and len(s.test) == 656
    strata = lambda xs: Counter((x.label, x.group) for x in xs)  # noqa: E731
    full = strata(s.train + s.val + s.test)
    for key, n in strata(s.test).items():
        assert abs(n - full[key] / 4) <= 1, key
    four = resolve_splits(DataSpec(source="elpv", labels="4class", verify=False))
    assert four.classes == ["ok", "defect_33", "defect_67", "defect_100"]
    assert sum(four.class_counts("test")) == 656 and min(four.class_counts("train")) > 0
    mono = resolve_splits(DataSpec(source="elpv", cell_types=("mono",), verify=False))
    assert {x.group for x in mono.train + mono.test} == {"mono"}


def test_dataspec_validation_names_the_key():
    with pytest.raises(DataError, match="data.source"):
        DataSpec(source="parquet")
    with pytest.raises(DataError, match="unknown key"):
        DataSpec.from_dict({"source": "elpv", "colour": 1})
    assert DataSpec.from_dict(DataSpec(source="elpv", labels="4class").to_dict()) == DataSpec(
        source="elpv", labels="4class"
    )
